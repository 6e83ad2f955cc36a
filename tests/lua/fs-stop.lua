-- SPDX-License-Identifier: MIT
-- fs-stop.lua - file operations stop when their wait ends (timeout,
-- cancel): an endless source does not keep its worker reading until
-- memory runs out; readfile has a size limit (max_size).
-- LABELS: io fs tsan
local T = require "_tap"
local offpath = require "offpath"

-- One thread: an operation that went on reading would hold it for ever,
-- and the next call on the pool would never run.
offpath.configure { pools = { one = { threads = 1 } } }

local tmp

T.test("setup: a scratch directory", function()
  local r = offpath.exec({ "mktemp", "-d" })
  T.eq(r.code, 0)
  tmp = r.stdout:gsub("\n$", "")
end)

T.test("readfile of an endless file stops at its timeout", function()
  T.err("^timeout", offpath.readfile, "/dev/zero",
    { timeout = 0.2, max_size = 1e15, pool = "one" })
  offpath.writefile(tmp .. "/small", "hello", { pool = "one" })
  T.eq(offpath.readfile(tmp .. "/small", { pool = "one" }), "hello")
end)

T.test("copy and cat from an endless file stop when cancelled", function()
  T.err("^timeout", offpath.copy, "/dev/zero", "/dev/null",
    { timeout = 0.2, pool = "one" })
  local t = offpath.go(function()
    return offpath.cat("/dev/zero", "/dev/null", { pool = "one" })
  end)
  offpath.sleep(0.1)
  t:cancel()
  T.err("^cancelled", t.wait, t)
  T.eq(offpath.readfile(tmp .. "/small", { pool = "one" }), "hello")
  local s = offpath.stats().pools.one
  T.eq(s.inflight, 0)
end)

T.test("readfile's size limit", function()
  T.err("^readfile: '/dev/zero' is larger than 67108864 bytes %(max_size%)$",
    offpath.readfile, "/dev/zero", { pool = "one" })
  offpath.writefile(tmp .. "/ten", "0123456789")
  T.eq(offpath.readfile(tmp .. "/ten", { max_size = 10 }), "0123456789")
  T.err("^readfile: '" .. tmp:gsub("%p", "%%%0") ..
    "/ten' is larger than 9 bytes %(max_size%)$",
    offpath.readfile, tmp .. "/ten", { max_size = 9 })
  offpath.writefile(tmp .. "/empty", "")
  T.eq(offpath.readfile(tmp .. "/empty", { max_size = 0 }), "")
  T.err("larger than 3 bytes", offpath.readfile, "/dev/zero",
    { max_size = 3 })
  T.err("bad option 'max_size' to 'readfile' %(must not be negative%)",
    offpath.readfile, "/dev/zero", { max_size = -1 })
end)

T.test("cleanup", function()
  T.eq(offpath.exec({ "rm", "-rf", tmp }).code, 0)
end)
