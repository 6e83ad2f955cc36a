/* SPDX-License-Identifier: MIT */
/*
** peer-curluv.c - the fair limit for offpath.http: a plain C client on
** libcurl's multi-socket interface driven by libuv, curl's documented
** recipe (docs/examples/multi-uv.c), with no Lua and no coroutines. It
** keeps CONC GETs of URL in flight for DURATION seconds on kept-alive
** connections (each finished easy handle is reset and added again) and
** prints one line:
**   name=http-curluv conc=64 rps=12345 req_per_s=12345 errors=0 wall_s=...
**
** curl's timer callback asks for a timeout of 0 whenever a transfer is
** added; the recipe turns it into a 1 ms timer (--kick 1ms, the default,
** named http-curluv). --kick idle calls curl from a uv_idle on the loop's
** next turn instead, as offpath.http does (named http-curluv-idle).
**
** usage: peer-curluv URL [--conc N] [--duration SECONDS] [--kick 1ms|idle]
** Thread: one (the loop).
*/
#define BENCH_NAME "peer-curluv"
#include "bench.h"

#include <string.h>
#include <curl/curl.h>
#include <uv.h>

typedef struct sock_ctx {
  uv_poll_t poll;
  curl_socket_t fd;
} sock_ctx;

static uv_loop_t *loop;
static CURLM *multi;
static uv_timer_t timer;
static uv_idle_t kick;
static int kick_idle;
static const char *url;
static uint64_t stop_ns, done, errors;

/* User plus system CPU time of the process, in microseconds. */
static uint64_t cpu_us(void) {
  struct rusage ru;

  getrusage(RUSAGE_SELF, &ru);
  return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u +
         (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}
static long conc = 64;

static void check(CURLMcode mc, const char *what) {
  if (mc != CURLM_OK) {
    fprintf(stderr, BENCH_NAME ": %s: %s\n", what, curl_multi_strerror(mc));
    exit(1);
  }
}

static size_t discard(char *p, size_t size, size_t n, void *ud) {
  (void)p;
  (void)ud;
  return size * n;
}

static void start(CURL *easy) {
  curl_easy_reset(easy);
  if (curl_easy_setopt(easy, CURLOPT_URL, url) != CURLE_OK ||
      curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, discard) != CURLE_OK ||
      curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L) != CURLE_OK) {
    fprintf(stderr, BENCH_NAME ": curl_easy_setopt failed\n");
    exit(1);
  }
  check(curl_multi_add_handle(multi, easy), "curl_multi_add_handle");
}

static void drain(void) {
  CURLMsg *msg;
  int left;

  while ((msg = curl_multi_info_read(multi, &left)) != NULL) {
    CURL *easy = msg->easy_handle;
    long status = 0;

    if (msg->msg != CURLMSG_DONE)
      continue;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    if (msg->data.result == CURLE_OK && status == 200)
      done++;
    else
      errors++;
    check(curl_multi_remove_handle(multi, easy), "curl_multi_remove_handle");
    if (now_ns() < stop_ns)
      start(easy);
    else
      curl_easy_cleanup(easy);
  }
}

static void on_poll(uv_poll_t *p, int status, int events) {
  sock_ctx *c = p->data;
  int flags = 0, running;

  if (status < 0)
    flags = CURL_CSELECT_IN | CURL_CSELECT_OUT;
  if (events & UV_READABLE)
    flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE)
    flags |= CURL_CSELECT_OUT;
  check(curl_multi_socket_action(multi, c->fd, flags, &running),
        "curl_multi_socket_action");
  drain();
}

static void on_timer(uv_timer_t *t) {
  int running;

  (void)t;
  check(curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running),
        "curl_multi_socket_action");
  drain();
}

static void on_kick(uv_idle_t *k) {
  uv_idle_stop(k);
  on_timer(&timer);
}

static void close_cb(uv_handle_t *h) {
  free(h->data);
}

