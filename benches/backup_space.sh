#!/usr/bin/env bash
# Disk used against live data under a backup's churn: a 3-node cluster
# (RF 3) and a gateway, release processes on loopback. restic backs up a
# tree of TREE_MIB (1024) MiB, then ROUNDS (5) times 10% of the files are
# rewritten, restic backs up again and runs `forget --keep-last 2 --prune`,
# and rclone syncs the same tree to a prefix of the same bucket. Then, a
# grace period later, one `admin gc --wait`. Prints, before and after the
# collection, the bucket's live bytes (what `tenant show` counts), the
# chunk files on all nodes, and their ratio: the replication factor alone
# is 3.0.
#
#   benches/backup_space.sh
#   TREE_MIB=256 ROUNDS=2 benches/backup_space.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tree_mib=${TREE_MIB:-1024}
rounds=${ROUNDS:-5}
grace_secs=20

cargo build --release --bin lumbung
source benches/cluster.sh
init_cluster
for i in 1 2 3; do
  # Collect only when asked, with a short grace.
  sed -i -E "s/^grace_secs = .*/grace_secs = $grace_secs/; s/^interval_secs = .*/interval_secs = 86400/" \
    "$work/cluster/node$i.toml"
done
sed -i -E 's/^(tenant_requests|address_requests|address_connections)_per_sec = .*/\1_per_sec = 0/' "$work/cluster/gateway.toml"
start_cluster
admin=(target/release/lumbung admin --config "$work/cluster/admin.toml")

# The tree: 4 MiB files of random bytes.
files=$((tree_mib / 4))
mkdir -p "$work/tree"
for n in $(seq 1 "$files"); do head -c $((4 << 20)) /dev/urandom >"$work/tree/f$n"; done

export RESTIC_REPOSITORY="s3:$S3_ENDPOINT/$S3_BUCKET/restic"
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$work/restic-cache"
export AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY"
export RCLONE_CONFIG="$work/rclone.conf" RCLONE_CONFIG_L_TYPE=s3 RCLONE_CONFIG_L_PROVIDER=Other \
  RCLONE_CONFIG_L_ACCESS_KEY_ID="$S3_ACCESS_KEY" RCLONE_CONFIG_L_SECRET_ACCESS_KEY="$S3_SECRET_KEY" \
  RCLONE_CONFIG_L_ENDPOINT="$S3_ENDPOINT" RCLONE_CONFIG_L_REGION="$S3_REGION" \
  RCLONE_CONFIG_L_FORCE_PATH_STYLE=true RCLONE_CA_CERT="$S3_CA_CERT"
: >"$RCLONE_CONFIG"
rst() { restic --cacert "$S3_CA_CERT" -q "$@"; }
# rclone loads AWS_CA_BUNDLE itself and fails on it; RCLONE_CA_CERT is enough.
rcl() { env -u AWS_CA_BUNDLE rclone "$@"; }

rst init >/dev/null
rst backup "$work/tree"
rcl sync "$work/tree" "L:$S3_BUCKET/mirror"
for round in $(seq 1 "$rounds"); do
  for n in $(shuf -i 1-"$files" -n $((files / 10))); do
    head -c $((4 << 20)) /dev/urandom >"$work/tree/f$n"
  done
  rst backup "$work/tree"
  rst forget --keep-last 2 --prune >/dev/null
  rcl sync "$work/tree" "L:$S3_BUCKET/mirror"
  echo "round $round done"
done

# Live bytes: what the bucket's objects hold; disk: every node's chunks.
measure() {
  local live chunks
  live=$("${admin[@]}" --json tenant show demo | jq '.used_bytes')
  chunks=0
  for i in 1 2 3; do
    chunks=$((chunks + $(du -sb "$work/cluster/data/node$i/chunks" | cut -f1)))
  done
  printf '%-18s live %8.1f MiB   chunk files %8.1f MiB   ratio %.2f\n' "$1" \
    "$(echo "$live / 1048576" | bc -l)" "$(echo "$chunks / 1048576" | bc -l)" \
    "$(echo "$chunks / $live" | bc -l)"
}
measure "before collection"
sleep "$grace_secs"
"${admin[@]}" gc --wait
sleep 3 # followers unlink as they apply
measure "after collection"
