/* SPDX-License-Identifier: MIT */
/*
** transfer.c - copying Lua values between VMs: the wire encoding, names of
** library values, refusals that name the path, errors that cross.
** Thread: op__encode/op__decode on the thread owning that VM.
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
** Functions
** ---------
** A Lua function crosses as the store id of its prototype and its
** upvalues (protostore.c: ids, the bounded store, and the factories that
** make a fresh closure from an id). The decoder calls the factory with
** the upvalue values, decoded straight onto the stack as its arguments.
** A FUNC tag with FIRST set is one whose closure must exist before its
** upvalues are decoded (it refers to itself, or shares cells through
** UPJOIN): the factory is called with no arguments, the closure is
** registered, and each upvalue is set (lua_setupvalue, into the fresh
** cells) or joined (lua_upvaluejoin).
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
** opcode number is checked per VM (op__chunk_setupval); if the check
** fails, only functions without upvalues are reused.
**
** Caches and their lifetime
** -------------------------
**   named      per VM, C map object -> its name (pointer into the Lua
**              string held by the names table).
**   seen       per VM, C map object/upvalue cell -> seq, for one encode;
**              emptied in O(1) by bumping a generation number.
**   ec         per VM, the encode cache (below), by Proto*.
** The prototype caches are protostore.c's. All Lua objects are anchored
** in the VM's registry under the addresses of static variables;
** op__xfer_free drops them.
**
** Encoding fast paths
** -------------------
** Per task the encoder avoids the Lua API where it can: scalar upvalues
** (nil, booleans, numbers) are read from the cell through Lua's own
** layout (lua54.h; checked by op__check_cells against lua_getupvalue for
** open and closed cells; off if that check fails), and the cells of the
** first by-value function of an encoding are put in the seen map only
** when a second function appears (nothing can share them before). The
** reference map is C memory kept in the op_xfer, so a tiny closure costs
** no allocation at all. A lone function whose upvalues hold plain values
** is encoded once: the encode cache keeps its bytes with the upvalue
** values they were made from, and the next encode of a closure of the
** same prototype whose cells still hold those values appends the bytes
** (strings among the values are anchored, so an equal pointer is the
** same string). When the store evicts prototypes, entries whose Proto is
** gone are dropped, since a new function may get its address.
** Leading values that are nil, booleans, numbers or strings (a task's
** usual arguments and results) are written in one pass with no encoder
** state (enc_scalars); the full encoder goes on from the first other one.
**
** Decoding fast paths
** -------------------
** A task's bytes are its function's encoding followed by its arguments'.
** When the first encoding of an input is a lone FUNC whose upvalues are
** plain values (the reused-instance case above, at most DKEY_MAX bytes),
** the decoder keeps its bytes and the function it decoded to. An input
** that starts with exactly those bytes, followed by the end or by another
** header, gets that function again after one memcmp: the same bytes
** decode to an equal function (prototype ids are never reused). Any other
** byte sequence is decoded in full, so nothing unchecked is trusted.
**
** The encoder never raises: the few steps that allocate Lua objects (the
** names rescan, anchoring a new prototype) run under op__pcall, so the
** encoder's C state is always consistent. An encode entered again from a
** finalizer during those steps uses a private seen map.
*/
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "protostore.h"

#define MAX_DEPTH  200 /* nested tables and functions, both directions */
#define NAME_DEPTH 2   /* module.a.b at most */

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

/* The seen map: a table's or function's slot holds its seq (val) and
** where its tag was written (aux); flags in extra: */
#define X_FUNC 1u /* a by-value Lua function */
#define X_OPEN 2u /* its upvalues are being encoded now */
#define X_UPV  4u /* an upvalue cell; aux is its owner closure, val its index */

/* ---- per-VM state ---- */

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

#define KEY_MAX  64 /* longest upvalue encoding an instance is kept for */
#define DKEY_MAX 48 /* longest lone function encoding the decoder keeps */

