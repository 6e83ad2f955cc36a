-- SPDX-License-Identifier: MIT
-- net-http.lua - offpath's side of bench/net-http.sh: CONC coroutines each
-- doing GET URL in a loop for DURATION seconds on offpath.http (one libcurl
-- multi handle, kept-alive connections). Prints one line, with the CPU
-- time (user + system) the process spent per request while measuring:
--   name=http-offpath conc=64 rps=12345 req_per_s=12345 errors=0 cpu_us=80
local offpath = require "offpath"

local URL = assert(os.getenv("URL"), "URL unset")
local CONC = tonumber(os.getenv("CONC") or "64")
local DURATION = tonumber(os.getenv("DURATION") or "2")

-- One kept-alive connection per request in flight, as wrk and the C peer.
offpath.http.configure { max_host_connections = CONC, max_connections = CONC }

-- User plus system CPU seconds of this process so far.
local function cpu_s()
  local f = io.open("/proc/self/stat")
  local st = f:read("a")
  f:close()
  local rest = st:match("%) (.*)$") -- after the command name
  local fields = {}
  for v in rest:gmatch("%S+") do fields[#fields + 1] = v end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100 -- USER_HZ
end

function on_start()
  local done, errors = 0, 0
  local stop = offpath.now() + DURATION
  local function worker()
    while offpath.now() < stop do
      local ok, r = pcall(offpath.http.get, URL)
      if ok and r.status == 200 then done = done + 1 else errors = errors + 1 end
    end
  end
  -- warm up: open the connections
  local warm = {}
  for i = 1, CONC do warm[i] = offpath.go(offpath.http.get, URL) end
  offpath.all(warm)
  local t0, c0 = offpath.now(), cpu_s()
  stop = t0 + DURATION
  local tasks = {}
  for i = 1, CONC do tasks[i] = offpath.go(worker) end
  offpath.all(tasks)
  local rps = done / (offpath.now() - t0)
  local cpu = (cpu_s() - c0) / done * 1e6
  print(string.format("name=http-offpath conc=%d rps=%.0f req_per_s=%.0f "
    .. "errors=%d cpu_us=%.1f", CONC, rps, rps, errors, cpu))
end
