/* SPDX-License-Identifier: MIT */
/*
** lua_main.c - the offpath module of the main VM: run, launch, schedule, go,
** all, sleep, configure, stats, context, can_suspend, now, traceback.
** Thread: loop.
*/
#include <string.h>

#include "internal.h"

/* ---- arguments ---- */

/* The pool named by the last string target, and that string, anchored in
** the registry under this key so its address cannot be reused: the same
** name (an interned string) is then found by one pointer compare. */
static const char last_target_key = 'P';

/* Read a pool target at idx: a pool name, a table {pool=, timeout=}, or
** nil for "io". Raises for an unknown pool.  [-0, +0, e] */
static op_pool *check_target(lua_State *L, int idx, double *timeout) {
  op_runtime *rt = op__runtime(L);
  const char *name = "io";
  op_pool *p;

  *timeout = 0;
  switch (lua_type(L, idx)) {
  case LUA_TSTRING:
    name = lua_tostring(L, idx);
    if (name == rt->last_target && rt->last_pool != NULL)
      return rt->last_pool;
    if ((p = op__pool_find(rt, name)) == NULL)
      luaL_error(L, "no such pool '%s'", name);
    lua_pushvalue(L, idx);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &last_target_key);
    rt->last_target = name;
    rt->last_pool = p;
    return p;
  case LUA_TTABLE:
    if (lua_getfield(L, idx, "pool") != LUA_TNIL)
      name = luaL_checkstring(L, -1);
    lua_getfield(L, idx, "timeout");
    *timeout = luaL_optnumber(L, -1, 0);
    lua_pop(L, 2);
    if (*timeout < 0)
      luaL_argerror(L, idx, "timeout must not be negative");
    break;
  case LUA_TNIL:
  case LUA_TNONE:
    break;
  default:
    luaL_typeerror(L, idx, "pool name or {pool=, timeout=}");
  }
  p = op__pool_find(rt, name);
  if (p == NULL)
    luaL_error(L, "no such pool '%s'", name);
  return p;
}

/* ---- offloading ---- */

/* offpath.run(target, fn, ...) */
static int offpath_run(lua_State *L) {
  double timeout;
  op_pool *p = check_target(L, 1, &timeout);
  op_ltask *lt;

  luaL_checktype(L, 2, LUA_TFUNCTION);
  op__check_suspend(L, "offpath.run");
  lt = op__task_new(L, p, 2, lua_gettop(L) - 2, timeout, "offpath.run",
                    OP_USE_RUN);
  ((op_task *)lt)->lazy = 1; /* its handler suspends next */
  op__task_enqueue(L, lt, 1);
  return op__task_await(L, lt, 0, "offpath.run", 1);
}

/* Queue the task on top of L as launch and schedule do: suspend while the
** queue is full if the caller can, else raise.  [-0, +0 or yield, e] */
static int enqueue_or_wait(lua_State *L, op_ltask *lt, const char *call) {
  int rc = op__task_enqueue(L, lt, op__can_suspend(L));

  if (rc == OP_EAGAIN)
    return luaL_error(L,
                      "queue full: %s on pool '%s' (raise its queue size or "
                      "call from a handler, which waits for room)",
                      call, op__pool_name(((op_task *)lt)->pool));
  if (rc == 1)
    return op__task_await_queued(L, lt);
  return 1;
}

/* offpath.launch(target, fn, ...) -> task */
static int offpath_launch(lua_State *L) {
  double timeout;
  op_pool *p = check_target(L, 1, &timeout);
  op_ltask *lt;

  luaL_checktype(L, 2, LUA_TFUNCTION);
  lt = op__task_new(L, p, 2, lua_gettop(L) - 2, timeout, "offpath.launch",
                    OP_USE_LAUNCH);
  return enqueue_or_wait(L, lt, "offpath.launch");
}

