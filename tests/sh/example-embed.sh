# SPDX-License-Identifier: MIT
# example-embed.sh - the C embedding examples (examples/embed/), built by
# examples/CMakeLists.txt, run against their scripts: a libuv host and an
# epoll host serving its own TCP port.
# LABELS: examples tsan
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
BIN=${OFFPATH_BINARY_DIR:?}/examples
EX=$SRC/examples/embed

# ---- the libuv host: 20 events, each summed on a cpu pool thread ----
"$BIN/embed-uv" "$EX/embed-uv.lua" 20 > "$T/uv.out" 2> "$T/uv.err"
check "embed-uv exits 0" [ $? -eq 0 ]
uv_ok=1
for n in $(seq 1 20); do
  k=$((n * 100000))
  grep -qxF "event $n: $((k * (k + 1) / 2))" "$T/uv.out" || { uv_ok=0; echo "  missing event $n" >&2; }
done
check "embed-uv: every event got its result" [ $uv_ok -eq 1 ]
check "embed-uv: 20 results" [ "$(grep -c '^event ' "$T/uv.out")" -eq 20 ]
check "embed-uv: counts" contains "$T/uv.out" "events 20, results 20, handler calls 20, errors 0"
check "embed-uv: work ran in the pool" contains "$T/uv.out" "pool cpu: 2 threads, 20 tasks completed"
check "embed-uv: nothing on stderr" [ ! -s "$T/uv.err" ]

# A script error is reported by the host, which still exits cleanly.
printf 'function on_event(engine, n)\n  if n == 2 then error("bad event") end\n  engine:done(n, "fine")\nend\n' > "$T/bad.lua"
"$BIN/embed-uv" "$T/bad.lua" 3 > "$T/bad.out" 2> "$T/bad.err"
check "embed-uv: a failing handler fails the run" [ $? -eq 1 ]
check "embed-uv: the error names file and line" contains "$T/bad.err" "bad.lua:2: bad event"
check "embed-uv: the other events went on" contains "$T/bad.out" "event 3: fine"

# ---- the epoll host ----
"$BIN/embed-epoll" "$EX/embed-epoll.lua" > "$T/ep.out" 2> "$T/ep.err" &
EP=$!
PIDS="$PIDS $EP"
wait_for 10 grep -q '^listening ' "$T/ep.out"
port=$(sed -n 's/^listening 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$T/ep.out")
check "embed-epoll: listens on a loopback port" [ -n "$port" ]

# A client: sleep first (answered last: the timer only fires if the host
# honours op_runtime_poll's timeout), then work for the pools.
client() {
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'sleep 0.3\nsum 1000\nsha1 hello\nsum 2000000\nbogus\n' >&3
  for i in 1 2 3 4 5; do IFS= read -r -t 10 line <&3 || return 1; echo "$line"; done
  exec 3>&-
}
client > "$T/c1.out" 2> "$T/c1.err" &
C1=$!
client > "$T/c2.out" 2> "$T/c2.err" &
C2=$!
wait $C1; r1=$?
wait $C2; r2=$?
check "embed-epoll: two clients got 5 answers each" [ $((r1 + r2)) -eq 0 ]
for c in c1 c2; do
  check "embed-epoll $c: sum" contains "$T/$c.out" "sum 1000 = 500500"
  check "embed-epoll $c: big sum" contains "$T/$c.out" "sum 2000000 = 2000001000000"
  check "embed-epoll $c: sha1" contains "$T/$c.out" "sha1 $(printf hello | sha1sum | cut -d' ' -f1)"
  check "embed-epoll $c: unknown command" contains "$T/$c.out" "error: unknown command bogus"
  check "embed-epoll $c: the sleep answered last" [ "$(tail -1 "$T/$c.out")" = "slept 0.3" ]
done

# Shutdown: an answer still pending when it arrives is delivered.
shut() {
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'sleep 0.2\nshutdown\n' >&3
  IFS= read -r -t 10 a <&3 && IFS= read -r -t 10 b <&3 || return 1
  echo "$a"; echo "$b"
}
shut > "$T/shut.out"
check "embed-epoll: shutdown answers bye, then the pending answer" \
  [ "$(tr '\n' ' ' < "$T/shut.out")" = "bye slept 0.2 " ]
wait $EP
check "embed-epoll exits 0" [ $? -eq 0 ]
check "embed-epoll: counted its connections" contains "$T/ep.out" "stopped after 3 connections"
check "embed-epoll: nothing on stderr" [ ! -s "$T/ep.err" ]
finish
