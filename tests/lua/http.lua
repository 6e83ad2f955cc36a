-- SPDX-License-Identifier: MIT
-- http.lua - offpath.http against a real nginx (tests/fixtures/nginx.sh):
-- methods, headers, bodies, statuses, every error kind, timeouts, size
-- limits, redirects, HTTPS, concurrency and connection reuse.
-- LABELS: nginx
local T = require "_tap"
local offpath = require "offpath"
local http = offpath.http

-- The fixture's address and files.
local env = {}
do
  local dir = assert(os.getenv("OFFPATH_FIXTURES"), "OFFPATH_FIXTURES unset")
  for line in io.lines(dir .. "/nginx.env") do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then env[k] = v:gsub("^'(.*)'$", "%1") end
  end
end
local URL, TLS, CA = env.NGINX_URL, env.NGINX_TLS_URL, env.NGINX_CA
local BIG = tonumber(env.NGINX_BIG_SIZE)

-- The main chunk cannot suspend: refused with a clear message.
local main_ok, main_err = pcall(http.get, URL .. "/")

-- Call fn(...) and return its error, checking it raised exactly once.
local function fails(fn, ...)
  local ok, err = pcall(fn, ...)
  T.eq(ok, false, "expected an error")
  return tostring(err)
end

T.test("the main chunk cannot wait on a request", function()
  T.eq(main_ok, false)
  T.ok(main_err:find("cannot suspend: offpath.http.request called outside "
    .. "a handler", 1, true), main_err)
end)

T.test("GET returns status, lower-case headers and body", function()
  local r = http.get(URL .. "/")
  T.eq(r.status, 200); T.eq(math.type(r.status), "integer")
  T.eq(r.body, "hello\n")
  T.eq(r.headers["content-length"], "6")
  T.ok(r.headers["server"]:find("^nginx"), r.headers["server"])
  T.eq(r.headers["Content-Length"], nil)
  T.eq(r.url, URL .. "/")
  -- the same through request{}
  local r2 = http.request { url = URL .. "/", method = "GET" }
  T.eq(r2.status, 200); T.eq(r2.body, "hello\n")
  -- HEAD has headers and no body
  local h = http.request { url = URL .. "/big.bin", method = "head" }
  T.eq(h.status, 200); T.eq(h.body, "")
  T.eq(h.headers["content-length"], tostring(BIG))
end)

