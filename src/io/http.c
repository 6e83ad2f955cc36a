/* SPDX-License-Identifier: MIT */
/*
** http.c - offpath.http: non-blocking HTTP(S) on libcurl's multi-socket
** interface, driven by the runtime's libuv loop. Thread: loop.
**
** DESIGN
**
** One CURLM per runtime (rt->io_http), made on the first request. It keeps
** the connection cache, so requests to one host reuse their connections.
** curl tells us which sockets to watch (sock_cb: one uv_poll per socket,
** its context kept with curl_multi_assign) and when to call it back
** (timer_fn: one uv_timer). A timeout of 0 ("now") never calls curl from
** inside its own callback: it starts a uv_idle (kick) that calls curl on
** the loop's next turn without a sleep. curl's multi-uv.c turns 0 into a
** 1 ms timer instead, which holds every new request (and every request
** reusing a connection) for a millisecond or more: at 64 in flight that
** delay, not the CPU, bounded the rate. An idle handle runs once per
** turn (one started from its callback waits for the next turn), so curl
** asking for 0 again and again cannot starve the loop. Every
** curl_multi_socket_action is followed by check_done(), which drains
** curl_multi_info_read and then feeds on_data functions.
**
** A request (hreq) is in exactly one state:
**
**     made --(curl_multi_add_handle)--> running --(CURLMSG_DONE)--> done
**                                          |
**                                          `--(abort: timeout, cancel,
**                                              shutdown)--> removed
**
** done:    finish() takes the easy handle out of the multi, pushes the
**          response (or fails the wait) and frees the request.
** removed: req_abort() takes the easy handle out of the multi and frees the
**          request; the wait is already resolved, and curl forgets the
**          transfer, so nothing of it comes back later.
**
** Sockets. curl opens and closes its sockets itself (open_socket and
** close_socket count them: the open connections of stats().http) and tells
** sock_cb which to watch. Each watched socket has its own hsock, freed in
** its close callback; CURL_POLL_REMOVE closes it and clears the
** assignment at once, so a new socket that gets the same descriptor
** number gets a new hsock and a new uv_poll (libuv forgot the old one's
** watcher in uv_close). An error on a socket (POLLERR: libuv reports
** UV_EBADF and stops the handle) is not passed on as CURL_CSELECT_ERR,
** which curl reports as "select/poll returned error" whatever happened:
** curl is told the socket is ready for what it waited on, so it reads the
** data still queued or the socket's real error, and the poll is started
** again if curl still watches the socket.
**
** Connections. Kept-alive connections are cached in the multi and reused
** by later requests to the same host; at most max_host_connections are
** open to one host (further requests wait inside curl for a free one, so
** a burst never overflows a small accept backlog), at most
** max_connections idle ones are kept. HTTP/2 is used over TLS when the
** server offers it (ALPN), and requests wait for a connection that can
** multiplex them (CURLOPT_PIPEWAIT) rather than open another one.
**
** Streaming. A response may go to a file (output: written as it arrives)
** or to the handler's on_data function, which runs on the main VM after
** curl_multi_socket_action has returned (never inside a curl callback),
** with the bytes that arrived; a transfer is paused while more than
** HTTP_CHUNK bytes wait for on_data. A request body may come from a file
** (body_file), read as curl sends it.
**
** Name resolution: Debian's libcurl is built with the threaded resolver
** (AsynchDNS without c-ares): getaddrinfo runs on a short-lived helper
** thread that curl owns, and its completion is seen through a socket curl
** asks us to watch. The loop thread never blocks on it.
**
** The timer and the polls keep the loop alive only while a transfer runs;
** idle cached connections do not keep a host's loop from ending.
*/
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <curl/curl.h>

#include "internal.h"

#define HTTP_MAX_SIZE   ((curl_off_t)64 * 1024 * 1024)
#define HTTP_MAX_REDIRS 5
#define HTTP_FREE_EASY  32
#define HTTP_WAIT_CALL  "offpath.http.request"
#define HTTP_CHUNK      ((size_t)256 * 1024) /* on_data: pause beyond this */
#define HTTP_MAX_HOST   8                    /* default max_host_connections */
#define HTTP_MAX_CONNS  64 /* default max_connections (idle cache) */
#define HTTP_MAX_ERRS   64 /* poll errors in a row before curl is told */

typedef struct hsock hsock;
typedef struct hreq hreq;

typedef struct http_mod {
  op_runtime *rt;
  CURLM *multi;
  uv_timer_t timer;
  uv_idle_t kick; /* timeout 0: call curl on the next loop turn */
  int handles;    /* of timer and kick, not yet closed */
  int running;    /* easy handles in the multi */
  int closing;
  hsock *socks; /* every socket context, for ref/unref and shutdown */
  hreq *reqs;   /* every live request, for shutdown */
  hreq *feed;   /* requests with bytes waiting for on_data */
  CURL *free_easy[HTTP_FREE_EASY];
  int nfree_easy;
  long max_host, max_conns;
  /* stats().http */
  uint64_t requests, completed, failed, connects, reused, http2;
  uint64_t *fd_ino; /* inode + 1 of each socket we opened, by descriptor */
  int fd_cap;
} http_mod;

/* One socket curl asked us to watch. Freed in its close callback. */
struct hsock {
  uv_poll_t poll;
  op_runtime *rt; /* (the host may own loop->data) */
  http_mod *mod;  /* NULL once closing */
  curl_socket_t fd;
  int want; /* UV_READABLE | UV_WRITABLE, as curl asked */
  int errs; /* poll errors in a row */
  hsock *prev, *next;
};

struct hreq {
  http_mod *mod;
  hreq *prev, *next; /* in mod->reqs */
  CURL *easy;
  struct curl_slist *headers;
  op_wait_id id;
  int running; /* in the multi */
  int too_big; /* the body passed max_size */
  int nomem;
  int in_lua;  /* on_data runs: req_free is deferred */
  int dead;    /* req_free ran while in_lua */
  int paused;  /* the write callback paused the transfer */
  int in_feed; /* in mod->feed */
  hreq *fprev, *fnext;
  int data_ref;  /* on_data function (registry), or LUA_NOREF */
  char *lua_err; /* on_data raised (malloc) */
  FILE *out;     /* output file, or NULL */
  char *out_path;
  int out_errno;
  curl_off_t out_len;
  FILE *in; /* body_file, or NULL */
  curl_off_t max_size;
  op_buf body;
  op_buf head; /* raw header lines of the last response */
  char method[16];
  char errbuf[CURL_ERROR_SIZE];
  char url[256]; /* for messages; shortened */
};

