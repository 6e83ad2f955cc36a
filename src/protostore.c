/* SPDX-License-Identifier: MIT */
/*
** protostore.c - the prototype store the VMs share (ids, bounds, grace),
** each VM's side of it (prototype ids, factories), and the search paths.
** Thread: the store: any (under its mutex); an op_vmstore: its VM's.
*/

/*
** DESIGN
**
** Prototype identity
** ------------------
** Bytecode never travels in an encoding. The store (op_protostore) maps
** ids to dumped, unstripped prototypes and to C function pointers (see
** "The bounded store" below). A VM keys its ids by the Proto pointer, read
** from the closure (lua54.h; checked once per VM by op__check_closures):
** fresh closures made per event from one prototype all hit; two functions
** on one line differ. The first closure of every cached prototype is kept
** in the anchors table, so the Proto can never be freed and its address
** reused for other code (it also keeps that one closure's upvalue values
** alive; the price of one pointer compare per task). If the layout check
** fails, the key is the lua_dump string itself, interned in a table:
** correct, but it costs a dump per task.
**
** Fresh closures: factories
** -------------------------
** Per prototype P with n upvalues, the decoding VM builds once a factory:
** a binary chunk compiled from a template for n,
**
**   return function(u1, ..., un) return function() <uses u1..un> end end
**
** dumped, and spliced: the template's inner function is replaced by P's
** body, with P's upvalue descriptors (instack, idx) copied from the
** template's inner function, so P captures the factory's parameters
** (lua54.c). For n > 200 (a function has at most 200 locals) the template
** nests one more function taking the parameters after u128 (...). Calling
** the factory with the upvalue values returns a new closure with new
** upvalue cells, as Lua does for any nested function; no bytecode is
** touched per task. P keeps its own source string, so tracebacks show the
** original file and line. How the decoder calls factories, and when it
** reuses an instance instead, is in transfer.c.
**
** The bounded store
** -----------------
** Functions made per event with load() are new prototypes every time, so
** nothing that grows per prototype may grow forever. An id is a slot of
** the store and the generation of its entry (slot | gen << 32): a slot
** is reused once its entry is freed, with the next generation, so an old
** id never names the new entry (store_get compares the whole id).
**
** Each VM owns the entries it stored (a Proto belongs to one VM). It
** stamps a prototype's protos slot at every encode; past PROTO_CAP
** prototypes, evict_protos drops the quarter used least recently: the
** anchors go first (protected), then each id is retired, then the map is
** rebuilt without them, and the caller empties its caches keyed by Proto*
** (transfer.c's encode cache). Once the anchor is gone the Proto may be
** collected and its address reused by a new function, which then misses
** every cache and gets a new id.
**
** A retired entry stays decodable for STORE_GRACE more insertions into
** the store (store_reap frees it then), because encodings made with it
** may still wait in a queue. A decoder that meets a freed id fails with
** "cannot copy: function N is no longer in the prototype store"; that
** takes a task waiting while thousands of other new functions are sent.
**
** The decoding side caches factories by slot (fc), each with the id it
** was loaded for: an id that differs (the slot was reused) loads the new
** entry's factory in its place. Past FACTORY_CAP loaded factories,
** evict_factories drops the quarter used least recently; they are loaded
** again from the store if they come back. So the store holds at most
** PROTO_CAP entries per encoding VM plus STORE_GRACE retired ones, and
** each VM at most FACTORY_CAP factories. The fallback key (a dump string,
** when the layout check fails) is not bounded.
**
** Caches and their lifetime
** -------------------------
**   store      runtime-wide; entries live until retired and reaped (above).
**   protos     per VM, C map Proto* -> id; anchors keep the Proto alive
**              until evict_protos.
**   fc         per VM, id -> registry ref of the factory, and n.
**   tmpl       per VM, factory templates by upvalue count.
** The Lua objects are anchored in the VM's registry under the addresses
** of static variables; op__vmstore_free drops them.
**
** Thread safety of the store
** --------------------------
** Slots sit in chunks of 64, 128, 256, ... that never move. Every access
** takes the store mutex: an insert, a retirement, and a decoder's read
** of an entry (only when a VM loads a factory or decodes a C function,
** not per task): factory_chunk builds the factory chunk from the entry's
** bytes under the lock, since the entry may be freed once it is
** released. Lock order: the store mutex is a leaf; no Lua call under it.
**
** Search paths
** ------------
** Workers use the main VM's package.path and package.cpath as they are
** when a task is submitted. op__paths_out runs on the main VM before
** each pool task is queued. To know in O(1) that neither string changed,
** its first call hooks the package table, as transfer.c does for
** package.loaded: path and cpath move to a hidden table that the table's
** new metatable reads through (__index) and writes into (__newindex,
** which bumps an epoch), so reads, require and assignments behave as
** before and only rawget and pairs on the package table no longer see the
** two fields (the metatable is protected: setmetatable(package, ...)
** raises, since the fields would go with it). Per task the epoch is
** compared; on a change, and every 256th task (to notice a rawset or
** debug.setmetatable, after which both strings are read on every task),
** the strings are compared with the last published ones and, if
** different, a new immutable blob is published in the store under its
** mutex and paths_gen is bumped. op__paths_in, on a worker before it
** decodes a task, sets its VM's two fields when paths_gen moved past the
** one it applied last, holding a reference to the blob (refs, under the
** mutex) while it copies the strings out. Between changes a worker's own
** assignments (a pool's init script) stay. op__vmstore_free puts the two
** fields back.
*/
#include <stdint.h>
#include <string.h>

