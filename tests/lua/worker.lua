-- SPDX-License-Identifier: MIT
-- worker.lua - the worker side: offpath.worker(), offpath.cancelled(),
-- _OSTLS per worker thread, pool init scripts, offpath.configure from the
-- main chunk.
-- LABELS: core worker tsan
local T = require "_tap"
local offpath = require "offpath"

local dir = os.getenv("OFFPATH_SOURCE_DIR") or "."

offpath.configure {
  pools = {
    w2 = { threads = 2, queue = 64,
           init = dir .. "/tests/lua/fixtures/pool_init.lua" },
    one = { threads = 1 },
    badinit = { threads = 1,
                init = dir .. "/tests/lua/fixtures/pool_init_error.lua" },
    noinit = { threads = 1, init = dir .. "/tests/lua/fixtures/no-such.lua" },
  },
}

-- The error offpath.configure raises for a bad pool, captured in the main
-- chunk where configure is meant to be called.
local bad_threads = select(2, pcall(offpath.configure,
  { pools = { bad = { threads = -1 } } }))

T.test("configure from the main chunk made the pools", function()
  local s = offpath.stats().pools
  T.eq(s.w2.threads, 2); T.eq(s.w2.queue_size, 64)
  T.eq(s.one.threads, 1)
  T.ok(s.io ~= nil and s.cpu ~= nil, "default pools kept")
  T.eq(s.io.threads, 4)
  T.ok(bad_threads:find("^offpath.configure: pool 'bad': invalid argument"),
    bad_threads)
  T.eq(s.bad, nil)
end)

T.test("offpath.worker() names the pool and the thread", function()
  local me = offpath.run("one", function() return offpath.worker() end)
  T.eq(me.pool, "one"); T.eq(me.id, 1)
  local ids = {}
  local tasks = {}
  for i = 1, 40 do
    tasks[i] = offpath.launch("w2", function()
      offpath.sleep(0.005) -- the worker-side sleep: blocks this thread only
      return offpath.worker()
    end)
  end
  for i = 1, 40 do
    local w = tasks[i]:wait()
    T.eq(w.pool, "w2")
    T.ok(w.id == 1 or w.id == 2, "id " .. tostring(w.id))
    ids[w.id] = true
  end
  T.ok(ids[1] and ids[2], "both threads of w2 ran tasks")
end)

T.test("_OSTLS lives with its thread: kept across tasks, not shared",
  function()
    local tasks = {}
    for i = 1, 60 do
      tasks[i] = offpath.launch("w2", function()
        _OSTLS.count = (_OSTLS.count or 0) + 1
        _OSTLS.owner = _OSTLS.owner or offpath.worker().id
        offpath.sleep(0.002)
        return offpath.worker().id, _OSTLS.owner, _OSTLS.count
      end)
    end
    local seen = { {}, {} }
    for i = 1, 60 do
      local id, owner, count = tasks[i]:wait()
      T.eq(owner, id, "a thread saw another thread's _OSTLS")
      T.eq(seen[id][count], nil, "count " .. count .. " seen twice")
      seen[id][count] = true
    end
    -- each thread counted 1..k with no gap, k1 + k2 == 60
    local total = 0
    for id = 1, 2 do
      local k = #seen[id]
      for c = 1, k do T.ok(seen[id][c], "gap in thread " .. id) end
      total = total + k
    end
    T.eq(total, 60)
    -- a Lua table in _OSTLS survives too (an open connection would)
    offpath.run("one", function() _OSTLS.conn = { opened = os.time() } end)
    T.eq(offpath.run("one", function() return type(_OSTLS.conn) end),
      "table")
    -- other pools have their own
    T.eq(offpath.run("io", function() return _OSTLS.conn end), nil)
  end)

T.test("the init script ran once in each worker VM", function()
  local tasks = {}
  for i = 1, 20 do
    tasks[i] = offpath.launch("w2", function(name)
      offpath.sleep(0.002)
      return _OSTLS.init_runs, _OSTLS.init_id, offpath.worker().id,
        greet(name)
    end, "t" .. i)
  end
  for i = 1, 20 do
    local runs, init_id, id, hello = tasks[i]:wait()
    T.eq(runs, 1)
    T.eq(init_id, id)
    T.eq(hello, "hello t" .. i .. " from w2/" .. id)
  end
  -- pools without an init script do not see it
  T.eq(offpath.run("one", function() return greet end), nil)
end)

T.test("a failing or missing init script: the worker still serves",
  function()
    -- the error is reported on stderr when the pool starts; tasks run in
    -- the VM as the script left it
    local partly, v = offpath.run("badinit", function()
      return PARTLY_INIT, 1 + 1
    end)
    T.eq(partly, true); T.eq(v, 2)
    T.eq(offpath.run("noinit", function() return "served" end), "served")
  end)

T.test("configure refuses to resize a pool that has started", function()
  T.err("^offpath.configure: pool 'w2' has already started", offpath.configure,
    { pools = { w2 = { threads = 3 } } })
  T.eq(offpath.stats().pools.w2.threads, 2)
end)

T.test("offpath.cancelled() and a stop that reaches every coroutine",
  function()
    T.eq(offpath.run("one", function() return offpath.cancelled() end), false)
    -- The loop runs in a coroutine whose hook the task tries to take off:
    -- the stop reaches it all the same, and the worker is not lost.
    local function watch()
      local co = coroutine.create(function()
        while not offpath.cancelled() do end
      end)
      pcall(debug.sethook, co)
      coroutine.resume(co)
      while true do end
    end
    local stuck = offpath.stats().stuck
    -- A deadline puts the task under the hook from its start, so the
    -- cancel needs no signal (ThreadSanitizer holds signals back from a
    -- pure Lua loop); stop-signal.lua covers a cancel without one.
    local t = offpath.launch({ pool = "one", timeout = 60 }, watch)
    offpath.sleep(0.05)
    T.eq(t:status(), "running")
    t:cancel()
    T.err("^cancelled", t.wait, t)
    T.err("^timeout", offpath.run, { pool = "one", timeout = 0.05 }, watch)
    T.eq(offpath.run("one", function() return offpath.cancelled() end), false)
    T.eq(offpath.stats().stuck, stuck, "a worker was declared stuck")
  end)

T.test("the worker-side sleep refuses a negative time", function()
  T.err("seconds must not be negative", offpath.run, "one",
    function() offpath.sleep(-1) end)
  T.err("seconds must not be negative", offpath.run, "one",
    function() offpath.sleep(0 / 0) end)
  T.eq(offpath.run("one", function() offpath.sleep(0); return 1 end), 1)
end)

T.test("the worker-side sleep is stopped by a cancel", function()
  local t0 = offpath.now()
  T.err("^timeout", offpath.run, { pool = "one", timeout = 0.05 },
    function() offpath.sleep(10) end)
  T.ok(offpath.now() - t0 < 1, "sleep not interrupted")
  local can, now = offpath.run("one", function()
    return offpath.can_suspend(), offpath.now()
  end)
  T.eq(can, false); T.eq(math.type(now), "float")
end)
