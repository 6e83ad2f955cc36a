/* SPDX-License-Identifier: MIT */
/*
** host.h - private declarations of the offpath command: the host state,
** input sources, the line splitter, record decoding and statistics.
** Thread: loop (the command runs everything on the runtime's loop thread).
*/
#ifndef OFFPATH_HOST_H
#define OFFPATH_HOST_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <uv.h>
#include <lua.h>
#include <lauxlib.h>

#include "hist.h"
#include "offpath.h"

#define HOST_MAX_INPUTS  64
#define HOST_MAX_LINE    (1024 * 1024) /* longer lines are dropped */
#define HOST_OUT_HIGH    (8u << 20)    /* output bytes that pause inputs */
#define HOST_PUMP_BATCH  64            /* records per source per round */
#define HOST_PUMP_NS     100000        /* rounds while a pump is younger */
#define HOST_REPORTS_SEC 20            /* error messages printed per second */
#define HOST_LAT_SAMPLE  16            /* fast records: 1 in 16 timed */
#define HOST_LAT_FAST_NS 1000          /* fast: no suspension, under 1 us */

/* ---- the line splitter (lines.c) ---- */

/*
** Splits a byte stream into lines. Bytes are appended at the end (read
** straight into ls_space(), or copied with ls_append()) and lines are taken
** from the front with ls_next(), so a reader can stop taking lines at any
** point (backpressure) and go on later. A line longer than max is dropped
** and reported once as LS_OVERSIZE; memory stays below max plus one read.
*/
typedef struct linesplit {
  char *buf;
  size_t cap;
  size_t start;   /* first byte not yet returned */
  size_t end;     /* end of the bytes read */
  size_t scan;    /* no '\n' in [start, scan) */
  size_t max;     /* longest line kept */
  size_t dropped; /* length of the oversize line being dropped */
  int discarding; /* inside an oversize line: skip to the next '\n' */
} linesplit;

enum { LS_NONE = 0, LS_LINE = 1, LS_OVERSIZE = 2 };

void ls_init(linesplit *ls, size_t max);
void ls_free(linesplit *ls);
/* Room for at least want bytes after the end (the front is compacted
** first). Returns where to write and sets *avail, or NULL on out of
** memory. Call ls_commit() with what was written. */
char *ls_space(linesplit *ls, size_t want, size_t *avail);
void ls_commit(linesplit *ls, size_t n);
/* Copy n bytes in. Returns 0, or -1 on out of memory. */
int ls_append(linesplit *ls, const char *p, size_t n);
/* Take the next line: LS_LINE with *line and *len set (no '\n', a trailing
** '\r' removed; valid until the next ls_* call), LS_OVERSIZE when a line
** longer than the maximum was dropped (*len: its length), or LS_NONE if no
** complete line is buffered. With eof set, unterminated bytes at the end
** are returned as a last line. */
int ls_next(linesplit *ls, int eof, const char **line, size_t *len);
/* Complete or partial lines still buffered (for accounting at shutdown). */
uint64_t ls_pending(const linesplit *ls);

/* ---- JSON (json.c) ---- */

/* Parse one line of JSON text with jansson and push its Lua value on L:
** objects and arrays become tables, null becomes nil (keys with null values
** are left out), integers stay integers. Returns 1 with the value pushed,
** 0 with nothing pushed and a message in err ("... at column N"), or -1
** with nothing pushed if the value cannot be made (out of memory).
** [-0, +(0|1), -] */
int json_push_line(lua_State *L, const char *p, size_t len, char *err,
                   size_t errlen);

/* A growable byte buffer owned by a Lua userdata (freed by its __gc), so
** it is safe to hold while Lua may raise. */
typedef struct jbuf {
  char *p;
  size_t len, cap;
} jbuf;

/* Push a new empty buffer.  [-0, +1, m] */
jbuf *jbuf_new(lua_State *L);
/* Append n bytes; raises "not enough memory".  [-0, +0, m] */
void jbuf_add(lua_State *L, jbuf *b, const char *s, size_t n);

/* Append the JSON text of the Lua value at idx to b (compact, object keys
** sorted, floats in their shortest exact form). Raises a message starting
** with what ("emit: ...") for a value JSON cannot hold: a function,
** userdata, a thread, a non-string non-integer key, invalid UTF-8, or a
** table nested deeper than 1000 levels (a cycle). With lossy set, a byte
** that is not part of valid UTF-8 is written as \ufffd instead (the
** summary, whose counter names come from records).  [-0, +0, e] */
void json_encode(lua_State *L, int idx, jbuf *b, const char *what, int lossy);

/* ---- statistics helpers (stats.c) ---- */

/* Latency histograms: op_hist (src/hist.h, shared with the runtime). */

/* ---- the host ---- */