static uv_once_t global_once = UV_ONCE_INIT;
static CURLcode global_rc;

static void global_init(void) {
  global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* ---- keeping the loop alive ---- */

/* Reference the timer and the polls only while transfers run. */
static void update_ref(http_mod *m) {
  hsock *s;

  if (m->running > 0) {
    uv_ref((uv_handle_t *)&m->timer);
    uv_ref((uv_handle_t *)&m->kick);
    for (s = m->socks; s != NULL; s = s->next)
      uv_ref((uv_handle_t *)&s->poll);
  } else {
    uv_unref((uv_handle_t *)&m->timer);
    uv_unref((uv_handle_t *)&m->kick);
    for (s = m->socks; s != NULL; s = s->next)
      uv_unref((uv_handle_t *)&s->poll);
  }
}

/* ---- requests ---- */

static void req_unlink(hreq *r) {
  http_mod *m = r->mod;

  if (r->prev != NULL)
    r->prev->next = r->next;
  else if (m->reqs == r)
    m->reqs = r->next;
  if (r->next != NULL)
    r->next->prev = r->prev;
  r->prev = r->next = NULL;
}

static void feed_unlink(hreq *r) {
  http_mod *m = r->mod;

  if (!r->in_feed)
    return;
  if (r->fprev != NULL)
    r->fprev->fnext = r->fnext;
  else
    m->feed = r->fnext;
  if (r->fnext != NULL)
    r->fnext->fprev = r->fprev;
  r->fprev = r->fnext = NULL;
  r->in_feed = 0;
}

/* Take r out of the multi and free it; its easy handle is kept for reuse
** when there is room. While r's on_data runs, only the transfer is
** stopped; the free happens when on_data returns. */
static void req_free(hreq *r) {
  http_mod *m = r->mod;

  if (r->running) {
    CURLMcode mc = curl_multi_remove_handle(m->multi, r->easy);
    if (NEVER(mc != CURLM_OK))
      fprintf(stderr, "offpath: http: curl_multi_remove_handle: %s\n",
              curl_multi_strerror(mc));
    r->running = 0;
    if (--m->running == 0)
      update_ref(m);
  }
  feed_unlink(r);
  if (r->in_lua) {
    r->dead = 1;
    return;
  }
  req_unlink(r);
  if (r->easy != NULL) {
    if (m->nfree_easy < HTTP_FREE_EASY && !m->closing) {
      curl_easy_reset(r->easy);
      m->free_easy[m->nfree_easy++] = r->easy;
    } else {
      curl_easy_cleanup(r->easy);
    }
  }
  if (r->data_ref != LUA_NOREF)
    luaL_unref(m->rt->L, LUA_REGISTRYINDEX, r->data_ref);
  if (r->out != NULL) { /* not finished: remove what was written */
    fclose(r->out);
    unlink(r->out_path);
  }
  if (r->in != NULL)
    fclose(r->in);
  free(r->out_path);
  free(r->lua_err);
  curl_slist_free_all(r->headers);
  op__buf_free(&r->body);
  op__buf_free(&r->head);
  free(r);
}

/* The wait ended early (timeout, cancel, shutdown): drop the transfer. */
static void req_abort(void *what, int code) {
  (void)code;
  req_free(what);
}

/* CURLOPT_WRITEFUNCTION: keep the bytes (body, or for on_data), or write
** them to the output file. Never runs Lua. */
static size_t write_cb(char *p, size_t size, size_t n, void *ud) {
  hreq *r = ud;
  http_mod *m = r->mod;
  size_t len = size * n;

  if (r->out != NULL) {
    if (r->out_len + (curl_off_t)len > r->max_size) {
      r->too_big = 1;
      return 0;
    }
    if (fwrite(p, 1, len, r->out) != len) {
      r->out_errno = errno != 0 ? errno : EIO;
      return 0;
    }
    r->out_len += (curl_off_t)len;
    return len;
  }
  if (r->data_ref != LUA_NOREF) {
    if (r->body.len >= HTTP_CHUNK) {
      r->paused = 1;
      return CURL_WRITEFUNC_PAUSE; /* on_data has not caught up */
    }
  } else if ((curl_off_t)(r->body.len + len) > r->max_size) {
    r->too_big = 1;
    return 0; /* CURLE_WRITE_ERROR */
  }
  if (op__buf_append(&r->body, p, len) != 0) {
    r->nomem = 1;
    return 0;
  }
  if (r->data_ref != LUA_NOREF && !r->in_feed) {
    r->fprev = NULL;
    r->fnext = m->feed;
    if (m->feed != NULL)
      m->feed->fprev = r;
    m->feed = r;
    r->in_feed = 1;
  }
  return len;
}

/* CURLOPT_READFUNCTION for body_file. */
static size_t read_cb(char *p, size_t size, size_t n, void *ud) {
  hreq *r = ud;
  size_t got = fread(p, size, n, r->in);

  if (got == 0 && ferror(r->in)) {
    r->out_errno = errno != 0 ? errno : EIO;
    return CURL_READFUNC_ABORT;
  }
  return got;
}

/* CURLOPT_OPENSOCKETFUNCTION: open a socket (close-on-exec, so programs
** started by offpath.exec do not inherit it) and note it in m->fd_ino, for
** the count of open connections. */
static curl_socket_t open_socket(void *ud, curlsocktype purpose,
                                 struct curl_sockaddr *a) {
  http_mod *m = ud;
  curl_socket_t fd;
  struct stat st;

  (void)purpose;
  fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
  if (fd == CURL_SOCKET_BAD)
    return CURL_SOCKET_BAD;
  m->connects++;
  if (fd >= m->fd_cap) {
    int cap = fd + 64;
    uint64_t *p = realloc(m->fd_ino, (size_t)cap * sizeof *p);
    if (p == NULL)
      return fd; /* only the count misses it */
    memset(p + m->fd_cap, 0, (size_t)(cap - m->fd_cap) * sizeof *p);
    m->fd_ino = p;
    m->fd_cap = cap;
  }
  if (fstat(fd, &st) == 0)
    m->fd_ino[fd] = (uint64_t)st.st_ino + 1;
  return fd;
}

/* CURLOPT_CLOSESOCKETFUNCTION */
static int close_socket(void *ud, curl_socket_t fd) {
  http_mod *m = ud;

  if (fd >= 0 && fd < m->fd_cap)
    m->fd_ino[fd] = 0;
  return close(fd);
}

/* The sockets we opened that are still open. curl 7.88 closes the socket
** of a connect that timed out without calling close_socket, so each one
** noted is checked: same descriptor, same inode. */
static int64_t open_sockets(http_mod *m) {
  int64_t n = 0;
  struct stat st;
  int fd;

  for (fd = 0; fd < m->fd_cap; fd++) {
    if (m->fd_ino[fd] == 0)
      continue;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_ino + 1 != m->fd_ino[fd])
      m->fd_ino[fd] = 0;
    else
      n++;
  }
  return n;
}

