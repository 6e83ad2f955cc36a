-- SPDX-License-Identifier: MIT
-- core.lua - run/launch/schedule/go, waits, errors, timeouts, cancellation.
-- LABELS: core
local T = require "_tap"
local offpath = require "offpath"

offpath.configure { pools = {
  small = { threads = 1, queue = 2 },
  two = { threads = 2 },
  deep = { threads = 1, queue = 4096 },
  wide = { threads = 1, queue = 80000 },
  hw = { threads = 2, queue = 100 },
  park1 = { threads = 1, queue = 1 },
} }

T.test("run returns every value kind", function()
  local a, b, c, d, e, f = offpath.run("io", function(x, y)
    return x + 1, y, 2^53, 1.5, "s\0z", nil
  end, 41, true)
  T.eq(a, 42); T.eq(math.type(a), "integer"); T.eq(b, true)
  T.eq(c, 2^53); T.eq(math.type(c), "float"); T.eq(d, 1.5); T.eq(e, "s\0z")
  T.eq(f, nil)
end)

T.test("tables keep cycles and shared references", function()
  local shared = { 1, 2 }
  local t = { a = shared, b = shared, nested = { deep = { x = "y" } } }
  t.self = t
  local r = offpath.run("io", function(v)
    v.count = (v.a == v.b) and 2 or 0
    return v
  end, t)
  T.eq(r.self, r); T.eq(r.a, r.b); T.eq(r.count, 2); T.eq(r.nested.deep.x, "y")
end)

T.test("closures carry upvalues by value, recursively", function()
  local n = 10
  local function add(x) return x + n end
  local fmt = string.format
  local function twice(x) return add(add(x)) end
  local r = offpath.run("io", function(x) return fmt("%d", twice(x)) end, 1)
  T.eq(r, "21")
  -- two closures of one prototype with different upvalues
  local function mk(v) return function() return v end end
  local p, q = mk(1), mk(2)
  local s = offpath.run("io", function() return p() * 10 + q() end)
  T.eq(s, 12)
  -- two functions on one line
  local f, g = function() return "f" end, function() return "g" end
  T.eq(offpath.run("io", function() return f() .. g() end), "fg")
end)

T.test("the worker side module crosses by name", function()
  local w = offpath.run("two", function()
    local me = offpath.worker()
    return me.pool, me.id, offpath.cancelled()
  end)
  T.eq(w, "two")
end)

T.test("errors carry the worker's traceback and position", function()
  local e = T.err("core.lua:%d+: boom", offpath.run, "io", function()
    error("boom")
  end)
  T.ok(e:find("stack traceback", 1, true), "traceback in " .. e)
  -- pcall across run keeps working and the handler goes on
  local ok, err = pcall(offpath.run, "io", function() error("x") end)
  T.eq(ok, false); T.ok(tostring(err):find("x"), err)
end)

T.test("values that cannot cross are refused at submit time", function()
  local failed = offpath.stats().pools.io.failed
  local co = coroutine.create(function() end)
  T.err("cannot copy thread %(argument 2 field 'x'%)", offpath.run, "io",
    function() end, 1, { x = co })
  local fh = io.tmpfile()
  T.err("cannot copy userdata %(upvalue 'fh'", offpath.run, "io",
    function() return fh end)
  fh:close()
  -- library values cross by name, even userdata ones
  local out = io.stdout
  T.eq(offpath.run("io", function() return io.type(out) end), "file")
  local cc = string.gmatch("a", "a")  -- a C function with upvalues
  T.err("cannot copy .*upvalue 'cc'", offpath.launch, "io",
    function() return cc end)
  T.eq(offpath.stats().pools.io.failed, failed,
    "refusals are not task failures")
end)

T.test("10,000 concurrent tasks over two pools end exactly once", function()
  local done = 0
  local tasks = {}
  local cb = T.expect(function(ok, v) if ok then done = done + 1 end end, 10000)
  for i = 1, 10000 do
    local t = offpath.launch(i % 2 == 0 and "io" or "two", function(x)
      return x * 2
    end, i)
    t:on_done(cb)
    tasks[i] = t
  end
  local sum = 0
  for i = 1, 10000 do sum = sum + tasks[i]:wait() end
  T.eq(sum, 10000 * 10001)
  offpath.sleep(0.01)
  T.eq(done, 10000)
end)

