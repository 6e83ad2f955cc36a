-- SPDX-License-Identifier: MIT
-- peer-luv.lua - the luv peer: x + 1 through uv.new_work / uv.queue_work.
-- Thread: the script runs on the loop thread; the work function runs in
-- luv's per-thread Lua states on libuv's threadpool.
--
-- usage: UV_THREADPOOL_SIZE=N lua5.4 bench/peer-luv.lua --workers N
--            --mode pipelined|serial --tasks N
--
-- Lua cannot set an environment variable, and libuv reads
-- UV_THREADPOOL_SIZE when the first work is queued, so the caller sets it;
-- --workers must match it (checked below).
--
-- How luv passes values (luv 1.44, src/work.c and src/thread.c): queue_work
-- copies its arguments into a malloc'd request (nil, booleans, numbers, strings
-- copied, light userdata). Numbers cross as floats: luv 1.44 loses the
-- integer subtype both ways (x arrives as 3.0 and x + 1 returns 4.0); the work
-- function is string.dump'ed once by new_work, and each pool thread loads it
-- into its own lua_State the first time, then finds it in the registry keyed
-- by the bytecode string. The work function's results are copied back the
-- same way and passed to the after-work callback on the loop thread.

local uv = require "luv"

local WINDOW = 1024

local function usage(msg)
  io.stderr:write("peer-luv: ", msg, "\n",
    "usage: UV_THREADPOOL_SIZE=N lua5.4 peer-luv.lua --workers N ",
    "--mode pipelined|serial --tasks N\n")
  os.exit(2)
end

local opts = { workers = 1, mode = "pipelined" }
do
  local i = 1
  while i <= #arg do
    local k, v = arg[i], arg[i + 1]
    if v == nil then usage("missing value for " .. k) end
    if k == "--workers" or k == "--tasks" then
      local n = math.tointeger(tonumber(v))
      if not n or n < 1 then usage("bad value for " .. k .. ": " .. v) end
      opts[k:sub(3)] = n
    elseif k == "--mode" then
      if v ~= "pipelined" and v ~= "serial" then usage("bad mode " .. v) end
      opts.mode = v
    else
      usage("unknown option " .. k)
    end
    i = i + 2
  end
  if not opts.tasks then usage("--tasks is required") end
  local env = math.tointeger(tonumber(os.getenv("UV_THREADPOOL_SIZE") or ""))
  if env ~= opts.workers then
    usage("set UV_THREADPOOL_SIZE=" .. opts.workers .. " in the environment")
  end
end

local ntasks = opts.tasks
local window = opts.mode == "pipelined" and WINDOW or 1
local submitted, finished, sum = 0, 0, 0
local work

-- Consume a result on the loop thread and queue the next task.
local function after(r)
  sum = sum + r
  finished = finished + 1
  if submitted < ntasks then
    submitted = submitted + 1
    work:queue(submitted - 1)
  end
end

work = uv.new_work(function(x) return x + 1 end, after)

local t0 = uv.hrtime()
for _ = 1, math.min(window, ntasks) do
  submitted = submitted + 1
  work:queue(submitted - 1)
end
uv.run("default")
local wall = uv.hrtime() - t0
local ru = uv.getrusage()

local want = ntasks * (ntasks - 1) // 2 + ntasks
if finished ~= ntasks or sum ~= want then
  io.stderr:write(string.format("peer-luv: %d of %d tasks, sum %s, want %d\n",
    finished, ntasks, tostring(sum), want))
  os.exit(1)
end

local user = ru.utime.sec + ru.utime.usec / 1e6
local sys = ru.stime.sec + ru.stime.usec / 1e6
local wall_s = wall / 1e9
local metric
if window > 1 then
  metric = string.format("ns_per_trip=%.1f", wall / ntasks)
else
  metric = string.format("us_per_trip=%.2f", wall / ntasks / 1e3)
end
print(string.format(
  "name=luv workers=%d mode=%s tasks=%d %s wall_s=%.3f cpu_user=%.3f " ..
  "cpu_sys=%.3f cpu_pct=%.1f maxrss_kb=%d", opts.workers, opts.mode, ntasks,
  metric, wall_s, user, sys, 100 * (user + sys) / wall_s, ru.maxrss))
