-- offpath/momentum.lua - the Momentum (msys) threadpool interface on top
-- of offpath: msys.runInPool, msys.threadpool.stat/count/find, msys.sleep,
-- the constants msys.core.ECTP_COMPLETE_CALLBACK[_SCHED], and the globals
-- _TLS (session-local storage) and _OSTLS (per OS thread storage).
--
--   require "offpath.momentum"
--   local ok, res = msys.runInPool("IO", function() return work() end)
--   msys.runInPool("CPU", fn, true)                  -- fire-and-forget
--   msys.runInPool("IO", fn, done)                   -- done on the pool thread
--   msys.runInPool("IO", fn, done, msys.core.ECTP_COMPLETE_CALLBACK_SCHED)
--
-- Pools are offpath pools, named as the script names them ("IO", "CPU",
-- ...): a name offpath does not know yet is made on first use, with as
-- many threads as the lower-case offpath pool of that name ("io": 4,
-- "cpu": one per core), else 1. Configure them with offpath.configure
-- before first use to choose otherwise.
--
-- _TLS is the session's offpath.context. In a pool closure, _TLS is a copy
-- of it; the suspending form copies the closure's changes back when it
-- resumes, the asynchronous forms do not (their closure and a pool-thread
-- completion see the copy taken when the closure starts).
local offpath = require "offpath"

local type, error, tostring, pcall, xpcall = type, error, tostring, pcall,
    xpcall
local select, next, pairs, rawget = select, next, pairs, rawget
local setmetatable = setmetatable
local pack, unpack = table.pack, table.unpack
local traceback = debug.traceback

local M = {}

M.ECTP_COMPLETE_CALLBACK = 0
M.ECTP_COMPLETE_CALLBACK_SCHED = 1

-- ---- run in worker VMs ----

-- The suspending form: returns the session copy and the closure's results.
local function run_sync(fn, tls)
  _TLS = tls
  local r = pack(fn())
  _TLS = nil
  return tls, unpack(r, 1, r.n)
end

-- The asynchronous forms: the closure, then the completion (if any) on the
-- same thread with the closure's outcome as pcall gives it.
local function run_async(fn, completion, tls)
  _TLS = tls
  if completion == nil then
    fn()
  else
    completion(xpcall(fn, traceback))
  end
  _TLS = nil
end

-- ---- pools ----

local known = {}   -- name -> id, pools checked or made
local names = {}   -- id -> name

local function register(name)
  local id = #names + 1
  names[id] = name
  known[name] = id
  return id
end

-- Make sure the pool exists; return its name.
local function pool_name(pool, level)
  if math.type(pool) == "integer" then
    local name = names[pool]
    if name == nil then
      error("msys: no thread pool with id " .. pool, level + 1)
    end
    return name
  end
  if type(pool) ~= "string" then
    error("bad argument #1 to msys.runInPool: thread pool name or id "
      .. "expected (got " .. type(pool) .. ")", level + 1)
  end
  if known[pool] then return pool end
  local pools = offpath.stats().pools
  if pools[pool] == nil then
    local twin = pools[pool:lower()]
    offpath.configure { pools = { [pool] = { threads = twin and twin.threads
      or 1 } } }
  end
  register(pool)
  return pool
end

-- ---- runInPool ----

