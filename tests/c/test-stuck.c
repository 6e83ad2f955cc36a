/* SPDX-License-Identifier: MIT */
/*
** test-stuck.c - a worker whose task never reaches the stop hook (a
** finalizer that loops for a while: Lua runs finalizers with hooks off)
** is declared stuck after the grace time, reported, counted and replaced;
** when its thread finally comes back, before or after the runtime is
** freed, it touches nothing of its task or runtime, frees its own VM and
** hands the pool (and the prototype store) to no one else.
** LABELS: tsan
*/
#include <string.h>
#include <uv.h>

#include "offpath.h"
#include "test.h"

static int reports;

static void on_error(op_runtime *rt, const char *msg, void *ud) {
  (void)rt;
  (void)ud;
  if (strstr(msg, "stuck: pool 'p' worker 1 did not stop within 0.2 s of "
                  "its cancel (task function stuck.lua:2)") != NULL)
    reports++;
  else
    fprintf(stderr, "unexpected report: %s\n", msg);
}

/* after_free: the stuck thread comes back after op_runtime_free. */
static void test_stuck(int after_free) {
  /* The finalizer says it started (hooks are off in finalizers: nothing
  ** stops it from here on), then loops, asking the loop thread now and
  ** then through a block section, which raises (and so ends the
  ** finalizer) once the worker has been given up as stuck. */
  static const char script[] =
      "local offpath = require 'offpath'\n"
      "T = offpath.launch('p', function(pause)\n"
      "  setmetatable({}, { __gc = function()\n"
      "    offpath.block(function() STARTED = true end)\n"
      "    while true do\n"
      "      local t0 = offpath.now()\n"
      "      while offpath.now() - t0 < pause do end\n"
      "      offpath.block(function() end)\n"
      "    end\n"
      "  end })\n"
      "  collectgarbage('incremental') -- runs finalizers at once\n"
      "  collectgarbage()\n"
      "  return 'never seen'\n"
      "end, PAUSE)\n"
      "T:on_done(function(ok, err) FIRST = err end)\n";
  op_config cfg;
  op_runtime *rt;
  op_stats st;
  lua_State *L;

  op_config_init(&cfg);
  cfg.stuck_grace = 0.2;
  ASSERT_OK(op_config_pool(&cfg, "p", 1, 0));
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  op_runtime_on_error(rt, on_error, NULL);
  reports = 0;
  L = op_runtime_lua(rt);
  /* After the free, the ghost comes back at its next block section. */
  lua_pushnumber(L, after_free ? 1.0 : 0.05);
  lua_setglobal(L, "PAUSE");
  ASSERT_OK(op_load_string(rt, script, "=stuck.lua"));
  for (;;) {
    uv_run(op_runtime_uv_loop(rt), UV_RUN_ONCE);
    if (lua_getglobal(L, "STARTED") == LUA_TBOOLEAN)
      break;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  ASSERT_OK(op_load_string(rt, "T:cancel()", "=cancel.lua"));
  /* Returns once the task is handed back: at its stuck declaration. */
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(reports, 1);
  lua_getglobal(L, "FIRST");
  ASSERT_STR_HAS(lua_tostring(L, -1), "cancelled");
  lua_pop(L, 1);
  op_stats_get(rt, &st);
  ASSERT_EQ(st.stuck, 1);
  ASSERT_EQ(st.pools[2].stuck, 1);
  ASSERT_EQ(st.pools[2].running, 1);
  ASSERT_EQ(st.pools[2].inflight, 0);
  ASSERT_EQ(st.pools[2].cancelled, 1);
  /* The replacement runs tasks, in a fresh VM. */
  ASSERT_OK(op_load_string(rt,
                           "offpath.launch('p', function() return 7 end)"
                           ":on_done(function(ok, v) SECOND = v end)",
                           "=again.lua"));
  ASSERT_OK(op_runtime_run(rt));
  lua_getglobal(L, "SECOND");
  ASSERT_EQ(lua_tointeger(L, -1), 7);
  lua_pop(L, 1);
  if (!after_free)
    uv_sleep(500); /* the ghost comes back and ends */
  ASSERT_OK(op_runtime_free(rt));
  if (after_free)
    uv_sleep(2000); /* the ghost comes back to a freed runtime */
}

int main(void) {
  test_stuck(0);
  test_stuck(1);
  printf("test-stuck: ok\n");
  return 0;
}
