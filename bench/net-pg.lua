-- SPDX-License-Identifier: MIT
-- net-pg.lua - offpath's side of bench/net-pg.sh: CONC coroutines, each
-- running pgbench's select-only query in a loop for DURATION seconds, on
-- one offpath.pg pool of CONC connections. MODE=simple puts the key in the
-- SQL text (simple query protocol, as pgbench -M simple); MODE=params
-- sends it as $1 (extended protocol). Prints:
--   name=pg-offpath conc=8 qps=12345 queries_per_s=12345 errors=0
local offpath = require "offpath"

local CONNINFO = assert(os.getenv("PG_CONNINFO"), "PG_CONNINFO unset")
local CONC = tonumber(os.getenv("CONC") or "8")
local DURATION = tonumber(os.getenv("DURATION") or "3")
local ROWS = tonumber(os.getenv("ROWS") or "100000")
local MODE = os.getenv("MODE") or "simple"

function on_start()
  local db = offpath.pg.connect(CONNINFO, { pool = CONC })
  local random, format = math.random, string.format
  local query
  if MODE == "params" then
    query = function()
      return db:query("SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        random(1, ROWS))
    end
  else
    query = function()
      return db:query(format(
        "SELECT abalance FROM pgbench_accounts WHERE aid = %d", random(1, ROWS)))
    end
  end
  -- Open every connection of the pool before measuring.
  local warm = {}
  for i = 1, CONC do warm[i] = offpath.go(query) end
  offpath.all(warm)
  local done, errors = 0, 0
  local t0 = offpath.now()
  local stop = t0 + DURATION
  local function worker()
    while offpath.now() < stop do
      local ok = pcall(query)
      if ok then done = done + 1 else errors = errors + 1 end
    end
  end
  local tasks = {}
  for i = 1, CONC do tasks[i] = offpath.go(worker) end
  offpath.all(tasks)
  local qps = done / (offpath.now() - t0)
  print(string.format("name=pg-offpath%s conc=%d qps=%.0f queries_per_s=%.0f "
    .. "errors=%d", MODE == "params" and "-params" or "", CONC, qps, qps,
    errors))
  db:close()
end
