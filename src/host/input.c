/* SPDX-License-Identifier: MIT */
/*
** input.c - the host's input sources: stdin, files and FIFOs, tcp://
** listeners with many clients, udp:// sockets; line splitting, handing
** lines to the engine, and backpressure (reading stops while the engine is
** blocked and starts again when it drains).
** Thread: loop.
**
** DESIGN
**
** Each source reads into its own line splitter and hands complete lines to
** the engine in src_pump() (h->deliver, which engine.c installs),
** HOST_PUMP_BATCH at a time. A loop turn costs microseconds (a poll, the
** idle and timer phases), as much as ten trivial handlers, so pump_all()
** goes round the sources, a batch each, while one has more and less than
** HOST_PUMP_NS has passed since the pump began; slow handlers still let
** the loop turn after one round. A read callback hands over one batch
** (src_fed). What is left waits for the next turn (host_pump_soon()).
** Reading is on only while the splitter holds no complete line (a file:
** few lines) and the engine is not blocked, so a blocked engine stops
** every input:
**
**   file    one uv_fs_read (libuv's threads) of up to READ_MAX bytes at
**           a time, the next one when less than READ_CHUNK bytes of lines
**           are left (so the read overlaps handling them) and the engine
**           is not blocked: the file is read no faster than records are
**           handled.
**   stream  uv_read_start/uv_read_stop (pipes, FIFOs, terminals, TCP
**           clients): the kernel's socket buffers fill and TCP tells the
**           sender to wait.
**   udp     uv_poll on our own socket, read with recvmmsg; stopping the
**           poll leaves datagrams to the kernel, which drops them when its
**           buffer is full. Drops are counted from the SO_RXQ_OVFL control
**           message of each datagram (the kernel's drop counter when the
**           datagram was queued) and, when the socket closes, from the
**           drops column of /proc/net/udp, which also sees drops after the
**           last datagram read.
**
** A source ends when its bytes are at EOF and its lines are used up (or at
** once when the host stops). Sources are freed at exit, except TCP clients,
** which are freed when closed and no record of theirs is in flight.
*/
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include "host.h"

#define READ_CHUNK 65536
#define READ_MAX   (4 * READ_CHUNK) /* bytes asked for in one read */
#define UDP_BATCH  16
#define UDP_DGRAM  65536

static void src_pump(src *s, int *budget);
static void stream_alloc_cb(uv_handle_t *hd, size_t suggested, uv_buf_t *b);
static void stream_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *b);
static void udp_poll_cb(uv_poll_t *p, int status, int events);

const char *input_kind_name(src_kind k) {
  switch (k) {
  case SRC_FILE:
    return "file";
  case SRC_STREAM:
    return "stream";
  case SRC_TCP_SERVER:
    return "tcp";
  case SRC_TCP_CLIENT:
    return "tcp-client";
  case SRC_UDP:
    return "udp";
  case SRC_RSTREAM:
    return "redis-stream";
  }
  return "?";
}

/* ---- sources ---- */

static src *src_new(host *h, src_kind kind, const char *name) {
  src *s = calloc(1, sizeof *s), **pp;

  if (s == NULL)
    return NULL;
  if ((s->name = strdup(name)) == NULL) {
    free(s);
    return NULL;
  }
  s->h = h;
  s->top = s;
  s->kind = kind;
  s->fd = -1;
  s->refs = 1;
  ls_init(&s->ls, HOST_MAX_LINE);
  for (pp = &h->srcs; *pp != NULL; pp = &(*pp)->next)
    ;
  *pp = s;
  return s;
}

static void src_destroy(src *s) {
  if (s->kind == SRC_RSTREAM)
    rstream_destroy(s);
  ls_free(&s->ls);
  free(s->udp_buf);
  free(s->name);
  free(s);
}

