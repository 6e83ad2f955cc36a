/* SPDX-License-Identifier: MIT */
/*
** lua_worker.c - the offpath module inside worker VMs (block, cancelled,
** worker, sleep, now, can_suspend), and the loop-thread half of block
** sections. Thread: worker, except block_run() (loop).
**
** A block section: the worker encodes fn and its arguments into its own
** block task, hands it to the loop thread through the completion queue and
** waits on its condition variable (the only place where a worker waits on
** the loop thread; the loop thread never waits on a worker). The loop
** thread runs fn on the main VM's thread when it drains the completion
** queue, between two events, so nothing else runs meanwhile (atomic). A
** count hook enforces the time budget (op_config.block_budget) with the
** configured policy; the results, or the error message, are encoded into
** the task and the worker is woken. debug.sethook in the main VM refuses
** to run inside a section, so the section cannot take the hook off. What
** runs with hooks off (a finalizer) or in C (a pattern match) can still
** outlive the budget: the host's watchdog ends a process whose loop
** thread does not answer a signal (docs/design.md).
**
** The section runs on a copy of fn, so an assignment to one of its
** upvalues (the Redis idiom: a cursor and a count advanced batch by batch)
** would be lost. The loop thread therefore remembers fn's upvalue values
** before the call and, when it returns, sends back each one that now holds
** another value (rawequal), after the results:
**
**   nres  result 1 .. result nres  (index value)...
**
** The worker stores them into its own fn's upvalues, which are the cells
** of the function that called offpath.block. A value that cannot be copied
** back fails the section, naming the upvalue. Nothing is sent back when the
** section raises, nor for a function that crossed by name (a module's: the
** main VM's own copy, whose state is not the worker's).
*/
#include <string.h>
#include <time.h>

#include "internal.h"

/* ---- worker side ---- */

static op_worker *check_worker(lua_State *L) {
  op_worker *w = *(op_worker **)lua_getextraspace(L);

  if (w == NULL || op__worker_self() != w)
    luaL_error(L, "offpath worker function called outside a worker");
  return w;
}

/* Store the upvalue values sent back by the section into fn at index 1:
** (index, value) pairs at first..last.  [-0, +0, -] */
static void set_upvalues(lua_State *L, int first, int last) {
  int i;

  for (i = first; i + 1 <= last; i += 2) {
    if (!lua_isinteger(L, i))
      continue;
    lua_pushvalue(L, i + 1);
    if (lua_setupvalue(L, 1, (int)lua_tointeger(L, i)) == NULL)
      lua_pop(L, 1);
  }
}

static void block_run(op_runtime *rt, op_task *t);

/* The completion of a block task: the loop thread runs the section. */
static void block_complete(op_task *t) {
  block_run(t->arg, t);
}

/* offpath.block(fn, ...) -> results of fn run on the main thread */
static int wk_block(lua_State *L) {
  op_worker *w = check_worker(L);
  op_pool *p = op__worker_pool(w);
  op_task *t = op__worker_block_task(w);
  char err[512];
  lua_Integer nres;
  int rc, n;

  luaL_checktype(L, 1, LUA_TFUNCTION);
  op__buf_free(&t->buf);
  rc = op__encode(op__worker_xfer(w), L, 1, 1, &t->buf, "function", 0, err,
                  sizeof err);
  if (rc == 0 && lua_gettop(L) > 1)
    rc = op__encode(op__worker_xfer(w), L, 2, lua_gettop(L) - 1, &t->buf,
                    "argument", 1, err, sizeof err);
  if (rc != 0) {
    op__buf_free(&t->buf);
    return luaL_error(L, "%s (in offpath.block)", err);
  }
  if (!op__worker_block_enter(w)) {
    /* Given up as stuck: the loop thread may be gone. */
    op__buf_free(&t->buf);
    return luaL_error(L, "cancelled: offpath.block in a worker given up as "
                         "stuck");
  }
  t->status = 0;
  t->complete = block_complete;
  t->arg = op__pool_rt(p);
  op__complete(op__pool_rt(p), t);
  op__worker_block_sync(w, 1);
  op__worker_block_leave(w);
  /* t->buf now holds the results, or the error message */
  if (t->status != 0) {
    lua_pushlstring(L, t->buf.p, t->buf.len);
    op__buf_free(&t->buf);
    return lua_error(L);
  }
  lua_settop(L, 1); /* fn: its upvalues are the caller's cells */
  n = op__decode(op__worker_xfer(w), L, t->buf.p, t->buf.len, err, sizeof err);
  op__buf_free(&t->buf);
  if (n < 0)
    return luaL_error(L, "%s (block section results)", err);
  nres = n >= 1 && lua_isinteger(L, 2) ? lua_tointeger(L, 2) : -1;
  if (nres < 0 || nres > n - 1)
    return luaL_error(L, "cannot copy: bad block section reply");
  set_upvalues(L, 3 + (int)nres, 1 + n);
  lua_settop(L, 2 + (int)nres);
  return (int)nres;
}

