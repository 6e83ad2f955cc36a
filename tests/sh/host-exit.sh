#!/bin/bash
# SPDX-License-Identifier: MIT
# host-exit.sh - exit codes and messages of the offpath command: usage
# errors (2), missing or broken scripts (1), inputs and outputs that cannot
# be opened (3), --help and --version (0).
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

printf 'function on_event(engine, r) engine:emit(r) end\n' > "$T/ok.lua"

# expect CODE TEXT ARGS...: offpath ARGS exits with CODE and prints TEXT on
# stderr (TEXT empty: not checked), and runs no handler twice.
expect() {
  local code=$1 text=$2 rc
  shift 2
  "$OFFPATH" "$@" < /dev/null > "$T/out" 2> "$T/err"
  rc=$?
  if [ "$rc" != "$code" ]; then
    fail "offpath $*: exit $rc, expected $code"
    sed 's/^/  | /' "$T/err" >&2
    return
  fi
  if [ -n "$text" ] && ! grep -qF -- "$text" "$T/err"; then
    fail "offpath $*: stderr lacks '$text'"
    sed 's/^/  | /' "$T/err" >&2
    return
  fi
  ok "offpath $* -> $code"
}

# Usage errors.
expect 2 "missing command"
expect 2 "unknown command 'walk'" walk
expect 2 "run: missing SCRIPT" run
expect 2 "unknown option '--frobnicate'" run "$T/ok.lua" --frobnicate
expect 2 "option '--input' needs a value" run "$T/ok.lua" --input
expect 2 "--format must be 'lines' or 'json', not 'xml'" run "$T/ok.lua" --format xml
expect 2 "--max-inflight must be an integer >= 1, not '0'" run "$T/ok.lua" --max-inflight 0
expect 2 "--max-inflight must be an integer >= 1, not '10x'" run "$T/ok.lua" --max-inflight=10x
expect 2 "--tick must be a number of seconds" run "$T/ok.lua" --tick -1
expect 2 "--grace must be a number of seconds" run "$T/ok.lua" --grace soon
expect 2 "--pool expects NAME=THREADS, not 'io'" run "$T/ok.lua" --pool io
expect 2 "--pool io=0: THREADS must be 1..1024" run "$T/ok.lua" --pool io=0
expect 2 "unexpected argument 'extra.lua'" run "$T/ok.lua" extra.lua
grep -q "Try 'offpath --help'" "$T/err" && ok "usage errors point to --help" \
  || fail "usage errors point to --help"

# Help and version go to stdout.
expect 0 "" --help
check "--help prints the usage on stdout" contains "$T/out" "usage: offpath run SCRIPT"
expect 0 "" run --help
expect 0 "" --version
check "--version names the version" contains "$T/out" "offpath 0.1.0"

# Scripts.
expect 1 "cannot open script $T/missing.lua: No such file or directory" run "$T/missing.lua"
printf 'function on_event(engine, r)\n  if r then\nend\n' > "$T/syntax.lua"
expect 1 "script error: $T/syntax.lua:4: 'end' expected (to close 'function' at line 1) near <eof>" run "$T/syntax.lua"
printf 'local x = nil\nx.field = 1\n' > "$T/raises.lua"
expect 1 "script error: $T/raises.lua:2: attempt to index a nil value (local 'x')" run "$T/raises.lua"
printf 'function on_start() error("no database") end\nfunction on_event(e, r) print("EVENT", r) end\nfunction on_stop() print("STOP") end\n' > "$T/start.lua"
echo "a record" > "$T/one.txt"
expect 1 "on_start failed: $T/start.lua:1: no database" run "$T/start.lua" --input "$T/one.txt"
check "no record is handled after on_start failed" lacks "$T/out" "EVENT"
check "on_stop does not run after on_start failed" lacks "$T/out" "STOP"
printf 'function on_event() end\nfunction on_stop() error("flush failed") end\n' > "$T/stop.lua"
expect 1 "on_stop failed: $T/stop.lua:2: flush failed" run "$T/stop.lua" --input /dev/null
check "the summary is printed when on_stop fails" contains "$T/err" "offpath: summary"

# Inputs and output.
expect 3 "cannot open input $T/nope.txt: No such file or directory" run "$T/ok.lua" --input "$T/nope.txt"
expect 3 "cannot open input $T: is a directory" run "$T/ok.lua" --input "$T"
expect 3 "cannot open input tcp://127.0.0.1:99999: bad port '99999'" run "$T/ok.lua" --input tcp://127.0.0.1:99999
expect 3 "cannot open input tcp://nohost: expected HOST:PORT" run "$T/ok.lua" --input tcp://nohost
expect 3 "cannot open input udp://127.0.0.1:abc: bad port 'abc'" run "$T/ok.lua" --input udp://127.0.0.1:abc
expect 3 "cannot open input -: stdin given twice" run "$T/ok.lua" --input - --input -
expect 3 "cannot open output $T/no/such/dir/out.txt: No such file or directory" run "$T/ok.lua" --input /dev/null --output "$T/no/such/dir/out.txt"
# A port in use: a first host holds it.
start_host "$T/first.err" run "$T/ok.lua" --input tcp://127.0.0.1:0
wait_for 10 grep -q "listening on tcp" "$T/first.err"
port=$(port_of "$T/first.err" tcp)
expect 3 "cannot open input tcp://127.0.0.1:$port: address already in use" run "$T/ok.lua" --input "tcp://127.0.0.1:$port"
stop_host TERM
check "the first host ends with 0 on SIGTERM" test "$HOST_RC" = 0

# A clean run is 0, and a failing record does not change that.
printf 'function on_event(e, r) if r == "bad" then error("bad record") end end\n' > "$T/some.lua"
printf 'good\nbad\ngood\n' | "$OFFPATH" run "$T/some.lua" 2> "$T/err"
check "a failing record still exits 0" test $? = 0
check "the failing record is reported with its line" contains "$T/err" "on_event failed on - line 2: $T/some.lua:1: bad record"
finish
