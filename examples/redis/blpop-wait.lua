-- SPDX-License-Identifier: MIT
-- blpop-wait.lua - wait with BLPOP until an expected value arrives on a
-- list, while the other commands keep flowing.
--
--   REDIS_ADDR=127.0.0.1:6379 QUEUE=jobs EXPECT=done \
--     offpath run examples/redis/blpop-wait.lua --input values.txt
--
-- The waiter, started by on_start in its own coroutine (records flow only
-- once on_start has returned), loops on BLPOP QUEUE 1 (a one-second
-- server-side timeout, so it can tell it is still waiting) until it pops
-- EXPECT, or gives up after DEADLINE seconds; on_stop reports its outcome. BLPOP blocks a connection, so offpath runs it on
-- a dedicated one: the RPUSHes that on_event makes for every input record
-- (the producer here; any other client may push too) go through the
-- client's shared connection meanwhile and are never held up.
local offpath = require "offpath"

local ADDR = os.getenv("REDIS_ADDR") or "127.0.0.1:6379"
local QUEUE = os.getenv("QUEUE") or "jobs"
local EXPECT = os.getenv("EXPECT") or "done"
local DEADLINE = tonumber(os.getenv("DEADLINE") or "10")

local r = offpath.redis.connect(ADDR)
local pushed = 0
local waiter

local function wait_for_value(engine)
  local t0, popped, waits = offpath.now(), 0, 0
  while true do
    local got = r:call("BLPOP", QUEUE, 1)
    if got == nil then -- the server-side timeout: nothing yet
      waits = waits + 1
      if offpath.now() - t0 > DEADLINE then
        error(string.format("gave up waiting for %q after %g s", EXPECT,
          DEADLINE), 0)
      end
    elseif got[2] == EXPECT then
      return string.format("got %q after %d other values and %d empty waits",
        EXPECT, popped, waits)
    else
      popped = popped + 1
      engine:count("popped")
    end
  end
end

function on_start(engine)
  waiter = offpath.go(wait_for_value, engine)
end

function on_event(engine, value)
  r:call("RPUSH", QUEUE, value)
  pushed = pushed + 1
end

function on_stop()
  print(string.format("pushed %d values", pushed))
  r:close()
  print(waiter:wait()) -- raises the waiter's error, if it gave up
end