static size_t header_cb(char *p, size_t size, size_t n, void *ud) {
  hreq *r = ud;
  size_t len = size * n;

  /* A new status line starts a new response (redirect, 100 Continue):
  ** only the last one's headers are returned. */
  if (len >= 5 && memcmp(p, "HTTP/", 5) == 0)
    op__buf_free(&r->head);
  if (op__buf_append(&r->head, p, len) != 0) {
    r->nomem = 1;
    return 0;
  }
  return len;
}

/* ---- building the response ---- */

/* Push a table of the response headers in r->head: lower-case names,
** repeated headers joined with ", ". Returns 0, or -1 if co has no room.
** [-0, +1, m] */
static int push_headers(lua_State *co, hreq *r) {
  const char *p = r->head.p, *end = r->head.p + r->head.len;
  char name[128];

  lua_createtable(co, 0, 8);
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    const char *line = p, *colon, *v, *ve;
    size_t nlen, i;

    if (eol == NULL)
      eol = end;
    p = eol + 1;
    colon = memchr(line, ':', (size_t)(eol - line));
    if (colon == NULL || colon == line)
      continue; /* the status line, the blank line, or junk */
    nlen = (size_t)(colon - line);
    if (nlen >= sizeof name)
      continue;
    for (i = 0; i < nlen; i++)
      name[i] = (char)tolower((unsigned char)line[i]);
    name[nlen] = '\0';
    v = colon + 1;
    ve = eol;
    while (v < ve && (*v == ' ' || *v == '\t'))
      v++;
    while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
      ve--;
    if (lua_getfield(co, -1, name) == LUA_TSTRING) {
      lua_pushliteral(co, ", ");
      lua_pushlstring(co, v, (size_t)(ve - v));
      lua_concat(co, 3);
    } else {
      lua_pop(co, 1);
      lua_pushlstring(co, v, (size_t)(ve - v));
    }
    lua_setfield(co, -2, name);
  }
  return 0;
}

/* Say what failed, in the stable words of the guide. */
static const char *failure(CURLcode rc, long oserr) {
  switch (rc) {
  case CURLE_COULDNT_RESOLVE_HOST:
    return "cannot resolve host";
  case CURLE_COULDNT_RESOLVE_PROXY:
    return "cannot resolve proxy";
  case CURLE_COULDNT_CONNECT:
    return oserr == ECONNREFUSED ? "connection refused" : "cannot connect";
  case CURLE_PEER_FAILED_VERIFICATION:
    return "tls certificate verification failed";
  case CURLE_SSL_CONNECT_ERROR:
    return "tls handshake failed";
  case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CIPHER:
  case CURLE_SSL_ENGINE_NOTFOUND:
  case CURLE_SSL_ENGINE_SETFAILED:
  case CURLE_SSL_CRL_BADFILE:
  case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_SHUTDOWN_FAILED:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
  case CURLE_SSL_INVALIDCERTSTATUS:
  case CURLE_SSL_CLIENTCERT:
  case CURLE_USE_SSL_FAILED:
    return "tls error";
  case CURLE_TOO_MANY_REDIRECTS:
    return "too many redirects";
  case CURLE_URL_MALFORMAT:
    return "malformed URL";
  case CURLE_UNSUPPORTED_PROTOCOL:
    return "unsupported protocol";
  case CURLE_GOT_NOTHING:
    return "empty reply from server";
  case CURLE_RECV_ERROR:
    return "connection lost while receiving";
  case CURLE_SEND_ERROR:
    return "connection lost while sending";
  case CURLE_WEIRD_SERVER_REPLY:
  case CURLE_HTTP2:
  case CURLE_HTTP2_STREAM:
    return "invalid response";
  case CURLE_PARTIAL_FILE:
    return "response cut short";
  default:
    return curl_easy_strerror(rc);
  }
}

/* Hand the bytes waiting in r->body to r's on_data, on the main VM, and
** resume a paused transfer. Returns 0; 1 if on_data raised (r->lua_err
** is set; the caller ends the transfer); -1 if r is gone (its wait ended
** while on_data ran). Runs Lua; never called from a curl callback. */
static int feed_one(hreq *r) {
  http_mod *m = r->mod;
  lua_State *L = m->rt->L;
  int top = lua_gettop(L), st;

  feed_unlink(r);
  if (r->lua_err != NULL)
    return 1;
  if (r->body.len == 0)
    return 0;
  if (!lua_checkstack(L, 3)) {
    r->nomem = 1;
    return 1;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->data_ref);
  lua_pushlstring(L, r->body.p, r->body.len);
  r->body.len = 0; /* keep the buffer for the next chunk */
  r->in_lua = 1;
  st = op__pcall(L, 1, 0, op__traceback);
  r->in_lua = 0;
  if (st != LUA_OK && !r->dead) {
    const char *e = lua_tostring(L, -1);
    char obuf[64];

    if (e == NULL) /* op__traceback makes strings: only defensive */
      e = op__error_object(L, -1, obuf, sizeof obuf);
    r->lua_err = strdup(e);
    if (r->lua_err == NULL)
      r->nomem = 1;
  }
  lua_settop(L, top);
  if (r->dead) {
    req_free(r);
    return -1;
  }
  if (st != LUA_OK)
    return 1;
  if (r->paused && r->running) {
    CURLcode rc;
    r->paused = 0;
    rc = curl_easy_pause(r->easy, CURLPAUSE_CONT); /* may call write_cb */
    if (NEVER(rc != CURLE_OK))
      fprintf(stderr, "offpath: http: curl_easy_pause: %s\n",
              curl_easy_strerror(rc));
  }
  return 0;
}

