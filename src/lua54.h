/* SPDX-License-Identifier: MIT */
/*
** lua54.h - what transfer.c and protostore.c may know of Lua 5.4's private
** layout (lua54.c): closures, their upvalue cells and the values in them,
** read without the Lua API (inline: the encoder reads them per task), and
** binary chunks. Nothing else in src/ depends on one Lua version.
** Thread: the thread owning the VM the pointers come from.
*/
#ifndef OFFPATH_LUA54_H
#define OFFPATH_LUA54_H

#include <stdint.h>
#include <string.h>

#include "internal.h"

/* ---- closures and upvalue cells (lobject.h) ---- */

/*
** Read only what op__check_closures (closures) and op__check_cells (cells
** and their values) have vouched for, in the VM at hand: a closure is
** what lua_topointer returns for a Lua function, a cell what
** lua_upvalueid returns.
*/

/* A Lua closure (LClosure). */
typedef struct lclosure_mirror {
  void *next;
  unsigned char tt;
  unsigned char marked;
  unsigned char nupvalues;
  void *gclist;
  const void *p;
  void *upvals[]; /* UpVal *, what lua_upvalueid returns */
} lclosure_mirror;

/* A value (TValue). */
typedef struct tvalue_mirror {
  union {
    void *p;
    lua_Integer i;
    lua_Number n;
  } v;
  unsigned char tt;
} tvalue_mirror;

/* An upvalue cell (UpVal). */
typedef struct upval_mirror {
  void *next;
  unsigned char tt;
  unsigned char marked;
  unsigned char tbc;
  const tvalue_mirror *v; /* the stack slot while open, else u.value */
} upval_mirror;

/* Type tags of values, variant bits included. */
#define VT_NIL    0x00
#define VT_FALSE  0x01
#define VT_TRUE   0x11
#define VT_INT    0x03
#define VT_FLOAT  0x13
#define VT_SHRSTR 0x44 /* collectable */
#define VT_LNGSTR 0x54
#define VT_LCF    0x16 /* a light C function */
#define VT_TABLE  0x45

/* The prototype of closure cl: the same for every closure of one
** function, and alive as long as one of them is. */
static inline const void *op__cl_proto(const void *cl) {
  return ((const lclosure_mirror *)cl)->p;
}

static inline int op__cl_nup(const void *cl) {
  return ((const lclosure_mirror *)cl)->nupvalues;
}

/* The cell of upvalue i + 1 of cl: lua_upvalueid(L, idx, i + 1). */
static inline const void *op__cl_cell(const void *cl, int i) {
  return ((const lclosure_mirror *)cl)->upvals[i];
}

/* The value a cell holds now. */
static inline const tvalue_mirror *op__cell_value(const void *cell) {
  return ((const upval_mirror *)cell)->v;
}

/* A value's tag (VT_*), and its contents as the tag says. */
static inline unsigned op__tv_tag(const tvalue_mirror *tv) {
  return tv->tt;
}

static inline lua_Integer op__tv_int(const tvalue_mirror *tv) {
  return tv->v.i;
}

static inline lua_Number op__tv_num(const tvalue_mirror *tv) {
  return tv->v.n;
}

/* The object of a collectable value or a light C function. */
static inline const void *op__tv_ptr(const tvalue_mirror *tv) {
  return tv->v.p;
}

/* The value's bits, to be remembered with its tag for op__tv_same. */
static inline uint64_t op__tv_bits(const tvalue_mirror *tv) {
  uint64_t b;

  memcpy(&b, &tv->v, sizeof b);
  return b;
}

/* Whether tv holds the value remembered as tag and bits. */
static inline int op__tv_same(const tvalue_mirror *tv, unsigned tag,
                              uint64_t bits) {
  if (tv->tt != tag)
    return 0;
  if (tag == VT_NIL || tag == VT_FALSE || tag == VT_TRUE)
    return 1; /* no value bits */
  return op__tv_bits(tv) == bits;
}

/* Whether the closure mirror reads Proto pointers, upvalue counts and
** cells correctly in L's Lua.  [-0, +0, -] */
int op__check_closures(lua_State *L);
/* Whether the cell and value mirrors read upvalues correctly in L's Lua,
** open and closed. Call only if op__check_closures passed.  [-0, +0, -] */
int op__check_cells(lua_State *L);

/* ---- binary chunks (ldump.c, lundump.c) ---- */

/* Dump the function at idx, unstripped, into out (emptied first).
** Returns 0 or OP_ENOMEM.  [-0, +0, -] */
int op__chunk_dump(lua_State *L, int idx, op_buf *out);
/* The opcode number of SETUPVAL in L's Lua, as checked on two dumped
** functions, or -1 if the check fails. scratch: a buffer to dump into.
** [-0, +0, m] */
int op__chunk_setupval(lua_State *L, op_buf *scratch);

/*
** A factory template for n upvalues: a chunk that returns a function of n
** parameters returning an inner function that captures them all, cut
** around that inner function. Splicing a dumped function P of n upvalues
** in its place, with the inner function's upvalue descriptors, makes a
** chunk whose factory returns a new closure of P over its arguments.
*/
typedef struct op_tmpl op_tmpl;

/* Build the template for n (0..255) upvalues in *out. Returns 0, or an
** error code with a message in err.  [-0, +0, m] */
int op__tmpl_new(lua_State *L, int n, op_tmpl **out, char *err, size_t errlen);
void op__tmpl_free(op_tmpl *t);
/* Append to out the factory chunk for the dumped function p[0..len) with
** n upvalues: template t (made for n) with p spliced in. If op >= 0,
** *has_op is set when p or a nested function has an instruction with that
** opcode. Returns 0, OP_EINVAL if p is not a whole dumped function of
** this Lua with n upvalues, or OP_ENOMEM. Thread: any. */
int op__tmpl_splice(const op_tmpl *t, const unsigned char *p, size_t len,
                    size_t n, int op, int *has_op, op_buf *out);

#endif
