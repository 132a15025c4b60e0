#!/usr/bin/env bash
# Soak: holds a 3-node cluster (RF 3) and a gateway, release processes on
# loopback, at saturation for minutes, and reports whether it keeps up:
#
#   - throughput each minute (first and last, to see it hold or decay), p99;
#   - every failed request by kind (5xx with status and S3 code, 4xx,
#     transport, timeout): the load tool sends each request once
#     (--no-retries), so no 5xx hides behind an SDK retry;
#   - stalls: a node that stops answering `admin status`, a gateway that
#     stops answering HTTPS, or a cluster that stops committing (no shard's
#     last_applied grows while load runs) for STALL_SECS (30). The stuck
#     processes' stacks are taken with gdb;
#   - leader changes: the growth of the sum of the shards' Raft terms;
#   - memory: each process's VmRSS once a minute, and VmHWM at the end.
#
# Three phases, each at saturation: (a) 4 KiB PUT, concurrency 64, PUT_MIN
# minutes (12); (b) 4 KiB GET and PUT mixed 50/50, concurrency 64,
# MIXED_MIN minutes (12); (c) 64 MiB PUT, concurrency 4, LARGE_MIN
# minutes (6). It ends with a
# summary, and exits non-zero if any stall was seen or any 5xx counted.
#
#   benches/soak.sh                                    # 30 minutes
#   PUT_MIN=1 MIXED_MIN=1 LARGE_MIN=1 benches/soak.sh  # a 3-minute check
#   AEAD=1 benches/soak.sh                             # + the crypto limit
#
# KEEP (default /var/tmp/lumbung-soak.<date>) keeps each phase's output,
# the watcher's events and memory samples, stacks, and the processes' logs.
# Every object is new and kept (x3 replicas on this one disk): a phase ends
# early when the disk has less than MIN_FREE_GIB (5) free, which the
# summary says.
set -euo pipefail
cd "$(dirname "$0")/.."
# 12 + 12 + 6 minutes: the 64 MiB phase writes about 50 MiB/s x 3
# replicas, and nothing frees space yet (no garbage collection), so ten
# minutes of it would not fit on this machine's disk.
put_min=${PUT_MIN:-12}
mixed_min=${MIXED_MIN:-12}
large_min=${LARGE_MIN:-6}
stall_secs=${STALL_SECS:-30}
report_secs=${REPORT_SECS:-60}
min_free_gib=${MIN_FREE_GIB:-5}
keep=${KEEP:-/var/tmp/lumbung-soak.$(date +%Y%m%d-%H%M%S)}
mkdir -p "$keep"
echo "== keeping outputs, stacks and logs in $keep"

cargo build --release --bin lumbung
cargo bench --bench load --no-run
# The load tool's own binary rather than `cargo bench`: src/ may change
# while the soak runs, and cargo would rebuild (or wait on a build) between
# phases.
load_built=$(cargo bench --bench load --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .target.name == "load") | .executable // empty' | tail -n 1)

# Logs land in $keep when cluster.sh's cleanup runs.
export KEEP_LOGS=$keep
source benches/cluster.sh

# Copies of both binaries: a rebuild during the soak replaces the files
# under target/, and the watcher must not catch one half-written.
mkdir -p "$work/bin"
cp target/release/lumbung "$work/bin/lumbung"
cp "$load_built" "$work/bin/load"
lumbung=$work/bin/lumbung
load=$work/bin/load
admin=("$lumbung" admin --config "$work/cluster/admin.toml")
names=(node1 node2 node3 gateway)  # the order of cluster.sh's ${pids[@]}
watcher=""

# cluster.sh's cleanup sends SIGTERM and waits; a deadlocked node may
# never act on it, so stop the watcher, then SIGKILL (by PID, only the
# processes this script started) whatever is left after 10 s.
soak_cleanup() {
  if [ -n "$watcher" ]; then kill "$watcher" 2>/dev/null || true; fi
  local p _ alive
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 20); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  cleanup
}
trap soak_cleanup EXIT

# The disk's direct+fsync write bandwidth, as run.sh measures it: every
# replica of this cluster writes to this one disk.
measure_disk() {
  echo "== disk: dd if=/dev/zero of=$work/dd.bin bs=1M count=1024 oflag=direct conv=fsync"
  dd if=/dev/zero of="$work/dd.bin" bs=1M count=1024 oflag=direct conv=fsync 2>&1 | tail -n 1 | tee "$keep/dd.txt"
  rm -f "$work/dd.bin"
}

