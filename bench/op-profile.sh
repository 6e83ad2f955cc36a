#!/bin/sh
# SPDX-License-Identifier: MIT
# op-profile.sh - instructions per task of offpath's hot paths, with
# callgrind: the same benchmark at two sizes, and the difference per task of
# every function's cost, so start-up and shut-down cancel out.
#
# usage: sh bench/op-profile.sh BUILD lua [N1 N2]   Lua round trip
#        sh bench/op-profile.sh BUILD c   [N1 N2]   C API round trip
#        sh bench/op-profile.sh BUILD stream        records through on_event
#
# lua runs BUILD/offpath (which has Lua built in, so Lua's internals have
# names, where the build found Lua's static archive) on
# bench/op-roundtrip.lua; the
# OP_* variables of that script pass through (OP_API, OP_MODE, OP_WORKERS,
# OP_ARG, OP_FN). c runs BUILD/bench/op-capi. stream runs bench/op-stream.lua
# on 20000 and 60000 records. Defaults: N1=10000 N2=30000 tasks.
#
# Prints the total instructions per task, then the top OP_TOP (40) functions by self
# cost per task and by inclusive cost per task. Callgrind serialises the
# threads, so these are instruction counts, not times; wake-ups and lock
# contention do not show here (use perf for those, see docs/benchmarks.md).
# Output files stay in BUILD/profile/.
set -eu

if [ $# -lt 2 ]; then
  echo "usage: sh bench/op-profile.sh BUILD lua|c|stream [N1 N2]" >&2
  exit 2
fi
BUILD=$1
WHAT=$2
N1=${3:-10000}
N2=${4:-30000}
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=$BUILD/profile
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "op-profile: valgrind is not installed" >&2; exit 1; }

run() { # n outfile
  case $WHAT in
  lua)
    OP_TASKS=$1 valgrind --tool=callgrind --callgrind-out-file="$2" \
      "$BUILD/offpath" run "$SRC/bench/op-roundtrip.lua" \
      --input /dev/null >"$2.log" 2>&1 ;;
  c)
    valgrind --tool=callgrind --callgrind-out-file="$2" \
      "$BUILD/bench/op-capi" --workers "${OP_WORKERS:-1}" \
      --mode "${OP_MODE:-pipelined}" --tasks "$1" >"$2.log" 2>&1 ;;
  stream)
    test -s "$OUT/stream-$1.txt" ||
      lua5.4 "$SRC/bench/peer-lines.lua" --make "$1" --file "$OUT/stream-$1.txt"
    valgrind --tool=callgrind --callgrind-out-file="$2" \
      "$BUILD/offpath" run "$SRC/bench/op-stream.lua" \
      --input "$OUT/stream-$1.txt" >"$2.log" 2>&1 ;;
  *)
    echo "op-profile: lua, c or stream, not $WHAT" >&2; exit 2 ;;
  esac
  grep '^name=' "$2.log" >&2 || { tail -n 20 "$2.log" >&2; exit 1; }
}

if [ "$WHAT" = stream ]; then N1=20000; N2=60000; fi
tag=$WHAT-${OP_API:-wait}-${OP_MODE:-pipelined}-${OP_WORKERS:-1}w-${OP_ARG:-none}-${OP_FN:-small}
run "$N1" "$OUT/cg-$tag-$N1.out"
run "$N2" "$OUT/cg-$tag-$N2.out"

# Per function: (cost at N2 - cost at N1) / (N2 - N1).
per_task() { # inclusive(yes|no)
  for n in "$N1" "$N2"; do
    callgrind_annotate --threshold=100 --inclusive="$1" "$OUT/cg-$tag-$n.out" |
      awk -v n="$n" '
        /^ *[0-9,]+ +\([ 0-9.]+%\) +[^ ]/ || /^ *[0-9,]+ +[^ (]/ {
          v = $1; gsub(/,/, "", v)
          name = $0; sub(/^ *[0-9,]+ +(\([ 0-9.]+%\) +)?/, "", name)
          sub(/ \[[^]]*\]$/, "", name); sub(/^.*:/, "", name)
          print n "\t" v "\t" name
        }'
  done | awk -F'\t' -v n1="$N1" -v n2="$N2" '
    { c[$3, $1] += $2; names[$3] = 1 }
    END {
      for (k in names) {
        d = (c[k, n2] - c[k, n1]) / (n2 - n1)
        if (d >= 1) printf "%9.0f  %s\n", d, k
      }
    }' | sort -rn | head -n "${OP_TOP:-40}"
}

echo "== $tag: instructions per task, self cost (N=$N1 and $N2) =="
per_task no
echo "== $tag: inclusive cost per task =="
per_task yes
