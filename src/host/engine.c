/*
** engine.c - the engine object handed to handlers (count, gauge, alert,
** emit, stats), the trampoline that runs every handler call and accounts
** for how it ended, and the non-blocking output writer.
** Thread: loop.
**
** DESIGN
**
** Every handler call (on_event for each record, on_start, on_tick,
** on_stop) goes through op_call_value() with the C function run_handler()
** as the coroutine's body:
**
**     run_handler(slot, fn, engine [, record])
**       lua_pcallk(fn, ...)  --- returns or raises ----> handler_k()
**            | suspends (offpath.run, sleep, ...)             ^
**            '---- resumed by the runtime, returns/raises ----'
**
** handler_k() is both the direct follow-up and the continuation, so it
** runs exactly once per call, when the handler's coroutine finishes: with
** LUA_OK/LUA_YIELD (it returned) or an error status (the message handler
** has added a traceback). That is where a record becomes processed, failed
** or cancelled (an error starting with "cancelled", as the runtime raises
** in waits it cancels), where its latency is measured and where its slot
** and its source reference are released. Errors never leave run_handler,
** so the runtime sees every handler coroutine end normally and reuses it.
**
** A slot (struct rec) names the call: its kind, source and line number for
** messages, and its start time. Slots are an array with a free list; the
** slot number travels as the pcallk context.
*/
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "host.h"

static const char *const kind_names[] = { "on_event", "on_start", "on_tick",
                                          "on_stop" };

/* Registry key of the emit buffer. */
static const char jbuf_key = 'J';

/* ---- slots ---- */

/* Take a free slot. Returns its index, or UINT32_MAX on out of memory. */
static uint32_t rec_alloc(host *h, rec_kind kind, src *s, uint64_t line) {
  uint32_t i, n, slot;
  rec *p;

  if (h->free_rec == UINT32_MAX) {
    n = h->nrecs ? h->nrecs * 2 : 64;
    p = realloc(h->recs, n * sizeof *p);
    if (p == NULL)
      return UINT32_MAX;
    for (i = h->nrecs; i < n; i++) {
      memset(&p[i], 0, sizeof p[i]);
      p[i].next_free = i + 1 < n ? i + 1 : UINT32_MAX;
    }
    h->recs = p;
    h->free_rec = h->nrecs;
    h->nrecs = n;
  }
  slot = h->free_rec;
  p = &h->recs[slot];
  h->free_rec = p->next_free;
  p->kind = (uint8_t)kind;
  p->s = s;
  p->line = line;
  p->t0 = uv_hrtime();
  p->live = 1;
  return slot;
}

static void rec_release(host *h, uint32_t slot) {
  rec *r = &h->recs[slot];

  r->live = 0;
  r->s = NULL;
  r->next_free = h->free_rec;
  h->free_rec = slot;
}

/* ---- the end of a handler call ---- */

static int has_prefix(const char *s, const char *p) {
  return s != NULL && strncmp(s, p, strlen(p)) == 0;
}

/* Account for the end of the call in slot: ok, or failed with msg (a
** message with a traceback). Runs exactly once per slot. */
static void handler_end(host *h, uint32_t slot, int ok, const char *msg) {
  rec *r = &h->recs[slot];
  uint64_t now = uv_hrtime();
  double took;

  switch ((rec_kind)r->kind) {
  case REC_EVENT:
    h->inflight--;
    hist_add(&h->rec_hist, now - r->t0);
    if (ok) {
      h->processed++;
    } else if (has_prefix(msg, "cancelled")) {
      h->cancelled++;
    } else {
      h->failed++;
      if (has_prefix(msg, "timeout"))
        h->timeouts++;
      host_report(h, "on_event failed on %s line %llu: %s", r->s->name,
                  (unsigned long long)r->line, msg);
    }
    input_src_unref(r->s);
    input_kick(h);
    break;
  case REC_START:
    if (ok) {
      h->started = 1;
      input_kick(h);
    } else if (h->stop_signal && has_prefix(msg, "cancelled")) {
      /* Stopped before it was done: not a broken script. */
      h->start_failed = 1;
      h->start_cancelled = 1;
      host_report(h, "on_start cancelled: %s", msg);
    } else {
      h->start_failed = 1;
      host_report(h, "on_start failed: %s", msg);
      input_close_all(h);
    }
    break;
  case REC_TICK:
    h->tick_running = 0;
    took = (double)(now - r->t0) / 1e9;
    if (!ok) {
      h->tick_failed++;
      host_report(h, "on_tick failed: %s", msg);
    }
    if (took > h->o.tick) {
      h->tick_overruns++;
      host_report(h, "warning: on_tick took %.3f s, over its %g s interval",
                  took, h->o.tick);
    }
    break;
  case REC_STOP:
    if (!ok) {
      h->stop_failed = 1;
      host_report(h, "on_stop failed: %s", msg);
    }
    break;
  }
  rec_release(h, slot);
}

