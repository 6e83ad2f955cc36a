/* SPDX-License-Identifier: MIT */
/*
** test-protostore.c - the prototype store stays bounded: functions made
** per event with load() are evicted on both sides, a reused Proto address
** never reaches a stale entry, and an encoding that outlives its entry
** fails cleanly.
*/
#include "pair.h"

static void setup(pair *p) {
  pair_open(p);
  pair_xfer(p);
}

static void teardown(pair *p) {
  pair_close(p);
}

/* Encode, in A, a function made with load() that returns i (and, with
** upvalue set, a fresh upvalue holding i too). */
static void encode_new(pair *p, int i, int upvalue, op_buf *b) {
  char src[160], err[256];

  if (upvalue)
    snprintf(src, sizeof src,
             "local u = %d return function() return u + %d - u end", i, i);
  else
    snprintf(src, sizeof src, "return %d", i);
  if (luaL_loadstring(p->A, src) != 0)
    TEST_FAIL_("load: %s", lua_tostring(p->A, -1));
  if (upvalue)
    lua_call(p->A, 0, 1);
  op__buf_init(b);
  if (op__encode(p->xa, p->A, -1, 1, b, "argument", 1, err, sizeof err) != 0)
    TEST_FAIL_("encode: %s", err);
  lua_settop(p->A, 0);
}

/* Decode b in B, call the function and check that it returns i. */
static void check_decode(pair *p, op_buf *b, int i) {
  char err[256];

  if (op__decode(p->xb, p->B, b->p, b->len, err, sizeof err) != 1)
    TEST_FAIL_("decode of function %d: %s", i, err);
  lua_call(p->B, 0, 1);
  ASSERT_EQ(lua_tointeger(p->B, -1), i);
  lua_settop(p->B, 0);
  op__buf_free(b);
}

static size_t heap(lua_State *L) {
  return (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024;
}

/* Encode the global function hot of A alone, check that B runs it (it
** returns 7), and return the length of the encoding. */
static size_t send_hot(pair *p) {
  op_buf b;
  char err[256];
  size_t len;

  lua_getglobal(p->A, "hot");
  op__buf_init(&b);
  ASSERT_OK(op__encode(p->xa, p->A, -1, 1, &b, "argument", 1, err, sizeof err));
  lua_settop(p->A, 0);
  len = b.len;
  check_decode(p, &b, 7);
  return len;
}

/* 40,000 distinct prototypes, one after another: the store, the anchors
** in A and the factories in B stay bounded, and every call runs the
** function that was sent (addresses of collected prototypes are reused
** all the time: a stale cache entry would run another function). */
static void test_bounded(void) {
  pair p;
  op_buf b;
  size_t cap = OP_PROTO_CAP + OP_STORE_GRACE + 64, peak_a = 0, peak_b = 0;
  int i;

  setup(&p);
  for (i = 0; i < 40000; i++) {
    encode_new(&p, i, i & 1, &b);
    check_decode(&p, &b, i);
    ASSERT_LE(op__protostore_count(p.ps), cap);
    if (i % 1000 == 999) {
      lua_gc(p.A, LUA_GCCOLLECT, 0);
      lua_gc(p.B, LUA_GCCOLLECT, 0);
      if (heap(p.A) > peak_a)
        peak_a = heap(p.A);
      if (heap(p.B) > peak_b)
        peak_b = heap(p.B);
    }
  }
  /* About 1-2 KB per prototype kept; 40,000 kept would be 40-80 MB. */
  ASSERT_LT(peak_a, (size_t)24 << 20);
  ASSERT_LT(peak_b, (size_t)24 << 20);
  printf("store %zu entries, heap A %zu KB, B %zu KB\n",
         op__protostore_count(p.ps), peak_a >> 10, peak_b >> 10);
  teardown(&p);
}

/* A function used all along stays cached while new ones come and go: it
** is never re-stored. */
static void test_hot_kept(void) {
  pair p;
  op_buf b;
  int i;
  size_t hot_len = 0, len;

  setup(&p);
  luaL_dostring(p.A, "function hot() return 7 end");
  lua_settop(p.A, 0);
  for (i = 0; i < 3 * (OP_PROTO_CAP + OP_STORE_GRACE); i++) {
    if (i % 64 == 0) {
      len = send_hot(&p);
      if (hot_len == 0)
        hot_len = len;
      ASSERT_EQ(len, hot_len); /* the same small id every time */
    }
    encode_new(&p, i, 0, &b);
    check_decode(&p, &b, i);
  }
  teardown(&p);
}

/* A function sent alone, again and again, is encoded from the encode
** cache, which does not count as a use of its prototype: once enough new
** prototypes come (here inside tables, which the cache does not keep) it
** is evicted like the others, and the cache must forget it, or it would
** keep sending an id the store has freed. */
static void test_cached_evicted(void) {
  pair p;
  op_buf b;
  char err[256], src[64];
  int i;

  setup(&p);
  luaL_dostring(p.A, "function hot() return 7 end");
  lua_settop(p.A, 0);
  for (i = 0; i < 2 * (OP_PROTO_CAP + OP_STORE_GRACE); i++) {
    if (i % 64 == 0)
      send_hot(&p);
    snprintf(src, sizeof src, "return { function() return %d end }", i);
    ASSERT_OK(luaL_dostring(p.A, src));
    op__buf_init(&b);
    ASSERT_OK(op__encode(p.xa, p.A, -1, 1, &b, "argument", 1, err, sizeof err));
    lua_settop(p.A, 0);
    ASSERT_EQ(op__decode(p.xb, p.B, b.p, b.len, err, sizeof err), 1);
    lua_settop(p.B, 0);
    op__buf_free(&b);
  }
  teardown(&p);
}

/* An encoding kept while fewer than OP_STORE_GRACE new prototypes are
** stored still decodes; one kept past that fails with a clear error. */
static void test_grace(void) {
  pair p;
  op_buf kept, late, b;
  char err[256];
  int i;

  setup(&p);
  encode_new(&p, -1, 0, &kept);
  encode_new(&p, -2, 0, &late);
  for (i = 0; i < OP_PROTO_CAP + OP_STORE_GRACE / 2; i++) {
    encode_new(&p, i, 0, &b);
    op__buf_free(&b);
  }
  check_decode(&p, &kept, -1);
  for (i = 0; i < OP_PROTO_CAP + 2 * OP_STORE_GRACE; i++) {
    encode_new(&p, i, 0, &b);
    op__buf_free(&b);
  }
  ASSERT_LT(op__decode(p.xb, p.B, late.p, late.len, err, sizeof err), 0);
  ASSERT_STR_HAS(err, "is no longer in the prototype store");
  ASSERT_EQ(lua_gettop(p.B), 0);
  op__buf_free(&late);
  teardown(&p);
}

int main(void) {
  test_bounded();
  test_hot_kept();
  test_cached_evicted();
  test_grace();
  printf("ok\n");
  return 0;
}
