-- SPDX-License-Identifier: MIT
-- soak.lua - a long run with failures mixed in: OP_SOAK_TASKS tasks (default
-- 10,000,000), most of them small, with random errors, timeouts, cancels,
-- large values (1 MB each way), tasks that grow a table until their pool's
-- memory limit stops them, and workers stuck in C for a while. Checks that
-- every task ended exactly once and samples VmRSS every second.
-- Not a CI test: it runs for a long time. Thread: the main VM.
--
-- usage: offpath run bench/soak.lua --input /dev/null
--
-- Environment:
--   OP_SOAK_TASKS   tasks in all (default 10000000)
--   OP_SOAK_LANES   tasks in flight (default 64)
--   OP_SOAK_SEED    random seed (default 1)
--
-- Prints "rss t=SECONDS kb=N done=N" every second on stderr (a go
-- coroutine samples VmRSS), then one line on stdout: tasks=, ended= (each
-- exactly once), ok=, errors=, timeouts=, cancels=, limits=, wall_s=,
-- rss_start_kb=, rss_warm_kb= (the first sample after 10 % of the tasks),
-- rss_min_kb= and rss_max_kb= (samples after that), rss_end_kb= (after a
-- full collection), protos=.

local offpath = require "offpath"

local bench = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
  .. "benchlib.lua")
local env_int = bench.env_int

local N = env_int("OP_SOAK_TASKS", 10000000)
local LANES = env_int("OP_SOAK_LANES", 64)
math.randomseed(env_int("OP_SOAK_SEED", 1))

offpath.configure { pools = {
  soak = { threads = 2, queue = LANES * 4, memory_limit = "32MB" },
  slow = { threads = 2, queue = LANES * 4 },
} }

local function rss_kb()
  return bench.status_kb("VmRSS")
end

local big = string.rep("b", 1 << 20)
local count = { ok = 0, errors = 0, timeouts = 0, cancels = 0, limits = 0 }
local ended, started = 0, 0
local t0, rss_start, rss_warm, rss_min, rss_max = 0, 0, nil, nil, 0

local function small(x) return x + 1 end
local function fail(x) error("soak error " .. x) end
local function slow() offpath.sleep(1) end
local function echo_big(s) return s .. "!" end
local function grow()
  local t = {}
  for i = 1, math.maxinteger do t[i] = { i } end
end
local function stuck() os.execute("sleep 0.3") end

-- One task of a random kind; returns the outcome's name.
local function one(i)
  local r = math.random(1000000)
  local ok, e
  if r <= 20000 then                                -- 2 %: errors
    ok, e = pcall(offpath.run, "soak", fail, i)
  elseif r <= 25000 then                            -- 0.5 %: timeouts
    ok, e = pcall(offpath.run, { pool = "slow", timeout = 0.01 }, slow)
  elseif r <= 30000 then                            -- 0.5 %: cancels
    local t = offpath.launch("slow", slow)
    t:cancel()
    ok, e = pcall(t.wait, t)
  elseif r <= 30100 then                            -- 0.01 %: 1 MB each way
    ok, e = pcall(offpath.run, "soak", echo_big, big)
    ok = ok and #e == #big + 1
  elseif r <= 30105 then                            -- memory limit
    ok, e = pcall(offpath.run, "soak", grow)
  elseif r <= 30106 then                            -- stuck in C for 0.3 s
    ok, e = pcall(offpath.run, { pool = "slow", timeout = 0.05 }, stuck)
  else
    ok, e = pcall(offpath.run, "soak", small, i)
    ok = ok and e == i + 1
  end
  if ok then return "ok" end
  e = tostring(e)
  if e:find("^memory limit") then return "limits" end
  if e:find("^timeout") then return "timeouts" end
  if e:find("^cancelled") then return "cancels" end
  if e:find("soak error") then return "errors" end
  error("unexpected outcome: " .. e)
end

local function lane()
  while started < N do
    started = started + 1
    local how = one(started)
    count[how] = count[how] + 1
    ended = ended + 1
  end
end

-- Every second until the lanes are done.
local function sampler()
  while ended < N do
    offpath.sleep(1)
    local kb = rss_kb()
    if ended >= N // 10 then
      if not rss_warm then rss_warm = kb end
      rss_min = math.min(rss_min or kb, kb)
      rss_max = math.max(rss_max, kb)
    end
    io.stderr:write(string.format("rss t=%.0f kb=%d done=%d\n",
      offpath.now() - t0, kb, ended))
  end
end

function on_start()
  t0 = offpath.now()
  rss_start = rss_kb()
  local lanes = {}
  local sampling = offpath.go(sampler)
  for i = 1, LANES do lanes[i] = offpath.go(lane) end
  offpath.all(lanes)
  sampling:wait()
  local wall = offpath.now() - t0
  local sum = count.ok + count.errors + count.timeouts + count.cancels +
    count.limits
  assert(ended == N and sum == N, "a task did not end exactly once")
  -- Tasks stopped at a deadline end for their waiter at once; their worker
  -- hands them back when it is out of the C call it was in.
  for _ = 1, 100 do
    local busy = 0
    for _, p in pairs(offpath.stats().pools) do busy = busy + p.inflight end
    if busy == 0 then break end
    offpath.sleep(0.05)
  end
  for name, p in pairs(offpath.stats().pools) do
    assert(p.inflight == 0 and p.submitted ==
      p.completed + p.failed + p.timedout + p.cancelled, name)
  end
  collectgarbage()
  local kb = rss_kb()
  print(string.format("tasks=%d ended=%d ok=%d errors=%d timeouts=%d " ..
    "cancels=%d limits=%d wall_s=%.1f rss_start_kb=%d rss_warm_kb=%d " ..
    "rss_min_kb=%d rss_max_kb=%d rss_end_kb=%d protos=%d", N, ended,
    count.ok, count.errors, count.timeouts, count.cancels, count.limits, wall,
    rss_start, rss_warm or kb, rss_min or kb, math.max(rss_max, kb), kb,
    offpath.stats().protos))
end
