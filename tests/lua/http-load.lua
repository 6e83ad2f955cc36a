-- SPDX-License-Identifier: MIT
-- http-load.lua - offpath.http against a small, misbehaving server
-- (tests/fixtures/httpd.py: listen backlog 8, HTTP/1.0 and 1.1, chunked,
-- redirects, resets mid-response, a port that never accepts): bursts of
-- thousands of requests, errors per phase, streamed bodies, the stats.
local T = require "_tap"
local offpath = require "offpath"
local http = offpath.http

local SRC = assert(os.getenv("OFFPATH_SOURCE_DIR"), "OFFPATH_SOURCE_DIR unset")
local TMP = os.tmpname()
os.remove(TMP)
local PORTFILE = TMP .. ".port"
local URL, DEAD, PID

local function rss_kb()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmRSS:%s+(%d+)")
    if kb then return tonumber(kb) end
  end
end

T.test("the test server starts", function()
  local r = offpath.exec({ "python3", SRC .. "/tests/fixtures/httpd.py",
    PORTFILE }, { timeout = 30 })
  T.eq(r.code, 0, r.stderr)
  for _ = 1, 400 do
    local f = io.open(PORTFILE)
    if f then
      local port, dead, pid = f:read("n", "n", "n")
      f:close()
      URL = "http://127.0.0.1:" .. port
      DEAD = "http://127.0.0.1:" .. dead
      PID = pid
      break
    end
    offpath.sleep(0.05)
  end
  T.ok(URL, "the server did not write its port")
end)

-- Run n requests at once, each made by make(i) in its own coroutine;
-- returns the list of {ok, result-or-error}, checking each ended once.
local function burst(n, make)
  local ends = {}
  local tasks = {}
  for i = 1, n do
    tasks[i] = offpath.go(function()
      local ok, r = pcall(make, i)
      ends[i] = (ends[i] or 0) + 1
      return ok, r
    end)
  end
  local out = {}
  for i = 1, n do
    local ok, a, b = pcall(tasks[i].wait, tasks[i])
    T.ok(ok, tostring(a))
    out[i] = { a, b }
  end
  for i = 1, n do T.eq(ends[i], 1, "request " .. i .. " ended") end
  return out
end

-- First, while no connection is open yet.
T.test("the connection limits can be set and are checked", function()
  T.err("max_host_connections", http.configure, { max_host_connections = 0 })
  T.err("max_connections", http.configure, { max_connections = -1 })
  http.configure { max_host_connections = 2 }
  local res = burst(40, function() return http.get(URL .. "/11") end)
  for _, r in ipairs(res) do T.eq(r[1], true, tostring(r[2])) end
  local st = http.stats()
  T.eq(st.max_host_connections, 2)
  T.ok(st.opened <= 2, st.opened .. " connections opened")
  T.ok(st.connections <= 2, st.connections .. " connections open")
  T.ok(st.reused >= 38, st.reused .. " requests reused a connection")
  http.configure { max_host_connections = 8 }
end)

