#!/bin/sh
# SPDX-License-Identifier: MIT
# net-http.sh - HTTP requests per second against a local nginx at CONC
# concurrent requests: offpath.http (bench/net-http.lua) versus a plain C
# client on libcurl's multi-socket interface and libuv (bench/peer-curluv.c,
# curl's recipe as documented, and with offpath's idle kick) and wrk, on the
# same endpoint, all on CONC kept-alive connections. Starts nginx itself
# (tests/fixtures/nginx.sh) on free ports, runs the sides asked for, prints
# one line per side and run, and stops it:
#   name=http-offpath conc=64 rps=12345 req_per_s=12345 errors=0
#   name=http-curluv conc=64 rps=12345 req_per_s=12345 errors=0 wall_s=...
#   name=http-curluv-idle conc=64 rps=12345 req_per_s=12345 errors=0 ...
#   name=http-wrk conc=64 rps=23456 req_per_s=23456
#   name=http-wrk-1t conc=64 rps=23456 req_per_s=23456
#
# With `ratio`, the sides run in turn ROUNDS times (offpath, the two peers,
# wrk one thread, wrk, offpath, ...), so a machine whose speed drifts moves
# all of them alike, and the ratios are taken round by round; the last
# lines give each ratio's median and range over the rounds:
#   ratio=offpath/curluv median=0.93 min=0.88 max=0.99 rounds=5
#
# usage: sh bench/net-http.sh BUILD_DIR [offpath|curluv|wrk|all|ratio]
# Environment: CONC=64, DURATION=2 (seconds per side), ROUNDS=5 (ratio).
# Needs nginx, openssl and wrk (Debian packages nginx-light, openssl, wrk).
set -eu
BUILD=${1:?usage: sh bench/net-http.sh BUILD_DIR [offpath|curluv|wrk|all|ratio]}
SIDE=${2:-all}
CONC=${CONC:-64}
DURATION=${DURATION:-2}
ROUNDS=${ROUNDS:-5}
SRC=$(cd "$(dirname "$0")/.." && pwd)
case $BUILD in /*) ;; *) BUILD=$(pwd)/$BUILD ;; esac
DIR=$(mktemp -d "${TMPDIR:-/tmp}/offpath-bench-http.XXXXXX")
trap 'sh "$SRC/tests/fixtures/nginx.sh" stop "$DIR" >/dev/null 2>&1; rm -rf "$DIR"' EXIT
trap 'exit 130' INT TERM

sh "$SRC/tests/fixtures/nginx.sh" start "$DIR"
. "$DIR/nginx.env"
URL=$NGINX_URL/

run_offpath() {
  URL=$URL CONC=$CONC DURATION=$DURATION \
    "$BUILD/offpath" run "$SRC/bench/net-http.lua" --input /dev/null 2>/dev/null
}
run_curluv() {
  "$BUILD/bench/peer-curluv" "$URL" --conc "$CONC" --duration "$DURATION"
  "$BUILD/bench/peer-curluv" "$URL" --conc "$CONC" --duration "$DURATION" \
    --kick idle
}
run_wrk() {
  # wrk spreads CONC connections over its threads: one per core (http-wrk),
  # and one thread as offpath's one loop thread (http-wrk-1t).
  threads=$(nproc)
  [ "$threads" -le "$CONC" ] || threads=$CONC
  wrk -t "$threads" -c "$CONC" -d "${DURATION}s" "$URL" |
    awk -v c="$CONC" '/^Requests\/sec:/ {
      printf "name=http-wrk conc=%d rps=%.0f req_per_s=%.0f\n", c, $2, $2 }'
  wrk -t 1 -c "$CONC" -d "${DURATION}s" "$URL" |
    awk -v c="$CONC" '/^Requests\/sec:/ {
      printf "name=http-wrk-1t conc=%d rps=%.0f req_per_s=%.0f\n", c, $2, $2 }'
}

case $SIDE in
offpath) run_offpath ;;
curluv) run_curluv ;;
wrk) run_wrk ;;
all)
  run_offpath
  run_curluv
  run_wrk
  ;;
ratio)
  out=$DIR/ratio.txt
  i=0
  while [ $i -lt "$ROUNDS" ]; do
    { run_offpath; run_curluv; run_wrk; } | tee -a "$out"
    i=$((i + 1))
  done
  awk '
    { split($1, a, "="); n = a[2]; split($3, b, "="); v = b[2] }
    n == "http-offpath" { r++ }
    { val[r, n] = v }
    END {
      split("http-curluv http-curluv-idle http-wrk-1t http-wrk", peers, " ")
      for (p = 1; p <= 4; p++) {
        k = 0
        for (i = 1; i <= r; i++)
          if (val[i, peers[p]] > 0) x[++k] = val[i, "http-offpath"] / val[i, peers[p]]
        for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++)
          if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
        name = peers[p]; sub(/^http-/, "", name)
        med = (k % 2) ? x[(k + 1) / 2] : (x[k / 2] + x[k / 2 + 1]) / 2
        printf "ratio=offpath/%s median=%.2f min=%.2f max=%.2f rounds=%d\n",
          name, med, x[1], x[k], k
      }
    }' "$out"
  ;;
*)
  echo "usage: sh bench/net-http.sh BUILD_DIR [offpath|curluv|wrk|all|ratio]" >&2
  exit 2
  ;;
esac
