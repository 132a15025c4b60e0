#!/usr/bin/env bash
# The whole test suite, from a fresh machine:
#   1. installs the real S3 clients the acceptance scenarios drive
#      (Debian packages and a Python venv; idempotent),
#   2. runs `cargo test` (unit tests, in-process cluster tests, and the
#      process-level kill/restart tests),
#   3. starts `lumbung dev` on a free port and runs every real-client
#      scenario (aws-cli, s3cmd, rclone, restic, s3fs, bad input, ...)
#      against it over TLS.
# The last line is "N passed, M failed" over both parts.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bash tests/acceptance/clients/install.sh || { echo "installing the test clients failed"; exit 1; }

cargo build --bins || exit 1
cargo_log=$(mktemp)
cargo test --no-fail-fast 2>&1 | tee "$cargo_log"
cargo_rc=${PIPESTATUS[0]}
cargo_passed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) s += $i } END { print s + 0 }' "$cargo_log")
cargo_failed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) s += $i } END { print s + 0 }' "$cargo_log")

# A free block of four ports for the gateway and three nodes.
port=$(python3 - <<'PY'
import random, socket
for _ in range(200):
    base = random.randint(20000, 60000)
    try:
        socks = []
        for p in range(base, base + 4):
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
        print(base); break
    except OSError:
        pass
    finally:
        for s in socks: s.close()
PY
)
work=$(mktemp -d /tmp/lumbung-accept.XXXXXX)
"$root/target/debug/lumbung" dev --data-dir "$work/data" --env-file "$work/s3.env" --base-port "$port" \
  > "$work/dev.out" 2> "$work/dev.err" &
dev_pid=$!
for _ in $(seq 1 180); do [ -s "$work/s3.env" ] && break; sleep 0.5; done
accept_rc=1; accept_passed=0; accept_failed=1
if [ -s "$work/s3.env" ]; then
  # A second tenant, so the isolation scenario has someone to be kept from.
  lb_admin=("$root/target/debug/lumbung" admin --config "$work/data/admin.toml")
  "${lb_admin[@]}" tenant create other >/dev/null
  "${lb_admin[@]}" key create --tenant other --json | python3 -c '
import json, sys
k = json.load(sys.stdin)
print("S3_ACCESS_KEY_ALT=" + k["access_key"])
print("S3_SECRET_KEY_ALT=" + k["secret_key"])' >> "$work/s3.env"
  HARNESS_TMP="$work" HARNESS_LOGDIR="$work/logs" bash tests/acceptance/clients/run.sh "$work/s3.env" | tee "$work/accept.out"
  accept_rc=${PIPESTATUS[0]}
  last=$(tail -n 1 "$work/accept.out")
  accept_passed=$(echo "$last" | sed -nE 's/^([0-9]+) passed, ([0-9]+) failed$/\1/p')
  accept_failed=$(echo "$last" | sed -nE 's/^([0-9]+) passed, ([0-9]+) failed$/\2/p')
else
  echo "lumbung dev did not come up:"; tail -n 50 "$work/dev.err"
fi
kill "$dev_pid" 2>/dev/null; wait "$dev_pid" 2>/dev/null
rm -rf "$work"

passed=$(( ${cargo_passed:-0} + ${accept_passed:-0} ))
failed=$(( ${cargo_failed:-0} + ${accept_failed:-0} ))
echo "$passed passed, $failed failed"
[ "$cargo_rc" = 0 ] && [ "$accept_rc" = 0 ] && [ "$failed" = 0 ]
