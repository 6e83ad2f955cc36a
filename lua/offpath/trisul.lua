-- SPDX-License-Identifier: MIT
-- offpath/trisul.lua - the Trisul script interface on top of offpath:
-- a global T with T.async (schedule, copy, cat, rm, copybuffer,
-- pending_items), run by the script's own pool, sized by
-- TrisulPlugin.request_async_workers (default 1, as in Trisul), and
-- Trisul's engine methods (update_counter, add_alert, ...) on the engine
-- that onresult receives, mapped onto offpath's engine.
--
--   require "offpath.trisul"
--   TrisulPlugin = { request_async_workers = 2 }
--   T.async:schedule { data = path,
--     onexecute = function(indata) ... return result end,   -- a worker
--     onresult = function(engine, req, response) ... end }   -- main thread
--
-- Differences from Trisul: `data` may be any value that can cross between
-- Lua states (not only a string), and onexecute may use upvalues (they are
-- copied by value). onexecute runs in a worker VM, where the main VM's
-- globals are not visible. Every T.async call returns its offpath task (an
-- addition; Trisul returns nothing). Methods work with `:` and with `.`.
--
-- The pool is sized on first use by request_async_workers, unless it
-- exists by then (offpath run --pool trisul=N, or offpath.configure): a
-- pool configured explicitly keeps its size.
--
-- The engine given to onresult, onerror and the plugin callbacks is
-- M.engine: Trisul's methods and offpath's own (count, gauge, alert, emit,
-- stats). It is main-thread only: used inside onexecute, any method raises
-- an error that says so.
--
-- M.compat() installs on_start, on_event and on_stop handlers that drive
-- TrisulPlugin (onload, filex_monitor.onfile_http, onunload) from the
-- input records: see docs/guide.md.
--
-- In a worker VM (e.g. required by onexecute) the module only defines T,
-- and T.async raises: work is handed out from the main thread.
local offpath = require "offpath"

local type, error, tostring, select = type, error, tostring, select
local pairs, ipairs = pairs, ipairs
local getmetatable, setmetatable, rawget = getmetatable, setmetatable, rawget
local open, remove, time = io.open, os.remove, os.time
local rawequal, getupvalue = rawequal, debug.getupvalue

local M = {}

-- The name of the pool T.async uses, unless new{} is told otherwise.
M.POOL = "trisul"

-- ---- work run in the worker VMs (upvalues cross by name or by value) ----

local CHUNK = 65536

-- Copy src to dst; mode "wb" copies, "ab" appends (cat).
local function copy_file(what, src, dst, mode)
  local i, err = open(src, "rb")
  if not i then error(what .. ": cannot open source: " .. err, 0) end
  local o, err2 = open(dst, mode)
  if not o then
    i:close()
    error(what .. ": cannot open destination: " .. err2, 0)
  end
  while true do
    local b = i:read(CHUNK)
    if b == nil then break end
    local ok, werr = o:write(b)
    if not ok then
      i:close(); o:close()
      error(what .. ": cannot write " .. dst .. ": " .. tostring(werr), 0)
    end
  end
  i:close()
  local ok, cerr = o:close()
  if not ok then error(what .. ": cannot close " .. dst .. ": " .. cerr, 0) end
end

-- Delete a file if present: a missing file is not an error (Trisul).
local ENOENT = 2
local function rm_file(path)
  local ok, err, code = remove(path)
  if not ok and code ~= ENOENT then error("rm: " .. err, 0) end
end

-- Write bytes at the end of path, or at byte offset seekpos (0-based,
-- reassembly style) in the existing file, which is made if missing.
local function write_buffer(bytes, path, seekpos)
  local f, err
  if seekpos == nil then
    f, err = open(path, "ab")
  else
    f = open(path, "r+b")
    if f == nil then f, err = open(path, "w+b") end
  end
  if not f then error("copybuffer: cannot open " .. err, 0) end
  if seekpos ~= nil then
    local ok, serr = f:seek("set", seekpos)
    if not ok then
      f:close()
      error("copybuffer: cannot seek in " .. path .. ": " .. serr, 0)
    end
  end
  local ok, werr = f:write(bytes)
  if not ok then
    f:close()
    error("copybuffer: cannot write " .. path .. ": " .. tostring(werr), 0)
  end
  local cok, cerr = f:close()
  if not cok then error("copybuffer: cannot close " .. path .. ": " .. cerr, 0) end
end

-- ---- the engine ----

local MAIN_ONLY = "the engine is main-thread only and onexecute runs in a "
  .. "worker: return what you need from onexecute and use the engine in "
  .. "onresult(engine, data, result)"

