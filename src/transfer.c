/* SPDX-License-Identifier: MIT */
/*
** transfer.c - copying Lua values between VMs: the wire encoding, the
** runtime-wide prototype store, and each VM's name maps and caches.
** Thread: op__encode/op__decode on the thread owning that VM; store: any.
*/

/*
** DESIGN
**
** Wire format
** -----------
** op__encode appends a header byte, then one value after another, with no
** count: the decoder reads values until the bytes end (several encodings
** appended to one buffer decode as one list). Every value starts with a
** tag byte:
**
**   0x00 NIL   0x01 FALSE   0x02 TRUE
**   0x03 INT     zigzag varint          (integers stay integers)
**   0x04 FLOAT   8 bytes, host order    (same process: inf, nan, -0.0 kept)
**   0x05 STR     varint length, bytes   (strings of 32 bytes or more)
**   0x20+n       a string of n < 32 bytes follows
**   0x40+v+32    the integer v, -32 <= v <= 159, in the tag alone
**   0x06 GLOBALS the destination's global table
**   0x07 NAMED   varint length, name    (a library value or module field)
**   0x08 CFUNC   varint store id        (a C function without upvalues)
**   0x09 REF     varint seq             (an object met before)
**   0x0A UPJOIN  varint seq, byte i     (upvalue slot only: share upvalue
**                                         i+1 of function seq)
**   0x0B HDR     starts the output of each op__encode call; 0x0C HDR_REFS
**                if REF or UPJOIN occur in it
**   0x10|f TABLE n_arr, n_hash, n_arr values, n_hash key/value pairs,
**                then the metatable if f & 2 (MT)
**   0x14|f FUNC  varint prototype id, then one value (or UPJOIN) per
**                upvalue; f & 2 (FIRST): see below
**
** Varints are LEB128 (7 bits a byte, low group first, 0x80 = more). The
** two table counts are written as 2-byte padded varints and patched when
** the table is done (a table of 16384 entries or more is shifted to make
** room). Tables and by-value functions get a sequence number (seq) in the
** order their tags appear; REF and UPJOIN name them by it. Flag 1 (REFD)
** on a TABLE or FUNC tag means "something refers back to this object":
** only then does the decoder remember it, in a refs table made on the
** first such object, so plain values never pay for cycle support; the
** header says whether the decoder needs a stack slot for that table. The
** encoder sets both when it emits the back reference, by patching the
** bytes it wrote earlier. Sequence numbers restart at each header.
**
** Names. A table, C function, Lua function or userdata that is a module in
** package.loaded, or a field of one (two levels: "offpath.http.request"),
** travels as its name: module name and fields joined by NUL bytes. Each VM
** has a names table in its registry holding value -> first name and
** name -> value, built in op__xfer_new. When encoding misses a table, C
** function or userdata, package.loaded is rescanned (at most once per
** op__encode call) if a module was added since the last scan. To know
** that in O(1), op__xfer_new gives package.loaded a metatable whose
** __newindex stores the key and bumps a counter (require stores modules
** with lua_setfield, which calls it); if package.loaded already has a
** metatable, or a script replaces ours (checked on every 64th miss),
** every miss rescans instead: slower, same result. The decoder looks the
** name up and on a miss calls require(module) and walks the fields,
** protected. The source VM's global table becomes the destination's
** globals.
**
** Prototype identity
** ------------------
** Bytecode never travels in the buffer. The store (op_protostore) maps ids
** to dumped, unstripped prototypes and to C function pointers (see "The
** bounded store" below). The encoder keys its cache by the Proto pointer, read from
** the LClosure that lua_topointer returns (Lua 5.4 layout, mirrored in
** lclosure_mirror and checked once per op_xfer by check_layout(): two
** closures of one function must share p, a third must not, and the
** upvals[] slots must equal lua_upvalueid). Fresh closures made per event
** from one prototype all hit; two functions on one line differ. The first
** closure of every cached prototype is kept in the anchors table, so the
** Proto can never be freed and its address reused for other code (it also
** keeps that one closure's upvalue values alive; the price of one pointer
** compare per task). If the layout check fails, the key is the lua_dump
** string itself, interned in a table: correct, but it costs a dump per task.
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
** template's inner function, so P captures the factory's parameters. For
** n > 200 (a function has at most 200 locals) the template nests one more
** function taking the parameters after u128 (...). Calling the factory with
** the upvalue values returns a new closure with new upvalue cells, as Lua
** does for any nested function; no bytecode is touched per task. P keeps
** its own source string, so tracebacks show the original file and line.
** A FUNC tag with FIRST set is one whose closure must exist before its
** upvalues are decoded (it refers to itself, or shares cells through
** UPJOIN): the factory is called with no arguments, the closure is
** registered, and each upvalue is set (lua_setupvalue, into the fresh
** cells) or joined (lua_upvaluejoin). Otherwise the upvalues are decoded
** straight onto the stack as the factory's arguments.
**
** Reused instances. A function whose code (nested functions included) has
** no SETUPVAL instruction never changes its upvalue cells, so two closures
** of it whose upvalues hold the same plain values (nil, booleans, numbers,
** strings, names, C functions: nothing with state or identity of its own)
** behave alike, and the decoder keeps the last one it made per prototype
** with the bytes its upvalues were encoded as. A FUNC whose upvalue bytes
** are the same (memcmp, at most KEY_MAX) gets that instance again: no
** factory call, no upvalue decode. Only identity tells the two apart, and
** the debug library (debug.setupvalue) can still write the cells. The
** opcode number is checked per VM (setupval_opcode); if the check fails,
** only functions without upvalues are reused.
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
** anchors go first (protected), then each id is retired and its encode
** cache slot cleared, then the map is rebuilt without them. Once the
** anchor is gone the Proto may be collected and its address reused by a
** new function, which then misses every cache and gets a new id.
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
**   named      per VM, C map object -> its name (pointer into the Lua
**              string held by the names table).
**   seen       per VM, C map object/upvalue cell -> seq, for one encode;
**              emptied in O(1) by bumping a generation number.
**   fc         per VM, id -> registry ref of the factory, and n.
**   tmpl       per VM, factory template pieces by upvalue count.
** All Lua objects are anchored in the VM's registry under the addresses
** of static variables; op__xfer_free drops them.
**
** Thread safety of the store
** --------------------------
** Slots sit in chunks of 64, 128, 256, ... that never move. Every access
** takes the store mutex: an insert, a retirement, and a decoder's read
** of an entry (only when a VM loads a factory or decodes a C function,
** not per task): load_factory builds the factory chunk from the entry's
** bytes under the lock, since the entry may be freed once it is
** released. Lock order: the store mutex is a leaf; no Lua call under it.
**
** Search paths
** ------------
** Workers use the main VM's package.path and package.cpath as they are
** when a task is submitted. op__xfer_paths_out runs on the main VM before
** each pool task is queued. To know in O(1) that neither string changed,
** its first call hooks the package table, as for package.loaded: path and
** cpath move to a hidden table that the table's new metatable reads
** through (__index) and writes into (__newindex, which bumps an epoch), so
** reads, require and assignments behave as before and only rawget and
** pairs on the package table no longer see the two fields (the
** metatable is protected: setmetatable(package, ...) raises, since the
** fields would go with it). Per task the epoch is compared; on a change,
** and every 256th task (to notice a rawset or debug.setmetatable, after
** which both strings are read on every task), the strings are compared
** with the last published ones and, if different, a new immutable blob is
** published in the store under its mutex and paths_gen is bumped.
** op__xfer_paths_in, on a worker before it decodes a task, sets its VM's
** two fields when paths_gen moved past the one it applied last, holding a
** reference to the blob (refs, under the mutex) while it copies the
** strings out. Between changes a worker's own assignments (a pool's init
** script) stay. op__xfer_free puts the two fields back.
**
** Encoding fast paths
** -------------------
** Per task the encoder avoids the Lua API where it can: scalar upvalues
** (nil, booleans, numbers) are read from the cell through upval_mirror
** (UpVal and TValue of Lua 5.4, checked by check_upvals() against
** lua_getupvalue for open and closed cells; off if that check fails), and
** the cells of the first by-value function of an encoding are put in the
** seen map only when a second function appears (nothing can share them
** before). The reference map is C memory kept in the op_xfer, so a tiny
** closure costs no allocation at all.
**
** The encoder never raises: the few steps that allocate Lua objects (the
** names rescan, anchoring a new prototype) run under lua_pcall, so the
** encoder's C state is always consistent. An encode entered again from a
** finalizer during those steps uses a private seen map.
*/
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

#define MAX_DEPTH   200 /* nested tables and functions, both directions */
#define NAME_DEPTH  2   /* module.a.b at most */
#define ONE_LEVEL   200 /* largest n for a one-level factory template */
#define SPLIT       128 /* parameters of the outer factory when nested */
#define PROTO_CAP   OP_PROTO_CAP /* see internal.h */
#define FACTORY_CAP OP_FACTORY_CAP
#define STORE_GRACE OP_STORE_GRACE

/* ---- wire tags ---- */

enum {
  T_NIL = 0x00,
  T_FALSE = 0x01,
  T_TRUE = 0x02,
  T_INT = 0x03,
  T_FLOAT = 0x04,
  T_STR = 0x05,
  T_GLOBALS = 0x06,
  T_NAMED = 0x07,
  T_CFUNC = 0x08,
  T_REF = 0x09,
  T_UPJOIN = 0x0A,
  T_HDR = 0x0B,      /* starts each op__encode output */
  T_HDR_REFS = 0x0C, /* the same, with back references inside */
  T_TABLE = 0x10,    /* | F_REFD | F_MT */
  T_FUNC = 0x14,     /* | F_REFD | F_FIRST */
  T_SSTR = 0x20,     /* + length */
  T_FIXINT = 0x40    /* + value - FIXINT_MIN */
};

#define F_REFD     0x01
#define F_MT       0x02
#define F_FIRST    0x02
#define SSTR_MAX   31
#define FIXINT_MIN (-32)
#define FIXINT_MAX 159

/* ---- pointer maps ---- */

/*
** Open addressing, linear probing, load factor at most 1/2. A slot is in
** use iff its gen equals the map's gen, so clearing a map is one increment.
*/
typedef struct pslot {
  const void *key;
  uintptr_t aux; /* seen: tag offset, or owner closure (X_UPV); named: name */
  uint32_t gen;
  uint32_t val;   /* id, seq, name length or upvalue index */
  uint32_t extra; /* seen: X_* flags */
} pslot;

typedef struct pmap {
  pslot *slot;
  uint32_t mask;
  uint32_t count;
  uint32_t gen;
} pmap;

#define X_FUNC 1u /* a by-value Lua function */
#define X_OPEN 2u /* its upvalues are being encoded now */
#define X_UPV  4u /* an upvalue cell; aux is its owner closure */

static uint32_t phash(const void *k) {
  return (uint32_t)(((uint64_t)(uintptr_t)k * 0x9E3779B97F4A7C15ull) >> 32);
}

static void pmap_init(pmap *m) {
  m->slot = NULL;
  m->mask = 0;
  m->count = 0;
  m->gen = 1;
}

static void pmap_free(pmap *m) {
  free(m->slot);
  pmap_init(m);
}