# Single-core seal/open throughput (criterion: minutes), only if asked.
measure_aead() {
  [ "${AEAD:-0}" = 1 ] || return 0
  echo "== cargo bench --bench aead"
  cargo bench --bench aead 2>/dev/null | grep -E '^aead/|thrpt:' | tee "$keep/aead.txt"
}

# The sum of the shards' terms, or "?" when the nodes cannot say.
terms_sum() {
  timeout 20 "$load" --terms "$work/cluster/admin.toml" 2>/dev/null |
    sed -nE 's/^terms sum=([0-9]+) .*/\1/p' | grep . || echo "?"
}

# Each process's memory, one line per process into rss.tsv.
sample_rss() {
  local i now; now=$(date +%s)
  for i in "${!pids[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\n' "$now" "$(cat "$work/phase")" "${names[$i]}" \
      "$(awk '/VmRSS/ {print $2}' "/proc/${pids[$i]}/status" 2>/dev/null || echo 0)" \
      "$(awk '/VmHWM/ {print $2}' "/proc/${pids[$i]}/status" 2>/dev/null || echo 0)" >>"$keep/rss.tsv"
  done
}

# One stall of $1 (a process's name, or "cluster"), which $2 describes:
# counted once in events.log, with the stacks of the processes whose
# indexes into pids follow. gdb takes seconds per process, so it runs in
# the background and the watcher keeps watching.
stall() {
  local who=$1 why=$2; shift 2
  printf '%s\t%s\tstall\t%s\t%s\n' "$(date +%s)" "$(cat "$work/phase")" "$who" "$why" >>"$keep/events.log"
  echo "!! stall: $who: $why; stacks in $keep/stacks-*" >&2
  (
    local i file
    for i in "$@"; do
      file="$keep/stacks-${names[$i]}-$(date +%H%M%S).txt"
      if kill -0 "${pids[$i]}" 2>/dev/null; then
        timeout 60 gdb -p "${pids[$i]}" -batch -ex 'thread apply all bt' >"$file" 2>&1
      else
        echo "${names[$i]} (pid ${pids[$i]}) has exited" >"$file"
      fi
    done
  ) &
}

# The listen address of each node, to find it in `admin status`.
node_addr() { sed -nE 's/^listen = "(.*)"/\1/p' "$work/cluster/node$1.toml"; }

