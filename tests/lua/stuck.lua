-- stuck.lua - stops that worker code cannot escape, and workers that never
-- stop: declared stuck after the grace time, reported, counted and
-- replaced by a fresh thread with a fresh VM, so the pool keeps its size.
-- (A cancel without a deadline, which needs the stop signal: see
-- stop-signal.lua.)
-- LABELS: tsan
local T = require "_tap"

offpath.configure {
  stuck_grace = 0.3,
  pools = { one = { threads = 1 }, two = { threads = 2 } },
}

local function stats(pool)
  local s = offpath.stats()
  return s.pools[pool], s.stuck
end

-- The pool "one" still runs tasks, and its worker was replaced or not.
local function alive(pool)
  return offpath.run(pool, function() return offpath.worker().id end)
end

T.test("a stop caught in one coroutine reaches a pcall loop in another",
  function()
    local f = function()
      local a = coroutine.create(function()
        while true do end
      end)
      local b = coroutine.create(function()
        while true do pcall(function() for _ = 1, 1e6 do end end) end
      end)
      coroutine.resume(a) -- stopped here first
      coroutine.resume(b) -- then this loop must stop too
      while true do pcall(coroutine.resume, b) end
    end
    T.err("^timeout", offpath.run, { pool = "one", timeout = 0.1 }, f)
    T.eq(alive("one"), 1)
    T.eq(stats("one").stuck, 0)
  end)

T.test("debug.sethook cannot take the stop hook off a coroutine", function()
  local e = T.err("^timeout", offpath.run, { pool = "one", timeout = 0.1 },
    function()
      local co = coroutine.create(function()
        pcall(debug.sethook)
        pcall(debug.sethook, coroutine.running(), function() end, "", 1e9)
        while true do end
      end)
      coroutine.resume(co)
      pcall(debug.sethook)
      while true do end
    end)
  T.ok(e)
  T.err("debug.sethook: the task runs under the stop hook", offpath.run,
    { pool = "one", timeout = 10 }, function() debug.sethook() end)
  T.eq(offpath.run("one", function()
    debug.sethook(function() end, "", 1000)
    debug.sethook()
    return true
  end), true, "debug.sethook without a stop hook")
  T.eq(stats("one").stuck, 0)
end)

T.test("os.exit in a worker raises, and the host goes on", function()
  T.err("os.exit is not allowed in a worker", offpath.run, "one",
    function() os.exit(3) end)
  T.err("os.exit is not allowed in an offpath.block section", offpath.run,
    "one", function()
      return offpath.block(function() os.exit(4) end)
    end)
  T.eq(alive("one"), 1)
end)

T.test("a looping __gc finalizer: stuck, reported, replaced", function()
  local before = stats("one").stuck
  T.err("^timeout", offpath.run, { pool = "one", timeout = 0.1 }, function()
    _OSTLS.mark = true
    setmetatable({}, { __gc = function() while true do end end })
    collectgarbage()
    return "never"
  end)
  -- The pool keeps its size: the next task runs on a fresh thread.
  T.eq(alive("one"), 1)
  local p, total = stats("one")
  T.eq(p.stuck, before + 1)
  T.eq(p.threads, 1)
  T.eq(p.running, 1)
  T.ok(total >= 1)
  -- A fresh VM: what the stuck one kept in _OSTLS is gone.
  T.eq(offpath.run("one", function() return _OSTLS.mark end), nil)
end)

T.test("a pathological pattern (C code): stuck, replaced", function()
  local before = stats("two").stuck
  local t = offpath.launch("two", function()
    return string.find(string.rep("a", 40), string.rep("a-", 30) .. "b")
  end)
  offpath.sleep(0.05)
  t:cancel()
  T.err("^cancelled", t.wait, t)
  -- Both threads of the pool take tasks again.
  local ids = {}
  for _ = 1, 40 do
    local a = offpath.launch("two", function()
      local t0 = offpath.now()
      while offpath.now() - t0 < 0.01 do end
      return offpath.worker().id
    end)
    ids[#ids + 1] = a
  end
  local seen = {}
  for _, a in ipairs(ids) do seen[a:wait()] = true end
  T.ok(seen[1] and seen[2], "both workers of the pool run")
  T.eq(stats("two").stuck, before + 1)
  T.eq(stats("two").running, 2)
end)
