/* SPDX-License-Identifier: MIT */
/*
** redis.c - offpath.redis: non-blocking Redis on hiredis' async API and its
** libuv adapter. Thread: loop.
**
** DESIGN
**
** A client (the userdata r) owns a shared connection for ordinary commands
** (cl->main: pipelined, replies in order) and a small pool of dedicated
** connections for blocking commands (BLPOP, ...): one per blocking call in
** flight (cl->busy), kept for reuse afterwards (cl->idle), so a blocking
** command never holds up the shared connection. A connection is made when
** the first command needs it; the name is resolved once with
** uv_getaddrinfo (numeric addresses need no resolution), and commands made
** meanwhile wait in cl->qhead.
**
** A call (rcall) is hiredis' privdata of one command: made by r:call,
** freed in reply_cb, which hiredis runs exactly once per command: with the
** reply, or with NULL when the connection goes away (an error, a lost
** connection, or our redisAsyncFree). A call whose wait timed out keeps its
** place: its reply arrives later and is dropped, never handed to the next
** caller. A timeout on a dedicated connection or on a connection that never
** finished connecting closes that connection instead (kill_later).
**
** A connection (rconn) lives while hiredis holds its context (refs += 1,
** dropped in conn_cleanup, the adapter's cleanup hook, which hiredis runs
** once after every callback of the context has run) and while a deferred
** kill may still look at it. Its states:
**
**     connecting --(on_connect OK)--> connected
**        |                                |
**        +--(on_connect ERR, EOF, error, our redisAsyncFree)--> dying
**                                         |
**                        (conn_cleanup: hiredis is done) --> freed
**
** Lua runs only from reply_cb, where hiredis has its IN_CALLBACK flag set,
** so a r:close() or a new command from the resumed coroutine is safe (hiredis
** defers the free). on_connect and conn_cleanup never run Lua. A dying
** connection is detached from its client first, so later commands make a
** new one.
**
** The adapter's poll handle keeps the loop alive only while commands are
** pending on it: an idle connection does not keep a host's loop running.
**
** Reconnecting: a connection that is lost is detached, so the next command
** makes a new one; the client stays usable across a server restart. When
** a connect fails, the client waits before the next attempt (backoff_min,
** doubled on each failure in a row up to backoff_max; a success resets
** it): commands made meanwhile fail at once with the last connect error
** and the time left, so a down server is not hammered and no caller waits
** for it.
*/
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <string.h>
#include <strings.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libuv.h>

#include "internal.h"

#define REDIS_MT          "offpath.redis"
#define REDIS_CALL        "offpath.redis call"
#define REDIS_MAX_IDLE    8   /* idle dedicated connections kept per client */
#define REDIS_MAX_DEPTH   64  /* nesting of array replies */
#define REDIS_BACKOFF_MIN 0.1 /* seconds before reconnecting after a fail */
#define REDIS_BACKOFF_MAX 2.0 /* seconds, at most */

typedef struct rmod rmod;
typedef struct rclient rclient;
typedef struct rconn rconn;
typedef struct rcall rcall;
typedef struct rresolve rresolve;

enum { RC_USER = 0, RC_CONNECT, RC_INTERNAL };
enum { RC_QUEUED = 1, RC_SENT };

struct rmod {
  op_runtime *rt;
  rclient *clients; /* open clients, for shutdown */
};

/* The client; lives inside the userdata r. Everything that points at it is
** detached by client_close (which __gc runs), so it may be collected. */
struct rclient {
  rmod *mod;
  rclient *prev, *next; /* in mod->clients while open */
  int closed;
  int linked;
  char *host;            /* as given (malloc) */
  char *user, *password; /* AUTH, or NULL (malloc) */
  int port;
  int db;         /* SELECT after connecting, or -1 */
  double timeout; /* default for connect and ordinary calls; 0 none */
  char ip[INET6_ADDRSTRLEN]; /* numeric address, "" until resolved */
  char addr[300];            /* "host:port", for messages */
  rconn *main;               /* the shared connection, or NULL */
  rconn *idle, *busy;        /* dedicated connections for blocking calls */
  int nidle;
  rresolve *resolving;             /* uv_getaddrinfo in flight, or NULL */
  rcall *qhead, *qtail;            /* calls waiting for the address */
  double backoff_min, backoff_max; /* seconds */
  int fails;                       /* connects failed in a row */
  uint64_t retry_at;               /* loop time (ms) of the next attempt */
  char *last_err;                  /* why the last connect failed (malloc) */
};

struct rconn {
  op_runtime *rt;
  rclient *client;    /* NULL once detached */
  rconn *prev, *next; /* in client->idle or client->busy */
  int in_idle;
  redisAsyncContext *ac; /* NULL once hiredis is done with it */
  uv_poll_t *poll;       /* the adapter's handle (ref/unref only) */
  int blocking;          /* a dedicated connection */
  int connected;
  int dying;
  int refs;
  int pending; /* commands whose callback has not run */
  uint64_t sent, replied;
  char *err; /* why we closed it, for pending calls (malloc) */
  char addr[INET6_ADDRSTRLEN + 8];
};

struct rcall {
  rcall *next;     /* in client->q while queued */
  rclient *client; /* while queued */
  rconn *conn;     /* once sent */
  op_runtime *rt;
  op_wait_id id; /* 0 for internal commands */
  int kind;      /* RC_USER, RC_CONNECT, RC_INTERNAL */
  int state;     /* RC_QUEUED, RC_SENT */
  int blocking;
  int ud_ref;   /* RC_CONNECT: the userdata to return */
  uint64_t seq; /* its number on conn */
  char *cmd;    /* formatted command while queued */
  size_t cmdlen;
  char *err;     /* message while being failed */
  char what[16]; /* RC_INTERNAL: "AUTH", "SELECT" */
};

struct rresolve {
  uv_getaddrinfo_t req;
  rclient *client; /* NULL once the client closed */
};

/* A kill_later: close conn unless the call numbered seq got its reply. */
typedef struct rkill {
  rconn *conn;
  uint64_t seq;
} rkill;

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void client_close(rclient *cl);