/* Message handler: the message with a traceback of the handler.
** [-1, +1, m] */
static int msgh(lua_State *L) {
  const char *msg = lua_tostring(L, 1);

  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)",
                            luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* After the handler returned or raised, directly or after suspending. */
static int handler_k(lua_State *L, int status, lua_KContext ctx) {
  host *h = op_engine_ud(L);
  int ok = status == LUA_OK || status == LUA_YIELD;

  handler_end(h, (uint32_t)ctx, ok, ok ? NULL : lua_tostring(L, -1));
  return 0;
}

/* run_handler(slot, fn, args...): the body of every handler coroutine. */
static int run_handler(lua_State *L) {
  lua_KContext slot = (lua_KContext)lua_tointeger(L, 1);
  int status;

  lua_pushcfunction(L, msgh);
  lua_replace(L, 1);
  status = lua_pcallk(L, lua_gettop(L) - 2, 0, 1, slot, handler_k);
  return handler_k(L, status, slot);
}

/* op_call_value failed before run_handler could account for slot (out of
** memory in the runtime): account for it here. */
static void call_failed(host *h, uint32_t slot) {
  if (slot < h->nrecs && h->recs[slot].live)
    handler_end(h, slot, 0, op_errmsg(h->rt));
}

/* ---- calls ---- */

int engine_blocked(host *h) {
  return !h->started || h->stopping ||
         h->inflight >= (uint32_t)h->o.max_inflight ||
         h->out_pending.len >= HOST_OUT_HIGH;
}

int engine_dispatch(host *h, src *s, const char *line, size_t len) {
  lua_State *L = h->L;
  int top = lua_gettop(L), rc;
  char err[256];
  uint32_t slot;

  if (h->o.json) {
    if (len == 0)
      return 0; /* blank lines are not records */
    if (!json_push_line(L, line, len, err, sizeof err)) {
      h->malformed++;
      s->top->malformed++;
      host_report(h, "%s line %llu: malformed JSON: %s", s->name,
                  (unsigned long long)s->lineno, err);
      return 0;
    }
  } else {
    lua_pushlstring(L, line, len);
  }
  slot = rec_alloc(h, REC_EVENT, s, s->lineno);
  if (slot == UINT32_MAX) {
    lua_settop(L, top);
    host_report(h, "%s line %llu: out of memory, record dropped", s->name,
                (unsigned long long)s->lineno);
    h->skipped++;
    return 0;
  }
  h->in++;
  s->top->records++;
  s->refs++;
  h->inflight++;
  if (h->inflight > h->inflight_max)
    h->inflight_max = h->inflight;
  lua_pushcfunction(L, run_handler);
  lua_pushinteger(L, (lua_Integer)slot);
  if (lua_getglobal(L, "on_event") != LUA_TFUNCTION) {
    lua_settop(L, top);
    if (!h->no_handler_warned) {
      h->no_handler_warned = 1;
      host_report(h, "%s defines no on_event function: records fail",
                  h->o.script);
    }
    handler_end(h, slot, 0, "no on_event function");
    return 1;
  }
  op_push_engine(h->rt);
  lua_rotate(L, top + 1, -1); /* the record goes last */
  rc = op_call_value(h->rt, 4);
  if (rc != 0)
    call_failed(h, slot);
  return 1;
}

