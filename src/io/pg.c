/* SPDX-License-Identifier: MIT */
/*
** pg.c - offpath.pg: non-blocking PostgreSQL on libpq's asynchronous API,
** with a pool of connections per database object.
** Thread: loop, except cancel_work() (an io pool thread).
**
** DESIGN
**
** A database object (pg_db) owns up to `pool` connections (pg_conn). Each
** connection is a PGconn in non-blocking mode whose socket is watched by a
** uv_poll; nothing here ever waits on the socket. A query (pg_req) waits in
** the db's FIFO queue until a connection is free.
**
** Connection states (conn->state):
**
**   conn_start --> CONNECTING --PQconnectPoll OK--> conn_release --+
**                      |                                          |
**                      | failed, deadline             +-----------+
**                      v                              v           |
**                    DEAD <--- lost, closed --- IDLE <--+--> BUSY --+
**                      ^                                  query_done /
**                      +------------- lost ------------- cancel_done
**
**  - CONNECTING: conn_connect_step() runs PQconnectPoll on every poll
**    event. libpq may close its socket and open another between two calls
**    (next address, SSL fallback), so the poll is stopped before each call
**    and re-made on the new socket when PQsocket() changed.
**  - IDLE: in db->idle; its socket is watched for input so a connection the
**    server closed is noticed and dropped before it is used.
**  - BUSY: running conn->req, or draining the results of a query whose
**    waiter went away, or waiting for the cancel request of such a query
**    (conn->cancelling). A connection goes back to the pool only when both
**    its results are drained and its cancel request is done, so a late
**    cancel can never hit the next query.
**  - DEAD: socket closed, PQfinish'ed; the struct is freed in
**    conn_maybe_free() once its uv handles are closed and no cancel task
**    points at it.
**
** Requests (req->state): QUEUED (in db's queue) -> RUNNING (on a conn) ->
** DONE (on the module's finished list, result or message attached). A
** request whose wait ends early (timeout, task:cancel) is ABORTED: a queued
** one is freed at once; a running one stays on its connection, which sends
** a cancel request (PQcancel, which blocks, runs as a C task on the io pool)
** and drains the results before the connection is reused.
**
** Resuming a coroutine runs Lua, which may call back into this file. So a
** finished request is only put on mod->fin, and the finished list is
** delivered at the end of each top-level callback (leave()), or on the next
** loop turn when the request finished outside one. Lists and connections
** are consistent whenever Lua runs.
**
** The first connection belongs to a connect request (KIND_CONNECT):
** pg.connect waits on it in a handler; where nothing may suspend, nobody
** waits on it, and queries queued meanwhile are served by it, or fail
** with its error.
**
** Host names: libpq resolves a host name with a blocking getaddrinfo() in
** PQconnectPoll unless `hostaddr` is given. pg.connect therefore resolves
** every host name with uv_getaddrinfo first and passes the addresses as
** hostaddr (host is kept, for TLS and password files). The result is kept
** for the pool's later connections; the pool does not grow while the
** look-up runs (db->resolving).
**
** Reconnecting: a connection the server closed (restart, termination) is
** dropped, and the next query opens a new one; the db object stays
** usable. After a connect fails, the next attempt waits (backoff_min,
** doubled on each failure in a row up to backoff_max; a success resets
** it); while it waits and no connection is up, queries fail at once with
** the last connect error and the time left.
**
** Lifetime: a db is freed when its refs drop to zero; the Lua object, each
** connection, each request and the resolver hold one.
*/
#include <arpa/inet.h>
#include <stdarg.h>
#include <math.h>
#include <string.h>
#include <libpq-fe.h>

#include "internal.h"

#define DB_MT        "offpath.pg"
#define DEFAULT_POOL 4
#define MAX_POOL     1000
#define BACKOFF_MIN  0.1 /* seconds before reconnecting after a failure */
#define BACKOFF_MAX  2.0 /* seconds, at most */

/* Type OIDs (pg_type.dat); stable across server versions. */
#define OID_BOOL    16
#define OID_BYTEA   17
#define OID_INT8    20
#define OID_INT2    21
#define OID_INT4    23
#define OID_OID     26
#define OID_FLOAT4  700
#define OID_FLOAT8  701
#define OID_NUMERIC 1700

typedef struct pg_mod pg_mod;
typedef struct pg_db pg_db;
typedef struct pg_conn pg_conn;
typedef struct pg_req pg_req;
typedef struct pg_resolve pg_resolve;

struct pg_mod {
  op_runtime *rt;
  pg_db *dbs;                  /* every db not yet freed */
  pg_req *fin_head, *fin_tail; /* finished requests to deliver */
  int in_cb;                   /* nesting of top-level callbacks */
  int flush_deferred;          /* a deferred flush is queued */
  int pending;                 /* uv handles and requests not yet called back */
};

enum { CONN_CONNECTING, CONN_IDLE, CONN_BUSY, CONN_DEAD };
enum { REQ_NEW, REQ_QUEUED, REQ_RUNNING, REQ_ABORTED, REQ_DONE };
enum { KIND_QUERY, KIND_CONNECT };

struct pg_db {
  op_runtime *rt;
  pg_mod *mod;        /* NULL once the module shut down */
  pg_db *next, *prev; /* in mod->dbs */
  int refs;
  int closed;             /* db:close() or collected: no new queries */
  int resolving;          /* host names are being looked up */
  char **keys, **vals;    /* PQconnectStartParams arrays, NULL-ended */
  int max;                /* pool size */
  double timeout;         /* default query timeout, 0: none */
  double connect_timeout; /* pool connections' deadline, 0: none */
  pg_conn *conns;         /* every connection not yet freed */
  pg_conn *idle;          /* idle connections, most recent first */
  int nconns;             /* connections not DEAD */
  int nconnecting, nidle, nbusy;
  pg_req *wait_head, *wait_tail;
  int nwaiting;
  int64_t opened;                  /* connections ever established */
  double backoff_min, backoff_max; /* seconds */
  int fails;                       /* connects failed in a row */
  uint64_t retry_at;               /* loop time (ms) of the next attempt */
  char *last_err;                  /* why the last connect failed */
};

struct pg_conn {
  pg_db *db;
  pg_conn *next, *prev; /* in db->conns */
  pg_conn *idle_next;   /* in db->idle */
  PGconn *pq;
  uv_poll_t *poll; /* watching fd, or NULL */
  int fd;
  int events;        /* what poll is started for; 0: stopped */
  uv_timer_t *timer; /* connect deadline, or NULL */
  int state;
  int flushing;   /* PQflush has more to send */
  int cancelling; /* a cancel task points at this connection */
  int handles;    /* open uv handles (poll, timer) */
  pg_req *req;    /* the query or connect running, or NULL */
};

struct pg_req {
  pg_db *db;
  op_wait_id wait;     /* 0 when nobody waits any more */
  pg_req *next, *prev; /* db's queue, or the mod's finished list */
  pg_conn *conn;       /* RUNNING: the connection */
  int state;
  int kind;
  int udref;             /* connect: the db object while connecting */
  pg_resolve *resolving; /* connect: the host name look-up running */
  PGresult *res;         /* the last result */
  char *errmsg;          /* the error, without the script position */
  const char *sql;
  int nparams;
  const char **params;
};

/* Resolving host names for pg.connect: one host entry at a time. */
struct pg_resolve {
  uv_getaddrinfo_t gai;
  pg_db *db;
  pg_req *req;           /* the connect request, NULL once aborted */
  char **hosts, **ports; /* split lists; ports may be NULL */
  int nhosts, nports, hi;
  op_buf host, addr, port; /* the lists being built */
  int n;                   /* entries in them */
};

static void leave(pg_mod *mod);
static void conn_release(pg_conn *c);
static void conn_drop(pg_conn *c, const char *msg);
static void conn_connect_step(pg_conn *c);
static void maybe_grow(pg_db *db);
static void poll_cb(uv_poll_t *h, int status, int events);

/* ---- small helpers ---- */

