#!/bin/bash
# SPDX-License-Identifier: MIT
# host-shutdown-tasks.sh - the cancel of a shutdown reaches all work in
# flight, not only suspended handlers: launched and scheduled tasks that
# loop for ever, go tasks, io operations on an endless file. The second
# signal (or the end of the grace period) stops them all and the host
# exits in order: on_stop runs, the summary is printed, exit status 0.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/run.lua" <<'EOF2'
offpath.configure { pools = { spin = { threads = 4 } } }
function on_start(engine)
  for _ = 1, 3 do
    offpath.launch("spin", function() while true do end end)
  end
  offpath.schedule {
    pool = "spin", data = 1,
    onexecute = function() while true do pcall(string.rep, "x", 10) end end,
    onerror = function(eng, data, err)
      eng:emit("onerror " .. tostring(err):match("^%a+"))
    end,
  }
  offpath.go(function() while true do offpath.sleep(0.01) end end)
  offpath.go(function()
    offpath.readfile("/dev/zero", { max_size = 1e15 })
  end)
  engine:emit("started")
end
function on_stop(engine) engine:emit("on_stop") end
EOF2

cat > "$T/stuck.lua" <<'EOF2'
offpath.configure { stuck_grace = 0.3, pools = { spin = { threads = 1 } } }
function on_start(engine)
  offpath.launch("spin", function()
    setmetatable({}, { __gc = function() while true do end end })
    collectgarbage("incremental") -- runs finalizers at once
    collectgarbage()
  end)
  engine:emit("started")
end
function on_stop(engine) engine:emit("on_stop") end
EOF2

# run_case NAME SIGNALS ARGS...: start the host, wait for on_start, send
# the signals 0.3 s apart, wait for the exit (a hang fails after 120 s).
run_case() {
  local name=$1 sigs=$2 s n=1200
  shift 2
  start_host "$T/$name.err" run "$T/${SCRIPT:-run}.lua" --input /dev/null \
    --output "$T/$name.out" --json "$@"
  wait_for 30 has_matches "$T/$name.out" "^started" 1
  for s in $sigs; do
    kill -"$s" "$HOST_PID"
    sleep 0.3
  done
  while kill -0 "$HOST_PID" 2>/dev/null && [ $n -gt 0 ]; do
    sleep 0.1
    n=$((n - 1))
  done
  if [ $n -eq 0 ]; then
    fail "$name: the host did not exit"
    kill -9 "$HOST_PID"
  fi
  wait "$HOST_PID"
  HOST_RC=$?
}

check_case() {
  local name=$1
  check "$name: exit 0" test "$HOST_RC" = 0
  check "$name: on_stop ran last" test "$(tail -1 "$T/$name.out")" = on_stop
  check "$name: the schedule heard the cancel" contains "$T/$name.out" "onerror cancelled"
  check "$name: the four pool tasks were cancelled" contains "$T/$name.err" '"cancelled":4,"completed":0,"failed":0,"inflight":0'
  check "$name: no worker was stuck" contains "$T/$name.err" '"stuck":0'
  check "$name: the summary was printed" contains "$T/$name.err" '"elapsed":'
}

# A second signal cancels everything at once.
run_case twice "TERM TERM" --grace 600
check_case twice
check "twice: said on stderr" contains "$T/twice.err" "SIGTERM again: cancelling 0 handlers in flight (8 tasks and waits)"

# One signal: the end of the grace period does the same.
run_case grace "TERM" --grace 0.3
check_case grace
check "grace: said on stderr" contains "$T/grace.err" "grace period over: cancelling 0 handlers in flight"

# A task that no stop reaches (a looping finalizer): the shutdown waits
# for it only its grace time; its worker is declared stuck and replaced.
SCRIPT=stuck run_case stuck "TERM TERM" --grace 600
check "stuck: exit 0" test "$HOST_RC" = 0
check "stuck: on_stop ran last" test "$(tail -1 "$T/stuck.out")" = on_stop
check "stuck: reported" contains "$T/stuck.err" "stuck: pool 'spin' worker 1 did not stop within 0.3 s of its cancel (task function $T/stuck.lua:3)"
check "stuck: counted" contains "$T/stuck.err" '"stuck":1'
check "stuck: the task was cancelled" contains "$T/stuck.err" '"cancelled":1,"completed":0,"failed":0,"inflight":0'

finish