#include "protostore.h"

#define PROTO_CAP   OP_PROTO_CAP /* see internal.h */
#define FACTORY_CAP OP_FACTORY_CAP
#define STORE_GRACE OP_STORE_GRACE

/* ---- the prototype store (any thread) ---- */

enum { S_PROTO = 1, S_CFUNC = 2 };

typedef struct sentry {
  struct sentry *next; /* retired list */
  uint64_t id;
  uint64_t retired; /* ps->made when retired, or 0 */
  uint8_t kind;
  uint8_t nup;      /* S_PROTO: upvalue count */
  lua_CFunction fn; /* S_CFUNC */
  size_t len;       /* S_PROTO: dump length */
  char bytes[];     /* S_PROTO: lua_dump output, not stripped */
} sentry;

/* A slot of the store: its entry (NULL: free) and the generation its
** next entry gets. */
typedef struct sslot {
  sentry *e;
  uint32_t gen;
  uint32_t next_free; /* free list link, slot + 1 (0: end) */
} sslot;

#define STORE_BASE   6 /* first chunk holds 1 << STORE_BASE slots */
#define STORE_CHUNKS 26

typedef struct paths_blob paths_blob;

struct op_protostore {
  uv_mutex_t mu; /* everything below */
  sslot *chunk[STORE_CHUNKS];
  size_t nslots;               /* slots ever used */
  uint32_t free_head;          /* slot + 1 of the first free slot, 0: none */
  sentry *ret_head, *ret_tail; /* retired entries, oldest first */
  uint64_t made;               /* entries ever added */
  atomic_size_t count;         /* entries held, retired ones included */
  paths_blob *paths;     /* the published search paths (under mu), or NULL */
  atomic_uint paths_gen; /* bumped after each publication */
};

static sslot *store_slot(op_protostore *ps, size_t slot) {
  size_t j = slot + ((size_t)1 << STORE_BASE);
  unsigned hb = 63u - (unsigned)__builtin_clzll((unsigned long long)j);
  unsigned k = hb - STORE_BASE;

  if (k >= STORE_CHUNKS || ps->chunk[k] == NULL)
    return NULL;
  return &ps->chunk[k][j - ((size_t)1 << hb)];
}

op_protostore *op__protostore_new(void) {
  op_protostore *ps = calloc(1, sizeof *ps);

  if (ps == NULL)
    return NULL;
  if (uv_mutex_init(&ps->mu) != 0)
    OP_PANIC("uv_mutex_init failed");
  atomic_init(&ps->count, 0);
  atomic_init(&ps->paths_gen, 0);
  return ps;
}

void op__protostore_free(op_protostore *ps) {
  size_t i;
  unsigned k;

  if (ps == NULL)
    return;
  for (i = 0; i < ps->nslots; i++)
    free(store_slot(ps, i)->e);
  for (k = 0; k < STORE_CHUNKS; k++)
    free(ps->chunk[k]);
  free(ps->paths); /* no worker holds it any more */
  uv_mutex_destroy(&ps->mu);
  free(ps);
}

/* How many entries (prototypes and C functions) the store holds, retired
** ones included. Thread: any. */
size_t op__protostore_count(op_protostore *ps) {
  return atomic_load_explicit(&ps->count, memory_order_relaxed);
}

