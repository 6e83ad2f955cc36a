-- SPDX-License-Identifier: MIT
-- memory.lua - memory limits of worker VMs, and heaps collected when idle.
-- LABELS: memory
local T = require "_tap"
local offpath = require "offpath"

offpath.configure { pools = {
  capped = { threads = 1, memory_limit = "16MB" },
  capped2 = { threads = 1, memory_limit = 16 * 1024 * 1024 },
  other = { threads = 1 },
  idle = { threads = 1 },
} }

-- Grows a table until something stops it.
local function grow()
  local t = {}
  for i = 1, math.maxinteger do t[i] = { i } end
  return #t
end

T.test("a task past its pool's limit fails with the limit and the line", function()
  local e = T.err("memory limit of 16 MB reached in task at", offpath.run,
    "capped", grow)
  T.ok(e:find("memory.lua:%d+"), e)
end)

T.test("a coroutine past the limit fails with the limit and the line",
  function()
  -- The memory check is a hook, and a hook belongs to one thread: it must
  -- reach the coroutine that grows the heap, and the task must go on
  -- normally afterwards.
  local ok, e = offpath.run("capped", function()
    local co = coroutine.wrap(grow)
    return pcall(co)
  end)
  T.eq(ok, false)
  T.ok(tostring(e):find("^.-memory limit of 16 MB reached in task at " ..
    ".-memory.lua:%d+"), e)
  T.eq(offpath.run("capped", function()
    debug.sethook() -- no stop hook left behind: this is allowed
    return "alive"
  end), "alive")
end)

T.test("the VM is collected and serves the next task", function()
  local used = offpath.run("capped", function()
    return collectgarbage("count")
  end)
  T.ok(used < 4 * 1024, "heap after the failure: " .. used .. " KB")
  T.eq(offpath.run("capped", function(x) return x * 2 end, 21), 42)
end)

T.test("a task that catches the error stays within the limit", function()
  -- pcall may catch the error, as it catches Lua's own memory errors; the
  -- next allocation past the limit raises again, so the task either ends
  -- with the error or holds no more than the limit plus its slack.
  local ok, kb, caught = pcall(offpath.run, "capped2", function()
    local keep, caught = {}, 0
    for _ = 1, 20 do
      local ok, e = pcall(function()
        for i = 1, math.maxinteger do keep[#keep + 1] = { i } end
      end)
      if not ok then caught = caught + 1 end
    end
    return collectgarbage("count"), caught
  end)
  if ok then
    T.eq(caught, 20)
    T.ok(kb <= 16 * 1024 * 1.25, "heap " .. kb .. " KB")
  else
    T.ok(kb:find("^memory limit of 16 MB reached in task at .*memory.lua:%d+"),
      kb)
  end
  T.eq(offpath.run("capped2", function() return "alive" end), "alive")
end)

T.test("one allocation bigger than the limit fails at once", function()
  T.err("memory limit of 16 MB reached in task", offpath.run, "capped",
    function() return #string.rep("x", 64 * 1024 * 1024) end)
  -- an argument bigger than the limit cannot be copied in
  T.err("memory limit of 16 MB reached in task", offpath.run, "capped",
    function(s) return #s end, string.rep("y", 20 * 1024 * 1024))
end)

T.test("other pools keep serving while one runs out", function()
  local runaway = offpath.launch("capped", grow)
  local sums = {}
  for i = 1, 20 do
    sums[i] = offpath.run("other", function(a) return a + 1 end, i)
  end
  T.eq(#sums, 20); T.eq(sums[20], 21)
  T.err("memory limit of 16 MB reached in task", function()
    return runaway:wait()
  end)
  local st = offpath.stats().pools.capped
  T.ok(st.failed >= 1)
  T.eq(st.memory_limit, 16 * 1024 * 1024)
  T.ok(st.memory > 0 and st.memory < 16 * 1024 * 1024 * 1.25)
  T.eq(offpath.stats().pools.other.memory_limit, 1024 * 1024 * 1024)
  T.ok(offpath.stats().memory > 0)
  T.ok(offpath.stats().protos > 0)
end)

T.test("memory_limit is checked by configure", function()
  T.err("memory_limit must be at least 1MB", offpath.configure,
    { pools = { tiny = { memory_limit = 1000 } } })
  T.err("memory_limit must be bytes or a size", offpath.configure,
    { pools = { bad = { memory_limit = "lots" } } })
  T.err("has already started", offpath.configure,
    { pools = { capped = { memory_limit = "32MB" } } })
end)

T.test("a worker whose heap grew is collected when it goes idle", function()
  local rest = offpath.run("idle", function() return collectgarbage("count") end)
  -- 24 MB of garbage left in the worker VM: a big argument, its copy, and
  -- a table the task built and dropped.
  local n = offpath.run("idle", function(s)
    local t = {}
    for i = 1, 100000 do t[i] = s:sub(i % 100, i % 100 + 40) .. i end
    return #t + #s
  end, string.rep("z", 8 * 1024 * 1024))
  T.eq(n, 100000 + 8 * 1024 * 1024)
  offpath.sleep(0.2) -- the worker goes to sleep: it collects first
  local after = offpath.run("idle", function() return collectgarbage("count") end)
  T.ok(after < rest + 2048, string.format("heap %.0f KB at rest, %.0f KB after",
    rest, after))
end)

