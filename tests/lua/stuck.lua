-- SPDX-License-Identifier: MIT
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

-- Wait until the task t has set the global flag name from a block
-- section, then cancel it.
local function cancel_when(t, name)
  while not _G[name] do offpath.sleep(0.01) end
  t:cancel()
  T.err("^cancelled", t.wait, t)
end

T.test("a looping __gc finalizer: stuck, reported, replaced", function()
  local before = stats("one").stuck
  local t = offpath.launch("one", function()
    _OSTLS.mark = true
    setmetatable({}, { __gc = function()
      -- hooks are off in finalizers: nothing stops it from here on
      offpath.block(function() GC_STARTED = true end)
      while true do end
    end })
    collectgarbage("incremental") -- runs finalizers at once
    collectgarbage()
    return "never"
  end)
  cancel_when(t, "GC_STARTED")
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

T.test("a value with a looping __gc that crossed in as an argument",
  function()
    local before = stats("one").stuck
    local arg = setmetatable({}, { __gc = function()
      if not offpath.worker then return end -- the main VM's copy
      offpath.block(function() ARG_GC = true end)
      while true do end
    end })
    local t = offpath.launch("one", function(v)
      v = nil
      collectgarbage("incremental") -- runs finalizers at once
      collectgarbage()
      return "never"
    end, arg)
    cancel_when(t, "ARG_GC")
    T.eq(alive("one"), 1)
    T.eq(stats("one").stuck, before + 1)
  end)

T.test("a pathological pattern (C code): stuck, replaced", function()
  local before = stats("two").stuck
  -- The cancel must come while the match runs: it does unless this
  -- thread was held up between the block section and the match, so try
  -- again then (the hook stopped it: not stuck).
  for _ = 1, 5 do
    FIND_STARTED = nil
    local t = offpath.launch("two", function()
      offpath.block(function() FIND_STARTED = true end)
      return string.find(string.rep("a", 40), string.rep("a-", 30) .. "b")
    end)
    while not FIND_STARTED do offpath.sleep(0.01) end
    offpath.sleep(0.2)
    t:cancel()
    T.err("^cancelled", t.wait, t)
    -- handed back: at its stuck declaration, or stopped at the hook
    while stats("two").inflight > 0 do offpath.sleep(0.02) end
    if stats("two").stuck > before then break end
  end
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