/* The entry named id, or NULL if there is none (any more). Call with
** ps->mu held: entries may be freed once it is released. */
static const sentry *store_get(op_protostore *ps, uint64_t id) {
  const sslot *s;

  if (ID_SLOT(id) >= ps->nslots || (s = store_slot(ps, ID_SLOT(id))) == NULL ||
      s->e == NULL || s->e->id != id)
    return NULL;
  return s->e;
}

/* Whether id named an entry that has been freed since. ps->mu held. */
static int store_gone(op_protostore *ps, uint64_t id) {
  const sslot *s;

  if (ID_SLOT(id) >= ps->nslots || (s = store_slot(ps, ID_SLOT(id))) == NULL)
    return 0;
  return ID_GEN(id) < (s->e != NULL ? ID_GEN(s->e->id) : s->gen);
}

/* Free the retired entries that have waited STORE_GRACE insertions, and
** their slots. ps->mu held. */
static void store_reap(op_protostore *ps) {
  sentry *e;
  sslot *s;

  while ((e = ps->ret_head) != NULL && ps->made - e->retired >= STORE_GRACE) {
    ps->ret_head = e->next;
    if (ps->ret_head == NULL)
      ps->ret_tail = NULL;
    s = store_slot(ps, ID_SLOT(e->id));
    s->e = NULL;
    s->gen = ID_GEN(e->id) + 1;
    s->next_free = ps->free_head;
    ps->free_head = (uint32_t)(ID_SLOT(e->id) + 1);
    atomic_store_explicit(&ps->count, atomic_load(&ps->count) - 1,
                          memory_order_relaxed);
    free(e);
  }
}

/* Add an entry (takes ownership of e). Returns 0 and the id in *id, or
** OP_ENOMEM (e freed). Thread: any. */
static int store_add(op_protostore *ps, sentry *e, uint64_t *id) {
  size_t slot, cap;
  unsigned k;
  sslot *s;

  uv_mutex_lock(&ps->mu);
  if (ps->free_head != 0) {
    slot = ps->free_head - 1;
    s = store_slot(ps, slot);
    ps->free_head = s->next_free;
  } else {
    slot = ps->nslots;
    if (slot >= UINT32_MAX)
      goto fail;
    if ((s = store_slot(ps, slot)) == NULL) {
      k = 63u -
          (unsigned)__builtin_clzll(
              (unsigned long long)(slot + ((size_t)1 << STORE_BASE))) -
          STORE_BASE;
      cap = (size_t)1 << (k + STORE_BASE);
      if (k >= STORE_CHUNKS ||
          (ps->chunk[k] = calloc(cap, sizeof(sslot))) == NULL)
        goto fail;
      s = store_slot(ps, slot);
    }
    ps->nslots++;
  }
  e->next = NULL;
  e->retired = 0;
  e->id = ID_MAKE(slot, s->gen);
  s->e = e;
  s->next_free = 0;
  ps->made++;
  atomic_store_explicit(&ps->count, atomic_load(&ps->count) + 1,
                        memory_order_relaxed);
  store_reap(ps);
  uv_mutex_unlock(&ps->mu);
  *id = e->id;
  return 0;
fail:
  uv_mutex_unlock(&ps->mu);
  free(e);
  return OP_ENOMEM;
}

/* The VM that stored id no longer needs it: it is freed after STORE_GRACE
** more insertions, so that tasks already encoded with it can still be
** decoded meanwhile. Thread: any. */
static void store_retire(op_protostore *ps, uint64_t id) {
  sslot *s;
  sentry *e;

  uv_mutex_lock(&ps->mu);
  if (ID_SLOT(id) < ps->nslots && (s = store_slot(ps, ID_SLOT(id))) != NULL &&
      (e = s->e) != NULL && e->id == id && e->retired == 0) {
    e->retired = ps->made + 1; /* never 0 */
    if (ps->ret_tail != NULL)
      ps->ret_tail->next = e;
    else
      ps->ret_head = e;
    ps->ret_tail = e;
  }
  uv_mutex_unlock(&ps->mu);
}

lua_CFunction op__store_cfunc(op_protostore *ps, uint64_t id) {
  const sentry *se;
  lua_CFunction fn;

  uv_mutex_lock(&ps->mu);
  se = store_get(ps, id);
  fn = se != NULL && se->kind == S_CFUNC ? se->fn : NULL;
  uv_mutex_unlock(&ps->mu);
  return fn;
}

/* ---- a VM's side: lifetime ---- */

/* Registry keys: addresses of these variables. */
static char anchors_key; /* Proto* -> one closure of it */
static char dumps_key;   /* fallback: dump string -> id */

static int paths_unhook(lua_State *L);