/* offpath.cancelled() -> whether this task was cancelled or timed out */
static int wk_cancelled(lua_State *L) {
  lua_pushboolean(L, op__worker_stopping(check_worker(L)));
  return 1;
}

/* offpath.worker() -> {pool=, id=} */
static int wk_worker(lua_State *L) {
  op_worker *w = check_worker(L);

  lua_createtable(L, 0, 2);
  lua_pushstring(L, op__pool_name(op__worker_pool(w)));
  lua_setfield(L, -2, "pool");
  lua_pushinteger(L, op__worker_id(w));
  lua_setfield(L, -2, "id");
  return 1;
}

/* offpath.sleep(s) in a worker: blocks this worker thread only, in slices
** so that a cancel or deadline stops it. */
static int wk_sleep(lua_State *L) {
  op_worker *w = check_worker(L);
  double s = luaL_checknumber(L, 1);
  uint64_t end, now;
  struct timespec ts;

  luaL_argcheck(L, s >= 0, 1, "seconds must not be negative"); /* NaN too */
  if (s > 1e9)
    s = 1e9; /* about 31 years: keeps the nanoseconds in range */
  end = uv_hrtime() + (uint64_t)(s * 1e9);

  while ((now = uv_hrtime()) < end) {
    if (op__worker_stopping(w))
      return luaL_error(L, "cancelled: task stopped");
    uint64_t left = end - now;
    if (left > 10000000u)
      left = 10000000u;
    ts.tv_sec = 0;
    ts.tv_nsec = (long)left;
    nanosleep(&ts, NULL);
  }
  return 0;
}

static int wk_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_hrtime() / 1e9);
  return 1;
}

static int wk_can_suspend(lua_State *L) {
  lua_pushboolean(L, 0);
  return 1;
}

int op__open_worker(lua_State *L) {
  static const luaL_Reg funcs[] = {
    { "block", wk_block },   { "cancelled", wk_cancelled },
    { "worker", wk_worker }, { "sleep", wk_sleep },
    { "now", wk_now },       { "can_suspend", wk_can_suspend },
    { NULL, NULL }
  };

  luaL_newlib(L, funcs);
  lua_pushliteral(L, OP_VERSION_STRING);
  lua_setfield(L, -2, "version");
  return 1;
}

/* ---- loop side ---- */

static _Thread_local int block_active;

/* os.exit in the main VM: refused inside a block section, which runs for
** a worker between two events (the host would end with its on_stop, its
** summary and its output lost); elsewhere the library's. Upvalue 1: the
** library's os.exit. */
static int main_exit(lua_State *L) {
  if (block_active)
    return luaL_error(L, "os.exit is not allowed in an offpath.block "
                         "section: it would end the host behind its back; "
                         "return or raise an error instead");
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

void op__guard_exit(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, LUA_OSLIBNAME) == LUA_TTABLE) {
    lua_getfield(L, -1, "exit");
    lua_pushcclosure(L, main_exit, 1);
    lua_setfield(L, -2, "exit");
  }
  lua_pop(L, 2); /* no os library (a sandbox): nothing to guard */
}

/* The block section running on this loop thread: its deadline, whether
** the overrun was reported, and whether one runs at all (a coroutine made
** inside a section keeps the hook after it; the hook then removes itself).
** Thread-local so that runtimes on different loop threads do not mix. */
static _Thread_local uint64_t block_deadline;
static _Thread_local int block_warned;

/* Count hook on the main VM during a block section: enforce the budget
** with the runtime's policy. abort: raise, and from then on raise at every
** instruction so that a pcall in the section cannot swallow it; continue:
** report once through the error callback (stderr by default). */
static void budget_hook(lua_State *L, lua_Debug *ar) {
  op_runtime *rt = op__runtime(L);
  char where[256], msg[512];

  (void)ar;
  if (!block_active) {
    lua_sethook(L, NULL, 0, 0);
    return;
  }
  if (uv_hrtime() < block_deadline)
    return;
  if (rt->cfg.block_policy == OP_BLOCK_CONTINUE) {
    if (!block_warned) {
      block_warned = 1;
      snprintf(msg, sizeof msg,
               "warning: block section overran its budget of %g s at %s "
               "(policy continue)",
               rt->cfg.block_budget, op__where(L, where, sizeof where));
      op__report_error(rt, msg);
    }
    return;
  }
  lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1);
  /* lua_pushfstring's %f prints like %.14g: "0.05", not "0.050000". */
  luaL_error(L, "timeout: block section overran its budget of %f s",
             rt->cfg.block_budget);
}

/* debug.sethook in the main VM: the original (upvalue 1), except inside a
** block section, where it raises: the section's budget is a count hook,
** and code sent by a worker must not be able to take it off (on the
** section's thread or on a coroutine it makes). */
static int guarded_sethook(lua_State *L) {
  if (block_active)
    return luaL_error(L, "debug.sethook: not allowed in an offpath.block "
                         "section (its time budget is a hook)");
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, 0);
  return 0;
}

