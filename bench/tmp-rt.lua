-- SPDX-License-Identifier: MIT
-- op-roundtrip.lua - offpath's Lua API round trip: x + 1 in a worker VM,
-- pipelined (up to 1024 tasks in flight) or one at a time.
-- Thread: the main VM (on_start is a handler coroutine and may suspend); the
-- task functions run in the worker VMs of the pool "b".
--
-- usage: OP_API=wait OP_WORKERS=1 OP_TASKS=300000 OP_MODE=pipelined \
--          offpath run bench/op-roundtrip.lua --input /dev/null
--
-- Environment (the host passes no arguments to a script):
--   OP_WORKERS  threads of the pool "b" (default 1)
--   OP_TASKS    round trips (required)
--   OP_MODE     pipelined | serial (default pipelined)
--   OP_API      how tasks are started and finished (default wait):
--                 wait      offpath.launch, then task:wait() on the oldest
--                 on_done   offpath.launch + task:on_done(cb); cb launches
--                           the next
--                 schedule  offpath.schedule{onexecute=, onresult=}; onresult
--                           schedules the next
--                 run       offpath.run (one at a time only)
--   OP_WINDOW   tasks in flight when pipelined (default 1024; use a small
--               one with OP_ARG=1m: 1024 MB strings in flight is 2.7 GB)
--   OP_FN       small | big: the task function, 2 or 200 source lines with
--               the same two upvalues (default small); both compute x + k
--   OP_ARG      the argument besides x: none | 1k (a 1 KB string) |
--               table100 (a table of 100 string keys) | 1m (a 1 MB string)
--               (default none); the task returns x + 1 either way
--
-- Prints one line: name=offpath-lua api= workers= mode= tasks= fn= arg=
-- ns_per_trip= (pipelined) or us_per_trip= (serial), trips_per_s=, wall_s, cpu_user,
-- cpu_sys (os.clock: process CPU of all threads, reported as user with
-- sys 0), cpu_pct and maxrss_kb (VmHWM). Exits non-zero on a wrong sum.

local offpath = require "offpath"

local WINDOW = 1024 -- OP_WINDOW overrides it

local bench = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
  .. "benchlib.lua")
local env_int = bench.env_int

local env_enum = bench.env_enum

WINDOW = env_int("OP_WINDOW", WINDOW)
local workers = env_int("OP_WORKERS", 1)
local ntasks = env_int("OP_TASKS", nil)
if not ntasks then error("set OP_TASKS") end
local mode = env_enum("OP_MODE", "pipelined", { "pipelined", "serial" })
local api = env_enum("OP_API", "wait", { "wait", "on_done", "schedule", "run" })
local fnkind = env_enum("OP_FN", "small", { "small", "big" })
local argkind = env_enum("OP_ARG", "none", { "none", "1k", "table100", "1m" })
if api == "run" and mode ~= "serial" then error("OP_API=run is one at a time: OP_MODE=serial") end

offpath.configure { pools = { b = { threads = workers, queue = 2048 } } }
if os.getenv("OP_SPIN") then
  offpath.configure { spin_us = math.tointeger(tonumber(os.getenv("OP_SPIN"))) }
end

-- ---- the task function ----
-- Both forms are made the same way, from source by load(), so they have the
-- same upvalues (fmt, k, in that order) and differ only in code size: 4
-- lines against 201. The big one's extra lines sit in a branch that is never
-- taken (x is never negative).

