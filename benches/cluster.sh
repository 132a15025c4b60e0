# Sourced by the bench scripts: a 3-node cluster (RF 3) and a gateway as
# release processes on loopback, in a fresh folder removed on exit.
#
#   init_cluster            # writes $work/cluster (edit its files next)
#   start_cluster           # starts the processes; their PIDs in ${pids[@]}

work=$(mktemp -d /var/tmp/lumbung-bench.XXXXXX)
pids=()
# KEEP_LOGS=DIR keeps the processes' logs there.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null
  if [ -n "${KEEP_LOGS:-}" ]; then mkdir -p "$KEEP_LOGS"; cp "$work"/*.log "$KEEP_LOGS"/ 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

init_cluster() {
  local port
  port=$(python3 -c 'import random; print(random.randint(20000, 32000))')
  target/release/lumbung admin init-cluster --nodes 3 --dir "$work/cluster" --base-port "$port" >/dev/null
}

start_cluster() {
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
}
