/* SPDX-License-Identifier: MIT */
/*
** sched.c - main-thread coroutines and the waits they suspend on.
** Thread: loop, always.
**
** DESIGN
**
** Every handler runs in a coroutine (an op_co). A coroutine suspends only
** through a wait: op__wait_new() takes a slot in rt->waits and returns its
** id (generation << 32 | slot), the caller starts an operation that
** remembers the id, and op__wait_yield() yields with a continuation. The
** wait is resolved exactly once, by whichever comes first:
**
**     operation done ---- op__wait_resume / op__wait_fail ----.
**     deadline ---------- wait_timer_cb (abort: ETIMEDOUT) -----+--> resolved
**     task cancelled ---- op__wait_cancel (abort: ECANCELED) ---'
**     shutdown ---------- op__sched_cancel_all -----------------'
**
** Resolving frees the slot (the generation moves on), so whatever comes
** later finds op__wait_thread() == NULL and only frees its own resources.
** The resolver pushes (true, results...) or (false, message) on the
** coroutine, which wait_k() turns into return values or an error. A
** resolver never raises: what must be made (results, a message) is made on
** the main thread in protected mode first and then moved (op__wait_move,
** op__wait_fail); if it cannot be, the wait fails with "not enough memory".
**
** A resolution that happens while Lua code is running on the loop thread
** (rt->depth > 0, e.g. task:cancel() resolving another coroutine's wait)
** does not resume at once: the coroutine goes on the ready list and runs on
** the next loop turn, so no C frame is re-entered under its caller.
**
** Resumes never nest. co_resume() called at the top (a completion, a
** timer) resumes at once and then runs, in a loop, every coroutine woken
** meanwhile (rt->run_head): a go task that ends tells its waiter, whose
** end tells the next one, and so on; each is queued by the one before and
** resumed from the loop, never from inside the previous resume, so a
** chain of a million waiters needs no more C stack than one. The common
** case, one waiter woken by a completion, is still resumed directly.
**
** Coroutines that return normally are reused (their stack is empty again);
** ones that fail are dropped. A bare coroutine.yield() in a handler is a
** cooperative yield: the coroutine is resumed on the next loop turn.
*/
#include <string.h>

#include "internal.h"

#define MAX_FREE_COS 256

struct op_wait {
  op_co *co; /* NULL when the slot is free */
  uint32_t gen;
  uint32_t next_free; /* free-list link, UINT32_MAX at the end */
  op_timer *timer;    /* deadline, or NULL */
  op_abort_fn abort;
  void *what;
  const char *call; /* static name of the suspending call */
  double timeout;
};

struct op_defer {
  op_defer *next;
  void (*fn)(op_runtime *rt, void *arg);
  void *arg;
};

static void co_resume(op_co *c, int nargs);
static void idle_cb(uv_idle_t *idle);

/* c's resume is deferred: keep the time its values took to build, not
** the time it waits. */
static void prep_settle(op_co *c) {
  if (c->prep_t0 != 0) {
    c->prep_ns += op__ticker_since(&c->rt->ticker, c->prep_t0);
    c->prep_t0 = 0;
  }
}

/* Append c, to be resumed with nargs values, to the list head..tail. */
static void co_append(op_co **head, op_co **tail, op_co *c, int nargs) {
  prep_settle(c);
  c->ready_nargs = nargs;
  c->next = NULL;
  if (*tail != NULL)
    (*tail)->next = c;
  else
    *head = c;
  *tail = c;
}

/* Queue c to be resumed with nargs values by the co_resume() running now,
** once the resume in progress has returned. */
static void run_push(op_co *c, int nargs) {
  co_append(&c->rt->run_head, &c->rt->run_tail, c, nargs);
}

/* Queue c to be resumed with nargs values on the next loop turn. */
static void ready_push(op_co *c, int nargs) {
  op_runtime *rt = c->rt;

  co_append(&rt->ready_head, &rt->ready_tail, c, nargs);
  if (!uv_is_active((uv_handle_t *)&rt->idle))
    uv_idle_start(&rt->idle, idle_cb);
}

/* ---- slots ---- */

