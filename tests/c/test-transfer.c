/* SPDX-License-Identifier: MIT */
/*
** test-transfer.c - encoding Lua values in one VM and decoding them in
** another (transfer.c), with no runtime: two lua_States, one store.
** LABELS: tsan
** (test_threads shares one store between threads, for `make test-tsan`.)
*/
#include <math.h>
#include <time.h>

#include "pair.h"

static void dostr(lua_State *L, const char *code) {
  if (luaL_dostring(L, code) != 0)
    TEST_FAIL_("lua error: %s", lua_tostring(L, -1));
}

static int cf_add(lua_State *L) {
  lua_pushinteger(L, luaL_checkinteger(L, 1) + luaL_checkinteger(L, 2));
  return 1;
}

static void setup(pair *p) {
  pair_open(p);
  /* a module known before op__xfer_new, different in each VM */
  dostr(p->A, "package.loaded.mymod = { name = 'A', "
              "f = function() return 'A' end, "
              "sub = { g = function() return 'Ag' end } } mymod = "
              "package.loaded.mymod");
  dostr(p->B, "package.loaded.mymod = { name = 'B', "
              "f = function() return 'B' end, "
              "sub = { g = function() return 'Bg' end } } mymod = "
              "package.loaded.mymod");
  pair_xfer(p);
}

static void teardown(pair *p) {
  pair_close(p);
}

/* Run make in A, encode all its results as arguments 1.., decode them in
** B and run check there with them as "...". Returns the encoded size. */
static size_t roundtrip(pair *p, const char *make, const char *check) {
  lua_State *A = p->A, *B = p->B;
  op_buf b;
  char err[256];
  int top = lua_gettop(A), n, rc;
  size_t size;

  if (luaL_loadstring(A, make) != 0 || lua_pcall(A, 0, LUA_MULTRET, 0) != 0)
    TEST_FAIL_("make: %s", lua_tostring(A, -1));
  n = lua_gettop(A) - top;
  op__buf_init(&b);
  rc = op__encode(p->xa, A, top + 1, n, &b, "argument", 1, err, sizeof err);
  if (rc != 0)
    TEST_FAIL_("encode: %d %s", rc, err);
  ASSERT_EQ(lua_gettop(A), top + n);
  lua_settop(A, top);
  if (luaL_loadstring(B, check) != 0)
    TEST_FAIL_("check: %s", lua_tostring(B, -1));
  rc = op__decode(p->xb, B, b.p, b.len, err, sizeof err);
  if (rc != n)
    TEST_FAIL_("decode: %d (want %d) %s", rc, n, err);
  if (lua_pcall(B, n, 0, 0) != 0)
    TEST_FAIL_("check failed: %s", lua_tostring(B, -1));
  size = b.len;
  op__buf_free(&b);
  return size;
}

/* Run make in A and expect encoding its results to be refused with
** exactly msg. */
static void refused(pair *p, const char *make, const char *label, int first_no,
                    const char *msg) {
  lua_State *A = p->A;
  op_buf b;
  char err[256];
  int top = lua_gettop(A), n, rc;

  if (luaL_loadstring(A, make) != 0 || lua_pcall(A, 0, LUA_MULTRET, 0) != 0)
    TEST_FAIL_("make: %s", lua_tostring(A, -1));
  n = lua_gettop(A) - top;
  op__buf_init(&b);
  op__buf_append(&b, "xyz", 3);
  rc = op__encode(p->xa, A, top + 1, n, &b, label, first_no, err, sizeof err);
  ASSERT_EQ(rc, OP_ECOPY);
  ASSERT_STR_EQ(err, msg);
  ASSERT_EQ(b.len, 3); /* left as it was */
  ASSERT_EQ(lua_gettop(A), top + n);
  lua_settop(A, top);
  op__buf_free(&b);
}

/* Encode the results of make (in A) into b. */
static void encode_code(pair *p, const char *make, op_buf *b) {
  lua_State *A = p->A;
  char err[256];
  int top = lua_gettop(A), rc;

  if (luaL_loadstring(A, make) != 0 || lua_pcall(A, 0, LUA_MULTRET, 0) != 0)
    TEST_FAIL_("make: %s", lua_tostring(A, -1));
  rc = op__encode(p->xa, A, top + 1, lua_gettop(A) - top, b, "argument", 1, err,
                  sizeof err);
  if (rc != 0)
    TEST_FAIL_("encode: %s", err);
  lua_settop(A, top);
}

/* Append a string literal, with its terminating nul when last. */
#define APPS(b, lit) op__buf_append((b), (lit), sizeof(lit) - 1)
#define APPZ(b)      op__buf_append((b), "", 1)

/* ---- values ---- */

static void test_scalars(void) {
  pair p;
  size_t n;

  setup(&p);
  roundtrip(&p, "return nil, true, false",
            "local a, b, c = ... assert(select('#', ...) == 3) "
            "assert(a == nil and b == true and c == false)");
  roundtrip(&p,
            "return 0, -1, 159, 160, -32, -33, math.maxinteger, "
            "math.mininteger, 1 << 40, -(1 << 40), "
            "(1 << 27) - 1, 1 << 27, -(1 << 27), -(1 << 27) - 1",
            "local t = {...} "
            "local w = {0, -1, 159, 160, -32, -33, math.maxinteger, "
            "math.mininteger, 1 << 40, -(1 << 40), "
            "(1 << 27) - 1, 1 << 27, -(1 << 27), -(1 << 27) - 1} "
            "for i = 1, #w do assert(t[i] == w[i], i) "
            "assert(math.type(t[i]) == 'integer', i) end");
  roundtrip(&p, "return 3.0, 1.5, -0.0, 1/0, -1/0, 0/0, 2^63, 1e-300",
            "local a, b, c, d, e, f, g, h = ... "
            "assert(math.type(a) == 'float' and a == 3) "
            "assert(b == 1.5) assert(c == 0 and 1/c == -1/0) "
            "assert(d == 1/0 and e == -1/0) assert(f ~= f) "
            "assert(g == 2^63 and math.type(g) == 'float') "
            "assert(h == 1e-300)");
  roundtrip(&p,
            "return '', 'a\\0b', string.rep('x', 31), string.rep('y', 32), "
            "'\\0\\0\\0', string.rep('z', 300)",
            "local a, b, c, d, e, f = ... assert(a == '') "
            "assert(b == 'a\\0b' and #b == 3) "
            "assert(c == string.rep('x', 31)) "
            "assert(d == string.rep('y', 32)) assert(e == '\\0\\0\\0') "
            "assert(f == string.rep('z', 300))");
  n = roundtrip(&p, "return string.rep('ab\\0c', 262144)",
                "local s = ... assert(#s == 1 << 20) "
                "assert(s == string.rep('ab\\0c', 262144))");
  ASSERT_LT(n, (1u << 20) + 16);
  roundtrip(&p, "return", "assert(select('#', ...) == 0)");
  teardown(&p);
}