T.test("POST and PUT send bodies and headers", function()
  local r = http.post(URL .. "/echo", "a=1&b=2", { headers = {
    ["X-Test"] = "yes", ["Content-Type"] = "text/plain" } })
  T.eq(r.status, 200)
  T.eq(r.body, "POST 7 yes text/plain\n")
  -- headers may also be given as "Name: value" lines
  r = http.request { url = URL .. "/echo", method = "POST", body = "xyz",
    headers = { "X-Test: lines" } }
  T.eq(r.body, "POST 3 lines application/x-www-form-urlencoded\n")
  -- an empty POST still says Content-Length: 0
  T.eq(http.post(URL .. "/echo").body,
    "POST 0  application/x-www-form-urlencoded\n")
  -- PUT stores the exact bytes (all 256 of them), GET reads them back
  local bytes = {}
  for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
  local blob = table.concat(bytes):rep(300)
  local p = http.put(URL .. "/dav/blob.bin", blob)
  T.ok(p.status == 201 or p.status == 204, "PUT status " .. p.status)
  local g = http.get(URL .. "/dav/blob.bin")
  T.eq(g.status, 200); T.eq(#g.body, #blob); T.ok(g.body == blob)
  -- other methods through request{}
  local d = http.request { url = URL .. "/dav/blob.bin", method = "DELETE" }
  T.eq(d.status, 204)
  T.eq(http.get(URL .. "/dav/blob.bin").status, 404)
end)

T.test("an HTTP error status is returned, not raised", function()
  local r = http.get(URL .. "/no/such/page")
  T.eq(r.status, 404); T.ok(r.body:find("404"), r.body)
  local t = http.get(URL .. "/teapot")
  T.eq(t.status, 418); T.eq(t.body, "short and stout\n")
end)

T.test("repeated response headers are joined, values trimmed", function()
  local r = http.get(URL .. "/headers")
  T.eq(r.headers["x-multi"], "one, two")
  T.eq(r.headers["x-single"], "padded")
end)

T.test("redirects are not followed unless asked", function()
  local r = http.get(URL .. "/redirect")
  T.eq(r.status, 302)
  T.eq(r.headers.location, URL .. "/")
  local f = http.get(URL .. "/redirect", { follow = true })
  T.eq(f.status, 200); T.eq(f.body, "hello\n"); T.eq(f.url, URL .. "/")
  -- only the final response's headers are returned
  T.eq(f.headers.location, nil)
  local e = fails(http.get, URL .. "/loop", { follow = true,
    max_redirects = 3 })
  T.ok(e:find("^http: too many redirects %(GET " .. URL:gsub("%p", "%%%0")
    .. "/loop%)"), e)
end)

T.test("connection refused says so, once", function()
  local e = fails(http.get, "http://127.0.0.1:1/x")
  T.ok(e:find("^http: connection refused %(GET http://127.0.0.1:1/x%)"), e)
end)

T.test("a name that cannot resolve fails fast with a resolution error", function()
  local t0 = offpath.now()
  local e = fails(http.get, "http://offpath-test.invalid/", { timeout = 20 })
  T.ok(e:find("^http: cannot resolve host %(GET "), e)
  T.ok(e:find("offpath-test.invalid", 1, true), e)
  T.ok(offpath.now() - t0 < 10, "resolution took too long")
end)

T.test("bad requests are refused with the option named", function()
  T.err("http: option 'url' is required", http.request, {})
  T.err("http: option 'timeout' must be a number", http.request,
    { url = URL, timeout = "soon" })
  T.err("http: option 'headers' must be a table", http.request,
    { url = URL, headers = "X: y" })
  T.err("http: invalid header", http.get, URL .. "/", { headers = {
    ["X-Bad"] = "a\r\nInjected: 1" } })
  T.err("http: invalid method", http.request, { url = URL, method = "G T" })
  T.err("bad argument #2 to .*string expected, got table", http.put, URL, {})
  local e = fails(http.get, "ftp://127.0.0.1/")
  T.ok(e:find("^http: unsupported protocol"), e)
  e = fails(http.get, "http://[::1")
  T.ok(e:find("^http: malformed URL"), e)
end)

T.test("a timeout raises 'timeout' and the main thread keeps serving", function()
  local ticks = 0
  local ticker = offpath.go(function()
    for _ = 1, 1000 do
      offpath.sleep(0.01)
      ticks = ticks + 1
      if ticks >= 20 then return end
    end
  end)
  local t0 = offpath.now()
  local e = fails(http.get, URL .. "/slow/big.bin", { timeout = 0.3 })
  local took = offpath.now() - t0
  T.ok(e:find("^timeout"), e)
  T.ok(took >= 0.25 and took < 3, "took " .. took)
  T.ok(ticks >= 10, "only " .. ticks .. " ticks while the request waited")
  ticker:wait()
  -- the server is still fine, and the next request is not disturbed
  T.eq(http.get(URL .. "/").body, "hello\n")
end)

T.test("a cancelled request ends its waiter once with 'cancelled'", function()
  local done = T.expect(nil, 1, "cancelled request")
  local task = offpath.go(function()
    local ok, err = pcall(http.get, URL .. "/slow/big.bin")
    done()
    return ok, err
  end)
  offpath.sleep(0.05)
  task:cancel()
  local ok, r1, r2 = pcall(task.wait, task)
  -- either the task's own pcall saw the cancel, or the wait reports it
  local text = tostring(ok and r2 or r1)
  T.ok(text:find("cancelled"), text)
  T.eq(http.get(URL .. "/").status, 200)
end)

T.test("the response size limit holds with and without Content-Length", function()
  local r = http.get(URL .. "/big.bin")
  T.eq(#r.body, BIG)
  local e = fails(http.get, URL .. "/big.bin", { max_size = 1000 })
  T.ok(e:find("^http: response larger than 1000 bytes %(GET "), e)
  -- gzip: chunked, no length known up front; caught while reading
  local z = fails(http.get, URL .. "/big.bin", { max_size = 4096,
    headers = { ["Accept-Encoding"] = "gzip" } })
  T.ok(z:find("^http: response larger than 4096 bytes"), z)
  local ok = http.get(URL .. "/", { max_size = 6 })
  T.eq(ok.body, "hello\n")
end)

T.test("HTTPS verifies the server against the given CA", function()
  local r = http.get(TLS .. "/", { cainfo = CA })
  T.eq(r.status, 200); T.eq(r.body, "hello\n")
  local e = fails(http.get, TLS .. "/")
  T.ok(e:find("^http: tls certificate verification failed %(GET https://"),
    e)
  local i = http.get(TLS .. "/", { insecure = true })
  T.eq(i.body, "hello\n")
  e = fails(http.get, TLS .. "/", { cainfo = "/nonexistent/ca.pem" })
  T.ok(e:find("^http: tls error"), e)
  -- a TLS client on a plain port: the handshake fails
  e = fails(http.get, "https://127.0.0.1:" .. env.NGINX_PORT .. "/",
    { insecure = true })
  T.ok(e:find("^http: tls handshake failed"), e)
end)

T.test("64 concurrent requests each complete exactly once", function()
  local got = {}
  local cb = T.expect(function(i, r)
    got[i] = (got[i] or 0) + 1
    T.eq(r.status, 200)
  end, 64, "concurrent completions")
  local tasks = {}
  for i = 1, 64 do
    tasks[i] = offpath.go(function()
      local r = http.get(URL .. "/conn")
      cb(i, r)
      return r.body
    end)
  end
  local res = offpath.all(tasks)
  local conns = {}
  for i = 1, 64 do
    T.eq(res[i][1], true, tostring(res[i][2]))
    T.eq(got[i], 1)
    conns[res[i][2]:match("^(%d+)")] = true
  end
  local n = 0
  for _ in pairs(conns) do n = n + 1 end
  T.ok(n >= 1 and n <= 64, n .. " connections")
end)

T.test("sequential requests reuse one keep-alive connection", function()
  local first = http.get(URL .. "/conn").body
  local serial = first:match("^(%d+)")
  local last = tonumber(first:match(" (%d+)$"))
  for _ = 1, 5 do
    local b = http.get(URL .. "/conn").body
    T.eq(b:match("^(%d+)"), serial, "a new connection was made")
    local n = tonumber(b:match(" (%d+)$"))
    T.eq(n, last + 1)
    last = n
  end
  -- HTTPS connections are reused too
  local s1 = http.get(TLS .. "/conn", { cainfo = CA }).body:match("^(%d+)")
  local s2 = http.get(TLS .. "/conn", { cainfo = CA }).body:match("^(%d+)")
  T.eq(s1, s2)
end)

T.test("HTTP/2: requests to one host share a multiplexed connection", function()
  local H2 = env.NGINX_H2_URL
  local st0 = offpath.stats().http
  local tasks = {}
  for i = 1, 20 do
    tasks[i] = offpath.go(http.get, H2 .. "/conn", { cainfo = CA })
  end
  local serials = {}
  for i = 1, 20 do
    local r = tasks[i]:wait()
    T.eq(r.status, 200)
    serials[r.body:match("^(%d+)")] = true
  end
  local n = 0
  for _ in pairs(serials) do n = n + 1 end
  T.eq(n, 1, "connections used")
  local st = offpath.stats().http
  T.eq(st.http2 - st0.http2, 20)
  T.ok(st.reused - st0.reused >= 19, "reused " .. (st.reused - st0.reused))
  -- the plain-HTTP/1.1 port still speaks HTTP/1.1
  http.get(URL .. "/")
  T.eq(offpath.stats().http.http2, st.http2)
end)

T.test("stats().http counts requests, failures and open connections", function()
  local st0 = offpath.stats().http
  http.get(URL .. "/")
  pcall(http.get, "http://127.0.0.1:1/")
  local st = offpath.stats().http
  T.eq(st.requests - st0.requests, 2)
  T.eq(st.completed - st0.completed, 2)
  T.eq(st.failed - st0.failed, 1)
  T.eq(st.inflight, 0)
  T.ok(st.connections >= 1, "no connection kept open")
  T.eq(math.type(st.connections), "integer")
  T.eq(st.max_host_connections, 8)
end)
