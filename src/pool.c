/* SPDX-License-Identifier: MIT */
/*
** pool.c - named worker pools: threads, bounded queues, parking, the
** pools' books, C tasks, the stuck watch. A worker's Lua VM is worker.c's:
** worker_main() calls down into it for each Lua task.
** Thread: op__pool_* on the loop thread; worker_main() on pool threads.
**
** DESIGN
**
** Each pool has a FIFO queue of op_task and a list of finished tasks,
** both under one mutex (adaptive: the loop thread and the workers hold it
** for a few instructions at a time, often from different CPUs). A worker
** hands in the task it finished and takes its next one in the same
** critical section, so a busy pool costs one lock per task on the
** worker's side. The worker that makes the finished list non-empty raises
** the runtime's done_flag and wakes the loop thread only if it may be
** asleep (op__raise_done, wake.c); the loop thread swaps the lists of
** every pool out whole (op__pool_take_done). p->queued is written under
** the lock and read by the loop thread without it: workers only lower it,
** so the loop thread's view is never too low.
**
** Sleeping and waking. An idle worker puts itself on p->sleepers and
** waits on its own semaphore. A submit takes one sleeper off the list and
** posts it after unlocking (a condition variable signalled under the lock
** wakes the worker only for it to block on the mutex), so a burst of
** submits wakes each sleeper once.
**
** Held submits. While the loop thread runs the done callbacks of C tasks
** (rt->hold_submits, set by the C task's completion), op__pool_submit puts tasks on
** a pending list of the loop thread's own; op__pool_flush queues them and
** wakes the sleepers they need under one lock when the batch ends (and
** now and then during a long one). A batch then costs one lock instead of
** one per task, and on a CPU shared with a worker the worker woken for
** the first task does not preempt the loop thread after every callback.
** A pending task (t->queued == IN_PENDING) counts against the capacity,
** is queued for op__pool_is_queued, and op__pool_stop_task takes it off
** the pending list.
**
** Lazy wake-ups. The task of an offpath.run (t->lazy), whose handler
** suspends right after the submit, is queued at once, but the sleeper it
** needs is only taken off p->sleepers, onto p->wake_later, and posted when
** the resume ends (co_run, sched.c), which follows at once: offpath.run
** is only made from a handler coroutine. op__pool_release (before the
** loop blocks) and op__pool_free post whatever is left all the same. A
** parked task wakes its worker when it is queued: its submitter is gone.
** A post is a system call that costs 10-25 us on a VM when the worker's
** CPU is idle; it then falls between handlers instead of inside the one
** that offloads. A worker that is awake meanwhile takes the task anyway.
** launch and schedule wake at once: their caller goes on, maybe in C or
** in another coroutine, where nothing could post for it (a count hook was
** tried: it sees neither).
**
** Lua tasks are held the same way while the queue is deep (HOLD_DEPTH):
** the workers have work for a while, and a loop thread that takes the
** pool lock per submit fights them for it (with 1024 tasks in flight a
** fifth of its time went to the lock). They are queued HOLD_MAX at a
** time, at the end of a completion batch, and before the loop thread
** polls (op__pool_release, loop.c); a coroutine that launches and then
** computes for long without yielding delays only what it launched beyond
** HOLD_DEPTH queued tasks.
**
** Waiting without a wake-up. A worker that has just handed in a result
** and finds the queue empty first gives the loop thread a chance to
** submit again: if the loop thread last ran on this CPU the worker yields
** it; otherwise, with spin_us set, one worker per pool spins on p->avail
** until the loop thread goes to sleep (rt->loop_sleeps) or an adaptive
** budget runs out. Only then does it sleep.
**
** Lock order: pool->mu, then rt->done_mu (op__complete never takes
** pool->mu). No Lua call is made under either lock.
**
** Stopping a task: op__pool_stop_task() takes a queued task off the queue
** (under pool->mu) and completes it as stopped; for a running task it sets
** t->stop and the worker's own copy, w->stop, and sends the worker the
** stop signal (p->signo, if any): the worker VM's hook raises (worker.c). C code
** inside a task (os.execute, a blocking read, a pattern match) and __gc
** finalizers (Lua runs them with hooks off) cannot be interrupted this
** way: see "Stuck workers".
**
** Stuck workers. A Lua task that was asked to stop and still runs
** rt->stuck_grace seconds later (w->stop_at, the stuck watch below)
** is given up: abandon() hands the task back to the loop thread as
** stopped, through p's done list, detaches the thread and starts a fresh
** one with a fresh VM in its slot. The old thread becomes a *ghost*. So
** that it never touches what the loop thread may free, a worker owns what
** it uses while a task runs: the arguments (w->in, moved out of the task
** when it is taken), the results (w->out), the stop code (w->stop); it
** touches the task again only under p->mu, after checking w->abandoned
** (op__wvm_hand_in). A ghost that comes back closes its VM and frees its
** record (ghost_exit); p itself stays until the last ghost is gone
** (p->ghosts, p->freed), and the prototype store with it (op_remnant).
** A worker inside a block section waits for the loop thread and is never
** given up (w->in_block). C tasks are never given up: their memory
** belongs to their completion; they look at t->stop themselves.
**
**   RUNNING --stop--> STOPPING --returns--> hand in (normal)
**                        |
**                        +--grace passes--> ABANDONED (ghost) --returns-->
**                                           ghost_exit (frees its own)
**
** Threads that cannot start (a thread or address-space limit) leave their
** slot empty: the pool runs with p->running threads, and a pool with none
** refuses submits (OP_ENOTHREAD) after trying again.
**
** Where workers run. A worker that wakes up, goes to sleep or takes its
** timer's interrupt on the loop thread's CPU stalls the handler running
** there: with 64 workers sleeping 10 ms each, a handler's p99 on a 2-CPU
** VM was 8-13 us against 4.9 us with no workers; kept off that CPU,
** 4.0-7.4 us. So by default (op_config.loop_cpu) a pool with more threads
** than the loop thread may use CPUs (a pool that waits rather than
** computes: one CPU fewer costs it nothing) keeps its workers off the CPU
** the loop thread ran on when the first such pool started (place(), then
** each worker's keep_off(); workers start with the loop thread's CPUs).
** The loop thread is not pinned: the kernel keeps a thread that wakes up
** on its last CPU when that CPU is idle, and nothing else of ours runs
** there. Smaller pools, which may be computing on every CPU, are left
** where the kernel puts them.
**
** Workers run under SCHED_BATCH where there is one (Linux): the kernel
** then does not let a worker that wakes up preempt the loop thread on
** its CPU, so a handler on the fast path is not cut in two by a worker
** coming back from a sleep or a blocking call (with 64 workers doing 10 ms
** of blocking work each, the loop thread's p99 per resume went from 4.4-
** 7.9 us to 4.4-5.9 us). Workers still get their fair share of the CPU.
*/
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>

