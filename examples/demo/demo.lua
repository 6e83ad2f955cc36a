-- SPDX-License-Identifier: MIT
-- demo.lua - one event handler, two ways of doing its slow part.
--
-- Every event counts traffic per user. One event in ten is a "lookup" that
-- needs a blocking call of about 10 ms (here a real one: an external
-- program, like a DNS or database client would be). OFFPATH_DEMO_MODE
-- chooses where it runs:
--   inline   on the main thread, as a plain Lua engine would do it;
--   pool     in the io worker pool through offpath.run, which suspends
--            only this handler while the main thread goes on.
-- on_stop emits one line of measurements for run.sh's table.
local MODE = os.getenv("OFFPATH_DEMO_MODE") or "pool"

-- The slow, blocking part: ~10 ms. Returns a made-up risk score.
local function lookup(user)
  os.execute("sleep 0.01")
  return (#user * 37) % 100
end

local t0
local bytes = {}

function on_start(engine)
  t0 = offpath.now()
end

function on_event(engine, ev)
  bytes[ev.user] = (bytes[ev.user] or 0) + ev.bytes
  if ev.op == "lookup" then
    local score
    if MODE == "inline" then
      score = lookup(ev.user)
    else
      score = offpath.run("io", lookup, ev.user)
    end
    engine:count("lookups")
    if score > 90 then engine:count("risky") end
  end
end

-- A duration in a readable unit.
local function dur(s)
  if s < 1e-6 then return string.format("%.0f ns", s * 1e9) end
  if s < 1e-3 then return string.format("%.0f us", s * 1e6) end
  if s < 1 then return string.format("%.1f ms", s * 1e3) end
  return string.format("%.2f s", s)
end

function on_stop(engine)
  local s = engine:stats()
  local wall = offpath.now() - t0
  local main = s.latency.main
  engine:emit(table.concat({
    MODE, tostring(s.records.processed), string.format("%.2f s", wall),
    string.format("%.0f/s", s.records.processed / wall),
    dur(main.p50), dur(main.p99), dur(main.max),
    tostring(s.counters.lookups or 0),
  }, "|"))
end
