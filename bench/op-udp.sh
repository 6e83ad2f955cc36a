#!/bin/sh
# SPDX-License-Identifier: MIT
# op-udp.sh - the fast path under slow work, over UDP: bench/op-udpsend
# sends COUNT records at RATE a second to the host's udp:// input, whose
# script (bench/op-fastpath.lua) does 10 % of them slowly, inline or through
# offpath.run (OP_SLOW in the environment, as for op-fastpath.lua).
#
# usage: OP_SLOW=inline|offload|none sh bench/op-udp.sh BUILD RATE COUNT
#
# The receive buffer is the kernel's default for every run (the host sets
# no SO_RCVBUF: net.core.rmem_default, printed as rcvbuf=). After the sender
# is done the host gets 1 s to drain its socket, then SIGTERM; on_stop
# prints the script's line, to which this adds sent= and lost= (sent minus
# records handled) and lost_pct=. drops= is what the host counted from the
# kernel (SO_RXQ_OVFL); lost counts every datagram that never became a
# record.
set -eu

if [ $# -ne 3 ]; then
  echo "usage: OP_SLOW=inline|offload|none sh bench/op-udp.sh BUILD RATE COUNT" >&2
  exit 2
fi
BUILD=$1
RATE=$2
COUNT=$3
SRC=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/op-udp.XXXXXX")
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

# Made first: the background job may open them after the loop below reads.
: >"$TMP/out"
: >"$TMP/err"
"$BUILD/offpath" run "$SRC/bench/op-fastpath.lua" --input udp://127.0.0.1:0 \
  >"$TMP/out" 2>"$TMP/err" &
pid=$!

# The host prints "offpath: listening on udp://127.0.0.1:PORT".
port=
n=0
while [ -z "$port" ]; do
  port=$(sed -n 's/^offpath: listening on udp:\/\/127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$TMP/err")
  if [ -z "$port" ]; then
    n=$((n + 1))
    if [ "$n" -gt 100 ] || ! kill -0 "$pid" 2>/dev/null; then
      echo "op-udp: the host did not start:" >&2
      cat "$TMP/err" >&2
      exit 1
    fi
    sleep 0.05
  fi
done
# Let on_start finish (offload mode starts the pool's workers).
sleep 0.3

"$BUILD/bench/op-udpsend" --port "$port" --rate "$RATE" --count "$COUNT" >"$TMP/send"
sleep 1
kill -TERM "$pid"
wait "$pid" || true
pid=

line=$(grep '^name=' "$TMP/out" | tail -n 1 || true)
if [ -z "$line" ]; then
  echo "op-udp: no result line from the host:" >&2
  tail -n 20 "$TMP/err" >&2
  exit 1
fi
sent=$(sed -n 's/^sent=\([0-9]*\).*/\1/p' "$TMP/send")
records=$(printf '%s\n' "$line" | tr ' ' '\n' | sed -n 's/^records=//p')
rcvbuf=$(cat /proc/sys/net/core/rmem_default 2>/dev/null || echo "?")
lost=$((sent - records))
lost_pct=$(awk -v l="$lost" -v s="$sent" 'BEGIN { printf "%.2f", 100 * l / s }')
echo "$line sent=$sent rate=$RATE lost=$lost lost_pct=$lost_pct rcvbuf=$rcvbuf"
