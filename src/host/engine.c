/* SPDX-License-Identifier: MIT */
/*
** engine.c - the engine object handed to handlers (count, gauge, alert,
** emit; stats.c adds stats), the trampoline that runs every handler call
** and accounts for how it ended, and the non-blocking output writer.
** Thread: loop.
**
** DESIGN
**
** Every handler call (on_event for each record, on_start, on_tick,
** on_stop) goes through op_call_value() with the C function run_handler()
** as the coroutine's body:
**
**     run_handler(slot, fn, engine [, record])
**       host_pcallk(fn, ...) --- returns or raises ----> handler_k()
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
**
** A record's coroutine body is run_event(slot, record), a C closure made
** once whose upvalues hold the globals table, the engine and the name
** "on_event": per record the host pushes three values and the handler is
** found with one raw table read (through _G's metatable, protected, only
** when _G has no such field and has a metatable).
**
** Record latency is timed with two clock reads, which cost as much as a
** trivial handler. So once HOST_LAT_SAMPLE timed records in a row have
** ended without suspending within HOST_LAT_FAST_NS, only one record in
** HOST_LAT_SAMPLE is timed, and it stands in the histogram for the fast
** records not timed since the previous one (its count stays the number of
** records). A record that suspends is always timed: from its hand-over if
** it was chosen, else from the end of its first step (its first step,
** under HOST_LAT_FAST_NS like its neighbours', is left out). A record that
** suspends or is slow, and a slow sample, switch back to timing every
** record. The runtime's main-thread histogram still sees every step.
*/
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "host.h"
#include "internal.h"

static int push_global_fn(lua_State *L, const char *name);

static const char *const kind_names[] = { "on_event", "on_start", "on_tick",
                                          "on_stop" };

/* Registry key of the emit buffer. */
static const char jbuf_key = 'J';

/* ---- slots ---- */

