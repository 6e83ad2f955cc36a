/* SPDX-License-Identifier: MIT */
/*
** peer-uvwork.c - the libuv uv_queue_work peer: x + 1 on libuv's threadpool.
** Thread: everything here runs on the loop thread except work_cb(), which
** runs on libuv's pool threads.
*/

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <uv.h>

#define BENCH_NAME "peer-uvwork"
#include "bench.h"

#define WINDOW      1024 /* tasks in flight in pipelined mode */
#define MAX_WORKERS 128  /* libuv's own limit on UV_THREADPOOL_SIZE */

struct task {
  uv_work_t req; /* req.data is unused: the task embeds the request */
  int64_t x;
  int64_t result;
};

/* The run's state, owned by the loop thread. */
static struct {
  long ntasks;
  long submitted;
  long finished;
  int64_t sum;
} run;

static struct task tasks[WINDOW];

static void after_work_cb(uv_work_t *req, int status);


/* Compute the task's result. Thread: libuv pool. */
static void work_cb(uv_work_t *req) {
  struct task *t = (struct task *)req;

  t->result = t->x + 1;
}

/* Queue the next task in slot t, if any are left. Aborts on failure: with a
** valid loop and callback uv_queue_work cannot fail. */
static void submit(uv_loop_t *loop, struct task *t) {
  int err;

  if (run.submitted >= run.ntasks) {
    return;
  }
  t->x = run.submitted++;
  err = uv_queue_work(loop, &t->req, work_cb, after_work_cb);
  if (err != 0) {
    fprintf(stderr, "peer-uvwork: uv_queue_work: %s\n", uv_strerror(err));
    abort();
  }
}

/* Consume the result on the loop thread and reuse the slot. */
static void after_work_cb(uv_work_t *req, int status) {
  struct task *t = (struct task *)req;

  if (status != 0) {
    fprintf(stderr, "peer-uvwork: work failed: %s\n", uv_strerror(status));
    abort();
  }
  run.sum += t->result;
  run.finished++;
  submit(req->loop, t);
}

/* Print the usage and exit with status 2. */
static void usage(void) {
  fprintf(stderr,
          "usage: peer-uvwork --workers N --mode pipelined|serial --tasks N\n"
          "  Sets UV_THREADPOOL_SIZE=N before libuv's pool starts.\n"
          "  pipelined: up to %d tasks in flight, prints ns_per_trip\n"
          "  serial:    one task at a time, prints us_per_trip\n",
          WINDOW);
  exit(2);
}

int main(int argc, char **argv) {
  uv_loop_t *loop;
  long nworkers = 1, window = WINDOW, i;
  const char *mode = "pipelined";
  char buf[32];
  uint64_t t_start, wall;
  struct rusage ru;
  int64_t want;

  for (i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (i + 1 >= argc) {
      usage();
    } else if (strcmp(a, "--workers") == 0) {
      nworkers = parse_long(a, argv[++i], 1, MAX_WORKERS);
    } else if (strcmp(a, "--tasks") == 0) {
      run.ntasks = parse_long(a, argv[++i], 1, 1000000000L);
    } else if (strcmp(a, "--mode") == 0) {
      mode = argv[++i];
      if (strcmp(mode, "pipelined") == 0) {
        window = WINDOW;
      } else if (strcmp(mode, "serial") == 0) {
        window = 1;
      } else {
        usage();
      }
    } else {
      usage();
    }
  }
  if (run.ntasks == 0) {
    usage();
  }
  /* libuv reads UV_THREADPOOL_SIZE once, when the first work is queued. */
  snprintf(buf, sizeof buf, "%ld", nworkers);
  if (setenv("UV_THREADPOOL_SIZE", buf, 1) != 0) {
    perror("peer-uvwork: setenv");
    return 1;
  }

  loop = uv_default_loop();
  t_start = uv_hrtime();
  for (i = 0; i < window; i++) {
    submit(loop, &tasks[i]);
  }
  uv_run(loop, UV_RUN_DEFAULT);
  wall = uv_hrtime() - t_start;
  getrusage(RUSAGE_SELF, &ru);
  uv_loop_close(loop);

  want = (int64_t)run.ntasks * (run.ntasks - 1) / 2 + run.ntasks;
  if (run.finished != run.ntasks || run.sum != want) {
    fprintf(stderr,
            "peer-uvwork: %ld of %ld tasks, sum %" PRId64 ", want %" PRId64
            "\n",
            run.finished, run.ntasks, run.sum, want);
    return 1;
  }

  printf("name=uvwork workers=%ld mode=%s tasks=%ld", nworkers, mode,
         run.ntasks);
  if (window > 1) {
    printf(" ns_per_trip=%.1f", (double)wall / (double)run.ntasks);
  } else {
    printf(" us_per_trip=%.2f", (double)wall / (double)run.ntasks / 1e3);
  }
  print_usage(&ru, wall);
  return 0;
}