int engine_call_lifecycle(host *h, const char *name, rec_kind kind) {
  lua_State *L = h->L;
  int top = lua_gettop(L), rc;
  uint32_t slot;

  if (lua_getglobal(L, name) != LUA_TFUNCTION) {
    lua_settop(L, top);
    return 0;
  }
  slot = rec_alloc(h, kind, NULL, 0);
  if (slot == UINT32_MAX) {
    lua_settop(L, top);
    host_report(h, "%s: out of memory", kind_names[kind]);
    return -1;
  }
  lua_pushcfunction(L, run_handler);
  lua_pushinteger(L, (lua_Integer)slot);
  lua_rotate(L, top + 1, -1); /* run_handler, slot, fn */
  op_push_engine(h->rt);
  rc = op_call_value(h->rt, 3);
  if (rc != 0)
    call_failed(h, slot);
  return 1;
}

/* Cancel every suspended handler: each pending wait fails with
** "cancelled: ..." and the operation behind it is aborted (owned tasks
** cancelled, children killed). */
void engine_cancel_all(host *h) {
  op_runtime_cancel(h->rt);
}

void engine_on_error(op_runtime *rt, const char *msg, void *ud) {
  host *h = ud;

  (void)rt;
  h->rt_errors++;
  host_report(h, "%s", msg);
}

/* ---- output ---- */

static void out_start(host *h);

static void out_cb(uv_fs_t *req) {
  host *h = req->data;
  ssize_t res = req->result;

  uv_fs_req_cleanup(req);
  h->out_busy = 0;
  if (res < 0) {
    h->out_failed = 1;
    h->out_errors++;
    host_report(h, "output: write failed: %s; further output is discarded",
                uv_strerror((int)res));
    h->out_writing.len = h->out_writing.off = 0;
    h->out_pending.len = 0;
    input_kick(h);
    return;
  }
  h->out_writing.off += (size_t)res;
  if (h->out_writing.off < h->out_writing.len) {
    out_start(h);
    return;
  }
  h->out_writing.len = h->out_writing.off = 0;
  out_start(h);
  input_kick(h);
}

/* Write what is pending, one request at a time. */
static void out_start(host *h) {
  outbuf tmp;
  uv_buf_t b;
  int rc;

  if (h->out_busy || h->out_failed)
    return;
  if (h->out_writing.off >= h->out_writing.len) {
    if (h->out_pending.len == 0)
      return;
    tmp = h->out_writing;
    h->out_writing = h->out_pending;
    h->out_pending = tmp;
    h->out_pending.len = h->out_pending.off = 0;
    h->out_writing.off = 0;
  }
  b = uv_buf_init(h->out_writing.p + h->out_writing.off,
                  (unsigned)(h->out_writing.len - h->out_writing.off));
  h->out_req.data = h;
  rc = uv_fs_write(h->loop, &h->out_req, h->out_fd, &b, 1, -1, out_cb);
  if (rc != 0) {
    h->out_failed = 1;
    h->out_errors++;
    host_report(h, "output: write failed: %s; further output is discarded",
                uv_strerror(rc));
    return;
  }
  h->out_busy = 1;
}

/* Append n bytes and a newline to the output.  [-0, +0, m] */
static void out_append(host *h, lua_State *L, const char *p, size_t n) {
  outbuf *o = &h->out_pending;
  size_t need = n + 1, cap;
  char *q;

  if (h->out_failed)
    return;
  if (o->cap - o->len < need) {
    cap = o->cap ? o->cap : 65536;
    while (cap - o->len < need)
      cap *= 2;
    if ((q = realloc(o->p, cap)) == NULL)
      luaL_error(L, "emit: not enough memory");
    o->p = q;
    o->cap = cap;
  }
  memcpy(o->p + o->len, p, n);
  o->len += n;
  if (n == 0 || p[n - 1] != '\n')
    o->p[o->len++] = '\n';
  out_start(h);
}