/* Free a closed TCP client once no record refers to it. Other sources
** stay until input_free_all(), for the summary. */
static void src_maybe_free(src *s) {
  host *h = s->h;
  src **pp;

  if (s->kind != SRC_TCP_CLIENT || !s->closed || s->refs > 0 || h->pumping)
    return;
  for (pp = &h->srcs; *pp != NULL; pp = &(*pp)->next) {
    if (*pp == s) {
      *pp = s->next;
      break;
    }
  }
  src_destroy(s);
}

void input_src_unref(src *s) {
  s->refs--;
  src_maybe_free(s);
}

/* The source's handle or fd is closed. */
static void src_closed(src *s) {
  s->closed = 1;
  if (s->own_fd && s->fd >= 0)
    close(s->fd);
  s->fd = -1;
  ls_free(&s->ls);
  free(s->udp_buf);
  s->udp_buf = NULL;
  s->refs--;
  src_maybe_free(s);
}

static void src_close_cb(uv_handle_t *hd) {
  src_closed(hd->data);
}

/* Count what is still queued on a UDP socket that closes as skipped: a
** datagram holds one record per line. */
static void udp_drain(src *s) {
  char buf[UDP_DGRAM];
  const char *p, *e, *nl;
  ssize_t n;
  int i;

  for (i = 0; i < 100000; i++) {
    n = recv(s->fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    for (p = buf, e = buf + n; p < e; p = nl + 1) {
      s->h->skipped++;
      if ((nl = memchr(p, '\n', (size_t)(e - p))) == NULL)
        break;
    }
  }
}

/* Stop a source for good. Lines still buffered are counted as skipped. */
static void src_close(src *s) {
  host *h = s->h;

  if (s->closing)
    return;
  s->closing = 1;
  h->skipped += ls_pending(&s->ls);
  if (s->counted) {
    s->counted = 0;
    h->nopen--;
  }
  if (s->kind == SRC_UDP && s->fd >= 0) {
    udp_drain(s);
    input_udp_refresh_drops(s);
  }
  if (s->kind == SRC_RSTREAM) {
    rstream_close(s);
    src_closed(s);
  } else if (s->has_handle) {
    if (s->kind == SRC_UDP)
      uv_poll_stop(&s->u.poll);
    uv_close(&s->u.handle, src_close_cb);
  } else if (!s->req_busy) {
    src_closed(s);
  } /* else file_read_cb finishes the close */
}

/* Start or stop reading: on only when more bytes are needed and the engine
** takes records. */
static void file_read(src *s);

static void src_want(src *s, int want) {
  int rc;

  if (s->closing || s->eof)
    want = 0;
  switch (s->kind) {
  case SRC_FILE:
    if (want && !s->req_busy)
      file_read(s);
    break;
  case SRC_STREAM:
  case SRC_TCP_CLIENT:
    if (want && !s->reading) {
      s->reading = 1;
      rc = uv_read_start(&s->u.stream, stream_alloc_cb, stream_read_cb);
      if (rc != 0) {
        s->reading = 0;
        host_report(s->h, "input %s: cannot read: %s", s->name,
                    uv_strerror(rc));
        s->eof = 1;
        host_pump_soon(s->h);
      }
    } else if (!want && s->reading) {
      s->reading = 0;
      uv_read_stop(&s->u.stream);
    }
    break;
  case SRC_UDP:
    if (want && !s->reading) {
      s->reading = 1;
      uv_poll_start(&s->u.poll, UV_READABLE, udp_poll_cb);
    } else if (!want && s->reading) {
      s->reading = 0;
      uv_poll_stop(&s->u.poll);
    }
    break;
  case SRC_TCP_SERVER:
  case SRC_RSTREAM:
    break;
  }
}

/* ---- pumping lines to the engine ---- */

static void pause_note(host *h) {
  int bp = h->started && !h->stopping && engine_blocked(h);

  if (bp && !h->paused) {
    h->paused = 1;
    h->pauses++;
    h->paused_since = uv_hrtime();
  } else if (!bp && h->paused) {
    h->paused = 0;
    h->paused_ns += uv_hrtime() - h->paused_since;
  }
}

static void src_pump(src *s, int *budget) {
  host *h = s->h;
  const char *line;
  size_t len;
  int r, need = 0;

  if (s->closing || s->kind == SRC_TCP_SERVER)
    return;
  if (s->kind == SRC_RSTREAM) {
    rstream_pump(s, budget);
    pause_note(h);
    return;
  }
  while (!engine_blocked(h) && *budget > 0) {
    r = ls_next(&s->ls, s->eof, &line, &len);
    if (r == LS_NONE) {
      if (s->eof) {
        src_close(s);
        return;
      }
      need = 1;
      break;
    }
    s->lineno++;
    if (r == LS_OVERSIZE) {
      h->oversize++;
      s->top->oversize++;
      host_report(h,
                  "%s line %llu: line of %zu bytes or more is longer "
                  "than %d bytes, dropped",
                  s->name, (unsigned long long)s->lineno, len, HOST_MAX_LINE);
      continue;
    }
    h->deliver(h, s, line, len);
    (*budget)--;
    if (s->closing)
      return;
  }
  pause_note(h);
  if (!need && s->kind == SRC_FILE && !engine_blocked(h) &&
      s->ls.end - s->ls.start < READ_CHUNK)
    need = 1; /* read ahead: the read overlaps handling the lines left */
  src_want(s, need);
}

/* Pump the sources in rounds, each a batch per round, while one has more
** and the pump has run under HOST_PUMP_NS; go on next turn if one still
** has more. This is h->pump. */
static void pump_all(host *h) {
  src *s, *next;
  int more, budget;
  uint64_t t0;

  if (h->pumping)
    return;
  h->pumping = 1;
  t0 = uv_hrtime();
  do {
    more = 0;
    for (s = h->srcs; s != NULL; s = s->next) {
      budget = HOST_PUMP_BATCH;
      src_pump(s, &budget);
      if (budget == 0)
        more = 1;
    }
  } while (more && uv_hrtime() - t0 < HOST_PUMP_NS);
  h->pumping = 0;
  for (s = h->srcs; s != NULL; s = next) {
    next = s->next;
    src_maybe_free(s);
  }
  pause_note(h);
  if (more && !engine_blocked(h))
    host_pump_soon(h);
  else
    uv_idle_stop(&h->pump_idle);
}

void input_setup(host *h) {
  h->pump = pump_all;
}

/* After new bytes arrived on s: hand them over now, and go on next turn
** if the batch was used up. */
static void src_fed(src *s) {
  int budget = HOST_PUMP_BATCH;

  if (s->h->pumping)
    return;
  src_pump(s, &budget);
  if (budget == 0)
    host_pump_soon(s->h);
}

void input_close_all(host *h) {
  src *s;

  h->stopping = 1;
  pause_note(h); /* ends a pause: stopping is not backpressure */
  for (s = h->srcs; s != NULL; s = s->next)
    src_close(s);
  uv_idle_stop(&h->pump_idle);
}

void input_free_all(host *h) {
  src *s;

  while ((s = h->srcs) != NULL) {
    h->srcs = s->next;
    src_destroy(s);
  }
}

/* ---- files ---- */

static void file_read_cb(uv_fs_t *req) {
  src *s = req->data;
  ssize_t res = req->result;

  uv_fs_req_cleanup(req);
  s->req_busy = 0;
  if (s->closing) {
    src_closed(s);
    return;
  }
  if (res < 0) {
    host_report(s->h, "input %s: read failed: %s", s->name,
                uv_strerror((int)res));
    s->eof = 1;
  } else if (res == 0) {
    s->eof = 1;
  } else {
    ls_commit(&s->ls, (size_t)res);
    s->bytes += (uint64_t)res;
  }
  src_fed(s);
}

static void file_read(src *s) {
  size_t avail;
  char *p = ls_space(&s->ls, READ_MAX, &avail);
  uv_buf_t b;
  int rc;

  if (p == NULL) {
    host_report(s->h, "input %s: not enough memory", s->name);
    s->eof = 1;
    host_pump_soon(s->h);
    return;
  }
  b = uv_buf_init(p, (unsigned)(avail < READ_MAX ? avail : READ_MAX));
  s->req.data = s;
  rc = uv_fs_read(s->h->loop, &s->req, s->fd, &b, 1, -1, file_read_cb);
  if (rc != 0) {
    host_report(s->h, "input %s: read failed: %s", s->name, uv_strerror(rc));
    s->eof = 1;
    host_pump_soon(s->h);
    return;
  }
  s->req_busy = 1;
}

/* ---- streams: pipes, FIFOs, terminals, TCP clients ---- */

static void stream_alloc_cb(uv_handle_t *hd, size_t suggested, uv_buf_t *b) {
  src *s = hd->data;
  size_t avail;
  char *p = ls_space(&s->ls, READ_CHUNK, &avail);

  (void)suggested;
  if (p == NULL) {
    *b = uv_buf_init(NULL, 0); /* read_cb gets UV_ENOBUFS */
    return;
  }
  *b = uv_buf_init(p, (unsigned)(avail < READ_MAX ? avail : READ_MAX));
}

static void stream_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *b) {
  src *s = st->data;

  (void)b;
  if (nread > 0) {
    ls_commit(&s->ls, (size_t)nread);
    s->bytes += (uint64_t)nread;
    s->top->bytes += s->top != s ? (uint64_t)nread : 0;
  } else if (nread == UV_EOF) {
    s->eof = 1;
  } else if (nread < 0) {
    /* A reset TCP client is an end like any other, worth a note. */
    host_report(s->h, "input %s: read failed: %s", s->name,
                uv_strerror((int)nread));
    s->eof = 1;
  } else {
    return;
  }
  if (s->eof && s->reading) {
    s->reading = 0;
    uv_read_stop(st);
  }
  src_fed(s);
}

