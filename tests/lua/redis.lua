-- SPDX-License-Identifier: MIT
-- redis.lua - offpath.redis against a real redis-server
-- (tests/fixtures/redis.sh): reply types, errors, pipelining, blocking
-- commands on their own connection, timeouts that never misdeliver,
-- connection loss and close failing pending calls exactly once.
-- LABELS: redis
local T = require "_tap"
local offpath = require "offpath"
local redis = offpath.redis

local env = {}
do
  local dir = assert(os.getenv("OFFPATH_FIXTURES"), "OFFPATH_FIXTURES unset")
  for line in io.lines(dir .. "/redis.env") do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then env[k] = v:gsub("^'(.*)'$", "%1") end
  end
end
local ADDR, PORT = env.REDIS_ADDR, env.REDIS_PORT
-- Other tests may use the server at the same time (ctest -j): this one
-- keeps its keys in its own database and counts only its connections.
local DB = 9

-- In the main chunk connect returns at once (no suspension) and the
-- connection is made by the first command; calls cannot suspend here.
local early = redis.connect(ADDR)
local early_refused = redis.connect("127.0.0.1:1")
local main_ok, main_err = pcall(early.call, early, "PING")

local function fails(fn, ...)
  local ok, err = pcall(fn, ...)
  T.eq(ok, false, "expected an error")
  return tostring(err)
end

-- Connections the server has now in database DB (every connection of a
-- client made with { db = DB } is, dedicated ones included).
local function clients(c)
  local n = 0
  for line in c:call("CLIENT", "LIST"):gmatch("[^\n]+") do
    if line:find(" db=" .. DB .. " ", 1, true) then n = n + 1 end
  end
  return n
end

-- Wait (up to 2 s) until the server counts n connections: it notices a
-- closed connection a moment after the client closed it.
local function settle(c, n)
  local got
  for _ = 1, 200 do
    got = clients(c)
    if got == n then return end
    offpath.sleep(0.01)
  end
  T.eq(got, n, "connections on the server")
end

-- The count once it stops changing (closes still being noticed).
local function stable(c)
  local last = clients(c)
  for _ = 1, 100 do
    offpath.sleep(0.05)
    local now = clients(c)
    if now == last then return now end
    last = now
  end
  return last
end

local r -- the shared client of most tests

T.test("connect in the main chunk works without suspending", function()
  T.eq(main_ok, false)
  T.ok(tostring(main_err):find("cannot suspend: offpath.redis call called "
    .. "outside a handler", 1, true), main_err)
  T.eq(early:call("PING"), "PONG")
  local e = fails(early_refused.call, early_refused, "PING")
  T.eq(e, "redis: connection refused (127.0.0.1:1)")
  early:close()
  early_refused:close()
end)

T.test("connect suspends until the server answers", function()
  r = redis.connect(ADDR, { timeout = 5, db = DB })
  T.eq(tostring(r), "offpath.redis (" .. ADDR .. ")")
  T.eq(r:call("FLUSHDB"), "OK")
  -- a URL, and a name resolved without blocking
  local u = redis.connect("redis://127.0.0.1:" .. PORT)
  T.eq(u:call("PING"), "PONG"); u:close()
  local l = redis.connect("localhost:" .. PORT)
  T.eq(l:call("ECHO", "x"), "x"); l:close()
end)

