/* SPDX-License-Identifier: MIT */
/*
** rstream.c - Redis Streams for the offpath command: the redis-stream://
** input, a consumer of a consumer group, and the redis-stream:// output
** (XADD of emitted records).
** Thread: loop.
**
** DESIGN
**
** An input holds two hiredis connections on the loop: `rd` carries only
** XREADGROUP ... BLOCK (a blocked connection can carry nothing else) and
** `cmd` everything else, pipelined: XGROUP CREATE, XACK, XAUTOCLAIM,
** XPENDING, XCLAIM, the XADD of dead letters. An entry (rentry) moves:
**
**   XREADGROUP > ----.                        .--> acked: XACK batch
**                    +--> queue --dispatch--> flight --+
**   XAUTOCLAIM ------'   (rs->queue)  (on_event,       +--> failed: XPENDING
**   (+ XPENDING for      (tracked)    everything it    |    for its count;
**    the counts)                      started ends)    |    < max: left
**        |                                             |    pending, >= max:
**        '-- deliveries > max --> dead letter <--------'    dead letter
**                                  XADD STREAM:dead, then XACK
**
** Every record is dispatched with op_call_track(): rstream_track_end() runs
** once the handler and everything it started (and every record it emitted
** to a redis-stream output: op_track_hold) have ended. Only then is its id
** queued for XACK; acks go out in batches on the next loop turn. A failed
** record is not acknowledged: it stays in the group's pending list, idle,
** until a consumer (this one or another) claims it with XAUTOCLAIM after
** claim_idle; the group's delivery counter then says how often it was
** tried, and past max_deliveries it becomes a dead letter instead of
** running again. A record that kills its process is thus dead-lettered
** too. Entries held here are claimed again for this consumer (XCLAIM
** JUSTID, which leaves the counter alone) about every claim_idle / 3, so a
** slow handler is not taken over by others while it runs.
**
** Connection loss: a command's callback runs once, with NULL when the
** connection goes; the link's cleanup hook then schedules a reconnect
** (backoff 0.1 s doubling to 5 s). Entries in flight are unaffected (they
** are in the group's pending list); acks whose reply was lost are sent
** again (XACK of an acknowledged id is a no-op; an id is counted once,
** when a reply confirms it).
** An XREADGROUP whose reply was lost leaves its entries pending for a
** claim. At shutdown reading stops at once; entries in flight end (or are
** cancelled after --grace) and their acks are flushed; what was read and
** not dispatched stays pending for other consumers.
**
** Lifetime: an input (rstream) lives while the host holds it, while any
** entry lives (each holds a reference) and until its timers are closed.
** A link (rlink) is freed in its poll handle's close callback, after
** hiredis has called its cleanup hook.
**
** The output keeps every record until Redis confirms its XADD, holding the
** emitting record's tracked call open meanwhile (op_track_hold), so an
** input entry is acknowledged only after what it emitted is stored. On a
** lost connection unconfirmed records are sent again after reconnecting
** (at-least-once). Past HOST_OUT_HIGH bytes unconfirmed the inputs pause.
*/
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "host.h"

#define RS_BLOCK_MS    2000 /* XREADGROUP BLOCK */
#define RS_READ_MAX    1000 /* entries per XREADGROUP */
#define RS_CLAIM_MAX   100  /* entries per XAUTOCLAIM */
#define RS_ACK_MAX     512  /* ids per XACK */
#define RS_BEAT_MAX    512  /* ids per heartbeat XCLAIM */
#define RS_BACKOFF_MIN 0.1
#define RS_BACKOFF_MAX 5.0
#define RS_PREFIX      "redis-stream://"
#define RS_PREFIX_LEN  (sizeof RS_PREFIX - 1)

/* ---- links: one hiredis async connection on the loop ----
** Our own glue rather than hiredis' libuv adapter: the adapter of hiredis
** 0.14 ignores a poll callback with an error status, which is how libuv
** reports a failed connect, and the connection would hang. */

typedef struct rlink {
  uv_poll_t poll;
  redisAsyncContext *ac; /* NULL once hiredis is done with it */
  int events;
  int pending; /* commands whose callback has not run */
  int up;      /* connected */
  void (*gone)(void *owner, struct rlink *l);
  void (*connected)(void *owner);
  void *owner;
} rlink;

static void link_ref(rlink *l) {
  if (l->pending > 0)
    uv_ref((uv_handle_t *)&l->poll);
  else
    uv_unref((uv_handle_t *)&l->poll);
}

static void link_poll_cb(uv_poll_t *p, int status, int events) {
  rlink *l = p->data;
  int ev = status != 0 ? l->events : events;

  if (l->ac != NULL && (ev & UV_READABLE))
    redisAsyncHandleRead(l->ac);
  if (l->ac != NULL && (ev & UV_WRITABLE))
    redisAsyncHandleWrite(l->ac);
  /* libuv stops the handle on an error; watch again while in use. */
  if (status != 0 && l->ac != NULL && l->events != 0)
    uv_poll_start(&l->poll, l->events, link_poll_cb);
}

static void link_events(rlink *l, int add, int ev) {
  if (add)
    l->events |= ev;
  else
    l->events &= ~ev;
  if (l->events != 0)
    uv_poll_start(&l->poll, l->events, link_poll_cb);
  else
    uv_poll_stop(&l->poll);
}

static void ev_add_read(void *p) {
  link_events(p, 1, UV_READABLE);
}
static void ev_del_read(void *p) {
  link_events(p, 0, UV_READABLE);
}
static void ev_add_write(void *p) {
  link_events(p, 1, UV_WRITABLE);
}
static void ev_del_write(void *p) {
  link_events(p, 0, UV_WRITABLE);
}

static void link_close_cb(uv_handle_t *hd) {
  free(hd->data);
}

/* hiredis is done with the context: every callback has run. */
static void ev_cleanup(void *p) {
  rlink *l = p;

  l->ac = NULL;
  uv_poll_stop(&l->poll);
  uv_close((uv_handle_t *)&l->poll, link_close_cb);
  if (l->gone != NULL)
    l->gone(l->owner, l);
}

static void link_on_connect(const redisAsyncContext *ac, int status) {
  rlink *l = ac->data;

  if (status == REDIS_OK) {
    l->up = 1;
    if (l->connected != NULL)
      l->connected(l->owner);
  }
}

/* Connect to ip:port (numeric). Returns the link, or NULL with err set.
** gone(owner, l) runs once when the connection is over (after every
** command's callback), from hiredis; l is freed after it returns. */
static rlink *link_open(uv_loop_t *loop, const char *ip, int port,
                        void (*gone)(void *, rlink *),
                        void (*connected)(void *), void *owner, char *err,
                        size_t errlen) {
  redisAsyncContext *ac = redisAsyncConnect(ip, port);
  rlink *l;

  if (ac == NULL) {
    snprintf(err, errlen, "not enough memory");
    return NULL;
  }
  if (ac->err) {
    snprintf(err, errlen, "%s", ac->errstr);
    redisAsyncFree(ac);
    return NULL;
  }
  if ((l = calloc(1, sizeof *l)) == NULL ||
      uv_poll_init_socket(loop, &l->poll, ac->c.fd) != 0) {
    free(l);
    redisAsyncFree(ac);
    snprintf(err, errlen, "cannot watch the connection");
    return NULL;
  }
  l->poll.data = l;
  l->ac = ac;
  l->gone = gone;
  l->connected = connected;
  l->owner = owner;
  ac->data = l;
  ac->ev.data = l;
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->ev.cleanup = ev_cleanup;
  redisAsyncSetConnectCallback(ac, link_on_connect);
  link_ref(l);
  return l;
}

static int link_usable(const rlink *l) {
  return l != NULL && l->ac != NULL &&
         !(l->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING));
}