/* Protected: push the response table of the request (light userdata 1).
** [-1, +1, m] */
static int push_response_p(lua_State *L) {
  hreq *r = lua_touserdata(L, 1);
  long status = 0;
  char *eff = NULL;

  curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &eff);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)status);
  lua_setfield(L, -2, "status");
  push_headers(L, r);
  lua_setfield(L, -2, "headers");
  lua_pushlstring(L, r->body.p, r->body.len);
  lua_setfield(L, -2, "body");
  if (r->out_path != NULL) {
    lua_pushstring(L, r->out_path);
    lua_setfield(L, -2, "output");
    lua_pushinteger(L, (lua_Integer)r->out_len);
    lua_setfield(L, -2, "size");
  }
  if (eff != NULL) {
    lua_pushstring(L, eff);
    lua_setfield(L, -2, "url");
  }
  return 1;
}

/* Whether r's (last) connection was made. */
static int connected(hreq *r) {
  curl_off_t t = 0;

  return curl_easy_getinfo(r->easy, CURLINFO_CONNECT_TIME_T, &t) == CURLE_OK &&
         t > 0;
}

/* A transfer ended: resolve its wait (if still pending) and free it.
** Runs Lua (on_data's last bytes, the resumed coroutine). */
static void finish(hreq *r, CURLcode rc) {
  http_mod *m = r->mod;
  op_runtime *rt = m->rt;
  op_wait_id id;
  lua_State *co;
  char msg[CURL_ERROR_SIZE + 1024];
  long oserr = 0, nconn = 0, ver = 0;
  int top;

  m->completed++;
  if (curl_easy_getinfo(r->easy, CURLINFO_NUM_CONNECTS, &nconn) == CURLE_OK &&
      nconn == 0 && rc == CURLE_OK)
    m->reused++;
  if (curl_easy_getinfo(r->easy, CURLINFO_HTTP_VERSION, &ver) == CURLE_OK &&
      ver == CURL_HTTP_VERSION_2_0)
    m->http2++;
  if (r->data_ref != LUA_NOREF && rc == CURLE_OK && feed_one(r) < 0)
    return; /* r is gone: its wait ended while on_data ran */
  id = r->id;
  co = op__wait_thread(rt, id);
  if (co == NULL) { /* no waiter: op__wait_new raised after the start */
    m->failed++;
    req_free(r);
    return;
  }
  msg[0] = '\0';
  if (r->nomem)
    snprintf(msg, sizeof msg,
             "http: not enough memory reading the response "
             "(%s %s)",
             r->method, r->url);
  else if (r->lua_err != NULL)
    snprintf(msg, sizeof msg, "http: on_data failed (%s %s): %s", r->method,
             r->url, r->lua_err);
  else if (r->too_big || rc == CURLE_FILESIZE_EXCEEDED)
    snprintf(msg, sizeof msg,
             "http: response larger than %" CURL_FORMAT_CURL_OFF_T
             " bytes (%s %s)",
             r->max_size, r->method, r->url);
  else if (r->out_errno != 0 && r->out != NULL)
    snprintf(msg, sizeof msg, "http: cannot write '%s' (%s %s): %s",
             r->out_path, r->method, r->url, strerror(r->out_errno));
  else if (r->out_errno != 0)
    snprintf(msg, sizeof msg, "http: cannot read the body file (%s %s): %s",
             r->method, r->url, strerror(r->out_errno));
  else if (rc == CURLE_OPERATION_TIMEDOUT)
    snprintf(msg, sizeof msg, "timeout: http %s %s: %s%s", r->method, r->url,
             connected(r) ? "" : "not connected in time: ",
             r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc));
  else if (rc != CURLE_OK) {
    curl_easy_getinfo(r->easy, CURLINFO_OS_ERRNO, &oserr);
    snprintf(msg, sizeof msg, "http: %s (%s %s): %s", failure(rc, oserr),
             r->method, r->url,
             r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc));
  } else if (!lua_checkstack(co, 6)) {
    snprintf(msg, sizeof msg, "http: stack overflow (%s %s)", r->method,
             r->url);
  } else if (r->out != NULL) {
    FILE *f = r->out;
    r->out = NULL;
    if (fclose(f) != 0) {
      snprintf(msg, sizeof msg, "http: cannot write '%s' (%s %s): %s",
               r->out_path, r->method, r->url, strerror(errno));
      unlink(r->out_path);
    }
  }
  if (msg[0] != '\0') {
    m->failed++;
    req_free(r);
    op__wait_fail(rt, id, msg);
    return;
  }
  /* Built on the main thread in protected mode: a memory error must not
  ** unwind curl's frames. */
  top = lua_gettop(rt->L);
  lua_pushcfunction(rt->L, push_response_p);
  lua_pushlightuserdata(rt->L, r);
  if (op__pcall(rt->L, 1, 1, NULL) != LUA_OK) {
    lua_settop(rt->L, top);
    snprintf(msg, sizeof msg,
             "http: not enough memory for the response (%s %s)", r->method,
             r->url);
    m->failed++;
    req_free(r);
    op__wait_fail(rt, id, msg);
    return;
  }
  lua_xmove(rt->L, co, 1);
  req_free(r);
  op__wait_resume(rt, id, 1);
}

/* Drain curl's messages after a curl_multi_socket_action, then hand the
** bytes that arrived to on_data functions. Finishing a request resumes its
** coroutine, which may start or abort others: curl allows that between
** curl_multi_info_read calls. A request whose on_data raised is ended
** here. */
static void check_done(http_mod *m) {
  CURLMsg *msg;
  hreq *r;
  int left;

  for (;;) {
    while ((msg = curl_multi_info_read(m->multi, &left)) != NULL) {
      CURL *easy = msg->easy_handle;
      CURLcode rc = msg->data.result;

      r = NULL;
      if (msg->msg != CURLMSG_DONE)
        continue;
      if (curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&r) != CURLE_OK ||
          NEVER(r == NULL))
        continue;
      finish(r, rc);
    }
    if ((r = m->feed) == NULL)
      break;
    if (feed_one(r) > 0)
      finish(r, CURLE_ABORTED_BY_CALLBACK); /* on_data raised */
  }
}

static void socket_action(http_mod *m, curl_socket_t fd, int flags) {
  int running;
  CURLMcode mc = curl_multi_socket_action(m->multi, fd, flags, &running);

  if (NEVER(mc != CURLM_OK))
    fprintf(stderr, "offpath: http: curl_multi_socket_action: %s\n",
            curl_multi_strerror(mc));
  check_done(m);
}

/* ---- curl's callbacks ---- */

static void sock_close_cb(uv_handle_t *h) {
  hsock *s = h->data;

  s->rt->uv_handles--;
  free(s);
}

