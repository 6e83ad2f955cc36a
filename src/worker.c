/* SPDX-License-Identifier: MIT */
/*
** worker.c - a worker thread's Lua VM: making it, running one Lua task in
** it, stopping it. Thread: worker, except op__wvm_catch_stop() (loop) and
** the signal handler (on the worker it stops).
**
** DESIGN
**
** A worker VM is made once, on its thread, when the pool starts: standard
** libraries, package.path, the worker-side offpath module, _OSTLS, the
** transfer state and the pool's init script. pool.c owns the thread and
** calls down here: op__wvm_open and op__wvm_close around its life,
** op__wvm_run for each Lua task (with op__wvm_take and op__wvm_hand_in,
** inline in worker.h, under the pool's lock around it), op__wvm_idle
** before it sleeps. Nothing here calls pool.c: what the VM needs of its
** pool is copied into the worker's record (worker.h).
**
** A task is one protected call: task_body decodes the function and its
** arguments from w->in, calls the function and encodes the results into
** w->out; the message handler and task_body stay on the VM's stack
** between tasks (frame).
**
** Stopping a task. The loop thread sets t->stop and the worker's own copy,
** w->stop (op__pool_stop_task). A count hook (every HOOK_COUNT
** instructions) sees the flag and raises, and then keeps raising on every
** instruction of that coroutine so that a pcall there cannot swallow the
** stop. Worker VMs resume coroutines through co_enter (coroutine.resume
** and coroutine.wrap are wrapped): it keeps the stack of coroutines being
** resumed, for the stop signal, and hooks a coroutine resumed while the
** task runs under the hook; coroutines made by a hooked thread inherit its
** hook; debug.sethook refuses to replace it. C code inside a task
** (os.execute, a blocking read, a pattern match) and __gc finalizers (Lua
** runs them with hooks off) cannot be interrupted this way: see "Stuck
** workers" in pool.c.
**
** The hook is installed only when a task may need stopping: with Lua 5.4 a
** count hook makes the VM trap on every instruction, which halves the
** speed of all Lua code in the worker. A task with a deadline gets it when
** it starts; a running task stopped without one gets it from a signal
** (op_config.stop_signal, SIGRTMIN+4 by default) sent to its worker
** thread, whose handler calls
** lua_sethook on the task's thread and on every coroutine being resumed,
** the way lua.c stops a script on SIGINT. The worker publishes the task it
** runs (and each coroutine it resumes) before it looks at w->stop, and
** the stopper sets w->stop before it signals, so one of the two installs
** the hook.
** (Under ThreadSanitizer, which delivers signals only at calls it
** intercepts, a stopped Lua loop without a deadline keeps running until
** it is given up as stuck.)
**
** The memory limit: alloc.c grants a request past it and arms the same
** hook (mem_arm), which collects and raises if the heap is still past the
** limit (mem_over).
*/
#include <signal.h>
#include <string.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "worker.h"

#define HOOK_COUNT  1000
#define IDLE_GROWTH ((size_t)8 << 20) /* see op__wvm_idle */
/* malloc_trim() trims every arena, the main thread's too: keep this much
** free at the top of the main heap, where a host may have faulted in
** room for the main VM to grow (the offpath command does) and where a
** trim threshold raised as high keeps it anyway. */
#define TRIM_KEEP ((size_t)64 << 20)

static _Thread_local op_worker *self;

op_worker *op__worker_self(void) {
  return self;
}

static void stop_hook(lua_State *L, lua_Debug *ar);

/* alloc.c granted a request past the limit: arm the hook, which raises
** at the next instruction, on the VM's thread and on every coroutine being
** resumed (a hook belongs to one thread; the innermost one runs now).
** Thread: worker. */
static void mem_arm(op_vmem *m) {
  op_worker *w = (op_worker *)(void *)((char *)m - offsetof(op_worker, mem));
  int i, n = w->ncos;

  lua_sethook(m->L, stop_hook, LUA_MASKCOUNT, 1);
  for (i = 0; i < n; i++)
    lua_sethook(w->cos[i], stop_hook, LUA_MASKCOUNT, 1);
}

