-- SPDX-License-Identifier: MIT
-- momentum.lua - the Momentum interface: msys.runInPool in its four forms
-- (the page's examples as printed), msys in the pool closures, stable pool
-- ids, refusals at the caller's line, _TLS and _OSTLS,
-- msys.threadpool.stat/count/find.
-- LABELS: compat tsan
local tap = require "_tap"
local offpath = require "offpath"
local momentum = require "offpath.momentum"

offpath.configure { pools = { ONE = { threads = 1 }, SAT = { threads = 1 } } }

-- Wait (suspending) until cond() holds, at most 5 s.
local function await(cond, what)
  local t0 = offpath.now()
  while not cond() do
    if offpath.now() - t0 > 5 then error("timed out waiting for " .. what, 2) end
    offpath.sleep(0.005)
  end
end

local function errors() return offpath.stats().errors end

tap.test("globals", function()
  tap.eq(type(msys.runInPool), "function")
  tap.eq(msys.runInPool, momentum.runInPool)
  tap.eq(type(msys.core.ECTP_COMPLETE_CALLBACK_SCHED), "number")
  tap.ok(msys.core.ECTP_COMPLETE_CALLBACK ~= msys.core.ECTP_COMPLETE_CALLBACK_SCHED)
  tap.eq(type(msys.core.VALIDATE_CONT), "number")
  tap.eq(type(msys.core.VALIDATE_DONE), "number")
  tap.ok(msys.core.VALIDATE_CONT ~= msys.core.VALIDATE_DONE)
  tap.eq(type(_TLS), "table"); tap.eq(type(_OSTLS), "table")
end)

tap.test("integer pool ids work from the start, stable", function()
  -- No find() first: the pools are numbered in name order when the script
  -- first uses msys ("CPU", "IO", then this file's ONE and SAT, then cpu, io).
  local ok, pool = msys.runInPool(2, function() return offpath.worker().pool end)
  tap.eq(ok, true); tap.eq(pool, "IO")
  tap.eq(msys.threadpool.find(1), "CPU"); tap.eq(msys.threadpool.find("CPU"), 1)
  tap.eq(msys.threadpool.find("ONE"), 3); tap.eq(msys.threadpool.find("SAT"), 4)
  tap.eq(msys.threadpool.find("cpu"), 5); tap.eq(msys.threadpool.find("io"), 6)
  tap.eq(select(2, msys.runInPool(3, function() return offpath.worker().pool end)),
    "ONE")
  tap.eq(msys.threadpool.stat(2).name, "IO"); tap.eq(msys.threadpool.stat(2).id, 2)
  -- a pool made later gets the next id
  offpath.configure { pools = { Later = { threads = 1 } } }
  tap.eq(msys.threadpool.find("Later"), 7)
  tap.eq(select(2, msys.runInPool(7, function() return offpath.worker().pool end)),
    "Later")
end)

tap.test("msys is a global in the pool closures and completions", function()
  -- As on Momentum, without a require; on a pool not used before too.
  local ok, cont, kind = msys.runInPool("Fresh", function()
    msys.sleep(0.01)
    return msys.core.VALIDATE_CONT, type(msys.runInPool)
  end)
  tap.eq(ok, true); tap.eq(cont, msys.core.VALIDATE_CONT); tap.eq(kind, "function")
  local err = select(2, msys.runInPool("Fresh", function()
    return select(2, pcall(msys.runInPool, "IO", function() end))
  end))
  tap.ok(err:find("runs on the main thread only"), err)
  SEEN = nil
  msys.runInPool("CPU", function() end, function()
    local sched = msys.core.ECTP_COMPLETE_CALLBACK_SCHED
    offpath.block(function(v) SEEN = v end, sched)
  end)
  await(function() return SEEN ~= nil end, "the completion")
  tap.eq(SEEN, msys.core.ECTP_COMPLETE_CALLBACK_SCHED)
end)

tap.test("the suspending form returns like pcall", function()
  local ok, a, b, c = msys.runInPool("IO", function()
    return offpath.worker().pool, 2, nil
  end)
  tap.eq(ok, true); tap.eq(a, "IO"); tap.eq(b, 2); tap.eq(c, nil)
  tap.eq(select("#", msys.runInPool("IO", function() return 1, nil, nil end)), 4)
  -- the pool was made on first use, sized like offpath's own "io"
  local st = msys.threadpool.stat("IO")
  tap.eq(st.num_threads, offpath.stats().pools.io.threads)
  -- "CPU" likewise, like "cpu"; names offpath does not have get 1 thread
  tap.eq(select(2, msys.runInPool("CPU", function() return offpath.worker().pool end)),
    "CPU")
  tap.eq(msys.threadpool.stat("CPU").num_threads, offpath.stats().pools.cpu.threads)
  tap.eq(select(2, msys.runInPool("Lookups", function() return 7 end)), 7)
  tap.eq(msys.threadpool.stat("Lookups").num_threads, 1)
end)

tap.test("an error gives status false and the message; the caller goes on",
  function()
  local ok, err = msys.runInPool("IO", function() error("boom") end)
  tap.eq(ok, false)
  tap.ok(tostring(err):find("momentum.lua:%d+: boom"), err)
  local ok2, err2 = msys.runInPool("IO", function() error({ code = 1 }) end)
  tap.eq(ok2, false); tap.ok(err2 ~= nil)
  -- a value that cannot cross is refused the same way
  local co = coroutine.create(function() end)
  local ok3, err3 = msys.runInPool("IO", function() return co end)
  tap.eq(ok3, false); tap.ok(err3:find("cannot copy thread"), err3)
  -- and the handler still works
  tap.eq(select(2, msys.runInPool("IO", function() return "alive" end)), "alive")
end)

tap.test("arguments are checked; misuse raises", function()
  tap.err("thread pool name or id expected", msys.runInPool, {}, function() end)
  tap.err("function expected", msys.runInPool, "IO", "not a function")
  tap.err("boolean or completion function expected", msys.runInPool, "IO",
    function() end, 42)
  tap.err("no thread pool with id 999", msys.runInPool, 999, function() end)
  local id = msys.threadpool.find("IO")
  tap.eq(msys.threadpool.find(id), "IO")
  tap.eq(select(2, msys.runInPool(id, function() return offpath.worker().pool end)),
    "IO")
  tap.err("cannot suspend here", coroutine.wrap(function()
    return msys.runInPool("IO", function() end)
  end))
end)

tap.test("_TLS crosses into the closure and back", function()
  _TLS.user = "alice"
  _TLS.hits = 1
  tap.eq(offpath.context.user, "alice", "_TLS is the session's context")
  local ok, seen = msys.runInPool("IO", function()
    _TLS.hits = _TLS.hits + 1
    _TLS.from_worker = true
    return _TLS.user
  end)
  tap.eq(ok, true); tap.eq(seen, "alice")
  tap.eq(_TLS.hits, 2); tap.eq(_TLS.from_worker, true)
  -- another session has its own
  local other = offpath.go(function() return _TLS.user end)
  tap.eq(other:wait(), "alice", "offpath.go shares the session")
  local n = 0
  for _ in pairs(_TLS) do n = n + 1 end
  tap.eq(n, 3)
  tap.err("_TLS: no session here", coroutine.wrap(function() _TLS.x = 1 end))
end)

tap.test("_OSTLS lives as long as the worker thread", function()
  msys.runInPool("ONE", function() _OSTLS.conn = "opened once" end)
  local _, v = msys.runInPool("ONE", function() return _OSTLS.conn end)
  tap.eq(v, "opened once")
  tap.eq(_OSTLS.conn, nil, "the scheduler thread has its own")
end)

tap.test("fire-and-forget: no results, the closure copied at the call",
  function()
  FF = nil
  local box = { v = "before" }
  local r = table.pack(msys.runInPool("IO", function()
    offpath.block(function(v) FF = { seen = v } end, box.v)
  end, true))
  tap.eq(r.n, 0, "no results")
  box.v = "after"  -- a side effect after the call: the copy does not see it
  await(function() return FF ~= nil end, "the closure")
  tap.eq(FF.seen, "before")
  -- the page's example, as printed: the closure prints, nothing returns
  _OSTLS.async_t_marker = 42
  msys.runInPool('CPU', function ()
    offpath.block(function(m) FF = { marker = m } end, _OSTLS.async_t_marker)
  end, true)
  await(function() return FF.marker ~= nil or FF.seen == nil end, "the closure")
  tap.eq(FF.marker, nil, "a pool thread has its own _OSTLS")
end)

tap.test("asynchronous forms: what cannot cross is refused at the caller's line",
  function()
  local fh = assert(io.tmpfile())
  local before = errors()
  local line
  local e = tap.err("cannot copy userdata", function()
    line = debug.getinfo(1, "l").currentline + 1
    msys.runInPool("IO", function() return fh end, true)
  end)
  tap.ok(e:find("momentum.lua:" .. line .. ": cannot copy userdata (upvalue "
    .. "'fh' of the closure) (in msys.runInPool)", 1, true), e)
  e = tap.err("cannot copy userdata", function()
    line = debug.getinfo(1, "l").currentline + 1
    msys.runInPool("IO", function() end, function() return fh end)
  end)
  tap.ok(e:find("momentum.lua:" .. line .. ": cannot copy userdata (upvalue "
    .. "'fh' of the completion) (in msys.runInPool)", 1, true), e)
  _TLS.handle = fh
  e = tap.err("cannot copy userdata", function()
    line = debug.getinfo(1, "l").currentline + 1
    msys.runInPool("IO", function() end, true)
  end)
  tap.ok(e:find("momentum.lua:" .. line .. ": cannot copy userdata (_TLS "
    .. "field 'handle') (in msys.runInPool)", 1, true), e)
  _TLS.handle = nil
  offpath.sleep(0.05)
  tap.eq(errors(), before, "nothing reported later on stderr")
  fh:close()
end)

tap.test("completion on the pool thread", function()
  DONE = nil
  msys.runInPool("ONE", function()
    _OSTLS.mark = "same thread"
    return offpath.worker().id, 42
  end, function(ok, id, v)
    local me = offpath.worker()
    offpath.block(function(...) DONE = table.pack(...) end,
      ok, id, v, me.pool, me.id, _OSTLS.mark)
  end)
  tap.eq(DONE, nil, "asynchronous: nothing ran yet")
  await(function() return DONE ~= nil end, "the completion")
  tap.eq(DONE[1], true); tap.eq(DONE[3], 42)
  tap.eq(DONE[4], "ONE"); tap.eq(DONE[5], DONE[2], "same worker")
  tap.eq(DONE[6], "same thread")
  -- the completion gets (false, err) when the closure fails
  DONE = nil
  msys.runInPool("ONE", function() error("closure failed") end,
    function(ok, err)
      offpath.block(function(a, b) DONE = { a, b } end, ok, err)
    end)
  await(function() return DONE ~= nil end, "the completion")
  tap.eq(DONE[1], false); tap.ok(DONE[2]:find("closure failed"), DONE[2])
end)

tap.test("ECTP_COMPLETE_CALLBACK_SCHED: the page's example as printed",
  function()
  local printed = {}
  local print = function(...) printed[#printed + 1] = table.concat({ ... }, " ") end
  local status, res = msys.runInPool("IO",
    function()
      -- do some IO intensive work here, such as interrogate the message contents
      return "done"; -- passed back to the 'res' variable
    end,
    function()
      -- Completion function
      print("Done!");
    end,
    msys.core.ECTP_COMPLETE_CALLBACK_SCHED -- Complete in the scheduler
  );
  tap.eq(status, true); tap.eq(res, "done")
  tap.eq(printed[1], "Done!", "the completion ran before the call returned")
end)

tap.test("ECTP_COMPLETE_CALLBACK_SCHED: the completion on the scheduler thread",
  function()
  local got
  _TLS.session = "s1"
  local ok, pool, r = msys.runInPool("IO",
    function() return offpath.worker().pool, "r" end,
    function(ok, pool, r)
      got = { ok = ok, pool = pool, r = r, worker = offpath.worker,
        session = _TLS.session, can_suspend = offpath.can_suspend(),
        ostls = _OSTLS }
    end, msys.core.ECTP_COMPLETE_CALLBACK_SCHED)
  tap.eq(ok, true); tap.eq(pool, "IO"); tap.eq(r, "r")
  tap.eq(got.ok, true); tap.eq(got.pool, "IO"); tap.eq(got.r, "r")
  tap.eq(got.worker, nil, "not in a worker VM")
  tap.eq(got.ostls, _OSTLS, "the scheduler thread's _OSTLS")
  tap.eq(got.session, "s1", "the session's _TLS")
  tap.eq(got.can_suspend, true)
  -- a failing closure: status false, the completion told the same
  got = nil
  local ok2, err = msys.runInPool("IO", function() error("bad") end,
    function(ok, err) got = { ok = ok, err = err } end,
    msys.core.ECTP_COMPLETE_CALLBACK_SCHED)
  tap.eq(ok2, false); tap.ok(err:find("bad"), err)
  tap.eq(got.ok, false); tap.ok(got.err:find("bad"), got.err)
  -- where nothing may suspend it raises, as the suspending form does
  tap.err("cannot suspend here", coroutine.wrap(function()
    return msys.runInPool("IO", function() end, function() end,
      msys.core.ECTP_COMPLETE_CALLBACK_SCHED)
  end))
end)

tap.test("asynchronous failures nobody sees are reported", function()
  local before = errors()
  msys.runInPool("IO", function() error("lost") end, true)
  await(function() return errors() == before + 1 end, "the report")
  msys.runInPool("IO", function() end, function() error("completion failed") end)
  await(function() return errors() == before + 2 end, "the report")
  local ok, v = msys.runInPool("IO", function() return "v" end,
    function() error("sched failed") end, msys.core.ECTP_COMPLETE_CALLBACK_SCHED)
  tap.eq(ok, true); tap.eq(v, "v", "a failing completion leaves the results")
  await(function() return errors() == before + 3 end, "the report")
  offpath.sleep(0.02)
  tap.eq(errors(), before + 3, "each once")
end)

tap.test("threadpool.stat reports invocations, queue, saturation, threads",
  function()
  local st = msys.threadpool.stat("SAT")
  tap.eq(st.name, "SAT"); tap.eq(st.num_threads, 1)
  tap.eq(st.invocations, 0); tap.eq(st.saturation, 0)
  tap.eq(st.num_active_threads, 0); tap.eq(st.num_inactive_threads, 1)
  local spin = function()
    local t = offpath.now()
    while offpath.now() - t < 0.2 do end
  end
  msys.runInPool("SAT", spin, true)
  msys.runInPool("SAT", spin, true)
  offpath.sleep(0.05)  -- both submitted; the first is running
  st = msys.threadpool.stat("SAT")
  tap.eq(st.invocations, 2)
  tap.eq(st.job_num_running, 1); tap.eq(st.num_active_threads, 1)
  tap.eq(st.queue_sz, 1); tap.eq(st.job_num_queued, 1)
  tap.eq(st.saturation, 1.0)
  tap.ok(tostring(st):find("threadpool SAT: 1 threads %(1 active%), 1 queued"),
    tostring(st))
  await(function() return msys.threadpool.stat("SAT").completed == 2 end,
    "the pool to drain")
  st = msys.threadpool.stat("SAT")
  tap.eq(st.queue_sz, 0); tap.eq(st.saturation, 0)
  tap.ok(st.p99 >= 0.2, "latency is submit to completion")
  tap.eq(msys.threadpool.stat("no such pool"), nil)
  tap.eq(msys.threadpool.stat()["SAT"].invocations, 2)
  local n = 0
  for _ in pairs(offpath.stats().pools) do n = n + 1 end
  tap.eq(msys.threadpool.count(), n)
  tap.eq(msys.threadpool.find("no such pool"), nil)
end)

tap.test("msys functions are refused in worker VMs", function()
  local err = offpath.run("io", function()
    require "offpath.momentum"
    return select(2, pcall(msys.runInPool, "IO", function() end))
  end)
  tap.ok(err:find("runs on the main thread only"), err)
end)
