/* SPDX-License-Identifier: MIT */
/*
** test-track.c - op_call_track: the callback runs once, after the handler
** and everything it started (go coroutines, launched and scheduled tasks,
** their callbacks, what those start) have ended, with the first failure
** nobody handled.
** LABELS: tsan
*/
#include <string.h>
#include <uv.h>

#include "offpath.h"
#include "test.h"

typedef struct outcome {
  int calls;
  int failed;
  char err[1024];
  int marks_then; /* marks when the callback ran */
} outcome;

static int marks; /* engine:mark() calls: work that must precede the end */

static int engine_mark(lua_State *L) {
  (void)L;
  marks++;
  return 0;
}

static void on_track(op_runtime *rt, const char *err, void *ud) {
  outcome *o = ud;

  (void)rt;
  o->calls++;
  o->failed = err != NULL;
  snprintf(o->err, sizeof o->err, "%s", err != NULL ? err : "");
  o->marks_then = marks;
}

static void quiet(op_runtime *rt, const char *msg, void *ud) {
  (void)rt;
  (void)msg;
  (void)ud;
}

static const char script[] =
    "local offpath = require 'offpath'\n"
    "function sync(engine) engine:mark() end\n"
    /* Everything it starts ends after the handler returns. */
    "function tree(engine)\n"
    "  offpath.go(function()\n"
    "    offpath.sleep(0.02)\n"
    "    engine:mark()\n"
    "    offpath.go(function() offpath.sleep(0.02) engine:mark() end)\n"
    "  end)\n"
    "  local t = offpath.launch('io', function() return 7 end)\n"
    "  t:on_done(function(ok, v)\n"
    "    offpath.sleep(0.02)\n"
    "    engine:mark()\n"
    "  end)\n"
    "  offpath.schedule{pool='io', data=1, onexecute=function(d) return d "
    "end,\n"
    "    onresult=function(e, d, r)\n"
    "      offpath.launch('io', function() end):on_done(function()\n"
    "        engine:mark() end)\n"
    "    end}\n"
    "  engine:mark()\n"
    "end\n"
    /* Failures somebody handled do not count. */
    "function handled(engine)\n"
    "  pcall(offpath.run, 'io', function() error('seen') end)\n"
    "  local t = offpath.launch('io', function() error('waited') end)\n"
    "  pcall(t.wait, t)\n"
    "  offpath.launch('io', function() error('listened') end)\n"
    "    :on_done(function(ok) engine:mark() end)\n"
    "  offpath.schedule{pool='io', onexecute=function() error('x') end,\n"
    "    onerror=function() engine:mark() end}\n"
    "end\n"
    "function lost_launch(engine)\n"
    "  offpath.launch('io', function() error('lost task') end)\n"
    "end\n"
    "function lost_go(engine)\n"
    "  offpath.go(function() offpath.sleep(0.01) error('lost go') end)\n"
    "end\n"
    "function bad_callback(engine)\n"
    "  offpath.launch('io', function() end)\n"
    "    :on_done(function() error('bad on_done') end)\n"
    "end\n"
    "function bad_onresult(engine)\n"
    "  offpath.schedule{pool='io', onexecute=function() end,\n"
    "    onresult=function() error('bad onresult') end}\n"
    "end\n"
    "function lost_timeout(engine)\n"
    "  offpath.launch({pool='io', timeout=0.01}, function()\n"
    "    local t = os.clock() while os.clock() - t < 5 do end end)\n"
    "end\n"
    "function raises(engine)\n"
    "  offpath.go(function() offpath.sleep(0.02) engine:mark() end)\n"
    "  error('handler raised')\n"
    "end\n"
    "function late_raise(engine)\n"
    "  offpath.sleep(0.01)\n"
    "  error('late raise')\n"
    "end\n";

/* Call handler name with the engine, tracked into o; run the loop. */
static int track(op_runtime *rt, const char *name, outcome *o) {
  lua_State *L = op_runtime_lua(rt);
  int rc;

  memset(o, 0, sizeof *o);
  lua_getglobal(L, name);
  op_push_engine(rt);
  rc = op_call_track(rt, 1, on_track, o);
  ASSERT_OK(lua_gettop(L));
  return rc;
}

