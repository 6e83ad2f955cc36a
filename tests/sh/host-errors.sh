#!/bin/bash
# SPDX-License-Identifier: MIT
# host-errors.sh - a handler error on one record does not stop the others
# (raised at once, after suspending, in a worker, as a non-string value);
# each is reported once with its input line and a traceback. Also on_tick:
# called every --tick, a warning when it overruns, errors counted; errors
# the runtime reports (an unobserved task failure) counted too; the host's
# other calls into Lua report errors the same way.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/err.lua" <<'EOF'
function on_event(engine, rec)
  local n = tonumber(rec)
  if n == 10 then error("bad record " .. rec) end
  if n == 20 then offpath.sleep(0.01); error("bad after a sleep " .. rec) end
  if n == 30 then
    offpath.run("io", function(x) error("bad in a worker " .. x) end, rec)
  end
  if n == 40 then error({ code = 40 }) end
  if n == 50 then local t = nil; return t.field end
  offpath.sleep(0.001)
  engine:emit(rec)
end
EOF
seq 1 60 | "$OFFPATH" run "$T/err.lua" > "$T/out" 2> "$T/err"
check "exit 0 although records failed" test $? = 0
check "the 55 others were handled" test "$(lines "$T/out")" = 55
check "in order around the failures" test "$(sed -n '9p;10p' "$T/out" | tr '\n' ' ')" = "9 11 "
check "counted" contains "$T/err" "records   in 60, processed 55, failed 5, cancelled 0"
check "raised at once: line and message" contains "$T/err" "on_event failed on - line 10: $T/err.lua:3: bad record 10"
check "raised after suspending" contains "$T/err" "on_event failed on - line 20: $T/err.lua:4: bad after a sleep 20"
check "raised in a worker" contains "$T/err" "bad in a worker 30"
check "a table error value" contains "$T/err" "on_event failed on - line 40: (error object is a table value)"
check "a runtime error" contains "$T/err" "on_event failed on - line 50: $T/err.lua:9: attempt to index a nil value (local 't')"
check "with a traceback" contains "$T/err" "stack traceback:"
check "its C bottom said once" test "$(awk '/^\t\[C\]: in \?$/ { if (c) n++; c = 1; next } { c = 0 } END { print n + 0 }' "$T/err")" = 0

# on_event found through a metatable of _G (not a field of its own): the
# same message, and the same one line for the C bottom of the stack.
cat > "$T/meta.lua" <<'EOF'
local handlers = {}
function handlers.on_event(engine, rec) error("bad meta " .. rec) end
setmetatable(_G, { __index = handlers })
EOF
printf 'x\n' | "$OFFPATH" run "$T/meta.lua" > /dev/null 2> "$T/meta.err"
check "found through _G's metatable" contains "$T/meta.err" "on_event failed on - line 1: $T/meta.lua:2: bad meta x"
check "its C bottom said once too" test "$(awk '/^\t\[C\]: in \?$/ { if (c) n++; c = 1; next } { c = 0 } END { print n + 0 }' "$T/meta.err")" = 0
check "each failure reported once" test "$(grep -c 'on_event failed' "$T/err")" = 5
check "errors in the summary" contains "$T/err" "errors 5,"

# No on_event: every record fails, said once.
printf 'function on_start() end\n' > "$T/none.lua"
printf 'a\nb\n' | "$OFFPATH" run "$T/none.lua" > "$T/out" 2> "$T/err"
check "no on_event: exit 0" test $? = 0
check "no on_event: said once" test "$(grep -c 'defines no on_event function' "$T/err")" = 1
check "no on_event: records failed" contains "$T/err" "records   in 2, processed 0, failed 2"

# on_tick every 0.1 s while the input stays open; a slow tick is warned
# about and the ticks it covers are skipped; a failing tick is counted.
cat > "$T/tick.lua" <<'EOF'
local n = 0
function on_event(engine, rec) end
function on_tick(engine)
  n = n + 1
  engine:count("ticks")
  if n == 3 then offpath.sleep(0.35) end
  if n == 5 then error("tick five failed") end
  if n == 8 then io.open(os.getenv("TICK_MARK"), "w"):close() end
end
function on_stop(engine) engine:emit("ticks " .. n) end
EOF
# The input stays open until the eighth tick (however slow the machine),
# then at most a few more ticks may come while it closes.
export TICK_MARK="$T/tick8"
t0=$(date +%s%N)
(i=0; while [ ! -e "$TICK_MARK" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done) |
  "$OFFPATH" run "$T/tick.lua" --tick 0.1 > "$T/out" 2> "$T/err"
check "tick: exit 0" test $? = 0
t1=$(date +%s%N)
n=$(sed -n 's/^ticks //p' "$T/out")
most=$(( (t1 - t0) / 100000000 + 1 ))
echo "  $n ticks at 0.1 s in $(( (t1 - t0) / 1000000 )) ms"
check "tick: called regularly (8..$most times)" test "$n" -ge 8 -a "$n" -le "$most"
check "tick: overrun warned while running" contains "$T/err" "warning: on_tick still running after its 0.1 s interval; ticks skipped until it ends"
check "tick: overrun warned at its end" grep -qE "warning: on_tick took [0-9.]+ s, over its 0.1 s interval" "$T/err"
check "tick: failure reported" contains "$T/err" "on_tick failed: $T/tick.lua:7: tick five failed"
check "tick: summary" contains "$T/err" "ticks     $n, 1 over the interval"

# Errors the runtime reports itself are counted.
cat > "$T/launch.lua" <<'EOF'
function on_event(engine, rec)
  offpath.launch("io", function() error("nobody waits for me") end)
end
EOF
echo x | "$OFFPATH" run "$T/launch.lua" > "$T/out" 2> "$T/err"
check "runtime error: exit 0" test $? = 0
check "runtime error: reported" contains "$T/err" "unobserved task failure in offpath.launch"
check "runtime error: counted" contains "$T/err" "errors 1,"

# Every call the host makes into Lua goes through one door, so its errors
# read the same as a handler's: FILE:LINE and a traceback. Here the call
# that applies --pool again after the main chunk.
cat > "$T/door.lua" <<'EOF'
offpath.configure = function() error("configure refused") end
function on_event(engine, rec) end
EOF
echo x | "$OFFPATH" run "$T/door.lua" --pool io=2 > "$T/out" 2> "$T/err"
check "door: exit 0" test $? = 0
check "door: --pool warning names FILE:LINE" contains "$T/err" "warning: --pool not applied: $T/door.lua:1: configure refused"
traced() { grep -A1 -- "$2" "$1" | grep -q "^stack traceback:"; }
check "door: and has a traceback" traced "$T/err" "--pool not applied"
finish
