#!/bin/sh
# net-http.sh - HTTP requests per second against a local nginx at CONC
# concurrent requests: offpath.http (bench/net-http.lua) versus wrk on the
# same endpoint. Starts nginx itself (tests/fixtures/nginx.sh) on free
# ports, runs the sides asked for, prints one line per side and stops it:
#   name=http-offpath conc=64 rps=12345 req_per_s=12345 errors=0
#   name=http-wrk conc=64 rps=23456 req_per_s=23456
#   name=http-wrk-1t conc=64 rps=23456 req_per_s=23456
#
# usage: sh bench/net-http.sh BUILD_DIR [offpath|wrk|all]
# Environment: CONC=64, DURATION=2 (seconds per side). Needs nginx, openssl
# and wrk (Debian packages nginx-light, openssl, wrk).
set -eu
BUILD=${1:?usage: sh bench/net-http.sh BUILD_DIR [offpath|wrk|all]}
SIDE=${2:-all}
CONC=${CONC:-64}
DURATION=${DURATION:-2}
SRC=$(cd "$(dirname "$0")/.." && pwd)
case $BUILD in /*) ;; *) BUILD=$(pwd)/$BUILD ;; esac
DIR=$(mktemp -d "${TMPDIR:-/tmp}/offpath-bench-http.XXXXXX")
trap 'sh "$SRC/tests/fixtures/nginx.sh" stop "$DIR" >/dev/null 2>&1; rm -rf "$DIR"' EXIT
trap 'exit 130' INT TERM

sh "$SRC/tests/fixtures/nginx.sh" start "$DIR"
. "$DIR/nginx.env"
URL=$NGINX_URL/

if [ "$SIDE" = offpath ] || [ "$SIDE" = all ]; then
  URL=$URL CONC=$CONC DURATION=$DURATION \
    "$BUILD/offpath" run "$SRC/bench/net-http.lua" --input /dev/null 2>/dev/null
fi
if [ "$SIDE" = wrk ] || [ "$SIDE" = all ]; then
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
fi
