-- SPDX-License-Identifier: MIT
-- scan-count.lua - count the Redis hashes whose `name` field matches a
-- pattern, walking the keyspace with SCAN in batches, each batch atomic,
-- while the main thread keeps serving events: the "count hashes in
-- batches" function of Redis' "Sync & Async" page, against a real server.
--
--   REDIS_ADDR=127.0.0.1:6379 KEYS='user:*' NAME='^alice' \
--     offpath run examples/redis/scan-count.lua --input events.txt
--
-- on_start starts the scan in its own coroutine (offpath.go) and returns,
-- so records start flowing at once. As the page's block() section does,
-- each batch runs atomically in the server: one EVAL makes the SCAN (COUNT
-- 500, TYPE hash) and the HGETs of the keys it returned, so no other
-- client changes those hashes in between. The matching and the count are
-- done here, between batches, while other clients' commands run on the
-- server. Each call suspends only the scan; meanwhile on_event answers
-- every input record on the spot. on_stop (which the host runs once the
-- scan has ended too) prints the result and how many events were served
-- while the scan was running.
local offpath = require "offpath"

local ADDR = os.getenv("REDIS_ADDR") or "127.0.0.1:6379"
local KEYS = os.getenv("KEYS") or "user:*"
local NAME = os.getenv("NAME") or "^alice"

local scanning = false
local served, served_during_scan = 0, 0
local scan

-- One batch, atomic on the server: the next cursor, the number of hashes
-- the SCAN returned, then the `name` of each that has one.
local BATCH = [[
local res = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3],
  'TYPE', 'hash')
local out = { res[1], #res[2] }
for _, key in ipairs(res[2]) do
  local name = redis.call('HGET', key, 'name')
  if name then out[#out + 1] = name end
end
return out
]]

local function count_matches(engine)
  local r <close> = offpath.redis.connect(ADDR, { timeout = 10 })
  local cursor, batches, hashes, matched = "0", 0, 0, 0
  repeat
    local reply = r:call("EVAL", BATCH, 0, cursor, KEYS, 500)
    cursor = reply[1]
    batches = batches + 1
    hashes = hashes + reply[2]
    for i = 3, #reply do
      if reply[i]:find(NAME) then matched = matched + 1 end
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
