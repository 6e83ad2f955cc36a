/* SPDX-License-Identifier: MIT */
/*
** runtime.c - configuration, lifecycle, loop integration, the completion
** queue, scripts and handler calls.
** Thread: loop, except op__complete(), op__notify_loop(), op__raise_done()
** and op__wake_loop() (any thread).
**
** DESIGN: waking the loop thread
**
** Workers append finished tasks to their pool's list (pool.c), other
** producers to the runtime's (op__complete); the loop thread swaps the
** lists out whole and runs the completions with no lock held
** (drain_done). The producer that makes a list non-empty raises done_flag,
** and writes the wake-up descriptor (an eventfd the loop polls) only if
** need_wake is set, clearing it:
**
**   need_wake 1   the loop thread may block without looking at done_flag
**                 again: the next producer must wake it
**   need_wake 0   it will look (it is draining, spinning or yielding), or
**                 a wake-up is on its way (whoever cleared it sent one)
**
** The loop thread sets need_wake before its last look at done_flag
** (wake_on_next). Both sides store, then load, sequentially consistent,
** so at least one sees the other: a completion is never left without a
** wake-up, and a busy queue costs no syscall per task.
**
** A busy loop thread stays awake. The wake-up callback (done_cb) drains
** again while done_flag is up: a worker on the same CPU often finishes the
** next task during the drain. Before the loop blocks with tasks in flight
** (idle_cb, prepare phase) it yields the CPU to a worker on the same CPU
** that it just gave work, or, with spin_us set, spins for completions
** when the workers run on other CPUs. After DRAIN_ROUNDS drains it goes
** round the loop (timers, I/O) without blocking.
**
** The wake-up handle is referenced only while pool tasks are in flight, so
** op_runtime_run() returns when there is nothing left to wait for.
*/
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

#include "internal.h"

/* ---- configuration ---- */

void op_config_init(op_config *cfg) {
  long cores = sysconf(_SC_NPROCESSORS_ONLN);

  memset(cfg, 0, sizeof *cfg);
  cfg->pools[0].name = "io";
  cfg->pools[0].threads = 4;
  cfg->pools[1].name = "cpu";
  cfg->pools[1].threads = cores > 0 ? (int)cores : 1;
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

void op__set_errmsg(op_runtime *rt, const char *fmt, ...) {
  va_list ap;
  int n;
  char *p;

  va_start(ap, fmt);
  n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0 || (p = malloc((size_t)n + 1)) == NULL)
    return;
  va_start(ap, fmt);
  vsnprintf(p, (size_t)n + 1, fmt, ap);
  va_end(ap);
  free(rt->errmsg);
  rt->errmsg = p;
}

const char *op_errmsg(op_runtime *rt) {
  op__assert_loop_thread(rt);
  return rt->errmsg != NULL ? rt->errmsg : "";
}

void op__report_error(op_runtime *rt, const char *msg) {
  if (msg == NULL)
    msg = "(no message)";
  op__set_errmsg(rt, "%s", msg);
  if (rt->on_error != NULL)
    rt->on_error(rt, msg, rt->on_error_ud);
  else
    fprintf(stderr, "offpath: %s\n", msg);
}

void op_runtime_on_error(op_runtime *rt, op_error_cb cb, void *ud) {
  op__assert_loop_thread(rt);
  rt->on_error = cb;
  rt->on_error_ud = ud;
}

const char *op__error_object(lua_State *L, int idx, char *buf, size_t len) {
  snprintf(buf, len, "(error object is a %s value)", luaL_typename(L, idx));
  return buf;
}

const char *op__error_text(lua_State *L, int idx) {
  char buf[64];

  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
    lua_pushvalue(L, idx);
    return lua_tostring(L, -1);
  }
  if (luaL_callmeta(L, idx, "__tostring")) {
    if (lua_type(L, -1) == LUA_TSTRING)
      return lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  return lua_pushstring(L, op__error_object(L, idx, buf, sizeof buf));
}

