/* SPDX-License-Identifier: MIT */
/*
** embed-epoll.c - embedding offpath in a host with its own epoll loop.
** Thread: main (the host's loop thread), except the pool threads offpath
** starts itself.
**
** The host serves a line protocol on a loopback TCP port of its own. Each
** line is an event: the host calls the script's on_line(engine, conn, line)
** in a coroutine, and the handler answers later with engine:send(conn,
** text) after offloading its work. offpath is driven through one file
** descriptor in the same epoll set as the host's sockets:
**
**   - op_runtime_fd(rt) becomes readable when offpath has work (a finished
**     task, a child process, a socket of its own);
**   - op_runtime_poll(rt) runs what is ready without blocking and returns
**     how long the host may sleep before offpath needs it again (a timer),
**     or -1 for "until the fd is readable". Call it after every round of
**     events, op_call included, and sleep no longer than it says.
**
** The line "shutdown" makes the host stop: it closes its listener, ignores
** further lines, keeps driving offpath until nothing is pending (answers
** still reach open connections), then frees the runtime and exits.
**
**   usage: embed-epoll SCRIPT    (prints "listening 127.0.0.1:PORT" first)
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4 */
#endif
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <offpath.h>

#define MAX_CONNS    64
#define LINE_MAX_LEN 4096

typedef struct conn {
  int fd;     /* -1 when the slot is free */
  long id;    /* what the script sees; never reused */
  size_t len; /* bytes in buf */
  char buf[LINE_MAX_LEN];
} conn;

typedef struct host {
  op_runtime *rt;
  int ep; /* the epoll set */
  int listener;
  int stopping;
  long next_id;
  conn conns[MAX_CONNS];
} host;

static conn *conn_find(host *h, long id) {
  int i;

  for (i = 0; i < MAX_CONNS; i++)
    if (h->conns[i].fd >= 0 && h->conns[i].id == id)
      return &h->conns[i];
  return NULL;
}