/* offpath.schedule{pool=, data=, onexecute=, onresult=, onerror=,
** timeout=} -> task */
static int offpath_schedule(lua_State *L) {
  double timeout;
  op_pool *p;
  op_ltask *lt;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  p = check_target(L, 1, &timeout);
  lua_getfield(L, 1, "onexecute"); /* 2 */
  lua_getfield(L, 1, "data");      /* 3 */
  lua_getfield(L, 1, "onresult");  /* 4 */
  lua_getfield(L, 1, "onerror");   /* 5 */
  if (lua_type(L, 2) != LUA_TFUNCTION)
    return luaL_error(L, "offpath.schedule: 'onexecute' must be a function");
  if (!lua_isnil(L, 4) && lua_type(L, 4) != LUA_TFUNCTION)
    return luaL_error(L, "offpath.schedule: 'onresult' must be a function");
  if (!lua_isnil(L, 5) && lua_type(L, 5) != LUA_TFUNCTION)
    return luaL_error(L, "offpath.schedule: 'onerror' must be a function");
  lt = op__task_new(L, p, 2, 1, timeout, "offpath.schedule", OP_USE_SCHEDULE);
  op__task_set_schedule(L, lt, 3, lua_isnil(L, 4) ? 0 : 4,
                        lua_isnil(L, 5) ? 0 : 5);
  return enqueue_or_wait(L, lt, "offpath.schedule");
}

/* offpath.go(fn, ...) -> task */
static int offpath_go(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  op__task_go(L, 1, lua_gettop(L) - 1);
  return 1;
}

/* offpath.block(fn, ...) on the main thread: already atomic, just call. */
static int offpath_block(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

/* ---- sleep ---- */

static void sleep_cb(uv_timer_t *timer) {
  op_timer *t = (op_timer *)timer;

  op__timer_close(t);
  op__wait_resume(t->rt, t->id, 0);
}

/* The wait ended early (cancel, shutdown): stop the timer. */
static void sleep_abort(void *what, int code) {
  (void)code;
  op__timer_close(what);
}

/* sleep(0): resume on the next loop turn, after what is already ready. */
static void yield_cb(op_runtime *rt, void *arg) {
  op__wait_resume(rt, (op_wait_id)(uintptr_t)arg, 0);
}

/* offpath.sleep(seconds); 0 yields to everything already ready. */
static int offpath_sleep(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  double s = luaL_checknumber(L, 1);
  op_timer *timer;
  op_wait_id id;

  luaL_argcheck(L, s >= 0, 1, "must not be negative");
  op__check_suspend(L, "offpath.sleep");
  if (s == 0) {
    id = op__wait_new(L, "offpath.sleep", 0, NULL, NULL);
    op__defer(rt, yield_cb, (void *)(uintptr_t)id);
    return op__wait_yield(L);
  }
  id = op__wait_new(L, "offpath.sleep", 0, NULL, NULL);
  timer = op__timer_start(rt, (uint64_t)(s * 1000.0 + 0.5), sleep_cb, id, NULL);
  if (timer == NULL) {
    op__wait_drop(rt, id);
    return luaL_error(L, "%s (offpath.sleep)", OP_NOMEM);
  }
  op__wait_set_abort(rt, id, sleep_abort, timer);
  return op__wait_yield(L);
}

/* ---- small things ---- */

static int offpath_can_suspend(lua_State *L) {
  lua_pushboolean(L, op__can_suspend(L));
  return 1;
}

static int offpath_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_hrtime() / 1e9);
  return 1;
}

