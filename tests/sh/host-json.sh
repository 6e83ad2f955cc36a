#!/bin/bash
# SPDX-License-Identifier: MIT
# host-json.sh - --format json: each line decoded to a Lua value (objects
# and arrays to tables, integers stay integers, null left out), encoded
# back by engine:emit; malformed lines counted and reported with their line
# numbers, never fatal; emit refusing values JSON cannot hold.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/json.lua" <<'EOF'
function on_event(engine, rec)
  engine:emit({ type = math.type(rec) or type(rec), rec = rec })
  if type(rec) == "table" and rec.id == 3 then
    engine:emit(string.format("types id=%s latency=%s lat=%s",
      math.type(rec.id), math.type(rec.latency), math.type(rec.geo.lat)))
  end
  if type(rec) == "table" and rec.id == 6 then
    engine:emit(string.format("big=%d exact=%s", rec.big,
      tostring(rec.big == 9007199254740993)))
  end
end
EOF
"$OFFPATH" run "$T/json.lua" --format json --input "$RECORDS/events.jsonl" > "$T/out" 2> "$T/err"
check "exit 0" test $? = 0
cat > "$T/want" <<'EOF'
{"rec":{"bytes":512,"id":1,"ok":true,"op":"view","user":"alice"},"type":"table"}
{"rec":{"bytes":0,"id":2,"ok":false,"op":"lookup","tags":["a","b"],"user":"bob"},"type":"table"}
{"rec":{"geo":{"lat":48.85,"lon":2.35},"id":3,"latency":0.25,"op":"view","user":"carol"},"type":"table"}
types id=integer latency=float lat=float
{"rec":{"id":4,"list":[1,null,3],"op":"view","user":"dave"},"type":"table"}
{"rec":{"emoji":"😀","id":5,"nul":"a\u0000b","op":"view","user":"émilie"},"type":"table"}
{"rec":{"big":9007199254740993,"exp":1e+300,"id":6,"neg":-42,"op":"lookup","user":"frank"},"type":"table"}
big=9007199254740993 exact=true
{"rec":[1,2,3],"type":"table"}
{"rec":"just a string","type":"string"}
{"rec":42,"type":"integer"}
{"rec":{"id":9,"nested":{"a":{"b":{"c":{"d":[{},{}]}}}}},"type":"table"}
{"rec":{"id":10,"op":"view","quote":"say \"hi\"\\n","tab":"\t","user":"grace"},"type":"table"}
EOF
check "every value decoded and encoded back" cmp "$T/out" "$T/want"
check "11 records" contains "$T/err" "records   in 11, processed 11, failed 0"

# Malformed lines: counted, reported with line and column, never fatal.
# Line 3 is blank (not a record), line 4 ends in CRLF.
"$OFFPATH" run "$T/json.lua" --format=json --input "$RECORDS/malformed.jsonl" > "$T/out" 2> "$T/err"
check "malformed: exit 0" test $? = 0
check "malformed: the good records" test "$(grep -o '"id":[0-9]' "$T/out" | tr '\n' ' ')" = '"id":1 "id":3 "id":6 '
check "malformed: line 2" contains "$T/err" "$RECORDS/malformed.jsonl line 2: malformed JSON: invalid token near 'tru' at column 16"
check "malformed: line 5" contains "$T/err" "malformed.jsonl line 5: malformed JSON: string or '}' expected near end of file"
check "malformed: line 6" contains "$T/err" "malformed.jsonl line 6: malformed JSON: ']' expected near end of file"
check "malformed: line 7" contains "$T/err" "malformed.jsonl line 7: malformed JSON: invalid escape"
check "malformed: line 8" contains "$T/err" "malformed.jsonl line 8: malformed JSON: invalid token near 'not'"
check "malformed: counted" contains "$T/err" "malformed 5, too long 0"
check "malformed: per input" contains "$T/err" "malformed.jsonl: 3 records, 5 malformed"

# Many malformed lines: messages are rate-limited, all are counted.
for i in $(seq 1 500); do echo "{bad $i"; echo "{\"ok\":$i}"; done > "$T/many.jsonl"
"$OFFPATH" run "$T/json.lua" --format json --input "$T/many.jsonl" --json > "$T/out" 2> "$T/err"
check "many malformed: 500 good records" test "$(lines "$T/out")" = 500
check "many malformed: all counted" test "$(rnum "$T/err" malformed)" = 500
# 20 a second: the run may span more than one second on a loaded machine.
check "many malformed: at most 20 messages a second" awk -v n="$(grep -c 'malformed JSON' "$T/err")" -v t="$(num "$T/err" elapsed)" 'BEGIN { exit !(n <= 20 * (int(t) + 1) && n < 500) }'
check "many malformed: the rest are summed up" contains "$T/err" "more messages suppressed"

# emit refuses what JSON cannot hold; the record fails, the others go on.
cat > "$T/bad.lua" <<'EOF'
function on_event(engine, rec)
  if rec == "fn" then engine:emit({ ok = 1, f = print }) end
  if rec == "utf8" then engine:emit({ s = "\255" }) end
  if rec == "cycle" then local t = {}; t.t = t; engine:emit(t) end
  if rec == "key" then engine:emit({ [true] = 1 }) end
  if rec == "nan" then engine:emit({ x = 0/0, y = 1.0, z = 2^63 }) end
  if rec == "nil" then engine:emit(nil) end
  engine:emit(rec)
end
EOF
printf 'fn\nutf8\ncycle\nkey\nnan\nnil\nfine\n' | "$OFFPATH" run "$T/bad.lua" > "$T/out" 2> "$T/err"
check "emit errors: exit 0" test $? = 0
check "emit: a function" contains "$T/err" "emit: cannot encode a function (at key 'f')"
check "emit: bad UTF-8" contains "$T/err" "emit: string is not valid UTF-8 (at key 's')"
check "emit: a cycle" contains "$T/err" "emit: table nested deeper than 1000 levels (a cycle?)"
check "emit: a boolean key" contains "$T/err" "emit: cannot encode a boolean key"
check "emit: nil" contains "$T/err" "bad argument #1 to 'emit' (string or table expected, got nil)"
check "emit: NaN is null, floats stay floats" contains "$T/out" '{"x":null,"y":1.0,"z":9.223372036854776e+18}'
check "emit errors: the other records" test "$(grep -c '^[a-z]' "$T/out")" = 2
check "emit errors: 5 failed" contains "$T/err" "records   in 7, processed 2, failed 5"
finish
