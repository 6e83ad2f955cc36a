/* SPDX-License-Identifier: MIT */
/*
** peer-cpool.c - the plain C pool that offpath is measured against.
** Thread: main() submits and drains on the main thread; worker_main() on
** pool threads.
*/

/*
** DESIGN
**
** N pool threads share one mutex `mu` that guards a bounded ring of queued
** tasks and the completion list. A worker hands in its finished task and
** takes the next one in the same critical section. The main thread swaps the
** whole completion list out under the lock and consumes every task in it
** with no lock held (batched drain). It sleeps in read() on an eventfd.
**
**   main                               mu                    worker
**   submit() --push; signal if a ---> [ring] --pop-------> x + 1
**              worker sleeps unsignalled                     |
**   drain() <--swap the whole list--- [done] <--push--------+
**      ^                                                     |
**      +--- read(efd) <------ write(efd), after unlock, if main_waiting
**
** Sleeping and waking, all decided under mu, so no wake-up is lost:
** - main finds the completion list empty: main_waiting = 1, unlock, read().
**   The next worker to push sees main_waiting, clears it and writes the
**   eventfd after unlocking.
** - a worker finds the ring empty: idle++, pthread_cond_wait(). submit()
**   signals only if idle > signalled, and counts the signal in signalled,
**   so a worker that takes 30 us to wake up is not signalled again for each
**   of the tasks queued meanwhile (libuv's pool signals every time).
**
** Spinning (--spin US). Before sleeping, each side first spins on an atomic
** (qlen for workers, the completion list head for main) for up to its
** current budget. The budget adapts: after a sleep that a spin of US would
** have covered, the budget goes back to US; after a longer sleep it halves,
** down to zero, so an idle pool stops spinning after a few tasks.
**
** Diagnostic (--epoll): main waits for the eventfd in epoll_wait() and
** then reads it, as an event loop does, instead of blocking in read(); it
** measures what that one extra hop costs. Not used by the suite.
**
** Invariants: tail - head <= WINDOW; idle >= signalled >= 0; done is
** changed only under mu (spinners read it without the lock).
*/

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#define BENCH_NAME "peer-cpool"
#include "bench.h"

#define WINDOW      1024 /* tasks in flight in pipelined mode */
#define MAX_WORKERS 64

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

enum mode { MODE_PIPELINED, MODE_SERIAL, MODE_SPARSE };

struct task {
  struct task *next; /* free list and completion list link */
  int64_t x;
  int64_t result;
  uint64_t t_submit; /* ns, sparse mode only */
};

/* An adaptive spin budget, owned by one thread. */
struct spinner {
  int64_t max_ns;
  int64_t budget_ns;
};

struct pool {
  pthread_mutex_t mu; /* guards everything down to efd */
  pthread_cond_t cv;  /* the ring is no longer empty, or stop */
  struct task *ring[WINDOW];
  unsigned head, tail; /* pop at head, push at tail; count = tail - head */
  int idle;            /* workers in pthread_cond_wait */
  int signalled;       /* of those, already signalled */
  int stop;
  int main_waiting;            /* main is, or is about to be, in read() */
  _Atomic(struct task *) done; /* completion list, LIFO */
  atomic_uint qlen;            /* tail - head, for spinning workers */
  int efd;
  int epfd; /* --epoll: an epoll instance watching efd, else -1 */

  int nworkers;
  int64_t spin_ns;
  int lua;
  pthread_t threads[MAX_WORKERS];
};

/* Worker-side Lua function and main-side Lua callback for --lua. */
static const char worker_chunk[] = "return function(x) return x + 1 end";
static const char main_chunk[] = "local sum = 0\n"
                                 "return function(r) sum = sum + r end,\n"
                                 "       function() return sum end";


/* ---- helpers ---- */

/* Print a message and abort: used for failures that cannot happen here. */
static void die(const char *what, int err) {
  fprintf(stderr, "peer-cpool: %s: %s\n", what, strerror(err));
  abort();
}

/* Make a Lua state and run chunk, leaving its nret results on the stack.
** Aborts on error: the chunks are constants. */
static lua_State *new_vm(const char *chunk, int nret) {
  lua_State *L = luaL_newstate();

  if (L == NULL) {
    die("luaL_newstate", ENOMEM);
  }
  luaL_openlibs(L);
  if (luaL_loadstring(L, chunk) != LUA_OK ||
      lua_pcall(L, 0, nret, 0) != LUA_OK) {
    fprintf(stderr, "peer-cpool: %s\n", lua_tostring(L, -1));
    abort();
  }
  return L;
}