typedef struct host host;
typedef struct src src;
typedef struct rstream rstream; /* rstream.c */
typedef struct rentry rentry;
typedef struct rout rout;
typedef struct metrics metrics;

typedef enum src_kind {
  SRC_FILE = 0,   /* regular file or device: uv_fs_read in chunks */
  SRC_STREAM,     /* pipe, FIFO, socket or terminal: uv_read */
  SRC_TCP_SERVER, /* tcp://HOST:PORT listener */
  SRC_TCP_CLIENT, /* one accepted connection */
  SRC_UDP,        /* udp://HOST:PORT, read with recvmmsg */
  SRC_RSTREAM     /* redis-stream://: a consumer group (rstream.c) */
} src_kind;

/* One input source. Freed once its handle is closed and no record that
** came from it is in flight (refs). */
struct src {
  host *h;
  src *next; /* the host's list of sources */
  src *top;  /* the listener of a TCP client, else itself */
  src_kind kind;
  char *name; /* as given, or "tcp://... client ADDR" */
  linesplit ls;
  int fd;             /* SRC_FILE, SRC_UDP: owned; -1 when none */
  int own_fd;         /* close fd when done */
  int refs;           /* records in flight + 1 while open */
  uint8_t has_handle; /* u.handle was initialised */
  uint8_t reading;    /* stream: uv_read_start; udp: polling */
  uint8_t req_busy;   /* file: a read is outstanding */
  uint8_t eof;        /* no more bytes will come */
  uint8_t closing;    /* src_close() ran */
  uint8_t closed;     /* the handle or fd is closed */
  uint8_t counted;    /* counted in h->nopen */
  uint64_t lineno;    /* lines taken so far */
  uint64_t records, malformed, oversize, bytes;
  uint64_t clients;   /* TCP listener: connections accepted */
  uint64_t drops;     /* UDP: datagrams the kernel dropped */
  uint64_t truncated; /* UDP: datagrams longer than the buffer */
  char *udp_buf;      /* UDP: receive buffers */
  rstream *rs;        /* SRC_RSTREAM: the consumer */
  uv_fs_t req;        /* SRC_FILE reads */
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_pipe_t pipe;
    uv_tty_t tty;
    uv_tcp_t tcp;
    uv_poll_t poll;
  } u;
};

typedef enum rec_kind { REC_EVENT = 0, REC_START, REC_TICK, REC_STOP } rec_kind;

/* A handler call in flight: a record, or a lifecycle handler. */
typedef struct rec {
  src *s;        /* SRC of an event (referenced), else NULL */
  rentry *entry; /* a stream entry (tracked call), else NULL */
  uint64_t line; /* line number within s */
  uint64_t t0;   /* uv_hrtime() when it was handed over; 0: not timed */
  uint32_t next_free;
  uint8_t kind; /* rec_kind */
  uint8_t live;
} rec;

/* Output: emit() appends to `pending`; one uv_fs_write at a time writes
** `writing` (on libuv's threads), so the loop thread never blocks. */
typedef struct outbuf {
  char *p;
  size_t len, off, cap;
} outbuf;

typedef struct pool_opt {
  char *name;
  int threads;
  size_t mem; /* memory limit per worker VM, bytes; (size_t)-1: not given */
} pool_opt;

typedef struct host_opts {
  const char *script;
  const char *inputs[HOST_MAX_INPUTS];
  int ninputs;
  int json;           /* --format json */
  const char *output; /* NULL or "-": stdout */
  pool_opt pools[OP_MAX_POOLS];
  int npools;
  double tick; /* seconds */
  int max_inflight;
  double grace; /* seconds */
  int stats;
  int summary_json;    /* --json: the summary and --stats lines as JSON */
  int quiet;           /* --quiet: no summary */
  int fail_on_error;   /* --fail-on-error: exit 4 if errors were counted */
  const char *compat;  /* --compat NAME: offpath.NAME drives the script */
  const char *metrics; /* --metrics HOST:PORT, or NULL */
} host_opts;

struct host {
  host_opts o;
  op_runtime *rt;
  uv_loop_t *loop;
  lua_State *L;
  uint64_t t_start;

  /* Upward calls: each installed by the part above that answers it. */
  /* engine.c: hand a line of s to on_event (said there if it is malformed
  ** JSON). Returns whether it was a record. */
  int (*deliver)(host *h, src *s, const char *line, size_t len);
  /* engine.c: hand the data of stream entry e, whose table is on top of L
  ** (popped), to on_event(engine, record, entry) as a tracked call.
  ** Returns 1, 0 if the record is malformed (err set; nothing was called),
  ** -1 on out of memory. */
  int (*deliver_entry)(host *h, src *s, const char *data, size_t len, rentry *e,
                       char *err, size_t errlen);
  void (*pump)(host *h); /* input.c: hand what is read to the engine */
  void (*stop)(host *h); /* main.c: close the inputs, then the grace period */