/* Close l: pending callbacks get NULL, then gone() runs (at once, or after
** the hiredis callback running now returns). */
static void link_close(rlink *l) {
  if (l != NULL && l->ac != NULL && !(l->ac->c.flags & REDIS_FREEING))
    redisAsyncFree(l->ac);
}

/* Send a command; fn(ac, reply, priv) runs exactly once if this returns
** 0, never if it returns -1. */
static int link_cmd(rlink *l, redisCallbackFn *fn, void *priv, int argc,
                    const char **argv, const size_t *lens) {
  if (!link_usable(l) ||
      redisAsyncCommandArgv(l->ac, fn, priv, argc, argv, lens) != REDIS_OK)
    return -1;
  l->pending++;
  link_ref(l);
  return 0;
}

/* In a command's callback: one reply less pending on its link. */
static void link_replied(redisAsyncContext *ac) {
  rlink *l = ac->data;

  l->pending--;
  link_ref(l);
}

/* Arguments of a command being built. */
typedef struct rargs {
  const char **v;
  size_t *len;
  int n;
} rargs;

static void arg_add(rargs *a, const char *s, size_t n) {
  a->v[a->n] = s;
  a->len[a->n++] = n;
}

static void arg_str(rargs *a, const char *s) {
  arg_add(a, s, strlen(s));
}

/* The text of an error reply, or why there was none. */
static const char *reply_error(const redisReply *r) {
  if (r == NULL)
    return "connection lost";
  if (r->type == REDIS_REPLY_ERROR)
    return r->str;
  return "unexpected reply";
}

/* ---- addresses and options ---- */

/* Resolve "HOST:PORT" (HOST may be "[v6]") into a numeric address.
** Blocking: only at start. Returns 0, or -1 with err set. */
static int parse_addr(const char *s, size_t n, char *ip, size_t iplen,
                      int *port, char *err, size_t errlen) {
  char hostname[256], portstr[16];
  const char *colon = NULL;
  struct addrinfo hints, *ai;
  size_t i, hl;
  char *end;
  long pn;
  int rc;

  for (i = 0; i < n; i++)
    if (s[i] == ':')
      colon = s + i;
  if (colon == NULL || colon == s || (size_t)(colon - s) + 1 >= n) {
    snprintf(err, errlen, "expected HOST:PORT");
    return -1;
  }
  hl = (size_t)(colon - s);
  if (n - hl - 1 >= sizeof portstr) {
    snprintf(err, errlen, "bad port");
    return -1;
  }
  memcpy(portstr, colon + 1, n - hl - 1);
  portstr[n - hl - 1] = 0;
  errno = 0;
  pn = strtol(portstr, &end, 10);
  if (*end != 0 || errno != 0 || pn < 1 || pn > 65535) {
    snprintf(err, errlen, "bad port '%s'", portstr);
    return -1;
  }
  if (s[0] == '[' && hl >= 2 && s[hl - 1] == ']') {
    s++;
    hl -= 2;
  }
  if (hl >= sizeof hostname) {
    snprintf(err, errlen, "host name too long");
    return -1;
  }
  memcpy(hostname, s, hl);
  hostname[hl] = 0;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if ((rc = getaddrinfo(hostname, portstr, &hints, &ai)) != 0) {
    snprintf(err, errlen, "%s: %s", hostname, gai_strerror(rc));
    return -1;
  }
  rc = getnameinfo(ai->ai_addr, ai->ai_addrlen, ip, (socklen_t)iplen, NULL, 0,
                   NI_NUMERICHOST);
  freeaddrinfo(ai);
  if (rc != 0) {
    snprintf(err, errlen, "%s: %s", hostname, gai_strerror(rc));
    return -1;
  }
  *port = (int)pn;
  return 0;
}

/* A parsed redis-stream:// address: "HOST:PORT/STREAM?k=v&k=v". */
typedef struct rurl {
  char ip[64];
  int port;
  char *key;      /* the stream (malloc) */
  char *opts;     /* a copy of the query, split in place (malloc) */
  char *names[8]; /* option names and values, in opts */
  char *values[8];
  int nopts;
} rurl;

static void url_free(rurl *u) {
  free(u->key);
  free(u->opts);
}