/* A malloc'ed copy of a printf-style message, or NULL on out of memory. */
static char *msgf(const char *fmt, ...) {
  va_list ap;
  char *p;
  int n;

  va_start(ap, fmt);
  n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0 || (p = malloc((size_t)n + 1)) == NULL)
    return NULL;
  va_start(ap, fmt);
  vsnprintf(p, (size_t)n + 1, fmt, ap);
  va_end(ap);
  return p;
}

/* Copy libpq's message into buf as one line: runs of white space become
** one space, the trailing newline goes, and so do hint lines (those that
** start with a tab, "Is the server running ...?"). */
static const char *oneline(const char *s, char *buf, size_t len) {
  size_t o = 0;
  int space = 0;

  if (s == NULL)
    s = "";
  for (; *s != '\0' && o + 1 < len; s++) {
    if (s[0] == '\n' && s[1] == '\t') {
      while (s[1] != '\0' && s[1] != '\n')
        s++;
      space = 1;
      continue;
    }
    if (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r') {
      space = 1;
      continue;
    }
    if (space && o > 0)
      buf[o++] = ' ';
    space = 0;
    if (o + 1 < len)
      buf[o++] = *s;
  }
  buf[o] = '\0';
  return buf;
}

/* The message of a failed connection attempt: libpq's "connection to
** server at "h", port p failed: REASON" becomes "REASON (server at "h",
** port p)", one per attempt, joined with "; ". */
static char *connect_error(PGconn *pq) {
  char line[1024], out[2048];
  const char *m = pq != NULL ? PQerrorMessage(pq) : "not enough memory";
  const char *p, *f;
  size_t o = 0;
  int n;

  oneline(m, line, sizeof line);
  out[0] = '\0';
  p = line;
  while (*p != '\0' && o < sizeof out) {
    const char *next = strstr(p + 1, "connection to server ");
    size_t seg = next != NULL ? (size_t)(next - p) : strlen(p);

    while (seg > 0 && p[seg - 1] == ' ')
      seg--;
    f = strstr(p, " failed: ");
    if (strncmp(p, "connection to server ", 21) == 0 && f != NULL &&
        f < p + seg) {
      n = snprintf(out + o, sizeof out - o, "%s%.*s (server %.*s)",
                   o > 0 ? "; " : "", (int)(p + seg - (f + 9)), f + 9,
                   (int)(f - (p + 21)), p + 21);
    } else {
      n = snprintf(out + o, sizeof out - o, "%s%.*s", o > 0 ? "; " : "",
                   (int)seg, p);
    }
    if (n < 0)
      break;
    o += (size_t)n;
    if (next == NULL)
      break;
    p = next;
  }
  return msgf("pg: connection failed: %s", out[0] ? out : "unknown error");
}

/* "pg: ERROR 42P01: relation "nope" does not exist" from an error result. */
static char *result_error(const PGresult *res) {
  const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
  const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
  const char *prim = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
  const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
  char line[1024];

  if (state == NULL) /* made by libpq itself, e.g. a lost connection */
    return msgf("pg: %s",
                oneline(PQresultErrorMessage(res), line, sizeof line));
  if (sev == NULL)
    sev = PQresultErrorField(res, PG_DIAG_SEVERITY);
  if (prim == NULL)
    prim = oneline(PQresultErrorMessage(res), line, sizeof line);
  return msgf("pg: %s %s: %s%s%s", sev != NULL ? sev : "ERROR", state, prim,
              detail != NULL ? "; DETAIL: " : "", detail != NULL ? detail : "");
}

/* ---- the module, databases, requests ---- */

static void db_unref(pg_db *db) {
  int i;

  if (--db->refs > 0)
    return;
  if (db->mod != NULL) {
    if (db->prev != NULL)
      db->prev->next = db->next;
    else
      db->mod->dbs = db->next;
    if (db->next != NULL)
      db->next->prev = db->prev;
  }
  for (i = 0; db->keys != NULL && db->keys[i] != NULL; i++) {
    free(db->keys[i]);
    free(db->vals[i]);
  }
  free(db->keys);
  free(db->vals);
  free(db->last_err);
  free(db);
}

/* A connect of db failed with msg: the next one waits. */
static void connect_failed(pg_db *db, const char *msg) {
  double delay = db->backoff_min;
  int i;

  for (i = 0; i < db->fails && delay < db->backoff_max; i++)
    delay *= 2;
  if (delay > db->backoff_max)
    delay = db->backoff_max;
  db->fails++;
  db->retry_at = uv_now(db->rt->loop) + (uint64_t)(delay * 1000.0);
  free(db->last_err);
  db->last_err = msg != NULL ? msgf("%s", msg) : NULL;
}

static void req_free(pg_req *r) {
  pg_db *db = r->db;

  if (r->res != NULL)
    PQclear(r->res);
  free(r->errmsg);
  if (r->udref != LUA_NOREF)
    luaL_unref(db->rt->L, LUA_REGISTRYINDEX, r->udref);
  free(r);
  db_unref(db);
}

/* A request without parameters (connect); NULL on out of memory. */
static pg_req *req_new(pg_db *db, int kind) {
  pg_req *r = calloc(1, sizeof *r);

  if (r == NULL)
    return NULL;
  r->db = db;
  r->kind = kind;
  r->udref = LUA_NOREF;
  db->refs++;
  return r;
}

static void deferred_flush(op_runtime *rt, void *arg);

/* Hand a request to its waiter: now if inside a callback (leave() delivers
** it), else on the next loop turn. Takes ownership of msg (may be NULL:
** the request has its result). */
static void req_finish(pg_req *r, char *msg) {
  pg_mod *mod = r->db->mod;

  /* The first error is the most telling one: keep it. */
  if (msg != NULL && r->errmsg == NULL)
    r->errmsg = msg;
  else
    free(msg);
  r->state = REQ_DONE;
  r->conn = NULL;
  if (mod == NULL) {
    req_free(r);
    return;
  }
  r->next = NULL;
  if (mod->fin_tail != NULL)
    mod->fin_tail->next = r;
  else
    mod->fin_head = r;
  mod->fin_tail = r;
  if (mod->in_cb == 0 && !mod->flush_deferred) {
    mod->flush_deferred = 1;
    op__defer(mod->rt, deferred_flush, mod);
  }
}

/* Finish r with a copy of msg (out of memory: a fixed message). */
static void req_fail(pg_req *r, const char *msg) {
  char *m = msgf("%s", msg);
  req_finish(r, m != NULL ? m : msgf("pg: not enough memory"));
}

static void queue_push(pg_db *db, pg_req *r, int front) {
  r->state = REQ_QUEUED;
  r->prev = r->next = NULL;
  if (front) {
    r->next = db->wait_head;
    if (db->wait_head != NULL)
      db->wait_head->prev = r;
    else
      db->wait_tail = r;
    db->wait_head = r;
  } else {
    r->prev = db->wait_tail;
    if (db->wait_tail != NULL)
      db->wait_tail->next = r;
    else
      db->wait_head = r;
    db->wait_tail = r;
  }
  db->nwaiting++;
}

static void queue_remove(pg_db *db, pg_req *r) {
  if (r->prev != NULL)
    r->prev->next = r->next;
  else
    db->wait_head = r->next;
  if (r->next != NULL)
    r->next->prev = r->prev;
  else
    db->wait_tail = r->prev;
  r->prev = r->next = NULL;
  db->nwaiting--;
}

/* Fail every queued request with msg. */
static void fail_waiters(pg_db *db, const char *msg) {
  pg_req *r;

  while ((r = db->wait_head) != NULL) {
    queue_remove(db, r);
    req_fail(r, msg);
  }
}

/* ---- delivering results ---- */