-- offpath's engine, on the main thread; in a worker, the error that says
-- why not (raised at the caller of the method).
local function host_engine(method)
  if offpath.worker ~= nil then
    error("engine:" .. method .. ": " .. MAIN_ONLY, 3)
  end
  local e = offpath.engine
  if e == nil then
    error("engine:" .. method .. ": this host has no engine", 3)
  end
  return e
end

local Engine = {}

local function counter_name(guid, key, meter)
  return tostring(guid) .. "/" .. tostring(key) .. "/" .. tostring(meter)
end

-- update_counter(guid, key, meter, value): adds value to the counter
-- "guid/key/meter".
function Engine:update_counter(guid, key, meter, value)
  return host_engine("update_counter"):count(counter_name(guid, key, meter),
    value)
end

-- update_counter_raw: the same (Trisul's variant for many keys and for
-- gauge and average meters).
function Engine:update_counter_raw(guid, key, meter, value)
  return host_engine("update_counter_raw"):count(counter_name(guid, key,
    meter), value)
end

local function alert_text(alertkey, priority, message, flowkey, extra)
  local s = tostring(alertkey) .. " (priority " .. tostring(priority) .. ")"
  if extra ~= nil then s = s .. " " .. extra end
  if flowkey ~= nil then s = s .. " flow " .. tostring(flowkey) end
  return s .. ": " .. tostring(message)
end

-- add_alert(guid, flowkey, alertkey, priority, message)
function Engine:add_alert(_, flowkey, alertkey, priority, message)
  host_engine("add_alert"):alert(alert_text(alertkey, priority, message,
    flowkey))
end

-- add_alert_full(guid, flowkey, alertkey, classification, priority,
-- message[, status])
function Engine:add_alert_full(_, flowkey, alertkey, classification,
                               priority, message, status)
  local extra = "[" .. tostring(classification) .. "]"
  if status ~= nil then extra = extra .. " " .. tostring(status) end
  host_engine("add_alert_full"):alert(alert_text(alertkey, priority, message,
    flowkey, extra))
end

-- add_alert_tca(guid, tca_id, status, message)
function Engine:add_alert_tca(_, tca_id, status, message)
  host_engine("add_alert_tca"):alert("TCA " .. tostring(tca_id) .. " "
    .. tostring(status) .. ": " .. tostring(message))
end

-- Metadata Trisul stores (key labels, resources, edges, attributes, flow
-- tags) becomes an output record naming the method and its arguments.
local RECORDS = {
  update_key_info = { "guid", "key", "label", "description" },
  add_resource = { "guid", "flowkey", "uri", "label" },
  add_edge = { "vertex_guid1", "vertex1", "vertex_guid2", "vertex2" },
  add_flow_edges = { "flowkey", "vertex_guid", "vertex" },
  set_key_attribute = { "guid", "key", "attribute", "value" },
  add_flow_attribute = { "flowkey", "attribute", "value" },
  tag_flow = { "flowkey", "tag" },
}

for method, fields in pairs(RECORDS) do
  Engine[method] = function(_, ...)
    local rec = { trisul = method }
    for i, f in ipairs(fields) do
      local v = select(i, ...)
      if v ~= nil then rec[f] = v end
    end
    host_engine(method):emit(rec)
  end
end

-- timestamp(): seconds, microseconds (the wall clock).
function Engine:timestamp()
  host_engine("timestamp")
  return time(), 0
end

-- What needs a packet, a flow or Trisul's pipeline has no equivalent.
local NOTAVAIL = {
  update_counter_bytes = "there is no packet here; use "
    .. "update_counter(guid, key, meter, bytes)",
  add_flow_counter = "there are no flows here",
  reset_flow_counter = "there are no flows here",
  update_flow = "there are no flows here",
  new_flow_record = "there are no flows here",
  set_flow_duration = "there are no flows here",
  disable_reassembly = "there are no flows here",
  post_message_frontend = "call the other script's function, or use "
    .. "offpath.go",
  post_message_backend = "call the other script's function, or use "
    .. "offpath.go",
  instanceid = "offpath has one engine",
  probeid = "offpath has one engine",
}

for method, why in pairs(NOTAVAIL) do
  Engine[method] = function()
    host_engine(method)
    error("ERR_NOTAVAIL: " .. method .. "() is not available in offpath: "
      .. why, 2)
  end
end

-- offpath's own methods (count, gauge, alert, emit, stats) pass through.
M.engine = setmetatable({}, {
  __index = function(_, k)
    local m = Engine[k]
    if m ~= nil then return m end
    if type(k) ~= "string" then return nil end
    return function(_, ...)
      local e = host_engine(k)
      local f = e[k]
      if f == nil then
        error("engine:" .. k .. ": no such method", 2)
      end
      return f(e, ...)
    end
  end,
})

-- ---- the T.async object ----

local Async = {}
Async.__index = Async

