/* SPDX-License-Identifier: MIT */
/*
** test-pool.c - pools through the C API: C tasks, completion exactly once,
** full queues, shutdown draining or cancelling, poll-loop integration,
** tasks submitted from done callbacks (held until the batch ends), busy
** polling, where workers run.
** LABELS: tsan
*/
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "offpath.h"
#include "test.h"

typedef struct job {
  int in, out;
  int done_calls;
  int status;
  atomic_int *gate; /* if set, work spins until it is non-zero */
} job;

/* Gated jobs that a worker has begun (the tests wait for it). */
static atomic_int gated_started;

static void work_add(void *arg) {
  job *j = arg;

  if (j->gate != NULL) {
    atomic_fetch_add(&gated_started, 1);
    while (atomic_load(j->gate) == 0)
      usleep(100);
  }
  j->out = j->in + 1;
}

/* Wait until a worker has begun a gated job (a loaded machine may take
** its time to start the thread). */
static void wait_gated_started(void) {
  int i;

  for (i = 0; i < 100000 && atomic_load(&gated_started) == 0; i++)
    usleep(100);
  ASSERT(atomic_load(&gated_started) > 0);
}

static int done_total;

static void done_count(void *arg, int status) {
  job *j = arg;
  j->done_calls++;
  j->status = status;
  done_total++;
}

static op_runtime *make(int threads, int queue, op_shutdown_mode mode) {
  op_config cfg;
  op_runtime *rt;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "p", threads, queue));
  cfg.shutdown = mode;
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  return rt;
}

/* 10,000 C tasks over two pools: each done callback runs exactly once.
** Both queues hold them all: the workers need not keep up with the
** submits (a loaded machine may not run them at all before the loop). */
static void test_many(void) {
  enum { N = 10000 };
  static job jobs[N];
  op_config cfg;
  op_runtime *rt;
  op_stats st;
  int i;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "p", 2, N));
  ASSERT_OK(op_config_pool(&cfg, "io", 0, N));
  ASSERT_OK(op_runtime_new(&cfg, &rt));

  done_total = 0;
  for (i = 0; i < N; i++) {
    jobs[i] = (job){ .in = i };
    ASSERT_OK(
        op_submit(rt, i % 2 ? "p" : "io", work_add, done_count, &jobs[i]));
  }
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(done_total, N);
  for (i = 0; i < N; i++) {
    ASSERT_EQ(jobs[i].done_calls, 1);
    ASSERT_EQ(jobs[i].status, 0);
    ASSERT_EQ(jobs[i].out, i + 1);
  }
  ASSERT_OK(op_stats_get(rt, &st));
  ASSERT_EQ(st.pools[0].completed + st.pools[2].completed, N);
  ASSERT_EQ(st.pools[2].inflight, 0);
  ASSERT_OK(op_runtime_free(rt));
}

/* A full queue refuses with OP_EAGAIN and never calls done. */
static void test_full(void) {
  static job jobs[4];
  atomic_int gate = 0;
  op_runtime *rt = make(1, 2, OP_SHUTDOWN_DRAIN);
  int i;

  done_total = 0;
  for (i = 0; i < 4; i++)
    jobs[i] = (job){ .in = i, .gate = &gate };
  atomic_store(&gated_started, 0);
  ASSERT_OK(op_submit(rt, "p", work_add, done_count, &jobs[0]));
  wait_gated_started(); /* the worker took job 0, waits at the gate */
  ASSERT_OK(op_submit(rt, "p", work_add, done_count, &jobs[1]));
  ASSERT_OK(op_submit(rt, "p", work_add, done_count, &jobs[2]));
  ASSERT_EQ(op_submit(rt, "p", work_add, done_count, &jobs[3]), OP_EAGAIN);
  ASSERT_EQ(op_submit(rt, "nope", work_add, done_count, &jobs[3]), OP_ENOPOOL);
  ASSERT_EQ(op_submit(rt, "p", NULL, done_count, &jobs[3]), OP_EINVAL);
  atomic_store(&gate, 1);
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(done_total, 3);
  ASSERT_EQ(jobs[3].done_calls, 0);
  ASSERT_OK(op_runtime_free(rt));
}

/* Shutdown drains queued tasks by default... */
static void test_shutdown_drain(void) {
  static job jobs[20];
  op_runtime *rt = make(1, 100, OP_SHUTDOWN_DRAIN);
  int i;

  done_total = 0;
  for (i = 0; i < 20; i++) {
    jobs[i] = (job){ .in = i };
    ASSERT_OK(op_submit(rt, "p", work_add, done_count, &jobs[i]));
  }
  ASSERT_OK(op_runtime_free(rt));
  ASSERT_EQ(done_total, 20);
  for (i = 0; i < 20; i++) {
    ASSERT_EQ(jobs[i].done_calls, 1);
    ASSERT_EQ(jobs[i].status, 0);
  }
}