static void test_tables(void) {
  pair p;

  setup(&p);
  roundtrip(&p,
            "return { 1, 2, 3, nil, 5, x = 'a', [1.5] = true, "
            "[true] = 'b', [-7] = -7, nested = { deep = { 42 } } }",
            "local t = ... assert(t[1] == 1 and t[2] == 2 and t[3] == 3) "
            "assert(t[4] == nil and t[5] == 5 and t.x == 'a') "
            "assert(t[1.5] == true and t[true] == 'b' and t[-7] == -7) "
            "assert(t.nested.deep[1] == 42)");
  /* cycles and shared references */
  roundtrip(&p,
            "local t = {} t.self = t local s = { 'shared' } "
            "t.a, t.b = s, s local u = { t, s } return t, u, s",
            "local t, u, s = ... assert(t.self == t) "
            "assert(t.a == t.b and t.a == s and s[1] == 'shared') "
            "assert(u[1] == t and u[2] == s)");
  /* a table as a key, also reached as a value */
  roundtrip(&p, "local k = {} return { [k] = k }",
            "local t = ... local k = next(t) "
            "assert(type(k) == 'table' and t[k] == k)");
  /* metatables: by value, shared, and a metatable holding library values */
  roundtrip(&p,
            "local mt = { __index = function(t, k) return k .. '!' end } "
            "local a, b = setmetatable({}, mt), setmetatable({ 1 }, mt) "
            "local c = setmetatable({}, { __index = string }) "
            "local d = setmetatable({}, mymod) "
            "return a, b, c, d",
            "local a, b, c, d = ... assert(a.x == 'x!' and b[1] == 1) "
            "assert(getmetatable(a) == getmetatable(b)) "
            "assert(c.format == string.format) "
            "assert(getmetatable(d) == package.loaded.mymod)");
  /* a metatable that refers back to its table */
  roundtrip(&p,
            "local t = {} local mt = { owner = t } setmetatable(t, mt) "
            "return t",
            "local t = ... assert(getmetatable(t).owner == t)");
  /* big tables: counts of 2^14 and more move the contents; tags written
  ** inside must still be patched right when referred to later */
  roundtrip(&p,
            "local shared = { 'S' } local big = { s = shared } "
            "for i = 1, 20000 do big[i] = i end "
            "for i = 1, 17000 do big['k' .. i] = i end "
            "return { big, shared }",
            "local o = ... local big = o[1] "
            "assert(#big == 20000 and big[20000] == 20000) "
            "assert(big.k17000 == 17000 and big.s == o[2]) "
            "assert(o[2][1] == 'S')");
  /* globals as a value */
  roundtrip(&p, "return _G, { g = _G }",
            "local g, t = ... assert(g == _G and t.g == _G)");
  teardown(&p);
}

/* ---- functions ---- */

static void test_functions(void) {
  pair p;

  setup(&p);
  dostr(p.B, "x_global = 5");
  /* upvalues of every kind */
  roundtrip(&p,
            "local n, b, i, f, s = nil, true, 7, 2.5, 'str' "
            "local t = { 1, 2 } local function g() return 'g' end "
            "local fmt, floor = string.format, math.floor "
            "return function() "
            "return n, b, i, f, s, t[2], g(), fmt('%d', 3), floor(2.5), "
            "x_global end",
            "local fn = ... local n, b, i, f, s, t2, g, fs, fl, x = fn() "
            "assert(n == nil and b == true) "
            "assert(i == 7 and math.type(i) == 'integer') "
            "assert(f == 2.5 and s == 'str' and t2 == 2 and g == 'g') "
            "assert(fs == '3' and fl == 2 and x == 5)");
  /* recursive local function: its upvalue is itself */
  roundtrip(&p,
            "local function fact(n) if n <= 1 then return 1 end "
            "return n * fact(n - 1) end return fact",
            "local fact = ... assert(fact(10) == 3628800) "
            "assert(debug.getupvalue(fact, 1) == 'fact') "
            "assert(select(2, debug.getupvalue(fact, 1)) == fact)");
  /* mutual recursion */
  roundtrip(&p,
            "local even, odd "
            "function even(n) if n == 0 then return true end "
            "return odd(n - 1) end "
            "function odd(n) if n == 0 then return false end "
            "return even(n - 1) end return even",
            "local even = ... assert(even(10) == true and even(7) == false)");
  /* shared upvalue cells stay shared */
  roundtrip(&p,
            "local n = 0 local function inc() n = n + 1 end "
            "local function get() return n end return inc, get",
            "local inc, get = ... inc() inc() assert(get() == 2)");
  /* a closure sharing a cell with the function that encloses it */
  roundtrip(&p,
            "local f f = function() return f end "
            "local g = function() return f end return g",
            "local g = ... local f = g() "
            "assert(type(f) == 'function' and f() == f)");
  /* nested closure as an upvalue of an upvalue */
  roundtrip(&p,
            "local x = 'deep' local function h() return x end "
            "local function g() return h() .. '!' end "
            "return function() return g() .. '?' end",
            "local f = ... assert(f() == 'deep!?')");
  /* the same closure twice decodes to one closure */
  roundtrip(&p,
            "local k = 1 local f = function() return k end "
            "return f, { f, f }, f",
            "local a, t, c = ... assert(a == t[1] and t[1] == t[2]) "
            "assert(a == c and a() == 1)");
  /* a function with its own _ENV table is copied by value */
  roundtrip(&p, "local _ENV = { y = 3 } return function() return y end",
            "local f = ... assert(f() == 3)");
  /* a function as a table key */
  roundtrip(&p, "local f = function() return 9 end return { [f] = f }",
            "local t = ... local k, v = next(t) "
            "assert(k == v and k() == 9)");
  /* a vararg function with parameters, and one with no upvalues */
  roundtrip(&p,
            "return function(a, ...) return a + select('#', ...) end, "
            "function() return 'none' end",
            "local f, g = ... assert(f(1, 2, 3) == 3 and g() == 'none')");
  teardown(&p);
}