-- Accept both T.async:m(...) and T.async.m(...): return the object and the
-- arguments without it.
local function split(default, self, ...)
  if getmetatable(self) == Async then return self, ... end
  return default, self, ...
end

local function check_string(v, what, name)
  if type(v) ~= "string" then
    error(("bad argument to T.async:%s: '%s' must be a string (got %s)")
      :format(what, name, type(v)), 3)
  end
end

-- Make the pool on first use: request_async_workers is read then, so a
-- TrisulPlugin table defined after the require counts.
local function ensure_pool(a)
  if a.ready then return a.pool end
  local plugin = a.plugin
  if plugin == nil then plugin = rawget(_G, "TrisulPlugin") end
  local n = type(plugin) == "table" and plugin.request_async_workers or nil
  if n ~= nil and (math.type(n) ~= "integer" or n < 1) then
    error("T.async: TrisulPlugin.request_async_workers must be a positive "
      .. "integer (got " .. tostring(n) .. ")", 3)
  end
  -- A pool that exists was configured explicitly (offpath run --pool, or
  -- offpath.configure): that size wins, as for any pool.
  if offpath.stats().pools[a.pool] == nil then
    offpath.configure { pools = { [a.pool] = { threads = n or 1 } } }
  end
  a.ready = true
  return a.pool
end

-- Count an item as pending until its task ends; report a failure nobody
-- handles through the runtime's error reporting.
local function track(a, what, task)
  a.pending = a.pending + 1
  task:on_done(function(ok, err)
    a.pending = a.pending - 1
    if not ok then error("T.async:" .. what .. ": " .. tostring(err), 0) end
  end)
  return task
end

local function launch(a, what, fn, ...)
  if a.worker then error("T.async:" .. what .. " runs on the main thread only", 3) end
  local pool = ensure_pool(a)
  return track(a, what, offpath.launch(pool, fn, ...))
end

-- Say why offpath.schedule refused a block, in Trisul's terms: the
-- host's engine among onexecute's upvalues gets Trisul's advice.
local function refusal(err, onexecute)
  local engine = offpath.engine
  for i = 1, 255 do
    local name, v = getupvalue(onexecute, i)
    if name == nil then break end
    if engine ~= nil and rawequal(v, engine) then
      return "T.async:schedule: onexecute uses the engine (upvalue '"
        .. name .. "'): " .. MAIN_ONLY
    end
  end
  return (tostring(err):gsub("argument 1", "data")
    :gsub("of function", "of onexecute")
    :gsub("%(in offpath%.schedule%)$", "(in T.async:schedule)"))
end

-- T.async:schedule{data=, onexecute=, onresult=[, onerror=, timeout=]}
-- onexecute(data) runs in a worker; onresult(engine, data, result) runs on
-- the main thread if onexecute returned a value (Trisul calls it only
-- then). onerror(engine, data, err, traceback) is an addition (the
-- traceback of an error value that is not a string): without it a failure
-- is reported through the runtime's error reporting.
function Async.schedule(...)
  local a, block = split(nil, ...)
  a = a or M.async
  if a.worker then error("T.async:schedule runs on the main thread only", 2) end
  if type(block) ~= "table" then
    error("bad argument to T.async:schedule: expected a table {data=, "
      .. "onexecute=, onresult=} (got " .. type(block) .. ")", 2)
  end
  local onexecute, onresult, onerror = block.onexecute, block.onresult,
      block.onerror
  if type(onexecute) ~= "function" then
    error("bad argument to T.async:schedule: 'onexecute' must be a function", 2)
  end
  if onresult ~= nil and type(onresult) ~= "function" then
    error("bad argument to T.async:schedule: 'onresult' must be a function", 2)
  end
  if onerror ~= nil and type(onerror) ~= "function" then
    error("bad argument to T.async:schedule: 'onerror' must be a function", 2)
  end
  local pool = ensure_pool(a)
  local ok, task = pcall(offpath.schedule, {
    pool = pool, timeout = block.timeout, data = block.data,
    onexecute = onexecute,
    onresult = function(_, data, result)
      a.pending = a.pending - 1
      if result ~= nil and onresult ~= nil then
        return onresult(M.engine, data, result)
      end
    end,
    onerror = function(_, data, err, tb)
      a.pending = a.pending - 1
      if onerror ~= nil then return onerror(M.engine, data, err, tb) end
      -- An error value's traceback comes beside it (a string has its own).
      error("T.async:schedule: " .. tostring(err) ..
        (type(err) ~= "string" and tb ~= nil and "\n" .. tb or ""), 0)
    end,
  })
  if not ok then error(refusal(task, onexecute), 2) end
  a.pending = a.pending + 1
  return task
end

