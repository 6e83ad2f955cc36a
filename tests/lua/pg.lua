-- SPDX-License-Identifier: MIT
-- pg.lua - offpath.pg against a real PostgreSQL server: connect, typed
-- results, parameters, errors with SQLSTATE, timeouts that cancel on the
-- server, the connection pool.
-- LABELS: postgres tsan
local T = require "_tap"
local offpath = require "offpath"

-- The fixture (tests/fixtures/postgres.sh) wrote the server's address.
local function fixture_env(name)
  local dir = assert(os.getenv("OFFPATH_FIXTURES"), "OFFPATH_FIXTURES unset")
  local f = assert(io.open(dir .. "/" .. name .. ".env"))
  local env = {}
  for line in f:lines() do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then env[k] = v:match("^'(.*)'$") or v end
  end
  f:close()
  return env
end

local PG = fixture_env("postgres")
local CONNINFO = PG.PG_CONNINFO

-- Runs fn in its own coroutine, checks it ends exactly once (on_done is
-- counted, and on_stop fails the test on a missing or extra call) and
-- returns what pcall(fn) would.
local function once(fn, ...)
  local t = offpath.go(function(...) return fn(...) end, ...)
  t:on_done(T.expect(nil, 1, debug.getinfo(2, "Sl").short_src .. ":" ..
    debug.getinfo(2, "l").currentline))
  return pcall(t.wait, t)
end

-- Poll fn every 10 ms until it returns true, for at most limit seconds.
local function eventually(fn, limit)
  local t0 = offpath.now()
  repeat
    if fn() then return true end
    offpath.sleep(0.01)
  until offpath.now() - t0 > limit
  return false
end

-- A second connection, to look at the server from the side.
local admin

-- In the main chunk nothing may suspend: connect returns at once and the
-- first connection is made in the background; queries wait for it.
local early = offpath.pg.connect(CONNINFO)
local early_named = offpath.pg.connect(string.format(
  "host=localhost port=%s user=%s dbname=%s", PG.PG_PORT, PG.PG_USER, PG.PG_DB))
local early_refused = offpath.pg.connect("host=127.0.0.1 port=1 user=x")

T.test("connect where nothing may suspend returns at once", function()
  T.eq(early:query("SELECT 1 AS x")[1].x, 1)
  T.eq(early:stats().opened, 1)
  T.eq(early_named:query("SELECT inet_server_addr()::text AS a")[1].a,
    "127.0.0.1/32")
  -- The connect's failure comes with each query; the next attempt waits
  -- for the backoff, and a query meanwhile says so.
  for i = 1, 2 do
    local ok, e = once(early_refused.query, early_refused, "SELECT 1")
    T.eq(ok, false)
    -- The first query may find the connect already failed (a loaded
    -- machine): then it too is told when the next attempt is.
    local head = '^pg: connection failed: Connection refused %(server at ' ..
      '"127.0.0.1", port 1%)'
    local wait = ' %(next attempt in %d+%.%d+ s%)'
    T.ok(e:find(head .. wait .. ' %(db:query at') or
      (i == 1 and e:find(head .. ' %(db:query at')), e)
  end
  -- A comparator of table.sort may not suspend either: connect returns at
  -- once there too, and a query raises.
  local db, e
  table.sort({ 1, 2 }, function(a, b)
    db = offpath.pg.connect(CONNINFO)
    e = select(2, pcall(db.query, db, "SELECT 1"))
    return a < b
  end)
  T.ok(tostring(e):find("^cannot suspend: db:query"), e)
  T.eq(db:query("SELECT 2 AS x")[1].x, 2)
  db:close(); early:close(); early_named:close(); early_refused:close()
end)