static void set_number(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

static void set_integer(lua_State *L, const char *k, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

void op__push_pool_stats(lua_State *L, const op_stats *st) {
  int i;

  lua_createtable(L, 0, st->npools);
  for (i = 0; i < st->npools; i++) {
    const op_pool_stats *p = &st->pools[i];
    lua_createtable(L, 0, 16);
    set_integer(L, "threads", (uint64_t)p->threads);
    set_integer(L, "running", (uint64_t)p->running);
    set_integer(L, "stuck", p->stuck);
    set_integer(L, "queue_size", (uint64_t)p->queue_cap);
    set_integer(L, "submitted", p->submitted);
    set_integer(L, "completed", p->completed);
    set_integer(L, "failed", p->failed);
    set_integer(L, "timedout", p->timedout);
    set_integer(L, "cancelled", p->cancelled);
    set_integer(L, "queued", p->queued);
    set_integer(L, "inflight", p->inflight);
    set_integer(L, "queue_hwm", p->queue_hwm);
    set_number(L, "p50", p->p50);
    set_number(L, "p99", p->p99);
    set_number(L, "max", p->max);
    set_integer(L, "memory", p->memory);
    set_integer(L, "memory_limit", p->memory_limit);
    if (p->off_cpu >= 0)
      set_integer(L, "off_cpu", (uint64_t)p->off_cpu);
    lua_setfield(L, -2, p->name);
  }
}

/* offpath.stats() -> {pools={name={...}}, calls=, errors=, suspended=,
** memory=, protos=,
** latency={p50=, p99=, max=}} */
static int offpath_stats(lua_State *L) {
  op_stats st;

  op_stats_get(op__runtime(L), &st);
  lua_createtable(L, 0, 7);
  op__push_pool_stats(L, &st);
  lua_setfield(L, -2, "pools");
  set_integer(L, "calls", st.calls);
  set_integer(L, "errors", st.call_errors);
  set_integer(L, "suspended", st.suspended);
  set_integer(L, "stuck", st.stuck);
  set_integer(L, "memory", st.memory);
  set_integer(L, "protos", st.protos);
  lua_createtable(L, 0, 3);
  set_number(L, "p50", st.call_p50);
  set_number(L, "p99", st.call_p99);
  set_number(L, "max", st.call_max);
  lua_setfield(L, -2, "latency");
  op__io_http_stats(L, op__runtime(L));
  lua_setfield(L, -2, "http");
  return 1;
}

/* The memory_limit field of the pool table at idx: bytes (an integer) or a
** size ("64MB"), 0 or false for none; (size_t)-1 if absent.  [-0, +0, e] */
static size_t memory_limit_arg(lua_State *L, int idx, const char *pool) {
  size_t bytes = (size_t)-1;
  int t = lua_getfield(L, idx, "memory_limit");

  if (t == LUA_TBOOLEAN && !lua_toboolean(L, -1))
    bytes = 0;
  else if (t == LUA_TNUMBER && lua_isinteger(L, -1) &&
           lua_tointeger(L, -1) >= 0)
    bytes = (size_t)lua_tointeger(L, -1);
  else if (t == LUA_TSTRING && op__parse_size(lua_tostring(L, -1), &bytes) == 0)
    ;
  else if (t != LUA_TNIL)
    luaL_error(L,
               "offpath.configure: pool '%s': memory_limit must be bytes or "
               "a size such as \"64MB\", not '%s'",
               pool, luaL_tolstring(L, -1, NULL));
  if (bytes != 0 && bytes != (size_t)-1 && bytes < OP_MEMORY_LIMIT_MIN)
    luaL_error(L,
               "offpath.configure: pool '%s': memory_limit must be at "
               "least 1MB",
               pool);
  lua_pop(L, 1);
  return bytes;
}

/* offpath.configure{pools={name={threads=, queue=, init=, memory_limit=}},
** shutdown="drain"|"cancel", block_budget=, block_policy="abort"|"continue",
** spin_us=, busy_poll=, loop_cpu="auto"|"keep"|"share", stuck_grace=,
** max_result=} */
static int offpath_configure(lua_State *L) {
  static const char *const shutdowns[] = { "drain", "cancel", NULL };
  /* In the order of op_loop_cpu. */
  static const char *const loop_cpus[] = { "auto", "keep", "share", NULL };
  static const char *const policies[] = { "abort", "continue", NULL };
  op_runtime *rt = op__runtime(L);
  op_pool_config pc;
  op_pool *p;
  size_t mem;
  int rc;

  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_getfield(L, 1, "pools") == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      memset(&pc, 0, sizeof pc);
      pc.name = luaL_checkstring(L, -2);
      luaL_checktype(L, -1, LUA_TTABLE);
      lua_getfield(L, -1, "threads");
      pc.threads = (int)luaL_optinteger(L, -1, 0);
      lua_getfield(L, -2, "queue");
      pc.queue = (int)luaL_optinteger(L, -1, 0);
      lua_getfield(L, -3, "init");
      pc.init = luaL_optstring(L, -1, NULL);
      mem = memory_limit_arg(L, -4, pc.name);
      p = op__pool_find(rt, pc.name);
      rc = p != NULL ? op__pool_configure(p, pc.threads, pc.queue, pc.init)
                     : op__pool_add(rt, &pc, &p);
      if (rc == 0 && mem != (size_t)-1)
        rc = op__pool_set_memory_limit(p, mem);
      if (rc == OP_ESTARTED)
        return luaL_error(L,
                          "offpath.configure: pool '%s' has already "
                          "started (configure pools from the main chunk)",
                          pc.name);
      if (rc != 0)
        return luaL_error(L, "offpath.configure: pool '%s': %s", pc.name,
                          op_strerror(rc));
      lua_pop(L, 4);
    }
  }
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "shutdown") != LUA_TNIL)
    rt->cfg.shutdown =
        (op_shutdown_mode)luaL_checkoption(L, -1, NULL, shutdowns);
  if (lua_getfield(L, 1, "spin_us") != LUA_TNIL) {
    lua_Integer us = luaL_checkinteger(L, -1);
    int i;
    luaL_argcheck(L, us >= 0 && us <= 10000, 1, "spin_us must be 0..10000");
    rt->spin.max = rt->spin.cur = (unsigned)us;
    for (i = 0; i < rt->npools; i++)
      op__pool_set_spin(rt->pools[i], (unsigned)us);
  }
  if (lua_getfield(L, 1, "busy_poll") != LUA_TNIL) {
    luaL_argcheck(L, lua_isboolean(L, -1), 1, "busy_poll must be a boolean");
    rt->cfg.busy_poll = lua_toboolean(L, -1);
  }
  if (lua_getfield(L, 1, "loop_cpu") != LUA_TNIL)
    rt->cfg.loop_cpu = (op_loop_cpu)luaL_checkoption(L, -1, NULL, loop_cpus);
  if (lua_getfield(L, 1, "max_result") != LUA_TNIL) {
    lua_Integer max = luaL_checkinteger(L, -1);
    luaL_argcheck(L, max > 0, 1, "max_result must be a positive byte count");
    rt->max_result = (size_t)max;
  }
  if (lua_getfield(L, 1, "block_budget") != LUA_TNIL)
    rt->cfg.block_budget = luaL_checknumber(L, -1);
  if (lua_getfield(L, 1, "block_policy") != LUA_TNIL)
    rt->cfg.block_policy =
        (op_block_policy)luaL_checkoption(L, -1, NULL, policies);
  if (lua_getfield(L, 1, "stuck_grace") != LUA_TNIL) {
    double g = luaL_checknumber(L, -1);
    luaL_argcheck(L, g > 0 && g <= 3600, 1, "stuck_grace must be 0..3600 s");
    rt->stuck_grace = g;
  }
  lua_settop(L, 1);
  return 0;
}