static int sock_cb(CURL *easy, curl_socket_t fd, int what, void *userp,
                   void *socketp) {
  sock_ctx *c = socketp;
  int events = 0;

  (void)easy;
  (void)userp;
  if (what == CURL_POLL_REMOVE) {
    if (c != NULL) {
      uv_close((uv_handle_t *)&c->poll, close_cb);
      curl_multi_assign(multi, fd, NULL);
    }
    return 0;
  }
  if (c == NULL) {
    c = calloc(1, sizeof *c);
    if (c == NULL || uv_poll_init_socket(loop, &c->poll, fd) != 0)
      return -1;
    c->fd = fd;
    c->poll.data = c;
    curl_multi_assign(multi, fd, c);
  }
  if (what & CURL_POLL_IN)
    events |= UV_READABLE;
  if (what & CURL_POLL_OUT)
    events |= UV_WRITABLE;
  return uv_poll_start(&c->poll, events, on_poll) == 0 ? 0 : -1;
}

static int timer_fn(CURLM *m, long timeout_ms, void *userp) {
  (void)m;
  (void)userp;
  uv_timer_stop(&timer);
  uv_idle_stop(&kick);
  if (timeout_ms == 0 && kick_idle)
    uv_idle_start(&kick, on_kick);
  else if (timeout_ms >= 0)
    uv_timer_start(&timer, on_timer, timeout_ms == 0 ? 1 : (uint64_t)timeout_ms,
                   0);
  return 0;
}

int main(int argc, char **argv) {
  double duration = 2;
  uint64_t t0, wall, c0;
  struct rusage ru;
  long i;
  int a;

  for (a = 1; a < argc; a++) {
    if (strcmp(argv[a], "--conc") == 0 && a + 1 < argc)
      conc = parse_long("--conc", argv[++a], 1, 100000);
    else if (strcmp(argv[a], "--duration") == 0 && a + 1 < argc)
      duration = (double)parse_long("--duration", argv[++a], 1, 3600);
    else if (strcmp(argv[a], "--kick") == 0 && a + 1 < argc &&
             (strcmp(argv[a + 1], "1ms") == 0 ||
              strcmp(argv[a + 1], "idle") == 0))
      kick_idle = strcmp(argv[++a], "idle") == 0;
    else if (url == NULL && argv[a][0] != '-')
      url = argv[a];
    else {
      fprintf(stderr, "usage: " BENCH_NAME " URL [--conc N] [--duration "
                      "SECONDS] [--kick 1ms|idle]\n");
      return 2;
    }
  }
  if (url == NULL) {
    fprintf(stderr, "usage: " BENCH_NAME " URL [--conc N] [--duration "
                    "SECONDS] [--kick 1ms|idle]\n");
    return 2;
  }
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
    return 1;
  loop = uv_default_loop();
  uv_timer_init(loop, &timer);
  uv_idle_init(loop, &kick);
  multi = curl_multi_init();
  check(curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, sock_cb), "setopt");
  check(curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_fn), "setopt");
  check(curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, conc),
        "setopt");
  check(curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, conc), "setopt");

  /* Warm up: open the connections, then measure. */
  stop_ns = 0;
  for (i = 0; i < conc; i++)
    start(curl_easy_init());
  uv_run(loop, UV_RUN_DEFAULT);
  done = errors = 0;
  c0 = cpu_us();
  t0 = now_ns();
  stop_ns = t0 + (uint64_t)(duration * 1e9);
  for (i = 0; i < conc; i++)
    start(curl_easy_init());
  uv_run(loop, UV_RUN_DEFAULT);
  wall = now_ns() - t0;
  getrusage(RUSAGE_SELF, &ru);
  printf("name=http-curluv%s conc=%ld rps=%.0f req_per_s=%.0f errors=%llu "
         "cpu_us=%.1f",
         kick_idle ? "-idle" : "", conc, (double)done * 1e9 / (double)wall,
         (double)done * 1e9 / (double)wall, (unsigned long long)errors,
         done > 0 ? (double)(cpu_us() - c0) / (double)done : 0.0);
  print_usage(&ru, wall);
  curl_multi_cleanup(multi);
  uv_close((uv_handle_t *)&timer, NULL);
  uv_close((uv_handle_t *)&kick, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  curl_global_cleanup();
  return 0;
}
