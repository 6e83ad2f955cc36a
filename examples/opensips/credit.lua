-- SPDX-License-Identifier: MIT
-- credit.lua - the OpenSIPS prepaid credit check, on the offpath host.
--
--   OFFPATH_PG='host=127.0.0.1 port=5432 dbname=billing user=opensips' \
--     offpath run examples/opensips/credit.lua --input calls.txt
--
-- A SIP proxy asks, for every new call, whether the caller may go on. Each
-- input record is one call attempt, "CALL_ID USER_ID". The handler looks
-- up the user's credit in PostgreSQL with a deadline, decides, and emits
-- one line per call:
--
--   CALL_ID USER allow BALANCE
--   CALL_ID USER deny REASON      (no_credit, unknown_user, timeout,
--                                  db_error, bad_record)
--
-- A database that is slow or down must not hold calls: the lookup has a
-- timeout (CREDIT_TIMEOUT seconds, default 0.5) after which the wait ends
-- with an error, the query is cancelled on the server, and the call is
-- denied ("fail closed"; set CREDIT_FAIL_OPEN=1 to allow instead).
--
-- A user who runs out of credit, or gets low, is told through a push
-- notification. The sender is a program (CREDIT_PUSH, default push.sh next
-- to this script) started without waiting for it, as OpenSIPS's
-- launch(exec(...), report_route) does: the call is decided at once, and
-- the notification's report callback counts push_ok or push_failed.
--
-- Table (see docs/guide-network.md):
--   CREATE TABLE credit (user_id text PRIMARY KEY,
--                        balance numeric(12, 2) NOT NULL,
--                        push_token text);
local offpath = require "offpath"

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local CONNINFO = os.getenv("OFFPATH_PG") or os.getenv("PG_CONNINFO") or
  "host=127.0.0.1 dbname=postgres"
local TIMEOUT = tonumber(os.getenv("CREDIT_TIMEOUT") or "0.5")
local LOW = tonumber(os.getenv("CREDIT_LOW") or "1.00")
local FAIL_OPEN = os.getenv("CREDIT_FAIL_OPEN") == "1"
local PUSH = os.getenv("CREDIT_PUSH")
local PUSH_ARGV = PUSH and { PUSH } or { "sh", here .. "push.sh" }

-- The main chunk may not suspend, so connect returns at once here and the
-- first connection is made in the background; lookups made meanwhile wait
-- for it (or fail with its error, and the next lookup tries again). Every
-- query gets TIMEOUT unless it says otherwise.
local db = offpath.pg.connect(CONNINFO, { pool = 4, timeout = TIMEOUT,
                                          connect_timeout = 5 })

-- Fire and forget: the notification runs on its own; only the report
-- callback hears how it went.
local function push(engine, user, token, message)
  local argv = { table.unpack(PUSH_ARGV) }
  argv[#argv + 1] = user
  argv[#argv + 1] = token or ""
  argv[#argv + 1] = message
  local task = offpath.go(function()
    return offpath.exec(argv, { timeout = 5 })
  end)
  task:on_done(function(ok, res)
    if ok and res.code == 0 then
      engine:count("push_ok")
    else
      engine:count("push_failed")
      local why = ok and ("exit " .. tostring(res.code) .. " " ..
        res.stderr:gsub("%s+$", "")) or tostring(res)
      engine:alert(string.format("push to %s failed: %s", user, why))
    end
  end)
end

local function decide(engine, call, user, decision, detail)
  engine:count(decision)
  engine:emit(string.format("%s %s %s %s", call, user, decision, detail))
end

function on_event(engine, record)
  local call, user = record:match("^(%S+)%s+(%S+)")
  if not call then
    engine:count("bad_records")
    return decide(engine, record:match("^%S*"), "-", "deny", "bad_record")
  end
  local ok, rows = pcall(db.query, db,
    "SELECT balance, push_token FROM credit WHERE user_id = $1", user)
  if not ok then
    -- rows is the message: "timeout after 0.5 s in db:query at ...", or
    -- "pg: ERROR <SQLSTATE>: ...", or "pg: connection failed: ...".
    local reason = tostring(rows):match("^timeout") and "timeout" or "db_error"
    engine:count("lookup_" .. reason)
    if FAIL_OPEN then return decide(engine, call, user, "allow", reason) end
    return decide(engine, call, user, "deny", reason)
  end
  local row = rows[1]
  if row == nil then
    return decide(engine, call, user, "deny", "unknown_user")
  end
  if row.balance <= 0 then
    decide(engine, call, user, "deny", "no_credit")
    return push(engine, user, row.push_token, "Your credit is used up.")
  end
  decide(engine, call, user, "allow", string.format("%.2f", row.balance))
  if row.balance < LOW then
    push(engine, user, row.push_token,
      string.format("Low credit: %.2f left.", row.balance))
  end
end

-- After the last record and the last notification: one summary line.
function on_stop(engine)
  local c = engine:stats().counters
  engine:emit(string.format(
    "summary allow=%d deny=%d timeout=%d db_error=%d push_ok=%d push_failed=%d",
    c.allow or 0, c.deny or 0, c.lookup_timeout or 0, c.lookup_db_error or 0,
    c.push_ok or 0, c.push_failed or 0))
  db:close()
end
