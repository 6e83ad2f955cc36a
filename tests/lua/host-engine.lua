-- SPDX-License-Identifier: MIT
-- host-engine.lua - the engine object of the offpath host: count, gauge,
-- alert, emit (and its refusals), stats; the offpath global.
-- LABELS: host
local T = require "_tap"
local engine = offpath.engine

T.test("the host sets the offpath global to the module", function()
  T.eq(offpath, require "offpath")
  T.eq(type(engine.count), "function")
end)

T.test("count adds and returns the total", function()
  T.eq(engine:count("a"), 1)
  T.eq(engine:count("a"), 2)
  T.eq(engine:count("a", 10), 12)
  T.eq(math.type(engine:count("a", 0)), "integer")
  T.eq(engine:count("f", 0.5), 0.5)
  -- Arguments are counted as written in engine:count(name, n), and the
  -- method is named however it was called (here through pcall).
  T.err("bad argument #1 to 'count' %(string expected, got no value%)",
    engine.count, engine)
  T.err("calling 'count' on bad self %(engine expected, got string%)",
    engine.count, "a")
  T.err("bad argument #2 to 'count' %(number expected, got string%)",
    engine.count, engine, "a", "x")
end)

T.test("gauge keeps the last value", function()
  engine:gauge("g", 1)
  engine:gauge("g", 2.5)
  T.eq(engine:stats().gauges.g, 2.5)
  T.err("number expected", engine.gauge, engine, "g", "high")
end)

T.test("alert is counted", function()
  local before = engine:stats().alerts
  engine:alert("disk almost full")
  T.eq(engine:stats().alerts, before + 1)
end)

T.test("emit refuses what JSON cannot hold, naming the key", function()
  T.err("emit: cannot encode a function %(at key 'f'%)", engine.emit, engine,
    { f = print })
  T.err("emit: cannot encode a userdata %(at key '2'%)", engine.emit, engine,
    { 1, io.stdout })
  T.err("emit: string is not valid UTF%-8 %(at key 'bad'%)", engine.emit,
    engine, { ok = "é", bad = "\xff" })
  T.err("emit: string is not valid UTF%-8", engine.emit, engine,
    { "\xed\xa0\x80" })  -- a UTF-16 surrogate
  T.err("emit: cannot encode a number key", engine.emit, engine,
    { [1.5] = true })
  local t = {}
  t[1] = t
  T.err("nested deeper than 1000 levels", engine.emit, engine, t)
  T.err("string or table expected, got nil", engine.emit, engine, nil)
  local before = engine:stats().records.out
  engine:emit({ fine = true })
  T.eq(engine:stats().records.out, before + 1, "a refusal is not output")
end)

T.test("stats has the documented fields", function()
  local s = engine:stats()
  for _, k in ipairs { "in", "processed", "failed", "cancelled", "inflight",
                       "malformed", "oversize", "skipped", "out" } do
    T.eq(math.type(s.records[k]), "integer", "records." .. k)
  end
  for _, k in ipairs { "p50", "p99", "max" } do
    T.eq(type(s.latency.main[k]), "number", "latency.main." .. k)
    T.eq(type(s.latency.record[k]), "number", "latency.record." .. k)
  end
  T.ok(s.pools.io and s.pools.cpu, "pools io and cpu")
  T.eq(s.pools.io.threads, 4)
  T.eq(s.counters.a, 12)
  T.eq(s.inputs[1].name, "/dev/null")
  T.eq(s.inputs[1].kind, "file")
  T.eq(s.backpressure.max_inflight, 1000)
  for _, k in ipairs { "errors", "timeouts", "handler_timeouts", "drops",
                       "alerts" } do
    T.eq(math.type(s[k]), "integer", k)
  end
  T.ok(s.elapsed >= 0)
  -- a copy: changing it changes nothing
  s.counters.a = 0
  T.eq(engine:stats().counters.a, 12)
end)

T.test("stats has every pool field offpath.stats() has, and no other",
  function()
    local lib, host = offpath.stats().pools, engine:stats().pools
    for name, p in pairs(lib) do
      T.ok(host[name], "pool " .. name)
      for k, v in pairs(p) do
        T.eq(type(host[name][k]), type(v), "pools." .. name .. "." .. k)
      end
      for k in pairs(host[name]) do
        T.ok(p[k] ~= nil, "pools." .. name .. "." .. k .. " in offpath.stats()")
      end
    end
    for name in pairs(host) do T.ok(lib[name], "pool " .. name) end
    T.eq(host.io.queue_size, lib.io.queue_size)
    T.eq(host.io.memory_limit, lib.io.memory_limit)
  end)

T.test("engine methods work after suspending and from a block section",
  function()
    offpath.sleep(0.01)
    T.eq(engine:count("b"), 1)
    local n = offpath.run("io", function()
      return offpath.block(function() return offpath.engine:count("b") end)
    end)
    T.eq(n, 2)
  end)