-- Report the failure of an asynchronous closure or completion nobody can
-- see otherwise (the runtime's error callback, counted in its stats).
local function report(ok, err)
  if not ok then error("msys.runInPool: " .. tostring(err), 0) end
end

-- Replace the contents of dst with those of src.
local function merge(dst, src)
  for k in next, dst do
    if src[k] == nil then dst[k] = nil end
  end
  for k, v in next, src do dst[k] = v end
end

-- The asynchronous forms, in a main-thread coroutine that shares the
-- session's context: wait until the calling script has returned to the
-- scheduler (it yields or ends before sleep(0) resumes), then submit.
local function start_async(pool, fn, completion, sched)
  offpath.sleep(0)
  local ctx = offpath.context
  if not sched then
    offpath.launch(pool, run_async, fn, completion, ctx):on_done(report)
    return
  end
  local r = pack(pcall(offpath.run, pool, run_sync, fn, ctx))
  if r[1] then
    return completion(true, unpack(r, 3, r.n))
  end
  return completion(false, r[2])
end

-- msys.runInPool(pool, closure[, async | completion[, mode]])
local function runInPool(pool, fn, third, mode)
  local name = pool_name(pool, 2)
  if type(fn) ~= "function" then
    error("bad argument #2 to msys.runInPool: function expected (got "
      .. type(fn) .. ")", 2)
  end
  if third == nil or third == false then
    if not offpath.can_suspend() then
      error("msys.runInPool: cannot suspend here (the main chunk, a "
        .. "callback or a coroutine offpath does not run); use the "
        .. "asynchronous forms", 2)
    end
    local ctx = offpath.context
    local r = pack(pcall(offpath.run, name, run_sync, fn, ctx or {}))
    if not r[1] then return false, r[2] end
    if ctx ~= nil then merge(ctx, r[2]) end
    return true, unpack(r, 3, r.n)
  end
  local completion, sched = nil, false
  if type(third) == "function" then
    completion = third
    sched = mode == M.ECTP_COMPLETE_CALLBACK_SCHED
  elseif third ~= true then
    error("bad argument #3 to msys.runInPool: boolean or completion "
      .. "function expected (got " .. type(third) .. ")", 2)
  end
  local _ = offpath.context -- make it now, so the coroutine shares it
  offpath.go(start_async, name, fn, completion, sched):on_done(report)
end

-- ---- threadpool statistics ----

local stat_mt = {
  __tostring = function(s)
    return ("threadpool %s: %d threads (%d active), %d queued (max %d), "
      .. "saturation %.2f, %d invocations, %d completed, %d failed, "
      .. "latency p50 %.6f s p99 %.6f s max %.6f s"):format(s.name,
      s.num_threads, s.num_active_threads, s.queue_sz, s.queue_max,
      s.saturation, s.invocations, s.completed, s.failed, s.p50, s.p99,
      s.max)
  end,
}

local function make_stat(name, p)
  local running = p.inflight - p.queued
  if running < 0 then running = 0 end
  if running > p.threads then running = p.threads end
  return setmetatable({
    name = name,
    invocations = p.submitted,
    completed = p.completed,
    failed = p.failed + p.timedout,
    cancelled = p.cancelled,
    queue_sz = p.queued,
    queue_max = p.queue_size,
    queue_hwm = p.queue_hwm,
    job_num_queued = p.queued,
    job_num_running = running,
    num_threads = p.threads,
    num_active_threads = running,
    num_inactive_threads = p.threads - running,
    saturation = p.threads > 0 and running / p.threads or 0,
    p50 = p.p50, p99 = p.p99, max = p.max,
  }, stat_mt)
end

-- msys.threadpool.stat(name_or_id) -> stats or nil; with no argument, a
-- table of every pool's stats keyed by name.
local function stat(pool)
  local pools = offpath.stats().pools
  if pool == nil then
    local all = {}
    for name, p in pairs(pools) do all[name] = make_stat(name, p) end
    return all
  end
  local name = pool
  if math.type(pool) == "integer" then name = names[pool] end
  local p = name ~= nil and pools[name] or nil
  if p == nil then return nil end
  return make_stat(name, p)
end

-- msys.threadpool.count(): how many pools the runtime has.
local function count()
  local n = 0
  for _ in pairs(offpath.stats().pools) do n = n + 1 end
  return n
end

-- msys.threadpool.find(name) -> id, find(id) -> name; nil if none.
local function find(pool)
  if math.type(pool) == "integer" then return names[pool] end
  if type(pool) ~= "string" then return nil end
  if known[pool] then return known[pool] end
  if offpath.stats().pools[pool] == nil then return nil end
  return register(pool)
end

-- ---- globals ----

-- _TLS on the main thread: a view of the running session's
-- offpath.context (nothing outside a handler).
local function no_session()
  error("_TLS: no session here (only handlers and the coroutines they "
    .. "start have one)", 3)
end

local TLS = setmetatable({}, {
  __index = function(_, k)
    local c = offpath.context
    if c ~= nil then return c[k] end
  end,
  __newindex = function(_, k, v)
    local c = offpath.context
    if c == nil then no_session() end
    c[k] = v
  end,
  __pairs = function()
    return next, offpath.context or {}, nil
  end,
  __len = function()
    local c = offpath.context
    return c ~= nil and #c or 0
  end,
})

local function unavailable(name)
  return function()
    error("msys." .. name .. " runs on the main thread only", 2)
  end
end

if offpath.worker == nil then
  msys = rawget(_G, "msys") or {}
  msys.core = msys.core or {}
  msys.core.ECTP_COMPLETE_CALLBACK = M.ECTP_COMPLETE_CALLBACK
  msys.core.ECTP_COMPLETE_CALLBACK_SCHED = M.ECTP_COMPLETE_CALLBACK_SCHED
  msys.runInPool = runInPool
  msys.sleep = offpath.sleep
  msys.threadpool = { stat = stat, count = count, find = find }
  _TLS = TLS
  if rawget(_G, "_OSTLS") == nil then _OSTLS = {} end
else
  -- A worker VM: the names exist, the scheduler's calls do not.
  msys = rawget(_G, "msys") or {}
  msys.core = msys.core or {}
  msys.core.ECTP_COMPLETE_CALLBACK = M.ECTP_COMPLETE_CALLBACK
  msys.core.ECTP_COMPLETE_CALLBACK_SCHED = M.ECTP_COMPLETE_CALLBACK_SCHED
  msys.runInPool = unavailable("runInPool")
  msys.threadpool = { stat = unavailable("threadpool.stat"),
    count = unavailable("threadpool.count"),
    find = unavailable("threadpool.find") }
  msys.sleep = offpath.sleep
end

M.runInPool = runInPool
M.stat = stat
return M
