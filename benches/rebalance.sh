#!/usr/bin/env bash
# Rebalancing onto a new node, twice: once at full speed, once under
# `--rate`. Starts a 3-node cluster (RF 3) of release processes, writes
# DATA_GIB of 4 MiB objects, then for each run: a new node joins, a client
# writes and reads 4 KiB objects, and `admin rebalance` moves replicas onto
# the new node. Prints the rebalance's time and copy rate and the client's
# p99 during the move, next to the same client's p99 with nothing moving.
# Between the runs the first new node is drained and removed. After each
# run, every node's peak memory so far (VmHWM) is printed.
#
#   benches/rebalance.sh                 # DATA_GIB=2 RATE_MBS=20
set -euo pipefail
cd "$(dirname "$0")/.."
data_gib=${DATA_GIB:-2}
rate=${RATE_MBS:-20}

cargo build --release --bin lumbung
cargo bench --bench load --no-run
load=(cargo bench --bench load --)
source benches/cluster.sh

init_cluster
sed -i -E 's/^(tenant_requests|address_requests|address_connections)_per_sec = .*/\1_per_sec = 0/' "$work/cluster/gateway.toml"
start_cluster
admin=(target/release/lumbung admin --config "$work/cluster/admin.toml")
client=(--env-file "$work/cluster/s3.env" --size 4KiB --concurrency 8)

echo "== disk: dd if=/dev/zero of=$work/dd.bin bs=1M count=1024 oflag=direct conv=fsync"
dd if=/dev/zero of="$work/dd.bin" bs=1M count=1024 oflag=direct conv=fsync 2>&1 | tail -n 1
rm -f "$work/dd.bin"

echo "== writing ${data_gib} GiB of 4 MiB objects"
"${load[@]}" --env-file "$work/cluster/s3.env" --size 4MiB --concurrency 4 --op put \
  --seconds 3600 --stop-file "$work/enough" 2>/dev/null &
writer=$!
while [ "$(du -sb "$work/cluster/data/node1/chunks" | cut -f1)" -lt $((data_gib << 30)) ]; do sleep 1; done
touch "$work/enough"; wait "$writer" || true; rm -f "$work/enough"
du -sh "$work"/cluster/data/node*/chunks

echo "== client alone: ${load[*]} ${client[*]} --seconds 20"
"${load[@]}" "${client[@]}" --seconds 20 --op put 2>/dev/null

# Adds node $1 on its own port, rebalances with the extra arguments, and
# measures the client while it runs.
grow() {
  local id=$1; shift
  local port
  port=$(python3 -c 'import random; print(random.randint(32001, 32700))')
  "${admin[@]}" init-node --dir "$work/cluster" --id "$id" --listen "127.0.0.1:$port" >/dev/null
  RUST_LOG=warn,openraft=error target/release/lumbung node --config "$work/cluster/node$id.toml" 2>"$work/node$id.log" &
  pids+=($!)
  sleep 2
  "${admin[@]}" node add "127.0.0.1:$port" >/dev/null
  rm -f "$work/moved"
  "${load[@]}" "${client[@]}" --seconds 3600 --op put --stop-file "$work/moved" 2>/dev/null &
  local measure=$!
  local start; start=$(date +%s.%N)
  echo "== ${admin[*]} rebalance $*"
  "${admin[@]}" --json rebalance "$@" | tail -n 1
  local end; end=$(date +%s.%N)
  touch "$work/moved"; wait "$measure" || true
  python3 - "$start" "$end" "$("${admin[@]}" --json status)" <<'PY'
import json, sys
start, end, status = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
r = status["rebalance"]
secs = end - start
print(f"rebalance: {r['done']} moves, {r['bytes_copied'] / 1e6:.0f} MB in {secs:.1f} s = {r['bytes_copied'] / 1e6 / secs:.1f} MB/s")
for s in status["shares"]:
    print(f"  node {s['node_id']}: {s['replicas']} replicas (target {s['target_replicas']:.1f}), "
          f"{s['chunk_bytes'] / 2**20:.0f} MiB (target {s['target_bytes'] / 2**20:.0f})")
PY
  peaks
}

# Each node process's peak resident memory so far.
peaks() {
  local p conf
  for p in "${pids[@]}"; do
    conf=$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -o 'node[0-9]*\.toml') || continue
    echo "  ${conf%.toml} peak memory: $(awk '/VmHWM/ { printf "%.0f MiB", $2 / 1024 }' "/proc/$p/status")"
  done
}

grow 4
echo "== ${admin[*]} node drain 4 && node remove 4"
"${admin[@]}" node drain 4 >/dev/null && "${admin[@]}" node remove 4 >/dev/null
grow 5 --rate "$rate"
