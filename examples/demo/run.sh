#!/bin/sh
# SPDX-License-Identifier: MIT
# run.sh - the offpath demo (`make run`): the same stream of 2000 events
# through the same handler, once with its 10 ms blocking lookup inline on
# the main thread and once offloaded to a worker pool, and the main
# thread's handler latency and the throughput of each side by side.
#
# usage: sh examples/demo/run.sh [path/to/offpath]
set -eu
OFFPATH=${1:-offpath}
DIR=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/offpath-demo.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

EVENTS=$DIR/events.jsonl
echo "offpath demo: $(wc -l < "$EVENTS" | tr -d ' ') events (examples/demo/events.jsonl);"
echo "one in ten needs a blocking lookup of ~10 ms (os.execute \"sleep 0.01\")."
echo

for mode in inline pool; do
  printf '  running %-6s ... ' "$mode"
  if ! OFFPATH_DEMO_MODE=$mode "$OFFPATH" run "$DIR/demo.lua" --format json \
      --input "$EVENTS" --pool io=16 > "$TMP/$mode.out" 2> "$TMP/$mode.err"; then
    echo "failed:"
    cat "$TMP/$mode.err" >&2
    exit 1
  fi
  echo done
done
echo

IFS='|' read -r _ n1 wall1 rate1 p50_1 p99_1 max1 look1 < "$TMP/inline.out"
IFS='|' read -r _ n2 wall2 rate2 p50_2 p99_2 max2 look2 < "$TMP/pool.out"
row() {
  printf '  %-24s %-22s %s\n' "$1" "$2" "$3"
}
row "" "lookup inline" "lookup via offpath.run"
row "" "(main thread)" "(pool io, 16 threads)"
row "records processed" "$n1" "$n2"
row "lookups" "$look1" "$look2"
row "wall time" "$wall1" "$wall2"
row "throughput" "$rate1" "$rate2"
row "main thread p50" "$p50_1" "$p50_2"
row "main thread p99" "$p99_1" "$p99_2"
row "main thread max" "$max1" "$max2"
echo
echo "Main-thread latency is the time one handler step holds the main thread:"
echo "while it is held, no other record, timer or socket is served. Inline, a"
echo "lookup holds it for its whole duration; offloaded, the handler suspends"
echo "and the main thread only starts the task and takes its result."
