/* SPDX-License-Identifier: MIT */
/*
** lua54.c - what offpath reads of Lua 5.4's private layout: closures and
** upvalue cells (checked per VM), binary chunks, factory templates.
** Thread: the thread owning the VM at hand; op__tmpl_splice: any.
*/

/*
** DESIGN
**
** Every other file reaches Lua through its public API. Two things the API
** cannot give fast enough, or at all, are read here from Lua 5.4's own
** structures:
**
**   closures  lua_topointer of a Lua function is its LClosure: the Proto
**             pointer keys the encoder's caches (two closures of one
**             function share it), and the cells (UpVal) tell shared
**             upvalues apart without lua_upvalueid calls. The mirrors are
**             in lua54.h, inline, since the encoder reads them per task.
**   chunks    a dumped function is spliced into a factory template
**             (protostore.c's "Fresh closures"), which needs the layout of
**             a binary chunk: where a function's upvalue descriptors and
**             nested functions are, and its instructions (a function that
**             has no SETUPVAL never assigns an upvalue).
**
** Nothing is trusted blindly. op__check_closures makes three closures and
** compares what the mirror reads with lua_upvalueid (two closures of one
** function must share p, a third must not); op__check_cells compares the
** cells' values with lua_getupvalue, for open and closed cells. A VM whose
** check fails takes the slower paths that use the API alone. Chunks are
** walked with every length checked against the bytes; the SETUPVAL opcode
** number is confirmed on two dumped functions before it is believed.
**
** A build for another Lua (LuaJIT, 5.5) replaces this file and lua54.h:
** the interface is what lua54.h declares.
*/
#include <string.h>

#include "lua54.h"

/* The layout mirrored here is Lua 5.4's: with another Lua the checks
** fail, and the callers keep to the Lua API. */
#define MIRRORED (LUA_VERSION_NUM == 504)

#define LUA_VLCL_TAG   6   /* LUA_TFUNCTION | (0 << 4) */
#define LUA_VUPVAL_TAG 9   /* LUA_NUMTYPES | (0 << 4) */
#define ONE_LEVEL      200 /* largest n for a one-level factory template */
#define SPLIT          128 /* parameters of the outer factory when nested */

/* ---- the layout checks ---- */

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
  if (op__pcall(L, nargs, nres, NULL) != LUA_OK) {
    lua_settop(L, base);
    return 0;
  }
  return 1;
}

/* Whether lclosure_mirror reads Proto pointers, upvalue counts and cells
** correctly here.  [-0, +0, -] */
int op__check_closures(lua_State *L) {
  static const char chunk[] =
      "local function mk(a) return function() return a end end "
      "local function two(a, b) return function() return a, b end end "
      "return mk(1), mk(2), two(1, 2)";
  const lclosure_mirror *c[3];
  int ok = 1, i, top = lua_gettop(L);

  if (!MIRRORED || !run_check(L, chunk, 0, 3))
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
}

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

/* Whether upval_mirror reads upvalues correctly here, open and closed, for
** the scalar upvalues the encoder reads directly and the kinds the encode
** cache keys on: compared with lua_getupvalue.  [-0, +0, -] */
int op__check_cells(lua_State *L) {
  static const char chunk[] =
      "local check = ... "
      "local a, b, c, d, e, f = 81985529216486895, 2.5, true, false, nil, 's' "
      "local s, cf, t = string.rep('l', 60), string.len, string "
      "local g = function() return a, b, c, d, e, f, s, cf, t end "
      "local x, y = -7, 0.25 "
      "return g, check(function() return x, y end)";
  int ok, top = lua_gettop(L);

  if (!MIRRORED)
    return 0;
  lua_pushcfunction(L, check_open);
  if (!run_check(L, chunk, 1, 2))
    return 0;
  ok = lua_toboolean(L, -1) && upvals_match(L, top + 1, 9);
  lua_settop(L, top);
  return ok;
}

/* ---- binary chunks (Lua 5.4 ldump.c format) ---- */

#define HEADER_LEN 31 /* signature .. LUAC_NUM; then the upvalue count */

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  return op__buf_append(ud, p, sz) != 0;
}

int op__chunk_dump(lua_State *L, int idx, op_buf *out) {
  int st;

  out->len = 0;
  lua_pushvalue(L, idx);
  st = lua_dump(L, dump_writer, out, 0);
  lua_pop(L, 1);
  return st == 0 && out->len > 32 ? 0 : OP_ENOMEM;
}

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