int op__traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  char buf[64];

  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      return 1;
    msg = op__error_object(L, 1, buf, sizeof buf);
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

int op__pcall(lua_State *L, int nargs, int nres, lua_CFunction msgh) {
  int base = 0, status;

  if (msgh != NULL) {
    base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, msgh);
    lua_insert(L, base);
  }
  status = lua_pcall(L, nargs, nres, base);
  if (msgh != NULL)
    lua_remove(L, base);
  return status;
}

#ifdef OP_DEBUG
void op__check_loop_thread(op_runtime *rt, const char *fn) {
  uv_thread_t me = uv_thread_self();
  char msg[128];

  if (!uv_thread_equal(&me, &rt->loop_thread)) {
    snprintf(msg, sizeof msg,
             "%s called off the loop thread (the thread that made the "
             "runtime)",
             fn);
    OP_PANIC(msg);
  }
}
#endif

/* ---- Lua states ---- */

/* package.preload loader of a built-in module; upvalue 1 is its entry. */
static int load_builtin(lua_State *L) {
  const op_lua_module *m = lua_touserdata(L, lua_upvalueindex(1));

  if (luaL_loadbufferx(L, (const char *)m->src, m->len, m->chunkname, "t"))
    return lua_error(L);
  lua_pushstring(L, m->name);
  lua_call(L, 1, 1);
  return 1;
}

void op__preload_modules(lua_State *L) {
  const op_lua_module *m;

  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (m = op__lua_modules; m->name != NULL; m++) {
    lua_pushlightuserdata(L, (void *)m);
    lua_pushcclosure(L, load_builtin, 1);
    lua_setfield(L, -2, m->name);
  }
  lua_pop(L, 1);
}

/* The set-up of op__new_state, protected: arg 1 is the runtime.
** [-1, +0, m] */
static int new_state_p(lua_State *L) {
  op_runtime *rt = lua_touserdata(L, 1);

  lua_pop(L, 1);
  luaL_openlibs(L);
  /* Tasks make many short-lived objects: generational collection costs a
  ** fraction of incremental collection for them (see docs/benchmarks.md). */
  lua_gc(L, LUA_GCGEN, 0, 0);
  op__preload_modules(L);
  if (rt->package_path != NULL) {
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s;", rt->package_path);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
  }
  return 0;
}

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

/* Returns NULL on out of memory. */
lua_State *op__new_state(op_runtime *rt, op_vmem *mem) {
  lua_State *L = op__vm_new(mem);

  if (L == NULL)
    return NULL;
  lua_pushcfunction(L, new_state_p);
  lua_pushlightuserdata(L, rt);
  if (op__pcall(L, 1, 0, NULL) != LUA_OK) {
    lua_close(L);
    return NULL;
  }
  return L;
}

op_runtime *op__runtime(lua_State *L) {
  return op__co(L)->rt;
}

op_runtime *op_runtime_from_lua(lua_State *L) {
  return op__runtime(L);
}

/* ---- waking the loop thread ---- */

/* Make the descriptor the loop thread polls for wake-ups: an eventfd, or
** a pipe where there is none. Not libuv's uv_async: a sender preempted
** inside uv_async_send makes the woken loop thread spin for it (about
** 13 us on the 2-vCPU machines of docs/benchmarks.md), and need_wake
** already lets one send stand for many completions. Returns 0 or a
** negative errno. */
static int wake_open(op_runtime *rt) {
#ifdef __linux__
  int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

  if (fd < 0)
    return -errno;
  rt->wake_fd[0] = rt->wake_fd[1] = fd;
#else
  int i;

  if (pipe(rt->wake_fd) != 0)
    return -errno;
  for (i = 0; i < 2; i++) {
    fcntl(rt->wake_fd[i], F_SETFD, FD_CLOEXEC);
    fcntl(rt->wake_fd[i], F_SETFL, O_NONBLOCK);
  }
#endif
  return 0;
}

