-- SPDX-License-Identifier: MIT
-- trisul.lua - the Trisul interface: T.async schedule, copy, cat, rm,
-- copybuffer, pending_items, the pool sized by request_async_workers (or
-- by an explicit configuration), and Trisul's engine methods.
-- LABELS: compat tsan
local tap = require "_tap"
local offpath = require "offpath"
local trisul = require "offpath.trisul"

-- Defined after the require, as Trisul scripts do: read on first use.
TrisulPlugin = { request_async_workers = 3 }

-- A pool configured explicitly, as `--pool NAME=N` does; it has started
-- by the time on_start runs.
offpath.configure { pools = { trisul_cli = { threads = 2 } } }

local function tmpname()
  local n = os.tmpname()
  os.remove(n)
  return n
end

local function readall(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function writeall(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local function errors() return offpath.stats().errors end

tap.test("T is global and the pool is made on first use", function()
  tap.eq(type(T), "table"); tap.eq(T.async, trisul.async)
  tap.eq(offpath.stats().pools.trisul, nil, "no pool before first use")
  tap.eq(T.async:pending_items(), 0)
  local t = T.async:schedule { data = 1, onexecute = function(d) return d end }
  t:wait()
  tap.eq(offpath.stats().pools.trisul.threads, 3,
    "request_async_workers sizes the pool")
end)

tap.test("request_async_workers defaults to 1 worker", function()
  local a = trisul.new { pool = "trisul_default", plugin = {} }
  a:schedule { onexecute = function() end }:wait()
  tap.eq(offpath.stats().pools.trisul_default.threads, 1)
  tap.err("request_async_workers must be a positive integer", function()
    trisul.new { pool = "trisul_bad", plugin = { request_async_workers = 0 } }
      :schedule { onexecute = function() end }
  end)
end)

tap.test("schedule: onexecute in a worker, onresult(engine, req, response)",
  function()
  local data = { path = "/x/y", n = 2 }
  local suffix = "!"  -- an upvalue: Trisul would not allow it
  local seen = {}
  local t = T.async:schedule {
    data = data,
    onexecute = function(indata)
      local me = offpath.worker()
      return indata.path .. suffix .. me.pool .. indata.n
    end,
    onresult = tap.expect(function(engine, req, response)
      seen.engine, seen.req, seen.response = engine, req, response
      seen.can_suspend = offpath.can_suspend()
    end, 1),
  }
  t:wait()
  tap.eq(seen.req, data, "onresult gets the original data")
  tap.eq(seen.response, "/x/y!trisul2")
  tap.eq(seen.engine, trisul.engine, "Trisul's engine")
  tap.eq(seen.can_suspend, false, "onresult runs where nothing may suspend")
  tap.eq(T.async:pending_items(), 0)
end)

tap.test("schedule: no onresult when onexecute returns nothing", function()
  local ran = false
  local t = T.async:schedule {
    data = "d",
    onexecute = function() end,
    onresult = tap.expect(nil, 0),
  }
  t:wait()
  tap.eq(t:status(), "done")
  -- the dot form works too
  T.async.schedule { onexecute = function() return 1 end,
    onresult = tap.expect(function() ran = true end, 1) }:wait()
  tap.eq(ran, true)
end)

tap.test("schedule: a failure goes to onerror, else it is reported",
  function()
  local got
  local t = T.async:schedule {
    data = "req",
    onexecute = function() error("lookup failed") end,
    onresult = tap.expect(nil, 0),
    onerror = tap.expect(function(engine, req, err)
      got = { req = req, err = err }
    end, 1),
  }
  tap.err("lookup failed", t.wait, t)
  tap.eq(got.req, "req"); tap.ok(got.err:find("trisul.lua:%d+: lookup failed"))
  local before = errors()
  local t2 = T.async:schedule { onexecute = function() error("oops") end,
    onresult = tap.expect(nil, 0) }
  pcall(t2.wait, t2)
  tap.eq(errors(), before + 1, "an unhandled failure is counted")
  tap.eq(T.async:pending_items(), 0, "failures end the pending item")
end)

tap.test("schedule: an error value reaches onerror with its traceback",
  function()
  local got
  local t = T.async:schedule {
    data = "req",
    onexecute = function() error({ code = 5 }) end,
    onerror = tap.expect(function(engine, req, err, tb)
      got = { err = err, tb = tb }
    end, 1),
  }
  pcall(t.wait, t)
  tap.eq(type(got.err), "table"); tap.eq(got.err.code, 5)
  tap.ok(type(got.tb) == "string" and got.tb:find("stack traceback"),
    tostring(got.tb))
end)

tap.test("schedule: bad blocks are refused at once", function()
  local n = T.async:pending_items()
  tap.err("expected a table", T.async.schedule, T.async, "x")
  tap.err("'onexecute' must be a function", T.async.schedule, T.async,
    { data = 1 })
  tap.err("'onresult' must be a function", T.async.schedule, T.async,
    { onexecute = function() end, onresult = 1 })
  local co = coroutine.create(function() end)
  tap.err("cannot copy thread", T.async.schedule, T.async,
    { data = co, onexecute = function() end })
  tap.eq(T.async:pending_items(), n, "refusals are not pending")
end)

tap.test("pending_items counts what is queued or running", function()
  local tasks = {}
  for i = 1, 5 do
    tasks[i] = T.async:schedule { data = i,
      onexecute = function(x) offpath.sleep(0.05); return x end,
      onresult = tap.expect(nil, 1) }
  end
  local src = tmpname()
  writeall(src, "abc")
  tasks[6] = T.async:copy(src, src .. ".copy")
  tap.eq(T.async:pending_items(), 6)
  for i = 1, 6 do tasks[i]:wait() end
  offpath.sleep(0)  -- on_done callbacks of copy run on the next turn
  tap.eq(T.async:pending_items(), 0)
  os.remove(src); os.remove(src .. ".copy")
end)

tap.test("copy and cat, with binary data larger than one chunk", function()
  local src, dst = tmpname(), tmpname()
  local parts = {}
  for i = 1, 10000 do parts[i] = string.pack("<I4", i) .. "\0line\n" end
  local body = table.concat(parts)
  tap.ok(#body > 65536)
  writeall(src, body)
  writeall(dst, "old contents that copy overwrites")
  T.async:copy(src, dst):wait()
  tap.eq(readall(dst), body)
  T.async:cat(src, dst):wait()
  tap.eq(readall(dst), body .. body)
  local fresh = tmpname()
  T.async.cat(src, fresh):wait()  -- dot form; cat creates the target
  tap.eq(readall(fresh), body)
  os.remove(src); os.remove(dst); os.remove(fresh)
end)

tap.test("rm deletes, and a missing file is not an error", function()
  local p = tmpname()
  writeall(p, "x")
  T.async:rm(p):wait()
  tap.eq(readall(p), nil)
  local before = errors()
  local t = T.async:rm(p)
  t:wait()
  tap.eq(t:status(), "done")
  offpath.sleep(0)
  tap.eq(errors(), before)
end)

tap.test("copybuffer appends, or writes at seekpos", function()
  local p = tmpname()
  T.async:copybuffer("hello ", p):wait()
  T.async:copybuffer("world", p):wait()
  tap.eq(readall(p), "hello world")
  T.async:copybuffer("W", p, 6):wait()
  tap.eq(readall(p), "hello World")
  -- a buffer object with a tostring method, like Trisul's Buffer
  local buf = { bytes = "\0\1\2", tostring = function(self) return self.bytes end }
  T.async.copybuffer(buf, p, 11):wait()
  tap.eq(readall(p), "hello World\0\1\2")
  local fresh = tmpname()
  T.async:copybuffer("xy", fresh, 3):wait()  -- made if missing
  tap.eq(readall(fresh), "\0\0\0xy")
  tap.err("'seekpos' must be a non%-negative integer", T.async.copybuffer,
    T.async, "x", p, -1)
  tap.err("'from_buffer' must be a string", T.async.copybuffer, T.async, 42, p)
  os.remove(p); os.remove(fresh)
end)

tap.test("file errors end the item once and are reported", function()
  local missing = tmpname()
  local before, pending = errors(), T.async:pending_items()
  local t = T.async:copy(missing, missing .. ".out")
  tap.eq(T.async:pending_items(), pending + 1)
  tap.err("^copy: cannot open source: ", t.wait, t)
  offpath.sleep(0)
  tap.eq(errors(), before + 1)
  tap.eq(T.async:pending_items(), pending)
  local t2 = T.async:cat(arg and arg[0] or "/dev/null",
    "/nonexistent-dir/f")
  tap.err("^cat: cannot open destination: ", t2.wait, t2)
  tap.eq(t2:status(), "failed")
  local t3 = T.async:copybuffer("x", "/nonexistent-dir/f")
  tap.err("^copybuffer: cannot open", t3.wait, t3)
  offpath.sleep(0)
  tap.eq(errors(), before + 3)
  tap.err("'from_file' must be a string", T.async.copy, T.async, nil, "x")
  tap.err("'filename' must be a string", T.async.rm, T.async, {})
end)

tap.test("T.async refuses to run in a worker VM", function()
  local msg = offpath.run("io", function()
    require "offpath.trisul"
    local ok, err = pcall(T.async.copy, T.async, "a", "b")
    return err
  end)
  tap.ok(msg:find("runs on the main thread only"), msg)
end)

tap.test("request_async_workers does not resize a configured pool", function()
  local a = trisul.new { pool = "trisul_cli",
    plugin = { request_async_workers = 5 } }
  local t = a:schedule { data = 2, onexecute = function(d) return d * 2 end }
  tap.eq(t:wait(), 4, "no 'pool has already started' failure")
  tap.eq(offpath.stats().pools.trisul_cli.threads, 2, "the configuration wins")
end)

local G = "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A87}"

tap.test("Trisul's engine methods in onresult map onto offpath's engine",
  function()
  local stats = function() return offpath.engine:stats() end
  local alerts = stats().alerts
  local got
  T.async:schedule {
    data = "182.28.22.123",
    onexecute = function(ip) return ip end,
    onresult = function(engine, req, ip)
      engine:update_counter(G, ip, 1, 288378)
      engine:update_counter(G, ip, 1, 2)
      engine:update_counter_raw(G, ip, 5, 10)
      engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", nil,
        "RAMNIT-DETECTED", 1, "A potential EK was detected")
      engine:add_alert_full("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", "fk",
        "SIG-1", "trojan", 2, "seen", "ALARM")
      engine:add_alert_tca("{03AC6B72-FDB7-44C0-9B8C-7A1975C1C5BA}", 7,
        "FIRED", "over the threshold")
      local total = engine:count("own counter", 3) -- offpath's, through
      engine:gauge("own gauge", 1.5)
      got = { ts = engine:timestamp(), total = total,
        notavail = select(2, pcall(engine.update_counter_bytes, engine, G,
          ip, 0)),
        nosuch = select(2, pcall(engine.no_such_method, engine)) }
    end,
  }:wait()
  local c = stats().counters
  tap.eq(c[G .. "/182.28.22.123/1"], 288380)
  tap.eq(c[G .. "/182.28.22.123/5"], 10)
  tap.eq(c["own counter"], 3); tap.eq(got.total, 3)
  tap.eq(stats().gauges["own gauge"], 1.5)
  tap.eq(stats().alerts, alerts + 3)
  tap.eq(math.type(got.ts), "integer")
  tap.ok(got.notavail:find("ERR_NOTAVAIL: update_counter_bytes%(%) is not "
    .. "available in offpath: there is no packet here"), got.notavail)
  tap.ok(got.nosuch:find("engine:no_such_method: no such method"), got.nosuch)
end)

tap.test("the engine inside onexecute: main-thread only, use onresult",
  function()
  local got
  local t = T.async:schedule {
    data = "k",
    onexecute = function(key)
      trisul.engine:update_counter(G, key, 0, 1)
    end,
    onerror = function(engine, req, err) got = err end,
  }
  pcall(t.wait, t)
  tap.ok(got:find("engine:update_counter: the engine is main-thread only",
    1, true), got)
  tap.ok(got:find("use the engine in onresult(engine, data, result)", 1, true),
    got)
  tap.ok(got:find("trisul.lua:%d+: engine:update_counter"), got)
  -- the engine handed to a plugin callback, captured by onexecute
  local engine = trisul.engine
  got = nil
  t = T.async:schedule {
    onexecute = function() return engine:count("x") end,
    onerror = function(_, _, err) got = err end,
  }
  pcall(t.wait, t)
  tap.ok(got:find("engine:count: the engine is main-thread only", 1, true), got)
end)

tap.test("a block that cannot cross is refused at the caller's line", function()
  local co = coroutine.create(function() end)
  local line
  local e = tap.err("cannot copy thread", function()
    line = debug.getinfo(1, "l").currentline + 1
    T.async:schedule { data = co, onexecute = function() end }
  end)
  tap.ok(e:find("trisul.lua:" .. line .. ": cannot copy thread (data) "
    .. "(in T.async:schedule)", 1, true), e)
  local fh = assert(io.tmpfile())
  e = tap.err("cannot copy userdata", function()
    line = debug.getinfo(1, "l").currentline + 1
    T.async:schedule { onexecute = function() return fh end }
  end)
  tap.ok(e:find("trisul.lua:" .. line .. ": cannot copy userdata (upvalue "
    .. "'fh' of onexecute) (in T.async:schedule)", 1, true), e)
  fh:close()
  -- The host's own engine in onexecute: Trisul's advice. (The coroutine
  -- makes the copy fail here; the runtime refuses the engine's methods
  -- themselves too.)
  local engine = offpath.engine
  e = tap.err("onexecute uses the engine", function()
    T.async:schedule { onexecute = function()
      engine:count("x"); return co end }
  end)
  tap.ok(e:find("T.async:schedule: onexecute uses the engine (upvalue "
    .. "'engine'): the engine is main-thread only", 1, true), e)
  tap.eq(T.async:pending_items(), 0)
end)