/* ...or cancels them, and the running one still finishes. */
static atomic_int release_gate;

static void open_gate(void *arg) {
  (void)arg;
  usleep(50000);
  atomic_store(&release_gate, 1);
}

static void test_shutdown_cancel(void) {
  static job jobs[10];
  op_runtime *rt = make(1, 100, OP_SHUTDOWN_CANCEL);
  uv_thread_t opener;
  int i;

  done_total = 0;
  atomic_store(&release_gate, 0);
  atomic_store(&gated_started, 0);
  for (i = 0; i < 10; i++) {
    jobs[i] = (job){ .in = i, .gate = &release_gate };
    ASSERT_OK(op_submit(rt, "p", work_add, done_count, &jobs[i]));
  }
  wait_gated_started(); /* job 0 is running */
  ASSERT_OK(uv_thread_create(&opener, open_gate, NULL));
  ASSERT_OK(op_runtime_free(rt));
  uv_thread_join(&opener);
  ASSERT_EQ(done_total, 10);
  ASSERT_EQ(jobs[0].status, 0);
  ASSERT_EQ(jobs[0].out, 1);
  for (i = 1; i < 10; i++) {
    ASSERT_EQ(jobs[i].done_calls, 1);
    ASSERT_EQ(jobs[i].status, OP_ECANCELED);
  }
}

/* A host with its own poll loop: watch op_runtime_fd, call poll. */
static void test_poll_loop(void) {
  static job jobs[100];
  op_runtime *rt = make(2, 0, OP_SHUTDOWN_DRAIN);
  struct pollfd pfd;
  int i, timeout, rounds = 0;

  done_total = 0;
  pfd.fd = op_runtime_fd(rt);
  pfd.events = POLLIN;
  ASSERT_GE(pfd.fd, 0);
  for (i = 0; i < 100; i++) {
    jobs[i] = (job){ .in = i };
    ASSERT_OK(op_submit(rt, "p", work_add, done_count, &jobs[i]));
  }
  while (done_total < 100 && rounds++ < 10000) {
    timeout = op_runtime_poll(rt);
    if (done_total == 100)
      break;
    ASSERT_GE(poll(&pfd, 1, timeout < 0 ? 1000 : timeout), 0);
  }
  ASSERT_EQ(done_total, 100);
  ASSERT_OK(op_runtime_free(rt));
}

/* With spinning on, one task at a time (each done submits the next) and a
** burst, on one worker and on two: the spin and yield paths of the loop
** thread and the workers hand over every task exactly once. */
static op_runtime *serial_rt;
static int serial_left;
static job serial_job;

static void serial_done(void *arg, int status) {
  job *j = arg;

  ASSERT_EQ(status, 0);
  j->done_calls++;
  if (--serial_left > 0) {
    j->in = j->out;
    ASSERT_OK(op_submit(serial_rt, "p", work_add, serial_done, j));
  }
}

static void test_spin(int threads) {
  static job jobs[2000];
  op_config cfg;
  int i;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "p", threads, 4096));
  cfg.spin_us = 50;
  ASSERT_OK(op_runtime_new(&cfg, &serial_rt));
  serial_left = 2000;
  serial_job = (job){ .in = 0 };
  ASSERT_OK(op_submit(serial_rt, "p", work_add, serial_done, &serial_job));
  ASSERT_OK(op_runtime_run(serial_rt));
  ASSERT_EQ(serial_job.done_calls, 2000);
  ASSERT_EQ(serial_job.out, 2000);
  done_total = 0;
  for (i = 0; i < 2000; i++) {
    jobs[i] = (job){ .in = i };
    ASSERT_OK(op_submit(serial_rt, "p", work_add, done_count, &jobs[i]));
  }
  ASSERT_OK(op_runtime_run(serial_rt));
  ASSERT_EQ(done_total, 2000);
  for (i = 0; i < 2000; i++)
    ASSERT_EQ(jobs[i].done_calls, 1);
  ASSERT_OK(op_runtime_free(serial_rt));
}