static pslot *pmap_find(const pmap *m, const void *key) {
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

static int pmap_grow(pmap *m) {
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
static pslot *pmap_add(pmap *m, const void *key) {
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
static void pmap_clear(pmap *m) {
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
static int paths_unhook(lua_State *L);

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

/* An id names a slot and the generation of its entry: an id whose entry
** was freed never names the entry that reuses the slot. */
#define ID_SLOT(id)        ((size_t)((id)&0xffffffffu))
#define ID_GEN(id)         ((uint32_t)((id) >> 32))
#define ID_MAKE(slot, gen) (((uint64_t)(gen) << 32) | (uint64_t)(slot))

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

/* ---- per-VM state ---- */

/* The pieces of a factory chunk for n upvalues: the template's bytes
** before and after its inner function, and where the inner function's
** upvalues come from (instack, idx) pairs. */
typedef struct tmpl {
  unsigned char *pre, *suf; /* one allocation: pre then suf */
  size_t pre_len, suf_len;
  unsigned char desc[2 * 255];
} tmpl;

/* The encode cache (see DESIGN): per Proto* slot, the bytes of a lone
** function's encoding and the upvalue values they were made from. */
#define ECACHE_N   16
#define ECACHE_UPV 8
#define ECACHE_LEN 48

typedef struct ecache {
  const void *proto; /* NULL: empty */
  size_t len;
  int nup;
  unsigned char tt[ECACHE_UPV];
  uint64_t v[ECACHE_UPV];
  unsigned char bytes[ECACHE_LEN]; /* header included */
} ecache;

#define KEY_MAX 64 /* longest upvalue encoding an instance is kept for */

typedef struct fcache {
  uint64_t id;   /* the store id it was loaded for */
  uint32_t used; /* x->fclock at its last use */
  int ref;       /* registry ref of the factory; 0: not loaded */
  int nup;
  int reuse;          /* the function never assigns an upvalue: see DESIGN */
  int inst;           /* registry ref of the last instance made, or 0 */
  size_t klen;        /* the encoding of inst's upvalues: key[0..klen) */
  unsigned char *key; /* KEY_MAX bytes, malloc'ed with the first inst */
} fcache;

struct op_xfer {
  lua_State *L;
  op_protostore *ps;
  int layout_ok; /* lclosure_mirror matches this Lua */
  int busy;      /* an encode is running (re-entry from a finalizer) */
  pmap protos;   /* Proto* -> store id */
  pmap named;    /* object -> name (aux: bytes, val: length) */
  pmap named_lf; /* the same for Lua closures (usually empty) */
  int fast_uv;   /* upval_mirror matches: read upvalues from the cells */
  int setupval;  /* SETUPVAL's opcode number as checked here, or -1 */
  ecache ec[ECACHE_N];
  const lua_Integer *epoch; /* bumped per new package.loaded key, or NULL */
  lua_Integer scanned;      /* *epoch at the last scan */
  const void *hook_mt;      /* our metatable of package.loaded */
  unsigned checks;          /* loaded_changed calls, to space out checks */
  const void *globals;      /* L's global table (anchored in names) */
  pmap seen;                /* the current encode's objects and upvalue cells */
  fcache *fc;               /* store slot -> factory */
  size_t nfc;
  size_t nfactories; /* fc entries loaded */
  uint32_t fclock;   /* factory uses, for eviction */
  uint32_t pclock;   /* prototype encodes, for eviction */
  tmpl *tmpl[256];
  op_buf dump; /* scratch for lua_dump */

  /* Search paths (see DESIGN). */
  int paths_ref;                  /* main: its search-path record; -1: none */
  const lua_Integer *paths_epoch; /* main: bumped per assignment, or NULL */
  lua_Integer paths_epoch_seen;   /* main: *paths_epoch at the last look */
  const void *paths_mt;           /* main: the package table's metatable */
  unsigned paths_checks;          /* main: tasks since the last full look */
  unsigned paths_gen;             /* worker: the paths_gen applied last */
};

/* Registry keys: addresses of these variables. */
static char names_key;   /* value -> name, name -> value */
static char anchors_key; /* Proto* -> one closure of it */
static char dumps_key;   /* fallback: dump string -> id */
static char loaded_key;  /* package.loaded, as hooked */
static char hook_key;    /* its metatable (anchors the epoch) */
static char ecache_key;  /* the encode cache's string upvalues */
static char hints_key;   /* C function -> why it stays in its VM */
static char errtb_key;   /* traceback of the error being handled */

#if LUA_VERSION_NUM == 504
/* What lua_topointer returns for a Lua closure in Lua 5.4 (lobject.h). */
typedef struct lclosure_mirror {
  void *next;
  unsigned char tt;
  unsigned char marked;
  unsigned char nupvalues;
  void *gclist;
  const void *p;
  void *upvals[]; /* UpVal *, what lua_upvalueid returns */
} lclosure_mirror;
#define LUA_VLCL_TAG 6 /* LUA_TFUNCTION | (0 << 4) */

/* A TValue and an UpVal (lobject.h), to read scalar upvalues without
** pushing them. */
typedef struct tvalue_mirror {
  union {
    void *p;
    lua_Integer i;
    lua_Number n;
  } v;
  unsigned char tt;
} tvalue_mirror;

typedef struct upval_mirror {
  void *next;
  unsigned char tt;
  unsigned char marked;
  unsigned char tbc;
  const tvalue_mirror *v; /* the stack slot while open, else u.value */
} upval_mirror;

#define LUA_VUPVAL_TAG 9 /* LUA_NUMTYPES | (0 << 4) */
#define VT_NIL         0x00
#define VT_FALSE       0x01
#define VT_TRUE        0x11
#define VT_INT         0x03
#define VT_FLOAT       0x13
#define VT_SHRSTR      0x44 /* collectable */
#define VT_LNGSTR      0x54
#define VT_LCF         0x16 /* a light C function */
#define VT_TABLE       0x45
#endif


static void setmsg(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;

  if (err == NULL || errlen == 0)
    return;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* Run f(ud) protected on L. Returns the lua_pcall status; an error
** message is dropped.  [-0, +0, -] */
static int protect(lua_State *L, lua_CFunction f, void *ud) {
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

/* ---- names of library values and modules ---- */

/* Record that the value at vi is called by the string at ni, in the names
** table at nt: name -> value always, value -> name if it had none. Returns
** whether the value got its first name.  [-0, +0, m] */
static int add_name(op_xfer *x, lua_State *L, int nt, int ni, int vi) {
  const void *p = lua_topointer(L, vi);
  pmap *m = lua_type(L, vi) == LUA_TFUNCTION && !lua_iscfunction(L, vi)
                ? &x->named_lf
                : &x->named;
  pslot *s;
  size_t len;

  lua_pushvalue(L, ni);
  lua_pushvalue(L, vi);
  lua_rawset(L, nt);
  if (pmap_find(m, p) != NULL)
    return 0;
  lua_pushvalue(L, vi);
  lua_pushvalue(L, ni);
  lua_rawset(L, nt);
  if ((s = pmap_add(m, p)) == NULL)
    luaL_error(L, "not enough memory");
  s->aux = (uintptr_t)lua_tolstring(L, ni, &len); /* anchored by names */
  s->val = (uint32_t)len;
  return 1;
}

/* Whether the value at i can cross by name.  [-0, +0, -] */
static int nameable(lua_State *L, int i, int level) {
  int t = lua_type(L, i);

  return t == LUA_TTABLE || t == LUA_TFUNCTION ||
         (t == LUA_TUSERDATA && level <= 1);
}

/* Name the fields of the table at mi, whose name is at ni: functions,
** tables and userdata under string keys, and one level further down.
** For _G (is_g), only functions: user globals are not library values.
** [-0, +0, m] */
static void scan_fields(op_xfer *x, lua_State *L, int nt, int ni, int mi,
                        int level, int is_g) {
  size_t klen;
  const char *k;
  int top;

  luaL_checkstack(L, 8, NULL);
  lua_pushnil(L);
  while (lua_next(L, mi)) {
    top = lua_gettop(L);
    if (lua_type(L, top - 1) == LUA_TSTRING && nameable(L, top, level) &&
        !(is_g && lua_type(L, top) != LUA_TFUNCTION)) {
      k = lua_tolstring(L, top - 1, &klen);
      if (memchr(k, 0, klen) == NULL) {
        lua_pushvalue(L, ni);
        lua_pushlstring(L, "", 1);
        lua_pushvalue(L, top - 1);
        lua_concat(L, 3);
        if (add_name(x, L, nt, top + 1, top) && level < NAME_DEPTH &&
            lua_type(L, top) == LUA_TTABLE)
          scan_fields(x, L, nt, top + 1, top, level + 1, 0);
      }
    }
    lua_settop(L, top - 1);
  }
}

/* Name every module in package.loaded that has no name yet, then its
** fields. Lua-callable for protect(); arg 1 is the op_xfer.  [-0, +0, m] */
static int scan_modules(lua_State *L) {
  op_xfer *x = lua_touserdata(L, 1);
  int nt, lt, ft, nfresh = 0, i, top;
  const char *k;
  size_t klen;

  luaL_checkstack(L, 12, NULL);
  if (x->epoch != NULL)
    x->scanned = *x->epoch;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &names_key);
  nt = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lt = lua_gettop(L);
  if (!lua_istable(L, nt) || !lua_istable(L, lt))
    return 0;
  lua_newtable(L); /* the modules named now, as a list of their names */
  ft = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, lt)) {
    top = lua_gettop(L);
    if (lua_type(L, top - 1) == LUA_TSTRING && nameable(L, top, 0)) {
      k = lua_tolstring(L, top - 1, &klen);
      if (memchr(k, 0, klen) == NULL && add_name(x, L, nt, top - 1, top)) {
        lua_pushvalue(L, top - 1);
        lua_rawseti(L, ft, ++nfresh);
      }
    }
    lua_settop(L, top - 1);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  for (i = 1; i <= nfresh; i++) {
    lua_rawgeti(L, ft, i); /* name */
    lua_pushvalue(L, -1);
    lua_rawget(L, lt); /* module */
    if (lua_istable(L, -1))
      scan_fields(x, L, nt, lua_gettop(L) - 1, lua_gettop(L), 1,
                  lua_rawequal(L, -1, ft + 1));
    lua_pop(L, 2);
  }
  return 0;
}

/* ---- the LClosure layout check ---- */

/* Load and run the check chunk src with nargs arguments on top of L,
** leaving nres results. Returns 0, with L's stack reset to below the
** arguments, if the chunk does not load or run.  [-nargs, +(nres|0), -] */
static int run_check(lua_State *L, const char *src, int nargs, int nres) {
  int base = lua_gettop(L) - nargs;

  if (!lua_checkstack(L, nres + 2) ||
      luaL_loadbufferx(L, src, strlen(src), "=(check)", "t") != 0) {
    lua_settop(L, base);
    return 0;
  }
  lua_insert(L, base + 1);
  if (lua_pcall(L, nargs, nres, 0) != 0) {
    lua_settop(L, base);
    return 0;
  }
  return 1;
}

/* Whether lclosure_mirror reads Proto pointers correctly here.
** [-0, +0, -] */
static int check_layout(lua_State *L) {
#if LUA_VERSION_NUM == 504
  static const char chunk[] =
      "local function mk(a) return function() return a end end "
      "local function two(a, b) return function() return a, b end end "
      "return mk(1), mk(2), two(1, 2)";
  const lclosure_mirror *c[3];
  int ok = 1, i, top = lua_gettop(L);

  if (!run_check(L, chunk, 0, 3))
    return 0;
  for (i = 0; i < 3; i++) {
    c[i] = lua_topointer(L, top + 1 + i);
    if (c[i] == NULL || c[i]->tt != LUA_VLCL_TAG || c[i]->p == NULL ||
        c[i]->upvals[0] != lua_upvalueid(L, top + 1 + i, 1))
      ok = 0;
  }
  ok = ok && c[0]->p == c[1]->p && c[0]->p != c[2]->p && c[0]->nupvalues == 1 &&
       c[2]->nupvalues == 2 && c[0]->upvals[0] != c[1]->upvals[0];
  lua_settop(L, top);
  return ok;
#else
  (void)L;
  return 0;
#endif
}

#if LUA_VERSION_NUM == 504
/* Whether the upvalues of the closure at idx read through the mirrors
** equal what lua_getupvalue says: tags and values of scalars, tags and
** pointers of strings, light C functions and tables.  [-0, +0, -] */
static int upvals_match(lua_State *L, int idx, int n) {
  const lclosure_mirror *cl = lua_topointer(L, idx);
  const upval_mirror *uv;
  const tvalue_mirror *tv;
  int i, ok = 1;

  if (cl == NULL || cl->nupvalues != n)
    return 0;
  for (i = 0; i < n && ok; i++) {
    uv = cl->upvals[i];
    if (uv == NULL || uv->tt != LUA_VUPVAL_TAG || uv->v == NULL)
      return 0;
    tv = uv->v;
    lua_getupvalue(L, idx, i + 1);
    switch (tv->tt) {
    case VT_NIL:
      ok = lua_isnil(L, -1);
      break;
    case VT_FALSE:
    case VT_TRUE:
      ok = lua_isboolean(L, -1) && lua_toboolean(L, -1) == (tv->tt == VT_TRUE);
      break;
    case VT_INT:
      ok = lua_isinteger(L, -1) && lua_tointeger(L, -1) == tv->v.i;
      break;
    case VT_FLOAT:
      ok = lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) &&
           lua_tonumber(L, -1) == tv->v.n;
      break;
    case VT_SHRSTR:
    case VT_LNGSTR:
      ok = lua_type(L, -1) == LUA_TSTRING && lua_topointer(L, -1) == tv->v.p;
      break;
    case VT_LCF:
      ok = lua_iscfunction(L, -1) && lua_topointer(L, -1) == tv->v.p;
      break;
    case VT_TABLE:
      ok = lua_istable(L, -1) && lua_topointer(L, -1) == tv->v.p;
      break;
    default:
      ok = 0;
    }
    lua_pop(L, 1);
  }
  return ok;
}

/* Called with an open-upvalue closure: checks it and returns the result.
** [-0, +1, -] */
static int check_open(lua_State *L) {
  lua_pushboolean(L, upvals_match(L, 1, 2));
  return 1;
}
#endif

/* Whether upval_mirror reads upvalues correctly here, open and closed, for
** the scalar upvalues the encoder reads directly and the kinds the encode
** cache keys on: compared with lua_getupvalue.  [-0, +0, -] */
static int check_upvals(lua_State *L) {
#if LUA_VERSION_NUM == 504
  static const char chunk[] =
      "local check = ... "
      "local a, b, c, d, e, f = 81985529216486895, 2.5, true, false, nil, 's' "
      "local s, cf, t = string.rep('l', 60), string.len, string "
      "local g = function() return a, b, c, d, e, f, s, cf, t end "
      "local x, y = -7, 0.25 "
      "return g, check(function() return x, y end)";
  int ok, top = lua_gettop(L);

  lua_pushcfunction(L, check_open);
  if (!run_check(L, chunk, 1, 2))
    return 0;
  ok = lua_toboolean(L, -1) && upvals_match(L, top + 1, 9);
  lua_settop(L, top);
  return ok;
#else
  (void)L;
  return 0;
#endif
}

/* ---- op_xfer lifetime ---- */

/* package.loaded's __newindex: store, and count a new module.
** [-3, +0, e] */
static int loaded_newindex(lua_State *L) {
  lua_Integer *epoch = lua_touserdata(L, lua_upvalueindex(1));

  lua_settop(L, 3);
  lua_rawset(L, 1);
  (*epoch)++;
  return 0;
}

/* Hook package.loaded so that adding a module is seen in O(1): require
** stores modules with lua_setfield, which calls __newindex for new keys.
** Not done if it has a metatable already (then every encode that misses
** rescans). [-0, +0, m] */
static void hook_loaded(op_xfer *x, lua_State *L) {
  lua_Integer *epoch;
  int top = lua_gettop(L);

  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (!lua_istable(L, top + 1) || lua_getmetatable(L, top + 1)) {
    lua_settop(L, top);
    return;
  }
  epoch = lua_newuserdatauv(L, sizeof *epoch, 0);
  *epoch = 0;
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, top + 2);
  lua_pushcclosure(L, loaded_newindex, 1);
  lua_setfield(L, top + 3, "__newindex");
  lua_pushvalue(L, top + 3);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &hook_key);
  lua_pushvalue(L, top + 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &loaded_key);
  x->hook_mt = lua_topointer(L, top + 3);
  lua_setmetatable(L, top + 1);
  x->epoch = epoch;
  lua_settop(L, top);
}

/* Whether package.loaded may hold modules not scanned yet: the epoch
** moved, or our hook is gone (a script set another metatable; looked at
** on every 64th call only, as it costs a registry lookup). top is L's
** stack top. Never raises.  [-0, +0, -] */
static int loaded_changed(op_xfer *x, lua_State *L, int top) {
  int same;

  if (x->epoch == NULL || *x->epoch != x->scanned)
    return 1;
  if ((x->checks++ & 63) != 0)
    return 0;
  if (!lua_checkstack(L, 2))
    return 1;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &loaded_key);
  same = lua_getmetatable(L, -1) && lua_topointer(L, -1) == x->hook_mt;
  lua_settop(L, top);
  if (!same)
    x->epoch = NULL; /* from now on, every miss rescans */
  return !same;
}