/* Push the value of one field.  [-0, +1, m] */
static void push_value(lua_State *L, const PGresult *res, int row, int col,
                       Oid type) {
  const char *v = PQgetvalue(res, row, col);
  size_t len = (size_t)PQgetlength(res, row, col);
  char *end;

  switch (type) {
  case OID_INT2:
  case OID_INT4:
  case OID_INT8:
  case OID_OID:
    lua_pushinteger(L, (lua_Integer)strtoll(v, &end, 10));
    return;
  case OID_FLOAT4:
  case OID_FLOAT8:
  case OID_NUMERIC:
    lua_pushnumber(L, (lua_Number)strtod(v, &end));
    return;
  case OID_BOOL:
    lua_pushboolean(L, v[0] == 't');
    return;
  case OID_BYTEA:
    if (len >= 2 && v[0] == '\\' && v[1] == 'x') {
      luaL_Buffer b;
      size_t i;
      char *p = luaL_buffinitsize(L, &b, (len - 2) / 2);

      for (i = 2; i + 1 < len; i += 2) {
        int hi = v[i] <= '9' ? v[i] - '0' : (v[i] | 0x20) - 'a' + 10;
        int lo =
            v[i + 1] <= '9' ? v[i + 1] - '0' : (v[i + 1] | 0x20) - 'a' + 10;
        *p++ = (char)(hi << 4 | lo);
      }
      luaL_pushresultsize(&b, (len - 2) / 2);
      return;
    }
    break; /* escape format: leave it as the server sent it */
  default:
    break;
  }
  lua_pushlstring(L, v, len);
}

/* Protected: push the rows of the PGresult (light userdata 1) and the
** count: affected rows for commands that have one, else the row count.
** [-0, +2, m] */
static int push_result(lua_State *L) {
  PGresult *res = lua_touserdata(L, 1);
  int ntup = res != NULL ? PQntuples(res) : 0;
  int nf = res != NULL ? PQnfields(res) : 0;
  int i, f, base;
  const char *tag;

  luaL_checkstack(L, nf + 8, "too many columns");
  lua_createtable(L, ntup, 0);
  base = lua_gettop(L);
  for (f = 0; f < nf; f++)
    lua_pushstring(L, PQfname(res, f));
  for (i = 0; i < ntup; i++) {
    lua_createtable(L, 0, nf);
    for (f = 0; f < nf; f++) {
      if (PQgetisnull(res, i, f))
        continue;
      lua_pushvalue(L, base + 1 + f);
      push_value(L, res, i, f, PQftype(res, f));
      lua_rawset(L, -3);
    }
    lua_rawseti(L, base, (lua_Integer)i + 1);
  }
  lua_settop(L, base);
  tag = res != NULL ? PQcmdTuples(res) : "";
  if (tag[0] != '\0')
    lua_pushinteger(L, (lua_Integer)strtoll(tag, NULL, 10));
  else
    lua_pushinteger(L, ntup);
  return 2;
}

/* Resume r's waiter with its result or error, and free r. The waiter may
** run Lua at once: nothing but r may be touched here. */
static void deliver(pg_req *r) {
  op_runtime *rt = r->db->rt;
  op_wait_id id = r->wait;
  lua_State *co = id != 0 ? op__wait_thread(rt, id) : NULL;
  lua_State *L = rt->L;
  const char *call =
      r->kind == KIND_CONNECT ? "offpath.pg.connect" : "db:query";
  char where[256];
  char *msg;
  int top;

  if (co == NULL || !lua_checkstack(co, 4)) {
    req_free(r);
    if (co != NULL)
      op__wait_fail(rt, id, "pg: not enough memory");
    return;
  }
  if (r->errmsg != NULL) {
    msg = msgf("%s (%s at %s)", r->errmsg, call,
               op__where(co, where, sizeof where));
    req_free(r);
    op__wait_fail(rt, id, msg != NULL ? msg : "pg: not enough memory");
    free(msg);
    return;
  }
  if (r->kind == KIND_CONNECT) {
    lua_rawgeti(co, LUA_REGISTRYINDEX, r->udref);
    req_free(r);
    op__wait_resume(rt, id, 1);
    return;
  }
  top = lua_gettop(L);
  lua_pushcfunction(L, push_result);
  lua_pushlightuserdata(L, r->res);
  if (op__pcall(L, 1, 2, NULL) != LUA_OK) {
    lua_settop(L, top);
    req_free(r);
    op__wait_fail(rt, id, "pg: not enough memory for the result");
    return;
  }
  lua_xmove(L, co, 2);
  req_free(r);
  op__wait_resume(rt, id, 2);
}

static void flush(pg_mod *mod) {
  pg_req *r;

  while ((r = mod->fin_head) != NULL) {
    mod->fin_head = r->next;
    if (mod->fin_head == NULL)
      mod->fin_tail = NULL;
    r->next = NULL;
    deliver(r);
  }
}

static void enter(pg_mod *mod) {
  mod->in_cb++;
}

/* End of a top-level callback: deliver what finished meanwhile. */
static void leave(pg_mod *mod) {
  if (mod->in_cb == 1)
    flush(mod);
  mod->in_cb--;
}

static void deferred_flush(op_runtime *rt, void *arg) {
  pg_mod *mod = arg;

  (void)rt;
  mod->flush_deferred = 0;
  enter(mod);
  leave(mod);
}

/* ---- connections: handles ---- */

/* Move c to state st, keeping the db's counters (not the idle list). */
static void set_state(pg_conn *c, int st) {
  pg_db *db = c->db;

  switch (c->state) {
  case CONN_CONNECTING:
    db->nconnecting--;
    break;
  case CONN_IDLE:
    db->nidle--;
    break;
  case CONN_BUSY:
    db->nbusy--;
    break;
  default:
    break;
  }
  switch (st) {
  case CONN_CONNECTING:
    db->nconnecting++;
    break;
  case CONN_IDLE:
    db->nidle++;
    break;
  case CONN_BUSY:
    db->nbusy++;
    break;
  default:
    db->nconns--;
    break;
  }
  c->state = st;
}

static void conn_maybe_free(pg_conn *c) {
  pg_db *db = c->db;

  if (c->state != CONN_DEAD || c->handles > 0 || c->cancelling)
    return;
  if (c->prev != NULL)
    c->prev->next = c->next;
  else
    db->conns = c->next;
  if (c->next != NULL)
    c->next->prev = c->prev;
  free(c);
  db_unref(db);
}

static void handle_close_cb(uv_handle_t *h) {
  pg_conn *c = h->data;
  pg_mod *mod = c->db->mod;

  free(h);
  if (mod != NULL)
    mod->pending--;
  c->handles--;
  conn_maybe_free(c);
}

static void close_poll(pg_conn *c) {
  if (c->poll == NULL)
    return;
  uv_close((uv_handle_t *)c->poll, handle_close_cb);
  c->poll = NULL;
  c->events = 0;
}

/* Watch the connection's current socket for events. Returns 0, or a
** negative code (no socket, or libuv refused it). */
static int conn_watch(pg_conn *c, int events) {
  int fd = PQsocket(c->pq), rc;

  if (fd < 0)
    return OP_EINVAL;
  if (c->poll != NULL && c->fd != fd)
    close_poll(c);
  if (c->poll == NULL) {
    if ((c->poll = malloc(sizeof *c->poll)) == NULL)
      return OP_ENOMEM;
    if ((rc = uv_poll_init(c->db->rt->loop, c->poll, fd)) != 0) {
      free(c->poll);
      c->poll = NULL;
      return rc;
    }
    c->poll->data = c;
    c->handles++;
    if (c->db->mod != NULL)
      c->db->mod->pending++;
    c->fd = fd;
    c->events = 0;
  }
  if (c->events != events) {
    if ((rc = uv_poll_start(c->poll, events, poll_cb)) != 0)
      return rc;
    c->events = events;
  }
  /* An idle connection must not keep op_runtime_run() going. */
  if (c->state == CONN_IDLE)
    uv_unref((uv_handle_t *)c->poll);
  else
    uv_ref((uv_handle_t *)c->poll);
  return 0;
}

/* ---- connections: life cycle ---- */

static void connect_timer_cb(uv_timer_t *t) {
  pg_conn *c = t->data;
  pg_db *db = c->db;
  pg_mod *mod = db->mod;
  char *msg =
      msgf("pg: connection failed: timeout after %g s", db->connect_timeout);

  enter(mod);
  db->refs++;
  connect_failed(db, msg);
  conn_drop(c, msg);
  if (db->nconns - db->nconnecting == 0)
    fail_waiters(db, msg != NULL ? msg : "pg: connection failed");
  free(msg);
  db_unref(db);
  leave(mod);
}

