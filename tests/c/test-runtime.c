/* SPDX-License-Identifier: MIT */
/*
** test-runtime.c - the runtime through the C API: loading scripts, calling
** handlers, errors with file and line, engine functions, shutdown of
** suspended handlers, statistics.
*/
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "offpath.h"
#include "test.h"

static op_runtime *make(void) {
  op_runtime *rt;
  ASSERT_OK(op_runtime_new(NULL, &rt));
  return rt;
}

static int count_calls;

static int engine_count(lua_State *L) {
  int *ud = op_engine_ud(L);
  *ud += (int)luaL_optinteger(L, 3, 1);
  count_calls++;
  return 0;
}

static char last_error[1024];
static int errors_seen;

static void on_error(op_runtime *rt, const char *msg, void *ud) {
  (void)rt;
  (void)ud;
  snprintf(last_error, sizeof last_error, "%s", msg);
  errors_seen++;
}

static void test_load_errors(void) {
  op_runtime *rt = make();

  ASSERT_EQ(op_load_string(rt, "x = = 1", "=bad.lua"), OP_ESCRIPT);
  ASSERT_STR_HAS(op_errmsg(rt), "bad.lua:1:");
  ASSERT_EQ(op_load_string(rt, "local x = nil\nx.y = 1", "=rt.lua"),
            OP_ESCRIPT);
  ASSERT_STR_HAS(op_errmsg(rt), "rt.lua:2: attempt to index");
  ASSERT_EQ(op_load_script(rt, "/nonexistent/script.lua"), OP_ESCRIPT);
  ASSERT_STR_HAS(op_errmsg(rt), "cannot open /nonexistent/script.lua");
  /* Suspending in the main chunk is refused with a clear message. */
  ASSERT_EQ(op_load_string(rt,
                           "offpath = require 'offpath'\n"
                           "offpath.sleep(0)",
                           "=main.lua"),
            OP_ESCRIPT);
  ASSERT_STR_HAS(op_errmsg(rt), "cannot suspend: offpath.sleep called "
                                "outside a handler");
  ASSERT_OK(op_runtime_free(rt));
}

static void test_handlers(void) {
  static const luaL_Reg engine[] = { { "count", engine_count },
                                     { NULL, NULL } };
  op_runtime *rt = make();
  lua_State *L = op_runtime_lua(rt);
  int counter = 0;

  op_runtime_on_error(rt, on_error, NULL);
  ASSERT_OK(op_register_engine(rt, engine, &counter));
  ASSERT_OK(op_load_string(rt,
                           "local offpath = require 'offpath'\n"
                           "function h(engine, x)\n"
                           "  engine:count('n', x)\n"
                           "  local y = offpath.run('io', function(v)\n"
                           "    return v * 2 end, x)\n"
                           "  engine:count('n', y)\n"
                           "end\n"
                           "function bad(engine) error('bad handler') end\n"
                           "function late(engine)\n"
                           "  offpath.sleep(0.001)\n"
                           "  error('late failure')\n"
                           "end\n",
                           "=handlers.lua"));
  op_push_engine(rt);
  lua_pushinteger(L, 5);
  ASSERT_OK(op_call(rt, "h", 2));
  ASSERT_EQ(counter, 5); /* ran up to its first suspension */
  ASSERT_EQ(op_runtime_suspended(rt), 1);
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(counter, 15);
  ASSERT_EQ(op_runtime_suspended(rt), 0);

  lua_pushnil(L);
  ASSERT_EQ(op_call(rt, "missing", 1), OP_ENOHANDLER);
  ASSERT_EQ(lua_gettop(L), 0);

  /* An error op_call returns is reported once: by the return and
  ** op_errmsg, not also through the error callback. */
  op_push_engine(rt);
  ASSERT_EQ(op_call(rt, "bad", 1), OP_ESCRIPT);
  ASSERT_STR_HAS(op_errmsg(rt), "handlers.lua:8: bad handler");
  ASSERT_STR_HAS(op_errmsg(rt), "stack traceback");
  ASSERT_EQ(errors_seen, 0);
  op_push_engine(rt);
  lua_pushcfunction(L, lua_error);
  lua_insert(L, -2);
  ASSERT_EQ(op_call_value(rt, 1), OP_ESCRIPT);
  ASSERT_STR_HAS(op_errmsg(rt), "(error object is a table value)");
  ASSERT_EQ(errors_seen, 0);

  /* One that fails after a suspension has only the callback. */
  op_push_engine(rt);
  ASSERT_OK(op_call(rt, "late", 1));
  ASSERT_EQ(op_runtime_run(rt), OP_ESCRIPT);
  ASSERT_STR_HAS(last_error, "handlers.lua:11: late failure");
  ASSERT_STR_HAS(last_error, "stack traceback");
  ASSERT_EQ(errors_seen, 1);
  ASSERT_EQ(lua_gettop(L), 0);
  ASSERT_OK(op_runtime_free(rt));
}

