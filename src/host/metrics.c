/* SPDX-License-Identifier: MIT */
/*
** metrics.c - --metrics HOST:PORT: the host's statistics in the Prometheus
** text exposition format, served over HTTP by libmicrohttpd.
** Thread: loop, except serve() and take_snapshot() (the server's thread).
**
** DESIGN
**
** libmicrohttpd runs in a thread of its own, so a slow or stuck client, or
** many of them, never touch the loop thread. That thread never reads the
** host's counters either: it asks the loop thread for a snapshot and
** serves the text the loop thread published.
**
**   server thread                         loop thread
**   serve():                              render_cb() (uv_async):
**     lock; want = ++asked; unlock          text = render(h)  (no lock)
**     uv_async_send ----------------------> lock; swap text in;
**     lock; wait until done >= want          done = asked at render start;
**       or WAIT_MS passed                    broadcast; unlock
**     copy text; unlock
**
** uv_async_send coalesces: many scrapes at once cost one render. The loop
** thread holds the lock only to swap a pointer; it never waits for the
** server. A loop thread busy in a long handler answers late: after
** WAIT_MS the scrape gets the last text published (the counters of the
** previous scrape), so a scrape never hangs on the loop.
**
** Lock: mu guards text, len, asked, done and closing. No Lua, no uv call
** but uv_async_send, under it.
**
** Shutdown (metrics_stop): closing is set and waiters woken, then
** MHD_stop_daemon joins the server's thread, so no uv_async_send can
** follow; then the async handle is closed and the state freed in its
** close callback.
*/
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdarg.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <microhttpd.h>

#include "internal.h"
#include "host.h"

#define WAIT_MS     1000 /* longest a scrape waits for a fresh snapshot */
#define MAX_CLIENTS 32

struct metrics {
  host *h;
  struct MHD_Daemon *d;
  uv_async_t async;
  uv_mutex_t mu;
  uv_cond_t cv;
  char *text; /* the last snapshot, malloc'ed; NULL before the first */
  size_t len;
  uint64_t asked; /* snapshots asked for */
  uint64_t done;  /* asks the published snapshot answers */
  int closing;
};

/* ---- the text ---- */

/* A growable string; on out of memory it stops growing and is marked. */
typedef struct mbuf {
  char *p;
  size_t len, cap;
  int oom;
} mbuf;

