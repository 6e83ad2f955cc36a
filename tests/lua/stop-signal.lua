-- SPDX-License-Identifier: MIT
-- stop-signal.lua - a cancel of a task with no deadline reaches loops in
-- coroutines too: the stop signal hooks every coroutine being resumed.
-- (Not under ThreadSanitizer, which delivers signals only at the calls it
-- intercepts: there such a loop is declared stuck instead.)
local T = require "_tap"

offpath.configure { pools = { one = { threads = 1 } } }

local function stats(pool)
  return offpath.stats().pools[pool]
end

local function alive(pool)
  return offpath.run(pool, function() return offpath.worker().id end)
end

T.test("a cancel reaches a loop in a coroutine of a task with no deadline",
  function()
    local t = offpath.launch("one", function()
      local co = coroutine.wrap(function()
        while true do pcall(function() while true do end end) end
      end)
      co()
    end)
    offpath.sleep(0.05)
    t:cancel()
    T.err("^cancelled", t.wait, t)
    T.eq(alive("one"), 1)
    T.eq(stats("one").stuck, 0)
  end)