  /* Sources. */
  src *srcs;
  int nopen;       /* inputs not yet at their end */
  int stdin_flags; /* fcntl flags of fd 0 to restore, or -1 */

  /* Handler calls in flight. */
  rec *recs;
  uint32_t nrecs, free_rec;
  uint32_t inflight; /* on_event calls started and not ended */
  uint32_t inflight_max;
  int pumping; /* inside pump_all(): no re-entry */
  int paused;  /* reading stopped by backpressure */
  int no_handler_warned;

  /* Dispatch and record latency (engine.c). */
  int event_ref;          /* run_event(): on_event's coroutine body */
  uint32_t dispatch_slot; /* the record engine_dispatch() runs, or
                             UINT32_MAX */
  uint32_t lat_streak;    /* timed records in a row that were fast */
  uint64_t lat_untimed;   /* fast records not timed since the last one */
  uint64_t lat_last;      /* latency of the last timed fast record */

  /* Lifecycle. */
  int started; /* on_start ended (or there was none) */
  int start_failed, stop_failed;
  int start_cancelled; /* on_start was cancelled by a signal */
  int stopping;        /* inputs closed: signal or on_start failure */
  int stop_signal;     /* signal number that began the stop, or 0 */
  int cancelled_all;   /* the grace period ran out */
  int tick_running;
  uint64_t tick_t0;

  /* Counters. */
  uint64_t in, processed, failed, cancelled, timeouts;
  uint64_t malformed, oversize, skipped, out, alerts;
  uint64_t rt_errors; /* reported by the runtime's error callback */
  uint64_t ticks, tick_overruns, tick_failed;
  uint64_t pauses; /* times reading stopped for backpressure */
  uint64_t paused_ns, paused_since;
  uint64_t out_errors;
  uint64_t out_bytes;     /* written */
  uint64_t out_abandoned; /* bytes dropped unwritten at stop */
  op_hist rec_hist;       /* record latency, read to handler end */
  int counters_ref, gauges_ref;

  /* Rate limit of messages. */
  uint64_t report_window;
  int reports;
  uint64_t suppressed;

  /* Output. */
  int out_fd;
  int out_own;
  int out_busy;
  int out_failed;
  int out_broken;  /* the reader went away: exit 141 */
  int out_poll_fd; /* poll mode: the descriptor written, else -1 */
  int out_poll_own;
  int out_socket;    /* poll mode on a socket: send(MSG_DONTWAIT) */
  int out_polling;   /* waiting until the output is writable */
  uint64_t out_mark; /* out_bytes at the last engine_output_abandon() */
  outbuf out_pending, out_writing;
  uv_fs_t out_req;
  rout *rout;        /* --output redis-stream://, else NULL */
  uint64_t out_held; /* its bytes not yet confirmed */
  uv_poll_t out_poll;

  /* Handles (all unreferenced: they never keep the loop alive). */
  uv_timer_t tick_timer, second_timer;
  uv_timer_t grace_timer; /* the grace period; at 0 ms: host_stop_soon() */
  uv_idle_t pump_idle;    /* host_pump_soon() */
  uv_async_t sig_async;   /* a signal was caught (main.c) */
  uv_timer_t beat_timer;  /* the watchdog's view of the loop */
  int sigs_seen;          /* signals handled on the loop thread */
  int handles_open;

  metrics *metrics; /* --metrics server, or NULL */

  /* --stats line */
  int stats_tty;
  int stats_line_open;
  uint64_t last_in, last_t;
};

/*
** The floors of the command, from the top: main.c (options, lifecycle,
** signals; it wires the rest), metrics.c, stats.c, engine.c, input.c,
** rstream.c, and the ground floor host.c, lines.c and json.c. A file calls
** only files below it. Where a lower part must reach a higher one as the
** program runs, it goes through a callback of struct host that the higher
** part installs: a record goes up to the engine through h->deliver, a
** request to pump or to stop through host_pump_soon() and
** host_stop_soon().
*/

/* ---- the ground floor (host.c) ---- */

