/* SPDX-License-Identifier: MIT */
/*
** vm.c - making and preparing a Lua state: standard libraries, offpath's
** built-in Lua modules in package.preload, package.path; and the way from
** a main-VM state back to its runtime and engine object.
** Thread: any (op__new_state runs on the thread that will own the VM);
** op__push_engine on the loop thread.
*/
#include "internal.h"

/* package.preload loader of a built-in module; upvalue 1 is its entry. */
static int load_builtin(lua_State *L) {
  const op_lua_module *m = lua_touserdata(L, lua_upvalueindex(1));

  if (luaL_loadbufferx(L, (const char *)m->src, m->len, m->chunkname, "t"))
    return lua_error(L);
  lua_pushstring(L, m->name);
  lua_call(L, 1, 1);
  return 1;
}

void op__preload_modules(lua_State *L) {
  const op_lua_module *m;

  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (m = op__lua_modules; m->name != NULL; m++) {
    lua_pushlightuserdata(L, (void *)m);
    lua_pushcclosure(L, load_builtin, 1);
    lua_setfield(L, -2, m->name);
  }
  lua_pop(L, 1);
}

/* The set-up of op__new_state, protected: arg 1 is the runtime.
** [-1, +0, m] */
static int new_state_p(lua_State *L) {
  op_runtime *rt = lua_touserdata(L, 1);

  lua_pop(L, 1);
  luaL_openlibs(L);
  /* Tasks make many short-lived objects: generational collection costs a
  ** fraction of incremental collection for them (see docs/benchmarks.md). */
  lua_gc(L, LUA_GCGEN, 0, 0);
  op__preload_modules(L);
  if (rt->package_path != NULL) {
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s;", rt->package_path);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
  }
  return 0;
}

/* Returns NULL on out of memory. */
lua_State *op__new_state(op_runtime *rt, op_vmem *mem) {
  lua_State *L = op__vm_new(mem);

  if (L == NULL)
    return NULL;
  lua_pushcfunction(L, new_state_p);
  lua_pushlightuserdata(L, rt);
  if (op__pcall(L, 1, 0, NULL) != LUA_OK) {
    lua_close(L);
    return NULL;
  }
  return L;
}

/* ---- the runtime of a main-VM state ---- */

op_runtime *op__runtime(lua_State *L) {
  return op__co(L)->rt;
}

/* Push the engine object (made on first use).  [-0, +1, m] */
void op__push_engine(op_runtime *rt) {
  lua_State *L = rt->L;

  if (rt->engine_ref == LUA_NOREF) {
    lua_newtable(L);
    lua_pushvalue(L, -1);
    rt->engine_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, rt->engine_ref);
}
