-- SPDX-License-Identifier: MIT
-- sched-errors.lua - errors of waits and tasks: error values that are not
-- strings cross as themselves with the traceback beside them; offpath.all
-- raises where nothing may suspend and names a bad argument; a task that
-- would wait on itself raises instead of hanging; a result larger than
-- max_result fails its task, and decoding a large result counts in the
-- main thread's latency.
-- LABELS: core sched
local T = require "_tap"
local offpath = require "offpath"

local function now_ended(t)
  while t:status() == "queued" or t:status() == "running" do
    offpath.sleep(0.005)
  end
end

-- ---- error values ----

T.test("a worker's error value reaches the waiter as itself", function()
  local ok, e = pcall(offpath.run, "io", function() error({ code = 5 }) end)
  T.eq(ok, false); T.eq(type(e), "table"); T.eq(e.code, 5)
  local tb = offpath.traceback(e)
  T.ok(tb and tb:find("stack traceback", 1, true), tostring(tb))
  T.ok(tb:find("sched%-errors%.lua:%d+"), tb)
  T.eq(e.traceback, nil, "nothing glued into the value")
  ok, e = pcall(offpath.run, "io", function() error(42) end)
  T.eq(ok, false); T.eq(e, 42); T.eq(math.type(e), "integer")
  ok, e = pcall(offpath.run, "io", function() error(false) end)
  T.eq(ok, false); T.eq(e, false)
  -- string errors keep message and traceback in one string
  ok, e = pcall(offpath.run, "io", function() error("boom") end)
  T.eq(ok, false)
  T.ok(e:find("sched%-errors%.lua:%d+: boom\nstack traceback"), e)
  T.eq(offpath.traceback(e), nil)
end)

T.test("error values through wait, on_done, all and schedule", function()
  local t = offpath.launch("io", function() error({ code = 7 }) end)
  local got
  t:on_done(function(ok, e, tb) got = { ok, e, tb } end)
  local ok, e = pcall(t.wait, t)
  T.eq(ok, false); T.eq(e.code, 7)
  offpath.sleep(0)
  T.eq(got[1], false); T.eq(got[2].code, 7)
  T.ok(got[3]:find("stack traceback", 1, true))
  -- an ended task: the same
  ok, e = pcall(t.wait, t)
  T.eq(ok, false); T.eq(e.code, 7)
  local g = offpath.go(function() error({ code = 9 }) end)
  local r = offpath.all { t, g, offpath.go(function() return 1, 2 end) }
  T.eq(r[1][1], false); T.eq(r[1][2].code, 7)
  T.ok(r[1][3]:find("stack traceback", 1, true))
  T.eq(r[2][1], false); T.eq(r[2][2].code, 9)
  T.ok(r[2][3]:find("sched%-errors%.lua:%d+"), r[2][3])
  T.eq(r[3][1], true); T.eq(r[3][2], 1); T.eq(r[3][3], 2)
  local seen
  offpath.schedule {
    pool = "io", data = "d",
    onexecute = function() error({ code = 11 }) end,
    onerror = function(_, data, err, tb) seen = { data, err, tb } end,
  }
  while seen == nil do offpath.sleep(0.005) end
  T.eq(seen[1], "d"); T.eq(seen[2].code, 11)
  T.ok(seen[3]:find("stack traceback", 1, true))
end)

T.test("an error value that cannot cross is described", function()
  local ok, e = pcall(offpath.run, "io", function()
    error(setmetatable({}, { __tostring = function() return "custom" end,
      __index = io.stdout }))
  end)
  T.eq(ok, false); T.eq(type(e), "table") -- the metatable crossed by value
  ok, e = pcall(offpath.run, "io", function()
    error(coroutine.create(print))
  end)
  T.eq(ok, false); T.eq(type(e), "string")
  T.ok(e:find("(error object is a thread value) (cannot copy thread", 1, true),
    e)
  T.ok(e:find("stack traceback", 1, true), e)
end)

-- ---- offpath.all ----

