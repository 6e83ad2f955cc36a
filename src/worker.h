/* SPDX-License-Identifier: MIT */
/*
** worker.h - a worker thread's record, shared by the pool that runs the
** thread (pool.c) and the thread's Lua VM (worker.c), with the calls
** pool.c makes down into the VM, and the moves of a Lua task's buffers
** between the task and the worker, inline. The worker-side offpath module
** (lua_worker.c) sees the record only through the op__worker_* calls of
** internal.h.
** Thread: the worker's own, unless a field says otherwise.
*/
#ifndef OFFPATH_WORKER_H
#define OFFPATH_WORKER_H

#include <signal.h>
#include <string.h>

#include "internal.h"

#define MAX_COS 256 /* nested resumes tracked (Lua allows ~200) */

struct op_worker {
  op_pool *pool;
  int id; /* 1-based within the pool */
  uv_thread_t thread;
  /* What the VM needs of its pool, copied when the record is made (the
  ** pool's settings do not change once its threads run). */
  op_runtime *rt;
  const char *pool_name;
  const char *init; /* the pool's init script, or NULL */
  int signo;        /* the stop signal, or 0 (op_config.stop_signal) */
  lua_State *L;
  op_xfer *xfer;
  op_task *volatile current;    /* the task running, for the hook and the
                               signal handler (worker thread only) */
  volatile sig_atomic_t hooked; /* the stop hook is installed */
  /* The stop code of the task running: written by the loop thread under
  ** p->mu while the task is running here (t->worker == this), reset when
  ** the worker takes a task. The hook reads this, never the task, so a
  ** thread given up as stuck touches no task when it comes back. */
  atomic_int stop;
  /* Coroutines being resumed now, innermost last (coroutine.resume and
  ** coroutine.wrap go through co_enter): the stop signal hooks them all.
  ** Worker thread and its signal handler only. */
  lua_State *volatile cos[MAX_COS];
  volatile sig_atomic_t ncos;
  /* The running Lua task's arguments, then its results or error message:
  ** the worker's own until it hands the task in (see "Stuck workers" in
  ** pool.c). */
  op_buf in, out;
  int status;
  int errval; /* OP_ESCRIPT: out holds an encoded error value (op_task) */
  int watch;  /* the task has a deadline: it runs under the stop hook */
  _Atomic(const char *) fn_src; /* the task function's chunk name */
  atomic_int fn_line;           /* and the line it is defined on */
  int fn_ref;                   /* registry slot of the last task function */
  const void *fn_last;          /* its address */
  const char *fn_src_last;      /* its chunk name and line */
  int fn_line_last;
  /* Under p->mu. */
  op_task *task;           /* the Lua task it runs, or NULL */
  uint64_t stop_at;        /* when the loop thread asked that task to stop */
  int in_block;            /* waiting for a block section (not stuck) */
  int abandoned;           /* given up as stuck: a ghost from now on */
  uv_sem_t wake;           /* posted once for each time the worker sleeps */
  op_worker *next_sleeper; /* link in p->sleepers */
  /* Block sections (lua_worker.c). */
  op_task block;
  uv_mutex_t block_mu;
  uv_cond_t block_cv;
  int block_done;
  op_vmem mem; /* the VM's memory and limit (alloc.c) */
};

/* Make w's VM on the calling thread, which becomes w's (op__worker_self).
** Returns 0 or -1 (message printed; op__wvm_run tries again). */
int op__wvm_open(op_worker *w);
/* Close w's VM (finalizers run); the calling thread is no worker's any
** more. */
void op__wvm_close(op_worker *w);
/* Run the Lua task w took: its outcome goes to w->status and w->out,
** never to the task. */
void op__wvm_run(op_worker *w, op_task *t);
/* About to sleep with mu held: collect a VM that grew much, with mu
** released. Returns whether it did. */
int op__wvm_idle(op_worker *w, uv_mutex_t *mu);
/* Install the handler of the stop signal sig (idempotent; one handler for
** every runtime). Thread: loop. */
void op__wvm_catch_stop(int sig);

/* ---- a Lua task's buffers, between the task and the worker ----
** Inline: pool.c moves them under its lock, once each way per task. */

/* Move src's contents into the empty buffer dst; src becomes empty
** (twice per task: no calls). */
static inline void buf_take(op_buf *dst, op_buf *src) {
  dst->len = src->len;
  if (src->p == src->small) {
    dst->p = dst->small;
    memcpy(dst->small, src->small, sizeof dst->small); /* fixed: inlined */
  } else {
    dst->p = src->p;
    dst->cap = src->cap;
    src->p = src->small;
    src->cap = OP_BUF_INLINE;
  }
  src->len = 0;
}

/* The Lua task t, taken off the queue, becomes w's to run (op__wvm_run):
** the worker's copy of the stop code starts as the task's, and the
** arguments become the worker's (see "Stuck workers" in pool.c).
** Thread: worker, under p->mu. */
static inline void op__wvm_take(op_worker *w, op_task *t) {
  w->watch = t->watch;
  atomic_store_explicit(&w->fn_src, NULL, memory_order_relaxed);
  atomic_store_explicit(&w->stop, atomic_load(&t->stop), memory_order_relaxed);
  buf_take(&w->in, &t->buf);
}

/* Give the finished Lua task t its outcome from w. The arguments' heap
** block is left in t->stale for the loop thread, which allocated it, to
** free: freeing it here made a 1 KB argument's round trip 3x slower.
** Thread: worker, under p->mu. */
static inline void op__wvm_hand_in(op_worker *w, op_task *t) {
  t->status = w->status;
  t->errval = (uint8_t)w->errval;
  w->errval = 0;
  if (w->in.p != w->in.small && t->stale == NULL) {
    t->stale = w->in.p;
    op__buf_init(&w->in);
  } else {
    op__buf_free(&w->in);
  }
  buf_take(&t->buf, &w->out);
}

#endif