/* busy_poll: while a long task is in flight the loop thread spins instead
** of sleeping, and still runs timers and answers I/O that come meanwhile
** (the worker writes to a socket pair the loop watches, then works on);
** the task completes exactly once and the loop ends when it does. Without
** busy_poll the loop thread sleeps through the same wait.
**
** The first timer (50 ms) starts a second one, due 300 ms later, that the
** loop spins up to; the write comes at 500 ms, 150 ms after it. A loop
** that, once the spin reached the timer, waited for it once more from the
** time before the spin (at 650 ms) would see the write first; one that
** looked for no I/O while it spins would see the write only when the task
** ends, at 650 ms. */
typedef struct busy_state {
  int fds[2];
  uv_timer_t first, second;
  int timer_inflight, io_inflight; /* tasks in flight when each came: 1 */
  int timer_calls, io_calls;
  int timer_first; /* the second timer came before the write: 1 */
  job j;
} busy_state;

static busy_state busy;

static void busy_work(void *arg) {
  busy_state *b = arg;

  usleep(500 * 1000);
  ASSERT_EQ(write(b->fds[1], "x", 1), 1);
  usleep(150 * 1000);
  b->j.out = 1;
}

static void busy_done(void *arg, int status) {
  busy_state *b = arg;

  ASSERT_EQ(status, 0);
  b->j.done_calls++;
}

static void busy_second_cb(uv_timer_t *t) {
  busy.timer_calls++;
  busy.timer_inflight = busy.j.done_calls == 0;
  busy.timer_first = busy.io_calls == 0;
  uv_close((uv_handle_t *)&busy.first, NULL);
  uv_close((uv_handle_t *)t, NULL);
}

static void busy_first_cb(uv_timer_t *t) {
  ASSERT_OK(uv_timer_init(t->loop, &busy.second));
  ASSERT_OK(uv_timer_start(&busy.second, busy_second_cb, 300, 0));
}

static void busy_io_cb(uv_poll_t *p, int status, int events) {
  char c;

  (void)events;
  ASSERT_EQ(status, 0);
  ASSERT_EQ(read(busy.fds[0], &c, 1), 1);
  busy.io_calls++;
  busy.io_inflight = busy.j.done_calls == 0;
  uv_close((uv_handle_t *)p, NULL);
}

/* Times this thread gave up its CPU to wait (blocking in epoll_wait, a
** futex). A yield that lets another thread run counts as involuntary. */
static long thread_waits(void) {
  struct rusage ru;

  ASSERT_OK(getrusage(RUSAGE_THREAD, &ru));
  return ru.ru_nvcsw;
}

static void test_busy_poll(int on) {
  uv_poll_t io;
  op_runtime *rt;
  op_config cfg;
  long waits;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "p", 1, 0));
  cfg.busy_poll = on;
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  memset(&busy, 0, sizeof busy);
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM, 0, busy.fds));
  ASSERT_OK(uv_timer_init(op_runtime_uv_loop(rt), &busy.first));
  ASSERT_OK(uv_timer_start(&busy.first, busy_first_cb, 50, 0));
  ASSERT_OK(uv_poll_init(op_runtime_uv_loop(rt), &io, busy.fds[0]));
  ASSERT_OK(uv_poll_start(&io, UV_READABLE, busy_io_cb));
  ASSERT_OK(op_submit(rt, "p", busy_work, busy_done, &busy));
  waits = thread_waits();
  ASSERT_OK(op_runtime_run(rt));
  waits = thread_waits() - waits;
  ASSERT_EQ(busy.j.done_calls, 1);
  ASSERT_EQ(busy.j.out, 1);
  ASSERT_EQ(busy.timer_calls, 1);
  ASSERT_EQ(busy.io_calls, 1);
  ASSERT_EQ(busy.timer_inflight, 1);
  ASSERT_EQ(busy.io_inflight, 1);
  ASSERT_EQ(busy.timer_first, 1);
  /* Sleeping waits for the first timer, the second, the write and the
  ** task: four times at least. Spinning never waits, however loaded the
  ** machine (CPU time would not tell: a loop thread yielding to busy
  ** threads on its CPU gets next to none). */
  if (on)
    ASSERT(waits <= 1);
  else
    ASSERT(waits >= 4);
  close(busy.fds[0]);
  close(busy.fds[1]);
  ASSERT_OK(op_runtime_free(rt));
}

/* Tasks a done callback submits are held until its batch of completions
** ends, and count against the queue: the fifth of a queue of four is
** refused with OP_EAGAIN and its done never runs. A Lua task launched and
** cancelled while held ends cancelled without running. */
static op_runtime *hold_rt;
static job hold_jobs[6];
static int hold_refused;

