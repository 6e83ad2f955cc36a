/* SPDX-License-Identifier: MIT */
/*
** protostore.h - the prototype store and each VM's side of it
** (protostore.c), as transfer.c uses them; with what both files share:
** the pointer map and two small helpers. Inline where the encoder or the
** decoder meets them per task.
** Thread: an op_vmstore belongs to the thread owning its VM; the store
** itself: any.
*/
#ifndef OFFPATH_PROTOSTORE_H
#define OFFPATH_PROTOSTORE_H

#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"
#include "lua54.h"

/* ---- helpers ---- */

/* Format a message into err[0..errlen) if err is not NULL. */
static inline void setmsg(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;

  if (err == NULL || errlen == 0)
    return;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* Run f(ud) protected on L. Returns the lua_pcall status; an error
** message is dropped.  [-0, +0, -] */
static inline int protect(lua_State *L, lua_CFunction f, void *ud) {
  int st;

  if (!lua_checkstack(L, 3))
    return LUA_ERRMEM;
  lua_pushcfunction(L, f);
  lua_pushlightuserdata(L, ud);
  st = lua_pcall(L, 1, 0, 0);
  if (st != LUA_OK)
    lua_pop(L, 1);
  return st;
}

/* ---- pointer maps ---- */

/*
** Open addressing, linear probing, load factor at most 1/2. A slot is in
** use iff its gen equals the map's gen, so clearing a map is one increment.
** aux, val and extra are the user's.
*/
typedef struct pslot {
  const void *key;
  uintptr_t aux;
  uint32_t gen;
  uint32_t val;
  uint32_t extra;
} pslot;

typedef struct pmap {
  pslot *slot;
  uint32_t mask;
  uint32_t count;
  uint32_t gen;
} pmap;

static inline uint32_t phash(const void *k) {
  return (uint32_t)(((uint64_t)(uintptr_t)k * 0x9E3779B97F4A7C15ull) >> 32);
}

static inline void pmap_init(pmap *m) {
  m->slot = NULL;
  m->mask = 0;
  m->count = 0;
  m->gen = 1;
}

static inline void pmap_free(pmap *m) {
  free(m->slot);
  pmap_init(m);
}

static inline pslot *pmap_find(const pmap *m, const void *key) {
  uint32_t i;
  pslot *s;

  if (m->slot == NULL)
    return NULL;
  for (i = phash(key) & m->mask;; i = (i + 1) & m->mask) {
    s = &m->slot[i];
    if (s->gen != m->gen)
      return NULL;
    if (s->key == key)
      return s;
  }
}

static inline int pmap_grow(pmap *m) {
  uint32_t oldcap = m->slot ? m->mask + 1 : 0;
  uint32_t cap = oldcap ? oldcap * 2 : 32, i, j;
  pslot *ns, *old = m->slot;

  if (cap == 0 || (ns = calloc(cap, sizeof *ns)) == NULL)
    return OP_ENOMEM;
  for (i = 0; i < oldcap; i++) {
    if (old[i].gen != m->gen)
      continue;
    for (j = phash(old[i].key) & (cap - 1); ns[j].gen == m->gen;
         j = (j + 1) & (cap - 1))
      ;
    ns[j] = old[i];
  }
  free(old);
  m->slot = ns;
  m->mask = cap - 1;
  return 0;
}

/* Add key (not in the map yet). Returns its zeroed slot, or NULL on out
** of memory. Invalidates pointers to other slots. */
static inline pslot *pmap_add(pmap *m, const void *key) {
  uint32_t i;
  pslot *s;

  if (m->slot == NULL || (m->count + 1) * 2 > m->mask + 1) {
    if (pmap_grow(m) != 0)
      return NULL;
  }
  for (i = phash(key) & m->mask; m->slot[i].gen == m->gen;
       i = (i + 1) & m->mask)
    ;
  s = &m->slot[i];
  s->key = key;
  s->aux = 0;
  s->gen = m->gen;
  s->val = 0;
  s->extra = 0;
  m->count++;
  return s;
}

/* Forget every key in O(1); a map that grew huge gives its memory back. */
static inline void pmap_clear(pmap *m) {
  if (m->count == 0)
    return;
  m->count = 0;
  if (m->mask + 1 > 65536) {
    pmap_free(m);
    return;
  }
  if (++m->gen == 0) {
    memset(m->slot, 0, (size_t)(m->mask + 1) * sizeof *m->slot);
    m->gen = 1;
  }
}

/* ---- store ids ---- */

/* An id names a slot of the store and the generation of its entry: an id
** whose entry was freed never names the entry that reuses the slot. */
#define ID_SLOT(id)        ((size_t)((id)&0xffffffffu))
#define ID_GEN(id)         ((uint32_t)((id) >> 32))
#define ID_MAKE(slot, gen) (((uint64_t)(gen) << 32) | (uint64_t)(slot))

/* The C function stored as id, or NULL if there is none. Thread: any. */
lua_CFunction op__store_cfunc(op_protostore *ps, uint64_t id);

/* ---- a VM's side of the store ---- */

/* A factory loaded from the store, by the store slot of its prototype;
** with the decoder's last instance of it (transfer.c). */
typedef struct fcache {
  uint64_t id;   /* the store id it was loaded for */
  uint32_t used; /* vs->fclock at its last use */
  int ref;       /* registry ref of the factory; 0: not loaded */
  int nup;
  int reuse;          /* the function never assigns an upvalue */
  int inst;           /* registry ref of the last instance made, or 0 */
  size_t klen;        /* the encoding of inst's upvalues: key[0..klen) */
  unsigned char *key; /* allocated with the first inst */
} fcache;

/* What one VM stored and loaded (see protostore.c's DESIGN). */
typedef struct op_vmstore {
  lua_State *L;
  op_protostore *ps;
  int layout_ok;   /* lua54.h's closure mirror holds in L */
  int setupval;    /* SETUPVAL's opcode number as checked in L; -1: failed */
  pmap protos;     /* Proto* -> store id (val: slot, aux: generation) */
  uint32_t pclock; /* prototype encodes, for eviction (protos' extra) */
  fcache *fc;      /* store slot -> factory */
  size_t nfc;
  size_t nfactories;  /* fc entries loaded */
  uint32_t fclock;    /* factory uses, for eviction */
  op_tmpl *tmpl[256]; /* factory templates by upvalue count */
  op_buf dump;        /* scratch for lua_dump */

  /* Search paths. */
  int paths_ref;                  /* main: its search-path record; -1: none */
  const lua_Integer *paths_epoch; /* main: bumped per assignment, or NULL */
  lua_Integer paths_epoch_seen;   /* main: *paths_epoch at the last look */
  const void *paths_mt;           /* main: the package table's metatable */
  unsigned paths_checks;          /* main: tasks since the last full look */
  const atomic_uint *published;   /* worker: the store's paths_gen */
  unsigned paths_gen;             /* worker: the paths_gen applied last */
} op_vmstore;

/* Set up vs for L; C memory only, nothing can fail. */
void op__vmstore_init(op_vmstore *vs, lua_State *L, op_protostore *ps);
/* Make the registry tables of L's side of the store.  [-0, +0, m] */
void op__vmstore_open(lua_State *L);
/* Release what vs holds, in L too. */
void op__vmstore_free(op_vmstore *vs);

/* Store the prototype of the Lua function at idx (cl: its lua_topointer),
** which vs has no id for. Returns 0, 1 if prototypes used least recently
** were evicted to make room (every cache keyed by a Proto* must forget
** them), or OP_ENOMEM.  [-0, +0, -] */
int op__proto_add(op_vmstore *vs, lua_State *L, int idx, const void *cl,
                  uint64_t *id, int *nup);

/* The store id and upvalue count of the Lua function at idx (cl: its
** lua_topointer), storing its prototype the first time. Returns as
** op__proto_add.  [-0, +0, -] */
static inline int op__proto_id(op_vmstore *vs, lua_State *L, int idx,
                               const void *cl, uint64_t *id, int *nup) {
  pslot *s;

  if (vs->layout_ok) {
    *nup = op__cl_nup(cl);
    if ((s = pmap_find(&vs->protos, op__cl_proto(cl))) != NULL) {
      *id = ID_MAKE(s->val, s->aux);
      s->extra = ++vs->pclock; /* for eviction */
      return 0;
    }
  }
  return op__proto_add(vs, L, idx, cl, id, nup);
}

/* Whether the factory for store entry id is loaded, in vs->fc[ID_SLOT(id)]. */
static inline int op__factory_loaded(const op_vmstore *vs, uint64_t id) {
  size_t slot = ID_SLOT(id);

  return slot < vs->nfc && vs->fc[slot].ref > 0 && vs->fc[slot].id == id;
}

/* Load the factory for store entry id into vs->fc[ID_SLOT(id)]. Returns
** 0; 1 if id names no prototype (a corrupt encoding: the caller says
** where); or a negative code with a message in err.  [-0, +0, m] */
int op__factory_load(op_vmstore *vs, lua_State *L, uint64_t id, char *err,
                     size_t errlen);

/* ---- search paths ---- */

/* The slow halves of the two below. */
void op__paths_check(op_vmstore *vs, lua_State *L); /* [-0, +0, m] */
void op__paths_take(op_vmstore *vs, lua_State *L);  /* [-0, +0, -] */

/* Main VM, before a pool task is queued: publish package.path and cpath if
** they changed since the last publication.  [-0, +0, m] */
static inline void op__paths_out(op_vmstore *vs, lua_State *L) {
  /* The hook counts assignments: between them, one compare per task (and
  ** a look at the hook itself every 256th). */
  if (vs->paths_epoch != NULL && *vs->paths_epoch == vs->paths_epoch_seen &&
      (++vs->paths_checks & 255) != 0)
    return;
  op__paths_check(vs, L);
}

/* Worker VM, before it decodes a task: take the paths published last, if
** newer than the ones it has.  [-0, +0, -] */
static inline void op__paths_in(op_vmstore *vs, lua_State *L) {
  if (atomic_load_explicit(vs->published, memory_order_acquire) !=
      vs->paths_gen)
    op__paths_take(vs, L);
}

#endif
