# SPDX-License-Identifier: MIT
# _host.sh - helpers for the host-*.sh tests (sourced, not a test itself).
# The tests need bash for /dev/tcp and /dev/udp; each starts with
#   [ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
# Environment: OFFPATH (the host binary), OFFPATH_SOURCE_DIR.

set -u
: "${OFFPATH:?OFFPATH must name the offpath binary}"
SRC=${OFFPATH_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
RECORDS=$SRC/tests/fixtures/records
T=$(mktemp -d "${TMPDIR:-/tmp}/offpath-test.XXXXXX")
PIDS=""
FAILS=0

cleanup() {
  for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
  rm -rf "$T"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  FAILS=$((FAILS + 1))
}

ok() {
  echo "ok - $*"
}

# check NAME COMMAND...: run a test condition, report it.
check() {
  local name=$1
  shift
  if "$@"; then ok "$name"; else fail "$name"; fi
}

# contains FILE TEXT: FILE has the fixed string TEXT.
contains() {
  grep -qF -- "$2" "$1" || { echo "  '$2' not in $1:" >&2; sed 's/^/  | /' "$1" >&2; return 1; }
}

# lacks FILE TEXT
lacks() {
  ! grep -qF -- "$2" "$1" || { echo "  '$2' unexpectedly in $1" >&2; return 1; }
}

# num FILE KEY: the first integer after "KEY": in a --json summary line.
num() {
  grep -o "\"$2\":[0-9.e+-]*" "$1" | head -1 | cut -d: -f2
}

# wait_for SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local n=$(( $1 * 10 ))
  shift
  while [ $n -gt 0 ]; do
    "$@" && return 0
    sleep 0.1
    n=$((n - 1))
  done
  echo "  timed out waiting for: $*" >&2
  return 1
}

# lines FILE: number of lines (0 if missing).
lines() {
  if [ -f "$1" ]; then wc -l < "$1" | tr -d ' '; else echo 0; fi
}

# port_of FILE tcp|udp: the port from "offpath: listening on KIND://...:PORT".
port_of() {
  sed -n "s|.*listening on $2://[^ ]*:\([0-9][0-9]*\)\$|\1|p" "$1" | head -1
}

# start_host ERRFILE ARGS...: run offpath in the background; sets HOST_PID.
start_host() {
  local err=$1
  shift
  : > "$err" # before the host starts: no stale "listening on" line
  "$OFFPATH" "$@" 2>"$err" &
  HOST_PID=$!
  PIDS="$PIDS $HOST_PID"
}

# stop_host [SIGNAL]: signal the background host, wait, set HOST_RC.
stop_host() {
  kill -"${1:-TERM}" "$HOST_PID" 2>/dev/null
  wait "$HOST_PID"
  HOST_RC=$?
}

finish() {
  if [ "$FAILS" -gt 0 ]; then
    echo "$FAILS check(s) failed" >&2
    exit 1
  fi
  echo "all checks passed"
  exit 0
}

# has_lines FILE N: FILE has at least N lines (for wait_for).
has_lines() {
  [ "$(lines "$1")" -ge "$2" ]
}

# has_matches FILE PATTERN N: at least N lines of FILE match PATTERN.
has_matches() {
  [ -f "$1" ] && [ "$(grep -c -- "$2" "$1")" -ge "$3" ]
}

# rnum FILE KEY: KEY of the "records" object of a --json summary.
rnum() {
  grep -o '"records":{[^}]*}' "$1" | grep -o "\"$2\":[0-9]*" | cut -d: -f2
}
