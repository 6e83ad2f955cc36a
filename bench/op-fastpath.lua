-- SPDX-License-Identifier: MIT
-- op-fastpath.lua - the fast path under slow work: a stream of records where
-- every OP_SLOW_EVERY-th one (10 % by default) needs OP_SLOW_MS (10) ms of
-- blocking work, done inline on the main thread or through offpath.run.
-- Thread: the main VM; the slow work of the offload mode runs in the worker
-- VMs of the pool "slow".
--
-- usage: OP_SLOW=offload offpath run bench/op-fastpath.lua --input FILE
--        (records as made by bench/peer-lines.lua --make N; or a udp://
--        input, see bench/op-udp.sh)
--
-- Environment:
--   OP_SLOW        none | inline | offload (default none)
--   OP_SLOW_MS     milliseconds of slow work per slow record (default 10)
--   OP_SLOW_EVERY  one record in this many is slow (default 10: 10 %)
--   OP_THREADS     threads of the pool "slow" (default 64)
--   OP_BUSY        1: configure { busy_poll = true } (the loop thread spins
--                  while tasks are in flight instead of sleeping)
--   OP_NAME        the name= printed (default offpath-fastpath)
--
-- Every record is parsed (six comma-separated fields) and counted; a record
-- is slow when its first field (the record number) is a multiple of
-- OP_SLOW_EVERY. The slow work blocks its thread for OP_SLOW_MS:
--   offload  offpath.run("slow", fn, s) with fn calling the worker-side
--            offpath.sleep(s): nanosleep, a blocking system call, as a
--            blocking read or query would be; the handler suspends.
--   inline   the same time spent on the main thread, spinning on
--            offpath.now() (the main VM has no blocking sleep; to the main
--            thread a 10 ms stall in a system call and a 10 ms spin are
--            the same thing).
--
-- On on_stop it prints one line: records, records_per_s (records / seconds
-- from the first record to on_stop), and the main thread's time per
-- handler resume from offpath.stats().latency (the runtime's histogram,
-- within 12.5 %: what the host reports as "main thread" latency): main_p50_us,
-- main_p99_us, main_max_us; slow= the number of slow records;
-- main_faults= the main thread's page faults from the first record on; and, for
-- udp inputs, drops= from engine:stats() (the kernel's SO_RXQ_OVFL count).

local offpath = require "offpath"

local function env_num(k, def)
  local v = os.getenv(k)
  if v == nil or v == "" then return def end
  local n = tonumber(v)
  if not n or n <= 0 then error(k .. " must be a positive number, not " .. v) end
  return n
end

local mode = os.getenv("OP_SLOW") or "none"
if mode == "" then mode = "none" end
if mode ~= "none" and mode ~= "inline" and mode ~= "offload" then
  error("OP_SLOW must be none, inline or offload, not " .. mode)
end
local slow_s = env_num("OP_SLOW_MS", 10) / 1000
local every = math.tointeger(env_num("OP_SLOW_EVERY", 10))
local threads = math.tointeger(env_num("OP_THREADS", 64))
local name = os.getenv("OP_NAME") or "offpath-fastpath"

offpath.configure {
  busy_poll = os.getenv("OP_BUSY") == "1",
  pools = { slow = { threads = threads, queue = 4096 } },
}

local now = offpath.now

-- Runs in a worker VM: offpath there is the worker-side module.
local function slow_offloaded(s)
  offpath.sleep(s)
  return true
end

local function slow_inline(s)
  local t = now()
  while now() - t < s do end
  return true
end

-- A pool's threads start on its first task, and that start (thread
-- creation: ~9-15 ms for 64 threads here) runs on the main thread inside
-- the submitting call. Start them from the main chunk, which is not a
-- handler resume, so the histogram below holds only the stream's handlers.
-- on_start then has every worker take a task, so that all worker VMs exist
-- (made on their threads, competing with the main thread for the CPUs)
-- before the first record.
if mode == "offload" then offpath.launch("slow", function() end) end

function on_start()
  if mode ~= "offload" then return end
  local ts = {}
  for i = 1, threads do ts[i] = offpath.launch("slow", slow_offloaded, 0.02) end
  for i = 1, threads do ts[i]:wait() end
  collectgarbage()
end

-- Minor page faults of the main thread so far (Linux; -1 elsewhere): the
-- 10th field of /proc/self/task/PID/stat, PID being the main thread's.
local function main_faults()
  local f = io.open("/proc/self/stat")
  if not f then return -1 end
  local pid = f:read("l"):match("^(%d+)")
  f:close()
  f = io.open("/proc/self/task/" .. pid .. "/stat")
  if not f then return -1 end
  local rest = f:read("l"):match("%)%s+(.*)$")
  f:close()
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  return tonumber(fields[8]) -- field 10 of the line: 3 is the first after ')'
end

local counts, nrec, nslow = {}, 0, 0
local t_first, faults_first

function on_event(engine, rec)
  if not t_first then t_first, faults_first = now(), main_faults() end
  nrec = nrec + 1
  local id, _, _, method, _, status =
    rec:match("^(%d+),([^,]*),([^,]*),([^,]*),([^,]*),(%d+)$")
  if not id then
    engine:count("malformed")
    return
  end
  local key = method .. status
  counts[key] = (counts[key] or 0) + 1
  if mode ~= "none" and tonumber(id) % every == 0 then
    nslow = nslow + 1
    if mode == "offload" then
      offpath.run("slow", slow_offloaded, slow_s)
    else
      slow_inline(slow_s)
    end
  end
end

function on_stop(engine)
  local t1 = now()
  local lat = offpath.stats().latency
  local st = engine:stats()
  local wall = t_first and (t1 - t_first) or 0
  io.stdout:write(string.format(
    "name=%s slow=%s slow_ms=%g every=%d threads=%d records=%d slow_records=%d " ..
    "records_per_s=%.0f main_p50_us=%.2f main_p99_us=%.2f main_max_us=%.1f " ..
    "drops=%d main_faults=%d wall_s=%.3f\n",
    name, mode, slow_s * 1000, every, threads, nrec, nslow,
    wall > 0 and nrec / wall or 0, lat.p50 * 1e6, lat.p99 * 1e6,
    lat.max * 1e6, st.drops or 0,
    faults_first and main_faults() - faults_first or 0, wall))
  io.stdout:flush()
end
