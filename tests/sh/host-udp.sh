#!/bin/bash
# SPDX-License-Identifier: MIT
# host-udp.sh - a udp:// input: datagrams holding one or more lines, and
# kernel drops while the host is blocked (a slow handler with
# --max-inflight 1), with every datagram accounted for: handled, skipped at
# stop, or dropped by the kernel.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/udp.lua" <<'EOF'
function on_event(engine, rec) engine:emit(rec) end
EOF

# Datagrams of two lines, the second without a newline.
start_host "$T/err" run "$T/udp.lua" --input udp://127.0.0.1:0 --output "$T/out"
check "the host says where it listens" wait_for 10 grep -q "listening on udp://127.0.0.1:" "$T/err"
port=$(port_of "$T/err" udp)
exec 3>"/dev/udp/127.0.0.1/$port"
for i in $(seq 1 100); do
  printf 'a%d\nb%d' "$i" "$i" >&3
  # Keep well under the socket's buffer: this part is not about drops.
  [ $((i % 20)) = 0 ] && sleep 0.05
done
exec 3>&-
check "200 records arrived" wait_for 10 has_lines "$T/out" 200
stop_host TERM
check "exit 0 on SIGTERM" test "$HOST_RC" = 0
check "every datagram's lines, in order" test "$(tr '\n' ' ' < "$T/out")" = \
  "$(for i in $(seq 1 100); do printf 'a%d b%d ' "$i" "$i"; done)"
check "the summary counts them" contains "$T/err" "udp://127.0.0.1:$port: 200 records, 0 dropped by the kernel"

# Drops: the handler takes 0.2 s and only one may be in flight, so the host
# stops reading and the kernel's buffer overflows.
cat > "$T/slow.lua" <<'EOF'
function on_event(engine, rec) offpath.sleep(0.2) end
EOF
SENT=5000
start_host "$T/err" run "$T/slow.lua" --input udp://127.0.0.1:0 --max-inflight 1 --grace 0 --json
check "slow host listens" wait_for 10 grep -q "listening on udp://" "$T/err"
port=$(port_of "$T/err" udp)
exec 3>"/dev/udp/127.0.0.1/$port"
for i in $(seq 1 $SENT); do printf 'datagram %d\n' "$i" >&3; done
exec 3>&-
sleep 0.3
stop_host TERM
check "exit 0 after SIGTERM" test "$HOST_RC" = 0
tail -1 "$T/err" > "$T/summary.json"
in=$(rnum "$T/summary.json" in)
skipped=$(rnum "$T/summary.json" skipped)
drops=$(num "$T/summary.json" drops)
processed=$(rnum "$T/summary.json" processed)
cancelled=$(rnum "$T/summary.json" cancelled)
failed=$(rnum "$T/summary.json" failed)
echo "  sent $SENT: in $in, skipped $skipped, dropped $drops"
check "the kernel dropped datagrams and they are counted" test "${drops:-0}" -gt 0
check "every datagram is accounted for" test $((in + skipped + drops)) = $SENT
check "every record handed over ended once" test $((processed + failed + cancelled)) = "$in"
check "never more than one in flight" test "$(num "$T/summary.json" inflight_max)" = 1
finish
