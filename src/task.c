/* SPDX-License-Identifier: MIT */
/*
** task.c - the offpath.task objects of the main VM: pool tasks and go tasks,
** their completion, deadlines, cancellation, waiters and callbacks.
** Thread: loop, always (the worker side of a pool task is in worker.c).
**
** DESIGN
**
** A task is a full userdata (op_ltask) whose first member is the op_task a
** pool works on. While the pool or a coroutine may still touch
** it, it is anchored (lt->anchor, a slot of the anchors); it is
** released in maybe_release() once nothing does and it has ended.
**
**   new --enqueue--> QUEUED (in_pool) --worker picks--> RUNNING (worker)
**    |                  |                                  |
**    |  queue full      | stop: taken off the queue,       | task_complete()
**    v                  |   completed as cancelled/timeout | (drain)
**   parked in the pool  |                                  v
**   (in_pool) --room--> +-----------------------------> ended: DONE, FAILED,
**                                                       CANCELLED, TIMEOUT
**
** "Ended" is decided once, on the loop thread, by task_end(): from the
** worker's outcome in task_complete(), or earlier by task_stop() on a
** deadline, a cancel or a waiter's timeout. A task stopped early stays
** anchored until the worker hands it back (the worker sees t->stop at its
** next instruction-count hook), and that late completion only releases it.
**
** Invariants:
**  - state < OP_TASK_DONE  <=>  the task has not ended; task_end runs once.
**  - Every waiter is a wait id: waiters that went away (timeout, cancel)
**    are skipped because their ids no longer resolve.
**  - on_done callbacks and schedule callbacks run exactly once, at the end.
**  - the pool counts each task once, when it is stopped or comes back
**    (pool.c).
**  - Nothing from task_settle_cb() to notify() raises: what it builds in
**    the main VM goes through op__protect (see "the end of a task").
*/
#include <stddef.h>
#include <string.h>

#include "internal.h"

struct op_ltask {
  op_task t;         /* first: the pool's view of the task */
  const void *magic; /* &task_magic: tells our userdata from others */
  op_runtime *rt;
  uint8_t kind;           /* op_ltask_kind */
  uint8_t state;          /* op_task_state */
  uint8_t in_pool;        /* the pool owns t (queued, parked or running)
                             until task_settle_cb() */
  uint8_t sched;          /* schedule: data/onresult/onerror in the uservalue */
  uint8_t observed;       /* a waiter or callback was attached */
  uint8_t has_uv;         /* the user value table (UV_TABLE) exists */
  uint8_t has_cb;         /* a first on_done callback is in UV_CB */
  uint8_t own;            /* private to offpath.run */
  uint8_t finalized;      /* go: __gc ran before the coroutine ended */
  uint32_t remain;        /* its entry in rt->tasks + 1, or 0 */
  int anchor;             /* slot in the anchors (op_tasks), or LUA_NOREF */
  op_wait_id waiter;      /* the first waiter; more in the uservalue */
  op_wait_id submit_wait; /* launch suspended on a full queue */
  op_timer *timer;        /* deadline, or NULL */
  double timeout;
  const char *call;    /* "offpath.run", ... for messages */
  op_co *co;           /* go: the running coroutine, NULL once ended */
  op_group *grp;       /* invocation group until it ends, or NULL */
  int res_ref;         /* go: results table or error value, LUA_NOREF */
  int tb_ref;          /* go: traceback of an error that is not a string */
  op_ltask *idle_next; /* link in rt->tasks->idle_run */
};

/* The user values of a task object. The table holds what is rare: more
** waiters (UVT_WAITS) and callbacks (UVT_CBS), lists under integer keys,
** which cost no string to look up. The first on_done callback, or
** a schedule's onresult, and a schedule's onerror and data sit in slots of
** their own, so the common cases make no table. */
enum { UV_TABLE = 1, UV_CB, UV_ONERROR, UV_DATA };
enum { UVT_WAITS = 1, UVT_CBS };

static const char *const state_names[] = { "queued", "running",   "done",
                                           "failed", "cancelled", "timeout" };

/* The two metatables are kept under registry refs (op_tasks.mt_ref): an
** integer key is found faster than a pointer's. A finalizer costs the
** collector a separate pass per object, and pool tasks are made by the
** million, so they have none: what a collected pool task leaves to do is
** done by the remains below. Go tasks, few and holding registry refs, are
** finalized. The choice is made when the object is made: giving an object
** a __gc later makes Lua walk its list of objects. */
static const char remains_key = 'R';     /* weak table: index -> task */
static const char sentinel_mt_key = 'S'; /* the sentinel's metatable */
#define TASK_MT    "offpath.task"
#define TASK_GC_MT "offpath.task (finalized)"

/* ---- remains of collected pool tasks ----
**
** A pool task without a finalizer may still leave two things to do when
** it is collected: free a result buffer on the C heap, and report a
** failure nobody waited for or listened to. A task that ended with either
** gets an entry: the C side (the buffer, a copy of the message) here, and
** the task object in a weak-valued table under the same index. A sentinel,
** a userdata with a finalizer that nothing references, runs at the end of
** each collection cycle, after the weak table lost the objects collected
** in it; it settles the entries whose object is gone and makes the next
** sentinel while entries are left. Observing the failure later (wait,
** on_done) drops the message; an entry with nothing left is freed. What
** is left when the runtime closes is settled by op__task_close.
*/
typedef struct remain {
  char *heap;       /* the task's result bytes, or NULL */
  char *msg;        /* an unobserved failure, or NULL */
  const char *call; /* NULL: the entry is free */
  uint32_t next;    /* free list: index + 1 of the next free entry */
} remain;

/* Anchors: the task objects C still points to, by slot, on the stacks of
** threads made for that (ANCHOR_CHUNK slots each), with a C list of the
** free slots. Storing into a stack slot of a thread that is not running
** costs a copy: no table to fetch from the registry, no write barrier,
** and, when the slot is emptied, no table access either (a table cost
** about 400 instructions per task, both ways). The collector marks a
** thread's stack up to its top, so a chunk's top stays at its highest
** slot taken; a free slot holds nil. */
#define ANCHOR_CHUNK ((uint32_t)1 << 16)

/* The task state of a runtime: the remains, and the anchors. */
struct op_tasks {
  remain *v;
  uint32_t n, cap;
  uint32_t free;   /* index + 1 of the first free entry, or 0 */
  int armed;       /* a sentinel is waiting for the collector */
  int mt_ref[2];   /* registry refs: metatables of pool and go tasks */
  lua_State **anc; /* anc[c]: the thread of slots c * ANCHOR_CHUNK + 1.. */
  uint32_t nanc;   /* threads made */
  uint32_t *next;  /* next[slot]: the free slot after slot, or 0 */
  uint32_t nslots, slot_cap, free_slot;
  /* Ended offpath.run tasks kept for the next ones, still anchored: no
  ** script ever sees them, so they can be used again. */
  op_ltask *idle_run; /* linked through idle_next */
  int nidle_run;
};

#define IDLE_RUN_MAX 32

/* The runtime's task state, made on first use.  [-0, +0, m] */
static op_tasks *tasks_of(lua_State *L, op_runtime *rt) {
  op_tasks *ts = rt->tasks;

  if (ts != NULL)
    return ts;
  if ((ts = calloc(1, sizeof *ts)) == NULL)
    luaL_error(L, OP_NOMEM);
  rt->tasks = ts;
  return ts;
}

/* Report the failure msg of a task (made by call) that nobody observed
** and that can no longer be: it was collected. */
static void report_unobserved(op_runtime *rt, const char *call,
                              const char *msg) {
  static const char fmt[] = "unobserved task failure in %s: %s";
  int n = snprintf(NULL, 0, fmt, call, msg);
  char *line = n >= 0 ? malloc((size_t)n + 1) : NULL;

  rt->call_errors++;
  if (line == NULL) { /* out of memory: the message without its text */
    op__report_error(rt, "unobserved task failure");
    return;
  }
  snprintf(line, (size_t)n + 1, fmt, call, msg);
  op__report_error(rt, line);
  free(line);
}

