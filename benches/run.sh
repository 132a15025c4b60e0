#!/usr/bin/env bash
# Reproduces README's performance figures on this machine: starts a 3-node
# cluster (RF 3) and a gateway as real release processes on loopback,
# measures the disk's direct+fsync write bandwidth, then drives the load
# tool over TLS. Every figure is printed next to the command that made it.
#
#   benches/run.sh              # all figures (a few minutes)
#   SECONDS_PER_PHASE=10 benches/run.sh
#   PHASES="small" SMALL_OBJECT_SECONDS=120 benches/run.sh   # some phases:
#       five-gib (one 5 GiB upload), small (4 KiB PUT), both (4 KiB PUT
#       then GET), large (64 MiB PUT then GET)
#   FEATURES=engine-comparison LUMBUNG_STORE_ENGINE=fjall benches/run.sh
#       # the nodes keep their state in fjall (or sled), to compare engines
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_PHASE:-20}

phases=${PHASES:-five-gib small both large}
has() { [[ " $phases " == *" $1 "* ]]; }
cargo build --release --bin lumbung ${FEATURES:+--features "$FEATURES"}
cargo bench --bench load --no-run
load=(cargo bench --bench load --)

source benches/cluster.sh

echo "== disk: dd if=/dev/zero of=$work/dd.bin bs=1M count=1024 oflag=direct conv=fsync"
dd if=/dev/zero of="$work/dd.bin" bs=1M count=1024 oflag=direct conv=fsync 2>&1 | tail -n 1
rm -f "$work/dd.bin"

init_cluster
# One load tool on one address is the whole workload here: measure the
# cluster, not the gateway's per-client rate limits.
sed -i -E 's/^(tenant_requests|address_requests|address_connections)_per_sec = .*/\1_per_sec = 0/' "$work/cluster/gateway.toml"
start_cluster

rss() {
  local names=(node1 node2 node3 gateway) i=0
  for p in "${pids[@]}"; do
    printf '%s rss=%s peak=%s  ' "${names[$i]}" \
      "$(awk '/VmRSS/ {print $2 $3}' /proc/$p/status)" "$(awk '/VmHWM/ {print $2 $3}' /proc/$p/status)"
    i=$((i + 1))
  done
  echo
}

run() {
  echo "== ${load[*]} --env-file s3.env $*"
  "${load[@]}" --env-file "$work/cluster/s3.env" "$@" 2>/dev/null
  rss
}

# Memory of one 5 GiB upload, on the fresh cluster: peak minus before.
if has five-gib; then
before=(); for p in "${pids[@]}"; do before+=("$(awk '/VmRSS/ {print $2}' /proc/$p/status)"); done
echo "== head -c 5GiB /dev/urandom | aws s3 cp - s3://\$S3_BUCKET/five-gib (multipart, streamed)"
start=$(date +%s)
head -c 5368709120 /dev/urandom |
  AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY AWS_DEFAULT_REGION=$S3_REGION \
  aws --endpoint-url "$S3_ENDPOINT" --ca-bundle "$S3_CA_CERT" s3 cp - "s3://$S3_BUCKET/five-gib" \
    --expected-size 5368709120 --only-show-errors
echo "uploaded 5 GiB in $(( $(date +%s) - start )) s"
names=(node1 node2 node3 gateway); i=0
for p in "${pids[@]}"; do
  peak=$(awk '/VmHWM/ {print $2}' /proc/$p/status)
  printf '%s: rss before %s kB, peak %s kB, added %s MiB\n' "${names[$i]}" "${before[$i]}" "$peak" $(( (peak - before[i]) / 1024 ))
  i=$((i + 1))
done
fi

# Memory after storing about 100,000 small objects.
if has small; then run --size 4KiB --concurrency 64 --seconds "${SMALL_OBJECT_SECONDS:-70}" --op put; fi
if has both; then run --size 4KiB --concurrency 64 --seconds "$secs"; fi
if has large; then run --size 64MiB --concurrency 4 --seconds "$secs"; fi
