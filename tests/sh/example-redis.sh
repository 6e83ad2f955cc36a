# SPDX-License-Identifier: MIT
# example-redis.sh - the Redis examples (examples/redis/) run by the
# offpath host against the test server (tests/fixtures/redis.sh): counting
# hashes with SCAN in atomic batches while events are served, the same
# count with offpath.block over a keyspace on the main thread, the
# cache-first lookup, and the BLPOP loop that waits for an expected value.
# LABELS: examples redis
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
EX=$SRC/examples/redis
. "${OFFPATH_FIXTURES:?}/redis.env"
export REDIS_ADDR
cli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

# Each run gets its own keys: the server is shared by the other tests.
P=ex$$

# ---- scan-count.lua ----
# 20000 hashes, every third named alice*, some without a name, and strings
# under the same prefix (skipped by TYPE hash).
cli EVAL "for i = 1, tonumber(ARGV[1]) do
  local n = (i % 3 == 0) and ('alice' .. i) or ('bob' .. i)
  redis.call('HSET', KEYS[1] .. i, 'name', n, 'n', i)
end
for i = 1, 50 do redis.call('HSET', KEYS[1] .. 'noname' .. i, 'x', 1) end
for i = 1, 50 do redis.call('SET', KEYS[1] .. 'str' .. i, 'alice') end
return 1" 1 "$P:user:" 20000 >/dev/null
check "scan-count: data seeded" [ "$(cli EVAL "return #redis.call('KEYS', KEYS[1])" 1 "$P:user:*")" -eq 20100 ]
# Events arrive every 10 ms while the scan runs.
{ for i in $(seq 1 200); do echo "event $i"; sleep 0.01; done; } |
  KEYS="$P:user:*" NAME='^alice' "$OFFPATH" run "$EX/scan-count.lua" \
    --input - > "$T/scan.out" 2> "$T/scan.err"
check "scan-count.lua exits 0" [ $? -eq 0 ]
check "scan-count.lua: the count" contains "$T/scan.out" "6666 of 20050 hashes match ^alice"
check "scan-count.lua: every event served" contains "$T/scan.out" "served 200 events"
during=$(sed -n 's/.*, \([0-9]*\) of them during the scan/\1/p' "$T/scan.out")
check "scan-count.lua: events were served during the scan ($during)" [ "${during:-0}" -ge 1 ]

# ---- count-hashes.lua (offpath.block; no server) ----
# The page's function: COUNT moves to a worker on a cache miss, each SCAN
# batch an atomic block section that advances the function's cursor and
# count; an HGET sent right after is answered before the count ends; the
# cached count is answered on the spot until it expires. Each step waits
# for the previous answer, so the machine's speed does not matter (only
# the expiry needs time: at least TTL seconds).
mkfifo "$T/ch.fifo"
TTL=3 "$OFFPATH" run "$EX/count-hashes.lua" --input "$T/ch.fifo" > "$T/ch.out" 2> "$T/ch.err" &
CH_PID=$!
PIDS="$PIDS $CH_PID"
exec 7> "$T/ch.fifo"
for i in $(seq 1 95); do n=bob; [ $((i % 4)) -eq 0 ] && n=alice; echo "HSET user:$i name $n n $i" >&7; done
echo "COUNT alice" >&7; echo "HGET user:4 name" >&7
wait_for 60 has_matches "$T/ch.out" '^count alice' 1
echo "COUNT alice" >&7; echo "DEL user:4" >&7; echo "COUNT alice" >&7
wait_for 60 has_matches "$T/ch.out" '^count alice' 3
sleep 4 # the cached count expires
echo "COUNT alice" >&7; echo "COUNT nobody" >&7
wait_for 60 has_matches "$T/ch.out" '^count nobody' 1
exec 7>&-
wait "$CH_PID"
check "count-hashes.lua exits 0" [ $? -eq 0 ]
check "count-hashes: the count, in 10 batches" [ "$(grep -c '^count alice = 23 (computed in 10 batches)$' "$T/ch.out")" -eq 1 ]
check "count-hashes: other commands served meanwhile" [ "$(grep -n -e '^alice$' -e '^count alice' "$T/ch.out" | head -1 | cut -d: -f2)" = "alice" ]
check "count-hashes: then the cached value, synchronously" [ "$(grep -c '^count alice = 23 (cached)$' "$T/ch.out")" -eq 2 ]
check "count-hashes: after the expiry, counted again" contains "$T/ch.out" "count alice = 22 (computed in 10 batches)"
check "count-hashes: nothing matches" contains "$T/ch.out" "count nobody = 0 (computed in 10 batches)"
check "count-hashes: no errors" contains "$T/ch.err" "errors 0,"

# ---- cache-first.lua ----
# First run: 1 and 2 miss everywhere (backend); repeated while in flight
# they share the lookup; after a pause they are local hits; 3 is new.
{ printf '1\n2\n1\n'; sleep 1; printf '1\n2\n3\n'; } |
  TTL=60 "$OFFPATH" run "$EX/cache-first.lua" --input - \
    > "$T/cache1.out" 2> "$T/cache1.err"
check "cache-first.lua exits 0" [ $? -eq 0 ]
check "cache-first: a miss goes to the backend" [ "$(grep -c '^id=1 .* from=backend$' "$T/cache1.out")" -eq 2 ]
check "cache-first: later, a local hit" [ "$(grep -c '^id=1 .* from=local$' "$T/cache1.out")" -eq 1 ]
check "cache-first: id 2 hit too" contains "$T/cache1.out" "from=local"
check "cache-first: six answers" [ "$(lines "$T/cache1.out")" -eq 6 ]
check "cache-first: the backend's answer" grep -q '^id=3 name=user-3-[0-9]* from=backend$' "$T/cache1.out"
ttl=$(cli TTL profile:3)
check "cache-first: cached in Redis with an expiry ($ttl s)" [ "$ttl" -gt 0 ] && [ "$ttl" -le 60 ]
name3=$(sed -n 's/^id=3 name=\([^ ]*\) .*/\1/p' "$T/cache1.out")
check "cache-first: Redis holds the same value" [ "$(cli GET profile:3)" = "$name3" ]
# Second run: a new process, its local cache empty: Redis answers.
printf '3\n4\n' | "$OFFPATH" run "$EX/cache-first.lua" --input - \
  > "$T/cache2.out" 2> "$T/cache2.err"
check "cache-first.lua exits 0 (second run)" [ $? -eq 0 ]
check "cache-first: a shared-cache hit" contains "$T/cache2.out" "id=3 name=$name3 from=redis"
check "cache-first: a new id goes to the backend" grep -q '^id=4 .* from=backend$' "$T/cache2.out"
cli DEL profile:1 profile:2 profile:3 profile:4 > /dev/null

# ---- blpop-wait.lua ----
# The script's own input is the producer.
printf 'a\nb\ndone\nafter\n' > "$T/values"
QUEUE="$P:q1" "$OFFPATH" run "$EX/blpop-wait.lua" --input "$T/values" \
  > "$T/blpop1.out" 2> "$T/blpop1.err"
check "blpop-wait.lua exits 0" [ $? -eq 0 ]
check "blpop-wait: stops at the expected value" contains "$T/blpop1.out" 'got "done" after 2 other values'
check "blpop-wait: every value pushed" contains "$T/blpop1.out" "pushed 4 values"
check "blpop-wait: the rest stays queued" [ "$(cli LRANGE "$P:q1" 0 -1)" = "after" ]
# Another client pushes, later: BLPOP waits (with empty rounds) meanwhile.
# The producer first sees the waiter blocked in BLPOP (however long the
# host takes to start), then lets more than one 1 s round pass.
( i=0
  while ! cli CLIENT LIST | grep -q 'cmd=blpop' && [ $i -lt 300 ]; do
    sleep 0.1; i=$((i + 1))
  done
  sleep 1.5; cli RPUSH "$P:q2" x y done > /dev/null ) &
PIDS="$PIDS $!"
QUEUE="$P:q2" "$OFFPATH" run "$EX/blpop-wait.lua" --input /dev/null \
  > "$T/blpop2.out" 2> "$T/blpop2.err"
check "blpop-wait.lua exits 0 (external producer)" [ $? -eq 0 ]
check "blpop-wait: waited, then got it" grep -q 'got "done" after 2 other values and [1-9][0-9]* empty waits' "$T/blpop2.out"
# Nothing comes: it gives up with an error.
QUEUE="$P:q3" DEADLINE=1 "$OFFPATH" run "$EX/blpop-wait.lua" --input /dev/null \
  > "$T/blpop3.out" 2> "$T/blpop3.err"
check "blpop-wait.lua: no value is an error exit" [ $? -ne 0 ]
check "blpop-wait: says why" contains "$T/blpop3.err" 'gave up waiting for "done" after 1 s'

cli EVAL "for _, k in ipairs(redis.call('KEYS', KEYS[1])) do redis.call('DEL', k) end return 1" 1 "$P:*" > /dev/null
finish
