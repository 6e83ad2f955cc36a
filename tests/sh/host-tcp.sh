#!/bin/bash
# SPDX-License-Identifier: MIT
# host-tcp.sh - a tcp:// input with several clients at once: the host takes
# lines from all connections together (rounds that only complete if it
# does), keeps each connection's order, joins lines split across writes,
# and counts the clients. Also port 0 and the "listening on" line.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/tcp.lua" <<'EOF'
function on_event(engine, rec)
  engine:count("lines")
  engine:emit(rec)
end
EOF

start_host "$T/err" run "$T/tcp.lua" --input tcp://127.0.0.1:0 --output "$T/out"
check "the host says where it listens" wait_for 10 grep -q "listening on tcp://127.0.0.1:" "$T/err"
port=$(port_of "$T/err" tcp)
check "port 0 picks a real port" test -n "$port" -a "$port" != 0

CLIENTS=5
# client K: three rounds of one line each, every round waiting until the
# host emitted every client's line of that round (so all connections are
# open and served together), then 200 lines at once, then a line split in
# two writes, then close.
client() {
  local k=$1 r i
  exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
  for r in 1 2 3; do
    echo "c$k round $r" >&3
    wait_for 20 has_matches "$T/out" " round $r\$" $CLIENTS || exit 1
  done
  for i in $(seq 1 200); do echo "c$k line $i"; done >&3
  printf "c$k split " >&3
  sleep 0.2
  printf "line\n" >&3
  exec 3>&-
}
cpids=""
for k in $(seq 1 $CLIENTS); do
  client "$k" &
  cpids="$cpids $!"
done
cfail=0
for p in $cpids; do wait "$p" || cfail=1; done
check "every client finished its rounds" test $cfail = 0

total=$((CLIENTS * 204))
check "all $total lines arrived" wait_for 20 has_lines "$T/out" $total
stop_host TERM
check "SIGTERM ends the host with 0" test "$HOST_RC" = 0
check "exactly $total lines" test "$(lines "$T/out")" = $total
for k in $(seq 1 $CLIENTS); do
  grep "^c$k line " "$T/out" | sed "s/^c$k line //" > "$T/got.$k"
  seq 1 200 > "$T/want.$k"
  check "client $k: its 200 lines in order" cmp -s "$T/got.$k" "$T/want.$k"
  check "client $k: the split line joined" grep -qx "c$k split line" "$T/out"
done
check "the summary counts the clients" contains "$T/err" "tcp://127.0.0.1:$port: $total records, $CLIENTS clients"
check "the summary counts the records" contains "$T/err" "records   in $total, processed $total, failed 0, cancelled 0, out $total"
check "the records are counted by the script" contains "$T/err" "counters  lines=$total"
finish