/* Put the hooks mem_arm set back as they were: none, or the stop hook
** every HOOK_COUNT instructions (stop_hook goes back to every instruction
** if a stop is due). Thread: worker. */
static void mem_disarm(op_worker *w, lua_State *L) {
  int i, n = w->ncos;

  if (!w->hooked) {
    lua_sethook(L, NULL, 0, 0);
    lua_sethook(w->L, NULL, 0, 0);
    for (i = 0; i < n; i++)
      lua_sethook(w->cos[i], NULL, 0, 0);
  } else {
    lua_sethook(L, stop_hook, LUA_MASKCOUNT, HOOK_COUNT);
    lua_sethook(w->L, stop_hook, LUA_MASKCOUNT, HOOK_COUNT);
    for (i = 0; i < n; i++)
      lua_sethook(w->cos[i], stop_hook, LUA_MASKCOUNT, HOOK_COUNT);
  }
}

/* The heap went past the limit and alloc.c armed the hook: put the hook
** back as it was, collect, and raise if a task runs and the heap is still
** past the limit.  [-0, +0, e] */
static void mem_over(op_worker *w, lua_State *L) {
  char lim[32], where[256] = "?";
  lua_Debug ar;

  w->mem.over = 0;
  mem_disarm(w, L);
  if (w->current == NULL)
    return;
  lua_gc(L, LUA_GCCOLLECT, 0);
  if (op__vm_used(&w->mem) <= w->mem.limit)
    return;
  if (lua_getstack(L, 0, &ar) && lua_getinfo(L, "Sl", &ar) &&
      ar.currentline > 0)
    snprintf(where, sizeof where, "%s:%d", ar.short_src, ar.currentline);
  lua_pushfstring(L, "memory limit of %s reached in task at %s",
                  op__fmt_size(w->mem.limit, lim, sizeof lim), where);
  lua_error(L);
}

/* The count hook of worker VMs: raise if the running task must stop or
** went past its memory limit. It is set on every coroutine of the task
** (co_enter, the stop signal), and once the stop is seen it fires on every
** instruction of the coroutine it fired in, so that a pcall there cannot
** swallow the stop. */
static void stop_hook(lua_State *L, lua_Debug *ar) {
  op_worker *w = *(op_worker **)lua_getextraspace(L);
  int code;

  (void)ar;
  if (w != NULL && w->mem.over)
    mem_over(w, L);
  if (w == NULL || w->current == NULL)
    return;
  code = atomic_load_explicit(&w->stop, memory_order_relaxed);
  if (code == 0) {
    /* Installed by a signal meant for an earlier task: slow down. */
    if (lua_gethookcount(L) == 1)
      lua_sethook(L, stop_hook, LUA_MASKCOUNT, HOOK_COUNT);
    return;
  }
  if (lua_gethookcount(L) != 1)
    lua_sethook(L, stop_hook, LUA_MASKCOUNT, 1);
  if (code == OP_ETIMEDOUT)
    luaL_error(L, "timeout: task stopped at its deadline");
  luaL_error(L, "cancelled: task stopped");
}

/* co is about to be resumed by a task running on w: put it on w's stack
** of resumed coroutines, and give it the stop hook if the task runs under
** one (a coroutine made before the hook, or kept in _OSTLS from an earlier
** task, has none). The stopper sets w->stop before it signals: either
** the signal finds co on the stack, or the check after the push sees the
** stop. Returns whether co was pushed. Thread: worker. */
static int co_enter(op_worker *w, lua_State *co) {
  int n = w->ncos;

  if (w->current == NULL || n >= MAX_COS)
    return 0;
  w->cos[n] = co;
  atomic_signal_fence(memory_order_seq_cst);
  w->ncos = n + 1;
  atomic_signal_fence(memory_order_seq_cst);
  if (atomic_load_explicit(&w->stop, memory_order_relaxed) != 0) {
    w->hooked = 1;
    lua_sethook(co, stop_hook, LUA_MASKCOUNT, 1);
  } else if (w->hooked && lua_gethook(co) != stop_hook) {
    lua_sethook(co, stop_hook, LUA_MASKCOUNT, HOOK_COUNT);
  } else if (!w->hooked && !w->mem.over && lua_gethook(co) == stop_hook) {
    lua_sethook(co, NULL, 0, 0); /* left from an earlier task (_OSTLS) */
  }
  return 1;
}

static void co_leave(op_worker *w, int pushed) {
  if (pushed)
    w->ncos = w->ncos - 1;
}