/* Take the hook off package.loaded if it is still ours.  [-0, +0, -] */
static void unhook_loaded(op_xfer *x, lua_State *L) {
  int top = lua_gettop(L);

  if (x->epoch == NULL || !lua_checkstack(L, 3))
    return;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &loaded_key);
  if (lua_getmetatable(L, top + 1) && lua_topointer(L, -1) == x->hook_mt) {
    lua_pushnil(L);
    lua_setmetatable(L, top + 1);
  }
  lua_settop(L, top);
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &loaded_key);
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &hook_key);
  x->epoch = NULL;
}

/* Make the registry tables and the names. Lua-callable for protect().
** [-0, +0, m] */
static int xfer_init(lua_State *L) {
  op_xfer *x = lua_touserdata(L, 1);

  hook_loaded(x, L);
  lua_newtable(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  x->globals = lua_topointer(L, -1);
  lua_rawsetp(L, -2, &names_key); /* anchors the globals */
  lua_rawsetp(L, LUA_REGISTRYINDEX, &names_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &anchors_key);
  lua_createtable(L, ECACHE_N * ECACHE_UPV, 0);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &ecache_key);
  lua_pushcfunction(L, scan_modules);
  lua_pushlightuserdata(L, x);
  lua_call(L, 1, 0);
  return 0;
}

/* Make the transfer state of L: registry tables, the names of library
** values and modules, and the layout check. One per VM. Returns NULL on
** out of memory.  [-0, +0, m] */
op_xfer *op__xfer_new(lua_State *L, op_protostore *ps) {
  op_xfer *x = calloc(1, sizeof *x);

  if (x == NULL)
    return NULL;
  x->L = L;
  x->ps = ps;
  pmap_init(&x->protos);
  pmap_init(&x->named);
  pmap_init(&x->named_lf);
  pmap_init(&x->seen);
  op__buf_init(&x->dump);
  x->layout_ok = check_layout(L);
#ifdef OP_DEBUG
  if (getenv("OFFPATH_XFER_NO_MIRROR") != NULL)
    x->layout_ok = 0; /* tests: take the fallback paths */
  if (lua_checkstack(L, 1)) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &names_key);
    op_assert(lua_isnil(L, -1)); /* one op_xfer per VM */
    lua_pop(L, 1);
  }
#endif
  x->fast_uv = x->layout_ok && check_upvals(L);
  if (protect(L, xfer_init, x) != LUA_OK) {
    op__xfer_free(x);
    return NULL;
  }
  return x;
}

void op__xfer_free(op_xfer *x) {
  lua_State *L;
  size_t i;

  if (x == NULL)
    return;
  L = x->L;
  unhook_loaded(x, L);
  for (i = 0; i < x->nfc; i++) {
    if (x->fc[i].ref > 0)
      luaL_unref(L, LUA_REGISTRYINDEX, x->fc[i].ref);
    if (x->fc[i].inst > 0)
      luaL_unref(L, LUA_REGISTRYINDEX, x->fc[i].inst);
    free(x->fc[i].key);
  }
  if (lua_checkstack(L, 1)) {
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &names_key);
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &anchors_key);
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &dumps_key);
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &ecache_key);
    if (x->paths_ref > 0) {
      protect(L, paths_unhook, x);
      luaL_unref(L, LUA_REGISTRYINDEX, x->paths_ref);
    }
  }
  for (i = 0; i < 256; i++) {
    if (x->tmpl[i] != NULL)
      free(x->tmpl[i]->pre);
    free(x->tmpl[i]);
  }
  free(x->fc);
  pmap_free(&x->protos);
  pmap_free(&x->named);
  pmap_free(&x->named_lf);
  pmap_free(&x->seen);
  op__buf_free(&x->dump);
  free(x);
}

/* ---- encoding ---- */

enum { P_ROOT, P_FIELD, P_KEY, P_META, P_UPVAL };

/* One step of the path to the value being encoded, for refusals. */
typedef struct pathel {
  int kind;
  int idx;          /* P_ROOT: number (0: none); P_FIELD: key's index */
  const char *name; /* P_UPVAL */
} pathel;

typedef struct enc {
  op_xfer *x;
  lua_State *L;
  op_buf *b;
  pmap *seen;
  size_t hdr; /* offset of this encoding's header byte */
  uint32_t seq;
  int top;      /* L's stack top, tracked to save lua_gettop calls */
  int room;     /* lua_checkstack made room up to this index */
  int cells_on; /* upvalue cells are being registered */
  int first_nup;
  const void *first_fn; /* the function whose cells are not registered */
  int depth;
  int rescanned;
  int npath;
  const char *label;
  char *err;
  size_t errlen;
  pathel path[MAX_DEPTH + 8];
} enc;

static int enc_value(enc *e, int idx);

static void path_push(enc *e, int kind, int idx, const char *name) {
  pathel *p = &e->path[e->npath++];

  op_assert(e->npath <= MAX_DEPTH + 8);
  p->kind = kind;
  p->idx = idx;
  p->name = name;
}

/* A short description of the key at idx, in out.  [-0, +0, -] */
static void key_text(lua_State *L, int idx, char *out, size_t n) {
  size_t len;
  const char *s;

  switch (lua_type(L, idx)) {
  case LUA_TSTRING:
    s = lua_tolstring(L, idx, &len);
    snprintf(out, n, "'%.*s%s'", (int)(len > 40 ? 40 : len), s,
             len > 40 ? "..." : "");
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx))
      snprintf(out, n, "%lld", (long long)lua_tointeger(L, idx));
    else
      snprintf(out, n, "%.14g", (double)lua_tonumber(L, idx));
    break;
  case LUA_TBOOLEAN:
    snprintf(out, n, "%s", lua_toboolean(L, idx) ? "true" : "false");
    break;
  default:
    snprintf(out, n, "(%s)", luaL_typename(L, idx));
  }
}

/* Append s to the nul-terminated string in dst[0..n), truncating. */
static void cat(char *dst, size_t n, const char *s) {
  size_t l = strlen(dst), m = strlen(s);

  if (l + 1 >= n)
    return;
  if (m > n - l - 1)
    m = n - l - 1;
  memcpy(dst + l, s, m);
  dst[l + m] = 0;
}

/*
** Render the path: root "<label> <no>" (or "<label>", or nothing), then
** " field 'k'" per table level, "key in ..." for a key, "metatable of ..."
** and "upvalue 'u' of function ..." (just "upvalue 'u'" at an empty root).
** upto: how many elements to use.  [-0, +0, -]
*/
static void path_text(enc *e, int upto, char *out, size_t n) {
  char a[512], b[512], k[64];
  int i;
  const pathel *p;

  a[0] = 0;
  for (i = 0; i < upto; i++) {
    p = &e->path[i];
    b[0] = 0;
    switch (p->kind) {
    case P_ROOT:
      if (e->label != NULL && e->label[0] != 0) {
        cat(b, sizeof b, e->label);
        if (p->idx != 0) {
          snprintf(k, sizeof k, " %d", p->idx);
          cat(b, sizeof b, k);
        }
      }
      break;
    case P_FIELD:
      key_text(e->L, p->idx, k, sizeof k);
      cat(b, sizeof b, a);
      cat(b, sizeof b, a[0] ? " field " : "field ");
      cat(b, sizeof b, k);
      break;
    case P_KEY:
    case P_META:
      cat(b, sizeof b, p->kind == P_KEY ? "key in " : "metatable of ");
      cat(b, sizeof b, a[0] ? a : "table");
      break;
    case P_UPVAL:
      cat(b, sizeof b, "upvalue '");
      cat(b, sizeof b, p->name ? p->name : "?");
      cat(b, sizeof b, "'");
      if (a[0]) {
        cat(b, sizeof b, " of ");
        if (strncmp(a, "function", 8) != 0)
          cat(b, sizeof b, "function ");
        cat(b, sizeof b, a);
      }
      break;
    }
    memcpy(a, b, sizeof a);
  }
  out[0] = 0;
  cat(out, n, a);
}

/* Fail with "cannot copy <what> (<path>)".  [-0, +0, -] */
static int refuse(enc *e, const char *what) {
  char p[512];

  path_text(e, e->npath, p, sizeof p);
  if (p[0])
    setmsg(e->err, e->errlen, "cannot copy %s (%s)", what, p);
  else
    setmsg(e->err, e->errlen, "cannot copy %s", what);
  return OP_ECOPY;
}

/* Fail with "cannot copy <what> (<path>): <hint>".  [-0, +0, -] */
static int refuse_hint(enc *e, const char *what, const char *hint) {
  char p[512];

  path_text(e, e->npath, p, sizeof p);
  if (p[0])
    setmsg(e->err, e->errlen, "cannot copy %s (%s): %s", what, p, hint);
  else
    setmsg(e->err, e->errlen, "cannot copy %s: %s", what, hint);
  return OP_ECOPY;
}

/* Fail with "cannot copy: nesting too deep (<root>)".  [-0, +0, -] */
static int too_deep(enc *e) {
  char p[512];

  path_text(e, 1, p, sizeof p);
  if (p[0])
    setmsg(e->err, e->errlen, "cannot copy: nesting too deep (%s)", p);
  else
    setmsg(e->err, e->errlen, "cannot copy: nesting too deep");
  return OP_ECOPY;
}

static int nomem(enc *e) {
  setmsg(e->err, e->errlen, "not enough memory");
  return OP_ENOMEM;
}

/* Make sure L has n free stack slots above e->top.  [-0, +0, -] */
static int need_slow(enc *e, int n) {
  if (!lua_checkstack(e->L, n + 16))
    return nomem(e);
  e->room = e->top + n + 16;
  return 0;
}
#define NEED(e, n) ((e)->top + (n) <= (e)->room ? 0 : need_slow((e), (n)))

/* Make room for n more bytes in e->b. */
static int room_slow(enc *e, size_t n) {
  return op__buf_reserve(e->b, n) == 0 ? 0 : nomem(e);
}
#define ROOM(e, n) ((e)->b->cap - (e)->b->len >= (n) ? 0 : room_slow((e), (n)))

