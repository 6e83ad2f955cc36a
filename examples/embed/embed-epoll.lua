-- SPDX-License-Identifier: MIT
-- embed-epoll.lua - the handler that examples/embed/embed-epoll.c calls per
-- line received on its TCP port. Commands:
--   sum N        the sum 1..N, computed on a "cpu" pool thread
--   sha1 TEXT    the SHA-1 of TEXT, by the sha1sum program (offpath.exec if
--                the build has it, else io.popen on an "io" pool thread)
--   sleep S      answers "slept S" after S seconds (a timer: no thread)
-- Answers go back through engine:send(conn, text), a C function of the host.
local offpath = require "offpath"

local function sha1(text)
  if offpath.exec then
    local r = offpath.exec({ "sha1sum" }, { stdin = text })
    return (r.stdout:match("^(%x+)"))
  end
  return offpath.run("io", function(t)
    local name = os.tmpname()
    local f = assert(io.open(name, "wb"))
    f:write(t)
    f:close()
    local p = io.popen("sha1sum < " .. name)
    local out = p:read("a")
    p:close()
    os.remove(name)
    return (out:match("^(%x+)"))
  end, text)
end

function on_line(engine, conn, line)
  local cmd, arg = line:match("^(%S+)%s*(.*)$")
  if cmd == "sum" then
    local n = math.tointeger(tonumber(arg))
    if not n then return engine:send(conn, "error: sum needs an integer") end
    local s = offpath.run("cpu", function(k)
      local acc = 0
      for i = 1, k do acc = acc + i end
      return acc
    end, n)
    engine:send(conn, ("sum %d = %d"):format(n, s))
  elseif cmd == "sha1" then
    engine:send(conn, "sha1 " .. sha1(arg))
  elseif cmd == "sleep" then
    local s = tonumber(arg) or 0
    offpath.sleep(s)
    engine:send(conn, "slept " .. arg)
  else
    engine:send(conn, "error: unknown command " .. tostring(cmd))
  end
end