#include "worker.h"

#define DEFAULT_QUEUE 4096

struct op_pool {
  op_runtime *rt;
  char name[OP_POOL_NAME_MAX];
  int nthreads;
  int cap;
  char *init;          /* init script path, or NULL */
  size_t mem_limit;    /* bytes per worker VM, 0: none */
  op_worker **workers; /* nthreads slots; NULL: no thread there */
  int started;
  int running;   /* threads running (not ghosts); loop thread */
  int start_err; /* why the last thread could not start, or 0 */
  int reported;  /* the shortfall was reported */
  int signo;     /* the stop signal, or 0 (op_config.stop_signal) */
  /* Set once, under mu, by the loop thread; read by workers under mu and
  ** by the loop thread on every submit: here among what is read often and
  ** written rarely, not on the line the workers write for every task. */
  int stopping;
  int off_cpu; /* the CPU its workers keep off (the loop thread's), or -1 */

  /* The lock and what it guards, written by the workers for every task,
  ** start a cache line away from what the loop thread reads to submit. */
  char pad_mu_[64];
  uv_mutex_t mu; /* guards everything down to has_done */
  op_task *head, *tail;
  op_task *done_head, *done_tail; /* finished, for the loop thread */
  atomic_uint queued;             /* tasks in the queue (written under mu) */
  op_worker *sleepers;            /* workers asleep and not yet woken, LIFO */
  int spinner;                    /* a worker is spinning for work */
  int lookers;         /* workers yielding or spinning after a task: each will
                  look at the queue again before it sleeps */
  int claimed;         /* submits that count on a looker instead of a wake-up */
  op_spin spin;        /* the spinning worker's budget */
  int ghosts;          /* threads given up as stuck and still running */
  int freed;           /* op__pool_free ran: the last ghost frees p */
  op_remnant *remnant; /* released when p is freed (op__pool_free) */
  atomic_int has_done; /* done_head != NULL, read without the lock */
  /* Queue non-empty or stopping, for the spinner; written under mu, only
  ** when it changes (set_avail). On a cache line of its own: a worker
  ** spinning on it must not pull the lines the loop thread writes to
  ** submit. */
  char pad_avail_[64];
  atomic_int avail;
  char pad_avail_end_[64 - sizeof(atomic_int)];

  /* Loop thread only. */
  op_task *pend_head, *pend_tail; /* submitted during a drain (flush) */
  op_worker *wake_later;          /* sleepers taken for lazy submits, to post */
  uint32_t npend;
  uint32_t q_seen; /* p->queued when the held batch began (enqueue) */
  uint32_t hwm;
  op_task *park_head, *park_tail; /* parked: waiting for room, FIFO */
  uint32_t nparked;
  uint64_t submitted, completed, failed, timedout, cancelled, stuck;
  uint32_t inflight;
  op_hist hist;
};

/* Lua tasks submitted while HOLD_DEPTH or more wait in the queue are held
** too, and queued HOLD_MAX at a time or when the loop thread is done with
** the current turn (see the DESIGN block). */
#define HOLD_DEPTH 64
#define HOLD_MAX   32

/* Values of op_task.queued. */
#define IN_QUEUE   1 /* in p->head..tail */
#define IN_PENDING 2 /* in p->pend_head..pend_tail, not yet flushed */
#define IN_PARKED  3 /* in p->park_head..park_tail: the queue was full */

/* Take t out of the doubly linked list head..tail. */
static void list_unlink(op_task **head, op_task **tail, op_task *t) {
  if (t->prev != NULL)
    t->prev->next = t->next;
  else
    *head = t->next;
  if (t->next != NULL)
    t->next->prev = t->prev;
  else
    *tail = t->prev;
}

/* Append t to the doubly linked list head..tail. */
static void list_append(op_task **head, op_task **tail, op_task *t) {
  t->next = NULL;
  t->prev = *tail;
  if (*tail != NULL)
    (*tail)->next = t;
  else
    *head = t;
  *tail = t;
}

/* Set p->avail to v (p->mu held), writing only a change. */
static void set_avail(op_pool *p, int v) {
  if (atomic_load_explicit(&p->avail, memory_order_relaxed) != v)
    atomic_store_explicit(&p->avail, v, memory_order_release);
}

static void count_stop(op_pool *p, op_task *t, int code);

/* A looker is back: claims beyond the lookers left lapse (the queue is
** looked at now). Thread: worker, under p->mu. */
static void stop_looking(op_pool *p) {
  p->lookers--;
  if (p->claimed > p->lookers)
    p->claimed = p->lookers;
}

/* Change p->queued by n. Thread: any, under p->mu. */
static void queued_add(op_pool *p, int n) {
  unsigned q = atomic_load_explicit(&p->queued, memory_order_relaxed);
  atomic_store_explicit(&p->queued, q + (unsigned)n, memory_order_relaxed);
}

op_runtime *op__pool_rt(op_pool *p) {
  return p->rt;
}

const char *op__pool_name(op_pool *p) {
  return p->name;
}

static void worker_free(op_worker *w);
static void pool_destroy(op_pool *p);

