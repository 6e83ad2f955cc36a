-- SPDX-License-Identifier: MIT
-- peer-lines.lua - the stream-throughput peer: a plain lua5.4 loop over
-- io.lines calling a trivial on_event per record, on one thread.
--
-- usage: lua5.4 bench/peer-lines.lua --file PATH
--        lua5.4 bench/peer-lines.lua --make N --file PATH   (write the input)
--
-- The input is N newline-terminated records of about 64 bytes, made by
-- --make so that offpath's stream benchmark can read the very same file.
-- The timed part opens the file, reads every line and calls on_event(line);
-- it prints records_per_s (higher is better) and ns_per_record.

local function usage(msg)
  io.stderr:write("peer-lines: ", msg, "\n",
    "usage: lua5.4 peer-lines.lua [--make N] --file PATH\n")
  os.exit(2)
end

local path, make
do
  local i = 1
  while i <= #arg do
    local k, v = arg[i], arg[i + 1]
    if v == nil then usage("missing value for " .. k) end
    if k == "--file" then
      path = v
    elseif k == "--make" then
      make = math.tointeger(tonumber(v))
      if not make or make < 1 then usage("bad value for --make: " .. v) end
    else
      usage("unknown option " .. k)
    end
    i = i + 2
  end
  if not path then usage("--file is required") end
end

-- Write make records to path, deterministic so every run reads the same.
if make then
  local f = assert(io.open(path, "wb"))
  local buf, n = {}, 0
  for i = 1, make do
    n = n + 1
    buf[n] = string.format(
      "%010d,2024-01-01T00:%02d:%02dZ,user%06d,GET,/item/%d,200",
      i, i // 60 % 60, i % 60, i % 1000003, i % 9973)
    if n == 4096 then
      f:write(table.concat(buf, "\n", 1, n), "\n")
      n = 0
    end
  end
  if n > 0 then f:write(table.concat(buf, "\n", 1, n), "\n") end
  assert(f:close())
  os.exit(0)
end

local count, bytes = 0, 0

-- The trivial per-record function, the same one offpath's stream calls.
local function on_event(rec)
  count = count + 1
  bytes = bytes + #rec
end

-- Wall time from luv's monotonic clock when it is installed (it is for
-- make bench); plain Lua has only os.clock, CPU time, which is close here:
-- one thread, and the file is in the page cache after --make.
local ok, uv = pcall(require, "luv")
local wall_ns = ok and uv.hrtime or function() return os.clock() * 1e9 end
local c0, w0 = os.clock(), wall_ns()
for line in io.lines(path) do
  on_event(line)
end
local wall = (wall_ns() - w0) / 1e9
local cpu = os.clock() - c0
if count == 0 then
  io.stderr:write("peer-lines: no records in ", path, "\n")
  os.exit(1)
end
print(string.format(
  "name=lua-lines records=%d bytes=%d records_per_s=%.0f ns_per_record=%.1f " ..
  "wall_s=%.3f cpu_s=%.3f cpu_pct=%.1f", count, bytes, count / wall,
  wall / count * 1e9, wall, cpu, 100 * cpu / wall))