static int url_parse(const char *spec, rurl *u, char *err, size_t errlen) {
  const char *p = spec + RS_PREFIX_LEN, *slash, *q;
  char *o, *amp, *eq;

  memset(u, 0, sizeof *u);
  slash = strchr(p, '/');
  if (slash == NULL || slash[1] == 0 || slash[1] == '?') {
    snprintf(err, errlen, "expected redis-stream://HOST:PORT/STREAM");
    return -1;
  }
  if (parse_addr(p, (size_t)(slash - p), u->ip, sizeof u->ip, &u->port, err,
                 errlen) != 0)
    return -1;
  q = strchr(slash + 1, '?');
  u->key = q != NULL ? strndup(slash + 1, (size_t)(q - slash - 1))
                     : strdup(slash + 1);
  u->opts = strdup(q != NULL ? q + 1 : "");
  if (u->key == NULL || u->opts == NULL) {
    url_free(u);
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  for (o = u->opts; *o != 0; o = amp + 1) {
    amp = strchr(o, '&');
    if (amp != NULL)
      *amp = 0;
    eq = strchr(o, '=');
    if (eq == NULL || eq == o || u->nopts == 8) {
      snprintf(err, errlen, "bad option '%s' (expected NAME=VALUE)", o);
      url_free(u);
      return -1;
    }
    *eq = 0;
    u->names[u->nopts] = o;
    u->values[u->nopts++] = eq + 1;
    if (amp == NULL)
      break;
  }
  return 0;
}

/* Take option name from u: its value, or NULL. Each is taken once. */
static const char *url_opt(rurl *u, const char *name) {
  int i;

  for (i = 0; i < u->nopts; i++) {
    if (u->names[i] != NULL && strcmp(u->names[i], name) == 0) {
      u->names[i] = NULL;
      return u->values[i];
    }
  }
  return NULL;
}

/* Refuse options nobody took. */
static int url_leftover(rurl *u, char *err, size_t errlen) {
  int i;

  for (i = 0; i < u->nopts; i++) {
    if (u->names[i] != NULL) {
      snprintf(err, errlen, "unknown option '%s'", u->names[i]);
      return -1;
    }
  }
  return 0;
}

/* ---- the input ---- */

enum { E_NONE = 0, E_QUEUED, E_FLIGHT };

struct rentry {
  rentry *prev, *next; /* rs->queue or rs->flight */
  rstream *rs;
  uint8_t where;      /* E_NONE, E_QUEUED, E_FLIGHT */
  uint8_t claimed;    /* came from XAUTOCLAIM */
  int64_t deliveries; /* the group's delivery counter, 0: unknown */
  uint64_t beat;      /* uv_now() of the last claim for us */
  char *err;          /* the handler's failure (malloc), or NULL */
  const char *id;     /* in the block after the struct */
  const char *data;   /* the record field's value, or NULL */
  size_t len;
  int nf;         /* fields */
  const char **f; /* 2 * nf: name, value, ... */
  size_t *flen;
};

typedef struct rlist {
  rentry *head, *tail;
  uint32_t n;
} rlist;

struct rstream {
  host *h;
  src *s;
  char ip[64];
  int port;
  char *key, *group, *consumer, *field, *dead;
  int max_deliveries;
  uint64_t claim_ms;
  rlink *rd, *cmd;
  uv_timer_t retry_timer, claim_timer, flush_timer;
  int handles; /* timers not yet closed */
  int refs;    /* the host + live entries + commands that point here */
  double backoff;
  uint8_t group_ok; /* XGROUP CREATE answered */
  uint8_t group_busy;
  uint8_t rd_busy;    /* XREADGROUP in flight */
  uint8_t claim_busy; /* XAUTOCLAIM + XPENDING in flight */
  uint8_t closing;    /* no more reading */
  uint8_t finished;   /* last XPENDING sent, cmd closing */
  uint8_t destroyed;  /* the host let go */
  uint8_t down_said;  /* reported the outage */
  char cursor[48];    /* XAUTOCLAIM's */
  rlist queue, flight;
  char **acks; /* ids waiting for XACK (malloc each) */
  uint32_t nacks, acks_cap;
  uint32_t busy; /* acks, dead letters, failure checks in flight */
  /* statistics */
  uint64_t read, acked, redelivered, claimed, dead_lettered, failed;
  int64_t pending; /* the group's pending count, last seen; -1 unknown */
};

static void rs_connect(rstream *rs);
static void release_ids(rstream *rs, const char **ids, int n);
static void rs_flush(rstream *rs);
static void rs_finish(rstream *rs);
static void flush_cb(uv_timer_t *t);

static void rs_unref(rstream *rs) {
  if (--rs->refs > 0)
    return;
  free(rs->acks);
  free(rs->key);
  free(rs->group);
  free(rs->consumer);
  free(rs->field);
  free(rs->dead);
  free(rs);
}

static void timer_close_cb(uv_handle_t *hd) {
  rstream *rs = hd->data;

  rs->handles--;
  rs_unref(rs);
}

static void list_push(rlist *l, rentry *e) {
  e->next = NULL;
  e->prev = l->tail;
  if (l->tail != NULL)
    l->tail->next = e;
  else
    l->head = e;
  l->tail = e;
  l->n++;
}

static void list_remove(rlist *l, rentry *e) {
  if (e->prev != NULL)
    e->prev->next = e->next;
  else
    l->head = e->next;
  if (e->next != NULL)
    e->next->prev = e->prev;
  else
    l->tail = e->prev;
  e->prev = e->next = NULL;
  l->n--;
}

/* Take e off its list. */
static void entry_unlink(rentry *e) {
  if (e->where == E_QUEUED)
    list_remove(&e->rs->queue, e);
  else if (e->where == E_FLIGHT)
    list_remove(&e->rs->flight, e);
  e->where = E_NONE;
}

static void entry_free(rentry *e) {
  rstream *rs = e->rs;

  entry_unlink(e);
  free(e->err);
  free(e);
  rs_unref(rs);
}

/* Make an entry from a reply [id, [field, value, ...]]; NULL for a deleted
** entry (nil fields), a malformed reply or out of memory. */
static rentry *entry_new(rstream *rs, const redisReply *r) {
  const redisReply *id, *kv;
  size_t n, i, size;
  rentry *e;
  char *p;

  if (r->type != REDIS_REPLY_ARRAY || r->elements != 2)
    return NULL;
  id = r->element[0];
  kv = r->element[1];
  if (id->type != REDIS_REPLY_STRING || kv->type != REDIS_REPLY_ARRAY ||
      kv->elements % 2 != 0)
    return NULL;
  size = sizeof *e + (size_t)id->len + 1;
  for (i = 0; i < kv->elements; i++) {
    if (kv->element[i]->type != REDIS_REPLY_STRING)
      return NULL;
    size += sizeof(char *) + sizeof(size_t) + (size_t)kv->element[i]->len + 1;
  }
  if ((e = calloc(1, size)) == NULL)
    return NULL;
  n = kv->elements;
  e->rs = rs;
  e->nf = (int)(n / 2);
  e->f = (const char **)(e + 1);
  e->flen = (size_t *)(e->f + n);
  p = (char *)(e->flen + n);
  memcpy(p, id->str, id->len);
  p[id->len] = 0;
  e->id = p;
  p += id->len + 1;
  for (i = 0; i < n; i++) {
    memcpy(p, kv->element[i]->str, kv->element[i]->len);
    p[kv->element[i]->len] = 0;
    e->f[i] = p;
    e->flen[i] = kv->element[i]->len;
    p += kv->element[i]->len + 1;
  }
  for (i = 0; i < n; i += 2) {
    if (strcmp(e->f[i], rs->field) == 0) {
      e->data = e->f[i + 1];
      e->len = e->flen[i + 1];
      break;
    }
  }
  rs->refs++;
  return e;
}

/* The entry with this id queued or in flight here, or NULL. */
static rentry *entry_find(rstream *rs, const char *id) {
  rentry *e;

  for (e = rs->flight.head; e != NULL; e = e->next)
    if (strcmp(e->id, id) == 0)
      return e;
  for (e = rs->queue.head; e != NULL; e = e->next)
    if (strcmp(e->id, id) == 0)
      return e;
  return NULL;
}

/* Entries this input may take now. It holds at most --max-inflight in
** flight and as many read ahead, so that a handler ending finds the next
** entry here rather than a round trip away. */
static uint32_t rs_room(rstream *rs) {
  uint32_t held = rs->queue.n + rs->flight.n, max;

  max = 2 * (uint32_t)rs->h->o.max_inflight;
  return held >= max ? 0 : max - held;
}

/* ---- acknowledgements ---- */

typedef struct rack {
  rstream *rs;
  uint32_t n;
  char *ids[];
} rack;

/* Queue the id (malloc, taken) for XACK. Out of memory: the entry stays
** pending, and is delivered again. */
static void ack_push(rstream *rs, char *id) {
  uint32_t cap;
  char **p;

  if (id != NULL && rs->nacks == rs->acks_cap) {
    cap = rs->acks_cap ? 2 * rs->acks_cap : 64;
    if ((p = realloc(rs->acks, cap * sizeof *p)) != NULL) {
      rs->acks = p;
      rs->acks_cap = cap;
    }
  }
  if (id == NULL || rs->nacks == rs->acks_cap) {
    host_report(rs->h, "input %s: not enough memory: an entry is left pending",
                rs->s->name);
    free(id);
    return;
  }
  rs->acks[rs->nacks++] = id;
}

static void ack_queue(rstream *rs, const char *id) {
  ack_push(rs, strdup(id));
  if (rs->nacks >= RS_ACK_MAX)
    rs_flush(rs);
  else if (!uv_is_active((uv_handle_t *)&rs->flush_timer))
    uv_timer_start(&rs->flush_timer, flush_cb, 0, 0);
}

static void ack_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rack *a = priv;
  rstream *rs = a->rs;
  redisReply *r = reply;
  uint32_t i;

  link_replied(ac);
  rs->busy--;
  if (r != NULL && r->type == REDIS_REPLY_INTEGER) {
    /* Count ids, not the reply: an XACK sent again after its first reply
    ** was lost finds the ids already acknowledged and answers 0. */
    rs->acked += a->n;
    for (i = 0; i < a->n; i++)
      free(a->ids[i]);
  } else if (!rs->destroyed) {
    /* Lost or refused: send again (XACK is idempotent). */
    if (r != NULL)
      host_report(rs->h, "input %s: XACK failed: %s", rs->s->name,
                  reply_error(r));
    for (i = 0; i < a->n; i++)
      ack_push(rs, a->ids[i]);
  } else {
    for (i = 0; i < a->n; i++)
      free(a->ids[i]);
  }
  free(a);
  rs_finish(rs);
  rs_unref(rs);
}

