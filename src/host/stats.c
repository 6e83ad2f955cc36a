/* SPDX-License-Identifier: MIT */
/*
** stats.c - the host's statistics: the summary as a Lua table
** (engine:stats(), a method added here, and --json), the text summary at
** exit and the --stats line printed every second. Record latency goes
** into an op_hist (hist.h).
** Thread: loop.
*/
#include <inttypes.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "host.h"

/* ---- totals ---- */

uint64_t stats_drops(host *h) {
  uint64_t n = 0;
  src *s;

  for (s = h->srcs; s != NULL; s = s->next)
    n += s->drops;
  return n;
}

static uint64_t task_timeouts(const op_stats *st) {
  uint64_t n = 0;
  int i;

  for (i = 0; i < st->npools; i++)
    n += st->pools[i].timedout;
  return n;
}

uint64_t stats_errors(host *h) {
  return h->failed + h->tick_failed +
         (uint64_t)(h->start_failed && !h->start_cancelled) +
         (uint64_t)h->stop_failed + h->rt_errors + h->out_errors;
}

static double elapsed(host *h) {
  return (double)(uv_hrtime() - h->t_start) / 1e9;
}

static double paused_seconds(host *h) {
  uint64_t ns = h->paused_ns;

  if (h->paused)
    ns += uv_hrtime() - h->paused_since;
  return (double)ns / 1e9;
}

static const char *signal_name(int sig) {
  switch (sig) {
  case 0:
    return NULL;
  case SIGINT:
    return "SIGINT";
  case SIGTERM:
    return "SIGTERM";
  default:
    return "signal";
  }
}

/* ---- the summary as a Lua table ---- */

