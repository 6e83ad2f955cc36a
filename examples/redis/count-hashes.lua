-- SPDX-License-Identifier: MIT
-- count-hashes.lua - the "count hashes in batches" function of Redis'
-- "Sync & Async" page, ported line for line: the keyspace lives on the
-- main thread (which plays the Redis server's role), the function runs in
-- the background on a worker, and each SCAN batch is read in an atomic
-- section (offpath.block) while other commands are served between batches.
--
--   offpath run examples/redis/count-hashes.lua --input commands.txt
--
-- Each input record is a command:
--   HSET key field value [field value ...]   -> "(integer) N" fields added
--   DEL key                                  -> "(integer) 0|1"
--   HGET key field                           -> the value, or "(nil)"
--   COUNT name                               -> "count name = N (cached|
--                                               computed in B batches)"
-- COUNT is the page's last version: the cached value "<name>_count" is
-- answered synchronously, without leaving the main thread; only on a miss
-- does the count move to the background (the page's executeAsync), where
-- each batch is one block section (SCAN + HGETs, atomic) that advances the
-- function's `cursor` and `count`, and the result is cached for TTL
-- seconds (default 5) in a last block section. BATCH (default 10) is the
-- number of keys a SCAN returns.
--
-- The keyspace is reached through the global `redis` (redis.call, as in
-- Redis' own Lua): a block section runs on the main thread, where the main
-- VM's globals are visible; a worker has no such global. (An upvalue would
-- not do: it would be copied into the worker, and the sections would read
-- a copy.)
local offpath = require "offpath"

local TTL = tonumber(os.getenv("TTL") or "5")
local BATCH = tonumber(os.getenv("BATCH") or "10")

-- ---- the keyspace (main thread only) ----

-- Keys in insertion order with a cursor over them, as SCAN's: a key
-- present for the whole scan is returned once; a deleted slot stays empty.
local slots, where, hashes, strings, expires = {}, {}, {}, {}, {}

local function exists(key)
  local e = expires[key]
  if e ~= nil and e <= offpath.now() then
    hashes[key], strings[key], expires[key] = nil, nil, nil
    slots[where[key]], where[key] = false, nil
  end
  return where[key] ~= nil
end

local function add_key(key)
  if where[key] == nil then
    slots[#slots + 1] = key
    where[key] = #slots
  end
end

local function del(key)
  if not exists(key) then return 0 end
  hashes[key], strings[key], expires[key] = nil, nil, nil
  slots[where[key]], where[key] = false, nil
  return 1
end

-- The calls a block section makes, like client.call(...) on the page.
redis = {}

function redis.call(cmd, ...)
  local a = { ... }
  cmd = cmd:lower()
  if cmd == "scan" then
    local from, keys = tonumber(a[1]), {}
    local i = from
    while i < #slots and #keys < BATCH do
      i = i + 1
      local key = slots[i]
      if key and exists(key) then keys[#keys + 1] = key end
    end
    return { i < #slots and tostring(i) or "0", keys }
  elseif cmd == "hget" then
    return exists(a[1]) and hashes[a[1]] and hashes[a[1]][a[2]] or nil
  elseif cmd == "get" then
    return exists(a[1]) and strings[a[1]] or nil
  elseif cmd == "set" then
    del(a[1])
    add_key(a[1])
    strings[a[1]] = tostring(a[2])
    return "OK"
  elseif cmd == "expire" then
    if not exists(a[1]) then return 0 end
    expires[a[1]] = offpath.now() + tonumber(a[2])
    return 1
  end
  error("unknown command '" .. cmd .. "'", 2)
end

-- ---- the function (the page's last version) ----

-- The background part: runs on a worker. Each block section is one batch,
-- atomic on the main thread; `cursor` and `count` are this function's
-- locals, and their new values come back from each section.
local function count_async(expected_name)
  local count = 0
  local cursor = '0'
  local batches = 0
  repeat
    offpath.block(function()
      local res = redis.call('scan', cursor)
      cursor = res[1]
      local keys = res[2]
      for _, key in ipairs(keys) do
        if redis.call('hget', key, 'name') == expected_name then
          count = count + 1
        end
      end
      batches = batches + 1
    end)
  until cursor == '0'

  -- set count to the cache with TTL seconds expiration
  offpath.block(function()
    redis.call('set', expected_name .. '_count', count)
    redis.call('expire', expected_name .. '_count', TTL)
  end)

  return count, batches
end

local function count(expected_name)
  -- check the cache first, synchronously: no worker, no suspension
  local cached_value = redis.call('get', expected_name .. '_count')
  if cached_value ~= nil then
    return cached_value, "cached"
  end
  -- cache is not set, move to background
  local n, batches = offpath.run("io", count_async, expected_name)
  return n, "computed in " .. batches .. " batches"
end

-- ---- commands ----

function on_event(engine, line)
  local w = {}
  for word in line:gmatch("%S+") do w[#w + 1] = word end
  local cmd = (w[1] or ""):upper()
  if cmd == "HSET" and #w >= 4 and #w % 2 == 0 then
    add_key(w[2])
    strings[w[2]] = nil
    local h, added = hashes[w[2]] or {}, 0
    for i = 3, #w, 2 do
      if h[w[i]] == nil then added = added + 1 end
      h[w[i]] = w[i + 1]
    end
    hashes[w[2]] = h
    engine:emit("(integer) " .. added)
  elseif cmd == "DEL" and #w == 2 then
    engine:emit("(integer) " .. del(w[2]))
  elseif cmd == "HGET" and #w == 3 then
    engine:emit(redis.call("hget", w[2], w[3]) or "(nil)")
  elseif cmd == "COUNT" and #w == 2 then
    local n, how = count(w[2])
    engine:emit(("count %s = %s (%s)"):format(w[2], n, how))
  elseif cmd ~= "" then
    engine:emit("(error) bad command: " .. line)
  end
end