# Every 5 s: does each node answer `admin status`, does the gateway answer
# HTTPS, and does the cluster still commit (the sum of its shards'
# last_applied grows) while a phase runs? Anything stuck for stall_secs is
# one stall, however long it lasts. Runs in the background until killed.
watch_cluster() {
  set +e  # a failed check is data, not a reason to stop watching
  local now status i up code progress last_progress=-1 addrs=() why=()
  local ok=() stuck=() progress_at stuck_cluster=0 rss_at=0 phase
  for i in 1 2 3; do addrs+=("$(node_addr "$i")"); done
  now=$(date +%s); progress_at=$now
  for i in "${!pids[@]}"; do ok[$i]=$now; stuck[$i]=0; why[$i]=""; done
  while true; do
    # admin status gives each node 3 s to answer and marks it down after;
    # the command as a whole can take 5 + 5 + 3 s a node when nodes hang,
    # so its own guard is longer: a 10 s guard would blame every node for
    # one that hangs.
    status=$(timeout 30 "${admin[@]}" status --json 2>/dev/null)
    now=$(date +%s)
    for i in 0 1 2; do
      up=$(jq -r --arg a "${addrs[$i]}" '.nodes[] | select(.addr == $a) | "\(.up) \(.error // "")"' <<<"$status" 2>/dev/null)
      if [ "${up%% *}" = true ]; then
        ok[$i]=$now; stuck[$i]=0
      else
        why[$i]=${up#* }; why[$i]=${why[$i]:-admin status gave no answer}
      fi
    done
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$S3_CA_CERT" "$S3_ENDPOINT/")
    if [ "$code" != 000 ]; then ok[3]=$(date +%s); stuck[3]=0; else why[3]="no HTTPS answer in 10 s"; fi
    for i in "${!pids[@]}"; do
      if [ "${stuck[$i]}" = 0 ] && [ $((now - ok[i])) -ge "$stall_secs" ]; then
        stuck[$i]=1
        stall "${names[$i]}" "not answering for $((now - ok[i])) s (${why[$i]})" "$i"
      fi
    done

    # Progress counts only while load runs; between phases it restarts.
    # Only a new high counts: with a node gone, the sum is taken from the
    # others' (lagging) views and can fall without anything committing.
    phase=$(cat "$work/phase")
    progress=$(jq '[.shards[].last_applied] | add // 0' <<<"$status" 2>/dev/null)
    if [ -n "$progress" ] && [ "$progress" -gt "$last_progress" ]; then
      last_progress=$progress; progress_at=$now; stuck_cluster=0
    elif [ "$phase" = idle ]; then
      progress_at=$now; stuck_cluster=0
    elif [ "$stuck_cluster" = 0 ] && [ $((now - progress_at)) -ge "$stall_secs" ]; then
      stuck_cluster=1
      stall cluster "committed nothing for $((now - progress_at)) s under load" "${!pids[@]}"
    fi

    # A full disk would make the rest a test of ENOSPC (and starve all
    # else on this machine): the load tool ends the phase on this file.
    if [ "$(df -Pk "$work" | awk 'NR == 2 {print $4}')" -lt $((min_free_gib << 20)) ] && [ ! -e "$work/stop" ]; then
      touch "$work/stop"
      printf '%s\t%s\tless than %s GiB free on the disk: phase ended early\n' "$now" "$phase" "$min_free_gib" >>"$keep/notes.log"
    fi

    if [ $((now - rss_at)) -ge 60 ]; then sample_rss; rss_at=$now; fi
    sleep 5
  done
}

# Runs phase $1 for $2 minutes with the load tool's other arguments,
# recording the terms before and after.
phase() {
  local name=$1 minutes=$2; shift 2
  local args=(--env-file "$work/cluster/s3.env" "$@" --seconds $((minutes * 60))
    --no-retries --report-every "$report_secs" --stop-file "$work/stop")
  printf '%s\tstart\t%s\n' "$name" "$(terms_sum)" >>"$keep/terms.tsv"
  rm -f "$work/stop"
  echo "$name" >"$work/phase"
  echo "== $name: load ${args[*]}"
  "$load" "${args[@]}" 2>"$keep/$name.err" | tee "$keep/$name.out" ||
    echo "!! the load tool failed; its stderr is in $keep/$name.err"
  echo idle >"$work/phase"
  printf '%s\tend\t%s\n' "$name" "$(terms_sum)" >>"$keep/terms.tsv"
}

# Reads everything kept and prints the summary; exits 1 on a stall or a
# 5xx.
summarize() {
  local i
  : >"$keep/end.tsv"
  for i in "${!pids[@]}"; do
    printf '%s\t%s\t%s\n' "${names[$i]}" \
      "$(awk '/VmRSS/ {print $2}' "/proc/${pids[$i]}/status" 2>/dev/null || echo 0)" \
      "$(awk '/VmHWM/ {print $2}' "/proc/${pids[$i]}/status" 2>/dev/null || echo 0)" >>"$keep/end.tsv"
  done
  python3 - "$keep" "$stall_secs" <<'PY'
import os, re, sys
keep, stall_secs = sys.argv[1], float(sys.argv[2])

def read(name):
    path = os.path.join(keep, name)
    return open(path).read() if os.path.exists(path) else ""

def fields(line):
    """key=value pairs of a load line; errors=N (...) keeps its breakdown."""
    out = dict(re.findall(r"(\S+?)=(\S+)", line))
    m = re.search(r"errors=(\d+ \(.*?\))", line)
    if m:
        out["errors"] = m.group(1)
        out["5xx"] = int(re.search(r"5xx=(\d+)", m.group(1)).group(1))
    return out

dd = re.search(r"copied, ([0-9.]+) s", read("dd.txt"))
dd_mibs = 1024 / float(dd.group(1)) if dd else None

terms = {}
for line in read("terms.tsv").splitlines():
    name, when, value = line.split("\t")
    terms.setdefault(name, {})[when] = value

events = [l.split("\t") for l in read("events.log").splitlines() if l]

phases = [("a-put-4KiB", "PUT"), ("b-mixed-4KiB", "MIX"), ("c-put-64MiB", "PUT")]
print(f"== summary (kept in {keep})")
if dd_mibs:
    print(f"disk: dd 1 GiB direct+fsync = {dd_mibs:.0f} MiB/s (÷3 replicas = {dd_mibs / 3:.0f} MiB/s)")
aead = read("aead.txt").strip()
if aead:
    print("aead:\n" + aead)

total_5xx, total_stalls, large_mibs = 0, 0, None
for name, main in phases:
    out = read(f"{name}.out")
    if not out:
        print(f"{name}: no output")
        continue
    finals = {l.split()[0]: fields(l) for l in out.splitlines() if l and not l.startswith("interval")}
    minutes = [fields(l) for l in out.splitlines() if l.startswith("interval") and l.split()[3] == main]
    whole = finals.get(main, {})
    rate = lambda f: f"{f.get('ops/s')} ops/s, {f.get('MiB/s')} MiB/s"
    first = rate(minutes[0]) if minutes else "?"
    last = rate(minutes[-1]) if minutes else "?"
    stall = float(whole.get("longest_stall", "0s").rstrip("s"))
    phase_events = [e for e in events if e[1] == name]
    stalls = len(phase_events)
    t = terms.get(name, {})
    delta = (int(t["end"]) - int(t["start"])) if t.get("start", "?").isdigit() and t.get("end", "?").isdigit() else "?"
    print(f"{name}:")
    for kind, f in finals.items():
        if kind not in ("PUT", "GET", "MIX"):
            continue
        print(f"  {kind:<3} ops/s={f.get('ops/s')} MiB/s={f.get('MiB/s')} p99={f.get('p99')} max={f.get('max')} errors={f.get('errors')}")
        total_5xx += f.get("5xx", 0) if kind == main else 0
    print(f"  {main} first interval: {first}; last: {last} ({len(minutes)} intervals)")
    print(f"  longest time without a success={stall:.1f}s  watcher stalls={stalls}  "
          f"leader changes (term delta)={delta}")
    total_stalls += stalls + (1 if stall >= stall_secs and not stalls else 0)
    if name == "c-put-64MiB" and "MiB/s" in whole:
        large_mibs = float(whole["MiB/s"])

print("memory at the end:")
for line in read("end.tsv").splitlines():
    name, rss, hwm = line.split("\t")
    print(f"  {name}: rss={int(rss or 0) // 1024} MiB peak={int(hwm or 0) // 1024} MiB")
if large_mibs is not None and dd_mibs:
    print(f"ratio: 64 MiB PUT {large_mibs:.1f} MiB/s ÷ (dd {dd_mibs:.0f} MiB/s ÷ 3) = {large_mibs / (dd_mibs / 3):.2f}")
for line in read("notes.log").splitlines():
    print("note: " + line.split("\t", 1)[1].replace("\t", ": "))
for e in events:
    print(f"stall event: phase={e[1]} process={e[3]}: {e[4]}")
verdict = "OK" if total_stalls == 0 and total_5xx == 0 else "FAIL"
print(f"verdict: {verdict} (stalls={total_stalls}, 5xx={total_5xx})")
sys.exit(0 if verdict == "OK" else 1)
PY
}

measure_disk
measure_aead
init_cluster
# One load tool on one address is the whole workload here: measure the
# cluster, not the gateway's per-client rate limits (as run.sh does).
sed -i -E 's/^(tenant_requests|address_requests|address_connections)_per_sec = .*/\1_per_sec = 0/' "$work/cluster/gateway.toml"
start_cluster
echo idle >"$work/phase"
: >"$keep/terms.tsv"; : >"$keep/events.log"; : >"$keep/rss.tsv"; : >"$keep/notes.log"
watch_cluster &
watcher=$!

phase a-put-4KiB "$put_min" --size 4KiB --concurrency 64 --op put
phase b-mixed-4KiB "$mixed_min" --size 4KiB --concurrency 64 --op mixed
phase c-put-64MiB "$large_min" --size 64MiB --concurrency 4 --op put

sample_rss
kill "$watcher" 2>/dev/null || true; watcher=""
summarize
