-- SPDX-License-Identifier: MIT
-- sqlite.lua - offpath.sqlite: statements on the io pool, parameters, typed
-- rows, errors, concurrent writers, in-memory databases, timeouts.
-- LABELS: sqlite tsan
local T = require "_tap"
local offpath = require "offpath"

offpath.configure { pools = { io = { threads = 4 }, one = { threads = 1 } } }

local dir = os.getenv("OFFPATH_BINARY_DIR") or os.getenv("TMPDIR") or "/tmp"
local PATH = string.format("%s/sqlite-test-%d.db", dir, os.time() % 100000 +
  math.random(1, 1000000))

local function remove_db(path)
  for _, suffix in ipairs { "", "-wal", "-shm", "-journal" } do
    os.remove(path .. suffix)
  end
end
remove_db(PATH)

-- open does not suspend: it works in the main chunk.
local db = offpath.sqlite.open(PATH)

-- Runs fn in its own coroutine, checks it ends exactly once and returns
-- what pcall(fn) would.
local function once(fn, ...)
  local t = offpath.go(function(...) return fn(...) end, ...)
  t:on_done(T.expect(nil, 1, "once at line " ..
    debug.getinfo(2, "l").currentline))
  return pcall(t.wait, t)
end

T.test("create, insert, select", function()
  local rows, n, id = db:exec([[
    CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL,
                    data BLOB, flag INTEGER)]])
  T.eq(#rows, 0); T.eq(n, 0)
  rows, n, id = db:exec("INSERT INTO t (name, score) VALUES (?, ?)", "ann",
    1.5)
  T.eq(#rows, 0); T.eq(n, 1); T.eq(id, 1)
  rows, n, id = db:exec("INSERT INTO t (name, score) VALUES (?, ?), (?, ?)",
    "bob", 2, "cy", nil)
  T.eq(n, 2); T.eq(id, 3)
  rows, n = db:exec("SELECT id, name, score FROM t ORDER BY id")
  T.eq(#rows, 3); T.eq(n, 3)
  T.eq(rows[1].id, 1); T.eq(rows[1].name, "ann"); T.eq(rows[1].score, 1.5)
  T.eq(rows[2].score, 2.0); T.eq(math.type(rows[2].score), "float")
  T.eq(rows[3].name, "cy"); T.eq(rows[3].score, nil)
  rows, n = db:exec("UPDATE t SET flag = 1 WHERE id > ?", 1)
  T.eq(#rows, 0); T.eq(n, 2)
  rows, n = db:exec("SELECT * FROM t WHERE id > 100")
  T.eq(#rows, 0); T.eq(n, 0)
end)

T.test("parameters and values of each type", function()
  local r = db:exec([[SELECT ? AS i, ? AS f, ? AS s, ? AS n, ? AS yes,
      ? AS no, ? AS bin, typeof(?) AS tn, ? AS maxi, ? AS big]],
    -7, 0.25, "héllo", nil, true, false, "a\0b", nil, math.maxinteger,
    1e300)[1]
  T.eq(r.i, -7); T.eq(math.type(r.i), "integer")
  T.eq(r.f, 0.25); T.eq(math.type(r.f), "float")
  T.eq(r.s, "héllo"); T.eq(r.n, nil)
  T.eq(r.yes, 1); T.eq(r.no, 0)
  T.eq(r.bin, "a\0b"); T.eq(r.tn, "null")
  T.eq(r.maxi, math.maxinteger); T.eq(r.big, 1e300)
  r = db:exec("SELECT x'00ff41' AS b, 1.0 AS f, 2 AS i, NULL AS z")[1]
  T.eq(r.b, "\0\255A"); T.eq(math.type(r.f), "float"); T.eq(r.i, 2)
  T.eq(r.z, nil)
  -- Named parameters bind by position too.
  T.eq(db:exec("SELECT :a || :b AS ab", "x", "y")[1].ab, "xy")
end)

T.test("several statements in one call; the last one's rows", function()
  local rows, n = db:exec([[
    CREATE TABLE multi (v INTEGER);
    INSERT INTO multi VALUES (1), (2), (3);
    -- a comment between statements
    SELECT sum(v) AS s FROM multi;
  ]])
  T.eq(rows[1].s, 6); T.eq(n, 1)
  -- A transaction inside one call.
  rows = db:exec([[BEGIN; INSERT INTO multi VALUES (4); COMMIT;
                   SELECT count(*) AS c FROM multi]])
  T.eq(rows[1].c, 4)
end)

T.test("errors name the statement and end the call exactly once", function()
  local ok, e = once(db.exec, db, "SELECT * FROM nope")
  T.eq(ok, false)
  T.ok(e:find("^sqlite: no such table: nope %(in 'SELECT %* FROM nope'%) " ..
    "%(db:exec at .*sqlite.lua:%d+%)"), e)
  ok, e = once(db.exec, db, "SELEC 1")
  T.ok(e:find('^sqlite: near "SELEC": syntax error %(in \'SELEC 1\'%)'), e)
  ok, e = once(db.exec, db, "INSERT INTO t (id, name) VALUES (?, ?)", 1, "x")
  T.ok(e:find("^sqlite: UNIQUE constraint failed: t.id %(in 'INSERT INTO " ..
    "t %(id, name%) VALUES %(%?, %?%)'%)"), e)
  ok, e = once(db.exec, db, "SELECT ?, ?", 1)
  T.ok(e:find("^sqlite: 2 parameters expected, 1 given"), e)
  ok, e = once(db.exec, db, "SELECT ?; SELECT ?", 1)
  T.ok(e:find("^sqlite: parameters given for several statements"), e)
  ok, e = once(db.exec, db, "SELECT 1; SELECT ?")
  T.ok(e:find("^sqlite: 1 parameters expected, 0 given %(in 'SELECT %?'%)"),
    e)
  -- A long statement is shortened in the message.
  ok, e = once(db.exec, db, "SELECT * FROM nope WHERE " ..
    string.rep("x = 1 AND ", 20) .. "1")
  T.ok(e:find("%.%.%.'%)"), e)
  -- A failed statement in a list stops it; a transaction left open by the
  -- failure is rolled back.
  ok, e = once(db.exec, db, [[BEGIN; INSERT INTO multi VALUES (100);
                              INSERT INTO nope VALUES (1); COMMIT]])
  T.ok(e:find("^sqlite: no such table: nope"), e)
  T.eq(db:exec("SELECT count(*) AS c FROM multi WHERE v = 100")[1].c, 0)
  ok, e = once(db.exec, db, "BEGIN; INSERT INTO multi VALUES (101)")
  T.ok(e:find("^sqlite: transaction left open at the end of db:exec " ..
    "%(rolled back%)"), e)
  T.eq(db:exec("SELECT count(*) AS c FROM multi WHERE v = 101")[1].c, 0)
  -- The database goes on.
  T.eq(db:exec("SELECT count(*) AS c FROM t")[1].c, 3)
end)

T.test("bad arguments raise before anything runs", function()
  T.err("bad argument #4 to '%S+' %(nil, boolean, number or string " ..
    "expected, got table%)", db.exec, db, "SELECT ?, ?", 1, {})
  T.err("bad argument #2 to '%S+' %(string expected, got no value%)",
    db.exec, db)
  T.err("bad argument #2 to '%S+' %(field 'sql' or %[1%] must be a string%)",
    db.exec, db, { timeout = 1 })
  T.err("bad option 'timeout' %(must not be negative%)", db.exec, db,
    { "SELECT 1", timeout = -1 })
  T.err("sqlite: no pool named 'nope'", offpath.sqlite.open, PATH,
    { pool = "nope" })
  T.err("bad argument #1 to '%S+' %(path contains a zero byte%)",
    offpath.sqlite.open, "a\0b")
end)

T.test("exec cannot be called where nothing may suspend", function()
  local e
  table.sort({ 1, 2 }, function(a, b)
    e = select(2, pcall(db.exec, db, "SELECT 1"))
    return a < b
  end)
  T.ok(tostring(e):find("^cannot suspend: db:exec"), e)
end)

T.test("concurrent inserts from many coroutines: exact row count", function()
  db:exec("CREATE TABLE c (k INTEGER PRIMARY KEY, w INTEGER, v TEXT)")
  local tasks = {}
  local done = T.expect(nil, 200)
  for i = 1, 200 do
    tasks[i] = offpath.go(function()
      local _, n, id = db:exec("INSERT INTO c (k, w, v) VALUES (?, ?, ?)",
        i, i % 7, "row " .. i)
      return n, id
    end)
    tasks[i]:on_done(done)
  end
  for i = 1, 200 do
    local n, id = tasks[i]:wait()
    T.eq(n, 1); T.eq(id, i)
  end
  local r = db:exec("SELECT count(*) AS c, sum(k) AS s FROM c")[1]
  T.eq(r.c, 200); T.eq(r.s, 200 * 201 // 2)
  -- Writers on several threads at once, each a transaction of its own.
  local ws = {}
  for i = 1, 8 do
    ws[i] = offpath.go(function()
      return db:exec(string.format([[BEGIN IMMEDIATE;
        UPDATE c SET w = w + 1; COMMIT; SELECT sum(w) AS s FROM c]]))
    end)
  end
  for i = 1, 8 do ws[i]:wait() end
  local base = 0
  for i = 1, 200 do base = base + i % 7 end
  T.eq(db:exec("SELECT sum(w) AS s FROM c")[1].s, base + 8 * 200)
end)

T.test("a second object on the same file sees the same data", function()
  local db2 = offpath.sqlite.open(PATH, { pool = "one" })
  T.eq(db2:exec("SELECT count(*) AS c FROM c")[1].c, 200)
  T.eq(db2:exec("PRAGMA journal_mode")[1].journal_mode, "wal")
  db2:close()
  T.err("^sqlite: database closed", db2.exec, db2, "SELECT 1")
end)

T.test("in-memory databases are one database per object", function()
  local m = offpath.sqlite.open(":memory:")
  m:exec("CREATE TABLE m (x INTEGER)")
  local ts = {}
  for i = 1, 40 do
    ts[i] = offpath.go(m.exec, m, "INSERT INTO m VALUES (?)", i)
  end
  for i = 1, 40 do ts[i]:wait() end
  T.eq(m:exec("SELECT count(*) AS c FROM m")[1].c, 40)
  local other = offpath.sqlite.open(":memory:")
  T.err("no such table: m", other.exec, other, "SELECT * FROM m")
  m:close(); other:close()
end)

T.test("a timeout interrupts a long statement", function()
  local t0 = offpath.now()
  local ok, e = once(db.exec, db, { [[
    WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r)
    SELECT count(*) FROM r]], timeout = 0.2 })
  T.eq(ok, false)
  T.ok(e:find("^timeout after 0.2 s in db:exec at .*sqlite.lua:%d+"), e)
  T.ok(offpath.now() - t0 < 2)
  -- The worker was freed: the pool serves the next call at once.
  T.eq(db:exec("SELECT 1 AS one")[1].one, 1)
  -- The interrupted statement comes back from its worker a little later.
  local t1 = offpath.now()
  while offpath.stats().pools.io.timedout < 1 and offpath.now() - t1 < 2 do
    offpath.sleep(0.01)
  end
  T.eq(offpath.stats().pools.io.timedout, 1, "counted as timed out")
end)

T.test("task:cancel stops a statement", function()
  local t = offpath.go(db.exec, db, [[
    WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r)
    SELECT count(*) FROM r]])
  offpath.sleep(0.05)
  T.eq(t:cancel(), true)
  T.err("^cancelled", t.wait, t)
  T.eq(db:exec("SELECT 2 AS two")[1].two, 2)
end)

T.test("a writer waits for another connection's lock (busy timeout)", function()
  -- The one-thread pool holds a write lock for a while.
  local holder = offpath.sqlite.open(PATH, { pool = "one" })
  local impatient = offpath.sqlite.open(PATH, { busy_timeout = 0 })
  local h = offpath.go(holder.exec, holder, [[BEGIN IMMEDIATE;
    INSERT INTO multi VALUES (7);
    WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r
                            WHERE i < 3000000)
    SELECT count(*) FROM r; COMMIT]])
  -- With no patience, the lock makes a call fail at once (calls made
  -- before the holder took the lock just succeed).
  local locked
  local t0 = offpath.now()
  repeat
    local ok, e = once(impatient.exec, impatient,
      "INSERT INTO multi VALUES (9)")
    if not ok then locked = e end
  until locked or offpath.now() - t0 > 5
  T.ok(locked and locked:find("^sqlite: database is locked %(in 'INSERT " ..
    "INTO multi VALUES %(9%)'%)"), locked)
  -- A patient writer waits for the holder's commit (patient enough for
  -- sanitizer builds, where the holder's query runs several times slower).
  local patient = offpath.sqlite.open(PATH, { busy_timeout = 120 })
  local _, n = patient:exec("INSERT INTO multi VALUES (8)")
  T.eq(n, 1)
  h:wait()
  patient:close()
  T.eq(db:exec("SELECT count(*) AS c FROM multi WHERE v IN (7, 8)")[1].c, 2)
  holder:close(); impatient:close()
end)

T.test("a file that cannot be opened", function()
  local bad = offpath.sqlite.open("/nonexistent/dir/x.db")
  local ok, e = once(bad.exec, bad, "SELECT 1")
  T.ok(e:find("^sqlite: cannot open '/nonexistent/dir/x.db': unable to " ..
    "open database file"), e)
  bad:close()
end)

T.test("close", function()
  db:close()
  T.err("^sqlite: database closed", db.exec, db, "SELECT 1")
  do
    local d <close> = offpath.sqlite.open(PATH)
    T.eq(d:exec("SELECT count(*) AS c FROM t")[1].c, 3)
  end
  remove_db(PATH)
end)
