/* SPDX-License-Identifier: MIT */
/*
** runtime.c - the public face of a runtime: configuration, lifecycle,
** loop integration, scripts, handler calls and the engine object.
** Thread: loop.
*/
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* ---- configuration ---- */

void op_config_init(op_config *cfg) {
  /* The CPUs this thread may run on (taskset, cpusets), not the machine's:
  ** the count pool.c's place() compares pools with. */
  unsigned cpus = uv_available_parallelism();

  memset(cfg, 0, sizeof *cfg);
  cfg->pools[0].name = "io";
  cfg->pools[0].threads = 4;
  cfg->pools[1].name = "cpu";
  cfg->pools[1].threads = cpus == 0 ? 1 : cpus > 1024 ? 1024 : (int)cpus;
  cfg->npools = 2;
  cfg->shutdown = OP_SHUTDOWN_DRAIN;
  cfg->block_budget = 0.1;
  cfg->block_policy = OP_BLOCK_ABORT;
  /* Spinning only across CPUs, and only while the other side is awake:
  ** a wake-up there costs tens of microseconds (docs/benchmarks.md). */
  cfg->spin_us = 50;
  cfg->memory_limit = OP_MEMORY_LIMIT_DEFAULT;
}

int op_config_pool(op_config *cfg, const char *name, int threads, int queue) {
  int i;

  if (name == NULL || name[0] == '\0' || strlen(name) >= OP_POOL_NAME_MAX ||
      threads < 0 || queue < 0)
    return OP_EINVAL;
  for (i = 0; i < cfg->npools; i++) {
    if (strcmp(cfg->pools[i].name, name) == 0) {
      if (threads > 0)
        cfg->pools[i].threads = threads;
      if (queue > 0)
        cfg->pools[i].queue = queue;
      return 0;
    }
  }
  if (cfg->npools >= OP_MAX_POOLS)
    return OP_ENOMEM;
  cfg->pools[cfg->npools].name = name;
  cfg->pools[cfg->npools].threads = threads;
  cfg->pools[cfg->npools].queue = queue;
  cfg->npools++;
  return 0;
}

/* ---- errors ---- */

/* Name the runtime (argument 1) in the main VM's registry and require
** "offpath" there (the Lua module's own state requires it itself), with
** the guarded library functions; protected.  [-0, +0, m] */
static int open_main_p(lua_State *L) {
  op_runtime *rt = lua_touserdata(L, 1);

  lua_pushlightuserdata(L, rt);
  lua_setfield(L, LUA_REGISTRYINDEX, OP_RUNTIME_KEY);
  op__guard_exit(L);
  if (!rt->borrowed)
    luaL_requiref(L, "offpath", op__open_main, 1);
  op__block_guard_hooks(L); /* before the names of library functions */
  return 0;
}

op_runtime *op_runtime_from_lua(lua_State *L) {
  return op__runtime(L);
}

/* ---- lifecycle ---- */

static void handle_close_cb(uv_handle_t *h) {
  op_runtime *rt = h->data;
  rt->uv_handles--;
}

/* Open /dev/null on each of descriptors 0, 1 and 2 that is closed (a
** program started with 1>&-), before the loop, the eventfd or a socket
** can take the number and be read or written as stdin or stdout (libuv
** asserts on a loop descriptor <= 2). open() takes the lowest free number,
** so they are opened in order. */
void op__std_fds_open(void) {
  int fd;

  for (fd = 0; fd <= 2; fd++)
    if (fcntl(fd, F_GETFD) == -1 && errno == EBADF)
      if (open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY) == -1)
        break;
}

int op_runtime_new(const op_config *cfg, op_runtime **out) {
  return op__runtime_new(cfg, NULL, out);
}

