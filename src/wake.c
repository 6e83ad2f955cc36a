/* SPDX-License-Identifier: MIT */
/*
** wake.c - waking the loop thread: the wake-up descriptor, the runtime's
** list of finished tasks, and spinning before sleeping.
** Thread: any, except op__wake_open/close/clear and op__update_ref (loop).
**
** DESIGN: waking the loop thread
**
** Workers append finished tasks to their pool's list (pool.c), other
** producers to the runtime's (op__complete); the loop thread swaps the
** lists out whole and runs the completions with no lock held
** (drain_done, loop.c). The producer that makes a list non-empty raises done_flag,
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
** What the loop thread does when woken, and before it blocks, is in
** loop.c.
**
** The wake-up handle is referenced only while pool tasks are in flight, so
** op_runtime_run() returns when there is nothing left to wait for.
*/
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

#include "internal.h"

/* ---- the wake-up descriptor ---- */

/* Make the descriptor the loop thread polls for wake-ups: an eventfd, or
** a pipe where there is none. Not libuv's uv_async: a sender preempted
** inside uv_async_send makes the woken loop thread spin for it (about
** 13 us on the 2-vCPU machines of docs/benchmarks.md), and need_wake
** already lets one send stand for many completions. Returns 0 or a
** negative errno. */
int op__wake_open(op_runtime *rt) {
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

void op__wake_close(op_runtime *rt) {
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
void op__wake_clear(op_runtime *rt) {
  char buf[64];
  ssize_t n;

  do
    n = read(rt->wake_fd[0], buf, sizeof buf);
  while (n == (ssize_t)sizeof buf || (n < 0 && errno == EINTR));
}

/* ---- the completion list ---- */

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

void op__tasks_take(uv_mutex_t *mu, op_task **head, op_task **tail,
                    atomic_int *any, op_task **to_head, op_task **to_tail) {
  op_task *h, *t;

  /* Seen clear after the caller cleared rt->done_flag: a task handed in
  ** later raises done_flag again, so it is not lost. */
  if (!atomic_load(any))
    return;
  uv_mutex_lock(mu);
  h = *head;
  t = *tail;
  *head = *tail = NULL;
  atomic_store_explicit(any, 0, memory_order_relaxed);
  uv_mutex_unlock(mu);
  if (h == NULL)
    return;
  if (*to_tail != NULL)
    (*to_tail)->next = h;
  else
    *to_head = h;
  *to_tail = t;
}

/* Keep the loop alive exactly while pool tasks are in flight. */
void op__update_ref(op_runtime *rt) {
  if (rt->inflight > 0)
    uv_ref((uv_handle_t *)&rt->wake_poll);
  else
    uv_unref((uv_handle_t *)&rt->wake_poll);
}

/* ---- spinning ---- */

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
    OP_CPU_RELAX();
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