/* Out of memory where nobody else can hear it: report "not enough memory
** <what> (<call>)" through the error callback, count it, and fail the
** running group with it. */
static void report_nomem(op_runtime *rt, const char *what, const char *call) {
  char msg[256];

  snprintf(msg, sizeof msg, OP_NOMEM " %s (%s)", what, call);
  rt->call_errors++;
  op__report_error(rt, msg);
  op__group_fail(rt->grp, msg);
}

/* Settle entry i: report its failure, free what it holds. */
static void remain_settle(op_runtime *rt, uint32_t i) {
  op_tasks *r = rt->tasks;
  remain *e = &r->v[i];

  if (e->msg != NULL)
    report_unobserved(rt, e->call, e->msg);
  free(e->heap);
  free(e->msg);
  e->heap = e->msg = NULL;
  e->call = NULL;
  e->next = r->free;
  r->free = i + 1;
}

static void arm_sentinel(lua_State *L, op_tasks *r) {
  if (r->armed)
    return;
  lua_newuserdatauv(L, 0, 0);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &sentinel_mt_key);
  lua_setmetatable(L, -2);
  lua_pop(L, 1); /* garbage from now on: runs at the end of this cycle */
  r->armed = 1;
}

/* The sentinel's __gc: a collection cycle ended.  [-0, +0, m] */
static int sentinel_gc(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  op_tasks *r = rt->tasks;
  uint32_t i, left = 0;

  r->armed = 0;
  if (rt->closing)
    return 0; /* op__task_close settles the rest */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &remains_key);
  for (i = 0; i < r->n; i++) {
    if (r->v[i].call == NULL)
      continue;
    if (lua_rawgeti(L, -1, (lua_Integer)i + 1) == LUA_TNIL)
      remain_settle(rt, i);
    else
      left++;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  if (left > 0)
    arm_sentinel(L, r);
  return 0;
}

static void push_error_text(lua_State *L, op_ltask *lt);
static void push_task(lua_State *L, op_ltask *lt);

/* Whether lt failed and nobody has waited for it or listened to it. */
static int unobserved_failure(const op_ltask *lt) {
  return lt->state == OP_TASK_FAILED && !lt->observed && !lt->sched;
}

/* Whether the ended pool task lt leaves something to do when collected. */
static int remain_needed(const op_ltask *lt) {
  return lt->t.buf.p != lt->t.buf.small || unobserved_failure(lt);
}

/* Give the ended pool task lt (the argument) an entry if it leaves
** something to do when collected. Protected: the entry is taken last, by
** steps that cannot fail, so a memory error leaves no entry and nothing
** allocated.  [-0, +0, m] */
static int remain_add_p(lua_State *L) {
  op_ltask *lt = lua_touserdata(L, 1);
  op_runtime *rt = lt->rt;
  op_tasks *r;
  op_buf *out = &lt->t.buf;
  char *heap = out->p != out->small ? out->p : NULL, *msg = NULL;
  const char *text = NULL;
  size_t len = 0;
  remain *nv;
  uint32_t i;

  if (unobserved_failure(lt)) {
    push_error_text(L, lt);
    text = lua_tolstring(L, -1, &len);
  }
  if (heap == NULL && text == NULL)
    return 0;
  r = tasks_of(L, rt);
  if (r->free == 0) {
    if (r->n == r->cap) {
      uint32_t cap = r->cap ? 2 * r->cap : 16;
      if ((nv = realloc(r->v, cap * sizeof *nv)) == NULL)
        luaL_error(L, OP_NOMEM);
      r->v = nv;
      r->cap = cap;
    }
    r->v[r->n].next = 0;
    r->free = ++r->n;
  }
  /* A sentinel before the entry: it may run at once, and skips free
  ** entries. */
  arm_sentinel(L, r);
  i = r->free - 1;
  push_task(L, lt);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &remains_key);
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, (lua_Integer)i + 1);
  if (text != NULL && (msg = malloc(len + 1)) == NULL) {
    lua_pushnil(L); /* the key is there now: no allocation */
    lua_rawseti(L, -2, (lua_Integer)i + 1);
    luaL_error(L, OP_NOMEM);
  }
  if (msg != NULL)
    memcpy(msg, text, len + 1);
  /* live only now: a sentinel never sees an entry without its object */
  r->free = r->v[i].next;
  r->v[i].heap = heap;
  r->v[i].msg = msg;
  r->v[i].call = lt->call;
  lt->remain = i + 1;
  return 0;
}

/* lt's failure was observed: nothing to report when it is collected. */
static void remain_observed(lua_State *L, op_ltask *lt) {
  op_tasks *r = lt->rt->tasks;
  remain *e;

  lt->observed = 1;
  if (lt->remain == 0)
    return;
  e = &r->v[lt->remain - 1];
  free(e->msg);
  e->msg = NULL;
  if (e->heap == NULL) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &remains_key);
    lua_pushnil(L);
    lua_rawseti(L, -2, lt->remain);
    lua_pop(L, 1);
    e->call = NULL;
    e->next = r->free;
    r->free = lt->remain;
    lt->remain = 0;
  }
}

void op__task_close(op_runtime *rt) {
  op_tasks *r = rt->tasks;
  uint32_t i;

  if (r == NULL)
    return;
  for (i = 0; i < r->n; i++) {
    if (r->v[i].call != NULL)
      remain_settle(rt, i);
  }
  free(r->v);
  free(r->next);
  free(r->anc); /* the threads are the VM's */
  free(r);
  rt->tasks = NULL;
}

/* No memory for the entry of lt (remain_add_p): what it would keep is
** given up. A result on the C heap is freed, and the task fails with
** OP_NOMEM instead; a failure is reported at once, since nothing would
** report it once the task is collected. */
static void remain_lost(op_ltask *lt) {
  op_buf *out = &lt->t.buf;

  if (out->p != out->small || lt->state == OP_TASK_DONE) {
    op__buf_free(out);
    lt->state = OP_TASK_FAILED;
    lt->t.errval = 0;
    op__buf_append(out, OP_NOMEM, sizeof OP_NOMEM - 1); /* inline */
  }
  if (unobserved_failure(lt))
    report_nomem(lt->rt, "to keep the outcome of a task", lt->call);
}

/* ---- the object and its uservalue ---- */

/* The thread and stack index of anchor slot (1-based). */
#define ANCHOR_THREAD(ts, slot) ((ts)->anc[((slot)-1) / ANCHOR_CHUNK])
#define ANCHOR_INDEX(slot)      ((int)(((slot)-1) % ANCHOR_CHUNK) + 1)

/* Push the object in anchor slot on L (nil if the slot is free). */
static void push_anchored(lua_State *L, op_tasks *ts, uint32_t slot) {
  lua_State *A = ANCHOR_THREAD(ts, slot);

  lua_pushvalue(A, ANCHOR_INDEX(slot)); /* room: see anchor_grow */
  lua_xmove(A, L, 1);
}

/* Push the task object; it is anchored whenever this is called. */
static void push_task(lua_State *L, op_ltask *lt) {
  op_assert(lt->anchor != LUA_NOREF);
  push_anchored(L, lt->rt->tasks, (uint32_t)lt->anchor);
}

/* Push the uservalue table of the task object lt at idx, making it if need
** be.  [-0, +1, m] */
static void push_uv(lua_State *L, int idx, op_ltask *lt) {
  idx = lua_absindex(L, idx);
  if (lua_getiuservalue(L, idx, UV_TABLE) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, 2, 0);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, idx, UV_TABLE);
  }
  lt->has_uv = 1; /* only now: the table exists */
}

