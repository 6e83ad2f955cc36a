#!/bin/bash
# SPDX-License-Identifier: MIT
# host-backpressure.sh - --max-inflight: a slow handler never has more
# than N suspended at once (and reaches N); files and TCP are
# flow-controlled: the host reads only a little ahead of its handlers, and
# a TCP sender blocks instead of filling the host's memory.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/slow.lua" <<'EOF'
local cur, max, over = 0, 0, 0
function on_event(engine, rec)
  cur = cur + 1
  if cur > max then max = cur end
  if engine:stats().records.inflight > LIMIT then over = over + 1 end
  if POOL then
    offpath.run("io", function() os.execute("sleep 0.02") end)
  else
    offpath.sleep(0.02)
  end
  cur = cur - 1
end
function on_stop(engine)
  engine:emit(string.format("max %d over %d", max, over))
end
EOF

seq 1 200 > "$T/in.txt"
for mode in sleep pool; do
  if [ $mode = pool ]; then pre="POOL = true"; else pre="POOL = false"; fi
  printf 'LIMIT = 10\n%s\n' "$pre" | cat - "$T/slow.lua" > "$T/run.lua"
  "$OFFPATH" run "$T/run.lua" --input "$T/in.txt" --max-inflight 10 --pool io=16 --json > "$T/out" 2> "$T/err"
  check "$mode: exit 0" test $? = 0
  check "$mode: at most 10 suspended, and 10 reached" test "$(cat "$T/out")" = "max 10 over 0"
  check "$mode: the host saw 10 at most" test "$(num "$T/err" inflight_max)" = 10
  check "$mode: reading paused" test "$(num "$T/err" pauses)" -ge 1
  check "$mode: all 200 processed" test "$(rnum "$T/err" processed)" = 200
done

# A limit of 1 makes records strictly one after another.
printf 'LIMIT = 1\nPOOL = false\n' | cat - "$T/slow.lua" > "$T/run.lua"
seq 1 20 | "$OFFPATH" run "$T/run.lua" --max-inflight 1 > "$T/out" 2> "$T/err"
check "limit 1: one at a time" test "$(cat "$T/out")" = "max 1 over 0"

# Files: with two slow handlers in flight the host reads a chunk or so
# ahead, not the whole file.
cat > "$T/stuck.lua" <<'EOF'
function on_event(engine, rec) io.stderr:write("started\n") offpath.sleep(30) end
EOF
yes 'a line of about forty characters, padded' | head -n 300000 > "$T/big.txt"
start_host "$T/err" run "$T/stuck.lua" --input "$T/big.txt" --max-inflight 2 --grace 0 --json
wait_for 30 has_matches "$T/err" '^started' 2
sleep 0.2
stop_host TERM
in=$(rnum "$T/err" in)
skipped=$(rnum "$T/err" skipped)
echo "  file of 300000 lines: $in handed over, $skipped read ahead"
check "file: 2 records handed over" test "$in" = 2
check "file: read ahead is bounded (< 30000 lines)" test $((in + skipped)) -lt 30000
check "file: both cancelled after the grace period" test "$(rnum "$T/err" cancelled)" = 2

# TCP: the sender blocks once the kernel's buffers are full, because the
# host stopped reading.
yes 'a line of about forty characters, padded' | head -c 40000000 > "$T/big40m.txt"
start_host "$T/err2" run "$T/stuck.lua" --input tcp://127.0.0.1:0 --max-inflight 1 --grace 0 --json
wait_for 10 grep -q "listening on tcp://" "$T/err2"
port=$(port_of "$T/err2" tcp)
timeout 3 bash -c "cat '$T/big40m.txt' > /dev/tcp/127.0.0.1/$port"
crc=$?
check "tcp: the sender was still blocked after 3 s" test $crc = 124
stop_host TERM
in=$(rnum "$T/err2" in)
skipped=$(rnum "$T/err2" skipped)
echo "  tcp 40 MB sent: $in handed over, $skipped read ahead"
check "tcp: 1 record handed over" test "$in" = 1
check "tcp: read ahead is bounded" test $((in + skipped)) -lt 30000
finish
