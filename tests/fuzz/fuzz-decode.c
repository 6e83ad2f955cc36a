/* SPDX-License-Identifier: MIT */
/*
** fuzz-decode.c - libFuzzer target: op__decode given arbitrary bytes must
** return values or an error, never crash, leak or unbalance the stack.
**
** Built by cmake/fuzz.cmake: `make fuzz` runs it under libFuzzer; the
** ctest fuzz/decode replays tests/fuzz/corpus/decode. With OP_FUZZ_SEEDS
** set to a directory, the encodings of the sample values below are written
** there as seed inputs (they name store ids, so they depend on the samples).
*/
#include <stdio.h>
#include <string.h>

#include "internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* The store and the VM that filled it live until exit. */
static op_protostore *store;
static lua_State *src;
static op_xfer *src_x;

/* Values encoded once at start, so the store holds real prototypes and C
** functions for the inputs to name by id. */
static const char *const samples[] = {
  "return nil, true, false, 0, -1, 1 << 40, 2.5, 0/0, 'str', "
  "string.rep('x', 40)",
  "local t = { 1, 2, x = { y = 'z' } } t.self = t "
  "return t, setmetatable({}, { __index = t })",
  "return function() return 1 end, function(a, b) return a + b end",
  "local k, s = 1, 'two' return function() return k, s end",
  "local function fact(n) if n < 2 then return 1 end "
  "return n * fact(n - 1) end return fact",
  "local n = 0 local function inc() n = n + 1 end "
  "local function get() return n end return inc, get",
  "local f f = function() return f end return function() return f end",
  "local fmt, t = string.format, table return function() return fmt, t, "
  "print, _G end",
  "local a, b, c, d = 1, 2, 3, 4 return function() return a + b + c + d end",
};

static void write_seed(const char *dir, int i, const op_buf *b) {
  char path[512];
  FILE *f;

  snprintf(path, sizeof path, "%s/seed-%02d", dir, i);
  if ((f = fopen(path, "wb")) != NULL) {
    fwrite(b->p, 1, b->len, f);
    fclose(f);
  }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  lua_State *A;
  op_xfer *xa;
  op_buf b;
  char err[256];
  const char *seeds = getenv("OP_FUZZ_SEEDS");
  int i, top;

  (void)argc;
  (void)argv;
  store = op__protostore_new();
  A = luaL_newstate();
  luaL_openlibs(A);
  xa = op__xfer_new(A, store);
  if (store == NULL || xa == NULL)
    abort();
  lua_pushcfunction(A, luaopen_base); /* a C function outside the names */
  lua_setglobal(A, "cfn");
  for (i = 0; i < (int)(sizeof samples / sizeof samples[0]); i++) {
    top = lua_gettop(A);
    if (luaL_dostring(A, samples[i]) != 0)
      abort();
    op__buf_init(&b);
    if (op__encode(xa, A, top + 1, lua_gettop(A) - top, &b, "value", 1, err,
                   sizeof err) != 0)
      abort();
    if (seeds != NULL)
      write_seed(seeds, i, &b);
    op__buf_free(&b);
    lua_settop(A, top);
  }
  lua_getglobal(A, "cfn");
  op__buf_init(&b);
  if (op__encode(xa, A, -1, 1, &b, "value", 1, err, sizeof err) != OP_ECOPY)
    abort(); /* C functions cross by name only */
  op__buf_free(&b);
  lua_pop(A, 1);
  src = A; /* stays open: the store's C functions stay meaningful */
  src_x = xa;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = luaL_newstate();
  op_xfer *x;
  char err[256];
  int rc, n;

  luaL_openlibs(L);
  /* no modules from disk: a name in the input must not load code */
  luaL_dostring(L, "package.path = '' package.cpath = ''");
  lua_settop(L, 0);
  x = op__xfer_new(L, store);
  if (x == NULL)
    abort();
  rc = op__decode(x, L, (const char *)data, size, err, sizeof err);
  if (rc < 0) {
    if (lua_gettop(L) != 0 || err[0] == 0)
      abort();
  } else if (lua_gettop(L) != rc) {
    abort();
  }
  lua_settop(L, 0);
  /* The plain decoder takes a subset: what it takes, the full one takes
  ** too, as the same number of values; what it refuses leaves the stack
  ** alone. */
  n = op__decode_plain(L, (const char *)data, size);
  if (n >= 0 ? rc != n || lua_gettop(L) != n : lua_gettop(L) != 0)
    abort();
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT, 0); /* walks every object decoded */
  op__xfer_free(x);
  lua_close(L);
  return 0;
}