/* ---- spinning ---- */

/* Spin until *p is non-zero or the budget runs out. Returns 1 if the value
** turned non-zero while spinning, 0 if the caller must block. */
static int spin_uint(struct spinner *s, atomic_uint *p) {
  uint64_t start;
  unsigned i;

  if (s->budget_ns <= 0) {
    return 0;
  }
  start = now_ns();
  for (i = 1;; i++) {
    if (atomic_load_explicit(p, memory_order_relaxed) != 0) {
      return 1;
    }
    cpu_relax();
    if ((i & 63) == 0 && (int64_t)(now_ns() - start) >= s->budget_ns) {
      return 0;
    }
  }
}

/* As spin_uint(), for the completion list head. */
static int spin_ptr(struct spinner *s, _Atomic(struct task *) *p) {
  uint64_t start;
  unsigned i;

  if (s->budget_ns <= 0) {
    return 0;
  }
  start = now_ns();
  for (i = 1;; i++) {
    if (atomic_load_explicit(p, memory_order_relaxed) != NULL) {
      return 1;
    }
    cpu_relax();
    if ((i & 63) == 0 && (int64_t)(now_ns() - start) >= s->budget_ns) {
      return 0;
    }
  }
}

/* Adapt the budget after a sleep of slept_ns that followed a failed spin. A
** spin of the full budget would have avoided a short sleep, so spin fully
** next time; a long sleep means the pool is idle, so spin less. */
static void spin_adapt(struct spinner *s, uint64_t slept_ns) {
  if (s->max_ns <= 0) {
    return;
  }
  if ((int64_t)slept_ns <= s->max_ns) {
    s->budget_ns = s->max_ns;
  } else {
    s->budget_ns /= 2;
    if (s->budget_ns < 500) {
      s->budget_ns = 0;
    }
  }
}


/* ---- the pool ---- */

/* Queue t for a worker and wake one if a worker sleeps and no signal is on
** its way yet. The ring never fills: main keeps at most WINDOW tasks out. */
static void submit(struct pool *p, struct task *t) {
  pthread_mutex_lock(&p->mu);
  if (p->tail - p->head == WINDOW) {
    die("submit: ring full", EOVERFLOW);
  }
  p->ring[p->tail++ % WINDOW] = t;
  atomic_store_explicit(&p->qlen, p->tail - p->head, memory_order_relaxed);
  if (p->idle > p->signalled) {
    p->signalled++;
    pthread_cond_signal(&p->cv);
  }
  pthread_mutex_unlock(&p->mu);
}

/* Sleep until the ring has a task or the pool stops, spinning first if
** --spin is set. Called and returns with mu held. Thread: worker. */
static void worker_wait(struct pool *p, struct spinner *s) {
  uint64_t t0;

  if (s->budget_ns > 0) {
    pthread_mutex_unlock(&p->mu);
    spin_uint(s, &p->qlen);
    pthread_mutex_lock(&p->mu);
  }
  while (p->tail == p->head && !p->stop) {
    p->idle++;
    t0 = s->max_ns > 0 ? now_ns() : 0;
    pthread_cond_wait(&p->cv, &p->mu);
    if (s->max_ns > 0) {
      spin_adapt(s, now_ns() - t0);
    }
    p->idle--;
    if (p->signalled > 0) {
      p->signalled--; /* or a spurious wake-up: harmless either way */
    }
  }
}

/* Compute t's result, in C or by calling fn in the worker's own state L.
** Thread: worker. */
static void run_task(lua_State *L, int fn, struct task *t) {
  if (L == NULL) {
    t->result = t->x + 1;
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, fn);
  lua_pushinteger(L, t->x);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    fprintf(stderr, "peer-cpool: worker: %s\n", lua_tostring(L, -1));
    abort();
  }
  t->result = lua_tointeger(L, -1);
  lua_pop(L, 1);
}

