/* SPDX-License-Identifier: MIT */
/*
** main.c - the offpath command: options, the runtime's set-up, the
** lifecycle (on_start, inputs, on_tick, signals and the grace period,
** on_stop, the summary), and the wiring of the parts below (host.h).
** Thread: main (the runtime's loop thread).
**
** Lifecycle:
**
**   load script -> open output and inputs -> on_start -+-> records flow
**                                                      |   (on_tick)
**   inputs at their end, or SIGINT/SIGTERM or a broken |
**   output (inputs closed, grace period, then          v
**   suspended handlers cancelled and unread output
**   abandoned) ------> nothing left to run ------> on_stop -> summary
**
** Signals are caught here, not by the loop, and a watchdog thread ends a
** main thread that does not answer one (see "signals and the watchdog").
*/
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <math.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "host.h"

enum {
  EXIT_OK = 0,
  EXIT_SCRIPT = 1, /* missing or broken script, on_start/on_stop failed */
  EXIT_USAGE = 2,  /* unknown option, bad value */
  EXIT_INPUT = 3,  /* an input or the output cannot be opened */
  EXIT_FAILED = 4, /* --fail-on-error, and errors were counted */
  EXIT_PIPE = 141  /* the output's reader went away (128 + SIGPIPE) */
};

static const char usage_text[] =
    "usage: offpath run SCRIPT [options]\n"
    "       offpath --help | --version\n"
    "\n"
    "Feeds records from the inputs to SCRIPT's on_event(engine, record).\n"
    "\n"
    "options:\n"
    "  --input SRC           - (stdin, the default), a file or FIFO path,\n"
    "                        tcp://HOST:PORT or udp://HOST:PORT (port 0\n"
    "                        picks a free one), or\n"
    "                        redis-stream://HOST:PORT/STREAM?group=G&...\n"
    "                        (a consumer group); repeat for more inputs\n"
    "  --format lines|json   a record is a line (default) or a line of\n"
    "                        JSON decoded to a table\n"
    "  --output FILE         where engine:emit writes (default: stdout), or\n"
    "                        redis-stream://HOST:PORT/STREAM (XADD)\n"
    "  --pool NAME=THREADS[,mem=SIZE]\n"
    "                        size of a worker pool, and the memory limit of\n"
    "                        each of its VMs (64MB, 1GB; 0: none); repeat\n"
    "                        for more pools\n"
    "  --compat trisul|momentum\n"
    "                        run a Trisul plugin or a Momentum policy script\n"
    "                        as written: the product's layer is loaded first\n"
    "                        and drives its callbacks from the records\n"
    "  --tick SECONDS        on_tick interval (default 1)\n"
    "  --max-inflight N      stop reading while N on_event handlers are\n"
    "                        suspended (default 1000)\n"
    "  --grace SECONDS       on SIGINT/SIGTERM, time for handlers in\n"
    "                        flight before they are cancelled (default 5)\n"
    "  --stats               print statistics on stderr every second\n"
    "  --json                print the summary (and --stats) as JSON on\n"
    "                        stderr\n"
    "  --quiet, -q           no summary at exit\n"
    "  --fail-on-error       exit 4 if a record failed, a line was\n"
    "                        malformed or too long, or any error was counted\n"
    "  --metrics HOST:PORT   serve Prometheus metrics on\n"
    "                        http://HOST:PORT/metrics (port 0: any free one)\n"
    "\n"
    "exit status: 0 ok, 1 script error, 2 usage error, 3 an input or the\n"
    "output cannot be opened, 4 errors (with --fail-on-error), 141 the\n"
    "output's reader went away; 128+N: signal N again, or the main thread\n"
    "did not respond to it. See docs/cli.md.\n";

/* ---- usage errors ---- */

static int usage_error(const char *fmt, ...) {
  va_list ap;

  fputs("offpath: ", stderr);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputs("\nTry 'offpath --help'.\n", stderr);
  return EXIT_USAGE;
}

/* ---- options ---- */

static int parse_double(const char *s, double *out) {
  char *end;

  errno = 0;
  *out = strtod(s, &end);
  return *s != '\0' && *end == '\0' && errno == 0 && isfinite(*out);
}

static int parse_int(const char *s, long lo, long hi, int *out) {
  char *end;
  long v;

  errno = 0;
  v = strtol(s, &end, 10);
  if (*s == '\0' || *end != '\0' || errno != 0 || v < lo || v > hi)
    return 0;
  *out = (int)v;
  return 1;
}