static void conn_close(host *h, conn *c) {
  epoll_ctl(h->ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  c->fd = -1;
}

/* Write all of p; replies are short, so a full socket buffer is treated as
** a dead client rather than queued. Returns 0 or -1. */
static int write_all(int fd, const char *p, size_t n) {
  ssize_t w;

  while (n > 0) {
    w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* engine:send(conn, text) -> true, or false if the connection is gone. */
static int engine_send(lua_State *L) {
  host *h = op_engine_ud(L);
  long id = (long)luaL_checkinteger(L, 2);
  size_t len;
  const char *text = luaL_checklstring(L, 3, &len);
  conn *c = conn_find(h, id);
  int ok = 0;

  if (c != NULL)
    ok = write_all(c->fd, text, len) == 0 && write_all(c->fd, "\n", 1) == 0;
  lua_pushboolean(L, ok);
  return 1;
}

/* One line from a connection: the host's own command, or an event for the
** script. */
static void dispatch(host *h, conn *c, const char *line) {
  lua_State *L = op_runtime_lua(h->rt);

  if (strcmp(line, "shutdown") == 0) {
    h->stopping = 1;
    write_all(c->fd, "bye\n", 4);
    return;
  }
  op_push_engine(h->rt);
  lua_pushinteger(L, c->id);
  lua_pushstring(L, line);
  if (op_call(h->rt, "on_line", 3) != 0) {
    /* It failed before suspending: tell the client. */
    write_all(c->fd, "error\n", 6);
    fprintf(stderr, "embed-epoll: on_line: %s\n", op_errmsg(h->rt));
  }
}

static void conn_readable(host *h, conn *c) {
  char *nl;
  ssize_t n;

  for (;;) {
    n = recv(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
      return;
    if (n <= 0 || h->stopping) {
      conn_close(h, c); /* EOF, error, or we stop listening to it */
      return;
    }
    c->len += (size_t)n;
    c->buf[c->len] = '\0';
    while ((nl = strchr(c->buf, '\n')) != NULL) {
      *nl = '\0';
      if (nl > c->buf && nl[-1] == '\r')
        nl[-1] = '\0';
      dispatch(h, c, c->buf);
      c->len -= (size_t)(nl + 1 - c->buf);
      memmove(c->buf, nl + 1, c->len + 1);
      if (c->fd < 0 || h->stopping)
        return;
    }
    if (c->len == sizeof c->buf - 1) {
      conn_close(h, c); /* a line too long */
      return;
    }
  }
}

static void accept_all(host *h) {
  struct epoll_event ev;
  int fd, i;

  while ((fd = accept4(h->listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
    for (i = 0; i < MAX_CONNS && h->conns[i].fd >= 0; i++)
      ;
    if (i == MAX_CONNS) {
      close(fd);
      continue;
    }
    h->conns[i].fd = fd;
    h->conns[i].id = ++h->next_id;
    h->conns[i].len = 0;
    ev.events = EPOLLIN;
    ev.data.ptr = &h->conns[i];
    epoll_ctl(h->ep, EPOLL_CTL_ADD, fd, &ev);
  }
}

static int listen_loopback(void) {
  struct sockaddr_in sa;
  socklen_t len = sizeof sa;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);

  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sa.sin_port = 0; /* any free port */
  if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
      listen(fd, 16) != 0 ||
      getsockname(fd, (struct sockaddr *)&sa, &len) != 0) {
    perror("embed-epoll: listen");
    exit(1);
  }
  printf("listening 127.0.0.1:%d\n", ntohs(sa.sin_port));
  fflush(stdout);
  return fd;
}

int main(int argc, char **argv) {
  static const luaL_Reg engine[] = { { "send", engine_send }, { NULL, NULL } };
  static host h; /* conns is large */
  struct epoll_event ev, evs[16];
  int i, n, timeout, rc, rtfd;

  if (argc < 2) {
    fprintf(stderr, "usage: embed-epoll SCRIPT\n");
    return 2;
  }
  for (i = 0; i < MAX_CONNS; i++)
    h.conns[i].fd = -1;

  /* The runtime makes its own libuv loop; we only see its fd. */
  if ((rc = op_runtime_new(NULL, &h.rt)) != 0) {
    fprintf(stderr, "embed-epoll: %s\n", op_strerror(rc));
    return 1;
  }
  op_register_engine(h.rt, engine, &h);
  if (op_load_script(h.rt, argv[1]) != 0) {
    fprintf(stderr, "embed-epoll: %s\n", op_errmsg(h.rt));
    op_runtime_free(h.rt);
    return 1;
  }

  h.ep = epoll_create1(0);
  h.listener = listen_loopback();
  ev.events = EPOLLIN;
  ev.data.ptr = &h.listener;
  epoll_ctl(h.ep, EPOLL_CTL_ADD, h.listener, &ev);
  rtfd = op_runtime_fd(h.rt);
  ev.events = EPOLLIN;
  ev.data.ptr = h.rt;
  epoll_ctl(h.ep, EPOLL_CTL_ADD, rtfd, &ev);

  timeout = op_runtime_poll(h.rt);
  for (;;) {
    if (h.stopping && h.listener >= 0) {
      /* No new connections or lines from now on. */
      epoll_ctl(h.ep, EPOLL_CTL_DEL, h.listener, NULL);
      close(h.listener);
      h.listener = -1;
    }
    /* Once stopping, leave when offpath has nothing pending. */
    if (h.stopping && !op_runtime_busy(h.rt))
      break;
    n = epoll_wait(h.ep, evs, 16, timeout);
    if (n < 0 && errno != EINTR) {
      perror("embed-epoll: epoll_wait");
      break;
    }
    for (i = 0; i < n; i++) {
      if (evs[i].data.ptr == &h.listener)
        accept_all(&h);
      else if (evs[i].data.ptr != h.rt)
        conn_readable(&h, evs[i].data.ptr);
      /* offpath's fd: op_runtime_poll below does the work. */
    }
    timeout = op_runtime_poll(h.rt);
    if (timeout < -1) {
      fprintf(stderr, "embed-epoll: %s\n", op_strerror(timeout));
      break;
    }
  }

  rc = op_runtime_free(h.rt);
  for (i = 0; i < MAX_CONNS; i++)
    if (h.conns[i].fd >= 0)
      conn_close(&h, &h.conns[i]);
  close(h.ep);
  printf("stopped after %ld connections\n", h.next_id);
  return rc == 0 ? 0 : 1;
}