static op_wait_id wait_id(op_runtime *rt, uint32_t slot) {
  return ((uint64_t)rt->waits[slot].gen << 32) | slot;
}

static op_wait *wait_get(op_runtime *rt, op_wait_id id) {
  uint32_t slot = (uint32_t)(id & 0xffffffffu);
  op_wait *w;

  if (id == 0 || slot >= rt->nwaits)
    return NULL;
  w = &rt->waits[slot];
  if (w->co == NULL || w->gen != (uint32_t)(id >> 32))
    return NULL;
  return w;
}

/* Take a free slot, growing the array. Returns its index or UINT32_MAX on
** out of memory. */
static uint32_t slot_alloc(op_runtime *rt) {
  uint32_t i, n, slot;
  op_wait *p;

  if (rt->free_wait == UINT32_MAX) {
    n = rt->nwaits ? rt->nwaits * 2 : 64;
    p = realloc(rt->waits, n * sizeof *p);
    if (p == NULL)
      return UINT32_MAX;
    for (i = rt->nwaits; i < n; i++) {
      memset(&p[i], 0, sizeof p[i]);
      p[i].gen = 1;
      p[i].next_free = i + 1 < n ? i + 1 : UINT32_MAX;
    }
    rt->waits = p;
    rt->free_wait = rt->nwaits;
    rt->nwaits = n;
  }
  slot = rt->free_wait;
  rt->free_wait = rt->waits[slot].next_free;
  return slot;
}

static void timer_close_cb(uv_handle_t *h) {
  free(h);
}

op_timer *op__timer_start(op_runtime *rt, uint64_t ms, uv_timer_cb cb,
                          op_wait_id id, void *data) {
  op_timer *t = malloc(sizeof *t);

  if (t == NULL)
    return NULL;
  uv_timer_init(rt->loop, &t->h);
  t->rt = rt;
  t->id = id;
  t->data = data;
  /* The loop's clock is read once per turn; a handler that ran long since
  ** would make the timer fire early. */
  uv_update_time(rt->loop);
  uv_timer_start(&t->h, cb, ms, 0);
  return t;
}

void op__timer_close(op_timer *t) {
  uv_timer_stop(&t->h);
  uv_close((uv_handle_t *)&t->h, timer_close_cb);
}

/* Free the slot of w and detach it from its coroutine. Returns the
** coroutine that was waiting. */
static op_co *wait_take(op_runtime *rt, op_wait *w) {
  op_co *c = w->co;
  uint32_t slot = (uint32_t)(w - rt->waits);

  if (w->timer != NULL) {
    op__timer_close(w->timer);
    w->timer = NULL;
  }
  w->co = NULL;
  w->gen++;
  if (w->gen == 0)
    w->gen = 1;
  w->abort = NULL;
  w->what = NULL;
  w->next_free = rt->free_wait;
  rt->free_wait = slot;
  rt->pending_waits--;
  c->wait = 0;
  c->waiting = 0;
  c->awaiting = NULL;
  return c;
}

/* ---- where a coroutine is ---- */

/* ---- waits ---- */

int op__can_suspend(lua_State *L) {
  op_co *c = op__co(L);
  return c != NULL && c->handler && c->L == L && !c->rt->closing &&
         lua_isyieldable(L);
}

void op__check_suspend(lua_State *L, const char *call) {
  op_co *c = op__co(L);

  if (op__can_suspend(L))
    return;
  if (c != NULL && c->rt->closing && c->handler)
    luaL_error(L, "cannot suspend: %s while the runtime shuts down", call);
  if (c == NULL || c->L != L || !c->handler) {
    if (c != NULL && L == c->rt->L)
      luaL_error(L,
                 "cannot suspend: %s called outside a handler (the main "
                 "chunk, block sections and callbacks such as onresult "
                 "must not wait; use offpath.go or a non-suspending form)",
                 call);
    luaL_error(L,
               "cannot suspend: %s called in a coroutine offpath does not "
               "run (use offpath.go instead of coroutine.create/wrap)",
               call);
  }
  luaL_error(L,
             "cannot suspend: %s called across a C boundary that cannot "
             "yield (e.g. a table.sort comparator, __gc or a C callback)",
             call);
}