local function make_fn(extra_lines)
  local src = { "local k, fmt = ...", "return function(x, a)",
                "  if x < 0 then return fmt('%d', x + k), a end" }
  if extra_lines > 0 then
    src[#src + 1] = "  if x < 0 then"
    for i = 1, extra_lines do
      src[#src + 1] = string.format("    x = x + k * %d; a = fmt('%%d', x)", i)
    end
    src[#src + 1] = "  end"
  end
  src[#src + 1] = "  return x + k"
  src[#src + 1] = "end"
  return assert(load(table.concat(src, "\n"), "=op-roundtrip-" .. extra_lines))(1, string.format)
end

local fn = fnkind == "small" and make_fn(0) or make_fn(195)

local arg
if argkind == "1k" then
  arg = string.rep("x", 1024)
elseif argkind == "table100" then
  arg = {}
  for i = 1, 100 do arg["field" .. i] = i end
elseif argkind == "1m" then
  arg = string.rep("y", 1024 * 1024)
end

-- ---- measuring ----

local function vmhwm_kb()
  return bench.status_kb("VmHWM")
end

local window = mode == "pipelined" and math.min(WINDOW, ntasks) or 1
local t0, c0
local sum, submitted, finished = 0, 0, 0

local function report()
  local wall = offpath.now() - t0
  local cpu = os.clock() - c0
  local want = ntasks * (ntasks - 1) // 2 + ntasks
  if finished ~= ntasks or sum ~= want then
    io.stderr:write(string.format("op-roundtrip: %d of %d tasks, sum %s, want %d\n",
      finished, ntasks, tostring(sum), want))
    os.exit(1)
  end
  local metric
  if mode == "pipelined" then
    metric = string.format("ns_per_trip=%.1f", wall * 1e9 / ntasks)
  else
    metric = string.format("us_per_trip=%.2f", wall * 1e6 / ntasks)
  end
  metric = metric .. string.format(" trips_per_s=%.0f", ntasks / wall)
  io.stdout:write(string.format(
    "name=offpath-lua api=%s workers=%d mode=%s window=%d tasks=%d fn=%s arg=%s %s " ..
    "wall_s=%.3f cpu_user=%.3f cpu_sys=0 cpu_pct=%.1f maxrss_kb=%d\n",
    api, workers, mode, window, ntasks, fnkind, argkind, metric, wall, cpu,
    100 * cpu / wall, vmhwm_kb()))
  io.stdout:flush()
end


-- wait: a FIFO ring of tasks; wait on the oldest, launch the next in its
-- slot. With one worker tasks end in order, so a wait rarely suspends.
local function run_wait()
  local ring = {}
  for i = 1, window do
    ring[i] = offpath.launch("b", fn, submitted, arg)
    submitted = submitted + 1
  end
  local head = 1
  while finished < ntasks do
    local r = ring[head]:wait()
    sum = sum + r
    finished = finished + 1
    if submitted < ntasks then
      ring[head] = offpath.launch("b", fn, submitted, arg)
      submitted = submitted + 1
    else
      ring[head] = nil
    end
    head = head % window + 1
  end
  report()
end

-- on_done: one shared callback; it consumes the result and launches the
-- next task, so up to `window` stay in flight with no coroutine suspending.
local function run_on_done()
  local cb
  local function start()
    local t = offpath.launch("b", fn, submitted, arg)
    submitted = submitted + 1
    t:on_done(cb)
  end
  cb = function(ok, r)
    if not ok then error(r) end
    sum = sum + r
    finished = finished + 1
    if submitted < ntasks then
      start()
    elseif finished == ntasks then
      report()
    end
  end
  for _ = 1, window do start() end
end

-- schedule: the Trisul form; onresult(engine, data, result) schedules the
-- next. data is x; the argument kind rides along as a field of data when set.
local function run_schedule()
  local onresult, onerror
  local exec = arg == nil and fn or function(d) return fn(d.x, d.a) end
  local function start()
    local data = submitted
    if arg ~= nil then data = { x = submitted, a = arg } end
    offpath.schedule { pool = "b", data = data, onexecute = exec,
      onresult = onresult, onerror = onerror }
    submitted = submitted + 1
  end
  onresult = function(_, _, r)
    sum = sum + r
    finished = finished + 1
    if submitted < ntasks then
      start()
    elseif finished == ntasks then
      report()
    end
  end
  onerror = function(_, _, err) error(err) end
  for _ = 1, window do start() end
end

local function run_run()
  for i = 0, ntasks - 1 do
    sum = sum + offpath.run("b", fn, i, arg)
  end
  finished = ntasks
  report()
end

function on_start()
  -- Start the pool's threads and load the function in every worker before
  -- the clock starts: the first task of each worker pays for its VM.
  local warm = {}
  for i = 1, workers * 4 do warm[i] = offpath.launch("b", fn, 0, arg) end
  for i = 1, #warm do warm[i]:wait() end
  collectgarbage(); collectgarbage("incremental", 400, 400)
  t0, c0 = offpath.now(), os.clock()
  if api == "wait" then
    run_wait()
  elseif api == "on_done" then
    run_on_done()
  elseif api == "schedule" then
    run_schedule()
  else
    run_run()
  end
end

function on_event() end