/* The end of a thread given up as stuck, which came back (p->mu held, and
** released here): it touches nothing of the task it ran, which the loop
** thread has ended and handed back; it closes its own VM and frees its
** own record, and the last ghost of a freed pool frees the pool. */
static void ghost_exit(op_worker *w) {
  op_pool *p = w->pool;
  int last;

  uv_mutex_unlock(&p->mu);
  op__wvm_close(w); /* finalizers may run: offpath.block refuses (ghost) */
  uv_mutex_lock(&p->mu);
  p->ghosts--;
  last = p->freed && p->ghosts == 0;
  uv_mutex_unlock(&p->mu);
  worker_free(w);
  if (last)
    pool_destroy(p);
}

/* ---- where workers run ---- */

/* The CPU p's workers are to keep off, or -1 (see "Where workers run" in
** the DESIGN block). Decided on the loop thread when p first starts: the
** loop thread's CPU then, kept for every pool after. */
static int place(op_pool *p) {
  op_runtime *rt = p->rt;
  /* The CPUs the loop thread may run on: the count op_config_init sizes
  ** the cpu pool by. */
  int ncpus = (int)uv_available_parallelism(), keep;

  switch (rt->cfg.loop_cpu) {
  case OP_LOOP_CPU_KEEP:
    keep = 1;
    break;
  case OP_LOOP_CPU_SHARE:
    keep = 0;
    break;
  default:
    keep = p->nthreads > ncpus;
  }
  if (!keep || ncpus < 2)
    return -1;
  if (rt->kept_cpu < 0)
    rt->kept_cpu = op__this_cpu();
  return rt->kept_cpu;
}

/* Keep the calling worker off cpu (unless it is -1): it may run on every
** other CPU its thread was allowed. A refusal leaves it where it was. */
static void keep_off(int cpu) {
#if defined(__linux__) && defined(CPU_COUNT)
  cpu_set_t set;

  if (cpu < 0 || cpu >= CPU_SETSIZE ||
      pthread_getaffinity_np(pthread_self(), sizeof set, &set) != 0 ||
      !CPU_ISSET(cpu, &set) || CPU_COUNT(&set) < 2)
    return;
  CPU_CLR(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#else
  (void)cpu;
#endif
}

static void worker_main(void *arg) {
  op_worker *w = arg;
  op_pool *p = w->pool;
  op_task *t, *done = NULL;
  sigset_t set;
  int send, spin;

  /* The loop thread may block signals; the stop signal must get through. */
  if (p->signo != 0) {
    sigemptyset(&set);
    sigaddset(&set, p->signo);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
  }
#ifdef SCHED_BATCH
  {
    /* A batch thread does not preempt the thread it wakes up next to:
    ** worker wake-ups stop landing in the middle of the loop thread's
    ** handlers (see the DESIGN block). Unprivileged; a refusal is
    ** harmless. */
    struct sched_param sp = { 0 };
    pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);
  }
#endif
  keep_off(p->off_cpu);
  op__wvm_open(w);
  op__note_cpu(&p->rt->worker_cpu, op__this_cpu());
  for (;;) {
    uv_mutex_lock(&p->mu);
    if (w->abandoned) {
      ghost_exit(w); /* done was handed back for us: never touch it */
      return;
    }
    send = spin = 0;
    if (done != NULL) {
      /* Hand in the finished task in the same critical section. The first
      ** of a batch tells the loop thread (the wake-up itself, a syscall,
      ** is sent without the lock). */
      done->next = NULL;
      if (done->kind == OP_TASK_LUA) {
        op__wvm_hand_in(w, done);
        done->worker = NULL;
        w->task = NULL;
        w->stop_at = 0;
      }
      if (p->done_head == NULL) {
        p->done_head = done;
        atomic_store(&p->has_done, 1);
        send = op__raise_done(p->rt);
      } else {
        p->done_tail->next = done;
      }
      p->done_tail = done;
      done = NULL;
      spin = 1; /* the loop thread will likely submit again soon */
    }
    while (p->head == NULL && !p->stopping) {
      unsigned us;
      int hit, cpu;
      if (send) {
        /* About to wait: wake the loop thread first, without the lock. */
        uv_mutex_unlock(&p->mu);
        op__wake_loop(p->rt);
        send = 0;
        uv_mutex_lock(&p->mu);
        continue;
      }
      cpu = spin ? op__this_cpu() : -1;
      if (cpu >= 0 &&
          cpu == atomic_load_explicit(&p->rt->loop_cpu, memory_order_relaxed)) {
        /* The loop thread shares this CPU: let it take the result and
        ** submit again before sleeping. The next task then costs no
        ** wake-up on either side. */
        p->lookers++;
        uv_mutex_unlock(&p->mu);
        sched_yield();
        uv_mutex_lock(&p->mu);
        stop_looking(p);
        spin = 0;
        continue;
      }
      if (spin && !p->spinner && (us = op__spin_budget(&p->spin)) > 0) {
        /* After handing in a result, one worker per pool spins a little
        ** for the next task if the loop thread runs on another CPU: it
        ** often submits again within microseconds. The spin ends when the
        ** loop thread goes to sleep (loop_sleeps). */
        p->spinner = 1;
        p->lookers++;
        uv_mutex_unlock(&p->mu);
        hit = op__spin_until(&p->avail, &p->rt->loop_sleeps, us);
        uv_mutex_lock(&p->mu);
        stop_looking(p);
        p->spinner = 0;
        hit = hit && (p->head != NULL || p->stopping);
        set_avail(p, p->head != NULL || p->stopping);
        op__spin_result(&p->spin, hit);
        spin = 0;
        continue;
      }
      if (op__wvm_idle(w, &p->mu))
        continue; /* the queue may have changed meanwhile */
      /* Sleep until a submitter takes us off the list and posts. */
      spin = 0;
      w->next_sleeper = p->sleepers;
      p->sleepers = w;
      uv_mutex_unlock(&p->mu);
      uv_sem_wait(&w->wake);
      op__note_cpu(&p->rt->worker_cpu, op__this_cpu());
      uv_mutex_lock(&p->mu);
    }
    t = p->head;
    if (t != NULL) {
      p->head = t->next;
      if (p->head != NULL)
        p->head->prev = NULL;
      else
        p->tail = NULL;
      t->queued = 0;
      t->next = t->prev = NULL;
      queued_add(p, -1);
      if (t->kind == OP_TASK_LUA) {
        /* Who to signal if it is stopped; the arguments become the
        ** worker's (see "Stuck workers" in the DESIGN block). */
        t->worker = w;
        w->task = t;
        w->stop_at = 0;
        op__wvm_take(w, t);
      }
    }
    set_avail(p, p->head != NULL || p->stopping);
    uv_mutex_unlock(&p->mu);
    if (send)
      op__wake_loop(p->rt);
    if (t == NULL)
      break;

    if (t->kind == OP_TASK_C) {
      t->status = atomic_load(&t->stop);
      if (t->status == 0)
        t->work(t->arg);
    } else {
      op__wvm_run(w, t);
    }
    done = t;
  }
  op__wvm_close(w);
}