T.test("connect, and typed results", function()
  admin = offpath.pg.connect(CONNINFO, { pool = 1 })
  local rows, n = admin:query([[
    SELECT 1::int2 AS i2, 2::int4 AS i4, 9007199254740993::int8 AS i8,
           1.5::float4 AS f4, 0.1::float8 AS f8, 12.25::numeric AS num,
           true AS yes, false AS no, 'text'::text AS t, 'vc'::varchar AS vc,
           NULL::int AS nothing, '\x00ff41'::bytea AS bin,
           '{"a": 1}'::json AS js, DATE '2024-02-29' AS d,
           'NaN'::float8 AS nan, 'Infinity'::float8 AS inf]])
  T.eq(#rows, 1); T.eq(n, 1)
  local r = rows[1]
  T.eq(r.i2, 1); T.eq(math.type(r.i2), "integer")
  T.eq(r.i4, 2); T.eq(math.type(r.i4), "integer")
  T.eq(r.i8, 9007199254740993); T.eq(math.type(r.i8), "integer")
  T.eq(r.f4, 1.5); T.eq(math.type(r.f4), "float")
  T.eq(r.f8, 0.1); T.eq(math.type(r.f8), "float")
  T.eq(r.num, 12.25); T.eq(math.type(r.num), "float")
  T.eq(r.yes, true); T.eq(r.no, false)
  T.eq(r.t, "text"); T.eq(r.vc, "vc")
  T.eq(r.nothing, nil)
  T.eq(r.bin, "\0\255A")
  T.eq(r.js, '{"a": 1}'); T.eq(r.d, "2024-02-29")
  T.ok(r.nan ~= r.nan, "NaN"); T.eq(r.inf, math.huge)
end)

T.test("several rows, empty results, command counts", function()
  local rows, n = admin:query("SELECT g AS x FROM generate_series(1, 5) g")
  T.eq(#rows, 5); T.eq(n, 5)
  for i = 1, 5 do T.eq(rows[i].x, i) end
  rows, n = admin:query("SELECT 1 AS x WHERE false")
  T.eq(#rows, 0); T.eq(n, 0)
  rows, n = admin:query("")
  T.eq(#rows, 0); T.eq(n, 0)
  admin:query("DROP TABLE IF EXISTS pg_lua_counts")
  admin:query("CREATE TABLE pg_lua_counts (id int PRIMARY KEY, v text)")
  rows, n = admin:query("INSERT INTO pg_lua_counts SELECT g, 'v' || g " ..
    "FROM generate_series(1, 7) g")
  T.eq(#rows, 0); T.eq(n, 7)
  rows, n = admin:query("UPDATE pg_lua_counts SET v = 'w' WHERE id > $1", 4)
  T.eq(n, 3)
  -- Several statements without parameters: the last one's rows.
  rows, n = admin:query("DELETE FROM pg_lua_counts WHERE id = 1; " ..
    "SELECT count(*) AS c FROM pg_lua_counts")
  T.eq(rows[1].c, 6); T.eq(n, 1)
  admin:query("DROP TABLE pg_lua_counts")
end)

T.test("parameters of each type", function()
  local r = admin:query([[SELECT $1::int8 AS i, $2::float8 AS f,
      $3::bool AS b, $4::text AS s, $5::text AS n, $6::float8 AS big,
      $7::int8 AS maxi, $8::float8 AS inf, $9::float8 AS ninf,
      $10::bool AS no, $11::text AS quoted, $12::numeric AS num]],
    -42, 0.1, true, "héllo", nil, 1e300, math.maxinteger, math.huge,
    -math.huge, false, "it's \"quoted\"; DROP TABLE x", 1 / 3)[1]
  T.eq(r.i, -42); T.eq(math.type(r.i), "integer")
  T.eq(r.f, 0.1); T.eq(r.b, true); T.eq(r.s, "héllo"); T.eq(r.n, nil)
  T.eq(r.big, 1e300); T.eq(r.maxi, math.maxinteger)
  T.eq(r.inf, math.huge); T.eq(r.ninf, -math.huge); T.eq(r.no, false)
  T.eq(r.quoted, "it's \"quoted\"; DROP TABLE x")
  T.eq(r.num, 1 / 3)
  -- A parameter's text is untyped for the server: $1 alone is text.
  T.eq(admin:query("SELECT $1 AS x", 7)[1].x, "7")
  -- A trailing nil still counts as a parameter.
  T.eq(admin:query("SELECT $1::int IS NULL AS x", nil)[1].x, true)
end)

T.test("bad parameters are refused before anything is sent", function()
  T.err("bad argument #3 to '%S+' %(string contains a zero byte%)",
    admin.query, admin, "SELECT $1::text", "a\0b")
  T.err("bad argument #4 to '%S+' %(nil, boolean, number or string " ..
    "expected, got table%)", admin.query, admin, "SELECT $1, $2", 1, {})
  T.err("bad argument #2 to '%S+' %(field 'sql' or %[1%] must be a string%)",
    admin.query, admin, { nosql = 1 })
  -- Called as a method, the position is the method's own.
  T.err("bad argument #2 to 'query' %(nil, boolean, number or string",
    function() return admin:query("SELECT $1", print) end)
  T.err("bad option 'timeout'", admin.query, admin, { "SELECT 1",
    timeout = "soon" })
  T.eq(admin:query("SELECT 1 AS ok")[1].ok, 1)
end)

T.test("errors carry SQLSTATE and message; the connection goes on", function()
  local ok, e = once(admin.query, admin, "SELECT * FROM nope")
  T.eq(ok, false)
  T.ok(e:find('^pg: ERROR 42P01: relation "nope" does not exist %(db:query' ..
    ' at .*pg.lua:%d+%)'), e)
  ok, e = once(admin.query, admin, "SELEC 1")
  T.ok(e:find("^pg: ERROR 42601: syntax error at or near \"SELEC\""), e)
  ok, e = once(admin.query, admin, "SELECT 1 / $1::int", 0)
  T.ok(e:find("^pg: ERROR 22012: division by zero"), e)
  admin:query("DROP TABLE IF EXISTS pg_lua_uniq")
  admin:query("CREATE TABLE pg_lua_uniq (id int PRIMARY KEY)")
  admin:query("INSERT INTO pg_lua_uniq VALUES (1)")
  ok, e = once(admin.query, admin, "INSERT INTO pg_lua_uniq VALUES ($1)", 1)
  T.ok(e:find('^pg: ERROR 23505: duplicate key value violates unique ' ..
    'constraint "pg_lua_uniq_pkey"; DETAIL: Key %(id%)=%(1%) already ' ..
    'exists%.'), e)
  -- A failed statement in a list of several stops the list.
  ok, e = once(admin.query, admin, "INSERT INTO pg_lua_uniq VALUES (2); " ..
    "SELECT 1/0; INSERT INTO pg_lua_uniq VALUES (3)")
  T.ok(e:find("^pg: ERROR 22012"), e)
  T.eq(admin:query("SELECT count(*) AS c FROM pg_lua_uniq")[1].c, 1)
  -- COPY is refused and the connection stays usable.
  ok, e = once(admin.query, admin, "COPY pg_lua_uniq FROM STDIN")
  T.ok(e:find("^pg: ERROR 57014: COPY from stdin failed: COPY FROM STDIN " ..
    "is not supported by offpath.pg"), e)
  admin:query("DROP TABLE pg_lua_uniq")
  T.eq(admin:stats().opened, 1, "errors do not cost the connection")
  -- COPY TO STDOUT costs its connection; the pool makes a new one.
  local db = offpath.pg.connect(CONNINFO, { pool = 1 })
  ok, e = once(db.query, db, "COPY (SELECT 1) TO STDOUT")
  T.ok(e:find("^pg: COPY TO STDOUT is not supported by offpath.pg " ..
    "%(db:query at"), e)
  T.eq(db:query("SELECT 3 AS x")[1].x, 3)
  T.eq(db:stats().opened, 2)
  db:close()
end)

T.test("bad credentials raise at connect", function()
  local ok, e = once(offpath.pg.connect, string.format(
    "host=127.0.0.1 port=%s dbname=postgres user=%s password=wrong",
    PG.PG_PORT, PG.PG_PW_USER))
  T.eq(ok, false)
  T.ok(e:find('^pg: connection failed: FATAL: password authentication ' ..
    'failed for user "offpath_pw" %(server at "127.0.0.1", port ' ..
    PG.PG_PORT .. '%) %(offpath.pg.connect at .*pg.lua:%d+%)'), e)
  -- The right password works.
  local db = offpath.pg.connect(string.format(
    "host=127.0.0.1 port=%s dbname=postgres user=%s password=%s",
    PG.PG_PORT, PG.PG_PW_USER, PG.PG_PW_PASSWORD))
  T.eq(db:query("SELECT current_user AS u")[1].u, "offpath_pw")
  db:close()
end)

T.test("connection refused, bad conninfo, unknown host", function()
  local ok, e = once(offpath.pg.connect, "host=127.0.0.1 port=1 user=x")
  T.ok(e:find('^pg: connection failed: Connection refused %(server at ' ..
    '"127.0.0.1", port 1%)'), e)
  ok, e = once(offpath.pg.connect, "host=127.0.0.1 nosuchkey=1")
  -- A bad argument: the position comes first, as for any argument error.
  T.ok(e:find('pg.lua:%d+: pg: bad conninfo: invalid connection option ' ..
    '"nosuchkey"'), e)
  ok, e = once(offpath.pg.connect, "host=127.0.0.1 port=notaport")
  T.ok(e:find('^pg: connection failed: invalid integer value "notaport" ' ..
    'for connection option "port" %(offpath.pg.connect at .*pg.lua:%d+%)'), e)
  -- No DNS server is needed to fail: either the resolver says no or the
  -- deadline ends the wait; the loop never blocks.
  local t0 = offpath.now()
  ok, e = once(offpath.pg.connect, "host=no-such-host.invalid user=x",
    { timeout = 3 })
  T.ok(e:find('^pg: connection failed: cannot resolve host ' ..
    '"no%-such%-host.invalid"') or e:find("^timeout after 3 s"), e)
  T.ok(offpath.now() - t0 < 5)
end)

T.test("host names are resolved without blocking (localhost)", function()
  local db = offpath.pg.connect(string.format(
    "host=localhost port=%s user=%s dbname=%s", PG.PG_PORT, PG.PG_USER,
    PG.PG_DB))
  T.eq(db:query("SELECT inet_server_addr()::text AS a")[1].a, "127.0.0.1/32")
  db:close()
  T.err("^pg: database closed", db.query, db, "SELECT 1")
end)

T.test("unix socket connections", function()
  local db = offpath.pg.connect(string.format("host=%s port=%s user=%s " ..
    "dbname=%s", PG.PG_SOCKET_DIR, PG.PG_PORT, PG.PG_USER, PG.PG_DB))
  T.eq(db:query("SELECT inet_server_addr() IS NULL AS unix")[1].unix, true)
  db:close()
end)

local ACTIVE = "SELECT count(*) AS n FROM pg_stat_activity " ..
  "WHERE query LIKE $1 AND state = 'active' AND pid <> pg_backend_pid()"

-- Wait until the server shows no active query with this text.
local function gone(marker, limit)
  local t0 = offpath.now()
  while offpath.now() - t0 < limit do
    if admin:query(ACTIVE, "%" .. marker .. "%")[1].n == 0 then
      return offpath.now() - t0
    end
    offpath.sleep(0.02)
  end
  return nil
end

T.test("a query timeout cancels the query on the server", function()
  local db = offpath.pg.connect(CONNINFO, { pool = 1 })
  local t0 = offpath.now()
  local ok, e = once(db.query, db, { "SELECT pg_sleep(10) /* timeout1 */",
    timeout = 0.2 })
  local took = offpath.now() - t0
  T.eq(ok, false)
  T.ok(e:find("^timeout after 0.2 s in db:query at .*pg.lua:%d+"), e)
  T.ok(took >= 0.19 and took < 1.5, "took " .. took)
  T.ok(gone("timeout1", 2), "the query still runs on the server")
  -- The same (only) connection serves the next query, after draining.
  T.eq(db:query("SELECT 5 AS x")[1].x, 5)
  T.eq(db:stats().opened, 1)
  -- The default timeout of the db object.
  local db2 = offpath.pg.connect(CONNINFO, { timeout = 0.1 })
  -- Connect first under a longer timeout: a loaded machine may take more
  -- than 0.1 s to connect, and this is about the query.
  T.eq(db2:query({ "SELECT 1 AS x", timeout = 5 })[1].x, 1)
  ok, e = once(db2.query, db2, "SELECT pg_sleep(10) /* timeout2 */")
  T.ok(e:find("^timeout after 0.1 s in db:query"), e)
  T.ok(gone("timeout2", 2), "the query still runs on the server")
  -- A query that ends before its timeout is not cancelled.
  T.eq(db2:query({ "SELECT 3 AS x", timeout = 5 })[1].x, 3)
  db:close(); db2:close()
end)

T.test("task:cancel cancels a running query on the server", function()
  local db = offpath.pg.connect(CONNINFO)
  local t = offpath.go(function()
    return db:query("SELECT pg_sleep(10) /* cancel1 */")
  end)
  local cb = T.expect(function(ok, e)
    T.eq(ok, false); T.ok(tostring(e):find("^cancelled"), e)
  end, 1)
  t:on_done(cb)
  T.ok(eventually(function()
    return admin:query(ACTIVE, "%cancel1%")[1].n == 1
  end, 5), "the query runs on the server")
  T.eq(t:cancel(), true)
  T.err("^cancelled", t.wait, t)
  T.ok(gone("cancel1", 2), "the query still runs on the server")
  T.eq(db:query("SELECT 1 AS x")[1].x, 1)
  db:close()
end)

T.test("50 concurrent queries on a pool of 4 end exactly once", function()
  local db = offpath.pg.connect(CONNINFO, { pool = 4 })
  local tasks, seen = {}, {}
  local done = T.expect(nil, 50)
  local max_busy, max_waiting = 0, 0
  for i = 1, 50 do
    tasks[i] = offpath.go(function()
      local st = db:stats()
      max_busy = math.max(max_busy, st.busy, st.connections)
      local r = db:query("SELECT $1::int AS i, pg_backend_pid() AS pid " ..
        "FROM pg_sleep(0.01)", i)
      st = db:stats()
      max_busy = math.max(max_busy, st.busy, st.connections)
      max_waiting = math.max(max_waiting, st.waiting)
      return r[1]
    end)
    tasks[i]:on_done(done)
  end
  local pids, npids = {}, 0
  for i = 1, 50 do
    local r = tasks[i]:wait()
    T.eq(r.i, i)
    seen[r.i] = (seen[r.i] or 0) + 1
    if not pids[r.pid] then pids[r.pid] = true; npids = npids + 1 end
  end
  for i = 1, 50 do T.eq(seen[i], 1) end
  T.ok(npids <= 4, npids .. " server processes")
  T.ok(max_busy <= 4, "at most 4 connections busy")
  T.ok(max_waiting > 0, "queries waited for a connection")
  st = db:stats()
  T.eq(st.opened, 4); T.eq(st.idle, 4); T.eq(st.waiting, 0)
  T.eq(st.busy, 0)
  db:close()
end)

T.test("sequential queries reuse one connection", function()
  local db = offpath.pg.connect(CONNINFO, { pool = 3 })
  local pid = db:query("SELECT pg_backend_pid() AS p")[1].p
  for _ = 1, 20 do
    T.eq(db:query("SELECT pg_backend_pid() AS p")[1].p, pid)
  end
  T.eq(db:stats().opened, 1)
  db:close()
end)

T.test("a connection the server closed is replaced", function()
  local db = offpath.pg.connect(CONNINFO, { pool = 1 })
  local pid = db:query("SELECT pg_backend_pid() AS p")[1].p
  T.eq(admin:query("SELECT pg_terminate_backend($1) AS ok", pid)[1].ok, true)
  -- The idle connection sees the server close it.
  T.ok(eventually(function() return db:stats().connections == 0 end, 5))
  local pid2 = db:query("SELECT pg_backend_pid() AS p")[1].p
  T.ok(pid2 ~= pid)
  T.eq(db:stats().opened, 2)
  -- Killed while a query runs: that query fails, the next one works.
  local t = offpath.go(db.query, db, "SELECT pg_sleep(10) /* killed */")
  T.ok(eventually(function()
    return admin:query(ACTIVE, "%/* killed */%")[1].n == 1
  end, 5), "the query runs on the server")
  admin:query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity " ..
    "WHERE query LIKE '%/* killed */%' AND pid <> pg_backend_pid()")
  local ok, e = pcall(t.wait, t)
  T.eq(ok, false)
  T.ok(e:find("^pg: FATAL 57P01: terminating connection due to " ..
    "administrator command"), e)
  T.eq(db:query("SELECT 2 AS x")[1].x, 2)
  T.eq(db:stats().opened, 3)
  db:close()
end)

T.test("queries fail with the reason when no connection can be made", function()
  admin:query("DROP ROLE IF EXISTS lua_pg_flaky")
  admin:query("CREATE ROLE lua_pg_flaky LOGIN")
  local db = offpath.pg.connect(string.format(
    "host=127.0.0.1 port=%s dbname=postgres user=lua_pg_flaky", PG.PG_PORT),
    { pool = 2 })
  local pid = db:query("SELECT pg_backend_pid() AS p")[1].p
  -- The role may no longer log in, and its connection goes.
  admin:query("ALTER ROLE lua_pg_flaky NOLOGIN")
  admin:query("SELECT pg_terminate_backend($1)", pid)
  T.ok(eventually(function() return db:stats().connections == 0 end, 5))
  local tasks, failed = {}, T.expect(function(ok, e)
    T.eq(ok, false)
    T.ok(tostring(e):find('^pg: connection failed: FATAL: role ' ..
      '"lua_pg_flaky" is not permitted to log in %(server at "127.0.0.1"'), e)
  end, 3)
  for i = 1, 3 do
    tasks[i] = offpath.go(function() return db:query("SELECT 1 AS x") end)
    tasks[i]:on_done(failed)
  end
  for i = 1, 3 do pcall(tasks[i].wait, tasks[i]) end
  T.eq(db:stats().waiting, 0)
  -- Once it may log in again, the pool connects again (an attempt already
  -- under way may still fail; a slow sanitizer build makes that likely).
  admin:query("ALTER ROLE lua_pg_flaky LOGIN")
  T.ok(eventually(function()
    local ok, rows = pcall(db.query, db, "SELECT 1 AS x")
    return ok and rows[1].x == 1
  end, 10))
  db:close()
  admin:query("DROP ROLE lua_pg_flaky")
end)

T.test("close fails queued queries; running ones finish", function()
  local db = offpath.pg.connect(CONNINFO, { pool = 1 })
  local running = offpath.go(db.query, db, "SELECT 7 AS x FROM pg_sleep(0.1)")
  local queued = offpath.go(db.query, db, "SELECT 8 AS x")
  offpath.sleep(0.02)
  T.eq(db:stats().waiting, 1)
  db:close()
  T.eq(running:wait()[1].x, 7)
  T.err("^pg: database closed %(db:query at", queued.wait, queued)
  T.err("^pg: database closed", db.query, db, "SELECT 1")
  T.eq(db:stats().connections, 0)
  -- A to-be-closed variable closes too.
  do
    local db2 <close> = offpath.pg.connect(CONNINFO)
    T.eq(db2:query("SELECT 1 AS x")[1].x, 1)
  end
end)

T.test("pool size and options are checked", function()
  T.err("bad option 'pool' %(must be 1..1000%)", offpath.pg.connect,
    CONNINFO, { pool = 0 })
  T.err("bad option 'pool' %(integer expected%)", offpath.pg.connect,
    CONNINFO, { pool = 1.5 })
  T.err("bad option 'timeout' %(must not be negative%)", offpath.pg.connect,
    CONNINFO, { timeout = -1 })
  T.err("bad argument #1 to '%S+' %(string expected", offpath.pg.connect)
end)

T.test("the admin connection closes", function()
  admin:close()
  T.eq(admin:stats().connections, 0)
end)
