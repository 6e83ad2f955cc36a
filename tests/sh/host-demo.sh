#!/bin/sh
# SPDX-License-Identifier: MIT
# host-demo.sh - the `make run` demo runs on its built-in data and prints
# both columns: every event processed both ways, and the inline lookup
# holding the main thread for milliseconds.
# LABELS: host examples
. "$(dirname "$0")/_host.sh"

sh "$SRC/examples/demo/run.sh" "$OFFPATH" > "$T/out" 2> "$T/err"
check "the demo exits 0" test $? = 0
check "the table header" contains "$T/out" "lookup inline          lookup via offpath.run"
check "both sides processed every event" grep -qE '^  records processed +2000 +2000$' "$T/out"
check "both sides did 200 lookups" grep -qE '^  lookups +200 +200$' "$T/out"
check "inline holds the main thread for milliseconds" grep -qE '^  main thread p99 +[0-9.]+ ms ' "$T/out"
check "latency rows for both" test "$(grep -c '^  main thread ' "$T/out")" = 3
finish
