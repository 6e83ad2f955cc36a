/* SPDX-License-Identifier: MIT */
/*
** test-http-hang.c - offpath.http against a connect that never completes
** (tests/c/hang.h): the request's timeout fires, curl's own connect
** timeout fires, a cancel ends it, each exactly once, the socket is closed
** afterwards, and all the while the loop keeps serving other events (a C
** timer of the host and a Lua coroutine ticking on offpath.sleep).
*/
#include <string.h>
#include <uv.h>

#include "offpath.h"
#include "hang.h"
#include "test.h"

static const char chunk[] =
    "local offpath = require 'offpath'\n"
    "local http = offpath.http\n"
    "ticks, calls = 0, 0\n"
    "function ticker()\n"
    "  while not stop do offpath.sleep(0.01); ticks = ticks + 1 end\n"
    "  ticker_done = true\n"
    "end\n"
    "local function url(port) return 'http://127.0.0.1:' .. port .. '/' end\n"
    "function refused()\n"
    "  local ok, err = pcall(http.get, 'http://127.0.0.1:1/')\n"
    "  result, calls, done = err, calls + 1, true\n"
    "end\n"
    "function with_timeout(port)\n"
    "  local t0 = offpath.now()\n"
    "  local ok, err = pcall(http.get, url(port), { timeout = 0.5 })\n"
    "  took = offpath.now() - t0\n"
    "  result, calls, done = err, calls + 1, true\n"
    "end\n"
    "function with_connect_timeout(port)\n"
    "  local ok, err = pcall(http.request, { url = url(port),\n"
    "    connect_timeout = 0.3 })\n"
    "  result, calls, done = err, calls + 1, true\n"
    "end\n"
    "function cancel_start(port)\n"
    "  task = offpath.go(function()\n"
    "    local ok, err = pcall(http.get, url(port))\n"
    "    result, calls, done = err, calls + 1, true\n"
    "  end)\n"
    "end\n"
    "function cancel_now() task:cancel() end\n";

static void call_port(op_runtime *rt, const char *fn, int port) {
  lua_pushinteger(op_runtime_lua(rt), port);
  ASSERT_OK(op_call(rt, fn, 1));
}

int main(void) {
  op_runtime *rt;
  hang_listener h;
  uv_timer_t timer;
  char msg[1024];
  int base, c0;
  double l0;

  hang_start(&h, &rt, &timer, chunk);

  /* A refused connect first: it makes curl's multi handle (and its own
  ** descriptors), so the count below is of the transfers alone. */
  ASSERT_OK(op_call(rt, "refused", 0));
  run_until(rt, "done");
  global_str(rt, "result", msg, sizeof msg);
  ASSERT_STR_HAS(msg, "http: connection refused");
  run_for(rt, 20);
  base = open_fds();

  /* The request's own timeout (the wait's timer). */
  clear_global(rt, "done");
  c0 = c_ticks;
  l0 = global_num(rt, "ticks");
  call_port(rt, "with_timeout", h.port);
  run_for(rt, 100);
  ASSERT_EQ(open_fds(), base + 1); /* the hanging connect's socket */
  run_until(rt, "done");
  global_str(rt, "result", msg, sizeof msg);
  ASSERT_STR_HAS(msg, "timeout after 0.5 s in offpath.http.request");
  ASSERT(global_num(rt, "took") >= 0.45 && global_num(rt, "took") < 3.0);
  ASSERT_EQ(global_num(rt, "calls"), 2);
  /* Other events were served meanwhile: about 50 of each. */
  ASSERT_GE(c_ticks - c0, 20);
  ASSERT_GE(global_num(rt, "ticks") - l0, 20);
  run_for(rt, 20);
  ASSERT_EQ(open_fds(), base); /* the transfer was removed */

  /* curl's connect timeout. */
  clear_global(rt, "done");
  call_port(rt, "with_connect_timeout", h.port);
  run_until(rt, "done");
  global_str(rt, "result", msg, sizeof msg);
  ASSERT_STR_HAS(msg, "timeout: http GET http://127.0.0.1:");
  ASSERT_EQ(global_num(rt, "calls"), 3);
  run_for(rt, 20);
  ASSERT_EQ(open_fds(), base);

  /* A cancel while connecting. */
  clear_global(rt, "done");
  call_port(rt, "cancel_start", h.port);
  run_for(rt, 200);
  ASSERT(!global_is_set(rt, "done"));
  ASSERT_EQ(open_fds(), base + 1);
  ASSERT_OK(op_call(rt, "cancel_now", 0));
  run_until(rt, "done");
  global_str(rt, "result", msg, sizeof msg);
  ASSERT_STR_HAS(msg, "cancelled");
  ASSERT_EQ(global_num(rt, "calls"), 4);
  run_for(rt, 50);
  ASSERT_EQ(open_fds(), base);
  ASSERT_EQ(global_num(rt, "calls"), 4); /* nothing came twice */

  /* Stop the ticker, then everything closes to zero. */
  hang_finish(&h, rt, &timer);
  return 0;
}