static void wake_close(op_runtime *rt) {
  close(rt->wake_fd[0]);
  if (rt->wake_fd[1] != rt->wake_fd[0])
    close(rt->wake_fd[1]);
}

/* Make the wake-up descriptor readable. Thread: any. */
static void wake_send(op_runtime *rt) {
  uint64_t one = 1;
  ssize_t n;

  /* EAGAIN: it is full, so it is readable already. */
  do
    n = write(rt->wake_fd[1], &one, sizeof one);
  while (n < 0 && errno == EINTR);
}

/* Consume the wake-ups sent so far. */
static void wake_clear(op_runtime *rt) {
  char buf[64];
  ssize_t n;

  do
    n = read(rt->wake_fd[0], buf, sizeof buf);
  while (n == (ssize_t)sizeof buf || (n < 0 && errno == EINTR));
}

/* ---- the completion queue ---- */

void op__complete(op_runtime *rt, op_task *t) {
  int first;

  t->next = NULL;
  uv_mutex_lock(&rt->done_mu);
  first = rt->done_head == NULL;
  if (first) {
    rt->done_head = t;
    atomic_store(&rt->done_any, 1);
  } else {
    rt->done_tail->next = t;
  }
  rt->done_tail = t;
  uv_mutex_unlock(&rt->done_mu);
  if (first)
    op__notify_loop(rt);
}

/* Raise done_flag, then send the wake-up if the loop thread may block
** without looking at done_flag again (need_wake). The loop thread sets
** need_wake before its last look (wake_on_next): with both orders
** sequentially consistent, one of the two sees the other. */
int op__raise_done(op_runtime *rt) {
  atomic_store(&rt->done_flag, 1);
  return atomic_load(&rt->need_wake) && atomic_exchange(&rt->need_wake, 0);
}

void op__wake_loop(op_runtime *rt) {
  wake_send(rt);
}

int op__notify_loop(op_runtime *rt) {
  if (!op__raise_done(rt))
    return 0;
  wake_send(rt);
  return 1;
}

/* ---- spinning ---- */

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

int op__spin_until(atomic_int *flag, atomic_int *until, unsigned us) {
  uint64_t end = uv_hrtime() + (uint64_t)us * 1000;
  int was =
      until != NULL ? atomic_load_explicit(until, memory_order_relaxed) : 0;
  unsigned i;

  for (i = 1;; i++) {
    if (atomic_load_explicit(flag, memory_order_acquire))
      return 1;
    if (until != NULL &&
        atomic_load_explicit(until, memory_order_relaxed) != was)
      return 0;
    if ((i & 63) == 0 && uv_hrtime() >= end)
      return 0;
    CPU_RELAX();
  }
}

int op__this_cpu(void) {
#ifdef __linux__
  return sched_getcpu();
#else
  return -1;
#endif
}

/* Record that the calling thread runs on cpu now. Written only when it
** changes, so readers on other CPUs keep the line shared. Thread: any. */
void op__note_cpu(atomic_int *where, int cpu) {
  if (atomic_load_explicit(where, memory_order_relaxed) != cpu)
    atomic_store_explicit(where, cpu, memory_order_relaxed);
}

unsigned op__spin_budget(op_spin *s) {
  if (s->cur == 0 && s->max > 0 && ++s->skips >= 64) {
    /* Retry with the full budget: a shorter spin cannot outlast a
    ** wake-up across CPUs, so it would never find the work coming back. */
    s->skips = 0;
    s->cur = s->max;
  }
  return s->cur;
}

void op__spin_result(op_spin *s, int hit) {
  s->cur = hit ? s->max : s->cur / 2;
  if (s->cur < 2)
    s->cur = hit ? s->cur : 0;
}

