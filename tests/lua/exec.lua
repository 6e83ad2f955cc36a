-- SPDX-License-Identifier: MIT
-- exec.lua - offpath.exec: both command forms, stdin, env, cwd, exit codes
-- and signals, large outputs, timeouts that kill (no zombie), cancel.
-- LABELS: io exec
local T = require "_tap"
local offpath = require "offpath"

-- A string as a literal pattern.
local function lit(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")) end

local tmp -- a scratch directory, made by the first test

-- Whether process pid is gone: no /proc entry (a zombie keeps one, so
-- this also proves the child was reaped).
local function gone(pid)
  local ok = pcall(offpath.readfile, "/proc/" .. pid .. "/stat")
  return not ok
end

-- Wait up to `limit` seconds for pid to be gone.
local function wait_gone(pid, limit)
  local t0 = offpath.now()
  while offpath.now() - t0 < limit do
    if gone(pid) then return true end
    offpath.sleep(0.01)
  end
  return gone(pid)
end

-- Read a pid that a child wrote to file, waiting for it to appear.
local function read_pid(file)
  for _ = 1, 500 do
    local ok, s = pcall(offpath.readfile, file)
    if ok and s:match("^%d+\n") then return tonumber(s:match("^%d+")) end
    offpath.sleep(0.01)
  end
  error("no pid in " .. file)
end

T.test("setup: a scratch directory", function()
  local r = offpath.exec({ "mktemp", "-d" })
  T.eq(r.code, 0)
  tmp = r.stdout:gsub("\n$", "")
  T.ok(#tmp > 0)
end)

T.test("a shell string: stdout, stderr and the exit code", function()
  local r = offpath.exec("echo out; echo err >&2; exit 3")
  T.eq(r.code, 3); T.eq(r.signal, nil)
  T.eq(r.stdout, "out\n"); T.eq(r.stderr, "err\n")
  r = offpath.exec("true")
  T.eq(r.code, 0); T.eq(r.stdout, ""); T.eq(r.stderr, "")
  T.eq(offpath.exec("exit 255").code, 255)
end)

T.test("an argv table is not interpreted by a shell", function()
  local r = offpath.exec({ "printf", "%s|", "a b", "$HOME", "*", 42, 1.5 })
  T.eq(r.code, 0)
  T.eq(r.stdout, "a b|$HOME|*|42|1.5|")
end)

T.test("stdin, empty stdin, and a child that does not read it", function()
  T.eq(offpath.exec({ "cat" }, { stdin = "hello\0world" }).stdout,
    "hello\0world")
  T.eq(offpath.exec({ "cat" }, { stdin = "" }).stdout, "")
  -- no stdin option: the child reads /dev/null and sees EOF at once
  T.eq(offpath.exec({ "cat" }).stdout, "")
  -- 4 MB the child never reads: the write fails (EPIPE), not the engine
  local r = offpath.exec("exit 0", { stdin = string.rep("x", 4 << 20) })
  T.eq(r.code, 0)
end)

T.test("env replaces the environment, env_add adds to it", function()
  local r = offpath.exec({ "/usr/bin/env" }, { env = { A = "1", B = 2 } })
  local lines = {}
  for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
  table.sort(lines)
  T.eq(table.concat(lines, ","), "A=1,B=2")
  r = offpath.exec('echo "$A-$B"; test -n "$PATH" && echo path',
    { env_add = { A = "x", B = "y" } })
  T.eq(r.stdout, "x-y\npath\n")
  r = offpath.exec({ "/usr/bin/env" }, { env = { A = "1", B = "2" },
    env_add = { B = "3" } })
  T.ok(r.stdout:find("B=3\n", 1, true), r.stdout)
  T.ok(not r.stdout:find("B=2", 1, true), r.stdout)
  T.err("bad option 'env' to 'offpath.exec' %(value of 'A' must be a string%)",
    offpath.exec, "true", { env = { A = {} } })
  T.err("bad variable name 'A=B'", offpath.exec, "true",
    { env_add = { ["A=B"] = "1" } })
end)

T.test("cwd", function()
  T.eq(offpath.exec("pwd", { cwd = tmp }).stdout, tmp .. "\n")
  T.err("^exec: cannot run '/bin/sh' %(cwd '" .. lit(tmp)
    .. "/nodir'%): no such file or directory",
    offpath.exec, "pwd", { cwd = tmp .. "/nodir" })
end)

T.test("a program that does not exist, or may not run", function()
  local e = T.err("^exec: cannot run 'offpath%-no%-such%-program': no such "
    .. "file or directory$", offpath.exec, { "offpath-no-such-program" })
  -- through the shell it is a normal result: 127
  local r = offpath.exec("offpath-no-such-program")
  T.eq(r.code, 127)
  T.ok(r.stderr:find("not found"), r.stderr)
  -- not executable: refused even for root (execve needs an x bit)
  local f = tmp .. "/not-executable"
  offpath.writefile(f, "#!/bin/sh\necho no\n")
  T.err("^exec: cannot run '" .. lit(f) .. "': permission denied$",
    offpath.exec, { f })
  -- each failure raised exactly once, and the handler goes on
  local calls = 0
  for _ = 1, 3 do
    local ok = pcall(offpath.exec, { "offpath-no-such-program" })
    calls = calls + 1
    T.eq(ok, false)
  end
  T.eq(calls, 3)
  T.ok(e)
end)

T.test("exit codes and signals", function()
  local r = offpath.exec("kill -TERM $$")
  T.eq(r.signal, 15); T.eq(r.code, nil)
  r = offpath.exec("kill -KILL $$")
  T.eq(r.signal, 9); T.eq(r.code, nil)
  r = offpath.exec({ "sh", "-c", "exit 42" })
  T.eq(r.code, 42); T.eq(r.signal, nil)
end)

T.test("10 MB on stdout and on stderr at once, 10 MB through cat", function()
  local n = 10 * 1024 * 1024
  local r = offpath.exec("head -c " .. n .. " /dev/zero & "
    .. "head -c " .. n .. " /dev/zero >&2; wait")
  T.eq(r.code, 0)
  T.eq(#r.stdout, n); T.eq(#r.stderr, n)
  -- the classic deadlock: the parent writes stdin while the child fills
  -- stdout; both go on at once here
  local big = string.rep("0123456789abcdef", n // 16)
  r = offpath.exec({ "cat" }, { stdin = big })
  T.eq(#r.stdout, n)
  T.ok(r.stdout == big, "cat output differs")
end)

T.test("output over max_output fails and kills the child", function()
  local pidf = tmp .. "/max.pid"
  local e = T.err("^exec: output larger than 1000 bytes on stdout of "
    .. "'echo %$%$ > .*; while :; do echo x+; done' %(max_output%)",
    offpath.exec,
    "echo $$ > " .. pidf .. "; while :; do echo xxxxxxxxxxxxxxxx; done",
    { max_output = 1000 })
  T.ok(wait_gone(read_pid(pidf), 5), "child still there after max_output")
  T.err("bad option 'max_output' to 'offpath.exec' %(must be positive%)",
    offpath.exec, "true", { max_output = 0 })
  T.ok(e)
end)

T.test("the result waits for EOF from what the child left behind", function()
  -- the shell exits at once; its background child keeps stdout open
  local t0 = offpath.now()
  local r = offpath.exec("(sleep 0.2; echo late) &")
  T.eq(r.code, 0)
  T.eq(r.stdout, "late\n")
  T.ok(offpath.now() - t0 >= 0.19, "returned before EOF")
end)

T.test("timeout kills the child and its children, leaving no zombie",
  function()
    local pidf, kidf = tmp .. "/t.pid", tmp .. "/t.kid"
    local t0 = offpath.now()
    local ok, e = pcall(offpath.exec,
      "echo $$ > " .. pidf .. "; sleep 30 & echo $! > " .. kidf .. "; wait",
      { timeout = 0.2 })
    T.eq(ok, false)
    T.ok(e:find("^timeout after 0.2 s in offpath.exec at .*exec.lua:%d+"), e)
    T.ok(offpath.now() - t0 < 1, "timeout late")
    local pid, kid = read_pid(pidf), read_pid(kidf)
    T.ok(wait_gone(pid, 5), "child " .. pid .. " not reaped")
    T.ok(wait_gone(kid, 5), "grandchild " .. kid .. " still running")
  end)

T.test("a child that ignores SIGTERM gets SIGKILL after kill_grace",
  function()
    local pidf = tmp .. "/g.pid"
    local t0 = offpath.now()
    T.err("^timeout after 0.1 s", offpath.exec,
      "trap '' TERM; echo $$ > " .. pidf .. "; while :; do sleep 0.02; done",
      { timeout = 0.1, kill_grace = 0.5 })
    local pid = read_pid(pidf)
    offpath.sleep(0.2)
    T.ok(not gone(pid), "killed before its grace period ended")
    T.ok(wait_gone(pid, 5), "not killed after its grace period")
    local took = offpath.now() - t0
    T.ok(took >= 0.55 and took < 5, "killed after " .. took .. " s")
  end)

T.test("cancelling the task running exec kills the child", function()
  local pidf = tmp .. "/c.pid"
  local t = offpath.go(function()
    return offpath.exec("echo $$ > " .. pidf .. "; exec sleep 30")
  end)
  local pid = read_pid(pidf)
  T.eq(t:status(), "running")
  T.eq(t:cancel(), true)
  T.err("^cancelled", t.wait, t)
  T.ok(wait_gone(pid, 5), "child survived the cancel")
end)

T.test("exec does not block the main thread; many at once", function()
  local slow = offpath.go(function() return offpath.exec("sleep 0.3") end)
  local t0 = offpath.now()
  offpath.sleep(0.02)
  T.ok(offpath.now() - t0 < 0.2, "the main thread was blocked")
  local tasks = {}
  for i = 1, 50 do
    tasks[i] = offpath.go(function()
      return offpath.exec({ "sh", "-c", "echo $0", tostring(i) })
    end)
  end
  for i = 1, 50 do T.eq(tasks[i]:wait().stdout, i .. "\n") end
  T.eq(slow:wait().code, 0)
end)

T.test("bad arguments", function()
  T.err("bad argument #1 to 'offpath.exec' %(command string or argv table expected",
    offpath.exec, nil)
  T.err("argv table is empty", offpath.exec, {})
  T.err("argv%[2%] is a table", offpath.exec, { "echo", {} })
  T.err("bad argument #2 to 'offpath.exec' %(options table expected",
    offpath.exec, "true", 5)
  T.err("bad option 'tmeout' to 'offpath.exec' %(unknown option%)", offpath.exec,
    "true", { tmeout = 1 })
  T.err("bad option 'timeout' to 'offpath.exec' %(must not be negative%)",
    offpath.exec, "true", { timeout = -1 })
  T.err("bad option 'stdin' to 'offpath.exec' %(string expected, got number%)",
    offpath.exec, "cat", { stdin = 5 })
  T.err("bad option 'cwd' to 'offpath.exec' %(string expected",
    offpath.exec, "pwd", { cwd = true })
end)

T.test("cleanup", function()
  T.eq(offpath.exec({ "rm", "-rf", tmp }).code, 0)
end)
