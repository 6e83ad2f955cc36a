-- SPDX-License-Identifier: MIT
-- op-protos.lua - memory with functions made per event: OP_PROTOS distinct
-- prototypes (a filter compiled with load() from each record) sent to a
-- pool one after another. The prototype store and the factory caches are
-- bounded (docs/design.md), so VmRSS levels off instead of growing about
-- 1.8 KB per prototype.
-- Thread: the main VM; the pool's worker VMs.
--
-- usage: offpath run bench/op-protos.lua --input /dev/null
--
-- Environment:
--   OP_PROTOS   prototypes to send (default 200000)
--   OP_THREADS  threads of the pool (default 2)
--
-- Prints one line: rss_kb (at the end), rss_start_kb, rss_peak_kb, protos
-- (store entries at the end), us_per_proto (compile, send, run).

local offpath = require "offpath"

local bench = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
  .. "benchlib.lua")
local env_int = bench.env_int

local N = env_int("OP_PROTOS", 200000)
local W = env_int("OP_THREADS", 2)

offpath.configure { pools = { filters = { threads = W } } }

local function rss_kb()
  return bench.status_kb("VmRSS")
end

function on_start()
  -- warm up: every worker VM exists
  for _ = 1, W * 4 do offpath.run("filters", function() end) end
  collectgarbage()
  local start, peak = rss_kb(), 0
  local t0 = offpath.now()
  local pass = 0
  for i = 1, N do
    local src = string.format(
      "return function(r) return r.size > %d and r.kind ~= 'k%d' end", i, i)
    local filter = load(src)()
    if offpath.run("filters", filter, { size = i + 1, kind = "x" }) then
      pass = pass + 1
    end
    if i % 10000 == 0 then
      collectgarbage()
      local r = rss_kb()
      if r > peak then peak = r end
    end
  end
  local wall = offpath.now() - t0
  assert(pass == N, "a filter gave a wrong answer")
  collectgarbage()
  local stats = offpath.stats()
  print(string.format(
    "rss_kb=%d rss_start_kb=%d rss_peak_kb=%d protos=%d us_per_proto=%.2f",
    rss_kb(), start, math.max(peak, rss_kb()), stats.protos, wall * 1e6 / N))
end
