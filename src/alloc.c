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
** Small blocks kept for reuse. Lua frees and allocates the same few sizes
** by the thousand (a task object per task, coroutine frames, strings).
** With more than one thread in the process, each malloc and free takes
** its arena's lock: a locked instruction, which also waits for the stores
** before it. A VM is used by one thread at a time, so the addresses of the
** small blocks it frees are kept in rings of its own (m->kept), one per
** size class, and the blocks handed out again without a lock; a block is
** not written to while kept. The classes are glibc's chunk sizes (16 k +
** 24 usable bytes), and a small block is always allocated at its class's
** size, so rounding costs no memory and any block of a class serves any
** request of it. A freed block is kept only if malloc_usable_size shows
** it is of its class's size: not one that may be smaller (luaL_newstate's
** own, made before vm_alloc took over), nor one much bigger (a big array
** realloc shrank keeps its mapped page). What is kept is counted at the
** blocks' usable size (the rings add at most a third of it, for the
** smallest class) and bounded by what the VM holds at the time, within
** KEEP_MIN and KEEP_MAX bytes: a generational collection lets the heap
** grow, then frees the old garbage at once, and a quarter of the heap as
** the bound sent most of that burst to free() (a pipelined round trip's
** task objects came from the rings one time in three). Kept blocks are not
** counted in `used` (Lua no longer holds them). They go back to malloc
** when the VM closes (op__vm_close), when malloc fails (then asked once
** more), and when a worker about to sleep keeps more than KEEP_MIN
** (op__vm_trim_due); the main VM keeps up to KEEP_MAX for as long as it runs.
** Under ASan nothing is kept: its quarantine sees every free, so a late
** write to a freed Lua object is still reported (tests/c/test-alloc.c
** runs under TSan too, where the rings are used).
**
** Failure injection. op__alloc_fail(n, k, w) makes the n-th growing
** request from now, and the k - 1 after it, fail in whatever VM makes them
** (only in worker VMs if w is set; tests/c/test-oom.c sweeps n). Two in a row defeat Lua's retry after an
** emergency collection, so one memory error is raised at that point.
*/
#include <string.h>
#include <strings.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "internal.h"

#if defined(__SANITIZE_ADDRESS__)
#define OP_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define OP_ASAN 1
#endif
#endif

/* Only where a block's size can be told (malloc_usable_size), and not
** under ASan, whose quarantine then sees every free. */
#if defined(__GLIBC__) && !defined(OP_ASAN)
#define KEEP_BLOCKS 1
#endif
#define KEEP_MIN  ((size_t)64 << 10)
#define KEEP_MAX  ((size_t)2 << 20)
#define CLASS_MAX ((size_t)16 * (OP_VM_CLASSES - 1) + 24) /* more: malloc */

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

#ifdef KEEP_BLOCKS
/* The size of the blocks of class k, and the class of a request of
** 0 < n <= CLASS_MAX bytes. */
static size_t class_size(size_t k) {
  return 16 * k + 24;
}

static size_t class_of(size_t n) {
  return n <= 24 ? 0 : (n - 9) >> 4;
}

/* A block of n bytes (0 < n <= CLASS_MAX), at its class's size. */
static void *take(op_vmem *m, size_t n) {
  size_t k = class_of(n);
  op_vmkept *r = &m->kept[k];
  void *b;

  if (r->n == 0)
    return malloc(class_size(k));
  b = r->v[(r->head + r->n - 1) & (r->cap - 1)]; /* the newest: cache-warm */
  r->n--;
  m->nfree -= class_size(k);
  return b;
}

/* Room for one more address in r. */
static int ring_grow(op_vmkept *r) {
  uint32_t cap = r->cap ? 2 * r->cap : 64, i;
  void **v = malloc(cap * sizeof *v);

  if (v == NULL)
    return -1;
  for (i = 0; i < r->n; i++)
    v[i] = r->v[(r->head + i) & (r->cap - 1)];
  free(r->v);
  r->v = v;
  r->head = 0;
  r->cap = cap;
  return 0;
}

/* Keep the freed block p, which Lua had at n bytes (0 < n <= CLASS_MAX),
** if it is of its class's size and there is room; or free it. */
static void give(op_vmem *m, void *p, size_t n, size_t used) {
  size_t k = class_of(n), size = class_size(k), have = malloc_usable_size(p);
  size_t cap = used < KEEP_MIN ? KEEP_MIN : used > KEEP_MAX ? KEEP_MAX : used;
  op_vmkept *r = &m->kept[k];

  if (have < size || have >= size + 16 || m->nfree + size > cap ||
      (r->n == r->cap && ring_grow(r) != 0)) {
    free(p);
    return;
  }
  r->v[(r->head + r->n) & (r->cap - 1)] = p;
  r->n++;
  m->nfree += size;
}
#else
#define take(m, n)       ((void)(m), malloc(n))
#define give(m, p, n, u) ((void)(m), (void)(n), (void)(u), free(p))
#endif

void op__vm_trim(op_vmem *m) {
  op_vmkept *r;
  int k;

  for (k = 0; k < OP_VM_CLASSES; k++) {
    r = &m->kept[k];
    for (; r->n > 0; r->n--, r->head = (r->head + 1) & (r->cap - 1))
      free(r->v[r->head]);
    free(r->v);
    memset(r, 0, sizeof *r);
  }
  m->nfree = 0;
}

int op__vm_trim_due(const op_vmem *m) {
  return m->nfree > KEEP_MIN;
}

/* The block of nsize > 0 bytes Lua asked for: new (ptr NULL) or ptr
** resized. */
static void *grant(op_vmem *m, void *ptr, size_t nsize) {
  if (ptr == NULL)
    return nsize <= CLASS_MAX ? take(m, nsize) : malloc(nsize);
#ifdef KEEP_BLOCKS
  if (nsize <= CLASS_MAX)
    nsize = class_size(class_of(nsize));
#endif
  return realloc(ptr, nsize);
}

static void *vm_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  op_vmem *m = ud;
  size_t used = atomic_load_explicit(&m->used, memory_order_relaxed);
  size_t old = ptr != NULL ? osize : 0;
  void *np;

  if (nsize == 0) {
    if (old > 0 && old <= CLASS_MAX)
      give(m, ptr, old, used);
    else
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
  np = grant(m, ptr, nsize);
  if (np == NULL && m->nfree > 0) {
    /* What the rings keep may be what malloc lacks. */
    op__vm_trim(m);
    np = grant(m, ptr, nsize);
  }
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
  memset(m->kept, 0, sizeof m->kept);
  m->nfree = 0;
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

void op__vm_close(lua_State *L, op_vmem *m) {
  lua_close(L);
  op__vm_trim(m);
  m->L = NULL;
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