/* Closures with many upvalues: 0, 1, 200, 201, 255. */
static void test_many_upvalues(void) {
  static const int counts[] = { 0, 1, 200, 201, 255 };
  pair p;
  op_buf code;
  char line[160];
  int n, i, k, outer;

  setup(&p);
  for (k = 0; k < 5; k++) {
    n = counts[k];
    op__buf_init(&code);
    /* at most 150 locals per function: an enclosing one holds the rest */
    outer = n > 150 ? n - 150 : 0;
    for (i = 1; i <= outer; i++) {
      snprintf(line, sizeof line, "local v%d = %d\n", i, i);
      op__buf_append(&code, line, strlen(line));
    }
    APPS(&code, "return (function()\n");
    for (i = outer + 1; i <= n; i++) {
      snprintf(line, sizeof line, "local v%d = %d\n", i, i);
      op__buf_append(&code, line, strlen(line));
    }
    APPS(&code, "return function() local s = 0\n");
    for (i = 1; i <= n; i++) {
      snprintf(line, sizeof line, "s = s + v%d\n", i);
      op__buf_append(&code, line, strlen(line));
    }
    APPS(&code, "return s end end)()");
    APPZ(&code);
    snprintf(line, sizeof line,
             "local f = ... assert(f() == %d) "
             "assert(debug.getinfo(f, 'u').nups == %d)",
             n * (n + 1) / 2, n);
    roundtrip(&p, code.p, line);
    roundtrip(&p, code.p, line); /* cached factory */
    op__buf_free(&code);
  }
  teardown(&p);
}

/* Fresh closures: per decode and per closure, new cells. */
static void test_fresh_closures(void) {
  pair p;
  op_buf b;
  char err[256];
  int rc;

  setup(&p);
  /* two closures of one prototype with different upvalues, one graph */
  roundtrip(&p,
            "local function mk(x) return function() return x end end "
            "return mk(1), mk(2)",
            "local a, b = ... assert(a() == 1 and b() == 2) "
            "assert(a ~= b)");
  /* a closure kept by one task must not see the next task's cells */
  op__buf_init(&b);
  encode_code(&p, "local n = 0 return function() n = n + 1 return n end", &b);
  rc = op__decode(p.xb, p.B, b.p, b.len, err, sizeof err);
  ASSERT_EQ(rc, 1);
  lua_setglobal(p.B, "kept");
  dostr(p.B, "assert(kept() == 1 and kept() == 2)");
  rc = op__decode(p.xb, p.B, b.p, b.len, err, sizeof err);
  ASSERT_EQ(rc, 1);
  lua_setglobal(p.B, "other");
  dostr(p.B, "assert(other() == 1 and other() == 2 and other() == 3) "
             "assert(kept() == 3) assert(kept ~= other)");
  op__buf_free(&b);
  teardown(&p);
}

/* Decode the results of make (in A) twice in B; whether the first value
** decoded to the same object both times. */
static int decoded_same(pair *p, const char *make) {
  op_buf b;
  char err[256];
  int same;

  op__buf_init(&b);
  encode_code(p, make, &b);
  ASSERT_GE(op__decode(p->xb, p->B, b.p, b.len, err, sizeof err), 1);
  lua_settop(p->B, 1);
  ASSERT_GE(op__decode(p->xb, p->B, b.p, b.len, err, sizeof err), 1);
  lua_settop(p->B, 2);
  same = lua_rawequal(p->B, 1, 2);
  lua_settop(p->B, 0);
  op__buf_free(&b);
  return same;
}

/* A function that never assigns an upvalue and whose upvalues are plain
** values is decoded to the same instance while those values stay the
** same; anything a task could tell apart gets a fresh closure. */
static void test_reused_instances(void) {
  pair p;

  setup(&p);
  dostr(p.A, "K, S = 7, 'seven'");
  /* plain upvalues: numbers, strings, a C function, a library table */
  ASSERT(decoded_same(&p, "local k, s, f, m = K, S, string.format, math "
                          "return function() return f(s, k, m.pi) end"));
  /* other values, another instance: never a stale one */
  roundtrip(&p, "local k = K return function() return k end",
            "local f = ... assert(f() == 7)");
  dostr(p.A, "K = 100");
  roundtrip(&p, "local k = K return function() return k end",
            "local f = ... assert(f() == 100)");
  dostr(p.A, "K = 7");
  roundtrip(&p, "local k = K return function() return k end",
            "local f = ... assert(f() == 7)");
  /* assigning an upvalue, itself or in a nested function */
  ASSERT(!decoded_same(&p, "local n = 0 "
                           "return function() n = n + 1 return n end"));
  ASSERT(!decoded_same(&p, "local n = 0 return function() "
                           "local function inc() n = n + 1 end "
                           "inc() return n end"));
  /* a table or a Lua function as an upvalue: state of its own */
  ASSERT(!decoded_same(&p, "local t = {} "
                           "return function() return t end"));
  ASSERT(!decoded_same(&p, "local g = function() return 1 end "
                           "return function() return g() end"));
  /* a recursive local function refers to itself */
  ASSERT(!decoded_same(&p, "local function f(n) "
                           "if n > 0 then return f(n - 1) end return 0 "
                           "end return f"));
  teardown(&p);
}

/* A task's bytes: the function's encoding, then its arguments'. The
** decoder keeps the last lone function with its bytes and takes them as a
** whole only when they are followed by another encoding or the end: a
** changed upvalue, or the same bytes followed by anything else, decode in
** full. */
static void test_lone_function(void) {
  pair p;
  op_buf b;
  char err[256];
  size_t flen;
  int i;

  setup(&p);
  dostr(p.A, "K = 5 function mk() local k = K "
             "return function(x) return x + k end end");
  for (i = 0; i < 3; i++) {
    op__buf_init(&b);
    encode_code(&p, "return mk()", &b);
    flen = b.len;
    encode_code(&p, "return 10, nil, true, 1.5, 'abc', -40, 1 << 40", &b);
    ASSERT_EQ(op__decode(p.xb, p.B, b.p, b.len, err, sizeof err), 8);
    lua_pushvalue(p.B, 1);
    lua_pushvalue(p.B, 2);
    lua_call(p.B, 1, 1);
    ASSERT_EQ(lua_tointeger(p.B, -1), i == 2 ? 16 : 15);
    ASSERT(lua_isnil(p.B, 3) && lua_toboolean(p.B, 4));
    ASSERT(lua_tonumber(p.B, 5) == 1.5 && !lua_isinteger(p.B, 5));
    ASSERT_STR_EQ(lua_tostring(p.B, 6), "abc");
    ASSERT_EQ(lua_tointeger(p.B, 7), -40);
    ASSERT_EQ(lua_tointeger(p.B, 8), (lua_Integer)1 << 40);
    lua_settop(p.B, 0);
    /* the function's bytes alone, and followed by a stray byte */
    ASSERT_EQ(op__decode(p.xb, p.B, b.p, flen, err, sizeof err), 1);
    lua_settop(p.B, 0);
    b.p[flen] = 0x0f; /* no such tag */
    ASSERT_EQ(op__decode(p.xb, p.B, b.p, flen + 1, err, sizeof err), OP_EINVAL);
    ASSERT_EQ(lua_gettop(p.B), 0);
    op__buf_free(&b);
    if (i == 1)
      dostr(p.A, "K = 6");
  }
  /* scalars, then the full encoder from the first other value on */
  roundtrip(&p, "return 1, 2, 3, 4, 5, 6, 7, 8, 9, 'ten'",
            "local t = {...} assert(#t == 10 and t[10] == 'ten')");
  roundtrip(&p, "return 1, string.rep('s', 40), {2}, 3.5, 'z', {}",
            "local a, b, c, d, e, f = ... assert(a == 1 and "
            "b == string.rep('s', 40) and c[1] == 2 and d == 3.5 and "
            "e == 'z' and next(f) == nil and select('#', ...) == 6)");
  roundtrip(&p, "local t = {} return 1, t, 2, t",
            "local a, b, c, d = ... assert(a == 1 and c == 2 and b == d)");
  teardown(&p);
}