static void sock_close(http_mod *m, hsock *s) {
  if (s->prev != NULL)
    s->prev->next = s->next;
  else if (m->socks == s)
    m->socks = s->next;
  if (s->next != NULL)
    s->next->prev = s->prev;
  s->mod = NULL;
  uv_close((uv_handle_t *)&s->poll, sock_close_cb);
}

static void poll_cb(uv_poll_t *p, int status, int events) {
  hsock *s = p->data;
  http_mod *m = s->mod;
  int flags = 0;

  if (m == NULL)
    return;
  if (status < 0) {
    /* POLLERR: libuv stopped the handle. Let curl do the I/O it waited
    ** for, so it reads what is still queued or the socket's own error
    ** (ECONNRESET, ETIMEDOUT, ...); only an error that keeps coming back
    ** without curl acting on it is passed on as such. */
    events = s->want;
    if (++s->errs > HTTP_MAX_ERRS)
      flags = CURL_CSELECT_ERR;
  } else {
    s->errs = 0;
  }
  if (events & UV_READABLE)
    flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE)
    flags |= CURL_CSELECT_OUT;
  socket_action(m, s->fd, flags);
  /* s is valid until its close callback; s->mod is NULL once curl let go
  ** of the socket. Restart the poll libuv stopped. */
  if (status < 0 && s->mod != NULL && s->want != 0 &&
      uv_poll_start(&s->poll, s->want, poll_cb) != 0)
    socket_action(m, s->fd, CURL_CSELECT_ERR);
}

/* CURLMOPT_SOCKETFUNCTION: watch fd for what curl wants. Returns -1 (curl
** then fails the transfers on fd) if the socket cannot be watched. */
static int sock_cb(CURL *easy, curl_socket_t fd, int what, void *userp,
                   void *socketp) {
  http_mod *m = userp;
  hsock *s = socketp;
  int events = 0, rc;

  (void)easy;
  if (what == CURL_POLL_REMOVE) {
    if (s != NULL) {
      sock_close(m, s);
      if (NEVER(curl_multi_assign(m->multi, fd, NULL) != CURLM_OK))
        return -1;
    }
    return 0;
  }
  if (s == NULL) {
    s = calloc(1, sizeof *s);
    if (s == NULL)
      return -1;
    rc = uv_poll_init_socket(m->rt->loop, &s->poll, fd);
    if (rc != 0) {
      fprintf(stderr, "offpath: http: cannot watch socket %d: %s\n", (int)fd,
              uv_strerror(rc));
      free(s);
      return -1;
    }
    m->rt->uv_handles++;
    s->poll.data = s;
    s->rt = m->rt;
    s->mod = m;
    s->fd = fd;
    s->next = m->socks;
    if (m->socks != NULL)
      m->socks->prev = s;
    m->socks = s;
    if (m->running == 0)
      uv_unref((uv_handle_t *)&s->poll);
    if (curl_multi_assign(m->multi, fd, s) != CURLM_OK) {
      sock_close(m, s);
      return -1;
    }
  }
  if (what & CURL_POLL_IN)
    events |= UV_READABLE;
  if (what & CURL_POLL_OUT)
    events |= UV_WRITABLE;
  s->want = events;
  s->errs = 0;
  rc = uv_poll_start(&s->poll, events, poll_cb);
  return rc == 0 ? 0 : -1;
}

static void timer_cb(uv_timer_t *t) {
  http_mod *m = t->data;
  socket_action(m, CURL_SOCKET_TIMEOUT, 0);
}

static void kick_cb(uv_idle_t *k) {
  http_mod *m = k->data;

  uv_idle_stop(k);
  socket_action(m, CURL_SOCKET_TIMEOUT, 0);
}

/* CURLMOPT_TIMERFUNCTION: call curl back after timeout_ms (-1: never; 0:
** on the loop's next turn, never from here, which would re-enter curl). */
static int timer_fn(CURLM *multi, long timeout_ms, void *userp) {
  http_mod *m = userp;

  (void)multi;
  uv_timer_stop(&m->timer);
  uv_idle_stop(&m->kick);
  if (timeout_ms < 0 || m->closing)
    return 0;
  if (timeout_ms == 0)
    return uv_idle_start(&m->kick, kick_cb) == 0 ? 0 : -1;
  return uv_timer_start(&m->timer, timer_cb, (uint64_t)timeout_ms, 0) == 0 ? 0
                                                                           : -1;
}

/* ---- the module state ---- */

static void mod_close_cb(uv_handle_t *h) {
  http_mod *m = h->data;

  m->rt->uv_handles--;
  if (--m->handles > 0)
    return;
  free(m->fd_ino);
  free(m);
}

/* The runtime's HTTP state, made on first use. Raises on failure.
** [-0, +0, e] */
static http_mod *get_mod(lua_State *L, op_runtime *rt) {
  http_mod *m = rt->io_http;

  if (m != NULL)
    return m;
  uv_once(&global_once, global_init);
  if (global_rc != CURLE_OK)
    luaL_error(L, "http: cannot initialise libcurl: %s",
               curl_easy_strerror(global_rc));
  m = calloc(1, sizeof *m);
  if (m == NULL)
    luaL_error(L, "not enough memory");
  m->rt = rt;
  m->max_host = HTTP_MAX_HOST;
  m->max_conns = HTTP_MAX_CONNS;
  m->multi = curl_multi_init();
  if (m->multi == NULL) {
    free(m);
    luaL_error(L, "http: cannot make a curl multi handle");
    return NULL; /* not reached: luaL_error does not return */
  }
  if (curl_multi_setopt(m->multi, CURLMOPT_SOCKETFUNCTION, sock_cb) ||
      curl_multi_setopt(m->multi, CURLMOPT_SOCKETDATA, m) ||
      curl_multi_setopt(m->multi, CURLMOPT_TIMERFUNCTION, timer_fn) ||
      curl_multi_setopt(m->multi, CURLMOPT_TIMERDATA, m) ||
      curl_multi_setopt(m->multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX) ||
      curl_multi_setopt(m->multi, CURLMOPT_MAX_HOST_CONNECTIONS,
                        (long)HTTP_MAX_HOST) ||
      curl_multi_setopt(m->multi, CURLMOPT_MAXCONNECTS, (long)HTTP_MAX_CONNS)) {
    curl_multi_cleanup(m->multi);
    free(m);
    luaL_error(L, "http: cannot set up the curl multi handle");
  }
  uv_timer_init(rt->loop, &m->timer);
  m->timer.data = m;
  uv_idle_init(rt->loop, &m->kick);
  m->kick.data = m;
  m->handles = 2;
  rt->uv_handles += 2;
  uv_unref((uv_handle_t *)&m->timer);
  uv_unref((uv_handle_t *)&m->kick);
  rt->io_http = m;
  return m;
}

