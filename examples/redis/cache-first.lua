-- SPDX-License-Identifier: MIT
-- cache-first.lua - answer from a cache without suspending; go
-- asynchronous only on a miss, and cache what comes back with an expiry.
--
--   REDIS_ADDR=127.0.0.1:6379 offpath run examples/redis/cache-first.lua \
--     --input ids.txt
--
-- Each input record is a user id; the answer is its display name, emitted
-- as "id=ID name=NAME from=SOURCE". Three levels:
--   local    a table in this process, entries kept TTL seconds: a hit is
--            answered on the spot, the handler never suspends;
--   redis    the shared cache "profile:ID" (SET ... EX TTL), one suspending
--            GET;
--   backend  the slow source (here a CPU-heavy function on the io pool),
--            whose answer is then stored in Redis with an expiry.
-- Concurrent misses for one id share a single lookup.
local offpath = require "offpath"

local ADDR = os.getenv("REDIS_ADDR") or "127.0.0.1:6379"
local TTL = tonumber(os.getenv("TTL") or "60")

local r = offpath.redis.connect(ADDR, { timeout = 5 }) -- connects lazily
local cache = {}    -- id -> { name =, expires = }
local inflight = {} -- id -> task of the lookup in progress

-- The slow source: runs on a worker thread, in its own Lua VM.
local function backend(id)
  local h = 0
  for i = 1, 200000 do h = (h * 31 + i + #id) % 1000003 end
  return "user-" .. id .. "-" .. h % 1000
end

-- A miss: Redis first, then the backend. Runs in its own coroutine.
local function lookup(id)
  local key = "profile:" .. id
  local name = r:call("GET", key)
  local source = "redis"
  if not name then
    name = offpath.run("io", backend, id)
    r:call("SET", key, name, "EX", TTL)
    source = "backend"
  end
  cache[id] = { name = name, expires = offpath.now() + TTL }
  return name, source
end

function on_event(engine, id)
  local hit = cache[id]
  if hit and hit.expires > offpath.now() then
    -- The fast path: no call, no suspension.
    engine:count("local")
    engine:emit(string.format("id=%s name=%s from=local", id, hit.name))
    return
  end
  local task = inflight[id]
  if not task then
    task = offpath.go(lookup, id)
    inflight[id] = task
    task:on_done(function() inflight[id] = nil end)
  end
  local name, source = task:wait()
  engine:count(source)
  engine:emit(string.format("id=%s name=%s from=%s", id, name, source))
end

function on_stop()
  r:close()
end