void op__vmstore_init(op_vmstore *vs, lua_State *L, op_protostore *ps) {
  memset(vs, 0, sizeof *vs);
  vs->L = L;
  vs->ps = ps;
  vs->published = &ps->paths_gen;
  pmap_init(&vs->protos);
  op__buf_init(&vs->dump);
}

void op__vmstore_open(lua_State *L) {
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &anchors_key);
}

void op__vmstore_free(op_vmstore *vs) {
  lua_State *L = vs->L;
  size_t i;

  for (i = 0; i < vs->nfc; i++) {
    if (vs->fc[i].ref > 0)
      luaL_unref(L, LUA_REGISTRYINDEX, vs->fc[i].ref);
    if (vs->fc[i].inst > 0)
      luaL_unref(L, LUA_REGISTRYINDEX, vs->fc[i].inst);
    free(vs->fc[i].key);
  }
  if (lua_checkstack(L, 1)) {
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &anchors_key);
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &dumps_key);
    if (vs->paths_ref > 0) {
      protect(L, paths_unhook, vs);
      luaL_unref(L, LUA_REGISTRYINDEX, vs->paths_ref);
    }
  }
  for (i = 0; i < 256; i++) {
    if (vs->tmpl[i] != NULL)
      op__tmpl_free(vs->tmpl[i]);
  }
  free(vs->fc);
  pmap_free(&vs->protos);
  op__buf_free(&vs->dump);
}

/* ---- a VM's side: prototype ids ---- */

/* Store vs->dump as a new prototype with nup upvalues. */
static int store_dump(op_vmstore *vs, int nup, uint64_t *id) {
  sentry *se = malloc(sizeof *se + vs->dump.len);

  if (se == NULL)
    return OP_ENOMEM;
  se->kind = S_PROTO;
  se->nup = (uint8_t)nup;
  se->fn = NULL;
  se->len = vs->dump.len;
  memcpy(se->bytes, vs->dump.p, vs->dump.len);
  return store_add(vs->ps, se, id);
}

/* anchors[Proto pointer at arg 1] = closure at arg 2. Called through
** op__pcall.  [-0, +0, m] */
static int anchor_fn(lua_State *L) {
  const void *proto = lua_touserdata(L, 1);

  lua_rawgetp(L, LUA_REGISTRYINDEX, &anchors_key);
  lua_pushvalue(L, 2);
  lua_rawsetp(L, -2, proto);
  return 0;
}

/* The Proto pointers at arg 1 (a pkeys) leave the anchors table. Called
** through protect().  [-0, +0, -] */
typedef struct pkeys {
  const void **p;
  size_t n;
} pkeys;

static int unanchor_fn(lua_State *L) {
  pkeys *k = lua_touserdata(L, 1);
  size_t i;

  lua_rawgetp(L, LUA_REGISTRYINDEX, &anchors_key);
  for (i = 0; i < k->n; i++) {
    lua_pushnil(L);
    lua_rawsetp(L, -2, k->p[i]);
  }
  return 0;
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

/* More than PROTO_CAP prototypes stored from this VM: forget the quarter
** encoded least recently. Their anchors go, so a Proto may be collected
** and its address reused; by then it is no longer in protos, and its
** store entry is retired (see the DESIGN block). Returns 1 if so: the
** caller's caches keyed by Proto* must forget them too. On out of memory
** nothing changes (0).  [-0, +0, -] */
static int evict_protos(op_vmstore *vs, lua_State *L) {
  pmap *m = &vs->protos, keep;
  uint32_t *age = NULL, cut, i;
  pkeys gone;
  pslot *s, *ns;
  size_t n = 0;
  int evicted = 0;

  gone.n = 0;
  gone.p = malloc(m->count * sizeof *gone.p);
  pmap_init(&keep);
  if (gone.p == NULL || (age = malloc(m->count * sizeof *age)) == NULL)
    goto done;
  for (i = 0; i <= m->mask; i++)
    if (m->slot[i].gen == m->gen)
      age[n++] = vs->pclock - m->slot[i].extra;
  if (n < 4)
    goto done;
  qsort(age, n, sizeof *age, cmp_u32);
  cut = age[n - n / 4]; /* the oldest quarter is at or above it */
  for (i = 0; i <= m->mask; i++) {
    s = &m->slot[i];
    if (s->gen != m->gen)
      continue;
    if (vs->pclock - s->extra >= cut) {
      gone.p[gone.n++] = s->key;
    } else {
      if ((ns = pmap_add(&keep, s->key)) == NULL)
        goto done;
      ns->aux = s->aux;
      ns->val = s->val;
      ns->extra = s->extra;
    }
  }
  if (protect(L, unanchor_fn, &gone) != LUA_OK)
    goto done;
  for (i = 0; i <= m->mask; i++) {
    s = &m->slot[i];
    if (s->gen != m->gen || vs->pclock - s->extra < cut)
      continue;
    store_retire(vs->ps, ID_MAKE(s->val, s->aux));
  }
  pmap_free(m);
  *m = keep;
  pmap_init(&keep);
  evicted = 1;
done:
  pmap_free(&keep);
  free(gone.p);
  free(age);
  return evicted;
}

/* Fallback key: dump -> id through the dumps table. arg 1: {vs, &id, nup}.
** Lua-callable for protect(). Sets id to UINT64_MAX on out of memory. */
typedef struct fbk {
  op_vmstore *vs;
  uint64_t id;
  int nup;
} fbk;

/* [-0, +0, m] */
static int fallback_fn(lua_State *L) {
  fbk *f = lua_touserdata(L, 1);

  f->id = UINT64_MAX;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &dumps_key);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &dumps_key);
  }
  lua_pushlstring(L, f->vs->dump.p, f->vs->dump.len);
  lua_pushvalue(L, -1);
  if (lua_rawget(L, -3) == LUA_TNUMBER) {
    f->id = (uint64_t)lua_tointeger(L, -1);
    return 0;
  }
  lua_pop(L, 1);
  if (store_dump(f->vs, f->nup, &f->id) != 0) {
    f->id = UINT64_MAX;
    return 0;
  }
  lua_pushinteger(L, (lua_Integer)f->id);
  lua_rawset(L, -3);
  return 0;
}