static void http_shutdown(op_runtime *rt) {
  http_mod *m = rt->io_http;
  hsock *s;
  CURLMcode mc;

  if (m == NULL)
    return;
  m->closing = 1;
  /* Every wait has ended by now, so no request is left; free any anyway. */
  while (m->reqs != NULL)
    req_free(m->reqs);
  while (m->nfree_easy > 0)
    curl_easy_cleanup(m->free_easy[--m->nfree_easy]);
  mc = curl_multi_cleanup(m->multi); /* may call sock_cb to remove sockets */
  if (NEVER(mc != CURLM_OK))
    fprintf(stderr, "offpath: http: curl_multi_cleanup: %s\n",
            curl_multi_strerror(mc));
  while ((s = m->socks) != NULL)
    sock_close(m, s);
  uv_timer_stop(&m->timer);
  uv_idle_stop(&m->kick);
  uv_close((uv_handle_t *)&m->timer, mod_close_cb);
  uv_close((uv_handle_t *)&m->kick, mod_close_cb);
  rt->io_http = NULL;
}

/* ---- offpath.http.request ---- */

/* The options of one request, borrowed from the Lua stack. */
typedef struct hopts {
  const char *url;
  const char *method;
  const char *body;
  size_t body_len;
  int has_body;
  double timeout;
  double connect_timeout;
  lua_Integer max_size;
  int follow;
  lua_Integer max_redirects;
  int insecure;
  const char *cainfo;
  const char *output;    /* write the response body to this file */
  const char *body_file; /* send this file as the request body */
  int on_data;           /* stack index of the on_data function, or 0 */
} hopts;