/* Call the function at upvalue 1 with the arguments on L's stack, with co
** (at upvalue 2, or argument 1) on w's stack of resumed coroutines.
** [-n, +r, e] */
static int co_call(lua_State *L, lua_State *co) {
  op_worker *w = *(op_worker **)lua_getextraspace(L);
  int pushed, status;

  if (w == NULL || co == NULL || op__worker_self() != w) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
  }
  pushed = co_enter(w, co);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  status = op__pcall(L, lua_gettop(L) - 1, LUA_MULTRET, NULL);
  co_leave(w, pushed);
  if (status != LUA_OK)
    return lua_error(L);
  return lua_gettop(L);
}

/* coroutine.resume in worker VMs: the library's, with co_enter. */
static int wk_co_resume(lua_State *L) {
  return co_call(L, lua_tothread(L, 1));
}

/* The functions coroutine.wrap returns in worker VMs. */
static int wk_co_wrapped(lua_State *L) {
  return co_call(L, lua_tothread(L, lua_upvalueindex(2)));
}

/* coroutine.wrap in worker VMs: the library's function, called through
** wk_co_wrapped so that its coroutine goes through co_enter.
** Upvalue 1: the library's wrap; 2: wk_co_wrapped's nothing. */
static int wk_co_wrap(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, 1, 1); /* the library's wrapper; its upvalue is the thread */
  if (lua_getupvalue(L, 1, 1) == NULL || !lua_isthread(L, -1))
    return 1; /* not the closure we know: hand it out as it is */
  lua_pushcclosure(L, wk_co_wrapped, 2);
  return 1;
}

/* debug.sethook in worker VMs: refused where it would take the stop hook
** off a coroutine of a task that runs under it (a deadline, or a stop
** requested). Upvalue 1: the library's. */
static int wk_sethook(lua_State *L) {
  lua_State *co = lua_isthread(L, 1) ? lua_tothread(L, 1) : L;

  if (lua_gethook(co) == stop_hook)
    return luaL_error(L, "debug.sethook: the task runs under the stop hook "
                         "(it has a deadline or was stopped), which worker "
                         "code cannot replace");
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, 0);
  return 0;
}

/* os.exit in worker VMs: it would end the host from a worker thread, with
** no on_stop, no summary and output lost. */
static int wk_exit(lua_State *L) {
  return luaL_error(L, "os.exit is not allowed in a worker: it would end "
                       "the host behind its back; return or raise an error "
                       "instead");
}

/* Replace lib.name (lib a global table) by fn, a closure over the old
** value.  [-0, +0, m] */
static void replace(lua_State *L, const char *lib, const char *name,
                    lua_CFunction fn) {
  lua_getglobal(L, lib);
  lua_getfield(L, -1, name);
  lua_pushcclosure(L, fn, 1);
  lua_setfield(L, -2, name);
  lua_pop(L, 1);
}

/* The worker-side offpath module, _OSTLS and the guarded library
** functions, protected. Argument 1: the worker.  [-0, +0, m] */
static int worker_open_p(lua_State *L) {
  op_worker *w = lua_touserdata(L, 1);

  luaL_requiref(L, "offpath", w->rt->open_worker, 1);
  lua_newtable(L);
  lua_setglobal(L, "_OSTLS");
  lua_pushboolean(L, 0);
  w->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  /* Before the transfer state names the library: a function crossing as
  ** "coroutine.wrap" resolves to these. */
  replace(L, "coroutine", "resume", wk_co_resume);
  replace(L, "coroutine", "wrap", wk_co_wrap);
  replace(L, "debug", "sethook", wk_sethook);
  replace(L, "os", "exit", wk_exit);
  return 0;
}

int op__wvm_open(op_worker *w) {
  lua_State *L;

  self = w;
  w->mem.hook = stop_hook;
  w->mem.arm = mem_arm;
  L = op__new_state(w->rt, &w->mem);
  if (L != NULL) {
    *(op_worker **)lua_getextraspace(L) = w;
    lua_pushcfunction(L, worker_open_p);
    lua_pushlightuserdata(L, w);
    if (op__pcall(L, 1, 0, NULL) != LUA_OK ||
        (w->xfer = op__xfer_new(L, w->rt->protos)) == NULL) {
      lua_close(L);
      L = NULL;
    }
  }
  if (L == NULL) {
    /* Tried again at the next task (op__wvm_run). */
    fprintf(stderr,
            "offpath: pool '%s' worker %d: cannot make its Lua state: not "
            "enough memory\n",
            w->pool_name, w->id);
    return -1;
  }
  w->L = L;
  op__xfer_paths_in(w->xfer, L); /* the init script sees them too */
  if (w->init != NULL) {
    if (luaL_loadfile(L, w->init) != LUA_OK ||
        op__pcall(L, 0, 0, op__traceback) != LUA_OK) {
      fprintf(stderr, "offpath: pool '%s' worker %d: init script: %s\n",
              w->pool_name, w->id, lua_tostring(L, -1));
      lua_pop(L, 1);
    }
  }
  w->mem.rest = op__vm_used(&w->mem); /* no collection: start quickly */
  return 0;
}

