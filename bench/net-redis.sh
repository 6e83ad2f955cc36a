#!/bin/sh
# SPDX-License-Identifier: MIT
# net-redis.sh - Redis commands per second at CONC concurrent commands:
# offpath.redis (bench/net-redis.lua: CONC coroutines on one client, whose
# shared connection pipelines their commands) versus redis-benchmark doing
# GET with CONC in flight two ways: CONC connections of one command each
# (redis-benchmark's default), and one connection pipelining CONC commands
# (-P CONC, the traffic offpath makes). Starts redis-server itself
# (tests/fixtures/redis.sh) on a free port, runs the sides asked for, prints
# one line per side and stops it:
#   name=redis-offpath conc=64 rps=12345 cmd_per_s=12345 errors=0
#   name=redis-benchmark conc=64 rps=23456 cmd_per_s=23456
#   name=redis-benchmark-pipe conc=64 rps=34567 cmd_per_s=34567
#
# usage: sh bench/net-redis.sh BUILD_DIR [offpath|redis-benchmark|all]
# Environment: CONC=64, DURATION=2 (seconds, offpath side), REQUESTS=200000
# (redis-benchmark side). Needs redis-server (which brings redis-benchmark).
set -eu
BUILD=${1:?usage: sh bench/net-redis.sh BUILD_DIR [offpath|redis-benchmark|all]}
SIDE=${2:-all}
CONC=${CONC:-64}
DURATION=${DURATION:-2}
REQUESTS=${REQUESTS:-200000}
SRC=$(cd "$(dirname "$0")/.." && pwd)
case $BUILD in /*) ;; *) BUILD=$(pwd)/$BUILD ;; esac
DIR=$(mktemp -d "${TMPDIR:-/tmp}/offpath-bench-redis.XXXXXX")
trap 'sh "$SRC/tests/fixtures/redis.sh" stop "$DIR" >/dev/null 2>&1; rm -rf "$DIR"' EXIT
trap 'exit 130' INT TERM

sh "$SRC/tests/fixtures/redis.sh" start "$DIR"
. "$DIR/redis.env"

if [ "$SIDE" = offpath ] || [ "$SIDE" = all ]; then
  REDIS_ADDR=$REDIS_ADDR CONC=$CONC DURATION=$DURATION \
    "$BUILD/offpath" run "$SRC/bench/net-redis.lua" --input /dev/null 2>/dev/null
fi
if [ "$SIDE" = redis-benchmark ] || [ "$SIDE" = all ]; then
  redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CONC" -n "$REQUESTS" \
    -t get --csv 2>/dev/null |
    awk -F, -v c="$CONC" '$1 == "\"GET\"" { gsub(/"/, "", $2);
      printf "name=redis-benchmark conc=%d rps=%.0f cmd_per_s=%.0f\n", c, $2, $2 }'
  redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 1 -P "$CONC" \
    -n $((REQUESTS * 4)) -t get --csv 2>/dev/null |
    awk -F, -v c="$CONC" '$1 == "\"GET\"" { gsub(/"/, "", $2);
      printf "name=redis-benchmark-pipe conc=%d rps=%.0f cmd_per_s=%.0f\n", c, $2, $2 }'
fi