int engine_output_open(host *h, char *err, size_t errlen) {
  const char *path = h->o.output;

  if (path == NULL || strcmp(path, "-") == 0) {
    h->out_fd = 1;
    h->out_own = 0;
    return 0;
  }
  h->out_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (h->out_fd < 0) {
    snprintf(err, errlen, "cannot open output %s: %s", path, strerror(errno));
    return -1;
  }
  h->out_own = 1;
  return 0;
}

void engine_output_close(host *h) {
  if (h->out_own && h->out_fd >= 0)
    close(h->out_fd);
  h->out_fd = -1;
  free(h->out_pending.p);
  free(h->out_writing.p);
  memset(&h->out_pending, 0, sizeof h->out_pending);
  memset(&h->out_writing, 0, sizeof h->out_writing);
}

/* ---- engine methods ---- */

/* Push the registry table at ref.  [-0, +1, -] */
static void push_ref(lua_State *L, int ref) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
}

/* engine:count(name, [n]) -> the new total */
static int engine_count(lua_State *L) {
  host *h = op_engine_ud(L);

  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checkstring(L, 2);
  if (lua_isnoneornil(L, 3)) {
    lua_settop(L, 2);
    lua_pushinteger(L, 1);
  } else {
    luaL_checknumber(L, 3);
    lua_settop(L, 3);
  }
  push_ref(L, h->counters_ref); /* 4 */
  lua_pushvalue(L, 2);
  if (lua_rawget(L, 4) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_pushinteger(L, 0);
  }
  lua_pushvalue(L, 3);
  lua_arith(L, LUA_OPADD); /* 5: the new total */
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 5);
  lua_rawset(L, 4);
  return 1;
}

/* engine:gauge(name, v) */
static int engine_gauge(lua_State *L) {
  host *h = op_engine_ud(L);

  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checkstring(L, 2);
  luaL_checknumber(L, 3);
  push_ref(L, h->gauges_ref);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 3);
  lua_rawset(L, -3);
  return 0;
}

/* engine:alert(msg) */
static int engine_alert(lua_State *L) {
  host *h = op_engine_ud(L);
  const char *msg;

  luaL_checktype(L, 1, LUA_TTABLE);
  msg = luaL_tolstring(L, 2, NULL);
  h->alerts++;
  host_report(h, "alert: %s", msg);
  return 0;
}

/* engine:emit(record): a string as a line, a table as a line of JSON. */
static int engine_emit(lua_State *L) {
  host *h = op_engine_ud(L);
  const char *s;
  size_t n;
  jbuf *b;

  luaL_checktype(L, 1, LUA_TTABLE);
  switch (lua_type(L, 2)) {
  case LUA_TSTRING:
  case LUA_TNUMBER:
  case LUA_TBOOLEAN:
    s = luaL_tolstring(L, 2, &n);
    out_append(h, L, s, n);
    break;
  case LUA_TTABLE:
    lua_rawgetp(L, LUA_REGISTRYINDEX, &jbuf_key);
    b = lua_touserdata(L, -1);
    b->len = 0;
    json_encode(L, 2, b, "emit");
    out_append(h, L, b->p, b->len);
    if (b->cap > (1u << 20)) {
      /* Do not keep a huge buffer after one huge record. */
      free(b->p);
      b->p = NULL;
      b->len = b->cap = 0;
    }
    break;
  default:
    return luaL_typeerror(L, 2, "string or table");
  }
  h->out++;
  return 0;
}

/* engine:stats() -> the summary table (see docs/cli.md) */
static int engine_stats(lua_State *L) {
  host *h = op_engine_ud(L);

  stats_push_table(h, L);
  return 1;
}

int engine_setup(host *h) {
  static const luaL_Reg methods[] = {
    { "count", engine_count }, { "gauge", engine_gauge },
    { "alert", engine_alert }, { "emit", engine_emit },
    { "stats", engine_stats }, { NULL, NULL }
  };
  lua_State *L = h->L;

  lua_newtable(L);
  h->counters_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  h->gauges_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  jbuf_new(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &jbuf_key);
  op_runtime_on_error(h->rt, engine_on_error, h);
  return op_register_engine(h->rt, methods, h);
}