/* The encoder remembers a lone function's encoding per prototype: a
** changed upvalue, string, or table content must never be served stale. */
static void test_encode_cache(void) {
  pair p;
  int i;

  setup(&p);
  dostr(p.A, "local k, s, t = 1, 'a', { v = 1 } "
             "G = function() return k, s, string.len(s) end "
             "F = function() return k, s, t.v end "
             "SET = function(nk, ns, nv) k, s = nk, ns t.v = nv end");
  for (i = 0; i < 2; i++) {
    roundtrip(&p, "return G",
              "local a, b, c = (...)() "
              "assert(a == 1 and b == 'a' and c == 1)");
    roundtrip(&p, "return F",
              "local a, b, c = (...)() "
              "assert(a == 1 and b == 'a' and c == 1)");
  }
  dostr(p.A, "SET(2, 'b', 2)");
  for (i = 0; i < 2; i++) {
    roundtrip(&p, "return G",
              "local a, b, c = (...)() "
              "assert(a == 2 and b == 'b' and c == 1)");
    roundtrip(&p, "return F",
              "local a, b, c = (...)() "
              "assert(a == 2 and b == 'b' and c == 2)");
  }
  /* only the table's content changes */
  dostr(p.A, "SET(2, 'b', 3)");
  roundtrip(&p, "return F", "local a, b, c = (...)() assert(c == 3)");
  /* a float that compares equal but is another value; a long string */
  dostr(p.A, "SET(0.0, string.rep('x', 50), 3)");
  roundtrip(&p, "return G",
            "local a, b = (...)() "
            "assert(math.type(a) == 'float' and #b == 50)");
  dostr(p.A, "SET(-0.0, string.rep('y', 50), 3)");
  roundtrip(&p, "return G",
            "local a, b = (...)() "
            "assert(1 / a < 0 and b == string.rep('y', 50))");
  /* with other values in one encoding, or as an argument list */
  roundtrip(&p, "return G, 5",
            "local f, n = ... assert(n == 5 and f() == 0.0)");
  teardown(&p);
}

/* Two functions on one line are different prototypes. */
static void test_one_line(void) {
  pair p;

  setup(&p);
  dostr(p.A, "local f, g = function() return 1 end, function() return 2 end "
             "F, G = f, g");
  roundtrip(&p, "return F, G",
            "local f, g = ... assert(f() == 1 and g() == 2)");
  roundtrip(&p, "return G", "local g = ... assert(g() == 2)");
  roundtrip(&p, "return F", "local f = ... assert(f() == 1)");
  teardown(&p);
}

/* Fresh closures per event hit the cache: the store stops growing. */
static void test_cache(void) {
  pair p;
  size_t count = 0, size;
  char check[128];
  int i;

  setup(&p);
  dostr(p.A, "function make(i) local k = 10 "
             "return function(a) return i + k + (a or 0) end end");
  for (i = 0; i < 50; i++) {
    snprintf(check, sizeof check, "local f, a = ... assert(f(a) == %d)",
             i + 10 + 3);
    lua_pushinteger(p.A, i);
    lua_setglobal(p.A, "EV");
    size = roundtrip(&p, "return make(EV), 3", check);
    if (i == 0)
      count = op__protostore_count(p.ps);
    ASSERT_EQ(op__protostore_count(p.ps), count);
    ASSERT_LE(size, 6); /* FUNC, id, 2 upvalues, argument */
  }
  teardown(&p);
}

/* Errors in a copied function name the original file and line. */
static void test_traceback(void) {
  static const char src[] = "local msg = 'boom'\n"
                            "return function()\n"
                            "  error(msg)\n"
                            "end\n";
  pair p;

  setup(&p);
  if (luaL_loadbuffer(p.A, src, sizeof src - 1, "@handler.lua") != 0 ||
      lua_pcall(p.A, 0, 1, 0) != 0)
    TEST_FAIL_("%s", lua_tostring(p.A, -1));
  lua_setglobal(p.A, "H");
  roundtrip(&p, "return H",
            "local h = ... local ok, e = pcall(h) "
            "assert(not ok and e == 'handler.lua:3: boom', e) "
            "local i = debug.getinfo(h, 'S') "
            "assert(i.source == '@handler.lua' and i.linedefined == 2)");
  teardown(&p);
}

/* ---- names ---- */