/* Resolve w with the error text, then abort the operation behind it with
** code (OP_ETIMEDOUT, OP_ECANCELED): a deadline and a cancel end a wait
** the same way. */
static void wait_abort(op_runtime *rt, op_wait *w, const char *text, int code) {
  op_abort_fn abort = w->abort;
  void *what = w->what;
  op_co *c = wait_take(rt, w);

  lua_pushboolean(c->L, 0);
  op__push_text(rt->L, text); /* protected: OP_NOMEM if it cannot */
  lua_xmove(rt->L, c->L, 1);
  if (abort != NULL)
    abort(what, code);
  co_resume(c, 2);
}

static void wait_timer_cb(uv_timer_t *timer) {
  op_timer *t = (op_timer *)timer;
  op_runtime *rt = t->rt;
  op_wait *w = wait_get(rt, t->id);
  char where[256], msg[512];

  if (w == NULL)
    return;
  snprintf(msg, sizeof msg, "timeout after %g s in %s at %s", w->timeout,
           w->call, op__where(w->co->L, where, sizeof where));
  wait_abort(rt, w, msg, OP_ETIMEDOUT);
}

op_wait_id op__wait_new(lua_State *L, const char *call, double timeout,
                        op_abort_fn abort, void *what) {
  op_co *c;
  op_runtime *rt;
  uint32_t slot;
  op_wait *w;

  op__check_suspend(L, call);
  c = op__co(L);
  rt = c->rt;
  op_assert(c->wait == 0);
  slot = slot_alloc(rt);
  if (slot == UINT32_MAX)
    luaL_error(L, "not enough memory");
  w = &rt->waits[slot];
  w->co = c;
  w->abort = abort;
  w->what = what;
  w->call = call;
  w->timeout = timeout;
  w->timer = NULL;
  rt->pending_waits++;
  c->wait = wait_id(rt, slot);
  c->prep_t0 = 0;
  if (timeout > 0) {
    w->timer = op__timer_start(rt, (uint64_t)(timeout * 1000.0 + 0.5),
                               wait_timer_cb, c->wait, NULL);
    if (w->timer == NULL) {
      wait_take(rt, w); /* nothing started yet: give the slot back */
      luaL_error(L, OP_NOMEM);
    }
  }
  return c->wait;
}

void op__wait_drop(op_runtime *rt, op_wait_id id) {
  op_wait *w = wait_get(rt, id);

  if (w != NULL)
    wait_take(rt, w);
}

void op__wait_set_abort(op_runtime *rt, op_wait_id id, op_abort_fn abort,
                        void *what) {
  op_wait *w = wait_get(rt, id);

  if (w != NULL) {
    w->abort = abort;
    w->what = what;
  }
}

/* Continuation of every wait: the resolver pushed (true, results...) or
** (false, message) above the yield point ctx.  [-0, +n, e] */
static int wait_k(lua_State *L, int status, lua_KContext ctx) {
  int base = (int)ctx;

  (void)status;
  if (lua_gettop(L) > base && lua_toboolean(L, base + 1))
    return lua_gettop(L) - base - 1;
  lua_settop(L, base + 2);
  return lua_error(L);
}

int op__wait_yield(lua_State *L) {
  return op__wait_yieldk(L, (lua_KContext)lua_gettop(L), wait_k);
}

int op__wait_yieldk(lua_State *L, lua_KContext ctx, lua_KFunction k) {
  op_co *c = op__co(L);

  op_assert(c->wait != 0);
  c->waiting = 1;
  return lua_yieldk(L, 0, ctx, k);
}

/* The resolver is about to build the values to resume with on the thread:
** that time counts in the resume's latency (co_run), since it runs on the
** loop thread as much as the resume does (a result of two million rows
** takes a second to build). */
lua_State *op__wait_thread(op_runtime *rt, op_wait_id id) {
  op_wait *w = wait_get(rt, id);

  if (w == NULL)
    return NULL;
  if (w->co->prep_t0 == 0)
    w->co->prep_t0 = op__ticker_read(&rt->ticker);
  return w->co->L;
}