struct op_xfer {
  lua_State *L;
  op_vmstore vs; /* this VM's side of the prototype store */
  int busy;      /* an encode is running (re-entry from a finalizer) */
  pmap named;    /* object -> name (aux: bytes, val: length) */
  pmap named_lf; /* the same for Lua closures (usually empty) */
  int fast_uv;   /* op__check_cells passed: read upvalues from cells */
  ecache ec[ECACHE_N];
  const lua_Integer *epoch; /* bumped per new package.loaded key, or NULL */
  lua_Integer scanned;      /* *epoch at the last scan */
  const void *hook_mt;      /* our metatable of package.loaded */
  unsigned checks;          /* loaded_changed calls, to space out checks */
  const void *globals;      /* L's global table (anchored in names) */
  pmap seen;                /* the current encode's objects and upvalue cells */
  /* The decoder's last lone function (see "Decoding fast paths"): the
  ** bytes of its encoding, header included, and a registry ref holding
  ** the instance they decoded to. */
  size_t dlen; /* 0: none */
  int dref;
  unsigned char dkey[DKEY_MAX];
};

/* Registry keys: addresses of these variables. */
static char names_key;  /* value -> name, name -> value */
static char loaded_key; /* package.loaded, as hooked */
static char hook_key;   /* its metatable (anchors the epoch) */
static char ecache_key; /* the encode cache's string upvalues */
static char hints_key;  /* C function -> why it stays in its VM */
static char errtb_key;  /* traceback of the error being handled */

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
  op__vmstore_open(L);
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
  op__vmstore_init(&x->vs, L, ps);
  pmap_init(&x->named);
  pmap_init(&x->named_lf);
  pmap_init(&x->seen);
  x->vs.layout_ok = op__check_closures(L);
#ifdef OP_DEBUG
  if (getenv("OFFPATH_XFER_NO_MIRROR") != NULL)
    x->vs.layout_ok = 0; /* tests: take the fallback paths */
  if (lua_checkstack(L, 1)) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &names_key);
    op_assert(lua_isnil(L, -1)); /* one op_xfer per VM */
    lua_pop(L, 1);
  }
#endif
  x->fast_uv = x->vs.layout_ok && op__check_cells(L);
  if (protect(L, xfer_init, x) != LUA_OK) {
    op__xfer_free(x);
    return NULL;
  }
  return x;
}

void op__xfer_free(op_xfer *x) {
  lua_State *L;

  if (x == NULL)
    return;
  L = x->L;
  unhook_loaded(x, L);
  op__vmstore_free(&x->vs);
  if (lua_checkstack(L, 1)) {
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &names_key);
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &ecache_key);
    if (x->dref > 0)
      luaL_unref(L, LUA_REGISTRYINDEX, x->dref);
  }
  pmap_free(&x->named);
  pmap_free(&x->named_lf);
  pmap_free(&x->seen);
  free(x);
}

/* ---- the encode cache ---- */

/* op__buf_append for the few bytes of the fast paths: no call when they
** fit. */
static int buf_put(op_buf *b, const void *p, size_t n) {
  if (b->cap - b->len < n)
    return op__buf_append(b, p, n);
  memcpy(b->p + b->len, p, n);
  b->len += n;
  return 0;
}

/* The encode cache's slot for a prototype. */
static ecache *ecache_slot(op_xfer *x, const void *proto) {
  return &x->ec[(phash(proto) >> 4) & (ECACHE_N - 1)];
}

/* Whether the cache may key on an upvalue's value: a scalar, a string
** (anchored when remembered), a light C function, or a table that crosses
** by name or as the globals (anchored by the names table). */
static int ec_plain(op_xfer *x, const tvalue_mirror *tv) {
  switch (op__tv_tag(tv)) {
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
    return op__tv_ptr(tv) == x->globals ||
           pmap_find(&x->named, op__tv_ptr(tv)) != NULL;
  default:
    return 0;
  }
}

/* If the Lua function at idx was the last one encoded alone from its
** prototype and its upvalues still hold the same values, append that
** encoding to b and return 1.  [-0, +0, -] */
static int ecache_hit(op_xfer *x, lua_State *L, int idx, op_buf *b) {
  const void *cl;
  const ecache *c;
  int i;

  if (lua_type(L, idx) != LUA_TFUNCTION || lua_iscfunction(L, idx))
    return 0;
  cl = lua_topointer(L, idx);
  c = ecache_slot(x, op__cl_proto(cl));
  if (c->proto != op__cl_proto(cl) || c->nup != op__cl_nup(cl))
    return 0;
  for (i = 0; i < c->nup; i++) {
    if (!op__tv_same(op__cell_value(op__cl_cell(cl, i)), c->tt[i], c->v[i]))
      return 0;
  }
  if (x->named_lf.count > 0 && pmap_find(&x->named_lf, cl) != NULL)
    return 0;
  return buf_put(b, c->bytes, c->len) == 0;
}

