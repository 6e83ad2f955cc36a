-- SPDX-License-Identifier: MIT
-- op-cpu.lua - the speed of Lua code inside a worker VM against the same
-- code in a plain lua5.4: a loop summing i % 7, 3e7 times. Run as
--   offpath run bench/op-cpu.lua --input /dev/null   (OP_DEADLINE=1: with
--   a task deadline, under the stop hook)
--   lua5.4 bench/op-cpu.lua                          (the plain peer)
-- Prints one key=value line with seconds per loop.
local N = 3e7
local function work(n)
  local x = 0
  for i = 1, n do x = x + i % 7 end
  return x
end

local clock = os.clock
if not offpath then  -- plain lua5.4
  local t0 = clock()
  work(N)
  print(string.format("name=lua-loop loop_s=%.3f", clock() - t0))
  return
end

function on_start()
  local target = os.getenv("OP_DEADLINE") and { pool = "cpu", timeout = 3600 }
    or "cpu"
  offpath.run(target, work, 1000) -- start the pool, load the prototype
  local t0 = offpath.now()
  offpath.run(target, work, N)
  print(string.format("name=offpath-worker-loop deadline=%s loop_s=%.3f",
    os.getenv("OP_DEADLINE") and "yes" or "no", offpath.now() - t0))
end
