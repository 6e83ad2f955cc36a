-- SPDX-License-Identifier: MIT
-- op-memory.lua - memory: resident bytes per idle worker VM, and per task in
-- flight (queued behind a busy worker).
-- Thread: the main VM; the pools' worker VMs.
--
-- usage: offpath run bench/op-memory.lua --input /dev/null --max-inflight 1
--
-- (--max-inflight 1: the command faults in heap at start for the handlers
-- it may hold, 8 KB each; resident bytes measured here would then not grow
-- for what the first megabytes of tasks allocate.)
--
-- Environment:
--   OP_WORKERS  threads of the pool "idle" (default 64)
--   OP_TASKS    tasks queued for the per-task figure (default 100000)
--
-- Per worker: VmRSS before the pool "idle" starts, then after each of its
-- OP_WORKERS threads has run one task (so every worker VM exists, with its
-- standard libraries, offpath module, transfer state and one decoded
-- function) and a full GC on the main VM; the difference over OP_WORKERS is
-- bytes_per_worker (thread stack pages touched, the VM, malloc arenas).
--
-- Per task: the pool "blk" has one thread, held by a task that sleeps until
-- cancelled; then OP_TASKS launches of x + 1 with an integer argument queue
-- behind it. VmRSS after them minus before, over OP_TASKS, after a full GC
-- each time, is bytes_per_task: the task object, its registry anchor, its
-- encoded function and arguments, plus 16 bytes a task of the table that
-- holds them here. The queued tasks are then cancelled.

local offpath = require "offpath"

local bench = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
  .. "benchlib.lua")
local env_int = bench.env_int

local W = env_int("OP_WORKERS", 64)
local N = env_int("OP_TASKS", 100000)

offpath.configure { pools = {
  idle = { threads = W, queue = W * 2 },
  blk = { threads = 1, queue = N + 16 },
} }

local function rss_kb()
  return bench.status_kb("VmRSS")
end

local function settle()
  collectgarbage()
  collectgarbage()
end

local function inc(x) return x + 1 end

function on_start()
  -- Idle workers.
  settle()
  local r0 = rss_kb()
  local ts = {}
  -- Each task sleeps a little so that every thread takes exactly one.
  for i = 1, W do
    ts[i] = offpath.launch("idle", function(x) offpath.sleep(0.05) return x end, i)
  end
  for i = 1, W do ts[i]:wait() end
  ts = nil
  offpath.sleep(0.05)
  settle()
  local r1 = rss_kb()

  -- Tasks in flight.
  local blocker = offpath.launch("blk", function()
    while not offpath.cancelled() do offpath.sleep(0.01) end
  end)
  offpath.sleep(0.05)
  settle()
  local r2 = rss_kb()
  local queued = {}
  for i = 1, N do queued[i] = offpath.launch("blk", inc, i) end
  settle()
  local r3 = rss_kb()
  local st = offpath.stats().pools.blk
  for i = 1, N do queued[i]:cancel() end
  blocker:cancel()
  pcall(blocker.wait, blocker)
  io.stdout:write(string.format(
    "name=offpath-memory workers=%d bytes_per_worker=%.0f tasks=%d " ..
    "bytes_per_task=%.0f queued_seen=%d rss_before_kb=%d rss_workers_kb=%d " ..
    "rss_tasks_kb=%d\n", W, (r1 - r0) * 1024 / W, N, (r3 - r2) * 1024 / N,
    st.queued, r0, r1, r3))
  io.stdout:flush()
end

function on_event() end
