-- SPDX-License-Identifier: MIT
-- checksums.lua: offpath from a plain Lua 5.4 program, without the offpath
-- command. Build, then run it with the module on the C path:
--
--   make run
--   LUA_CPATH="build/release/?.so;;" lua5.4 examples/module/checksums.lua [URL]
--
-- `make install` puts offpath.so in Lua's C module path (lib/lua/5.4), so
-- an installed offpath needs no LUA_CPATH.
local offpath = require "offpath"

-- Pools are set up before their first task, as in any script.
offpath.configure { pools = { sums = { threads = 2 } } }

local function sum(n)
  local s = 0
  for i = 1, n do s = s + i end
  return s
end

-- The main chunk is not a handler: it cannot suspend (offpath.run here
-- would raise "cannot suspend"). Work that waits goes in offpath.go; each
-- such coroutine suspends on its own while the others go on.
local jobs = {}
for i, n in ipairs { 100000, 200000, 300000 } do
  jobs[i] = offpath.go(function()
    offpath.sleep(0.01 * i) -- a timer, no thread
    return n, offpath.run("sums", sum, n) -- a worker thread of "sums"
  end)
end

local url = arg[1]
local report = offpath.go(function()
  for i, r in ipairs(offpath.all(table.unpack(jobs))) do
    print(("sum %d: 1..%d = %d"):format(i, r[2], r[3]))
  end
  -- A child process with an argument list: no shell, no quoting.
  local r = offpath.exec({ "printf", "%s|", "two words", "x" })
  print("exec: " .. r.stdout)
  if url then
    local page = offpath.http.get(url, { timeout = 10 })
    print(("GET %s: %d, %d bytes"):format(url, page.status, #page.body))
  end
end)

report:on_done(function(ok, err)
  if not ok then print("failed: " .. err) end
end)

-- Run the loop until no work is left: every coroutine above has ended.
offpath.loop()
print("report: " .. report:status())