static void test_named(void) {
  pair p;
  int i;

  setup(&p);
  roundtrip(&p,
            "local fmt = string.format "
            "return function() return fmt end, string, math.floor, io, "
            "os.time, print, io.stdout, table.concat",
            "local f, s, fl, io_, t, pr, out, cc = ... "
            "assert(f() == string.format and s == string) "
            "assert(fl == math.floor and io_ == io and t == os.time) "
            "assert(pr == print and out == io.stdout) "
            "assert(cc == table.concat)");
  /* a module known when the VM's names were built */
  roundtrip(&p,
            "local m, f = mymod, mymod.f "
            "return function() return m, f() end, mymod.sub.g",
            "local fn, g = ... local m, r = fn() "
            "assert(m == package.loaded.mymod and m.name == 'B') "
            "assert(r == 'B' and g() == 'Bg')");
  /* a module loaded later: the encoder rescans package.loaded */
  dostr(p.A, "package.loaded.late = { v = 'A', f = function() end }");
  dostr(p.B, "package.loaded.late = { v = 'B', f = function() end }");
  roundtrip(&p, "local l = require 'late' return function() return l end",
            "local f = ... assert(f() == package.loaded.late) "
            "assert(f().v == 'B')");
  roundtrip(&p, "return package.loaded.late.f",
            "local f = ... assert(f == package.loaded.late.f)");
  /* a script replaced package.loaded's metatable (our hook): noticed
  ** within 64 misses, then every miss rescans */
  dostr(p.A, "setmetatable(package.loaded, {})");
  for (i = 0; i < 70; i++)
    roundtrip(&p, "return { 1 }", "local t = ... assert(t[1] == 1)");
  dostr(p.A, "package.loaded.later = { v = 'A' }");
  dostr(p.B, "package.loaded.later = { v = 'B' }");
  roundtrip(&p, "return package.loaded.later",
            "local t = ... assert(t.v == 'B')");
  /* the destination lacks it: it is required there */
  dostr(p.A, "package.loaded.lazy = { v = 1 }");
  dostr(p.B, "package.preload.lazy = function() return { v = 42 } end");
  roundtrip(&p, "return require 'lazy'",
            "local l = ... assert(l.v == 42 and l == package.loaded.lazy)");
  teardown(&p);
}

static void test_missing_name(void) {
  pair p;
  op_buf b;
  char err[256];
  int rc;

  setup(&p);
  dostr(p.A, "package.loaded.onlyA = { f = function() end }");
  op__buf_init(&b);
  encode_code(&p, "return 1, require('onlyA')", &b);
  rc = op__decode(p.xb, p.B, b.p, b.len, err, sizeof err);
  ASSERT_EQ(rc, OP_ECOPY);
  ASSERT_STR_EQ(err, "cannot copy: no value named 'onlyA' in this VM");
  op__buf_free(&b);
  teardown(&p);
}

/* A C function crosses only by name: its pointer would run against the
** other VM's state. One reached any other way is refused with its path
** and a hint, the one given to op__xfer_hint if any (engine methods). */
static void test_cfunction(void) {
  pair p;

  setup(&p);
  lua_pushcfunction(p.A, cf_add);
  lua_setglobal(p.A, "cadd"); /* after op__xfer_new: not a library name */
  refused(&p, "local add = cadd return function(a) return add(a, 1) end",
          "function", 0,
          "cannot copy C function (upvalue 'add' of function): only "
          "library and module functions cross, by name; call it on this "
          "side, or require its module in the worker");
  refused(&p, "return cadd", "argument", 1,
          "cannot copy C function (argument 1): only library and module "
          "functions cross, by name; call it on this side, or require its "
          "module in the worker");
  /* the engine's methods: a table of C functions given a hint */
  dostr(p.A, "engine = { count = cadd }");
  lua_getglobal(p.A, "engine");
  op__xfer_hint(p.A, -1, "engine methods run on the main thread");
  lua_pop(p.A, 1);
  refused(&p,
          "local engine = engine "
          "return function() return engine:count('x') end",
          "function", 0,
          "cannot copy C function (upvalue 'engine' of function field "
          "'count'): engine methods run on the main thread");
  refused(&p, "local count = engine.count return 1, count", "argument", 1,
          "cannot copy C function (argument 2): engine methods run on the "
          "main thread");
  /* named C functions still cross, to the destination's own copy */
  roundtrip(&p, "local f = string.format return function() return f end",
            "local f = ... assert(f() == string.format)");
  teardown(&p);
}

/* ---- refusals ---- */

static int cf_ud(lua_State *L) {
  lua_newuserdatauv(L, 8, 0);
  return 1;
}

static void test_refusals(void) {
  pair p;

  setup(&p);
  lua_pushcfunction(p.A, cf_ud);
  lua_setglobal(p.A, "newud");
  refused(&p, "return 1, newud()", "argument", 1,
          "cannot copy userdata (argument 2)");
  refused(&p, "return 1, { x = newud() }", "argument", 1,
          "cannot copy userdata (argument 2 field 'x')");
  refused(&p,
          "local co = coroutine.create(print) "
          "return { a = { b = co } }",
          "argument", 1, "cannot copy thread (argument 1 field 'a' field 'b')");
  refused(&p,
          "local co = coroutine.create(print) "
          "return function() return co end",
          "argument", 1,
          "cannot copy thread (upvalue 'co' of function argument 1)");
  refused(&p,
          "local f = coroutine.wrap(print) "
          "return function() return f end",
          NULL, 0,
          "cannot copy C function (upvalue 'f'): only library and module "
          "functions cross, by name; call it on this side, or require its "
          "module in the worker");
  refused(&p, "return { a = { 1, 2, newud() } }", "argument", 1,
          "cannot copy userdata (argument 1 field 'a' field 3)");
  refused(&p, "return { [newud()] = 1 }", "argument", 1,
          "cannot copy userdata (key in argument 1)");
  refused(&p, "return { t = setmetatable({}, { __index = newud() }) }",
          "argument", 1,
          "cannot copy userdata (metatable of argument 1 field 't' field "
          "'__index')");
  refused(&p,
          "local u = newud() local function g() return u end "
          "return 5, function() return g end",
          "argument", 2,
          "cannot copy userdata (upvalue 'u' of function upvalue 'g' of "
          "function argument 3)");
  refused(&p, "return newud()", "value", 0, "cannot copy userdata (value)");
  refused(&p, "return coroutine.running()", "", 0, "cannot copy thread");
  teardown(&p);
}

static void test_light_userdata(void) {
  pair p;
  op_buf b;
  char err[256];

  setup(&p);
  op__buf_init(&b);
  lua_pushlightuserdata(p.A, &b);
  ASSERT_EQ(op__encode(p.xa, p.A, -1, 1, &b, "argument", 1, err, sizeof err),
            OP_ECOPY);
  ASSERT_STR_EQ(err, "cannot copy userdata (argument 1)");
  lua_pop(p.A, 1);
  op__buf_free(&b);
  teardown(&p);
}

/* ---- depth ---- */

