#!/bin/bash
# SPDX-License-Identifier: MIT
# rstream.sh - redis-stream:// inputs and outputs against a real
# redis-server of its own (tests/fixtures/redis.sh): three instances share
# one stream of 20,000 entries through a consumer group, handlers suspend
# in offpath.sleep and offpath.run and emit to an output stream; every
# entry comes out exactly once and nothing stays pending; with one
# instance killed (-9) mid-run every entry still comes out; a poison
# entry is dead-lettered after max_deliveries tries; SIGTERM acknowledges
# what finished and leaves the rest pending for others; lost connections
# are made again; a slow output pauses the inputs.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "FAIL: no redis-server (Debian package redis-server)" >&2
  exit 1
fi
sh "$SRC/tests/fixtures/redis.sh" start "$T" >/dev/null || exit 1
trap 'kill -CONT "$(cat "${REDIS_PIDFILE:-/dev/null}")" 2>/dev/null
  sh "$SRC/tests/fixtures/redis.sh" stop "$T" >/dev/null 2>&1; cleanup' EXIT
. "$T/redis.env"
R() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
URL=redis-stream://127.0.0.1:$REDIS_PORT

# fill STREAM N [PREFIX]: add entries data=PREFIXi, i = 1..N.
fill() {
  seq 1 "$2" | sed "s/^/XADD $1 * data ${3:-r}/" | R >/dev/null
}

# pending STREAM: the group's pending count.
pending() {
  R XPENDING "$1" offpath | head -1
}

# out_values STREAM: the data values of every entry, one a line.
out_values() {
  R --raw XRANGE "$1" - + | awk 'want { print; want = 0 } $0 == "data" { want = 1 }'
}

# done_when OUT N IN: OUT has N entries and IN's group has none pending.
done_when() {
  [ "$(R XLEN "$1")" -ge "$2" ] && [ "$(pending "$3")" = 0 ]
}

# len_ge STREAM N: STREAM has at least N entries (for wait_for).
len_ge() {
  [ "$(R XLEN "$1")" -ge "$2" ]
}

# pending_is STREAM N: the group of STREAM has N entries pending.
pending_is() {
  [ "$(pending "$1")" = "$2" ]
}

cat > "$T/work.lua" <<'EOF'
-- Each record suspends on a timer and in a worker, then emits.
function on_event(engine, rec, entry)
  assert(entry.fields.data == rec and entry.stream and entry.id)
  offpath.sleep(0.001)
  local v = offpath.run("io", function(x) return x end, rec)
  engine:emit(v)
end
EOF

# start_n N NAME ARGS...: N instances in the background; pids in $NAME_PIDS.
start_n() {
  local n=$1 name=$2 i pids=""
  shift 2
  for i in $(seq 1 "$n"); do
    start_host "$T/$name.$i.err" run "$T/work.lua" --json "$@"
    pids="$pids $HOST_PID"
  done
  eval "${name}_PIDS='$pids'"
}

# stop_all PIDS: SIGTERM each, wait; 0 if every one exited with status 0.
stop_all() {
  local p rc=0
  for p in $1; do kill -TERM "$p" 2>/dev/null; done
  for p in $1; do wait "$p" || rc=1; done
  return $rc
}

# sum_field NAME KEY: KEY of the inputs of every NAME.*.err summary, added.
sum_field() {
  cat "$T/$1".*.err | grep -o "\"$2\":[0-9]*" | cut -d: -f2 |
    awk '{ s += $1 } END { print s + 0 }'
}

# ---- three instances, the happy path ----
N=20000
fill in1 $N
start_n 3 happy --input "$URL/in1?claim_idle=5" --output "$URL/out1" \
  --pool io=4
check "three instances: every entry out, none pending" \
  wait_for 120 done_when out1 $N in1
check "three instances stop cleanly" stop_all "$happy_PIDS"
out_values out1 | sort > "$T/out1.txt"
check "every entry exactly once" \
  test "$(sort -u "$T/out1.txt" | wc -l)" = $N -a "$(wc -l < "$T/out1.txt")" = $N
check "the group's pending list is empty" test "$(pending in1)" = 0
check "acknowledged adds up" test "$(sum_field happy acknowledged)" = $N
check "the work was shared" \
  test "$(grep -l '"acknowledged":[1-9]' "$T"/happy.*.err | wc -l)" -ge 2