/* ---- TCP ---- */

/* "HOST:PORT" of a socket address, IPv6 in brackets. */
static void addr_name(const struct sockaddr *sa, char *buf, size_t len) {
  char ip[INET6_ADDRSTRLEN];

  if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
    inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
    snprintf(buf, len, "[%s]:%u", ip, ntohs(a->sin6_port));
  } else {
    const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
    inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
    snprintf(buf, len, "%s:%u", ip, ntohs(a->sin_port));
  }
}

static void connection_cb(uv_stream_t *server, int status) {
  src *s = server->data, *c;
  host *h = s->h;
  struct sockaddr_storage ss;
  int sslen = sizeof ss;
  char peer[80], *name;
  size_t n;

  if (status < 0) {
    host_report(h, "input %s: accept failed: %s", s->name, uv_strerror(status));
    return;
  }
  c = src_new(h, SRC_TCP_CLIENT, s->name);
  if (c == NULL) {
    /* Not accepted: libuv stops accepting until memory frees up. */
    host_report(h, "input %s: not enough memory to accept a connection",
                s->name);
    return;
  }
  c->top = s;
  uv_tcp_init(h->loop, &c->u.tcp);
  c->has_handle = 1;
  c->u.handle.data = c;
  if (uv_accept(server, &c->u.stream) != 0) {
    src_close(c);
    return;
  }
  s->clients++;
  if (uv_tcp_getpeername(&c->u.tcp, (struct sockaddr *)&ss, &sslen) == 0) {
    addr_name((struct sockaddr *)&ss, peer, sizeof peer);
    n = strlen(s->name) + strlen(peer) + 9;
    if ((name = malloc(n)) != NULL) {
      snprintf(name, n, "%s client %s", s->name, peer);
      free(c->name);
      c->name = name;
    }
  }
  if (h->stopping) {
    src_close(c);
    return;
  }
  uv_tcp_nodelay(&c->u.tcp, 1);
  src_fed(c);
}