static const char task_magic = 'M';

/* The task at idx, or NULL. A full userdata of our size whose magic field
** holds the address of a static of this file is ours: cheaper than
** comparing metatables on every method call, and no other code can forge
** that address by accident. */
static op_ltask *to_task(lua_State *L, int idx) {
  op_ltask *lt = lua_touserdata(L, idx);

  if (lt == NULL || lua_type(L, idx) != LUA_TUSERDATA ||
      lua_rawlen(L, idx) != sizeof *lt || lt->magic != &task_magic)
    return NULL;
  return lt;
}

/* The task at idx, or raise. */
static op_ltask *check_task(lua_State *L, int idx) {
  op_ltask *lt = to_task(L, idx);

  if (lt == NULL)
    luaL_typeerror(L, idx, TASK_MT);
  return lt;
}


/* Make a new free slot, the last one: in a new thread at a chunk's
** start. A chunk's thread always has room for one value above its top,
** for the lua_xmove that fills a slot or pushes it.
**
** Making a thread may run a collection step, whose finalizers may start
** or cancel tasks, which comes back here or frees a slot: so the state is
** looked at again after each call that allocates in the VM, and the slot
** is made only by steps that cannot.  [-0, +0, m] */
static void anchor_grow(lua_State *L, op_tasks *ts) {
  lua_State **na, *A;
  uint32_t *nn, cap, c;
  int ref;

  for (;;) {
    c = ts->nslots / ANCHOR_CHUNK;
    if (c == ts->nanc) {
      A = lua_newthread(L);
      ref = luaL_ref(L, LUA_REGISTRYINDEX); /* for the runtime's life */
      if (c != ts->nanc || ts->nslots / ANCHOR_CHUNK != c) {
        luaL_unref(L, LUA_REGISTRYINDEX, ref); /* made meanwhile */
        continue;
      }
      if ((na = realloc(ts->anc, (c + 1) * sizeof *na)) == NULL) {
        luaL_unref(L, LUA_REGISTRYINDEX, ref);
        luaL_error(L, OP_NOMEM);
      }
      ts->anc = na;
      ts->anc[ts->nanc++] = A;
    }
    if (!lua_checkstack(ts->anc[c], 2))
      luaL_error(L, OP_NOMEM);
    if (ts->free_slot != 0)
      return; /* a finalizer freed one */
    if (ts->nslots / ANCHOR_CHUNK == c)
      break;
  }
  if (ts->nslots + 1 >= ts->slot_cap) {
    cap = ts->slot_cap ? 2 * ts->slot_cap : 64;
    if ((nn = realloc(ts->next, cap * sizeof *nn)) == NULL)
      luaL_error(L, OP_NOMEM);
    ts->next = nn;
    ts->slot_cap = cap;
  }
  lua_pushnil(ts->anc[c]); /* in the room made above: allocates nothing */
  ts->next[++ts->nslots] = 0;
  ts->free_slot = ts->nslots;
}

/* Anchor the task object at idx (it is lt).  [-0, +0, m] */
static void anchor(lua_State *L, op_ltask *lt, int idx) {
  op_tasks *ts;
  lua_State *A;
  uint32_t slot;

  if (lt->anchor != LUA_NOREF)
    return;
  idx = lua_absindex(L, idx);
  ts = tasks_of(L, lt->rt);
  if (ts->free_slot == 0)
    anchor_grow(L, ts);
  slot = ts->free_slot;
  A = ANCHOR_THREAD(ts, slot);
  lua_pushvalue(L, idx);
  lua_xmove(L, A, 1);
  lua_replace(A, ANCHOR_INDEX(slot));
  ts->free_slot = ts->next[slot];
  lt->anchor = (int)slot;
}

/* Release the anchor once nothing can touch the task any more. */
static void maybe_release(op_ltask *lt) {
  op_tasks *ts;
  lua_State *A;

  if (lt->state < OP_TASK_DONE || lt->in_pool || lt->co != NULL ||
      lt->anchor == LUA_NOREF)
    return;
  ts = lt->rt->tasks;
  if (lt->own && ts->nidle_run < IDLE_RUN_MAX) {
    lt->idle_next = ts->idle_run; /* stays anchored: see new_task */
    ts->idle_run = lt;
    ts->nidle_run++;
    return;
  }
  A = ANCHOR_THREAD(ts, (uint32_t)lt->anchor);
  lua_pushnil(A); /* room: see anchor_grow */
  lua_replace(A, ANCHOR_INDEX((uint32_t)lt->anchor));
  ts->next[lt->anchor] = ts->free_slot;
  ts->free_slot = (uint32_t)lt->anchor;
  lt->anchor = LUA_NOREF;
}

/* ---- results ---- */

/* Push the results of a task that ended DONE on L (any thread of the main
** VM). Returns how many, or -1 with an error message pushed if the results
** cannot be decoded here.  [-0, +n, m] */
static int push_results(lua_State *L, op_ltask *lt) {
  char err[256];
  int n, i;

  if (lt->kind == OP_LT_POOL) {
    if (lt->t.buf.len > op__max_result(lt->rt)) {
      lua_pushfstring(L,
                      "cannot copy result: %I bytes encoded, more than "
                      "max_result (%I); return less, or raise it with "
                      "offpath.configure{max_result=}",
                      (lua_Integer)lt->t.buf.len,
                      (lua_Integer)op__max_result(lt->rt));
      return -1;
    }
    n = op__decode(lt->rt->xfer, L, lt->t.buf.p, lt->t.buf.len, err,
                   sizeof err);
    if (n < 0) {
      lua_pushfstring(L, "%s (result)", err);
      return -1;
    }
    return n;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, lt->res_ref);
  lua_getfield(L, -1, "n");
  n = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  luaL_checkstack(L, n + 1, "too many results");
  for (i = 1; i <= n; i++)
    lua_rawgeti(L, -i, i);
  lua_remove(L, -(n + 1));
  return n;
}

/* Push the results of a pool task that ended DONE if they are nil,
** booleans and numbers (op__decode_plain): nothing here raises, so the
** common outcome needs no protected call. Returns how many, or -1 with L
** as it was.  [-0, +n, -] */
static int plain_results(lua_State *L, op_ltask *lt) {
  if (lt->kind != OP_LT_POOL || lt->state != OP_TASK_DONE ||
      lt->t.buf.len > op__max_result(lt->rt))
    return -1;
  return op__decode_plain(L, lt->t.buf.p, lt->t.buf.len);
}

/* Push the error of a task that ended otherwise and, beside it, the
** traceback of an error value that is not a string (nil for a string
** error, which carries its traceback, and for a timeout or a cancel).
** [-0, +2, m] */
static void push_failure(lua_State *L, op_ltask *lt) {
  char err[256];
  int n;

  switch (lt->state) {
  case OP_TASK_FAILED:
    if (lt->kind != OP_LT_POOL) {
      if (lt->res_ref == LUA_NOREF) { /* no memory to keep its outcome */
        op__push_nomem(L);
        lua_pushnil(L);
        return;
      }
      lua_rawgeti(L, LUA_REGISTRYINDEX, lt->res_ref);
      lua_rawgeti(L, LUA_REGISTRYINDEX, lt->tb_ref);
      return;
    }
    if (!lt->t.errval) {
      lua_pushlstring(L, lt->t.buf.p, lt->t.buf.len);
      lua_pushnil(L);
      return;
    }
    n = op__decode(lt->rt->xfer, L, lt->t.buf.p, lt->t.buf.len, err,
                   sizeof err);
    if (n == 2)
      return;
    if (n >= 0)
      lua_pop(L, n);
    lua_pushfstring(L, "cannot copy the error of %s: %s", lt->call,
                    n >= 0 ? "bad encoding" : err);
    lua_pushnil(L);
    return;
  case OP_TASK_TIMEOUT:
    lua_pushfstring(L, "timeout after %f s in %s", lt->timeout, lt->call);
    break;
  default:
    lua_pushfstring(L, "cancelled: %s", lt->call);
    break;
  }
  lua_pushnil(L);
}

