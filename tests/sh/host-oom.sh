#!/bin/bash
# SPDX-License-Identifier: MIT
# host-oom.sh - the record path under failing allocations: with
# OFFPATH_TEST_OOM set, a test build makes record n fail the n-th
# allocation of its dispatch (the JSON value or the line, the handler's
# coroutine, the handler itself). Each such record fails with "not enough
# memory" and is counted; the host never panics and serves every record.
# LABELS: host memory
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

case "${OFFPATH_SANITIZE:-}" in
'') echo "skip: a release build ignores OFFPATH_TEST_OOM"; finish ;;
esac

cat > "$T/h.lua" <<'EOF2'
seen = 0
function on_event(engine, rec)
  local t = { rec, tostring(rec) .. "!", { seen } }
  seen = seen + 1
  engine:count("records")
end
EOF2
N=80
for i in $(seq 1 $N); do
  echo "{\"n\": $i, \"name\": \"rec-$i\", \"tags\": [\"a\", \"b\", {\"x\": 1.5}]}"
done > "$T/in.json"
for i in $(seq 1 $N); do echo "line number $i"; done > "$T/in.txt"

for mode in json lines; do
  if [ $mode = json ]; then
    OFFPATH_TEST_OOM=1 "$OFFPATH" run "$T/h.lua" --format json < "$T/in.json" \
      > "$T/out" 2> "$T/err"
  else
    OFFPATH_TEST_OOM=1 "$OFFPATH" run "$T/h.lua" < "$T/in.txt" \
      > "$T/out" 2> "$T/err"
  fi
  rc=$?
  check "$mode: exit 0" test $rc = 0
  check "$mode: no panic" lacks "$T/err" "PANIC"
  check "$mode: every record counted" contains "$T/err" "records   in $N,"
  failed=$(sed -n 's/.*records   in [0-9]*, processed \([0-9]*\), failed \([0-9]*\).*/\2/p' "$T/err")
  processed=$(sed -n 's/.*records   in [0-9]*, processed \([0-9]*\), failed \([0-9]*\).*/\1/p' "$T/err")
  check "$mode: some records failed" test "${failed:-0}" -gt 0
  check "$mode: processed + failed = in" test $((processed + failed)) = $N
  # Every failure says so, in the one wording.
  grep "on_event failed" "$T/err" | grep -v "not enough memory" > "$T/other"
  check "$mode: each failure is out of memory" test ! -s "$T/other"
done

finish
