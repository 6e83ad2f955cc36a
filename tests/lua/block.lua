-- SPDX-License-Identifier: MIT
-- block.lua - offpath.block: sections run atomically on the main thread
-- from workers; results, errors, values that cannot cross, the budget and
-- its policies, and the upvalues a section assigns, copied back.
-- LABELS: core block tsan
local T = require "_tap"
local offpath = require "offpath"

offpath.configure { pools = { eight = { threads = 8 },
  one_at_a_time = { threads = 1 } } }

T.test("block returns several values, tables and nils", function()
  local a, b, c, d, n = offpath.run("io", function()
    return offpath.block(function(x, y)
      return x + 1, nil, { y, { deep = y .. "!" } }, 2.5, select("#", x, y)
    end, 41, "v")
  end)
  T.eq(a, 42); T.eq(math.type(a), "integer"); T.eq(b, nil)
  T.eq(c[1], "v"); T.eq(c[2].deep, "v!"); T.eq(d, 2.5); T.eq(n, 2)
  -- no results at all
  T.eq(select("#", offpath.run("io", function()
    return offpath.block(function() end)
  end)), 0)
end)

T.test("a section sees the main VM: globals and offpath.engine", function()
  MAIN_ONLY = "main value"
  local seen, engine = offpath.run("io", function()
    return offpath.block(function()
      MAIN_ONLY = MAIN_ONLY .. " changed"
      return MAIN_ONLY, type(offpath.engine)
    end)
  end)
  T.eq(seen, "main value changed")
  T.eq(MAIN_ONLY, "main value changed")
  T.eq(engine, "table")
  -- the worker's own globals are not the main VM's
  T.eq(offpath.run("io", function() return MAIN_ONLY end), nil)
end)

T.test("8 tasks x 1000 sections: the counter ends exact", function()
  COUNTER = 0
  local tasks = {}
  for i = 1, 8 do
    tasks[i] = offpath.launch("eight", function()
      for _ = 1, 1000 do
        offpath.block(function()
          -- read, work, write: a lost update would show if two
          -- sections ever overlapped
          local v = COUNTER
          for _ = 1, 20 do end
          COUNTER = v + 1
        end)
      end
      return offpath.worker().id
    end)
  end
  local ids = {}
  for i = 1, 8 do ids[tasks[i]:wait()] = true end
  T.eq(COUNTER, 8000)
  local n = 0
  for _ in pairs(ids) do n = n + 1 end
  T.ok(n >= 2, "sections came from " .. n .. " worker thread(s)")
end)

T.test("no main-thread code runs inside a section", function()
  STATE = "idle"
  local watching, bad, samples = true, 0, 0
  local watcher = offpath.go(function()
    while watching do
      samples = samples + 1
      if STATE ~= "idle" then bad = bad + 1 end
      offpath.sleep(0)
    end
  end)
  offpath.run("eight", function()
    for _ = 1, 200 do
      offpath.block(function()
        STATE = "busy"
        local t = offpath.now() + 0.0005
        while offpath.now() < t do end
        STATE = "idle"
      end)
    end
  end)
  watching = false
  watcher:wait()
  T.ok(samples > 0)
  T.eq(bad, 0)
end)

T.test("an error in a section is raised in the worker", function()
  local e = T.err("block.lua:%d+: inner boom", offpath.run, "io", function()
    offpath.block(function() error("inner boom") end)
  end)
  T.ok(e:find("stack traceback", 1, true), e)
  -- the worker can catch it and go on
  local ok, msg, after = offpath.run("io", function()
    local ok, msg = pcall(offpath.block, function() error({ code = 1 }) end)
    return ok, msg, offpath.block(function() return "after" end)
  end)
  T.eq(ok, false); T.ok(tostring(msg):find("error object is a table"), msg)
  T.eq(after, "after")
end)

