#!/usr/bin/env bash
# The Raft log's size on disk under sustained small writes: a 3-node
# cluster (RF 3) and a gateway, release processes on loopback, take 4 KiB
# PUTs at concurrency 64 for MINUTES (5). One bucket: its index shard is
# busy (every object inline in its log) while the other shards write
# almost nothing, the case where a few idle entries kept old segments
# alive. Every SAMPLE_SECS (30) it prints each node's raftlog folder size
# and number of segments; at the end the bound docs/design.md states
# (2 x live + 2 segments of 64 MiB) beside the largest size seen.
#
#   benches/log_size.sh
#   MINUTES=10 benches/log_size.sh
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${MINUTES:-5}
sample_secs=${SAMPLE_SECS:-30}

cargo build --release --bin lumbung
load_built=$(cargo bench --bench load --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .target.name == "load") | .executable // empty' | tail -n 1)

source benches/cluster.sh
init_cluster
sed -i -E 's/^(tenant_requests|address_requests|address_connections)_per_sec = .*/\1_per_sec = 0/' "$work/cluster/gateway.toml"
start_cluster

"$load_built" --env-file "$work/cluster/s3.env" --op put --size 4KiB --concurrency 64 \
  --seconds $((minutes * 60)) --no-retries >"$work/load.out" 2>"$work/load.err" &
load_pid=$!

largest=0
printf '%8s  %s\n' "seconds" "raftlog per node: MiB (segments)"
start=$(date +%s)
while kill -0 "$load_pid" 2>/dev/null; do
  sleep "$sample_secs"
  line=""
  for i in 1 2 3; do
    dir="$work/cluster/data/node$i/raftlog"
    bytes=$(du -sb "$dir" | cut -f1)
    segs=$(find "$dir" -name 'segment-*.log' | wc -l)
    [ "$bytes" -gt "$largest" ] && largest=$bytes
    line+=$(printf '  node%d %6.1f (%d)' "$i" "$(echo "$bytes / 1048576" | bc -l)" "$segs")
  done
  printf '%8d %s\n' $(($(date +%s) - start)) "$line"
done
wait "$load_pid" || true
echo "== load"
cat "$work/load.out"
echo "== largest raftlog folder: $((largest / 1048576)) MiB"