static size_t put_varint(unsigned char *q, uint64_t v) {
  size_t n = 0;

  while (v >= 0x80) {
    q[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  q[n++] = (unsigned char)v;
  return n;
}

static size_t varint_len(uint64_t v) {
  size_t n = 1;

  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

#define WP(e) ((unsigned char *)(e)->b->p + (e)->b->len)

static int put_byte(enc *e, unsigned tag) {
  if (ROOM(e, 1))
    return OP_ENOMEM;
  e->b->p[e->b->len++] = (char)tag;
  return 0;
}

/* A tag followed by a varint. */
static int put_tagv(enc *e, unsigned tag, uint64_t v) {
  unsigned char *q;

  if (ROOM(e, 11))
    return OP_ENOMEM;
  q = WP(e);
  q[0] = (unsigned char)tag;
  e->b->len += 1 + put_varint(q + 1, v);
  return 0;
}

static int enc_int(enc *e, lua_Integer i) {
  uint64_t u = (uint64_t)i;

  if (i >= FIXINT_MIN && i <= FIXINT_MAX)
    return put_byte(e, (unsigned)(T_FIXINT + (i - FIXINT_MIN)));
  return put_tagv(e, T_INT, (u << 1) ^ (i < 0 ? ~(uint64_t)0 : 0));
}

static int enc_float(enc *e, lua_Number d) {
  double v = (double)d;

  if (ROOM(e, 9))
    return OP_ENOMEM;
  e->b->p[e->b->len] = (char)T_FLOAT;
  memcpy(e->b->p + e->b->len + 1, &v, 8);
  e->b->len += 9;
  return 0;
}

static int enc_bytes(enc *e, unsigned tag, const char *s, size_t len) {
  unsigned char *q;

  if (len > SIZE_MAX - 16 || ROOM(e, len + 11))
    return nomem(e);
  q = WP(e);
  if (tag == T_STR && len <= SSTR_MAX) {
    q[0] = (unsigned char)(T_SSTR + len);
    memcpy(q + 1, s, len);
    e->b->len += 1 + len;
    return 0;
  }
  q[0] = (unsigned char)tag;
  q += 1 + put_varint(q + 1, len);
  memcpy(q, s, len);
  e->b->len = (size_t)(q - (unsigned char *)e->b->p) + len;
  return 0;
}

/* A REF to the object of slot s; flags its tag as referred to. */
static int enc_ref(enc *e, const pslot *s) {
  unsigned char f = F_REFD;

  if ((s->extra & (X_FUNC | X_OPEN)) == (X_FUNC | X_OPEN))
    f |= F_FIRST; /* a function referring to itself: create it first */
  e->b->p[s->aux] = (char)(e->b->p[s->aux] | f);
  e->b->p[e->hdr] = (char)T_HDR_REFS;
  return put_tagv(e, T_REF, s->val);
}

/* If the object p has a name, write it: returns 1, or < 0 on error, or 0
** if it has none. With rescan, a miss rescans package.loaded once per
** encode.  [-0, +0, -] */
static int enc_named(enc *e, const void *p, int rescan) {
  const pslot *s = pmap_find(&e->x->named, p);
  int rc;

  if (s == NULL && rescan && !e->rescanned) {
    e->rescanned = 1; /* at most once per encode */
    if (loaded_changed(e->x, e->L, e->top) &&
        protect(e->L, scan_modules, e->x) == LUA_OK)
      s = pmap_find(&e->x->named, p);
  }
  if (s == NULL)
    return 0;
  rc = enc_bytes(e, T_NAMED, (const char *)s->aux, s->val);
  return rc < 0 ? rc : 1;
}

/* Register the upvalue cells of function p (n of them) in the seen map. */
static int add_cells(enc *e, const void *p, int n) {
#if LUA_VERSION_NUM == 504
  const lclosure_mirror *cl = p;
  pslot *s;
  int i;

  for (i = 0; i < n; i++) {
    if ((s = pmap_add(e->seen, cl->upvals[i])) == NULL)
      return nomem(e);
    s->aux = (uintptr_t)p;
    s->val = (uint32_t)i;
    s->extra = X_UPV;
  }
#else
  (void)e;
  (void)p;
  (void)n;
#endif
  return 0;
}

/*
** Whether the upvalue cells of function p (nup of them) may go without
** registration: only those of the first by-value function of an encoding,
** if it has few cells and no two are the same, so a graph with one
** closure never touches the map for them. When a second function comes,
** the first one's cells are registered then. Returns 1 (skip), 0
** (register) or an error.
*/
static int lazy_cells(enc *e, const void *p, int nup) {
  int i, j;

  if (e->cells_on)
    return 0;
#if LUA_VERSION_NUM == 504
  if (e->first_fn == NULL && e->x->layout_ok && nup <= 4) {
    const lclosure_mirror *cl = p;

    for (i = 0; i < nup; i++) {
      for (j = i + 1; j < nup; j++) {
        if (cl->upvals[i] == cl->upvals[j])
          goto register_all;
      }
    }
    e->first_fn = p;
    e->first_nup = nup;
    return 1;
  }
register_all:
#else
  (void)p;
  (void)nup;
  (void)i;
  (void)j;
#endif
  e->cells_on = 1;
  if (e->first_fn != NULL)
    return add_cells(e, e->first_fn, e->first_nup);
  return 0;
}

/* Write the two table counts into the 4 bytes reserved at off; a count
** of 2^14 or more needs more room, so the contents move and the offsets
** of the tags written after off move with them. */
static int put_counts(enc *e, size_t off, uint32_t narr, uint32_t nhash) {
  unsigned char *q;
  size_t need, delta, i;
  pslot *s;

  if (narr < (1u << 14) && nhash < (1u << 14)) {
    q = (unsigned char *)e->b->p + off;
    q[0] = (unsigned char)(0x80 | (narr & 0x7f));
    q[1] = (unsigned char)(narr >> 7);
    q[2] = (unsigned char)(0x80 | (nhash & 0x7f));
    q[3] = (unsigned char)(nhash >> 7);
    return 0;
  }
  need = varint_len(narr) + varint_len(nhash);
  delta = need - 4;
  if (ROOM(e, delta))
    return OP_ENOMEM;
  q = (unsigned char *)e->b->p + off;
  memmove(q + need, q + 4, e->b->len - off - 4);
  e->b->len += delta;
  q += put_varint(q, narr);
  put_varint(q, nhash);
  for (i = 0; e->seen->slot && i <= e->seen->mask; i++) {
    s = &e->seen->slot[i];
    if (s->gen == e->seen->gen && !(s->extra & X_UPV) && s->aux > off)
      s->aux += delta;
  }
  return 0;
}

/* Encode the table at idx: a REF, GLOBALS, its name, or its contents and
** metatable. The encoders below return 0 or an error code with the
** message set.  [-0, +0, -] */
static int enc_table(enc *e, int idx) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  const pslot *cs;
  pslot *s;
  size_t tagoff, cntoff;
  uint32_t narr = 0, nhash = 0;
  int rc, inarr = 1, k;

  if ((cs = pmap_find(e->seen, p)) != NULL)
    return enc_ref(e, cs);
  if (NEED(e, 4))
    return OP_ENOMEM;
  if (p == e->x->globals)
    return put_byte(e, T_GLOBALS);
  if ((rc = enc_named(e, p, 1)) != 0)
    return rc < 0 ? rc : 0;
  if (e->depth >= MAX_DEPTH)
    return too_deep(e);
  if (ROOM(e, 5) || (s = pmap_add(e->seen, p)) == NULL)
    return nomem(e);
  tagoff = e->b->len;
  s->val = e->seq++;
  s->aux = tagoff;
  e->b->p[tagoff] = (char)T_TABLE;
  cntoff = tagoff + 1;
  e->b->len += 5;
  e->depth++;
  lua_pushnil(L);
  k = ++e->top; /* key at k, value at k + 1 */
  while (lua_next(L, idx)) {
    e->top = k + 1;
    if (inarr && lua_isinteger(L, k) &&
        lua_tointeger(L, k) == (lua_Integer)narr + 1) {
      narr++;
    } else {
      inarr = 0;
      nhash++;
      path_push(e, P_KEY, 0, NULL);
      rc = enc_value(e, k);
      e->npath--;
      if (rc)
        return rc;
    }
    path_push(e, P_FIELD, k, NULL);
    rc = enc_value(e, k + 1);
    e->npath--;
    if (rc)
      return rc;
    lua_settop(L, k);
    e->top = k;
  }
  e->top = k - 1;
  if (lua_getmetatable(L, idx)) {
    e->b->p[tagoff] = (char)(e->b->p[tagoff] | F_MT);
    e->top++;
    path_push(e, P_META, 0, NULL);
    rc = enc_value(e, e->top);
    e->npath--;
    if (rc)
      return rc;
    lua_settop(L, --e->top);
  }
  e->depth--;
  return put_counts(e, cntoff, narr, nhash);
}

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  return op__buf_append(ud, p, sz) != 0;
}

/* Dump the function at idx into x->dump. Returns 0 or OP_ENOMEM.
** [-0, +0, -] */
static int dump_fn(op_xfer *x, lua_State *L, int idx) {
  int st;

  x->dump.len = 0;
  lua_pushvalue(L, idx);
  st = lua_dump(L, dump_writer, &x->dump, 0);
  lua_pop(L, 1);
  return st == 0 && x->dump.len > 32 ? 0 : OP_ENOMEM;
}

/* Store x->dump as a new prototype with nup upvalues. */
static int store_dump(op_xfer *x, int nup, uint64_t *id) {
  sentry *se = malloc(sizeof *se + x->dump.len);

  if (se == NULL)
    return OP_ENOMEM;
  se->kind = S_PROTO;
  se->nup = (uint8_t)nup;
  se->fn = NULL;
  se->len = x->dump.len;
  memcpy(se->bytes, x->dump.p, x->dump.len);
  return store_add(x->ps, se, id);
}

/* anchors[Proto pointer at arg 1] = closure at arg 2. Called through
** lua_pcall.  [-0, +0, m] */
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
** and its address reused; by then it is in no cache keyed by it (protos,
** the encode cache), and its store entry is retired (see the DESIGN
** block). On out of memory nothing changes.  [-0, +0, -] */
static void evict_protos(op_xfer *x, lua_State *L) {
  pmap *m = &x->protos, keep;
  uint32_t *age = NULL, cut, i;
  pkeys gone;
  pslot *s, *ns;
  size_t n = 0;
  ecache *c;

  gone.n = 0;
  gone.p = malloc(m->count * sizeof *gone.p);
  pmap_init(&keep);
  if (gone.p == NULL || (age = malloc(m->count * sizeof *age)) == NULL)
    goto done;
  for (i = 0; i <= m->mask; i++)
    if (m->slot[i].gen == m->gen)
      age[n++] = x->pclock - m->slot[i].extra;
  if (n < 4)
    goto done;
  qsort(age, n, sizeof *age, cmp_u32);
  cut = age[n - n / 4]; /* the oldest quarter is at or above it */
  for (i = 0; i <= m->mask; i++) {
    s = &m->slot[i];
    if (s->gen != m->gen)
      continue;
    if (x->pclock - s->extra >= cut) {
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
    if (s->gen != m->gen || x->pclock - s->extra < cut)
      continue;
    store_retire(x->ps, ID_MAKE(s->val, s->aux));
    c = &x->ec[(phash(s->key) >> 4) & (ECACHE_N - 1)]; /* ecache_slot */
    if (c->proto == s->key)
      c->proto = NULL;
  }
  pmap_free(m);
  *m = keep;
  pmap_init(&keep);
done:
  pmap_free(&keep);
  free(gone.p);
  free(age);
}

/* Fallback key: dump -> id through the dumps table. arg 1: {x, &id, nup}.
** Lua-callable for protect(). Sets id to UINT64_MAX on out of memory. */
typedef struct fbk {
  op_xfer *x;
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
  lua_pushlstring(L, f->x->dump.p, f->x->dump.len);
  lua_pushvalue(L, -1);
  if (lua_rawget(L, -3) == LUA_TNUMBER) {
    f->id = (uint64_t)lua_tointeger(L, -1);
    return 0;
  }
  lua_pop(L, 1);
  if (store_dump(f->x, f->nup, &f->id) != 0) {
    f->id = UINT64_MAX;
    return 0;
  }
  lua_pushinteger(L, (lua_Integer)f->id);
  lua_rawset(L, -3);
  return 0;
}

/* The store id and upvalue count of the Lua function at idx (pointer p),
** dumping and storing its prototype the first time.  [-0, +0, -] */
static int proto_id(enc *e, int idx, const void *p, uint64_t *id, int *nup) {
  op_xfer *x = e->x;
  lua_State *L = e->L;
  const pslot *cs;
  pslot *s;
  const void *proto;
  lua_Debug ar;
  fbk f;

#if LUA_VERSION_NUM == 504
  if (x->layout_ok) {
    proto = ((const lclosure_mirror *)p)->p;
    *nup = ((const lclosure_mirror *)p)->nupvalues;
    if ((s = pmap_find(&x->protos, proto)) != NULL) {
      *id = ID_MAKE(s->val, s->aux);
      s->extra = ++x->pclock; /* for evict_protos */
      return 0;
    }
    /* anchor, store, then cache: a failure before the cache only costs
    ** a second dump next time */
    lua_pushcfunction(L, anchor_fn);
    lua_pushlightuserdata(L, (void *)proto);
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
      lua_pop(L, 1);
      return nomem(e);
    }
    if (dump_fn(x, L, idx) != 0 || store_dump(x, *nup, id) != 0)
      return nomem(e);
    if ((s = pmap_add(&x->protos, proto)) == NULL) {
      store_retire(x->ps, *id);
      return nomem(e);
    }
    s->val = (uint32_t)ID_SLOT(*id);
    s->aux = ID_GEN(*id);
    s->extra = ++x->pclock;
    if (x->protos.count > PROTO_CAP)
      evict_protos(x, L);
    return 0;
  }
#endif
  (void)p;
  (void)cs;
  (void)s;
  (void)proto;
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  *nup = ar.nups;
  if (dump_fn(x, L, idx) != 0)
    return nomem(e);
  f.x = x;
  f.nup = *nup;
  if (protect(L, fallback_fn, &f) != LUA_OK || f.id == UINT64_MAX)
    return nomem(e);
  *id = f.id;
  return 0;
}

/* Encode the Lua function at idx: a REF, its name, or FUNC with its
** prototype id and upvalues.  [-0, +0, -] */
static int enc_lfunc(enc *e, int idx) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  const pslot *cs, *os;
  pslot *s;
  size_t tagoff;
  uint64_t id;
  int nup, i, rc, lazy;
  const void *uid;
  const char *name;
  unsigned char *q;

  if ((cs = pmap_find(e->seen, p)) != NULL)
    return enc_ref(e, cs);
  if ((cs = pmap_find(&e->x->named_lf, p)) != NULL)
    return enc_bytes(e, T_NAMED, (const char *)cs->aux, cs->val);
  if (e->depth >= MAX_DEPTH)
    return too_deep(e);
  if (NEED(e, 4))
    return OP_ENOMEM;
  if ((rc = proto_id(e, idx, p, &id, &nup)) != 0)
    return rc;
  if (ROOM(e, 11) || (s = pmap_add(e->seen, p)) == NULL)
    return nomem(e);
  tagoff = e->b->len;
  s->val = e->seq++;
  s->aux = tagoff;
  s->extra = X_FUNC | X_OPEN;
  q = WP(e);
  q[0] = T_FUNC;
  e->b->len += 1 + put_varint(q + 1, id);
  if ((lazy = lazy_cells(e, p, nup)) < 0)
    return lazy;
  e->depth++;
  for (i = 1; i <= nup; i++) {
#if LUA_VERSION_NUM == 504
    uid = e->x->layout_ok ? ((const lclosure_mirror *)p)->upvals[i - 1]
                          : lua_upvalueid(L, idx, i);
#else
    uid = lua_upvalueid(L, idx, i);
#endif
    if (!lazy && (cs = pmap_find(e->seen, uid)) != NULL) {
      /* a cell shared with an upvalue of a function met before */
      os = pmap_find(e->seen, (const void *)cs->aux);
      if (NEVER(os == NULL) || ROOM(e, 12))
        return nomem(e);
      e->b->p[os->aux] = (char)(e->b->p[os->aux] | F_REFD |
                                ((os->extra & X_OPEN) ? F_FIRST : 0));
      e->b->p[tagoff] = (char)(e->b->p[tagoff] | F_FIRST);
      e->b->p[e->hdr] = (char)T_HDR_REFS;
      q = WP(e);
      q[0] = T_UPJOIN;
      q += 1 + put_varint(q + 1, os->val);
      *q++ = (unsigned char)cs->val;
      e->b->len = (size_t)(q - (unsigned char *)e->b->p);
      continue;
    }
    if (!lazy) {
      if ((s = pmap_add(e->seen, uid)) == NULL)
        return nomem(e);
      s->aux = (uintptr_t)p;
      s->val = (uint32_t)(i - 1);
      s->extra = X_UPV;
    }
#if LUA_VERSION_NUM == 504
    if (e->x->fast_uv) { /* scalars straight from the cell */
      const tvalue_mirror *tv = ((const upval_mirror *)uid)->v;

      rc = 1;
      switch (tv->tt) {
      case VT_NIL:
        rc = put_byte(e, T_NIL);
        break;
      case VT_FALSE:
        rc = put_byte(e, T_FALSE);
        break;
      case VT_TRUE:
        rc = put_byte(e, T_TRUE);
        break;
      case VT_INT:
        rc = enc_int(e, tv->v.i);
        break;
      case VT_FLOAT:
        rc = enc_float(e, tv->v.n);
        break;
      }
      if (rc <= 0) {
        if (rc < 0)
          return rc;
        continue;
      }
    }
#endif
    name = lua_getupvalue(L, idx, i);
    path_push(e, P_UPVAL, 0, name);
    rc = enc_value(e, ++e->top);
    e->npath--;
    if (rc)
      return rc;
    lua_settop(L, --e->top);
  }
  e->depth--;
  if ((s = (pslot *)pmap_find(e->seen, p)) != NULL)
    s->extra &= ~X_OPEN;
  return 0;
}