static void test_depth(void) {
  pair p;
  op_buf b;
  char err[256];
  unsigned char bad[1 + 3 * 300];
  int i, rc;

  setup(&p);
  roundtrip(
      &p,
      "local t = {} local c = t for i = 1, 150 do c.x = {} c = c.x end "
      "return t",
      "local t = ... for i = 1, 150 do t = t.x end assert(next(t) == nil)");
  refused(&p,
          "local t = {} local c = t for i = 1, 250 do c.x = {} c = c.x end "
          "return 1, t",
          "argument", 1, "cannot copy: nesting too deep (argument 2)");
  refused(&p,
          "local f = function() return 0 end "
          "for i = 1, 250 do local g = f f = function() return g() end end "
          "return f",
          "argument", 1, "cannot copy: nesting too deep (argument 1)");
  /* a hand-made buffer nested 300 deep */
  bad[0] = 0x0b; /* header */
  for (i = 0; i < 300; i++) {
    bad[1 + 3 * i] = 0x10;     /* TABLE */
    bad[1 + 3 * i + 1] = 0x01; /* one array value */
    bad[1 + 3 * i + 2] = 0x00; /* no hash pairs */
  }
  op__buf_init(&b);
  rc = op__decode(p.xb, p.B, (char *)bad, sizeof bad, err, sizeof err);
  ASSERT_EQ(rc, OP_EINVAL);
  ASSERT_STR_HAS(err, "nesting too deep");
  op__buf_free(&b);
  teardown(&p);
}

/* ---- corrupt input ---- */

/* Decode p[0..len) into B and check the stack is balanced. */
static int try_decode(pair *p, const char *s, size_t len) {
  char err[256];
  int top = lua_gettop(p->B), rc;

  err[0] = 1;
  rc = op__decode(p->xb, p->B, s, len, err, sizeof err);
  if (rc < 0) {
    ASSERT_EQ(lua_gettop(p->B), top);
    ASSERT(err[0] != 0 && err[0] != 1);
  } else {
    ASSERT_EQ(lua_gettop(p->B), top + rc);
    lua_settop(p->B, top);
  }
  return rc;
}

