-- SPDX-License-Identifier: MIT
-- op-stream.lua - stream throughput: records from the host's input through a
-- trivial on_event, the same function as bench/peer-lines.lua calls in a
-- plain lua5.4 loop over io.lines.
-- Thread: the main VM only.
--
-- usage: offpath run bench/op-stream.lua --input FILE
--        (FILE made by lua5.4 bench/peer-lines.lua --make N --file FILE)
--
-- Prints records, bytes, records_per_s and ns_per_record, timed from the end
-- of on_start (the host opens its inputs before on_start and reads after
-- it) to the start of on_stop (after the last record's handler), and
-- cpu_pct (os.clock: process CPU time, all threads: the host reads files
-- through libuv's threadpool).

local offpath = require "offpath"

local count, bytes = 0, 0
local t0, c0

function on_start()
  c0 = os.clock()
  t0 = offpath.now()
end

-- The trivial per-record function, the same one bench/peer-lines.lua calls.
function on_event(_, rec)
  count = count + 1
  bytes = bytes + #rec
end

function on_stop()
  local wall = offpath.now() - t0
  local cpu = os.clock() - c0
  if count == 0 then
    io.stderr:write("op-stream: no records\n")
    os.exit(1)
  end
  io.stdout:write(string.format(
    "name=offpath-stream records=%d bytes=%d records_per_s=%.0f " ..
    "ns_per_record=%.1f wall_s=%.3f cpu_s=%.3f cpu_pct=%.1f\n", count, bytes,
    count / wall, wall / count * 1e9, wall, cpu, 100 * cpu / wall))
  io.stdout:flush()
end