static double opt_number(lua_State *L, int t, const char *k, double def) {
  double v = def;

  if (lua_getfield(L, t, k) != LUA_TNIL) {
    if (!lua_isnumber(L, -1))
      luaL_error(L, "http: option '%s' must be a number", k);
    v = lua_tonumber(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

static const char *opt_string(lua_State *L, int t, const char *k, size_t *len) {
  const char *s = NULL;

  if (lua_getfield(L, t, k) != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
      luaL_error(L, "http: option '%s' must be a string", k);
    s = lua_tolstring(L, -1, len);
  }
  lua_pop(L, 1); /* still anchored by the options table */
  return s;
}

static int opt_bool(lua_State *L, int t, const char *k) {
  int v;

  lua_getfield(L, t, k);
  v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* Read the options table at t.  [-0, +0, e] */
static void read_opts(lua_State *L, int t, hopts *o) {
  double n;

  memset(o, 0, sizeof *o);
  o->url = opt_string(L, t, "url", NULL);
  if (o->url == NULL)
    luaL_error(L, "http: option 'url' is required");
  o->method = opt_string(L, t, "method", NULL);
  o->body = opt_string(L, t, "body", &o->body_len);
  o->body_file = opt_string(L, t, "body_file", NULL);
  if (o->body != NULL && o->body_file != NULL)
    luaL_error(L, "http: options 'body' and 'body_file' exclude each other");
  o->has_body = o->body != NULL || o->body_file != NULL;
  o->output = opt_string(L, t, "output", NULL);
  o->timeout = opt_number(L, t, "timeout", 0);
  if (o->timeout < 0)
    luaL_error(L, "http: option 'timeout' must not be negative");
  o->connect_timeout = opt_number(L, t, "connect_timeout", 0);
  if (o->connect_timeout < 0)
    luaL_error(L, "http: option 'connect_timeout' must not be negative");
  /* Bodies kept in memory are limited by default; streamed ones not. */
  lua_getfield(L, t, "on_data");
  n = opt_number(
      L, t, "max_size",
      o->output != NULL || !lua_isnil(L, -1) ? 9.0e15 : (double)HTTP_MAX_SIZE);
  lua_pop(L, 1);
  if (n < 0 || n > 9.0e15)
    luaL_error(L, "http: option 'max_size' is out of range");
  o->max_size = (lua_Integer)n;
  o->follow = opt_bool(L, t, "follow");
  n = opt_number(L, t, "max_redirects", HTTP_MAX_REDIRS);
  if (n < 0 || n > 1000)
    luaL_error(L, "http: option 'max_redirects' is out of range");
  o->max_redirects = (lua_Integer)n;
  o->insecure = opt_bool(L, t, "insecure");
  o->cainfo = opt_string(L, t, "cainfo", NULL);
}

/* Add the request headers of the table at idx to r->headers. Returns 0, or
** a message for a bad entry (on the stack).  [-0, +0, m] */
static const char *build_headers(lua_State *L, int idx, hreq *r) {
  struct curl_slist *sl;
  int expect = 0;

  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    const char *line;

    if (lua_type(L, -2) == LUA_TSTRING) {
      const char *k = lua_tostring(L, -2);
      if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER) {
        lua_pop(L, 2);
        return lua_pushfstring(L, "http: header '%s' must be a string", k);
      }
      if (strpbrk(k, ":\r\n") != NULL ||
          strpbrk(lua_tostring(L, -1), "\r\n") != NULL) {
        lua_pop(L, 2);
        return lua_pushfstring(L, "http: invalid header '%s'", k);
      }
      if (strcasecmp(k, "expect") == 0)
        expect = 1;
      line = lua_pushfstring(L, "%s: %s", k, lua_tostring(L, -1));
    } else if (lua_type(L, -1) == LUA_TSTRING) {
      line = lua_tostring(L, -1); /* {"Name: value"} */
      if (strpbrk(line, "\r\n") != NULL) {
        lua_pop(L, 2);
        return lua_pushfstring(L, "http: invalid header '%s'", line);
      }
      if (strncasecmp(line, "expect:", 7) == 0)
        expect = 1;
      lua_pushvalue(L, -1);
    } else {
      lua_pop(L, 2);
      return lua_pushliteral(L, "http: headers must map names to values");
    }
    sl = curl_slist_append(r->headers, line);
    lua_pop(L, 2);
    if (sl == NULL)
      return lua_pushliteral(L, "not enough memory");
    r->headers = sl;
  }
  if (!expect) {
    /* No "100-continue" round trip before bodies. */
    sl = curl_slist_append(r->headers, "Expect:");
    if (sl == NULL)
      return lua_pushliteral(L, "not enough memory");
    r->headers = sl;
  }
  return NULL;
}

#define SETOPT(opt, val)                                                       \
  do {                                                                         \
    if (rc == CURLE_OK)                                                        \
      rc = curl_easy_setopt(r->easy, (opt), (val));                            \
  } while (0)

/* Start the request described by the options table at index 1; suspend.
** [-0, +1, e] */
static int http_start(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  http_mod *m;
  hopts o;
  hreq *r;
  const char *err = NULL;
  CURLcode rc = CURLE_OK;
  CURLMcode mc;
  int hidx = 0, i;
  curl_off_t body_size = 0;
  op_wait_id id;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  read_opts(L, 1, &o);
  lua_getfield(L, 1, "headers");
  if (!lua_isnil(L, -1)) {
    if (!lua_istable(L, -1))
      luaL_error(L, "http: option 'headers' must be a table");
    hidx = lua_gettop(L);
  }
  if (lua_getfield(L, 1, "on_data") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TFUNCTION)
      luaL_error(L, "http: option 'on_data' must be a function");
    if (o.output != NULL)
      luaL_error(L, "http: options 'output' and 'on_data' exclude each other");
    o.on_data = lua_gettop(L);
  }
  op__check_suspend(L, HTTP_WAIT_CALL);
  m = get_mod(L, rt);

  r = calloc(1, sizeof *r);
  if (r == NULL)
    return luaL_error(L, "not enough memory");
  r->mod = m;
  r->data_ref = LUA_NOREF;
  op__buf_init(&r->body);
  op__buf_init(&r->head);
  r->max_size = (curl_off_t)o.max_size;
  snprintf(r->url, sizeof r->url, "%s", o.url);
  if (strlen(o.url) >= sizeof r->url)
    memcpy(r->url + sizeof r->url - 4, "...", 4);
  if (o.method == NULL)
    o.method = o.has_body ? "POST" : "GET";
  for (i = 0; o.method[i] != '\0' && i < (int)sizeof r->method - 1; i++)
    r->method[i] = (char)toupper((unsigned char)o.method[i]);
  r->method[i] = '\0';
  r->next = m->reqs;
  if (m->reqs != NULL)
    m->reqs->prev = r;
  m->reqs = r;
  if (o.method[i] != '\0' || i == 0 || strpbrk(r->method, " \r\n") != NULL) {
    req_free(r);
    return luaL_error(L, "http: invalid method '%s'", o.method);
  }
  if (m->nfree_easy > 0)
    r->easy = m->free_easy[--m->nfree_easy];
  else
    r->easy = curl_easy_init();
  if (r->easy == NULL) {
    req_free(r);
    return luaL_error(L, "http: cannot make a curl handle");
  }
  if (o.body_file != NULL) {
    struct stat st;
    r->in = fopen(o.body_file, "rbe");
    if (r->in == NULL || fstat(fileno(r->in), &st) != 0) {
      lua_pushfstring(L, "http: cannot open '%s': %s", o.body_file,
                      strerror(errno));
      req_free(r);
      return lua_error(L);
    }
    body_size = (curl_off_t)st.st_size;
  }
  if (o.output != NULL) {
    r->out_path = strdup(o.output);
    if (r->out_path == NULL) {
      req_free(r);
      return luaL_error(L, "not enough memory");
    }
    r->out = fopen(o.output, "wbe");
    if (r->out == NULL) {
      lua_pushfstring(L, "http: cannot write '%s': %s", o.output,
                      strerror(errno));
      free(r->out_path);
      r->out_path = NULL;
      req_free(r);
      return lua_error(L);
    }
  }
  if (hidx != 0 && (err = build_headers(L, hidx, r)) != NULL) {
    req_free(r);
    return lua_error(L);
  }
  if (hidx == 0 && (r->headers = curl_slist_append(NULL, "Expect:")) == NULL) {
    req_free(r);
    return luaL_error(L, "not enough memory");
  }

  SETOPT(CURLOPT_URL, o.url);
  SETOPT(CURLOPT_PRIVATE, (char *)r);
  SETOPT(CURLOPT_NOSIGNAL, 1L);
  SETOPT(CURLOPT_OPENSOCKETFUNCTION, open_socket);
  SETOPT(CURLOPT_OPENSOCKETDATA, m);
  SETOPT(CURLOPT_CLOSESOCKETFUNCTION, close_socket);
  SETOPT(CURLOPT_CLOSESOCKETDATA, m);
  SETOPT(CURLOPT_PIPEWAIT, 1L);
  SETOPT(CURLOPT_ERRORBUFFER, r->errbuf);
  SETOPT(CURLOPT_WRITEFUNCTION, write_cb);
  SETOPT(CURLOPT_WRITEDATA, r);
  SETOPT(CURLOPT_HEADERFUNCTION, header_cb);
  SETOPT(CURLOPT_HEADERDATA, r);
  SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
  SETOPT(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  SETOPT(CURLOPT_USERAGENT, "offpath/" OP_VERSION_STRING);
  SETOPT(CURLOPT_HTTPHEADER, r->headers);
  SETOPT(CURLOPT_FOLLOWLOCATION, o.follow ? 1L : 0L);
  SETOPT(CURLOPT_MAXREDIRS, (long)o.max_redirects);
  SETOPT(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)o.max_size);
  /* The request's timeout is the wait's alone (op__wait_new below): it
  ** removes the transfer and says "timeout after N s" whatever the
  ** transfer was doing; a CURLOPT_TIMEOUT_MS of the same length raced it
  ** and, winning on a busy loop, said it in curl's words instead. */
  if (o.connect_timeout > 0)
    SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long)(o.connect_timeout * 1000.0 + 0.5));
  if (o.output != NULL || o.on_data != 0)
    SETOPT(CURLOPT_BUFFERSIZE, (long)HTTP_CHUNK); /* fewer, larger reads */
  if (o.insecure) {
    SETOPT(CURLOPT_SSL_VERIFYPEER, 0L);
    SETOPT(CURLOPT_SSL_VERIFYHOST, 0L);
  }
  if (o.cainfo != NULL)
    SETOPT(CURLOPT_CAINFO, o.cainfo);
  if (strcmp(r->method, "HEAD") == 0) {
    SETOPT(CURLOPT_NOBODY, 1L);
  } else if (strcmp(r->method, "GET") == 0 && !o.has_body) {
    SETOPT(CURLOPT_HTTPGET, 1L);
  } else {
    if (r->in != NULL) {
      /* A body read from the file as it is sent, with Content-Length. */
      SETOPT(CURLOPT_POST, 1L);
      SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, body_size);
      SETOPT(CURLOPT_READFUNCTION, read_cb);
      SETOPT(CURLOPT_READDATA, r);
    } else if (o.has_body || strcmp(r->method, "POST") == 0 ||
               strcmp(r->method, "PUT") == 0 ||
               strcmp(r->method, "PATCH") == 0) {
      /* A body, possibly empty: sent with Content-Length. */
      SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)o.body_len);
      SETOPT(CURLOPT_COPYPOSTFIELDS, o.has_body ? o.body : "");
    }
    if (strcmp(r->method, "POST") != 0)
      SETOPT(CURLOPT_CUSTOMREQUEST, r->method);
  }
  if (rc != CURLE_OK) {
    req_free(r);
    return luaL_error(L, "http: cannot set up the request (%s %s): %s",
                      r->method, o.url, curl_easy_strerror(rc));
  }

  /* Start the transfer first (curl does nothing before the loop runs),
  ** then make the wait: if op__wait_new raises (out of memory), the
  ** transfer has id 0, and its completion only frees it. */
  mc = curl_multi_add_handle(m->multi, r->easy);
  if (mc != CURLM_OK) {
    lua_pushfstring(L, "http: cannot start the request (%s %s): %s", r->method,
                    r->url, curl_multi_strerror(mc));
    req_free(r);
    return lua_error(L);
  }
  r->running = 1;
  m->requests++;
  if (m->running++ == 0)
    update_ref(m);
  if (o.on_data != 0) {
    lua_pushvalue(L, o.on_data);
    r->data_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* one registry per VM */
  }
  id = op__wait_new(L, HTTP_WAIT_CALL, o.timeout, req_abort, r);
  r->id = id;
  return op__wait_yield(L);
}