int op__proto_add(op_vmstore *vs, lua_State *L, int idx, const void *cl,
                  uint64_t *id, int *nup) {
  const void *proto;
  lua_Debug ar;
  pslot *s;
  fbk f;

  if (vs->layout_ok) {
    proto = op__cl_proto(cl);
    *nup = op__cl_nup(cl);
    /* anchor, store, then cache: a failure before the cache only costs
    ** a second dump next time */
    lua_pushcfunction(L, anchor_fn);
    lua_pushlightuserdata(L, (void *)proto);
    lua_pushvalue(L, idx);
    if (op__pcall(L, 2, 0, NULL) != LUA_OK) {
      lua_pop(L, 1);
      return OP_ENOMEM;
    }
    if (op__chunk_dump(L, idx, &vs->dump) != 0 || store_dump(vs, *nup, id) != 0)
      return OP_ENOMEM;
    if ((s = pmap_add(&vs->protos, proto)) == NULL) {
      store_retire(vs->ps, *id);
      return OP_ENOMEM;
    }
    s->val = (uint32_t)ID_SLOT(*id);
    s->aux = ID_GEN(*id);
    s->extra = ++vs->pclock;
    if (vs->protos.count > PROTO_CAP)
      return evict_protos(vs, L);
    return 0;
  }
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  *nup = ar.nups;
  if (op__chunk_dump(L, idx, &vs->dump) != 0)
    return OP_ENOMEM;
  f.vs = vs;
  f.nup = *nup;
  if (protect(L, fallback_fn, &f) != LUA_OK || f.id == UINT64_MAX)
    return OP_ENOMEM;
  *id = f.id;
  return 0;
}

/* ---- a VM's side: factories ---- */

/* Forget the factory and instance cached in fc.  [-0, +0, -] */
static void drop_factory(op_vmstore *vs, lua_State *L, fcache *fc) {
  if (fc->ref > 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, fc->ref);
    vs->nfactories--;
  }
  if (fc->inst > 0)
    luaL_unref(L, LUA_REGISTRYINDEX, fc->inst);
  free(fc->key);
  memset(fc, 0, sizeof *fc);
}

/* More than FACTORY_CAP factories loaded: drop the quarter used least
** recently, except the one in slot keep. They are loaded again from the
** store if their functions come back.  [-0, +0, -] */
static void evict_factories(op_vmstore *vs, lua_State *L, size_t keep) {
  uint32_t *age, cut;
  size_t i, n = 0;

  if ((age = malloc(vs->nfactories * sizeof *age)) == NULL)
    return; /* try again at the next load */
  for (i = 0; i < vs->nfc && n < vs->nfactories; i++)
    if (vs->fc[i].ref > 0)
      age[n++] = vs->fclock - vs->fc[i].used;
  if (n < 4) {
    free(age);
    return;
  }
  qsort(age, n, sizeof *age, cmp_u32);
  cut = age[n - n / 4]; /* the oldest quarter is at or above it */
  free(age);
  for (i = 0; i < vs->nfc; i++)
    if (vs->fc[i].ref > 0 && i != keep && vs->fclock - vs->fc[i].used >= cut)
      drop_factory(vs, L, &vs->fc[i]);
}

