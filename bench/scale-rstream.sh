#!/bin/sh
# SPDX-License-Identifier: MIT
# scale-rstream.sh - offpath instances sharing one Redis stream through a
# consumer group (--input redis-stream://). Starts redis-server itself
# (tests/fixtures/redis.sh) on a free port and prints one line:
#
#   scale N      N instances, each with at most INFLIGHT handlers in flight,
#                every handler suspended SLEEP seconds (offpath.sleep): an
#                I/O-bound load whose throughput one instance caps at
#                INFLIGHT / SLEEP entries a second. PER * N entries; timed
#                from the start of the instances until the group has read
#                every entry and none is pending (all acknowledged).
#                name=rstream-N instances=N entries=... entries_per_s=...
#   cost offpath one instance, a handler that does nothing, ENTRIES entries:
#                the CPU the process spent per entry (reading, dispatch,
#                acknowledgement), from /proc.
#                name=rstream-cost entries=... us_cpu_per_entry=...
#   cost peer    the same entries read by bench/peer-xread (hiredis,
#                XREADGROUP COUNT 1000 then one XACK per batch).
#                name=peer-xread entries=... us_cpu_per_entry=...
#
# usage: sh bench/scale-rstream.sh BUILD_DIR scale N | cost offpath|peer
# Environment: PER=3000, INFLIGHT=8, SLEEP=0.002, ENTRIES=100000.
set -eu
BUILD=${1:?usage: sh bench/scale-rstream.sh BUILD_DIR scale N | cost offpath|peer}
MODE=${2:?mode}
ARG=${3:?argument}
PER=${PER:-3000}
INFLIGHT=${INFLIGHT:-8}
SLEEP=${SLEEP:-0.002}
ENTRIES=${ENTRIES:-100000}
SRC=$(cd "$(dirname "$0")/.." && pwd)
case $BUILD in /*) ;; *) BUILD=$(pwd)/$BUILD ;; esac
DIR=$(mktemp -d "${TMPDIR:-/tmp}/offpath-bench-rstream.XXXXXX")
PIDS=""
cleanup() {
  for p in $PIDS; do kill -9 "$p" 2>/dev/null || true; done
  sh "$SRC/tests/fixtures/redis.sh" stop "$DIR" >/dev/null 2>&1
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sh "$SRC/tests/fixtures/redis.sh" start "$DIR" >/dev/null
. "$DIR/redis.env"
R() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

# fill N: N entries in stream s, pipelined, and the group made.
fill() {
  seq 1 "$1" | awk '{ printf "XADD s * data record-%d\r\n", $1 }' |
    R --pipe >/dev/null
  R XGROUP CREATE s offpath 0 >/dev/null
}

# done N: the group has read N entries and none is pending.
done_n() {
  R XINFO GROUPS s | awk -v n="$1" '
    prev == "pending" { p = $1 } prev == "entries-read" { r = $1 }
    { prev = $1 } END { exit !(p == 0 && r == n) }'
}

now() { date +%s.%N; }

# wait_done N: poll until done_n N (up to 300 s).
wait_done() {
  i=0
  until done_n "$1"; do
    i=$((i + 1))
    if [ $i -gt 15000 ]; then
      echo "scale-rstream: timed out" >&2
      exit 1
    fi
    sleep 0.02
  done
}

case $MODE in
scale)
  N=$ARG
  TOTAL=$((PER * N))
  fill "$TOTAL"
  cat > "$DIR/sleep.lua" <<EOF
function on_event(engine, rec) offpath.sleep($SLEEP) end
EOF
  T0=$(now)
  for i in $(seq 1 "$N"); do
    "$BUILD/offpath" run "$DIR/sleep.lua" --max-inflight "$INFLIGHT" \
      --input "redis-stream://127.0.0.1:$REDIS_PORT/s" 2>"$DIR/err.$i" &
    PIDS="$PIDS $!"
  done
  wait_done "$TOTAL"
  T1=$(now)
  for p in $PIDS; do kill -TERM "$p"; done
  for p in $PIDS; do wait "$p"; done
  PIDS=""
  awk -v n="$N" -v t="$TOTAL" -v a="$T0" -v b="$T1" 'BEGIN {
    printf "name=rstream-%d instances=%d entries=%d entries_per_s=%.0f wall_s=%.3f\n",
      n, n, t, t / (b - a), b - a }'
  ;;
cost)
  fill "$ENTRIES"
  if [ "$ARG" = peer ]; then
    "$BUILD/bench/peer-xread" --port "$REDIS_PORT" --stream s
    exit 0
  fi
  cat > "$DIR/noop.lua" <<'EOF'
function on_event(engine, rec) end
EOF
  T0=$(now)
  "$BUILD/offpath" run "$DIR/noop.lua" \
    --input "redis-stream://127.0.0.1:$REDIS_PORT/s" 2>"$DIR/err" &
  PID=$!
  PIDS=$PID
  wait_done "$ENTRIES"
  T1=$(now)
  # utime and stime (fields 14 and 15; the name in field 2 has no space).
  TICKS=$(awk '{ print $14 + $15 }' "/proc/$PID/stat")
  HZ=$(getconf CLK_TCK)
  kill -TERM "$PID"
  wait "$PID"
  PIDS=""
  awk -v e="$ENTRIES" -v t="$TICKS" -v hz="$HZ" -v a="$T0" -v b="$T1" 'BEGIN {
    printf "name=rstream-cost entries=%d us_cpu_per_entry=%.3f entries_per_s=%.0f wall_s=%.3f\n",
      e, t / hz * 1e6 / e, e / (b - a), b - a }'
  ;;
*)
  echo "usage: sh bench/scale-rstream.sh BUILD_DIR scale N | cost offpath|peer" >&2
  exit 2
  ;;
esac
