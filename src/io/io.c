/* SPDX-License-Identifier: MIT */
/*
** io.c - the list of built-in I/O modules: each io/ file adds its functions
** to the main-thread offpath table, and closes what it keeps open at
** shutdown. Thread: loop.
*/
#include "internal.h"

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

void op__open_io(lua_State *L) {
  op__open_io_http(L);
  op__open_io_redis(L);
  op__open_io_exec(L);
  op__open_io_fs(L);
  op__open_io_pg(L);
  op__open_io_sqlite(L);
  (void)L;
}

void op__io_shutdown(op_runtime *rt) {
  op__io_http_shutdown(rt);
  op__io_redis_shutdown(rt);
  op__io_exec_shutdown(rt);
  op__io_fs_shutdown(rt);
  op__io_pg_shutdown(rt);
  op__io_sqlite_shutdown(rt);
  (void)rt;
}
