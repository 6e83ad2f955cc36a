#!/bin/bash
# SPDX-License-Identifier: MIT
# host-dispatch.sh - how records reach on_event: the handler is a global
# found in _G, or through _G's metatable (an __index that raises fails
# the record, counted, and the host goes on); record latency: once records
# run fast the host times one in 16, which stands for the others, and
# every record that suspends is still timed.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

# on_event supplied by _G's __index.
cat > "$T/index.lua" <<'EOF'
local handlers = {}
function handlers.on_event(engine, rec) engine:emit("got " .. rec) end
setmetatable(_G, { __index = handlers })
EOF
seq 1 3 | "$OFFPATH" run "$T/index.lua" > "$T/out" 2> "$T/err"
check "__index: exit 0" test $? = 0
check "__index: records handled" test "$(cat "$T/out" | tr '\n' ' ')" = "got 1 got 2 got 3 "
check "__index: counted" contains "$T/err" "records   in 3, processed 3, failed 0"

# A strict _G without on_event: the raising __index fails each record.
cat > "$T/strict.lua" <<'EOF'
setmetatable(_G, { __index = function(_, k) error("undeclared " .. k, 2) end })
EOF
seq 1 3 | "$OFFPATH" run "$T/strict.lua" > "$T/out" 2> "$T/err"
check "strict: exit 0" test $? = 0
check "strict: each record failed once" test "$(grep -c 'on_event failed on - line [0-9]*: undeclared on_event' "$T/err")" = 3
check "strict: counted" contains "$T/err" "records   in 3, processed 0, failed 3, cancelled 0"

# _G has a metatable but nothing gives on_event: said once, records fail.
cat > "$T/none.lua" <<'EOF'
setmetatable(_G, {})
EOF
seq 1 3 | "$OFFPATH" run "$T/none.lua" > "$T/out" 2> "$T/err"
check "metatable, no on_event: exit 0" test $? = 0
check "metatable, no on_event: said once" test "$(grep -c 'defines no on_event function' "$T/err")" = 1
check "metatable, no on_event: records failed" contains "$T/err" "records   in 3, processed 0, failed 3"

# on_event replaced while records flow: the next record sees the new one.
cat > "$T/swap.lua" <<'EOF'
function on_event(engine, rec)
  engine:emit("a " .. rec)
  if rec == "2" then on_event = function(e, r) e:emit("b " .. r) end end
end
EOF
seq 1 4 | "$OFFPATH" run "$T/swap.lua" > "$T/out" 2> "$T/err"
check "replaced on_event is used" test "$(cat "$T/out" | tr '\n' ' ')" = "a 1 a 2 b 3 b 4 "

# A file of many reads (read ahead while lines are left), lines of every
# length up to 3000 bytes, some handlers suspending with few in flight:
# every line once, in order.
awk 'BEGIN { for (i = 1; i <= 6000; i++) { printf "%d ", i
  for (j = 0; j < (i * 7919) % 3000; j++) printf "x"; printf "\n" } }' > "$T/big.txt"
cat > "$T/echo.lua" <<'EOF'
function on_event(engine, rec)
  engine:emit(rec)
  if rec:match("^%d*7 ") then offpath.sleep(0) end
end
EOF
"$OFFPATH" run "$T/echo.lua" --input "$T/big.txt" --max-inflight 4 > "$T/out" 2> "$T/err"
check "big file: exit 0" test $? = 0
check "big file: many reads" test "$(wc -c < "$T/big.txt")" -gt 4000000
check "big file: every line once, in order" cmp -s "$T/big.txt" "$T/out"
check "big file: counted" contains "$T/err" "records   in 6000, processed 6000, failed 0"

# Latency: 3200 fast records, then 400 that suspend for 5 ms. Every record
# is in the histogram's count; the fast ones (most, though only one in 16
# was timed) make the median, the suspended ones the 99th percentile.
cat > "$T/lat.lua" <<'EOF'
function on_event(engine, rec)
  if tonumber(rec) > 3200 then offpath.sleep(0.005) end
end
function on_stop(engine)
  local s = engine:stats()
  io.stdout:write(string.format("count=%d in=%d p50=%.9f p99=%.9f max=%.9f\n",
    s.latency.record.count, s.records["in"], s.latency.record.p50,
    s.latency.record.p99, s.latency.record.max))
end
EOF
seq 1 3600 | "$OFFPATH" run "$T/lat.lua" > "$T/out" 2> "$T/err"
check "latency: exit 0" test $? = 0
read -r count in p50 p99 max < <(sed 's/[a-z0-9]*=//g' "$T/out")
check "latency: count is every record ($count)" test "$count" = 3600 -a "$in" = 3600
# between LO and HI seconds (a value is needed)
within() {
  awk -v v="$1" -v lo="$2" -v hi="$3" 'BEGIN { exit !(v != "" && v + 0 >= lo && v + 0 < hi) }'
}
check "latency: median from the fast records ($p50)" within "$p50" 0 0.001
check "latency: suspended records timed ($p99)" within "$p99" 0.004 10
check "latency: max of a suspended record ($max)" within "$max" 0.005 10
finish
