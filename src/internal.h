/* SPDX-License-Identifier: MIT */
/*
** internal.h - declarations shared between liboffpath's source files.
** Nothing here is public. Functions named op__* are built with hidden
** visibility; each is documented where it is defined.
*/
#ifndef OFFPATH_INTERNAL_H
#define OFFPATH_INTERNAL_H

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>

#include "hist.h"
#include "offpath.h"

/* ---- assertions ---- */

#ifdef OP_DEBUG
#define op_assert(c)                                                           \
  ((c) ? (void)0 : op__panic(__FILE__, __LINE__, "assertion failed: " #c))
#define NEVER(c) ((c) ? (op__panic(__FILE__, __LINE__, #c), 1) : 0)
#else
#define op_assert(c) ((void)0)
#define NEVER(c)     (c)
#endif

/* Print "offpath: file:line: msg" and abort(). For impossible failures. */
void op__panic(const char *file, int line, const char *msg);
#define OP_PANIC(msg) op__panic(__FILE__, __LINE__, (msg))

typedef struct op_pool op_pool;
typedef struct op_task op_task;
typedef struct op_worker op_worker;
typedef struct op_co op_co;
typedef struct op_tasks op_tasks;
typedef struct op_track op_group; /* op_track in offpath.h */

/* ---- growable byte buffers (buf.c) ---- */

#define OP_BUF_INLINE 40

/* Owns its bytes; small contents live inline, so short payloads cost no
** malloc. A buffer may move between threads with the task that owns it. */
typedef struct op_buf {
  char *p; /* == small while len fits, else malloc'ed */
  size_t len;
  size_t cap;
  char small[OP_BUF_INLINE];
} op_buf;

void op__buf_init(op_buf *b);
void op__buf_free(op_buf *b);                 /* back to empty, inline */
int op__buf_reserve(op_buf *b, size_t extra); /* 0 or OP_ENOMEM */
int op__buf_append(op_buf *b, const void *p, size_t n);

/* ---- Lua VM memory (alloc.c) ---- */

/* The memory of one Lua VM: what it holds and its limit. Written by the
** thread running the VM; `used` may be read from any thread. */
typedef struct op_vmem {
  atomic_size_t used; /* bytes held now */
  size_t limit;       /* 0: none */
  size_t rest;        /* bytes held at rest (after set-up), for worker.c */
  lua_Hook hook;      /* armed past the limit, or NULL: a hard limit */
  /* Arms hook on every thread of the VM that may be running, or NULL for
  ** L alone. */
  void (*arm)(struct op_vmem *m);
  lua_State *L;    /* the VM */
  uint8_t refused; /* the last growing request was refused */
  uint8_t over;    /* granted past the limit: the hook must raise */
  uint8_t hit;     /* a request was refused for the limit */
} op_vmem;

/* Make a VM (luaL_newstate) that allocates through m, with m->limit and
** m->hook as set by the caller. Returns NULL on out of memory. */
lua_State *op__vm_new(op_vmem *m);
/* Bytes m's VM holds now. Thread: any. */
size_t op__vm_used(const op_vmem *m);
/* Tests: fail the n-th growing Lua allocation from now and the k - 1 after
** it, in any VM or (workers_only) in worker VMs; n = 0 turns injection
** off. op__alloc_pending: whether the n-th is still to come. Thread: any. */
void op__alloc_fail(long n, long k, int workers_only);
int op__alloc_pending(void);
/* "64MB", "512 kb", "1g", "1048576" -> bytes. 0 or OP_EINVAL. */
int op__parse_size(const char *s, size_t *out);
/* n bytes as "64 MB" (exact units only) in buf; returns buf. */
const char *op__fmt_size(size_t n, char *buf, size_t len);

/* ---- copying Lua values between VMs (transfer.c, protostore.c) ---- */

/* The runtime-wide store of function prototypes: id -> dumped bytecode.
** Safe to use from any thread. Bounded: each VM keeps at most OP_PROTO_CAP
** of the prototypes it encodes stored (and anchored) and OP_FACTORY_CAP
** factories loaded, least recently used out first; an entry given up
** stays decodable for OP_STORE_GRACE more insertions (protostore.c). */
#define OP_PROTO_CAP   4096
#define OP_FACTORY_CAP 4096
#define OP_STORE_GRACE 8192
typedef struct op_protostore op_protostore;
op_protostore *op__protostore_new(void);
void op__protostore_free(op_protostore *ps);
/* Entries held (prototypes and C functions). Thread: any. */
size_t op__protostore_count(op_protostore *ps);

/* The per-lua_State side of transfers: name maps for library values and
** modules, and the prototype caches. Made once per VM; used only by the
** thread that owns that VM. */
typedef struct op_xfer op_xfer;

/* Make the transfer state of L (registry anchors; see transfer.c).
** Returns NULL on out of memory.  [-0, +0, m] */
op_xfer *op__xfer_new(lua_State *L, op_protostore *ps);
/* Release it; call before lua_close(L). */
void op__xfer_free(op_xfer *x);

/* Append the encoding of the n values at stack index idx.. of L to b.
** Values are named in refusals as "<label> <first_no+i>" ("argument 2
** field 'x'"), or "<label>" alone when first_no is 0 and n is 1.
** Returns 0, or OP_ECOPY / OP_ENOMEM with a message (nul-terminated) in
** err. Leaves L's stack as it was.  [-0, +0, m] */
int op__encode(op_xfer *x, lua_State *L, int idx, int n, op_buf *b,
               const char *label, int first_no, char *err, size_t errlen);

/* Give the C functions of the table at idx (or the C function at idx) a
** hint that a refusal to copy them shows after the path ("engine methods
** run on the main thread; ...").  [-0, +0, m] */
void op__xfer_hint(lua_State *L, int idx, const char *hint);
/* Message handler for a worker task's pcall: a string error gets the
** traceback appended; another value stays itself, its traceback kept for
** op__encode_error.  [-1, +1, m] */
int op__xfer_msgh(lua_State *L);
/* Append the error value on top of L (left there) to b, after a pcall
** with op__xfer_msgh: a string as its bytes (*value = 0); another value
** and its traceback encoded as two values (*value = 1), or, if it cannot
** be copied, as text naming it and the reason (*value = 0). Returns 0 or
** OP_ENOMEM.  [-0, +0, m] */
int op__encode_error(op_xfer *x, lua_State *L, op_buf *b, int *value);

/* Push the values encoded in p[0..len) on L. Returns how many, or a
** negative code with a message in err if the bytes are not a valid
** encoding (never trusted blindly).  [-0, +n, m] */
int op__decode(op_xfer *x, lua_State *L, const char *p, size_t len, char *err,
               size_t errlen);
/* Push the values encoded in p[0..len) on L if they are all nil, booleans
** and numbers, which allocate nothing: then nothing here can raise, and
** no protected call is needed. Returns how many, or -1 (anything else, a
** malformed byte, or no stack room) with L as it was: op__decode then
** says what it is.  [-0, +n, -] */
int op__decode_plain(lua_State *L, const char *p, size_t len);

/* Main VM, before a pool task is queued: publish its package.path and
** package.cpath for the workers if they changed.  [-0, +0, m] */
void op__xfer_paths_out(op_xfer *x, lua_State *L);
/* Worker VM, before it decodes a task: take the paths published last, if
** it has not yet. Thread: worker.  [-0, +0, -] */
void op__xfer_paths_in(op_xfer *x, lua_State *L);
/* Whether the first value encoded in p[0..len) crossed by name (a module
** or library value: the destination's own copy, not a copy of the
** source's). Thread: any. */
int op__encoded_by_name(const char *p, size_t len);

/* ---- tasks (task.c) ---- */

/*
** A unit of work for a pool. Lua tasks carry an encoded function and its
** arguments in `buf` and get encoded results or an error back in the same
** buffer; C tasks carry a work function. The DESIGN block in task.c has
** the state machine of the task objects built on it.
*/
typedef enum op_task_state {
  OP_TASK_QUEUED = 0,
  OP_TASK_RUNNING,
  OP_TASK_DONE,
  OP_TASK_FAILED,
  OP_TASK_CANCELLED,
  OP_TASK_TIMEOUT
} op_task_state;

typedef enum op_task_kind {
  OP_TASK_LUA = 0, /* run an encoded function in a worker VM */
  OP_TASK_C,       /* run work(arg) on a worker thread */
  OP_TASK_BLOCK    /* a worker asks the loop thread to run a block section */
} op_task_kind;

struct op_task {
  op_task *next; /* link in a pool queue or the completion queue */
  op_task *prev; /* link in a pool queue (removal on cancel) */
  op_pool *pool;
  uint8_t kind;    /* op_task_kind */
  uint8_t queued;  /* in the pool queue, held or parked now (pool lock) */
  uint8_t holds;   /* its completion runs no Lua (a C task's callback):
                      what it submits is held for the batch (pool.c) */
  uint8_t counted; /* its end is counted in the pool's statistics */
  uint8_t failed;  /* set by the work: the operation failed (statistics) */
  uint8_t lazy;    /* its submitter suspends next (offpath.run): a worker
                      it must wake is posted when the resume ends (pool.c) */
  atomic_int stop; /* 0, or OP_ECANCELED / OP_ETIMEDOUT requested */
  int status;      /* worker's outcome: 0, OP_ESCRIPT, OP_ECANCELED,
                      OP_ETIMEDOUT, OP_ENOMEM (no room for the outcome) */
  op_work_fn work; /* OP_TASK_C */
  void *arg;
  /* OP_TASK_LUA: the encoded function and arguments, then, once the
  ** worker has decoded them, its results or error message: one buffer,
  ** so a task crosses between CPUs in fewer cache lines. */
  op_buf buf;
  void *stale; /* the arguments' heap block, left for the loop thread that
                  allocated it to free (glibc frees across threads slowly) */
  /* Called once on the loop thread when the worker is finished with the
  ** task (or it was taken off the queue). Owns the task from then on.
  ** settle, if set, runs first for every task of a drained batch, then
  ** complete for each (drain_done in loop.c). */
  void (*settle)(op_task *t);
  void (*complete)(op_task *t);
  /* Called when a task that was parked (its pool's queue was full) is
  ** queued, or NULL. */
  void (*on_queued)(op_task *t);
  uint8_t notify;    /* settle left work for complete */
  uint64_t t_submit; /* a reading of rt->ticker (loop thread) */
  op_worker *worker; /* OP_TASK_BLOCK: the waiting worker; OP_TASK_LUA:
                        the worker running it (pool lock) */
  uint8_t watch;     /* has a deadline: run it under the stop hook */
  uint8_t errval;    /* OP_ESCRIPT: buf holds the error value and its
                        traceback, encoded, not a message */
};

/* Set up / release a task (pool.c): release frees its buffers, not t. */
void op__task_init(op_task *t, op_task_kind kind);
void op__task_release(op_task *t);

/* ---- pools (pool.c) ---- */

op_pool *op__pool_find(op_runtime *rt, const char *name);
/* Make a pool (threads start on first submit). OP_EINVAL, OP_ENOMEM. */
int op__pool_add(op_runtime *rt, const op_pool_config *pc, op_pool **out);
/* Resize a pool that has not started. OP_ESTARTED otherwise. */
int op__pool_configure(op_pool *p, int threads, int queue, const char *init);
/* Queue t. Returns 0 when queued. When the queue is full: with park 0,
** OP_EAGAIN; with park 1, 1: t is parked behind the tasks parked before it
** and queued as room comes (t->on_queued is called then); it counts as
** queued and in flight meanwhile, and op__pool_stop_task takes it off.
** Returns OP_ESHUTDOWN or OP_ENOTHREAD otherwise; on error the task is
** untouched and complete() is never called. */
int op__pool_submit(op_pool *p, op_task *t, int park);
/* Set the memory limit of p's worker VMs (bytes, 0: none) before p
** starts. 0, OP_EINVAL (below OP_MEMORY_LIMIT_MIN) or OP_ESTARTED. */
int op__pool_set_memory_limit(op_pool *p, size_t bytes);
#define OP_MEMORY_LIMIT_MIN ((size_t)1 << 20)
/* Set the spin budget of p's workers (microseconds, 0: never). */
void op__pool_set_spin(op_pool *p, unsigned us);
/* Start p's threads now if they have not started. 0 or OP_ENOMEM. */
int op__pool_start(op_pool *p);
/* Whether t is waiting in p's queue, held or parked (not yet taken by a
** worker). */
int op__pool_is_queued(op_pool *p, op_task *t);
/* Whether p's queue is full now. */
int op__pool_full(op_pool *p);
/* Ask t to stop with code (OP_ECANCELED or OP_ETIMEDOUT). A queued task
** is taken off the queue and completed; a running one sees the flag. */
void op__pool_stop_task(op_pool *p, op_task *t, int code);
/* Cancel every queued task (shutdown with OP_SHUTDOWN_CANCEL). */
void op__pool_cancel_queued(op_pool *p);
/* What threads given up as stuck may still use after their runtime is
** freed (the prototype store): each pool with such threads holds a
** reference, the runtime one; the last to let go frees it. */
typedef struct op_remnant {
  atomic_int refs;
  op_protostore *protos;
} op_remnant;
/* Let go of a reference to r: the last frees it. Thread: any. */
void op__remnant_release(op_remnant *r);
/* Stop the threads and free the pool; the queue must be empty. A pool
** whose threads given up as stuck still run is freed by the last of them,
** which then releases r (taken here). */
void op__pool_free(op_pool *p, op_remnant *r);
/* The text for an error op__pool_submit returned on p (OP_ENOTHREAD: the
** system's reason a thread could not start). */
const char *op__pool_error(op_pool *p, int rc);
/* Give up, and replace, each worker of p whose task was asked to stop
** grace ns or more before now and still runs (reported through the error
** callback). Returns how many stopped tasks still run within their grace.
** Thread: loop. */
int op__pool_check_stuck(op_pool *p, uint64_t now, uint64_t grace);
/* Make sure the stuck watch runs while stopped tasks still run.
** Thread: loop. */
void op__watch_stuck(op_runtime *rt);
const char *op__pool_name(op_pool *p);
void op__pool_stats(op_pool *p, op_pool_stats *out);
/* The pool's latency histogram, submit to completion (loop thread). */
const op_hist *op__pool_hist(op_pool *p);

/* Queue the tasks op__pool_submit held (rt->hold_submits) and wake the
** workers they need. Thread: loop. */
void op__pool_flush(op_pool *p);
/* Append the tasks p's workers finished to the list head..tail (drain). */
void op__pool_take_done(op_pool *p, op_task **head, op_task **tail);
/* The runtime a pool belongs to. */
op_runtime *op__pool_rt(op_pool *p);
/* t came back (drain, before t->settle and t->complete): out of the
** books of its pool, its end counted unless it was counted when it was
** asked to stop. Nothing for a task of no pool (a block section). */
void op__pool_returned(op_task *t);
/* Post the sleepers that lazy submits (op_task.lazy) took off their
** pools' lists: the wake-ups put off until the submitter's resume ends. */
void op__pool_wake_later(op_runtime *rt);
/* Queue the tasks held so far (completions of C tasks, deep queues) and
** stop holding; post the wake-ups put off (op__pool_wake_later). */
void op__pool_release(op_runtime *rt);
/* The end of a drained batch: op__pool_release, then queue the parked
** tasks that now fit. */
void op__pool_batch_end(op_runtime *rt);

/* The worker running on this thread, or NULL on other threads; with
** op__worker_xfer and op__worker_stopping, worker.c's (the worker's VM). */
op_worker *op__worker_self(void);
int op__worker_id(op_worker *w);
op_pool *op__worker_pool(op_worker *w);
op_xfer *op__worker_xfer(op_worker *w);
/* Whether the task running on w was asked to stop. Thread: worker. */
int op__worker_stopping(op_worker *w);
/* Around a block section: enter returns 0 if w was given up as stuck (it
** must not hand the loop thread anything); a worker in a section is
** waiting for the loop thread, so it is never declared stuck. */
int op__worker_block_enter(op_worker *w);
void op__worker_block_leave(op_worker *w);
/* The task a worker hands to the loop thread for a block section. */
op_task *op__worker_block_task(op_worker *w);
/* wait = 1: wait until the loop thread finished the block section (worker);
** wait = 0: tell the worker it is finished (loop thread). */
void op__worker_block_sync(op_worker *w, int wait);
/* Make os.exit of the main VM L refuse inside block sections.
** [-0, +0, m] */
void op__guard_exit(lua_State *L);
/* Replace debug.sethook in the main VM with a guard that refuses inside
** block sections, whose budget is a hook.  [-0, +0, m] */
void op__block_guard_hooks(lua_State *L);

/* ---- waking the loop thread (wake.c) and its completions (loop.c) ---- */

/* Hand a finished task to the loop thread. Thread: any. */
void op__complete(op_runtime *rt, op_task *t);
/* Tell the loop thread that finished tasks are waiting. Returns 1 if it
** had to be woken, 0 if it is awake and will look. Thread: any. */
int op__notify_loop(op_runtime *rt);
/* The two halves of op__notify_loop, so that the first can run under a
** lock: raise done_flag and return 1 if the caller must then wake the
** loop thread with op__wake_loop(). Thread: any. */
int op__raise_done(op_runtime *rt);
void op__wake_loop(op_runtime *rt);
/* Reference the completion handle while pool tasks are in flight. */
void op__update_ref(op_runtime *rt);
/* Open / close the wake-up descriptor (rt->wake_fd): 0 or a negative errno.
** Consume the wake-ups sent so far (op__wake_clear). */
int op__wake_open(op_runtime *rt);
void op__wake_close(op_runtime *rt);
void op__wake_clear(op_runtime *rt);
/* The one swap of a list of finished tasks: take head..tail (guarded by mu,
** *any set while it is not empty) whole, appending it to *to_head..*to_tail.
** Thread: loop. */
void op__tasks_take(uv_mutex_t *mu, op_task **head, op_task **tail,
                    atomic_int *any, op_task **to_head, op_task **to_tail);
/* The wake-up descriptor's poll callback and the loop's prepare callback
** (loop.c), set up by op_runtime_new. */
void op__loop_wake_cb(uv_poll_t *poll, int status, int events);
void op__loop_idle_cb(uv_prepare_t *prep);
/* offpath's own Lua modules, built in (generated lua_modules.c). */
typedef struct op_lua_module {
  const char *name;      /* "offpath.trisul" */
  const char *chunkname; /* "@offpath/trisul.lua" */
  const unsigned char *src;
  size_t len;
} op_lua_module;
extern const op_lua_module op__lua_modules[];

/* Put offpath's own Lua modules (lua/offpath/NAME.lua, built in) in
** package.preload of L (vm.c).  [-0, +0, m] */
void op__preload_modules(lua_State *L);

/* ---- main-thread task objects (task.c) ---- */

/* The kinds of offpath.task objects. */
typedef enum op_ltask_kind {
  OP_LT_POOL = 0, /* a Lua task on a pool (run, launch, schedule) */
  OP_LT_GO        /* a main-thread coroutine (offpath.go) */
} op_ltask_kind;

typedef struct op_ltask op_ltask;

/* What a pool task object is for: it decides how many values it can hold
** besides its results. */
typedef enum op_ltask_use {
  OP_USE_RUN,     /* private to offpath.run: one waiter, no callbacks */
  OP_USE_LAUNCH,  /* offpath.launch: waiters and on_done callbacks */
  OP_USE_SCHEDULE /* offpath.schedule: data, onresult, onerror too */
} op_ltask_use;

/* Make a pool task for the function at fnidx and the nargs values after it
** and push the task object on L. Raises on a value that cannot be copied
** ("cannot copy ..."). timeout <= 0: none.  [-0, +1, e] */
op_ltask *op__task_new(lua_State *L, op_pool *pool, int fnidx, int nargs,
                       double timeout, const char *call, op_ltask_use use);
/* Queue lt on its pool. Returns 0 when queued; when the queue is full,
** OP_EAGAIN if may_wait is 0 (nothing changed), else 1: the task is
** parked in the pool and is queued as soon as there is room (call
** op__task_await_queued to suspend until then). Raises "shutdown" when the
** runtime is closing.  [-0, +0, e] */
int op__task_enqueue(lua_State *L, op_ltask *lt, int may_wait);
/* Suspend until a parked lt is queued (launch/schedule backpressure).
** Returns like a wait: the continuation k gets the usual (ok, ...)
** values; op__wait_yield semantics.  [-0, +0, e] */
int op__task_await_queued(lua_State *L, op_ltask *lt);
/* Make a go task running the function at fnidx with nargs arguments; push
** it and start the coroutine (on the next turn if Lua is running).
** [-0, +1, e] */
op_ltask *op__task_go(lua_State *L, int fnidx, int nargs);
/* Suspend the caller until lt ends; then return its results or raise.
** own: the caller owns the task (offpath.run), so a cancelled waiter
** cancels it.  [-0, +n, e] */
int op__task_await(lua_State *L, op_ltask *lt, double timeout, const char *call,
                   int own);
/* offpath.all(t1, t2, ...) or offpath.all{t1, t2, ...}: suspends until
** all end; returns a list of {true, results...} or {false, error[,
** traceback]}. Raises where nothing may suspend.  [-n, +1, e] */
int op__task_all(lua_State *L);
/* The most bytes of an encoded task result the main VM decodes
** (offpath.configure{max_result=}); a larger result fails the task. */
#define OP_MAX_RESULT_DEFAULT ((size_t)16 << 20)
#define op__max_result(rt)                                                     \
  ((rt)->max_result != 0 ? (rt)->max_result : OP_MAX_RESULT_DEFAULT)
/* Turn lt into a Trisul-style schedule: the values at the stack indices
** data, onresult, onerror (0: none) are kept and called on the loop thread
** when it ends.  [-0, +0, m] */
void op__task_set_schedule(lua_State *L, op_ltask *lt, int data, int onresult,
                           int onerror);
/* Register the offpath.task metatable.  [-0, +0, m] */
void op__task_open(lua_State *L);
/* Cancel every task that has not ended (go, launch, run, schedule), as
** task:cancel() does; for a host's shutdown. Returns how many. */
int op__task_cancel_all(op_runtime *rt);
/* Settle what collected pool tasks left (after lua_close of the main VM):
** report unobserved failures, free result buffers. */
void op__task_close(op_runtime *rt);

/* ---- spinning before sleeping (wake.c) ---- */

#if defined(__x86_64__) || defined(__i386__)
#define OP_CPU_RELAX() __builtin_ia32_pause()
#else
#define OP_CPU_RELAX() ((void)0)
#endif

/* Spin until *flag is non-zero, *until changes (until may be NULL) or us
** microseconds pass. Returns whether the flag was seen. Thread: any. */
int op__spin_until(atomic_int *flag, atomic_int *until, unsigned us);
/* The CPU the calling thread runs on, or -1 if unknown. Thread: any. */
int op__this_cpu(void);
/* Store cpu in *where if it differs (a hint for spinning). Thread: any. */
void op__note_cpu(atomic_int *where, int cpu);

/* An adaptive spin budget: the full budget after a hit, half after a miss,
** off after repeated misses, and a small retry every 64 skipped turns. */
typedef struct op_spin {
  unsigned max;   /* configured budget in microseconds; 0: never spin */
  unsigned cur;   /* the budget now */
  unsigned skips; /* turns skipped while cur is 0 */
} op_spin;

/* The budget to spin now (0: do not spin). */
unsigned op__spin_budget(op_spin *s);
/* Record whether a spin of that budget saw its event. */
void op__spin_result(op_spin *s, int hit);

/* ---- statistics helpers (stats.c) ---- */

/* Latency histograms: op_hist, in hist.h. */

/* ---- main-thread coroutines and waits (sched.c) ---- */

/*
** A wait: one suspended coroutine waiting on one operation. It is named by
** a 64-bit id (slot and generation), so a completion or timer that comes
** after the wait ended finds nothing and only frees its own resources.
*/
typedef uint64_t op_wait_id;

/* A timer that knows its runtime and the wait it serves (0: none) or its
** owner's data; the host may own loop->data, so callbacks never look there. Freed in its close callback
** (op__timer_close). */
typedef struct op_timer {
  uv_timer_t h;
  op_runtime *rt;
  op_wait_id id;
  void *data;
} op_timer;

/* Make and start a one-shot timer of ms milliseconds. Returns NULL on out of
** memory. */
op_timer *op__timer_start(op_runtime *rt, uint64_t ms, uv_timer_cb cb,
                          op_wait_id id, void *data);
/* Stop and close it (freed in the close callback). */
void op__timer_close(op_timer *t);

/* What to do when a wait times out or its coroutine's task is cancelled:
** abort the operation behind it. Called once, on the loop thread. The wait
** is already resolved when it runs; the operation must still release its
** own resources later (its completion will find the wait gone). */
typedef void (*op_abort_fn)(void *what, int code);

/* Suspend the running coroutine L on a new wait. timeout is in seconds
** (<= 0 means none). abort/what may be NULL. Raises if L cannot suspend
** ("cannot suspend: <call> ..."). Returns the wait id; the caller starts
** the operation, then returns op__wait_yield(L).  [-0, +0, e] */
op_wait_id op__wait_new(lua_State *L, const char *call, double timeout,
                        op_abort_fn abort, void *what);

/* Give back the wait id before anything was started for it (its
** operation could not be: out of memory); the caller raises next. */
void op__wait_drop(op_runtime *rt, op_wait_id id);
/* Set what the wait's abort gets, once the operation exists. */
void op__wait_set_abort(op_runtime *rt, op_wait_id id, op_abort_fn abort,
                        void *what);

/* Yield L until the wait resolves; the call then returns the values the
** resolver pushed, or raises its error.  [-0, +n, e] */
int op__wait_yield(lua_State *L);

/* The suspended coroutine of a wait, or NULL if the wait is no longer
** pending (timed out, cancelled, shut down). Push results on it, then call
** op__wait_resume. */
lua_State *op__wait_thread(op_runtime *rt, op_wait_id id);

/* Resolve a wait with the nres values pushed on its coroutine. */
void op__wait_resume(op_runtime *rt, op_wait_id id, int nres);

/* Resolve a wait with an error: the message is used as given (start it with
** a stable word: "timeout", "cancelled", "exec: ..."), or OP_NOMEM if
** its copy cannot be made. Never raises.  */
void op__wait_fail(op_runtime *rt, op_wait_id id, const char *msg);
/* Resolve a wait with the error value the resolver pushed on the waiting
** thread (any value: wait_k raises it as it is). */
void op__wait_fail_value(op_runtime *rt, op_wait_id id);
/* Resolve the wait id with the n values on top of from (a thread of the
** main VM, not the waiter), moved to the waiter: as results if ok, else
** as the error value (n == 1). If the waiter's stack cannot take them, it
** fails with OP_NOMEM instead. Pops the n values either way; allocates
** nothing that can fail.  [-n, +0, -] */
void op__wait_move(op_runtime *rt, op_wait_id id, lua_State *from, int n,
                   int ok);
/* op__wait_yield with the continuation k and context ctx instead of the
** usual one: k sees (true, values...) or (false, error) on top. */
int op__wait_yieldk(lua_State *L, lua_KContext ctx, lua_KFunction k);

/* Whether the calling code may suspend here.  [-0, +0, -] */
int op__can_suspend(lua_State *L);

/* Raise "cannot suspend: <call> ..." unless L may suspend.  [-0, +0, e] */
void op__check_suspend(lua_State *L, const char *call);

/* A handler coroutine ready to run: reused if one finished earlier, else
** made. Owned by the scheduler; set on_end/data before starting it.
** Returns NULL if it cannot be made (out of memory).  [-0, +0, -] */
op_co *op__co_acquire(op_runtime *rt);

/* Move the function and its nargs arguments from the top of `from` into c
** and resume it. Returns 0 if it finished or suspended, or OP_ESCRIPT if it
** failed before suspending (the message is in op_errmsg; on_end has run if
** set, else the error was counted). Thread: loop. */
int op__co_start(op_co *c, lua_State *from, int nargs);
/* Whether a coroutine started now (op__co_start, op_call_value) runs before
** the call returns: no resume is on the C stack. Thread: loop. */
int op__co_runs_now(const op_runtime *rt);

/* The runtime of a main-VM state (or its coroutines) (vm.c). */
op_runtime *op__runtime(lua_State *L);
/* Push the engine object of rt, made on first use (vm.c).  [-0, +1, m] */
void op__push_engine(op_runtime *rt);

/* Run fn(rt, arg) on the next loop turn, after the coroutines already
** ready (loop thread). */
void op__defer(op_runtime *rt, void (*fn)(op_runtime *, void *), void *arg);

/* Open /dev/null on each closed standard descriptor (0, 1, 2), in order
** (runtime.c; the host calls it first thing too). Thread: any, before
** other threads open descriptors. */
void op__std_fds_open(void);

/* ---- invocation groups (group.c) ---- */

/* Make a group whose last member's end calls cb(rt, err, ud); its maker
** holds it as a member until it lets go (op__group_leave). NULL on out
** of memory. */
op_group *op__group_new(op_track_cb cb, void *ud);
/* Free a group nothing joined yet, without calling its cb. */
void op__group_drop(op_group *g);
/* Count a new member of g (a coroutine or task started by code of g).
** NULL: none. */
void op__group_join(op_group *g);
/* Record msg as g's failure unless it has one. NULL g: nothing. */
void op__group_fail(op_group *g, const char *msg);
/* A member of g ended, with err (a failure nobody handled) or NULL; the
** last one runs g's callback and frees g. NULL g: nothing. */
void op__group_leave(op_runtime *rt, op_group *g, const char *err);

/* ---- the offpath Lua modules ---- */

/* lua_main.c: open the main-thread module (returns the module table). */
int op__open_main(lua_State *L);
/* lua_main.c: push the pools table of offpath.stats() made from st (the
** host's summary carries the same).  [-0, +1, m] */
void op__push_pool_stats(lua_State *L, const op_stats *st);
/* lua_worker.c: open the worker-side module. Thread: worker. */
int op__open_worker(lua_State *L);
/* Set up a fresh VM: libraries, package.path (vm.c). Used for the main VM
** and every worker VM. */
lua_State *op__new_state(op_runtime *rt, op_vmem *mem);

/* Add the io/ modules' functions to the offpath table on top of L (main
** VM). io/io.c calls each io file's opener, e.g. op__open_io_fs(L).
** [-0, +0, e] */
void op__open_io(lua_State *L);
/* Register the metatable mt of an io module's objects (metamethods meta,
** methods as __index), then add funcs as offpath.<field> to the module
** table on top of L (io/common.c).  [-0, +0, m] */
void op__io_register(lua_State *L, const char *mt, const luaL_Reg *meta,
                     const luaL_Reg *methods, const char *field,
                     const luaL_Reg *funcs);
/* The SQL argument at idx of db:query/db:exec: a string, or a table
** {sql or [1], timeout=} whose timeout overrides *timeout; the string
** replaces the table at idx (io/common.c).  [-0, +0, e] */
const char *op__sql_arg(lua_State *L, int idx, double *timeout, size_t *len);
/* A number option >= 0 of the options table at idx, or dflt (io/common.c).
** [-0, +0, e] */
double op__opt_number(lua_State *L, int idx, const char *key, double dflt,
                      const char *call);

/* Register fn to run at runtime shutdown (once, however often it is
** registered), after every wait has ended: an io module closes what it
** keeps open there and frees its state (io/common.c). */
void op__io_at_shutdown(op_runtime *rt, void (*fn)(op_runtime *rt));
/* Run the hooks registered, in order (op_runtime_free). */
void op__io_shutdown(op_runtime *rt);

/* ---- io/exec.c and io/fs.c: offpath.exec and the file calls ---- */

/* Add exec / copy, cat, readfile, writefile to the offpath table on top
** of L.  [-0, +0, e] */
void op__open_io_exec(lua_State *L);
void op__open_io_fs(lua_State *L);

/* A set-up guard (io/common.c): a small userdata whose __gc calls discard(L, p)
** unless p was cleared, so a malloc'ed operation that is being set up in a
** Lua call is not leaked when something raises before the operation is
** handed to the loop. Set p after the allocation, clear it once the wait
** owns the operation.  [-0, +1, m] */
typedef struct op_guard {
  void *p;
  void (*discard)(lua_State *L, void *p);
} op_guard;
op_guard *op__guard_new(lua_State *L, void (*discard)(lua_State *, void *));

/* ---- io/http.c and io/redis.c: offpath.http and offpath.redis ---- */

/* Add the offpath.http / offpath.redis tables to the offpath table on top
** of L.  [-0, +0, m] */
void op__open_io_http(lua_State *L);
void op__open_io_redis(lua_State *L);
/* Push the table of offpath.stats().http.  [-0, +1, m] */
void op__io_http_stats(lua_State *L, op_runtime *rt);

/* ---- io/pg.c and io/sqlite.c: offpath.pg and offpath.sqlite ---- */

/* Add the offpath.pg / offpath.sqlite tables to the offpath table on top
** of L.  [-0, +0, m] */
void op__open_io_pg(lua_State *L);
void op__open_io_sqlite(lua_State *L);

/* ---- the runtime (runtime.c) ---- */

/*
** A main-thread coroutine as offpath sees it. The address is stored in the
** thread's LUA_EXTRASPACE, so op__co(L) is one load. The main thread and
** coroutines the script makes itself point at rt->root (handler == 0).
*/
struct op_co {
  op_runtime *rt;
  lua_State *L;    /* the coroutine (the main thread for root) */
  int ref;         /* registry anchor of L */
  uint8_t handler; /* offpath runs it: it may suspend */
  uint8_t waiting; /* suspended on a wait, not a bare yield */
  uint8_t counted; /* counted in rt->suspended */
  uint8_t quiet;   /* first resume from op_call: errors are returned,
                            not reported */
  op_wait_id wait; /* the pending wait, or 0 */
  int ctx_ref;     /* offpath.context table, or LUA_NOREF */
  int ready_nargs; /* values to resume with, while on the ready list */

  /* The task its pending wait is for (cycle checks), or NULL. */
  op_ltask *awaiting;
  /* Latency: when a resolver began building its values (a reading of
  ** rt->ticker; 0: none), and the time they took if the resume was
  ** deferred (sched.c). */
  uint64_t prep_t0, prep_ns;
  /* Called when the coroutine's function returns (status LUA_OK, results
  ** on L) or fails (error object on L). Set by task.c (go tasks). */
  void (*on_end)(op_co *c, int status, int nres);
  void *data;
  op_group *grp; /* invocation group (op_call_track), or NULL */
  op_co *next;   /* free list / deferred list */
};

typedef struct op_wait op_wait;
typedef struct op_defer op_defer;

struct op_runtime {
  uv_loop_t *loop;
  uv_loop_t own_loop;
  int own;      /* loop is own_loop */
  lua_State *L; /* the main VM */
  op_vmem mem;  /* its memory */
  op_config cfg;
  char *package_path; /* owned copy of cfg.package_path */
  op_pool *pools[OP_MAX_POOLS];
  int npools;
  op_protostore *protos;
  op_xfer *xfer;             /* the main VM's transfer state */
  lua_CFunction open_worker; /* op__open_worker: a worker VM's module */
  uv_thread_t loop_thread;

  /* Completion queue: workers push, the loop thread swaps it out whole. */
  uv_mutex_t done_mu;
  op_task *done_head, *done_tail;
  uv_poll_t wake_poll; /* polls wake_fd[0] (loop.c) */
  int wake_fd[2];      /* read and write ends; one eventfd on Linux */

  /* Scheduler (sched.c). */
  op_co root;
  op_co *free_cos; /* finished coroutines kept for reuse */
  int nfree_cos;
  op_co *ready_head, *ready_tail; /* resumes deferred to the next turn */
  op_co *run_head, *run_tail;     /* resumes queued by the running co_resume */
  int resuming;                   /* a co_resume is on the C stack */
  op_defer *defer_head, *defer_tail;
  uv_idle_t idle; /* runs deferred work without blocking */
  op_wait *waits; /* slot array */
  uint32_t nwaits, free_wait;
  uint32_t pending_waits; /* resolved-not-yet waits */
  int depth;              /* nesting of resumes on the stack */
  lua_State *running;     /* the coroutine co_resume runs, or NULL; read
                             by op_runtime_running() from other threads */
  int suspended;          /* handler coroutines suspended now */
  int live_cos;           /* handler coroutines started and not ended */
  op_group *grp;          /* group of the Lua code running now (group.c) */

  uint64_t inflight;   /* pool tasks submitted and not completed */
  int hold_submits;    /* op__pool_submit holds tasks until op__pool_flush */
  int held;            /* it held Lua tasks for a deep queue (pool.c) */
  int wakes_later;     /* a pool has wake_later posts to make (pool.c) */
  unsigned hold_n;     /* C completions while holding (pool.c) */
  uint64_t hold_since; /* when holding began, by rt->ticker (pool.c) */
  uint64_t nsubmits;   /* tasks submitted (loop thread) */
  uint64_t yield_mark; /* nsubmits at the last yield */
  int woke_worker;     /* a submit woke a sleeping worker */
  /* Shared with the workers, on cache lines of their own: a worker
  ** spinning on loop_sleeps must not pull the lines the loop thread
  ** writes per task (the counters above). Waking the loop thread
  ** (wake.c): a producer raises done_flag and sends the wake-up only if
  ** need_wake was set (and clears it), so the loop thread gets no wake-up
  ** while it is draining or spinning. Hints for waiting without a wake-up
  ** (loop.c, pool.c): loop_cpu, worker_cpu, loop_sleeps. */
  char pad_shared_[64];
  atomic_int done_flag;
  atomic_int need_wake;
  atomic_int done_any;    /* done_head != NULL, read without done_mu */
  atomic_int loop_cpu;    /* CPU the loop thread last ran on, or -1 */
  atomic_int worker_cpu;  /* CPU a worker last woke up on, or -1 */
  atomic_int loop_sleeps; /* counts the loop thread going to block */
  char pad_shared_end_[64 - 6 * sizeof(atomic_int)];
  int kept_cpu;        /* the CPU pools keep off for the loop thread (pool.c
                          place()), or -1 until one does */
  int in_poll;         /* inside op_runtime_poll */
  op_pool *last_cpool; /* op__pool_find's cache */
  op_spin spin;
  uv_prepare_t spin_prepare;
  uint64_t batch_tick;     /* a reading of ticker while a drain settles
                              its batch (one serves every task), or 0 */
  const char *last_target; /* lua_main.c check_target's cache */
  op_pool *last_pool;
  op_tasks *tasks;      /* anchors, and what collected tasks left (task.c) */
  op_task *free_ctasks; /* finished C tasks kept for reuse */
  int nfree_ctasks;
  int closing;
  int loaded;   /* a script's main chunk ran */
  int borrowed; /* L is the caller's (the Lua module): never closed here */
  /* The largest result decoded, op__max_result(); 0: the default. */
  size_t max_result;

  /* Statistics (loop thread). */
  uint64_t calls, call_errors;
  op_hist call_hist;
  op_ticker ticker; /* times the resumes call_hist holds */

  /* Stuck workers (pool.c): grace in seconds, and the watch timer that
  ** runs while stopped tasks still run. */
  double stuck_grace;
  uv_timer_t stuck_timer;

  op_error_cb on_error;
  void *on_error_ud;
  char *errmsg;
  int engine_ref; /* the engine object */
  void *engine_ud;
  int uv_handles; /* open uv handles of the runtime itself */

  /* io modules: each owns its pointer (src/io/). */
  void *io_http, *io_redis, *io_pg, *io_exec;
  /* What they close at shutdown (io/common.c). */
#define OP_IO_HOOKS 8
  void (*io_hooks[OP_IO_HOOKS])(op_runtime *rt);
  int nio_hooks;
};

/* The op_co record of L (root for threads offpath does not run). */
static inline op_co *op__co(lua_State *L) {
  return *(op_co **)lua_getextraspace(L);
}

/* ---- errors and protected calls (error.c) ---- */

/* The one door from C into Lua: call the function below the nargs
** arguments on top of L in protected mode, with msgh as the message
** handler (op__traceback for code whose error is reported, op__xfer_msgh
** for a worker task, NULL for none: set-up code whose only error is
** memory, and calls that re-raise the error as it is). Returns the
** lua_pcall status; on error the error value, as msgh made it, is on top.
** [-(nargs+1), +(nres|1), -] */
int op__pcall(lua_State *L, int nargs, int nres, lua_CFunction msgh);
/* The same through the message handler already on the stack at index
** msgh (below the function), for a caller that makes many calls under one
** handler: the worker's tasks.  [-(nargs+1), +(nres|1), -] */
int op__pcall_at(lua_State *L, int nargs, int nres, int msgh);
/* Call fn in protected mode with the light userdata ud as its only
** argument: how C code that must not raise (a libuv callback, the
** completion of a task) builds Lua values. Returns LUA_OK with fn's nres
** results on L, or the error status with the error value on top (for a
** memory error Lua's own "not enough memory", which costs no memory).
** [-0, +(nres|1), -] */
int op__protect(lua_State *L, lua_CFunction fn, void *ud, int nres);
/* The one wording of an out-of-memory error, Lua's own. */
#define OP_NOMEM "not enough memory"
/* Keep the string OP_NOMEM in the registry (main VM), so that
** op__push_nomem allocates nothing.  [-0, +0, m] */
void op__nomem_open(lua_State *L);
/* Push the string OP_NOMEM kept by op__nomem_open. Allocates nothing and
** runs no collection step.  [-0, +1, -] */
void op__push_nomem(lua_State *L);
/* Push a copy of the C string s on L (main VM), or OP_NOMEM if it cannot
** be made.  [-0, +1, -] */
void op__push_text(lua_State *L, const char *s);
/* Message handler: message plus traceback.  [-1, +1, m] */
int op__traceback(lua_State *L);
/* The one description of an error value that is no string, "(error
** object is a <type> value)", written in buf. Allocates nothing, so it
** serves where Lua must not run.  [-0, +0, -] */
const char *op__error_object(lua_State *L, int idx, char *buf, size_t len);
/* Push the error value at idx as text, as lua.c does: a string or number
** as it is, else what its __tostring returns, else op__error_object's
** description. Returns the pushed string.  [-0, +1, e] */
const char *op__error_text(lua_State *L, int idx);
/* Report an error that has nowhere else to go (error callback, counters). */
void op__report_error(op_runtime *rt, const char *msg);
/* Set the runtime's error message (op_errmsg). */
void op__set_errmsg(op_runtime *rt, const char *fmt, ...);
/* Current position of a suspended or running coroutine, "file:line", in
** buf (or "?" if unknown). */
const char *op__where(lua_State *co, char *buf, size_t len);
/* Make the registry's table of error values and their tracebacks (main
** VM).  [-0, +0, m] */
void op__tracebacks_open(lua_State *L);
/* Remember the traceback tb (at -1) of the error value at -2, if that
** value has an identity offpath.traceback can find it by.  [-0, +0, m] */
void op__note_traceback(lua_State *L);
/* If the error value at idx came from a task and has an identity (a
** table, userdata, function), push the traceback recorded where it was
** raised and return 1; else 0.  [-0, +(0|1), m] */
int op__error_traceback(lua_State *L, int idx);

/* ---- the runtime (runtime.c) ---- */

/* op_runtime_new on the caller's lua_State L (the main thread of a stock
** Lua program, for the Lua module), or on a new one when L is NULL. A
** borrowed L gets offpath's preloads and the scheduler's record of its
** main thread, but not the offpath module (the caller opens it) and is
** never closed by op_runtime_free.  [-0, +0, m] */
int op__runtime_new(const op_config *cfg, lua_State *L, op_runtime **out);
/* Registry field of a runtime's main VM: the runtime (light userdata). */
#define OP_RUNTIME_KEY "offpath.runtime"

/* Start or continue the scheduler parts of rt (sched.c). */
int op__sched_init(op_runtime *rt);
void op__sched_close(op_runtime *rt);
/* Fail every pending wait with "cancelled: runtime shutting down". */
void op__sched_cancel_all(op_runtime *rt);
/* Resolve a wait as cancelled (task cancel): abort runs with code. */
void op__wait_cancel(op_runtime *rt, op_wait_id id, const char *msg, int code);

/* ---- debugging ---- */

/* In debug builds, panic unless the caller runs on rt's loop thread (the
** thread that made it). At the op_* entry points that are not documented
** for any thread. */
#ifdef OP_DEBUG
void op__check_loop_thread(op_runtime *rt, const char *fn);
#define op__assert_loop_thread(rt) op__check_loop_thread((rt), __func__)
#else
#define op__assert_loop_thread(rt) ((void)0)
#endif

#endif /* OFFPATH_INTERNAL_H */
