-- SPDX-License-Identifier: MIT
-- suspend.lua - offpath.context, offpath.can_suspend, the errors from each
-- place where suspending is not allowed, and offpath.sleep (100,000
-- coroutines sleeping at once).
-- LABELS: core suspend
local T = require "_tap"
local offpath = require "offpath"

-- ---- the main chunk: nothing may suspend here ----

local main = {
  can = offpath.can_suspend(),
  context = offpath.context,
}
for name, call in pairs {
  sleep = function() return offpath.sleep(0) end,
  exec = function() return offpath.exec("true") end,
  readfile = function() return offpath.readfile("/dev/null") end,
  run = function() return offpath.run("io", function() end) end,
  wait = function() return offpath.go(function() end):wait() end,
} do
  main[name] = select(2, pcall(call))
end

local OUTSIDE = "called outside a handler %(the main chunk, block sections "
  .. "and callbacks such as onresult must not wait"
local C_BOUNDARY = "called across a C boundary that cannot yield"

T.test("the main chunk cannot suspend; the error names the call", function()
  T.eq(main.can, false)
  T.eq(main.context, nil)
  for name, call in pairs { sleep = "offpath.sleep", exec = "offpath.exec",
    readfile = "offpath.readfile", run = "offpath.run", wait = "task:wait" } do
    -- "suspend.lua:N: " first: the position of the call
    T.ok(tostring(main[name]):find("^[^\n]-suspend%.lua:%d+: cannot suspend: "
      .. call:gsub("%.", "%%.") .. " " .. OUTSIDE),
      name .. ": " .. tostring(main[name]))
  end
end)

T.test("a handler can suspend", function()
  T.eq(offpath.can_suspend(), true)
  T.eq(type(offpath.context), "table")
end)

T.test("across a C call that cannot yield", function()
  local seen = {}
  table.sort({ 3, 1, 2 }, function(a, b)
    seen.sort_can = offpath.can_suspend()
    seen.sort = select(2, pcall(offpath.sleep, 0))
    return a < b
  end)
  T.eq(seen.sort_can, false)
  T.ok(seen.sort:find("^cannot suspend: offpath%.sleep " .. C_BOUNDARY),
    seen.sort)
  string.gsub("x", "x", function()
    seen.gsub = select(2, pcall(offpath.exec, "true"))
  end)
  T.ok(seen.gsub:find("^cannot suspend: offpath%.exec " .. C_BOUNDARY),
    seen.gsub)
  tostring(setmetatable({}, { __tostring = function()
    seen.tostring = select(2, pcall(offpath.readfile, "/dev/null"))
    return ""
  end }))
  T.ok(seen.tostring:find("^cannot suspend: offpath%.readfile "
    .. C_BOUNDARY), seen.tostring)
  -- an error raised there, not caught, fails only that call
  T.err("cannot suspend: offpath%.sleep " .. C_BOUNDARY, table.sort,
    { 1, 2 }, function() offpath.sleep(0) end)
end)

T.test("in a coroutine offpath does not run", function()
  local co = coroutine.wrap(function()
    return offpath.can_suspend(), offpath.context,
      select(2, pcall(offpath.exec, "true"))
  end)
  local can, ctx, e = co()
  T.eq(can, false); T.eq(ctx, nil)
  T.ok(e:find("^cannot suspend: offpath%.exec called in a coroutine offpath "
    .. "does not run"), e)
end)

T.test("in onresult and onerror callbacks", function()
  local got = {}
  local t = offpath.schedule {
    pool = "io", data = 1,
    onexecute = function() return "r" end,
    onresult = T.expect(function()
      got.can = offpath.can_suspend()
      got.ctx = offpath.context
      got.sleep = select(2, pcall(offpath.sleep, 0))
      got.run = select(2, pcall(offpath.run, "io", function() end))
    end, 1),
  }
  t:wait()
  T.eq(got.can, false); T.eq(got.ctx, nil)
  T.ok(got.sleep:find("^cannot suspend: offpath%.sleep " .. OUTSIDE),
    got.sleep)
  T.ok(got.run:find("^cannot suspend: offpath%.run " .. OUTSIDE), got.run)
  local t2 = offpath.schedule {
    pool = "io", data = 2,
    onexecute = function() error("fails") end,
    onerror = T.expect(function()
      got.err = select(2, pcall(offpath.readfile, "/dev/null"))
    end, 1),
  }
  pcall(t2.wait, t2)
  offpath.sleep(0.01)
  T.ok(got.err:find("^cannot suspend: offpath%.readfile " .. OUTSIDE),
    got.err)
end)

