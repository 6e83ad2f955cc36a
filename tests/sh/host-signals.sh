#!/bin/bash
# SPDX-License-Identifier: MIT
# host-signals.sh - SIGTERM/SIGINT: reading stops, handlers in flight get
# the grace period, then are cancelled (also inside a worker task, and
# when a handler catches the first cancel); a second signal cancels at
# once; on_stop still runs; every record is accounted for.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/sig.lua" <<'EOF'
function on_event(engine, rec)
  engine:emit("start " .. rec)
  if MODE == "worker" then
    offpath.run("io", function() while true do end end)
  elseif MODE == "stubborn" then
    pcall(offpath.sleep, 30)   -- swallows the first cancel
    offpath.sleep(30)
  else
    offpath.sleep(DELAY)
  end
  engine:emit("end " .. rec)
end
function on_stop(engine) engine:emit("on_stop") end
EOF
seq 1 100 > "$T/in.txt"

# run_case NAME PRELUDE SIGNALS ARGS...: start the host on in.txt with 5
# in flight, wait until 5 handlers started, send the signals (space
# separated, 0.3 s apart), wait for the exit. Leaves $T/NAME.out, .err.
run_case() {
  local name=$1 prelude=$2 sigs=$3 s
  shift 3
  printf '%s\n' "$prelude" | cat - "$T/sig.lua" > "$T/$name.lua"
  start_host "$T/$name.err" run "$T/$name.lua" --input "$T/in.txt" \
    --max-inflight 5 --output "$T/$name.out" --json "$@"
  wait_for 10 has_matches "$T/$name.out" "^start" 5
  T0=$(date +%s%N)
  for s in $sigs; do
    kill -"$s" "$HOST_PID"
    sleep 0.3
  done
  wait "$HOST_PID"
  HOST_RC=$?
  TOOK_MS=$(( ($(date +%s%N) - T0) / 1000000 ))
}

# accounted NAME: in == processed + failed + cancelled, nothing in flight.
accounted() {
  local f="$T/$1.err"
  [ "$(rnum "$f" inflight)" = 0 ] &&
    [ $(( $(rnum "$f" processed) + $(rnum "$f" failed) + $(rnum "$f" cancelled) )) = "$(rnum "$f" in)" ]
}

# Handlers that finish within the grace period finish normally.
run_case finish "MODE = 'sleep'; DELAY = 0.5" TERM --grace 5
check "finish: exit 0" test "$HOST_RC" = 0
check "finish: the 5 in flight ended normally" test "$(grep -c '^end' "$T/finish.out")" = 5
check "finish: processed 5, cancelled 0" test "$(rnum "$T/finish.err" processed)/$(rnum "$T/finish.err" cancelled)" = 5/0
check "finish: lines read but not handed over are skipped" test "$(rnum "$T/finish.err" skipped)" = 95
check "finish: on_stop ran last" test "$(tail -1 "$T/finish.out")" = on_stop
check "finish: accounted" accounted finish
check "finish: the signal is in the summary" contains "$T/finish.err" '"signal":"SIGTERM"'
check "finish: said on stderr" contains "$T/finish.err" "SIGTERM: inputs closed; waiting up to 5 s for 5 handlers in flight"

# Past the grace period, the rest is cancelled.
run_case grace "MODE = 'sleep'; DELAY = 30" TERM --grace 0.3
check "grace: exit 0" test "$HOST_RC" = 0
check "grace: prompt (${TOOK_MS} ms)" test "$TOOK_MS" -lt 3000
check "grace: cancelled 5" test "$(rnum "$T/grace.err" cancelled)" = 5
check "grace: no handler went on after the cancel" test "$(grep -c '^end' "$T/grace.out")" = 0
check "grace: said on stderr" contains "$T/grace.err" "grace period over: cancelling 5 handlers in flight"
check "grace: on_stop ran" contains "$T/grace.out" on_stop
check "grace: accounted" accounted grace

# SIGINT, with the handlers waiting on worker tasks that never end: the
# cancel reaches the tasks.
run_case worker "MODE = 'worker'" INT --grace 0.2 --pool io=5
check "worker: exit 0" test "$HOST_RC" = 0
check "worker: prompt (${TOOK_MS} ms)" test "$TOOK_MS" -lt 3000
check "worker: cancelled 5" test "$(rnum "$T/worker.err" cancelled)" = 5
check "worker: the pool tasks were cancelled" contains "$T/worker.err" '"cancelled":5,"completed":0,"failed":0,"inflight":0'
check "worker: SIGINT in the summary" contains "$T/worker.err" '"signal":"SIGINT"'
check "worker: accounted" accounted worker

# A second signal does not wait for the grace period.
run_case twice "MODE = 'sleep'; DELAY = 30" "TERM INT" --grace 60
check "twice: exit 0" test "$HOST_RC" = 0
check "twice: prompt (${TOOK_MS} ms)" test "$TOOK_MS" -lt 3000
check "twice: cancelled 5" test "$(rnum "$T/twice.err" cancelled)" = 5
check "twice: said on stderr" contains "$T/twice.err" "SIGINT again: cancelling 5 handlers in flight"
check "twice: accounted" accounted twice

# A handler that swallows the first cancel is cancelled again.
run_case stubborn "MODE = 'stubborn'" TERM --grace 0.2
check "stubborn: exit 0" test "$HOST_RC" = 0
check "stubborn: prompt (${TOOK_MS} ms)" test "$TOOK_MS" -lt 3000
check "stubborn: cancelled 5" test "$(rnum "$T/stubborn.err" cancelled)" = 5
check "stubborn: accounted" accounted stubborn
# A signal while on_start is still suspended: it is cancelled, which is not
# a script error; no record is read and on_stop does not run.
printf 'function on_start() io.stderr:write("on_start began\\n") offpath.sleep(30) end\nfunction on_event(e, r) e:emit(r) end\nfunction on_stop(e) e:emit("on_stop") end\n' > "$T/start.lua"
start_host "$T/start.err" run "$T/start.lua" --input "$T/in.txt" --grace 0.2 --output "$T/start.out"
wait_for 20 contains "$T/start.err" "on_start began"
stop_host TERM
check "start: exit 0" test "$HOST_RC" = 0
check "start: said on stderr" contains "$T/start.err" "on_start cancelled: cancelled"
check "start: no record, no on_stop" test ! -s "$T/start.out"
check "start: not counted as an error" contains "$T/start.err" "errors 0,"
finish
