-- SPDX-License-Identifier: MIT
-- pool-clock.lua - a pool's submit-to-end times when Lua runs inside a
-- batch of completions: a submit is dated when it is made, and a task
-- ended in the batch that started it counts no negative time.
-- LABELS: core
local T = require "_tap"
local offpath = require "offpath"

offpath.configure { block_budget = 10, pools = {
  ck_a = { threads = 1 }, ck_b = { threads = 1 }, ck_c = { threads = 1 },
  ck_d = { threads = 1 }, ck_e = { threads = 1 }, ck_f = { threads = 1 },
} }

-- Keep the main thread busy, so what the workers finish meanwhile ends in
-- one batch.
local function hold(s)
  local e = offpath.now() + s
  while offpath.now() < e do end
end

T.test("a task stopped in the batch that started it counts no negative time",
  function()
    local b
    local a = offpath.launch("ck_a", function() end)
    -- Behind a on the same thread: its callback runs after a's in a batch.
    offpath.schedule { pool = "ck_a", onexecute = function() end,
      onresult = function() b:cancel() end }
    -- A coroutine in the batch: its submit reads the clock itself.
    a:on_done(function()
      b = offpath.launch("ck_b", function() offpath.sleep(30) end)
    end)
    hold(0.2)
    while not (b and b:status() == "cancelled") do offpath.sleep(0.01) end
    local st = offpath.stats().pools.ck_b
    T.eq(st.cancelled, 1)
    T.ok(st.max < 30, "ck_b max " .. st.max .. " s")
  end)

T.test("a submit late in a schedule callback is dated when it is made",
  function()
    local t_sub, t_end
    offpath.schedule { pool = "ck_c", onexecute = function() end,
      onresult = function()
        hold(0.3) -- a long callback, then a submit
        t_sub = offpath.now()
        offpath.schedule { pool = "ck_d", onexecute = function() end,
          onresult = function() t_end = offpath.now() end }
      end }
    while not t_end do offpath.sleep(0.01) end
    -- Dated no earlier than t_sub, ended no later than t_end.
    local st = offpath.stats().pools.ck_d
    T.ok(st.max <= t_end - t_sub,
      string.format("ck_d max %.6f s > %.6f s", st.max, t_end - t_sub))
  end)

T.test("a submit late in a block section is dated when it is made",
  function()
    -- The section runs in the main VM: it sets globals there.
    offpath.run("ck_e", function()
      offpath.block(function()
        hold(0.3)
        CK_SUB = offpath.now()
        offpath.schedule { pool = "ck_f", onexecute = function() end,
          onresult = function() CK_END = offpath.now() end }
      end)
    end)
    while not CK_END do offpath.sleep(0.01) end
    local st = offpath.stats().pools.ck_f
    T.ok(st.max <= CK_END - CK_SUB,
      string.format("ck_f max %.6f s > %.6f s", st.max, CK_END - CK_SUB))
  end)