/* ---- small helpers ---- */

static char *dupstr(const char *s) {
  size_t n;
  char *p;

  if (s == NULL)
    return NULL;
  n = strlen(s) + 1;
  p = malloc(n);
  if (p != NULL)
    memcpy(p, s, n);
  return p;
}

static void call_free(op_runtime *rt, rcall *c) {
  if (c->ud_ref != LUA_NOREF && c->ud_ref != 0)
    luaL_unref(rt->L, LUA_REGISTRYINDEX, c->ud_ref);
  if (c->cmd != NULL)
    redisFreeCommand(c->cmd);
  free(c->err);
  free(c);
}

/* Reference the connection's poll handle only while commands wait on it. */
static void conn_ref_loop(rconn *conn) {
  if (conn->poll == NULL)
    return;
  if (conn->pending > 0)
    uv_ref((uv_handle_t *)conn->poll);
  else
    uv_unref((uv_handle_t *)conn->poll);
}

static void conn_unref(rconn *conn) {
  if (--conn->refs > 0)
    return;
  free(conn->err);
  free(conn);
}

/* Take conn out of its client's lists. */
static void conn_detach(rconn *conn) {
  rclient *cl = conn->client;

  if (cl == NULL)
    return;
  if (cl->main == conn) {
    cl->main = NULL;
  } else {
    if (conn->prev != NULL)
      conn->prev->next = conn->next;
    else if (conn->in_idle)
      cl->idle = conn->next;
    else
      cl->busy = conn->next;
    if (conn->next != NULL)
      conn->next->prev = conn->prev;
    if (conn->in_idle)
      cl->nidle--;
  }
  conn->prev = conn->next = NULL;
  conn->in_idle = 0;
  conn->client = NULL;
}

static void list_push(rconn **head, rconn *conn) {
  conn->prev = NULL;
  conn->next = *head;
  if (*head != NULL)
    (*head)->prev = conn;
  *head = conn;
}

/* Close conn: detach it and free its hiredis context. Pending commands get
** msg (or the error already recorded). May free conn before it returns; do
** not touch it afterwards. Inside one of conn's callbacks hiredis defers
** the free until the callback returns. */
static void conn_kill(rconn *conn, const char *msg) {
  conn_detach(conn);
  if (conn->dying || conn->ac == NULL)
    return;
  conn->dying = 1;
  if (conn->err == NULL && msg != NULL)
    conn->err = dupstr(msg);
  redisAsyncFree(conn->ac);
}

/* The adapter's cleanup hook: hiredis is done with the context (every
** callback has run). Close the poll handle (freed in its close callback)
** and drop the context's reference to conn. */
static void conn_cleanup(void *privdata) {
  redisLibuvEvents *p = privdata;
  redisAsyncContext *ac = p->context;
  rconn *conn = ac != NULL ? ac->data : NULL;

  if (ac != NULL)
    ac->ev.cleanup = NULL; /* once */
  redisLibuvCleanup(privdata);
  if (conn == NULL)
    return;
  conn->ac = NULL;
  conn->poll = NULL;
  conn->dying = 1;
  conn_detach(conn);
  conn_unref(conn);
}

/* A connect of cl failed with msg: the next one waits.  */
static void connect_failed(rclient *cl, const char *msg) {
  double delay = cl->backoff_min;
  int i;

  for (i = 0; i < cl->fails && delay < cl->backoff_max; i++)
    delay *= 2;
  if (delay > cl->backoff_max)
    delay = cl->backoff_max;
  cl->fails++;
  cl->retry_at = uv_now(cl->mod->rt->loop) + (uint64_t)(delay * 1000.0);
  free(cl->last_err);
  cl->last_err = dupstr(msg);
}

/* Whether cl may try to connect now. If not, err says why.  */
static int may_connect(rclient *cl, char *err, size_t errlen) {
  uint64_t now = uv_now(cl->mod->rt->loop);

  if (cl->fails == 0 || now >= cl->retry_at)
    return 1;
  snprintf(err, errlen, "%s (next attempt in %.2f s)",
           cl->last_err != NULL ? cl->last_err : "redis: cannot connect",
           (double)(cl->retry_at - now) / 1000.0);
  return 0;
}

/* hiredis' connect callback. Never runs Lua. */
static void on_connect(const redisAsyncContext *ac, int status) {
  rconn *conn = ac->data;
  char msg[512];

  if (status == REDIS_OK) {
    conn->connected = 1;
    if (conn->client != NULL)
      conn->client->fails = 0;
    return;
  }
  /* hiredis frees the context right after this; its pending commands get
  ** NULL replies. */
  if (conn->err == NULL) {
    if (ac->errstr[0] != '\0' &&
        strcmp(ac->errstr, strerror(ECONNREFUSED)) == 0)
      snprintf(msg, sizeof msg, "redis: connection refused (%s)", conn->addr);
    else
      snprintf(msg, sizeof msg, "redis: cannot connect to %s: %s", conn->addr,
               ac->errstr);
    conn->err = dupstr(msg);
  }
  if (conn->client != NULL)
    connect_failed(conn->client, conn->err != NULL ? conn->err : msg);
  conn->dying = 1;
  conn_detach(conn);
}

/* The message for commands that got no reply on conn. */
static const char *lost_message(rconn *conn, const redisAsyncContext *ac,
                                char *buf, size_t len) {
  if (conn->err != NULL)
    return conn->err;
  if (ac->err == 0)
    snprintf(buf, len, "redis: connection closed (%s)", conn->addr);
  else if (!conn->connected && strcmp(ac->errstr, strerror(ECONNREFUSED)) == 0)
    snprintf(buf, len, "redis: connection refused (%s)", conn->addr);
  else if (!conn->connected)
    snprintf(buf, len, "redis: cannot connect to %s: %s", conn->addr,
             ac->errstr);
  else
    snprintf(buf, len, "redis: connection lost (%s): %s", conn->addr,
             ac->errstr);
  conn->err = dupstr(buf);
  return conn->err != NULL ? conn->err : buf;
}