static void mb_printf(mbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void mb_printf(mbuf *b, const char *fmt, ...) {
  va_list ap;
  size_t need, cap;
  char *p;
  int n;

  if (b->oom)
    return;
  va_start(ap, fmt);
  n = vsnprintf(b->p != NULL ? b->p + b->len : NULL,
                b->p != NULL ? b->cap - b->len : 0, fmt, ap);
  va_end(ap);
  if (n < 0) {
    b->oom = 1;
    return;
  }
  need = b->len + (size_t)n + 1;
  if (b->p == NULL || need > b->cap) {
    for (cap = b->cap ? b->cap : 4096; cap < need; cap *= 2)
      ;
    if ((p = realloc(b->p, cap)) == NULL) {
      b->oom = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
  }
  b->len += (size_t)n;
}

/* A label value with \, " and newlines escaped, as the format wants. */
static void mb_label(mbuf *b, const char *s) {
  for (; *s != '\0'; s++) {
    if (*s == '\\')
      mb_printf(b, "\\\\");
    else if (*s == '"')
      mb_printf(b, "\\\"");
    else if (*s == '\n')
      mb_printf(b, "\\n");
    else
      mb_printf(b, "%c", *s);
  }
}

static void head(mbuf *b, const char *name, const char *type,
                 const char *help) {
  mb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void one(mbuf *b, const char *name, const char *type, const char *help,
                uint64_t v) {
  head(b, name, type, help);
  mb_printf(b, "%s %" PRIu64 "\n", name, v);
}

/* Upper bounds of the histogram buckets, in seconds. */
static const double le_bounds[] = { 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5,
                                    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                                    0.01, 0.025,  0.05, 0.1,  0.25,   0.5,
                                    1,    2.5,    5,    10,   30,     60 };

/* The samples of one histogram, with the label pair `label="value"` when
** label is not NULL. Buckets are cumulative; a value lands in the first
** bound its log-linear bucket (12.5 % wide) lies wholly below. */
static void hist(mbuf *b, const char *name, const char *label,
                 const char *value, const op_hist *hg) {
  size_t i;

  for (i = 0; i < sizeof le_bounds / sizeof le_bounds[0]; i++) {
    mb_printf(b, "%s_bucket{", name);
    if (label != NULL) {
      mb_printf(b, "%s=\"", label);
      mb_label(b, value);
      mb_printf(b, "\",");
    }
    mb_printf(b, "le=\"%g\"} %" PRIu64 "\n", le_bounds[i],
              op__hist_count_le(hg, (uint64_t)(le_bounds[i] * 1e9 + 0.5)));
  }
  mb_printf(b, "%s_bucket{", name);
  if (label != NULL) {
    mb_printf(b, "%s=\"", label);
    mb_label(b, value);
    mb_printf(b, "\",");
  }
  mb_printf(b, "le=\"+Inf\"} %" PRIu64 "\n", hg->count);
  mb_printf(b, "%s_sum", name);
  if (label != NULL) {
    mb_printf(b, "{%s=\"", label);
    mb_label(b, value);
    mb_printf(b, "\"}");
  }
  mb_printf(b, " %.9f\n%s_count", (double)hg->sum / 1e9, name);
  if (label != NULL) {
    mb_printf(b, "{%s=\"", label);
    mb_label(b, value);
    mb_printf(b, "\"}");
  }
  mb_printf(b, " %" PRIu64 "\n", hg->count);
}

/* One family of per-pool values: field at offset off of op_pool_stats,
** uint64_t (wide) or uint32_t. */
static void pools(mbuf *b, const op_stats *st, const char *name,
                  const char *type, const char *help, size_t off, int wide) {
  int i;

  head(b, name, type, help);
  for (i = 0; i < st->npools; i++) {
    const char *f = (const char *)&st->pools[i] + off;
    uint64_t v = wide ? *(const uint64_t *)f : *(const uint32_t *)f;
    mb_printf(b, "%s{pool=\"", name);
    mb_label(b, st->pools[i].name);
    mb_printf(b, "\"} %" PRIu64 "\n", v);
  }
}

/* The script's engine:count and engine:gauge values (registry table ref)
** as one family. Protected: runs through host_pcall.  [-0, +0, m] */
static int script_values_p(lua_State *L) {
  mbuf *b = lua_touserdata(L, 1);
  const char *name = lua_tostring(L, 3), *k;

  lua_rawgeti(L, LUA_REGISTRYINDEX, (lua_Integer)lua_tointeger(L, 2));
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_type(L, -1) == LUA_TNUMBER) {
      lua_pushvalue(L, -2);
      k = lua_tostring(L, -1);
      mb_printf(b, "%s{name=\"", name);
      mb_label(b, k != NULL ? k : "?");
      if (lua_isinteger(L, -2))
        mb_printf(b, "\"} %lld\n", (long long)lua_tointeger(L, -2));
      else
        mb_printf(b, "\"} %.17g\n", (double)lua_tonumber(L, -2));
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  return 0;
}

static void script_values(mbuf *b, lua_State *L, int ref, const char *name) {
  host_door(L);
  lua_pushcfunction(L, script_values_p);
  lua_pushlightuserdata(L, b);
  lua_pushinteger(L, ref);
  lua_pushstring(L, name);
  if (host_pcall(L, 3, 0) != LUA_OK)
    lua_pop(L, 1);
}

#define POOL_FIELD(f) offsetof(op_pool_stats, f)

/* The whole exposition of the host's statistics now. Returns the text
** (malloc'ed, *len set), or NULL on out of memory. */
static char *render(host *h, size_t *len) {
  op_runtime *rt = h->rt;
  op_stats st;
  mbuf b = { NULL, 0, 0, 0 };
  src *s;
  int i;

  op_stats_get(rt, &st);
  engine_latency_flush(h);

  one(&b, "offpath_records_in_total", "counter",
      "Records read from the inputs.", h->in);
  one(&b, "offpath_records_processed_total", "counter",
      "Records whose on_event handler ended.", h->processed);
  one(&b, "offpath_records_failed_total", "counter",
      "Records whose on_event handler raised an error.", h->failed);
  one(&b, "offpath_records_cancelled_total", "counter",
      "Records whose handler was cancelled at shutdown.", h->cancelled);
  one(&b, "offpath_records_malformed_total", "counter",
      "Lines that were not valid JSON (--format json).", h->malformed);
  one(&b, "offpath_records_oversize_total", "counter",
      "Lines dropped for being longer than the limit.", h->oversize);
  one(&b, "offpath_records_skipped_total", "counter",
      "Records read but not handled because the run stopped.", h->skipped);
  one(&b, "offpath_records_out_total", "counter",
      "Records written by engine:emit.", h->out);
  one(&b, "offpath_output_errors_total", "counter",
      "Failed writes to the output.", h->out_errors);
  one(&b, "offpath_errors_total", "counter",
      "Errors, as counted in the exit summary.", stats_errors(h));
  one(&b, "offpath_handler_timeouts_total", "counter",
      "Handler waits that timed out.", h->timeouts);
  one(&b, "offpath_alerts_total", "counter", "Calls of engine:alert.",
      h->alerts);
  one(&b, "offpath_input_drops_total", "counter",
      "UDP datagrams the kernel dropped.", stats_drops(h));
  one(&b, "offpath_ticks_total", "counter", "on_tick calls.", h->ticks);
  one(&b, "offpath_tick_overruns_total", "counter",
      "on_tick calls still running at the next interval.", h->tick_overruns);
  one(&b, "offpath_backpressure_pauses_total", "counter",
      "Times reading stopped at --max-inflight.", h->pauses);
  one(&b, "offpath_handlers_inflight", "gauge",
      "on_event handlers started and not ended.", h->inflight);
  one(&b, "offpath_handlers_suspended", "gauge",
      "Handler coroutines suspended now.", st.suspended);
  one(&b, "offpath_handler_calls_total", "counter",
      "Handler calls (events, lifecycle and go coroutines).", st.calls);

  head(&b, "offpath_input_records_total", "counter",
       "Records read, per input.");
  for (s = h->srcs; s != NULL; s = s->next) {
    if (s->kind == SRC_TCP_CLIENT)
      continue;
    mb_printf(&b, "offpath_input_records_total{input=\"");
    mb_label(&b, s->name);
    mb_printf(&b, "\",kind=\"%s\"} %" PRIu64 "\n", input_kind_name(s->kind),
              s->records);
  }
  head(&b, "offpath_input_bytes_total", "counter", "Bytes read, per input.");
  for (s = h->srcs; s != NULL; s = s->next) {
    if (s->kind == SRC_TCP_CLIENT)
      continue;
    mb_printf(&b, "offpath_input_bytes_total{input=\"");
    mb_label(&b, s->name);
    mb_printf(&b, "\",kind=\"%s\"} %" PRIu64 "\n", input_kind_name(s->kind),
              s->bytes);
  }

  pools(&b, &st, "offpath_pool_threads", "gauge", "Worker threads.",
        POOL_FIELD(threads), 0);
  pools(&b, &st, "offpath_pool_threads_running", "gauge",
        "Worker threads running (fewer than configured if some could not "
        "start).",
        POOL_FIELD(running), 0);
  pools(&b, &st, "offpath_pool_queue_capacity", "gauge",
        "Length of the pool's bounded queue.", POOL_FIELD(queue_cap), 0);
  pools(&b, &st, "offpath_pool_tasks_submitted_total", "counter",
        "Tasks submitted.", POOL_FIELD(submitted), 1);
  pools(&b, &st, "offpath_pool_tasks_completed_total", "counter",
        "Tasks that ran to the end.", POOL_FIELD(completed), 1);
  pools(&b, &st, "offpath_pool_tasks_failed_total", "counter",
        "Tasks that raised an error.", POOL_FIELD(failed), 1);
  pools(&b, &st, "offpath_pool_tasks_timedout_total", "counter",
        "Tasks stopped at their deadline.", POOL_FIELD(timedout), 1);
  pools(&b, &st, "offpath_pool_tasks_cancelled_total", "counter",
        "Tasks cancelled.", POOL_FIELD(cancelled), 1);
  pools(&b, &st, "offpath_pool_queued", "gauge",
        "Tasks waiting for a worker now.", POOL_FIELD(queued), 0);
  pools(&b, &st, "offpath_pool_inflight", "gauge",
        "Tasks submitted and not yet ended.", POOL_FIELD(inflight), 0);
  pools(&b, &st, "offpath_pool_queue_high_water", "gauge",
        "Most tasks ever waiting at once.", POOL_FIELD(queue_hwm), 0);
  pools(&b, &st, "offpath_pool_workers_stuck_total", "counter",
        "Workers given up as stuck after a stop, and replaced.",
        POOL_FIELD(stuck), 1);
  pools(&b, &st, "offpath_pool_memory_bytes", "gauge",
        "Bytes held by the pool's worker VMs.", POOL_FIELD(memory), 1);
  pools(&b, &st, "offpath_pool_memory_limit_bytes", "gauge",
        "Memory limit of each worker VM (0: none).", POOL_FIELD(memory_limit),
        1);

  head(&b, "offpath_pool_task_duration_seconds", "histogram",
       "Seconds from submit to completion, per pool.");
  for (i = 0; i < rt->npools; i++)
    hist(&b, "offpath_pool_task_duration_seconds", "pool",
         op__pool_name(rt->pools[i]), op__pool_hist(rt->pools[i]));
  head(&b, "offpath_record_duration_seconds", "histogram",
       "Seconds from reading a record to the end of its handler.");
  hist(&b, "offpath_record_duration_seconds", NULL, NULL, &h->rec_hist);
  head(&b, "offpath_handler_resume_duration_seconds", "histogram",
       "Main-thread seconds per handler resume.");
  hist(&b, "offpath_handler_resume_duration_seconds", NULL, NULL,
       &rt->call_hist);

  head(&b, "offpath_script_count_total", "counter",
       "The script's engine:count totals.");
  script_values(&b, h->L, h->counters_ref, "offpath_script_count_total");
  head(&b, "offpath_script_value", "gauge",
       "The script's engine:gauge values.");
  script_values(&b, h->L, h->gauges_ref, "offpath_script_value");

  if (b.oom) {
    free(b.p);
    return NULL;
  }
  *len = b.len;
  return b.p;
}

/* ---- the loop thread's side ---- */

/* A snapshot was asked for: render one and publish it. */
static void render_cb(uv_async_t *a) {
  metrics *m = a->data;
  uint64_t asked;
  size_t len = 0;
  char *text, *old;

  uv_mutex_lock(&m->mu);
  asked = m->asked;
  uv_mutex_unlock(&m->mu);
  if ((text = render(m->h, &len)) == NULL)
    return; /* out of memory: scrapes get the last text after WAIT_MS */
  uv_mutex_lock(&m->mu);
  old = m->text;
  m->text = text;
  m->len = len;
  m->done = asked;
  uv_cond_broadcast(&m->cv);
  uv_mutex_unlock(&m->mu);
  free(old);
}

/* ---- the server's thread ---- */

/* Ask the loop thread for a fresh snapshot and copy it; after WAIT_MS,
** copy the last one. Returns NULL (no snapshot yet, or out of memory).
** Thread: server. */
static char *take_snapshot(metrics *m, size_t *len) {
  uint64_t want, deadline;
  char *copy = NULL;

  uv_mutex_lock(&m->mu);
  want = ++m->asked;
  uv_mutex_unlock(&m->mu);
  uv_async_send(&m->async);
  deadline = uv_hrtime() + (uint64_t)WAIT_MS * 1000000;
  uv_mutex_lock(&m->mu);
  while (m->done < want && !m->closing) {
    uint64_t now = uv_hrtime();
    if (now >= deadline ||
        uv_cond_timedwait(&m->cv, &m->mu, deadline - now) == UV_ETIMEDOUT)
      break;
  }
  if (m->text != NULL && (copy = malloc(m->len + 1)) != NULL) {
    memcpy(copy, m->text, m->len + 1);
    *len = m->len;
  }
  uv_mutex_unlock(&m->mu);
  return copy;
}

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status,
                             const char *text) {
  struct MHD_Response *r = MHD_create_response_from_buffer(
      strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
  enum MHD_Result rc;

  if (r == NULL)
    return MHD_NO;
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain");
  rc = MHD_queue_response(c, status, r);
  MHD_destroy_response(r);
  return rc;
}

/* The request handler: GET /metrics (or /). Thread: server. */
static enum MHD_Result serve(void *cls, struct MHD_Connection *c,
                             const char *url, const char *method,
                             const char *version, const char *upload,
                             size_t *upload_size, void **con_cls) {
  static int seen;
  metrics *m = cls;
  struct MHD_Response *r;
  enum MHD_Result rc;
  size_t len = 0;
  char *text;

  (void)version;
  (void)upload;
  if (*con_cls == NULL) { /* headers only so far: wait for the body */
    *con_cls = &seen;
    return MHD_YES;
  }
  if (*upload_size != 0) {
    *upload_size = 0; /* a body is not wanted: skip it */
    return MHD_YES;
  }
  if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
    return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n");
  if (strcmp(url, "/metrics") != 0 && strcmp(url, "/") != 0)
    return reply(c, MHD_HTTP_NOT_FOUND, "not found: try /metrics\n");
  if ((text = take_snapshot(m, &len)) == NULL)
    return reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, "no statistics yet\n");
  r = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
  if (r == NULL) {
    free(text);
    return MHD_NO;
  }
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
                          "text/plain; version=0.0.4; charset=utf-8");
  rc = MHD_queue_response(c, MHD_HTTP_OK, r);
  MHD_destroy_response(r);
  return rc;
}

/* ---- start and stop ---- */

/* Open a listening socket on "HOST:PORT" ("[v6]:PORT" too). Returns the
** descriptor, or -1 with a message in err. */
static int listen_on(const char *spec, char *err, size_t errlen, int *v6) {
  struct addrinfo hints, *res = NULL;
  char name[256];
  const char *colon = strrchr(spec, ':'), *port;
  size_t n;
  int fd = -1, one = 1, rc;

  if (colon == NULL || colon == spec || colon[1] == '\0') {
    snprintf(err, errlen, "expects HOST:PORT, not '%s'", spec);
    return -1;
  }
  n = (size_t)(colon - spec);
  port = colon + 1;
  if (strspn(port, "0123456789") != strlen(port) || strlen(port) > 5 ||
      strtol(port, NULL, 10) > 65535) {
    snprintf(err, errlen, "the port must be a number 0..65535, not '%s'", port);
    return -1;
  }
  if (spec[0] == '[' && n >= 2 && spec[n - 1] == ']') {
    spec++;
    n -= 2;
  }
  if (n >= sizeof name) {
    snprintf(err, errlen, "host name too long");
    return -1;
  }
  memcpy(name, spec, n);
  name[n] = '\0';
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  if ((rc = getaddrinfo(name, port, &hints, &res)) != 0) {
    snprintf(err, errlen, "%s", gai_strerror(rc));
    return -1;
  }
  fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 ||
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 64) != 0) {
    snprintf(err, errlen, "%s", strerror(errno));
    if (fd >= 0)
      close(fd);
    fd = -1;
  }
  *v6 = res->ai_family == AF_INET6;
  freeaddrinfo(res);
  return fd;
}

