-- SPDX-License-Identifier: MIT
-- sched-chain.lua - resumes never nest: a chain of a million go tasks,
-- each waiting on the one before (the usual way to keep output in input
-- order), and go + all nested 50,000 deep, all woken when the head ends.
-- Each waiter is resumed from the scheduler's loop, not from inside the
-- previous one's resume, so the C stack does not grow with the chain.
-- LABELS: core sched
-- TIMEOUT: 1200 (a million coroutines take minutes under sanitizers)
local T = require "_tap"
local offpath = require "offpath"

T.test("a chain of 1,000,000 waiting go tasks ends in order", function()
  local N = 1000000
  local order = {}
  local head = offpath.go(function()
    offpath.sleep(0.01) -- every link is waiting when the head ends
    return 0
  end)
  local prev = head
  for i = 1, N do
    local p = prev
    prev = offpath.go(function()
      local v = p:wait() + 1
      if i % 100000 == 0 then order[#order + 1] = v end
      return v
    end)
  end
  T.eq(prev:wait(), N)
  T.eq(#order, 10)
  for k = 1, 10 do T.eq(order[k], k * 100000) end
end)

T.test("go + all nested 50,000 deep", function()
  local function nest(d)
    if d == 0 then
      offpath.sleep(0.01)
      return 0
    end
    local r = offpath.all { offpath.go(nest, d - 1) }
    T.eq(r[1][1], true)
    return r[1][2] + 1
  end
  T.eq(offpath.go(nest, 50000):wait(), 50000)
end)

T.test("a chain of on_done callbacks and waiters", function()
  local N = 20000
  local last = offpath.go(function() offpath.sleep(0.01) return 0 end)
  local got = 0
  for _ = 1, N do
    local p = last
    last = offpath.go(function() return p:wait() + 1 end)
    last:on_done(function(ok) if ok then got = got + 1 end end)
  end
  T.eq(last:wait(), N)
  offpath.sleep(0)
  T.eq(got, N)
end)

T.test("a failure travels down a chain of 100,000 waits in linear time",
  function()
    for _, value in ipairs { "head failed", { code = 1 } } do
      local N = 100000
      local head = offpath.go(function()
        offpath.sleep(0.01)
        error(value)
      end)
      local prev = head
      for _ = 1, N do
        local p = prev
        prev = offpath.go(function() return p:wait() end)
      end
      local ok, e = pcall(prev.wait, prev)
      T.eq(ok, false)
      -- the traceback is the one of where it was raised first, not one
      -- more per task it went through
      local tb = type(e) == "string" and e or offpath.traceback(e)
      T.ok(#tb < 2000, "traceback of " .. #tb .. " bytes")
      T.ok(tb:find("sched%-chain%.lua:%d+"), tb)
      if type(e) == "table" then T.eq(e.code, 1) end
    end
  end)
