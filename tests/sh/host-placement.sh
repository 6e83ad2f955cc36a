#!/bin/bash
# SPDX-License-Identifier: MIT
# host-placement.sh - tests/lua/placement.lua in a process confined to one
# CPU (taskset): the cpu pool has one thread per CPU the process may use,
# not per CPU of the machine, and no pool keeps off a CPU.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

if ! command -v taskset >/dev/null; then
  echo "skipped: needs taskset"
  exit 0
fi
# The first CPU this process may use.
cpu=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*\([0-9]*\).*/\1/p' /proc/self/status)

LUA_PATH="$SRC/tests/lua/?.lua;$SRC/lua/?.lua;;" taskset -c "$cpu" \
  "$OFFPATH" run "$SRC/tests/lua/placement.lua" --input /dev/null \
  >"$T/out" 2>"$T/err"
check "every placement test passes on one CPU" contains "$T/out" ", 0 failed"
check "none fails" lacks "$T/out" "not ok"

finish
