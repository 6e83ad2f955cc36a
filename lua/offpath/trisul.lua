-- offpath/trisul.lua - the Trisul script interface on top of offpath:
-- a global T with T.async (schedule, copy, cat, rm, copybuffer,
-- pending_items), run by the script's own pool, sized by
-- TrisulPlugin.request_async_workers (default 1, as in Trisul).
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
-- In a worker VM (e.g. required by onexecute) the module only defines T,
-- and T.async raises: work is handed out from the main thread.
local offpath = require "offpath"

local type, error, tostring, select = type, error, tostring, select
local getmetatable, setmetatable, rawget = getmetatable, setmetatable, rawget
local open, remove = io.open, os.remove

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
  local exists = offpath.stats().pools[a.pool] ~= nil
  if not exists or n ~= nil then
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

-- T.async:schedule{data=, onexecute=, onresult=[, onerror=, timeout=]}
-- onexecute(data) runs in a worker; onresult(engine, data, result) runs on
-- the main thread if onexecute returned a value (Trisul calls it only
-- then). onerror(engine, data, err) is an addition: without it a failure
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
  local task = offpath.schedule {
    pool = pool, timeout = block.timeout, data = block.data,
    onexecute = onexecute,
    onresult = function(engine, data, result)
      a.pending = a.pending - 1
      if result ~= nil and onresult ~= nil then
        return onresult(engine, data, result)
      end
    end,
    onerror = function(engine, data, err)
      a.pending = a.pending - 1
      if onerror ~= nil then return onerror(engine, data, err) end
      error("T.async:schedule: " .. tostring(err), 0)
    end,
  }
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

M.async = M.new()
if rawget(_G, "T") == nil then T = {} end
T.async = M.async

return M