/* ---- event hooks ----
** The libuv adapter of hiredis 0.14 ignores a poll callback with an error
** status, but libuv reports a failed connect (POLLERR) exactly that way,
** after stopping the handle: the connection would hang forever. These
** hooks replace the adapter's: on an error they let hiredis look at the
** socket (it then sees the error), as later hiredis versions do. The
** adapter's struct, attach and cleanup are used as they are. */

static void ev_poll_cb(uv_poll_t *handle, int status, int events) {
  redisLibuvEvents *p = handle->data;
  int ev = status != 0 ? p->events : events;

  if (p->context != NULL && (ev & UV_READABLE))
    redisAsyncHandleRead(p->context);
  if (p->context != NULL && (ev & UV_WRITABLE))
    redisAsyncHandleWrite(p->context);
  /* libuv stopped the handle on an error; watch again if still in use. */
  if (status != 0 && p->context != NULL && p->events != 0)
    uv_poll_start(&p->handle, p->events, ev_poll_cb);
}

static void ev_update(redisLibuvEvents *p) {
  if (p->events != 0)
    uv_poll_start(&p->handle, p->events, ev_poll_cb);
  else
    uv_poll_stop(&p->handle);
}

static void ev_add_read(void *privdata) {
  redisLibuvEvents *p = privdata;
  p->events |= UV_READABLE;
  ev_update(p);
}

static void ev_del_read(void *privdata) {
  redisLibuvEvents *p = privdata;
  p->events &= ~UV_READABLE;
  ev_update(p);
}

static void ev_add_write(void *privdata) {
  redisLibuvEvents *p = privdata;
  p->events |= UV_WRITABLE;
  ev_update(p);
}

static void ev_del_write(void *privdata) {
  redisLibuvEvents *p = privdata;
  p->events &= ~UV_WRITABLE;
  ev_update(p);
}

/* Make a connection for cl. Returns it, or NULL with a message in err. */
static rconn *conn_new(rclient *cl, int blocking, char *err, size_t errlen) {
  op_runtime *rt = cl->mod->rt;
  redisAsyncContext *ac;
  rconn *conn;
  int i;

  ac = redisAsyncConnect(cl->ip, cl->port);
  if (ac == NULL) {
    snprintf(err, errlen, "not enough memory");
    return NULL;
  }
  if (ac->err) {
    if (strcmp(ac->errstr, strerror(ECONNREFUSED)) == 0)
      snprintf(err, errlen, "redis: connection refused (%s)", cl->addr);
    else
      snprintf(err, errlen, "redis: cannot connect to %s: %s", cl->addr,
               ac->errstr);
    redisAsyncFree(ac);
    connect_failed(cl, err);
    return NULL;
  }
  conn = calloc(1, sizeof *conn);
  if (conn == NULL) {
    redisAsyncFree(ac);
    snprintf(err, errlen, "not enough memory");
    return NULL;
  }
  conn->rt = rt;
  conn->blocking = blocking;
  conn->refs = 1;
  conn->ac = ac;
  if (strchr(cl->ip, ':') != NULL)
    snprintf(conn->addr, sizeof conn->addr, "[%s]:%d", cl->ip, cl->port);
  else
    snprintf(conn->addr, sizeof conn->addr, "%s:%d", cl->ip, cl->port);
  ac->data = conn;
  if (redisLibuvAttach(ac, rt->loop) != REDIS_OK) {
    redisAsyncFree(ac);
    free(conn);
    snprintf(err, errlen, "redis: cannot watch the connection to %s", cl->addr);
    return NULL;
  }
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->ev.cleanup = conn_cleanup;
  conn->poll = &((redisLibuvEvents *)ac->ev.data)->handle;
  uv_unref((uv_handle_t *)conn->poll);
  redisAsyncSetConnectCallback(ac, on_connect);

  /* AUTH and SELECT go first on every new connection. */
  for (i = 0; i < 2; i++) {
    const char *argv[3];
    size_t argvlen[3];
    char dbs[16];
    int argc = 0, k;
    rcall *c;

    if (i == 0 && cl->password != NULL) {
      argv[argc++] = "AUTH";
      if (cl->user != NULL)
        argv[argc++] = cl->user;
      argv[argc++] = cl->password;
    } else if (i == 1 && cl->db > 0) {
      snprintf(dbs, sizeof dbs, "%d", cl->db);
      argv[argc++] = "SELECT";
      argv[argc++] = dbs;
    } else {
      continue;
    }
    for (k = 0; k < argc; k++)
      argvlen[k] = strlen(argv[k]);
    c = calloc(1, sizeof *c);
    if (c == NULL)
      goto nomem;
    c->rt = rt;
    c->kind = RC_INTERNAL;
    c->state = RC_SENT;
    c->conn = conn;
    c->ud_ref = LUA_NOREF;
    snprintf(c->what, sizeof c->what, "%s", argv[0]);
    c->seq = ++conn->sent;
    if (redisAsyncCommandArgv(ac, reply_cb, c, argc, argv, argvlen) !=
        REDIS_OK) {
      conn->sent--;
      free(c);
      goto nomem;
    }
    conn->pending++;
  }
  conn_ref_loop(conn);
  return conn;

nomem:
  snprintf(err, errlen, "not enough memory");
  conn_kill(conn, "not enough memory");
  return NULL;
}

/* The connection a command goes to: the shared one, or a dedicated one
** for a blocking command. NULL with a message in err on failure. */
static rconn *pick_conn(rclient *cl, int blocking, char *err, size_t errlen) {
  rconn *conn;

  if (!blocking) {
    if (cl->main == NULL && may_connect(cl, err, errlen) &&
        (cl->main = conn_new(cl, 0, err, errlen)) != NULL)
      cl->main->client = cl;
    return cl->main;
  }
  if ((conn = cl->idle) != NULL) {
    conn_detach(conn);
    conn->client = cl;
  } else if (!may_connect(cl, err, errlen) ||
             (conn = conn_new(cl, 1, err, errlen)) == NULL) {
    return NULL;
  }
  conn->client = cl;
  list_push(&cl->busy, conn);
  return conn;
}