T.test("replies become Lua values", function()
  T.eq(r:call("SET", "s", "v"), "OK")                 -- status
  T.eq(r:call("GET", "s"), "v")                       -- bulk string
  T.eq(r:call("GET", "missing"), nil)                 -- nil
  local n = r:call("INCR", "n")                       -- integer
  T.eq(n, 1); T.eq(math.type(n), "integer")
  T.eq(r:call("INCRBY", "n", 2^40), 2^40 + 1)         -- numbers as args
  T.eq(r:call("SET", "f", 1.5), "OK"); T.eq(r:call("GET", "f"), "1.5")
  local bin = "a\0b\r\n\255"
  r:call("SET", bin, bin)                             -- binary-safe
  T.eq(r:call("GET", bin), bin)
  r:call("RPUSH", "l", "x", "y", "z")
  local l = r:call("LRANGE", "l", 0, -1)              -- array
  T.eq(#l, 3); T.eq(l[1], "x"); T.eq(l[3], "z")
  local empty = r:call("LRANGE", "nolist", 0, -1)
  T.eq(type(empty), "table"); T.eq(#empty, 0)
  local m = r:call("MGET", "s", "missing", "s")       -- nil inside: false
  T.eq(m[1], "v"); T.eq(m[2], false); T.eq(m[3], "v")
  local nested = r:call("EVAL",
    "return {1, {2, 'x'}, redis.error_reply('bad'), 'y'}", 0)
  T.eq(nested[1], 1); T.eq(nested[2][1], 2); T.eq(nested[2][2], "x")
  T.eq(nested[3].err, "ERR bad"); T.eq(nested[4], "y")
  T.eq(r:call("TYPE", "l"), "list")
end)

T.test("error replies are raised", function()
  local e = fails(r.call, r, "NOSUCHCOMMAND", "a")
  T.ok(e:find("^redis: ERR unknown command 'NOSUCHCOMMAND'"), e)
  e = fails(r.call, r, "INCR", "l")
  T.ok(e:find("^redis: WRONGTYPE"), e)
  -- the connection goes on
  T.eq(r:call("PING"), "PONG")
end)

T.test("a reply nested deeper than hiredis reads loses the connection", function()
  local c = redis.connect(ADDR)
  local deep = "local t = {} local c = t for i = 1, tonumber(ARGV[1]) do "
    .. "local n = {} c[1] = n c = n end c[1] = 'x' return t"
  local v = c:call("EVAL", deep, 0, 6)
  for _ = 1, 6 do v = v[1] end
  T.eq(v[1], "x")
  local count = T.expect(nil, 1, "too deep")
  local e = fails(function() local ok, x = pcall(c.call, c, "EVAL", deep, 0, 9)
    count(); if not ok then error(x, 0) end end)
  T.ok(e:find("^redis: connection lost %(" .. ADDR:gsub("%p", "%%%0")
    .. "%): No support for nested multi bulk replies"), e)
  T.eq(c:call("PING"), "PONG") -- a new connection
  c:close()
end)

T.test("bad arguments and unsupported commands are refused", function()
  T.err("command name expected", r.call, r)
  T.err("string or number expected, got table", r.call, r, "GET", {})
  T.err("string or number expected, got nil", r.call, r, "SET", "k", nil)
  T.err("redis: SUBSCRIBE is not supported", r.call, r, "SUBSCRIBE", "c")
  T.err("redis: psubscribe is not supported", r.call, r, "psubscribe", "c*")
  T.err("redis: MONITOR is not supported", r.call, r, "MONITOR")
  T.err("redis: MULTI is not supported.*EVAL", r.call, r, "MULTI")
  T.err("redis: SELECT is not supported.*db option", r.call, r, "SELECT", 1)
  T.err("redis: WAIT is not supported", r.call, r, "WAIT", 0, 0)
  T.err("redis: HELLO is not supported", r.call, r, "HELLO", 3)
  T.err("must be positive", r.call_timeout, r, 0, "PING")
  T.err("redis: bad port", redis.connect, "127.0.0.1:99999")
  T.err("redis: bad address", redis.connect, "[::1")
  T.err("redis: bad database number", redis.connect, "redis://127.0.0.1/x")
end)

T.test("1000 concurrent calls are pipelined, each answered once", function()
  r:call("DEL", "ctr")
  local seen = {}
  local tasks = {}
  for i = 1, 1000 do
    tasks[i] = offpath.go(function() return r:call("INCR", "ctr") end)
  end
  local res = offpath.all(tasks)
  for i = 1, 1000 do
    T.eq(res[i][1], true, tostring(res[i][2]))
    local v = res[i][2]
    T.eq(seen[v], nil, "reply " .. tostring(v) .. " delivered twice")
    seen[v] = true
  end
  for v = 1, 1000 do T.ok(seen[v], "reply " .. v .. " missing") end
  T.eq(r:call("GET", "ctr"), "1000")
end)

T.test("BLPOP waits on its own connection while other calls proceed", function()
  r:call("DEL", "q")
  local before = stable(r)
  local popper = offpath.go(function() return r:call("BLPOP", "q", 5) end)
  offpath.sleep(0.05)
  -- the shared connection is not held up by the blocked BLPOP
  local t0 = offpath.now()
  for i = 1, 20 do T.eq(r:call("ECHO", i), tostring(i)) end
  T.ok(offpath.now() - t0 < 1, "calls were held up by BLPOP")
  settle(r, before + 1)
  T.eq(r:call("LPUSH", "q", "item"), 1)
  local got = popper:wait()
  T.eq(got[1], "q"); T.eq(got[2], "item")
  -- the dedicated connection is reused for the next blocking call
  local again = offpath.go(function() return r:call("BRPOP", "q", 5) end)
  offpath.sleep(0.05)
  settle(r, before + 1)
  r:call("RPUSH", "q", "second")
  T.eq(again:wait()[2], "second")
  -- two blocking calls at once get two connections
  local a = offpath.go(function() return r:call("BLPOP", "qa", 5) end)
  local b = offpath.go(function() return r:call("BLPOP", "qb", 5) end)
  settle(r, before + 2)
  r:call("RPUSH", "qb", "B"); r:call("RPUSH", "qa", "A")
  T.eq(a:wait()[2], "A"); T.eq(b:wait()[2], "B")
  -- a server-side timeout is a nil reply, not an error
  T.eq(r:call("BLPOP", "never", 0.1), nil)
  -- XREAD with BLOCK is a blocking command too
  local x = offpath.go(function()
    return r:call("XREAD", "BLOCK", 5000, "STREAMS", "st", "$")
  end)
  offpath.sleep(0.05)
  T.eq(r:call("PING"), "PONG")
  r:call("XADD", "st", "*", "k", "v")
  local xr = x:wait()
  T.eq(xr[1][1], "st"); T.eq(xr[1][2][1][2][2], "v")
end)

T.test("a timed-out reply is dropped, never given to the next call", function()
  r:call("SET", "after", "right")
  local e = fails(r.call_timeout, r, 0.1, "DEBUG", "SLEEP", "0.4")
  T.ok(e:find("^timeout after 0.1 s in offpath.redis call"), e)
  -- the DEBUG reply ("OK") arrives later on the same connection and must
  -- not be taken for these
  T.eq(r:call("GET", "after"), "right")
  T.eq(r:call("ECHO", "next"), "next")
  -- the client's default timeout applies to every ordinary call
  local short = redis.connect(ADDR, { timeout = 0.1 })
  e = fails(short.call, short, "DEBUG", "SLEEP", "0.3")
  T.ok(e:find("^timeout"), e)
  -- (the server itself sleeps on, so give this one more time)
  T.eq(short:call_timeout(5, "ECHO", "ok"), "ok")
  -- but not to blocking commands, which have their own timeout
  T.eq(short:call("BLPOP", "never", 0.3), nil)
  short:close()
end)

T.test("a timed-out blocking call closes its connection", function()
  local before = stable(r)
  local c = redis.connect(ADDR, { db = DB })
  settle(r, before + 1)
  local t = offpath.go(function()
    return c:call_timeout(0.5, "BLPOP", "nothing", 0)
  end)
  settle(r, before + 2) -- the dedicated connection
  local e = fails(t.wait, t)
  T.ok(e:find("^timeout after 0.5 s in offpath.redis call"), e)
  settle(r, before + 1) -- closed again
  c:close()
  -- and blocking calls still work afterwards
  local p = offpath.go(function() return r:call("BLPOP", "later", 5) end)
  offpath.sleep(0.05)
  r:call("RPUSH", "later", "x")
  T.eq(p:wait()[2], "x")
end)

T.test("connection refused is an error of connect, raised once", function()
  local done = T.expect(nil, 1, "refused connect")
  local e = fails(function()
    local c = redis.connect("127.0.0.1:1")
    done() -- never reached
    return c
  end)
  T.eq(e, "redis: connection refused (127.0.0.1:1)")
  done()
  e = fails(redis.connect, "offpath-test.invalid:" .. PORT)
  T.ok(e:find("^redis: cannot resolve host 'offpath%-test.invalid'"), e)
end)

T.test("a killed connection fails each pending call exactly once", function()
  local c = redis.connect(ADDR)
  local id = c:call("CLIENT", "ID")
  local outcomes = {}
  local count = T.expect(nil, 5, "killed calls")
  local tasks = {}
  -- the kill and four more commands leave in one write; the server
  -- answers the kill and closes the connection before the others
  tasks[1] = offpath.go(function()
    return c:call("CLIENT", "KILL", "ID", id, "SKIPME", "no")
  end)
  for i = 2, 5 do
    tasks[i] = offpath.go(function()
      local ok, err = pcall(c.call, c, "ECHO", i)
      count()
      outcomes[i] = err
      return ok
    end)
  end
  local t1 = tasks[1]
  local ok1, v1 = pcall(t1.wait, t1)
  count()
  T.ok(not ok1 or v1 == 1, tostring(v1))
  for i = 2, 5 do
    T.eq(tasks[i]:wait(), false)
    T.ok(tostring(outcomes[i]):find("^redis: connection lost %(127.0.0.1:"
      .. PORT .. "%)"), outcomes[i])
  end
  -- the next call makes a new connection
  T.eq(c:call("PING"), "PONG")
  T.ok(c:call("CLIENT", "ID") ~= id)
  -- a blocked call killed from another client
  local cb = redis.connect(ADDR, { db = DB })
  local blocked = offpath.go(function()
    return pcall(cb.call, cb, "BLPOP", "killme", 0)
  end)
  -- the blocked one (flags=b); idle ones may show cmd=blpop too
  local list, bid
  for _ = 1, 200 do
    list = r:call("CLIENT", "LIST")
    bid = list:match("id=(%d+) [^\n]* flags=b db=" .. DB
      .. " [^\n]*cmd=blpop")
    if bid then break end
    offpath.sleep(0.01)
  end
  T.ok(bid, list)
  T.eq(r:call("CLIENT", "KILL", "ID", bid), 1)
  local ok, err = blocked:wait()
  T.eq(ok, false)
  T.ok(tostring(err):find("^redis: connection lost"), err)
  cb:close()
  c:close()
end)

T.test("close fails pending calls once and refuses new ones", function()
  local c = redis.connect(ADDR)
  local count = T.expect(nil, 3, "calls pending at close")
  local tasks = {}
  for i = 1, 3 do
    tasks[i] = offpath.go(function()
      local ok, err = pcall(c.call, c, "BLPOP", "nothing" .. i, 0)
      count()
      return ok, err
    end)
  end
  offpath.sleep(0.05)
  c:close()
  c:close() -- twice is fine
  for i = 1, 3 do
    local ok, err = tasks[i]:wait()
    T.eq(ok, false)
    T.eq(err, "redis: connection closed (" .. ADDR .. ")")
  end
  T.err("redis: the client is closed", c.call, c, "PING")
  T.eq(tostring(c), "offpath.redis (" .. ADDR .. ", closed)")
  -- a to-be-closed variable closes at the end of its scope
  local before = stable(r)
  do
    local s <close> = redis.connect(ADDR, { db = DB })
    T.eq(s:call("PING"), "PONG")
    settle(r, before + 1)
  end
  settle(r, before)
  -- and garbage collection closes a forgotten client
  do
    local g = redis.connect(ADDR, { db = DB })
    g:call("PING")
  end
  settle(r, before + 1)
  collectgarbage(); collectgarbage()
  settle(r, before)
end)

T.test("db and password options, from opts or the URL", function()
  local d = redis.connect("redis://127.0.0.1:" .. PORT .. "/3")
  d:call("SET", "indb3", "yes")
  T.eq(d:call("GET", "indb3"), "yes")
  T.eq(r:call("GET", "indb3"), nil) -- r is in db DB
  d:close()
  local o = redis.connect(ADDR, { db = 3 })
  T.eq(o:call("GET", "indb3"), "yes"); o:close()
  local e = fails(redis.connect, ADDR, { db = 99 })
  T.ok(e:find("^redis: SELECT failed %(" .. ADDR:gsub("%p", "%%%0")
    .. "%): ERR DB index is out of range"), e)
  local pw = env.REDIS_PASSWORD
  local paddr = "127.0.0.1:" .. env.REDIS_PASSWORD_PORT
  local p = redis.connect(paddr, { password = pw })
  T.eq(p:call("PING"), "PONG"); p:close()
  local u = redis.connect("redis://:" .. pw .. "@" .. paddr .. "/1")
  T.eq(u:call("PING"), "PONG"); u:close()
  e = fails(redis.connect, paddr)
  T.ok(e:find("^redis: NOAUTH"), e)
  e = fails(redis.connect, paddr, { password = "wrong" })
  T.ok(e:find("^redis: AUTH failed %(" .. paddr:gsub("%p", "%%%0")
    .. "%): WRONGPASS"), e)
  e = fails(redis.connect, paddr, { user = "default", password = "wrong" })
  T.ok(e:find("^redis: AUTH failed"), e)
end)