/* Resolve the wait id with the n values the resolver pushed on its
** thread, as a success (ok) or a failure: ok goes under them. */
static void wait_settle(op_runtime *rt, op_wait_id id, int ok, int n) {
  op_wait *w = wait_get(rt, id);
  op_co *c;

  if (w == NULL)
    return;
  c = wait_take(rt, w);
  lua_pushboolean(c->L, ok);
  lua_insert(c->L, -(n + 1));
  co_resume(c, n + 1);
}

void op__wait_resume(op_runtime *rt, op_wait_id id, int nres) {
  wait_settle(rt, id, 1, nres);
}

void op__wait_move(op_runtime *rt, op_wait_id id, lua_State *from, int n,
                   int ok) {
  op_wait *w = wait_get(rt, id);
  op_co *c;

  if (w == NULL) {
    lua_pop(from, n);
    return;
  }
  c = wait_take(rt, w);
  if (!lua_checkstack(c->L, n + 1)) {
    /* The two values of a failure fit: a waiting C function has
    ** LUA_MINSTACK slots. */
    lua_pop(from, n);
    lua_pushboolean(c->L, 0);
    op__push_nomem(c->L);
    co_resume(c, 2);
    return;
  }
  lua_pushboolean(c->L, ok);
  lua_xmove(from, c->L, n);
  co_resume(c, n + 1);
}

void op__wait_fail_value(op_runtime *rt, op_wait_id id) {
  wait_settle(rt, id, 0, 1);
}

void op__wait_fail(op_runtime *rt, op_wait_id id, const char *msg) {
  if (wait_get(rt, id) == NULL)
    return;
  op__push_text(rt->L, msg); /* protected: OP_NOMEM if it cannot */
  op__wait_move(rt, id, rt->L, 1, 0);
}

void op__wait_cancel(op_runtime *rt, op_wait_id id, const char *msg, int code) {
  op_wait *w = wait_get(rt, id);
  char where[256], text[512];

  if (w == NULL)
    return;
  snprintf(text, sizeof text, "%s (%s at %s)", msg, w->call,
           op__where(w->co->L, where, sizeof where));
  wait_abort(rt, w, text, code);
}

void op__sched_cancel_all(op_runtime *rt) {
  uint32_t i;

  for (i = 0; i < rt->nwaits; i++)
    if (rt->waits[i].co != NULL)
      op__wait_cancel(rt, wait_id(rt, i),
                      rt->closing ? "cancelled: runtime shutting down"
                                  : "cancelled: the host cancelled "
                                    "suspended handlers",
                      OP_ECANCELED);
}

/* ---- deferred work ---- */

static void idle_start(op_runtime *rt) {
  if (!uv_is_active((uv_handle_t *)&rt->idle))
    uv_idle_start(&rt->idle, idle_cb);
}

void op__defer(op_runtime *rt, void (*fn)(op_runtime *, void *), void *arg) {
  op_defer *d = malloc(sizeof *d);

  if (d == NULL)
    OP_PANIC("out of memory deferring work");
  d->next = NULL;
  d->fn = fn;
  d->arg = arg;
  if (rt->defer_tail != NULL)
    rt->defer_tail->next = d;
  else
    rt->defer_head = d;
  rt->defer_tail = d;
  idle_start(rt);
}

static void idle_cb(uv_idle_t *idle) {
  op_runtime *rt = idle->data;
  op_co *c, *ready;
  op_defer *d, *defers;

  ready = rt->ready_head;
  rt->ready_head = rt->ready_tail = NULL;
  defers = rt->defer_head;
  rt->defer_head = rt->defer_tail = NULL;
  uv_idle_stop(idle);
  while ((c = ready) != NULL) {
    ready = c->next;
    c->next = NULL;
    co_resume(c, c->ready_nargs);
  }
  while ((d = defers) != NULL) {
    defers = d->next;
    d->fn(rt, d->arg);
    free(d);
  }
}

/* ---- coroutines ---- */