static void set_int(lua_State *L, const char *k, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

static void set_num(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

/* Copy the registry table at ref into a new table.  [-0, +1, m] */
static void copy_ref(lua_State *L, int ref) {
  lua_newtable(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -5);
  }
  lua_pop(L, 1);
}

/* Push the summary table (see docs/cli.md).  [-0, +1, m] */
static void stats_push_table(host *h, lua_State *L) {
  op_stats st;
  src *s;
  int n;

  op_stats_get(h->rt, &st);
  engine_latency_flush(h);
  lua_createtable(L, 0, 16);
  set_num(L, "elapsed", elapsed(h));

  lua_createtable(L, 0, 10);
  set_int(L, "in", h->in);
  set_int(L, "processed", h->processed);
  set_int(L, "failed", h->failed);
  set_int(L, "cancelled", h->cancelled);
  set_int(L, "inflight", h->inflight);
  set_int(L, "malformed", h->malformed);
  set_int(L, "oversize", h->oversize);
  set_int(L, "skipped", h->skipped);
  set_int(L, "out", h->out);
  lua_setfield(L, -2, "records");

  lua_createtable(L, 0, 2);
  lua_createtable(L, 0, 4);
  set_num(L, "p50", st.call_p50);
  set_num(L, "p99", st.call_p99);
  set_num(L, "max", st.call_max);
  set_int(L, "calls", st.calls);
  lua_setfield(L, -2, "main");
  lua_createtable(L, 0, 4);
  set_num(L, "p50", op__hist_quantile(&h->rec_hist, 0.50));
  set_num(L, "p99", op__hist_quantile(&h->rec_hist, 0.99));
  set_num(L, "max", (double)h->rec_hist.max / 1e9);
  set_num(L, "min", (double)h->rec_hist.min / 1e9);
  set_int(L, "count", h->rec_hist.count);
  lua_setfield(L, -2, "record");
  lua_setfield(L, -2, "latency");

  op__push_pool_stats(L, &st); /* as offpath.stats().pools */
  lua_setfield(L, -2, "pools");

  set_int(L, "errors", stats_errors(h));
  set_int(L, "timeouts", task_timeouts(&st));
  set_int(L, "stuck", st.stuck);
  set_int(L, "handler_timeouts", h->timeouts);
  set_int(L, "drops", stats_drops(h));
  set_int(L, "alerts", h->alerts);

  lua_createtable(L, 0, 3);
  set_int(L, "bytes", h->out_bytes);
  set_int(L, "errors", h->out_errors);
  set_int(L, "abandoned", h->out_abandoned);
  lua_setfield(L, -2, "output");

  lua_createtable(L, 0, 4);
  set_int(L, "count", h->ticks);
  set_int(L, "overruns", h->tick_overruns);
  set_int(L, "failed", h->tick_failed);
  lua_setfield(L, -2, "ticks");

  lua_createtable(L, 0, 4);
  set_int(L, "max_inflight", (uint64_t)h->o.max_inflight);
  set_int(L, "inflight_max", h->inflight_max);
  set_int(L, "pauses", h->pauses);
  set_num(L, "paused_seconds", paused_seconds(h));
  lua_setfield(L, -2, "backpressure");

  n = 0;
  lua_newtable(L);
  for (s = h->srcs; s != NULL; s = s->next) {
    if (s->kind == SRC_TCP_CLIENT)
      continue;
    lua_createtable(L, 0, 9);
    lua_pushstring(L, s->name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, input_kind_name(s->kind));
    lua_setfield(L, -2, "kind");
    set_int(L, "records", s->records);
    set_int(L, "malformed", s->malformed);
    set_int(L, "oversize", s->oversize);
    set_int(L, "bytes", s->bytes);
    if (s->kind == SRC_TCP_SERVER)
      set_int(L, "clients", s->clients);
    if (s->kind == SRC_UDP) {
      set_int(L, "drops", s->drops);
      set_int(L, "truncated", s->truncated);
    }
    if (s->kind == SRC_RSTREAM)
      rstream_push_stats(s, L);
    lua_rawseti(L, -2, ++n);
  }
  lua_setfield(L, -2, "inputs");

  copy_ref(L, h->counters_ref);
  lua_setfield(L, -2, "counters");
  copy_ref(L, h->gauges_ref);
  lua_setfield(L, -2, "gauges");

  if (h->stop_signal) {
    lua_pushstring(L, signal_name(h->stop_signal));
    lua_setfield(L, -2, "signal");
  }
}

/* engine:stats() -> the summary table */
static int engine_stats(lua_State *L) {
  stats_push_table(op_engine_ud(L), L);
  return 1;
}

int stats_setup(host *h) {
  static const luaL_Reg methods[] = { { "stats", engine_stats },
                                      { NULL, NULL } };

  return op_register_engine(h->rt, methods, h);
}

/* ---- printing ---- */

/* A duration in seconds, in a unit that suits it. */
static const char *dur(double s, char *buf, size_t len) {
  if (s <= 0)
    snprintf(buf, len, "0");
  else if (s < 1e-6)
    snprintf(buf, len, "%.0f ns", s * 1e9);
  else if (s < 1e-3)
    snprintf(buf, len, "%.1f us", s * 1e6);
  else if (s < 1)
    snprintf(buf, len, "%.1f ms", s * 1e3);
  else
    snprintf(buf, len, "%.2f s", s);
  return buf;
}

/* Print "name=value, ..." of the registry table at ref, sorted by name.
** Protected: runs through host_pcall.  [-0, +0, m] */
static int print_kv_p(lua_State *L) {
  const char *label = lua_tostring(L, 2);
  int n = 0, i;

  lua_settop(L, 2);
  lua_newtable(L); /* 3: names */
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_rawseti(L, 3, ++n);
  }
  if (n == 0)
    return 0;
  lua_getglobal(L, "table");
  lua_getfield(L, -1, "sort");
  lua_pushvalue(L, 3);
  lua_call(L, 1, 0);
  lua_pop(L, 1);
  fprintf(stderr, "  %-9s ", label);
  for (i = 1; i <= n; i++) {
    const char *k, *v;

    lua_rawgeti(L, 3, i);
    lua_pushvalue(L, -1);
    lua_rawget(L, 1);
    v = luaL_tolstring(L, -1, NULL);
    k = lua_tostring(L, -3);
    fprintf(stderr, "%s%s=%s", i > 1 ? ", " : "", k, v);
    lua_pop(L, 3);
  }
  fputc('\n', stderr);
  return 0;
}

