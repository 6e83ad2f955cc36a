-- SPDX-License-Identifier: MIT
-- host-hardening.lua - what a hostile script tries on the host side: the
-- budget of a block section against debug.sethook, method errors named
-- however the method was called, the statistics' exact latency bounds
-- and output fields.
-- LABELS: host block
local T = require "_tap"
local offpath = require "offpath"
local engine = offpath.engine

T.test("debug.sethook cannot take a block section's budget hook off",
  function()
    offpath.configure { block_budget = 0.05, block_policy = "abort" }
    -- refused inside a section, with a message that says why
    local e = T.err("debug.sethook: not allowed in an offpath.block section",
      offpath.run, "io", function()
        return offpath.block(function() debug.sethook() end)
      end)
    T.ok(e:find("budget"), e)
    -- swallowed by a pcall, the budget still stops the loop after it
    local t0 = offpath.now()
    T.err("timeout: block section overran its budget", offpath.run, "io",
      function()
        return offpath.block(function()
          pcall(debug.sethook)
          while true do end
        end)
      end)
    T.ok(offpath.now() - t0 < 5, "stopped late")
    -- nor on a coroutine the section makes, nor through a saved reference:
    -- the loop in the coroutine is stopped
    local ok, err = offpath.run("io", function()
      local sethook = debug.sethook
      return offpath.block(function()
        local co = coroutine.create(function()
          pcall(sethook)
          while true do end
        end)
        pcall(sethook, co)
        return coroutine.resume(co)
      end)
    end)
    T.eq(ok, false)
    T.ok(tostring(err):find("timeout: block section overran its budget"),
      tostring(err))
    -- outside sections it is the plain function
    local called = 0
    debug.sethook(function() called = called + 1 end, "", 1)
    local x = 0
    for i = 1, 10 do x = x + i end
    debug.sethook()
    T.ok(called > 0, "hook did not run")
    T.eq(debug.gethook(), nil)
    offpath.configure { block_budget = 0.1 }
  end)

T.test("engine methods name themselves and count arguments as written",
  function()
    local emit = engine.emit
    T.err("bad argument #1 to 'emit' %(string or table expected, got nil%)",
      emit, engine, nil)
    T.err("bad argument #1 to 'emit' %(string or table expected, got no "
      .. "value%)", function() engine:emit() end)
    T.err("bad argument #2 to 'gauge' %(number expected, got no value%)",
      function() engine:gauge("g") end)
    T.err("calling 'alert' on bad self", engine.alert, "x")
    -- through a worker's block section too
    local ok, err = offpath.run("io", function()
      return pcall(offpath.block, function()
        offpath.engine:emit(nil)
      end)
    end)
    T.eq(ok, false)
    T.ok(err:find("bad argument #1 to 'emit'", 1, true), err)
  end)

T.test("record latency: exact max, min, quantiles inside them", function()
  local s = engine:stats()
  T.eq(type(s.latency.record.min), "number")
  T.ok(s.latency.record.p50 >= s.latency.record.min, "p50 below min")
  T.ok(s.latency.record.p99 <= s.latency.record.max, "p99 above max")
end)

T.test("stats has the output fields", function()
  local s = engine:stats()
  for _, k in ipairs { "bytes", "errors", "abandoned" } do
    T.eq(math.type(s.output[k]), "integer", "output." .. k)
  end
end)