/* Parse "HOST:PORT" (HOST may be "[v6]") and resolve it for binding.
** Returns 0 with *out (free with freeaddrinfo), or -1 with err set. */
static int resolve(const char *hostport, int socktype, struct addrinfo **out,
                   char *err, size_t errlen) {
  char hostname[256];
  const char *colon, *port;
  struct addrinfo hints;
  size_t n;
  char *end;
  long pn;
  int rc;

  colon = strrchr(hostport, ':');
  if (colon == NULL || colon == hostport || colon[1] == '\0') {
    snprintf(err, errlen, "expected HOST:PORT");
    return -1;
  }
  port = colon + 1;
  errno = 0;
  pn = strtol(port, &end, 10);
  if (*end != '\0' || errno != 0 || pn < 0 || pn > 65535) {
    snprintf(err, errlen, "bad port '%s'", port);
    return -1;
  }
  n = (size_t)(colon - hostport);
  if (hostport[0] == '[' && n >= 2 && hostport[n - 1] == ']') {
    hostport++;
    n -= 2;
  }
  if (n >= sizeof hostname) {
    snprintf(err, errlen, "host name too long");
    return -1;
  }
  memcpy(hostname, hostport, n);
  hostname[n] = 0;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = socktype;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  rc = getaddrinfo(hostname, port, &hints, out);
  if (rc != 0) {
    snprintf(err, errlen, "%s", gai_strerror(rc));
    return -1;
  }
  return 0;
}