/* Run tasks until the pool stops: hand in the last result and take the next
** task in one critical section. Each worker owns its lua_State, made once
** before the first task. Thread: worker. */
static void *worker_main(void *arg) {
  struct pool *p = arg;
  struct spinner s = { p->spin_ns, p->spin_ns };
  struct task *t = NULL;
  lua_State *L = NULL;
  int fn = LUA_NOREF, wake;
  uint64_t one = 1;

  if (p->lua) {
    L = new_vm(worker_chunk, 1);
    fn = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  pthread_mutex_lock(&p->mu);
  for (;;) {
    wake = 0;
    if (t != NULL) {
      t->next = atomic_load_explicit(&p->done, memory_order_relaxed);
      atomic_store_explicit(&p->done, t, memory_order_release);
      wake = p->main_waiting;
      p->main_waiting = 0;
      t = NULL;
    }
    if (p->tail != p->head) {
      t = p->ring[p->head++ % WINDOW];
      atomic_store_explicit(&p->qlen, p->tail - p->head, memory_order_relaxed);
    }
    pthread_mutex_unlock(&p->mu);
    if (wake && write(p->efd, &one, sizeof one) != (ssize_t)sizeof one) {
      die("write(eventfd)", errno);
    }
    if (t != NULL) {
      run_task(L, fn, t);
      pthread_mutex_lock(&p->mu);
      continue;
    }
    pthread_mutex_lock(&p->mu);
    worker_wait(p, &s);
    if (p->tail == p->head) {
      break; /* stopped */
    }
  }
  pthread_mutex_unlock(&p->mu);
  if (L != NULL) {
    lua_close(L);
  }
  return NULL;
}

/* Return the whole completion list (LIFO), first spinning if --spin is set,
** then sleeping on the eventfd until a worker pushes a task. */
static struct task *drain(struct pool *p, struct spinner *s) {
  struct task *list;
  uint64_t v, t0;

  if (atomic_load_explicit(&p->done, memory_order_relaxed) == NULL) {
    spin_ptr(s, &p->done);
  }
  pthread_mutex_lock(&p->mu);
  while ((list = atomic_load_explicit(&p->done, memory_order_relaxed)) ==
         NULL) {
    p->main_waiting = 1;
    pthread_mutex_unlock(&p->mu);
    t0 = s->max_ns > 0 ? now_ns() : 0;
    if (p->epfd >= 0) {
      struct epoll_event ev;
      while (epoll_wait(p->epfd, &ev, 1, -1) < 0) {
        if (errno != EINTR) {
          die("epoll_wait", errno);
        }
      }
    }
    while (read(p->efd, &v, sizeof v) < 0) {
      if (errno != EINTR) {
        die("read(eventfd)", errno);
      }
    }
    if (s->max_ns > 0) {
      spin_adapt(s, now_ns() - t0);
    }
    pthread_mutex_lock(&p->mu);
  }
  atomic_store_explicit(&p->done, NULL, memory_order_relaxed);
  pthread_mutex_unlock(&p->mu);
  return list;
}

/* Start nworkers threads. */
static void pool_start(struct pool *p) {
  int i, err;

  if ((err = pthread_mutex_init(&p->mu, NULL)) != 0 ||
      (err = pthread_cond_init(&p->cv, NULL)) != 0) {
    die("pthread init", err);
  }
  p->efd = eventfd(0, EFD_CLOEXEC);
  if (p->efd < 0) {
    die("eventfd", errno);
  }
  if (p->epfd >= 0) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epfd < 0 || epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->efd, &ev) != 0) {
      die("epoll", errno);
    }
  }
  for (i = 0; i < p->nworkers; i++) {
    if ((err = pthread_create(&p->threads[i], NULL, worker_main, p)) != 0) {
      die("pthread_create", err);
    }
  }
}

/* Stop and join the workers, and release the pool's resources. */
static void pool_stop(struct pool *p) {
  int i;

  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  for (i = 0; i < p->nworkers; i++) {
    pthread_join(p->threads[i], NULL);
  }
  close(p->efd);
  if (p->epfd >= 0) {
    close(p->epfd);
  }
  pthread_cond_destroy(&p->cv);
  pthread_mutex_destroy(&p->mu);
}


/* ---- main ---- */

/* Print the usage and exit with status 2. */
static void usage(void) {
  fprintf(stderr,
          "usage: peer-cpool --workers N --mode pipelined|serial|sparse "
          "--tasks N\n"
          "                  [--lua] [--spin US] [--gap US] [--epoll]\n"
          "  pipelined: up to %d tasks in flight, prints ns_per_trip\n"
          "  serial:    one task at a time, prints us_per_trip\n"
          "  sparse:    one task every --gap US (default 1000), prints the\n"
          "             mean latency as us_per_trip and cpu_pct\n"
          "  --epoll:   main waits in epoll_wait before reading the eventfd\n"
          "             (diagnostic: the cost of an event loop's extra hop)\n",
          WINDOW);
  exit(2);
}