static void no_notices(void *arg, const char *msg) {
  (void)arg;
  (void)msg;
}

/* Start a connection, for the connect request req (or NULL: for the pool);
** with deadline, it is dropped after db->connect_timeout. Returns it, or
** NULL with *err set (malloc'ed) when libpq refused at once (bad parameter
** values, out of memory). */
static pg_conn *conn_start(pg_db *db, pg_req *req, int deadline, char **err) {
  pg_conn *c = calloc(1, sizeof *c);
  int rc;

  *err = NULL;
  if (c == NULL) {
    *err = msgf("pg: connection failed: not enough memory");
    return NULL;
  }
  c->db = db;
  c->state = CONN_DEAD;
  set_state(c, CONN_CONNECTING);
  db->refs++;
  c->next = db->conns;
  if (db->conns != NULL)
    db->conns->prev = c;
  db->conns = c;
  db->nconns++;
  c->pq = PQconnectStartParams((const char *const *)db->keys,
                               (const char *const *)db->vals, 0);
  if (c->pq == NULL || PQstatus(c->pq) == CONNECTION_BAD) {
    *err = connect_error(c->pq);
    conn_drop(c, NULL);
    return NULL;
  }
  /* Notices (and the server's farewell on a closed connection) would go
  ** to stderr by default. */
  PQsetNoticeProcessor(c->pq, no_notices, NULL);
  /* PQconnectPoll starts as if it had returned PGRES_POLLING_WRITING. */
  if ((rc = conn_watch(c, UV_WRITABLE)) != 0) {
    *err = msgf("pg: connection failed: %s", uv_strerror(rc));
    conn_drop(c, NULL);
    return NULL;
  }
  if (deadline && db->connect_timeout > 0 &&
      (c->timer = malloc(sizeof *c->timer)) != NULL) {
    uv_timer_init(db->rt->loop, c->timer);
    c->timer->data = c;
    c->handles++;
    if (db->mod != NULL)
      db->mod->pending++;
    uv_update_time(c->timer->loop);
    uv_timer_start(c->timer, connect_timer_cb,
                   (uint64_t)(db->connect_timeout * 1000.0 + 0.5), 0);
  }
  if (req != NULL) {
    c->req = req;
    req->conn = c;
    req->state = REQ_RUNNING;
  }
  return c;
}

/* Close c. Its request, if any, fails with msg (or a generic message);
** an aborted one is just freed. The caller grows the pool if need be. */
static void conn_drop(pg_conn *c, const char *msg) {
  pg_db *db = c->db;
  pg_req *r = c->req;
  pg_conn **pp;

  if (c->state == CONN_DEAD)
    return;
  if (c->state == CONN_IDLE) {
    for (pp = &db->idle; *pp != NULL; pp = &(*pp)->idle_next) {
      if (*pp == c) {
        *pp = c->idle_next;
        break;
      }
    }
  }
  set_state(c, CONN_DEAD);
  if (c->timer != NULL) {
    uv_close((uv_handle_t *)c->timer, handle_close_cb);
    c->timer = NULL;
  }
  close_poll(c); /* before PQfinish closes the socket */
  if (c->pq != NULL) {
    PQfinish(c->pq);
    c->pq = NULL;
  }
  if (r != NULL) {
    c->req = NULL;
    r->conn = NULL;
    if (r->state == REQ_ABORTED)
      req_free(r);
    else
      req_fail(r, msg != NULL ? msg : "pg: connection closed");
  }
  conn_maybe_free(c);
}

/* The connection broke while in use: drop it with libpq's reason. */
static void conn_lost(pg_conn *c, const char *why) {
  char line[1024];
  char *msg;

  if (why == NULL)
    why = PQerrorMessage(c->pq);
  msg = msgf("pg: connection lost: %s", oneline(why, line, sizeof line));
  conn_drop(c, msg != NULL ? msg : "pg: connection lost");
  free(msg);
}

/* Start connections for queued requests, up to the pool size. */
static void maybe_grow(pg_db *db) {
  char *err;
  uint64_t now;

  while (!db->closed && !db->resolving && db->nwaiting > db->nconnecting &&
         db->nconns < db->max) {
    now = uv_now(db->rt->loop);
    if (db->fails > 0 && now < db->retry_at) {
      /* Backing off: with no connection up or coming, nothing can serve
      ** the queue before then. */
      if (db->nconns == 0) {
        err =
            msgf("%s (next attempt in %.2f s)",
                 db->last_err != NULL ? db->last_err : "pg: connection failed",
                 (double)(db->retry_at - now) / 1000.0);
        fail_waiters(db, err != NULL ? err : "pg: connection failed");
        free(err);
      }
      return;
    }
    if (conn_start(db, NULL, 1, &err) == NULL) {
      connect_failed(db, err);
      if (db->nconns - db->nconnecting == 0)
        fail_waiters(db, err != NULL ? err : "pg: connection failed");
      free(err);
      return;
    }
  }
}

/* ---- queries ---- */

/* Send what libpq has buffered and watch for the reply (and for room to
** send the rest). Returns 0, or -1 after dropping the broken connection. */
static int conn_flush(pg_conn *c) {
  int rc = PQflush(c->pq);

  if (rc < 0) {
    conn_lost(c, NULL);
    maybe_grow(c->db);
    return -1;
  }
  c->flushing = rc == 1;
  if (conn_watch(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0)) != 0) {
    conn_lost(c, "cannot watch the socket");
    maybe_grow(c->db);
    return -1;
  }
  return 0;
}

/* Send r on the free connection c. Returns 0 when sent (r is c's), -1 if
** the connection is broken (r untouched; the caller drops c), or 1 with
** *err set when libpq refused this request (r untouched, c still free). */
static int start_query(pg_conn *c, pg_req *r, char **err) {
  char line[1024];
  int ok;

  *err = NULL;
  if (r->nparams == 0)
    ok = PQsendQuery(c->pq, r->sql);
  else
    ok = PQsendQueryParams(c->pq, r->sql, r->nparams, NULL, r->params, NULL,
                           NULL, 0);
  if (!ok) {
    if (PQstatus(c->pq) == CONNECTION_BAD)
      return -1;
    *err = msgf("pg: %s", oneline(PQerrorMessage(c->pq), line, sizeof line));
    return 1;
  }
  set_state(c, CONN_BUSY); /* an idle c is already off the idle list */
  c->req = r;
  r->conn = c;
  r->state = REQ_RUNNING;
  conn_flush(c);
  return 0;
}

/* Take an idle connection off the list, or NULL. */
static pg_conn *idle_pop(pg_db *db) {
  pg_conn *c = db->idle;

  if (c != NULL) {
    db->idle = c->idle_next;
    c->idle_next = NULL;
  }
  return c;
}

/* c is established and free: give it to the next queued request, or make
** it idle (or close it if the db was closed). */
static void conn_release(pg_conn *c) {
  pg_db *db = c->db;
  pg_req *r;
  char *err;
  int rc;

  while ((r = db->wait_head) != NULL) {
    queue_remove(db, r);
    rc = start_query(c, r, &err);
    if (rc == 0)
      return;
    if (rc < 0) {
      queue_push(db, r, 1);
      conn_lost(c, NULL);
      maybe_grow(db);
      return;
    }
    req_finish(r, err != NULL ? err : msgf("pg: not enough memory"));
  }
  if (db->closed) {
    conn_drop(c, NULL);
    return;
  }
  set_state(c, CONN_IDLE);
  c->idle_next = db->idle;
  db->idle = c;
  if (conn_watch(c, UV_READABLE) != 0)
    conn_drop(c, NULL);
}