static void print_kv(host *h, int ref, const char *label) {
  lua_State *L = h->L;

  host_door(L);
  lua_pushcfunction(L, print_kv_p);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_pushstring(L, label);
  if (host_pcall(L, 2, 0) != LUA_OK)
    lua_pop(L, 1);
}

/* Encode the summary table as one line of JSON on stderr. Names that are
** not valid UTF-8 (counters named after binary records) are escaped, so
** only out of memory loses the line.  [-0, +0, m] */
static int summary_json_p(lua_State *L) {
  host *h = lua_touserdata(L, 1);
  jbuf *b = jbuf_new(L);

  stats_push_table(h, L);
  json_encode(L, -1, b, "summary", 1);
  fprintf(stderr, "%.*s\n", (int)b->len, b->p);
  fflush(stderr);
  return 0;
}

/* The summary as one line of JSON on stderr; what for messages. */
static void summary_json(host *h, const char *what) {
  lua_State *L = h->L;

  host_door(L);
  lua_pushcfunction(L, summary_json_p);
  lua_pushlightuserdata(L, h);
  if (host_pcall(L, 1, 0) != LUA_OK) {
    fprintf(stderr, "offpath: cannot write the %s: %s\n", what,
            lua_tostring(L, -1));
    lua_pop(L, 1);
  }
}

static void summary_text(host *h) {
  op_stats st;
  char a[32], b[32], c[32], d[32], e[32], f[32], text[256];
  const char *sig = signal_name(h->stop_signal);
  int i, used = 0;
  src *s;

  op_stats_get(h->rt, &st);
  engine_latency_flush(h);
  fprintf(stderr, "offpath: summary after %.2f s%s%s\n", elapsed(h),
          sig ? ", stopped by " : "", sig ? sig : "");
  fprintf(stderr,
          "  records   in %" PRIu64 ", processed %" PRIu64 ", failed %" PRIu64
          ", cancelled %" PRIu64 ", out %" PRIu64 "\n",
          h->in, h->processed, h->failed, h->cancelled, h->out);
  if (h->malformed || h->oversize || h->skipped)
    fprintf(stderr,
            "            malformed %" PRIu64 ", too long %" PRIu64
            ", skipped at stop %" PRIu64 "\n",
            h->malformed, h->oversize, h->skipped);
  fprintf(stderr,
          "  latency   main thread p50 %s, p99 %s, max %s; record "
          "p50 %s, p99 %s, max %s\n",
          dur(st.call_p50, a, sizeof a), dur(st.call_p99, b, sizeof b),
          dur(st.call_max, c, sizeof c),
          dur(op__hist_quantile(&h->rec_hist, 0.5), d, sizeof d),
          dur(op__hist_quantile(&h->rec_hist, 0.99), e, sizeof e),
          dur((double)h->rec_hist.max / 1e9, f, sizeof f));
  for (i = 0; i < st.npools; i++) {
    op_pool_stats *p = &st.pools[i];
    if (p->submitted == 0)
      continue;
    fprintf(stderr,
            "  %-9s %s: %d threads, %" PRIu64 " tasks: %" PRIu64
            " done, %" PRIu64 " failed, %" PRIu64 " timed out, %" PRIu64
            " cancelled; queue max %u; p99 %s\n",
            used++ ? "" : "pools", p->name, p->threads, p->submitted,
            p->completed, p->failed, p->timedout, p->cancelled, p->queue_hwm,
            dur(p->p99, a, sizeof a));
  }
  if (!used)
    fprintf(stderr, "  pools     no tasks\n");
  used = 0;
  for (s = h->srcs; s != NULL; s = s->next) {
    if (s->kind == SRC_TCP_CLIENT)
      continue;
    fprintf(stderr, "  %-9s %s: %" PRIu64 " records", used++ ? "" : "inputs",
            s->name, s->records);
    if (s->malformed)
      fprintf(stderr, ", %" PRIu64 " malformed", s->malformed);
    if (s->kind == SRC_TCP_SERVER)
      fprintf(stderr, ", %" PRIu64 " clients", s->clients);
    if (s->kind == SRC_UDP)
      fprintf(stderr, ", %" PRIu64 " dropped by the kernel", s->drops);
    if (s->kind == SRC_RSTREAM) {
      rstream_stats_text(s, text, sizeof text);
      fprintf(stderr, "; %s", text);
    }
    fputc('\n', stderr);
  }
  if (h->rout != NULL) {
    rout_stats_text(h, text, sizeof text);
    fprintf(stderr, "  output    %s\n", text);
  }
  if (h->pauses)
    fprintf(stderr,
            "  backpressure paused %" PRIu64 " times for %.2f s (at %d "
            "handlers in flight)\n",
            h->pauses, paused_seconds(h), h->o.max_inflight);
  fprintf(stderr,
          "  errors %" PRIu64 ", timeouts %" PRIu64 " (tasks) %" PRIu64
          " (handlers), drops %" PRIu64 ", alerts %" PRIu64 "\n",
          stats_errors(h), task_timeouts(&st), h->timeouts, stats_drops(h),
          h->alerts);
  if (h->out_abandoned)
    fprintf(stderr, "  output    %" PRIu64 " bytes abandoned unwritten\n",
            h->out_abandoned);
  if (h->ticks)
    fprintf(stderr, "  ticks     %" PRIu64 ", %" PRIu64 " over the interval\n",
            h->ticks, h->tick_overruns);
  print_kv(h, h->counters_ref, "counters");
  print_kv(h, h->gauges_ref, "gauges");
}