static int open_tcp(host *h, const char *spec, char *err, size_t errlen) {
  struct addrinfo *ai;
  struct sockaddr_storage ss;
  int sslen = sizeof ss, rc;
  char bound[80];
  src *s;

  if (resolve(spec + 6, SOCK_STREAM, &ai, err, errlen) != 0)
    return -1;
  s = src_new(h, SRC_TCP_SERVER, spec);
  if (s == NULL) {
    freeaddrinfo(ai);
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  uv_tcp_init(h->loop, &s->u.tcp);
  s->has_handle = 1;
  s->u.handle.data = s;
  rc = uv_tcp_bind(&s->u.tcp, ai->ai_addr, 0);
  freeaddrinfo(ai);
  if (rc == 0)
    rc = uv_listen(&s->u.stream, 511, connection_cb);
  if (rc != 0) {
    snprintf(err, errlen, "%s", uv_strerror(rc));
    src_close(s);
    return -1;
  }
  uv_tcp_getsockname(&s->u.tcp, (struct sockaddr *)&ss, &sslen);
  addr_name((struct sockaddr *)&ss, bound, sizeof bound);
  free(s->name);
  s->name = malloc(strlen(bound) + 7);
  if (s->name != NULL)
    snprintf(s->name, strlen(bound) + 7, "tcp://%s", bound);
  fprintf(stderr, "offpath: listening on %s\n", s->name ? s->name : spec);
  s->counted = 1;
  h->nopen++;
  return 0;
}

/* ---- UDP ---- */

void input_udp_refresh_drops(src *s) {
  static const char *const files[] = { "/proc/net/udp", "/proc/net/udp6" };
  struct stat st;
  char line[512];
  unsigned long inode;
  unsigned long long drops;
  FILE *f;
  int i;

  if (s->fd < 0 || fstat(s->fd, &st) != 0)
    return;
  for (i = 0; i < 2; i++) {
    if ((f = fopen(files[i], "r")) == NULL)
      continue;
    while (fgets(line, sizeof line, f) != NULL) {
      if (sscanf(line,
                 "%*s %*s %*s %*s %*s %*s %*s %*s %*s %lu %*s %*s "
                 "%llu",
                 &inode, &drops) == 2 &&
          inode == (unsigned long)st.st_ino && drops > s->drops)
        s->drops = drops;
    }
    fclose(f);
  }
}

static void udp_poll_cb(uv_poll_t *p, int status, int events) {
  src *s = p->data;
  host *h = s->h;
  struct mmsghdr msgs[UDP_BATCH];
  struct iovec iov[UDP_BATCH];
  char cbuf[UDP_BATCH][CMSG_SPACE(sizeof(uint32_t))];
  struct cmsghdr *cm;
  uint32_t ovfl;
  int n, i, round;
  size_t len;
  char *d;

  (void)events;
  if (status < 0) {
    host_report(h, "input %s: poll failed: %s", s->name, uv_strerror(status));
    return;
  }
  for (round = 0; round < 4 && !engine_blocked(h) && !s->closing; round++) {
    memset(msgs, 0, sizeof msgs);
    for (i = 0; i < UDP_BATCH; i++) {
      iov[i].iov_base = s->udp_buf + (size_t)i * UDP_DGRAM;
      iov[i].iov_len = UDP_DGRAM;
      msgs[i].msg_hdr.msg_iov = &iov[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
      msgs[i].msg_hdr.msg_control = cbuf[i];
      msgs[i].msg_hdr.msg_controllen = sizeof cbuf[i];
    }
    n = recvmmsg(s->fd, msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        host_report(h, "input %s: receive failed: %s", s->name,
                    strerror(errno));
      break;
    }
    for (i = 0; i < n; i++) {
      for (cm = CMSG_FIRSTHDR(&msgs[i].msg_hdr); cm != NULL;
           cm = CMSG_NXTHDR(&msgs[i].msg_hdr, cm)) {
#ifdef SO_RXQ_OVFL
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_RXQ_OVFL) {
          memcpy(&ovfl, CMSG_DATA(cm), sizeof ovfl);
          if (ovfl > s->drops)
            s->drops = ovfl;
        }
#endif
      }
      if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) {
        s->truncated++;
        continue;
      }
      d = s->udp_buf + (size_t)i * UDP_DGRAM;
      len = msgs[i].msg_len;
      s->bytes += len;
      if (len == 0)
        continue;
      if (ls_append(&s->ls, d, len) != 0 ||
          (d[len - 1] != '\n' && ls_append(&s->ls, "\n", 1) != 0)) {
        host_report(h, "input %s: not enough memory", s->name);
        break;
      }
    }
    src_fed(s);
    if (n < UDP_BATCH)
      break;
  }
}