/* Send the queued acks, RS_ACK_MAX per XACK. */
static void rs_flush(rstream *rs) {
  const char *argv[3 + RS_ACK_MAX];
  size_t lens[3 + RS_ACK_MAX];
  uint32_t n, i;
  rack *a;

  while (rs->nacks > 0 && link_usable(rs->cmd) && rs->group_ok) {
    n = rs->nacks < RS_ACK_MAX ? rs->nacks : RS_ACK_MAX;
    if ((a = malloc(sizeof *a + n * sizeof(char *))) == NULL)
      return;
    a->rs = rs;
    a->n = n;
    argv[0] = "XACK";
    argv[1] = rs->key;
    argv[2] = rs->group;
    for (i = 0; i < n; i++) {
      a->ids[i] = rs->acks[rs->nacks - n + i];
      argv[3 + i] = a->ids[i];
    }
    for (i = 0; i < 3 + n; i++)
      lens[i] = strlen(argv[i]);
    if (link_cmd(rs->cmd, ack_cb, a, (int)(3 + n), argv, lens) != 0) {
      free(a);
      return;
    }
    rs->nacks -= n;
    rs->busy++;
    rs->refs++;
  }
}

static void flush_cb(uv_timer_t *t) {
  rs_flush(t->data);
}

/* ---- dead letters and failures ---- */

static void dead_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rentry *e = priv;
  rstream *rs = e->rs;
  redisReply *r = reply;

  link_replied(ac);
  rs->busy--;
  if (r != NULL && r->type == REDIS_REPLY_STRING) {
    rs->dead_lettered++;
    host_report(rs->h,
                "input %s: entry %s moved to %s after %" PRId64 " deliveries",
                rs->s->name, e->id, rs->dead, e->deliveries);
    if (!rs->destroyed)
      ack_queue(rs, e->id);
  } else if (r != NULL) {
    host_report(rs->h, "input %s: cannot move entry %s to %s: %s", rs->s->name,
                e->id, rs->dead, reply_error(r));
  } /* lost: it stays pending and is dead-lettered when claimed again */
  rs_finish(rs);
  entry_free(e);
}

/* Move e to the dead-letter stream with why, then acknowledge it. Takes
** e. */
static void dead_letter(rentry *e, const char *why) {
  rstream *rs = e->rs;
  int i, n = 3 + 2 * e->nf + 6;
  char dn[24];
  rargs a;

  entry_unlink(e);
  a.n = 0;
  a.v = malloc((size_t)n * (sizeof *a.v + sizeof *a.len));
  if (a.v == NULL) {
    entry_free(e);
    return;
  }
  a.len = (size_t *)(a.v + n);
  snprintf(dn, sizeof dn, "%" PRId64, e->deliveries);
  arg_str(&a, "XADD");
  arg_str(&a, rs->dead);
  arg_str(&a, "*");
  for (i = 0; i < 2 * e->nf; i++)
    arg_add(&a, e->f[i], e->flen[i]);
  arg_str(&a, "error");
  arg_str(&a, why);
  arg_str(&a, "source_id");
  arg_str(&a, e->id);
  arg_str(&a, "deliveries");
  arg_str(&a, dn);
  if (link_cmd(rs->cmd, dead_cb, e, a.n, a.v, a.len) == 0)
    rs->busy++;
  else
    entry_free(e); /* left pending: dead-lettered when claimed again */
  free(a.v);
}

/* [[id, consumer, idle, deliveries], ...] of XPENDING: the deliveries of
** id, or 0. */
static int64_t pending_count(const redisReply *r, const char *id) {
  const redisReply *x;
  size_t i;

  if (r == NULL || r->type != REDIS_REPLY_ARRAY)
    return 0;
  for (i = 0; i < r->elements; i++) {
    x = r->element[i];
    if (x->type == REDIS_REPLY_ARRAY && x->elements == 4 &&
        x->element[0]->type == REDIS_REPLY_STRING &&
        strcmp(x->element[0]->str, id) == 0 &&
        x->element[3]->type == REDIS_REPLY_INTEGER)
      return x->element[3]->integer;
  }
  return 0;
}

/* The delivery count of a failed entry: dead letter or leave pending. */
static void failed_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rentry *e = priv;
  rstream *rs = e->rs;
  int64_t n;

  link_replied(ac);
  rs->busy--;
  n = pending_count(reply, e->id);
  if (n > 0)
    e->deliveries = n;
  if (n >= rs->max_deliveries && !rs->destroyed) {
    dead_letter(e, e->err != NULL ? e->err : "failed");
    return;
  }
  rs_finish(rs);
  entry_free(e); /* pending: delivered again after claim_idle */
}

/* ---- the end of a record's work ---- */

void rstream_handler_failed(rentry *e, const char *msg) {
  if (e->err == NULL)
    e->err = strdup(msg != NULL ? msg : "failed");
}

const char *rstream_entry_id(const rentry *e) {
  return e->id;
}

void rstream_track_end(op_runtime *rt, const char *err, void *ud) {
  rentry *e = ud;
  rstream *rs = e->rs;
  const char *argv[6];
  size_t lens[6];
  int i;

  (void)rt;
  entry_unlink(e);
  if (err != NULL && e->err == NULL) {
    e->err = strdup(err);
    host_report(rs->h, "input %s entry %s: failed: %s", rs->s->name, e->id,
                err);
  }
  if (!rs->destroyed)
    host_pump_soon(rs->h);
  if (e->err == NULL && err == NULL) {
    if (!rs->destroyed)
      ack_queue(rs, e->id);
    entry_free(e);
    return;
  }
  rs->failed++;
  if (rs->destroyed || strncmp(e->err, "cancelled", 9) == 0) {
    if (!rs->destroyed)
      release_ids(rs, &e->id, 1);
    rs_finish(rs);
    entry_free(e); /* stopped, not failed: pending for others */
    return;
  }
  argv[0] = "XPENDING";
  argv[1] = rs->key;
  argv[2] = rs->group;
  argv[3] = e->id;
  argv[4] = e->id;
  argv[5] = "1";
  for (i = 0; i < 6; i++)
    lens[i] = strlen(argv[i]);
  if (link_cmd(rs->cmd, failed_cb, e, 6, argv, lens) == 0)
    rs->busy++;
  else
    entry_free(e); /* unknown count: it stays pending */
  rs_finish(rs);
}

/* Push the entry table {id=, stream=, deliveries=, fields={...}}.
** [-0, +1, m] */
static void push_entry(lua_State *L, const rentry *e) {
  int i;

  lua_createtable(L, 0, 4);
  lua_pushstring(L, e->id);
  lua_setfield(L, -2, "id");
  lua_pushstring(L, e->rs->key);
  lua_setfield(L, -2, "stream");
  lua_pushinteger(L, (lua_Integer)e->deliveries);
  lua_setfield(L, -2, "deliveries");
  lua_createtable(L, 0, e->nf);
  for (i = 0; i < e->nf; i++) {
    lua_pushlstring(L, e->f[2 * i], e->flen[2 * i]);
    lua_pushlstring(L, e->f[2 * i + 1], e->flen[2 * i + 1]);
    lua_rawset(L, -3);
  }
  lua_setfield(L, -2, "fields");
}

/* Hand queued entries to on_event while the engine takes them. */
void rstream_pump(src *s, int *budget) {
  rstream *rs = s->rs;
  host *h = rs->h;
  lua_State *L = h->L;
  char err[256];
  rentry *e;
  int rc;

  while (!engine_blocked(h) && *budget > 0 && (e = rs->queue.head) != NULL) {
    list_remove(&rs->queue, e);
    e->where = E_NONE;
    s->lineno++;
    if (e->data == NULL) {
      snprintf(err, sizeof err, "malformed: no field '%s'", rs->field);
      host_report(h, "input %s entry %s: %s", s->name, e->id, err);
      h->malformed++;
      s->malformed++;
      dead_letter(e, err);
      continue;
    }
    list_push(&rs->flight, e);
    e->where = E_FLIGHT;
    push_entry(L, e);
    rc = h->deliver_entry(h, s, e->data, e->len, e, err, sizeof err);
    (*budget)--;
    if (rc == 0) {
      host_report(h, "input %s entry %s: %s", s->name, e->id, err);
      dead_letter(e, err);
    } else if (rc < 0) {
      entry_free(e); /* out of memory: left pending */
    }
  }
  rstream_read(s);
}

