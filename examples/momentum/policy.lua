-- SPDX-License-Identifier: MIT
-- policy.lua - a Momentum-style policy script run by the offpath host: a
-- blocking lookup moved off the scheduler thread with msys.runInPool, a
-- per-thread cache in _OSTLS, session state in _TLS, a fire-and-forget
-- audit write, and a completion on the scheduler thread.
--
--   offpath run examples/momentum/policy.lua --input senders.txt
--
-- Each input record is a sender address (in Momentum: a validation phase
-- of a message). BLOCKLIST names a file of blocked domains, one per line
-- (default: examples/momentum/blocklist.txt); AUDIT, if set, a file that
-- gets one line per verdict.
require "offpath.momentum"

local BLOCKLIST = os.getenv("BLOCKLIST") or "examples/momentum/blocklist.txt"
local AUDIT = os.getenv("AUDIT")

-- Runs in the IO pool: reading a file would stall the scheduler thread.
-- Each pool thread reads the list once and keeps it in its _OSTLS.
local function is_blocked(domain)
  if _OSTLS.blocklist == nil then
    local list = {}
    for line in io.lines(BLOCKLIST) do list[line:lower()] = true end
    _OSTLS.blocklist = list
  end
  return _OSTLS.blocklist[domain:lower()] == true
end

function on_event(engine, sender)
  _TLS.sender = sender
  _TLS.domain = sender:match("@([^@]+)$") or ""

  -- Suspends this session only; results come back like pcall's.
  local ok, blocked = msys.runInPool("IO", function()
    return is_blocked(_TLS.domain)
  end)
  if not ok then
    engine:emit("tempfail " .. sender .. " (" .. blocked:match("[^\n]*") .. ")")
    return
  end
  local verdict = blocked and "reject" or "accept"

  if AUDIT then
    -- Fire-and-forget: copied now, runs on its own; no results.
    msys.runInPool("IO", function()
      local f = assert(io.open(AUDIT, "a"))
      f:write(verdict, " ", sender, "\n")
      f:close()
    end, true)
  end

  -- Count rejections per domain on the scheduler thread, after a (here
  -- trivial) piece of work in the CPU pool.
  msys.runInPool("CPU", function() return _TLS.domain end,
    function(done, domain)
      if done and verdict == "reject" then engine:count("rejected " .. domain) end
    end, msys.core.ECTP_COMPLETE_CALLBACK_SCHED)

  engine:emit(verdict .. " " .. sender)
end

function on_stop(engine)
  local s = msys.threadpool.stat("IO")
  print(("IO pool: %d invocations, %d threads"):format(s.invocations,
    s.num_threads))
end
