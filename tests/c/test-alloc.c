/* SPDX-License-Identifier: MIT */
/*
** test-alloc.c - the allocator of offpath's Lua VMs (alloc.c): small blocks
** a VM frees are kept for its next allocations of their class, only blocks
** known to be big enough, within a bound, out of the byte count, poisoned
** under ASan while kept, and all given back by op__vm_trim and
** op__vm_close (LeakSanitizer checks the last).
** LABELS: core
*/
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
#ifdef ASAN
#include <sanitizer/asan_interface.h>
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

/* A freed block serves the next request of its class, and only of it;
** the byte count drops at the free and rises at the reuse. */
static void test_reuse(void) {
  lua_State *L = open_vm();
  size_t used0 = op__vm_used(&mem);
  void *p, *q, *r;

  p = vm_malloc(100); /* class of 97..112 bytes */
  ASSERT_EQ(op__vm_used(&mem), used0 + 100);
  vm_free(p, 100);
  ASSERT_EQ(op__vm_used(&mem), used0);
  ASSERT_EQ(mem.nfree, 112);
#ifdef ASAN
  /* All but the link, which LeakSanitizer must read. */
  ASSERT(!__asan_address_is_poisoned(p));
  ASSERT(__asan_address_is_poisoned((char *)p + sizeof(void *)));
  ASSERT(__asan_address_is_poisoned((char *)p + 111));
#endif
  r = vm_malloc(120); /* another class: not p */
  ASSERT(r != p);
  q = vm_malloc(112); /* the whole class size is usable */
  ASSERT(q == p);
  ASSERT_EQ(mem.nfree, 0);
  vm_free(q, 112);
  vm_free(r, 120);
  ASSERT_EQ(mem.nfree, 112 + 128);
  op__vm_trim(&mem);
  ASSERT_EQ(mem.nfree, 0);
  ASSERT_EQ(op__vm_used(&mem), used0);
  op__vm_close(L, &mem);
}

/* A block that may be smaller than its class (allocated elsewhere at its
** exact size, as luaL_newstate's are) and a block over 512 bytes go to
** free(). A block realloc shrank is kept in its new class. */
static void test_not_kept(void) {
  lua_State *L = open_vm();
  void *p;

  p = malloc(100); /* as if Lua had it before vm_alloc took over */
  ASSERT(p != NULL);
  vm_free(p, 100);
  ASSERT_EQ(mem.nfree, 0);
  vm_free(vm_malloc(513), 513);
  ASSERT_EQ(mem.nfree, 0);
  p = vm_malloc(300);
  p = alloc_fn(alloc_ud, p, 300, 40);
  ASSERT(p != NULL);
  memset(p, 0xcd, 48); /* the class's size */
  vm_free(p, 40);
  ASSERT_EQ(mem.nfree, 48);
  op__vm_close(L, &mem);
}

/* What is kept is bounded by what the VM holds at each free (so about
** half the peak when everything is freed), by 64 KB at least and 8 MB at
** most; the rest goes to free(). */
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

  free_all(20000, &peak); /* 1.3 MB */
  ASSERT_EQ(op__vm_used(&mem), used0);
  ASSERT_GE(mem.nfree, (size_t)64 << 10);
  ASSERT_LE(mem.nfree, peak / 2 + 64);
  op__vm_trim(&mem);
  free_all(300000, &peak); /* 19 MB */
  ASSERT_LE(mem.nfree, (size_t)8 << 20);
  ASSERT_GT(mem.nfree, ((size_t)8 << 20) - 64);
  op__vm_close(L, &mem);
  ASSERT_EQ(mem.nfree, 0);
}

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
  ASSERT(mem.nfree > 0);
  op__vm_close(L, &mem);
  ASSERT_EQ(mem.nfree, 0);
}

int main(void) {
  test_reuse();
  test_not_kept();
  test_bound();
  test_lua();
  return 0;
}