T.test("values that cannot cross are refused, both ways", function()
  T.err("cannot copy thread %(result 1%) %(block section results%)",
    offpath.run, "io", function()
      return offpath.block(function() return coroutine.create(print) end)
    end)
  T.err("cannot copy userdata %(argument 2%) %(in offpath.block%)",
    offpath.run, "io", function()
      local f = assert(io.open("/dev/null"))
      local ok, e = pcall(offpath.block, function() end, 1, f)
      f:close()
      error(e, 0)
    end)
  T.err("bad argument #1 to '[%w.]*block'", offpath.run, "io", function()
    return offpath.block(42)
  end)
end)

T.test("a section cannot suspend", function()
  local ok, e = offpath.run("io", function()
    return offpath.block(function()
      local can = offpath.can_suspend()
      local ok, e = pcall(offpath.sleep, 0)
      return not can and not ok, e
    end)
  end)
  T.eq(ok, true)
  T.ok(e:find("^cannot suspend: offpath.sleep called outside a handler"), e)
end)

T.test("budget, policy abort: the section gets a timeout error", function()
  offpath.configure { block_budget = 0.05, block_policy = "abort" }
  local t0 = offpath.now()
  local e = T.err("timeout: block section overran its budget of 0.05 s",
    offpath.run, "io", function()
      return offpath.block(function() while true do end end)
    end)
  T.ok(offpath.now() - t0 < 2, "stopped late")
  T.ok(e:find("block.lua:%d+:"), "position of the section in " .. e)
  -- a pcall inside the section cannot swallow it
  SWALLOWED = nil
  T.err("timeout: block section overran its budget", offpath.run, "io",
    function()
      return offpath.block(function()
        while true do
          pcall(function() while true do end end)
          SWALLOWED = true
        end
      end)
    end)
  T.eq(SWALLOWED, nil)
  -- a coroutine made in a section inherits the budget hook; once the
  -- section is over, it must not raise a stale timeout
  T.err("timeout: block section overran its budget", offpath.run, "io",
    function()
      return offpath.block(function()
        LEFT = coroutine.wrap(function()
          coroutine.yield()
          for _ = 1, 100000 do end
          return "done"
        end)
        LEFT()
        while true do end
      end)
    end)
  T.eq(LEFT(), "done")
  -- the main thread and the next sections go on
  T.eq(offpath.run("io", function()
    return offpath.block(function() return "fine" end)
  end), "fine")
  offpath.configure { block_budget = 0.1 }
end)

T.test("budget, policy continue: the section finishes, overrun logged",
  function()
    offpath.configure { block_budget = 0.01, block_policy = "continue" }
    local r = offpath.run("io", function()
      return offpath.block(function()
        local t = offpath.now() + 0.05
        while offpath.now() < t do end
        return "finished"
      end)
    end)
    T.eq(r, "finished")
    offpath.configure { block_budget = 0.1, block_policy = "abort" }
    -- the log line: run a script through the host and read its stderr
    local host = os.getenv("OFFPATH")
    local dir = os.getenv("OFFPATH_SOURCE_DIR") or "."
    if host == nil then
      print("skipped - continue policy log: OFFPATH (the host binary) is "
        .. "not set; ctest sets it")
      return
    end
    local out = offpath.exec({ host, "run",
      dir .. "/tests/lua/fixtures/block_continue.lua", "--input",
      "/dev/null" }, { timeout = 60 })
    T.eq(out.code, 0, out.stderr)
    T.ok(out.stdout:find("result finished", 1, true), out.stdout)
    T.ok(out.stderr:find("warning: block section overran its budget of "
      .. "0.01 s at [^\n]*block_continue.lua:%d+ %(policy continue%)"),
      out.stderr)
  end)

T.test("on the main thread, block just calls (and cannot suspend)",
  function()
    local a, b = offpath.block(function(x)
      return x, offpath.can_suspend()
    end, 7)
    T.eq(a, 7); T.eq(b, false)
  end)

-- A keyspace on the main VM, as a Redis server's: SCAN in batches of 10
-- with a string cursor ("0" starts and ends), HGET of a field.
KEYSPACE = { keys = {}, hashes = {} }
for i = 1, 95 do
  local key = "user:" .. i
  KEYSPACE.keys[i] = key
  KEYSPACE.hashes[key] = { name = i % 4 == 0 and "alice" or "bob" }
