#!/bin/sh
# SPDX-License-Identifier: MIT
# run.sh - run the benchmark suite (bench/suite.txt) in interleaved rounds
# and write medians, spreads and ratios into docs/benchmarks.md, between the
# markers <!-- bench:begin --> and <!-- bench:end -->; text around them stays.
#
# usage: sh bench/run.sh BUILD_DIR
#
# Every round runs every configuration once, in suite order (A B C A B C
# ...), so slow drift of the machine hits all of them alike. POSIX sh + awk.
#
# Environment:
#   BENCH_ROUNDS=5     rounds (the median over rounds is reported)
#   BENCH_QUICK=1      one round: a smoke run
#   BENCH_ONLY=RE      only configurations whose group or name matches the
#                      awk regular expression RE (setup rows always run)
#   BENCH_TIMEOUT=120  seconds allowed per run
#   BENCH_SUITE=FILE   suite file (default bench/suite.txt)
#   BENCH_DOC=FILE     document to update (default docs/benchmarks.md)
set -eu

if [ $# -ne 1 ]; then
  echo "usage: sh bench/run.sh BUILD_DIR" >&2
  exit 2
fi
BUILD=$1
SRC=.
cd "$(dirname "$0")/.."
if [ ! -d "$BUILD" ]; then
  echo "bench: no build directory $BUILD (run from the source root, or give an absolute path)" >&2
  exit 2
fi

ROUNDS=${BENCH_ROUNDS:-5}
[ "${BENCH_QUICK:-0}" = 1 ] && ROUNDS=1
ONLY=${BENCH_ONLY:-}
TIMEOUT=${BENCH_TIMEOUT:-120}
SUITE=${BENCH_SUITE:-bench/suite.txt}
DOC=${BENCH_DOC:-docs/benchmarks.md}
case $ROUNDS in
'' | *[!0-9]* | 0) echo "bench: BENCH_ROUNDS must be a positive integer" >&2; exit 2 ;;
esac

