#!/bin/bash
# SPDX-License-Identifier: MIT
# host-inputs.sh - records from stdin (a pipe, a file), files, a FIFO and
# several inputs at once; line splitting (CRLF, blank lines, a last line
# without a newline, lines too long); how inputs take turns with each
# other and with the loop; the engine methods in the summary.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/echo.lua" <<'EOF'
function on_event(engine, rec)
  engine:count("records")
  engine:count("bytes", #rec)
  engine:emit("[" .. rec .. "]")
end
EOF

# A file: CRLF is stripped, blank lines are records, the last line needs
# no newline.
"$OFFPATH" run "$T/echo.lua" --input "$RECORDS/lines.txt" > "$T/out" 2> "$T/err"
check "file: exit 0" test $? = 0
printf '[first line]\n[second line]\n[]\n[fourth after a blank]\n[no newline at the end]\n' > "$T/want"
check "file: every line once, in order" cmp -s "$T/out" "$T/want"
check "file: counted in the summary" contains "$T/err" "records   in 5, processed 5, failed 0, cancelled 0, out 5"
check "file: named in the inputs" contains "$T/err" "$RECORDS/lines.txt: 5 records"
check "file: counters in the summary" contains "$T/err" "counters  bytes=62, records=5"

# stdin as a pipe (the default input) and as a redirected file.
seq 1 1000 | "$OFFPATH" run "$T/echo.lua" > "$T/out" 2> "$T/err"
check "stdin pipe: exit 0" test $? = 0
check "stdin pipe: 1000 records" test "$(lines "$T/out")" = 1000
check "stdin pipe: first and last" test "$(head -1 "$T/out")$(tail -1 "$T/out")" = "[1][1000]"
seq 1 500 > "$T/seq.txt"
"$OFFPATH" run "$T/echo.lua" --input - < "$T/seq.txt" > "$T/out" 2> "$T/err"
check "stdin file: 500 records" test "$(lines "$T/out")" = 500

# An empty input, and /dev/null.
: > "$T/empty.txt"
"$OFFPATH" run "$T/echo.lua" --input "$T/empty.txt" --input /dev/null > "$T/out" 2> "$T/err"
check "empty inputs: exit 0 with no records" test $? = 0 -a "$(lines "$T/out")" = 0
check "empty inputs: summary says 0" contains "$T/err" "records   in 0, processed 0"

# A big file is read in chunks, every line whole.
seq 1 200000 | sed 's/$/ some padding to make the lines longer/' > "$T/big.txt"
"$OFFPATH" run "$T/echo.lua" --input "$T/big.txt" > "$T/out" 2> "$T/err"
check "big file: 200000 records" test "$(lines "$T/out")" = 200000
check "big file: no line broken at a chunk edge" \
  test "$(grep -cv '^\[[0-9]* some padding to make the lines longer\]$' "$T/out")" = 0

# A FIFO: opening does not wait for the writer, the end comes when the
# writer closes.
mkfifo "$T/fifo"
start_host "$T/err" run "$T/echo.lua" --input "$T/fifo" --output "$T/out"
sleep 0.3
( printf 'from\n'; sleep 0.2; printf 'the fifo\n' ) > "$T/fifo"
wait "$HOST_PID"
check "fifo: exit 0 when the writer closes" test $? = 0
printf '[from]\n[the fifo]\n' > "$T/want"
check "fifo: both records" cmp -s "$T/out" "$T/want"

# Several inputs at once: all records arrive, each input counted.
seq 1 300 > "$T/a.txt"
seq 301 600 > "$T/b.txt"
seq 601 900 | "$OFFPATH" run "$T/echo.lua" --input "$T/a.txt" --input - \
  --input "$T/b.txt" > "$T/out" 2> "$T/err"
check "several inputs: 900 records" test "$(lines "$T/out")" = 900
check "several inputs: each once" test "$(tr -d '[]' < "$T/out" | sort -n | uniq | wc -l)" = 900
check "several inputs: a counted" contains "$T/err" "$T/a.txt: 300 records"
check "several inputs: stdin counted" contains "$T/err" "-: 300 records"

# A line longer than the limit (1 MiB) is dropped and reported, and the
# next line is read normally.
{ echo before; head -c 1100000 /dev/zero | tr '\0' x; echo; echo after; } > "$T/long.txt"
"$OFFPATH" run "$T/echo.lua" --input "$T/long.txt" > "$T/out" 2> "$T/err"
printf '[before]\n[after]\n' > "$T/want"
check "long line: dropped, the others kept" cmp -s "$T/out" "$T/want"
check "long line: reported with its line number" contains "$T/err" "$T/long.txt line 2: line of"
check "long line: counted" contains "$T/err" "too long 1"

# Slow handlers still let the loop turn: a coroutine that yields with
# sleep(0) runs again after at most 128 records (a read callback and the
# pump each hand over a batch of 64 in one turn) when every handler
# outlasts the pump's 100 us.
cat > "$T/turns.lua" <<'EOF'
local offpath = require "offpath"
local n, since, most, resumes = 0, 0, 0, 0
function on_start()
  offpath.go(function()
    while n < 1000 do
      offpath.sleep(0)
      resumes = resumes + 1
      most = math.max(most, since)
      since = 0
    end
  end)
end
function on_event()
  n, since = n + 1, since + 1
  local t = offpath.now() + 200e-6
  while offpath.now() < t do end
end
function on_stop()
  print(resumes, most)
end
EOF
seq 1 1000 > "$T/thousand.txt"
"$OFFPATH" run "$T/turns.lua" --input "$T/thousand.txt" > "$T/out" 2> "$T/err"
check "slow handlers: exit 0" test $? = 0
read -r resumes most < "$T/out"
check "slow handlers: the coroutine ran meanwhile" test "${resumes:-0}" -ge 7
check "slow handlers: at most 128 records between its turns" test "${most:-999}" -le 128

# Two equal inputs take turns: the pump goes round them a batch of 64
# each, so when one ends the other is close behind (it lags only while
# its next read is on its way); a pump that let the first use up its
# 100 us left the second at a fifth.
cat > "$T/fair.lua" <<'EOF'
local seen, at = { a = 0, b = 0 }, nil
function on_event(_, rec)
  local from = rec:sub(1, 1)
  seen[from] = seen[from] + 1
  if not at and seen[from] == 50000 then
    at = seen[from == "a" and "b" or "a"]
  end
end
function on_stop()
  print(seen.a, seen.b, at)
end
EOF
seq 1 50000 | sed 's/^/a/' > "$T/fair-a.txt"
seq 1 50000 | sed 's/^/b/' > "$T/fair-b.txt"
"$OFFPATH" run "$T/fair.lua" --input "$T/fair-a.txt" --input "$T/fair-b.txt" > "$T/out" 2> "$T/err"
check "two inputs: exit 0" test $? = 0
read -r na nb at < "$T/out"
check "two inputs: every record" test "${na:-0}" = 50000 -a "${nb:-0}" = 50000
check "two inputs: the other past half when one ends" test "${at:-0}" -ge 25000

# --output writes to a file; a table is written as JSON.
printf 'function on_event(e, r) e:emit({line = r, n = #r}) end\n' > "$T/tbl.lua"
printf 'abc\n' | "$OFFPATH" run "$T/tbl.lua" --output "$T/o.json" > "$T/out" 2> "$T/err"
check "output file: JSON record" test "$(cat "$T/o.json")" = '{"line":"abc","n":3}'
check "output file: nothing on stdout" test ! -s "$T/out"
finish