/* Encode the C function at idx: by name only. A C function reached any
** other way is refused: its pointer means nothing to the other VM's state
** (an engine method would run against the worker's lua_State), so it
** never crosses by address. The refusal says why, with the hint given to
** op__xfer_hint for it if any.  [-0, +0, -] */
static int enc_cfunc(enc *e, int idx) {
  lua_State *L = e->L;
  const char *hint = NULL;
  int rc;

  if ((rc = enc_named(e, lua_topointer(L, idx), 1)) != 0)
    return rc < 0 ? rc : 0;
  if (lua_checkstack(L, 2)) {
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &hints_key) == LUA_TTABLE) {
      lua_pushvalue(L, idx);
      if (lua_rawget(L, -2) == LUA_TSTRING)
        hint = lua_tostring(L, -1); /* anchored by the hints table */
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  if (hint == NULL)
    hint = "only library and module functions cross, by name; "
           "call it on this side, or require its module in the worker";
  return refuse_hint(e, "C function", hint);
}

/* Encode the value at idx (an absolute index).  [-0, +0, -] */
static int enc_value(enc *e, int idx) {
  lua_State *L = e->L;
  size_t len;
  const char *s;
  int rc;

  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return put_byte(e, T_NIL);
  case LUA_TBOOLEAN:
    return put_byte(e, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx))
      return enc_int(e, lua_tointeger(L, idx));
    return enc_float(e, lua_tonumber(L, idx));
  case LUA_TSTRING:
    s = lua_tolstring(L, idx, &len);
    return enc_bytes(e, T_STR, s, len);
  case LUA_TTABLE:
    return enc_table(e, idx);
  case LUA_TFUNCTION:
    return lua_iscfunction(L, idx) ? enc_cfunc(e, idx) : enc_lfunc(e, idx);
  case LUA_TUSERDATA:
    if ((rc = enc_named(e, lua_topointer(L, idx), 1)) != 0)
      return rc < 0 ? rc : 0;
    return refuse(e, "userdata");
  case LUA_TLIGHTUSERDATA:
    return refuse(e, "userdata");
  default:
    return refuse(e, luaL_typename(L, idx));
  }
}

#if LUA_VERSION_NUM == 504
/* The encode cache's slot for a prototype. */
static ecache *ecache_slot(op_xfer *x, const void *proto) {
  return &x->ec[(phash(proto) >> 4) & (ECACHE_N - 1)];
}

/* Whether the cache may key on an upvalue's value: a scalar, a string
** (anchored when remembered), a light C function, or a table that crosses
** by name or as the globals (anchored by the names table). */
static int ec_plain(op_xfer *x, const tvalue_mirror *tv) {
  switch (tv->tt) {
  case VT_NIL:
  case VT_FALSE:
  case VT_TRUE:
  case VT_INT:
  case VT_FLOAT:
  case VT_SHRSTR:
  case VT_LNGSTR:
  case VT_LCF:
    return 1;
  case VT_TABLE:
    return tv->v.p == x->globals || pmap_find(&x->named, tv->v.p) != NULL;
  default:
    return 0;
  }
}

/* Whether an upvalue still holds the value remembered as tt, v. */

static int ec_same(const tvalue_mirror *tv, unsigned tt, uint64_t v) {
  uint64_t now;

  if (tv->tt != tt)
    return 0;
  if (tt == VT_NIL || tt == VT_FALSE || tt == VT_TRUE)
    return 1; /* no value bits */
  memcpy(&now, &tv->v, sizeof now);
  return now == v;
}

/* If the Lua function at idx was the last one encoded alone from its
** prototype and its upvalues still hold the same values, append that
** encoding to b and return 1.  [-0, +0, -] */
static int ecache_hit(op_xfer *x, lua_State *L, int idx, op_buf *b) {
  const lclosure_mirror *cl;
  const ecache *c;
  int i;

  if (lua_type(L, idx) != LUA_TFUNCTION || lua_iscfunction(L, idx))
    return 0;
  cl = lua_topointer(L, idx);
  c = ecache_slot(x, cl->p);
  if (c->proto != cl->p || c->nup != cl->nupvalues)
    return 0;
  for (i = 0; i < c->nup; i++) {
    if (!ec_same(((const upval_mirror *)cl->upvals[i])->v, c->tt[i], c->v[i]))
      return 0;
  }
  if (x->named_lf.count > 0 && pmap_find(&x->named_lf, cl) != NULL)
    return 0;
  return op__buf_append(b, c->bytes, c->len) == 0;
}

/* Remember the encoding at b->p + off of the lone Lua function at idx if
** it is a plain FUNC whose upvalues are all plain values. The strings
** among them are anchored, so an equal pointer later is the same string.
** [-0, +0, m] */
static void ecache_fill(op_xfer *x, lua_State *L, int idx, const op_buf *b,
                        size_t off) {
  const lclosure_mirror *cl = lua_topointer(L, idx);
  const unsigned char *q = (const unsigned char *)b->p + off;
  const tvalue_mirror *tv;
  size_t len = b->len - off;
  ecache *c;
  int i, slot;

  if (len > ECACHE_LEN || len < 2 || q[0] != T_HDR || q[1] != T_FUNC ||
      cl->nupvalues > ECACHE_UPV || !lua_checkstack(L, 2))
    return;
  for (i = 0; i < cl->nupvalues; i++) {
    if (!ec_plain(x, ((const upval_mirror *)cl->upvals[i])->v))
      return;
  }
  c = ecache_slot(x, cl->p);
  slot = (int)(c - x->ec) * ECACHE_UPV;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &ecache_key);
  for (i = 0; i < cl->nupvalues; i++) {
    tv = ((const upval_mirror *)cl->upvals[i])->v;
    c->tt[i] = tv->tt;
    memcpy(&c->v[i], &tv->v, sizeof c->v[i]);
    if (tv->tt == VT_SHRSTR || tv->tt == VT_LNGSTR) {
      lua_getupvalue(L, idx, i + 1);
      lua_rawseti(L, -2, slot + i + 1);
    }
  }
  lua_pop(L, 1);
  c->proto = cl->p;
  c->nup = cl->nupvalues;
  c->len = len;
  memcpy(c->bytes, q, len);
}
#endif

/* Append the encoding of the n values at idx.. of L to b; see the DESIGN
** block for the format. Refusals name the value's path (see path_text).
** Returns 0, or OP_ECOPY / OP_ENOMEM with a message in err, leaving b as
** it was. Never raises (stricter than internal.h's m).  [-0, +0, -] */
int op__encode(op_xfer *x, lua_State *L, int idx, int n, op_buf *b,
               const char *label, int first_no, char *err, size_t errlen) {
  enc e;
  pmap priv;
  size_t len0 = b->len;
  int top = lua_gettop(L), i, rc;

  if (idx < 0 && idx > LUA_REGISTRYINDEX)
    idx = top + idx + 1;
#if LUA_VERSION_NUM == 504
  if (n == 1 && x->fast_uv && !x->busy && ecache_hit(x, L, idx, b))
    return 0;
#endif
  e.x = x;
  e.L = L;
  e.b = b;
  e.hdr = len0;
  e.seq = 0;
  e.top = top;
  e.room = top;
  e.cells_on = 0;
  e.first_nup = 0;
  e.first_fn = NULL;
  e.depth = 0;
  e.rescanned = 0;
  e.npath = 0;
  e.label = label;
  e.err = err;
  e.errlen = errlen;
  if (err != NULL && errlen > 0)
    err[0] = 0;
  if (x->busy) {
    pmap_init(&priv); /* entered again from a finalizer */
    e.seen = &priv;
  } else {
    e.seen = &x->seen;
  }
  x->busy++;
  rc = put_byte(&e, T_HDR);
  for (i = 0; i < n && rc == 0; i++) {
    path_push(&e, P_ROOT, first_no == 0 && n == 1 ? 0 : first_no + i, NULL);
    rc = enc_value(&e, idx + i);
    e.npath--;
  }
  x->busy--;
  if (e.seen == &priv)
    pmap_free(&priv);
  else
    pmap_clear(&x->seen);
  if (rc != 0) {
    b->len = len0;
    lua_settop(L, top);
  }
  op_assert(rc != 0 || lua_gettop(L) == top);
#if LUA_VERSION_NUM == 504
  if (rc == 0 && n == 1 && x->fast_uv && !x->busy &&
      lua_type(L, idx) == LUA_TFUNCTION && !lua_iscfunction(L, idx))
    ecache_fill(x, L, idx, b, len0);
#endif
  return rc;
}