/* offpath.http.request{url=, method=, headers=, body=, timeout=, ...} */
static int http_request(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  return http_start(L);
}

/* The shortcuts: (url, [body], [opts]) into one options table at index 1.
** For GET, a table as the second argument is the options.  [-0, +0, e] */
static int shortcut(lua_State *L, const char *method, int takes_body) {
  int body = 0, opts = 0;

  luaL_checkstring(L, 1);
  if (!takes_body && lua_istable(L, 2) && lua_isnone(L, 3)) {
    opts = 2;
  } else {
    if (!lua_isnoneornil(L, 2)) {
      if (lua_type(L, 2) != LUA_TSTRING && lua_type(L, 2) != LUA_TNUMBER)
        luaL_typeerror(L, 2, "string");
      body = 2;
    }
    if (!lua_isnoneornil(L, 3)) {
      luaL_checktype(L, 3, LUA_TTABLE);
      opts = 3;
    }
  }
  lua_createtable(L, 0, 8);
  if (opts != 0) {
    lua_pushnil(L);
    while (lua_next(L, opts) != 0) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
  }
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "url");
  lua_pushstring(L, method);
  lua_setfield(L, -2, "method");
  if (body != 0) {
    lua_pushvalue(L, body);
    lua_setfield(L, -2, "body");
  }
  lua_replace(L, 1);
  lua_settop(L, 1);
  return http_start(L);
}

static int http_get(lua_State *L) {
  return shortcut(L, "GET", 0);
}

static int http_post(lua_State *L) {
  return shortcut(L, "POST", 1);
}

static int http_put(lua_State *L) {
  return shortcut(L, "PUT", 1);
}

/* offpath.http.configure{max_host_connections=, max_connections=}: the
** connection limits of this runtime's HTTP client. Any time; applies to
** requests started afterwards. */
static long opt_limit(lua_State *L, const char *k, long lo) {
  lua_Integer v;
  int isint;

  if (lua_getfield(L, 1, k) == LUA_TNIL) {
    lua_pop(L, 1);
    return -1;
  }
  v = lua_tointegerx(L, -1, &isint);
  if (!isint || v < lo || v > 100000)
    luaL_error(L, "http: option '%s' must be an integer from %d to 100000", k,
               (int)lo);
  lua_pop(L, 1);
  return (long)v;
}

static int http_configure(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  http_mod *m;
  long host, conns;

  luaL_checktype(L, 1, LUA_TTABLE);
  host = opt_limit(L, "max_host_connections", 1);
  conns = opt_limit(L, "max_connections", 0);
  m = get_mod(L, rt);
  if (host != -1)
    m->max_host = host;
  if (conns != -1)
    m->max_conns = conns;
  if (curl_multi_setopt(m->multi, CURLMOPT_MAX_HOST_CONNECTIONS, m->max_host) !=
          CURLM_OK ||
      curl_multi_setopt(m->multi, CURLMOPT_MAXCONNECTS, m->max_conns) !=
          CURLM_OK)
    luaL_error(L, "http: cannot set the connection limits");
  return 0;
}

static void set_count(lua_State *L, const char *k, int64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

void op__io_http_stats(lua_State *L, op_runtime *rt) {
  http_mod *m = rt->io_http;

  lua_createtable(L, 0, 10);
  set_count(L, "requests", m != NULL ? (int64_t)m->requests : 0);
  set_count(L, "inflight", m != NULL ? m->running : 0);
  set_count(L, "completed", m != NULL ? (int64_t)m->completed : 0);
  set_count(L, "failed", m != NULL ? (int64_t)m->failed : 0);
  set_count(L, "connections", m != NULL ? open_sockets(m) : 0);
  set_count(L, "opened", m != NULL ? (int64_t)m->connects : 0);
  set_count(L, "reused", m != NULL ? (int64_t)m->reused : 0);
  set_count(L, "http2", m != NULL ? (int64_t)m->http2 : 0);
  set_count(L, "max_host_connections", m != NULL ? m->max_host : HTTP_MAX_HOST);
  set_count(L, "max_connections", m != NULL ? m->max_conns : HTTP_MAX_CONNS);
}

/* offpath.http.stats(): the same table as offpath.stats().http. */
static int http_stats(lua_State *L) {
  op__io_http_stats(L, op__runtime(L));
  return 1;
}

void op__open_io_http(lua_State *L) {
  static const luaL_Reg funcs[] = { { "request", http_request },
                                    { "configure", http_configure },
                                    { "stats", http_stats },
                                    { "get", http_get },
                                    { "post", http_post },
                                    { "put", http_put },
                                    { NULL, NULL } };

  /* First: whatever fails after this, the hook frees what was made. */
  op__io_at_shutdown(op__runtime(L), http_shutdown);

  luaL_newlib(L, funcs);
  lua_setfield(L, -2, "http");
}