int main(int argc, char **argv) {
  static struct pool pool;
  static struct task tasks[WINDOW];
  struct pool *p = &pool;
  struct spinner s;
  struct task *free_list = NULL, *list, *t;
  enum mode mode = MODE_PIPELINED;
  long ntasks = 0, gap_us = 1000;
  long submitted = 0, finished = 0, inflight = 0, window;
  int64_t sum = 0, want;
  uint64_t t_start, wall, lat_sum = 0, next_at = 0;
  struct rusage ru;
  struct timespec ts;
  lua_State *L = NULL;
  const char *mode_name = "pipelined";
  int i;

  p->nworkers = 1;
  p->epfd = -1;
  for (i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--lua") == 0) {
      p->lua = 1;
    } else if (strcmp(a, "--epoll") == 0) {
      p->epfd = 0; /* made in pool_start */
    } else if (i + 1 >= argc) {
      usage();
    } else if (strcmp(a, "--workers") == 0) {
      p->nworkers = (int)parse_long(a, argv[++i], 1, MAX_WORKERS);
    } else if (strcmp(a, "--tasks") == 0) {
      ntasks = parse_long(a, argv[++i], 1, 1000000000L);
    } else if (strcmp(a, "--spin") == 0) {
      p->spin_ns = (int64_t)parse_long(a, argv[++i], 0, 1000000L) * 1000;
    } else if (strcmp(a, "--gap") == 0) {
      gap_us = parse_long(a, argv[++i], 1, 10000000L);
    } else if (strcmp(a, "--mode") == 0) {
      mode_name = argv[++i];
      if (strcmp(mode_name, "pipelined") == 0) {
        mode = MODE_PIPELINED;
      } else if (strcmp(mode_name, "serial") == 0) {
        mode = MODE_SERIAL;
      } else if (strcmp(mode_name, "sparse") == 0) {
        mode = MODE_SPARSE;
      } else {
        usage();
      }
    } else {
      usage();
    }
  }
  if (ntasks == 0) {
    usage();
  }
  window = mode == MODE_PIPELINED ? WINDOW : 1;
  for (i = 0; i < WINDOW; i++) {
    tasks[i].next = free_list;
    free_list = &tasks[i];
  }
  if (p->lua) {
    L = new_vm(main_chunk, 2); /* stack: callback, getter */
  }
  s.max_ns = s.budget_ns = p->spin_ns;
  pool_start(p);

  t_start = now_ns();
  next_at = t_start;
  while (finished < ntasks) {
    while (inflight < window && submitted < ntasks) {
      if (mode == MODE_SPARSE) {
        next_at += (uint64_t)gap_us * 1000;
        ts.tv_sec = (time_t)(next_at / 1000000000u);
        ts.tv_nsec = (long)(next_at % 1000000000u);
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) ==
               EINTR) {
        }
      }
      t = free_list;
      free_list = t->next;
      t->x = submitted++;
      t->t_submit = mode == MODE_SPARSE ? now_ns() : 0;
      inflight++;
      submit(p, t);
    }
    list = drain(p, &s);
    while (list != NULL) {
      t = list;
      list = t->next;
      if (L != NULL) {
        lua_pushvalue(L, 1);
        lua_pushinteger(L, t->result);
        if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
          fprintf(stderr, "peer-cpool: main: %s\n", lua_tostring(L, -1));
          abort();
        }
      } else {
        sum += t->result;
      }
      if (mode == MODE_SPARSE) {
        lat_sum += now_ns() - t->t_submit;
      }
      t->next = free_list;
      free_list = t;
      inflight--;
      finished++;
    }
  }
  wall = now_ns() - t_start;
  getrusage(RUSAGE_SELF, &ru);
  pool_stop(p);

  if (L != NULL) {
    lua_pushvalue(L, 2);
    lua_call(L, 0, 1);
    sum = lua_tointeger(L, -1);
    lua_close(L);
  }
  want = (int64_t)ntasks * (ntasks - 1) / 2 + ntasks;
  if (sum != want) {
    fprintf(stderr, "peer-cpool: wrong sum %" PRId64 ", want %" PRId64 "\n",
            sum, want);
    return 1;
  }

  printf("name=%s workers=%d mode=%s tasks=%ld spin_us=%ld",
         p->lua ? "cpool-lua" : "cpool", p->nworkers, mode_name, ntasks,
         (long)(p->spin_ns / 1000));
  if (mode == MODE_PIPELINED) {
    printf(" ns_per_trip=%.1f", (double)wall / (double)ntasks);
  } else if (mode == MODE_SERIAL) {
    printf(" us_per_trip=%.2f", (double)wall / (double)ntasks / 1e3);
  } else {
    printf(" gap_us=%ld us_per_trip=%.2f", gap_us,
           (double)lat_sum / (double)ntasks / 1e3);
  }
  print_usage(&ru, wall);
  return 0;
}