# ---- one instance killed with -9 mid-run ----
fill in2 $N
start_n 3 kill --input "$URL/in2?claim_idle=1" --output "$URL/out2"
set -- $kill_PIDS
check "work starts" wait_for 60 len_ge out2 2000
kill -9 "$1"
wait "$1" 2>/dev/null
check "after kill -9: every entry done, none pending" \
  wait_for 120 done_when out2 $N in2
check "the others stop cleanly" stop_all "$2 $3"
out_values out2 | sort -u > "$T/out2.txt"
check "after kill -9: every entry at least once" \
  test "$(wc -l < "$T/out2.txt")" = $N
check "entries of the dead consumer were claimed" \
  test "$(cat "$T"/kill.2.err "$T"/kill.3.err | grep -o '"claimed":[0-9]*' |
    cut -d: -f2 | awk '{ s += $1 } END { print s + 0 }')" -ge 1

# ---- a poison entry ----
cat > "$T/poison.lua" <<'EOF'
function on_event(engine, rec, entry)
  engine:emit("try " .. rec .. " " .. entry.deliveries)
  if rec == "poison" then
    -- The failure is in a task the handler started, not in the handler.
    offpath.launch("io", function() error("poisoned record") end)
  end
end
EOF
fill in3 5
R XADD in3 '*' data poison >/dev/null
R XADD in3 '*' other field >/dev/null # no data field: malformed
start_host "$T/poison.err" run "$T/poison.lua" --json \
  --input "$URL/in3?claim_idle=0.2&max_deliveries=3" --output "$URL/out3"
check "poison: dead-lettered, nothing pending" \
  wait_for 60 done_when in3:dead 2 in3
stop_host TERM
check "poison: exit 0" test "$HOST_RC" = 0
R --raw XRANGE in3:dead - + > "$T/dead.txt"
check "dead letter keeps the record and says why" \
  contains "$T/dead.txt" "poisoned record"
check "dead letter: no data field" contains "$T/dead.txt" "no field 'data'"
check "poison tried exactly max_deliveries times" \
  test "$(out_values out3 | grep -c '^try poison')" = 3
check "poison: the delivery count grows" \
  test "$(out_values out3 | grep '^try poison' | cut -d' ' -f3 | tr '\n' ,)" = "1,2,3,"
check "poison: counted" test "$(num "$T/poison.err" dead_lettered)" = 2
check "poison: the good entries once" \
  test "$(out_values out3 | grep -c '^try r')" = 5

# ---- SIGTERM: what finished is acknowledged, the rest stays pending ----
cat > "$T/slow.lua" <<'EOF'
function on_event(engine, rec)
  offpath.sleep(tonumber(os.getenv("DELAY")))
  engine:emit(rec)
end
EOF
fill in4 100
export DELAY=0.3
start_host "$T/term1.err" run "$T/slow.lua" --json \
  --input "$URL/in4?consumer=c1&claim_idle=3" --output "$URL/out4" \
  --max-inflight 10
wait_for 30 len_ge out4 5
stop_host TERM
check "SIGTERM: exit 0" test "$HOST_RC" = 0
A=$(num "$T/term1.err" acknowledged)
P=$(num "$T/term1.err" processed)
READ1=$(num "$T/term1.err" read)
check "SIGTERM: what finished was acknowledged" \
  test "$A" = "$P" -a "$A" = "$(R XLEN out4)" -a "$A" -ge 5
# Handlers in flight finished within the grace period; entries read ahead
# were never handed over: those stay pending, for others.
P1=$(pending in4)
check "SIGTERM: only what was read ahead stays pending" \
  test "$P1" = $((READ1 - A)) -a "$P1" -le 10
export DELAY=30
start_host "$T/term2.err" run "$T/slow.lua" --json \
  --input "$URL/in4?consumer=c2&claim_idle=3" --output "$URL/out4" \
  --max-inflight 10 --grace 0.2
wait_for 30 pending_is in4 $((P1 + 20)) # 10 in flight, 10 read ahead
stop_host TERM
READ2=$(num "$T/term2.err" read)
CLAIMED2=$(num "$T/term2.err" claimed)
check "SIGTERM: cancelled entries stay pending" \
  test "$(pending in4)" = $((P1 + READ2 - CLAIMED2))
check "SIGTERM: cancelled, not acknowledged" \
  test "$(num "$T/term2.err" acknowledged)" = 0
export DELAY=0
start_host "$T/term3.err" run "$T/slow.lua" --json \
  --input "$URL/in4?consumer=c3&claim_idle=3" --output "$URL/out4"
# Entries given up at a stop look idle at once: claimed on the first look
# (after claim_idle / 3), not after claim_idle.
check "SIGTERM: another consumer claims and finishes them" \
  wait_for 60 done_when out4 100 in4