/* The stop signal, on the worker thread whose running task was stopped:
** install the stop hook on the task's thread and on every coroutine being
** resumed (async-signal-safe by Lua's design). */
static void stop_signal(int sig) {
  op_worker *w = self;
  int i, n;

  (void)sig;
  if (w != NULL && w->L != NULL && w->current != NULL) {
    w->hooked = 1;
    lua_sethook(w->L, stop_hook, LUA_MASKCOUNT, 1);
    n = w->ncos;
    for (i = 0; i < n; i++)
      lua_sethook(w->cos[i], stop_hook, LUA_MASKCOUNT, 1);
  }
}

void op__wvm_catch_stop(int sig) {
  struct sigaction sa;

  memset(&sa, 0, sizeof sa);
  sa.sa_handler = stop_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(sig, &sa, NULL) != 0)
    OP_PANIC("cannot install the task stop signal handler");
}

void op__wvm_close(op_worker *w) {
  w->current = NULL;
  if (w->xfer != NULL)
    op__xfer_free(w->xfer);
  if (w->L != NULL)
    lua_close(w->L);
  w->xfer = NULL;
  w->L = NULL;
  self = NULL;
}

/* About to sleep with a heap that more than doubled, by IDLE_GROWTH bytes
** or more, since set-up or the last such collection (a big argument or
** result, a task that built a large table): collect it with mu released,
** and give the freed memory back to the system. Returns whether it did.
** Thread: worker, with mu held. */
int op__wvm_idle(op_worker *w, uv_mutex_t *mu) {
  size_t used;

  if (w->L == NULL || (used = op__vm_used(&w->mem)) <= 2 * w->mem.rest ||
      used - w->mem.rest < IDLE_GROWTH)
    return 0;
  uv_mutex_unlock(mu);
  lua_gc(w->L, LUA_GCCOLLECT, 0);
  w->mem.rest = op__vm_used(&w->mem);
#ifdef __GLIBC__
  malloc_trim(TRIM_KEEP); /* free pages inside the heaps go back too */
#endif
  uv_mutex_lock(mu);
  return 1;
}

/* The protected body of a Lua task: decode the function and arguments
** from w->in, call the function, encode its results into w->out. Returns
** nothing, or the message when decoding or encoding fails; an error of
** the function itself propagates to run_lua's pcall, whose message
** handler adds the traceback (one protected call per task).  [-0, +(0|1), e] */
static int task_body(lua_State *L) {
  op_worker *w = *(op_worker **)lua_getextraspace(L);
  lua_Debug ar;
  char err[512];
  int n, rc;

  op__xfer_paths_in(w->xfer, L);
  n = op__decode(w->xfer, L, w->in.p, w->in.len, err, sizeof err);
  if (n < 1) {
    lua_pushstring(L, n < 0 ? err : "cannot copy: no function");
    return 1;
  }
  /* Where the function is defined, for a report if it never stops. The
  ** chunk name lives as long as the VM (the prototype is cached). A
  ** function sent again often arrives as the same closure (transfer.c):
  ** the last one is kept (so its address means it), and not looked up
  ** again. */
  if (lua_topointer(L, 1) != w->fn_last) {
    w->fn_last = lua_topointer(L, 1);
    lua_pushvalue(L, 1);
    lua_rawseti(L, LUA_REGISTRYINDEX, w->fn_ref);
    lua_pushvalue(L, 1);
    if (lua_getinfo(L, ">S", &ar)) {
      w->fn_src_last = ar.source;
      w->fn_line_last = ar.linedefined;
    }
  }
  atomic_store_explicit(&w->fn_line, w->fn_line_last, memory_order_relaxed);
  atomic_store_explicit(&w->fn_src, w->fn_src_last, memory_order_release);
  lua_call(L, n - 1, LUA_MULTRET);
  rc = op__encode(w->xfer, L, 1, lua_gettop(L), &w->out, "result", 1, err,
                  sizeof err);
  if (rc != 0) {
    lua_pushstring(L, err);
    return 1;
  }
  return 0; /* the results are dropped with the frame */
}