-- T.async:copy(from_file, to_file): copies, creating or overwriting.
function Async.copy(...)
  local a, src, dst = split(M.async, ...)
  check_string(src, "copy", "from_file"); check_string(dst, "copy", "to_file")
  return launch(a, "copy", copy_file, "copy", src, dst, "wb")
end

-- T.async:cat(from_file, to_file): appends, creating to_file if missing.
function Async.cat(...)
  local a, src, dst = split(M.async, ...)
  check_string(src, "cat", "from_file"); check_string(dst, "cat", "to_file")
  return launch(a, "cat", copy_file, "cat", src, dst, "ab")
end

-- T.async:rm(filename): deletes the file if present.
function Async.rm(...)
  local a, path = split(M.async, ...)
  check_string(path, "rm", "filename")
  return launch(a, "rm", rm_file, path)
end

-- The bytes of a buffer: a string, or an object with a tostring method or
-- a __tostring metamethod (Trisul's Buffer is turned into its bytes here,
-- on the main thread, since userdata cannot cross).
local function buffer_bytes(buf)
  if type(buf) == "string" then return buf end
  local ok, m = pcall(function() return buf.tostring end)
  if ok and type(m) == "function" then
    local s = m(buf)
    if type(s) == "string" then return s end
  end
  local mt = getmetatable(buf)
  if type(mt) == "table" and mt.__tostring ~= nil then return tostring(buf) end
  error("bad argument to T.async:copybuffer: 'from_buffer' must be a string "
    .. "or a buffer object (got " .. type(buf) .. ")", 3)
end

-- T.async:copybuffer(from_buffer, to_file[, seekpos]): appends the bytes,
-- or writes them at byte offset seekpos.
function Async.copybuffer(...)
  local a, buf, path, seekpos = split(M.async, ...)
  local bytes = buffer_bytes(buf)
  check_string(path, "copybuffer", "to_file")
  if seekpos ~= nil and (math.type(seekpos) ~= "integer" or seekpos < 0) then
    error("bad argument to T.async:copybuffer: 'seekpos' must be a "
      .. "non-negative integer", 2)
  end
  return launch(a, "copybuffer", write_buffer, bytes, path, seekpos)
end

-- T.async:pending_items(): items handed out and not yet finished (queued
-- or running, their onresult not yet run).
function Async.pending_items(...)
  local a = split(M.async, ...)
  return a.pending
end

-- A T.async object on its own pool: new{pool=NAME, plugin=TABLE}. plugin
-- gives request_async_workers (default: the global TrisulPlugin). For a
-- host that runs several Trisul scripts in one runtime, each with its
-- pool as in Trisul.
function M.new(opts)
  opts = opts or {}
  local pool = opts.pool or M.POOL
  if type(pool) ~= "string" then
    error("bad argument to trisul.new: 'pool' must be a string", 2)
  end
  return setmetatable({ pool = pool, plugin = opts.plugin, pending = 0,
    ready = false, worker = offpath.worker ~= nil }, Async)
end

-- ---- driving a plugin (offpath run --compat trisul) ----

local function plugin()
  local p = rawget(_G, "TrisulPlugin")
  if type(p) ~= "table" then
    error("--compat trisul: the script defines no TrisulPlugin table", 0)
  end
  return p
end

-- The arguments of filex_monitor.onfile_http for one record: a path
-- (lines), or a table {path=, timestamp=, flowkey=, req_header=,
-- resp_header=, length=} (JSON).
local function file_args(rec)
  if type(rec) ~= "table" then rec = { path = tostring(rec) } end
  if type(rec.path) ~= "string" then
    error("--compat trisul: a record needs a 'path'", 0)
  end
  return rec.timestamp or time(), rec.flowkey, rec.path, rec.req_header,
    rec.resp_header, rec.length
end

-- Install the handlers the script does not define: on_start calls
-- TrisulPlugin.onload(), on_event passes each record to
-- TrisulPlugin.filex_monitor.onfile_http(engine, timestamp, flowkey, path,
-- req_header, resp_header, length), on_stop calls onunload().
function M.compat()
  if rawget(_G, "on_start") == nil then
    on_start = function()
      local p = plugin()
      if type(p.onload) == "function" then p.onload() end
    end
  end
  if rawget(_G, "on_event") == nil then
    on_event = function(_, rec)
      local fm = plugin().filex_monitor
      local fn = type(fm) == "table" and fm.onfile_http or nil
      if type(fn) ~= "function" then
        error("--compat trisul: TrisulPlugin.filex_monitor.onfile_http is "
          .. "not defined", 0)
      end
      return fn(M.engine, file_args(rec))
    end
  end
  if rawget(_G, "on_stop") == nil then
    on_stop = function()
      local p = plugin()
      if type(p.onunload) == "function" then p.onunload() end
    end
  end
end

M.async = M.new()
if rawget(_G, "T") == nil then T = {} end
T.async = M.async

return M