/* Handlers suspended at shutdown hear "cancelled" exactly once, and a
** handler waiting on a pool task sees it drained. */
static int heard_cancel, heard_done;

static int engine_heard(lua_State *L) {
  const char *msg = luaL_checkstring(L, 2);

  if (strcmp(msg, "done") == 0)
    heard_done++;
  else if (strstr(msg, "cancelled: runtime shutting down") != NULL &&
           strstr(msg, "offpath.sleep at stop.lua:3") != NULL)
    heard_cancel++;
  else
    fprintf(stderr, "unexpected: %s\n", msg);
  return 0;
}

static void test_shutdown_suspended(void) {
  static const luaL_Reg engine[] = { { "heard", engine_heard },
                                     { NULL, NULL } };
  op_runtime *rt = make();
  lua_State *L = op_runtime_lua(rt);
  int i;

  ASSERT_OK(op_register_engine(rt, engine, NULL));
  ASSERT_OK(op_load_string(rt,
                           "local offpath = require 'offpath'\n"
                           "function h(engine, i)\n"
                           "  local ok, err = pcall(offpath.sleep, 3600)\n"
                           "  engine:heard(err)\n"
                           "  -- line 5\n"
                           "end\n"
                           "function slow(engine)\n"
                           "  offpath.run('io', function()\n"
                           "    local t = os.clock() + 0.2\n"
                           "    while os.clock() < t do end end)\n"
                           "  engine:heard('done')\n"
                           "end\n",
                           "=stop.lua"));
  for (i = 0; i < 10; i++) {
    op_push_engine(rt);
    lua_pushinteger(L, i);
    ASSERT_OK(op_call(rt, "h", 2));
  }
  op_push_engine(rt);
  ASSERT_OK(op_call(rt, "slow", 1));
  ASSERT_EQ(op_runtime_suspended(rt), 11);
  ASSERT_OK(op_runtime_free(rt));
  ASSERT_EQ(heard_cancel, 10);
  ASSERT_EQ(heard_done, 1);
}

static void test_stats(void) {
  op_runtime *rt = make();
  op_stats st;

  ASSERT_OK(op_load_string(rt,
                           "local offpath = require 'offpath'\n"
                           "function h()\n"
                           "  for i = 1, 50 do\n"
                           "    offpath.run('cpu', function() return i end)\n"
                           "  end\n"
                           "end\n",
                           "=stats.lua"));
  ASSERT_OK(op_call(rt, "h", 0));
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_OK(op_stats_get(rt, &st));
  ASSERT_EQ(st.npools, 2);
  ASSERT_STR_EQ(st.pools[1].name, "cpu");
  ASSERT_EQ(st.pools[1].submitted, 50);
  ASSERT_EQ(st.pools[1].completed, 50);
  ASSERT_EQ(st.pools[1].inflight, 0);
  ASSERT_GE(st.pools[1].queue_hwm, 1);
  ASSERT(st.pools[1].p50 > 0 && st.pools[1].p99 >= st.pools[1].p50);
  ASSERT_EQ(st.calls, 1);
  /* the spelling that shares the type's name fills the same */
  memset(&st, 0, sizeof st);
  ASSERT_OK(op_stats(rt, &st));
  ASSERT_EQ(st.pools[1].completed, 50);
  ASSERT_OK(op_runtime_free(rt));
}

/* A finalizer that launches a task while the first task is being
** anchored: the collection step that runs it may come in the middle of
** making the anchors' first thread. The padding string moves that step
** across the allocations of the first launch; each size runs in a fresh
** runtime, where the anchors start empty. */
static void test_finalizer_launch(void) {
  char script[1024];
  op_stats st;
  int pad;

  for (pad = 0; pad <= 1200; pad += 8) {
    op_runtime *rt = make();

    snprintf(script, sizeof script,
             "local offpath = require 'offpath'\n"
             "local armed, ran = false, 0\n"
             "local f = function() return 1 end\n"
             "local mt = { __gc = function()\n"
             "  ran = ran + 1\n"
             "  if armed then offpath.launch('cpu', f) end\n"
             "end }\n"
             "for i = 1, 2000 do setmetatable({}, mt) end\n"
             "collectgarbage('stop'); collectgarbage('restart')\n"
             "while ran == 0 do collectgarbage('step', 0) end\n"
             "collectgarbage('step', -2)\n"
             "local pad = string.rep('x', %d)\n"
             "armed = true\n"
             "offpath.launch('cpu', f)\n",
             pad);
    ASSERT_OK(op_load_string(rt, script, "=finalizer.lua"));
    ASSERT_OK(op_runtime_run(rt));
    ASSERT_OK(op_stats_get(rt, &st));
    ASSERT_GE(st.pools[1].submitted, 1);
    ASSERT_EQ(st.pools[1].completed, st.pools[1].submitted);
    ASSERT_EQ(st.pools[1].inflight, 0);
    ASSERT_OK(op_runtime_free(rt));
  }
}