/* __index of the module: offpath.context and offpath.engine. */
static int offpath_index(lua_State *L) {
  const char *k = lua_tostring(L, 2);
  op_co *c = op__co(L);

  if (k != NULL && strcmp(k, "context") == 0) {
    if (c == NULL || !c->handler || c->L != L)
      return 0;
    if (c->ctx_ref == LUA_NOREF) {
      lua_newtable(L);
      lua_pushvalue(L, -1);
      c->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
      return 1;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->ctx_ref);
    return 1;
  }
  if (k != NULL && strcmp(k, "engine") == 0) {
    op_runtime *rt = op__runtime(L);
    op__push_engine(rt);
    lua_xmove(rt->L, L, 1);
    return 1;
  }
  return 0;
}

/* offpath.traceback(err) -> the traceback recorded where the error value
** err was raised in a task, or nil (string errors carry theirs). */
static int offpath_traceback(lua_State *L) {
  luaL_checkany(L, 1);
  if (!op__error_traceback(L, 1))
    lua_pushnil(L);
  return 1;
}

int op__open_main(lua_State *L) {
  static const luaL_Reg funcs[] = { { "run", offpath_run },
                                    { "launch", offpath_launch },
                                    { "schedule", offpath_schedule },
                                    { "go", offpath_go },
                                    { "block", offpath_block },
                                    { "sleep", offpath_sleep },
                                    { "can_suspend", offpath_can_suspend },
                                    { "now", offpath_now },
                                    { "stats", offpath_stats },
                                    { "configure", offpath_configure },
                                    { "all", op__task_all },
                                    { "traceback", offpath_traceback },
                                    { NULL, NULL } };

  op__task_open(L);
  luaL_newlib(L, funcs);
  lua_pushliteral(L, OP_VERSION_STRING);
  lua_setfield(L, -2, "version");
  op__open_io(L);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, offpath_index);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  return 1;
}
