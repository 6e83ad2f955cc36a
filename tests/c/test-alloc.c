/* SPDX-License-Identifier: MIT */
/*
** test-alloc.c - the allocator of offpath's Lua VMs (alloc.c): small blocks
** a VM frees are kept for its next allocations of their class, only blocks
** known to be of their class's size, within a bound, out of the byte
** count, poisoned under ASan while kept, and all given back by
** op__vm_trim and op__vm_close. Under ASan nothing is kept (its
** quarantine must see every free): that is checked there, the rest under
** TSan and in release builds.
** LABELS: core tsan
*/
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "test.h"

#if defined(__SANITIZE_ADDRESS__)
#define ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ASAN 1
#endif
#endif

static op_vmem mem;
static lua_Alloc alloc_fn;
static void *alloc_ud;

static lua_State *open_vm(void) {
  lua_State *L;

  memset(&mem, 0, sizeof mem);
  L = op__vm_new(&mem);
  ASSERT(L != NULL);
  alloc_fn = lua_getallocf(L, &alloc_ud);
  return L;
}

static void *vm_malloc(size_t n) {
  void *p = alloc_fn(alloc_ud, NULL, LUA_TTABLE, n);

  ASSERT(p != NULL);
  memset(p, 0xab, n);
  return p;
}

static void vm_free(void *p, size_t n) {
  ASSERT(alloc_fn(alloc_ud, p, n, 0) == NULL);
}

#ifndef ASAN
/* A freed block serves the next request of its class, and only of it;
** the byte count drops at the free and rises at the reuse. */
static void test_reuse(void) {
  lua_State *L = open_vm();
  size_t used0 = op__vm_used(&mem);
  void *p, *q, *r;

  p = vm_malloc(100); /* the class of 89..104 bytes */
  ASSERT_EQ(op__vm_used(&mem), used0 + 100);
  vm_free(p, 100);
  ASSERT_EQ(op__vm_used(&mem), used0);
  ASSERT_EQ(mem.nfree, 104);
  r = vm_malloc(105); /* the next class: not p */
  ASSERT(r != p);
  q = vm_malloc(104); /* the whole class size is usable */
  ASSERT(q == p);
  ASSERT_EQ(mem.nfree, 0);
  vm_free(q, 104);
  vm_free(r, 105);
  ASSERT_EQ(mem.nfree, 104 + 120);
  op__vm_trim(&mem);
  ASSERT_EQ(mem.nfree, 0);
  ASSERT_EQ(op__vm_used(&mem), used0);
  op__vm_close(L, &mem);
}

/* Free p, which Lua had at n bytes, through the VM: it is kept if and only
** if malloc says it is of its class's size (16 k + 24 bytes, and less than
** 16 more). */
static void give_back(void *p, size_t n) {
  size_t cs = n <= 24 ? 24 : ((n - 9) >> 4) * 16 + 24;
  size_t have = malloc_usable_size(p), before = mem.nfree;

  vm_free(p, n);
  if (have >= cs && have < cs + 16)
    ASSERT_EQ(mem.nfree, before + cs);
  else
    ASSERT_EQ(mem.nfree, before);
}

/* A block that may be smaller than its class (allocated elsewhere at its
** exact size, as luaL_newstate's are: under ASan, malloc's usable size is
** the size asked), a block much bigger (a big block realloc shrank keeps
** its page), and a block over 520 bytes go to free(). */
static void test_not_kept(void) {
  lua_State *L = open_vm();
  void *p;
  size_t n;

  for (n = 1; n <= 520; n++) {
    ASSERT((p = malloc(n)) != NULL);
    give_back(p, n);
  }
  op__vm_trim(&mem);
  p = vm_malloc(300);
  ASSERT((p = alloc_fn(alloc_ud, p, 300, 300000)) != NULL);
  ASSERT((p = alloc_fn(alloc_ud, p, 300000, 16)) != NULL);
  give_back(p, 16);
  vm_free(vm_malloc(521), 521);
  op__vm_trim(&mem);
  p = vm_malloc(300);
  ASSERT((p = alloc_fn(alloc_ud, p, 300, 40)) != NULL);
  memset(p, 0xcd, 40);
  give_back(p, 40);
  ASSERT_EQ(mem.nfree, 40);
  op__vm_close(L, &mem);
}