/* Take the tasks p's workers finished, appending them to the list
** from *head to *tail.
** Thread: loop. */
void op__pool_take_done(op_pool *p, op_task **head, op_task **tail) {
  op__tasks_take(&p->mu, &p->done_head, &p->done_tail, &p->has_done, head,
                 tail);
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

/* ---- pools ---- */

/* A worker record for slot id of p, its thread not started.  */
static op_worker *worker_new(op_pool *p, int id) {
  op_worker *w = calloc(1, sizeof *w);

  if (w == NULL)
    return NULL;
  w->pool = p;
  w->id = id;
  w->rt = p->rt;
  w->pool_name = p->name;
  w->init = p->init;
  w->signo = p->signo;
  w->mem.limit = p->mem_limit;
  atomic_init(&w->stop, 0);
  atomic_init(&w->fn_src, NULL);
  atomic_init(&w->fn_line, 0);
  op__buf_init(&w->in);
  op__buf_init(&w->out);
  op__task_init(&w->block, OP_TASK_BLOCK);
  w->block.worker = w;
  if (uv_mutex_init(&w->block_mu) || uv_cond_init(&w->block_cv) ||
      uv_sem_init(&w->wake, 0))
    OP_PANIC("cannot make a worker's locks");
  return w;
}

static void worker_free(op_worker *w) {
  uv_mutex_destroy(&w->block_mu);
  uv_cond_destroy(&w->block_cv);
  uv_sem_destroy(&w->wake);
  op__task_release(&w->block);
  op__buf_free(&w->in);
  op__buf_free(&w->out);
  free(w);
}

/* Start a thread in slot i of p. Returns 0 or a libuv error (the slot
** stays empty). */
static int start_worker(op_pool *p, int i) {
  op_worker *w = worker_new(p, i + 1);
  int rc;

  if (w == NULL)
    return UV_ENOMEM;
  rc = uv_thread_create(&w->thread, worker_main, w);
  if (rc != 0) {
    worker_free(w);
    return rc;
  }
  p->workers[i] = w;
  p->running++;
  return 0;
}

/* Start the threads of p's empty slots. A thread that cannot start (a
** thread or address-space limit) leaves its slot empty and the pool goes
** on with the threads it has; the shortfall is reported once and shown in
** the statistics (threads against running). Returns 0, or OP_ENOTHREAD if
** the pool has no thread at all (op__pool_error says why). */
static int start(op_pool *p) {
  int i, rc, err = 0;
  char msg[256];

  if (p->signo != 0)
    op__wvm_catch_stop(p->signo);
  if (!p->started)
    p->off_cpu = place(p);
  if (p->workers == NULL) {
    p->workers = calloc((size_t)p->nthreads, sizeof *p->workers);
    if (p->workers == NULL)
      return OP_ENOMEM;
  }
  for (i = 0; i < p->nthreads; i++)
    if (p->workers[i] == NULL && (rc = start_worker(p, i)) != 0)
      err = p->start_err = rc;
  p->started = 1;
  if (err != 0 && !p->reported) {
    p->reported = 1;
    snprintf(msg, sizeof msg,
             "warning: pool '%s' runs %d of its %d threads: cannot start a "
             "thread: %s",
             p->name, p->running, p->nthreads, uv_strerror(err));
    op__report_error(p->rt, msg);
  }
  return p->running > 0 ? 0 : OP_ENOTHREAD;
}

const char *op__pool_error(op_pool *p, int rc) {
  if (rc == OP_ENOTHREAD && p->start_err != 0)
    return uv_strerror(p->start_err);
  return op_strerror(rc);
}

/* p->mu is held for a few instructions at a time by the loop thread and
** the workers, which may run on different CPUs: an adaptive mutex spins a
** little before it sleeps in the kernel, where a plain one makes a
** futex call on each side of every collision. Returns 0 or an errno. */
static int pool_mutex_init(uv_mutex_t *mu) {
#if defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP)
  pthread_mutexattr_t attr;
  int rc;

  if ((rc = pthread_mutexattr_init(&attr)) != 0)
    return rc;
  if ((rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP)) == 0)
    rc = pthread_mutex_init(mu, &attr);
  pthread_mutexattr_destroy(&attr);
  return rc;
#else
  return uv_mutex_init(mu);
#endif
}