/* "64MB", "512KB", "1G", "1048576" (bytes) -> *out. Returns 1, or 0 if s
** is not such a size. */
static int parse_size(const char *s, size_t *out) {
  static const char units[] = "KMG";
  const char *u;
  unsigned shift = 0;
  unsigned long long v;
  char *end;

  errno = 0;
  if (*s < '0' || *s > '9')
    return 0;
  v = strtoull(s, &end, 10);
  if (errno != 0)
    return 0;
  if (*end != '\0') {
    if ((u = strchr(units, end[0] & ~0x20)) == NULL || end[0] == '\0')
      return 0;
    shift = 10 * (unsigned)(u - units + 1);
    end++;
    if ((*end & ~0x20) == 'B')
      end++;
    if (*end != '\0')
      return 0;
  }
  if (v > (SIZE_MAX >> shift))
    return 0;
  *out = (size_t)v << shift;
  return 1;
}

/* Parse "offpath run ..." into h->o. Returns -1 to go on, or an exit
** status (after --help, --version or an error). */
static int parse_args(host *h, int argc, char **argv) {
  host_opts *o = &h->o;
  const char *arg, *val, *eq;
  char name[64];
  size_t n;
  int i, nopt = 0;

  o->tick = 1.0;
  o->max_inflight = 1000;
  o->grace = 5.0;
  if (argc < 2)
    return usage_error("missing command");
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    fputs(usage_text, stdout);
    return EXIT_OK;
  }
  if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
    printf("offpath %s (liboffpath %s, %s, libuv %s)\n", OP_VERSION_STRING,
           op_version(), LUA_RELEASE, uv_version_string());
    return EXIT_OK;
  }
  if (strcmp(argv[1], "run") != 0)
    return usage_error("unknown command '%s'", argv[1]);
  for (i = 2; i < argc; i++) {
    arg = argv[i];
    if (arg[0] != '-' || arg[1] == '\0' || nopt) {
      if (o->script != NULL)
        return usage_error("unexpected argument '%s'", arg);
      o->script = arg;
      continue;
    }
    if (strcmp(arg, "--") == 0) {
      nopt = 1;
      continue;
    }
    if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
      fputs(usage_text, stdout);
      return EXIT_OK;
    }
    if (strcmp(arg, "--stats") == 0) {
      o->stats = 1;
      continue;
    }
    if (strcmp(arg, "--json") == 0) {
      o->summary_json = 1;
      continue;
    }
    if (strcmp(arg, "--quiet") == 0 || strcmp(arg, "-q") == 0) {
      o->quiet = 1;
      continue;
    }
    if (strcmp(arg, "--fail-on-error") == 0) {
      o->fail_on_error = 1;
      continue;
    }
    /* Options with a value: "--opt value" or "--opt=value". */
    eq = strchr(arg, '=');
    n = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
    if (n >= sizeof name)
      return usage_error("unknown option '%s'", arg);
    memcpy(name, arg, n);
    name[n] = '\0';
    if (strcmp(name, "--input") && strcmp(name, "-i") &&
        strcmp(name, "--format") && strcmp(name, "--output") &&
        strcmp(name, "-o") && strcmp(name, "--pool") &&
        strcmp(name, "--tick") && strcmp(name, "--max-inflight") &&
        strcmp(name, "--grace") && strcmp(name, "--compat") &&
        strcmp(name, "--metrics"))
      return usage_error("unknown option '%s'", arg);
    if (eq != NULL) {
      val = eq + 1;
    } else {
      if (i + 1 >= argc)
        return usage_error("option '%s' needs a value", arg);
      val = argv[++i];
    }
    if (!strcmp(name, "--input") || !strcmp(name, "-i")) {
      if (o->ninputs >= HOST_MAX_INPUTS)
        return usage_error("too many inputs (at most %d)", HOST_MAX_INPUTS);
      o->inputs[o->ninputs++] = val;
    } else if (!strcmp(name, "--format")) {
      if (!strcmp(val, "json"))
        o->json = 1;
      else if (!strcmp(val, "lines"))
        o->json = 0;
      else
        return usage_error("--format must be 'lines' or 'json', not '%s'", val);
    } else if (!strcmp(name, "--output") || !strcmp(name, "-o")) {
      o->output = val;
    } else if (!strcmp(name, "--pool")) {
      const char *e = strchr(val, '=');
      pool_opt *p;
      if (e == NULL || e == val || (size_t)(e - val) >= OP_POOL_NAME_MAX)
        return usage_error("--pool expects NAME=THREADS, not '%s'", val);
      if (o->npools >= OP_MAX_POOLS)
        return usage_error("too many --pool options");
      p = &o->pools[o->npools];
      const char *comma = strchr(e + 1, ',');
      char num[16];
      p->mem = (size_t)-1;
      if (comma != NULL) {
        size_t bytes;
        if (strncmp(comma, ",mem=", 5) != 0 || !parse_size(comma + 5, &bytes) ||
            (bytes != 0 && bytes < ((size_t)1 << 20)))
          return usage_error("--pool %s: expected NAME=THREADS,mem=SIZE "
                             "with a SIZE such as 64MB (at least 1MB, or "
                             "0 for none)",
                             val);
        p->mem = bytes;
      }
      snprintf(
          num, sizeof num, "%.*s",
          (int)(comma != NULL ? comma - (e + 1) : (ptrdiff_t)strlen(e + 1)),
          e + 1);
      if (!parse_int(num, 1, 1024, &p->threads))
        return usage_error("--pool %s: THREADS must be 1..1024", val);
      p->name = strndup(val, (size_t)(e - val));
      if (p->name == NULL)
        return usage_error("not enough memory");
      o->npools++;
    } else if (!strcmp(name, "--tick")) {
      if (!parse_double(val, &o->tick) || o->tick < 0.001)
        return usage_error("--tick must be a number of seconds >= 0.001, "
                           "not '%s'",
                           val);
    } else if (!strcmp(name, "--max-inflight")) {
      if (!parse_int(val, 1, 1000000000, &o->max_inflight))
        return usage_error("--max-inflight must be an integer >= 1, not "
                           "'%s'",
                           val);
    } else if (!strcmp(name, "--compat")) {
      if (strcmp(val, "trisul") != 0 && strcmp(val, "momentum") != 0)
        return usage_error("--compat must be 'trisul' or 'momentum', not "
                           "'%s'",
                           val);
      o->compat = val;
    } else if (!strcmp(name, "--metrics")) {
      o->metrics = val;
    } else if (!strcmp(name, "--grace")) {
      if (!parse_double(val, &o->grace) || o->grace < 0)
        return usage_error("--grace must be a number of seconds >= 0, not "
                           "'%s'",
                           val);
    }
  }
  if (o->script == NULL)
    return usage_error("run: missing SCRIPT");
  if (o->ninputs == 0)
    o->inputs[o->ninputs++] = "-";
  return -1;
}