/* Push the error of a failed task as text, for a report: a string error
** as it is; another value described, as lua.c does, with its traceback.
** [-0, +1, m] */
static void push_error_text(lua_State *L, op_ltask *lt) {
  int err;

  push_failure(L, lt);
  err = lua_absindex(L, -2);
  if (lua_type(L, err) == LUA_TSTRING) {
    lua_pop(L, 1);
    return;
  }
  op__error_text(L, err);
  if (lua_type(L, err + 1) == LUA_TSTRING) {
    lua_pushliteral(L, "\n");
    lua_pushvalue(L, err + 1);
    lua_concat(L, 3);
  }
  lua_replace(L, err);
  lua_settop(L, err);
}

/* The protected body of error_text. */
static int error_text_p(lua_State *L) {
  op_ltask *lt = lua_touserdata(L, 1);

  push_error_text(L, lt);
  return 1;
}

/* push_error_text, or OP_NOMEM if it cannot be made.  [-0, +1, -] */
static void error_text(lua_State *L, op_ltask *lt) {
  if (op__protect(L, error_text_p, lt, 1) != LUA_OK &&
      lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    op__push_nomem(L);
  }
}

/* ---- the end of a task ----
**
** Nothing here may raise: it runs from the drain, a timer or a cancel.
** What a waiter or a callback is given is built on the main thread by a
** function called through op__protect, before anyone is told; if that
** fails (out of memory), they are told the error it left, Lua's "not
** enough memory", which costs nothing to hand on. So each is told once.
*/

/* What tell_waiter builds: for the task lt and the waiter co, whether
** the values are results (ok) or an error. */
typedef struct telling {
  op_ltask *lt;
  lua_State *co;
  int ok;
} telling;

/* The protected body of tell_waiter: push the results of a task that
** ended DONE (ok set), or its error value (a result that cannot be
** copied: a message naming where the waiter stands). Returns the count. */
static int tell_build_p(lua_State *L) {
  telling *tl = lua_touserdata(L, 1);
  op_ltask *lt = tl->lt;
  char where[256];
  int n;

  lua_pop(L, 1);
  if (lt->state == OP_TASK_DONE) {
    n = push_results(L, lt);
    if (n >= 0) {
      tl->ok = 1;
      return n;
    }
    lua_pushfstring(L, "%s (%s at %s)", lua_tostring(L, -1), lt->call,
                    op__where(tl->co, where, sizeof where));
    return 1;
  }
  /* The error value itself, any value; its traceback beside it. */
  push_failure(L, lt);
  op__note_traceback(L);
  lua_pop(L, 1);
  return 1;
}

/* Tell the waiter with id w how lt ended. Values are built on the main
** thread's stack, never on the waiter's, whose stack must hold exactly
** what the wait's continuation expects. */
static void tell_waiter(op_ltask *lt, op_wait_id w) {
  op_runtime *rt = lt->rt;
  lua_State *L = rt->L;
  char msg[128];
  telling tl;
  int top, status, n;

  if ((tl.co = op__wait_thread(rt, w)) == NULL)
    return;
  switch (lt->state) {
  case OP_TASK_DONE:
  case OP_TASK_FAILED:
    if ((n = plain_results(L, lt)) >= 0) {
      op__wait_move(rt, w, L, n, 1);
      return;
    }
    tl.lt = lt;
    tl.ok = 0;
    top = lua_gettop(L);
    status = op__protect(L, tell_build_p, &tl, LUA_MULTRET);
    op__wait_move(rt, w, L, lua_gettop(L) - top, status == LUA_OK && tl.ok);
    return;
  case OP_TASK_TIMEOUT:
    snprintf(msg, sizeof msg, "timeout after %g s", lt->timeout);
    op__wait_cancel(rt, w, msg, OP_ETIMEDOUT);
    return;
  default:
    op__wait_cancel(rt, w, "cancelled", OP_ECANCELED);
    return;
  }
}

/* Push (true, results...), or (false, error) and, for an error value
** that is not a string, its traceback, on L for a callback. Returns the
** count.  [-0, +n, m] */
static int push_outcome(lua_State *L, op_ltask *lt);

/* The protected body of start_callback: push_outcome. */
static int outcome_p(lua_State *L) {
  op_ltask *lt = lua_touserdata(L, 1);

  lua_pop(L, 1);
  return push_outcome(L, lt);
}

/* Start the callback at fn (an index of L, the main thread) with lt's
** outcome, in a coroutine of its own. Never raises: with no memory for
** the outcome it is given (false, "not enough memory"); with no memory for a
** coroutine it cannot run, and the error callback hears it. */
static void start_callback(op_ltask *lt, int fn) {
  op_runtime *rt = lt->rt;
  lua_State *L = rt->L;
  op_co *c = op__co_acquire(rt);
  int top = lua_gettop(L), n;

  if (c == NULL) {
    report_nomem(rt, "to run a callback", lt->call);
    return;
  }
  lua_pushvalue(L, fn);
  c->prep_t0 = op__ticker_read(&lt->rt->ticker); /* decoding counts */
  lua_pushboolean(L, 1);
  if (plain_results(L, lt) < 0) { /* else (true, results...) are built */
    lua_pop(L, 1);
    if (op__protect(L, outcome_p, lt, LUA_MULTRET) != LUA_OK) {
      lua_pushboolean(L, 0);
      lua_insert(L, -2);
    }
  }
  n = lua_gettop(L) - top - 1;
  if (!lua_checkstack(c->L, n + 1)) {
    /* A coroutine's empty stack has room for three. */
    lua_settop(L, top + 1);
    lua_pushboolean(L, 0);
    op__push_nomem(L);
    n = 2;
  }
  op__co_start(c, L, n);
}

static int push_outcome(lua_State *L, op_ltask *lt) {
  int n;

  if (lt->state == OP_TASK_DONE) {
    lua_pushboolean(L, 1);
    n = push_results(L, lt);
    if (n >= 0)
      return n + 1;
    lua_remove(L, -2);
    lua_pushnil(L);
  } else {
    push_failure(L, lt);
    op__note_traceback(L);
  }
  lua_pushboolean(L, 0);
  lua_insert(L, -3);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 2;
  }
  return 3;
}

/* A schedule failed with the text msg and has no onerror: report it and
** count it.  [-0, +0, m] */
static void schedule_unhandled(op_runtime *rt, lua_State *L, const char *msg) {
  lua_pushfstring(L, "offpath.schedule: %s", msg);
  op__report_error(rt, lua_tostring(L, -1));
  op__group_fail(rt->grp, lua_tostring(L, -1));
  rt->call_errors++;
  lua_pop(L, 1);
}

/* What run_schedule_p is given: the task, and how far it got. */
typedef struct sched_run {
  op_ltask *lt;
  int called; /* a callback was called, or the failure reported: a later
                 error must not report the task again */
  int in_cb;  /* inside the callback: rt->depth is raised */
  int timed;  /* Lua ran or a result was decoded: counts as a resume */
} sched_run;