T.test("70,000 tasks in flight, dropped or kept, end exactly once", function()
  -- More tasks than one thread of anchors holds (65,536): all queued at
  -- once behind a first task that waits for a file.
  local flag = os.tmpname()
  os.remove(flag)
  local first = offpath.launch("wide", function(path)
    for _ = 1, 5000 do -- 10 s at most, should the test fail before
      if io.open(path) then return "open" end
      offpath.sleep(0.002)
    end
    return "gave up"
  end, flag)
  local n, kept, heard = 70000, {}, 0
  local heard_cb = function(ok, v) if ok and v % 2 == 1 then heard = heard + 1 end end
  for i = 1, n do
    local t = offpath.launch("wide", function(x) return x end, i)
    if i % 2 == 0 then
      kept[#kept + 1] = t
    else
      t:on_done(heard_cb) -- dropped: only the callback hears it
    end
  end
  collectgarbage(); collectgarbage()
  local queued = offpath.stats().pools.wide.queued
  assert(io.open(flag, "w")):close()
  T.eq(queued, n)
  T.eq(first:wait(), "open")
  os.remove(flag)
  local sum = 0
  for i = 1, #kept do sum = sum + kept[i]:wait() end
  T.eq(sum, 2 * (n // 2) * (n // 2 + 1) // 2)
  for _ = 1, 200 do
    if heard == n // 2 then break end
    offpath.sleep(0.005)
  end
  T.eq(heard, n // 2)
  local st = offpath.stats().pools.wide
  T.eq(st.completed, n + 1); T.eq(st.inflight, 0)
end)

T.test("the queue's high-water mark is exact and never passes its size", function()
  -- Bursts far larger than the queue, from a coroutine that waits for
  -- room, while two workers take tasks during every held batch. Each task
  -- takes 20 us, so the queue fills even where the workers would keep up
  -- with the loop thread's submits.
  local f = function(x) offpath.sleep(0.00002) return x end
  for _ = 1, 60 do
    for i = 1, 400 do offpath.launch("hw", f, i) end
    offpath.sleep(0.001)
  end
  local st = offpath.stats().pools.hw
  T.eq(st.queue_size, 100)
  T.eq(st.queue_hwm, 100)
end)

T.test("a running task times out, its worker is reused", function()
  local t0 = offpath.now()
  local e = T.err("^timeout", offpath.run, { pool = "small", timeout = 0.1 },
    function() while true do end end)
  T.ok(offpath.now() - t0 < 2, "timeout fired late")
  T.ok(e:find("offpath.run", 1, true), e)
  -- pcall inside the task cannot swallow the stop
  T.err("^timeout", offpath.run, { pool = "small", timeout = 0.1 },
    function() while true do pcall(function() while true do end end) end end)
  T.eq(offpath.run("small", function() return "alive" end), "alive")
  local st = offpath.stats().pools.small
  T.eq(st.timedout, 2)
end)

T.test("a launch whose deadline passes while it waits for room says timeout", function()
  -- The worker sleeps; a coroutine's launches fill the queue and park
  -- behind it, so the next launch parks too (parked tasks go first).
  local busy = offpath.launch("park1", function() offpath.sleep(0.3) end)
  local filler = offpath.go(function()
    for _ = 1, 3 do offpath.launch("park1", function() end) end
  end)
  offpath.sleep(0.01)
  T.eq(filler:status(), "running") -- suspended in a launch
  local e = T.err("^timeout", offpath.launch, { pool = "park1", timeout = 0.05 },
    function() end)
  T.ok(e:find("offpath.launch", 1, true), e)
  busy:wait(); filler:wait()
  while offpath.stats().pools.park1.inflight > 0 do offpath.sleep(0.01) end
  local st = offpath.stats().pools.park1 -- the parked one counts as submitted
  T.eq(st.timedout, 1)
  T.eq(st.submitted, st.completed + st.failed + st.timedout + st.cancelled)
end)

T.test("cancel a running and a queued task", function()
  local running = offpath.launch("small", function() while true do end end)
  local queued = offpath.launch("small", function() return "never" end)
  offpath.sleep(0.05)
  T.eq(running:status(), "running")
  T.eq(queued:status(), "queued")
  T.eq(queued:cancel(), true)
  T.eq(queued:status(), "cancelled")
  T.eq(running:cancel(), true)
  T.eq(running:cancel(), false, "second cancel is a no-op")
  T.err("^cancelled", running.wait, running)
  T.err("^cancelled", queued.wait, queued)
  T.eq(offpath.run("small", function() return 7 end), 7)
end)

T.test("task:wait with a timeout cancels the work", function()
  local t = offpath.launch("small", function() while true do end end)
  T.err("^timeout after 0.05 s in task:wait", t.wait, t, 0.05)
  T.eq(t:status(), "timeout")
  T.eq(offpath.run("small", function() return 1 end), 1)
end)

T.test("a full queue suspends the submitter until there is room", function()
  -- small: 1 thread, queue 2. Fill it, then keep launching.
  local ts = {}
  for i = 1, 8 do
    ts[i] = offpath.launch("small", function(x)
      local t = os.clock() + 0.01
      while os.clock() < t do end
      return x
    end, i)
  end
  local st = offpath.stats().pools.small
  T.ok(st.queue_hwm <= 2, "queue hwm " .. st.queue_hwm)
  for i = 1, 8 do T.eq(ts[i]:wait(), i) end
end)

T.test("go, all and on_done", function()
  local a = offpath.go(function(x) offpath.sleep(0.01); return x + 1 end, 1)
  local b = offpath.launch("io", function() return "b" end)
  local c = offpath.go(function() error("c failed") end)
  local r = offpath.all(a, b, c)
  T.eq(r[1][1], true); T.eq(r[1][2], 2)
  T.eq(r[2][1], true); T.eq(r[2][2], "b")
  T.eq(r[3][1], false); T.ok(tostring(r[3][2]):find("c failed"))
  T.eq(a:status(), "done"); T.eq(c:status(), "failed")
  local seen
  a:on_done(T.expect(function(ok, v) seen = v end, 1))
  offpath.sleep(0)
  T.eq(seen, 2)
end)

T.test("schedule runs onresult with the original data", function()
  local data = { name = "x" }
  local got
  local t = offpath.schedule {
    pool = "io", data = data,
    onexecute = function(d) return d.name .. "!" end,
    onresult = T.expect(function(engine, d, result)
      T.eq(d, data); got = result
      T.eq(offpath.can_suspend(), false)
    end, 1),
  }
  t:wait()
  T.eq(got, "x!")
  local errs = 0
  offpath.schedule {
    data = 1, onexecute = function() error("bad") end,
    onresult = T.expect(nil, 0),
    onerror = T.expect(function(engine, d, err)
      errs = errs + 1; T.ok(tostring(err):find("bad"))
    end, 1),
  }
  offpath.sleep(0.05)
  T.eq(errs, 1)
end)

T.test("can_suspend and context", function()
  T.eq(offpath.can_suspend(), true)
  offpath.context.user = "alice"
  offpath.sleep(0.001)
  T.eq(offpath.context.user, "alice")
  local inner = offpath.go(function() return offpath.context.user end)
  T.eq(inner:wait(), "alice")
  local co = coroutine.wrap(function() return offpath.can_suspend() end)
  T.eq(co(), false)
  T.err("cannot suspend: offpath.sleep called in a coroutine", coroutine.wrap(
    function() offpath.sleep(0) end))
end)

T.test("stats count per pool", function()
  local s = offpath.stats()
  T.ok(s.pools.io.submitted > 0)
  T.eq(s.pools.io.inflight, 0)
  T.ok(s.pools.io.p99 >= s.pools.io.p50)
  T.ok(s.latency.max >= 0)
end)

T.test("deadlines count from when they are set, not the loop's last turn", function()
  offpath.sleep(0.001)
  local hold = os.clock() + 0.15
  while os.clock() < hold do end  -- hold the main thread
  local t0 = offpath.now()
  offpath.sleep(0.1)
  T.ok(offpath.now() - t0 >= 0.099, "sleep(0.1) took " .. (offpath.now() - t0))
  hold = os.clock() + 0.15
  while os.clock() < hold do end
  t0 = offpath.now()
  T.err("^timeout", offpath.run, { pool = "io", timeout = 0.1 },
    function() while true do end end)
  T.ok(offpath.now() - t0 >= 0.099, "timeout after " .. (offpath.now() - t0))
end)

T.test("a go task shares its parent's context, used first or not", function()
  offpath.go(function() offpath.context.x = 1 end):wait()
  T.eq(offpath.context.x, 1)
end)

-- Ending a task once walked Lua's object list (quadratic: 40,000 tasks
-- took minutes); the ctest timeout catches a return of that.
T.test("40,000 go tasks end, each exactly once", function()
  local N, ended = 40000, 0
  local ts = {}
  for i = 1, N do
    ts[i] = offpath.go(function() offpath.sleep(0.01); return i end)
    ts[i]:on_done(function() ended = ended + 1 end)
  end
  for i = 1, N do T.eq(ts[i]:wait(), i) end
  offpath.sleep(0)
  T.eq(ended, N)
end)

-- Pool tasks have no finalizer: a failure nobody observed is reported, and
-- a result on the C heap freed, at the end of the collection cycle that
-- took the task object (LeakSanitizer checks the buffers at exit).
T.test("collected tasks: unobserved failures reported once, results freed", function()
  local function ended(t)
    while t:status() == "queued" or t:status() == "running" do
      offpath.sleep(0.001)
    end
    return t
  end
  local function errors() return offpath.stats().errors end
  local big = string.rep("r", 4096)

  local before = errors()
  ended(offpath.launch("io", function() error("nobody looks") end))
  collectgarbage(); collectgarbage()
  T.eq(errors(), before + 1, "unobserved failure reported")
  collectgarbage(); collectgarbage()
  T.eq(errors(), before + 1, "and only once")

  -- observed after it failed: by wait, or by on_done
  local t = ended(offpath.launch("io", function() error("seen late") end))
  T.err("seen late", t.wait, t)
  local u = ended(offpath.launch("io", function() error("seen by cb") end))
  local cb = T.expect(function(ok, err)
    T.eq(ok, false); T.ok(err:find("seen by cb"))
  end, 1)
  u:on_done(cb)
  t, u = nil, nil
  collectgarbage(); collectgarbage()
  T.eq(errors(), before + 1, "observed failures are not reported")

  -- big results: kept while the object lives, across cycles; freed after
  local keep = ended(offpath.launch("io", function(s) return s .. "!" end, big))
  for _ = 1, 50 do
    ended(offpath.launch("io", function(s) return s end, big))
  end
  collectgarbage(); collectgarbage()
  T.eq(keep:wait(), big .. "!")
  local fail_big = ended(offpath.launch("io", function(s) error(s) end, big))
  collectgarbage(); collectgarbage()
  T.ok(select(2, pcall(fail_big.wait, fail_big)):find(big, 1, true))
  -- left alive until the runtime closes: freed then
  KEPT = ended(offpath.launch("io", function(s) return s end, big))
end)

-- The first callback sits in a slot of its own, later ones in a table;
-- all run once, in order, before the waiters are resumed.
T.test("several on_done callbacks and waiters, launch and go", function()
  for _, make in ipairs {
    function() return offpath.launch("io", function() return 7 end) end,
    function() return offpath.go(function() offpath.sleep(0.001); return 7 end) end,
  } do
    local order = {}
    local t = make()
    for i = 1, 3 do
      t:on_done(T.expect(function(ok, v)
        T.eq(ok, true); T.eq(v, 7); order[#order + 1] = "cb" .. i
      end, 1))
    end
    local other = offpath.go(function() T.eq(t:wait(), 7); order[#order + 1] = "w2" end)
    T.eq(t:wait(), 7); order[#order + 1] = "w1"
    other:wait()
    T.eq(table.concat(order, " "):sub(1, 11), "cb1 cb2 cb3")
    T.eq(#order, 5)
    t:on_done(T.expect(function(ok, v) T.eq(v, 7) end, 1)) -- after the end
  end
  -- a schedule task takes on_done callbacks besides its onresult
  local got = {}
  local s = offpath.schedule { pool = "io", data = "d",
    onexecute = function(d) return d .. "!" end,
    onresult = T.expect(function(_, d, r) got[#got + 1] = d .. r end, 1) }
  s:on_done(T.expect(function(ok, r) got[#got + 1] = r end, 1))
  s:wait()
  T.eq(table.concat(got, ","), "dd!,d!")
end)

-- offpath.run keeps its ended private task objects for the next calls: a
-- reused one must never carry anything over.
T.test("offpath.run reuses its private tasks: no result or error leaks", function()
  for i = 1, 300 do
    if i % 7 == 0 then
      T.err("boom " .. i, offpath.run, "io", function(n) error("boom " .. n) end, i)
    elseif i % 53 == 0 then
      T.err("^timeout", offpath.run, { pool = "io", timeout = 0.001 },
        function() while true do end end)
    else
      local a, b = offpath.run("io", function(n) return n * 2, tostring(n) end, i)
      T.eq(a, i * 2); T.eq(b, tostring(i))
    end
  end
  -- a run whose waiter goes away while its task still runs
  local g = offpath.go(function()
    return offpath.run("io", function()
      local t = os.clock()
      while os.clock() - t < 0.05 do end
      return "late"
    end)
  end)
  offpath.sleep(0.01)
  T.eq(g:cancel(), true)
  local rs = {}
  for i = 1, 20 do
    rs[i] = offpath.go(function() return offpath.run("io", function(n) return n end, i) end)
  end
  for i = 1, 20 do T.eq(rs[i]:wait(), i) end
  offpath.sleep(0.1) -- the cancelled one hands its task back
  T.eq(offpath.run("io", function() return "after" end), "after")
end)

-- Lua tasks submitted while their pool's queue is deep are held and queued
-- in batches: order, cancellation, status and a lone wait must not notice.
T.test("tasks held behind a deep queue: order, cancel, status, wait", function()
  local started = offpath.launch("deep", function()
    local t = os.clock()
    while os.clock() - t < 0.05 do end -- the queue fills meanwhile
  end)
  local ts = {}
  for i = 1, 1000 do
    ts[i] = offpath.launch("deep", function()
      _G.order = (_G.order or 0) + 1 -- the worker VM's own counter
      return _G.order
    end)
  end
  T.eq(ts[1000]:status(), "queued")
  T.eq(ts[999]:cancel(), true)
  T.eq(ts[999]:status(), "cancelled")
  -- launched last, waited on at once: it must not sit in a batch forever
  T.ok(offpath.launch("deep", function() return "lone" end):wait() == "lone")
  started:wait()
  local last = 0
  for i = 1, 1000 do
    if i ~= 999 then
      local n = ts[i]:wait()
      T.ok(n > last, "FIFO order kept")
      last = n
    end
  end
  T.eq(last, 999) -- 999 ran: every task but the cancelled one
  T.err("^cancelled", ts[999].wait, ts[999])
end)

T.test("a task submitted after held ones queues behind them", function()
  -- 64 tasks fill the queue past the hold depth and 10 more are held;
  -- the handler then computes (no yield, no flush) while the worker
  -- drains the queue. The next submit finds a short queue and must still
  -- go behind the 10 held tasks.
  local ts = { offpath.launch("deep", function()
    local t = os.clock()
    while os.clock() - t < 0.05 do end
    _G.order = 0
    return 0
  end) }
  for i = 2, 75 do
    ts[i] = offpath.launch("deep", function()
      _G.order = _G.order + 1
      return _G.order
    end)
  end
  local t = os.clock()
  while os.clock() - t < 0.3 do end -- the worker empties the queue
  ts[76] = offpath.launch("deep", function()
    _G.order = _G.order + 1
    return _G.order
  end)
  for i = 1, 76 do T.eq(ts[i]:wait(), i - 1, "FIFO order of task " .. i) end
end)

T.test("busy polling: waits, callbacks, timers and coroutines", function()
  T.err("busy_poll must be a boolean", offpath.configure, { busy_poll = 1 })
  offpath.configure { busy_poll = true }
  local ticks, done = 0, 0
  local ticker = offpath.go(function()
    for _ = 1, 5 do offpath.sleep(0.01); ticks = ticks + 1 end
  end)
  local ts = {}
  for i = 1, 200 do
    ts[i] = offpath.launch("two", function(x)
      if x % 50 == 0 then offpath.sleep(0.02) end
      return x * 2
    end, i)
    ts[i]:on_done(function() done = done + 1 end)
  end
  local slow = offpath.launch("two", function() offpath.sleep(5) return "slow" end)
  ticker:wait() -- the main thread's timers fire while tasks are in flight
  T.eq(ticks, 5)
  -- It starts once the 200 are through: 40 ms of sleeps at the least, and
  -- more on a loaded machine.
  local t0 = offpath.now()
  while slow:status() == "queued" and offpath.now() - t0 < 10 do
    offpath.sleep(0.01)
  end
  T.eq(slow:status(), "running")
  for i = 1, 200 do T.eq(ts[i]:wait(), i * 2) end
  T.eq(slow:cancel(), true)
  T.err("cancelled", slow.wait, slow)
  T.eq(done, 200)
  offpath.configure { busy_poll = false }
  T.eq(offpath.run("two", function() return 1 end), 1)
end)