int op__pool_add(op_runtime *rt, const op_pool_config *pc, op_pool **out) {
  op_pool *p;
  size_t len;

  if (pc->name == NULL || (len = strlen(pc->name)) == 0 ||
      len >= OP_POOL_NAME_MAX || pc->threads < 0 || pc->threads > 1024 ||
      pc->queue < 0 ||
      (pc->memory_limit != 0 && pc->memory_limit < OP_MEMORY_LIMIT_MIN) ||
      (rt->cfg.memory_limit != 0 && rt->cfg.memory_limit < OP_MEMORY_LIMIT_MIN))
    return OP_EINVAL;
  if (op__pool_find(rt, pc->name) != NULL)
    return op__pool_configure(op__pool_find(rt, pc->name), pc->threads,
                              pc->queue, pc->init);
  if (rt->npools >= OP_MAX_POOLS)
    return OP_ENOMEM;
  p = calloc(1, sizeof *p);
  if (p == NULL)
    return OP_ENOMEM;
  p->rt = rt;
  p->off_cpu = -1;
  memcpy(p->name, pc->name, len + 1);
  p->nthreads = pc->threads > 0 ? pc->threads : 4;
  p->cap = pc->queue > 0 ? pc->queue : DEFAULT_QUEUE;
  if (pc->init != NULL && (p->init = strdup(pc->init)) == NULL) {
    free(p);
    return OP_ENOMEM;
  }
  if (pool_mutex_init(&p->mu))
    OP_PANIC("cannot make a pool lock");
  atomic_init(&p->avail, 0);
  atomic_init(&p->has_done, 0);
  atomic_init(&p->queued, 0);
  p->spin.max = p->spin.cur = rt->spin.max;
  p->signo = rt->cfg.stop_signal == 0  ? SIGRTMIN + 4
             : rt->cfg.stop_signal > 0 ? rt->cfg.stop_signal
                                       : 0;
  p->mem_limit = pc->memory_limit ? pc->memory_limit : rt->cfg.memory_limit;
  if (p->mem_limit == OP_MEMORY_UNLIMITED)
    p->mem_limit = 0;
  rt->pools[rt->npools++] = p;
  if (out != NULL)
    *out = p;
  return 0;
}

int op__pool_configure(op_pool *p, int threads, int queue, const char *init) {
  char *copy = NULL;

  if (threads < 0 || threads > 1024 || queue < 0)
    return OP_EINVAL;
  if (p->started)
    return OP_ESTARTED;
  if (init != NULL && (copy = strdup(init)) == NULL)
    return OP_ENOMEM;
  if (threads > 0)
    p->nthreads = threads;
  if (queue > 0)
    p->cap = queue;
  if (init != NULL) {
    free(p->init);
    p->init = copy;
  }
  return 0;
}

int op__pool_set_memory_limit(op_pool *p, size_t bytes) {
  if (bytes != 0 && bytes < OP_MEMORY_LIMIT_MIN)
    return OP_EINVAL;
  if (p->started)
    return OP_ESTARTED;
  p->mem_limit = bytes != OP_MEMORY_UNLIMITED ? bytes : 0;
  return 0;
}

/* Whether the strings a and b are equal: pool names are short, so this
** beats a call to strcmp. */
static int same_name(const char *a, const char *b) {
  for (; *a == *b; a++, b++)
    if (*a == '\0')
      return 1;
  return 0;
}

/* The pool named name, or NULL. The last pool found is tried first. */
op_pool *op__pool_find(op_runtime *rt, const char *name) {
  op_pool *p = rt->last_cpool;
  int i;

  if (p != NULL && same_name(p->name, name))
    return p;
  for (i = 0; i < rt->npools; i++) {
    if (same_name(rt->pools[i]->name, name)) {
      rt->last_cpool = rt->pools[i];
      return rt->pools[i];
    }
  }
  return NULL;
}

int op__pool_is_queued(op_pool *p, op_task *t) {
  int queued;

  uv_mutex_lock(&p->mu);
  queued = t->queued;
  uv_mutex_unlock(&p->mu);
  return queued;
}

/* Tasks queued or pending. Workers only ever lower p->queued, so this is
** never less than the truth. */
static uint32_t nqueued(op_pool *p) {
  return atomic_load_explicit(&p->queued, memory_order_relaxed) + p->npend;
}

int op__pool_full(op_pool *p) {
  return nqueued(p) >= (uint32_t)p->cap;
}

int op__pool_start(op_pool *p) {
  return p->started ? 0 : start(p);
}

/* Take the sleepers that n new tasks need off p->sleepers, into a list for
** wake_all: none for a task a looker will take (it looks at the queue
** before it sleeps). Thread: any, under p->mu. */
static op_worker *take_sleepers(op_pool *p, uint32_t n) {
  op_worker *list = NULL, *w;
  uint32_t spare = (uint32_t)(p->lookers - p->claimed);

  spare = spare < n ? spare : n;
  p->claimed += (int)spare;
  n -= spare;
  while (n-- > 0 && (w = p->sleepers) != NULL) {
    p->sleepers = w->next_sleeper;
    w->next_sleeper = list;
    list = w;
  }
  return list;
}

/* Post the sleepers take_sleepers returned, after p->mu is released so
** that they do not wake up only to block on it. */
static void wake_all(op_worker *list) {
  op_worker *w;

  while ((w = list) != NULL) {
    list = w->next_sleeper;
    uv_sem_post(&w->wake);
  }
}

void op__pool_flush(op_pool *p) {
  op_task *t;
  op_worker *wake;
  uint32_t n = p->npend;

  if (n == 0)
    return;
  for (t = p->pend_head; t != NULL; t = t->next)
    t->queued = IN_QUEUE;
  uv_mutex_lock(&p->mu);
  p->pend_head->prev = p->tail;
  if (p->tail != NULL)
    p->tail->next = p->pend_head;
  else
    p->head = p->pend_head;
  p->tail = p->pend_tail;
  queued_add(p, (int)n);
  set_avail(p, 1);
  wake = take_sleepers(p, n);
  uv_mutex_unlock(&p->mu);
  p->pend_head = p->pend_tail = NULL;
  p->npend = 0;
  if (wake != NULL) {
    p->rt->woke_worker = 1;
    wake_all(wake);
  }
}

/* Count t in the books of p and of the runtime: in flight until it comes
** back (op__pool_returned). */
static void book(op_pool *p) {
  op_runtime *rt = p->rt;

  p->inflight++;
  if (rt->inflight++ == 0)
    op__update_ref(rt);
}