static int open_udp(host *h, const char *spec, char *err, size_t errlen) {
  struct addrinfo *ai;
  struct sockaddr_storage ss;
  socklen_t sslen = sizeof ss;
  char bound[80];
  int fd, one = 1;
  src *s;

  if (resolve(spec + 6, SOCK_DGRAM, &ai, err, errlen) != 0)
    return -1;
  fd = socket(ai->ai_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
    snprintf(err, errlen, "%s", strerror(errno));
    if (fd >= 0)
      close(fd);
    freeaddrinfo(ai);
    return -1;
  }
  freeaddrinfo(ai);
#ifdef SO_RXQ_OVFL
  setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof one);
#else
  (void)one;
#endif
  s = src_new(h, SRC_UDP, spec);
  if (s == NULL || (s->udp_buf = malloc(UDP_BATCH * UDP_DGRAM)) == NULL) {
    close(fd);
    snprintf(err, errlen, "not enough memory");
    if (s != NULL) {
      s->closing = 1;
      src_closed(s);
    }
    return -1;
  }
  s->fd = fd;
  s->own_fd = 1;
  if (uv_poll_init_socket(h->loop, &s->u.poll, fd) != 0) {
    snprintf(err, errlen, "cannot watch the socket");
    s->closing = 1;
    src_closed(s);
    return -1;
  }
  s->has_handle = 1;
  s->u.handle.data = s;
  getsockname(fd, (struct sockaddr *)&ss, &sslen);
  addr_name((struct sockaddr *)&ss, bound, sizeof bound);
  free(s->name);
  s->name = malloc(strlen(bound) + 7);
  if (s->name != NULL)
    snprintf(s->name, strlen(bound) + 7, "udp://%s", bound);
  fprintf(stderr, "offpath: listening on %s\n", s->name ? s->name : spec);
  s->counted = 1;
  h->nopen++;
  return 0;
}

