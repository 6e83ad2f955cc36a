#!/bin/sh
# SPDX-License-Identifier: MIT
# net-pg.sh - PostgreSQL simple queries per second at CONC concurrent
# queries: offpath.pg (bench/net-pg.lua: CONC coroutines on a pool of CONC
# connections, one loop thread) versus pgbench -S (the built-in select-only
# script: one SELECT of one row of pgbench_accounts by primary key) with
# CONC clients on one thread (-j 1, like offpath's one loop thread). Both
# sides send the same query two ways: with the value in the SQL text (the
# simple query protocol: pgbench -M simple, db:query with no parameters)
# and as a $1 parameter (the extended protocol: pgbench -M extended,
# db:query with one parameter). Starts its own server
# (tests/fixtures/postgres.sh) on a free port, prints one line per side and
# mode, and stops the server (queries_per_s repeats qps for bench/run.sh,
# which reads keys ending in _per_s as higher-is-better):
#   name=pg-offpath conc=8 qps=12345 queries_per_s=12345 errors=0
#   name=pg-offpath-params conc=8 qps=12345 queries_per_s=12345 errors=0
#   name=pg-pgbench conc=8 qps=23456 queries_per_s=23456
#   name=pg-pgbench-params conc=8 qps=23456 queries_per_s=23456
#
# usage: sh bench/net-pg.sh BUILD_DIR [offpath|pgbench|all]
# Environment: CONC=8 (a list such as "1 8 32" runs each), DURATION=3
# (seconds per run), SCALE=1 (pgbench -i scale: 100000 rows per unit).
# Needs postgresql (initdb, pg_ctl, psql, pgbench).
set -eu
BUILD=${1:?usage: sh bench/net-pg.sh BUILD_DIR [offpath|pgbench|all]}
SIDE=${2:-all}
CONC=${CONC:-8}
DURATION=${DURATION:-3}
SCALE=${SCALE:-1}
SRC=$(cd "$(dirname "$0")/.." && pwd)
case $BUILD in /*) ;; *) BUILD=$(pwd)/$BUILD ;; esac
DIR=$(mktemp -d "${TMPDIR:-/tmp}/offpath-bench-pg.XXXXXX")
trap 'sh "$SRC/tests/fixtures/postgres.sh" stop "$DIR" >/dev/null 2>&1; rm -rf "$DIR"' EXIT
trap 'exit 130' INT TERM

sh "$SRC/tests/fixtures/postgres.sh" start "$DIR"
. "$DIR/postgres.env"
PGBENCH=$PG_BIN/pgbench
[ -x "$PGBENCH" ] || PGBENCH=pgbench
"$PGBENCH" -i -q -s "$SCALE" -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" \
  "$PG_DB" >/dev/null 2>&1
ROWS=$((SCALE * 100000))

for c in $CONC; do
  if [ "$SIDE" = offpath ] || [ "$SIDE" = all ]; then
    for mode in simple params; do
      PG_CONNINFO=$PG_CONNINFO CONC=$c DURATION=$DURATION ROWS=$ROWS \
        MODE=$mode "$BUILD/offpath" run "$SRC/bench/net-pg.lua" \
        --input /dev/null 2>/dev/null
    done
  fi
  if [ "$SIDE" = pgbench ] || [ "$SIDE" = all ]; then
    for mode in simple extended; do
      name=pg-pgbench
      [ $mode = extended ] && name=pg-pgbench-params
      "$PGBENCH" -S -n -M $mode -c "$c" -j 1 -T "$DURATION" \
        -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" "$PG_DB" 2>/dev/null |
        awk -v n=$name -v c="$c" '/^tps = / {
          printf "name=%s conc=%d qps=%.0f queries_per_s=%.0f\n", n, c, $3, $3
          exit }'
    done
  fi
done