/* Keep a result of r (or drop it if nobody waits). */
static void collect(pg_req *r, PGresult *res) {
  if (r == NULL || r->state == REQ_ABORTED) {
    PQclear(res);
    return;
  }
  switch (PQresultStatus(res)) {
  case PGRES_FATAL_ERROR:
    if (r->errmsg == NULL)
      r->errmsg = result_error(res);
    PQclear(res);
    break;
  case PGRES_NONFATAL_ERROR:
    PQclear(res);
    break;
  default:
    if (r->res != NULL)
      PQclear(r->res);
    r->res = res;
    break;
  }
}

/* All results of c's query are in. */
static void query_done(pg_conn *c) {
  pg_req *r = c->req;
  pg_db *db = c->db;

  c->req = NULL;
  if (r != NULL) {
    r->conn = NULL;
    if (r->state == REQ_ABORTED)
      req_free(r);
    else
      req_finish(r, NULL);
  }
  if (PQstatus(c->pq) == CONNECTION_BAD) {
    conn_drop(c, NULL);
    maybe_grow(db);
    return;
  }
  if (c->cancelling)
    return; /* cancel_done() releases it */
  conn_release(c);
}

/* Socket events of a BUSY connection. */
static void conn_io(pg_conn *c, int events) {
  PGresult *res;

  if ((events & UV_READABLE) && !PQconsumeInput(c->pq)) {
    conn_lost(c, NULL);
    maybe_grow(c->db);
    return;
  }
  if (c->flushing && conn_flush(c) != 0)
    return;
  if (c->req == NULL) {
    /* Drained; waiting for the cancel request to be done. */
    if (PQstatus(c->pq) == CONNECTION_BAD) {
      conn_drop(c, NULL);
      maybe_grow(c->db);
    }
    return;
  }
  while (!PQisBusy(c->pq)) {
    res = PQgetResult(c->pq);
    if (res == NULL) {
      query_done(c);
      return;
    }
    switch (PQresultStatus(res)) {
    case PGRES_COPY_IN:
      PQclear(res);
      if (PQputCopyEnd(c->pq, "COPY FROM STDIN is not supported by "
                              "offpath.pg") < 0) {
        conn_lost(c, NULL);
        maybe_grow(c->db);
        return;
      }
      if (conn_flush(c) != 0)
        return;
      continue;
    case PGRES_COPY_OUT:
    case PGRES_COPY_BOTH:
      PQclear(res);
      conn_drop(c, "pg: COPY TO STDOUT is not supported by offpath.pg");
      maybe_grow(c->db);
      return;
    default:
      collect(c->req, res);
      break;
    }
  }
}

/* Input on an idle connection: notices, notifications, or the server
** closing it. */
static void conn_idle_input(pg_conn *c) {
  PGnotify *n;

  if (!PQconsumeInput(c->pq) || PQstatus(c->pq) == CONNECTION_BAD) {
    conn_drop(c, NULL);
    return;
  }
  while ((n = PQnotifies(c->pq)) != NULL)
    PQfreemem(n);
}

/* The connection is up. */
static void conn_ready(pg_conn *c) {
  pg_db *db = c->db;
  pg_req *r = c->req;

  if (c->timer != NULL) {
    uv_close((uv_handle_t *)c->timer, handle_close_cb);
    c->timer = NULL;
  }
  PQsetnonblocking(c->pq, 1);
  db->opened++;
  db->fails = 0;
  if (r != NULL) {
    /* The connection pg.connect waits for. */
    c->req = NULL;
    req_finish(r, NULL);
  }
  conn_release(c);
}

static void conn_connect_step(pg_conn *c) {
  pg_db *db = c->db;
  PostgresPollingStatusType st;
  char *msg;
  int rc;

  if (c->poll != NULL) {
    /* libpq may close this socket and open another (see DESIGN). */
    uv_poll_stop(c->poll);
    c->events = 0;
  }
  st = PQconnectPoll(c->pq);
  switch (st) {
  case PGRES_POLLING_READING:
    rc = conn_watch(c, UV_READABLE);
    break;
  case PGRES_POLLING_WRITING:
    rc = conn_watch(c, UV_WRITABLE);
    break;
  case PGRES_POLLING_OK:
    conn_ready(c);
    return;
  default:
    rc = -1;
    break;
  }
  if (rc == 0)
    return;
  msg = connect_error(c->pq);
  connect_failed(db, msg);
  conn_drop(c, msg != NULL ? msg : "pg: connection failed");
  /* With no connection up, queued queries fail; else they wait for one,
  ** and the pool grows again on the next query. */
  if (db->nconns - db->nconnecting == 0)
    fail_waiters(db, msg != NULL ? msg : "pg: connection failed");
  free(msg);
}

static void poll_cb(uv_poll_t *h, int status, int events) {
  pg_conn *c = h->data;
  pg_db *db = c->db;
  pg_mod *mod = db->mod;

  enter(mod);
  db->refs++; /* db outlives this callback even if c is freed */
  if (status < 0 && c->state != CONN_CONNECTING) {
    conn_lost(c, uv_strerror(status));
    maybe_grow(db);
  } else {
    switch (c->state) {
    case CONN_CONNECTING:
      conn_connect_step(c);
      break;
    case CONN_IDLE:
      conn_idle_input(c);
      break;
    case CONN_BUSY:
      conn_io(c, events);
      break;
    default:
      break;
    }
  }
  db_unref(db);
  leave(mod);
}

/* ---- cancel requests ---- */

typedef struct pg_cancel {
  pg_conn *conn;
  PGcancel *pc;
  int ok;
  char err[256];
} pg_cancel;

/* Thread: io pool. PQcancel opens a connection and waits for the server. */
static void cancel_work(void *arg) {
  pg_cancel *k = arg;
  k->ok = PQcancel(k->pc, k->err, (int)sizeof k->err);
}

static void cancel_done(void *arg, int status) {
  pg_cancel *k = arg;
  pg_conn *c = k->conn;
  pg_db *db = c->db;
  pg_mod *mod = db->mod;
  int ok = status == 0 && k->ok;

  PQfreeCancel(k->pc);
  free(k);
  c->cancelling = 0;
  if (mod != NULL)
    enter(mod);
  db->refs++;
  if (c->state == CONN_DEAD) {
    conn_maybe_free(c);
  } else if (!ok) {
    /* The server may still run the query: do not reuse the connection. */
    conn_drop(c, "pg: query cancelled, and the cancel request failed");
    maybe_grow(db);
  } else if (c->req == NULL) {
    conn_release(c);
  }
  db_unref(db);
  if (mod != NULL)
    leave(mod);
}

/* Ask the server to cancel c's query. Returns 0 when the request is on
** its way. */
static int cancel_send(pg_conn *c) {
  pg_cancel *k;
  PGcancel *pc;

  if (c->cancelling)
    return 0;
  if (c->db->rt->closing || (pc = PQgetCancel(c->pq)) == NULL)
    return -1;
  if ((k = calloc(1, sizeof *k)) == NULL) {
    PQfreeCancel(pc);
    return -1;
  }
  k->conn = c;
  k->pc = pc;
  if (op_submit(c->db->rt, "io", cancel_work, cancel_done, k) != 0) {
    PQfreeCancel(pc);
    free(k);
    return -1;
  }
  c->cancelling = 1;
  return 0;
}

/* ---- aborts (a wait ended early: timeout, task:cancel, shutdown) ---- */

/* Called by the scheduler; the waiter is already resumed with its error. */
static void query_abort(void *what, int code) {
  pg_req *r = what;
  pg_db *db = r->db;
  pg_conn *c;

  (void)code;
  r->wait = 0;
  switch (r->state) {
  case REQ_QUEUED:
    queue_remove(db, r);
    req_free(r);
    break;
  case REQ_RUNNING:
    r->state = REQ_ABORTED;
    c = r->conn;
    if (c != NULL && c->state == CONN_BUSY && cancel_send(c) != 0) {
      db->refs++;
      conn_drop(c, NULL);
      maybe_grow(db);
      db_unref(db);
    }
    break;
  default:
    break; /* DONE: deliver() finds the wait gone and frees r */
  }
}

static void resolve_abort(pg_resolve *rs) {
  uv_cancel((uv_req_t *)&rs->gai);
}

