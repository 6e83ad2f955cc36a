-- SPDX-License-Identifier: MIT
-- placement.lua - where workers run (configure{loop_cpu=}): a pool with
-- more threads than the process may use CPUs keeps its workers off the
-- loop thread's CPU, a smaller one does not; "keep" and "share" say so
-- for every pool; the cpu pool has a thread per CPU the process may use.
-- Reads /proc/thread-self/status (Linux). tests/sh/host-placement.sh runs
-- it on one CPU too.
-- LABELS: core tsan
local T = require "_tap"
local offpath = require "offpath"

-- The CPUs the calling thread may run on, as the kernel lists them
-- ("0-3,6"). Runs in the main VM and in workers.
local function allowed()
  for line in io.lines("/proc/thread-self/status") do
    local list = line:match("^Cpus_allowed_list:%s*(%S+)")
    if list then return list end
  end
  error("no Cpus_allowed_list")
end

-- "0-3,6" -> { [0] = true, ..., [6] = true }, and how many.
local function cpu_set(list)
  local set, n = {}, 0
  for a, b in list:gmatch("(%d+)%-?(%d*)") do
    for c = tonumber(a), tonumber(b ~= "" and b or a) do
      set[c] = true
      n = n + 1
    end
  end
  return set, n
end

local main_cpus, ncpus = cpu_set(allowed())

offpath.configure { pools = {
  wide = { threads = ncpus + 1 }, narrow = { threads = 1 },
} }

-- What pool name's worker may use, and the pool's off_cpu.
local function placed(name)
  local set, n = cpu_set(offpath.run(name, allowed))
  return set, n, offpath.stats().pools[name].off_cpu
end

T.test("a pool with more threads than CPUs keeps off the loop thread's CPU", function()
  local set, n, off = placed("wide")
  if ncpus < 2 then
    T.eq(off, nil)
    T.eq(n, ncpus)
    return
  end
  T.ok(main_cpus[off], "off_cpu " .. tostring(off) .. " is one of the process's")
  T.eq(set[off], nil)
  T.eq(n, ncpus - 1)
end)

T.test("a pool with no more threads than CPUs runs on all of them", function()
  local _, n, off = placed("narrow")
  T.eq(off, nil)
  T.eq(n, ncpus)
end)

T.test("the cpu pool: a thread per CPU the process may use, on all of them", function()
  local set, n, off = placed("cpu")
  T.eq(offpath.stats().pools.cpu.threads, ncpus)
  T.eq(off, nil)
  T.eq(n, ncpus)
  for c in pairs(main_cpus) do T.ok(set[c], "cpu " .. c) end
end)

T.test("loop_cpu: keep moves every pool starting after it off the same CPU", function()
  T.err("invalid option 'everywhere'", offpath.configure, { loop_cpu = "everywhere" })
  offpath.configure { loop_cpu = "keep", pools = { late = { threads = 1 } } }
  local set, n, off = placed("late")
  if ncpus < 2 then
    T.eq(off, nil)
  else
    T.eq(off, offpath.stats().pools.wide.off_cpu)
    T.eq(set[off], nil)
    T.eq(n, ncpus - 1)
  end
  offpath.configure { loop_cpu = "share", pools = { shared = { threads = ncpus + 1 } } }
  local _, n2, off2 = placed("shared")
  T.eq(off2, nil)
  T.eq(n2, ncpus)
  offpath.configure { loop_cpu = "auto" }
end)