/* The host's own libuv loop. */
static void test_host_loop(void) {
  uv_loop_t loop;
  op_config cfg;
  op_runtime *rt;

  ASSERT_OK(uv_loop_init(&loop));
  op_config_init(&cfg);
  cfg.loop = &loop;
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  ASSERT(op_runtime_uv_loop(rt) == &loop);
  ASSERT_OK(op_load_string(rt,
                           "local offpath = require 'offpath'\n"
                           "function h() done = offpath.run('io', "
                           "function() return 42 end) end\n",
                           "=loop.lua"));
  ASSERT_OK(op_call(rt, "h", 0));
  uv_run(&loop, UV_RUN_DEFAULT);
  lua_getglobal(op_runtime_lua(rt), "done");
  ASSERT_EQ(lua_tointeger(op_runtime_lua(rt), -1), 42);
  lua_pop(op_runtime_lua(rt), 1);
  ASSERT_OK(op_runtime_free(rt));
  ASSERT_OK(uv_loop_close(&loop));
}

/* Cancelling a running `while true do end`, with the stop signal (the
** default) and with every task under the hook (stop_signal < 0). */
static void test_stop_running(int stop_signal) {
  op_config cfg;
  op_runtime *rt;
  lua_State *L;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "one", 1, 0));
  cfg.stop_signal = stop_signal;
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  L = op_runtime_lua(rt);
  ASSERT_OK(op_load_string(rt,
                           "local offpath = require 'offpath'\n"
                           "function h()\n"
                           "  local t = offpath.launch('one', function()\n"
                           "    while true do end end)\n"
                           "  offpath.sleep(0.05)\n"
                           "  t:cancel()\n"
                           "  result = offpath.run('one', function()\n"
                           "    return 'the worker is free' end)\n"
                           "end\n",
                           "=stop.lua"));
  ASSERT_OK(op_call(rt, "h", 0));
  ASSERT_OK(op_runtime_run(rt));
  lua_getglobal(L, "result");
  ASSERT_STR_EQ(lua_tostring(L, -1), "the worker is free");
  lua_pop(L, 1);
  ASSERT_OK(op_runtime_free(rt));
}

/* Debug builds check the thread of the op_* calls: one made off the loop
** thread (here op_runtime_busy from another thread) aborts, naming the
** call. The calls documented for any thread do not. */
#ifdef OP_DEBUG
static void busy_off_loop(void *arg) {
  op_runtime_busy(arg);
}

static lua_State *main_L;

static void running_off_loop(void *arg) {
  op_runtime *rt = arg;

  if (op_runtime_running(rt) != main_L || op_runtime_fd(rt) < 0 ||
      op_runtime_uv_loop(rt) == NULL)
    abort();
}
#endif

static void test_off_loop_thread(void) {
#ifdef OP_DEBUG
  op_runtime *rt = make();
  uv_thread_t th;
  char out[512];
  int fds[2], status;
  ssize_t n;
  pid_t pid;

  main_L = op_runtime_lua(rt);
  ASSERT_OK(uv_thread_create(&th, running_off_loop, rt));
  ASSERT_OK(uv_thread_join(&th));
  ASSERT_OK(pipe(fds));
  fflush(NULL);
  pid = fork();
  ASSERT(pid >= 0);
  if (pid == 0) {
    dup2(fds[1], 2);
    if (uv_thread_create(&th, busy_off_loop, rt) == 0)
      uv_thread_join(&th);
    _exit(0);
  }
  close(fds[1]);
  n = read(fds[0], out, sizeof out - 1);
  out[n > 0 ? n : 0] = '\0';
  close(fds[0]);
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT);
  ASSERT_STR_HAS(out, "op_runtime_busy called off the loop thread");
  ASSERT_EQ(op_runtime_busy(rt), 0); /* the loop thread itself may */
  ASSERT_OK(op_runtime_free(rt));
#endif
}

int main(void) {
  test_load_errors();
  test_handlers();
  test_shutdown_suspended();
  test_stats();
  test_finalizer_launch();
  test_host_loop();
  test_stop_running(0);
  test_stop_running(-1);
  test_off_loop_thread();
  printf("test-runtime: ok\n");
  return 0;
}