static void connect_abort(void *what, int code) {
  pg_req *r = what;
  pg_conn *c = r->conn;

  (void)code;
  r->wait = 0;
  if (r->state == REQ_DONE)
    return;
  r->state = REQ_ABORTED;
  if (c != NULL) {
    /* conn_drop frees the aborted request. */
    conn_drop(c, NULL);
    return;
  }
  /* Still resolving host names: the resolver frees r when it ends. */
  if (r->resolving != NULL)
    resolve_abort(r->resolving);
}

/* ---- resolving host names ---- */

static void split_free(char **v, int n) {
  int i;

  for (i = 0; v != NULL && i < n; i++)
    free(v[i]);
  free(v);
}

/* Split a comma-separated list. Returns the count, or -1 (out of memory). */
static int split(const char *s, char ***out) {
  int n = 1, i = 0;
  const char *p, *q;
  char **v;

  for (p = s; *p != '\0'; p++)
    n += *p == ',';
  if ((v = calloc((size_t)n, sizeof *v)) == NULL)
    return -1;
  for (p = s;; p = q + 1) {
    q = strchr(p, ',');
    if (q == NULL)
      q = p + strlen(p);
    if ((v[i] = malloc((size_t)(q - p) + 1)) == NULL) {
      split_free(v, n);
      return -1;
    }
    memcpy(v[i], p, (size_t)(q - p));
    v[i][q - p] = '\0';
    i++;
    if (*q == '\0')
      break;
  }
  *out = v;
  return n;
}

/* Whether host needs a DNS look-up: not empty, not a socket directory,
** not a numeric address. */
static int needs_lookup(const char *host) {
  unsigned char a[16];

  if (host[0] == '\0' || host[0] == '/' || host[0] == '@')
    return 0;
  return inet_pton(AF_INET, host, a) != 1 && inet_pton(AF_INET6, host, a) != 1;
}

/* The value of key in db's parameters, or NULL. */
static const char *db_param(pg_db *db, const char *key) {
  int i;

  for (i = 0; db->keys[i] != NULL; i++)
    if (strcmp(db->keys[i], key) == 0)
      return db->vals[i];
  return NULL;
}

/* Set key to a copy of val in db's parameters (arrays have room: see
** db_new). Returns 0 or OP_ENOMEM. */
static int db_set_param(pg_db *db, const char *key, const char *val) {
  char *v = strdup(val), *k;
  int i;

  if (v == NULL)
    return OP_ENOMEM;
  for (i = 0; db->keys[i] != NULL; i++) {
    if (strcmp(db->keys[i], key) == 0) {
      free(db->vals[i]);
      db->vals[i] = v;
      return 0;
    }
  }
  if ((k = strdup(key)) == NULL) {
    free(v);
    return OP_ENOMEM;
  }
  db->keys[i] = k;
  db->vals[i] = v;
  db->keys[i + 1] = db->vals[i + 1] = NULL;
  return 0;
}

/* Append one host entry to the lists being built. */
static int resolve_add(pg_resolve *rs, const char *host, const char *addr) {
  const char *port = rs->nports > 1 ? rs->ports[rs->hi] : NULL;
  int rc = 0;

  if (rs->n > 0) {
    rc |= op__buf_append(&rs->host, ",", 1);
    rc |= op__buf_append(&rs->addr, ",", 1);
    rc |= op__buf_append(&rs->port, ",", 1);
  }
  rc |= op__buf_append(&rs->host, host, strlen(host));
  rc |= op__buf_append(&rs->addr, addr, strlen(addr));
  if (port != NULL)
    rc |= op__buf_append(&rs->port, port, strlen(port));
  rs->n++;
  return rc;
}

static void resolve_free(pg_resolve *rs) {
  split_free(rs->hosts, rs->nhosts);
  split_free(rs->ports, rs->nports);
  op__buf_free(&rs->host);
  op__buf_free(&rs->addr);
  op__buf_free(&rs->port);
  free(rs);
}

/* Finish resolving: fail or start the connection the connect request
** waits for. Frees rs. */
static void resolve_end(pg_resolve *rs, char *err) {
  pg_db *db = rs->db;
  pg_req *r = rs->req;
  pg_conn *c;
  int rc = 0;
  if (r != NULL)
    r->resolving = NULL;
  db->resolving = 0;
  if (err == NULL && db->closed && r != NULL && r->state != REQ_ABORTED)
    err = msgf("pg: database closed");
  if (r == NULL || r->state == REQ_ABORTED) {
    free(err);
    if (r != NULL)
      req_free(r);
    resolve_free(rs);
    db_unref(db);
    return;
  }
  if (err == NULL) {
    rc |= op__buf_append(&rs->host, "", 1);
    rc |= op__buf_append(&rs->addr, "", 1);
    rc |= op__buf_append(&rs->port, "", 1);
    rc |= db_set_param(db, "host", rs->host.p);
    rc |= db_set_param(db, "hostaddr", rs->addr.p);
    if (rs->nports > 1)
      rc |= db_set_param(db, "port", rs->port.p);
    if (rc != 0)
      err = msgf("pg: connection failed: not enough memory");
  }
  if (err == NULL && (c = conn_start(db, r, r->wait == 0, &err)) != NULL) {
    (void)c;
    maybe_grow(db); /* queries made while the names were looked up */
  } else {
    /* With no connection, queries made meanwhile fail the same way. */
    fail_waiters(db, err != NULL ? err : "pg: not enough memory");
    req_finish(r, err != NULL ? err : msgf("pg: not enough memory"));
    err = NULL;
  }
  free(err);
  resolve_free(rs);
  db_unref(db);
}

static void resolve_step(pg_resolve *rs);

static void gai_cb(uv_getaddrinfo_t *gai, int status, struct addrinfo *res) {
  pg_resolve *rs = (pg_resolve *)gai;
  pg_db *db = rs->db;
  pg_mod *mod = db->mod;
  struct addrinfo *ai;
  char addr[64];
  int rc = 0, n = 0;

  if (mod != NULL) {
    mod->pending--;
    enter(mod);
  }
  db->refs++;
  if (rs->req == NULL || rs->req->state == REQ_ABORTED) {
    uv_freeaddrinfo(res);
    resolve_end(rs, NULL);
  } else if (status != 0) {
    uv_freeaddrinfo(res);
    resolve_end(rs, msgf("pg: connection failed: cannot resolve host "
                         "\"%s\": %s",
                         rs->hosts[rs->hi], uv_strerror(status)));
  } else {
    for (ai = res; ai != NULL; ai = ai->ai_next) {
      if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
          uv_ip_name(ai->ai_addr, addr, sizeof addr) != 0)
        continue;
      rc |= resolve_add(rs, rs->hosts[rs->hi], addr);
      n++;
    }
    uv_freeaddrinfo(res);
    if (rc != 0)
      resolve_end(rs, msgf("pg: connection failed: not enough memory"));
    else if (n == 0)
      resolve_end(rs, msgf("pg: connection failed: host \"%s\" has no "
                           "address",
                           rs->hosts[rs->hi]));
    else {
      rs->hi++;
      resolve_step(rs);
    }
  }
  db_unref(db);
  if (mod != NULL)
    leave(mod);
}

/* Add entries that need no look-up; start the next look-up, or end. */
static void resolve_step(pg_resolve *rs) {
  struct addrinfo hints;
  int rc;

  while (rs->hi < rs->nhosts && !needs_lookup(rs->hosts[rs->hi])) {
    const char *h = rs->hosts[rs->hi];
    int sock = h[0] == '/' || h[0] == '@' || h[0] == '\0';

    if (resolve_add(rs, h, sock ? "" : h) != 0) {
      resolve_end(rs, msgf("pg: connection failed: not enough memory"));
      return;
    }
    rs->hi++;
  }
  if (rs->hi == rs->nhosts) {
    resolve_end(rs, NULL);
    return;
  }
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  rc = uv_getaddrinfo(rs->db->rt->loop, &rs->gai, gai_cb, rs->hosts[rs->hi],
                      NULL, &hints);
  if (rc != 0) {
    resolve_end(rs, msgf("pg: connection failed: cannot resolve host "
                         "\"%s\": %s",
                         rs->hosts[rs->hi], uv_strerror(rc)));
    return;
  }
  if (rs->db->mod != NULL)
    rs->db->mod->pending++;
}