static void free_opts(host_opts *o) {
  int i;

  for (i = 0; i < o->npools; i++)
    free(o->pools[i].name);
}

/* ---- timers and signals ---- */

static void second_cb(uv_timer_t *t) {
  host *h = t->data;

  host_report_flush(h);
  if (h->o.stats)
    stats_line(h);
}

static void tick_cb(uv_timer_t *t) {
  host *h = t->data;
  int rc;

  if (!h->started || h->start_failed)
    return;
  if (h->tick_running) {
    if (h->tick_running == 1)
      host_report(h,
                  "warning: on_tick still running after its %g s "
                  "interval; ticks skipped until it ends",
                  h->o.tick);
    h->tick_running = 2;
    return;
  }
  h->tick_running = 1;
  h->ticks++;
  rc = engine_call_lifecycle(h, "on_tick", REC_TICK);
  if (rc <= 0) {
    h->tick_running = 0;
    h->ticks--;
    if (rc == 0)
      uv_timer_stop(t); /* the script has no on_tick */
  }
}

static void grace_cb(uv_timer_t *t) {
  host *h = t->data;
  unsigned handlers = h->inflight;
  int n, first = !h->cancelled_all;

  h->cancelled_all = 1;
  n = engine_cancel_all(h);
  if (first && (handlers > 0 || n > 0))
    host_report(h,
                "grace period over: cancelling %u handlers in flight "
                "(%d tasks and waits)",
                handlers, n);
  engine_output_abandon(h);
}

/* Stop as on a first SIGINT/SIGTERM: close the inputs, give the handlers
** in flight the grace period, then cancel them. Also h->stop, for
** host_stop_soon(). */
static void host_stop(host *h) {
  if (h->stopping)
    return;
  input_close_all(h);
  uv_timer_start(&h->grace_timer, grace_cb,
                 (uint64_t)(h->o.grace * 1000.0 + 0.5), 250);
}

/* ---- signals and the watchdog ---- */

/*
** SIGINT and SIGTERM are caught by sig_handler(), not uv_signal, so that
** they are heard whatever the loop thread is doing:
**
**   1st, 2nd  counted; the loop thread hears of them through sig_async
**             (uv_async_send is async-signal-safe): the first stops the
**             host (host_stop), the second cancels at once. The watchdog
**             thread is woken (sem_post).
**   3rd       exit at once from the handler, status 128 + the signal.
**
** The watchdog sleeps until the first signal, then checks every 100 ms
** that the loop thread still runs its loop: from the first signal on,
** beat_timer fires every 100 ms and counts beat_turn. A count that has
** not moved for --grace seconds (at least one) after the signal means
** frozen: a handler or block section looping where no hook reaches, a
** finalizer that loops, a pattern match in C. The watchdog then says what
** the loop thread runs (op_runtime_where) and exits, status 128 + the
** signal. A loop waiting in poll still runs its timer: handlers waiting on
** workers or sockets get the grace period and the cancel. Once the
** summary is out (watch_forget_rt) the watchdog only waits for the end.
*/