T.test("on_done callbacks and go tasks may suspend", function()
  local t = offpath.go(function()
    return offpath.can_suspend()
  end)
  T.eq(t:wait(), true)
  local seen
  t:on_done(T.expect(function()
    offpath.sleep(0.001)
    seen = offpath.can_suspend()
  end, 1))
  offpath.sleep(0.05)
  T.eq(seen, true)
end)

T.test("context is kept across suspensions", function()
  local ctx = offpath.context
  ctx.user = "alice"
  offpath.sleep(0.001)
  T.eq(offpath.context, ctx)
  offpath.exec("true")
  offpath.readfile("/dev/null")
  offpath.run("io", function() end)
  T.eq(offpath.context.user, "alice")
  T.eq(offpath.context, ctx)
end)

T.test("context is not shared between two invocations", function()
  -- on_done callbacks are handler invocations: each in its own coroutine
  local res = {}
  local function handler(tag, delay)
    return function()
      res[tag] = { before = offpath.context.id }
      offpath.context.id = tag
      offpath.sleep(delay)
      res[tag].after = offpath.context.id
    end
  end
  local t1 = offpath.go(function() end)
  local t2 = offpath.go(function() end)
  t1:on_done(T.expect(handler("A", 0.05), 1))
  t2:on_done(T.expect(handler("B", 0.02), 1))
  offpath.sleep(0.1)
  T.eq(res.A.before, nil); T.eq(res.A.after, "A")
  T.eq(res.B.before, nil); T.eq(res.B.after, "B")
  -- nor with a later invocation that reuses a finished coroutine
  for i = 1, 5 do
    local t = offpath.go(function() end)
    t:on_done(T.expect(handler("C" .. i, 0), 1))
  end
  offpath.sleep(0.05)
  for i = 1, 5 do T.eq(res["C" .. i].before, nil) end
end)

T.test("sleep: duration, zero, bad arguments, cancel", function()
  local t0 = offpath.now()
  offpath.sleep(0.05)
  local d = offpath.now() - t0
  T.ok(d >= 0.045 and d < 0.5, "slept " .. d)
  offpath.sleep(0)
  T.err("bad argument #1 to 'offpath%.sleep' %(must not be negative%)",
    offpath.sleep, -1)
  T.err("bad argument #1 to 'offpath%.sleep' %(number expected",
    offpath.sleep, "soon")
  local t = offpath.go(function() offpath.sleep(10) end)
  offpath.sleep(0.01)
  t0 = offpath.now()
  T.eq(t:cancel(), true)
  T.err("^cancelled", t.wait, t)
  T.ok(offpath.now() - t0 < 0.5)
  T.eq(t:status(), "cancelled")
end)

-- Threads of this process, from /proc.
local function threads()
  return tonumber(offpath.readfile("/proc/self/status"):match(
    "Threads:%s*(%d+)"))
end

T.test("100,000 coroutines sleeping at once, on timers only", function()
  local N = 100000
  local done = 0
  local before = threads()
  local cpu_before = offpath.stats().pools.cpu.submitted
  local t0 = offpath.now()
  for _ = 1, N do
    offpath.go(function()
      offpath.sleep(1)
      done = done + 1
    end)
  end
  local spawned = offpath.now() - t0
  offpath.sleep(0.2)
  local st = offpath.stats()
  T.ok(st.suspended >= N, "suspended " .. st.suspended)
  T.eq(done, 0)
  T.eq(threads(), before, "sleep started threads")
  T.eq(st.pools.cpu.submitted, cpu_before)
  while done < N and offpath.now() - t0 < 60 do offpath.sleep(0.05) end
  T.eq(done, N)
  print(string.format("# 100000 sleepers: started in %.2f s, all woke "
    .. "%.2f s after the first start (sleep 1 s)", spawned,
    offpath.now() - t0))
  T.ok(offpath.stats().suspended < 10)
end)
