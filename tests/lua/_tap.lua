-- SPDX-License-Identifier: MIT
-- _tap.lua - a small test helper for Lua tests run by the offpath host.
--
--   local T = require "_tap"
--   T.test("name", function() ... end)  -- runs in on_start, may suspend
--   local cb = T.expect(fn, n)          -- fails unless called exactly n times
--   T.eq(a, b), T.ok(v), T.err(pattern, fn, ...), T.near(a, b, eps)
--
-- Tests run one after another inside on_start; on_stop checks the expected
-- call counts, prints "N passed, M failed" and raises if anything failed,
-- which makes the host exit non-zero.
local T = {}
local tests, expects = {}, {}
local passed, failed = 0, 0
local current

local function where(level)
  local info = debug.getinfo(level + 1, "Sl")
  return info and (info.short_src .. ":" .. info.currentline) or "?"
end

local function fail(msg, level)
  error(msg .. " (at " .. where((level or 1) + 1) .. ")", 0)
end

function T.eq(a, b, msg)
  if a ~= b and not (a ~= a and b ~= b) then
    fail(string.format("%sexpected %s (%s), got %s (%s)",
      msg and (msg .. ": ") or "", tostring(b), math.type(b) or type(b),
      tostring(a), math.type(a) or type(a)), 2)
  end
end

function T.ok(v, msg)
  if not v then fail(msg or "expected a true value", 2) end
  return v
end

function T.near(a, b, eps, msg)
  if math.abs(a - b) > eps then
    fail(string.format("%sexpected %s within %s of %s",
      msg and (msg .. ": ") or "", tostring(a), tostring(eps), tostring(b)), 2)
  end
end

-- Call fn(...) and expect it to raise an error matching pattern (plain
-- substring if plain is true). Returns the message.
function T.err(pattern, fn, ...)
  local ok, e = pcall(fn, ...)
  if ok then fail("expected an error matching '" .. pattern .. "'", 2) end
  e = tostring(e)
  if not e:find(pattern) then
    fail("error '" .. e .. "' does not match '" .. pattern .. "'", 2)
  end
  return e
end

function T.expect(fn, n, name)
  local e = { n = n, calls = 0, name = name or where(2), test = current }
  expects[#expects + 1] = e
  return function(...)
    e.calls = e.calls + 1
    if fn then return fn(...) end
  end
end

function T.test(name, fn)
  tests[#tests + 1] = { name = name, fn = fn }
end

local function report(name, ok, err)
  if ok then
    passed = passed + 1
    print("ok - " .. name)
  else
    failed = failed + 1
    print("not ok - " .. name .. ": " .. tostring(err))
  end
end

-- The handlers; scripts may wrap them.
function on_start()
  for _, t in ipairs(tests) do
    current = t.name
    local ok, err = xpcall(t.fn, debug.traceback)
    report(t.name, ok, err)
  end
end

function on_stop()
  for _, e in ipairs(expects) do
    if e.calls ~= e.n then
      report("expect " .. e.name .. " (" .. tostring(e.test) .. ")", false,
        string.format("called %d times, expected %d", e.calls, e.n))
    end
  end
  print(string.format("%d passed, %d failed", passed, failed))
  if failed > 0 then error(failed .. " test(s) failed", 0) end
end

return T