static void test_corrupt(void) {
  static const char *makes[] = {
    "return { 1, 2.5, 'str', { x = true, [7] = false }, 1 << 50, "
    "string.rep('q', 40) }",
    "local t = { 1 } t.self = t local s = {} t.a, t.b = s, s "
    "setmetatable(t, { __index = s }) return t",
    "local n = 0 local function inc() n = n + 1 end "
    "local function get() return n end return { inc, get }",
    "local function fact(n) if n < 2 then return 1 end "
    "return n * fact(n - 1) end return fact",
    "local fmt, m = string.format, mymod "
    "return function(a) return fmt('%d', a), m, _G end",
    "local f f = function() return f end return function() return f end",
  };
  pair p;
  op_buf b, c;
  size_t k, len, i;
  unsigned bit;
  uint32_t r = 12345;

  setup(&p);
  for (k = 0; k < sizeof makes / sizeof makes[0]; k++) {
    op__buf_init(&b);
    encode_code(&p, makes[k], &b);
    len = b.len;
    ASSERT_EQ(try_decode(&p, b.p, len), 1);
    /* the header alone is no value; every longer proper prefix of one
    ** value is invalid */
    ASSERT_EQ(try_decode(&p, b.p, 1), 0);
    for (i = 2; i < len; i++)
      ASSERT_LT(try_decode(&p, b.p, i), 0);
    /* flip each bit of each byte: any result, never a crash */
    op__buf_init(&c);
    op__buf_append(&c, b.p, len);
    for (i = 0; i < len; i++) {
      for (bit = 0; bit < 8; bit++) {
        c.p[i] = (char)(c.p[i] ^ (1u << bit));
        try_decode(&p, c.p, len);
        c.p[i] = b.p[i];
      }
    }
    op__buf_free(&c);
    op__buf_free(&b);
  }
  /* random bytes */
  op__buf_init(&c);
  op__buf_reserve(&c, 64);
  for (k = 0; k < 20000; k++) {
    len = 1 + k % 48;
    for (i = 0; i < len; i++) {
      r = r * 1103515245u + 12345u;
      c.p[i] = (char)(r >> 16);
    }
    try_decode(&p, c.p, len);
  }
  op__buf_free(&c);
  /* specific bad inputs (0x0b: header) */
  ASSERT_EQ(try_decode(&p, "", 0), 0);
  ASSERT_EQ(try_decode(&p, "\x01", 1), OP_EINVAL);         /* no header */
  ASSERT_EQ(try_decode(&p, "\x0b\x0d", 2), OP_EINVAL);     /* bad tag */
  ASSERT_EQ(try_decode(&p, "\x0c\x09\x00", 3), OP_EINVAL); /* bad ref */
  ASSERT_EQ(try_decode(&p, "\x0b\x09\x00", 3), OP_EINVAL); /* no refs */
  ASSERT_EQ(try_decode(&p, "\x0b\x11\x80\x00\x80\x00", 6),
            OP_EINVAL); /* REFD flag without the header's */
  ASSERT_EQ(try_decode(&p, "\x0b\x14\x7f", 3), OP_EINVAL);     /* bad proto */
  ASSERT_EQ(try_decode(&p, "\x0b\x08\x7f", 3), OP_EINVAL);     /* bad cfunc */
  ASSERT_EQ(try_decode(&p, "\x0b\x0a\x00\x00", 4), OP_EINVAL); /* join */
  ASSERT_EQ(try_decode(&p, "\x0b\x10\x00\x01\x00\x01", 6),
            OP_EINVAL); /* nil key */
  ASSERT_EQ(
      try_decode(&p, "\x0b\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 12),
      OP_EINVAL);                                          /* varint overflow */
  ASSERT_EQ(try_decode(&p, "\x0b\x03\x80", 3), OP_EINVAL); /* truncated */
  ASSERT_EQ(try_decode(&p, "\x0b\x03\xff\xff\xff\xff", 6),
            OP_EINVAL); /* truncated, past the short form */
  teardown(&p);
}

/* op__decode_plain takes exactly the lists of nil, booleans and numbers,
** gives the values op__decode gives, and leaves anything else (and any
** malformed byte) to it with the stack as it was. */
static void test_decode_plain(void) {
  static const char *const plain[] = {
    "return",
    "return nil, true, false",
    "return 0, -1, 159, 160, -32, -33, math.maxinteger, math.mininteger, "
    "1 << 40, (1 << 27) - 1, 1 << 27, -(1 << 27) - 1",
    "return 1.5, -0.0, 1/0, 2^63, nil, 7",
  };
  static const char *const other[] = {
    "return 1, 'x'",
    "return {}",
    "return 1, 2, string.rep('y', 40)",
    "return print",
  };
  pair p;
  op_buf b;
  char err[256];
  size_t i;
  int top, n, j;

  setup(&p);
  top = lua_gettop(p.B);
  for (i = 0; i < sizeof plain / sizeof plain[0]; i++) {
    op__buf_init(&b);
    encode_code(&p, plain[i], &b);
    n = op__decode_plain(p.B, b.p, b.len);
    ASSERT(n >= 0);
    ASSERT_EQ(op__decode(p.xb, p.B, b.p, b.len, err, sizeof err), n);
    for (j = 1; j <= n; j++) { /* the same values, the same types */
      ASSERT(lua_rawequal(p.B, top + j, top + n + j) ||
             (lua_type(p.B, top + j) == LUA_TNUMBER &&
              lua_tonumber(p.B, top + j) != lua_tonumber(p.B, top + j)));
      ASSERT_EQ(lua_isinteger(p.B, top + j), lua_isinteger(p.B, top + n + j));
    }
    lua_settop(p.B, top);
    op__buf_free(&b);
  }
  for (i = 0; i < sizeof other / sizeof other[0]; i++) {
    op__buf_init(&b);
    encode_code(&p, other[i], &b);
    ASSERT_EQ(op__decode_plain(p.B, b.p, b.len), -1);
    ASSERT_EQ(lua_gettop(p.B), top);
    op__buf_free(&b);
  }
  /* malformed: no header, a truncated varint or float, an overflow */
  ASSERT_EQ(op__decode_plain(p.B, "", 0), -1);
  ASSERT_EQ(op__decode_plain(p.B, "\x02", 1), -1);
  ASSERT_EQ(op__decode_plain(p.B, "\x0b\x03\x80", 3), -1);
  ASSERT_EQ(op__decode_plain(p.B, "\x0b\x04\x00\x00", 4), -1);
  ASSERT_EQ(op__decode_plain(
                p.B, "\x0b\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 12),
            -1);
  ASSERT_EQ(lua_gettop(p.B), top);
  teardown(&p);
}

/* Two encodings appended to one buffer decode as one list; each has its
** own back references. */
static void test_appended(void) {
  pair p;
  op_buf b;
  char err[256];
  int rc;

  setup(&p);
  op__buf_init(&b);
  encode_code(&p, "return 1, 2", &b);
  encode_code(&p, "local t = {} t.t = t return t, t", &b);
  encode_code(&p, "local u = { 'u' } return { u, u }", &b);
  encode_code(&p, "return 'last'", &b);
  rc = op__decode(p.xb, p.B, b.p, b.len, err, sizeof err);
  ASSERT_EQ(rc, 6);
  lua_setglobal(p.B, "F");
  lua_setglobal(p.B, "E");
  lua_setglobal(p.B, "D");
  lua_setglobal(p.B, "C");
  lua_setglobal(p.B, "B_");
  lua_setglobal(p.B, "A_");
  dostr(p.B, "assert(A_ == 1 and B_ == 2 and C.t == C and D == C) "
             "assert(E[1] == E[2] and E[1][1] == 'u' and F == 'last')");
  op__buf_free(&b);
  teardown(&p);
}

/* ---- both directions, repeated ---- */

static void test_reverse(void) {
  pair p, q;

  setup(&p);
  /* swap the roles: B encodes, A decodes */
  q.ps = p.ps;
  q.A = p.B;
  q.B = p.A;
  q.xa = p.xb;
  q.xb = p.xa;
  roundtrip(&q, "local t = { 1 } return function() return t[1], mymod.name end",
            "local f = ... local a, b = f() assert(a == 1 and b == 'A')");
  roundtrip(&p, "return function() return 'there' end",
            "local f = ... assert(f() == 'there')");
  teardown(&p);
}

/* The function tests again with the LClosure/UpVal mirrors off (debug
** builds read OFFPATH_XFER_NO_MIRROR): prototypes keyed by their dump. */
static void test_fallback(void) {
  setenv("OFFPATH_XFER_NO_MIRROR", "1", 1);
  test_functions();
  test_many_upvalues();
  test_fresh_closures();
  test_reused_instances();
  test_encode_cache();
  test_one_line();
  test_cache();
  test_corrupt();
  unsetenv("OFFPATH_XFER_NO_MIRROR");
}

/* An encode entered again from a finalizer while an encode runs (the GC
** runs finalizers when the encoder allocates). Must not disturb either. */
static op_xfer *reenter_x;
static int reenter_n;

static int cf_reenter(lua_State *L) {
  op_buf b;
  char err[64];

  op__buf_init(&b);
  lua_newtable(L);
  lua_pushinteger(L, 1);
  lua_setfield(L, -2, "x");
  ASSERT_OK(
      op__encode(reenter_x, L, -1, 1, &b, "argument", 1, err, sizeof err));
  lua_pop(L, 1);
  op__buf_free(&b);
  reenter_n++;
  return 0;
}

static void test_reentry(void) {
  pair p;
  char check[96];
  int i;

  setup(&p);
  reenter_x = p.xa;
  lua_pushcfunction(p.A, cf_reenter);
  lua_setglobal(p.A, "reenter");
  dostr(p.A, "collectgarbage('incremental', 0, 100, 0)");
  for (i = 0; i < 100; i++) {
    lua_pushinteger(p.A, i);
    lua_setglobal(p.A, "I");
    /* a new module makes the next table miss rescan (which allocates) */
    dostr(p.A, "for i = 1, 20 do "
               "setmetatable({}, { __gc = function() reenter() end }) end "
               "local m = {} for i = 1, 300 do m['f' .. i] = print end "
               "package.loaded['m' .. I] = m");
    snprintf(check, sizeof check,
             "local f, t = ... assert(f() == %d and t[1] == f)", i);
    /* a new prototype each time: anchoring it allocates */
    roundtrip(&p,
              "local k = I local f = load('return ' .. k) "
              "return f, { f, { k } }",
              check);
  }
  dostr(p.A, "collectgarbage()");
  printf("finalizer encodes: %d\n", reenter_n);
  teardown(&p);
}

/* ---- the store shared by threads ---- */

#define NTHREADS 4
#define NFUNCS   150

static op_protostore *tstore;
static op_buf tbufs[NTHREADS][NFUNCS];
static atomic_int tpub[NTHREADS]; /* tbufs[t][0..tpub[t]) are ready */

/* Decode the function in b on L and check it returns want. */
static void call_check(op_xfer *x, lua_State *L, const op_buf *b,
                       lua_Integer want) {
  char err[256];

  if (op__decode(x, L, b->p, b->len, err, sizeof err) != 1)
    TEST_FAIL_("decode: %s", err);
  lua_call(L, 0, 1);
  ASSERT_EQ(lua_tointeger(L, -1), want);
  lua_pop(L, 1);
}

/* Each thread makes new prototypes (the store grows from all threads at
** once) and decodes its own and the other threads' functions, each in its
** own VMs. */
static void thread_main(void *arg) {
  int t = (int)(intptr_t)arg, j, u, k, n;
  lua_State *A = luaL_newstate(), *B = luaL_newstate();
  op_xfer *xa, *xb;
  char code[96], err[256];

  luaL_openlibs(A);
  luaL_openlibs(B);
  xa = op__xfer_new(A, tstore);
  xb = op__xfer_new(B, tstore);
  ASSERT(xa != NULL && xb != NULL);
  for (j = 0; j < NFUNCS; j++) {
    snprintf(code, sizeof code, "local k = %d return function() return k end",
             t * 1000 + j);
    dostr(A, code); /* a new prototype every time */
    op__buf_init(&tbufs[t][j]);
    if (op__encode(xa, A, -1, 1, &tbufs[t][j], "argument", 1, err,
                   sizeof err) != 0)
      TEST_FAIL_("encode: %s", err);
    lua_pop(A, 1);
    atomic_store_explicit(&tpub[t], j + 1, memory_order_release);
    call_check(xb, B, &tbufs[t][j], t * 1000 + j);
    for (u = 0; u < NTHREADS; u++) {
      n = atomic_load_explicit(&tpub[u], memory_order_acquire);
      for (k = n > 3 ? n - 3 : 0; k < n; k++)
        call_check(xb, B, &tbufs[u][k], u * 1000 + k);
    }
  }
  op__xfer_free(xa);
  op__xfer_free(xb);
  lua_close(A);
  lua_close(B);
}

static void test_threads(void) {
  uv_thread_t th[NTHREADS];
  int t, j;

  tstore = op__protostore_new();
  for (t = 0; t < NTHREADS; t++)
    atomic_init(&tpub[t], 0);
  for (t = 0; t < NTHREADS; t++)
    ASSERT_OK(uv_thread_create(&th[t], thread_main, (void *)(intptr_t)t));
  for (t = 0; t < NTHREADS; t++)
    ASSERT_OK(uv_thread_join(&th[t]));
  ASSERT_EQ(op__protostore_count(tstore), NTHREADS * NFUNCS);
  for (t = 0; t < NTHREADS; t++) {
    for (j = 0; j < NFUNCS; j++)
      op__buf_free(&tbufs[t][j]);
  }
  op__protostore_free(tstore);
}

/* ---- a micro-benchmark (printed, not asserted) ---- */

static double now_ns(void) {
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Time encode and decode of a fresh closure (made by the global make in
** A) plus one integer argument, in batches of BATCH so the clock is read
** once per batch. */
#define BATCH 1000
static void bench_one(pair *p, const char *what, int rounds) {
  static op_buf b[BATCH];
  char err[256];
  double t0, t1, t2, tenc = 0, tdec = 0;
  int i, r, top = lua_gettop(p->A);
  const char *only = getenv("OP_BENCH_ONLY");

  if (only != NULL && strcmp(only, "1") != 0 && strstr(what, only) == NULL)
    return;

  for (i = 0; i < BATCH; i++)
    op__buf_init(&b[i]);
  lua_createtable(p->A, BATCH, 0);
  for (r = 0; r < rounds; r++) {
    for (i = 0; i < BATCH; i++) {
      lua_getglobal(p->A, "make");
      lua_pushinteger(p->A, i);
      lua_call(p->A, 1, 1); /* a fresh closure per "event" */
      lua_rawseti(p->A, top + 1, i + 1);
      b[i].len = 0;
    }
    t0 = now_ns();
    for (i = 0; i < BATCH; i++) {
      lua_rawgeti(p->A, top + 1, i + 1);
      lua_pushinteger(p->A, 3);
      if (op__encode(p->xa, p->A, top + 2, 2, &b[i], "argument", 1, err,
                     sizeof err) != 0)
        TEST_FAIL_("%s", err);
      lua_settop(p->A, top + 1);
    }
    t1 = now_ns();
    for (i = 0; i < BATCH; i++) {
      if (op__decode(p->xb, p->B, b[i].p, b[i].len, err, sizeof err) != 2)
        TEST_FAIL_("%s", err);
      lua_settop(p->B, 0);
    }
    t2 = now_ns();
    if (r > 0) { /* the first round fills the caches */
      tenc += t1 - t0;
      tdec += t2 - t1;
    }
  }
  lua_settop(p->A, top);
  printf("bench %-28s encode %6.1f ns  decode %6.1f ns  (%zu bytes)\n", what,
         tenc / ((double)(rounds - 1) * BATCH),
         tdec / ((double)(rounds - 1) * BATCH), b[BATCH - 1].len);
  for (i = 0; i < BATCH; i++)
    op__buf_free(&b[i]);
}

static void bench(void) {
  pair p;
  op_buf code;
  char line[96];
  int i, rounds = 200;

  if (getenv("OP_BENCH_ROUNDS") != NULL)
    rounds = (int)strtol(getenv("OP_BENCH_ROUNDS"), NULL, 10);
  setup(&p);
  dostr(p.A, "function make(i) return function(a) return i + a end end");
  bench_one(&p, "tiny closure, 1 upvalue", rounds);
  dostr(p.A, "function make(i) local k = 2 "
             "return function(a) return i + k + a end end");
  bench_one(&p, "tiny closure, 2 upvalues", rounds);
  op__buf_init(&code);
  APPS(&code, "function make(i) local k = 2 "
              "return function(a) local s = i + k + a\n");
  for (i = 0; i < 200; i++) {
    snprintf(line, sizeof line, "s = s + %d * (s %% 7) - (a or 0)\n", i);
    op__buf_append(&code, line, strlen(line));
  }
  APPS(&code, "return s end end");
  APPZ(&code);
  dostr(p.A, code.p);
  op__buf_free(&code);
  bench_one(&p, "200-line closure, 2 upvalues", rounds);
  dostr(p.A, "function make(i) return { i, x = 'a' } end");
  bench_one(&p, "table {i, x = 'a'}", rounds);
  teardown(&p);
}

int main(void) {
  if (getenv("OP_BENCH_ONLY") != NULL) { /* for profiling */
    bench();
    return 0;
  }
  test_scalars();
  test_decode_plain();
  test_tables();
  test_functions();
  test_many_upvalues();
  test_fresh_closures();
  test_reused_instances();
  test_lone_function();
  test_one_line();
  test_cache();
  test_traceback();
  test_named();
  test_missing_name();
  test_cfunction();
  test_refusals();
  test_light_userdata();
  test_depth();
  test_corrupt();
  test_appended();
  test_reverse();
  test_threads();
  test_fallback();
  test_reentry();
  bench();
  printf("ok\n");
  return 0;
}