int op__runtime_new(const op_config *cfg, lua_State *L, op_runtime **out) {
  op_config defaults;
  op_runtime *rt;
  int i, rc;

  *out = NULL;
  op__std_fds_open();
  if (cfg == NULL) {
    op_config_init(&defaults);
    cfg = &defaults;
  }
  rt = calloc(1, sizeof *rt);
  if (rt == NULL)
    return OP_ENOMEM;
  rt->cfg = *cfg;
  rt->engine_ref = LUA_NOREF;
  rt->open_worker = op__open_worker; /* for worker.c, below lua_worker.c */
  rt->loop_thread = uv_thread_self();
  if (cfg->package_path != NULL &&
      (rt->package_path = strdup(cfg->package_path)) == NULL) {
    free(rt);
    return OP_ENOMEM;
  }
  if (cfg->loop != NULL) {
    rt->loop = cfg->loop;
  } else {
    if ((rc = uv_loop_init(&rt->own_loop)) != 0) {
      free(rt->package_path);
      free(rt);
      return rc;
    }
    rt->loop = &rt->own_loop;
    rt->own = 1;
  }
  if ((rc = op__wake_open(rt)) == 0 &&
      (rc = uv_poll_init(rt->loop, &rt->wake_poll, rt->wake_fd[0])) != 0)
    op__wake_close(rt);
  if (rc != 0) {
    if (rt->own)
      uv_loop_close(&rt->own_loop);
    free(rt->package_path);
    free(rt);
    return rc;
  }
  if (uv_mutex_init(&rt->done_mu))
    OP_PANIC("cannot make the completion lock");
  rt->wake_poll.data = rt;
  rt->uv_handles++;
  uv_poll_start(&rt->wake_poll, UV_READABLE, op__loop_wake_cb);
  uv_unref((uv_handle_t *)&rt->wake_poll);
  atomic_init(&rt->done_flag, 0);
  atomic_init(&rt->need_wake, 1);
  atomic_init(&rt->done_any, 0);
  atomic_init(&rt->loop_cpu, -1);
  rt->kept_cpu = -1;
  atomic_init(&rt->loop_sleeps, 0);
  atomic_init(&rt->worker_cpu, -1);
  rt->spin.max = rt->spin.cur = cfg->spin_us > 0 ? (unsigned)cfg->spin_us : 0;
  op__ticker_init(&rt->ticker);
  rt->stuck_grace = cfg->stuck_grace > 0 ? cfg->stuck_grace : 1.0;
  uv_timer_init(rt->loop, &rt->stuck_timer);
  rt->stuck_timer.data = rt;
  rt->uv_handles++;
  uv_unref((uv_handle_t *)&rt->stuck_timer);
  uv_prepare_init(rt->loop, &rt->spin_prepare);
  rt->spin_prepare.data = rt;
  rt->uv_handles++;
  uv_prepare_start(&rt->spin_prepare, op__loop_idle_cb);
  uv_unref((uv_handle_t *)&rt->spin_prepare);

  rt->protos = op__protostore_new();
  if (L != NULL) {
    rt->L = L; /* borrowed: the caller made it and will close it */
    rt->borrowed = 1;
    op__preload_modules(L);
  } else {
    rt->mem.limit = cfg->main_memory_limit != OP_MEMORY_UNLIMITED
                        ? cfg->main_memory_limit
                        : 0;
    rt->L = op__new_state(rt, &rt->mem);
  }
  if (rt->protos == NULL || rt->L == NULL)
    goto nomem;
  op__sched_init(rt);
  lua_pushcfunction(rt->L, open_main_p);
  lua_pushlightuserdata(rt->L, rt);
  if (op__pcall(rt->L, 1, 0, NULL) != LUA_OK)
    goto nomem;
  rt->xfer = op__xfer_new(rt->L, rt->protos);
  if (rt->xfer == NULL)
    goto nomem;
  for (i = 0; i < cfg->npools; i++) {
    if ((rc = op__pool_add(rt, &cfg->pools[i], NULL)) != 0) {
      rt->closing = 1;
      op_runtime_free(rt);
      return rc;
    }
  }
  *out = rt;
  return 0;

nomem:
  rt->closing = 1;
  op_runtime_free(rt);
  return OP_ENOMEM;
}

/* Run the loop once while there is pool work or ready coroutines. */
static void drain(op_runtime *rt) {
  while (rt->inflight > 0 || rt->ready_head != NULL || rt->defer_head != NULL)
    uv_run(rt->loop, UV_RUN_ONCE);
}