/* Run the Trisul callbacks of a schedule: onresult(engine, data, result)
** or onerror(engine, data, err, traceback), on the main thread where
** nothing may suspend. A result that cannot be copied into the main VM
** (max_result, a value it cannot hold) goes to onerror as the failure it
** is. The callback is called in the same protected call that builds its
** arguments (run_schedule): one protected call per completion, not two.
** The argument is a sched_run.  [-0, +0, m] */
static int run_schedule_p(lua_State *L) {
  sched_run *sr = lua_touserdata(L, 1);
  op_ltask *lt = sr->lt;
  op_runtime *rt = lt->rt;
  int obj;
  int ok = lt->state == OP_TASK_DONE, top, n;

  push_task(L, lt);
  obj = top = lua_gettop(L);
  lua_getiuservalue(L, obj, ok ? UV_CB : UV_ONERROR);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    if (!ok) {
      push_error_text(L, lt);
      schedule_unhandled(rt, L, lua_tostring(L, -1));
      sr->called = 1; /* reported */
    }
    lua_settop(L, top);
    return 0;
  }
  op__push_engine(rt);
  lua_getiuservalue(L, obj, UV_DATA);
  if (ok) {
    n = push_results(L, lt);
    if (n < 0) {
      /* onerror(engine, data, why, nil) in onresult's place, if any. */
      ok = 0;
      if (lua_getiuservalue(L, obj, UV_ONERROR) == LUA_TNIL) {
        schedule_unhandled(rt, L, lua_tostring(L, -2));
        sr->called = sr->timed = 1; /* reported, after decoding */
        lua_settop(L, top);
        return 0;
      }
      lua_replace(L, top + 1);
      lua_pushnil(L);
    } else {
      if (n == 0)
        lua_pushnil(L);
      lua_settop(L, top + 3 + 1); /* onresult(engine, data, first result) */
    }
  } else {
    push_failure(L, lt); /* onerror(engine, data, err, traceback) */
    op__note_traceback(L);
  }
  sr->called = sr->in_cb = sr->timed = 1;
  rt->depth++; /* Lua runs: wake-ups it causes wait for the next turn */
  lua_call(L, ok ? 3 : 4, 0);
  rt->depth--;
  sr->in_cb = 0;
  lua_settop(L, top);
  return 0;
}

/* Run the callbacks of a schedule (run_schedule_p). An error the callback
** raises is reported with its traceback; if what it needs cannot be
** built, the failure goes to the error callback instead. */
static void run_schedule(lua_State *L, op_ltask *lt) {
  op_runtime *rt = lt->rt;
  uint64_t t0 = op__ticker_read(&rt->ticker);
  sched_run sr;
  int top = lua_gettop(L);

  sr.lt = lt;
  sr.called = sr.in_cb = sr.timed = 0;
  lua_pushcfunction(L, run_schedule_p); /* allocates nothing */
  lua_pushlightuserdata(L, &sr);
  if (op__pcall(L, 1, 0, op__traceback) != LUA_OK) {
    if (sr.in_cb) { /* the callback raised */
      rt->depth--;
      rt->call_errors++;
      if (lua_type(L, -1) != LUA_TSTRING) { /* made no text: memory */
        lua_pop(L, 1);
        op__push_nomem(L);
      }
      op__report_error(rt, lua_tostring(L, -1));
      op__group_fail(rt->grp, lua_tostring(L, -1));
    } else if (!sr.called) {
      report_nomem(rt, "to run the callbacks", "offpath.schedule");
    }
  }
  lua_settop(L, top);
  /* Decoding and the callback ran on the loop thread like a resume. */
  if (sr.timed)
    op__hist_add(&rt->call_hist, op__ticker_since(&rt->ticker, t0));
}

/* End lt in state (once): stop its deadline, count it, tell its waiters,
** run its callbacks. */
/* The first half of ending lt in state: decide it (once), stop its
** deadline, count it. Returns 0 if it had already ended. */
static int task_settle(op_ltask *lt, int state) {
  if (lt->state >= OP_TASK_DONE)
    return 0;
  lt->state = (uint8_t)state;
  if (lt->timer != NULL) {
    op__timer_close(lt->timer);
    lt->timer = NULL;
  }
  return 1;
}

/* The second half: run the callbacks and tell the waiters of a task that
** task_settle() has ended. */
static void notify(op_ltask *lt) {
  op_runtime *rt = lt->rt;
  lua_State *L = rt->L;
  int top = lua_gettop(L), obj, uv = 0, i, n;
  op_wait_id first = lt->waiter;

  lt->waiter = 0;
  if (!lt->has_uv && !lt->has_cb && !lt->sched) {
    /* The common case: one waiter, no callbacks. */
    if (first != 0)
      tell_waiter(lt, first);
    /* Nobody else reads a private task's results. A task stopped while
    ** the worker still has it keeps its buffer until it is handed back
    ** (task_settle_cb frees it then). */
    if (lt->own && !lt->in_pool)
      op__buf_free(&lt->t.buf);
    return;
  }
  push_task(L, lt);
  obj = lua_gettop(L);
  if (lt->has_uv && lua_getiuservalue(L, obj, UV_TABLE) == LUA_TTABLE)
    uv = lua_gettop(L);
  /* Callbacks first, then waiters: a waiter resumed here runs at once, and
  ** must find the task's callbacks done. */
  if (lt->sched)
    run_schedule(L, lt);
  if (lt->has_cb) {
    lua_getiuservalue(L, obj, UV_CB);
    start_callback(lt, lua_gettop(L));
    lua_pop(L, 1);
  }
  if (uv != 0 && lua_rawgeti(L, uv, UVT_CBS) == LUA_TTABLE) {
    n = (int)lua_rawlen(L, -1);
    for (i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      start_callback(lt, lua_gettop(L));
      lua_pop(L, 1);
    }
  }
  lua_settop(L, uv != 0 ? uv : obj);
  if (first != 0)
    tell_waiter(lt, first);
  if (uv != 0 && lua_rawgeti(L, uv, UVT_WAITS) == LUA_TTABLE) {
    n = (int)lua_rawlen(L, -1);
    for (i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      tell_waiter(lt, (op_wait_id)lua_tointeger(L, -1));
      lua_pop(L, 1);
    }
  }
  lua_settop(L, top);
}

/* notify(), as a member of lt's invocation group if it has one: the
** callbacks join the group, and a failure nobody hears fails it. */
static void task_notify(op_ltask *lt) {
  op_runtime *rt = lt->rt;
  op_group *g = lt->grp, *saved;

  if (g == NULL) {
    notify(lt);
    return;
  }
  lt->grp = NULL;
  if ((lt->state == OP_TASK_FAILED || lt->state == OP_TASK_TIMEOUT) &&
      !lt->observed && !lt->sched) {
    error_text(rt->L, lt);
    op__group_fail(g, lua_tostring(rt->L, -1));
    lua_pop(rt->L, 1);
  }
  saved = rt->grp;
  rt->grp = g;
  notify(lt);
  rt->grp = saved;
  op__group_leave(rt, g, NULL);
}

/* End lt in state (once): stop its deadline, count it, run its callbacks
** and tell its waiters. */
static void task_end(op_ltask *lt, int state) {
  if (task_settle(lt, state))
    task_notify(lt);
}

/* Stop lt early with code (OP_ECANCELED or OP_ETIMEDOUT). */
static void task_stop(op_ltask *lt, int code) {
  const char *why = code == OP_ETIMEDOUT ? "timeout" : "cancelled";
  op_wait_id w;

  if (lt->state >= OP_TASK_DONE)
    return;
  task_end(lt, code == OP_ETIMEDOUT ? OP_TASK_TIMEOUT : OP_TASK_CANCELLED);
  if (lt->kind == OP_LT_POOL) {
    if (lt->in_pool) /* queued, parked or running: the pool counts it */
      op__pool_stop_task(lt->t.pool, &lt->t, code);
    if ((w = lt->submit_wait) != 0) {
      lt->submit_wait = 0;
      op__wait_cancel(lt->rt, w, why, code);
    }
  } else if (lt->co != NULL && lt->co->wait != 0) {
    op__wait_cancel(lt->rt, lt->co->wait, why, code);
  }
  maybe_release(lt);
}

static void deadline_cb(uv_timer_t *timer) {
  task_stop(((op_timer *)timer)->data, OP_ETIMEDOUT);
}

