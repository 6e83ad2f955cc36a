#!/bin/sh
# SPDX-License-Identifier: MIT
# lua-module.sh - require "offpath" from a stock lua5.4: the example of
# examples/module runs (pools, go, run, sleep, exec, http.get, loop), the
# main chunk cannot suspend, offpath.loop refuses to nest or to run in a
# coroutine, and work left when the state closes still ends exactly once.
# LABELS: examples tsan nginx
. "$(dirname "$0")/_host.sh"
. "${OFFPATH_FIXTURES:?}/nginx.env"
B=${OFFPATH_BINARY_DIR:?}
export LUA_CPATH="$B/?.so;;"
# A sanitized offpath.so needs its runtime loaded first in a stock lua5.4.
case "${OFFPATH_SANITIZE:-}" in
*address*) LD_PRELOAD=$(cc -print-file-name=libasan.so) ;;
*thread*) LD_PRELOAD=$(cc -print-file-name=libtsan.so) ;;
*) LD_PRELOAD="" ;;
esac
export LD_PRELOAD
[ -n "$LD_PRELOAD" ] || unset LD_PRELOAD

# lua_run NAME SCRIPT: run SCRIPT (text) under lua5.4; output in $T/NAME.out
lua_run() {
  printf '%s\n' "$2" > "$T/$1.lua"
  lua5.4 "$T/$1.lua" > "$T/$1.out" 2>&1
}

# ---- the example ----
lua5.4 "$SRC/examples/module/checksums.lua" "$NGINX_URL/" > "$T/ex.out" 2>&1
check "the example exits 0" [ $? -eq 0 ]
check "example: sums on the pool" contains "$T/ex.out" "sum 3: 1..300000 = 45000150000"
check "example: exec with an argument list" contains "$T/ex.out" "exec: two words|x|"
check "example: http.get" contains "$T/ex.out" "GET $NGINX_URL/: 200, 6 bytes"
check "example: the loop ran everything" contains "$T/ex.out" "report: done"
check "example: nothing else" [ "$(wc -l < "$T/ex.out")" -eq 6 ]

# ---- a sandbox without the os library ----
lua_run noos '
os = nil
package.loaded.os = nil
local offpath = require "offpath"
offpath.go(function() print("sum", offpath.run("cpu", function(a, b) return a + b end, 2, 3)) end)
offpath.loop()
print("end")'
check "no os library: the module loads and runs" contains "$T/noos.out" "sum	5"
check "no os library: to the end" contains "$T/noos.out" "end"

# ---- the module's rules ----
lua_run rules '
local offpath = require "offpath"
assert(require "offpath" == offpath, "one module per state")
assert(package.loaded.offpath == offpath)
print("global", rawget(_G, "offpath") == nil and "unset" or "set")
print("main", offpath.can_suspend(), select(2, pcall(offpath.run, "io", print)))
local co = coroutine.wrap(function() return pcall(offpath.loop) end)
print("co", co())
local inner
local t = offpath.go(function()
  inner = select(2, pcall(offpath.loop))
  offpath.sleep(0.01)
  return offpath.run("io", function(a, b) return a + b end, 40, 2)
end)
print("before", t:status(), offpath.loop("nowait"))
print("loop", offpath.loop())
print("after", t:status(), inner)
print("busy", offpath.loop("once"), offpath.loop("nowait"))
print("bad", pcall(offpath.loop, "sometimes"))
'
check "rules: exits 0" [ $? -eq 0 ]
check "rules: no global (a plain module)" contains "$T/rules.out" "global	unset"
check "rules: the main chunk cannot suspend" contains "$T/rules.out" \
  "main	false	cannot suspend: offpath.run called outside a handler"
check "rules: no loop in a coroutine" contains "$T/rules.out" \
  "co	false	cannot loop: offpath.loop called in a coroutine"
check "rules: go waits for the loop" contains "$T/rules.out" "before	running	true"
check "rules: loop runs until no work is left" contains "$T/rules.out" "loop	false"
check "rules: no loop inside the loop" contains "$T/rules.out" \
  "cannot loop: offpath.loop called inside the loop"
check "rules: the task ended" contains "$T/rules.out" "after	done"
check "rules: nothing left" contains "$T/rules.out" "busy	false	false"
check "rules: a bad mode names it" contains "$T/rules.out" "bad	false	bad argument #1 to 'offpath.loop' (invalid option 'sometimes')"

lua_run coroutine '
local co = coroutine.wrap(function() return pcall(require, "offpath") end)
print(co())
'
check "require in a coroutine is refused" contains "$T/coroutine.out" \
  "cannot load offpath: require it on the main thread"

# ---- work left when the state closes ----
start=$(date +%s)
lua_run close '
local offpath = require "offpath"
offpath.launch("io", function() return 7 end):on_done(function(ok, v)
  print("launched", ok, v)
end)
offpath.go(function()
  local ok, err = pcall(offpath.sleep, 30)
  print("suspended", ok, err)
end)
offpath.loop("nowait") -- it starts, and suspends
offpath.go(function()
  local ok, err = pcall(offpath.sleep, 30)
  print("not started", ok, err)
end)
offpath.go(function() error("boom") end)
print("main chunk ends")
'
check "close: exits 0" [ $? -eq 0 ]
check "close: a queued task still runs" contains "$T/close.out" "launched	true	7"
check "close: a suspended wait is cancelled" contains "$T/close.out" \
  "suspended	false	cancelled: runtime shutting down (offpath.sleep at "
check "close: a coroutine not started runs, and cannot suspend" contains "$T/close.out" \
  "not started	false	cannot suspend: offpath.sleep while the runtime shuts down"
check "close: an unobserved failure is reported" contains "$T/close.out" \
  "offpath: unobserved task failure in offpath.go: "
check "close: with its message" contains "$T/close.out" "close.lua:15: boom"
check "close: nobody waits 30 s" [ $(( $(date +%s) - start )) -lt 25 ]

lua_run exit '
local offpath = require "offpath"
offpath.go(function() offpath.sleep(0.01); os.exit(3, true) end)
offpath.loop()
'
check "os.exit(n, true) inside the loop exits with n" [ $? -eq 3 ]
finish