/* Queue t, which fits: now, or held for the batch (see the DESIGN
** block). */
static void enqueue(op_pool *p, op_task *t) {
  op_runtime *rt = p->rt;
  op_worker *wake;
  uint32_t q;
  int hold;

  /* p->queued sits on the line the workers write for every task they
  ** take: it is read once per held batch, not once per task. Workers only
  ** lower it, so the depth counted from the batch's start is never too
  ** low: it is read again only when that count would raise the queue's
  ** high-water mark, which stays exact. */
  if (p->npend > 0) {
    /* Tasks submitted before this one are still held: it waits for the
    ** batch, behind them (FIFO). */
    q = p->q_seen;
    hold = 1;
  } else {
    q = p->q_seen = atomic_load_explicit(&p->queued, memory_order_relaxed);
    /* Or workers have plenty queued. */
    hold = rt->hold_submits || (t->kind == OP_TASK_LUA && q >= HOLD_DEPTH);
  }
  if (q + p->npend >= p->hwm) {
    if (p->npend > 0) /* q is the batch's start: read it now */
      q = p->q_seen = atomic_load_explicit(&p->queued, memory_order_relaxed);
    if (q + p->npend >= p->hwm)
      p->hwm = q + p->npend + 1;
  }
  if (hold && !rt->hold_submits)
    rt->held = 1;
  if (hold) {
    /* Queued with the rest of the batch (op__pool_flush): one lock for the
    ** batch, and no worker woken now preempts the loop thread in the
    ** middle of it (see the DESIGN block). */
    list_append(&p->pend_head, &p->pend_tail, t);
    t->queued = IN_PENDING;
    if (++p->npend >= HOLD_MAX && !rt->hold_submits)
      op__pool_flush(p);
  } else {
    uv_mutex_lock(&p->mu);
    list_append(&p->head, &p->tail, t);
    t->queued = IN_QUEUE;
    queued_add(p, 1);
    set_avail(p, 1);
    /* A burst of submits wakes each sleeping worker once. */
    wake = take_sleepers(p, 1);
    uv_mutex_unlock(&p->mu);
    if (wake != NULL && t->lazy) {
      /* Off the sleepers' list already: posted by op__pool_wake_later. */
      wake->next_sleeper = p->wake_later;
      p->wake_later = wake;
      rt->wakes_later = 1;
    } else if (wake != NULL) {
      rt->woke_worker = 1;
      wake_all(wake);
    }
  }
  rt->nsubmits++;
}

int op__pool_submit(op_pool *p, op_task *t, int park) {
  int rc, wait;

  if (p->stopping)
    return OP_ESHUTDOWN;
  /* A pool with no thread tries again: the limit may have gone. */
  if ((!p->started || p->running == 0) && (rc = start(p)) != 0)
    return rc;
  /* Full, or tasks parked before this one wait for room: FIFO. What is
  ** in flight is at least what is queued, and is the loop thread's own to
  ** read: the queue's counter is read only when that is at the cap. */
  wait = (p->inflight >= (uint32_t)p->cap && nqueued(p) >= (uint32_t)p->cap) ||
         (park && p->park_head != NULL);
  if (wait && !park)
    return OP_EAGAIN;
  t->pool = p;
  t->t_submit = op__ticker_read(&p->rt->ticker);
  book(p);
  p->submitted++; /* queued now or parked: it ends once, counted either way */
  if (!wait) {
    enqueue(p, t);
    return 0;
  }
  /* Parked, queued as room comes (flush_parked): its submitter is long
  ** gone by then, so the worker it needs is woken at once. */
  t->lazy = 0;
  list_append(&p->park_head, &p->park_tail, t);
  t->queued = IN_PARKED;
  p->nparked++;
  return 1;
}

/* Queue the parked tasks of p while its queue has room, telling each
** kind (t->on_queued). Thread: loop. */
static void flush_parked(op_pool *p) {
  op_task *t;

  while ((t = p->park_head) != NULL && nqueued(p) < (uint32_t)p->cap &&
         !p->stopping && p->running > 0) {
    list_unlink(&p->park_head, &p->park_tail, t);
    p->nparked--;
    enqueue(p, t);
    if (t->on_queued != NULL)
      t->on_queued(t);
  }
}