end
function SCAN(cursor)
  local from = tonumber(cursor)
  local batch = {}
  for i = from + 1, math.min(from + 10, #KEYSPACE.keys) do
    batch[#batch + 1] = KEYSPACE.keys[i]
  end
  local nxt = from + 10 < #KEYSPACE.keys and tostring(from + 10) or "0"
  return { nxt, batch }
end
function HGET(key, field)
  local h = KEYSPACE.hashes[key]
  return h and h[field]
end

T.test("the Redis idiom: cursor and count assigned inside block come back",
  function()
  -- The page's async function, line for line: count and cursor are the
  -- function's locals, assigned inside each atomic section.
  local count_hashes = function(expected_name)
    local count = 0
    local cursor = '0'
    repeat
      offpath.block(function()
        local res = SCAN(cursor)
        cursor = res[1]
        local keys = res[2]
        for _, key in ipairs(keys) do
          if HGET(key, 'name') == expected_name then
            count = count + 1
          end
        end
      end)
    until cursor == '0'
    return count
  end
  T.eq(offpath.run("io", count_hashes, "alice"), 23)
  T.eq(offpath.run("io", count_hashes, "bob"), 72)
  -- Other work runs between the batches: a handler changes the keyspace
  -- while the scan runs, and the scan sees the change in a later batch.
  local scan = offpath.launch("one_at_a_time", count_hashes, "carol")
  offpath.go(function()
    KEYSPACE.hashes["user:95"].name = "carol"
  end)
  T.eq(scan:wait(), 1)
  KEYSPACE.hashes["user:95"].name = "bob"
end)

T.test("copy-back: only what the section assigned, results unchanged",
  function()
  local r = offpath.run("io", function()
    local n, s, t, untouched = 1, "a", { v = 1 }, { v = 1 }
    local other = function() return n end -- shares n's cell
    local a, b = offpath.block(function()
      n = n + 41
      s = nil
      t = { v = t.v + 1, nested = { deep = true } }
      untouched.v = 99 -- a change in place to a copy: not sent back
      return "r1", "r2"
    end)
    return { n = n, s = s, t = t, untouched = untouched.v, a = a, b = b,
      other = other() }
  end)
  T.eq(r.n, 42); T.eq(math.type(r.n), "integer"); T.eq(r.s, nil)
  T.eq(r.t.v, 2); T.eq(r.t.nested.deep, true)
  T.eq(r.untouched, 1, "tables changed in place are not copied back")
  T.eq(r.a, "r1"); T.eq(r.b, "r2")
  T.eq(r.other, 42, "a closure sharing the cell sees it")
end)

T.test("copy-back: a value that cannot cross names the upvalue", function()
  local e = T.err("cannot copy thread %(upvalue 'co'%) %(assigned in a "
    .. "block section%)", offpath.run, "io", function()
      local co
      offpath.block(function() co = coroutine.create(print) end)
    end)
  -- nested: the path inside the value
  T.err("cannot copy userdata %(upvalue 'st' field 'f'%)", offpath.run,
    "io", function()
      local st = {}
      offpath.block(function() st = { f = io.tmpfile(), x = 1 } end)
    end)
  -- a section that raises sends nothing back
  local v = offpath.run("io", function()
    local x = "before"
    pcall(offpath.block, function() x = "after"; error("no") end)
    return x
  end)
  T.eq(v, "before")
  T.ok(e ~= nil)
end)

T.test("copy-back: a module's function runs on the main VM's own state",
  function()
  local main_before = require("fixtures.blockmod").get()
  local r = offpath.run("one_at_a_time", function()
    local blockmod = require "fixtures.blockmod"
    blockmod.incr(); blockmod.incr() -- the worker's state: 2
    -- Sending the module table makes this VM name the module's fields, so
    -- blockmod.incr then crosses by name: the main VM's own copy.
    offpath.block(function() end, blockmod)
    local on_main = offpath.block(blockmod.incr)
    return { on_main = on_main, worker = blockmod.get() }
  end)
  T.eq(r.on_main, main_before + 1, "the main VM's counter")
  T.eq(r.worker, 2, "the worker's own state is not overwritten")
  T.eq(require("fixtures.blockmod").get(), main_before + 1)
end)
