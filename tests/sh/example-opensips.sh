# SPDX-License-Identifier: MIT
# example-opensips.sh - the OpenSIPS credit check (examples/opensips/)
# run by the offpath host against the test server (tests/fixtures/
# postgres.sh): decisions from the credit table, push notifications
# launched through offpath.exec and counted by their report callback, and a
# database that hangs (a table lock) costing each call the timeout, not a
# hang, with the queries cancelled on the server.
# LABELS: examples postgres
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
EX=$SRC/examples/opensips
. "${OFFPATH_FIXTURES:?}/postgres.env"
psql() { PGOPTIONS="-c client_min_messages=warning" "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 "$PG_CONNINFO" "$@"; }

# Each run gets its own table: the server is shared by the other tests.
TABLE=credit_$$
psql -c "DROP TABLE IF EXISTS $TABLE" 2>/dev/null
psql -c "CREATE TABLE $TABLE (user_id text PRIMARY KEY,
                              balance numeric(12, 2) NOT NULL,
                              push_token text);
         INSERT INTO $TABLE VALUES ('alice', 25.00, 'tok-a'),
                                   ('bob', 0.50, 'tok-b'),
                                   ('carol', 0.00, 'tok-c'),
                                   ('dave', -3.00, NULL)"
# The example names its table "credit"; point it at ours with a view in a
# schema of our own, first on the search_path.
SCHEMA=opensips_$$
psql -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA;
         CREATE VIEW $SCHEMA.credit AS SELECT * FROM public.$TABLE"
export OFFPATH_PG="$PG_CONNINFO options='-c search_path=$SCHEMA,public'"
export CREDIT_PUSH_LOG=$T/push.log

cat > "$T/calls.txt" <<EOF
c1 alice
c2 bob
c3 carol
c4 dave
c5 eve
c6
EOF

# ---- decisions and notifications ----
"$OFFPATH" run "$EX/credit.lua" --input "$T/calls.txt" \
  > "$T/out.txt" 2> "$T/err.txt"
check "credit: exit status 0" [ $? -eq 0 ]
check "credit: alice allowed with her balance" contains "$T/out.txt" "c1 alice allow 25.00"
check "credit: bob allowed, low" contains "$T/out.txt" "c2 bob allow 0.50"
check "credit: carol denied, no credit" contains "$T/out.txt" "c3 carol deny no_credit"
check "credit: dave denied, no credit" contains "$T/out.txt" "c4 dave deny no_credit"
check "credit: eve unknown" contains "$T/out.txt" "c5 eve deny unknown_user"
check "credit: a record without a user" contains "$T/out.txt" "c6 - deny bad_record"
check "credit: one line per call, and the summary" [ "$(lines "$T/out.txt")" -eq 7 ]
# bob (low) and carol (used up) are notified; dave has no device token, so
# his notification fails, and the report callback counts it.
check "credit: summary" contains "$T/out.txt" \
  "summary allow=2 deny=4 timeout=0 db_error=0 push_ok=2 push_failed=1"
check "credit: push to bob" contains "$T/push.log" "bob tok-b Low credit: 0.50 left."
check "credit: push to carol" contains "$T/push.log" "carol tok-c Your credit is used up."
check "credit: two pushes sent" [ "$(lines "$T/push.log")" -eq 2 ]
check "credit: the failed push is reported" contains "$T/err.txt" \
  "push to dave failed: exit 2 no device token for dave"
check "credit: host counters" contains "$T/err.txt" "push_failed=1"

# ---- a database that hangs ----
# Another session holds an exclusive lock on the table: every lookup waits
# for it. Each call must end after the timeout, denied, and the waiting
# queries must be cancelled on the server, not left queued behind the lock.
psql -c "BEGIN; LOCK TABLE $TABLE IN ACCESS EXCLUSIVE MODE;
         SELECT pg_sleep(30); COMMIT" > /dev/null 2>&1 &
LOCKER=$!
PIDS="$PIDS $LOCKER"
locked() {
  [ "$(psql -c "SELECT count(*) FROM pg_locks l JOIN pg_class c
                ON c.oid = l.relation WHERE c.relname = '$TABLE'
                AND l.mode = 'AccessExclusiveLock' AND l.granted")" = 1 ]
}
check "hang: the table is locked" wait_for 10 locked
rm -f "$CREDIT_PUSH_LOG"
start=$(date +%s%N)
CREDIT_TIMEOUT=0.3 "$OFFPATH" run "$EX/credit.lua" --input "$T/calls.txt" \
  > "$T/out2.txt" 2> "$T/err2.txt"
rc=$?
took=$(( ($(date +%s%N) - start) / 1000000 ))
check "hang: exit status 0" [ $rc -eq 0 ]
check "hang: every call denied on the timeout" [ "$(grep -c ' deny timeout$' "$T/out2.txt")" -eq 5 ]
check "hang: summary" contains "$T/out2.txt" \
  "summary allow=0 deny=6 timeout=5 db_error=0 push_ok=0 push_failed=0"
# 5 lookups on a pool of 4 all start at once and end after 0.3 s.
check "hang: no call waited for the lock (took ${took} ms)" [ "$took" -lt 3000 ]
waiting() {
  psql -c "SELECT count(*) FROM pg_stat_activity
           WHERE query LIKE 'SELECT balance, push_token FROM credit%'
           AND state = 'active'"
}
check "hang: the queries were cancelled on the server" wait_for 5 [ "$(waiting)" = 0 ]
psql -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
         WHERE query LIKE '%LOCK TABLE $TABLE%' AND pid <> pg_backend_pid()" > /dev/null
wait "$LOCKER" 2>/dev/null

# ---- a database that is down ----
OFFPATH_PG="host=127.0.0.1 port=1 dbname=x user=x" "$OFFPATH" run \
  "$EX/credit.lua" --input "$T/calls.txt" > "$T/out3.txt" 2> "$T/err3.txt"
check "down: every call denied" [ "$(grep -c ' deny db_error$' "$T/out3.txt")" -eq 5 ]
check "down: the reason is reported once per call" contains "$T/out3.txt" \
  "summary allow=0 deny=6 timeout=0 db_error=5"

psql -c "DROP SCHEMA $SCHEMA CASCADE; DROP TABLE $TABLE" 2>/dev/null
finish
