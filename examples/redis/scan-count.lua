-- scan-count.lua - count the Redis hashes whose `name` field matches a
-- pattern, walking the keyspace with SCAN in batches, while the main
-- thread keeps serving events.
--
--   REDIS_ADDR=127.0.0.1:6379 KEYS='user:*' NAME='^alice' \
--     offpath run examples/redis/scan-count.lua --input events.txt
--
-- on_start starts the scan in its own coroutine (offpath.go) and returns,
-- so records start flowing at once. The scan makes one SCAN per batch
-- (COUNT 500, TYPE hash), then the batch's HGETs all at once (pipelined on
-- the one connection), then the next SCAN. Each call suspends only the
-- scan; meanwhile on_event answers every input record on the spot. on_stop
-- (which the host runs once the scan has ended too) prints the result and
-- how many events were served while the scan was running.
local offpath = require "offpath"

local ADDR = os.getenv("REDIS_ADDR") or "127.0.0.1:6379"
local KEYS = os.getenv("KEYS") or "user:*"
local NAME = os.getenv("NAME") or "^alice"

local scanning = false
local served, served_during_scan = 0, 0
local scan

local function count_matches(engine)
  local r <close> = offpath.redis.connect(ADDR, { timeout = 10 })
  local cursor, batches, hashes, matched = "0", 0, 0, 0
  repeat
    local reply = r:call("SCAN", cursor, "MATCH", KEYS, "COUNT", 500,
      "TYPE", "hash")
    cursor = reply[1]
    batches = batches + 1
    -- The batch's lookups leave together and come back together.
    local lookups = {}
    for i, key in ipairs(reply[2]) do
      lookups[i] = offpath.go(r.call, r, "HGET", key, "name")
    end
    for _, got in ipairs(offpath.all(lookups)) do
      local ok, name = got[1], got[2]
      if not ok then error(name, 0) end
      hashes = hashes + 1
      if name and name:find(NAME) then matched = matched + 1 end
    end
  until cursor == "0"
  scanning = false
  engine:count("matched", matched)
  return string.format("%d of %d hashes match %s (%d batches)", matched,
    hashes, NAME, batches)
end

function on_start(engine)
  scanning = true
  scan = offpath.go(count_matches, engine)
end

-- The fast path: answered at once, scan or no scan.
function on_event(engine, record)
  served = served + 1
  if scanning then served_during_scan = served_during_scan + 1 end
  engine:count("events")
end

function on_stop()
  print(scan:wait()) -- raises the scan's error, if it failed
  print(string.format("served %d events, %d of them during the scan", served,
    served_during_scan))
end
