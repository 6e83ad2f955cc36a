/* SPDX-License-Identifier: MIT */
/*
** alloc.c - the allocator of the Lua VMs offpath makes: byte accounting,
** the per-VM memory limit, and the failure injection the tests use.
** Thread: op__vm_alloc runs on the thread that runs its VM; the rest: any.
**
** DESIGN
**
** Every VM (the main VM and each worker's) allocates through vm_alloc with
** an op_vmem of its own, written only by the thread running the VM. `used`
** is exact: Lua tells the allocator the old size of every block.
**
** The limit. A request that would take the heap past `limit` is refused
** once: Lua then runs an emergency full collection and asks again (lmem.c
** tryagain), so garbage never counts against the limit. If the heap is
** still too big:
**
**   - with a hook (worker VMs), the request is granted if the heap stays
**     within limit + limit/4, and the hook is armed to fire at the next
**     instruction: it raises "memory limit of 64 MB reached in task at
**     file:line" as an ordinary error, with a traceback (worker.c
**     stop_hook). The slack lets the error name the line that grew the
**     heap; a request beyond it is refused outright.
**   - otherwise, or beyond the slack, the request fails: Lua raises its
**     memory error ("not enough memory"), and `hit` tells the worker that
**     the limit, not the system, refused it.
**
** Lua's memory errors never call the message handler, so only the hooked
** path can say where it happened.
**
** Failure injection. op__alloc_fail(n, k, w) makes the n-th growing
** request from now, and the k - 1 after it, fail in whatever VM makes them
** (only in worker VMs if w is set; tests/c/test-oom.c sweeps n). Two in a row defeat Lua's retry after an
** emergency collection, so one memory error is raised at that point.
*/
#include <string.h>
#include <strings.h>

#include "internal.h"

/* Failure injection: requests left before failing (0: off), and how many
** fail then. Relaxed: the tests arm it while only the loop thread runs
** Lua, and workers read it as a plain counter. */
static atomic_long fail_in;
static atomic_long fail_run;
static atomic_int fail_workers; /* only worker VMs (those with a hook) */

void op__alloc_fail(long n, long k, int workers_only) {
  atomic_store(&fail_run, k > 0 ? k : 1);
  atomic_store(&fail_workers, workers_only);
  atomic_store(&fail_in, n > 0 ? n : 0);
}

int op__alloc_pending(void) {
  return atomic_load(&fail_in) > 0;
}

/* Whether injection fails this request of m's VM. */
static int injected(const op_vmem *m) {
  long n = atomic_load_explicit(&fail_in, memory_order_relaxed);

  if (n <= 0 || (m->hook == NULL &&
                 atomic_load_explicit(&fail_workers, memory_order_relaxed)))
    return 0;
  if (n > 1) {
    atomic_store_explicit(&fail_in, n - 1, memory_order_relaxed);
    return 0;
  }
  if (atomic_fetch_sub(&fail_run, 1) <= 1)
    atomic_store_explicit(&fail_in, 0, memory_order_relaxed);
  return 1;
}

/* A request of grow bytes more would pass the limit: refuse it (0) or
** grant it past the limit and arm the hook (1). See the DESIGN block. */
static int over_limit(op_vmem *m, size_t used, size_t grow) {
  size_t cap = m->limit > SIZE_MAX / 2 ? SIZE_MAX : m->limit + m->limit / 4;

  if (m->over) {
    /* Armed already: the hook raises at the next instruction. Until then
    ** the slack serves, with no emergency collection per request. */
    if (used + grow <= cap)
      return 1;
    m->hit = 1;
    return 0;
  }
  if (m->hook == NULL || !m->refused || m->L == NULL) {
    m->refused = 1; /* Lua collects and asks again */
    m->hit = 1;
    return 0;
  }
  m->refused = 0;
  if (used + grow > cap) {
    m->hit = 1;
    return 0;
  }
  m->over = 1;
  /* A hook belongs to one thread: arm the coroutine running too (m->arm,
  ** worker.c). lua_sethook is async-signal safe, so safe here as well. */
  if (m->arm != NULL)
    m->arm(m);
  else
    lua_sethook(m->L, m->hook, LUA_MASKCOUNT, 1);
  return 1;
}

static void *vm_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  op_vmem *m = ud;
  size_t used = atomic_load_explicit(&m->used, memory_order_relaxed);
  size_t old = ptr != NULL ? osize : 0;
  void *np;

  if (nsize == 0) {
    free(ptr);
    atomic_store_explicit(&m->used, used - old, memory_order_relaxed);
    return NULL;
  }
  if (nsize > old) {
    if (injected(m))
      return NULL;
    if (m->limit != 0 && used + (nsize - old) > m->limit) {
      if (!over_limit(m, used, nsize - old))
        return NULL;
    } else if (m->refused) {
      m->refused = 0;
    }
  }
  np = ptr == NULL ? malloc(nsize) : realloc(ptr, nsize);
  if (np == NULL)
    return NULL;
  atomic_store_explicit(&m->used, used - old + nsize, memory_order_relaxed);
  return np;
}

lua_State *op__vm_new(op_vmem *m) {
  lua_State *L;

  atomic_store_explicit(&m->used, 0, memory_order_relaxed);
  m->L = NULL;
  m->refused = m->over = m->hit = 0;
  /* luaL_newstate's panic and warning functions, then our allocator: its
  ** blocks are realloc/free blocks too, and `used` starts from the count. */
  L = luaL_newstate();
  if (L == NULL)
    return NULL;
  atomic_store_explicit(&m->used,
                        (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 +
                            (size_t)lua_gc(L, LUA_GCCOUNTB, 0),
                        memory_order_relaxed);
  lua_setallocf(L, vm_alloc, m);
  m->L = L;
  return L;
}

size_t op__vm_used(const op_vmem *m) {
  return atomic_load_explicit(&m->used, memory_order_relaxed);
}

/* ---- sizes ---- */

int op__parse_size(const char *s, size_t *out) {
  static const struct {
    const char *unit;
    unsigned shift;
  } units[] = { { "", 0 },   { "b", 0 },   { "k", 10 }, { "kb", 10 },
                { "m", 20 }, { "mb", 20 }, { "g", 30 }, { "gb", 30 } };
  char *end;
  unsigned long long v;
  size_t i;

  if (s == NULL || *s < '0' || *s > '9')
    return OP_EINVAL;
  v = strtoull(s, &end, 10);
  while (*end == ' ')
    end++;
  for (i = 0; i < sizeof units / sizeof units[0]; i++) {
    if (strcasecmp(end, units[i].unit) == 0) {
      if (v > (SIZE_MAX >> units[i].shift))
        return OP_EINVAL;
      *out = (size_t)v << units[i].shift;
      return 0;
    }
  }
  return OP_EINVAL;
}

const char *op__fmt_size(size_t n, char *buf, size_t len) {
  if (n >= (1u << 30) && n % (1u << 30) == 0)
    snprintf(buf, len, "%zu GB", n >> 30);
  else if (n >= (1u << 20) && n % (1u << 20) == 0)
    snprintf(buf, len, "%zu MB", n >> 20);
  else if (n >= (1u << 10) && n % (1u << 10) == 0)
    snprintf(buf, len, "%zu KB", n >> 10);
  else
    snprintf(buf, len, "%zu bytes", n);
  return buf;
}
