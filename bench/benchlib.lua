-- SPDX-License-Identifier: MIT
-- benchlib.lua - what the Lua benchmarks share: reading their settings
-- from the environment and the process's memory from /proc. Loaded with
--   local bench = dofile(BENCH_DIR .. "benchlib.lua")
-- where BENCH_DIR is the folder of the calling script.
local M = {}

-- The positive integer in environment variable k, or def when it is unset
-- or empty; anything else is an error naming k.
function M.env_int(k, def)
  local v = os.getenv(k)
  if v == nil or v == "" then return def end
  local n = math.tointeger(tonumber(v))
  if not n or n < 1 then error(k .. " must be a positive integer, not " .. v) end
  return n
end

-- Environment variable k if it is one of allowed, or def when unset.
function M.env_enum(k, def, allowed)
  local v = os.getenv(k)
  if v == nil or v == "" then return def end
  for _, a in ipairs(allowed) do
    if a == v then return v end
  end
  error(k .. " must be one of " .. table.concat(allowed, ", ") .. ", not " .. v)
end

-- A field of /proc/self/status in kB ("VmRSS", "VmHWM"), or -1.
function M.status_kb(key)
  local f = io.open("/proc/self/status", "r")
  if not f then return -1 end
  local s = f:read("a")
  f:close()
  return tonumber(s:match(key .. ":%s*(%d+)")) or -1
end

return M