int op_runtime_free(op_runtime *rt) {
  int i, rc = 0;
  uint64_t errors;
  op_remnant *rem;

  if (rt == NULL)
    return 0;
  op__assert_loop_thread(rt);
  errors = rt->call_errors;
  rt->closing = 1;
  if (rt->L != NULL && rt->root.rt == rt) {
    if (rt->cfg.shutdown == OP_SHUTDOWN_CANCEL)
      for (i = 0; i < rt->npools; i++)
        op__pool_cancel_queued(rt->pools[i]);
    drain(rt);
    while (rt->pending_waits > 0) {
      op__sched_cancel_all(rt);
      drain(rt);
    }
  }
  if (rt->L != NULL)
    op__io_shutdown(rt);
  /* Threads given up as stuck may still use the prototype store when
  ** they come back: it goes to the last of them (op_remnant). */
  rem = malloc(sizeof *rem);
  if (rem != NULL) {
    atomic_init(&rem->refs, 1);
    rem->protos = rt->protos;
  }
  for (i = 0; i < rt->npools; i++)
    op__pool_free(rt->pools[i], rem);
  rt->npools = 0;
  rt->last_cpool = NULL;
  if (rt->call_errors != errors)
    rc = OP_ESCRIPT;
  if (rt->L != NULL) {
    if (rt->root.rt == rt)
      op__sched_close(rt);
    if (rt->xfer != NULL)
      op__xfer_free(rt->xfer);
    if (!rt->borrowed) {
      lua_close(rt->L);
    } else {
      /* The caller's state no longer names a runtime. */
      lua_pushnil(rt->L);
      lua_setfield(rt->L, LUA_REGISTRYINDEX, OP_RUNTIME_KEY);
    }
    op__task_close(rt);
  }
  op__remnant_release(rem); /* NULL (no memory): the store is left */
  uv_close((uv_handle_t *)&rt->stuck_timer, handle_close_cb);
  uv_close((uv_handle_t *)&rt->wake_poll, handle_close_cb);
  uv_close((uv_handle_t *)&rt->spin_prepare, handle_close_cb);
  while (rt->uv_handles > 0)
    uv_run(rt->loop, UV_RUN_NOWAIT);
  uv_run(rt->loop, UV_RUN_NOWAIT);
  uv_mutex_destroy(&rt->done_mu);
  op__wake_close(rt);
  if (rt->own && uv_loop_close(&rt->own_loop) != 0)
    rc = rc ? rc : OP_EBUSY;
  while (rt->free_ctasks != NULL) {
    op_task *t = rt->free_ctasks;
    rt->free_ctasks = t->next;
    free(t);
  }
  free(rt->errmsg);
  free(rt->package_path);
  free(rt);
  return rc;
}

lua_State *op_runtime_lua(op_runtime *rt) {
  op__assert_loop_thread(rt);
  return rt->L;
}

/* ---- loop integration ---- */

struct uv_loop_s *op_runtime_uv_loop(op_runtime *rt) {
  return rt->loop;
}

int op_runtime_fd(op_runtime *rt) {
  return uv_backend_fd(rt->loop);
}

int op_runtime_poll(op_runtime *rt) {
  op__assert_loop_thread(rt);
  /* The host waits on its own descriptors too: no spinning or yielding
  ** inside a call that must not block (idle_cb). */
  rt->in_poll = 1;
  uv_run(rt->loop, UV_RUN_NOWAIT);
  rt->in_poll = 0;
  if (!uv_loop_alive(rt->loop))
    return -1;
  return uv_backend_timeout(rt->loop);
}

int op_runtime_run(op_runtime *rt) {
  uint64_t errors = rt->call_errors;

  op__assert_loop_thread(rt);
  uv_run(rt->loop, UV_RUN_DEFAULT);
  return rt->call_errors != errors ? OP_ESCRIPT : 0;
}

int op_runtime_busy(op_runtime *rt) {
  op__assert_loop_thread(rt);
  return rt->inflight > 0 || rt->live_cos > 0 || rt->pending_waits > 0 ||
         rt->ready_head != NULL || rt->defer_head != NULL;
}

int op_runtime_suspended(op_runtime *rt) {
  op__assert_loop_thread(rt);
  return rt->suspended;
}

int op_runtime_cancel(op_runtime *rt) {
  int n = (int)rt->pending_waits;

  op__assert_loop_thread(rt);
  /* Tasks first, whether or not anyone waits on them (launch, schedule,
  ** go): then the waits left (sleeps, io operations, handlers). */
  n += op__task_cancel_all(rt);
  op__sched_cancel_all(rt);
  return n;
}

/* ---- scripts and handlers ---- */

