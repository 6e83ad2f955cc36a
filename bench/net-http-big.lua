-- SPDX-License-Identifier: MIT
-- net-http-big.lua - offpath's side of bench/net-http-big.sh: downloads
-- URL (SIZE bytes) once to OUTPUT with `output`, and once through
-- `on_data`, and prints for each the rate and the peak resident memory of
-- the process so far (VmHWM), which must stay flat whatever SIZE is:
--   name=http-big-output bytes=1073741824 mib_per_s=512 peak_rss_kib=12345
local offpath = require "offpath"

local URL = assert(os.getenv("URL"), "URL unset")
local OUTPUT = os.getenv("OUTPUT") or "/dev/null"

local function peak_kib()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmHWM:%s+(%d+)")
    if kb then return tonumber(kb) end
  end
end

local function report(name, bytes, t0)
  local dt = offpath.now() - t0
  print(string.format("name=%s bytes=%d mib_per_s=%.0f peak_rss_kib=%d",
    name, bytes, bytes / dt / 1048576, peak_kib()))
end

function on_start()
  print(string.format("name=http-big-start peak_rss_kib=%d", peak_kib()))
  local t0 = offpath.now()
  local r = offpath.http.get(URL, { output = OUTPUT, timeout = 3600 })
  assert(r.status == 200, r.status)
  report("http-big-output", r.size, t0)
  local n = 0
  t0 = offpath.now()
  r = offpath.http.get(URL, { timeout = 3600,
    on_data = function(chunk) n = n + #chunk end })
  assert(r.status == 200, r.status)
  report("http-big-on_data", n, t0)
end