/* Send c on the right connection: from argv, or c->cmd when queued.
** Returns 0, or -1 with a message in err (c is not sent then). */
static int call_send(rclient *cl, rcall *c, int argc, const char **argv,
                     const size_t *argvlen, char *err, size_t errlen) {
  rconn *conn = pick_conn(cl, c->blocking, err, errlen);
  int rc;

  if (conn == NULL)
    return -1;
  c->conn = conn;
  c->client = NULL;
  c->state = RC_SENT;
  c->seq = ++conn->sent;
  if (c->cmd != NULL)
    rc = redisAsyncFormattedCommand(conn->ac, reply_cb, c, c->cmd, c->cmdlen);
  else
    rc = redisAsyncCommandArgv(conn->ac, reply_cb, c, argc, argv, argvlen);
  if (rc != REDIS_OK) {
    conn->sent--;
    c->conn = NULL;
    snprintf(err, errlen, "redis: cannot send the command (%s): %s", conn->addr,
             conn->ac->errstr[0] ? conn->ac->errstr : "connection closing");
    if (conn->blocking)
      conn_kill(conn, NULL);
    return -1;
  }
  if (c->cmd != NULL) {
    redisFreeCommand(c->cmd);
    c->cmd = NULL;
  }
  conn->pending++;
  conn_ref_loop(conn);
  return 0;
}

/* A blocking call got its reply: its dedicated connection is free again. */
static void conn_release(rconn *conn) {
  rclient *cl = conn->client;

  if (cl == NULL || conn->dying)
    return;
  if (cl->nidle >= REDIS_MAX_IDLE) {
    conn_kill(conn, NULL);
    return;
  }
  conn_detach(conn);
  conn->client = cl;
  conn->in_idle = 1;
  list_push(&cl->idle, conn);
  cl->nidle++;
}

/* ---- replies ---- */

/* Push reply r on co as a Lua value. Returns 0, or -1 if it is nested too
** deeply for co's stack.  [-0, +1, m] */
static int push_reply(lua_State *co, const redisReply *r, int depth, int top) {
  size_t i;

  if (depth > REDIS_MAX_DEPTH || !lua_checkstack(co, 4))
    return -1;
  switch (r->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS:
    lua_pushlstring(co, r->str, (size_t)r->len);
    break;
  case REDIS_REPLY_INTEGER:
    lua_pushinteger(co, (lua_Integer)r->integer);
    break;
  case REDIS_REPLY_ERROR: /* inside an array (EXEC, EVAL): {err=...} */
    lua_createtable(co, 0, 1);
    lua_pushlstring(co, r->str, (size_t)r->len);
    lua_setfield(co, -2, "err");
    break;
  case REDIS_REPLY_ARRAY:
    lua_createtable(co, r->elements > INT32_MAX ? 0 : (int)r->elements, 0);
    for (i = 0; i < r->elements; i++) {
      if (push_reply(co, r->element[i], depth + 1, 0) != 0) {
        lua_pop(co, 1);
        return -1;
      }
      lua_rawseti(co, -2, (lua_Integer)i + 1);
    }
    break;
  case REDIS_REPLY_NIL:
  default:
    if (top)
      lua_pushnil(co);
    else
      lua_pushboolean(co, 0); /* a nil inside an array: false */
    break;
  }
  return 0;
}

/* Protected: push the reply (light userdata 1) as one Lua value.
** [-1, +1, e] */
static int push_reply_p(lua_State *L) {
  const redisReply *r = lua_touserdata(L, 1);

  if (push_reply(L, r, 0, 1) != 0)
    return luaL_error(L, "redis: reply nested too deeply");
  return 1;
}

/* hiredis' reply callback, run exactly once per command: with its reply,
** or NULL when the connection goes away. Frees the call, then resumes the
** waiting coroutine (Lua runs here, inside hiredis' IN_CALLBACK). */
static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  redisReply *r = reply;
  rcall *c = privdata;
  rconn *conn = c->conn;
  op_runtime *rt = c->rt;
  op_wait_id id = c->id;
  int kind = c->kind, ud_ref = c->ud_ref, top, st;
  lua_State *co;
  const char *msg = NULL;
  char buf[512];

  conn->pending--;
  conn->replied++;
  conn_ref_loop(conn);
  if (r == NULL) {
    msg = lost_message(conn, ac, buf, sizeof buf);
    conn->dying = 1;
    conn_detach(conn);
  }
  if (kind == RC_INTERNAL) {
    if (r != NULL && r->type == REDIS_REPLY_ERROR) {
      snprintf(buf, sizeof buf, "redis: %s failed (%s): %s", c->what,
               conn->addr, r->str);
      free(c);
      conn_kill(conn, buf); /* deferred by hiredis: we are in a callback */
      return;
    }
    free(c);
    return;
  }
  c->ud_ref = LUA_NOREF;
  call_free(rt, c);
  if (conn->blocking && r != NULL)
    conn_release(conn);
  co = op__wait_thread(rt, id);
  if (co == NULL || kind == RC_CONNECT) {
    if (co != NULL && msg == NULL && r->type != REDIS_REPLY_ERROR) {
      lua_rawgeti(co, LUA_REGISTRYINDEX, ud_ref); /* connected: return r */
      luaL_unref(rt->L, LUA_REGISTRYINDEX, ud_ref);
      op__wait_resume(rt, id, 1);
      return;
    }
    if (ud_ref != LUA_NOREF) { /* the client is of no use: close it */
      rclient *cl;
      lua_rawgeti(rt->L, LUA_REGISTRYINDEX, ud_ref);
      cl = lua_touserdata(rt->L, -1);
      if (cl != NULL)
        client_close(cl);
      lua_pop(rt->L, 1);
      luaL_unref(rt->L, LUA_REGISTRYINDEX, ud_ref);
    }
    if (co == NULL) /* the waiter is gone (timeout, cancel): drop it */
      return;
  }
  if (msg == NULL && r->type == REDIS_REPLY_ERROR) {
    size_t n = (size_t)r->len + 8;
    char *e = malloc(n);
    if (e != NULL)
      snprintf(e, n, "redis: %s", r->str);
    op__wait_fail(rt, id, e != NULL ? e : "redis: error reply");
    free(e);
    return;
  }
  if (msg != NULL) {
    op__wait_fail(rt, id, msg);
    return;
  }
  /* Built on the main thread in protected mode, as pg and sqlite build
  ** their rows: a memory error must not unwind hiredis' frames. */
  top = lua_gettop(rt->L);
  lua_pushcfunction(rt->L, push_reply_p);
  lua_pushlightuserdata(rt->L, r);
  st = op__pcall(rt->L, 1, 1, NULL);
  if (st != LUA_OK || !lua_checkstack(co, 2)) {
    snprintf(buf, sizeof buf, "%s",
             st == LUA_ERRRUN ? lua_tostring(rt->L, -1)
                              : "redis: not enough memory for the reply");
    lua_settop(rt->L, top);
    op__wait_fail(rt, id, buf);
    return;
  }
  lua_xmove(rt->L, co, 1);
  op__wait_resume(rt, id, 1);
}