stop_host TERM
check "SIGTERM: every entry out once" \
  test "$(out_values out4 | sort -u | wc -l)" = 100 -a "$(R XLEN out4)" = 100

# ---- lost connections ----
fill in5 3000
start_host "$T/lost.err" run "$T/work.lua" --json \
  --input "$URL/in5?claim_idle=1" --output "$URL/out5"
wait_for 60 len_ge out5 300
R CLIENT KILL TYPE normal >/dev/null
wait_for 60 len_ge out5 1500
R CLIENT KILL TYPE normal >/dev/null
check "lost connections: every entry done, none pending" \
  wait_for 120 done_when out5 3000 in5
stop_host TERM
check "lost connections: exit 0" test "$HOST_RC" = 0
check "lost connections: every entry out" \
  test "$(out_values out5 | sort -u | wc -l)" = 3000
check "lost connections: each acknowledged once" \
  test "$(num "$T/lost.err" acknowledged)" = 3000
check "lost connections: reported" contains "$T/lost.err" "reconnecting"

# ---- a slow output pauses the inputs ----
cat > "$T/big.lua" <<'EOF'
function on_event(engine, rec) engine:emit(rec) end
EOF
head -c 70000 /dev/zero | tr '\0' x > "$T/line"
for i in $(seq 1 200); do cat "$T/line"; echo; done > "$T/big.txt"
# Redis stopped (SIGSTOP): the kernel still accepts the connection and
# buffers what is sent, nothing is confirmed, so past 8 MiB unconfirmed
# (120 records) the host must stop reading.
REDIS_PID=$(cat "$REDIS_PIDFILE")
kill -STOP "$REDIS_PID"
start_host "$T/big.err" run "$T/big.lua" --json --stats --input "$T/big.txt" \
  --output "$URL/out6"
# --stats --json: a JSON object a second; records.in of the last one.
stats_in() { grep '^{' "$T/big.err" | tail -1 | grep -o '"records":{[^}]*}' | grep -o '"in":[0-9]*' | cut -d: -f2; }
in_ge() { [ "$(stats_in)" -ge "$1" ] 2>/dev/null; }
wait_for 60 in_ge 120
sleep 2.5
check "slow output: reading stops while Redis does not answer" \
  test "$(stats_in)" -lt 200
kill -CONT "$REDIS_PID"
wait "$HOST_PID"
check "slow output: every record written" test "$(R XLEN out6)" = 200
check "slow output: the input paused" \
  test "$(grep '^{' "$T/big.err" | tail -1 | grep -o '"pauses":[0-9]*' | cut -d: -f2)" -ge 1

# ---- options: field, group, JSON records, the entry table ----
cat > "$T/json.lua" <<'EOF'
function on_event(engine, rec, entry)
  engine:emit(rec.n .. " " .. entry.fields.k .. " " .. entry.deliveries)
end
EOF
R XADD in7 '*' payload '{"n":1}' k a >/dev/null
R XADD in7 '*' payload '{"n":2}' k b >/dev/null
R XADD in7 '*' payload 'not json' k c >/dev/null
start_host "$T/json.err" run "$T/json.lua" --json --format json \
  --input "$URL/in7?field=payload&group=g7&consumer=me&dead=dl7" \
  --output "$URL/out7"
wait_for 30 len_ge dl7 1
wait_for 30 len_ge out7 2
stop_host TERM
check "field, group, consumer: records decoded, fields given" \
  test "$(out_values out7 | tr '\n' ,)" = "1 a 1,2 b 1,"
check "malformed JSON is dead-lettered at once" \
  contains "$T/json.err" "malformed JSON"
check "the group and consumer named" \
  test "$(R XINFO CONSUMERS in7 g7 | sed -n 2p)" = me
check "named dead-letter stream" test "$(R XLEN dl7)" = 1

# ---- bad addresses and options ----
for bad in "redis-stream://127.0.0.1/x" "redis-stream://127.0.0.1:1" \
  "redis-stream://127.0.0.1:$REDIS_PORT/x?nope=1" \
  "redis-stream://127.0.0.1:$REDIS_PORT/x?max_deliveries=0" \
  "redis-stream://127.0.0.1:$REDIS_PORT/x?claim_idle=x"; do
  "$OFFPATH" run "$T/work.lua" --input "$bad" 2>"$T/bad.err"
  rc=$?
  check "refused: $bad" test $rc = 3
done
check "bad option named" contains "$T/bad.err" "claim_idle"

finish
