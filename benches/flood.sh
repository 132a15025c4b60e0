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

source benches/cluster.sh
init_cluster
start_cluster

echo "== gateway limits: $(grep -E '_per_sec|^max_connections' "$work/cluster/gateway.toml" | tr '\n' ' ')"
flood=(cargo bench -q --bench flood --)
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
