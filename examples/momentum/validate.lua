-- SPDX-License-Identifier: MIT
-- validate.lua - a Momentum policy scriptlet as Momentum users write it:
-- a module of validation callbacks given to msys.registerModule, with the
-- msys.runInPool examples of its page, run as it is by the offpath host.
--
--   offpath run --compat momentum examples/momentum/validate.lua \
--     --format json --input messages.jsonl
--
-- --compat momentum loads the Momentum layer (msys, _TLS, _OSTLS) before
-- the script, then validates each input record as one message: every
-- registered module's init() at start, then per message validate_connect,
-- validate_ehlo, validate_mailfrom, validate_rcptto (per recipient),
-- validate_data, validate_data_spool, validate_data_spool_each_rcpt and
-- validate_dealloc, and the verdict as a record {mailfrom=, code=, text=}.
-- A JSON record gives mailfrom, rcptto (a string or a list), headers,
-- body, ehlo and remote_addr; a line is the envelope sender.
--
-- BLOCKLIST names a file of blocked sender domains, one per line (default:
-- examples/momentum/blocklist.txt).

local BLOCKLIST = os.getenv("BLOCKLIST") or "examples/momentum/blocklist.txt"

-- we want to validate that we ran on a different OS thread, so
-- set a marker we can use in our output
_OSTLS.async_t_marker = 42;

local function test(phase)
  print("SCHED", phase, _OSTLS.async_t_marker)
end

local mod = {};

-- Reading the list would stall the scheduler thread: it runs in the IO
-- pool, once per pool thread (kept in that thread's _OSTLS).
local function is_blocked(domain)
  if _OSTLS.blocklist == nil then
    local list = {}
    for line in io.lines(BLOCKLIST) do list[line:lower()] = true end
    _OSTLS.blocklist = list
  end
  return _OSTLS.blocklist[domain:lower()] == true
end

function mod:validate_mailfrom(str, accept, vctx)
  local domain = str:match("@([^@]+)$") or ""
  local ok, blocked = msys.runInPool("IO", function()
    return is_blocked(domain)
  end)
  if not ok then
    vctx:set_code(451, "temporary failure: cannot read the blocklist")
    return msys.core.VALIDATE_DONE
  end
  if blocked then
    vctx:set_code(550, "sender domain " .. domain .. " is blocked")
    return msys.core.VALIDATE_DONE
  end
  self.domain = domain -- "self": session-local, seen by the later phases
  return msys.core.VALIDATE_CONT
end

function mod:validate_data(msg, ac, vctx)
 msys.runInPool('CPU', function ()
 print("CPU", "in cpu", _OSTLS.async_t_marker);
 end, true);
 test('validate_data');
 return msys.core.VALIDATE_CONT;
end

function mod:validate_data_spool(msg, ac, vctx)
  msys.runInPool('CPU',
    function ()
      print("CB", "cb data spool", _OSTLS.async_t_marker);
    end,
    function ()
      print("CB", "cb completing", _OSTLS.async_t_marker);
    end
  )
  status, res = msys.runInPool("IO",
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
  print("SCHED", "status", status, "res", res, "from", self.domain)
  local subject = msg:header("Subject")[1]
  if subject ~= nil and subject:find("%$%$%$") then
    vctx:set_code(554, "message content rejected")
  end
  return msys.core.VALIDATE_CONT;
end

msys.registerModule("async_demo", mod);