/* Whether db's hosts need look-ups; if so, make the resolver for r.
** Returns 1 (resolver made in *out), 0 (no look-up needed), or -1 (out of
** memory). */
static int resolve_new(pg_db *db, pg_req *r, pg_resolve **out) {
  const char *host = db_param(db, "host");
  const char *port = db_param(db, "port");
  pg_resolve *rs;
  int i, any = 0;

  *out = NULL;
  if (host == NULL)
    host = getenv("PGHOST");
  if (host == NULL || db_param(db, "hostaddr") != NULL ||
      getenv("PGHOSTADDR") != NULL)
    return 0;
  if ((rs = calloc(1, sizeof *rs)) == NULL)
    return -1;
  op__buf_init(&rs->host);
  op__buf_init(&rs->addr);
  op__buf_init(&rs->port);
  rs->db = db;
  rs->req = r;
  if ((rs->nhosts = split(host, &rs->hosts)) < 0 ||
      (port != NULL && (rs->nports = split(port, &rs->ports)) < 0)) {
    rs->nhosts = rs->nhosts < 0 ? 0 : rs->nhosts;
    rs->nports = 0;
    resolve_free(rs);
    return -1;
  }
  for (i = 0; i < rs->nhosts; i++)
    any |= needs_lookup(rs->hosts[i]);
  if (!any || (rs->nports > 1 && rs->nports != rs->nhosts)) {
    /* Nothing to look up, or lists libpq itself will refuse. */
    resolve_free(rs);
    return 0;
  }
  db->refs++;
  *out = rs;
  return 1;
}

/* ---- Lua: offpath.pg.connect ---- */

/* Raise msg (malloc'ed, freed here; NULL: out of memory) with the
** script position, like the errors of a finished wait.  [-0, +1, e] */
static int raise_at(lua_State *L, char *msg, const char *call) {
  char where[256];

  op__where(L, where, sizeof where);
  lua_pushfstring(L, "%s (%s at %s)",
                  msg != NULL ? msg : "pg: not enough memory", call, where);
  free(msg);
  return lua_error(L);
}

static pg_db *db_new(op_runtime *rt, pg_mod *mod, PQconninfoOption *opts) {
  PQconninfoOption *o;
  pg_db *db = calloc(1, sizeof *db);
  int n = 0, i = 0;

  if (db == NULL)
    return NULL;
  for (o = opts; o->keyword != NULL; o++)
    n++;
  /* Room for every option plus host, hostaddr and port, and the NULL. */
  db->keys = calloc((size_t)n + 4, sizeof *db->keys);
  db->vals = calloc((size_t)n + 4, sizeof *db->vals);
  db->rt = rt;
  db->refs = 1;
  if (db->keys == NULL || db->vals == NULL)
    goto nomem;
  for (o = opts; o->keyword != NULL; o++) {
    if (o->val == NULL)
      continue;
    db->keys[i] = strdup(o->keyword);
    db->vals[i] = strdup(o->val);
    if (db->keys[i] == NULL || db->vals[i] == NULL) {
      i++;
      goto nomem;
    }
    i++;
  }
  db->mod = mod;
  db->next = mod->dbs;
  if (mod->dbs != NULL)
    mod->dbs->prev = db;
  mod->dbs = db;
  return db;

nomem:
  db->mod = NULL;
  db_unref(db);
  return NULL;
}

static pg_mod *get_mod(op_runtime *rt) {
  pg_mod *mod = rt->io_pg;

  if (mod == NULL) {
    if ((mod = calloc(1, sizeof *mod)) == NULL)
      return NULL;
    mod->rt = rt;
    rt->io_pg = mod;
  }
  return mod;
}

/* offpath.pg.connect(conninfo, [{pool=, timeout=, connect_timeout=}])
** -> db: in a handler once the first connection is up (its failure
** raises); where nothing may suspend (a main chunk), at once, with the
** first connection on its way (queries wait for it, or fail with its
** error). */
static int pg_connect(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  const char *conninfo = luaL_checkstring(L, 1);
  double timeout = 0, ctimeout = 0, bmin = BACKOFF_MIN, bmax = BACKOFF_MAX;
  lua_Integer pool = DEFAULT_POOL;
  PQconninfoOption *opts;
  char *perr = NULL, buf[512];
  pg_resolve *rs = NULL;
  pg_db **box, *db;
  pg_mod *mod;
  pg_req *r;
  const char *ct;
  char *err = NULL;
  int rc, wait;

  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    if (lua_getfield(L, 2, "pool") != LUA_TNIL) {
      if (!lua_isinteger(L, -1))
        return luaL_error(L, "bad option 'pool' (integer expected)");
      pool = lua_tointeger(L, -1);
      if (pool < 1 || pool > MAX_POOL)
        return luaL_error(L, "bad option 'pool' (must be 1..%d)", MAX_POOL);
    }
    lua_pop(L, 1);
    timeout = op__opt_number(L, 2, "timeout", 0, NULL);
    ctimeout = op__opt_number(L, 2, "connect_timeout", timeout, NULL);
    bmin = op__opt_number(L, 2, "backoff_min", BACKOFF_MIN, NULL);
    bmax = op__opt_number(L, 2, "backoff_max", BACKOFF_MAX, NULL);
    if (bmin > 3600 || bmax > 3600)
      return luaL_error(L, "bad option 'backoff_min' or 'backoff_max' "
                           "(at most 3600 s)");
    if (bmax < bmin)
      return luaL_error(L, "bad option 'backoff_max' (below 'backoff_min')");
  }
  wait = op__can_suspend(L);
  if ((mod = get_mod(rt)) == NULL)
    return luaL_error(L, "not enough memory");
  box = lua_newuserdatauv(L, sizeof *box, 0);
  *box = NULL;
  luaL_setmetatable(L, DB_MT);
  if ((opts = PQconninfoParse(conninfo, &perr)) == NULL) {
    oneline(perr != NULL ? perr : "not enough memory", buf, sizeof buf);
    PQfreemem(perr);
    return luaL_error(L, "pg: bad conninfo: %s", buf);
  }
  db = db_new(rt, mod, opts);
  PQconninfoFree(opts);
  if (db == NULL)
    return luaL_error(L, "not enough memory");
  *box = db; /* from here the object owns db: __gc releases it */
  db->max = (int)pool;
  db->timeout = timeout;
  db->backoff_min = bmin;
  db->backoff_max = bmax;
  if (ctimeout == 0 && (ct = db_param(db, "connect_timeout")) != NULL)
    ctimeout = strtod(ct, NULL);
  db->connect_timeout = ctimeout;
  if ((r = req_new(db, KIND_CONNECT)) == NULL)
    return luaL_error(L, "not enough memory");
  rc = resolve_new(db, r, &rs);
  if (rc < 0) {
    req_free(r);
    return luaL_error(L, "not enough memory");
  }
  if (rc == 0 && conn_start(db, r, !wait, &err) == NULL) {
    req_free(r);
    return raise_at(L, err, "offpath.pg.connect");
  }
  if (wait) {
    lua_pushvalue(L, -1);
    r->udref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  if (rs != NULL) {
    r->resolving = rs;
    db->resolving = 1;
    resolve_step(rs); /* a failure is delivered on the next turn */
  }
  if (!wait)
    return 1; /* connecting; queries wait for it (r ends unheard) */
  r->wait = op__wait_new(L, "offpath.pg.connect", ctimeout, connect_abort, r);
  return op__wait_yield(L);
}

/* ---- Lua: the db object ---- */

/* The open db object at index 1, or raise.  [-0, +0, e] */
static pg_db *check_db(lua_State *L) {
  pg_db **box = luaL_checkudata(L, 1, DB_MT);

  if (*box == NULL || (*box)->closed)
    luaL_error(L, "pg: database closed");
  return *box;
}