/* Keep the loop alive exactly while pool tasks are in flight. */
void op__update_ref(op_runtime *rt) {
  if (rt->inflight > 0)
    uv_ref((uv_handle_t *)&rt->wake_poll);
  else
    uv_unref((uv_handle_t *)&rt->wake_poll);
}

/* Longest a C completion batch holds the tasks its callbacks submit. */
#define HOLD_NS 100000

/* Queue the tasks held since hold_submits was set, or held because their
** pool's queue was deep (rt->held), and stop holding. */
static void release_submits(op_runtime *rt) {
  int i;

  if (!rt->hold_submits && !rt->held)
    return;
  rt->hold_submits = rt->held = 0;
  for (i = 0; i < rt->npools; i++)
    op__pool_flush(rt->pools[i]);
}

/* Run the completions of every finished task. Tasks that the callbacks of
** C tasks submit are held until the batch ends (op__pool_submit), so the
** batch is queued under one lock and the workers it wakes do not preempt
** the loop thread after every callback on a shared CPU. */
static void drain_done(op_runtime *rt) {
  op_task *t, *list, *tail;
  uint64_t since;
  unsigned n = 0;
  int i;

  atomic_store(&rt->done_flag, 0);
  list = tail = NULL;
  if (atomic_load(&rt->done_any)) {
    uv_mutex_lock(&rt->done_mu);
    list = rt->done_head;
    tail = rt->done_tail;
    rt->done_head = rt->done_tail = NULL;
    atomic_store_explicit(&rt->done_any, 0, memory_order_relaxed);
    uv_mutex_unlock(&rt->done_mu);
  }
  for (i = 0; i < rt->npools; i++)
    op__pool_take_done(rt->pools[i], &list, &tail);
  if (list == NULL)
    return;
  /* Settle the whole batch before telling anyone, so a coroutine resumed
  ** for one task finds the rest of the batch ended too. */
  rt->batch_now = uv_hrtime();
  for (t = list; t != NULL; t = t->next) {
    if (t->kind == OP_TASK_BLOCK)
      continue;
    rt->inflight--;
    op__pool_returned(t->pool, t);
    if (t->settle != NULL)
      t->settle(t);
  }
  since = rt->batch_now;
  while ((t = list) != NULL) {
    list = t->next;
    t->next = NULL;
    if (t->kind == OP_TASK_C) {
      rt->hold_submits = 1;
      t->complete(t);
      /* A long batch queues what it held so far now and then. */
      if ((++n & 15) == 0 && uv_hrtime() - since > HOLD_NS) {
        release_submits(rt);
        since = uv_hrtime();
      }
      continue;
    }
    /* Lua code may run long: queue the held tasks first, and hold none
    ** of its own. */
    release_submits(rt);
    if (t->kind == OP_TASK_BLOCK)
      op__block_run(rt, t);
    else
      t->complete(t);
  }
  release_submits(rt);
  rt->batch_now = 0;
  for (i = 0; i < rt->npools; i++)
    if (op__pool_backlog(rt->pools[i])->head != NULL)
      op__task_flush_backlog(rt->pools[i]);
  op__update_ref(rt);
}

/* Let the next completion wake the loop thread, which is about to stop
** looking at done_flag. If one came meanwhile, go round the loop once more
** instead of blocking, and return 1. */
static int wake_on_next(op_runtime *rt) {
  atomic_store(&rt->need_wake, 1);
  if (atomic_load(&rt->done_flag) && atomic_exchange(&rt->need_wake, 0)) {
    wake_send(rt);
    return 1;
  }
  return 0;
}

#define DRAIN_ROUNDS 64

/* How often a spinning loop thread looks for I/O. */
#define PEEK_NS 4000