/* The worker VM's stack between tasks: the message handler and task_body,
** pushed once, so that a task costs one pushvalue and one pcall.
** [-0, +0, m] (the VM has room for two values: it is fresh or empty) */
#define FRAME_TOP 2
static void frame(lua_State *L) {
  lua_settop(L, 0);
  lua_pushcfunction(L, op__xfer_msgh);
  lua_pushcfunction(L, task_body);
}

/* Run the Lua task whose arguments are in w->in, in w's VM: its outcome
** goes to w->status and w->out, never to the task (op__wvm_hand_in). */
static void run_lua(op_worker *w, op_task *t) {
  lua_State *L = w->L;
  size_t len;
  const char *msg;
  char lim[32], mbuf[128], obuf[64]; /* no Lua allocation: unprotected */
  int stop, st, ok, value = 0;

  w->current = t;
  atomic_signal_fence(memory_order_seq_cst);
  if (w->watch || w->signo == 0 || atomic_load(&w->stop) != 0) {
    w->hooked = 1;
    lua_sethook(L, stop_hook, LUA_MASKCOUNT, HOOK_COUNT);
  }
  if (lua_gettop(L) != FRAME_TOP)
    frame(L);
  op_assert(lua_tocfunction(L, FRAME_TOP) == task_body);
  lua_pushvalue(L, FRAME_TOP);
  w->mem.hit = 0;
  st = op__pcall_at(L, 0, 1, 1);
  ok = st == LUA_OK && lua_isnil(L, -1); /* else the message is on top */
  w->current = NULL;
  atomic_signal_fence(memory_order_seq_cst);
  w->ncos = 0;
  if (w->hooked || w->mem.over || lua_gethook(L) != NULL) {
    /* Also a hook a coroutine's memory check left on the VM's thread. */
    w->hooked = 0;
    w->mem.over = 0;
    lua_sethook(L, NULL, 0, 0);
  }
  stop = atomic_load(&w->stop);
  w->errval = 0;
  if (ok) {
    w->status = 0;
  } else if (stop != 0) {
    w->status = stop;
    op__buf_free(&w->out);
  } else {
    w->status = OP_ESCRIPT;
    op__buf_free(&w->out);
    if ((st == LUA_ERRMEM || st == LUA_ERRERR) && w->mem.hit) {
      /* Refused by the limit where the hook could not raise (alloc.c):
      ** Lua's memory errors carry no position. */
      msg = lua_type(L, -1) == LUA_TSTRING
                ? lua_tolstring(L, -1, &len)
                : op__error_object(L, -1, obuf, sizeof obuf);
      snprintf(mbuf, sizeof mbuf, "memory limit of %s reached in task (%s)",
               op__fmt_size(w->mem.limit, lim, sizeof lim), msg);
      if (op__buf_append(&w->out, mbuf, strlen(mbuf)) != 0)
        w->status = OP_ENOMEM;
    } else if (op__encode_error(w->xfer, L, &w->out, &value) != 0) {
      w->status = OP_ENOMEM;
    }
    w->errval = value;
  }
  lua_settop(L, FRAME_TOP);
  if (w->mem.hit) {
    /* The task left its heap near the limit: start the next one clean. */
    lua_gc(L, LUA_GCCOLLECT, 0);
    w->mem.hit = 0;
  }
}

void op__wvm_run(op_worker *w, op_task *t) {
  if ((w->status = atomic_load(&w->stop)) != 0) {
    /* stopped before it ran */
  } else if (w->L != NULL || op__wvm_open(w) == 0) {
    run_lua(w, t);
  } else {
    w->status = OP_ESCRIPT;
    op__buf_append(&w->out, "not enough memory (worker has no Lua state)", 43);
  }
}

op_xfer *op__worker_xfer(op_worker *w) {
  return w->xfer;
}

int op__worker_stopping(op_worker *w) {
  return w->current != NULL &&
         atomic_load_explicit(&w->stop, memory_order_relaxed) != 0;
}