/* Take a free slot, timed from now if timed is set. Returns its index, or
** UINT32_MAX on out of memory. */
static uint32_t rec_alloc(host *h, rec_kind kind, src *s, uint64_t line,
                          int timed) {
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
  p->entry = NULL;
  p->line = line;
  p->t0 = timed ? uv_hrtime() : 0;
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

/* ---- record latency ---- */

/* Add the fast records not timed since the last sample, as that sample. */
void engine_latency_flush(host *h) {
  if (h->lat_untimed > 0) {
    op__hist_add_n(&h->rec_hist, h->lat_last, h->lat_untimed);
    h->lat_untimed = 0;
  }
}

/* Time every record again: one suspended or was slow. */
static void latency_exact(host *h) {
  engine_latency_flush(h);
  h->lat_streak = 0;
}

/* Account for the latency of the record in r; sync: it ended within its
** engine_dispatch() (it did not suspend). */
static void event_latency(host *h, const rec *r, int sync) {
  uint64_t ns;

  if (r->t0 == 0) {
    h->lat_untimed++; /* not chosen, and it did not suspend */
    return;
  }
  ns = uv_hrtime() - r->t0;
  if (sync && ns < HOST_LAT_FAST_NS) {
    op__hist_add_n(&h->rec_hist, ns, 1 + h->lat_untimed);
    h->lat_untimed = 0;
    h->lat_last = ns;
    if (h->lat_streak < HOST_LAT_SAMPLE)
      h->lat_streak++;
    return;
  }
  latency_exact(h);
  op__hist_add(&h->rec_hist, ns);
}

/* ---- the end of a handler call ---- */

static int has_prefix(const char *s, const char *p) {
  return s != NULL && strncmp(s, p, strlen(p)) == 0;
}

/* Account for the end of the call in slot: ok, or failed with msg (a
** message with a traceback). Runs exactly once per slot. */
static void handler_end(host *h, uint32_t slot, int ok, const char *msg) {
  rec *r = &h->recs[slot];
  int sync = slot == h->dispatch_slot;
  double took;

  switch ((rec_kind)r->kind) {
  case REC_EVENT:
    h->inflight--;
    event_latency(h, r, sync);
    if (ok) {
      h->processed++;
    } else if (has_prefix(msg, "cancelled")) {
      h->cancelled++;
    } else {
      h->failed++;
      if (has_prefix(msg, "timeout"))
        h->timeouts++;
      if (r->entry != NULL)
        host_report(h, "on_event failed on %s entry %s: %s", r->s->name,
                    rstream_entry_id(r->entry), msg);
      else
        host_report(h, "on_event failed on %s line %llu: %s", r->s->name,
                    (unsigned long long)r->line, msg);
    }
    if (!ok && r->entry != NULL)
      rstream_handler_failed(r->entry, msg);
    input_src_unref(r->s);
    if (!sync) /* else the pump that dispatched it goes on */
      host_pump_soon(h);
    break;
  case REC_START:
    if (ok) {
      engine_started(h);
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
    took = (double)(uv_hrtime() - r->t0) / 1e9;
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

/* After the handler returned or raised, directly or after suspending. */
static int handler_k(lua_State *L, int status, lua_KContext ctx) {
  host *h = op_engine_ud(L);
  int ok = status == LUA_OK || status == LUA_YIELD;

  handler_end(h, (uint32_t)ctx, ok, ok ? NULL : lua_tostring(L, -1));
  return 0;
}

/* run_handler(slot, fn, engine): the body of lifecycle handlers'
** coroutines. */
static int run_handler(lua_State *L) {
  lua_KContext slot = (lua_KContext)lua_tointeger(L, 1);
  int status;

  host_door(L);
  lua_replace(L, 1);
  status = host_pcallk(L, lua_gettop(L) - 2, 0, slot, handler_k);
  return handler_k(L, status, slot);
}

/* Say once that the script has no on_event. */
static void no_handler_warn(host *h) {
  if (!h->no_handler_warned) {
    h->no_handler_warned = 1;
    host_report(h, "%s defines no on_event function: records fail",
                h->o.script);
  }
}

/* The continuation of a call with no results to pass on. */
static int return0_k(lua_State *L, int status, lua_KContext ctx) {
  (void)L;
  (void)status;
  (void)ctx;
  return 0;
}

/* event_by_name(engine, record [, entry]): on_event looked up as any
** global, through the metatable of a globals table without the raw field,
** inside the handler's pcall so that a raising __index fails the record. */
static int event_by_name(lua_State *L) {
  if (lua_getglobal(L, "on_event") != LUA_TFUNCTION) {
    no_handler_warn(op_engine_ud(L));
    return luaL_error(L, "no on_event function");
  }
  lua_insert(L, 1);
  lua_callk(L, lua_gettop(L) - 1, 0, 0, return0_k);
  return 0;
}

/* A record's line as dispatch() hands it over: its bytes stay where they
** are until the record's call has started. */
typedef struct line_buf {
  const char *p;
  size_t len;
} line_buf;

/* event_line(fn, engine, line [, entry]): fn called with the line made a
** string here, inside the handler's protected call, where no memory for it
** fails the record like any other error. line is a light userdata, the
** line_buf of the dispatch() that started this call and is still running
** (it passes the line this way only then). */
static int event_line(lua_State *L) {
  const line_buf *lb = lua_touserdata(L, 3);

  lua_pushlstring(L, lb->p, lb->len);
  lua_replace(L, 3);
  lua_callk(L, lua_gettop(L) - 1, 0, 0, return0_k);
  return 0;
}

/* run_event(slot, record [, entry]): the body of on_event's coroutines;
** a record that is a light userdata is a line for event_line. Upvalues:
** the globals table, the engine, "on_event". */
static int run_event(lua_State *L) {
  lua_KContext slot = (lua_KContext)lua_tointeger(L, 1);
  int status, t, entry = lua_gettop(L) > 2;
  int line = lua_type(L, 2) == LUA_TLIGHTUSERDATA;
  host *h;

  host_door(L); /* 3 or 4 */
  if (line)
    lua_pushcfunction(L, event_line);
  lua_pushvalue(L, lua_upvalueindex(3));
  t = lua_rawget(L, lua_upvalueindex(1));
  if (t == LUA_TNIL && lua_getmetatable(L, lua_upvalueindex(1))) {
    lua_pop(L, 2);
    lua_pushcfunction(L, event_by_name);
  } else if (t != LUA_TFUNCTION) {
    h = op_engine_ud(L);
    no_handler_warn(h);
    handler_end(h, (uint32_t)slot, 0, "no on_event function");
    return 0;
  }
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_pushvalue(L, 2);
  if (entry)
    lua_pushvalue(L, 3);
  status = host_pcallk(L, 2 + entry + line, 0, slot, handler_k);
  return handler_k(L, status, slot);
}

/* op_call_value failed before run_handler could account for slot (out of
** memory in the runtime): account for it here. */
static void call_failed(host *h, uint32_t slot) {
  if (slot < h->nrecs && h->recs[slot].live)
    handler_end(h, slot, 0, op_errmsg(h->rt));
}

/* ---- calls ---- */

/* on_start has ended (or there is none): let records flow, and say now if
** there is no on_event to take them. */
void engine_started(host *h) {
  lua_State *L = h->L;

  h->started = 1;
  if (!h->no_handler_warned && h->nopen > 0) {
    if (push_global_fn(L, "on_event")) {
      lua_pop(L, 1);
    } else {
      h->no_handler_warned = 1;
      host_report(h,
                  "warning: %s defines no on_event function: every record "
                  "will fail",
                  h->o.script);
    }
  }
  host_pump_soon(h);
}

/* Push the line_buf (the argument) as a string: protected.  [-1, +1, m] */
static int push_line_p(lua_State *L) {
  line_buf *lb = lua_touserdata(L, 1);

  lua_pushlstring(L, lb->p, lb->len);
  return 1;
}

/* Dispatch a record: a line, or a stream entry e whose table is on top of
** L (then tracked). Returns 1, 0 if not a record (blank, or malformed:
** err set), -1 on out of memory. */
static int dispatch(host *h, src *s, const char *line, size_t len, rentry *e,
                    char *err, size_t errlen) {
  lua_State *L = h->L;
  int top = lua_gettop(L) - (e != NULL), rc, timed, nargs = 2, made = 1;
  uint32_t slot;
  line_buf lb;

  if (h->o.json) {
    if (len == 0 && e == NULL)
      return 0; /* blank lines are not records */
    if ((made = json_push_line(L, line, len, err, errlen)) == 0) {
      lua_settop(L, top);
      h->malformed++;
      s->top->malformed++;
      return 0;
    }
    if (made > 0 && e != NULL)
      lua_insert(L, -2); /* record, entry */
  }
  timed = h->lat_streak < HOST_LAT_SAMPLE || h->in % HOST_LAT_SAMPLE == 0;
  slot = rec_alloc(h, REC_EVENT, s, s->lineno, timed);
  if (slot == UINT32_MAX) {
    lua_settop(L, top);
    host_report(h, "%s line %llu: not enough memory, record dropped", s->name,
                (unsigned long long)s->lineno);
    h->skipped++;
    return -1;
  }
  h->recs[slot].entry = e;
  h->in++;
  s->top->records++;
  s->refs++;
  h->inflight++;
  if (h->inflight > h->inflight_max)
    h->inflight_max = h->inflight;
  if (made > 0 && !h->o.json) {
    lb.p = line;
    lb.len = len;
    if (op__co_runs_now(h->rt)) {
      /* The call starts before this returns: the handler's coroutine
      ** makes the string, in the protected call it already has. */
      lua_pushlightuserdata(L, &lb);
    } else {
      host_door(L);
      lua_pushcfunction(L, push_line_p);
      lua_pushlightuserdata(L, &lb);
      if (host_pcall(L, 1, 1) != LUA_OK)
        made = -1;
    }
  }
  if (made < 0) {
    /* No memory for the record's value: the record fails, counted. */
    lua_settop(L, top);
    h->dispatch_slot = slot;
    handler_end(h, slot, 0, "not enough memory");
    h->dispatch_slot = UINT32_MAX;
    return e != NULL ? -1 : 1; /* an entry: as if never tracked */
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->event_ref);
  lua_pushinteger(L, (lua_Integer)slot);
  if (!h->o.json)
    lua_rotate(L, -3, -1); /* fn, slot, line */
  nargs += e != NULL;
  if (h->o.json)
    lua_rotate(L, top + 1, 2); /* the record (and entry) go last */
  else if (e != NULL)
    lua_rotate(L, top + 1, -1); /* the entry goes last */
  h->dispatch_slot = slot;
  if (e != NULL)
    rc = op_call_track(h->rt, nargs, rstream_track_end, e);
  else
    rc = op_call_value(h->rt, nargs);
  h->dispatch_slot = UINT32_MAX;
  if (rc != 0) {
    call_failed(h, slot);
    if (e != NULL && rc != OP_ESCRIPT)
      return -1; /* not tracked: its callback never runs */
  } else if (h->recs[slot].live) {
    /* Suspended: time it from now if it was not chosen. */
    latency_exact(h);
    if (h->recs[slot].t0 == 0)
      h->recs[slot].t0 = uv_hrtime();
  }
  return 1;
}

/* h->deliver */
static int deliver(host *h, src *s, const char *line, size_t len) {
  char err[256];
  int rc;

  host_test_oom(h->in + 1); /* test builds: record n fails allocation n */
  rc = dispatch(h, s, line, len, NULL, err, sizeof err);
  host_test_oom(0);
  if (rc == 0 && len > 0)
    host_report(h, "%s line %llu: malformed JSON: %s", s->name,
                (unsigned long long)s->lineno, err);
  return rc > 0;
}

/* h->deliver_entry */
static int deliver_entry(host *h, src *s, const char *data, size_t len,
                         rentry *e, char *err, size_t errlen) {
  int rc = dispatch(h, s, data, len, e, err, errlen);

  if (rc == 0) {
    char msg[300];
    snprintf(msg, sizeof msg, "malformed JSON: %s", err);
    snprintf(err, errlen, "%s", msg);
  }
  return rc;
}

/* getglobal_p(name) -> the global name, read as any global.  [-1, +1, e] */
static int getglobal_p(lua_State *L) {
  lua_getglobal(L, lua_tostring(L, 1));
  return 1;
}

/* Push the global function name and return 1, or return 0 with nothing
** pushed if there is none. A raw read of _G first; then, if _G has a
** metatable, a read through it, protected: a lookup that raises (a strict
** _G) finds nothing.  [-0, +(0|1), m] */
static int push_global_fn(lua_State *L, const char *name) {
  int t;

  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  lua_pushstring(L, name);
  t = lua_rawget(L, -2);
  if (t == LUA_TNIL && lua_getmetatable(L, -2)) {
    lua_pop(L, 2);
    host_door(L);
    lua_pushcfunction(L, getglobal_p);
    lua_pushstring(L, name);
    t = host_pcall(L, 1, 1) == LUA_OK ? lua_type(L, -1) : LUA_TNIL;
  }
  lua_remove(L, -2); /* _G */
  if (t != LUA_TFUNCTION) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

int engine_call_lifecycle(host *h, const char *name, rec_kind kind) {
  lua_State *L = h->L;
  int top = lua_gettop(L), rc;
  uint32_t slot;

  if (!push_global_fn(L, name))
    return 0;
  slot = rec_alloc(h, kind, NULL, 0, 1);
  if (slot == UINT32_MAX) {
    lua_settop(L, top);
    host_report(h, "%s: not enough memory", kind_names[kind]);
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

/* Cancel all work in flight: every task (launch, schedule, go, run) and
** every pending wait, which fails with "cancelled: ..." while the
** operation behind it is aborted (children killed, io stopped). Returns
** how many were cancelled. */
int engine_cancel_all(host *h) {
  return op_runtime_cancel(h->rt);
}

void engine_on_error(op_runtime *rt, const char *msg, void *ud) {
  host *h = ud;

  (void)rt;
  h->rt_errors++;
  host_report(h, "%s", msg);
}

/* ---- output ---- */

/*
** Two ways to write, chosen by what the output is:
**
**   poll  a pipe, FIFO, terminal or other character device, or a socket:
**         written from the loop thread without blocking, the rest when
**         uv_poll says it is writable. A pipe or device is written
**         through a description of its own (/proc/self/fd/N opened anew,
**         O_NONBLOCK), so stdout itself stays blocking for print(); a
**         socket through send(MSG_DONTWAIT). Output nobody reads can then
**         be abandoned (engine_output_abandon).
**   fs    a regular file (or where the above is not possible): one
**         uv_fs_write at a time on libuv's threads.
**
** A reader that went away (EPIPE, ECONNRESET) ends the run as a filter
** would: host_stop_soon(), exit status 141. Any other write error discards
** further output. Bytes emitted and never written are counted as
** abandoned.
*/

static void out_start(host *h);
static void out_poll_cb(uv_poll_t *p, int status, int events);

/* Everything buffered is dropped: count it as abandoned. */
static void out_drop(host *h) {
  h->out_abandoned +=
      (h->out_writing.len - h->out_writing.off) + h->out_pending.len;
  h->out_writing.len = h->out_writing.off = 0;
  h->out_pending.len = 0;
  if (h->out_polling) {
    uv_poll_stop(&h->out_poll);
    h->out_polling = 0;
  }
}

/* A write failed with the libuv error err. */
static void out_fail(host *h, int err) {
  h->out_failed = 1;
  h->out_errors++;
  out_drop(h);
  if (err == UV_EPIPE || err == UV_ECONNRESET) {
    h->out_broken = 1;
    host_report(h, "output: the reader went away (%s): stopping",
                uv_strerror(err));
    host_stop_soon(h); /* maybe inside emit, inside the input's pump */
  } else {
    host_report(h, "output: write failed: %s; further output is discarded",
                uv_strerror(err));
  }
  host_pump_soon(h);
}

static void out_cb(uv_fs_t *req) {
  host *h = req->data;
  ssize_t res = req->result;

  uv_fs_req_cleanup(req);
  h->out_busy = 0;
  if (res < 0) {
    out_fail(h, (int)res);
    return;
  }
  h->out_bytes += (uint64_t)res;
  h->out_writing.off += (size_t)res;
  if (h->out_writing.off < h->out_writing.len) {
    out_start(h);
    return;
  }
  h->out_writing.len = h->out_writing.off = 0;
  out_start(h);
  host_pump_soon(h);
}

/* Make what is pending the buffer being written, if that one is done.
** Returns whether there is anything to write. */
static int out_next(host *h) {
  outbuf tmp;

  if (h->out_writing.off < h->out_writing.len)
    return 1;
  h->out_writing.len = h->out_writing.off = 0;
  if (h->out_pending.len == 0)
    return 0;
  tmp = h->out_writing;
  h->out_writing = h->out_pending;
  h->out_pending = tmp;
  h->out_pending.len = h->out_pending.off = 0;
  return 1;
}

/* Poll mode: write until done or the output would block. */
static void out_write_poll(host *h) {
  const char *p;
  size_t n;
  ssize_t w;
  int drained = 0;

  while (!h->out_failed && out_next(h)) {
    p = h->out_writing.p + h->out_writing.off;
    n = h->out_writing.len - h->out_writing.off;
    if (h->out_socket)
      w = send(h->out_poll_fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    else
      w = write(h->out_poll_fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!h->out_polling) {
        uv_poll_start(&h->out_poll, UV_WRITABLE, out_poll_cb);
        h->out_polling = 1;
      }
      return;
    }
    if (w < 0) {
      out_fail(h, uv_translate_sys_error(errno));
      return;
    }
    h->out_writing.off += (size_t)w;
    h->out_bytes += (uint64_t)w;
    drained = 1;
  }
  if (h->out_polling) {
    uv_poll_stop(&h->out_poll);
    h->out_polling = 0;
  }
  if (drained)
    host_pump_soon(h);
}

static void out_poll_cb(uv_poll_t *p, int status, int events) {
  host *h = p->data;

  (void)events;
  if (status < 0) {
    out_fail(h, status);
    return;
  }
  out_write_poll(h);
}

/* Write what is pending, one request at a time. */
static void out_start(host *h) {
  uv_buf_t b;
  int rc;

  if (h->out_failed)
    return;
  if (h->out_poll_fd >= 0) {
    if (!h->out_polling) /* else poll_cb goes on when it can */
      out_write_poll(h);
    return;
  }
  if (h->out_busy || !out_next(h))
    return;
  b = uv_buf_init(h->out_writing.p + h->out_writing.off,
                  (unsigned)(h->out_writing.len - h->out_writing.off));
  h->out_req.data = h;
  rc = uv_fs_write(h->loop, &h->out_req, h->out_fd, &b, 1, -1, out_cb);
  if (rc != 0) {
    out_fail(h, rc);
    return;
  }
  h->out_busy = 1;
}

/* Append n bytes and a newline to the output.  [-0, +0, m] */
static void out_append(host *h, lua_State *L, const char *p, size_t n) {
  outbuf *o = &h->out_pending;
  size_t need = n + 1, cap;
  char *q;

  if (h->rout != NULL) {
    rout_emit(h, L, p, n);
    return;
  }
  if (h->out_failed) {
    h->out_abandoned += need;
    return;
  }
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

/* Choose poll mode for out_fd if it suits (see above). Failing that, the
** output stays in fs mode. */
static void out_poll_setup(host *h) {
  struct stat st;
  char path[64];
  int fd, flags;

  if (fstat(h->out_fd, &st) != 0 || S_ISREG(st.st_mode))
    return;
  if (S_ISSOCK(st.st_mode)) {
    fd = h->out_fd; /* send(MSG_DONTWAIT): its flags stay as they are */
    h->out_socket = 1;
  } else if (!S_ISFIFO(st.st_mode) && !S_ISCHR(st.st_mode)) {
    return;
  } else if (h->out_own) {
    fd = h->out_fd; /* our own description already */
  } else {
    snprintf(path, sizeof path, "/proc/self/fd/%d", h->out_fd);
    fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
      return;
    h->out_poll_own = 1;
  }
  flags = fcntl(fd, F_GETFL);
  if (uv_poll_init(h->loop, &h->out_poll, fd) != 0) {
    if (h->out_poll_own)
      close(fd);
    h->out_poll_own = h->out_socket = 0;
    return;
  }
  if (h->out_socket && flags != -1)
    fcntl(fd, F_SETFL, flags); /* uv_poll_init made it non-blocking */
  else
    fcntl(fd, F_SETFL, (flags == -1 ? 0 : flags) | O_NONBLOCK);
  h->out_poll.data = h;
  h->out_poll_fd = fd;
}

int engine_output_open(host *h, char *err, size_t errlen) {
  const char *path = h->o.output;

  h->out_poll_fd = -1;
  if (path != NULL && strncmp(path, "redis-stream://", 15) == 0) {
    if (rout_open(h, path, err, errlen) != 0) {
      char msg[512];
      snprintf(msg, sizeof msg, "cannot open output %s: %s", path, err);
      snprintf(err, errlen, "%s", msg);
      return -1;
    }
    h->out_fd = -1;
    return 0;
  }
  if (path == NULL || strcmp(path, "-") == 0) {
    h->out_fd = 1;
    h->out_own = 0;
  } else {
    h->out_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (h->out_fd < 0) {
      snprintf(err, errlen, "cannot open output %s: %s", path, strerror(errno));
      return -1;
    }
    h->out_own = 1;
  }
  out_poll_setup(h);
  return 0;
}

/* After the grace period, every 250 ms: output waiting on a reader that
** wrote nothing since the last call is abandoned (dropped, counted, said),
** and so is what is emitted after. Output written by libuv's threads (a
** regular file) is not. */
void engine_output_abandon(host *h) {
  uint64_t before = h->out_abandoned;

  if (!h->out_polling || h->out_failed)
    return;
  if (h->out_bytes != h->out_mark) {
    h->out_mark = h->out_bytes; /* still moving: give it one more period */
    return;
  }
  h->out_failed = 1;
  out_drop(h);
  host_report(h,
              "output: nobody reads it: %llu bytes abandoned, and all "
              "further output",
              (unsigned long long)(h->out_abandoned - before));
  host_pump_soon(h);
}

/* Close the output's poll handle: once before the loop's last run. */
void engine_output_stop(host *h) {
  if (h->out_poll_fd >= 0 && !uv_is_closing((uv_handle_t *)&h->out_poll))
    uv_close((uv_handle_t *)&h->out_poll, NULL);
}

void engine_output_close(host *h) {
  rout_free(h);
  if (h->out_poll_own && h->out_poll_fd >= 0)
    close(h->out_poll_fd);
  h->out_poll_fd = -1;
  h->out_poll_own = 0;
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

/* Raise a bad argument error of the method name, counting arguments as
** the caller wrote them (engine:emit(x): x is #1), whatever way the method
** was called (a local, pcall, a field): Lua's own message would say '?'
** or count the engine.  [-0, +0, e] */
static int arg_error(lua_State *L, int arg, const char *name,
                     const char *expected) {
  const char *got = lua_isnone(L, arg) ? "no value" : luaL_typename(L, arg);

  if (arg == 1)
    return luaL_error(L, "calling '%s' on bad self (%s expected, got %s)", name,
                      expected, got);
  return luaL_error(L, "bad argument #%d to '%s' (%s expected, got %s)",
                    arg - 1, name, expected, got);
}

static void check_self(lua_State *L, const char *name) {
  if (!lua_istable(L, 1))
    arg_error(L, 1, name, "engine");
}

static const char *check_str(lua_State *L, int arg, const char *name) {
  int t = lua_type(L, arg);

  if (t != LUA_TSTRING && t != LUA_TNUMBER)
    arg_error(L, arg, name, "string");
  return lua_tostring(L, arg);
}

static void check_num(lua_State *L, int arg, const char *name) {
  if (lua_type(L, arg) != LUA_TNUMBER)
    arg_error(L, arg, name, "number");
}

/* engine:count(name, [n]) -> the new total */
static int engine_count(lua_State *L) {
  host *h = op_engine_ud(L);

  check_self(L, "count");
  check_str(L, 2, "count");
  if (lua_isnoneornil(L, 3)) {
    lua_settop(L, 2);
    lua_pushinteger(L, 1);
  } else {
    check_num(L, 3, "count");
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

  check_self(L, "gauge");
  check_str(L, 2, "gauge");
  check_num(L, 3, "gauge");
  push_ref(L, h->gauges_ref);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 3);
  lua_rawset(L, -3);
  return 0;
}

/* engine:alert(msg): msg on one line of stderr, whatever it holds: control
** characters (a NUL, an escape sequence, a newline) are written as \n,
** \r, \t or \xHH. */
static int engine_alert(lua_State *L) {
  static const char hex[] = "0123456789abcdef";
  host *h = op_engine_ud(L);
  const unsigned char *p;
  luaL_Buffer b;
  size_t n, i;
  char esc[4];

  check_self(L, "alert");
  p = (const unsigned char *)luaL_tolstring(L, 2, &n);
  luaL_buffinit(L, &b);
  for (i = 0; i < n; i++) {
    if (p[i] >= 0x20 && p[i] != 0x7f) {
      luaL_addchar(&b, (char)p[i]);
      continue;
    }
    esc[0] = '\\';
    if (p[i] == '\n' || p[i] == '\r' || p[i] == '\t') {
      esc[1] = p[i] == '\n' ? 'n' : p[i] == '\r' ? 'r' : 't';
      luaL_addlstring(&b, esc, 2);
    } else {
      esc[1] = 'x';
      esc[2] = hex[p[i] >> 4];
      esc[3] = hex[p[i] & 15];
      luaL_addlstring(&b, esc, 4);
    }
  }
  luaL_pushresult(&b);
  h->alerts++;
  host_report(h, "alert: %s", lua_tostring(L, -1));
  return 0;
}

/* engine:emit(record): a string as a line, a table as a line of JSON. */
static int engine_emit(lua_State *L) {
  host *h = op_engine_ud(L);
  const char *s;
  size_t n;
  jbuf *b;

  check_self(L, "emit");
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
    json_encode(L, 2, b, "emit", 0);
    out_append(h, L, b->p, b->len);
    if (b->cap > (1u << 20)) {
      /* Do not keep a huge buffer after one huge record. */
      free(b->p);
      b->p = NULL;
      b->len = b->cap = 0;
    }
    break;
  default:
    return arg_error(L, 2, "emit", "string or table");
  }
  h->out++;
  return 0;
}

int engine_setup(host *h) {
  static const luaL_Reg methods[] = { { "count", engine_count },
                                      { "gauge", engine_gauge },
                                      { "alert", engine_alert },
                                      { "emit", engine_emit },
                                      { NULL, NULL } };
  lua_State *L = h->L;
  int rc;

  lua_newtable(L);
  h->counters_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  h->gauges_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  jbuf_new(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &jbuf_key);
  op_runtime_on_error(h->rt, engine_on_error, h);
  rc = op_register_engine(h->rt, methods, h);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  op_push_engine(h->rt);
  lua_pushliteral(L, "on_event");
  lua_pushcclosure(L, run_event, 3);
  h->event_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  h->dispatch_slot = UINT32_MAX;
  h->deliver = deliver;
  h->deliver_entry = deliver_entry;
  return rc;
}
