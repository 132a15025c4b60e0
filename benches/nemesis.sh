#!/usr/bin/env bash
# The nemesis's long run: tests/nemesis.rs with many fault cycles (SIGKILL
# and restart, SIGSTOP/SIGCONT, an unplugged node, a full disk) against
# release processes, five S3 clients (plain and conditional PUTs, GET,
# DELETE, LIST) recorded in the linearizability checker throughout. Ends with the
# run in four lines: fault cycles run, acknowledged writes lost,
# linearizability violations, longest unavailability per fault kind; the
# whole output is kept in a log under /var/tmp, and on a failure the test
# keeps its evidence (checker's explanation, history, node logs) under
# /var/tmp/lumbung-nemesis/. Needs root (network namespaces).
#
#   benches/nemesis.sh                       # NEMESIS_CYCLES=60, release
#   NEMESIS_CYCLES=120 NEMESIS_SEED=7 benches/nemesis.sh
#   NEMESIS_PROFILE=debug benches/nemesis.sh # no release build
#
# Other knobs are the test's own: NEMESIS_FAULTS (e.g. kill,partition; the
# names are kill, pause, partition, disk), NEMESIS_CONDITIONAL=0 (plain
# PUTs only), NEMESIS_STRICT_5XX=1 (a 5xx other than 503/507 on a write
# fails the run), NEMESIS_KEEP=1 (evidence even on success).
set -uo pipefail
cd "$(dirname "$0")/.."
export NEMESIS_CYCLES=${NEMESIS_CYCLES:-60}
profile=()
[ "${NEMESIS_PROFILE:-release}" = release ] && profile=(--release)

log=$(mktemp /var/tmp/nemesis-bench.XXXXXX.log)
echo "== cargo test ${profile[*]} --test nemesis, $NEMESIS_CYCLES cycles; output in $log"
cargo test "${profile[@]}" --test nemesis -- --nocapture --exact \
  faults_in_cycles_leave_answers_linearizable_and_acknowledged_writes_readable >"$log" 2>&1
rc=$?

# The table (it ends with the run in four lines), without the processes'
# log lines that a failure prints.
echo "== summary"
sed -n '/^== nemesis:/,/^longest unavailability:/p' "$log"
grep -q '^longest unavailability:' "$log" ||
  echo "(no summary: the test did not get that far; see $log)"
grep -E '^(cycle .*(NEVER|ENDED|did NOT)|!! |evidence kept in )' "$log" || true
echo "test exit code $rc; full output in $log"
exit $rc