/* Start lt's deadline, if it has one. Returns 0, or OP_ENOMEM. */
static int start_deadline(op_ltask *lt) {
  if (lt->timeout <= 0)
    return 0;
  lt->timer = op__timer_start(lt->rt, (uint64_t)(lt->timeout * 1000.0 + 0.5),
                              deadline_cb, 0, lt);
  return lt->timer != NULL ? 0 : OP_ENOMEM;
}

/* The pool hands a task back. The drain calls settle for a whole batch
** first and complete after, so a waiter resumed for the first task of a
** batch finds the others already ended and does not suspend again. */
static void task_settle_cb(op_task *t) {
  op_ltask *lt = (op_ltask *)t;
  int state;

  lt->in_pool = 0;
  free(t->stale); /* the arguments' block, if the worker left it */
  t->stale = NULL;
  if (lt->state >= OP_TASK_DONE) {
    op__buf_free(&t->buf); /* stopped earlier: nobody reads it */
    t->notify = 0;
    return;
  }
  switch (t->status) {
  case 0:
    state = OP_TASK_DONE;
    break;
  case OP_ECANCELED:
    state = OP_TASK_CANCELLED;
    break;
  case OP_ETIMEDOUT:
    state = OP_TASK_TIMEOUT;
    break;
  default:
    state = OP_TASK_FAILED;
    break;
  }
  t->notify = (uint8_t)task_settle(lt, state);
  if (t->notify && !lt->own && remain_needed(lt) &&
      op__protect(lt->rt->L, remain_add_p, lt, 0) != LUA_OK) {
    lua_pop(lt->rt->L, 1);
    remain_lost(lt);
  }
}

static void task_complete(op_task *t) {
  op_ltask *lt = (op_ltask *)t;

  if (t->notify) {
    t->notify = 0;
    task_notify(lt);
  }
  maybe_release(lt);
}

/* A parked task was queued: resume the launch that waits for it. */
static void task_queued(op_task *t) {
  op_ltask *lt = (op_ltask *)t;
  lua_State *co;
  op_wait_id w;

  if ((w = lt->submit_wait) != 0) {
    lt->submit_wait = 0;
    if ((co = op__wait_thread(lt->rt, w)) != NULL) {
      push_task(co, lt);
      op__wait_resume(lt->rt, w, 1);
    }
  }
}

/* ---- making and queueing tasks ---- */

static op_ltask *new_task(lua_State *L, int kind, const char *call, int own,
                          int nuv) {
  op_runtime *rt = op__runtime(L);
  op_tasks *ts = rt->tasks;
  op_ltask *lt;
  int slot = LUA_NOREF;

  if (own && ts != NULL && ts->idle_run != NULL) {
    lt = ts->idle_run;
    ts->idle_run = lt->idle_next;
    ts->nidle_run--;
    slot = lt->anchor;
    push_task(L, lt);
  } else {
    lt = lua_newuserdatauv(L, sizeof *lt, nuv);
    lua_rawgeti(L, LUA_REGISTRYINDEX, ts->mt_ref[kind != OP_LT_POOL]);
    lua_setmetatable(L, -2);
  }
  op__task_init(&lt->t, OP_TASK_LUA); /* zeroes t; the rest here */
  memset(&lt->magic, 0, sizeof *lt - offsetof(op_ltask, magic));
  lt->magic = &task_magic;
  lt->rt = rt;
  lt->kind = (uint8_t)kind;
  lt->anchor = slot;
  lt->res_ref = LUA_NOREF;
  lt->tb_ref = LUA_NOREF;
  lt->call = call;
  lt->own = (uint8_t)own;
  return lt;
}

op_ltask *op__task_new(lua_State *L, op_pool *pool, int fnidx, int nargs,
                       double timeout, const char *call, op_ltask_use use) {
  static const int nuv[] = { 1, UV_CB, UV_DATA };
  op_runtime *rt = op__runtime(L);
  char err[512];
  op_ltask *lt;
  int rc;

  fnidx = lua_absindex(L, fnidx);
  if (rt->closing)
    luaL_error(L, "shutdown: %s refused, the runtime is shutting down", call);
  op__xfer_paths_out(rt->xfer, L); /* the worker requires with these */
  lt = new_task(L, OP_LT_POOL, call, use == OP_USE_RUN, nuv[use]);
  lt->t.pool = pool;
  lt->t.watch = timeout > 0;
  lt->t.settle = task_settle_cb;
  lt->t.complete = task_complete;
  lt->t.on_queued = task_queued;
  lt->timeout = timeout;
  rc = op__encode(rt->xfer, L, fnidx, 1, &lt->t.buf, "function", 0, err,
                  sizeof err);
  if (rc == 0 && nargs > 0)
    rc = op__encode(rt->xfer, L, fnidx + 1, nargs, &lt->t.buf, "argument", 1,
                    err, sizeof err);
  if (rc != 0) {
    op__buf_free(&lt->t.buf);
    luaL_where(L, 1);
    lua_pushfstring(L, "%s (in %s)", err, call);
    lua_concat(L, 2);
    return (op_ltask *)(intptr_t)lua_error(L);
  }
  return lt;
}

int op__task_enqueue(lua_State *L, op_ltask *lt, int may_wait) {
  op_pool *p = lt->t.pool;
  int rc, nodeadline;

  /* Anchored, and its deadline made, before the pool has it: both may
  ** fail (out of memory), and a task the pool has must not be lost. */
  anchor(L, lt, -1);
  rc = nodeadline = start_deadline(lt);
  if (rc == 0)
    rc = op__pool_submit(p, &lt->t, may_wait);
  if (rc < 0) { /* never queued: nothing to count */
    op__buf_free(&lt->t.buf);
    if (lt->timer != NULL) {
      op__timer_close(lt->timer);
      lt->timer = NULL;
    }
    lt->state = OP_TASK_CANCELLED;
    maybe_release(lt);
  }
  if (nodeadline)
    luaL_error(L, "%s (%s)", OP_NOMEM, lt->call);
  if (rc == OP_ESHUTDOWN)
    luaL_error(L, "shutdown: %s refused, the runtime is shutting down",
               lt->call);
  if (rc < 0 && rc != OP_EAGAIN) /* the pool has no thread at all */
    luaL_error(L, "cannot start a thread for pool '%s': %s (%s)",
               op__pool_name(p), op__pool_error(p, rc), lt->call);
  if (rc == OP_EAGAIN)
    return OP_EAGAIN;
  lt->grp = lt->rt->grp; /* it ends in task_notify */
  op__group_join(lt->grp);
  lt->in_pool = 1;
  return rc; /* 0: queued; 1: parked until there is room */
}

int op__task_await_queued(lua_State *L, op_ltask *lt) {
  lt->submit_wait = op__wait_new(L, lt->call, 0, NULL, NULL);
  return op__wait_yield(L);
}

/* ---- go tasks ---- */

/* What go_end_p keeps of a go task's end: the coroutine, how it ended. */
typedef struct go_outcome {
  op_co *c;
  int status, nres;
} go_outcome;

