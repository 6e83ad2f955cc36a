#!/bin/bash
# SPDX-License-Identifier: MIT
# host-stats.sh - statistics: --stats prints a line every second (plain
# lines when stderr is not a terminal), the text summary at exit, --json
# as one line of JSON on stderr (stdout keeps only emitted records),
# --pool sizes pools and wins over the script's offpath.configure.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/st.lua" <<'EOF'
offpath.configure { pools = { io = { threads = 8 } } }
function on_event(engine, rec)
  engine:count("seen")
  engine:gauge("last", tonumber(rec))
  offpath.run("io", function() return 1 end)
  engine:emit(rec)
end
EOF

(for i in $(seq 1 25); do echo "$i"; sleep 0.1; done) |
  "$OFFPATH" run "$T/st.lua" --stats --pool io=2 > "$T/out" 2> "$T/err"
check "exit 0" test $? = 0
check "stdout has only the records" test "$(lines "$T/out")" = 25
n=$(grep -cE '^offpath: [0-9]+s in [0-9]+ \([0-9]+/s\) done [0-9]+ failed 0 inflight [0-9]+ out [0-9]+ \| main p50 ' "$T/err")
check "--stats: a plain line a second ($n)" test "$n" -ge 2 -a "$n" -le 4
check "--stats: tasks per pool" grep -qE '\| io [0-9]+ tasks [0-9]+ running [0-9]+ queued' "$T/err"
check "--stats: errors and drops" grep -qE '\| errors 0 drops 0$' "$T/err"
check "summary: records" contains "$T/err" "records   in 25, processed 25, failed 0, cancelled 0, out 25"
check "summary: main thread latency" grep -qE 'latency   main thread p50 [0-9.]+ [nums]+, p99 [0-9.]+ [nums]+, max ' "$T/err"
check "summary: --pool wins over offpath.configure" contains "$T/err" "io: 2 threads, 25 tasks: 25 done, 0 failed, 0 timed out, 0 cancelled"
check "summary: counters" contains "$T/err" "counters  seen=25"
check "summary: gauges" contains "$T/err" "gauges    last=25"

# --json: the summary is the last line of stderr, one JSON object.
seq 1 10 | "$OFFPATH" run "$T/st.lua" --json > "$T/out" 2> "$T/err"
check "--json: exit 0" test $? = 0
tail -1 "$T/err" > "$T/summary.json"
check "--json: one object on the last line" grep -qE '^\{.*\}$' "$T/summary.json"
check "--json: no text summary" lacks "$T/err" "offpath: summary"
check "--json: nothing on stdout but records" test "$(lines "$T/out")" = 10
for key in '"records":{' '"in":10' '"processed":10' '"latency":{"main":{' \
    '"record":{' '"pools":{' '"io":{' '"submitted":10' '"errors":0' \
    '"timeouts":0' '"drops":0' '"counters":{"seen":10}' '"gauges":{"last":10}' \
    '"inputs":[{' '"name":"-"' '"backpressure":{' '"elapsed":'; do
  check "--json: has $key" contains "$T/summary.json" "$key"
done
# It parses: the host's own JSON reader takes it back.
printf 'function on_event(e, r) e:emit(r.records.processed .. " " .. r.pools.io.threads) end\n' > "$T/read.lua"
"$OFFPATH" run "$T/read.lua" --format json --input "$T/summary.json" > "$T/out" 2> "$T/err"
check "--json: the summary parses as JSON" test "$(cat "$T/out")" = "10 8"
# The summary's pools carry every field offpath.stats() gives a pool.
cat > "$T/fields.lua" <<'EOF'
function on_event(e, r)
  local missing = {}
  for k in pairs(offpath.stats().pools.io) do
    if r.pools.io[k] == nil then missing[#missing + 1] = k end
  end
  table.sort(missing)
  e:emit("missing:" .. table.concat(missing, ","))
end
EOF
"$OFFPATH" run "$T/fields.lua" --format json --input "$T/summary.json" > "$T/out" 2> "$T/err"
check "--json: pools have every field of offpath.stats()" test "$(cat "$T/out")" = "missing:"
finish