/* ---- stdin and files ---- */

/* Make a source reading fd, by what kind of file it is. */
static int open_fd(host *h, const char *name, int fd, int own, char *err,
                   size_t errlen) {
  struct stat st;
  src *s;
  int rc = 0;

  if (fstat(fd, &st) != 0) {
    snprintf(err, errlen, "%s", strerror(errno));
    return -1;
  }
  if (S_ISDIR(st.st_mode)) {
    snprintf(err, errlen, "is a directory");
    return -1;
  }
  if (isatty(fd) || S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)) {
    s = src_new(h, SRC_STREAM, name);
    if (s == NULL) {
      snprintf(err, errlen, "not enough memory");
      return -1;
    }
    if (fd == 0 && h->stdin_flags == -1)
      h->stdin_flags = fcntl(0, F_GETFL);
    s->u.handle.data = s;
    if (isatty(fd)) {
      rc = uv_tty_init(h->loop, &s->u.tty, fd, 1);
      s->has_handle = rc == 0;
    } else {
      rc = uv_pipe_init(h->loop, &s->u.pipe, 0);
      s->has_handle = rc == 0;
      if (rc == 0)
        rc = uv_pipe_open(&s->u.pipe, fd);
    }
    s->u.handle.data = s;
    if (rc != 0) {
      snprintf(err, errlen, "%s", uv_strerror(rc));
      if (s->has_handle) {
        src_close(s);
      } else {
        s->closing = 1;
        src_closed(s);
      }
      return -1;
    }
  } else {
    s = src_new(h, SRC_FILE, name);
    if (s == NULL) {
      snprintf(err, errlen, "not enough memory");
      return -1;
    }
    s->fd = fd;
    s->own_fd = own;
  }
  s->counted = 1;
  h->nopen++;
  return 0;
}

/* A redis-stream:// consumer (rstream.c) as a source. */
static int open_rstream(host *h, const char *spec, char *err, size_t errlen) {
  src *s = src_new(h, SRC_RSTREAM, spec), **pp;

  if (s == NULL) {
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  if (rstream_open(s, spec, err, errlen) != 0) {
    for (pp = &h->srcs; *pp != s; pp = &(*pp)->next)
      ;
    *pp = s->next;
    src_destroy(s);
    return -1;
  }
  s->counted = 1;
  h->nopen++;
  return 0;
}

int input_open(host *h, const char *spec, char *err, size_t errlen) {
  src *s;
  int fd;

  if (strncmp(spec, "tcp://", 6) == 0)
    return open_tcp(h, spec, err, errlen);
  if (strncmp(spec, "udp://", 6) == 0)
    return open_udp(h, spec, err, errlen);
  if (strncmp(spec, "redis-stream://", 15) == 0)
    return open_rstream(h, spec, err, errlen);
  if (strcmp(spec, "-") == 0) {
    for (s = h->srcs; s != NULL; s = s->next) {
      if (strcmp(s->name, "-") == 0) {
        snprintf(err, errlen, "stdin given twice");
        return -1;
      }
    }
    return open_fd(h, "-", 0, 0, err, errlen);
  }
  /* A FIFO opened without O_NONBLOCK would block until a writer comes. */
  fd = open(spec, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    snprintf(err, errlen, "%s", strerror(errno));
    return -1;
  }
  if (open_fd(h, spec, fd, 1, err, errlen) != 0) {
    close(fd);
    return -1;
  }
  return 0;
}