TMP=$(mktemp -d "${TMPDIR:-/tmp}/offpath-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

# ---- parse the suite ----
# Writes $TMP/setup (one command a line), $TMP/configs (name, group, metric,
# command; tab-separated) and $TMP/ratios (label, a, b, target), with $BUILD
# and $SRC substituted.
awk -F'|' -v build="$BUILD" -v src="$SRC" -v only="$ONLY" \
    -v dir="$TMP" '
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function subst(s,   b, r) {
  b = build; gsub(/\\/, "\\\\", b); gsub(/&/, "\\\\&", b)
  r = src; gsub(/\\/, "\\\\", r); gsub(/&/, "\\\\&", r)
  gsub(/\$BUILD/, b, s); gsub(/\$SRC/, r, s); return s
}
function fail(msg) { printf "bench: %s:%d: %s\n", FILENAME, FNR, msg | "cat 1>&2"; bad = 1 }
/^[ \t]*(#|$)/ { next }
{
  kind = trim($1)
  if (kind == "setup") {
    cmd = $0; sub(/^[^|]*\|/, "", cmd)
    print subst(trim(cmd)) > (dir "/setup")
  } else if (kind == "ratio") {
    if (NF != 5) { fail("a ratio row has 5 fields"); next }
    printf "%s\t%s\t%s\t%s\n", trim($2), trim($3), trim($4), trim($5) > (dir "/ratios")
  } else {
    if (NF < 4) { fail("a configuration row has 4 fields"); next }
    name = trim($2); metric = trim($3)
    cmd = $0; sub(/^[^|]*\|[^|]*\|[^|]*\|/, "", cmd)   # the command may hold |
    if (name in seen) { fail("duplicate name " name); next }
    seen[name] = 1
    if (name !~ /^[A-Za-z0-9_.-]+$/) { fail("bad name " name); next }
    if (only != "" && kind !~ only && name !~ only) next
    printf "%s\t%s\t%s\t%s\n", name, kind, metric, subst(trim(cmd)) > (dir "/configs")
  }
}
END { exit bad }' "$SUITE"
touch "$TMP/setup" "$TMP/configs" "$TMP/ratios"
nconf=$(wc -l <"$TMP/configs" | tr -d ' ')
if [ "$nconf" -eq 0 ]; then
  echo "bench: no configurations to run" >&2
  exit 1
fi

if command -v timeout >/dev/null 2>&1; then
  TO="timeout $TIMEOUT"
else
  TO=""
fi

# ---- run ----
start=$(date +%s)
load0=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
while IFS= read -r cmd; do
  echo "bench: setup: $cmd" >&2
  if ! sh -c "$cmd" </dev/null >"$TMP/out" 2>&1; then
    echo "bench: setup failed:" >&2
    tail -n 5 "$TMP/out" >&2
  fi
done <"$TMP/setup"

# results: name, round, status (ok|fail), the program's output line.
: >"$TMP/results"
tab=$(printf '\t')
r=1
while [ "$r" -le "$ROUNDS" ]; do
  while IFS="$tab" read -r name group metric cmd; do
    status=ok
    # shellcheck disable=SC2086
    if $TO sh -c "$cmd" </dev/null >"$TMP/out" 2>"$TMP/err"; then
      line=$(grep -E "(^|[[:space:]])$metric=" "$TMP/out" | tail -n 1 || true)
      [ -n "$line" ] || { status=fail; line="no $metric= in the output"; }
    else
      rc=$?
      status=fail
      line="exit status $rc"
      [ "$rc" -eq 124 ] && line="timed out after $TIMEOUT s"
    fi
    if [ "$status" = ok ]; then
      value=$(printf '%s\n' "$line" | tr ' ' '\n' | sed -n "s/^$metric=//p" | tail -n 1)
      echo "bench: [$r/$ROUNDS] $name: $metric=$value" >&2
    else
      echo "bench: [$r/$ROUNDS] $name: FAILED ($line): $cmd" >&2
      tail -n 5 "$TMP/err" | sed 's/^/bench:     /' >&2
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$r" "$status" "$line" >>"$TMP/results"
  done <"$TMP/configs"
  r=$((r + 1))
done
elapsed=$(($(date +%s) - start))
load1=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
cp "$TMP/results" "$BUILD/bench-results.tsv"

# ---- describe the machine ----
cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo "?")
model=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)
btype=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD/CMakeCache.txt" 2>/dev/null || true)
cc=$(sed -n 's/^CMAKE_C_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt" 2>/dev/null || true)
ccver=$(${cc:-cc} --version 2>/dev/null | head -n 1 || true)
luaver=$(lua5.4 -v 2>&1 | awk 'NR == 1 { print $1, $2 }' || true)
uvver=$(pkg-config --modversion libuv 2>/dev/null || echo "?")
luvver=$(lua5.4 -e 'print(require("luv").version_string())' 2>/dev/null || echo "not installed")
{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine=$(uname -srm), $cpus CPUs${model:+, $model}"
  echo "build=$BUILD (${btype:-unknown build type}), ${ccver:-unknown compiler}"
  echo "versions=$luaver; libuv $uvver; luv $luvver"
  echo "rounds=$ROUNDS"
  echo "elapsed=$elapsed"
  echo "load=$load0 before, $load1 after"
} >"$TMP/meta"

# ---- report ----
awk -F'\t' -v tmp="$TMP" '
function higher(metric) { return metric ~ /_per_s$/ }
function fmt(v) {
  if (v == "") return "n/a"
  if (v < 0) return "-" fmt(-v)
  if (v >= 1000000) return sprintf("%.3g M", v / 1000000)
  if (v >= 100) return sprintf("%.0f", v)
  if (v >= 10) return sprintf("%.1f", v)
  return sprintf("%.2f", v)
}
function median(name, key,   n, i, j, t, a) {
  n = 0
  for (i = 1; i <= nres[name]; i++)
    if ((name SUBSEP i SUBSEP key) in val) a[++n] = val[name, i, key] + 0
  if (n == 0) { lo = hi = ""; return "" }
  for (i = 2; i <= n; i++) {               # insertion sort: n is small
    t = a[i]
    for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
    a[j + 1] = t
  }
  lo = a[1]; hi = a[n]
  return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function target_value(t,   p) {
  if (t == "" || t == "-") return ""
  if (split(t, p, "/") == 2 && p[2] + 0 != 0) return (p[1] + 0) / (p[2] + 0)
  return t + 0
}
FILENAME == tmp "/meta" { i = index($0, "="); meta[substr($0, 1, i - 1)] = substr($0, i + 1); next }
FILENAME == tmp "/configs" {
  n = ++nconf; cname[n] = $1; cgroup[n] = $2; cmetric[$1] = $3; ccmd[n] = $4
  if (!($2 in gseen)) { gseen[$2] = 1; gorder[++ngroups] = $2 }
  next
}
FILENAME == tmp "/ratios" { n = ++nratio; rlabel[n] = $1; ra[n] = $2; rb[n] = $3; rt[n] = $4; next }
FILENAME == tmp "/results" {
  name = $1; nres[name]++
  if ($3 != "ok") { nfail[name]++; next }
  nf = split($4, kv, " ")
  for (k = 1; k <= nf; k++) {
    e = index(kv[k], "=")
    if (e > 1) val[name, nres[name], substr(kv[k], 1, e - 1)] = substr(kv[k], e + 1)
  }
  next
}
END {
  print "<!-- bench:begin -->"
  print "<!-- Generated by bench/run.sh from bench/suite.txt; edits between the bench markers are overwritten. -->"
  print ""
  print "## Results"
  print ""
  printf "- Date: %s; the suite took %d s.\n", meta["date"], meta["elapsed"]
  printf "- Machine: %s; load average %s (other work on the machine skews results).\n", meta["machine"], meta["load"]
  printf "- Build: %s.\n", meta["build"]
  printf "- Versions: %s.\n", meta["versions"]
  printf "- Method: %d round(s); each round runs every configuration once, in the order below. Each cell is the median over rounds, with min..max. `ns_per_trip` is wall time / tasks with up to 1024 in flight (inverse throughput); `us_per_trip` is the mean round trip with one task in flight. CPU %% is process CPU time (user + sys, from getrusage) over wall time: 100 %% is one core busy.\n", meta["rounds"]
  for (g = 1; g <= ngroups; g++) {
    print ""
    printf "### %s\n\n", gorder[g]
    print "| configuration | metric | median | min..max | CPU % |"
    print "|---|---|---:|---:|---:|"
    for (c = 1; c <= nconf; c++) {
      if (cgroup[c] != gorder[g]) continue
      name = cname[c]; metric = cmetric[name]
      m = median(name, metric); mlo = lo; mhi = hi
      cpu = median(name, "cpu_pct")
      med[name] = m
      note = nfail[name] ? sprintf(" (%d of %d runs failed)", nfail[name], nres[name]) : ""
      printf "| `%s`%s | %s%s | %s | %s..%s | %s |\n", name, note, metric, higher(metric) ? " (higher is better)" : "", \
        fmt(m), fmt(mlo), fmt(mhi), cpu == "" ? "" : fmt(cpu)
    }
  }
  if (nratio > 0) {
    print ""
    print "### Ratios"
    print ""
    print "How many times better A does than B, from the medians: B / A for times, A / B for rates. A target is met when the ratio reaches it."
    print ""
    print "| ratio | A | B | A / B medians | ratio | target | met |"
    print "|---|---|---|---|---:|---:|---|"
    for (i = 1; i <= nratio; i++) {
      a = ra[i]; b = rb[i]; x = ""
      if ((a in med) && (b in med) && med[a] != "" && med[b] != "" && med[a] + 0 > 0 && med[b] + 0 > 0 && \
          higher(cmetric[a]) == higher(cmetric[b]))
        x = higher(cmetric[a]) ? med[a] / med[b] : med[b] / med[a]
      t = target_value(rt[i])
      met = t == "" ? "" : (x == "" ? "n/a" : (x >= t ? "yes" : "**no**"))
      printf "| %s | `%s` | `%s` | %s / %s | %s | %s | %s |\n", rlabel[i], a, b, \
        (a in med) ? fmt(med[a]) : "n/a", (b in med) ? fmt(med[b]) : "n/a", \
        x == "" ? "n/a" : sprintf("%.2f×", x), t == "" ? "" : sprintf("≥ %.2f", t), met
    }
  }
  print ""
  print "### Commands"
  print ""
  print "Run from the source root; `make bench` runs `sh bench/run.sh build/release`."
  print ""
  for (c = 1; c <= nconf; c++) printf "- `%s`: `%s`\n", cname[c], ccmd[c]
  print ""
  print "<!-- bench:end -->"
}' "$TMP/meta" "$TMP/configs" "$TMP/ratios" "$TMP/results" >"$TMP/section.md"

# ---- splice into the document ----
mkdir -p "$(dirname "$DOC")"
if [ -f "$DOC" ] && grep -q '^<!-- bench:begin -->' "$DOC" && grep -q '^<!-- bench:end -->' "$DOC"; then
  awk -v sec="$TMP/section.md" '
    /^<!-- bench:begin -->/ { while ((getline l < sec) > 0) print l; skip = 1; next }
    /^<!-- bench:end -->/ { skip = 0; next }
    !skip' "$DOC" >"$TMP/doc"
elif [ -f "$DOC" ]; then
  { cat "$DOC"; echo; cat "$TMP/section.md"; } >"$TMP/doc"
else
  {
    echo "# Benchmarks"
    echo
    echo "offpath against its peers: a plain C pool (bench/peer-cpool.c), libuv's"
    echo "\`uv_queue_work\` (bench/peer-uvwork.c) and luv's \`uv.new_work\`"
    echo "(bench/peer-luv.lua). \`make bench\` regenerates the section between the"
    echo "bench markers; analysis written outside them is kept."
    echo
    cat "$TMP/section.md"
  } >"$TMP/doc"
fi
cp "$TMP/doc" "$DOC"

# ---- console summary ----
echo "bench: $nconf configuration(s), $ROUNDS round(s), ${elapsed} s; wrote $DOC" >&2
awk '/^### Commands/ { exit } /^### / || (/^\| / && !/^\| (configuration|ratio) \|/)' \
  "$TMP/section.md" >&2
if grep -q "$tab"fail"$tab" "$TMP/results"; then
  echo "bench: some runs failed (see above and $BUILD/bench-results.tsv)" >&2
fi
exit 0