/* Remember the encoding at b->p + off of the lone Lua function at idx if
** it is a plain FUNC whose upvalues are all plain values. The strings
** among them are anchored, so an equal pointer later is the same string.
** [-0, +0, m] */
static void ecache_fill(op_xfer *x, lua_State *L, int idx, const op_buf *b,
                        size_t off) {
  const void *cl = lua_topointer(L, idx);
  const unsigned char *q = (const unsigned char *)b->p + off;
  const tvalue_mirror *tv;
  size_t len = b->len - off;
  ecache *c;
  int i, slot, nup = op__cl_nup(cl);

  if (len > ECACHE_LEN || len < 2 || q[0] != T_HDR || q[1] != T_FUNC ||
      nup > ECACHE_UPV || !lua_checkstack(L, 2))
    return;
  for (i = 0; i < nup; i++) {
    if (!ec_plain(x, op__cell_value(op__cl_cell(cl, i))))
      return;
  }
  c = ecache_slot(x, op__cl_proto(cl));
  slot = (int)(c - x->ec) * ECACHE_UPV;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &ecache_key);
  for (i = 0; i < nup; i++) {
    tv = op__cell_value(op__cl_cell(cl, i));
    c->tt[i] = (unsigned char)op__tv_tag(tv);
    c->v[i] = op__tv_bits(tv);
    if (op__tv_tag(tv) == VT_SHRSTR || op__tv_tag(tv) == VT_LNGSTR) {
      lua_getupvalue(L, idx, i + 1);
      lua_rawseti(L, -2, slot + i + 1);
    }
  }
  lua_pop(L, 1);
  c->proto = op__cl_proto(cl);
  c->nup = nup;
  c->len = len;
  memcpy(c->bytes, q, len);
}