/* ---- binary chunks (Lua 5.4 ldump.c format) ---- */

#define HEADER_LEN 31 /* signature .. LUAC_NUM; then the upvalue count */

typedef struct fninfo {
  size_t upv_off; /* first upvalue descriptor */
  size_t nup;
  size_t protos_off; /* first nested function */
  size_t nprotos;
} fninfo;

static int ck_size(const unsigned char *s, size_t len, size_t *pos, size_t *v) {
  size_t x = 0;
  unsigned c;

  do {
    if (*pos >= len || x >= (SIZE_MAX >> 7))
      return -1;
    c = s[(*pos)++];
    x = (x << 7) | (c & 0x7f);
  } while ((c & 0x80) == 0);
  *v = x;
  return 0;
}

static int ck_skip(size_t len, size_t *pos, size_t n) {
  if (n > len - *pos)
    return -1;
  *pos += n;
  return 0;
}

static int ck_string(const unsigned char *s, size_t len, size_t *pos) {
  size_t n;

  if (ck_size(s, len, pos, &n))
    return -1;
  return n == 0 ? 0 : ck_skip(len, pos, n - 1);
}

/* Whether any of the n instructions at code has opcode op. */
static int has_opcode(const unsigned char *code, size_t n, int op) {
  uint32_t ins;
  size_t i;

  for (i = 0; i < n; i++) {
    memcpy(&ins, code + 4 * i, 4);
    if ((int)(ins & 0x7f) == op)
      return 1;
  }
  return 0;
}

/* Walk one function of a dumped chunk at *pos, checking bounds; fi (may be
** NULL) gets the offsets of its upvalue descriptors and first child. If
** op >= 0, *has_op (not NULL then) is set when the function or a nested
** one has an instruction with that opcode. */
static int ck_function(const unsigned char *s, size_t len, size_t *pos,
                       fninfo *fi, int depth, int op, int *has_op) {
  size_t n, i, v;

  if (depth > 250 || ck_string(s, len, pos) || ck_size(s, len, pos, &v) ||
      ck_size(s, len, pos, &v) || ck_skip(len, pos, 3))
    return -1;
  if (ck_size(s, len, pos, &n) || n > len / 4 || n * 4 > len - *pos)
    return -1; /* code */
  if (op >= 0 && has_opcode(s + *pos, n, op))
    *has_op = 1;
  *pos += n * 4;
  if (ck_size(s, len, pos, &n))
    return -1; /* constants */
  for (i = 0; i < n; i++) {
    if (*pos >= len)
      return -1;
    switch (s[(*pos)++]) {
    case 0x00:
    case 0x01:
    case 0x11: /* nil, false, true */
      break;
    case 0x03:
    case 0x13: /* integer, float */
      if (ck_skip(len, pos, 8))
        return -1;
      break;
    case 0x04:
    case 0x14: /* short, long string */
      if (ck_string(s, len, pos))
        return -1;
      break;
    default:
      return -1;
    }
  }
  if (ck_size(s, len, pos, &n) || n > 255)
    return -1;
  if (fi != NULL) {
    fi->upv_off = *pos;
    fi->nup = n;
  }
  if (ck_skip(len, pos, n * 3) || ck_size(s, len, pos, &n))
    return -1;
  if (fi != NULL) {
    fi->protos_off = *pos;
    fi->nprotos = n;
  }
  for (i = 0; i < n; i++) {
    if (ck_function(s, len, pos, NULL, depth + 1, op, has_op))
      return -1;
  }
  if (ck_size(s, len, pos, &n) || ck_skip(len, pos, n))
    return -1; /* lineinfo */
  if (ck_size(s, len, pos, &n))
    return -1; /* abslineinfo */
  for (i = 0; i < n; i++) {
    if (ck_size(s, len, pos, &v) || ck_size(s, len, pos, &v))
      return -1;
  }
  if (ck_size(s, len, pos, &n))
    return -1; /* locvars */
  for (i = 0; i < n; i++) {
    if (ck_string(s, len, pos) || ck_size(s, len, pos, &v) ||
        ck_size(s, len, pos, &v))
      return -1;
  }
  if (ck_size(s, len, pos, &n))
    return -1; /* upvalue names */
  for (i = 0; i < n; i++) {
    if (ck_string(s, len, pos))
      return -1;
  }
  return 0;
}

static void put_num(op_buf *b, int i) {
  char t[16];

  snprintf(t, sizeof t, "u%d", i);
  op__buf_append(b, t, strlen(t));
}

#define PUTS(b, s) op__buf_append((b), (s), sizeof(s) - 1)

/* Build the template pieces for n upvalues. Returns 0, or an error code
** with a message.  [-0, +0, m] */
static int build_tmpl(op_xfer *x, lua_State *L, int n, tmpl **out, char *err,
                      size_t errlen) {
  op_buf src, bin;
  int i, lvl = n > ONE_LEVEL ? 2 : 1, st, rc = OP_ENOMEM;
  int inner = lvl + 1; /* depth of the function P replaces */
  size_t pos, start = 0, end = 0;
  fninfo fi;
  tmpl *t = NULL;

  op__buf_init(&src);
  op__buf_init(&bin);
  PUTS(&src, "return function(");
  for (i = 1; i <= (lvl == 1 ? n : SPLIT); i++) {
    if (i > 1)
      PUTS(&src, ",");
    put_num(&src, i);
  }
  if (lvl == 2) {
    PUTS(&src, ",...) return (function(");
    for (i = SPLIT + 1; i <= n; i++) {
      if (i > SPLIT + 1)
        PUTS(&src, ",");
      put_num(&src, i);
    }
  }
  PUTS(&src, ") return function() local _");
  for (i = 1; i <= n; i++) {
    PUTS(&src, " _=");
    put_num(&src, i);
  }
  PUTS(&src, " end end");
  if (lvl == 2)
    PUTS(&src, ")(...) end");
  if (op__buf_append(&src, "", 1) != 0 || !lua_checkstack(L, 2))
    goto done;
  st = luaL_loadbufferx(L, src.p, src.len - 1, "=(offpath factory)", "t");
  op__buf_free(&src);
  if (st != LUA_OK) {
    setmsg(err, errlen, "cannot copy: factory template: %s",
           lua_tostring(L, -1));
    lua_pop(L, 1);
    rc = st == LUA_ERRMEM ? OP_ENOMEM : OP_EINVAL;
    goto done;
  }
  st = lua_dump(L, dump_writer, &bin, 0);
  lua_pop(L, 1);
  if (st != 0)
    goto done;
  /* main -> factory [-> inner factory] -> the function P will replace */
  pos = HEADER_LEN + 1;
  for (i = 0; i <= inner; i++) {
    start = pos;
    if (ck_function((unsigned char *)bin.p, bin.len, &pos, &fi, 0, -1, NULL) !=
            0 ||
        (i < inner && fi.nprotos != 1))
      goto bad;
    end = pos;
    pos = fi.protos_off;
  }
  if (fi.nup != (size_t)n)
    goto bad;
  if ((t = calloc(1, sizeof *t)) == NULL ||
      (t->pre = malloc(start + (bin.len - end) + 1)) == NULL)
    goto done;
  t->pre_len = start;
  t->suf_len = bin.len - end;
  t->suf = t->pre + start;
  memcpy(t->pre, bin.p, start);
  memcpy(t->suf, bin.p + end, t->suf_len);
  for (i = 0; i < n; i++) {
    t->desc[2 * i] = (unsigned char)bin.p[fi.upv_off + 3 * (size_t)i];
    t->desc[2 * i + 1] = (unsigned char)bin.p[fi.upv_off + 3 * (size_t)i + 1];
  }
  if (x->tmpl[n] == NULL) {
    x->tmpl[n] = t;
  } else { /* built meanwhile by a nested call */
    free(t->pre);
    free(t);
  }
  *out = x->tmpl[n];
  t = NULL;
  rc = 0;
  goto done;
bad:
  setmsg(err, errlen, "cannot copy: unexpected binary chunk layout");
  rc = OP_EINVAL;
done:
  if (t != NULL) {
    free(t->pre);
    free(t);
  }
  op__buf_free(&src);
  op__buf_free(&bin);
  if (rc == OP_ENOMEM && err != NULL && errlen > 0 && err[0] == 0)
    setmsg(err, errlen, "not enough memory");
  return rc;
}

/* ---- decoding ---- */

typedef struct dec {
  op_xfer *x;
  lua_State *L;
  const unsigned char *p, *end, *start;
  uint32_t seq;
  int depth;
  int refs; /* stack slot of the refs table (nil until needed), or 0 */
  char *err;
  size_t errlen;
} dec;

static int dec_value(dec *d);

static int corrupt(dec *d, const char *what) {
  setmsg(d->err, d->errlen, "corrupt encoding: %s at offset %zu", what,
         (size_t)(d->p - d->start));
  return OP_EINVAL;
}

static int dnomem(dec *d) {
  setmsg(d->err, d->errlen, "not enough memory");
  return OP_ENOMEM;
}

static int get_varint(dec *d, uint64_t *v) {
  uint64_t r = 0;
  unsigned shift = 0, c;

  do {
    if (d->p >= d->end)
      return corrupt(d, "truncated varint");
    c = *d->p++;
    if (shift == 63 && (c & 0x7e) != 0)
      return corrupt(d, "varint overflow");
    if (shift > 63)
      return corrupt(d, "varint too long");
    r |= (uint64_t)(c & 0x7f) << shift;
    shift += 7;
  } while (c & 0x80);
  *v = r;
  return 0;
}

/* Remember the object on top of L as sequence number seq.  [-0, +0, m] */
static int dec_register(dec *d, uint32_t seq) {
  lua_State *L = d->L;

  if (d->refs == 0)
    return corrupt(d, "back reference without header flag");
  if (lua_isnil(L, d->refs)) {
    lua_createtable(L, 0, 4);
    lua_replace(L, d->refs);
  }
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->refs, (lua_Integer)seq + 1);
  return 0;
}

/* Push the object with sequence number seq, if it was registered.
** [-0, +1, -] on success, [-0, +0, -] on error */
static int dec_ref(dec *d, uint64_t seq) {
  lua_State *L = d->L;

  if (seq >= d->seq || d->refs == 0 || !lua_istable(L, d->refs))
    return corrupt(d, "bad reference");
  if (lua_rawgeti(L, d->refs, (lua_Integer)seq + 1) == LUA_TNIL) {
    lua_pop(L, 1);
    return corrupt(d, "bad reference");
  }
  return 0;
}

/* Find a name missing from the names table: require the module, walk the
** fields. Lua-callable: name in arg 1; returns the value or nothing.
** [-1, +(0|1), e] */
static int resolve_name(lua_State *L) {
  size_t len, i, j;
  const char *s = luaL_checklstring(L, 1, &len);

  for (i = 0; i < len && s[i] != 0; i++)
    ;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushlstring(L, s, i);
  if (lua_istable(L, -2) && lua_rawget(L, -2) != LUA_TNIL) {
    /* loaded already */
  } else {
    lua_settop(L, 1);
    if (lua_getglobal(L, "require") != LUA_TFUNCTION)
      return 0;
    lua_pushlstring(L, s, i);
    lua_call(L, 1, 1);
  }
  while (i < len) {
    for (j = ++i; j < len && s[j] != 0; j++)
      ;
    if (!lua_istable(L, -1) && !lua_isuserdata(L, -1))
      return 0;
    lua_pushlstring(L, s + i, j - i);
    lua_gettable(L, -2);
    i = j;
  }
  return lua_isnil(L, -1) ? 0 : 1;
}

/* Push the value named by the len bytes at d->p.  [-0, +1, m] (on
** error nothing is pushed) */
static int dec_named(dec *d, size_t len) {
  lua_State *L = d->L;
  const char *s = (const char *)d->p;
  char show[128];
  size_t i;
  int top = lua_gettop(L);

  d->p += len;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &names_key);
  lua_pushlstring(L, s, len);
  if (lua_istable(L, top + 1) && lua_rawget(L, top + 1) != LUA_TNIL) {
    lua_replace(L, top + 1);
    return 0;
  }
  lua_settop(L, top + 1);
  lua_pushcfunction(L, resolve_name);
  lua_pushlstring(L, s, len);
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && !lua_isnil(L, -1)) {
    if (lua_istable(L, top + 1)) { /* cache name -> value */
      lua_pushlstring(L, s, len);
      lua_pushvalue(L, -2);
      lua_rawset(L, top + 1);
    }
    lua_replace(L, top + 1);
    return 0;
  }
  lua_settop(L, top);
  for (i = 0; i < len && i < sizeof show - 1; i++)
    show[i] = s[i] == 0 ? '.' : s[i];
  show[i] = 0;
  setmsg(d->err, d->errlen, "cannot copy: no value named '%s' in this VM",
         show);
  return OP_ECOPY;
}