/* The protected part of making a coroutine: its thread, anchored. */
static int new_thread_p(lua_State *L) {
  op_co *c = lua_touserdata(L, 1);

  c->L = lua_newthread(L);
  c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

op_co *op__co_acquire(op_runtime *rt) {
  op_co *c;

  if ((c = rt->free_cos) != NULL) {
    rt->free_cos = c->next;
    rt->nfree_cos--;
    c->next = NULL;
    return c;
  }
  c = calloc(1, sizeof *c);
  if (c == NULL)
    return NULL;
  c->rt = rt;
  c->handler = 1;
  c->ctx_ref = LUA_NOREF;
  if (op__protect(rt->L, new_thread_p, c, 0) != LUA_OK) {
    lua_pop(rt->L, 1);
    free(c);
    return NULL;
  }
  *(op_co **)lua_getextraspace(c->L) = c;
  return c;
}

/* Put c back for reuse, or drop it; it leaves its invocation group. */
static void co_release(op_co *c, int reusable) {
  op_runtime *rt = c->rt;
  op_group *g = c->grp;

  if (c->ctx_ref != LUA_NOREF) {
    luaL_unref(rt->L, LUA_REGISTRYINDEX, c->ctx_ref);
    c->ctx_ref = LUA_NOREF;
  }
  c->on_end = NULL;
  c->data = NULL;
  c->grp = NULL;
  if (reusable && rt->nfree_cos < MAX_FREE_COS && !rt->closing) {
    lua_settop(c->L, 0);
    c->next = rt->free_cos;
    rt->free_cos = c;
    rt->nfree_cos++;
  } else {
    *(op_co **)lua_getextraspace(c->L) = &rt->root;
    luaL_unref(rt->L, LUA_REGISTRYINDEX, c->ref);
    free(c);
  }
  op__group_leave(rt, g, NULL);
}

/* The protected body of push_co_error: the error value of the dead
** coroutine (the argument) is moved to L, where its text is made: a
** __tostring runs on a thread that can call. */
static int co_error_p(lua_State *L) {
  op_co *c = lua_touserdata(L, 1);
  const char *msg;
  int err;

  lua_xmove(c->L, L, 1);
  err = lua_gettop(L);
  msg = lua_type(L, err) == LUA_TSTRING ? lua_tostring(L, err) : NULL;
  if (msg == NULL) {
    msg = op__error_text(L, err);
    if (op__error_traceback(L, err)) {
      /* It came from a task: where it was raised first. */
      msg = lua_pushfstring(L, "%s\n%s\nraised again here:", msg,
                            lua_tostring(L, -1));
    }
  }
  luaL_traceback(L, c->L, msg, 0);
  return 1;
}

/* A coroutine failed: build "message\nstack traceback" of it on rt->L,
** or OP_NOMEM if that cannot be made.  [-0, +1, -] */
static void push_co_error(op_co *c) {
  lua_State *L = c->rt->L;

  if (op__protect(L, co_error_p, c, 1) != LUA_OK &&
      lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    op__push_nomem(L);
  }
}

/* Resume c with the nargs values on its stack once, and handle the
** outcome. Called by co_resume() only. */
static void co_run(op_co *c, int nargs) {
  op_runtime *rt = c->rt;
  int status, nres = 0, quiet = c->quiet;
  uint64_t t0;
  op_group *saved_grp;

  if (c->counted) {
    c->counted = 0;
    rt->suspended--;
  }
  /* From when the resolver began building the values, if it said so. */
  if ((t0 = c->prep_t0) != 0)
    c->prep_t0 = 0;
  else
    t0 = op__ticker_read(&rt->ticker);
  saved_grp = rt->grp;
  rt->grp = c->grp; /* what it starts joins its group */
  rt->depth++;
  __atomic_store_n(&rt->running, c->L, __ATOMIC_RELAXED);
  status = lua_resume(c->L, rt->L, nargs, &nres);
  __atomic_store_n(&rt->running, NULL, __ATOMIC_RELAXED);
  rt->depth--;
  rt->grp = saved_grp;
  op__hist_add(&rt->call_hist, op__ticker_since(&rt->ticker, t0) + c->prep_ns);
  c->prep_ns = 0;
  /* The wake-up its offpath.run put off, now that the time is taken. */
  op__pool_wake_later(rt);

  c->quiet = 0;
  if (status == LUA_YIELD) {
    lua_pop(c->L, nres);
    c->counted = 1;
    rt->suspended++;
    if (!c->waiting) {
      /* A bare coroutine.yield(): run again on the next turn. */
      ready_push(c, 0);
    }
    return;
  }
  rt->live_cos--;
  if (status == LUA_OK) {
    if (c->on_end != NULL)
      c->on_end(c, LUA_OK, nres);
    co_release(c, 1);
    return;
  }
  if (c->on_end != NULL) {
    c->on_end(c, status, 1);
  } else {
    push_co_error(c);
    op__group_fail(c->grp, lua_tostring(rt->L, -1));
    rt->call_errors++;
    if (quiet) /* op_call returns the error: only record it */
      op__set_errmsg(rt, "%s", lua_tostring(rt->L, -1));
    else
      op__report_error(rt, lua_tostring(rt->L, -1));
    lua_pop(rt->L, 1);
  }
  co_release(c, 0);
}

/* Resume c with the nargs values on its stack. With Lua running on this
** thread, on the next loop turn; inside another co_resume(), by that one
** once its resume has returned; else now, followed by every coroutine
** woken meanwhile (the trampoline: see the DESIGN block). */
static void co_resume(op_co *c, int nargs) {
  op_runtime *rt = c->rt;

  if (rt->depth > 0) {
    ready_push(c, nargs);
    return;
  }
  if (rt->resuming) {
    run_push(c, nargs);
    return;
  }
  rt->resuming = 1;
  co_run(c, nargs);
  while ((c = rt->run_head) != NULL) {
    rt->run_head = c->next;
    if (rt->run_head == NULL)
      rt->run_tail = NULL;
    c->next = NULL;
    co_run(c, c->ready_nargs);
  }
  rt->resuming = 0;
}

int op__co_runs_now(const op_runtime *rt) {
  return rt->depth == 0 && !rt->resuming;
}

int op__co_start(op_co *c, lua_State *from, int nargs) {
  op_runtime *rt = c->rt;
  uint64_t errors = rt->call_errors;

  lua_xmove(from, c->L, nargs + 1);
  rt->live_cos++;
  c->grp = rt->grp; /* started by code of a group: a member */
  op__group_join(c->grp);
  if (rt->depth > 0) {
    /* Started from Lua (offpath.go, on_done): run it on the next turn so
    ** the caller is not re-entered. */
    c->counted = 1;
    rt->suspended++;
    c->quiet = 0;
    ready_push(c, nargs);
    return 0;
  }
  if (rt->resuming)
    c->quiet = 0; /* runs later: nobody is there to take the error */
  co_resume(c, nargs);
  return rt->call_errors != errors ? OP_ESCRIPT : 0;
}

/* ---- set-up ---- */

int op__sched_init(op_runtime *rt) {
  rt->root.rt = rt;
  rt->root.L = rt->L;
  rt->root.handler = 0;
  rt->root.ctx_ref = LUA_NOREF;
  rt->free_wait = UINT32_MAX;
  *(op_co **)lua_getextraspace(rt->L) = &rt->root;
  uv_idle_init(rt->loop, &rt->idle);
  rt->idle.data = rt;
  rt->uv_handles++;
  return 0;
}

static void idle_close_cb(uv_handle_t *h) {
  op_runtime *rt = h->data;
  rt->uv_handles--;
}

void op__sched_close(op_runtime *rt) {
  op_co *c;

  while ((c = rt->free_cos) != NULL) {
    rt->free_cos = c->next;
    *(op_co **)lua_getextraspace(c->L) = &rt->root;
    luaL_unref(rt->L, LUA_REGISTRYINDEX, c->ref);
    free(c);
  }
  rt->nfree_cos = 0;
  uv_close((uv_handle_t *)&rt->idle, idle_close_cb);
  free(rt->waits);
  rt->waits = NULL;
  rt->nwaits = 0;
}