/* ---- closing a client ---- */

/* Close cl: detach everything that points at it, close its connections
** (their pending commands fail with "redis: connection closed") and fail
** its queued calls. Runs no Lua itself when no coroutine waits on cl (the
** case in __gc and at shutdown); from r:close the failures are delivered
** on the next loop turn. */
static void client_close(rclient *cl) {
  rmod *m;
  op_runtime *rt;
  rcall *q, *c;
  char msg[400];

  if (cl->closed)
    return;
  cl->closed = 1;
  m = cl->mod;
  rt = m->rt;
  if (cl->linked) {
    if (cl->prev != NULL)
      cl->prev->next = cl->next;
    else
      m->clients = cl->next;
    if (cl->next != NULL)
      cl->next->prev = cl->prev;
    cl->linked = 0;
  }
  if (cl->resolving != NULL) {
    cl->resolving->client = NULL;
    cl->resolving = NULL;
  }
  q = cl->qhead;
  cl->qhead = cl->qtail = NULL;
  snprintf(msg, sizeof msg, "redis: connection closed (%s)", cl->addr);
  while (cl->main != NULL)
    conn_kill(cl->main, msg);
  while (cl->idle != NULL)
    conn_kill(cl->idle, msg);
  while (cl->busy != NULL)
    conn_kill(cl->busy, msg);
  while ((c = q) != NULL) {
    op_wait_id id = c->id;
    q = c->next;
    call_free(rt, c);
    op__wait_fail(rt, id, msg);
  }
}

/* ---- name resolution ---- */

static void resolve_cb(uv_getaddrinfo_t *req, int status,
                       struct addrinfo *res) {
  rresolve *rr = req->data;
  rclient *cl = rr->client;
  struct addrinfo *ai;
  rcall *q, *c, *failed = NULL, **tail = &failed;
  op_runtime *rt;
  char err[512];

  free(rr);
  if (cl == NULL) { /* closed meanwhile */
    uv_freeaddrinfo(res);
    return;
  }
  rt = cl->mod->rt;
  cl->resolving = NULL;
  err[0] = '\0';
  if (status == 0) {
    /* The first IPv4 address, else the first IPv6 one ("localhost" often
    ** lists ::1 first, where a server bound to 127.0.0.1 is not). */
    for (ai = res; ai != NULL; ai = ai->ai_next)
      if (ai->ai_family == AF_INET &&
          uv_ip4_name((struct sockaddr_in *)ai->ai_addr, cl->ip,
                      sizeof cl->ip) == 0)
        break;
    if (ai == NULL)
      for (ai = res; ai != NULL; ai = ai->ai_next)
        if (ai->ai_family == AF_INET6 &&
            uv_ip6_name((struct sockaddr_in6 *)ai->ai_addr, cl->ip,
                        sizeof cl->ip) == 0)
          break;
    if (ai == NULL) {
      cl->ip[0] = '\0';
      snprintf(err, sizeof err, "redis: cannot resolve host '%s': no address",
               cl->host);
    }
  } else {
    snprintf(err, sizeof err, "redis: cannot resolve host '%s': %s", cl->host,
             uv_strerror(status));
  }
  uv_freeaddrinfo(res);

  /* Send the queued calls in order; collect the ones that fail, and fail
  ** them only at the end: failing runs Lua, which may close cl. */
  q = cl->qhead;
  cl->qhead = cl->qtail = NULL;
  while ((c = q) != NULL) {
    char e[512];
    q = c->next;
    c->next = NULL;
    if (err[0] != '\0' || call_send(cl, c, 0, NULL, NULL, e, sizeof e) != 0) {
      c->err = dupstr(err[0] != '\0' ? err : e);
      *tail = c;
      tail = &c->next;
    }
  }
  while ((c = failed) != NULL) {
    op_wait_id id = c->id;
    char text[512];
    failed = c->next;
    snprintf(text, sizeof text, "%s", c->err != NULL ? c->err : "redis: error");
    call_free(rt, c);
    op__wait_fail(rt, id, text);
  }
}