void stats_summary(host *h) {
  src *s;

  for (s = h->srcs; s != NULL; s = s->next)
    if (s->kind == SRC_UDP && !s->closed)
      input_udp_refresh_drops(s);
  if (h->stats_line_open) {
    fputc('\n', stderr);
    h->stats_line_open = 0;
  }
  if (h->o.quiet)
    return;
  if (!h->o.summary_json) {
    summary_text(h);
    return;
  }
  summary_json(h, "summary");
}

void stats_line(host *h) {
  op_stats st;
  char a[32], b[32], line[1024], text[256];
  src *s;
  double t = elapsed(h), dt = t - (double)h->last_t / 1e9;
  size_t n;
  int i;

  if (h->o.summary_json) {
    /* One object a line, the summary's fields: a program reads them. */
    summary_json(h, "statistics");
    return;
  }
  op_stats_get(h->rt, &st);
  n = (size_t)snprintf(
      line, sizeof line,
      "offpath: %.0fs in %" PRIu64 " (%.0f/s) done %" PRIu64 " failed %" PRIu64
      " inflight %u out %" PRIu64 " | main p50 %s p99 %s",
      t, h->in, dt > 0 ? (double)(h->in - h->last_in) / dt : 0.0, h->processed,
      h->failed, h->inflight, h->out, dur(st.call_p50, a, sizeof a),
      dur(st.call_p99, b, sizeof b));
  for (i = 0; i < st.npools && n < sizeof line; i++) {
    if (st.pools[i].submitted == 0)
      continue;
    n += (size_t)snprintf(line + n, sizeof line - n,
                          " | %s %" PRIu64 " tasks %u running %u queued",
                          st.pools[i].name, st.pools[i].submitted,
                          st.pools[i].inflight - st.pools[i].queued,
                          st.pools[i].queued);
  }
  for (s = h->srcs; s != NULL && n < sizeof line; s = s->next) {
    if (s->kind != SRC_RSTREAM)
      continue;
    rstream_stats_text(s, text, sizeof text);
    n += (size_t)snprintf(line + n, sizeof line - n, " | %s", text);
  }
  if (n < sizeof line)
    snprintf(line + n, sizeof line - n, " | errors %" PRIu64 " drops %" PRIu64,
             stats_errors(h), stats_drops(h));
  h->last_in = h->in;
  h->last_t = (uint64_t)(t * 1e9);
  if (h->stats_tty) {
    fprintf(stderr, "\r\033[K%s", line);
    h->stats_line_open = 1;
  } else {
    fprintf(stderr, "%s\n", line);
  }
  fflush(stderr);
}
