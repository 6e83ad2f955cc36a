/* SPDX-License-Identifier: MIT */
/*
** op-capi.c - offpath's C API round trip: x + 1 through op_submit on a pool
** of N workers, pipelined (up to 1024 in flight), one at a time, or one
** every --gap microseconds (sparse: mean latency and the CPU an idle pool
** costs); the counterpart of bench/peer-cpool.c.
** Thread: main() and every done callback on the loop thread; work() on the
** pool's worker threads.
**
** The loop is driven by op_runtime_run(): done() consumes a result and
** submits the next task from inside the completion callback, so the window
** stays full without returning to main(). In sparse mode a libuv timer on
** the runtime's loop submits instead. The pool's threads (and their Lua
** VMs, which C tasks do not use) start on first use; a warm-up of a few
** tasks per worker runs before the clock starts.
*/
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <uv.h>

#define BENCH_NAME "op-capi"
#include "bench.h"

#include "offpath.h"

#define WINDOW      1024 /* tasks in flight in pipelined mode */
#define MAX_WORKERS 64

struct slot {
  int64_t x;
  int64_t result;
  uint64_t t_submit; /* ns, sparse mode only */
};

static struct {
  op_runtime *rt;
  long ntasks;
  long submitted;
  long finished;
  int64_t sum;
  int failed;
  int sparse;       /* the timer submits, done() does not */
  uint64_t lat_sum; /* ns from submit to done, sparse mode */
  uv_timer_t timer;
} B;

static struct slot slots[WINDOW];

/* The task. Thread: worker. */
static void work(void *arg) {
  struct slot *s = arg;
  s->result = s->x + 1;
}

static void done(void *arg, int status);

/* Submit the next task in slot s. */
static void submit(struct slot *s) {
  int rc;

  s->x = B.submitted++;
  rc = op_submit(B.rt, "b", work, done, s);
  if (rc != 0) {
    fprintf(stderr, "op-capi: op_submit: %s\n", op_strerror(rc));
    exit(1);
  }
}

/* Consume a result and reuse its slot for the next task. */
static void done(void *arg, int status) {
  struct slot *s = arg;

  if (status != 0) {
    B.failed++;
    return;
  }
  B.sum += s->result;
  B.finished++;
  if (B.sparse) {
    B.lat_sum += now_ns() - s->t_submit;
    if (B.finished == B.ntasks) {
      uv_timer_stop(&B.timer);
    }
  } else if (B.submitted < B.ntasks) {
    submit(s);
  }
}

/* Sparse mode: submit one task per tick, in a slot of its own: a task
** may still be in flight when the next tick comes. */
static void tick(uv_timer_t *timer) {
  struct slot *s = &slots[B.submitted % WINDOW];

  (void)timer;
  if (B.submitted < B.ntasks) {
    s->t_submit = now_ns();
    submit(s);
  }
}

static void usage(void) {
  fprintf(stderr,
          "usage: op-capi --workers N --mode pipelined|serial|sparse "
          "--tasks N [--spin US] [--gap US]\n"
          "  pipelined: up to %d tasks in flight, prints ns_per_trip\n"
          "  serial:    one task at a time, prints us_per_trip\n"
          "  sparse:    one task every --gap US (default 1000, whole\n"
          "             milliseconds), prints the mean latency as\n"
          "             us_per_trip and cpu_pct\n",
          WINDOW);
  exit(2);
}

int main(int argc, char **argv) {
  op_config cfg;
  struct rusage ru;
  const char *mode = "pipelined";
  long window, i, n, gap_us = 1000;
  int workers = 1, rc, spin = -1;
  uint64_t t0, wall;
  int64_t want;

  for (i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (i + 1 >= argc) {
      usage();
    } else if (strcmp(a, "--workers") == 0) {
      workers = (int)parse_long(a, argv[++i], 1, MAX_WORKERS);
    } else if (strcmp(a, "--spin") == 0) {
      spin = (int)parse_long(a, argv[++i], 0, 10000);
    } else if (strcmp(a, "--tasks") == 0) {
      B.ntasks = parse_long(a, argv[++i], 1, 1000000000L);
    } else if (strcmp(a, "--gap") == 0) {
      gap_us = parse_long(a, argv[++i], 1000, 10000000L);
    } else if (strcmp(a, "--mode") == 0) {
      mode = argv[++i];
      if (strcmp(mode, "pipelined") != 0 && strcmp(mode, "serial") != 0 &&
          strcmp(mode, "sparse") != 0) {
        usage();
      }
    } else {
      usage();
    }
  }
  if (B.ntasks == 0) {
    usage();
  }
  window = strcmp(mode, "pipelined") == 0 ? WINDOW : 1;
  if (window > B.ntasks) {
    window = B.ntasks;
  }

  op_config_init(&cfg);
  if (spin >= 0)
    cfg.spin_us = spin;
  if ((rc = op_config_pool(&cfg, "b", workers, 2048)) != 0 ||
      (rc = op_runtime_new(&cfg, &B.rt)) != 0) {
    fprintf(stderr, "op-capi: runtime: %s\n", op_strerror(rc));
    return 1;
  }

  /* Warm-up: start the pool's threads. */
  n = B.ntasks;
  B.ntasks = workers * 4;
  for (i = 0; i < B.ntasks; i++) {
    submit(&slots[i]);
  }
  op_runtime_run(B.rt);
  B.ntasks = n;
  B.submitted = B.finished = 0;
  B.sum = 0;

  t0 = now_ns();
  if (strcmp(mode, "sparse") == 0) {
    B.sparse = 1;
    uv_timer_init(op_runtime_uv_loop(B.rt), &B.timer);
    uv_timer_start(&B.timer, tick, (uint64_t)gap_us / 1000,
                   (uint64_t)gap_us / 1000);
  } else {
    for (i = 0; i < window; i++) {
      submit(&slots[i]);
    }
  }
  if ((rc = op_runtime_run(B.rt)) != 0) {
    fprintf(stderr, "op-capi: op_runtime_run: %s\n", op_strerror(rc));
    return 1;
  }
  wall = now_ns() - t0;
  getrusage(RUSAGE_SELF, &ru);
  if (B.sparse) {
    uv_close((uv_handle_t *)&B.timer, NULL);
  }
  if ((rc = op_runtime_free(B.rt)) != 0) {
    fprintf(stderr, "op-capi: op_runtime_free: %s\n", op_strerror(rc));
    return 1;
  }

  want = (int64_t)B.ntasks * (B.ntasks - 1) / 2 + B.ntasks;
  if (B.failed != 0 || B.finished != B.ntasks || B.sum != want) {
    fprintf(stderr,
            "op-capi: %ld of %ld tasks, %d failed, sum %" PRId64
            ", want %" PRId64 "\n",
            B.finished, B.ntasks, B.failed, B.sum, want);
    return 1;
  }

  printf("name=offpath-c workers=%d mode=%s tasks=%ld", workers, mode,
         B.ntasks);
  if (B.sparse) {
    printf(" gap_us=%ld us_per_trip=%.2f", gap_us,
           (double)B.lat_sum / (double)B.ntasks / 1e3);
  } else if (window > 1) {
    printf(" ns_per_trip=%.1f", (double)wall / (double)B.ntasks);
  } else {
    printf(" us_per_trip=%.2f", (double)wall / (double)B.ntasks / 1e3);
  }
  print_usage(&ru, wall);
  return 0;
}
