-- SPDX-License-Identifier: MIT
-- op-sleep.lua - scale of suspension: N handlers suspended in offpath.sleep
-- at once, all due at the same moment; peak RSS and the time to wake them.
-- Thread: the main VM only (no pool is used).
--
-- usage: OP_N=100000 offpath run bench/op-sleep.lua --input /dev/null
--        OP_HOW=event OP_N=100000 offpath run bench/op-sleep.lua \
--            --input FILE --max-inflight 200000
--
-- Environment:
--   OP_N     handlers (default 100000)
--   OP_HOW   go: on_start starts N coroutines with offpath.go (default);
--            event: every record of the input is an on_event call that
--            sleeps (the input must hold at least N records; give the host
--            --max-inflight above N, or it stops reading at 1000)
--   OP_AT    seconds after on_start at which every sleeper is due
--            (default 2): each sleeps until that moment, so all N are
--            suspended at once and their timers expire together
--
-- Prints one line: n, spawn_s (time to start the N sleepers), wake_s (from
-- the moment they were due to the last one running again: how long the
-- loop takes to resume N coroutines whose timers expired together), ns_per_
-- wake (wake_s / N), rss_base_kb (VmRSS before), peak_rss_kb (VmHWM: the
-- process's peak, the target's figure), bytes_per_sleeper ((VmRSS with all
-- N suspended - rss_base) / N), suspended (offpath.stats().suspended
-- seen when the last was started).

local offpath = require "offpath"

local bench = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
  .. "benchlib.lua")
local env_int = bench.env_int

local N = env_int("OP_N", 100000)
local how = os.getenv("OP_HOW") or "go"
if how ~= "go" and how ~= "event" then error("OP_HOW must be go or event") end
local at = tonumber(os.getenv("OP_AT") or "") or 2

local now = offpath.now

local status_kb = bench.status_kb

local due, started, woken, last_wake = nil, 0, 0, 0
local t_start, t_spawned, rss_base, rss_full, suspended_seen

local function report()
  local wake = last_wake - due
  io.stdout:write(string.format(
    "name=offpath-sleep how=%s n=%d spawn_s=%.3f wake_s=%.4f ns_per_wake=%.0f " ..
    "rss_base_kb=%d peak_rss_kb=%d bytes_per_sleeper=%.0f suspended=%d\n",
    how, N, t_spawned - t_start, wake, wake * 1e9 / N, rss_base,
    status_kb("VmHWM"), (rss_full - rss_base) * 1024 / N, suspended_seen or -1))
  io.stdout:flush()
end

-- A sleeper: suspend until `due`, then note when it ran again.
local function sleeper()
  offpath.sleep(math.max(0, due - now()))
  local t = now()
  if t > last_wake then last_wake = t end
  woken = woken + 1
  if woken == N then report() end
end

local function all_started()
  t_spawned = now()
  collectgarbage()
  rss_full = status_kb("VmRSS")
  suspended_seen = offpath.stats().suspended
  if t_spawned >= due then
    io.stderr:write("op-sleep: starting took longer than OP_AT; raise it\n")
    os.exit(1)
  end
end

function on_start()
  collectgarbage()
  rss_base = status_kb("VmRSS")
  t_start = now()
  due = t_start + at
  if how == "go" then
    for _ = 1, N do offpath.go(sleeper) end
    started = N
    all_started()
  end
end

function on_event()
  if started >= N then return end
  started = started + 1
  if started == N then
    -- This handler is the last: note the figures before it sleeps too.
    all_started()
  end
  sleeper()
end

function on_stop()
  if woken ~= N then
    io.stderr:write(string.format("op-sleep: %d of %d sleepers woke\n", woken, N))
    os.exit(1)
  end
end
