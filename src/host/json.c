/* SPDX-License-Identifier: MIT */
/*
** json.c - records as JSON: one line of text to a Lua value (decoded by
** jansson), and a Lua value to compact JSON text for engine:emit and the
** --json summary. Needs only Lua and jansson (fuzzed on its own by
** tests/fuzz/fuzz-records.c).
** Thread: loop.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>

#include "host.h"

#define MAX_DEPTH 1000

/* ---- decoding ---- */

/* Push the Lua form of v.  [-0, +1, m] */
static void push_json(lua_State *L, json_t *v) {
  const char *key;
  size_t i, n;
  void *it;
  json_t *e;

  luaL_checkstack(L, 3, "JSON nested too deep");
  switch (json_typeof(v)) {
  case JSON_OBJECT:
    lua_createtable(L, 0, (int)json_object_size(v));
    for (it = json_object_iter(v); it != NULL;
         it = json_object_iter_next(v, it)) {
      e = json_object_iter_value(it);
      if (json_is_null(e))
        continue;
      key = json_object_iter_key(it);
      lua_pushlstring(L, key, json_object_iter_key_len(it));
      push_json(L, e);
      lua_rawset(L, -3);
    }
    break;
  case JSON_ARRAY:
    n = json_array_size(v);
    lua_createtable(L, (int)n, 0);
    for (i = 0; i < n; i++) {
      e = json_array_get(v, i);
      if (json_is_null(e))
        continue;
      push_json(L, e);
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    break;
  case JSON_STRING:
    lua_pushlstring(L, json_string_value(v), json_string_length(v));
    break;
  case JSON_INTEGER:
    lua_pushinteger(L, (lua_Integer)json_integer_value(v));
    break;
  case JSON_REAL:
    lua_pushnumber(L, (lua_Number)json_real_value(v));
    break;
  case JSON_TRUE:
    lua_pushboolean(L, 1);
    break;
  case JSON_FALSE:
    lua_pushboolean(L, 0);
    break;
  default:
    lua_pushnil(L);
    break;
  }
}

/* Protected part of json_push_line: upvalue-free, argument 1 is the tree
** as a light userdata.  [-1, +1, m] */
static int push_json_p(lua_State *L) {
  json_t *v = lua_touserdata(L, 1);

  lua_pop(L, 1);
  push_json(L, v);
  return 1;
}

int json_push_line(lua_State *L, const char *p, size_t len, char *err,
                   size_t errlen) {
  json_error_t je;
  json_t *v;
  int status;

  v = json_loadb(p, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
  if (v == NULL) {
    snprintf(err, errlen, "%s at column %d", je.text, je.column);
    return 0;
  }
  /* Lua may raise (out of memory) while the tree is held: convert in
  ** protected mode, then free the tree. */
  lua_pushcfunction(L, push_json_p);
  lua_pushlightuserdata(L, v);
  status = lua_pcall(L, 1, 1, 0);
  json_decref(v);
  if (status != LUA_OK) {
    lua_pop(L, 1);
    return -1;
  }
  return 1;
}

/* ---- encoding ---- */

typedef struct enc {
  lua_State *L;
  jbuf *b;
  const char *what;
  int lossy;    /* invalid UTF-8 becomes U+FFFD instead of an error */
  char key[64]; /* innermost key, for messages */
} enc;

static void encode_value(enc *e, int idx, int depth);

/* ---- the output buffer ---- */

static int jbuf_gc(lua_State *L) {
  jbuf *b = lua_touserdata(L, 1);

  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
  return 0;
}

jbuf *jbuf_new(lua_State *L) {
  jbuf *b = lua_newuserdatauv(L, sizeof *b, 0);

  memset(b, 0, sizeof *b);
  if (luaL_newmetatable(L, "offpath.host.jbuf")) {
    lua_pushcfunction(L, jbuf_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return b;
}

void jbuf_add(lua_State *L, jbuf *b, const char *s, size_t n) {
  size_t cap;
  char *p;

  if (b->cap - b->len < n) {
    cap = b->cap ? b->cap : 256;
    while (cap - b->len < n)
      cap *= 2;
    if ((p = realloc(b->p, cap)) == NULL)
      luaL_error(L, "not enough memory");
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

static void jb_add(enc *e, const char *s, size_t n) {
  jbuf_add(e->L, e->b, s, n);
}

static void jb_adds(enc *e, const char *s) {
  jbuf_add(e->L, e->b, s, strlen(s));
}

static void jb_addc(enc *e, char c) {
  if (e->b->len < e->b->cap)
    e->b->p[e->b->len++] = c;
  else
    jbuf_add(e->L, e->b, &c, 1);
}

/* Raise "<what>: <msg> (at key 'k')". */
static void enc_error(enc *e, const char *msg) {
  if (e->key[0] != '\0')
    luaL_error(e->L, "%s: %s (at key '%s')", e->what, msg, e->key);
  luaL_error(e->L, "%s: %s", e->what, msg);
}

/* Length of the UTF-8 sequence at p (n bytes left), or 0 if invalid. */
static size_t utf8_len(const unsigned char *p, size_t n) {
  unsigned c = p[0], cp;
  size_t len, i;

  if (c < 0x80)
    return 1;
  if (c >= 0xc2 && c <= 0xdf)
    len = 2, cp = c & 0x1f;
  else if (c >= 0xe0 && c <= 0xef)
    len = 3, cp = c & 0x0f;
  else if (c >= 0xf0 && c <= 0xf4)
    len = 4, cp = c & 0x07;
  else
    return 0;
  if (n < len)
    return 0;
  for (i = 1; i < len; i++) {
    if ((p[i] & 0xc0) != 0x80)
      return 0;
    cp = (cp << 6) | (p[i] & 0x3f);
  }
  if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
      (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
    return 0;
  return len;
}

static void encode_string(enc *e, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *p = (const unsigned char *)s;
  size_t i = 0, run, k;
  char esc[6];

  jb_addc(e, '"');
  while (i < n) {
    /* Copy a run of bytes that need no escape at once. */
    run = i;
    while (run < n && p[run] >= 0x20 && p[run] < 0x80 && p[run] != '"' &&
           p[run] != '\\')
      run++;
    if (run > i) {
      jb_add(e, s + i, run - i);
      i = run;
      continue;
    }
    if (p[i] >= 0x80) {
      k = utf8_len(p + i, n - i);
      if (k == 0 && e->lossy) {
        jb_adds(e, "\\ufffd"); /* one replacement per invalid byte */
        i++;
        continue;
      }
      if (k == 0)
        enc_error(e, "string is not valid UTF-8");
      jb_add(e, s + i, k);
      i += k;
      continue;
    }
    jb_addc(e, '\\');
    switch (p[i]) {
    case '"':
      jb_addc(e, '"');
      break;
    case '\\':
      jb_addc(e, '\\');
      break;
    case '\n':
      jb_addc(e, 'n');
      break;
    case '\r':
      jb_addc(e, 'r');
      break;
    case '\t':
      jb_addc(e, 't');
      break;
    case '\b':
      jb_addc(e, 'b');
      break;
    case '\f':
      jb_addc(e, 'f');
      break;
    default:
      esc[0] = 'u';
      esc[1] = '0';
      esc[2] = '0';
      esc[3] = hex[p[i] >> 4];
      esc[4] = hex[p[i] & 15];
      jb_add(e, esc, 5);
      break;
    }
    i++;
  }
  jb_addc(e, '"');
}

/* Shortest "%.Ng" that reads back as the same double; integral values
** keep a ".0" so they decode as floats again. NaN and infinities, which
** JSON cannot hold, become null. */
static void encode_float(enc *e, double d) {
  char s[40];
  int prec;

  if (isnan(d) || isinf(d)) {
    jb_adds(e, "null");
    return;
  }
  for (prec = 15; prec <= 17; prec++) {
    snprintf(s, sizeof s, "%.*g", prec, d);
    if (strtod(s, NULL) == d)
      break;
  }
  jb_adds(e, s);
  if (strpbrk(s, ".eE") == NULL)
    jb_adds(e, ".0");
}

/* A table key, as the encoder sorts them. */
typedef struct tkey {
  const char *s; /* string key (anchored by the table) */
  size_t len;
  lua_Integer i; /* integer key when s is NULL */
} tkey;

static int tkey_cmp(const void *a, const void *b) {
  const tkey *x = a, *y = b;
  size_t n;
  int c;

  if (x->s == NULL || y->s == NULL) {
    if (x->s != NULL)
      return 1; /* integers first */
    if (y->s != NULL)
      return -1;
    return x->i < y->i ? -1 : x->i > y->i;
  }
  n = x->len < y->len ? x->len : y->len;
  c = memcmp(x->s, y->s, n);
  if (c != 0)
    return c;
  return x->len < y->len ? -1 : x->len > y->len;
}

static void set_key(enc *e, const tkey *k) {
  size_t n;

  if (k->s == NULL) {
    snprintf(e->key, sizeof e->key, "%lld", (long long)k->i);
    return;
  }
  n = k->len < sizeof e->key - 1 ? k->len : sizeof e->key - 1;
  memcpy(e->key, k->s, n);
  e->key[n] = '\0';
}

static void encode_table(enc *e, int t, int depth) {
  lua_State *L = e->L;
  lua_Integer n = (lua_Integer)lua_rawlen(L, t), i;
  size_t count = 0, other = 0, k;
  tkey *keys;
  char num[32];

  if (depth >= MAX_DEPTH)
    enc_error(e, "table nested deeper than 1000 levels (a cycle?)");
  luaL_checkstack(L, 6, "JSON nested too deep");
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    count++;
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1 ||
        lua_tointeger(L, -1) > n)
      other++;
  }
  if (count > 0 && other == 0) {
    /* A sequence (holes become null). */
    jb_addc(e, '[');
    for (i = 1; i <= n; i++) {
      if (i > 1)
        jb_addc(e, ',');
      lua_rawgeti(L, t, i);
      snprintf(e->key, sizeof e->key, "%lld", (long long)i);
      encode_value(e, lua_gettop(L), depth + 1);
      lua_pop(L, 1);
    }
    jb_addc(e, ']');
    return;
  }
  /* An object: collect the keys in a userdata (freed by the collector if
  ** anything below raises), sort them, then write. */
  keys = lua_newuserdatauv(L, (count ? count : 1) * sizeof *keys, 0);
  k = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING) {
      keys[k].s = lua_tolstring(L, -1, &keys[k].len);
    } else if (lua_isinteger(L, -1)) {
      keys[k].s = NULL;
      keys[k].i = lua_tointeger(L, -1);
    } else {
      snprintf(e->key, sizeof e->key, "?");
      lua_pushfstring(L, "cannot encode a %s key", luaL_typename(L, -1));
      enc_error(e, lua_tostring(L, -1));
    }
    k++;
  }
  qsort(keys, count, sizeof *keys, tkey_cmp);
  jb_addc(e, '{');
  for (k = 0; k < count; k++) {
    if (k > 0)
      jb_addc(e, ',');
    set_key(e, &keys[k]);
    if (keys[k].s != NULL) {
      encode_string(e, keys[k].s, keys[k].len);
      lua_pushlstring(L, keys[k].s, keys[k].len);
      lua_rawget(L, t);
    } else {
      snprintf(num, sizeof num, "\"%lld\"", (long long)keys[k].i);
      jb_adds(e, num);
      lua_rawgeti(L, t, keys[k].i);
    }
    jb_addc(e, ':');
    encode_value(e, lua_gettop(L), depth + 1);
    lua_pop(L, 1);
  }
  jb_addc(e, '}');
  lua_pop(L, 1); /* keys */
}

static void encode_value(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  const char *s;
  size_t n;
  char num[32];

  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    jb_adds(e, "null");
    break;
  case LUA_TBOOLEAN:
    jb_adds(e, lua_toboolean(L, idx) ? "true" : "false");
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      snprintf(num, sizeof num, "%lld", (long long)lua_tointeger(L, idx));
      jb_adds(e, num);
    } else {
      encode_float(e, (double)lua_tonumber(L, idx));
    }
    break;
  case LUA_TSTRING:
    s = lua_tolstring(L, idx, &n);
    encode_string(e, s, n);
    break;
  case LUA_TTABLE:
    encode_table(e, idx, depth);
    break;
  default:
    lua_pushfstring(L, "cannot encode a %s", luaL_typename(L, idx));
    enc_error(e, lua_tostring(L, -1));
  }
}

void json_encode(lua_State *L, int idx, jbuf *b, const char *what, int lossy) {
  enc e;

  e.L = L;
  e.b = b;
  e.what = what;
  e.lossy = lossy;
  e.key[0] = '\0';
  encode_value(&e, lua_absindex(L, idx), 0);
}
