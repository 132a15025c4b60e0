#!/usr/bin/env bash
# The flood figure of README: a 3-node cluster of release processes whose
# gateway keeps its default limits; a tenant reads 4 KiB objects from
# 127.0.0.1, alone and then while 127.0.0.2 floods the gateway with bad
# signatures, garbage and half-open TLS handshakes.
#
#   benches/flood.sh            # 15 s per phase
#   SECONDS_PER_PHASE=30 benches/flood.sh
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_PHASE:-15}

cargo build --release --bin lumbung
cargo bench --bench flood --no-run

work=$(mktemp -d /var/tmp/lumbung-flood.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import random; print(random.randint(20000, 32000))')
target/release/lumbung admin init-cluster --nodes 3 --dir "$work/cluster" --base-port "$port" >/dev/null
for i in 1 2 3; do
  RUST_LOG=warn,openraft=error target/release/lumbung node --config "$work/cluster/node$i.toml" 2>"$work/node$i.log" &
  pids+=($!)
done
RUST_LOG=warn target/release/lumbung gateway --config "$work/cluster/gateway.toml" 2>"$work/gateway.log" &
pids+=($!)
set -a; . "$work/cluster/s3.env"; set +a
for _ in $(seq 1 120); do
  curl -s -o /dev/null --cacert "$S3_CA_CERT" "$S3_ENDPOINT/" && break; sleep 0.5
done
sleep 3  # let every shard elect a leader

echo "== gateway limits: $(grep -E '_per_sec|^max_connections' "$work/cluster/gateway.toml" | tr '\n' ' ')"
flood=(target/release/deps/$(basename "$(ls -t target/release/deps/flood-* | grep -v '\.d$' | head -1)"))
echo "== flood --mode victim --seconds $secs  (alone)"
alone=$("${flood[@]}" --env-file "$work/cluster/s3.env" --mode victim --label alone --seconds "$secs")
echo "$alone"
echo "== nice -n ${ATTACKER_NICE:-19} flood --mode flood --flood-from 127.0.0.2  (a real attacker does not share our CPU)"
nice -n "${ATTACKER_NICE:-19}" "${flood[@]}" --env-file "$work/cluster/s3.env" --mode flood --seconds $((secs + 4)) &
attacker=$!
sleep 2
echo "== flood --mode victim --seconds $secs  (during the flood)"
flooded=$("${flood[@]}" --env-file "$work/cluster/s3.env" --mode victim --label flooded --seconds "$secs")
echo "$flooded"
wait "$attacker"
p99() { sed -nE 's/.* p99=([0-9.]+)ms.*/\1/p' <<<"$1"; }
awk -v a="$(p99 "$alone")" -v f="$(p99 "$flooded")" 'BEGIN { printf "p99 flooded / alone = %.2f\n", f / a }'
