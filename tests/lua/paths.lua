-- SPDX-License-Identifier: MIT
-- paths.lua - workers require with the main VM's package.path and
-- package.cpath as they are when the task is submitted, and a module a
-- worker cannot find is reported once ("cannot copy: no value named ...").
-- LABELS: core worker tsan
local T = require "_tap"
local offpath = require "offpath"

offpath.configure { pools = { p1 = { threads = 1 }, p2 = { threads = 2 } } }

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p '" .. d .. "'"))
  return d
end

local function writefile(path, s)
  local f = assert(io.open(path, "w"))
  f:write(s)
  f:close()
end

-- Two directories holding a module of the same name, and the main chunk
-- putting the first one in front of the search path, as scripts do.
local dir1, dir2 = tmpdir(), tmpdir()
writefile(dir1 .. "/pathmod.lua", "return { where = 'dir1' }")
writefile(dir2 .. "/pathmod.lua", "return { where = 'dir2' }")
writefile(dir2 .. "/pathmod2.lua", "return { where = 'dir2 only' }")
package.path = dir1 .. "/?.lua;" .. package.path
local pathmod = require "pathmod"

T.test("the main chunk's package.path reaches the workers", function()
  -- A module captured as an upvalue crosses by name: the worker loads it.
  T.eq(offpath.run("p1", function() return pathmod.where end), "dir1")
  -- require inside the worker uses the same path.
  T.eq(offpath.run("p2", function() return require("pathmod").where end),
    "dir1")
  T.eq(offpath.run("p2", function() return package.path end), package.path)
end)

T.test("a change is seen by the next submit, path and cpath", function()
  package.path = dir2 .. "/?.lua;" .. package.path
  package.cpath = dir2 .. "/?.so;" .. package.cpath
  local p, c = offpath.run("p1", function() return package.path, package.cpath end)
  T.eq(p, package.path); T.eq(c, package.cpath)
  -- a module only the new directory has
  T.eq(offpath.run("p1", function() return require("pathmod2").where end),
    "dir2 only")
  -- the module loaded earlier in that worker stays loaded, as in any VM
  T.eq(offpath.run("p1", function() return require("pathmod").where end),
    "dir1")
  -- the same text assigned again is not a change; reading works as ever
  package.path = package.path .. ""
  T.eq(offpath.run("p1", function() return package.path end), package.path)
  T.eq(type(package.searchpath("pathmod", package.path)), "string")
end)

T.test("a C module loads in the main VM and in workers", function()
  -- It links no Lua (tests/lua/fixtures/opcmod.c): the command provides it.
  package.cpath = os.getenv("OFFPATH_BINARY_DIR") .. "/cmod/?.so;"
    .. package.cpath
  local m = require "opcmod"
  T.eq(m.add(40, 2), 42)
  T.eq(table.concat(m.map({ 1, 2, 3 }, function(v) return v * 10 end), ","),
    "10,20,30")
  T.err("number expected", m.add, 1, "x")
  T.eq(offpath.run("p2", function(a, b)
    local w = require "opcmod"
    return table.concat(w.map({ a, b }, function(v) return w.add(v, 1) end),
      ",")
  end, 1, 2), "2,3")
  -- the module as an upvalue crosses by name, as a Lua module does
  T.eq(offpath.run("p1", function() return m.add(1, 1) end), 2)
end)

-- rawset bypasses the hook that counts assignments: it is noticed at the
-- next full look, at most 256 tasks later. The hook's metatable is
-- protected (without it the two fields would be lost).
T.test("a rawset on package is still followed", function()
  local saved = package.path
  local function last_of(n)
    local seen
    for _ = 1, n do seen = offpath.run("p1", function() return package.path end) end
    return seen
  end
  rawset(package, "path", dir1 .. "/?.lua")
  T.eq(last_of(257), dir1 .. "/?.lua")
  T.err("cannot change a protected metatable", setmetatable, package, nil)
  T.ok(getmetatable(package):find("followed for the worker VMs"))
  package.path = dir2 .. "/?.lua"
  T.eq(last_of(1), dir2 .. "/?.lua", "from now on: every task looks")
  package.path = saved
  T.eq(last_of(1), saved)
end)

T.test("a module the worker cannot find: one 'cannot copy' prefix", function()
  package.preload.mainonly = function() return { x = 1 } end
  local mainonly = require "mainonly"
  local err = T.err("cannot copy: no value named 'mainonly' in this VM",
    offpath.run, "p2", function() return mainonly.x end)
  T.ok(not err:find("cannot copy: cannot copy", 1, true), err)
end)

T.test("tasks from many coroutines while the path changes", function()
  local tasks = {}
  for i = 1, 200 do
    if i % 50 == 0 then package.path = dir1 .. "/?.lua;" .. package.path end
    local want = package.path
    tasks[#tasks + 1] = offpath.go(function()
      local got = offpath.run("p2", function() return package.path end)
      return got == want or #got > #want  -- the submit's, or a later one
    end)
  end
  for _, r in ipairs(offpath.all(tasks)) do T.eq(r[2], true) end
end)