/* Print "offpath: MESSAGE" on stderr, at most HOST_REPORTS_SEC a second
** (the rest are counted and said as suppressed). */
void host_report(host *h, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Say how many messages the rate limit held back, if any. */
void host_report_flush(host *h);
/* Records may move again (a handler ended, output drained, a stream read
** entries): pump the inputs (h->pump) on the next loop turn. */
void host_pump_soon(host *h);
/* Stop on the next loop turn (h->stop), as on a first SIGINT: from inside
** a handler, whose input is being read. */
void host_stop_soon(host *h);

/*
** The host's one door into Lua, for every call it makes: host_door(L)
** pushes the door's message handler (the runtime's op__traceback: the
** message, which names FILE:LINE, and a traceback), so an error reads the
** same wherever it happened; then the caller pushes the function and its
** nargs arguments, and host_pcallk() calls it in protected mode. The
** handler goes first, not slipped under the function afterwards, so the
** call of every record moves nothing on the stack.
**
** host_pcallk returns the status of lua_pcallk, with the error message on
** top on failure. Without k the handler is then removed. With k the call
** may yield (a handler's coroutine body) and k continues it as in
** lua_pcallk; the handler then stays below the results or the message,
** whether k runs after a yield or the call returned at once.
*/
/* The door's message handler: the runtime's op__traceback.  [-1, +1, m] */
int host_msgh(lua_State *L);

#ifdef OP_DEBUG
/* Test builds with OFFPATH_TEST_OOM set in the environment: make the n-th
** allocation of any VM from now fail (then the next one too), or with n
** 0 stop (tests/sh/host-oom.sh). Otherwise nothing. */
void host_test_oom(uint64_t n);
#else
#define host_test_oom(n) ((void)0)
#endif

/* Push the door's message handler.  [-0, +1, -] */
static inline void host_door(lua_State *L) {
  lua_pushcfunction(L, host_msgh);
}

/* Call the function above the handler.  [-(nargs+2), +(nres|1), -]
** (with k: [-(nargs+1), +(nres|1), -]) */
static inline int host_pcallk(lua_State *L, int nargs, int nres,
                              lua_KContext ctx, lua_KFunction k) {
  int mh = lua_gettop(L) - nargs - 1;
  int status = lua_pcallk(L, nargs, nres, mh, ctx, k);

  if (k == NULL)
    lua_remove(L, mh);
  return status;
}
#define host_pcall(L, nargs, nres) host_pcallk((L), (nargs), (nres), 0, NULL)

/* ---- input.c ---- */

/* Install h->pump. */
void input_setup(host *h);
int input_open(host *h, const char *spec, char *err, size_t errlen);
void input_close_all(host *h);
void input_free_all(host *h);
void input_src_unref(src *s);
void input_udp_refresh_drops(src *s);
const char *input_kind_name(src_kind k);

/* ---- engine.c ---- */

/* Make the engine's table and methods, and install h->deliver. */
int engine_setup(host *h);
int engine_call_lifecycle(host *h, const char *name, rec_kind kind);
int engine_cancel_all(host *h);
void engine_latency_flush(host *h);
int engine_output_open(host *h, char *err, size_t errlen);
void engine_output_abandon(host *h);
void engine_output_stop(host *h);
void engine_output_close(host *h);
void engine_started(host *h);
void engine_on_error(op_runtime *rt, const char *msg, void *ud);

/* Whether records wait: before on_start ended, while stopping, at
** --max-inflight handlers in flight or with too much output pending. */
static inline int engine_blocked(const host *h) {
  return !h->started || h->stopping ||
         h->inflight >= (uint32_t)h->o.max_inflight ||
         h->out_pending.len >= HOST_OUT_HIGH || h->out_held >= HOST_OUT_HIGH;
}

/* ---- rstream.c: redis-stream:// inputs and output ---- */

/* Make s (a new SRC_RSTREAM source) the consumer that spec names.
** Returns 0, or -1 with a message in err (s is left as it was). */
int rstream_open(src *s, const char *spec, char *err, size_t errlen);
void rstream_pump(src *s, int *budget);
void rstream_read(src *s);
void rstream_close(src *s);
void rstream_destroy(src *s);
void rstream_push_stats(src *s, lua_State *L);
void rstream_stats_text(src *s, char *buf, size_t len);
const char *rstream_entry_id(const rentry *e);
void rstream_handler_failed(rentry *e, const char *msg);
void rstream_track_end(op_runtime *rt, const char *err, void *ud);
int rout_open(host *h, const char *spec, char *err, size_t errlen);
void rout_emit(host *h, lua_State *L, const char *p, size_t n);
void rout_stats_text(host *h, char *buf, size_t len);
void rout_free(host *h);

/* ---- stats.c ---- */

/* Add the engine's stats method. */
int stats_setup(host *h);
void stats_line(host *h);
void stats_summary(host *h);
uint64_t stats_drops(host *h);
/* The errors of the summary (failed records, ticks and lifecycle handlers,
** runtime errors, output errors). */
uint64_t stats_errors(host *h);

/* ---- metrics.c ---- */

/* Serve the statistics on --metrics HOST:PORT (nothing without it).
** Returns 0, or -1 with a message in err. */
int metrics_start(host *h, char *err, size_t errlen);
/* Stop serving; the state is freed by the loop's next turn. */
void metrics_stop(host *h);

#endif /* OFFPATH_HOST_H */
