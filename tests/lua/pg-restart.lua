-- SPDX-License-Identifier: MIT
-- pg-restart.lua - an offpath.pg pool across a restart of its server:
-- queries in flight fail once with a clear error, queries while the server
-- is down fail fast with the backoff said, and once it is back the same db
-- object works again, without being made anew. The test runs its own
-- server (tests/fixtures/postgres.sh with a directory of its own: the
-- shared fixture must not be restarted under others).
local T = require "_tap"
local offpath = require "offpath"
local pg = offpath.pg

local SRC = assert(os.getenv("OFFPATH_SOURCE_DIR"), "OFFPATH_SOURCE_DIR unset")
local DIR = os.tmpname()
os.remove(DIR)
local PG = {}

local function sh(script)
  return offpath.exec({ "sh", "-c", script }, { timeout = 120,
    env_add = { DIR = DIR, SRC = SRC } })
end

-- pg_ctl as the cluster's owner (postgres.sh runs it so).
local function pg_ctl(args)
  return sh('. "$DIR/postgres.env"; '
    .. 'if [ "$(id -u)" -eq 0 ]; then run="runuser -u postgres --"; '
    .. 'else run=""; fi; '
    .. '$run "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_TOP/server.log" -w '
    .. '-t 60 ' .. args)
end

T.test("a server of its own starts", function()
  local r = sh('sh "$SRC/tests/fixtures/postgres.sh" start "$DIR"')
  T.eq(r.code, 0, r.stderr)
  for line in io.lines(DIR .. "/postgres.env") do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then PG[k] = v:gsub("^'(.*)'$", "%1") end
  end
  T.ok(PG.PG_CONNINFO)
end)

T.test("the pool survives a restart of its server", function()
  local db = pg.connect(PG.PG_CONNINFO, { pool = 3, backoff_min = 0.5,
    backoff_max = 1 })
  T.eq(db:query("SELECT 1 AS x")[1].x, 1)
  -- queries in flight on every connection of the pool
  local ended, tasks = {}, {}
  for i = 1, 3 do
    tasks[i] = offpath.go(function()
      local ok, e = pcall(db.query, db, "SELECT pg_sleep(30)")
      ended[i] = (ended[i] or 0) + 1
      return ok, e
    end)
  end
  offpath.sleep(0.3)
  local r = pg_ctl("-m immediate stop")
  T.eq(r.code, 0, r.stderr)
  for i = 1, 3 do
    local ok, e = tasks[i]:wait()
    T.eq(ok, false)
    e = tostring(e)
    T.ok(e:find("^pg: connection lost: ") or e:find("^pg: FATAL 57P01")
      or e:find("^pg: FATAL"), e)
    T.eq(ended[i], 1)
  end
  -- down: the first query tries and is refused, the next ones fail at once
  -- with the backoff named
  local ok, e = pcall(db.query, db, "SELECT 2")
  T.eq(ok, false)
  T.ok(tostring(e):find("^pg: connection failed: "), tostring(e))
  ok, e = pcall(db.query, db, "SELECT 2")
  T.eq(ok, false)
  T.ok(tostring(e):find("^pg: connection failed: .*%(next attempt in "
    .. "%d+%.%d+ s%)"), tostring(e))
  -- back up: the same object reconnects by itself after the backoff
  r = pg_ctl('-o "-p ' .. PG.PG_PORT .. '" start')
  T.eq(r.code, 0, r.stderr)
  local got, tries = nil, 0
  while got == nil and tries < 300 do
    tries = tries + 1
    local ok2, rows = pcall(db.query, db, "SELECT 3 AS x")
    if ok2 then got = rows[1].x else offpath.sleep(0.1) end
  end
  T.eq(got, 3)
  -- the whole pool is usable again
  local again = {}
  for i = 1, 3 do
    again[i] = offpath.go(db.query, db, "SELECT $1::int AS x", i)
  end
  for i = 1, 3 do T.eq(again[i]:wait()[1].x, i) end
  db:close()
end)

T.test("the backoff options are checked", function()
  T.err("bad option 'backoff_max' %(below 'backoff_min'%)", pg.connect,
    PG.PG_CONNINFO, { backoff_min = 2, backoff_max = 1 })
end)

T.test("the server stops", function()
  sh('sh "$SRC/tests/fixtures/postgres.sh" stop "$DIR"; rm -rf "$DIR"')
end)