/* What is kept is bounded by what the VM holds at each free (so about
** half the peak when everything is freed), by 64 KB at least and 2 MB at
** most; the rest goes to free(). Beyond 64 KB, a trim is due. */
static void free_all(size_t n, size_t *peak) {
  void **v = malloc(n * sizeof *v);
  size_t i;

  ASSERT(v != NULL);
  for (i = 0; i < n; i++)
    v[i] = vm_malloc(64);
  *peak = op__vm_used(&mem);
  for (i = 0; i < n; i++)
    vm_free(v[i], 64);
  free(v);
}

static void test_bound(void) {
  lua_State *L = open_vm();
  size_t used0 = op__vm_used(&mem), peak;

  free_all(20000, &peak); /* 1.4 MB */
  ASSERT_EQ(op__vm_used(&mem), used0);
  ASSERT_GE(mem.nfree, (size_t)64 << 10);
  /* Kept: 72 bytes a block, held by Lua: 64; they cross at 72/136. */
  ASSERT_LE(mem.nfree, peak / 136 * 72 + 72);
  ASSERT(op__vm_trim_due(&mem)); /* more than 64 KB */
  op__vm_trim(&mem);
  ASSERT(!op__vm_trim_due(&mem));
  free_all(300000, &peak); /* 22 MB */
  ASSERT_LE(mem.nfree, (size_t)2 << 20);
  ASSERT_GT(mem.nfree, ((size_t)2 << 20) - 72);
  op__vm_close(L, &mem);
  ASSERT_EQ(mem.nfree, 0);
}

#endif

/* A VM that allocates and frees through the kept blocks computes what it
** should; closing it leaves nothing behind. */
static void test_lua(void) {
  static const char code[] =
      "local t, n = {}, 0\n"
      "for round = 1, 20 do\n"
      "  for i = 1, 2000 do t[i] = { i, tostring(i), ('x'):rep(i % 300) } end\n"
      "  for i = 1, 2000 do n = n + t[i][1] + #t[i][3] end\n"
      "  t = {}\n"
      "  collectgarbage()\n"
      "end\n"
      "return n\n";
  lua_State *L = open_vm();
  long want = 0;
  int i;

  luaL_openlibs(L);
  lua_gc(L, LUA_GCGEN, 0, 0);
  ASSERT_OK(luaL_loadstring(L, code));
  ASSERT_OK(lua_pcall(L, 0, 1, 0));
  for (i = 1; i <= 2000; i++)
    want += i + i % 300;
  ASSERT_EQ(lua_tointeger(L, -1), 20 * want);
#ifndef ASAN
  ASSERT(mem.nfree > 0);
#endif
  /* The count is Lua's own, kept blocks out of it. */
  ASSERT_EQ(op__vm_used(&mem), (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 +
                                   (size_t)lua_gc(L, LUA_GCCOUNTB, 0));
  op__vm_close(L, &mem);
  ASSERT_EQ(mem.nfree, 0);
}

#ifdef ASAN
/* Under ASan every free reaches free(). */
static void test_none_kept(void) {
  lua_State *L = open_vm();
  size_t n;

  for (n = 1; n <= 600; n++)
    vm_free(vm_malloc(n), n);
  ASSERT_EQ(mem.nfree, 0);
  ASSERT(!op__vm_trim_due(&mem));
  op__vm_close(L, &mem);
}
#endif

int main(void) {
#ifdef ASAN
  test_none_kept();
#else
  test_reuse();
  test_not_kept();
  test_bound();
#endif
  test_lua();
  return 0;
}