void op__block_guard_hooks(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, LUA_DBLIBNAME) == LUA_TTABLE) {
    lua_getfield(L, -1, "sethook");
    lua_pushcclosure(L, guarded_sethook, 1);
    lua_setfield(L, -2, "sethook");
  }
  lua_pop(L, 2);
}

/* Encode the upvalues of the function at fn that no longer hold the
** values saved at snap.. as (index, value) pairs into t->buf; raises
** naming the first one that cannot be copied.  [-0, +0, e] */
static void send_upvalues(lua_State *L, op_runtime *rt, op_task *t, int fn,
                          int snap, int nup) {
  char err[512], label[128];
  const char *name;
  int i, rc;

  for (i = 1; i <= nup; i++) {
    name = lua_getupvalue(L, fn, i);
    if (name == NULL)
      break;
    if (lua_rawequal(L, -1, snap + i - 1)) {
      lua_pop(L, 1);
      continue;
    }
    lua_pushinteger(L, i);
    rc = op__encode(rt->xfer, L, -1, 1, &t->buf, "upvalue index", 0, err,
                    sizeof err);
    lua_pop(L, 1);
    if (rc == 0) {
      snprintf(label, sizeof label, "upvalue '%s'", name[0] ? name : "?");
      rc = op__encode(rt->xfer, L, -1, 1, &t->buf, label, 0, err, sizeof err);
    }
    if (rc != 0)
      luaL_error(L, "%s (assigned in a block section)", err);
    lua_pop(L, 1);
  }
}

/* Decode, run and encode in protected mode: the results, then the
** upvalues the section assigned (see the top of the file).  [-1, +0, e] */
static int block_body(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  op_task *t = lua_touserdata(L, 1);
  char err[512];
  lua_Debug ar;
  int n, base, rc, nup, i, by_name;

  lua_settop(L, 0);
  /* A function that crossed by name is this VM's own (a module's): what
  ** it assigns is this VM's state, not the caller's. */
  by_name = op__encoded_by_name(t->buf.p, t->buf.len);
  n = op__decode(rt->xfer, L, t->buf.p, t->buf.len, err, sizeof err);
  if (n < 1)
    return luaL_error(L, "%s (into the main VM)", err);
  op__buf_free(&t->buf); /* decoded: the results go in its place */
  /* [fn, args] -> [fn, snapshot of its upvalues, fn, args] */
  lua_pushvalue(L, 1);
  lua_getinfo(L, ">u", &ar);
  nup = by_name ? 0 : ar.nups;
  luaL_checkstack(L, nup + LUA_MINSTACK, "too many upvalues");
  for (i = 1; i <= nup; i++)
    lua_getupvalue(L, 1, i);
  lua_rotate(L, 1, nup);
  lua_pushvalue(L, 1 + nup);
  lua_rotate(L, 1, 1);
  base = 1 + nup;
  /* The section's own error gets its traceback, then crosses as text. */
  if (op__pcall(L, n - 1, LUA_MULTRET, op__traceback) != LUA_OK)
    return lua_error(L);
  lua_pushinteger(L, lua_gettop(L) - base);
  rc = op__encode(rt->xfer, L, -1, 1, &t->buf, "result count", 0, err,
                  sizeof err);
  lua_pop(L, 1);
  if (rc == 0)
    rc = op__encode(rt->xfer, L, base + 1, lua_gettop(L) - base, &t->buf,
                    "result", 1, err, sizeof err);
  if (rc != 0)
    return luaL_error(L, "%s (block section results)", err);
  send_upvalues(L, rt, t, 1, 2, nup);
  return 0;
}

/* Run the section on the main VM's own thread: nothing else runs on the
** loop thread meanwhile (atomic), it is no handler coroutine so it cannot
** suspend, and it allocates no coroutine per section. */
static void block_run(op_runtime *rt, op_task *t) {
  lua_State *L = rt->L;
  int top = lua_gettop(L);
  const char *msg;
  char obuf[64];
  size_t len;

  block_deadline = uv_hrtime() + (uint64_t)(rt->cfg.block_budget * 1e9);
  block_warned = 0;
  block_active = 1;
  lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1000);
  lua_pushcfunction(L, block_body);
  lua_pushlightuserdata(L, t);
  rt->depth++;
  if (op__pcall(L, 1, 0, NULL) != LUA_OK) {
    if (lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tolstring(L, -1, &len);
    else
      msg = op__error_object(L, -1, obuf, sizeof obuf), len = strlen(msg);
    op__buf_free(&t->buf);
    if (op__buf_append(&t->buf, msg, len) != 0)
      op__buf_append(&t->buf, "not enough memory", 17);
    t->status = OP_ESCRIPT;
  } else {
    t->status = 0;
  }
  rt->depth--;
  block_active = 0;
  lua_sethook(L, NULL, 0, 0);
  lua_settop(L, top);
  op__worker_block_sync(t->worker, 0);
}
