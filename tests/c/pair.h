/* SPDX-License-Identifier: MIT */
/*
** pair.h - two Lua states and one prototype store, for the tests of the
** transfer code that need no runtime: values are encoded in A and decoded
** in B. pair_open makes the store and the states (standard libraries
** open), pair_xfer their transfer states, once the caller has set up
** what the states must hold before (modules known by name).
*/
#ifndef OFFPATH_TEST_PAIR_H
#define OFFPATH_TEST_PAIR_H

#include "internal.h"
#include "test.h"

typedef struct pair {
  op_protostore *ps;
  lua_State *A, *B;
  op_xfer *xa, *xb;
} pair;

static inline void pair_open(pair *p) {
  p->ps = op__protostore_new();
  ASSERT_NOT_NULL(p->ps);
  p->A = luaL_newstate();
  p->B = luaL_newstate();
  ASSERT_NOT_NULL(p->A);
  ASSERT_NOT_NULL(p->B);
  luaL_openlibs(p->A);
  luaL_openlibs(p->B);
}

static inline void pair_xfer(pair *p) {
  p->xa = op__xfer_new(p->A, p->ps);
  p->xb = op__xfer_new(p->B, p->ps);
  ASSERT_NOT_NULL(p->xa);
  ASSERT_NOT_NULL(p->xb);
}

/* Both stacks must be empty: a test that leaves values behind fails. */
static inline void pair_close(pair *p) {
  ASSERT_EQ(lua_gettop(p->A), 0);
  ASSERT_EQ(lua_gettop(p->B), 0);
  op__xfer_free(p->xa);
  op__xfer_free(p->xb);
  lua_close(p->A);
  lua_close(p->B);
  op__protostore_free(p->ps);
}

#endif /* OFFPATH_TEST_PAIR_H */