/* ---- reading ---- */

static void group_create(rstream *rs);

static void read_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rstream *rs = priv;
  redisReply *r = reply, *st, *list;
  rentry *e;
  size_t i;

  link_replied(ac);
  rs->rd_busy = 0;
  if (r == NULL || rs->destroyed) {
    rs_unref(rs); /* lost: what it read stays pending for a claim */
    return;
  }
  if (r->type == REDIS_REPLY_ERROR) {
    host_report(rs->h, "input %s: XREADGROUP failed: %s", rs->s->name, r->str);
    if (strncmp(r->str, "NOGROUP", 7) == 0) {
      rs->group_ok = 0; /* deleted: make it again, then read */
      group_create(rs);
    } else {
      link_close(rs->rd); /* read again after the backoff */
    }
    rs_unref(rs);
    return;
  }
  if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
      (st = r->element[0])->type == REDIS_REPLY_ARRAY && st->elements == 2 &&
      (list = st->element[1])->type == REDIS_REPLY_ARRAY) {
    for (i = 0; i < list->elements; i++) {
      if ((e = entry_new(rs, list->element[i])) == NULL)
        continue;
      e->deliveries = 1;
      rs->read++;
      if (rs->closing) {
        rs->h->skipped++;
        entry_free(e);
        continue;
      }
      list_push(&rs->queue, e);
      e->where = E_QUEUED;
      e->beat = uv_now(rs->h->loop);
    }
  }
  host_pump_soon(rs->h);
  rstream_read(rs->s);
  rs_unref(rs);
}

void rstream_read(src *s) {
  rstream *rs = s->rs;
  host *h = rs->h;
  const char *argv[11];
  size_t lens[11];
  char count[16], block[16];
  uint32_t room = rs_room(rs);
  int i;

  /* Not engine_blocked(): a full engine is when reading ahead pays. */
  if (rs->closing || !rs->group_ok || rs->rd_busy || !link_usable(rs->rd) ||
      room == 0 || rs->queue.n > 0 || !h->started || h->stopping ||
      h->out_pending.len >= HOST_OUT_HIGH || h->out_held >= HOST_OUT_HIGH)
    return;
  snprintf(count, sizeof count, "%u", room < RS_READ_MAX ? room : RS_READ_MAX);
  snprintf(block, sizeof block, "%d", RS_BLOCK_MS);
  argv[0] = "XREADGROUP";
  argv[1] = "GROUP";
  argv[2] = rs->group;
  argv[3] = rs->consumer;
  argv[4] = "COUNT";
  argv[5] = count;
  argv[6] = "BLOCK";
  argv[7] = block;
  argv[8] = "STREAMS";
  argv[9] = rs->key;
  argv[10] = ">";
  for (i = 0; i < 11; i++)
    lens[i] = strlen(argv[i]);
  if (link_cmd(rs->rd, read_cb, rs, 11, argv, lens) == 0) {
    rs->rd_busy = 1;
    rs->refs++;
  }
}

/* ---- the group, claims, heartbeats ---- */

static void group_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rstream *rs = priv;
  redisReply *r = reply;

  link_replied(ac);
  rs->group_busy = 0;
  if (r != NULL && !rs->destroyed &&
      (r->type == REDIS_REPLY_STATUS ||
       (r->type == REDIS_REPLY_ERROR &&
        strncmp(r->str, "BUSYGROUP", 9) == 0))) {
    rs->group_ok = 1;
    rs->down_said = 0;
    rs->backoff = RS_BACKOFF_MIN;
    rs_flush(rs);
    rstream_read(rs->s);
  } else if (r != NULL && !rs->destroyed) {
    host_report(rs->h, "input %s: cannot create group %s: %s", rs->s->name,
                rs->group, reply_error(r));
    link_close(rs->cmd); /* and try again after a while */
  }
  rs_unref(rs);
}

static void group_create(rstream *rs) {
  const char *argv[6] = { "XGROUP",  "CREATE", rs->key,
                          rs->group, "0",      "MKSTREAM" };
  size_t lens[6];
  int i;

  if (rs->group_busy)
    return;
  for (i = 0; i < 6; i++)
    lens[i] = strlen(argv[i]);
  if (link_cmd(rs->cmd, group_cb, rs, 6, argv, lens) == 0) {
    rs->group_busy = 1;
    rs->refs++;
  }
}

/* Claimed entries waiting for their delivery counts. */
typedef struct rclaim {
  rstream *rs;
  uint32_t n;
  rentry *e[];
} rclaim;

static void claim_counts_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rclaim *c = priv;
  rstream *rs = c->rs;
  char why[160];
  uint32_t i;
  rentry *e;

  link_replied(ac);
  rs->claim_busy = 0;
  for (i = 0; i < c->n; i++) {
    e = c->e[i];
    e->deliveries = pending_count(reply, e->id);
    if (reply == NULL || rs->destroyed || rs->closing || e->deliveries == 0) {
      if (reply != NULL && !rs->destroyed && rs->closing)
        release_ids(rs, &e->id, 1); /* stopping: for the others */
      entry_free(e);                /* ours now, pending: claimed again later */
      continue;
    }
    rs->read++;
    rs->claimed++;
    if (e->deliveries > 1)
      rs->redelivered++;
    if (e->deliveries > rs->max_deliveries) {
      snprintf(why, sizeof why,
               "delivered %" PRId64 " times without being acknowledged "
               "(its consumers failed or died)",
               e->deliveries);
      dead_letter(e, why);
      continue;
    }
    list_push(&rs->queue, e);
    e->where = E_QUEUED;
    e->beat = uv_now(rs->h->loop);
  }
  free(c);
  if (!rs->destroyed)
    host_pump_soon(rs->h);
  rs_finish(rs);
  rs_unref(rs);
}

static void claim_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rstream *rs = priv;
  redisReply *r = reply, *list;
  const char *argv[7];
  size_t lens[7], i;
  char count[16];
  rclaim *c = NULL;
  rentry *e;
  int k;

  link_replied(ac);
  rs->claim_busy = 0;
  if (r == NULL || rs->destroyed || rs->closing)
    goto done;
  if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 ||
      r->element[0]->type != REDIS_REPLY_STRING ||
      (list = r->element[1])->type != REDIS_REPLY_ARRAY) {
    host_report(rs->h, "input %s: XAUTOCLAIM failed: %s", rs->s->name,
                reply_error(r));
    goto done;
  }
  snprintf(rs->cursor, sizeof rs->cursor, "%s", r->element[0]->str);
  if (list->elements == 0 ||
      (c = malloc(sizeof *c + list->elements * sizeof(rentry *))) == NULL)
    goto done;
  c->rs = rs;
  c->n = 0;
  for (i = 0; i < list->elements; i++) {
    if (list->element[i]->type != REDIS_REPLY_ARRAY ||
        list->element[i]->elements != 2 ||
        list->element[i]->element[0]->type != REDIS_REPLY_STRING ||
        entry_find(rs, list->element[i]->element[0]->str) != NULL)
      continue; /* deleted, or already here (our own, slow) */
    if ((e = entry_new(rs, list->element[i])) != NULL) {
      e->claimed = 1;
      c->e[c->n++] = e;
    }
  }
  if (c->n == 0)
    goto done;
  /* Their delivery counts (the claim added one): this consumer's pending
  ** entries between the first and the last claimed id. */
  snprintf(count, sizeof count, "%u", c->n + rs->flight.n + rs->queue.n + 1000);
  argv[0] = "XPENDING";
  argv[1] = rs->key;
  argv[2] = rs->group;
  argv[3] = c->e[0]->id;
  argv[4] = c->e[c->n - 1]->id;
  argv[5] = count;
  argv[6] = rs->consumer;
  for (k = 0; k < 7; k++)
    lens[k] = strlen(argv[k]);
  if (link_cmd(rs->cmd, claim_counts_cb, c, 7, argv, lens) == 0) {
    rs->claim_busy = 1;
    rs->refs++;
    c = NULL;
  }

