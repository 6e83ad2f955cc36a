-- SPDX-License-Identifier: MIT
-- net-redis.lua - offpath's side of bench/net-redis.sh: CONC coroutines
-- each doing GET on one key in a loop for DURATION seconds, all on one
-- offpath.redis client (its shared connection pipelines them). Prints:
--   name=redis-offpath conc=64 rps=12345 cmd_per_s=12345 errors=0
local offpath = require "offpath"

local ADDR = assert(os.getenv("REDIS_ADDR"), "REDIS_ADDR unset")
local CONC = tonumber(os.getenv("CONC") or "64")
local DURATION = tonumber(os.getenv("DURATION") or "2")

function on_start()
  local r = offpath.redis.connect(ADDR)
  r:call("SET", "bench:key", "xxx")
  local done, errors = 0, 0
  local t0 = offpath.now()
  local stop = t0 + DURATION
  local function worker()
    while offpath.now() < stop do
      local ok = pcall(r.call, r, "GET", "bench:key")
      if ok then done = done + 1 else errors = errors + 1 end
    end
  end
  local tasks = {}
  for i = 1, CONC do tasks[i] = offpath.go(worker) end
  offpath.all(tasks)
  local rps = done / (offpath.now() - t0)
  print(string.format("name=redis-offpath conc=%d rps=%.0f cmd_per_s=%.0f "
    .. "errors=%d", CONC, rps, rps, errors))
  r:close()
end
