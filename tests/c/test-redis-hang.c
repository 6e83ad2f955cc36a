/* SPDX-License-Identifier: MIT */
/*
** test-redis-hang.c - offpath.redis against a connect that never
** completes (tests/c/hang.h): connect's timeout, a call's timeout on a
** client made in the main chunk (which connects lazily), and a cancel each
** end their waiter exactly once, close the hanging socket, and the loop
** keeps serving other events meanwhile.
*/
#include <string.h>
#include <uv.h>

#include "offpath.h"
#include "hang.h"
#include "test.h"

static const char chunk[] =
    "local offpath = require 'offpath'\n"
    "ticks, calls = 0, 0\n"
    "function ticker()\n"
    "  while not stop do offpath.sleep(0.01); ticks = ticks + 1 end\n"
    "  ticker_done = true\n"
    "end\n"
    "function connect(port)\n"
    "  local t0 = offpath.now()\n"
    "  local ok, err = pcall(offpath.redis.connect, '127.0.0.1:' .. port,\n"
    "    { timeout = 0.5 })\n"
    "  took = offpath.now() - t0\n"
    "  result, calls, done = err, calls + 1, true\n"
    "end\n"
    "function call()\n"
    "  local ok, err = pcall(early.call, early, 'PING')\n"
    "  result, calls, done = err, calls + 1, true\n"
    "end\n"
    "function cancel_start()\n"
    "  task = offpath.go(function()\n"
    "    local ok, err = pcall(early.call_timeout, early, 60, 'PING')\n"
    "    result, calls, done = err, calls + 1, true\n"
    "  end)\n"
    "end\n"
    "function cancel_now() task:cancel() end\n";

int main(void) {
  op_runtime *rt;
  hang_listener h;
  uv_timer_t timer;
  char msg[1024], early[256];
  int base, c0;
  double l0;

  hang_start(&h, &rt, &timer, chunk);
  run_for(rt, 20);
  base = open_fds();

  /* connect suspends until the server answers: here, until its timeout. */
  c0 = c_ticks;
  l0 = global_num(rt, "ticks");
  lua_pushinteger(op_runtime_lua(rt), h.port);
  ASSERT_OK(op_call(rt, "connect", 1));
  run_for(rt, 100);
  ASSERT_EQ(open_fds(), base + 1);
  run_until(rt, "done");
  global_str(rt, "result", msg, sizeof msg);
  ASSERT_STR_HAS(msg, "timeout after 0.5 s in offpath.redis call");
  ASSERT(global_num(rt, "took") >= 0.45 && global_num(rt, "took") < 3.0);
  ASSERT_EQ(global_num(rt, "calls"), 1);
  ASSERT_GE(c_ticks - c0, 20);
  ASSERT_GE(global_num(rt, "ticks") - l0, 20);
  run_for(rt, 20);
  ASSERT_EQ(open_fds(), base); /* the connecting socket was closed */

  /* A client made in a main chunk connects on its first command; the
  ** command's timeout closes the connection that never connected. */
  snprintf(early, sizeof early,
           "early = offpath.redis.connect('127.0.0.1:%d', { timeout = 0.3 })",
           h.port);
  ASSERT_OK(op_load_string(rt, early, "=early.lua"));
  ASSERT_EQ(open_fds(), base); /* nothing made yet */
  clear_global(rt, "done");
  ASSERT_OK(op_call(rt, "call", 0));
  run_until(rt, "done");
  global_str(rt, "result", msg, sizeof msg);
  ASSERT_STR_HAS(msg, "timeout after 0.3 s in offpath.redis call");
  ASSERT_EQ(global_num(rt, "calls"), 2);
  run_for(rt, 20);
  ASSERT_EQ(open_fds(), base);

  /* A cancel while connecting. */
  clear_global(rt, "done");
  ASSERT_OK(op_call(rt, "cancel_start", 0));
  run_for(rt, 200);
  ASSERT(!global_is_set(rt, "done"));
  ASSERT_EQ(open_fds(), base + 1);
  ASSERT_OK(op_call(rt, "cancel_now", 0));
  run_until(rt, "done");
  global_str(rt, "result", msg, sizeof msg);
  ASSERT_STR_HAS(msg, "cancelled");
  run_for(rt, 50);
  ASSERT_EQ(open_fds(), base);
  ASSERT_EQ(global_num(rt, "calls"), 3);

  hang_finish(&h, rt, &timer);
  return 0;
}
