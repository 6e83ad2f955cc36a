-- SPDX-License-Identifier: MIT
-- offpath/momentum.lua - the Momentum (msys) threadpool interface on top
-- of offpath: msys.runInPool, msys.threadpool.stat/count/find, msys.sleep,
-- msys.registerModule, the msys.core constants (ECTP_COMPLETE_CALLBACK,
-- ECTP_COMPLETE_CALLBACK_SCHED, VALIDATE_CONT, VALIDATE_DONE), and the
-- globals _TLS (session-local storage) and _OSTLS (per OS thread storage).
--
--   require "offpath.momentum"
--   local ok, res = msys.runInPool("IO", function() return work() end)
--   msys.runInPool("CPU", fn, true)                  -- fire-and-forget
--   msys.runInPool("IO", fn, done)                   -- done on the pool thread
--   local ok, res = msys.runInPool("IO", fn, done,   -- done on the scheduler,
--     msys.core.ECTP_COMPLETE_CALLBACK_SCHED)        -- then the results
--
-- Pools are offpath pools, named as the script names them ("IO", "CPU",
-- ...): a name offpath does not know yet is made on first use, with as
-- many threads as the lower-case offpath pool of that name ("io": 4,
-- "cpu": one per core), else 1. Configure them with offpath.configure
-- before first use to choose otherwise. Pool ids are stable: the first
-- time a script uses msys, the pools that exist then and Momentum's "CPU"
-- and "IO" are numbered from 1 in name order; a pool made later gets the
-- next id.
--
-- In a worker VM that runs a runInPool closure or completion, msys is a
-- global too (msys.sleep, msys.core; the scheduler's calls raise).
--
-- _TLS is the session's offpath.context. In a pool closure, _TLS is a copy
-- of it taken at the call; the suspending forms copy the closure's changes
-- back when they resume, the asynchronous forms do not.
--
-- M.compat() installs on_start, on_event and on_stop handlers that drive
-- the modules given to msys.registerModule (init, the validate_* phases,
-- validate_dealloc, deinit) from the input records: see docs/guide.md.
local offpath = require "offpath"

local type, error, tostring, pcall, xpcall = type, error, tostring, pcall,
    xpcall
local next, pairs, ipairs, rawget = next, pairs, ipairs, rawget
local setmetatable, require = setmetatable, require
local pack, unpack, sort = table.pack, table.unpack, table.sort
local traceback = debug.traceback

local M = {}

M.ECTP_COMPLETE_CALLBACK = 0
M.ECTP_COMPLETE_CALLBACK_SCHED = 1
M.VALIDATE_CONT = 0
M.VALIDATE_DONE = 1
M.VCTX_CONN = 0
M.VCTX_MESS = 1
M.ECMESS_CTX_MESS = 1

-- The msys.core constants, in the main VM and in worker VMs.
local function core_constants(core)
  for _, k in ipairs { "ECTP_COMPLETE_CALLBACK", "ECTP_COMPLETE_CALLBACK_SCHED",
    "VALIDATE_CONT", "VALIDATE_DONE", "VCTX_CONN", "VCTX_MESS",
    "ECMESS_CTX_MESS" } do
    core[k] = M[k]
  end
end

-- ---- run in worker VMs ----

-- Momentum's msys is everywhere without a require: make it a global of
-- this worker VM (once) before a closure or completion runs.
local function ensure_msys()
  if rawget(_G, "msys") == nil then require "offpath.momentum" end
end

-- The suspending forms: returns the session copy and the closure's results.
local function run_sync(fn, tls)
  ensure_msys()
  _TLS = tls
  local r = pack(fn())
  _TLS = nil
  return tls, unpack(r, 1, r.n)
end

-- The asynchronous forms: the closure, then the completion (if any) on the
-- same thread with the closure's outcome as pcall gives it.
local function run_async(fn, completion, tls)
  ensure_msys()
  _TLS = tls
  if completion == nil then
    fn()
  else
    completion(xpcall(fn, traceback))
  end
  _TLS = nil
end

-- ---- pools ----

local known = {}   -- name -> id
local names = {}   -- id -> name
local made = {}    -- names of pools known to exist
local numbered = false

local function register(name)
  local id = #names + 1
  names[id] = name
  known[name] = id
  return id
end

-- Number the pools on first use (see the top of the file).
local function number_pools()
  if numbered then return end
  numbered = true
  local list, seen = {}, {}
  for _, name in ipairs { "CPU", "IO" } do
    list[#list + 1], seen[name] = name, true
  end
  for name in pairs(offpath.stats().pools) do
    if not seen[name] then list[#list + 1], seen[name] = name, true end
  end
  sort(list)
  for _, name in ipairs(list) do register(name) end
end

-- The pool name for a name or an id; makes the pool if it does not exist.
local function pool_name(pool, level)
  number_pools()
  if math.type(pool) == "integer" then
    local name = names[pool]
    if name == nil then
      error("msys: no thread pool with id " .. pool, level + 1)
    end
    pool = name
  elseif type(pool) ~= "string" then
    error("bad argument #1 to msys.runInPool: thread pool name or id "
      .. "expected (got " .. type(pool) .. ")", level + 1)
  end
  if made[pool] then return pool end
  local pools = offpath.stats().pools
  if pools[pool] == nil then
    local twin = pools[pool:lower()]
    offpath.configure { pools = { [pool] = { threads = twin and twin.threads
      or 1 } } }
  end
  made[pool] = true
  if known[pool] == nil then register(pool) end
  return pool
end

-- ---- runInPool ----

-- Report a failure nobody can see otherwise through the runtime's error
-- reporting (counted in offpath.stats().errors): an on_done callback that
-- raises.
local function report(ok, err)
  if not ok then error("msys.runInPool: " .. tostring(err), 0) end
end

local function report_later(err)
  offpath.go(function() end):on_done(function()
    report(false, err)
  end)
end

-- Replace the contents of dst with those of src.
local function merge(dst, src)
  for k in next, dst do
    if src[k] == nil then dst[k] = nil end
  end
  for k, v in next, src do dst[k] = v end
end

local ARGUMENTS = { ["1"] = "the closure", ["2"] = "the completion",
  ["3"] = "_TLS" }

-- Say a refusal of offpath.launch in runInPool's terms.
local function restate(err)
  err = tostring(err):gsub("function argument ([123])", ARGUMENTS)
      :gsub("argument ([123])", ARGUMENTS)
      :gsub("%(in offpath%.launch%)$", "(in msys.runInPool)")
  return err
end

-- The suspending forms: (true, results...) or (false, message).
local function run_suspending(name, fn)
  local ctx = offpath.context
  local r = pack(pcall(offpath.run, name, run_sync, fn, ctx or {}))
  if not r[1] then return false, r[2] end
  if ctx ~= nil then merge(ctx, r[2]) end
  return true, unpack(r, 3, r.n)
end

local function cannot_suspend(level)
  error("msys.runInPool: cannot suspend here (the main chunk, a callback "
    .. "or a coroutine offpath does not run); use a form with true or a "
    .. "completion that runs on the pool thread", level + 1)
end

-- msys.runInPool(pool, closure[, async | completion[, mode]])
local function runInPool(pool, fn, third, mode)
  local name = pool_name(pool, 2)
  if type(fn) ~= "function" then
    error("bad argument #2 to msys.runInPool: function expected (got "
      .. type(fn) .. ")", 2)
  end
  if third == nil or third == false then
    if not offpath.can_suspend() then cannot_suspend(2) end
    return run_suspending(name, fn)
  end
  local completion
  if type(third) == "function" then
    completion = third
    if mode == M.ECTP_COMPLETE_CALLBACK_SCHED then
      -- The page's example: the results come back to the caller
      -- ("status, res = ..."), after the completion ran on the scheduler.
      if not offpath.can_suspend() then cannot_suspend(2) end
      local r = pack(run_suspending(name, fn))
      local ok, err = xpcall(completion, traceback, unpack(r, 1, r.n))
      if not ok then report_later("completion: " .. tostring(err)) end
      return unpack(r, 1, r.n)
    end
  elseif third ~= true then
    error("bad argument #3 to msys.runInPool: boolean or completion "
      .. "function expected (got " .. type(third) .. ")", 2)
  end
  -- Asynchronous: the closure is copied now, so a value that cannot cross
  -- is refused here, at the caller's line; no results.
  local ok, task = pcall(offpath.launch, name, run_async, fn, completion,
    offpath.context or {})
  if not ok then error(restate(task), 2) end
  task:on_done(report)
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
    id = known[name],
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
  number_pools()
  local pools = offpath.stats().pools
  if pool == nil then
    local all = {}
    for name, p in pairs(pools) do
      if known[name] == nil then register(name) end
      all[name] = make_stat(name, p)
    end
    return all
  end
  local name = pool
  if math.type(pool) == "integer" then name = names[pool] end
  local p = name ~= nil and pools[name] or nil
  if p == nil then return nil end
  if known[name] == nil then register(name) end
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
  number_pools()
  if math.type(pool) == "integer" then return names[pool] end
  if type(pool) ~= "string" then return nil end
  if known[pool] then return known[pool] end
  if offpath.stats().pools[pool] == nil then return nil end
  return register(pool)
end

-- ---- msys.registerModule and the validation driver ----

local modules = {}   -- { name =, mod = } in registration order

-- msys.registerModule(modname, table)
local function registerModule(modname, mod)
  if type(modname) ~= "string" then
    error("bad argument #1 to msys.registerModule: string expected (got "
      .. type(modname) .. ")", 2)
  end
  if type(mod) ~= "table" then
    error("bad argument #2 to msys.registerModule: table expected (got "
      .. type(mod) .. ")", 2)
  end
  for _, m in ipairs(modules) do
    if m.name == modname then m.mod = mod; return end
  end
  modules[#modules + 1] = { name = modname, mod = mod }
end

-- The message of one record: a table {mailfrom=, rcptto=, headers=, body=,
-- ehlo=, remote_addr=} (JSON records), or the envelope sender (lines).
local Message = {}
Message.__index = Message

local function as_list(v)
  if v == nil then return {} end
  if type(v) == "table" then return v end
  return { v }
end

local function new_message(rec)
  if type(rec) ~= "table" then rec = { mailfrom = tostring(rec) } end
  local headers = {}
  if type(rec.headers) == "table" then
    for k, v in pairs(rec.headers) do headers[k:lower()] = as_list(v) end
  end
  return setmetatable({ rec = rec, rcpts = as_list(rec.rcptto),
    headers = headers, ctx = {} }, Message)
end

function Message:mailfrom() return self.rec.mailfrom end
function Message:rcptto() return self.rcpt or self.rcpts[1] end
function Message:header(name)
  local v = self.headers[tostring(name):lower()]
  local copy = {}
  for i, s in ipairs(v or {}) do copy[i] = s end
  return copy
end
function Message:body() return self.rec.body end
function Message:context_get(_, key) return self.ctx[key] end
function Message:context_set(_, key, value) self.ctx[key] = value end

-- The validation context: set_code and a dictionary per scope.
local Vctx = {}
Vctx.__index = Vctx

function Vctx:set_code(code, text)
  if math.type(code) ~= "integer" then
    error("bad argument #1 to vctx:set_code: integer expected", 2)
  end
  self.code, self.text = code, text and tostring(text) or ""
end
function Vctx:get(scope, key)
  local d = self.dict[scope]
  return d and d[key]
end
function Vctx:set(scope, key, value)
  local d = self.dict[scope]
  if d == nil then d = {}; self.dict[scope] = d end
  d[key] = value
end

local PHASES = {
  { "validate_connect", function(m) return { m.accept } end },
  { "validate_ehlo", function(m) return { m.msg.rec.ehlo or "", m.accept } end },
  { "validate_mailfrom", function(m)
    return { m.msg.rec.mailfrom or "", m.accept } end },
  { "validate_rcptto", "each" },
  { "validate_data", function(m) return { m.msg, m.accept } end },
  { "validate_data_spool", function(m) return { m.msg, m.accept } end },
  { "validate_data_spool_each_rcpt", "each" },
}

-- Call fn(self, args..., vctx) for every module that defines it; false if
-- one returned VALIDATE_DONE.
local function call_phase(s, fname, args)
  for i, m in ipairs(modules) do
    local fn = m.mod[fname]
    if type(fn) == "function" then
      local n = #args
      args[n + 1] = s.vctx
      local r = fn(s.selves[i], unpack(args, 1, n + 1))
      args[n + 1] = nil
      if r == M.VALIDATE_DONE then return false end
    end
  end
  return true
end

-- One record: every phase of every module, in Momentum's order, each
-- module with its own "self" (session-local) table; then validate_dealloc
-- and the verdict as a record: {mailfrom=, code=, text=}.
local function validate(engine, rec)
  local msg = new_message(rec)
  local s = { msg = msg, accept = { remote_addr = msg.rec.remote_addr },
    vctx = setmetatable({ dict = {} }, Vctx), selves = {} }
  for i, m in ipairs(modules) do
    s.selves[i] = setmetatable({}, { __index = m.mod })
  end
  for _, ph in ipairs(PHASES) do
    local go_on = true
    if ph[2] == "each" then
      for _, rcpt in ipairs(msg.rcpts) do
        msg.rcpt = rcpt
        local args = ph[1] == "validate_rcptto" and { msg, rcpt, s.accept }
          or { msg, s.accept }
        go_on = call_phase(s, ph[1], args)
        if not go_on then break end
      end
      msg.rcpt = nil
    else
      go_on = call_phase(s, ph[1], ph[2](s))
    end
    if not go_on or s.vctx.code ~= nil and s.vctx.code >= 400 then break end
  end
  for i, m in ipairs(modules) do
    if type(m.mod.validate_dealloc) == "function" then
      m.mod.validate_dealloc(s.selves[i])
    end
  end
  engine:emit { mailfrom = msg.rec.mailfrom, code = s.vctx.code or 250,
    text = s.vctx.text or "ok" }
end

-- Install the handlers the script does not define: on_start runs each
-- module's init() (which must return true), on_event validates a record,
-- on_stop runs deinit().
function M.compat()
  if rawget(_G, "on_start") == nil then
    on_start = function()
      for _, m in ipairs(modules) do
        if type(m.mod.init) == "function" and m.mod.init(m.mod) ~= true then
          error("msys: module '" .. m.name .. "': init did not return true", 0)
        end
      end
    end
  end
  if rawget(_G, "on_event") == nil then on_event = validate end
  if rawget(_G, "on_stop") == nil then
    on_stop = function()
      for _, m in ipairs(modules) do
        if type(m.mod.deinit) == "function" then m.mod.deinit(m.mod) end
      end
    end
  end
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

msys = rawget(_G, "msys") or {}
msys.core = msys.core or {}
core_constants(msys.core)
msys.sleep = offpath.sleep
if offpath.worker == nil then
  msys.runInPool = runInPool
  msys.threadpool = { stat = stat, count = count, find = find }
  msys.registerModule = registerModule
  _TLS = TLS
  if rawget(_G, "_OSTLS") == nil then _OSTLS = {} end
else
  -- A worker VM: the names exist, the scheduler's calls do not.
  msys.runInPool = unavailable("runInPool")
  msys.threadpool = { stat = unavailable("threadpool.stat"),
    count = unavailable("threadpool.count"),
    find = unavailable("threadpool.find") }
  msys.registerModule = unavailable("registerModule")
end

M.runInPool = runInPool
M.stat = stat
M.validate = validate
return M