done:
  if (c != NULL) {
    for (i = 0; i < c->n; i++)
      entry_free(c->e[i]);
    free(c);
  }
  rs_unref(rs);
}

static void pending_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rstream *rs = priv;
  redisReply *r = reply;

  link_replied(ac);
  if (r != NULL && r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
      r->element[0]->type == REDIS_REPLY_INTEGER)
    rs->pending = r->element[0]->integer;
  rs_unref(rs);
}

/* Ask for the group's pending count (the statistics). */
static void pending_query(rstream *rs) {
  const char *argv[3] = { "XPENDING", rs->key, rs->group };
  size_t lens[3] = { 8, strlen(rs->key), strlen(rs->group) };

  if (link_cmd(rs->cmd, pending_cb, rs, 3, argv, lens) == 0)
    rs->refs++;
}

static void ignore_cb(redisAsyncContext *ac, void *reply, void *priv) {
  (void)reply;
  (void)priv;
  link_replied(ac);
}

/* Claim the entries held here again for this consumer, so they do not
** look idle to others while they wait or their handlers run. */
static void heartbeat(rstream *rs) {
  const char *argv[6 + RS_BEAT_MAX];
  size_t lens[6 + RS_BEAT_MAX];
  uint64_t now = uv_now(rs->h->loop), every = rs->claim_ms / 4;
  int argc = 5, i, pass;
  rentry *e;

  argv[0] = "XCLAIM";
  argv[1] = rs->key;
  argv[2] = rs->group;
  argv[3] = rs->consumer;
  argv[4] = "0";
  for (pass = 0; pass < 2; pass++) {
    e = pass == 0 ? rs->flight.head : rs->queue.head;
    for (; e != NULL && argc < 5 + RS_BEAT_MAX; e = e->next) {
      if (now - e->beat >= every) {
        e->beat = now;
        argv[argc++] = e->id;
      }
    }
  }
  if (argc == 5)
    return;
  argv[argc++] = "JUSTID";
  for (i = 0; i < argc; i++)
    lens[i] = strlen(argv[i]);
  link_cmd(rs->cmd, ignore_cb, NULL, argc, argv, lens);
}

static void claim_tick(uv_timer_t *t) {
  rstream *rs = t->data;
  const char *argv[8];
  size_t lens[8];
  char idle[24], count[16];
  uint32_t room = rs_room(rs);
  int i;

  if (!rs->group_ok || !link_usable(rs->cmd))
    return;
  heartbeat(rs); /* also while stopping: the entries still in flight */
  if (rs->closing)
    return;
  pending_query(rs);
  if (rs->claim_busy || room == 0 || !rs->h->started)
    return;
  snprintf(idle, sizeof idle, "%" PRIu64, rs->claim_ms);
  snprintf(count, sizeof count, "%u",
           room < RS_CLAIM_MAX ? room : RS_CLAIM_MAX);
  argv[0] = "XAUTOCLAIM";
  argv[1] = rs->key;
  argv[2] = rs->group;
  argv[3] = rs->consumer;
  argv[4] = idle;
  argv[5] = rs->cursor;
  argv[6] = "COUNT";
  argv[7] = count;
  for (i = 0; i < 8; i++)
    lens[i] = strlen(argv[i]);
  if (link_cmd(rs->cmd, claim_cb, rs, 8, argv, lens) == 0) {
    rs->claim_busy = 1;
    rs->refs++;
  }
}

/* Make entries held here (ids, n of them) look idle for claim_idle, so
** that other consumers claim them at once (XCLAIM IDLE, JUSTID: the
** delivery counter stays). For what this consumer gives up when it stops. */
static void release_ids(rstream *rs, const char **ids, int n) {
  const char *argv[8 + RS_BEAT_MAX];
  size_t lens[8 + RS_BEAT_MAX];
  char idle[24];
  int i, argc = 5;

  snprintf(idle, sizeof idle, "%" PRIu64, rs->claim_ms);
  argv[0] = "XCLAIM";
  argv[1] = rs->key;
  argv[2] = rs->group;
  argv[3] = rs->consumer;
  argv[4] = "0";
  for (i = 0; i < n && i < RS_BEAT_MAX; i++)
    argv[argc++] = ids[i];
  argv[argc++] = "IDLE";
  argv[argc++] = idle;
  argv[argc++] = "JUSTID";
  for (i = 0; i < argc; i++)
    lens[i] = strlen(argv[i]);
  link_cmd(rs->cmd, ignore_cb, NULL, argc, argv, lens);
}

/* ---- connections ---- */

static void retry_cb(uv_timer_t *t) {
  rs_connect(t->data);
}

/* A link went away: connect again after the backoff, unless closing. */
static void rs_gone(void *owner, rlink *l) {
  rstream *rs = owner;

  if (rs->destroyed)
    return;
  if (l != NULL && l == rs->rd) {
    rs->rd = NULL;
    rs->rd_busy = 0;
    if (rs->closing)
      return; /* stopped reading on purpose */
  } else if (l != NULL && l == rs->cmd) {
    rs->cmd = NULL;
    rs->group_ok = 0;
    rs->group_busy = 0;
    rs->claim_busy = 0;
    if (rs->finished)
      return; /* closed on purpose */
  }
  if (!rs->down_said && !rs->closing) {
    rs->down_said = 1;
    host_report(rs->h,
                "input %s: connection to %s:%d lost or refused; "
                "reconnecting",
                rs->s->name, rs->ip, rs->port);
  }
  if (!uv_is_active((uv_handle_t *)&rs->retry_timer)) {
    uv_timer_start(&rs->retry_timer, retry_cb, (uint64_t)(rs->backoff * 1000.0),
                   0);
    rs->backoff =
        rs->backoff * 2 > RS_BACKOFF_MAX ? RS_BACKOFF_MAX : rs->backoff * 2;
  }
  /* While stopping, an unreachable server must not keep the host alive:
  ** what is not acknowledged stays pending. */
  if (rs->closing)
    uv_unref((uv_handle_t *)&rs->retry_timer);
}

static void rs_connected(void *owner) {
  (void)owner;
}

static void rs_connect(rstream *rs) {
  char err[256];

  if (rs->destroyed)
    return;
  if (rs->cmd == NULL) {
    rs->cmd = link_open(rs->h->loop, rs->ip, rs->port, rs_gone, rs_connected,
                        rs, err, sizeof err);
    if (rs->cmd == NULL) {
      rs_gone(rs, NULL);
      return;
    }
    group_create(rs);
  }
  if (rs->rd == NULL && !rs->closing) {
    rs->rd = link_open(rs->h->loop, rs->ip, rs->port, rs_gone, rs_connected, rs,
                       err, sizeof err);
    if (rs->rd == NULL) {
      rs_gone(rs, NULL);
      return;
    }
  }
  rstream_read(rs->s);
}

/* Closing, and nothing left to acknowledge: one last look at the pending
** count, then close the command connection. */
static void final_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rstream *rs = priv;

  link_close(rs->cmd); /* freed after this callback returns */
  pending_cb(ac, reply, priv);
}