T.test("2000 requests at once against a backlog of 8 all succeed", function()
  local paths = { "/10", "/11", "/chunked", "/redirect" }
  local res = burst(2000, function(i)
    local p = paths[i % #paths + 1]
    return http.get(URL .. p, { follow = true, timeout = 120 }), p
  end)
  local chunked = {}
  for i = 0, 99 do chunked[#chunked + 1] = string.format("chunk %03d\n", i) end
  chunked = table.concat(chunked)
  for i, r in ipairs(res) do
    T.eq(r[1], true, tostring(r[2]))
    local resp = r[2]
    local p = paths[i % #paths + 1]
    T.eq(resp.status, 200, p)
    T.eq(resp.body, p == "/chunked" and chunked or "hello\n", p)
  end
  local st = offpath.stats().http
  T.ok(st.requests >= 2000, "requests " .. st.requests)
  T.ok(st.reused > 0, "no request reused a connection")
  T.ok(st.connections <= st.max_host_connections,
    st.connections .. " connections open")
end)

T.test("the 200 GETs of python's http.server case, twice over", function()
  for _ = 1, 2 do
    local res = burst(200, function() return http.get(URL .. "/10") end)
    for _, r in ipairs(res) do
      T.eq(r[1], true, tostring(r[2])); T.eq(r[2].status, 200)
    end
  end
end)

T.test("a reset mid-response fails each request once, clearly", function()
  local res = burst(50, function(i)
    if i % 2 == 0 then return http.get(URL .. "/reset") end
    return http.get(URL .. "/11")
  end)
  for i, r in ipairs(res) do
    if i % 2 == 0 then
      T.eq(r[1], false)
      local e = tostring(r[2])
      T.ok(e:find("^http: connection lost while receiving %(GET ")
        or e:find("^http: response cut short %(GET "), e)
      T.ok(not e:find("select/poll", 1, true), e)
    else
      T.eq(r[1], true, tostring(r[2])); T.eq(r[2].body, "hello\n")
    end
  end
end)

T.test("a response in full, then a reset: the response is returned", function()
  -- The reset comes with the data (POLLERR with POLLIN): curl must read
  -- what arrived instead of being told the socket failed.
  local res = burst(50, function() return http.get(URL .. "/full-reset") end)
  for _, r in ipairs(res) do
    T.eq(r[1], true, tostring(r[2]))
    T.eq(r[2].status, 200); T.eq(r[2].body, "hello\n")
  end
end)

T.test("redirects: followed when asked, and the final URL is given", function()
  local r = http.get(URL .. "/redirect")
  T.eq(r.status, 302); T.eq(r.headers.location, "/10")
  r = http.get(URL .. "/redirect", { follow = true })
  T.eq(r.status, 200); T.eq(r.body, "hello\n"); T.eq(r.url, URL .. "/10")
end)

T.test("connect timeout and whole-request timeout are told apart", function()
  local ok, e = pcall(http.get, DEAD .. "/", { connect_timeout = 0.3,
    timeout = 30 })
  T.eq(ok, false)
  T.ok(tostring(e):find("^timeout: http GET .*: not connected in time: "),
    tostring(e))
  ok, e = pcall(http.get, URL .. "/slow", { timeout = 0.5 })
  T.eq(ok, false)
  T.ok(tostring(e):find("^timeout"), tostring(e))
  -- many at once: each ends once, with its own error
  local res = burst(20, function()
    return http.get(DEAD .. "/", { connect_timeout = 0.3 })
  end)
  for _, r in ipairs(res) do
    T.eq(r[1], false); T.ok(tostring(r[2]):find("^timeout"), tostring(r[2]))
  end
end)

T.test("a response streams to a file; memory stays flat", function()
  local out = TMP .. ".out"
  local n = 128 * 1024 * 1024
  local before = rss_kb()
  local r = http.get(URL .. "/big?n=" .. n, { output = out, timeout = 300 })
  local grew = rss_kb() - before
  T.eq(r.status, 200); T.eq(r.body, ""); T.eq(r.output, out); T.eq(r.size, n)
  local f = assert(io.open(out, "rb"))
  T.eq(f:seek("end"), n)
  f:seek("set", n - 16)
  T.eq(f:read("a"), "0123456789abcdef")
  f:close()
  os.remove(out)
  T.ok(grew < 32 * 1024, "RSS grew by " .. grew .. " KiB")
  -- a failed transfer leaves no partial file behind
  local ok, e = pcall(http.get, URL .. "/reset", { output = out })
  T.eq(ok, false, tostring(e))
  T.eq(io.open(out), nil)
  -- and a file that cannot be written is refused at once
  T.err("^http: cannot write '/nonexistent/x'", http.get, URL .. "/11",
    { output = "/nonexistent/x" })
end)

T.test("on_data gets the body in chunks, in order, memory flat", function()
  local n = 64 * 1024 * 1024 + 1000 -- past the in-memory limit
  local got, calls, bad, biggest, heap = 0, 0, 0, 0, 0
  collectgarbage()
  local before = collectgarbage("count")
  local r = http.get(URL .. "/big?n=" .. n, {
    on_data = function(chunk)
      if chunk:sub(1, 1) ~= ("0123456789abcdef"):sub(got % 16 + 1,
          got % 16 + 1) then
        bad = bad + 1
      end
      got = got + #chunk
      calls = calls + 1
      if #chunk > biggest then biggest = #chunk end
      heap = math.max(heap, collectgarbage("count") - before)
      T.eq(offpath.can_suspend(), false)
    end, timeout = 300 })
  T.eq(r.status, 200); T.eq(r.body, "")
  T.eq(got, n); T.eq(bad, 0); T.ok(calls > 1, calls .. " calls")
  -- chunks stay small (the transfer pauses while one waits) and are not
  -- kept: the Lua heap holds a few at most (a sanitizer's quarantine
  -- would hide this in the process's RSS)
  T.ok(biggest <= 1024 * 1024, "a chunk of " .. biggest .. " bytes")
  T.ok(heap < 32 * 1024, "the Lua heap grew by " .. heap .. " KiB")
  -- an error in on_data ends the request with it, once
  local e = T.err("^http: on_data failed %(GET ", http.get, URL .. "/chunked",
    { on_data = function() error("enough") end })
  T.ok(e:find("enough", 1, true), e)
  T.err("option 'on_data' must be a function", http.get, URL .. "/11",
    { on_data = 1 })
end)

T.test("on_data may cancel its own request or start others", function()
  -- a cancel from inside on_data: the request is dropped once on_data has
  -- returned, the waiter ends once with 'cancelled'
  local calls = 0
  local task
  task = offpath.go(function()
    return http.get(URL .. "/big?n=10000000", { on_data = function()
      calls = calls + 1
      task:cancel()
    end })
  end)
  local ok, e = pcall(task.wait, task)
  T.eq(ok, false); T.ok(tostring(e):find("cancelled"), tostring(e))
  T.eq(calls, 1)
  -- requests started from on_data run (outside any libcurl callback)
  local started = {}
  local r = http.get(URL .. "/chunked", { on_data = function()
    started[#started + 1] = offpath.go(http.get, URL .. "/11")
  end })
  T.eq(r.status, 200)
  T.ok(#started >= 1)
  for _, t in ipairs(started) do T.eq(t:wait().body, "hello\n") end
  -- and it cannot suspend there
  T.err("on_data failed .*cannot suspend", http.get, URL .. "/chunked",
    { on_data = function() offpath.sleep(0.01) end })
  T.eq(http.stats().inflight, 0)
end)

T.test("a request body streams from a file", function()
  local path = TMP .. ".body"
  local f = assert(io.open(path, "wb"))
  local block = {}
  for i = 0, 255 do block[#block + 1] = string.char(i) end
  block = table.concat(block):rep(64) -- 16 KiB, byte sum 64 * 32640
  for _ = 1, 1024 do f:write(block) end -- 16 MiB
  f:close()
  local r = http.post(URL .. "/sum", nil, { body_file = path })
  T.eq(r.status, 200)
  T.eq(r.body, string.format("%d %d", 16 * 1024 * 1024,
    (1024 * 64 * 32640) % (1 << 32)))
  os.remove(path)
  T.err("^http: cannot open '/nonexistent/b'", http.post, URL .. "/sum", nil,
    { body_file = "/nonexistent/b" })
  T.err("exclude each other", http.post, URL .. "/sum", "x",
    { body_file = path })
end)

T.test("the test server stops", function()
  if PID then offpath.exec({ "kill", tostring(PID) }) end
  os.remove(PORTFILE)
end)