static int run_chunk(op_runtime *rt, int status) {
  lua_State *L = rt->L;

  if (status == LUA_OK) {
    rt->depth++;
    status = op__pcall(L, 0, 0, op__traceback);
    rt->depth--;
  }
  if (status != LUA_OK) {
    op__set_errmsg(rt, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return OP_ESCRIPT;
  }
  rt->loaded = 1;
  return 0;
}

int op_runtime_start(op_runtime *rt) {
  int i, rc, first = 0;

  op__assert_loop_thread(rt);
  /* Every pool, even after one failed: each goes on with the threads it
  ** could start. */
  for (i = 0; i < rt->npools; i++)
    if ((rc = op__pool_start(rt->pools[i])) != 0 && first == 0)
      first = rc;
  return first;
}

int op_load_script(op_runtime *rt, const char *path) {
  op__assert_loop_thread(rt);
  return run_chunk(rt, luaL_loadfile(rt->L, path));
}

int op_load_string(op_runtime *rt, const char *chunk, const char *name) {
  op__assert_loop_thread(rt);
  return run_chunk(rt, luaL_loadbuffer(rt->L, chunk, strlen(chunk), name));
}

/* No coroutine for a call (out of memory): drop the function and its
** nargs arguments, and say so. */
static int call_nomem(op_runtime *rt, int nargs) {
  lua_pop(rt->L, nargs + 1);
  op__set_errmsg(rt, OP_NOMEM);
  return OP_ENOMEM;
}

int op_call_value(op_runtime *rt, int nargs) {
  op_co *c;

  op__assert_loop_thread(rt);
  rt->calls++;
  if ((c = op__co_acquire(rt)) == NULL)
    return call_nomem(rt, nargs);
  c->quiet = rt->depth == 0;
  return op__co_start(c, rt->L, nargs);
}

/* The protected part of op_call: the global named by the argument (its
** name may be a string Lua has to make). */
static int getglobal_p(lua_State *L) {
  lua_getglobal(L, lua_touserdata(L, 1));
  return 1;
}

int op_call(op_runtime *rt, const char *handler, int nargs) {
  lua_State *L = rt->L;
  int status;

  op__assert_loop_thread(rt);
  status = op__protect(L, getglobal_p, (void *)handler, 1);
  if (status != LUA_OK || lua_type(L, -1) != LUA_TFUNCTION) {
    lua_pop(L, nargs + 1);
    if (status != LUA_OK) {
      lua_pop(L, 1);
      op__set_errmsg(rt, OP_NOMEM);
      return OP_ENOMEM;
    }
    op__set_errmsg(rt, "no handler '%s'", handler);
    return OP_ENOHANDLER;
  }
  lua_insert(L, -(nargs + 1));
  return op_call_value(rt, nargs);
}

int op_call_track(op_runtime *rt, int nargs, op_track_cb cb, void *ud) {
  op_group *g = op__group_new(cb, ud), *saved = rt->grp;
  op_co *c;
  int rc;

  op__assert_loop_thread(rt);
  if (g == NULL) {
    lua_pop(rt->L, nargs + 1);
    op__set_errmsg(rt, "not enough memory");
    return OP_ENOMEM;
  }
  rt->calls++;
  if ((c = op__co_acquire(rt)) == NULL) {
    op__group_drop(g); /* OP_ENOMEM: cb never runs */
    return call_nomem(rt, nargs);
  }
  c->quiet = rt->depth == 0;
  rt->grp = g;
  rc = op__co_start(c, rt->L, nargs); /* the coroutine joins g */
  rt->grp = saved;
  /* A handler that ended at once may have emptied the group but for our
  ** hold; let go now. */
  op__group_leave(rt, g, NULL);
  return rc;
}

/* ---- the engine object ---- */

int op_register_engine(op_runtime *rt, const luaL_Reg *fns, void *ud) {
  lua_State *L = rt->L;

  op__assert_loop_thread(rt);
  rt->engine_ud = ud;
  op__push_engine(rt);
  luaL_setfuncs(L, fns, 0);
  op__xfer_hint(L, -1,
                "engine methods run on the main thread; call them "
                "in the handler or in on_done");
  lua_pop(L, 1);
  return 0;
}

void op_push_engine(op_runtime *rt) {
  op__assert_loop_thread(rt);
  op__push_engine(rt);
}

void *op_engine_ud(lua_State *L) {
  return op__runtime(L)->engine_ud;
}

/* The coroutine co_resume runs, else the main state (main chunk, block
** sections, finalizers run from C); see offpath.h. */
lua_State *op_runtime_running(op_runtime *rt) {
  lua_State *L = __atomic_load_n(&rt->running, __ATOMIC_RELAXED);

  return L != NULL ? L : rt->L;
}
