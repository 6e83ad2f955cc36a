/* SPDX-License-Identifier: MIT */
/*
** loop.c - the loop thread's side of completions: the wake-up callback
** that drains finished tasks and runs their completions, and the wait
** before the loop blocks (yielding or spinning for completions).
** Thread: loop.
**
** A busy loop thread stays awake. The wake-up callback (op__loop_wake_cb)
** drains again while done_flag is up: a worker on the same CPU often
** finishes the next task during the drain. Before the loop blocks with
** tasks in flight (op__loop_idle_cb, prepare phase) it yields the CPU to
** a worker on the same CPU that it just gave work, or, with spin_us set,
** spins for completions when the workers run on other CPUs. After
** DRAIN_ROUNDS drains it goes round the loop (timers, I/O) without
** blocking. wake.c has how the wake-up itself works.
*/
#include <limits.h>
#include <poll.h>
#include <sched.h>

#include "internal.h"

/* Run the completions of every finished task: the runtime's list and each
** pool's, swapped out whole. Each task carries its own completion; the
** pool keeps its books (op__pool_returned) and holds what the completions
** of C tasks submit until the batch ends (pool.c), so the batch is queued
** under one lock and the workers it wakes do not preempt the loop thread
** after every callback on a shared CPU. */
static void drain_done(op_runtime *rt) {
  op_task *t, *list = NULL, *tail = NULL;
  int i;

  atomic_store(&rt->done_flag, 0);
  op__tasks_take(&rt->done_mu, &rt->done_head, &rt->done_tail, &rt->done_any,
                 &list, &tail);
  for (i = 0; i < rt->npools; i++)
    op__pool_take_done(rt->pools[i], &list, &tail);
  if (list == NULL)
    return;
  /* Settle the whole batch before telling anyone, so a coroutine resumed
  ** for one task finds the rest of the batch ended too. */
  rt->batch_tick = op__ticker_read(&rt->ticker);
  for (t = list; t != NULL; t = t->next) {
    op__pool_returned(t);
    if (t->settle != NULL)
      t->settle(t);
  }
  rt->batch_tick = 0; /* Lua runs from here: its submits read the time */
  while ((t = list) != NULL) {
    list = t->next;
    t->next = NULL;
    /* Lua code may run long: queue the held tasks first, and hold none
    ** of its own. */
    if (!t->holds)
      op__pool_release(rt);
    t->complete(t);
  }
  op__pool_batch_end(rt);
  op__update_ref(rt);
}

/* Let the next completion wake the loop thread, which is about to stop
** looking at done_flag. If one came meanwhile, go round the loop once more
** instead of blocking, and return 1. */
static int wake_on_next(op_runtime *rt) {
  atomic_store(&rt->need_wake, 1);
  if (atomic_load(&rt->done_flag) && atomic_exchange(&rt->need_wake, 0)) {
    op__wake_loop(rt);
    return 1;
  }
  return 0;
}

#define DRAIN_ROUNDS 64

/* How often a spinning loop thread looks for I/O. */
#define PEEK_NS 4000

/* Spin for done_flag on the loop thread, for at most us microseconds;
** stop as soon as the loop has other work: a timer due, an idle handle or
** I/O (a zero-timeout poll of the backend descriptor every PEEK_NS). The
** loop's clock is moved on at each look, so a timer that falls due during
** the spin ends it, and the loop does not then wait for that timer once
** more, counted from the time before the spin. With yield set a worker
** shares this CPU, so each turn gives it the CPU instead of pausing.
** Returns 1 if done_flag was seen, 0 if the time ran out, and -1 if the
** loop has other work first: that says nothing about how long completions
** take. */
static int spin_for_done(op_runtime *rt, unsigned us, int yield) {
  struct pollfd pfd;
  uint64_t now, end, peek;
  unsigned i;

  if (uv_backend_timeout(rt->loop) == 0)
    return -1;
  pfd.fd = uv_backend_fd(rt->loop);
  pfd.events = POLLIN;
  now = uv_hrtime();
  end = now + (uint64_t)us * 1000;
  peek = now + PEEK_NS;
  for (i = 1;; i++) {
    if (atomic_load_explicit(&rt->done_flag, memory_order_acquire))
      return 1;
    if (yield || (i & 63) == 0) {
      now = uv_hrtime();
      if (now >= end)
        return 0;
      if (now >= peek) {
        uv_update_time(rt->loop);
        if (uv_backend_timeout(rt->loop) == 0 ||
            (pfd.fd >= 0 && poll(&pfd, 1, 0) > 0))
          return -1;
        peek = now + PEEK_NS;
      }
    }
    if (yield)
      sched_yield();
    else
      OP_CPU_RELAX();
  }
}

/* The completion wake-up (the wake-up descriptor is readable): drain, and drain again while completions keep
** coming (a worker on this CPU often finishes the next task before the
** drain ends), at most DRAIN_ROUNDS times, so the loop thread goes back
** to blocking in the kernel only when there is nothing to do. need_wake
** is clear meanwhile (the sender cleared it), so the workers send no
** wake-ups. */
void op__loop_wake_cb(uv_poll_t *poll, int status, int events) {
  op_runtime *rt = poll->data;
  int rounds = 0;

  (void)status; /* an error would be EBADF: impossible while it is open */
  (void)events;
  op__wake_clear(rt);
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
** - busy_poll is on: spin until a completion, a timer or I/O, however
**   long that takes, yielding at each turn if a worker shares this CPU.
**   The loop thread then never sleeps while tasks are in flight, and its
**   CPU never goes idle between them: no wake-up latency, no cold caches.
**
** need_wake is clear meanwhile, so finishing workers send no wake-up.
** Neither happens inside op_runtime_poll, whose host also waits on
** descriptors the loop does not know. */
void op__loop_idle_cb(uv_prepare_t *prep) {
  op_runtime *rt = prep->data;
  unsigned us = 0;
  int hit, rounds, cpu, yield, woke, cleared = 0;

  op__pool_release(rt); /* the turn's held Lua tasks, before any wait */
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
    if (rt->cfg.busy_poll)
      us = UINT_MAX;
    else if (yield ? rt->nsubmits == rt->yield_mark
                   : woke || (us = op__spin_budget(&rt->spin)) == 0)
      break;
    /* A wake-up on its way means the loop will not block anyway. */
    if (!cleared && !atomic_exchange(&rt->need_wake, 0))
      return;
    cleared = 1;
    if (rt->cfg.busy_poll) {
      hit = spin_for_done(rt, us, yield);
    } else if (yield) {
      rt->yield_mark = rt->nsubmits;
      sched_yield();
      hit = atomic_load(&rt->done_flag);
    } else {
      hit = spin_for_done(rt, us, 0);
      if (hit >= 0)
        op__spin_result(&rt->spin, hit);
    }
    if (hit <= 0)
      break;
    drain_done(rt);
  }
  if (rounds == DRAIN_ROUNDS) {
    /* Still busy: go round the loop (timers, I/O) without blocking; the
    ** wake-up stands for need_wake, which is still clear. */
    op__wake_loop(rt);
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
