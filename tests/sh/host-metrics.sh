#!/bin/sh
# SPDX-License-Identifier: MIT
# host-metrics.sh - --metrics HOST:PORT serves the Prometheus text format:
# promtool accepts it, the counters match the records and tasks, the
# histograms are cumulative and end at their count, the script's own
# counters are there; a scrape is answered while a handler holds the loop
# thread; bad addresses are refused at start.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

# metric FILE NAME{LABELS}: the value of one sample.
metric() {
  awk -v k="$2" '$1 == k { print $2 }' "$1" | head -1
}

scrape() {
  curl -sS --max-time 60 "http://127.0.0.1:$mport${2:-/metrics}" > "$1"
}

cat > "$T/m.lua" <<'LUA'
local offpath = require "offpath"
function on_event(engine, rec)
  if rec == "hold" then
    -- Hold the loop thread until the test says so.
    assert(io.open(os.getenv("HOLD_FILE") .. ".held", "w")):close()
    while not io.open(os.getenv("HOLD_FILE")) do end
    return
  end
  engine:count("seen")
  engine:gauge("last_len", #rec)
  if rec == "bad" then error("bad record") end
  engine:emit(offpath.run("io", function(x) return x:upper() end, rec))
end
LUA
export HOLD_FILE=$T/release
start_host "$T/err" run "$T/m.lua" --input tcp://127.0.0.1:0 --metrics 127.0.0.1:0 \
  --output "$T/out"
wait_for 20 grep -q "metrics on http" "$T/err"
wait_for 20 grep -q "listening on tcp" "$T/err"
port=$(port_of "$T/err" tcp)
mport=$(sed -n 's|.*serving metrics on http://127\.0\.0\.1:\([0-9][0-9]*\)/metrics$|\1|p' "$T/err")
check "prints where the metrics are" [ -n "$mport" ]

{ for i in $(seq 1 40); do echo "record $i"; done; echo bad; } > "/dev/tcp/127.0.0.1/$port"
processed() {
  scrape "$T/s1" && [ "$(metric "$T/s1" offpath_records_failed_total)" = 1 ] &&
    [ "$(metric "$T/s1" offpath_records_processed_total)" = 40 ]
}
wait_for 60 processed
check "scrape: promtool accepts it" promtool check metrics < "$T/s1"
check "scrape: records in" [ "$(metric "$T/s1" offpath_records_in_total)" = 41 ]
check "scrape: records failed" [ "$(metric "$T/s1" offpath_records_failed_total)" = 1 ]
check "scrape: records out" [ "$(metric "$T/s1" offpath_records_out_total)" = 40 ]
check "scrape: errors" [ "$(metric "$T/s1" offpath_errors_total)" = 1 ]
check "scrape: per-input records" \
  [ "$(metric "$T/s1" "offpath_input_records_total{input=\"tcp://127.0.0.1:$port\",kind=\"tcp\"}")" = 41 ]
check "scrape: pool tasks submitted" [ "$(metric "$T/s1" 'offpath_pool_tasks_submitted_total{pool="io"}')" = 40 ]
check "scrape: pool tasks completed" [ "$(metric "$T/s1" 'offpath_pool_tasks_completed_total{pool="io"}')" = 40 ]
check "scrape: pool queue depth" [ "$(metric "$T/s1" 'offpath_pool_queued{pool="io"}')" = 0 ]
check "scrape: pool threads" [ "$(metric "$T/s1" 'offpath_pool_threads{pool="io"}')" = 4 ]
check "scrape: pool threads running" [ "$(metric "$T/s1" 'offpath_pool_threads_running{pool="io"}')" = 4 ]
check "scrape: pool workers stuck" [ "$(metric "$T/s1" 'offpath_pool_workers_stuck_total{pool="io"}')" = 0 ]
check "scrape: pool memory held" [ "$(metric "$T/s1" 'offpath_pool_memory_bytes{pool="io"}')" -gt 0 ]
check "scrape: pool memory limit" [ "$(metric "$T/s1" 'offpath_pool_memory_limit_bytes{pool="io"}')" -ge 0 ]
check "scrape: script counter" [ "$(metric "$T/s1" 'offpath_script_count_total{name="seen"}')" = 41 ]
check "scrape: script gauge" [ "$(metric "$T/s1" 'offpath_script_value{name="last_len"}')" = 3 ]
check "scrape: histogram type" contains "$T/s1" "# TYPE offpath_record_duration_seconds histogram"
check "scrape: record histogram count" [ "$(metric "$T/s1" offpath_record_duration_seconds_count)" = 41 ]
check "scrape: +Inf bucket is the count" \
  [ "$(metric "$T/s1" 'offpath_record_duration_seconds_bucket{le="+Inf"}')" = 41 ]
check "scrape: pool histogram count" \
  [ "$(metric "$T/s1" 'offpath_pool_task_duration_seconds_count{pool="io"}')" = 40 ]
# Buckets never decrease along le.
cumulative() {
  grep '^offpath_record_duration_seconds_bucket' "$1" | awk '{ if ($2 < last) bad = 1; last = $2 } END { exit bad }'
}
check "scrape: buckets are cumulative" cumulative "$T/s1"
check "scrape: a sum in seconds" \
  awk '$1 == "offpath_record_duration_seconds_sum" { exit !($2 > 0 && $2 < 60) }' "$T/s1"

scrape "$T/s404" /nothing
check "other paths: 404" contains "$T/s404" "not found"
curl -sS -o /dev/null -w '%{http_code}' -X POST -d x "http://127.0.0.1:$mport/metrics" > "$T/post"
check "POST: 405" [ "$(cat "$T/post")" = 405 ]

# A handler holds the loop thread: the scrape is still answered (with the
# counters published before), then the loop goes on.
echo hold > "/dev/tcp/127.0.0.1/$port"
wait_for 60 test -e "$HOLD_FILE.held"
scrape "$T/s2"
check "held loop: the scrape is answered" contains "$T/s2" "offpath_records_processed_total 40"
touch "$HOLD_FILE"
released() {
  scrape "$T/s3" && [ "$(metric "$T/s3" offpath_records_processed_total)" = 41 ]
}
wait_for 60 released
check "released: the next scrape is fresh" [ $? -eq 0 ]
# The metrics port is taken while this host runs.
"$OFFPATH" run "$T/m.lua" --input /dev/null --metrics "127.0.0.1:$mport" 2> "$T/bad3"
check "port in use: exit 3" [ $? -eq 3 ]
check "port in use: says why" contains "$T/bad3" "Address already in use"
stop_host TERM
check "exits 0 on SIGTERM" [ "$HOST_RC" -eq 0 ]
check "no error from the server" lacks "$T/err" "metrics:"

# ---- bad addresses ----
"$OFFPATH" run "$T/m.lua" --input /dev/null --metrics nonsense 2> "$T/bad1"
check "no port: exit 3" [ $? -eq 3 ]
check "no port: says why" contains "$T/bad1" "cannot serve metrics on nonsense: expects HOST:PORT"
"$OFFPATH" run "$T/m.lua" --input /dev/null --metrics 127.0.0.1:99999 2> "$T/bad5"
check "port out of range: exit 3" [ $? -eq 3 ]
check "port out of range: says why" contains "$T/bad5" "the port must be a number 0..65535, not '99999'"
"$OFFPATH" run "$T/m.lua" --input /dev/null --metrics 2> "$T/bad4"
check "no value: usage error" [ $? -eq 2 ]
finish