/* The opcode number of SETUPVAL in this Lua (10 in 5.4's lopcodes.h,
** which is not a public header), checked once per VM on two dumped
** functions: one that assigns its upvalue and one that only reads it.
** Returns it, or -1 if the check fails (then no instance is reused).
** [-0, +0, m] */
static int setupval_opcode(op_xfer *x, lua_State *L) {
  static const char *const src[2] = {
    "local u return function() u = 1 end",
    "local u return function() return u end"
  };
  enum { OP_SETUPVAL_54 = 10 };
  int found[2] = { 0, 0 }, i;
  size_t pos;

  for (i = 0; i < 2; i++) {
    if (!run_check(L, src[i], 0, 1))
      return -1;
    if (dump_fn(x, L, -1) != 0) {
      lua_pop(L, 1);
      return -1;
    }
    lua_pop(L, 1);
    pos = HEADER_LEN + 1;
    if (x->dump.len <= pos ||
        ck_function((const unsigned char *)x->dump.p, x->dump.len, &pos, NULL,
                    0, OP_SETUPVAL_54, &found[i]) != 0)
      return -1;
  }
  return found[0] && !found[1] ? OP_SETUPVAL_54 : -1;
}

/* Move *pp past one encoded value that has no identity or state of its
** own (nil, a boolean, number or string, a name, a C function, the
** globals) and return 1; return 0 for anything else, or bytes that do
** not parse (the full decode reports those). */
static int skip_plain(const unsigned char **pp, const unsigned char *end) {
  const unsigned char *p = *pp;
  uint64_t v = 0;
  unsigned tag, shift = 0, c;

  if (p >= end)
    return 0;
  tag = *p++;
  if (tag >= T_FIXINT) {
    *pp = p;
    return 1;
  }
  if (tag >= T_SSTR) {
    v = tag - T_SSTR;
    goto bytes;
  }
  switch (tag) {
  case T_NIL:
  case T_FALSE:
  case T_TRUE:
  case T_GLOBALS:
    *pp = p;
    return 1;
  case T_FLOAT:
    v = 8;
    goto bytes;
  case T_INT:
  case T_CFUNC:
  case T_STR:
  case T_NAMED:
    do {
      if (p >= end || shift > 56)
        return 0;
      c = *p++;
      v |= (uint64_t)(c & 0x7f) << shift;
      shift += 7;
    } while (c & 0x80);
    if (tag == T_INT || tag == T_CFUNC) {
      *pp = p;
      return 1;
    }
    goto bytes;
  default:
    return 0;
  }
bytes:
  if (v > (uint64_t)(end - p))
    return 0;
  *pp = p + v;
  return 1;
}

/* Forget the factory and instance cached in fc.  [-0, +0, -] */
static void drop_factory(op_xfer *x, lua_State *L, fcache *fc) {
  if (fc->ref > 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, fc->ref);
    x->nfactories--;
  }
  if (fc->inst > 0)
    luaL_unref(L, LUA_REGISTRYINDEX, fc->inst);
  free(fc->key);
  memset(fc, 0, sizeof *fc);
}

/* More than FACTORY_CAP factories loaded: drop the quarter used least
** recently, except the one in slot keep. They are loaded again from the
** store if their functions come back.  [-0, +0, -] */
static void evict_factories(op_xfer *x, lua_State *L, size_t keep) {
  uint32_t *age, cut;
  size_t i, n = 0;

  if ((age = malloc(x->nfactories * sizeof *age)) == NULL)
    return; /* try again at the next load */
  for (i = 0; i < x->nfc && n < x->nfactories; i++)
    if (x->fc[i].ref > 0)
      age[n++] = x->fclock - x->fc[i].used;
  if (n < 4) {
    free(age);
    return;
  }
  qsort(age, n, sizeof *age, cmp_u32);
  cut = age[n - n / 4]; /* the oldest quarter is at or above it */
  free(age);
  for (i = 0; i < x->nfc; i++)
    if (x->fc[i].ref > 0 && i != keep && x->fclock - x->fc[i].used >= cut)
      drop_factory(x, L, &x->fc[i]);
}

/* Build the factory chunk for store entry id into c, under the store
** lock: the entry may be freed once it is released. 0, or an error code
** with the message set. */
static int factory_chunk(dec *d, uint64_t id, const tmpl *t, op_buf *c,
                         int *sets) {
  op_protostore *ps = d->x->ps;
  const sentry *se;
  const unsigned char *pb;
  fninfo fi;
  size_t pos, i, n;
  int rc = 0;

  uv_mutex_lock(&ps->mu);
  se = store_get(ps, id);
  if (se == NULL || se->kind != S_PROTO) {
    rc = corrupt(d, "bad prototype id");
    goto done;
  }
  n = se->nup;
  pb = (const unsigned char *)se->bytes;
  pos = HEADER_LEN + 1;
  if (se->len <= pos || memcmp(pb, t->pre, HEADER_LEN) != 0 ||
      pb[HEADER_LEN] != n ||
      ck_function(pb, se->len, &pos, &fi, 0, d->x->setupval, sets) != 0 ||
      pos != se->len || fi.nup != n) {
    setmsg(d->err, d->errlen, "stored prototype %llu is bad",
           (unsigned long long)id);
    rc = OP_EINVAL;
    goto done;
  }
  /* template head, P up to its upvalue descriptors, the rewritten
  ** descriptors, the rest of P, template tail */
  if (op__buf_reserve(c, t->pre_len + se->len + t->suf_len) != 0) {
    rc = dnomem(d);
    goto done;
  }
  op__buf_append(c, t->pre, t->pre_len);
  op__buf_append(c, pb + HEADER_LEN + 1, fi.upv_off - (HEADER_LEN + 1));
  for (i = 0; i < n; i++) {
    c->p[c->len++] = (char)t->desc[2 * i];
    c->p[c->len++] = (char)t->desc[2 * i + 1];
    c->p[c->len++] = (char)pb[fi.upv_off + 3 * i + 2]; /* P's kind */
  }
  op__buf_append(c, pb + fi.upv_off + 3 * n, se->len - fi.upv_off - 3 * n);
  op__buf_append(c, t->suf, t->suf_len);
done:
  uv_mutex_unlock(&ps->mu);
  return rc;
}