static host *sig_host;
static atomic_int sig_count;                   /* signals caught */
static volatile sig_atomic_t sig_nums[2];      /* the first two */
static atomic_int sig_async_ok, sig_async_use; /* sig_async may be sent */
static sem_t watch_sem;
static atomic_uint beat_turn;
static atomic_int watch_quit;
static uv_mutex_t watch_mu;  /* guards watch_rt against op_runtime_free */
static op_runtime *watch_rt; /* what frozen() asks where it runs */
static int watch_on_;        /* not yet past the summary */
static uv_thread_t watch_thread;
static int watch_started;

/* Write msg on stderr without ever blocking, for the messages of an exit
** that must happen even when nobody reads stderr: a pipe or terminal
** through a non-blocking description of our own, a socket with
** MSG_DONTWAIT; a regular file does not block. What does not fit is
** lost. Async-signal-safe. */
static void say_now(const char *msg, size_t n) {
  struct stat st;
  int fd;

  if (fstat(2, &st) != 0)
    return;
  if (S_ISSOCK(st.st_mode)) {
    if (send(2, msg, n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
      /* lost */
    }
    return;
  }
  if (S_ISREG(st.st_mode)) {
    if (write(2, msg, n) < 0) {
      /* lost */
    }
    return;
  }
  fd = open("/proc/self/fd/2", O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0)
    return;
  if (write(fd, msg, n) < 0) {
    /* lost */
  }
  close(fd);
}

static const char *sig_name(int signum) {
  return signum == SIGINT ? "SIGINT" : "SIGTERM";
}

/* Thread: any (signal handler). Only async-signal-safe calls. */
static void sig_handler(int signum) {
  int saved = errno, n = atomic_fetch_add(&sig_count, 1) + 1;
  const char *m = signum == SIGINT ? "offpath: SIGINT again: exiting now\n"
                                   : "offpath: SIGTERM again: exiting now\n";

  if (n >= 3) {
    say_now(m, strlen(m));
    _exit(128 + signum);
  }
  sig_nums[n - 1] = signum;
  atomic_fetch_add(&sig_async_use, 1);
  if (atomic_load(&sig_async_ok))
    uv_async_send(&sig_host->sig_async);
  atomic_fetch_sub(&sig_async_use, 1);
  sem_post(&watch_sem);
  errno = saved;
}

/* The signal number n (1 or 2) of the run, on the loop thread. */
static void on_signal(host *h, int signum, int n) {
  const char *name = sig_name(signum);

  if (n == 2) {
    unsigned handlers = h->inflight;
    int ntasks;

    h->cancelled_all = 1;
    ntasks = engine_cancel_all(h);
    host_report(h,
                "%s again: cancelling %u handlers in flight (%d tasks and "
                "waits)",
                name, handlers, ntasks);
    uv_timer_start(&h->grace_timer, grace_cb, 250, 250);
    return;
  }
  h->stop_signal = signum;
  host_report(h,
              "%s: inputs closed; waiting up to %g s for %u handlers "
              "in flight",
              name, h->o.grace, h->inflight);
  if (h->stopping) {
    /* Already stopping (the output's reader went away, on_start failed):
    ** the grace period starts now if it had not. */
    if (!uv_is_active((uv_handle_t *)&h->grace_timer))
      uv_timer_start(&h->grace_timer, grace_cb,
                     (uint64_t)(h->o.grace * 1000.0 + 0.5), 250);
    return;
  }
  host_stop(h);
}

static void beat_cb(uv_timer_t *t) {
  (void)t;
  atomic_fetch_add_explicit(&beat_turn, 1, memory_order_relaxed);
}

static void sig_async_cb(uv_async_t *a) {
  host *h = a->data;
  int n = atomic_load(&sig_count), signum;

  if (!uv_is_active((uv_handle_t *)&h->beat_timer))
    uv_timer_start(&h->beat_timer, beat_cb, 100, 100);

  while (h->sigs_seen < n && h->sigs_seen < 2) {
    signum = sig_nums[h->sigs_seen];
    if (signum == 0)
      break; /* its handler is still running: it sends again */
    h->sigs_seen++;
    on_signal(h, signum, h->sigs_seen);
  }
}

/* "FILE:LINE" of the innermost Lua function of L with a line, or "?".
** Reads only ("Sl" pushes and allocates nothing). */
static const char *where_of(lua_State *L, char *buf, size_t len) {
  lua_Debug ar;
  int level;

  for (level = 0; L != NULL && level < 16; level++) {
    if (!lua_getstack(L, level, &ar))
      break;
    if (lua_getinfo(L, "Sl", &ar) && ar.currentline > 0) {
      snprintf(buf, len, "%s:%d", ar.short_src, ar.currentline);
      return buf;
    }
  }
  snprintf(buf, len, "?");
  return buf;
}

static int watch_wait(unsigned ms);

static int frozen_sig;       /* the signal the host did not answer */
static double frozen_secs;   /* for how long */
static atomic_int frozen_by; /* 1: the hook is saying it */

/* Say that the main thread is frozen at where, and exit. */
static void frozen_exit(const char *where) {
  char msg[512];
  int n;

  n = snprintf(msg, sizeof msg,
               "offpath: %s: the main thread did not come back to its loop "
               "for %.1f s (running %s): exiting, status %d\n",
               sig_name(frozen_sig), frozen_secs, where, 128 + frozen_sig);
  if (n < 0)
    n = 0;
  if ((size_t)n >= sizeof msg)
    n = (int)sizeof msg - 1;
  say_now(msg, (size_t)n);
  _exit(128 + frozen_sig);
}

/* Count hook the watchdog sets on the frozen state: on the loop thread, at
** the next instruction of a Lua loop, where the line is exact. */
static void frozen_hook(lua_State *L, lua_Debug *ar) {
  char where[256];

  (void)ar;
  if (atomic_exchange(&frozen_by, 1) != 0)
    return;
  frozen_exit(where_of(L, where, sizeof where));
}

/* The loop thread is frozen. If it runs Lua code, a hook on its state
** reports from there; if that does not fire within 200 ms (C code: a
** pattern match, a finalizer, which runs with hooks off), say where its
** stack was seen from here. Thread: watchdog. */
static void frozen(host *h, double secs) {
  char where[256];
  lua_State *L = NULL;

  (void)h;
  frozen_sig = sig_nums[0] ? sig_nums[0] : SIGTERM;
  frozen_secs = secs;
  uv_mutex_lock(&watch_mu);
  if (watch_rt != NULL)
    L = op_runtime_running(watch_rt);
  uv_mutex_unlock(&watch_mu);
  if (L != NULL) {
    lua_sethook(L, frozen_hook, LUA_MASKCOUNT, 1);
    watch_wait(200);
  }
  if (atomic_exchange(&frozen_by, 1) != 0) {
    for (;;)
      pause(); /* the hook is exiting */
  }
  frozen_exit(where_of(L, where, sizeof where));
}

/* Whether the run is not yet past its summary. Thread: watchdog. */
static int watch_on(void) {
  int on;

  uv_mutex_lock(&watch_mu);
  on = watch_on_;
  uv_mutex_unlock(&watch_mu);
  return on;
}

/* Wait for sem or until ms have passed. Returns 1 if sem was posted. */
static int watch_wait(unsigned ms) {
  struct timespec ts;

  if (ms == 0) {
    while (sem_wait(&watch_sem) != 0)
      if (errno != EINTR)
        return 0;
    return 1;
  }
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_nsec += (long)ms * 1000000L;
  ts.tv_sec += ts.tv_nsec / 1000000000L;
  ts.tv_nsec %= 1000000000L;
  while (sem_timedwait(&watch_sem, &ts) != 0)
    if (errno != EINTR)
      return 0;
  return 1;
}

/* The watchdog. Thread: its own. */
static void watch_main(void *arg) {
  host *h = arg;
  double limit = h->o.grace > 1.0 ? h->o.grace : 1.0;
  uint64_t since, now;
  unsigned turn, last;

  watch_wait(0); /* the first signal, or the end */
  if (atomic_load(&watch_quit))
    return;
  last = atomic_load_explicit(&beat_turn, memory_order_relaxed);
  since = uv_hrtime();
  for (;;) {
    watch_wait(100);
    if (atomic_load(&watch_quit))
      return;
    now = uv_hrtime();
    turn = atomic_load_explicit(&beat_turn, memory_order_relaxed);
    if (turn != last || !watch_on()) {
      last = turn;
      since = now;
    } else if ((double)(now - since) / 1e9 >= limit) {
      frozen(h, (double)(now - since) / 1e9);
    }
  }
}

/* Catch SIGINT and SIGTERM and start the watchdog: first thing, so that
** a signal during start-up (or a main chunk that loops) is heard too. */
static void signals_install(host *h) {
  struct sigaction sa;

  sig_host = h;
  if (sem_init(&watch_sem, 0, 0) != 0 || uv_mutex_init(&watch_mu) != 0) {
    fprintf(stderr, "offpath: cannot start the watchdog\n");
    abort();
  }
  watch_on_ = 1;
  if (uv_thread_create(&watch_thread, watch_main, h) == 0)
    watch_started = 1;
  else
    fprintf(stderr, "offpath: warning: cannot start the watchdog thread: a "
                    "frozen main thread will need SIGKILL\n");
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = sig_handler;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
}

/* The loop exists: signals reach it from now on (those caught before are
** handled on its first turn). */
static void signals_start(host *h) {
  uv_async_init(h->loop, &h->sig_async, sig_async_cb);
  h->sig_async.data = h;
  uv_unref((uv_handle_t *)&h->sig_async);
  uv_timer_init(h->loop, &h->beat_timer);
  uv_unref((uv_handle_t *)&h->beat_timer);
  uv_mutex_lock(&watch_mu);
  watch_rt = h->rt;
  uv_mutex_unlock(&watch_mu);
  atomic_store(&sig_async_ok, 1);
  if (atomic_load(&sig_count) > 0)
    uv_async_send(&h->sig_async);
}

/* Stop sending sig_async (signals are still caught, and counted: a third
** still exits) and close the loop's handles of signals. */
static void signals_close(host *h) {
  atomic_store(&sig_async_ok, 0);
  while (atomic_load(&sig_async_use) > 0)
    ; /* a handler on another thread is inside uv_async_send */
  uv_close((uv_handle_t *)&h->sig_async, NULL);
  uv_close((uv_handle_t *)&h->beat_timer, NULL);
}

/* Past the summary (before op_runtime_free): the watchdog no longer looks
** at the runtime, and no longer ends the process. */
static void watch_forget_rt(void) {
  if (!watch_started)
    return;
  uv_mutex_lock(&watch_mu);
  watch_rt = NULL;
  watch_on_ = 0;
  uv_mutex_unlock(&watch_mu);
}

/* End the watchdog and take the default actions back. */
static void signals_end(void) {
  struct sigaction sa;

  if (watch_started) {
    atomic_store(&watch_quit, 1);
    sem_post(&watch_sem);
    uv_thread_join(&watch_thread);
    watch_started = 0;
  }
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = SIG_DFL;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
}

static void init_handles(host *h) {
  uv_timer_init(h->loop, &h->tick_timer);
  uv_timer_init(h->loop, &h->second_timer);
  uv_timer_init(h->loop, &h->grace_timer);
  uv_idle_init(h->loop, &h->pump_idle);
  h->tick_timer.data = h->second_timer.data = h->grace_timer.data = h;
  h->pump_idle.data = h;
  /* None of these keeps the loop alive: inputs, handlers and tasks do. */
  uv_unref((uv_handle_t *)&h->tick_timer);
  uv_unref((uv_handle_t *)&h->second_timer);
  uv_unref((uv_handle_t *)&h->grace_timer);
  signals_start(h);
  h->handles_open = 1;
}

static void close_handles(host *h) {
  if (!h->handles_open)
    return;
  uv_close((uv_handle_t *)&h->tick_timer, NULL);
  uv_close((uv_handle_t *)&h->second_timer, NULL);
  uv_close((uv_handle_t *)&h->grace_timer, NULL);
  uv_close((uv_handle_t *)&h->pump_idle, NULL);
  signals_close(h);
  h->handles_open = 0;
}

/* ---- set-up ---- */

/* Make the offpath module a global of the main VM, as scripts expect. */
static void set_global(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(L, -1, "offpath");
  lua_setglobal(L, "offpath");
  lua_pop(L, 1);
}

/* offpath.configure{pools={NAME={threads=N}}} from the script's main chunk
** may have resized a pool: --pool wins, so apply it again.  */
static int reapply_pools_p(lua_State *L) {
  host *h = lua_touserdata(L, 1);
  int i;

  if (lua_getglobal(L, "offpath") != LUA_TTABLE)
    return 0;
  lua_getfield(L, -1, "configure");
  lua_createtable(L, 0, 1);
  lua_createtable(L, 0, h->o.npools);
  for (i = 0; i < h->o.npools; i++) {
    lua_createtable(L, 0, 1);
    lua_pushinteger(L, h->o.pools[i].threads);
    lua_setfield(L, -2, "threads");
    if (h->o.pools[i].mem != (size_t)-1) {
      lua_pushinteger(L, (lua_Integer)h->o.pools[i].mem);
      lua_setfield(L, -2, "memory_limit");
    }
    lua_setfield(L, -2, h->o.pools[i].name);
  }
  lua_setfield(L, -2, "pools");
  lua_call(L, 1, 0);
  return 0;
}

static void reapply_pools(host *h) {
  lua_State *L = h->L;

  if (h->o.npools == 0)
    return;
  host_door(L);
  lua_pushcfunction(L, reapply_pools_p);
  lua_pushlightuserdata(L, h);
  if (host_pcall(L, 1, 0) != LUA_OK) {
    host_report(h, "warning: --pool not applied: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
}

/* --compat NAME: require "offpath.NAME" (before the script, which may use
** its globals at load), or call its compat() (after it: installs the
** handlers the script does not define).  [-0, +0, e] */
static int compat_p(lua_State *L) {
  int after = lua_toboolean(L, 2);

  lua_getglobal(L, "require");
  lua_pushfstring(L, "offpath.%s", lua_tostring(L, 1));
  lua_call(L, 1, 1);
  if (after) {
    lua_getfield(L, -1, "compat");
    lua_call(L, 0, 0);
  }
  return 0;
}

static int compat(host *h, int after) {
  lua_State *L = h->L;

  if (h->o.compat == NULL)
    return 0;
  host_door(L);
  lua_pushcfunction(L, compat_p);
  lua_pushstring(L, h->o.compat);
  lua_pushboolean(L, after);
  if (host_pcall(L, 2, 0) != LUA_OK) {
    fprintf(stderr, "offpath: --compat %s: %s\n", h->o.compat,
            lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}

/* Run the loop until nothing is left; restart reading if it ran dry while
** inputs were still open (handlers suspended on nothing). */
static void run_records(host *h) {
  uint64_t last_in = (uint64_t)-1;

  for (;;) {
    op_runtime_run(h->rt);
    if (h->nopen == 0 || h->stopping)
      break;
    if (h->in != last_in) {
      /* Records moved since the last look: try reading again. */
      last_in = h->in;
      host_pump_soon(h);
      continue;
    }
    host_report(h,
                "stalled: %u handlers suspended with nothing pending; "
                "stopping",
                h->inflight);
    input_close_all(h);
    engine_cancel_all(h);
  }
}

/* Set the memory limit of the pool named name in cfg (a pool that
** op_config_pool added or overrode). */
static void set_pool_memory(op_config *cfg, const char *name, size_t bytes) {
  int i;

  for (i = 0; i < cfg->npools; i++)
    if (strcmp(cfg->pools[i].name, name) == 0)
      cfg->pools[i].memory_limit = bytes != 0 ? bytes : OP_MEMORY_UNLIMITED;
}

static int run(host *h) {
  op_config cfg;
  char err[512];
  int i, rc;

  op_config_init(&cfg);
  for (i = 0; i < h->o.npools; i++) {
    rc = op_config_pool(&cfg, h->o.pools[i].name, h->o.pools[i].threads, 0);
    if (rc != 0)
      return usage_error("--pool %s: %s", h->o.pools[i].name, op_strerror(rc));
    if (h->o.pools[i].mem != (size_t)-1)
      set_pool_memory(&cfg, h->o.pools[i].name, h->o.pools[i].mem);
  }
  if (access(h->o.script, R_OK) != 0) {
    fprintf(stderr, "offpath: cannot open script %s: %s\n", h->o.script,
            strerror(errno));
    return EXIT_SCRIPT;
  }
  if ((rc = op_runtime_new(&cfg, &h->rt)) != 0) {
    fprintf(stderr, "offpath: cannot start the runtime: %s\n", op_strerror(rc));
    return EXIT_SCRIPT;
  }
  h->loop = op_runtime_uv_loop(h->rt);
  h->L = op_runtime_lua(h->rt);
  h->stop = host_stop;
  input_setup(h);
  engine_setup(h);
  stats_setup(h);
  set_global(h->L);
  init_handles(h);
  h->stats_tty = isatty(2);
  h->t_start = uv_hrtime();

  rc = EXIT_OK;
  if (compat(h, 0) != 0) {
    rc = EXIT_SCRIPT;
    goto done;
  }
  if (op_load_script(h->rt, h->o.script) != 0) {
    fprintf(stderr, "offpath: script error: %s\n", op_errmsg(h->rt));
    rc = EXIT_SCRIPT;
    goto done;
  }
  if (compat(h, 1) != 0) {
    rc = EXIT_SCRIPT;
    goto done;
  }
  reapply_pools(h);
  op_runtime_start(h->rt);
  if (engine_output_open(h, err, sizeof err) != 0) {
    fprintf(stderr, "offpath: %s\n", err);
    rc = EXIT_INPUT;
    goto done;
  }
  for (i = 0; i < h->o.ninputs; i++) {
    if (input_open(h, h->o.inputs[i], err, sizeof err) != 0) {
      fprintf(stderr, "offpath: cannot open input %s: %s\n", h->o.inputs[i],
              err);
      input_close_all(h);
      rc = EXIT_INPUT;
      goto done;
    }
  }

  if (metrics_start(h, err, sizeof err) != 0) {
    fprintf(stderr, "offpath: cannot serve metrics on %s: %s\n", h->o.metrics,
            err);
    input_close_all(h);
    rc = EXIT_INPUT;
    goto done;
  }
  uv_timer_start(&h->second_timer, second_cb, 1000, 1000);
  if (engine_call_lifecycle(h, "on_start", REC_START) == 0)
    engine_started(h);
  uv_timer_start(&h->tick_timer, tick_cb, (uint64_t)(h->o.tick * 1000.0 + 0.5),
                 (uint64_t)(h->o.tick * 1000.0 + 0.5));
  run_records(h);
  uv_timer_stop(&h->tick_timer);
  uv_timer_stop(&h->grace_timer);
  if (!h->start_failed) {
    engine_call_lifecycle(h, "on_stop", REC_STOP);
    op_runtime_run(h->rt);
  }
  uv_timer_stop(&h->second_timer);
  /* Task failures nobody observed are reported when their objects are
  ** collected: collect now, so the summary counts them. */
  lua_gc(h->L, LUA_GCCOLLECT, 0);
  lua_gc(h->L, LUA_GCCOLLECT, 0);
  host_report_flush(h);
  stats_summary(h);
  if ((h->start_failed && !h->start_cancelled) || h->stop_failed)
    rc = EXIT_SCRIPT;
  else if (h->out_broken)
    rc = EXIT_PIPE;
  else if (h->o.fail_on_error &&
           (stats_errors(h) > 0 || h->malformed > 0 || h->oversize > 0))
    rc = EXIT_FAILED;

done:
  close_handles(h);
  metrics_stop(h);
  input_close_all(h);
  op_runtime_run(h->rt); /* close callbacks, last writes */
  engine_output_stop(h);
  op_runtime_run(h->rt);
  engine_output_close(h);
  input_free_all(h);
  watch_forget_rt();
  i = op_runtime_free(h->rt);
  if (i != 0 && i != OP_ESCRIPT)
    fprintf(stderr, "offpath: shutdown: %s\n", op_strerror(i));
  free(h->recs);
  if (h->stdin_flags != -1)
    fcntl(0, F_SETFL, h->stdin_flags);
  return rc;
}

/* glibc hands the top of a heap back to the system as soon as 128 KB of it
** is free, and asks for it again on the next allocations. The collector
** frees a cycle's garbage at once, so a busy main VM could sit on that edge
** and pay a brk and fresh page faults every hundred tasks or so
** (docs/benchmarks.md, "Giving memory back"). Keep up to 64 MB free at the
** top; idle workers still give theirs back (malloc_trim in worker.c).
** Setting a threshold stops glibc from moving its mmap threshold, so that
** one is set where glibc's own adjustment stops: 32 MB. */
static void malloc_tune(void) {
#if defined(M_TRIM_THRESHOLD) && defined(M_MMAP_THRESHOLD)
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
#endif
}

/* Heap reserved per handler the engine may hold in flight, and at most.
** A suspended handler holds about 7.5 KB of the main VM (its coroutine,
** record, task and the collector's slack: 7.5 MB at 1000 in flight). */
#define RESERVE_PER_HANDLER (8 << 10)
#define RESERVE_MAX         (24 << 20) /* below the mmap threshold above */
#define HUGE_PAGE           (2 << 20)

/* Fault in, at start, the heap the main VM grows into as handlers pile up.
** Else the first touch of each new page is a page fault inside whichever
** handler's allocation reaches it: 1-2 us on bare metal, 12-16 us on some
** virtual machines, hundreds of them while the engine fills up to
** --max-inflight, enough to set the loop thread's 99th percentile
** (docs/benchmarks.md, "Fast path: page faults and idle CPUs"). The block
** is asked for huge pages (it then costs a few faults and fewer TLB
** misses) and populated in one system call where the kernel has one, then
** freed: it stays at the top of the heap (malloc_tune keeps 64 MB there),
** faulted in, for later allocations. */
static void heap_reserve(size_t bytes) {
  uintptr_t a, b;
  size_t i;
  char *p;

#if !defined(M_TRIM_THRESHOLD) || !defined(M_MMAP_THRESHOLD)
  bytes = 0; /* a malloc that may unmap the block at free: no use */
#endif
  if (bytes == 0 || (p = malloc(bytes)) == NULL)
    return;
#ifdef MADV_HUGEPAGE
  a = ((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
  b = ((uintptr_t)p + bytes) & ~(uintptr_t)(HUGE_PAGE - 1);
  if (b > a)
    (void)madvise((void *)a, b - a, MADV_HUGEPAGE); /* a hint */
#endif
  a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
  b = ((uintptr_t)p + bytes) & ~(uintptr_t)4095;
#ifdef MADV_POPULATE_WRITE
  if (b <= a || madvise((void *)a, b - a, MADV_POPULATE_WRITE) != 0)
#endif
    for (i = 0; i < bytes; i += 4096)
      ((volatile char *)p)[i] = 0;
  free(p);
}

int main(int argc, char **argv) {
  static host h;
  int rc;

  malloc_tune();
  /* Closed 0, 1 or 2 (a supervisor's 0<&- or 1>&-) first thing: else the
  ** script or the loop takes the number and records are read from it. */
  op__std_fds_open();
  h.stdin_flags = -1;
  h.out_fd = -1;
  h.out_poll_fd = -1;
  h.free_rec = UINT32_MAX;
  rc = parse_args(&h, argc, argv);
  if (rc < 0) {
    heap_reserve(h.o.max_inflight < RESERVE_MAX / RESERVE_PER_HANDLER
                     ? (size_t)h.o.max_inflight * RESERVE_PER_HANDLER
                     : RESERVE_MAX);
    signal(SIGPIPE, SIG_IGN); /* a closed output is an error, not death */
    signals_install(&h);
    rc = run(&h);
    watch_forget_rt();
    signals_end();
  }
  free_opts(&h.o);
  return rc;
}