/* The address fd listens on, "HOST:PORT", in buf. */
static const char *bound_name(int fd, char *buf, size_t len) {
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  char addr[NI_MAXHOST], port[NI_MAXSERV];

  if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0 ||
      getnameinfo((struct sockaddr *)&ss, sl, addr, sizeof addr, port,
                  sizeof port, NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    snprintf(buf, len, "?");
    return buf;
  }
  snprintf(buf, len, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", addr,
           port);
  return buf;
}

int metrics_start(host *h, char *err, size_t errlen) {
  metrics *m;
  char name[300];
  int fd, v6 = 0;
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO;

  if (h->o.metrics == NULL)
    return 0;
  if ((fd = listen_on(h->o.metrics, err, errlen, &v6)) < 0)
    return -1;
  if ((m = calloc(1, sizeof *m)) == NULL) {
    close(fd);
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  m->h = h;
  if (uv_mutex_init(&m->mu) != 0 || uv_cond_init(&m->cv) != 0)
    OP_PANIC("cannot make the metrics lock");
  uv_async_init(h->loop, &m->async, render_cb);
  m->async.data = m;
  uv_unref((uv_handle_t *)&m->async); /* never keeps the loop alive */
  if (v6)
    flags |= MHD_USE_IPv6;
  m->d =
      MHD_start_daemon(flags, 0, NULL, NULL, serve, m, MHD_OPTION_LISTEN_SOCKET,
                       fd, MHD_OPTION_CONNECTION_LIMIT, MAX_CLIENTS,
                       MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
  h->metrics = m;
  if (m->d == NULL) {
    close(fd);
    snprintf(err, errlen, "cannot start the HTTP server");
    metrics_stop(h);
    return -1;
  }
  render_cb(&m->async); /* a first snapshot */
  fprintf(stderr, "offpath: serving metrics on http://%s/metrics\n",
          bound_name(fd, name, sizeof name));
  return 0;
}

static void async_close_cb(uv_handle_t *a) {
  metrics *m = a->data;

  uv_cond_destroy(&m->cv);
  uv_mutex_destroy(&m->mu);
  free(m->text);
  free(m);
}

void metrics_stop(host *h) {
  metrics *m = h->metrics;

  if (m == NULL)
    return;
  h->metrics = NULL;
  uv_mutex_lock(&m->mu);
  m->closing = 1;
  uv_cond_broadcast(&m->cv);
  uv_mutex_unlock(&m->mu);
  if (m->d != NULL)
    MHD_stop_daemon(m->d); /* joins the server's thread */
  uv_close((uv_handle_t *)&m->async, async_close_cb);
}
