/* SPDX-License-Identifier: MIT */
/*
** common.c - what the io modules share: option and SQL arguments, the
** registration of a module's objects, the set-up guard, and the hooks
** each module registers to close what it keeps open at runtime shutdown.
** Thread: loop.
*/
#include "internal.h"

/* ---- arguments ---- */

/* Read the optional number option key of the table at idx: dflt if absent;
** raises "bad option 'key' [to 'call'] (...)" if it is not a number or is
** negative. call may be NULL.  [-0, +0, e] */
double op__opt_number(lua_State *L, int idx, const char *key, double dflt,
                      const char *call) {
  double v = dflt;

  if (lua_getfield(L, idx, key) != LUA_TNIL) {
    if (!lua_isnumber(L, -1))
      luaL_error(L, "bad option '%s'%s%s%s (number expected, got %s)", key,
                 call ? " to '" : "", call ? call : "", call ? "'" : "",
                 luaL_typename(L, -1));
    v = lua_tonumber(L, -1);
    if (!(v >= 0))
      luaL_error(L, "bad option '%s'%s%s%s (must not be negative)", key,
                 call ? " to '" : "", call ? call : "", call ? "'" : "");
  }
  lua_pop(L, 1);
  return v;
}

const char *op__sql_arg(lua_State *L, int idx, double *timeout, size_t *len) {
  if (lua_istable(L, idx)) {
    *timeout = op__opt_number(L, idx, "timeout", *timeout, NULL);
    if (lua_rawgeti(L, idx, 1) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_getfield(L, idx, "sql");
    }
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_argerror(L, idx, "field 'sql' or [1] must be a string");
    lua_replace(L, idx);
  }
  return luaL_checklstring(L, idx, len);
}

/* ---- objects ---- */

void op__io_register(lua_State *L, const char *mt, const luaL_Reg *meta,
                     const luaL_Reg *methods, const char *field,
                     const luaL_Reg *funcs) {
  if (luaL_newmetatable(L, mt)) {
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  lua_setfield(L, -2, field);
}

static const char guard_mt_key = 'G';

static int guard_gc(lua_State *L) {
  op_guard *g = lua_touserdata(L, 1);

  if (g->p != NULL) {
    void *p = g->p;
    g->p = NULL;
    g->discard(L, p);
  }
  return 0;
}

op_guard *op__guard_new(lua_State *L, void (*discard)(lua_State *, void *)) {
  op_guard *g = lua_newuserdatauv(L, sizeof *g, 0);

  g->p = NULL;
  g->discard = discard;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &guard_mt_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, guard_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &guard_mt_key);
  }
  lua_setmetatable(L, -2);
  return g;
}

/* ---- shutdown hooks ---- */

void op__io_at_shutdown(op_runtime *rt, void (*fn)(op_runtime *rt)) {
  int i;

  for (i = 0; i < rt->nio_hooks; i++)
    if (rt->io_hooks[i] == fn)
      return; /* the module was opened again */
  if (rt->nio_hooks == OP_IO_HOOKS)
    OP_PANIC("too many io shutdown hooks"); /* OP_IO_HOOKS is too small */
  rt->io_hooks[rt->nio_hooks++] = fn;
}

void op__io_shutdown(op_runtime *rt) {
  int i;

  for (i = 0; i < rt->nio_hooks; i++)
    rt->io_hooks[i](rt);
  rt->nio_hooks = 0;
}