/* Build the factory chunk for store entry id into c, under the store
** lock: the entry may be freed once it is released. Returns 0, 1 if id
** names no prototype, or an error code with a message in err. */
static int factory_chunk(op_vmstore *vs, uint64_t id, const op_tmpl *t,
                         op_buf *c, int *sets, char *err, size_t errlen) {
  op_protostore *ps = vs->ps;
  const sentry *se;
  int rc;

  uv_mutex_lock(&ps->mu);
  se = store_get(ps, id);
  if (se == NULL || se->kind != S_PROTO) {
    rc = 1;
  } else {
    rc = op__tmpl_splice(t, (const unsigned char *)se->bytes, se->len, se->nup,
                         vs->setupval, sets, c);
    if (rc == OP_EINVAL)
      setmsg(err, errlen, "stored prototype %llu is bad",
             (unsigned long long)id);
    else if (rc == OP_ENOMEM)
      setmsg(err, errlen, "not enough memory");
  }
  uv_mutex_unlock(&ps->mu);
  return rc;
}

int op__factory_load(op_vmstore *vs, lua_State *L, uint64_t id, char *err,
                     size_t errlen) {
  op_protostore *ps = vs->ps;
  const sentry *se;
  size_t slot = ID_SLOT(id), n;
  op_tmpl *t;
  op_buf c;
  fcache *nfc, *fc;
  int rc, st, ref, gone, sets = 0;

  uv_mutex_lock(&ps->mu);
  se = store_get(ps, id);
  n = se != NULL && se->kind == S_PROTO ? se->nup : 256;
  gone = se == NULL && store_gone(ps, id);
  uv_mutex_unlock(&ps->mu);
  if (n == 256 && !gone)
    return 1;
  if (gone) {
    setmsg(err, errlen,
           "function %llu is no longer in the prototype store "
           "(more than %d other new functions were sent meanwhile)",
           (unsigned long long)id, STORE_GRACE);
    return OP_EINVAL;
  }
  if ((t = vs->tmpl[n]) == NULL) {
    if ((rc = op__tmpl_new(L, (int)n, &t, err, errlen)) != 0)
      return rc;
    if (vs->tmpl[n] == NULL) {
      vs->tmpl[n] = t;
    } else { /* built meanwhile by a nested call */
      op__tmpl_free(t);
      t = vs->tmpl[n];
    }
  }
  if (vs->setupval == 0)
    vs->setupval = op__chunk_setupval(L, &vs->dump);
  op__buf_init(&c);
  if ((rc = factory_chunk(vs, id, t, &c, &sets, err, errlen)) != 0) {
    op__buf_free(&c);
    return rc;
  }
  st = luaL_loadbufferx(L, c.p, c.len, "=(offpath factory)", "b");
  op__buf_free(&c);
  if (st != LUA_OK) {
    setmsg(err, errlen, "loading factory: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return st == LUA_ERRMEM ? OP_ENOMEM : OP_EINVAL;
  }
  lua_call(L, 0, 1); /* the chunk returns the factory */
  if (slot >= vs->nfc) {
    size_t cap = vs->nfc ? vs->nfc : 16;
    while (cap <= slot)
      cap *= 2;
    if ((nfc = realloc(vs->fc, cap * sizeof *nfc)) == NULL) {
      lua_pop(L, 1);
      setmsg(err, errlen, "not enough memory");
      return OP_ENOMEM;
    }
    memset(nfc + vs->nfc, 0, (cap - vs->nfc) * sizeof *nfc);
    vs->fc = nfc;
    vs->nfc = cap;
  }
  ref = luaL_ref(L, LUA_REGISTRYINDEX);
  fc = &vs->fc[slot];
  if (fc->ref > 0 && fc->id == id) { /* loaded meanwhile by a nested decode */
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
  } else {
    drop_factory(vs, L, fc); /* the slot's previous function, if any */
    fc->ref = ref;
    fc->id = id;
    vs->nfactories++;
  }
  fc->nup = (int)n;
  fc->reuse = n == 0 || (vs->setupval > 0 && !sets);
  fc->used = ++vs->fclock;
  if (vs->nfactories > FACTORY_CAP)
    evict_factories(vs, L, slot);
  return 0;
}

/* ---- search paths (see DESIGN) ---- */

/* One publication: "path" NUL "cpath" NUL; refs counts the store's own
** reference and those of workers copying it out. */
struct paths_blob {
  unsigned refs;
  size_t plen, clen;
  char bytes[];
};

/* Drop a reference to b; free it with the last one. Thread: any. */
static void paths_release(op_protostore *ps, paths_blob *b) {
  unsigned left;

  uv_mutex_lock(&ps->mu);
  left = --b->refs;
  uv_mutex_unlock(&ps->mu);
  if (left == 0)
    free(b);
}

/* The record vs->paths_ref names in the registry. */
enum { R_PACKAGE = 1, R_HIDDEN, R_MT, R_PATH, R_CPATH };

/* __newindex of the hooked package table: path and cpath go to the hidden
** table (upvalue 1) and bump the epoch (upvalue 2); other keys are stored
** in the table itself.  [-0, +0, m] */
static int paths_newindex(lua_State *L) {
  const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "";
  lua_Integer *epoch;

  lua_settop(L, 3);
  if (strcmp(k, "path") != 0 && strcmp(k, "cpath") != 0) {
    lua_rawset(L, 1);
    return 0;
  }
  lua_rawset(L, lua_upvalueindex(1));
  epoch = lua_touserdata(L, lua_upvalueindex(2));
  (*epoch)++;
  return 0;
}

/* Make the record {package, hidden, metatable} and hook the package
** table: its path and cpath move to the hidden table, which the metatable
** serves reads from and stores writes into.  [-0, +0, e] */
static int paths_hook(lua_State *L) {
  op_vmstore *vs = lua_touserdata(L, 1);
  lua_Integer *epoch;

  lua_settop(L, 0);
  lua_createtable(L, 5, 0); /* 1: the record */
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, LUA_LOADLIBNAME) != LUA_TTABLE)
    return 0;        /* no package library: nothing to follow */
  lua_replace(L, 2); /* 2: package */
  lua_settop(L, 2);
  lua_pushvalue(L, 2);
  lua_rawseti(L, 1, R_PACKAGE);
  lua_createtable(L, 0, 2); /* 3: hidden */
  if (lua_getmetatable(L, 2)) {
    /* Someone else's metatable: compare the strings on every task. */
    lua_pop(L, 1);
  } else {
    lua_getfield(L, 2, "path");
    lua_setfield(L, 3, "path");
    lua_getfield(L, 2, "cpath");
    lua_setfield(L, 3, "cpath");
    lua_createtable(L, 0, 3); /* 4: the metatable */
    lua_pushvalue(L, 3);
    lua_setfield(L, 4, "__index");
    /* Protected: without it, the fields would vanish with it. */
    lua_pushliteral(L, "offpath: package.path and package.cpath are "
                       "followed for the worker VMs");
    lua_setfield(L, 4, "__metatable");
    lua_pushvalue(L, 3);
    epoch = lua_newuserdatauv(L, sizeof *epoch, 0);
    *epoch = 0;
    lua_pushcclosure(L, paths_newindex, 2);
    lua_setfield(L, 4, "__newindex");
    lua_pushvalue(L, 3);
    lua_rawseti(L, 1, R_HIDDEN);
    lua_pushvalue(L, 4);
    lua_rawseti(L, 1, R_MT);
    lua_pushnil(L);
    lua_setfield(L, 2, "path");
    lua_pushnil(L);
    lua_setfield(L, 2, "cpath");
    lua_pushvalue(L, 4);
    lua_setmetatable(L, 2);
    vs->paths_epoch = epoch; /* anchored by the metatable's closure */
    vs->paths_mt = lua_topointer(L, 4);
  }
  lua_pushvalue(L, 1);
  vs->paths_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* Whether the hook on the package table is still in place: our metatable,