/* Spin for done_flag on the loop thread, for at most us microseconds and
** not past the next timer; stop as soon as the loop has I/O to handle (a
** zero-timeout poll of the backend descriptor every PEEK_NS). Returns
** whether done_flag was seen. */
static int spin_for_done(op_runtime *rt, unsigned us) {
  struct pollfd pfd;
  uint64_t now, end, peek;
  int ms = uv_backend_timeout(rt->loop);
  unsigned i;

  if (ms == 0)
    return 0;
  if (ms > 0 && (uint64_t)ms * 1000 < us)
    us = (unsigned)ms * 1000;
  pfd.fd = uv_backend_fd(rt->loop);
  pfd.events = POLLIN;
  now = uv_hrtime();
  end = now + (uint64_t)us * 1000;
  peek = now + PEEK_NS;
  for (i = 1;; i++) {
    if (atomic_load_explicit(&rt->done_flag, memory_order_acquire))
      return 1;
    if ((i & 63) == 0) {
      now = uv_hrtime();
      if (now >= end)
        return 0;
      if (now >= peek) {
        if (pfd.fd >= 0 && poll(&pfd, 1, 0) > 0)
          return 0;
        peek = now + PEEK_NS;
      }
    }
    CPU_RELAX();
  }
}

/* The completion wake-up: drain, and drain again while completions keep
** coming (a worker on this CPU often finishes the next task before the
** drain ends), at most DRAIN_ROUNDS times, so the loop thread goes back
** to blocking in the kernel only when there is nothing to do. need_wake
** is clear meanwhile (the sender cleared it), so the workers send no
** wake-ups. */
static void done_cb(uv_poll_t *poll, int status, int events) {
  op_runtime *rt = poll->data;
  int rounds = 0;

  (void)status; /* an error would be EBADF: impossible while it is open */
  (void)events;
  wake_clear(rt);
  op__note_cpu(&rt->loop_cpu, op__this_cpu());
  do
    drain_done(rt);
  while (++rounds < DRAIN_ROUNDS && atomic_load(&rt->done_flag));
  wake_on_next(rt);
}

/* Before the loop thread blocks while tasks are in flight (prepare phase),
** wait for their completions a cheaper way if there is one:
**
** - A worker runs on this CPU and was given work since the last look: yield
**   the CPU to it. If it finishes meanwhile, the completion costs no
**   wake-up through the kernel on either side.
** - Spinning is on (spin_us), the workers run on other CPUs and none had
**   to be woken for the tasks just submitted: spin a little. A wake-up
**   across CPUs costs tens of microseconds; a worker that finishes while
**   the loop thread spins only raises done_flag. The budget adapts
**   (op__spin_result), so a loop waiting on long tasks stops spinning,
**   and a loop that had to wake a worker does not spin while it wakes up.
**
** need_wake is clear meanwhile, so finishing workers send no wake-up.
** Neither happens inside op_runtime_poll, whose host also waits on
** descriptors the loop does not know. */
static void idle_cb(uv_prepare_t *prep) {
  op_runtime *rt = prep->data;
  unsigned us = 0;
  int hit, rounds, cpu, yield, woke, cleared = 0;

  release_submits(rt); /* the turn's held Lua tasks, before any wait */
  for (rounds = 0; rounds < DRAIN_ROUNDS; rounds++) {
    if (rt->inflight == 0 || rt->ready_head != NULL || rt->defer_head != NULL ||
        rt->in_poll)
      break;
    cpu = op__this_cpu();
    op__note_cpu(&rt->loop_cpu, cpu);
    yield = cpu >= 0 &&
            cpu == atomic_load_explicit(&rt->worker_cpu, memory_order_relaxed);
    woke = rt->woke_worker;
    rt->woke_worker = 0;
    if (yield ? rt->nsubmits == rt->yield_mark
              : woke || (us = op__spin_budget(&rt->spin)) == 0)
      break;
    /* A wake-up on its way means the loop will not block anyway. */
    if (!cleared && !atomic_exchange(&rt->need_wake, 0))
      return;
    cleared = 1;
    if (yield) {
      rt->yield_mark = rt->nsubmits;
      sched_yield();
      hit = atomic_load(&rt->done_flag);
    } else {
      hit = spin_for_done(rt, us);
      op__spin_result(&rt->spin, hit);
    }
    if (!hit)
      break;
    drain_done(rt);
  }
  if (rounds == DRAIN_ROUNDS) {
    /* Still busy: go round the loop (timers, I/O) without blocking; the
    ** wake-up stands for need_wake, which is still clear. */
    wake_send(rt);
    return;
  }
  if (cleared && wake_on_next(rt))
    return;
  /* About to block: a spinning worker stops waiting for a submit. */
  atomic_store_explicit(
      &rt->loop_sleeps,
      atomic_load_explicit(&rt->loop_sleeps, memory_order_relaxed) + 1,
      memory_order_relaxed);
}