static void test_track(void) {
  static const luaL_Reg engine[] = { { "mark", engine_mark }, { NULL, NULL } };
  op_runtime *rt;
  outcome o;

  ASSERT_OK(op_runtime_new(NULL, &rt));
  op_runtime_on_error(rt, quiet, NULL);
  ASSERT_OK(op_register_engine(rt, engine, NULL));
  ASSERT_OK(op_load_string(rt, script, "=track.lua"));

  /* A handler that returns at once: the callback runs before the return. */
  marks = 0;
  ASSERT_OK(track(rt, "sync", &o));
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_EQ(o.err, "");
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);

  /* The end waits for every go coroutine, task and callback. */
  marks = 0;
  ASSERT_OK(track(rt, "tree", &o));
  ASSERT_EQ(o.calls, 0);
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_EQ(o.failed, 0);
  ASSERT_EQ(marks, 5);
  ASSERT_EQ(o.marks_then, 5);

  marks = 0;
  ASSERT_OK(track(rt, "handled", &o));
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_EQ(o.err, "");
  ASSERT_EQ(o.marks_then, 2);

  ASSERT_OK(track(rt, "lost_launch", &o));
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_HAS(o.err, "lost task");

  ASSERT_OK(track(rt, "lost_go", &o));
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_HAS(o.err, "lost go");

  ASSERT_OK(track(rt, "bad_callback", &o));
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_HAS(o.err, "bad on_done");

  ASSERT_OK(track(rt, "bad_onresult", &o));
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_HAS(o.err, "bad onresult");

  ASSERT_OK(track(rt, "lost_timeout", &o));
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_HAS(o.err, "timeout");

  /* A handler that raises before suspending: OP_ESCRIPT, and the callback
  ** still waits for the coroutine it started. */
  marks = 0;
  ASSERT_EQ(track(rt, "raises", &o), OP_ESCRIPT);
  ASSERT_EQ(o.calls, 0);
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_HAS(o.err, "handler raised");
  ASSERT_EQ(o.marks_then, 1);

  ASSERT_OK(track(rt, "late_raise", &o));
  op_runtime_run(rt);
  ASSERT_EQ(o.calls, 1);
  ASSERT_STR_HAS(o.err, "late raise");

  /* Calling a non-function fails in the coroutine: OP_ESCRIPT, and the
  ** callback runs once with the error. */
  {
    lua_State *L = op_runtime_lua(rt);
    memset(&o, 0, sizeof o);
    lua_pushnil(L);
    ASSERT_NE(op_call_track(rt, 0, on_track, &o), 0);
    op_runtime_run(rt);
    ASSERT_EQ(o.calls, 1); /* calling nil raises in the coroutine */
    ASSERT_STR_HAS(o.err, "attempt to call a nil value");
  }

  /* Untracked calls are not counted anywhere. */
  marks = 0;
  lua_getglobal(op_runtime_lua(rt), "tree");
  op_push_engine(rt);
  ASSERT_OK(op_call_value(rt, 1));
  op_runtime_run(rt);
  ASSERT_EQ(marks, 5);
  ASSERT_OK(op_runtime_free(rt));
}

/* Shutdown with a tracked call suspended: the callback runs once, with a
** failure. */
static void test_track_shutdown(void) {
  static const luaL_Reg engine[] = { { "mark", engine_mark }, { NULL, NULL } };
  op_runtime *rt;
  outcome o;
  int rc;

  ASSERT_OK(op_runtime_new(NULL, &rt));
  op_runtime_on_error(rt, quiet, NULL);
  ASSERT_OK(op_register_engine(rt, engine, NULL));
  ASSERT_OK(op_load_string(rt,
                           "local offpath = require 'offpath'\n"
                           "function hang(engine)\n"
                           "  offpath.go(function() offpath.sleep(60) end)\n"
                           "  offpath.sleep(60)\n"
                           "end\n",
                           "=hang.lua"));
  ASSERT_OK(track(rt, "hang", &o));
  ASSERT_EQ(o.calls, 0);
  rc = op_runtime_free(rt);
  ASSERT(rc == 0 || rc == OP_ESCRIPT);
  ASSERT_EQ(o.calls, 1);
  ASSERT_EQ(o.failed, 1); /* cancelled, or refused a suspension */
}

int main(void) {
  test_track();
  test_track_shutdown();
  printf("test-track: ok\n");
  return 0;
}