void op__pool_stop_task(op_pool *p, op_task *t, int code) {
  int taken = 0;
  op_worker *runner = NULL;

  count_stop(p, t, code);
  uv_mutex_lock(&p->mu);
  if (t->queued == IN_PARKED) {
    list_unlink(&p->park_head, &p->park_tail, t);
    p->nparked--;
    taken = 1;
  } else if (t->queued == IN_PENDING) {
    list_unlink(&p->pend_head, &p->pend_tail, t);
    p->npend--;
    taken = 1;
  } else if (t->queued == IN_QUEUE) {
    list_unlink(&p->head, &p->tail, t);
    queued_add(p, -1);
    taken = 1;
    set_avail(p, p->head != NULL);
  }
  if (taken) {
    t->next = t->prev = NULL;
    t->queued = 0;
  }
  atomic_store(&t->stop, code);
  if (!taken && t->kind == OP_TASK_LUA && (runner = t->worker) != NULL) {
    /* Running: the worker's hook reads its own copy of the code. The
    ** clock starts for declaring it stuck (op__pool_check_stuck). */
    atomic_store(&runner->stop, code);
    if (runner->stop_at == 0)
      runner->stop_at = uv_hrtime() | 1;
    if (p->signo != 0)
      pthread_kill(runner->thread, p->signo); /* see worker.c */
  }
  uv_mutex_unlock(&p->mu);
  if (taken) {
    t->status = code;
    op__complete(p->rt, t);
  } else if (runner != NULL) {
    op__watch_stuck(p->rt);
  }
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


/* Give up the worker in slot i, whose task has not stopped within the
** grace time (p->mu held): end its task for the loop thread as the
** worker would have (status = the stop code, handed in through p's done
** list), detach the thread and put a fresh one with a fresh VM in its
** place. The old record becomes the ghost's own (ghost_exit). Writes the
** report into msg. Returns whether the new thread started. */
static int abandon(op_pool *p, int i, char *msg, size_t len) {
  op_worker *w = p->workers[i];
  op_task *t = w->task;
  const char *src = atomic_load_explicit(&w->fn_src, memory_order_acquire);
  int line = atomic_load_explicit(&w->fn_line, memory_order_relaxed);
  int code = atomic_load(&w->stop), rc;

  if (src == NULL)
    src = "=?";
  snprintf(msg, len,
           "stuck: pool '%s' worker %d did not stop within %g s of its %s "
           "(task function %s:%d); its thread is abandoned and replaced",
           p->name, w->id, p->rt->stuck_grace,
           code == OP_ETIMEDOUT ? "deadline" : "cancel",
           src[0] == '@' || src[0] == '=' ? src + 1 : "[string]", line);
  w->abandoned = 1;
  w->task = NULL;
  t->worker = NULL;
  t->status = code;
  t->next = NULL;
  if (p->done_head == NULL) {
    p->done_head = t;
    atomic_store(&p->has_done, 1);
  } else {
    p->done_tail->next = t;
  }
  p->done_tail = t;
  p->ghosts++;
  p->stuck++;
  p->running--;
  pthread_detach(w->thread);
  p->workers[i] = NULL;
  rc = start_worker(p, i);
  if (rc != 0)
    p->start_err = rc;
  return rc == 0;
}

int op__pool_check_stuck(op_pool *p, uint64_t now, uint64_t grace) {
  char msg[512];
  int i, waiting, found, none;

  if (!p->started)
    return 0;
  do {
    waiting = found = 0;
    uv_mutex_lock(&p->mu);
    for (i = 0; i < p->nthreads && !found; i++) {
      op_worker *w = p->workers[i];
      if (w == NULL || w->task == NULL || w->stop_at == 0)
        continue;
      if (w->in_block || now - w->stop_at < grace) {
        waiting++;
        continue;
      }
      found = 1;
      abandon(p, i, msg, sizeof msg);
    }
    none = p->running == 0;
    uv_mutex_unlock(&p->mu);
    if (found) {
      op__notify_loop(p->rt); /* the task handed back */
      op__report_error(p->rt, msg);
      if (none) /* nothing will ever run them */
        op__pool_cancel_queued(p);
    }
  } while (found);
  return waiting;
}

int op__worker_block_enter(op_worker *w) {
  op_pool *p = w->pool;
  int ok;

  uv_mutex_lock(&p->mu);
  ok = !w->abandoned;
  w->in_block = ok;
  uv_mutex_unlock(&p->mu);
  return ok;
}

void op__worker_block_leave(op_worker *w) {
  uv_mutex_lock(&w->pool->mu);
  w->in_block = 0;
  uv_mutex_unlock(&w->pool->mu);
}

void op__pool_cancel_queued(op_pool *p) {
  op_task *t, *list;

  uv_mutex_lock(&p->mu);
  /* The queue, then the held tasks, then the parked ones: one list. */
  if (p->pend_head != NULL) {
    p->pend_tail->next = p->park_head;
    p->park_head = p->pend_head;
  }
  list = p->head;
  if (list != NULL)
    p->tail->next = p->park_head;
  else
    list = p->park_head;
  p->head = p->tail = NULL;
  p->pend_head = p->pend_tail = NULL;
  p->park_head = p->park_tail = NULL;
  p->npend = p->nparked = 0;
  atomic_store_explicit(&p->queued, 0, memory_order_relaxed);
  for (t = list; t != NULL; t = t->next) {
    t->queued = 0;
    atomic_store(&t->stop, OP_ECANCELED);
  }
  uv_mutex_unlock(&p->mu);
  while ((t = list) != NULL) {
    list = t->next;
    t->next = t->prev = NULL;
    t->status = OP_ECANCELED;
    op__complete(p->rt, t);
  }
}

void op__remnant_release(op_remnant *r) {
  if (r != NULL && atomic_fetch_sub(&r->refs, 1) == 1) {
    op__protostore_free(r->protos);
    free(r);
  }
}

/* Free p's memory (every thread gone). */
static void pool_destroy(op_pool *p) {
  op_remnant *r = p->remnant;

  uv_mutex_destroy(&p->mu);
  free(p->init);
  free(p);
  op__remnant_release(r);
}

void op__pool_free(op_pool *p, op_remnant *r) {
  op_worker *sleepers;
  int i, ghosts;

  op__pool_flush(p);
  op__pool_wake_later(p->rt);
  uv_mutex_lock(&p->mu);
  p->stopping = 1;
  set_avail(p, 1);
  p->claimed = p->lookers; /* wake every sleeper */
  sleepers = take_sleepers(p, UINT32_MAX);
  uv_mutex_unlock(&p->mu);
  wake_all(sleepers);
  for (i = 0; p->workers != NULL && i < p->nthreads; i++) {
    if (p->workers[i] != NULL) {
      uv_thread_join(&p->workers[i]->thread);
      worker_free(p->workers[i]);
    }
  }
  op_assert(p->head == NULL);
  free(p->workers);
  p->workers = NULL;
  /* Ghosts still running may come back and look at p: the last one
  ** frees it (ghost_exit). */
  uv_mutex_lock(&p->mu);
  p->freed = 1;
  ghosts = p->ghosts;
  if (ghosts > 0 && r != NULL) {
    atomic_fetch_add(&r->refs, 1);
    p->remnant = r;
  }
  uv_mutex_unlock(&p->mu);
  if (ghosts == 0)
    pool_destroy(p);
}

/* ---- statistics ---- */

/* Count an ended task in p's statistics. */
static void count_end(op_pool *p, op_task *t, op_task_state how) {
  switch (how) {
  case OP_TASK_DONE:
    p->completed++;
    break;
  case OP_TASK_FAILED:
    p->failed++;
    break;
  case OP_TASK_TIMEOUT:
    p->timedout++;
    break;
  default:
    p->cancelled++;
    break;
  }
  op__hist_add(&p->hist, p->rt->batch_tick != 0
                             ? op__ticker_span(&p->rt->ticker, t->t_submit,
                                               p->rt->batch_tick)
                             : op__ticker_since(&p->rt->ticker, t->t_submit));
}

/* A task asked to stop has ended for the books (once), whenever its
** worker hands it back. */
static void count_stop(op_pool *p, op_task *t, int code) {
  if (t->counted)
    return;
  t->counted = 1;
  count_end(p, t, code == OP_ETIMEDOUT ? OP_TASK_TIMEOUT : OP_TASK_CANCELLED);
}

void op__pool_returned(op_task *t) {
  op_pool *p = t->pool;
  op_task_state how;

  if (p == NULL)
    return; /* not a pool's: a block section */
  p->inflight--;
  p->rt->inflight--;
  if (!t->counted) {
    switch (t->status) {
    case 0:
      how = t->failed ? OP_TASK_FAILED : OP_TASK_DONE;
      break;
    case OP_ECANCELED:
      how = OP_TASK_CANCELLED;
      break;
    case OP_ETIMEDOUT:
      how = OP_TASK_TIMEOUT;
      break;
    default:
      how = OP_TASK_FAILED;
      break;
    }
    count_end(p, t, how);
  }
  t->counted = t->failed = 0; /* for a task made again from this one */
}

void op__pool_set_spin(op_pool *p, unsigned us) {
  uv_mutex_lock(&p->mu);
  p->spin.max = p->spin.cur = us;
  uv_mutex_unlock(&p->mu);
}

void op__pool_stats(op_pool *p, op_pool_stats *out) {
  int i;

  memset(out, 0, sizeof *out);
  snprintf(out->name, sizeof out->name, "%s", p->name);
  out->threads = p->nthreads;
  out->running = p->running;
  out->stuck = p->stuck;
  out->queue_cap = p->cap;
  out->submitted = p->submitted;
  out->completed = p->completed;
  out->failed = p->failed;
  out->timedout = p->timedout;
  out->cancelled = p->cancelled;
  out->queued = nqueued(p) + p->nparked;
  out->queue_hwm = p->hwm;
  out->inflight = p->inflight;
  out->p50 = op__hist_quantile(&p->hist, 0.50);
  out->p99 = op__hist_quantile(&p->hist, 0.99);
  out->max = (double)p->hist.max / 1e9;
  out->memory_limit = p->mem_limit;
  out->off_cpu = p->off_cpu;
  for (i = 0; p->workers != NULL && i < p->nthreads; i++)
    if (p->workers[i] != NULL) /* ghosts are not counted */
      out->memory += op__vm_used(&p->workers[i]->mem);
}

const op_hist *op__pool_hist(op_pool *p) {
  return &p->hist;
}

/* Block sections need the worker's lock and condition (lua_worker.c). */
void op__worker_block_sync(op_worker *w, int wait) {
  uv_mutex_lock(&w->block_mu);
  if (wait) {
    while (!w->block_done)
      uv_cond_wait(&w->block_cv, &w->block_mu);
    w->block_done = 0;
  } else {
    w->block_done = 1;
    uv_cond_signal(&w->block_cv);
  }
  uv_mutex_unlock(&w->block_mu);
}

op_task *op__worker_block_task(op_worker *w) {
  return &w->block;
}

int op__worker_id(op_worker *w) {
  return w->id;
}

op_pool *op__worker_pool(op_worker *w) {
  return w->pool;
}

/* ---- C tasks ---- */

/* Longest a C completion batch holds the tasks its callbacks submit. */
#define HOLD_NS 100000

typedef struct ctask {
  op_task t;
  op_done_fn done;
  op_runtime *rt;
} ctask;

#define MAX_FREE_CTASKS 1024

/* A C task's completion runs no Lua (t->holds): the tasks its callback
** submits are held for the batch, and queued together when it ends
** (op__pool_batch_end), or now and then during a long one. */
static void ctask_complete(op_task *t) {
  ctask *c = (ctask *)t;
  op_runtime *rt = c->rt;
  op_done_fn done = c->done;
  void *arg = t->arg;
  int status = t->status;

  if (!rt->hold_submits) {
    rt->hold_submits = 1;
    rt->hold_since = op__ticker_read(&rt->ticker);
  } else if ((++rt->hold_n & 15) == 0 &&
             op__ticker_since(&rt->ticker, rt->hold_since) > HOLD_NS) {
    op__pool_release(rt); /* a long batch queues what it held so far */
    rt->hold_submits = 1;
    rt->hold_since = op__ticker_read(&rt->ticker);
  }
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
    c->t.holds = 1;
  } else {
    return OP_ENOMEM;
  }
  c->t.work = work;
  c->t.arg = arg;
  c->done = done;
  rc = op__pool_submit(p, &c->t, 0);
  if (rc != 0) {
    c->t.next = rt->free_ctasks;
    rt->free_ctasks = &c->t;
    rt->nfree_ctasks++;
    return rc;
  }
  return 0;
}

/* ---- the end of a batch ---- */

void op__pool_wake_later(op_runtime *rt) {
  op_worker *wake;
  int i;

  if (!rt->wakes_later)
    return;
  rt->wakes_later = 0;
  for (i = 0; i < rt->npools; i++) {
    if ((wake = rt->pools[i]->wake_later) != NULL) {
      rt->pools[i]->wake_later = NULL;
      rt->woke_worker = 1;
      wake_all(wake);
    }
  }
}

void op__pool_release(op_runtime *rt) {
  int i;

  op__pool_wake_later(rt);
  if (!rt->hold_submits && !rt->held)
    return;
  rt->hold_submits = rt->held = 0;
  rt->hold_n = 0;
  for (i = 0; i < rt->npools; i++)
    op__pool_flush(rt->pools[i]);
}

void op__pool_batch_end(op_runtime *rt) {
  int i;

  op__pool_release(rt);
  for (i = 0; i < rt->npools; i++)
    if (rt->pools[i]->park_head != NULL)
      flush_parked(rt->pools[i]);
}
