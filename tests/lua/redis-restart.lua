-- SPDX-License-Identifier: MIT
-- redis-restart.lua - an offpath.redis client across a restart of its
-- server: calls in flight fail once with a clear error, calls while the
-- server is down fail fast with the backoff said, and once it is back the
-- same client works again, without being made anew. The test runs its own
-- redis-server (the shared fixture must not be restarted under others).
local T = require "_tap"
local offpath = require "offpath"
local redis = offpath.redis

local DIR = os.tmpname()
os.remove(DIR)
local PORT, ADDR

local function server_start()
  local r = offpath.exec({ "redis-server", "--port", tostring(PORT),
    "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
    "--daemonize", "yes", "--pidfile", DIR .. "/redis.pid", "--dir", DIR,
    "--logfile", DIR .. "/redis.log" }, { timeout = 30 })
  if r.code ~= 0 then return false end
  for _ = 1, 200 do
    local p = offpath.exec({ "redis-cli", "-p", tostring(PORT), "ping" },
      { timeout = 10 })
    if p.stdout:find("PONG") then return true end
    offpath.sleep(0.05)
  end
  return false
end

local function server_kill()
  local f = io.open(DIR .. "/redis.pid")
  if not f then return end
  local pid = f:read("n")
  f:close()
  offpath.exec({ "kill", "-9", tostring(pid) })
  for _ = 1, 200 do -- gone when the port refuses
    local p = offpath.exec({ "redis-cli", "-p", tostring(PORT), "ping" },
      { timeout = 10 })
    if not p.stdout:find("PONG") then break end
    offpath.sleep(0.05)
  end
  os.remove(DIR .. "/redis.pid")
end

T.test("a server of its own starts", function()
  offpath.exec({ "mkdir", "-p", DIR })
  for _ = 1, 10 do
    PORT = math.random(20000, 59999)
    if server_start() then break end
    PORT = nil
  end
  T.ok(PORT, "redis-server did not start")
  ADDR = "127.0.0.1:" .. PORT
end)

T.test("the client survives a restart of its server", function()
  local r = redis.connect(ADDR, { backoff_min = 0.5, backoff_max = 1 })
  T.eq(r:call("SET", "k", "before"), "OK")
  -- calls in flight: a blocking one on its own connection, and a slow one
  -- on the shared connection with ordinary ones pipelined behind it
  local ended = {}
  local inflight = {}
  local function spawn(i, ...)
    local args = table.pack(...)
    inflight[i] = offpath.go(function()
      local ok, e = pcall(r.call, r, table.unpack(args, 1, args.n))
      ended[i] = (ended[i] or 0) + 1
      return ok, e
    end)
  end
  spawn(1, "BLPOP", "nothing", 0)
  spawn(2, "DEBUG", "SLEEP", "0")
  spawn(3, "BLPOP", "nothing-either", 0)
  offpath.sleep(0.2)
  server_kill()
  for i = 1, 3 do
    local ok, e = inflight[i]:wait()
    if i ~= 2 then -- DEBUG SLEEP 0 may have been answered before the kill
      T.eq(ok, false)
      T.ok(tostring(e):find("^redis: connection lost %(" .. ADDR .. "%)"),
        tostring(e))
    end
    T.eq(ended[i], 1)
  end
  -- down: the first call tries and is refused, the next ones fail at once
  -- with the backoff named, without a new attempt
  local ok, e = pcall(r.call, r, "GET", "k")
  T.eq(ok, false)
  T.ok(tostring(e):find("^redis: connection refused %(" .. ADDR .. "%)"),
    tostring(e))
  ok, e = pcall(r.call, r, "GET", "k")
  T.eq(ok, false)
  T.ok(tostring(e):find("^redis: connection refused %(" .. ADDR
    .. "%) %(next attempt in %d+%.%d+ s%)$"), tostring(e))
  ok, e = pcall(r.call, r, "BLPOP", "x", 1)
  T.ok(tostring(e):find("next attempt in", 1, true), tostring(e))
  -- back up: the same client reconnects by itself after the backoff
  T.ok(server_start(), "redis-server did not restart")
  local got, tries = nil, 0
  while got == nil and tries < 200 do
    tries = tries + 1
    local ok2, v = pcall(r.call, r, "SET", "k", "after")
    if ok2 then got = v else offpath.sleep(0.1) end
  end
  T.eq(got, "OK")
  T.eq(r:call("GET", "k"), "after")
  T.eq(r:call("BLPOP", "x", 0.1), nil)
  r:close()
end)

T.test("the backoff options are checked", function()
  T.err("option 'backoff_min' must be from 0 to 3600", redis.connect, ADDR,
    { backoff_min = -1 })
  T.err("option 'backoff_max' is below 'backoff_min'", redis.connect, ADDR,
    { backoff_min = 2, backoff_max = 1 })
end)

T.test("the server stops", function()
  server_kill()
  offpath.exec({ "rm", "-rf", DIR })
end)