/* The protected body of go_end: keep the outcome of the coroutine in the
** registry, res_ref (a results table, or the error value) and tb_ref
** (the traceback of an error value that is not a string). */
static int go_end_p(lua_State *L) {
  go_outcome *o = lua_touserdata(L, 1);
  op_co *c = o->c;
  op_ltask *lt = c->data;
  int i;

  if (o->status == LUA_OK) {
    luaL_checkstack(L, 4, NULL);
    lua_createtable(L, o->nres, 1);
    for (i = o->nres; i >= 1; i--) {
      lua_xmove(c->L, L, 1);
      lua_rawseti(L, -2, i);
    }
    lua_pushinteger(L, o->nres);
    lua_setfield(L, -2, "n");
  } else if (lua_type(c->L, -1) == LUA_TSTRING) {
    /* An error that already carries a traceback (raised again from a
    ** wait) keeps the one of where it was first raised: appending one
    ** per task would make a chain of failing waits quadratic. */
    if (strstr(lua_tostring(c->L, -1), "\nstack traceback:") != NULL)
      lua_xmove(c->L, L, 1);
    else
      luaL_traceback(L, c->L, lua_tostring(c->L, -1), 0);
  } else {
    /* An error value: kept as it is, its traceback beside it (that of
    ** where it was first raised, if it came from a task). */
    if (op__error_traceback(c->L, -1))
      lua_xmove(c->L, L, 1);
    else
      luaL_traceback(L, c->L, NULL, 0);
    lt->tb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_xmove(c->L, L, 1);
  }
  lt->res_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static void go_end(op_co *c, int status, int nres) {
  op_ltask *lt = c->data;
  op_runtime *rt = lt->rt;
  lua_State *L = rt->L;
  go_outcome o;

  lt->co = NULL;
  if (lt->state < OP_TASK_DONE) {
    o.c = c;
    o.status = status;
    o.nres = nres;
    if (op__protect(L, go_end_p, &o, 0) == LUA_OK) {
      task_end(lt, status == LUA_OK ? OP_TASK_DONE : OP_TASK_FAILED);
    } else {
      /* No memory to keep the outcome: it fails with "not enough
      ** memory" (push_failure, res_ref unset). */
      lua_pop(L, 1);
      if (lt->tb_ref != LUA_NOREF)
        luaL_unref(L, LUA_REGISTRYINDEX, lt->tb_ref);
      lt->tb_ref = LUA_NOREF;
      task_end(lt, OP_TASK_FAILED);
    }
    if (lt->finalized && unobserved_failure(lt)) {
      /* Its object was finalized while the coroutine ran (a Lua module
      ** program ending): nobody can observe the failure any more. */
      error_text(L, lt);
      report_unobserved(rt, lt->call, lua_tostring(L, -1));
      lua_pop(L, 1);
    }
  }
  maybe_release(lt);
}

op_ltask *op__task_go(lua_State *L, int fnidx, int nargs) {
  op_runtime *rt = op__runtime(L);
  op_co *parent = op__co(L);
  op_ltask *lt;
  op_co *c;
  int i, ctx = LUA_NOREF;

  fnidx = lua_absindex(L, fnidx);
  if (rt->closing)
    luaL_error(L, "shutdown: offpath.go refused, the runtime is shutting "
                  "down");
  luaL_checkstack(L, nargs + 2, "too many arguments");
  lt = new_task(L, OP_LT_GO, "offpath.go", 0, UV_CB);
  lt->state = OP_TASK_RUNNING;
  anchor(L, lt, -1);
  /* A go coroutine shares the session (offpath.context) of its parent,
  ** made now if the parent has not used it yet. */
  if (parent != NULL && parent->handler && parent->L == L) {
    if (parent->ctx_ref == LUA_NOREF) {
      lua_newtable(L);
      parent->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, parent->ctx_ref);
    ctx = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  /* The coroutine last: from here on nothing raises. */
  if ((c = op__co_acquire(rt)) == NULL) {
    luaL_unref(L, LUA_REGISTRYINDEX, ctx);
    lt->state = OP_TASK_CANCELLED; /* never ran */
    maybe_release(lt);
    luaL_error(L, OP_NOMEM);
  }
  lt->grp = rt->grp; /* it ends in task_notify */
  op__group_join(lt->grp);
  c->on_end = go_end;
  c->data = lt;
  c->ctx_ref = ctx;
  lt->co = c;
  for (i = 0; i <= nargs; i++)
    lua_pushvalue(L, fnidx + i);
  lua_xmove(L, rt->L, nargs + 1);
  op__co_start(c, rt->L, nargs);
  return lt;
}

/* ---- waiting ---- */

static void own_abort(void *what, int code) {
  task_stop(what, code);
}

static void wait_abort(void *what, int code) {
  if (code == OP_ETIMEDOUT)
    task_stop(what, code);
}

/* How many go tasks a wait follows to find a cycle (a waits on b, b on
** c, c on a): enough for mistakes, and cheap for long chains. */
#define CYCLE_HOPS 16

/* Raise if the coroutine L, about to wait on lt, would wait on itself:
** lt is its own go task, or a go task waiting (through at most
** CYCLE_HOPS - 1 others) on it. Such a wait could never end.
** [-0, +0, v] */
static void check_cycle(lua_State *L, op_ltask *lt) {
  op_co *me = op__co(L), *c;
  int hops;

  for (hops = 0; hops < CYCLE_HOPS; hops++) {
    if (lt->kind != OP_LT_GO || (c = lt->co) == NULL)
      return;
    if (c == me) {
      if (hops == 0)
        luaL_error(L, "deadlock: a task cannot wait on itself");
      luaL_error(L,
                 "deadlock: a task cannot wait on itself (through %d "
                 "other task%s waiting in turn)",
                 hops, hops == 1 ? "" : "s");
    }
    if (c->wait == 0 || c->awaiting == NULL)
      return;
    lt = c->awaiting;
  }
}

/* Make L a waiter of the task lt, which has not ended.  [-0, +0, e] */
static void await_register(lua_State *L, op_ltask *lt, double timeout,
                           const char *call, int own) {
  op_wait_id w;

  check_cycle(L, lt);
  w = op__wait_new(L, call, timeout, own ? own_abort : wait_abort, lt);
  op__co(L)->awaiting = lt;
  if (lt->waiter == 0) {
    lt->waiter = w;
    return;
  }
  push_task(L, lt);
  push_uv(L, -1, lt);
  if (lua_rawgeti(L, -1, UVT_WAITS) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, UVT_WAITS);
  }
  lua_pushinteger(L, (lua_Integer)w);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_pop(L, 3);
}

int op__task_await(lua_State *L, op_ltask *lt, double timeout, const char *call,
                   int own) {
  int n;

  remain_observed(L, lt);
  if (lt->state >= OP_TASK_DONE) {
    if (lt->state == OP_TASK_DONE) {
      n = push_results(L, lt);
      if (n >= 0)
        return n;
      luaL_where(L, 1);
      lua_insert(L, -2);
      lua_concat(L, 2);
    } else {
      push_failure(L, lt);
      op__note_traceback(L);
      lua_pop(L, 1);
    }
    return lua_error(L);
  }
  await_register(L, lt, timeout, call, own);
  return op__wait_yield(L);
}

/* ---- offpath.all ---- */

/* Pop the n values on top of L into a new list, pushed.  [-n, +1, m] */
static void pack_top(lua_State *L, int n) {
  int j;

  lua_createtable(L, n, 0);
  lua_insert(L, -(n + 1));
  for (j = n; j >= 1; j--)
    lua_rawseti(L, -(j + 1), j);
}

/* The body of offpath.all, and its continuation. Stack: 1 the tasks (a
** list of ours), 2 the outcomes; ctx: the task to wait for next. After a
** wait, its outcome is above: (true, results...) or (false, error).
** [-0, +1, e] */
static int all_k(lua_State *L, int status, lua_KContext ctx) {
  int i = (int)ctx, n = (int)lua_rawlen(L, 1), k;
  op_ltask *lt;

  if (status == LUA_YIELD) {
    lua_rawgeti(L, 1, i);
    lt = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (lt->state < OP_TASK_DONE) {
      /* This wait ended, not the task: the caller was cancelled. */
      lua_settop(L, 4);
      return lua_error(L);
    }
    k = lua_gettop(L) - 2;
    if (lt->state == OP_TASK_FAILED && lua_type(L, 4) != LUA_TSTRING) {
      push_failure(L, lt); /* the traceback beside the error value */
      lua_remove(L, -2);
      k++;
    }
    pack_top(L, k);
    lua_rawseti(L, 2, i++);
  }
  for (; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    lt = lua_touserdata(L, -1);
    lua_pop(L, 1);
    remain_observed(L, lt);
    if (lt->state >= OP_TASK_DONE) {
      pack_top(L, push_outcome(L, lt));
      lua_rawseti(L, 2, i);
      continue;
    }
    await_register(L, lt, 0, "offpath.all", 0);
    return op__wait_yieldk(L, (lua_KContext)i, all_k);
  }
  lua_settop(L, 2);
  return 1;
}

int op__task_all(lua_State *L) {
  int n, i, list = lua_gettop(L) == 1 && lua_type(L, 1) == LUA_TTABLE,
            pending = 0;
  op_ltask *lt;

  n = list ? (int)lua_rawlen(L, 1) : lua_gettop(L);
  luaL_checkstack(L, 4, "too many tasks");
  lua_createtable(L, n, 0);
  for (i = 1; i <= n; i++) {
    if (list)
      lua_rawgeti(L, 1, i);
    else
      lua_pushvalue(L, i);
    if ((lt = to_task(L, -1)) == NULL) {
      if (!list)
        return luaL_typeerror(L, i, TASK_MT);
      return luaL_argerror(L, 1,
                           lua_pushfstring(L,
                                           "offpath.task expected at index "
                                           "%d, got %s",
                                           i, luaL_typename(L, -1)));
    }
    pending |= lt->state < OP_TASK_DONE;
    lua_rawseti(L, -2, i);
  }
  if (pending)
    op__check_suspend(L, "offpath.all");
  lua_replace(L, 1);
  lua_settop(L, 1);
  lua_createtable(L, n, 0);
  return all_k(L, LUA_OK, 1);
}

void op__task_set_schedule(lua_State *L, op_ltask *lt, int data, int onresult,
                           int onerror) {
  int idx = lua_absindex(L, -1);

  op_assert(lua_touserdata(L, idx) == lt);
  if (data) {
    lua_pushvalue(L, data);
    lua_setiuservalue(L, idx, UV_DATA);
  }
  if (onresult) {
    lua_pushvalue(L, onresult);
    lua_setiuservalue(L, idx, UV_CB);
  }
  if (onerror) {
    lua_pushvalue(L, onerror);
    lua_setiuservalue(L, idx, UV_ONERROR);
  }
  lt->sched = 1;
}

/* ---- methods ---- */

/* task:wait([timeout]) */
static int task_wait(lua_State *L) {
  op_ltask *lt = check_task(L, 1);
  double timeout = lua_isnoneornil(L, 2) ? 0 : luaL_checknumber(L, 2);

  if (lt->state >= OP_TASK_DONE)
    return op__task_await(L, lt, 0, "task:wait", 0);
  return op__task_await(L, lt, timeout, "task:wait", 0);
}

/* task:on_done(cb): cb(ok, ...) on the main thread when it ends. */
static int task_on_done(lua_State *L) {
  op_ltask *lt = check_task(L, 1);
  op_co *c;
  int n;

  luaL_checktype(L, 2, LUA_TFUNCTION);
  remain_observed(L, lt);
  if (lt->state >= OP_TASK_DONE) {
    if ((c = op__co_acquire(lt->rt)) == NULL)
      return luaL_error(L, OP_NOMEM);
    lua_pushvalue(L, 2);
    c->prep_t0 = op__ticker_read(&lt->rt->ticker); /* decoding counts */
    n = push_outcome(L, lt);
    op__co_start(c, L, n);
    lua_settop(L, 1);
    return 1;
  }
  if (!lt->has_cb && !lt->sched) {
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, 1, UV_CB);
    lt->has_cb = 1;
    lua_settop(L, 1);
    return 1;
  }
  push_uv(L, 1, lt);
  if (lua_rawgeti(L, -1, UVT_CBS) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, UVT_CBS);
  }
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_settop(L, 1);
  return 1;
}

