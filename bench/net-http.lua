-- net-http.lua - offpath's side of bench/net-http.sh: CONC coroutines each
-- doing GET URL in a loop for DURATION seconds on offpath.http (one libcurl
-- multi handle, kept-alive connections). Prints one line:
--   name=http-offpath conc=64 rps=12345 req_per_s=12345 errors=0
local offpath = require "offpath"

local URL = assert(os.getenv("URL"), "URL unset")
local CONC = tonumber(os.getenv("CONC") or "64")
local DURATION = tonumber(os.getenv("DURATION") or "2")

-- One kept-alive connection per request in flight, as wrk and the C peer.
offpath.http.configure { max_host_connections = CONC, max_connections = CONC }

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
  local t0 = offpath.now()
  stop = t0 + DURATION
  local tasks = {}
  for i = 1, CONC do tasks[i] = offpath.go(worker) end
  offpath.all(tasks)
  local rps = done / (offpath.now() - t0)
  print(string.format("name=http-offpath conc=%d rps=%.0f req_per_s=%.0f "
    .. "errors=%d", CONC, rps, rps, errors))
end
