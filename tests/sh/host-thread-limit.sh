#!/bin/bash
# SPDX-License-Identifier: MIT
# host-thread-limit.sh - a pool thread that cannot start (here a real
# RLIMIT_NPROC: the host runs as a user of its own with `ulimit -u 4`, so
# the main thread, the host's watchdog and two workers fit) does not end the host: the pool
# goes on with the threads it has, the statistics show the shortfall, and
# only a pool with no thread at all refuses work, with the system's reason.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

# A user id nobody else runs as: RLIMIT_NPROC counts every thread of the
# user. Root is needed to take one; elsewhere the limit would count the
# caller's own processes too.
if [ "$(id -u)" != 0 ] || ! command -v setpriv >/dev/null; then
  echo "skipped: needs root and setpriv"
  exit 0
fi
ID=$((40000 + $$ % 20000))
chmod 755 "$T"

cat > "$T/limit.lua" <<'EOF2'
offpath.configure { pools = { io = { threads = 4 }, cpu = { threads = 2 } } }
function on_start(engine)
  local s = offpath.stats().pools
  print("io", s.io.threads, s.io.running, "cpu", s.cpu.threads, s.cpu.running)
  local a = offpath.launch("io", function() return offpath.worker().id end)
  local b = offpath.launch("io", function() return offpath.worker().id end)
  print("io", a:wait() + b:wait() > 0)
  print("cpu", pcall(offpath.run, "cpu", function() return 1 end))
  print("launch", pcall(offpath.launch, "cpu", function() return 1 end))
end
function on_stop() print("on_stop") end
EOF2
chmod 644 "$T/limit.lua"

# stdin a pipe: the host reads it without libuv's own thread pool, which
# aborts when it cannot start its threads.
true | setpriv --reuid=$ID --regid=$ID --clear-groups \
  bash -c 'ulimit -u 4 && exec "$0" run "$1"' "$OFFPATH" "$T/limit.lua" \
  > "$T/out" 2> "$T/err"
RC=$?
check "exit 0" test "$RC" = 0
check "io runs 2 of its 4 threads, cpu none" contains "$T/out" "$(printf 'io\t4\t2\tcpu\t2\t0')"
check "io still runs tasks" contains "$T/out" "$(printf 'io\ttrue')"
check "a pool with no thread refuses, with the system's reason" contains "$T/out" "$(printf "cpu\tfalse\tcannot start a thread for pool 'cpu': resource temporarily unavailable (offpath.run)")"
check "launch too" contains "$T/out" "$(printf "launch\tfalse\tcannot start a thread for pool 'cpu'")"
check "on_stop ran" contains "$T/out" on_stop
check "the shortfall said on stderr" contains "$T/err" "warning: pool 'io' runs 2 of its 4 threads: cannot start a thread: resource temporarily unavailable"
check "no abort" lacks "$T/err" "cannot start a pool thread"

finish