static void hold_done(void *arg, int status) {
  op_stats st;
  int i, rc;

  (void)arg;
  ASSERT_EQ(status, 0);
  for (i = 0; i < 6; i++) {
    hold_jobs[i] = (job){ .in = i };
    rc = op_submit(hold_rt, "p", work_add, done_count, &hold_jobs[i]);
    if (i < 4) {
      ASSERT_OK(rc);
    } else {
      ASSERT_EQ(rc, OP_EAGAIN);
      hold_refused++;
    }
  }
  ASSERT_OK(op_stats_get(hold_rt, &st));
  ASSERT_STR_EQ(st.pools[2].name, "p");
  ASSERT_EQ(st.pools[2].queued, 4);
  ASSERT_EQ(st.pools[2].queue_hwm, 4);
  ASSERT_OK(op_load_string(hold_rt,
                           "local t = offpath.launch('q', function() end)\n"
                           "HELD = t:status()\n"
                           "CANCELLED = t:cancel()\n"
                           "AFTER = t:status()\n",
                           "=hold"));
}

static void test_hold(void) {
  static job first;
  op_config cfg;
  op_stats st;
  lua_State *L;
  int i;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "p", 1, 4));
  ASSERT_OK(op_config_pool(&cfg, "q", 1, 4));
  ASSERT_OK(op_runtime_new(&cfg, &hold_rt));
  done_total = hold_refused = 0;
  first = (job){ .in = 0 };
  ASSERT_OK(op_submit(hold_rt, "p", work_add, hold_done, &first));
  ASSERT_OK(op_runtime_run(hold_rt));
  ASSERT_EQ(hold_refused, 2);
  ASSERT_EQ(done_total, 4);
  for (i = 0; i < 4; i++) {
    ASSERT_EQ(hold_jobs[i].done_calls, 1);
    ASSERT_EQ(hold_jobs[i].out, i + 1);
  }
  for (i = 4; i < 6; i++)
    ASSERT_EQ(hold_jobs[i].done_calls, 0);
  L = op_runtime_lua(hold_rt);
  lua_getglobal(L, "HELD");
  lua_getglobal(L, "CANCELLED");
  lua_getglobal(L, "AFTER");
  ASSERT_STR_EQ(lua_tostring(L, -3), "queued");
  ASSERT_EQ(lua_toboolean(L, -2), 1);
  ASSERT_STR_EQ(lua_tostring(L, -1), "cancelled");
  lua_pop(L, 3);
  ASSERT_OK(op_stats_get(hold_rt, &st));
  ASSERT_STR_EQ(st.pools[3].name, "q");
  ASSERT_EQ(st.pools[3].cancelled, 1);
  ASSERT_EQ(st.pools[3].completed, 0);
  ASSERT_EQ(st.pools[3].queued, 0);
  ASSERT_OK(op_runtime_free(hold_rt));
}

/* A long batch of completions does not hold what its callbacks submit
** until it ends: a task submitted by the first of 40 slow callbacks runs
** while the batch is still going. */
enum { LONG_BATCH = 40 };
static op_runtime *long_rt;
static job long_jobs[LONG_BATCH];
static atomic_int long_ran;
static int long_seen;

static void work_mark(void *arg) {
  (void)arg;
  atomic_store(&long_ran, 1);
}

static void long_done(void *arg, int status) {
  static job marker;
  job *j = arg;
  int i;

  ASSERT_EQ(status, 0);
  j->done_calls++;
  if (j == &long_jobs[0]) {
    marker = (job){ .in = 0 };
    ASSERT_OK(op_submit(long_rt, "p", work_mark, done_count, &marker));
  }
  if (j == &long_jobs[LONG_BATCH - 1]) {
    for (i = 0; i < 2000 && !atomic_load(&long_ran); i++)
      usleep(1000);
    long_seen = atomic_load(&long_ran);
  } else {
    usleep(1000); /* a slow callback */
  }
}

static void test_hold_long_batch(void) {
  op_config cfg;
  int i;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "p", 1, 0));
  ASSERT_OK(op_config_pool(&cfg, "q", 1, 0));
  ASSERT_OK(op_runtime_new(&cfg, &long_rt));
  ASSERT_OK(op_runtime_start(long_rt));
  done_total = 0;
  atomic_store(&long_ran, 0);
  for (i = 0; i < LONG_BATCH; i++) {
    long_jobs[i] = (job){ .in = i };
    ASSERT_OK(op_submit(long_rt, "q", work_add, long_done, &long_jobs[i]));
  }
  usleep(100000); /* all finish before the loop runs: one batch */
  ASSERT_OK(op_runtime_run(long_rt));
  ASSERT_EQ(long_seen, 1);
  ASSERT_EQ(done_total, 1);
  for (i = 0; i < LONG_BATCH; i++)
    ASSERT_EQ(long_jobs[i].done_calls, 1);
  ASSERT_OK(op_runtime_free(long_rt));
}

