-- SPDX-License-Identifier: MIT
-- fs.lua - offpath.readfile, writefile, copy and cat: results, errors that
-- name the path and the reason, large files, timeouts, a full queue.
-- LABELS: io fs tsan
local T = require "_tap"
local offpath = require "offpath"

offpath.configure { pools = {
  fsp = { threads = 1 },             -- for the blocked-FIFO timeout test
  tiny = { threads = 1, queue = 1 }, -- for the full-queue test
} }

-- A string as a literal pattern.
local function lit(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")) end

local tmp

T.test("setup: a scratch directory", function()
  local r = offpath.exec({ "mktemp", "-d" })
  T.eq(r.code, 0)
  tmp = r.stdout:gsub("\n$", "")
end)

T.test("writefile and readfile round trip, binary safe", function()
  local data = "line 1\n\0\255binary\r\n"
  T.eq(offpath.writefile(tmp .. "/a", data), #data)
  T.eq(offpath.readfile(tmp .. "/a"), data)
  -- writefile truncates
  T.eq(offpath.writefile(tmp .. "/a", "x"), 1)
  T.eq(offpath.readfile(tmp .. "/a"), "x")
  T.eq(offpath.writefile(tmp .. "/empty", ""), 0)
  T.eq(offpath.readfile(tmp .. "/empty"), "")
  -- a file whose size stat does not tell
  T.ok(offpath.readfile("/proc/self/status"):find("Threads:", 1, true))
end)

T.test("new files get mode 0666 less the umask", function()
  offpath.writefile(tmp .. "/m", "m")
  local r = offpath.exec("umask; stat -c %a " .. tmp .. "/m")
  local umask, mode = r.stdout:match("^(%d+)\n(%d+)\n$")
  T.eq(tonumber(mode, 8), 438 & ~tonumber(umask, 8))
end)

T.test("copy and cat", function()
  offpath.writefile(tmp .. "/src", "hello\n")
  T.eq(offpath.copy(tmp .. "/src", tmp .. "/dst"), 6)
  T.eq(offpath.readfile(tmp .. "/dst"), "hello\n")
  -- copy truncates an existing, longer destination
  offpath.writefile(tmp .. "/long", string.rep("z", 100))
  T.eq(offpath.copy(tmp .. "/src", tmp .. "/long"), 6)
  T.eq(offpath.readfile(tmp .. "/long"), "hello\n")
  -- cat appends, and creates a missing destination
  T.eq(offpath.cat(tmp .. "/src", tmp .. "/dst"), 6)
  T.eq(offpath.readfile(tmp .. "/dst"), "hello\nhello\n")
  T.eq(offpath.cat(tmp .. "/src", tmp .. "/new"), 6)
  T.eq(offpath.readfile(tmp .. "/new"), "hello\n")
  -- an empty source, and a source without a size (/proc)
  T.eq(offpath.copy(tmp .. "/empty", tmp .. "/e2"), 0)
  T.eq(offpath.readfile(tmp .. "/e2"), "")
  T.ok(offpath.copy("/proc/self/status", tmp .. "/status") > 0)
  T.ok(offpath.readfile(tmp .. "/status"):find("Threads:", 1, true))
end)

T.test("10 MB files: write, read, copy, cat", function()
  local n = 10 * 1024 * 1024
  local big = string.rep("0123456789abcdef", n // 16)
  T.eq(offpath.writefile(tmp .. "/big", big), n)
  local back = offpath.readfile(tmp .. "/big")
  T.eq(#back, n); T.ok(back == big, "readfile differs")
  T.eq(offpath.copy(tmp .. "/big", tmp .. "/big2"), n)
  T.ok(offpath.readfile(tmp .. "/big2") == big, "copy differs")
  T.eq(offpath.cat(tmp .. "/big", tmp .. "/big2"), n)
  local twice = offpath.readfile(tmp .. "/big2")
  T.eq(#twice, 2 * n); T.ok(twice == big .. big, "cat differs")
  T.eq(offpath.exec({ "cmp", tmp .. "/big", tmp .. "/big2", "-n",
    tostring(n) }).code, 0)
end)

T.test("errors name the path and the system's reason", function()
  local missing = tmp .. "/no/such"
  T.err("^readfile: cannot open '" .. lit(missing) .. "': No such file or "
    .. "directory$", offpath.readfile, missing)
  T.err("^readfile: cannot read '" .. lit(tmp) .. "': Is a directory$",
    offpath.readfile, tmp)
  T.err("^writefile: cannot open '" .. lit(missing) .. "': No such file or "
    .. "directory$", offpath.writefile, missing, "x")
  T.err("^writefile: cannot open '" .. lit(tmp)
    .. "/src/x': Not a directory$",
    offpath.writefile, tmp .. "/src/x", "x")
  T.err("^writefile: cannot open '" .. lit(tmp) .. "': Is a directory$",
    offpath.writefile, tmp, "x")
  T.err("^copy: cannot open '" .. lit(missing) .. "': No such file or "
    .. "directory$", offpath.copy, missing, tmp .. "/d")
  T.err("^copy: cannot open '" .. lit(missing) .. "': No such file or "
    .. "directory$", offpath.copy, tmp .. "/src", missing)
  T.err("^copy: cannot read '" .. lit(tmp) .. "': Is a directory$",
    offpath.copy, tmp, tmp .. "/d")
  T.err("^cat: cannot open '" .. lit(missing) .. "': No such file or "
    .. "directory$", offpath.cat, missing, tmp .. "/d")
  T.err("^copy: '" .. lit(tmp) .. "/src' and '" .. lit(tmp)
    .. "/src' are the same file$", offpath.copy, tmp .. "/src", tmp .. "/src")
  T.err("^cat: '" .. lit(tmp) .. "/src' and '" .. lit(tmp)
    .. "/%./src' are the same file$", offpath.cat, tmp .. "/src", tmp .. "/./src")
  -- the same-file check did not damage the file
  T.eq(offpath.readfile(tmp .. "/src"), "hello\n")
  -- a full device
  T.err("^writefile: cannot write '/dev/full': No space left on device$",
    offpath.writefile, "/dev/full", "x")
  T.err("^copy: cannot write '/dev/full': No space left on device$",
    offpath.copy, tmp .. "/src", "/dev/full")
end)

T.test("permission denied", function()
  local uid = offpath.exec({ "id", "-u" }).stdout
  if uid == "0\n" then
    print("skipped - permission denied: running as root, where permission "
      .. "checks do not apply (the other failures above still run)")
    return
  end
  local f = tmp .. "/locked"
  offpath.writefile(f, "secret")
  T.eq(offpath.exec({ "chmod", "000", f }).code, 0)
  T.err("^readfile: cannot open '" .. lit(f) .. "': Permission denied$",
    offpath.readfile, f)
  T.err("^copy: cannot open '" .. lit(f) .. "': Permission denied$",
    offpath.copy, f, tmp .. "/x")
  T.err("^writefile: cannot open '" .. lit(f) .. "': Permission denied$",
    offpath.writefile, f, "x")
end)

T.test("each failure ends its call exactly once", function()
  local ends = 0
  local cb = T.expect(function(ok, err)
    ends = ends + 1
    T.eq(ok, false)
    T.ok(tostring(err):find("^readfile: cannot open"), err)
  end, 20)
  local tasks = {}
  for i = 1, 20 do
    tasks[i] = offpath.go(function()
      return offpath.readfile(tmp .. "/missing-" .. i)
    end)
    tasks[i]:on_done(cb)
  end
  for i = 1, 20 do pcall(tasks[i].wait, tasks[i]) end
  offpath.sleep(0.01)
  T.eq(ends, 20)
end)

T.test("many at once", function()
  local tasks = {}
  for i = 1, 200 do
    tasks[i] = offpath.go(function()
      local p = tmp .. "/many-" .. i
      offpath.writefile(p, tostring(i))
      return offpath.readfile(p)
    end)
  end
  for i = 1, 200 do T.eq(tasks[i]:wait(), tostring(i)) end
end)

T.test("a timeout leaves a blocked call to finish in the background",
  function()
    local fifo = tmp .. "/fifo"
    T.eq(offpath.exec({ "mkfifo", fifo }).code, 0)
    local before = offpath.stats().pools.fsp
    -- open() of a FIFO without a writer blocks the worker thread
    local ok, e = pcall(offpath.readfile, fifo, { pool = "fsp",
      timeout = 0.1 })
    T.eq(ok, false)
    T.ok(e:find("^timeout after 0.1 s in offpath.readfile at .*fs.lua:%d+"),
      e)
    -- the worker is still in open(); give it a writer so it can finish
    -- (it then sees its stop and closes without reading: the writer may
    -- get SIGPIPE)
    local w = offpath.exec("echo x > " .. fifo, { timeout = 5 })
    T.ok(w.code == 0 or w.code == 1 or w.signal == 13, w.code or w.signal)
    -- fsp has one thread: this runs after the abandoned read ended
    T.eq(offpath.readfile(tmp .. "/src", { pool = "fsp" }), "hello\n")
    local after = offpath.stats().pools.fsp
    T.eq(after.timedout - before.timedout, 1)
    T.eq(after.completed - before.completed, 1)
    T.eq(after.inflight, 0)
  end)

T.test("a full queue parks calls until there is room; cancel", function()
  local fifo = tmp .. "/fifo2"
  T.eq(offpath.exec({ "mkfifo", fifo }).code, 0)
  local before = offpath.stats().pools.tiny
  -- occupy tiny's only thread
  local blocker = offpath.go(function()
    return offpath.readfile(fifo, { pool = "tiny" })
  end)
  offpath.sleep(0.05)
  local tasks = {}
  for i = 1, 20 do
    tasks[i] = offpath.go(function()
      return offpath.readfile(tmp .. "/many-" .. i, { pool = "tiny" })
    end)
  end
  offpath.sleep(0.05)
  -- tasks[1] is in the pool queue (length 1), the others are parked:
  -- parked work counts as queued and in flight, as parked Lua tasks do
  local mid = offpath.stats().pools.tiny
  T.eq(mid.queued, 20)
  T.eq(mid.inflight - before.inflight, 21)
  T.eq(tasks[1]:cancel(), true)  -- queued: taken off the queue
  T.eq(tasks[10]:cancel(), true) -- parked: never queued
  T.err("^cancelled", tasks[1].wait, tasks[1])
  T.err("^cancelled", tasks[10].wait, tasks[10])
  T.eq(offpath.exec("echo unblock > " .. fifo, { timeout = 5 }).code, 0)
  T.eq(blocker:wait(), "unblock\n")
  for i = 2, 20 do
    if i ~= 10 then T.eq(tasks[i]:wait(), tostring(i)) end
  end
  local after = offpath.stats().pools.tiny
  -- blocker and 1..20: a parked call counts as submitted when it is made,
  -- so every one ends once in the books (10 never reached the queue)
  T.eq(after.submitted - before.submitted, 21)
  T.eq(after.submitted - before.submitted, (after.completed - before.completed)
    + (after.cancelled - before.cancelled))
  -- 1 and 10: a parked call that is cancelled counts as cancelled too
  T.eq(after.cancelled - before.cancelled, 2)
  T.eq(after.completed - before.completed, 19)
  T.ok(after.queue_hwm <= 1, "queue hwm " .. after.queue_hwm)
  T.eq(after.inflight, 0)
end)

T.test("file, SQLite and Lua work parked on one full queue count alike",
  function()
  local fifo = tmp .. "/fifo3"
  T.eq(offpath.exec({ "mkfifo", fifo }).code, 0)
  local db = offpath.sqlite.open(tmp .. "/parked.db", { pool = "tiny" })
  local before = offpath.stats().pools.tiny
  local blocker = offpath.go(function()
    return offpath.readfile(fifo, { pool = "tiny" })
  end)
  offpath.sleep(0.05)
  local queued = offpath.go(function()
    return offpath.readfile(tmp .. "/many-2", { pool = "tiny" })
  end)
  offpath.sleep(0.05) -- in the queue: the next three are parked
  local file = offpath.go(function()
    return offpath.readfile(tmp .. "/many-1", { pool = "tiny" })
  end)
  local sql = offpath.go(function()
    return db:exec("SELECT 7 AS x")[1].x
  end)
  local lua = offpath.go(function()
    return offpath.launch("tiny", function() return "lua" end):wait()
  end)
  local doomed = offpath.go(function()
    return db:exec("SELECT 8 AS x")
  end)
  offpath.sleep(0.05)
  local mid = offpath.stats().pools.tiny
  T.eq(mid.queued, 5) -- one queued, four parked: a file, two SQL, a Lua
  T.eq(mid.inflight - before.inflight, 6)
  T.eq(doomed:cancel(), true)
  T.err("^cancelled", doomed.wait, doomed)
  T.eq(offpath.stats().pools.tiny.queued, 4)
  T.eq(offpath.exec("echo unblock > " .. fifo, { timeout = 5 }).code, 0)
  T.eq(blocker:wait(), "unblock\n")
  T.eq(queued:wait(), "2")
  T.eq(file:wait(), "1")
  T.eq(sql:wait(), 7)
  T.eq(lua:wait(), "lua")
  db:close()
  local after = offpath.stats().pools.tiny
  T.eq(after.cancelled - before.cancelled, 1)
  T.eq(after.completed - before.completed, 5)
  T.eq(after.queued, 0)
  T.eq(after.inflight, 0)
end)

T.test("bad arguments", function()
  T.err("bad argument #1 to 'offpath.readfile' %(string expected, got no "
    .. "value%)", offpath.readfile)
  T.err("bad argument #2 to 'offpath.writefile' %(string expected, got "
    .. "table%)", offpath.writefile, tmp .. "/x", {})
  T.err("bad argument #2 to 'offpath.copy' %(string expected, got no "
    .. "value%)", offpath.copy, tmp .. "/x")
  T.err("bad argument #3 to 'offpath.cat' %(field 'timeout' must be a "
    .. "number >= 0%)", offpath.cat, tmp .. "/src", tmp .. "/x", { timeout = -1 })
  T.err("^readfile: no such pool 'nope'", offpath.readfile, tmp .. "/src",
    { pool = "nope" })
end)

T.test("cleanup", function()
  T.eq(offpath.exec({ "rm", "-rf", tmp }).code, 0)
end)