/* Load the factory for store entry id and cache it in the slot's fcache.
** [-0, +0, m] */
static int load_factory(dec *d, uint64_t id) {
  op_xfer *x = d->x;
  lua_State *L = d->L;
  op_protostore *ps = x->ps;
  const sentry *se;
  size_t slot = ID_SLOT(id), n;
  tmpl *t;
  op_buf c;
  fcache *nfc, *fc;
  int rc, st, ref, gone, sets = 0;

  uv_mutex_lock(&ps->mu);
  se = store_get(ps, id);
  n = se != NULL && se->kind == S_PROTO ? se->nup : 256;
  gone = se == NULL && store_gone(ps, id);
  uv_mutex_unlock(&ps->mu);
  if (n == 256 && !gone)
    return corrupt(d, "bad prototype id");
  if (gone) {
    setmsg(d->err, d->errlen,
           "function %llu is no longer in the prototype store "
           "(more than %d other new functions were sent meanwhile)",
           (unsigned long long)id, STORE_GRACE);
    return OP_EINVAL;
  }
  if ((t = x->tmpl[n]) == NULL &&
      (rc = build_tmpl(x, L, (int)n, &t, d->err, d->errlen)) != 0)
    return rc;
  if (x->setupval == 0)
    x->setupval = setupval_opcode(x, L);
  op__buf_init(&c);
  if ((rc = factory_chunk(d, id, t, &c, &sets)) != 0) {
    op__buf_free(&c);
    return rc;
  }
  st = luaL_loadbufferx(L, c.p, c.len, "=(offpath factory)", "b");
  op__buf_free(&c);
  if (st != LUA_OK) {
    setmsg(d->err, d->errlen, "loading factory: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return st == LUA_ERRMEM ? OP_ENOMEM : OP_EINVAL;
  }
  lua_call(L, 0, 1); /* the chunk returns the factory */
  if (slot >= x->nfc) {
    size_t cap = x->nfc ? x->nfc : 16;
    while (cap <= slot)
      cap *= 2;
    if ((nfc = realloc(x->fc, cap * sizeof *nfc)) == NULL) {
      lua_pop(L, 1);
      return dnomem(d);
    }
    memset(nfc + x->nfc, 0, (cap - x->nfc) * sizeof *nfc);
    x->fc = nfc;
    x->nfc = cap;
  }
  ref = luaL_ref(L, LUA_REGISTRYINDEX);
  fc = &x->fc[slot];
  if (fc->ref > 0 && fc->id == id) { /* loaded meanwhile by a nested decode */
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
  } else {
    drop_factory(x, L, fc); /* the slot's previous function, if any */
    fc->ref = ref;
    fc->id = id;
    x->nfactories++;
  }
  fc->nup = (int)n;
  fc->reuse = n == 0 || (x->setupval > 0 && !sets);
  fc->used = ++x->fclock;
  if (x->nfactories > FACTORY_CAP)
    evict_factories(x, L, slot);
  return 0;
}

/* Decode a FUNC after its tag: push a fresh closure from the factory, or
** the last instance when it cannot be told apart (see DESIGN).
** The decoders push one value and return 0, or return an error code with
** the message set, leaving the stack for op__decode to reset.
** [-0, +1, m] */
static int dec_func(dec *d, unsigned flags) {
  lua_State *L = d->L;
  op_xfer *x = d->x;
  const unsigned char *key = NULL, *q;
  uint64_t id, s;
  uint32_t seq;
  size_t slot;
  int nup, i, rc, fi, j;
  fcache *fc;

  if ((rc = get_varint(d, &id)) != 0)
    return rc;
  if (d->depth >= MAX_DEPTH)
    return corrupt(d, "nesting too deep");
  slot = ID_SLOT(id);
  if (slot >= x->nfc || x->fc[slot].ref <= 0 || x->fc[slot].id != id) {
    if ((rc = load_factory(d, id)) != 0)
      return rc;
  }
  fc = &x->fc[slot];
  fc->used = ++x->fclock;
  nup = fc->nup;
  if (!lua_checkstack(L, nup + 8))
    return dnomem(d);
  seq = d->seq++;
  if (fc->reuse && !(flags & F_FIRST)) {
    /* Upvalues that are all plain values, encoded exactly as for the
    ** last instance: that instance is as good as a new one. */
    for (q = d->p, i = 0; i < nup && skip_plain(&q, d->end); i++)
      ;
    if (i == nup && (size_t)(q - d->p) <= KEY_MAX) {
      if (fc->inst > 0 && fc->klen == (size_t)(q - d->p) &&
          memcmp(fc->key, d->p, fc->klen) == 0) {
        d->p = q;
        lua_rawgeti(L, LUA_REGISTRYINDEX, fc->inst);
        return (flags & F_REFD) ? dec_register(d, seq) : 0;
      }
      key = d->p;
    }
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, fc->ref);
  d->depth++;
  if (!(flags & F_FIRST)) {
    for (i = 0; i < nup; i++) {
      if ((rc = dec_value(d)) != 0)
        return rc;
    }
    lua_call(L, nup, 1);
    fc = &x->fc[slot]; /* a nested load_factory may have moved x->fc */
    if (fc->id != id || fc->ref <= 0)
      key = NULL; /* and evicted or replaced this one */
    if (key != NULL && fc->key == NULL)
      fc->key = malloc(KEY_MAX);
    if (key != NULL && fc->key != NULL) { /* the instance for next time */
      fc->klen = (size_t)(d->p - key);
      memcpy(fc->key, key, fc->klen);
      lua_pushvalue(L, -1);
      if (fc->inst > 0)
        lua_rawseti(L, LUA_REGISTRYINDEX, fc->inst);
      else
        fc->inst = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if ((flags & F_REFD) && (rc = dec_register(d, seq)) != 0)
      return rc;
    d->depth--;
    return 0;
  }
  /* made first: it refers to itself, or shares upvalue cells */
  lua_call(L, 0, 1);
  fi = lua_gettop(L);
  if ((flags & F_REFD) && (rc = dec_register(d, seq)) != 0)
    return rc;
  for (i = 1; i <= nup; i++) {
    if (d->p < d->end && *d->p == T_UPJOIN) {
      d->p++;
      if ((rc = get_varint(d, &s)) != 0)
        return rc;
      if (d->p >= d->end)
        return corrupt(d, "truncated upvalue join");
      j = *d->p++ + 1;
      if ((rc = dec_ref(d, s)) != 0)
        return rc;
      if (lua_type(L, -1) != LUA_TFUNCTION || lua_iscfunction(L, -1) ||
          lua_getupvalue(L, -1, j) == NULL)
        return corrupt(d, "bad upvalue join");
      lua_pop(L, 1);
      lua_upvaluejoin(L, fi, i, -1, j);
      lua_pop(L, 1);
      continue;
    }
    if ((rc = dec_value(d)) != 0)
      return rc;
    lua_setupvalue(L, fi, i);
  }
  d->depth--;
  return 0;
}

/* Decode a TABLE after its tag.  [-0, +1, m] */
static int dec_table(dec *d, unsigned flags) {
  lua_State *L = d->L;
  uint64_t narr, nhash, i;
  size_t left;
  uint32_t seq;
  int rc, t;

  if ((rc = get_varint(d, &narr)) != 0 || (rc = get_varint(d, &nhash)) != 0)
    return rc;
  left = (size_t)(d->end - d->p);
  if (narr > left || nhash > left / 2)
    return corrupt(d, "bad table size");
  if (d->depth >= MAX_DEPTH)
    return corrupt(d, "nesting too deep");
  if (!lua_checkstack(L, 8))
    return dnomem(d);
  lua_createtable(L, narr > INT_MAX ? INT_MAX : (int)narr,
                  nhash > INT_MAX ? INT_MAX : (int)nhash);
  t = lua_gettop(L);
  seq = d->seq++;
  if ((flags & F_REFD) && (rc = dec_register(d, seq)) != 0)
    return rc;
  d->depth++;
  for (i = 1; i <= narr; i++) {
    if ((rc = dec_value(d)) != 0)
      return rc;
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (i = 0; i < nhash; i++) {
    if ((rc = dec_value(d)) != 0)
      return rc;
    if (lua_isnil(L, -1) ||
        (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) &&
         isnan((double)lua_tonumber(L, -1))))
      return corrupt(d, "bad table key");
    if ((rc = dec_value(d)) != 0)
      return rc;
    lua_rawset(L, t);
  }
  if (flags & F_MT) {
    if ((rc = dec_value(d)) != 0)
      return rc;
    if (!lua_istable(L, -1))
      return corrupt(d, "metatable is not a table");
    lua_setmetatable(L, t);
  }
  d->depth--;
  return 0;
}

/* Decode one value.  [-0, +1, m] */
static int dec_value(dec *d) {
  lua_State *L = d->L;
  unsigned tag;
  uint64_t v;
  double f;
  const sentry *se;
  lua_CFunction fn;
  int rc;

  if (d->p >= d->end)
    return corrupt(d, "truncated value");
  tag = *d->p++;
  if (tag >= T_FIXINT) {
    lua_pushinteger(L, (lua_Integer)tag - T_FIXINT + FIXINT_MIN);
    return 0;
  }
  if (tag >= T_SSTR) {
    v = tag - T_SSTR;
    if (v > (uint64_t)(d->end - d->p))
      return corrupt(d, "truncated string");
    lua_pushlstring(L, (const char *)d->p, (size_t)v);
    d->p += v;
    return 0;
  }
  switch (tag) {
  case T_NIL:
    lua_pushnil(L);
    return 0;
  case T_FALSE:
  case T_TRUE:
    lua_pushboolean(L, tag == T_TRUE);
    return 0;
  case T_INT:
    if ((rc = get_varint(d, &v)) != 0)
      return rc;
    lua_pushinteger(L, (lua_Integer)((v >> 1) ^ (~(v & 1) + 1)));
    return 0;
  case T_FLOAT:
    if (d->end - d->p < 8)
      return corrupt(d, "truncated float");
    memcpy(&f, d->p, 8);
    d->p += 8;
    lua_pushnumber(L, (lua_Number)f);
    return 0;
  case T_STR:
  case T_NAMED:
    if ((rc = get_varint(d, &v)) != 0)
      return rc;
    if (v > (uint64_t)(d->end - d->p))
      return corrupt(d, "truncated string");
    if (tag == T_NAMED)
      return v == 0 ? corrupt(d, "empty name") : dec_named(d, (size_t)v);
    lua_pushlstring(L, (const char *)d->p, (size_t)v);
    d->p += v;
    return 0;
  case T_GLOBALS:
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    return 0;
  case T_CFUNC:
    if ((rc = get_varint(d, &v)) != 0)
      return rc;
    uv_mutex_lock(&d->x->ps->mu);
    se = store_get(d->x->ps, v);
    fn = se != NULL && se->kind == S_CFUNC ? se->fn : NULL;
    uv_mutex_unlock(&d->x->ps->mu);
    if (fn == NULL)
      return corrupt(d, "bad C function id");
    lua_pushcfunction(L, fn);
    return 0;
  case T_REF:
    if ((rc = get_varint(d, &v)) != 0)
      return rc;
    return dec_ref(d, v);
  case T_TABLE:
  case T_TABLE | F_REFD:
  case T_TABLE | F_MT:
  case T_TABLE | F_REFD | F_MT:
    return dec_table(d, tag & 3);
  case T_FUNC:
  case T_FUNC | F_REFD:
  case T_FUNC | F_FIRST:
  case T_FUNC | F_REFD | F_FIRST:
    return dec_func(d, tag & 3);
  default:
    d->p--;
    return corrupt(d, "bad tag");
  }
}

/* Push the values encoded in p[0..len) on L. Returns how many, or a
** negative code with a message in err (OP_EINVAL: not a valid encoding;
** OP_ECOPY: a named value this VM lacks; OP_ENOMEM), pushing nothing.
** [-0, +n, m] */
int op__decode(op_xfer *x, lua_State *L, const char *p, size_t len, char *err,
               size_t errlen) {
  dec d;
  int top = lua_gettop(L), n = 0, rc;

  d.x = x;
  d.L = L;
  d.p = d.start = (const unsigned char *)p;
  d.end = d.p + len;
  d.seq = 0;
  d.depth = 0;
  d.refs = 0;
  d.err = err;
  d.errlen = errlen;
  if (err != NULL && errlen > 0)
    err[0] = 0;
  if (len > 0 && *d.p != T_HDR && *d.p != T_HDR_REFS)
    return corrupt(&d, "missing header");
  while (d.p < d.end) {
    if ((n & 7) == 0 && !lua_checkstack(L, 16)) {
      rc = corrupt(&d, "too many values");
      goto fail;
    }
    if (*d.p == T_HDR || *d.p == T_HDR_REFS) {
      /* a new encoding: sequence numbers restart */
      d.seq = 0;
      if (d.refs != 0) {
        lua_pushnil(L);
        lua_replace(L, d.refs);
      } else if (*d.p == T_HDR_REFS) {
        lua_pushnil(L);
        lua_insert(L, top + 1); /* below the values decoded so far */
        d.refs = top + 1;
      }
      d.p++;
      continue;
    }
    if ((rc = dec_value(&d)) != 0)
      goto fail;
    n++;
  }
  if (d.refs != 0)
    lua_remove(L, d.refs);
  return n;
fail:
  lua_settop(L, top);
  return rc;
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

/* The record x->paths_ref names in the registry. */
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
  op_xfer *x = lua_touserdata(L, 1);
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
    x->paths_epoch = epoch; /* anchored by the metatable's closure */
    x->paths_mt = lua_topointer(L, 4);
  }
  lua_pushvalue(L, 1);
  x->paths_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* Whether the hook on the package table is still in place: our metatable,
** and no path or cpath stored in the table itself (rawset).  [-0, +0, -] */
static int paths_hooked(op_xfer *x, lua_State *L, int pkg) {
  int ok;

  if (!lua_getmetatable(L, pkg))
    return 0;
  ok = lua_topointer(L, -1) == x->paths_mt;
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

/* The slow half of op__xfer_paths_out: check the hook, read both strings
** and publish them if they differ from the last ones.  [-0, +0, m] */
static void paths_check(op_xfer *x, lua_State *L) {
  op_protostore *ps = x->ps;
  const char *p, *c;
  size_t plen, clen;
  paths_blob *b, *old;
  int top = lua_gettop(L), r = top + 1, pkg = top + 2;

  if (x->paths_ref == 0 &&
      (protect(L, paths_hook, x) != LUA_OK || x->paths_ref == 0)) {
    x->paths_ref = -1; /* no package library, or no memory: give up */
    return;
  }
  if (x->paths_ref < 0)
    return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, x->paths_ref);
  lua_rawgeti(L, r, R_PACKAGE);
  if (x->paths_epoch != NULL) {
    if (paths_hooked(x, L, pkg))
      x->paths_epoch_seen = *x->paths_epoch;
    else
      x->paths_epoch = NULL; /* replaced or bypassed: look every time */
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

void op__xfer_paths_out(op_xfer *x, lua_State *L) {
  /* The hook counts assignments: between them, one compare per task (and
  ** a look at the hook itself every 256th). */
  if (x->paths_epoch != NULL && *x->paths_epoch == x->paths_epoch_seen &&
      (++x->paths_checks & 255) != 0)
    return;
  paths_check(x, L);
}

/* Take the hook off the package table if it is still ours, putting path
** and cpath back in it.  [-0, +0, m] */
static int paths_unhook(lua_State *L) {
  op_xfer *x = lua_touserdata(L, 1);

  lua_rawgeti(L, LUA_REGISTRYINDEX, x->paths_ref); /* 2 */
  lua_rawgeti(L, 2, R_PACKAGE);                    /* 3 */
  lua_rawgeti(L, 2, R_HIDDEN);                     /* 4 */
  if (x->paths_epoch == NULL || !paths_hooked(x, L, 3))
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

void op__xfer_paths_in(op_xfer *x, lua_State *L) {
  op_protostore *ps = x->ps;
  paths_blob *b;
  unsigned gen;
  int st;

  gen = atomic_load_explicit(&ps->paths_gen, memory_order_acquire);
  if (gen == x->paths_gen)
    return;
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
    x->paths_gen = gen; /* else: tried again with the next task */
}

/* ---- block sections ---- */

int op__encoded_by_name(const char *p, size_t len) {
  return len >= 2 && (p[0] == T_HDR || p[0] == T_HDR_REFS) &&
         (unsigned char)p[1] == T_NAMED;
}

/* ---- hints and errors that cross ---- */

/* Give the C functions in the table at idx (and the function itself, if
** idx holds one) the hint a refusal to copy them shows.  [-0, +0, m] */
void op__xfer_hint(lua_State *L, int idx, const char *hint) {
  idx = lua_absindex(L, idx);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &hints_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 8);
    lua_createtable(L, 0, 1); /* weak keys: a hint keeps nothing alive */
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &hints_key);
  }
  if (lua_iscfunction(L, idx)) {
    lua_pushvalue(L, idx);
    lua_pushstring(L, hint);
    lua_rawset(L, -3);
  } else if (lua_istable(L, idx)) {
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      if (lua_iscfunction(L, -1)) {
        lua_pushstring(L, hint);
        lua_rawset(L, -4); /* hints[fn] = hint: leaves the key */
      } else {
        lua_pop(L, 1);
      }
    }
  }
  lua_pop(L, 1);
}

/* Message handler of worker tasks: a string error gets the traceback
** appended, as op__traceback does; any other value is returned as it is,
** and its traceback is kept for op__encode_error.  [-1, +1, m] */
int op__xfer_msgh(lua_State *L) {
  if (lua_type(L, 1) == LUA_TSTRING) {
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
  }
  lua_settop(L, 1);
  luaL_traceback(L, L, NULL, 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &errtb_key);
  return 1;
}

/* The protected part of op__encode_error (ud: its arguments). */
typedef struct errenc {
  op_xfer *x;
  op_buf *b;
  int value, rc;
} errenc;

static int encode_error_body(lua_State *L) {
  errenc *a = lua_touserdata(L, 1);
  char err[256];
  int top = 2; /* the error value */

  lua_rawgetp(L, LUA_REGISTRYINDEX, &errtb_key);
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &errtb_key);
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    lua_pushliteral(L, "stack traceback:\n\t[?]");
  }
  lua_pushvalue(L, top);
  lua_insert(L, -2); /* the value, then its traceback */
  if (op__encode(a->x, L, lua_gettop(L) - 1, 2, a->b, "error", 0, err,
                 sizeof err) == 0) {
    a->value = 1;
    return 0;
  }
  /* The value cannot cross: send its description and the reason. */
  op__error_text(L, top);
  lua_pushfstring(L, " (%s)\n", err);
  lua_pushvalue(L, 4); /* the traceback */
  lua_concat(L, 3);
  if (op__buf_append(a->b, lua_tostring(L, -1), lua_rawlen(L, -1)) != 0)
    a->rc = OP_ENOMEM;
  return 0;
}

int op__encode_error(op_xfer *x, lua_State *L, op_buf *b, int *value) {
  errenc a;
  size_t len0 = b->len;
  static const char oom[] = " (out of memory copying it)";
  const char *s;
  char obuf[64];
  int top = lua_gettop(L);

  *value = 0;
  if (lua_type(L, top) == LUA_TSTRING) {
    size_t len;
    s = lua_tolstring(L, top, &len);
    return op__buf_append(b, s, len) != 0 ? OP_ENOMEM : 0;
  }
  /* Protected: the worker's VM may be out of memory (or at its limit). */
  a.x = x;
  a.b = b;
  a.value = 0;
  a.rc = 0;
  if (!lua_checkstack(L, 3))
    return OP_ENOMEM;
  lua_pushcfunction(L, encode_error_body);
  lua_pushlightuserdata(L, &a);
  lua_pushvalue(L, top);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    b->len = len0;
    s = op__error_object(L, top, obuf, sizeof obuf);
    a.rc = op__buf_append(b, s, strlen(s)) != 0 ||
                   op__buf_append(b, oom, sizeof oom - 1) != 0
               ? OP_ENOMEM
               : 0;
    a.value = 0;
  }
  lua_settop(L, top);
  *value = a.value;
  return a.rc;
}