static void test_errors(void) {
  op_config cfg;

  ASSERT_STR_EQ(op_err_name(OP_ETIMEDOUT), "ETIMEDOUT");
  ASSERT_EQ(OP_EINVAL, UV_EINVAL);
  ASSERT_EQ(OP_ECANCELED, UV_ECANCELED);
  ASSERT_STR_EQ(op_strerror(OP_ECOPY),
                "value cannot be copied between Lua states");
  ASSERT_STR_EQ(op_strerror(UV_EPIPE), uv_strerror(UV_EPIPE));
  op_config_init(&cfg);
  ASSERT_EQ(op_config_pool(&cfg, "", 1, 1), OP_EINVAL);
  ASSERT_EQ(op_config_pool(&cfg, "p", -1, 1), OP_EINVAL);
  ASSERT_STR_EQ(op_version(), OP_VERSION_STRING);
}

/* Where workers run (op_config.loop_cpu). Each pool runs one task that
** records the CPUs its worker may use. */
typedef struct placed {
  cpu_set_t set;
  int ok, done_calls;
} placed;

static void work_where(void *arg) {
  placed *pl = arg;

  pl->ok = sched_getaffinity(0, sizeof pl->set, &pl->set) == 0;
}

static void done_where(void *arg, int status) {
  placed *pl = arg;

  ASSERT_EQ(status, 0);
  pl->done_calls++;
}

/* The off_cpu of pool name in rt's statistics. */
static int off_cpu(op_runtime *rt, const char *name) {
  op_stats st;
  int i;

  ASSERT_OK(op_stats_get(rt, &st));
  for (i = 0; i < st.npools; i++)
    if (strcmp(st.pools[i].name, name) == 0)
      return st.pools[i].off_cpu;
  TEST_FAIL_("no pool %s", name);
  return -1;
}

/* The CPUs of a pool's worker: every CPU the loop thread may use but off,
** which is -1 or one of them. */
static void check_placed(const placed *pl, const cpu_set_t *all, int off) {
  cpu_set_t want;

  ASSERT_EQ(pl->done_calls, 1);
  ASSERT(pl->ok);
  want = *all;
  if (off >= 0) {
    ASSERT(CPU_ISSET(off, all));
    CPU_CLR(off, &want);
  }
  ASSERT(CPU_EQUAL(&pl->set, &want));
}

/* With two CPUs or more, a pool with more threads than that keeps its
** workers off the loop thread's CPU by default, and a smaller one does not;
** loop_cpu KEEP moves every pool off the same CPU, SHARE none. With one
** CPU no pool keeps off it. */
static void test_placement(op_loop_cpu mode) {
  cpu_set_t all;
  op_config cfg;
  op_runtime *rt;
  placed wide = { 0 }, narrow = { 0 };
  int ncpus, w, n;

  ASSERT_OK(sched_getaffinity(0, sizeof all, &all));
  ncpus = CPU_COUNT(&all);
  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "wide", ncpus + 1, 0));
  ASSERT_OK(op_config_pool(&cfg, "narrow", 1, 0));
  cfg.loop_cpu = mode;
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  ASSERT_EQ(off_cpu(rt, "wide"), -1); /* not started yet */
  ASSERT_OK(op_submit(rt, "wide", work_where, done_where, &wide));
  ASSERT_OK(op_submit(rt, "narrow", work_where, done_where, &narrow));
  ASSERT_OK(op_runtime_run(rt));
  w = off_cpu(rt, "wide");
  n = off_cpu(rt, "narrow");
  check_placed(&wide, &all, w);
  check_placed(&narrow, &all, n);
  if (ncpus < 2 || mode == OP_LOOP_CPU_SHARE) {
    ASSERT_EQ(w, -1);
    ASSERT_EQ(n, -1);
  } else if (mode == OP_LOOP_CPU_KEEP) {
    ASSERT(w >= 0);
    ASSERT_EQ(n, w);
  } else {
    ASSERT(w >= 0);
    ASSERT_EQ(n, -1);
  }
  ASSERT_OK(op_runtime_free(rt));
}

int main(void) {
  test_errors();
  test_many();
  test_full();
  test_shutdown_drain();
  test_shutdown_cancel();
  test_poll_loop();
  test_spin(1);
  test_spin(2);
  test_busy_poll(1);
  test_busy_poll(0);
  test_hold();
  test_hold_long_batch();
  test_placement(OP_LOOP_CPU_AUTO);
  test_placement(OP_LOOP_CPU_KEEP);
  test_placement(OP_LOOP_CPU_SHARE);
  printf("test-pool: ok\n");
  return 0;
}
