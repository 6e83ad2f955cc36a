-- SPDX-License-Identifier: MIT
-- host-objects.lua - host objects never reach a worker: the engine's
-- methods (C functions of the host) and userdata are refused at submit
-- time, on the main thread, with their path and a hint, however they are
-- captured (an upvalue, an argument, a Trisul onexecute, a Momentum
-- closure). Only library and module functions cross, by name.
-- LABELS: core
local tap = require "_tap"
local offpath = require "offpath"
local momentum = require "offpath.momentum"
require "offpath.trisul"

TrisulPlugin = { request_async_workers = 1 }

local HINT = "engine methods run on the main thread; call them in the "
  .. "handler or in on_done"

local function plain(s) return (s:gsub("%p", "%%%0")) end

tap.test("an engine method captured as an upvalue is refused", function()
  local engine = offpath.engine
  local failed = offpath.stats().pools.io.failed
  local e = tap.err("cannot copy C function %(upvalue 'engine' of function "
    .. "field '%w+'%): " .. plain(HINT), offpath.run, "io", function()
      return engine:count("x")
    end)
  tap.ok(e:find("in offpath.run", 1, true), e)
  local count = engine.count
  tap.err("cannot copy C function %(upvalue 'count' of function%): "
    .. plain(HINT), offpath.launch, "io", function()
      return count(engine, "x")
    end)
  tap.eq(offpath.stats().pools.io.failed, failed, "refused, never run")
end)

tap.test("the engine passed as an argument is refused", function()
  tap.err("cannot copy C function %(argument 1 field '%w+'%): " .. plain(HINT),
    offpath.run, "io", function(e) return e end, offpath.engine)
  tap.err("cannot copy C function %(argument 2%): " .. plain(HINT),
    offpath.run, "io", function() end, 1, offpath.engine.emit)
end)

tap.test("a C function that has no name in the worker is refused", function()
  local iter = ipairs({}) -- a C function in no module
  tap.err("cannot copy C function %(upvalue 'iter' of function%): only "
    .. "library and module functions cross, by name", offpath.run, "io",
    function() return iter end)
  -- library functions still cross, to the worker's own copy
  local fmt = string.format
  tap.eq(offpath.run("io", function() return fmt("%d", 42) end), "42")
end)

tap.test("userdata is refused with its path", function()
  local db = offpath.sqlite.open(":memory:")
  tap.err("cannot copy userdata %(upvalue 'db'", offpath.run, "io", function()
    return db:exec("select 1")
  end)
end)

tap.test("Trisul: onexecute using the engine is refused at schedule", function()
  local engine = offpath.engine
  -- the refusal, in Trisul's terms
  tap.err("T.async:schedule: onexecute uses the engine %(upvalue 'engine'%): "
    .. "the engine is main%-thread only", function()
      return T.async:schedule {
        data = "x",
        onexecute = function(d) engine:count(d) end,
        onresult = function() end,
      }
    end)
  -- the supported form: the engine in onresult, on the main thread
  local got
  T.async:schedule {
    data = "y",
    onexecute = function(d) return d .. "!" end,
    onresult = function(eng, d, r) eng:count("host-objects") got = r end,
  }:wait()
  offpath.sleep(0)
  tap.eq(got, "y!")
end)

tap.test("Momentum: a closure using the engine is refused", function()
  local engine = offpath.engine
  local function policy()
    return msys.runInPool("IO", function()
      engine:gauge("depth", 1)
      return true
    end)
  end
  local ok, e = pcall(policy)
  if ok then ok, e = e, select(2, policy()) end -- runInPool returns like pcall
  tap.eq(ok, false)
  tap.ok(tostring(e):find("cannot copy C function (upvalue 'engine'", 1, true)
    and tostring(e):find(HINT, 1, true), tostring(e))
  tap.eq(momentum ~= nil, true)
end)