T.test("offpath.all names a bad argument", function()
  T.err("bad argument #1 to '[%w.]*all' %(offpath.task expected at index 1, "
    .. "got number%)", offpath.all, { 1, 2 })
  local t = offpath.go(function() end)
  T.err("bad argument #2 to '[%w.]*all' %(offpath.task expected, got "
    .. "number%)", offpath.all, t, 2)
  T.err("at index 2, got table", offpath.all, { t, {} })
  T.eq(#offpath.all {}, 0)
end)

T.test("offpath.all raises where nothing may suspend", function()
  local ran = 0
  local t = offpath.launch("io", function() return 1 end)
  local g = offpath.go(function() offpath.sleep(0.01) ran = ran + 1 end)
  T.err("cannot suspend: offpath.all called across a C boundary",
    string.gsub, "a", "a", function() offpath.all { t, g } end)
  offpath.all { t, g } -- the tasks were not disturbed
  T.eq(ran, 1)
  -- all ended: nothing to wait for, no error
  local r
  string.gsub("a", "a", function() r = offpath.all { t, g } end)
  T.eq(r[1][2], 1); T.eq(r[2][1], true)
end)

T.test("cancelling the caller of offpath.all stops it", function()
  local slow = offpath.go(function() offpath.sleep(5) end)
  local after = false
  local caller = offpath.go(function()
    offpath.all { slow }
    after = true
  end)
  offpath.sleep(0.01)
  caller:cancel()
  T.err("^cancelled", caller.wait, caller)
  T.eq(after, false)
  T.eq(slow:status(), "running")
  slow:cancel()
end)

-- ---- waiting on oneself ----

T.test("a task cannot wait on itself", function()
  local self
  self = offpath.go(function() return self:wait() end)
  T.err("sched%-errors%.lua:%d+: deadlock: a task cannot wait on itself",
    self.wait, self)
  local viaall
  viaall = offpath.go(function() return offpath.all { viaall } end)
  T.err("deadlock: a task cannot wait on itself", viaall.wait, viaall)
end)

T.test("a cycle of waits raises in the task that closes it", function()
  local a, b, c
  a = offpath.go(function() offpath.sleep(0.01) return b:wait() end)
  b = offpath.go(function() offpath.sleep(0.01) return c:wait() end)
  c = offpath.go(function() offpath.sleep(0.02) return a:wait() end)
  T.err("deadlock: a task cannot wait on itself %(through 2 other tasks",
    c.wait, c)
  T.err("deadlock", a.wait, a) -- the error travels back along the chain
  T.err("deadlock", b.wait, b)
end)

-- ---- large results ----

T.test("a result over max_result fails its task, not the host", function()
  offpath.configure { max_result = 1000 }
  local ok, e = pcall(offpath.run, "io", function() return ("x"):rep(2000) end)
  offpath.configure { max_result = 16 * 1024 * 1024 }
  T.eq(ok, false)
  T.ok(e:find("cannot copy result: %d+ bytes encoded, more than max_result "
    .. "%(1000%)"), e)
  T.ok(e:find("offpath.run at .-sched%-errors%.lua:%d+"), e)
  T.eq(#offpath.run("io", function() return ("x"):rep(2000) end), 2000)
  T.err("max_result must be a positive byte count", offpath.configure,
    { max_result = 0 })
end)

T.test("a schedule whose result cannot be copied goes to onerror", function()
  offpath.configure { max_result = 1000 }
  local got
  local t = offpath.schedule {
    pool = "io", data = "d",
    onexecute = function() return ("x"):rep(2000) end,
    onresult = T.expect(nil, 0),
    onerror = T.expect(function(_, data, err, tb)
      got = { data = data, err = err, tb = tb }
    end, 1),
  }
  pcall(t.wait, t)
  offpath.configure { max_result = 16 * 1024 * 1024 }
  T.eq(got.data, "d")
  T.ok(got.err:find("^cannot copy result: %d+ bytes encoded"), got.err)
end)

T.test("decoding a large result counts in the main thread latency", function()
  local function make(n)
    local t = {}
    for i = 1, n do t[i] = { id = i } end
    return t
  end
  -- the waiter is suspended when the result arrives: the decoding runs
  -- before its resume, on the loop thread
  local r = offpath.run("io", make, 300000)
  T.eq(#r, 300000)
  offpath.sleep(0) -- end this resume: its time is recorded
  local max = offpath.stats().latency.max
  -- the same decoding again, inline, measured here
  local t = offpath.launch("io", make, 300000)
  now_ended(t)
  local t0 = offpath.now()
  t:wait()
  local inline = offpath.now() - t0
  T.ok(max >= inline / 4, string.format("latency max %.6f s, decoding "
    .. "alone %.6f s", max, inline))
end)