static void rs_finish(rstream *rs) {
  const char *argv[3];
  size_t lens[3];

  if (!rs->closing || rs->finished || rs->destroyed || rs->flight.n > 0 ||
      rs->nacks > 0 || rs->busy > 0 || rs->claim_busy)
    return;
  rs->finished = 1;
  uv_timer_stop(&rs->retry_timer);
  uv_timer_stop(&rs->claim_timer);
  argv[0] = "XPENDING";
  argv[1] = rs->key;
  argv[2] = rs->group;
  lens[0] = 8;
  lens[1] = strlen(rs->key);
  lens[2] = strlen(rs->group);
  if (link_cmd(rs->cmd, final_cb, rs, 3, argv, lens) == 0)
    rs->refs++;
  else
    link_close(rs->cmd);
}

/* ---- the host's side ---- */

int rstream_open(src *s, const char *spec, char *err, size_t errlen) {
  char hostname[256], name[512];
  host *h = s->h;
  const char *v;
  rstream *rs;
  rurl u;
  char *end;
  double d;
  long n;

  if (url_parse(spec, &u, err, errlen) != 0)
    return -1;
  if ((rs = calloc(1, sizeof *rs)) == NULL) {
    url_free(&u);
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  rs->h = h;
  rs->refs = 1;
  rs->pending = -1;
  rs->max_deliveries = 5;
  rs->claim_ms = 30000;
  rs->backoff = RS_BACKOFF_MIN;
  snprintf(rs->cursor, sizeof rs->cursor, "0-0");
  snprintf(rs->ip, sizeof rs->ip, "%s", u.ip);
  rs->port = u.port;
  rs->key = u.key;
  u.key = NULL;
  if (gethostname(hostname, sizeof hostname) != 0)
    snprintf(hostname, sizeof hostname, "offpath");
  hostname[sizeof hostname - 1] = 0;
  snprintf(name, sizeof name, "%s-%ld", hostname, (long)getpid());
  v = url_opt(&u, "group");
  rs->group = strdup(v != NULL && *v ? v : "offpath");
  v = url_opt(&u, "consumer");
  rs->consumer = strdup(v != NULL && *v ? v : name);
  v = url_opt(&u, "field");
  rs->field = strdup(v != NULL && *v ? v : "data");
  v = url_opt(&u, "dead");
  snprintf(name, sizeof name, "%s:dead", rs->key);
  rs->dead = strdup(v != NULL && *v ? v : name);
  if ((v = url_opt(&u, "max_deliveries")) != NULL) {
    errno = 0;
    n = strtol(v, &end, 10);
    if (*v == 0 || *end != 0 || errno != 0 || n < 1 || n > 1000000) {
      snprintf(err, errlen, "max_deliveries must be 1..1000000, not '%s'", v);
      goto fail;
    }
    rs->max_deliveries = (int)n;
  }
  if ((v = url_opt(&u, "claim_idle")) != NULL) {
    d = strtod(v, &end);
    if (*v == 0 || *end != 0 || !(d >= 0.01 && d <= 86400)) {
      snprintf(err, errlen, "claim_idle must be 0.01..86400 seconds, not '%s'",
               v);
      goto fail;
    }
    rs->claim_ms = (uint64_t)(d * 1000.0 + 0.5);
  }
  if (url_leftover(&u, err, errlen) != 0)
    goto fail;
  if (rs->group == NULL || rs->consumer == NULL || rs->field == NULL ||
      rs->dead == NULL) {
    snprintf(err, errlen, "not enough memory");
    goto fail;
  }
  url_free(&u);
  s->rs = rs;
  rs->s = s;
  uv_timer_init(h->loop, &rs->retry_timer);
  uv_timer_init(h->loop, &rs->claim_timer);
  uv_timer_init(h->loop, &rs->flush_timer);
  rs->retry_timer.data = rs->claim_timer.data = rs->flush_timer.data = rs;
  rs->handles = 3;
  rs->refs += 3;
  uv_unref((uv_handle_t *)&rs->claim_timer);
  /* Claims and heartbeats every claim_idle / 3; an entry held here is
  ** claimed again once a quarter of claim_idle has passed since. */
  uv_timer_start(&rs->claim_timer, claim_tick, 1 + rs->claim_ms / 3,
                 1 + rs->claim_ms / 3);
  rs_connect(rs);
  return 0;

fail:
  url_free(&u);
  rs_unref(rs);
  return -1;
}

void rstream_close(src *s) {
  const char *ids[RS_BEAT_MAX];
  rstream *rs = s->rs;
  rentry *e;
  int n = 0;

  if (rs == NULL || rs->closing)
    return;
  rs->closing = 1;
  /* An unreachable server must not hold the host: see rs_gone. */
  uv_unref((uv_handle_t *)&rs->retry_timer);
  /* Read, never handed over: pending for others, at once. */
  for (e = rs->queue.head; e != NULL; e = e->next) {
    ids[n++] = e->id;
    if (n == RS_BEAT_MAX || e->next == NULL) {
      release_ids(rs, ids, n);
      n = 0;
    }
  }
  while ((e = rs->queue.head) != NULL) {
    rs->h->skipped++;
    entry_free(e);
  }
  link_close(rs->rd);
  rs_flush(rs);
  rs_finish(rs);
}

void rstream_destroy(src *s) {
  rstream *rs = s->rs;
  rentry *e;
  uint32_t i;

  if (rs == NULL)
    return;
  s->rs = NULL;
  rs->closing = 1;
  rs->destroyed = 1;
  while ((e = rs->queue.head) != NULL)
    entry_free(e);
  /* Entries still in flight keep rs; their end only frees them. */
  for (e = rs->flight.head; e != NULL; e = e->next)
    e->where = E_NONE;
  rs->flight.head = rs->flight.tail = NULL;
  rs->flight.n = 0;
  for (i = 0; i < rs->nacks; i++)
    free(rs->acks[i]);
  rs->nacks = 0;
  link_close(rs->rd);
  link_close(rs->cmd);
  uv_close((uv_handle_t *)&rs->retry_timer, timer_close_cb);
  uv_close((uv_handle_t *)&rs->claim_timer, timer_close_cb);
  uv_close((uv_handle_t *)&rs->flush_timer, timer_close_cb);
  rs_unref(rs);
}

/* Statistics of an input, as fields of the table on top.  [-0, +0, m] */
void rstream_push_stats(src *s, lua_State *L) {
  rstream *rs = s->rs;

  if (rs == NULL)
    return;
  lua_pushstring(L, rs->group);
  lua_setfield(L, -2, "group");
  lua_pushstring(L, rs->consumer);
  lua_setfield(L, -2, "consumer");
#define SET(k, v)                                                              \
  lua_pushinteger(L, (lua_Integer)(v));                                        \
  lua_setfield(L, -2, k)
  SET("read", rs->read);
  SET("acknowledged", rs->acked);
  SET("redelivered", rs->redelivered);
  SET("claimed", rs->claimed);
  SET("dead_lettered", rs->dead_lettered);
  SET("failed", rs->failed);
  SET("inflight", rs->flight.n);
  SET("pending", rs->pending);
#undef SET
}

/* One line of text: "read N, acknowledged N, ...". */
void rstream_stats_text(src *s, char *buf, size_t len) {
  rstream *rs = s->rs;

  if (rs == NULL) {
    snprintf(buf, len, "closed");
    return;
  }
  snprintf(buf, len,
           "read %" PRIu64 ", acknowledged %" PRIu64 ", redelivered %" PRIu64
           ", claimed %" PRIu64 ", dead-lettered %" PRIu64 ", failed %" PRIu64
           ", pending %" PRId64,
           rs->read, rs->acked, rs->redelivered, rs->claimed, rs->dead_lettered,
           rs->failed, rs->pending);
}

/* ---- the output ---- */

typedef struct rmsg rmsg;
struct rmsg {
  rmsg *prev, *next;
  struct rout *o;
  op_track *hold; /* the emitting record's tracked call, or NULL */
  uint8_t sent;   /* an XADD is in flight for it */
  size_t len;
  char data[];
};

struct rout {
  host *h;
  char ip[64];
  int port;
  char *key;
  char maxlen[24]; /* "" or the number for MAXLEN ~ */
  rlink *link;
  uv_timer_t retry_timer;
  double backoff;
  rmsg *head, *tail; /* unconfirmed, in order */
  uint8_t freed, down_said;
  int refs; /* the host + the timer + XADDs in flight */
  uint64_t written, failed;
};

static void out_unref(rout *o) {
  if (--o->refs > 0)
    return;
  free(o->key);
  free(o);
}

static void out_timer_close_cb(uv_handle_t *hd) {
  out_unref(hd->data);
}

static void msg_unlink(rout *o, rmsg *m) {
  if (m->prev != NULL)
    m->prev->next = m->next;
  else
    o->head = m->next;
  if (m->next != NULL)
    m->next->prev = m->prev;
  else
    o->tail = m->prev;
  m->prev = m->next = NULL;
}

/* Forget m: release its hold with err (NULL: written). */
static void msg_done(rout *o, rmsg *m, const char *err) {
  host *h = o->h;
  int was_high = h->out_held >= HOST_OUT_HIGH;

  msg_unlink(o, m);
  h->out_held -= m->len;
  if (m->hold != NULL)
    op_track_release(h->rt, m->hold, err);
  free(m);
  if (was_high && h->out_held < HOST_OUT_HIGH && !o->freed)
    host_pump_soon(h);
}

static void out_send(rout *o);

static void xadd_cb(redisAsyncContext *ac, void *reply, void *priv) {
  rmsg *m = priv;
  rout *o = m->o;
  redisReply *r = reply;
  char err[512];

  link_replied(ac);
  m->sent = 0;
  if (o->freed) {
    free(m); /* rout_free released its hold and left it to us */
  } else if (r != NULL && r->type == REDIS_REPLY_STRING) {
    o->written++;
    msg_done(o, m, NULL);
  } else if (r != NULL) {
    o->failed++;
    snprintf(err, sizeof err, "output %s: XADD failed: %s", o->key,
             reply_error(r));
    host_report(o->h, "%s", err);
    msg_done(o, m, err);
  } /* lost: sent again after reconnecting */
  out_unref(o);
}

/* Send every unconfirmed record that has no XADD in flight, in order. */
static void out_send(rout *o) {
  const char *argv[8];
  size_t lens[8];
  rargs a;
  rmsg *m;

  for (m = o->head; m != NULL && link_usable(o->link); m = m->next) {
    if (m->sent)
      continue;
    a.v = argv;
    a.len = lens;
    a.n = 0;
    arg_str(&a, "XADD");
    arg_str(&a, o->key);
    if (o->maxlen[0] != 0) {
      arg_str(&a, "MAXLEN");
      arg_str(&a, "~");
      arg_str(&a, o->maxlen);
    }
    arg_str(&a, "*");
    arg_str(&a, "data");
    arg_add(&a, m->data, m->len);
    if (link_cmd(o->link, xadd_cb, m, a.n, a.v, a.len) != 0)
      return;
    m->sent = 1;
    o->refs++;
  }
}

static void out_connect(rout *o);

static void out_retry_cb(uv_timer_t *t) {
  out_connect(t->data);
}

static void out_gone(void *owner, rlink *l) {
  rout *o = owner;

  (void)l;
  o->link = NULL;
  if (o->freed)
    return;
  if (!o->down_said) {
    o->down_said = 1;
    host_report(o->h,
                "output redis-stream %s: connection to %s:%d lost or "
                "refused; reconnecting",
                o->key, o->ip, o->port);
  }
  uv_timer_start(&o->retry_timer, out_retry_cb, (uint64_t)(o->backoff * 1000),
                 0);
  /* While stopping, an unreachable output must not keep the host alive. */
  if (o->h->stopping)
    uv_unref((uv_handle_t *)&o->retry_timer);
  o->backoff =
      o->backoff * 2 > RS_BACKOFF_MAX ? RS_BACKOFF_MAX : o->backoff * 2;
}

static void out_connected(void *owner) {
  rout *o = owner;

  o->down_said = 0;
  o->backoff = RS_BACKOFF_MIN;
}

static void out_connect(rout *o) {
  char err[256];

  if (o->freed || o->link != NULL)
    return;
  o->link = link_open(o->h->loop, o->ip, o->port, out_gone, out_connected, o,
                      err, sizeof err);
  if (o->link == NULL) {
    out_gone(o, NULL);
    return;
  }
  out_send(o);
}

int rout_open(host *h, const char *spec, char *err, size_t errlen) {
  const char *v;
  rout *o;
  rurl u;
  char *end;
  long long n;

  if (url_parse(spec, &u, err, errlen) != 0)
    return -1;
  if ((o = calloc(1, sizeof *o)) == NULL) {
    url_free(&u);
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  if ((v = url_opt(&u, "maxlen")) != NULL) {
    errno = 0;
    n = strtoll(v, &end, 10);
    if (*v == 0 || *end != 0 || errno != 0 || n < 1) {
      snprintf(err, errlen, "maxlen must be an integer >= 1, not '%s'", v);
      url_free(&u);
      free(o);
      return -1;
    }
    snprintf(o->maxlen, sizeof o->maxlen, "%lld", n);
  }
  if (url_leftover(&u, err, errlen) != 0) {
    url_free(&u);
    free(o);
    return -1;
  }
  o->h = h;
  o->refs = 2; /* the host, the timer */
  o->backoff = RS_BACKOFF_MIN;
  snprintf(o->ip, sizeof o->ip, "%s", u.ip);
  o->port = u.port;
  o->key = u.key;
  u.key = NULL;
  url_free(&u);
  uv_timer_init(h->loop, &o->retry_timer);
  o->retry_timer.data = o;
  h->rout = o;
  out_connect(o);
  return 0;
}

void rout_emit(host *h, lua_State *L, const char *p, size_t n) {
  rout *o = h->rout;
  rmsg *m;

  if (n > 0 && p[n - 1] == '\n')
    n--;
  if ((m = malloc(sizeof *m + n + 1)) == NULL)
    luaL_error(L, "emit: not enough memory");
  memcpy(m->data, p, n);
  m->data[n] = 0;
  m->len = n;
  m->o = o;
  m->sent = 0;
  m->hold = op_track_hold(h->rt);
  m->next = NULL;
  m->prev = o->tail;
  if (o->tail != NULL)
    o->tail->next = m;
  else
    o->head = m;
  o->tail = m;
  h->out_held += n;
  out_send(o);
}

/* One line of text for the summary. */
void rout_stats_text(host *h, char *buf, size_t len) {
  rout *o = h->rout;

  snprintf(buf, len, "%s: %" PRIu64 " written, %" PRIu64 " failed", o->key,
           o->written, o->failed);
}

void rout_free(host *h) {
  rout *o = h->rout;
  uint64_t lost = 0;
  rmsg *m;

  if (o == NULL)
    return;
  h->rout = NULL;
  o->freed = 1;
  for (m = o->head; m != NULL; m = m->next)
    lost++;
  if (lost > 0) {
    h->out_errors++;
    host_report(h,
                "output %s: %" PRIu64 " records not written: Redis at "
                "%s:%d did not confirm them",
                o->key, lost, o->ip, o->port);
  }
  while ((m = o->head) != NULL) {
    msg_unlink(o, m);
    h->out_held -= m->len;
    if (m->hold != NULL)
      op_track_release(h->rt, m->hold,
                       "output closed before the record was written");
    m->hold = NULL;
    if (!m->sent)
      free(m); /* else its XADD's callback frees it */
  }
  link_close(o->link);
  uv_close((uv_handle_t *)&o->retry_timer, out_timer_close_cb);
  out_unref(o);
}