** and no path or cpath stored in the table itself (rawset).  [-0, +0, -] */
static int paths_hooked(op_vmstore *vs, lua_State *L, int pkg) {
  int ok;

  if (!lua_getmetatable(L, pkg))
    return 0;
  ok = lua_topointer(L, -1) == vs->paths_mt;
  lua_pop(L, 1);
  if (!ok)
    return 0;
  lua_pushliteral(L, "path");
  ok = lua_rawget(L, pkg) == LUA_TNIL;
  lua_pop(L, 1);
  lua_pushliteral(L, "cpath");
  ok = ok && lua_rawget(L, pkg) == LUA_TNIL;
  lua_pop(L, 1);
  return ok;
}

/* The slow half of op__paths_out: check the hook, read both strings and
** publish them if they differ from the last ones.  [-0, +0, m] */
void op__paths_check(op_vmstore *vs, lua_State *L) {
  op_protostore *ps = vs->ps;
  const char *p, *c;
  size_t plen, clen;
  paths_blob *b, *old;
  int top = lua_gettop(L), r = top + 1, pkg = top + 2;

  if (vs->paths_ref == 0 &&
      (protect(L, paths_hook, vs) != LUA_OK || vs->paths_ref == 0)) {
    vs->paths_ref = -1; /* no package library, or no memory: give up */
    return;
  }
  if (vs->paths_ref < 0)
    return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, vs->paths_ref);
  lua_rawgeti(L, r, R_PACKAGE);
  if (vs->paths_epoch != NULL) {
    if (paths_hooked(vs, L, pkg))
      vs->paths_epoch_seen = *vs->paths_epoch;
    else
      vs->paths_epoch = NULL; /* replaced or bypassed: look every time */
  }
  lua_getfield(L, pkg, "path");
  lua_getfield(L, pkg, "cpath");
  p = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &plen) : NULL;
  c = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &clen) : NULL;
  lua_rawgeti(L, r, R_PATH);
  lua_rawgeti(L, r, R_CPATH);
  if (p == NULL || c == NULL ||
      (lua_rawequal(L, -4, -2) && lua_rawequal(L, -3, -1))) {
    lua_settop(L, top);
    return;
  }
  b = malloc(sizeof *b + plen + clen + 2);
  if (b == NULL) {
    lua_settop(L, top);
    luaL_error(L, "not enough memory");
    return;
  }
  b->refs = 1;
  b->plen = plen;
  b->clen = clen;
  memcpy(b->bytes, p, plen + 1);
  memcpy(b->bytes + plen + 1, c, clen + 1);
  lua_pop(L, 2);
  lua_rawseti(L, r, R_CPATH);
  lua_rawseti(L, r, R_PATH);
  lua_settop(L, top);
  uv_mutex_lock(&ps->mu);
  old = ps->paths;
  ps->paths = b;
  atomic_fetch_add_explicit(&ps->paths_gen, 1, memory_order_release);
  uv_mutex_unlock(&ps->mu);
  if (old != NULL)
    paths_release(ps, old);
}