int op__task_cancel_all(op_runtime *rt) {
  op_tasks *ts = rt->tasks;
  lua_State *L = rt->L;
  op_ltask *lt;
  uint32_t slot, end;
  int n = 0;

  if (ts == NULL)
    return 0;
  end = ts->nslots;

  /* Every task not yet ended is anchored. Stopping one runs its callbacks,
  ** which may start more: the walk ends at the slots taken when it began,
  ** so a callback that starts a task per cancel cannot keep it going (a
  ** host cancels again later). */
  for (slot = 1; slot <= end; slot++) {
    push_anchored(L, ts, slot);
    lt = lua_type(L, -1) == LUA_TUSERDATA ? lua_touserdata(L, -1) : NULL;
    lua_pop(L, 1);
    if (lt != NULL && lt->state < OP_TASK_DONE) {
      task_stop(lt, OP_ECANCELED);
      n++;
    }
  }
  return n;
}

/* task:cancel(): returns true if it stopped the task, false if it had
** already ended. */
static int task_cancel(lua_State *L) {
  op_ltask *lt = check_task(L, 1);
  int was = lt->state < OP_TASK_DONE;

  task_stop(lt, OP_ECANCELED);
  lua_pushboolean(L, was);
  return 1;
}

/* task:status() */
static int task_status(lua_State *L) {
  op_ltask *lt = check_task(L, 1);
  int st = lt->state;

  if (st == OP_TASK_QUEUED && lt->kind == OP_LT_POOL && lt->in_pool &&
      !op__pool_is_queued(lt->t.pool, &lt->t))
    st = OP_TASK_RUNNING;
  lua_pushstring(L, state_names[st]);
  return 1;
}

static int task_tostring(lua_State *L) {
  op_ltask *lt = check_task(L, 1);

  lua_pushfstring(L, "offpath.task (%s, %s): %p", lt->call,
                  state_names[lt->state], (void *)lt);
  return 1;
}

/* __gc of go tasks: a failure nobody waited for or listened to is reported
** now, when it can no longer be observed, rather than lost (pool tasks:
** see the remains). */
static int task_gc(lua_State *L) {
  op_ltask *lt = check_task(L, 1);

  op_assert(!lt->in_pool);
  /* Still running: the Lua state is closing under a runtime that has not
  ** drained yet (the Lua module); go_end reports a failure then. */
  lt->finalized = lt->co != NULL;
  if (unobserved_failure(lt)) {
    error_text(L, lt);
    report_unobserved(lt->rt, lt->call, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  if (lt->res_ref != LUA_NOREF)
    luaL_unref(L, LUA_REGISTRYINDEX, lt->res_ref);
  if (lt->tb_ref != LUA_NOREF)
    luaL_unref(L, LUA_REGISTRYINDEX, lt->tb_ref);
  lt->res_ref = lt->tb_ref = LUA_NOREF;
  op__task_release(&lt->t);
  return 0;
}

void op__task_open(lua_State *L) {
  static const luaL_Reg methods[] = { { "wait", task_wait },
                                      { "on_done", task_on_done },
                                      { "cancel", task_cancel },
                                      { "status", task_status },
                                      { NULL, NULL } };

  op_tasks *ts = tasks_of(L, op__runtime(L));

  luaL_newlib(L, methods);
  luaL_newmetatable(L, TASK_MT);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, task_tostring);
  lua_setfield(L, -2, "__tostring");
  ts->mt_ref[0] = luaL_ref(L, LUA_REGISTRYINDEX);
  luaL_newmetatable(L, TASK_GC_MT);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, task_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, task_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushliteral(L, TASK_MT);
  lua_setfield(L, -2, "__name");
  ts->mt_ref[1] = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
  lua_newtable(L); /* the remains' weak table */
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &remains_key);
  op__tracebacks_open(L); /* error value -> traceback, weak keys */
  op__nomem_open(L);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, sentinel_gc);
  lua_setfield(L, -2, "__gc");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &sentinel_mt_key);
}
