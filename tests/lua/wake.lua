-- SPDX-License-Identifier: MIT
-- wake.lua - an offpath.run wakes the sleeping worker it needs when its
-- handler suspends; launch and schedule wake theirs at once, so a task
-- launched before a long computation runs during it. A handler's own debug
-- hook is left alone. Runs parked behind a full queue start when room
-- comes.
-- LABELS: core tsan
local T = require "_tap"
local offpath = require "offpath"

offpath.configure { pools = { sleepy = { threads = 1 },
                               narrow = { threads = 1, queue = 1 } } }

local now = offpath.now

-- Let the pool's worker finish its spin and go to sleep.
local function asleep()
  offpath.run("sleepy", function() end)
  offpath.sleep(0.05)
end

-- Compute on the main thread for s seconds, in Lua.
local function compute(s)
  local e, n = now() + s, 0
  while now() < e do n = n + 1 end
  return n
end

local function started() return offpath.now() end

T.test("a task launched before a long computation starts during it", function()
  asleep()
  local t0 = now()
  local t = offpath.launch("sleepy", started)
  compute(1)
  local at = t:wait()
  T.ok(at - t0 < 0.5, string.format("started %.3f s after the launch", at - t0))
end)

T.test("so does one launched before a blocking call in C", function()
  asleep()
  local t0 = now()
  local t = offpath.launch("sleepy", started)
  T.eq(debug.gethook(), nil) -- nothing of offpath's shows
  os.execute("sleep 1")
  local at = t:wait()
  T.ok(at - t0 < 0.5, string.format("started %.3f s after the launch", at - t0))
end)

T.test("so does a schedule", function()
  asleep()
  local t0, at = now(), nil
  offpath.schedule { pool = "sleepy", onexecute = started,
    onresult = function(_, _, r) at = r end }
  compute(1)
  while not at and now() - t0 < 10 do offpath.sleep(0.01) end
  T.ok(at, "no result in 10 s")
  at = at or math.huge
  T.ok(at - t0 < 0.5, string.format("started %.3f s after the schedule", at - t0))
end)

T.test("a handler's own debug hook stays, and its task still starts", function()
  asleep()
  local calls = 0
  local function hook() calls = calls + 1 end
  debug.sethook(hook, "", 100)
  local t0 = now()
  local t = offpath.launch("sleepy", started)
  local h, mask, count = debug.gethook()
  compute(1)
  debug.sethook()
  T.eq(h, hook)
  T.eq(mask, "")
  T.eq(count, 100)
  T.ok(calls > 0)
  local at = t:wait()
  T.ok(at - t0 < 0.5, string.format("started %.3f s after the launch", at - t0))
end)

-- A run that waited for room in a full queue is queued by a batch of
-- completions, long after its handler's resume: its worker is woken then.
-- (With the host's tick the only other wake-up, a lost one shows as a
-- round of a second; with none, as a hang.)
T.test("runs parked behind a full queue start when room comes", function()
  local worst = 0
  for _ = 1, 20 do
    local t0 = now()
    local ts = {}
    for i = 1, 3 do
      ts[i] = offpath.go(function() return offpath.run("narrow", started) end)
    end
    offpath.all(ts)
    worst = math.max(worst, now() - t0)
  end
  T.ok(worst < 0.5, string.format("a round took %.3f s", worst))
end)

T.test("many handlers offloading at once: each task ends once", function()
  asleep()
  local n, done = 200, 0
  for i = 1, n do
    offpath.go(function()
      local r = offpath.run("sleepy", function(x) return x + 1 end, i)
      T.eq(r, i + 1)
      done = done + 1
    end)
  end
  local t0 = now()
  while done < n and now() - t0 < 10 do offpath.sleep(0.01) end
  T.eq(done, n)
  local st = offpath.stats().pools.sleepy
  T.eq(st.inflight, 0)
  T.eq(st.completed, st.submitted)
end)