/* Take the hook off the package table if it is still ours, putting path
** and cpath back in it.  [-0, +0, m] */
static int paths_unhook(lua_State *L) {
  op_vmstore *vs = lua_touserdata(L, 1);

  lua_rawgeti(L, LUA_REGISTRYINDEX, vs->paths_ref); /* 2 */
  lua_rawgeti(L, 2, R_PACKAGE);                     /* 3 */
  lua_rawgeti(L, 2, R_HIDDEN);                      /* 4 */
  if (vs->paths_epoch == NULL || !paths_hooked(vs, L, 3))
    return 0;
  lua_pushnil(L);
  lua_setmetatable(L, 3);
  lua_getfield(L, 4, "path");
  lua_setfield(L, 3, "path");
  lua_getfield(L, 4, "cpath");
  lua_setfield(L, 3, "cpath");
  return 0;
}

/* Set package.path and package.cpath from the blob.  [-1, +0, m] */
static int paths_set(lua_State *L) {
  const paths_blob *b = lua_touserdata(L, 1);

  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, LUA_LOADLIBNAME) != LUA_TTABLE)
    return 0;
  lua_pushlstring(L, b->bytes, b->plen);
  lua_setfield(L, -2, "path");
  lua_pushlstring(L, b->bytes + b->plen + 1, b->clen);
  lua_setfield(L, -2, "cpath");
  return 0;
}

/* The slow half of op__paths_in: copy the published paths in.
** [-0, +0, -] */
void op__paths_take(op_vmstore *vs, lua_State *L) {
  op_protostore *ps = vs->ps;
  paths_blob *b;
  unsigned gen;
  int st;

  uv_mutex_lock(&ps->mu);
  b = ps->paths;
  gen = atomic_load_explicit(&ps->paths_gen, memory_order_relaxed);
  if (b != NULL)
    b->refs++;
  uv_mutex_unlock(&ps->mu);
  if (b == NULL)
    return;
  st = protect(L, paths_set, b);
  paths_release(ps, b);
  if (st == LUA_OK)
    vs->paths_gen = gen; /* else: tried again with the next task */
}