/* Start resolving cl->host. Returns 0, or -1 with a message in err. */
static int resolve_start(rclient *cl, char *err, size_t errlen) {
  struct addrinfo hints;
  rresolve *rr;
  int rc;

  if (cl->resolving != NULL)
    return 0;
  rr = calloc(1, sizeof *rr);
  if (rr == NULL) {
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  rr->client = cl;
  rr->req.data = rr;
  rc = uv_getaddrinfo(cl->mod->rt->loop, &rr->req, resolve_cb, cl->host, NULL,
                      &hints);
  if (rc != 0) {
    free(rr);
    snprintf(err, errlen, "redis: cannot resolve host '%s': %s", cl->host,
             uv_strerror(rc));
    return -1;
  }
  cl->resolving = rr;
  return 0;
}

/* ---- timeouts ---- */

static void kill_run(op_runtime *rt, void *arg) {
  rkill *k = arg;
  rconn *conn = k->conn;
  char msg[300];

  (void)rt;
  if (conn->ac != NULL && !conn->dying && conn->replied < k->seq) {
    if (conn->blocking)
      snprintf(msg, sizeof msg, "redis: connection closed after a timeout (%s)",
               conn->addr);
    else
      snprintf(msg, sizeof msg, "redis: cannot connect to %s: timed out",
               conn->addr);
    conn_kill(conn, msg); /* our reference keeps conn */
  }
  conn_unref(conn);
  free(k);
}

/* The wait of c ended early (timeout, cancel, shutdown). A queued call is
** dropped; a sent one keeps its place on the shared connection (its reply
** is dropped when it comes), but a dedicated connection, or one that never
** connected, is closed on the next loop turn. */
static void call_abort(void *what, int code) {
  rcall *c = what;
  rconn *conn;
  rkill *k;

  (void)code;
  if (c->state == RC_QUEUED) {
    rclient *cl = c->client;
    rcall **pp = &cl->qhead, *prev = NULL;
    while (*pp != NULL && *pp != c) {
      prev = *pp;
      pp = &(*pp)->next;
    }
    if (*pp == c) {
      *pp = c->next;
      if (cl->qtail == c)
        cl->qtail = prev;
    }
    call_free(c->rt, c);
    return;
  }
  conn = c->conn;
  if (!conn->blocking && conn->connected)
    return;
  k = malloc(sizeof *k);
  if (k == NULL)
    return; /* the connection stays; its reply is dropped */
  k->conn = conn;
  k->seq = c->seq;
  conn->refs++;
  op__defer(conn->rt, kill_run, k);
}

/* ---- the module ---- */

static rmod *get_mod(lua_State *L, op_runtime *rt) {
  rmod *m = rt->io_redis;

  if (m != NULL)
    return m;
  m = calloc(1, sizeof *m);
  if (m == NULL)
    luaL_error(L, "not enough memory");
  m->rt = rt;
  rt->io_redis = m;
  return m;
}

static void redis_shutdown(op_runtime *rt) {
  rmod *m = rt->io_redis;

  if (m == NULL)
    return;
  while (m->clients != NULL)
    client_close(m->clients);
  free(m);
  rt->io_redis = NULL;
}

/* ---- commands ---- */

static int name_is(const char *cmd, const char *name) {
  return strcasecmp(cmd, name) == 0;
}

/* Whether the command blocks the connection it runs on. */
static int is_blocking(int argc, const char **argv) {
  static const char *const names[] = { "BLPOP",    "BRPOP",      "BLMOVE",
                                       "BLMPOP",   "BRPOPLPUSH", "BZPOPMIN",
                                       "BZPOPMAX", "BZMPOP",     NULL };
  int i;

  for (i = 0; names[i] != NULL; i++)
    if (name_is(argv[0], names[i]))
      return 1;
  if (name_is(argv[0], "XREAD") || name_is(argv[0], "XREADGROUP")) {
    for (i = 1; i < argc && !name_is(argv[i], "STREAMS"); i++)
      if (name_is(argv[i], "BLOCK"))
        return 1;
  }
  return 0;
}

/* Why r:call refuses the command, or NULL. */
static const char *refusal(int argc, const char **argv) {
  static const char *const subs[] = { "SUBSCRIBE",    "PSUBSCRIBE",
                                      "SSUBSCRIBE",   "UNSUBSCRIBE",
                                      "PUNSUBSCRIBE", "SUNSUBSCRIBE",
                                      "MONITOR",      NULL };
  static const char *const txn[] = { "MULTI", "EXEC",    "DISCARD",
                                     "WATCH", "UNWATCH", NULL };
  int i;

  for (i = 0; subs[i] != NULL; i++)
    if (name_is(argv[0], subs[i]))
      return "is not supported: a subscribed connection cannot run other "
             "commands";
  for (i = 0; txn[i] != NULL; i++)
    if (name_is(argv[0], txn[i]))
      return "is not supported: other coroutines' commands share the "
             "connection and would land inside the transaction (use EVAL "
             "for an atomic sequence)";
  if (name_is(argv[0], "SELECT"))
    return "is not supported: the connection is shared (use the db option "
           "of offpath.redis.connect)";
  if (name_is(argv[0], "WAIT") || name_is(argv[0], "WAITAOF"))
    return "is not supported: it waits for its own connection's writes, "
           "and that connection is shared";
  if (name_is(argv[0], "HELLO") && argc > 1 && strcmp(argv[1], "2") != 0)
    return "is not supported: only the RESP2 protocol is spoken";
  return NULL;
}

static rclient *check_client(lua_State *L, int idx) {
  rclient *cl = luaL_checkudata(L, idx, REDIS_MT);

  if (cl->closed)
    luaL_error(L, "redis: the client is closed (%s)", cl->addr);
  return cl;
}

/* Issue a command for the running coroutine and suspend until its reply.
** The command is argv[0..argc) (borrowed from L's stack). For RC_CONNECT,
** ud_ref is the client userdata to return.  [-0, +1, e] */
static int start_call(lua_State *L, rclient *cl, int argc, const char **argv,
                      const size_t *argvlen, double timeout, int explicit,
                      int kind, int ud_ref) {
  op_runtime *rt = cl->mod->rt;
  rcall *c;
  op_wait_id id;
  char err[512];

  c = calloc(1, sizeof *c);
  if (c == NULL) {
    if (ud_ref != LUA_NOREF)
      luaL_unref(L, LUA_REGISTRYINDEX, ud_ref);
    return luaL_error(L, "not enough memory");
  }
  c->rt = rt;
  c->kind = kind;
  c->ud_ref = ud_ref;
  c->blocking = kind == RC_USER && is_blocking(argc, argv);
  /* Send (or queue) first, then make the wait: until c->id is set the
  ** call has id 0, so if op__wait_new raises (out of memory) its reply is
  ** only dropped. No reply can come before we yield. */
  err[0] = '\0';
  if (cl->ip[0] == '\0') {
    int len = redisFormatCommandArgv(&c->cmd, argc, argv, argvlen);
    if (len < 0) {
      c->cmd = NULL;
      snprintf(err, sizeof err, "not enough memory");
    } else if (resolve_start(cl, err, sizeof err) == 0) {
      c->cmdlen = (size_t)len;
      c->state = RC_QUEUED;
      c->client = cl;
      if (cl->qtail != NULL)
        cl->qtail->next = c;
      else
        cl->qhead = c;
      cl->qtail = c;
      err[0] = '\0';
    }
  } else {
    call_send(cl, c, argc, argv, argvlen, err, sizeof err);
  }
  if (err[0] != '\0') {
    if (kind == RC_CONNECT)
      client_close(cl);
    call_free(rt, c); /* also drops ud_ref */
    lua_pushstring(L, err);
    return lua_error(L);
  }
  /* A blocking command is bounded by its own server-side timeout, or by an
  ** explicit r:call_timeout; the client's default does not apply. */
  id = op__wait_new(L, REDIS_CALL, c->blocking && !explicit ? 0 : timeout,
                    call_abort, c);
  c->id = id;
  return op__wait_yield(L);
}

/* The arguments from index first on, as strings (numbers converted). The
** arrays live in a userdata left on the stack.  [-0, +1, e] */
static int collect_args(lua_State *L, int first, const char ***argv,
                        size_t **argvlen) {
  int top = lua_gettop(L), argc = top - first + 1, i;
  void *mem;

  if (argc < 1)
    luaL_argerror(L, first, "command name expected");
  mem =
      lua_newuserdatauv(L, (size_t)argc * (sizeof(char *) + sizeof(size_t)), 0);
  *argvlen = mem;
  *argv = (const char **)((size_t *)mem + argc);
  for (i = 0; i < argc; i++) {
    int t = lua_type(L, first + i);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      luaL_typeerror(L, first + i, "string or number");
    if (t == LUA_TNUMBER && !lua_isinteger(L, first + i)) {
      /* 2^40 is sent as "1099511627776", not "1.099511627776e+12" */
      lua_Number n = lua_tonumber(L, first + i);
      lua_Integer v;
      if (n == floor(n) && lua_numbertointeger(n, &v)) {
        lua_pushinteger(L, v);
        lua_replace(L, first + i);
      }
    }
    (*argv)[i] = lua_tolstring(L, first + i, &(*argvlen)[i]);
  }
  return argc;
}

/* r:call(cmd, ...) and r:call_timeout(seconds, cmd, ...) */
static int call_common(lua_State *L, int first, double timeout, int explicit) {
  rclient *cl = check_client(L, 1);
  const char **argv;
  size_t *argvlen;
  const char *why;
  int argc;

  argc = collect_args(L, first, &argv, &argvlen);
  if (memchr(argv[0], '\0', argvlen[0]) != NULL)
    luaL_argerror(L, first, "invalid command name");
  if ((why = refusal(argc, argv)) != NULL)
    return luaL_error(L, "redis: %s %s", argv[0], why);
  op__check_suspend(L, REDIS_CALL);
  return start_call(L, cl, argc, argv, argvlen, timeout, explicit, RC_USER,
                    LUA_NOREF);
}

static int r_call(lua_State *L) {
  rclient *cl = check_client(L, 1);
  return call_common(L, 2, cl->timeout, 0);
}

static int r_call_timeout(lua_State *L) {
  double t = luaL_checknumber(L, 2);

  check_client(L, 1);
  luaL_argcheck(L, t > 0, 2, "must be positive");
  return call_common(L, 3, t, 1);
}

static int r_close(lua_State *L) {
  rclient *cl = luaL_checkudata(L, 1, REDIS_MT);

  client_close(cl);
  return 0;
}

static int r_gc(lua_State *L) {
  rclient *cl = luaL_checkudata(L, 1, REDIS_MT);

  if (cl->mod != NULL)
    client_close(cl);
  free(cl->host);
  free(cl->user);
  free(cl->password);
  free(cl->last_err);
  cl->host = cl->user = cl->password = cl->last_err = NULL;
  return 0;
}

static int r_tostring(lua_State *L) {
  rclient *cl = luaL_checkudata(L, 1, REDIS_MT);

  lua_pushfstring(L, "offpath.redis (%s%s)", cl->addr,
                  cl->closed ? ", closed" : "");
  return 1;
}

/* ---- offpath.redis.connect ---- */

/* Split "host:port", "[v6]:port", "host" or
** "redis://[[user]:password@]host[:port][/db]" into cl.  [-0, +0, e] */
static void parse_addr(lua_State *L, rclient *cl, const char *addr) {
  const char *p = addr, *at, *hs, *he, *slash;
  char port[16];
  size_t n;
  long v;
  char *end;

  cl->port = 6379;
  if (strncmp(p, "redis://", 8) == 0) {
    p += 8;
    slash = strchr(p, '/');
    at = strchr(p, '@');
    if (at != NULL && (slash == NULL || at < slash)) {
      const char *colon = memchr(p, ':', (size_t)(at - p));
      if (colon != NULL) {
        if (colon > p) {
          cl->user = malloc((size_t)(colon - p) + 1);
          if (cl->user == NULL)
            luaL_error(L, "not enough memory");
          memcpy(cl->user, p, (size_t)(colon - p));
          cl->user[colon - p] = '\0';
        }
        cl->password = malloc((size_t)(at - colon));
        if (cl->password == NULL)
          luaL_error(L, "not enough memory");
        memcpy(cl->password, colon + 1, (size_t)(at - colon - 1));
        cl->password[at - colon - 1] = '\0';
      } else {
        cl->password = malloc((size_t)(at - p) + 1);
        if (cl->password == NULL)
          luaL_error(L, "not enough memory");
        memcpy(cl->password, p, (size_t)(at - p));
        cl->password[at - p] = '\0';
      }
      p = at + 1;
    }
    if (slash != NULL && slash[1] != '\0') {
      v = strtol(slash + 1, &end, 10);
      if (*end != '\0' || v < 0 || v > 100000)
        luaL_error(L, "redis: bad database number in '%s'", addr);
      cl->db = (int)v;
    }
    he = slash != NULL ? slash : p + strlen(p);
  } else {
    he = p + strlen(p);
  }
  /* host and port in [p, he) */
  if (*p == '[') {
    hs = p + 1;
    end = memchr(hs, ']', (size_t)(he - hs));
    if (end == NULL)
      luaL_error(L, "redis: bad address '%s'", addr);
    n = (size_t)(end - hs);
    p = end + 1;
  } else {
    const char *colon = memchr(p, ':', (size_t)(he - p));
    hs = p;
    n = (size_t)((colon != NULL ? colon : he) - hs);
    p = colon != NULL ? colon : he;
  }
  if (n == 0)
    luaL_error(L, "redis: bad address '%s' (no host)", addr);
  cl->host = malloc(n + 1);
  if (cl->host == NULL)
    luaL_error(L, "not enough memory");
  memcpy(cl->host, hs, n);
  cl->host[n] = '\0';
  if (p < he) {
    if (*p != ':' || (size_t)(he - p - 1) >= sizeof port || he - p < 2)
      luaL_error(L, "redis: bad address '%s'", addr);
    memcpy(port, p + 1, (size_t)(he - p - 1));
    port[he - p - 1] = '\0';
    v = strtol(port, &end, 10);
    if (*end != '\0' || v < 1 || v > 65535)
      luaL_error(L, "redis: bad port in '%s'", addr);
    cl->port = (int)v;
  }
}

/* Option k of the table at 2, in seconds (0 .. 3600), or def.
** [-0, +0, e] */
static double opt_seconds(lua_State *L, const char *k, double def) {
  double v = def;

  if (lua_getfield(L, 2, k) != LUA_TNIL) {
    v = luaL_checknumber(L, -1);
    if (!(v >= 0 && v <= 3600))
      luaL_error(L, "redis: option '%s' must be from 0 to 3600 seconds", k);
  }
  lua_pop(L, 1);
  return v;
}

/* offpath.redis.connect(addr, [opts]) -> r. Suspends until the server
** answers a PING when the caller may suspend; elsewhere (a main chunk)
** returns at once and connects on the first command. */
static int redis_connect(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  const char *addr = luaL_checkstring(L, 1);
  struct in6_addr a6;
  struct in_addr a4;
  rclient *cl;
  rmod *m;
  const char *argv[1] = { "PING" };
  size_t argvlen[1] = { 4 };
  int ref;

  if (!lua_isnoneornil(L, 2))
    luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  m = get_mod(L, rt);
  cl = lua_newuserdatauv(L, sizeof *cl, 0);
  memset(cl, 0, sizeof *cl);
  cl->db = -1;
  cl->backoff_min = REDIS_BACKOFF_MIN;
  cl->backoff_max = REDIS_BACKOFF_MAX;
  cl->closed = 1; /* until set up: __gc then only frees the strings */
  luaL_setmetatable(L, REDIS_MT);
  cl->mod = m;
  parse_addr(L, cl, addr);
  if (lua_istable(L, 2)) {
    if (lua_getfield(L, 2, "timeout") != LUA_TNIL) {
      cl->timeout = luaL_checknumber(L, -1);
      if (cl->timeout < 0)
        luaL_error(L, "redis: option 'timeout' must not be negative");
    }
    if (lua_getfield(L, 2, "db") != LUA_TNIL) {
      lua_Integer db = luaL_checkinteger(L, -1);
      if (db < 0 || db > 100000)
        luaL_error(L, "redis: option 'db' is out of range");
      cl->db = (int)db;
    }
    if (lua_getfield(L, 2, "password") != LUA_TNIL) {
      free(cl->password);
      cl->password = dupstr(luaL_checkstring(L, -1));
      if (cl->password == NULL)
        luaL_error(L, "not enough memory");
    }
    if (lua_getfield(L, 2, "user") != LUA_TNIL) {
      free(cl->user);
      cl->user = dupstr(luaL_checkstring(L, -1));
      if (cl->user == NULL)
        luaL_error(L, "not enough memory");
    }
    lua_pop(L, 4);
    cl->backoff_min = opt_seconds(L, "backoff_min", cl->backoff_min);
    cl->backoff_max = opt_seconds(L, "backoff_max", cl->backoff_max);
    if (cl->backoff_max < cl->backoff_min)
      luaL_error(L, "redis: option 'backoff_max' is below 'backoff_min'");
  }
  if (cl->user != NULL && cl->password == NULL)
    luaL_error(L, "redis: a user needs a password");
  if (strchr(cl->host, ':') != NULL)
    snprintf(cl->addr, sizeof cl->addr, "[%s]:%d", cl->host, cl->port);
  else
    snprintf(cl->addr, sizeof cl->addr, "%s:%d", cl->host, cl->port);
  if (inet_pton(AF_INET, cl->host, &a4) == 1 ||
      inet_pton(AF_INET6, cl->host, &a6) == 1)
    snprintf(cl->ip, sizeof cl->ip, "%s", cl->host);
  cl->closed = 0;
  cl->linked = 1;
  cl->next = m->clients;
  if (m->clients != NULL)
    m->clients->prev = cl;
  m->clients = cl;
  if (!op__can_suspend(L))
    return 1;
  lua_pushvalue(L, -1);
  ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return start_call(L, cl, 1, argv, argvlen, cl->timeout, 1, RC_CONNECT, ref);
}

void op__open_io_redis(lua_State *L) {
  static const luaL_Reg methods[] = { { "call", r_call },
                                      { "call_timeout", r_call_timeout },
                                      { "close", r_close },
                                      { NULL, NULL } };
  static const luaL_Reg meta[] = { { "__gc", r_gc },
                                   { "__close", r_close },
                                   { "__tostring", r_tostring },
                                   { NULL, NULL } };
  static const luaL_Reg funcs[] = { { "connect", redis_connect },
                                    { NULL, NULL } };

  /* First: whatever fails after this, the hook frees what was made. */
  op__io_at_shutdown(op__runtime(L), redis_shutdown);

  op__io_register(L, REDIS_MT, meta, methods, "redis", funcs);
}