/* Some prototypes were evicted from the store (op__proto_id): forget their
** entries, whose Proto* a new function may get. */
static void ecache_forget(op_xfer *x) {
  int i;

  for (i = 0; i < ECACHE_N; i++) {
    if (x->ec[i].proto != NULL &&
        pmap_find(&x->vs.protos, x->ec[i].proto) == NULL)
      x->ec[i].proto = NULL;
  }
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

/* Make room for n more bytes in b; nonzero if there is no memory. */
#define ROOM_B(b, n)                                                           \
  ((b)->cap - (b)->len >= (n) ? 0 : op__buf_reserve((b), (n)))

/*
** The writers of one value straight into a buffer: 0, or nonzero with no
** memory. The full encoder (through its enc_* wrappers, which also set
** the message) and the scalar fast path (enc_scalars) both write with
** them, so a value has one encoding whichever path writes it.
*/

static inline int b_byte(op_buf *b, unsigned tag) {
  if (ROOM_B(b, 1))
    return -1;
  b->p[b->len++] = (char)tag;
  return 0;
}

/* A tag followed by a varint. */
static inline int b_tagv(op_buf *b, unsigned tag, uint64_t v) {
  unsigned char *q;

  if (ROOM_B(b, 11))
    return -1;
  q = (unsigned char *)b->p + b->len;
  q[0] = (unsigned char)tag;
  b->len += 1 + put_varint(q + 1, v);
  return 0;
}

static inline int b_int(op_buf *b, lua_Integer i) {
  uint64_t u = (uint64_t)i;

  if (i >= FIXINT_MIN && i <= FIXINT_MAX)
    return b_byte(b, (unsigned)(T_FIXINT + (i - FIXINT_MIN)));
  return b_tagv(b, T_INT, (u << 1) ^ (i < 0 ? ~(uint64_t)0 : 0));
}

static inline int b_float(op_buf *b, lua_Number d) {
  double v = (double)d;

  if (ROOM_B(b, 9))
    return -1;
  b->p[b->len] = (char)T_FLOAT;
  memcpy(b->p + b->len + 1, &v, 8);
  b->len += 9;
  return 0;
}

/* Bytes with their length: a string (T_STR, short ones as T_SSTR) or
** another tag's payload. */
static inline int b_bytes(op_buf *b, unsigned tag, const char *s, size_t len) {
  unsigned char *q;

  if (len > SIZE_MAX - 16 || ROOM_B(b, len + 11))
    return -1;
  q = (unsigned char *)b->p + b->len;
  if (tag == T_STR && len <= SSTR_MAX) {
    q[0] = (unsigned char)(T_SSTR + len);
    memcpy(q + 1, s, len);
    b->len += 1 + len;
    return 0;
  }
  q[0] = (unsigned char)tag;
  q += 1 + put_varint(q + 1, len);
  memcpy(q, s, len);
  b->len = (size_t)(q - (unsigned char *)b->p) + len;
  return 0;
}

static int put_byte(enc *e, unsigned tag) {
  return b_byte(e->b, tag) ? nomem(e) : 0;
}

static int put_tagv(enc *e, unsigned tag, uint64_t v) {
  return b_tagv(e->b, tag, v) ? nomem(e) : 0;
}

static int enc_int(enc *e, lua_Integer i) {
  return b_int(e->b, i) ? nomem(e) : 0;
}

static int enc_float(enc *e, lua_Number d) {
  return b_float(e->b, d) ? nomem(e) : 0;
}

static int enc_bytes(enc *e, unsigned tag, const char *s, size_t len) {
  return b_bytes(e->b, tag, s, len) ? nomem(e) : 0;
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

/* Register the upvalue cells of function p (n of them) in the seen map.
** Only for functions read through the closure mirror (lazy_cells). */
static int add_cells(enc *e, const void *p, int n) {
  pslot *s;
  int i;

  for (i = 0; i < n; i++) {
    if ((s = pmap_add(e->seen, op__cl_cell(p, i))) == NULL)
      return nomem(e);
    s->aux = (uintptr_t)p;
    s->val = (uint32_t)i;
    s->extra = X_UPV;
  }
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
  if (e->first_fn == NULL && e->x->vs.layout_ok && nup <= 4) {
    for (i = 0; i < nup; i++) {
      for (j = i + 1; j < nup; j++) {
        if (op__cl_cell(p, i) == op__cl_cell(p, j))
          goto register_all;
      }
    }
    e->first_fn = p;
    e->first_nup = nup;
    return 1;
  }
register_all:
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
  if ((rc = op__proto_id(&e->x->vs, L, idx, p, &id, &nup)) != 0) {
    if (rc < 0)
      return nomem(e);
    ecache_forget(e->x); /* prototypes were evicted */
  }
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
    uid = e->x->vs.layout_ok ? op__cl_cell(p, i - 1) : lua_upvalueid(L, idx, i);
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
    if (e->x->fast_uv) { /* scalars straight from the cell */
      const tvalue_mirror *tv = op__cell_value(uid);

      rc = 1;
      switch (op__tv_tag(tv)) {
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
        rc = enc_int(e, op__tv_int(tv));
        break;
      case VT_FLOAT:
        rc = enc_float(e, op__tv_num(tv));
        break;
      }
      if (rc <= 0) {
        if (rc < 0)
          return rc;
        continue;
      }
    }
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

/* Append a header and the encodings of the values at idx..idx+n-1 of L
** while they are nil, booleans, numbers or strings (a task's usual
** arguments and results), with no encoder state and no call per value
** beyond reading it. Returns how many it wrote (the full encoder goes on
** from there), or -1 with no memory (b's length is then undefined: the
** caller resets it).  [-0, +0, -] */
static int enc_scalars(lua_State *L, int idx, int n, op_buf *b) {
  const char *s;
  size_t len;
  int i, rc;

  if (b_byte(b, T_HDR))
    return -1;
  for (i = 0; i < n; i++) {
    switch (lua_type(L, idx + i)) {
    case LUA_TNIL:
      rc = b_byte(b, T_NIL);
      break;
    case LUA_TBOOLEAN:
      rc = b_byte(b, lua_toboolean(L, idx + i) ? T_TRUE : T_FALSE);
      break;
    case LUA_TNUMBER:
      rc = lua_isinteger(L, idx + i) ? b_int(b, lua_tointeger(L, idx + i))
                                     : b_float(b, lua_tonumber(L, idx + i));
      break;
    case LUA_TSTRING:
      s = lua_tolstring(L, idx + i, &len);
      rc = b_bytes(b, T_STR, s, len);
      break;
    default:
      return i;
    }
    if (rc != 0)
      return -1;
  }
  return n;
}

/* Append the encoding of the n values at idx.. of L to b; see the DESIGN
** block for the format. Refusals name the value's path (see path_text).
** Returns 0, or OP_ECOPY / OP_ENOMEM with a message in err, leaving b as
** it was. Never raises (stricter than internal.h's m).  [-0, +0, -] */
int op__encode(op_xfer *x, lua_State *L, int idx, int n, op_buf *b,
               const char *label, int first_no, char *err, size_t errlen) {
  enc e;
  pmap priv;
  size_t len0 = b->len;
  int top = lua_gettop(L), i, rc, first;

  if (idx < 0 && idx > LUA_REGISTRYINDEX)
    idx = top + idx + 1;
  if (n == 1 && x->fast_uv && !x->busy && ecache_hit(x, L, idx, b))
    return 0;
  if ((first = enc_scalars(L, idx, n, b)) == n)
    return 0;
  if (first < 0) { /* no memory: the full encoder says so */
    b->len = len0;
    first = 0;
  }
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
  /* enc_scalars wrote the header and the first values, if any. */
  rc = b->len > len0 ? 0 : put_byte(&e, T_HDR);
  for (i = first; i < n && rc == 0; i++) {
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
  if (rc == 0 && n == 1 && x->fast_uv && !x->busy &&
      lua_type(L, idx) == LUA_TFUNCTION && !lua_iscfunction(L, idx))
    ecache_fill(x, L, idx, b, len0);
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
  int lone; /* the outermost FUNC decoded came from plain upvalues */
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

/* Read the varint at *pp into *v and leave *pp after it. Returns NULL,
** or what is wrong with it, *pp then at the byte that says so. */
static const char *varint_read(const unsigned char **pp,
                               const unsigned char *end, uint64_t *v) {
  const unsigned char *q = *pp;
  uint64_t r = 0;
  unsigned shift = 0, c;
  const char *why = NULL;

  do {
    if (q >= end) {
      why = "truncated varint";
      break;
    }
    c = *q++;
    if (shift == 63 && (c & 0x7e) != 0) {
      why = "varint overflow";
      break;
    }
    if (shift > 63) {
      why = "varint too long";
      break;
    }
    r |= (uint64_t)(c & 0x7f) << shift;
    shift += 7;
  } while (c & 0x80);
  *pp = q;
  *v = r;
  return why;
}

static int get_varint(dec *d, uint64_t *v) {
  const char *why = varint_read(&d->p, d->end, v);

  return why == NULL ? 0 : corrupt(d, why);
}

/* The integer of a zigzag-coded varint. */
static lua_Integer unzigzag(uint64_t v) {
  return (lua_Integer)((v >> 1) ^ (~(v & 1) + 1));
}

/* Push the nil, boolean or number encoded at *pp (before end) and step
** over it. Returns 0 for anything else, or bytes that do not parse, with
** *pp unmoved: dec_value decodes those, or says what is wrong. Pushing
** these allocates nothing.  [-0, +(0|1), -] */
static int push_plain(lua_State *L, const unsigned char **pp,
                      const unsigned char *end) {
  const unsigned char *q = *pp;
  unsigned tag = *q++;
  uint64_t v;
  double f;

  if (tag >= T_FIXINT) {
    lua_pushinteger(L, (lua_Integer)tag - T_FIXINT + FIXINT_MIN);
  } else if (tag == T_NIL) {
    lua_pushnil(L);
  } else if (tag == T_FALSE || tag == T_TRUE) {
    lua_pushboolean(L, tag == T_TRUE);
  } else if (tag == T_INT && varint_read(&q, end, &v) == NULL) {
    lua_pushinteger(L, unzigzag(v));
  } else if (tag == T_FLOAT && end - q >= 8) {
    memcpy(&f, q, 8);
    q += 8;
    lua_pushnumber(L, (lua_Number)f);
  } else {
    return 0;
  }
  *pp = q;
  return 1;
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
  if (op__pcall(L, 1, 1, NULL) == LUA_OK && !lua_isnil(L, -1)) {
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
  if (!op__factory_loaded(&x->vs, id) &&
      (rc = op__factory_load(&x->vs, L, id, d->err, d->errlen)) != 0)
    return rc > 0 ? corrupt(d, "bad prototype id") : rc;
  fc = &x->vs.fc[slot];
  fc->used = ++x->vs.fclock;
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
      d->lone = d->depth == 0;
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
    fc = &x->vs.fc[slot]; /* a nested load may have moved the array */
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
  lua_CFunction fn;
  int rc;

  if (d->p >= d->end)
    return corrupt(d, "truncated value");
  if (push_plain(L, &d->p, d->end))
    return 0;
  tag = *d->p++;
  if (tag >= T_SSTR) {
    v = tag - T_SSTR;
    if (v > (uint64_t)(d->end - d->p))
      return corrupt(d, "truncated string");
    lua_pushlstring(L, (const char *)d->p, (size_t)v);
    d->p += v;
    return 0;
  }
  switch (tag) {
  case T_INT: /* push_plain took it, had it parsed */
    return get_varint(d, &v);
  case T_FLOAT:
    return corrupt(d, "truncated float");
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
    if ((fn = op__store_cfunc(d->x->vs.ps, v)) == NULL)
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

/* Whether the first k bytes of d's input can be a lone function's whole
** encoding: the input ends there or another encoding starts. */
static int lone_end(const dec *d, size_t k) {
  return d->start + k == d->end || d->start[k] == T_HDR ||
         d->start[k] == T_HDR_REFS;
}

/* The function on top of L was decoded from d's first encoding, a lone
** FUNC whose upvalues are plain values: keep its bytes and the function
** for the next decode.  [-0, +0, m] */
static void keep_lone(dec *d) {
  op_xfer *x = d->x;
  lua_State *L = d->L;
  size_t k = (size_t)(d->p - d->start);

  lua_pushvalue(L, -1);
  if (x->dref > 0) {
    lua_rawseti(L, LUA_REGISTRYINDEX, x->dref);
  } else if ((x->dref = luaL_ref(L, LUA_REGISTRYINDEX)) <= 0) {
    x->dlen = 0;
    return;
  }
  memcpy(x->dkey, d->start, k);
  x->dlen = k;
}

/* Push the values encoded in p[0..len) on L. Returns how many, or a
** negative code with a message in err (OP_EINVAL: not a valid encoding;
** OP_ECOPY: a named value this VM lacks; OP_ENOMEM), pushing nothing.
** [-0, +n, m] */
int op__decode(op_xfer *x, lua_State *L, const char *p, size_t len, char *err,
               size_t errlen) {
  dec d;
  int top = lua_gettop(L), n = 0, room = 0, rc;

  d.x = x;
  d.L = L;
  d.p = d.start = (const unsigned char *)p;
  d.end = d.p + len;
  d.seq = 0;
  d.depth = 0;
  d.refs = 0;
  d.lone = 0;
  d.err = err;
  d.errlen = errlen;
  if (err != NULL && errlen > 0)
    err[0] = 0;
  if (len > 0 && *d.p != T_HDR && *d.p != T_HDR_REFS)
    return corrupt(&d, "missing header");
  if (x->dlen > 0 && len >= x->dlen && lone_end(&d, x->dlen) &&
      memcmp(d.p, x->dkey, x->dlen) == 0) {
    /* The same lone function as last time (see "Decoding fast paths") */
    if (!lua_checkstack(L, 16))
      return corrupt(&d, "too many values");
    room = 8;
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->dref);
    d.p += x->dlen;
    n = 1;
  }
  while (d.p < d.end) {
    if (n >= room) {
      if (!lua_checkstack(L, 16)) {
        rc = corrupt(&d, "too many values");
        goto fail;
      }
      room = n + 8; /* 8 to spare, for what dec_value leaves meanwhile */
    }
    /* The common values of a list, in line; dec_value does the rest (and
    ** says what is wrong with a bad byte). */
    if (push_plain(L, &d.p, d.end)) {
      n++;
      continue;
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
    if (n++ == 0 && d.lone && d.start[0] == T_HDR && d.start[1] == T_FUNC &&
        (size_t)(d.p - d.start) <= DKEY_MAX &&
        lone_end(&d, (size_t)(d.p - d.start)))
      keep_lone(&d);
  }
  if (d.refs != 0)
    lua_remove(L, d.refs);
  return n;
fail:
  lua_settop(L, top);
  return rc;
}

int op__decode_plain(lua_State *L, const char *p, size_t len) {
  const unsigned char *q = (const unsigned char *)p, *end = q + len;
  int top = lua_gettop(L), n = 0;

  if (len == 0 || *q++ != T_HDR)
    return -1;
  while (q < end) {
    if ((n & 7) == 0 && !lua_checkstack(L, 8))
      break;
    if (!push_plain(L, &q, end))
      break;
    n++;
  }
  if (q < end) {
    lua_settop(L, top);
    return -1;
  }
  return n;
}

/* ---- search paths (protostore.c) ---- */

void op__xfer_paths_out(op_xfer *x, lua_State *L) {
  op__paths_out(&x->vs, L);
}

void op__xfer_paths_in(op_xfer *x, lua_State *L) {
  op__paths_in(&x->vs, L);
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
  static const char oom[] = " (not enough memory copying it)";
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
  if (op__pcall(L, 2, 0, NULL) != LUA_OK) {
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