/* ---- stuck workers ---- */

/* The stuck watch: give up the workers whose stopped task still runs
** after the grace time (op__pool_check_stuck), and stop when no stopped
** task runs any more. Unreferenced: it never keeps the loop alive by
** itself, and a loop waiting on the stopped task runs it. */
static void stuck_cb(uv_timer_t *timer) {
  op_runtime *rt = timer->data;
  uint64_t now = uv_hrtime(), grace = (uint64_t)(rt->stuck_grace * 1e9);
  int i, waiting = 0;

  for (i = 0; i < rt->npools; i++)
    waiting += op__pool_check_stuck(rt->pools[i], now, grace);
  if (waiting == 0)
    uv_timer_stop(timer);
}

void op__watch_stuck(op_runtime *rt) {
  uint64_t ms;

  if (uv_is_active((uv_handle_t *)&rt->stuck_timer))
    return;
  /* Looks four times per grace time: a stuck worker is given up within
  ** 1.25 grace times of its stop. */
  ms = (uint64_t)(rt->stuck_grace * 250.0);
  if (ms < 10)
    ms = 10;
  uv_timer_start(&rt->stuck_timer, stuck_cb, ms, ms);
}

/* ---- C tasks ---- */

typedef struct ctask {
  op_task t;
  op_done_fn done;
  op_runtime *rt;
} ctask;

#define MAX_FREE_CTASKS 1024

static void ctask_complete(op_task *t) {
  ctask *c = (ctask *)t;
  op_runtime *rt = c->rt;
  op_done_fn done = c->done;
  void *arg = t->arg;
  int status = t->status;

  op__pool_count_end(t->pool, t,
                     status == 0 ? OP_TASK_DONE : OP_TASK_CANCELLED);
  /* Keep it for the next op_submit: no malloc per C task. */
  if (rt->nfree_ctasks < MAX_FREE_CTASKS) {
    t->next = rt->free_ctasks;
    rt->free_ctasks = t;
    rt->nfree_ctasks++;
  } else {
    free(c);
  }
  done(arg, status);
}

int op_submit(op_runtime *rt, const char *pool, op_work_fn work,
              op_done_fn done, void *arg) {
  op_pool *p;
  ctask *c;
  int rc;

  op__assert_loop_thread(rt);
  if (work == NULL || done == NULL || pool == NULL)
    return OP_EINVAL;
  if (rt->closing)
    return OP_ESHUTDOWN;
  if ((p = op__pool_find(rt, pool)) == NULL)
    return OP_ENOPOOL;
  if (rt->free_ctasks != NULL) {
    /* A recycled task is as ctask_complete left it: only the stop flag
    ** may need clearing (a task cancelled at shutdown). */
    c = (ctask *)rt->free_ctasks;
    rt->free_ctasks = c->t.next;
    rt->nfree_ctasks--;
    atomic_store_explicit(&c->t.stop, 0, memory_order_relaxed);
  } else if ((c = malloc(sizeof *c)) != NULL) {
    op__task_init(&c->t, OP_TASK_C);
    c->rt = rt;
    c->t.complete = ctask_complete;
  } else {
    return OP_ENOMEM;
  }
  c->t.work = work;
  c->t.arg = arg;
  c->done = done;
  rc = op__pool_submit(p, &c->t);
  if (rc != 0) {
    c->t.next = rt->free_ctasks;
    rt->free_ctasks = &c->t;
    rt->nfree_ctasks++;
    return rc;
  }
  return 0;
}