/* The opcode number of SETUPVAL in this Lua (10 in 5.4's lopcodes.h,
** which is not a public header), checked on two dumped functions: one
** that assigns its upvalue and one that only reads it. Returns it, or -1
** if the check fails.  [-0, +0, m] */
int op__chunk_setupval(lua_State *L, op_buf *scratch) {
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
    if (op__chunk_dump(L, -1, scratch) != 0) {
      lua_pop(L, 1);
      return -1;
    }
    lua_pop(L, 1);
    pos = HEADER_LEN + 1;
    if (scratch->len <= pos ||
        ck_function((const unsigned char *)scratch->p, scratch->len, &pos, NULL,
                    0, OP_SETUPVAL_54, &found[i]) != 0)
      return -1;
  }
  return found[0] && !found[1] ? OP_SETUPVAL_54 : -1;
}

/* ---- factory templates ---- */

/* The pieces of a factory chunk for n upvalues: the template's bytes
** before and after its inner function, and where the inner function's
** upvalues come from (instack, idx) pairs. */
struct op_tmpl {
  unsigned char *pre, *suf; /* one allocation: pre then suf */
  size_t pre_len, suf_len;
  unsigned char desc[2 * 255];
};

/* Set err to what, then detail if not NULL. */
static void say(char *err, size_t errlen, const char *what,
                const char *detail) {
  if (err != NULL && errlen > 0)
    snprintf(err, errlen, "%s%s", what, detail != NULL ? detail : "");
}

static void put_num(op_buf *b, int i) {
  char t[16];

  snprintf(t, sizeof t, "u%d", i);
  op__buf_append(b, t, strlen(t));
}

#define PUTS(b, s) op__buf_append((b), (s), sizeof(s) - 1)

int op__tmpl_new(lua_State *L, int n, op_tmpl **out, char *err, size_t errlen) {
  op_buf src, bin;
  int i, lvl = n > ONE_LEVEL ? 2 : 1, st, rc = OP_ENOMEM;
  int inner = lvl + 1; /* depth of the function P replaces */
  size_t pos, start = 0, end = 0;
  fninfo fi;
  op_tmpl *t = NULL;

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
    say(err, errlen, "cannot copy: factory template: ", lua_tostring(L, -1));
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
  *out = t;
  t = NULL;
  rc = 0;
  goto done;
bad:
  say(err, errlen, "cannot copy: unexpected binary chunk layout", NULL);
  rc = OP_EINVAL;
done:
  op__tmpl_free(t);
  op__buf_free(&src);
  op__buf_free(&bin);
  if (rc == OP_ENOMEM && err != NULL && errlen > 0 && err[0] == 0)
    say(err, errlen, "not enough memory", NULL);
  return rc;
}

void op__tmpl_free(op_tmpl *t) {
  if (t != NULL)
    free(t->pre);
  free(t);
}

int op__tmpl_splice(const op_tmpl *t, const unsigned char *p, size_t len,
                    size_t n, int op, int *has_op, op_buf *out) {
  fninfo fi;
  size_t pos = HEADER_LEN + 1, i;

  if (len <= pos || memcmp(p, t->pre, HEADER_LEN) != 0 || p[HEADER_LEN] != n ||
      ck_function(p, len, &pos, &fi, 0, op, has_op) != 0 || pos != len ||
      fi.nup != n)
    return OP_EINVAL;
  /* template head, P up to its upvalue descriptors, the rewritten
  ** descriptors, the rest of P, template tail */
  if (op__buf_reserve(out, t->pre_len + len + t->suf_len) != 0)
    return OP_ENOMEM;
  op__buf_append(out, t->pre, t->pre_len);
  op__buf_append(out, p + HEADER_LEN + 1, fi.upv_off - (HEADER_LEN + 1));
  for (i = 0; i < n; i++) {
    out->p[out->len++] = (char)t->desc[2 * i];
    out->p[out->len++] = (char)t->desc[2 * i + 1];
    out->p[out->len++] = (char)p[fi.upv_off + 3 * i + 2]; /* P's kind */
  }
  op__buf_append(out, p + fi.upv_off + 3 * n, len - fi.upv_off - 3 * n);
  op__buf_append(out, t->suf, t->suf_len);
  return 0;
}