/* Format a float parameter so that it reads back the same. */
static int fmt_float(char *buf, size_t len, double d) {
  int n;

  if (isnan(d))
    return snprintf(buf, len, "NaN");
  if (isinf(d))
    return snprintf(buf, len, d > 0 ? "Infinity" : "-Infinity");
  n = snprintf(buf, len, "%.15g", d);
  if (strtod(buf, NULL) != d)
    n = snprintf(buf, len, "%.17g", d);
  return n;
}

/* The text of parameter at idx: its length, or -1 for NULL; numbers are
** formatted in num. Raises on a value that has no text form.
** [-0, +0, e] */
static long param_text(lua_State *L, int idx, char *num, size_t len,
                       const char **s) {
  size_t n;

  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    *s = NULL;
    return -1;
  case LUA_TBOOLEAN:
    *s = lua_toboolean(L, idx) ? "true" : "false";
    return (long)strlen(*s);
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx))
      snprintf(num, len, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
    else
      fmt_float(num, len, (double)lua_tonumber(L, idx));
    *s = num;
    return (long)strlen(num);
  case LUA_TSTRING:
    *s = lua_tolstring(L, idx, &n);
    if (memchr(*s, '\0', n) != NULL)
      luaL_argerror(L, idx, "string contains a zero byte");
    return (long)n;
  default:
    luaL_typeerror(L, idx, "nil, boolean, number or string");
    return -1;
  }
}

/* db:query(sql, ...) or db:query({sql, timeout=}, ...) -> rows, count */
static int db_query(lua_State *L) {
  pg_db *db = check_db(L);
  double timeout = db->timeout;
  int nparams = lua_gettop(L) - 2, i, rc;
  const char *sql, *s;
  char num[64], *p, *err = NULL;
  size_t sqllen, total;
  pg_conn *c;
  pg_req *r;
  long n;

  sql = op__sql_arg(L, 2, &timeout, &sqllen);
  if (nparams < 0)
    nparams = 0;
  if (nparams > 65535)
    return luaL_error(L, "pg: too many parameters (%d, at most 65535)",
                      nparams);
  op__check_suspend(L, "db:query");
  /* Validate and measure first: nothing below raises after malloc. */
  total = sqllen + 1;
  for (i = 0; i < nparams; i++) {
    n = param_text(L, 3 + i, num, sizeof num, &s);
    if (n >= 0)
      total += (size_t)n + 1;
  }
  r = calloc(1, sizeof *r + (size_t)nparams * sizeof(char *) + total);
  if (r == NULL)
    return luaL_error(L, "not enough memory");
  r->db = db;
  r->kind = KIND_QUERY;
  r->udref = LUA_NOREF;
  r->nparams = nparams;
  r->params = (const char **)(r + 1);
  p = (char *)(r->params + nparams);
  memcpy(p, sql, sqllen + 1);
  r->sql = p;
  p += sqllen + 1;
  for (i = 0; i < nparams; i++) {
    n = param_text(L, 3 + i, num, sizeof num, &s);
    if (n < 0) {
      r->params[i] = NULL;
      continue;
    }
    memcpy(p, s, (size_t)n);
    p[n] = '\0';
    r->params[i] = p;
    p += n + 1;
  }
  db->refs++;
  /* Dispatch: an idle connection, else the queue (and maybe a new
  ** connection). Errors of this request alone raise here. */
  while ((c = idle_pop(db)) != NULL) {
    rc = start_query(c, r, &err);
    if (rc == 0)
      break;
    if (rc > 0) {
      /* c is fine: put it back. */
      c->idle_next = db->idle;
      db->idle = c;
      req_free(r);
      return raise_at(L, err, "db:query");
    }
    db->refs++;
    conn_lost(c, NULL);
    db_unref(db);
  }
  if (c == NULL) {
    queue_push(db, r, 0);
    maybe_grow(db);
  }
  r->wait = op__wait_new(L, "db:query", timeout, query_abort, r);
  return op__wait_yield(L);
}

/* Close the pool: queued queries fail, idle connections close, busy ones
** close when their query ends. */
static void db_close(pg_db *db) {
  pg_conn *c, *next;

  if (db->closed)
    return;
  db->closed = 1;
  db->refs++;
  fail_waiters(db, "pg: database closed");
  for (c = db->conns; c != NULL; c = next) {
    next = c->next;
    if (c->state == CONN_IDLE ||
        (c->state == CONN_CONNECTING && c->req == NULL))
      conn_drop(c, NULL);
  }
  db_unref(db);
}

/* db:close() */
static int db_close_l(lua_State *L) {
  pg_db **box = luaL_checkudata(L, 1, DB_MT);

  if (*box != NULL)
    db_close(*box);
  return 0;
}

static int db_gc(lua_State *L) {
  pg_db **box = luaL_checkudata(L, 1, DB_MT);
  pg_db *db = *box;

  if (db != NULL) {
    *box = NULL;
    db_close(db);
    db_unref(db);
  }
  return 0;
}

/* t[k] = v for the table on top.  [-0, +0, m] */
static void set_int(lua_State *L, const char *k, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, k);
}

/* db:stats() -> {size=, connections=, idle=, busy=, connecting=,
** waiting=, opened=} */
static int db_stats(lua_State *L) {
  pg_db **box = luaL_checkudata(L, 1, DB_MT);
  pg_db *db = *box;

  lua_createtable(L, 0, 7);
  if (db == NULL)
    return 1;
  set_int(L, "size", db->max);
  set_int(L, "connections", db->nconns);
  set_int(L, "idle", db->nidle);
  set_int(L, "busy", db->nbusy);
  set_int(L, "connecting", db->nconnecting);
  set_int(L, "waiting", db->nwaiting);
  set_int(L, "opened", (lua_Integer)db->opened);
  return 1;
}

static int db_tostring(lua_State *L) {
  pg_db **box = luaL_checkudata(L, 1, DB_MT);

  lua_pushfstring(L, "pg.db (%s): %p",
                  *box == NULL || (*box)->closed ? "closed" : "open",
                  (void *)*box);
  return 1;
}

/* ---- opening and shutdown ---- */

/* At runtime shutdown (every wait already ended). */
static void pg_shutdown(op_runtime *rt);

void op__open_io_pg(lua_State *L) {
  static const luaL_Reg methods[] = { { "query", db_query },
                                      { "close", db_close_l },
                                      { "stats", db_stats },
                                      { NULL, NULL } };
  static const luaL_Reg meta[] = { { "__gc", db_gc },
                                   { "__close", db_gc },
                                   { "__tostring", db_tostring },
                                   { NULL, NULL } };
  static const luaL_Reg funcs[] = { { "connect", pg_connect }, { NULL, NULL } };

  /* First: whatever fails after this, the hook frees what was made. */
  op__io_at_shutdown(op__runtime(L), pg_shutdown);

  op__io_register(L, DB_MT, meta, methods, "pg", funcs);
}

static void pg_shutdown(op_runtime *rt) {
  pg_mod *mod = rt->io_pg;
  pg_db *db, *next;
  pg_conn *c, *cn;

  if (mod == NULL)
    return;
  enter(mod);
  for (db = mod->dbs; db != NULL; db = next) {
    db->refs++;
    db->closed = 1;
    fail_waiters(db, "cancelled: runtime shutting down");
    for (c = db->conns; c != NULL; c = cn) {
      cn = c->next;
      conn_drop(c, "cancelled: runtime shutting down");
    }
    next = db->next;
    db_unref(db);
  }
  leave(mod);
  /* Close callbacks, look-ups still running, a deferred flush. */
  while (mod->pending > 0 || mod->flush_deferred || mod->fin_head != NULL) {
    int alive = uv_run(rt->loop, UV_RUN_ONCE);

    if (mod->fin_head != NULL) {
      enter(mod);
      leave(mod);
    }
    if (!alive && mod->pending > 0 && NEVER(1))
      break; /* a handle count went wrong: do not hang */
  }
  for (db = mod->dbs; db != NULL; db = next) {
    next = db->next;
    db->mod = NULL;
    db->next = db->prev = NULL;
  }
  rt->io_pg = NULL;
  free(mod);
}