/* ---- tasks ---- */

void op__task_init(op_task *t, op_task_kind kind) {
  memset(t, 0, sizeof *t);
  t->kind = (uint8_t)kind;
  atomic_init(&t->stop, 0);
  op__buf_init(&t->buf);
}

void op__task_release(op_task *t) {
  op__buf_free(&t->buf);
  free(t->stale);
  t->stale = NULL;
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
  if ((rc = wake_open(rt)) == 0 &&
      (rc = uv_poll_init(rt->loop, &rt->wake_poll, rt->wake_fd[0])) != 0)
    wake_close(rt);
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
  uv_poll_start(&rt->wake_poll, UV_READABLE, done_cb);
  uv_unref((uv_handle_t *)&rt->wake_poll);
  atomic_init(&rt->done_flag, 0);
  atomic_init(&rt->need_wake, 1);
  atomic_init(&rt->done_any, 0);
  atomic_init(&rt->loop_cpu, -1);
  atomic_init(&rt->loop_sleeps, 0);
  atomic_init(&rt->worker_cpu, -1);
  rt->spin.max = rt->spin.cur = cfg->spin_us > 0 ? (unsigned)cfg->spin_us : 0;
  rt->stuck_grace = cfg->stuck_grace > 0 ? cfg->stuck_grace : 1.0;
  uv_timer_init(rt->loop, &rt->stuck_timer);
  rt->stuck_timer.data = rt;
  rt->uv_handles++;
  uv_unref((uv_handle_t *)&rt->stuck_timer);
  uv_prepare_init(rt->loop, &rt->spin_prepare);
  rt->spin_prepare.data = rt;
  rt->uv_handles++;
  uv_prepare_start(&rt->spin_prepare, idle_cb);
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
  int i, more;

  for (;;) {
    more = rt->inflight > 0 || rt->ready_head != NULL || rt->defer_head != NULL;
    for (i = 0; i < rt->npools && !more; i++)
      more = op__pool_backlog(rt->pools[i])->head != NULL;
    if (!more)
      break;
    uv_run(rt->loop, UV_RUN_ONCE);
  }
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
  wake_close(rt);
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

int op_call_value(op_runtime *rt, int nargs) {
  op_co *c;

  op__assert_loop_thread(rt);
  rt->calls++;
  c = op__co_acquire(rt);
  c->quiet = rt->depth == 0;
  return op__co_start(c, rt->L, nargs);
}

int op_call(op_runtime *rt, const char *handler, int nargs) {
  lua_State *L = rt->L;

  op__assert_loop_thread(rt);
  if (lua_getglobal(L, handler) != LUA_TFUNCTION) {
    lua_pop(L, nargs + 1);
    op__set_errmsg(rt, "no handler '%s'", handler);
    return OP_ENOHANDLER;
  }
  lua_insert(L, -(nargs + 1));
  return op_call_value(rt, nargs);
}

/* ---- the engine object ---- */

int op_register_engine(op_runtime *rt, const luaL_Reg *fns, void *ud) {
  lua_State *L = rt->L;

  op__assert_loop_thread(rt);
  rt->engine_ud = ud;
  op_push_engine(rt);
  luaL_setfuncs(L, fns, 0);
  op__xfer_hint(L, -1,
                "engine methods run on the main thread; call them "
                "in the handler or in on_done");
  lua_pop(L, 1);
  return 0;
}

void op_push_engine(op_runtime *rt) {
  lua_State *L = rt->L;

  op__assert_loop_thread(rt);
  if (rt->engine_ref == LUA_NOREF) {
    lua_newtable(L);
    lua_pushvalue(L, -1);
    rt->engine_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, rt->engine_ref);
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
