/* SPDX-License-Identifier: MIT */
/*
** fuzz-records.c - libFuzzer target for the host's record path: the line
** splitter (src/host/lines.c) fed in arbitrary chunks and checked against
** a plain reference split, and every line decoded from JSON to Lua and
** encoded back (src/host/json.c), which must reach a fixed point.
**
** Built by cmake/fuzz.cmake: `make fuzz` runs it under libFuzzer; the
** ctest fuzz/records replays tests/fuzz/corpus/records. The first two
** bytes of an input choose the chunking and the line limit.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"

static lua_State *L;

#define CHECK(c)                                                               \
  do {                                                                         \
    if (!(c)) {                                                                \
      fprintf(stderr, "fuzz-records: check failed: %s (line %d)\n", #c,        \
              __LINE__);                                                       \
      abort();                                                                 \
    }                                                                          \
  } while (0)

/* ---- the line splitter against a reference ---- */

typedef struct ref {
  const unsigned char *p;
  size_t n, pos;
  size_t max;
} ref;

/* The next expected line from a whole-input split: LS_LINE with *line and
** *len, LS_OVERSIZE, or LS_NONE at the end. */
static int ref_next(ref *r, const char **line, size_t *len) {
  const unsigned char *nl;
  size_t seg;

  if (r->pos >= r->n)
    return LS_NONE;
  nl = memchr(r->p + r->pos, '\n', r->n - r->pos);
  seg = nl != NULL ? (size_t)(nl - (r->p + r->pos)) : r->n - r->pos;
  *line = (const char *)r->p + r->pos;
  r->pos += seg + (nl != NULL);
  if (seg > r->max)
    return LS_OVERSIZE;
  if (seg > 0 && (*line)[seg - 1] == '\r')
    seg--;
  *len = seg;
  return LS_LINE;
}

/* ---- JSON round trips ---- */

typedef struct trip {
  const char *p;
  size_t len;
  char *out; /* malloc'ed result of the last encode */
  size_t outlen;
  int status; /* 0 malformed, 1 ok, 2 too deep */
} trip;

/* decode(p) then encode: protected.  [-0, +0, e] */
static int trip_p(lua_State *LL) {
  trip *t = lua_touserdata(LL, 1);
  char err[256];
  jbuf *b;

  if (json_push_line(LL, t->p, t->len, err, sizeof err) <= 0) {
    t->status = 0;
    return 0;
  }
  b = jbuf_new(LL);
  json_encode(LL, -2, b, "fuzz", 0);
  t->out = malloc(b->len ? b->len : 1);
  CHECK(t->out != NULL);
  memcpy(t->out, b->p, b->len);
  t->outlen = b->len;
  t->status = 1;
  return 0;
}

static int trip_run(trip *t) {
  int top = lua_gettop(L);

  t->out = NULL;
  lua_pushcfunction(L, trip_p);
  lua_pushlightuserdata(L, t);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    /* Only nesting beyond the encoder's limit may fail. */
    if (msg == NULL || strstr(msg, "nested deeper") == NULL) {
      fprintf(stderr, "fuzz-records: encode failed: %s\n", msg ? msg : "?");
      abort();
    }
    t->status = 2;
  }
  lua_settop(L, top);
  return t->status;
}

static void check_json(const char *p, size_t len) {
  trip a, b, c;

  a.p = p;
  a.len = len;
  if (trip_run(&a) != 1)
    return;
  /* What we wrote must parse, and reach a fixed point (the first encode
  ** may turn an array with holes into an object keyed by numbers). */
  b.p = a.out;
  b.len = a.outlen;
  CHECK(trip_run(&b) == 1);
  c.p = b.out;
  c.len = b.outlen;
  CHECK(trip_run(&c) == 1);
  CHECK(b.outlen == c.outlen && memcmp(b.out, c.out, b.outlen) == 0);
  free(a.out);
  free(b.out);
  free(c.out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const size_t maxes[] = { 8, 64, 4096, HOST_MAX_LINE };
  linesplit ls;
  ref r;
  const char *line, *want;
  size_t len, wlen, off = 0, chunk;
  unsigned seed;
  int got, exp, eof;

  if (L == NULL) {
    L = luaL_newstate();
    CHECK(L != NULL);
  }
  if (size < 2)
    return 0;
  seed = data[0];
  ls_init(&ls, maxes[data[1] & 3]);
  r.p = data + 2;
  r.n = size - 2;
  r.pos = 0;
  r.max = ls.max;
  data += 2;
  size -= 2;
  for (eof = 0; !eof;) {
    if (off < size) {
      seed = seed * 1103515245u + 12345u;
      chunk = 1 + (seed >> 16) % 97;
      if (chunk > size - off)
        chunk = size - off;
      CHECK(ls_append(&ls, (const char *)data + off, chunk) == 0);
      off += chunk;
    } else {
      eof = 1;
    }
    while ((got = ls_next(&ls, eof, &line, &len)) != LS_NONE) {
      exp = ref_next(&r, &want, &wlen);
      CHECK(got == exp);
      if (got == LS_LINE) {
        CHECK(len == wlen && memcmp(line, want, len) == 0);
        CHECK(memchr(line, '\n', len) == NULL);
        check_json(line, len);
      }
    }
  }
  CHECK(ref_next(&r, &want, &wlen) == LS_NONE);
  CHECK(ls_pending(&ls) == 0);
  ls_free(&ls);
  lua_settop(L, 0);
  lua_gc(L, LUA_GCSTEP, 0);
  return 0;
}
