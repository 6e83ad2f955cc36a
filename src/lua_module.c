/* SPDX-License-Identifier: MIT */
/*
** lua_module.c - offpath.so, the Lua module: require "offpath" from a stock
** lua5.4 program runs a runtime on the program's own lua_State, adds
** offpath.loop() to drive it, and frees it when the state closes.
** Thread: the Lua program's thread, which becomes the loop thread.
**
** The program's main thread is not a handler: like the offpath command's
** main chunk, it cannot suspend. Work that waits (offpath.run, sleep,
** http, task:wait) goes in offpath.go(fn), and offpath.loop() runs the
** loop until no work is left. Outside offpath.loop() Lua is running (the
** main chunk), so wake-ups queue for the loop as they do inside a handler
** (rt->depth is 1 there, 0 while the loop waits).
**
** At lua_close, the module's userdata is finalized: the runtime drains
** what is left (queued tasks run, suspended waits are cancelled), joins
** its threads and is freed. Lua finalizes objects made later first, so
** offpath objects made after the require (go tasks, connections) may be
** finalized before that; their finalizers are safe on objects still in
** use, and their memory stays valid until the last finalizer has run.
*/
#include <string.h>

#include "internal.h"

OP_EXTERN int luaopen_offpath(lua_State *L);

/* The module's state: a userdata anchored in the registry (lmod_key),
** with the module table as its user value. */
typedef struct lmod {
  op_runtime *rt; /* NULL until made, and once freed */
  int looping;    /* inside offpath.loop() */
} lmod;

static const char lmod_key = 'M';

/* __gc of the module's state, when the Lua state closes: drain the
** runtime and free it.  [-0, +0, e] */
static int lmod_gc(lua_State *L) {
  lmod *m = lua_touserdata(L, 1);
  op_runtime *rt = m->rt;

  /* Closed from inside the loop (os.exit(code, true) in a handler): the
  ** loop is on the stack below, and the process ends right after. */
  if (rt == NULL || m->looping)
    return 0;
  m->rt = NULL;
  rt->depth = 0; /* no Lua runs below: completions resume in place */
  /* Handler errors were reported on the way: nothing to add. */
  (void)op_runtime_free(rt);
  return 0;
}

/* offpath.loop([mode]) -> busy: run the runtime's loop on the calling
** thread. "default" runs until no work is left (no task, wait, timer or
** suspended handler); "once" waits for one event and runs what is ready;
** "nowait" runs what is ready without waiting. Returns whether work is
** left. Callable only on the main thread, outside the loop.
** [-0, +1, e] */
static int offpath_loop(lua_State *L) {
  static const char *const modes[] = { "default", "once", "nowait", NULL };
  static const uv_run_mode uv_modes[] = { UV_RUN_DEFAULT, UV_RUN_ONCE,
                                          UV_RUN_NOWAIT };
  lmod *m = lua_touserdata(L, lua_upvalueindex(1));
  int mode = luaL_checkoption(L, 1, "default", modes);
  op_runtime *rt = m->rt;

  if (rt == NULL)
    return luaL_error(L, "closed: offpath.loop after the runtime was freed");
  if (m->looping)
    return luaL_error(L, "cannot loop: offpath.loop called inside the loop "
                         "(from a handler or callback)");
  if (L != rt->L)
    return luaL_error(L, "cannot loop: offpath.loop called in a coroutine "
                         "(call it from the main chunk)");
  m->looping = 1;
  rt->depth--;
  uv_run(rt->loop, uv_modes[mode]);
  rt->depth++;
  m->looping = 0;
  lua_pushboolean(L, op_runtime_busy(rt));
  return 1;
}

/* The module's entry point: make the runtime on the program's main
** thread (once per Lua state) and return the module table.
** [-0, +1, e] */
int luaopen_offpath(lua_State *L) {
  op_runtime *rt;
  lua_State *main;
  lmod *m;
  int rc;

  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &lmod_key) == LUA_TUSERDATA) {
    lua_getiuservalue(L, -1, 1); /* required again: the same module */
    return 1;
  }
  lua_pop(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  main = lua_tothread(L, -1);
  lua_pop(L, 1);
  if (main != L)
    return luaL_error(L, "cannot load offpath: require it on the main "
                         "thread, not in a coroutine");
  if (lua_getfield(L, LUA_REGISTRYINDEX, OP_RUNTIME_KEY) != LUA_TNIL)
    return luaL_error(L, "cannot load offpath: this Lua state already "
                         "belongs to an offpath runtime");
  lua_pop(L, 1);

  /* The state first, empty, so that nothing is held if a raise comes. */
  m = lua_newuserdatauv(L, sizeof *m, 1);
  m->rt = NULL;
  m->looping = 0;
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, lmod_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushliteral(L, "offpath.module");
  lua_setfield(L, -2, "__name");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &lmod_key);

  if ((rc = op__runtime_new(NULL, L, &rt)) != 0) {
    lua_pushnil(L); /* not loaded: a later require tries again */
    lua_rawsetp(L, LUA_REGISTRYINDEX, &lmod_key);
    return luaL_error(L, "cannot load offpath: %s", op_strerror(rc));
  }
  m->rt = rt;
  rt->depth = 1; /* the main chunk is running */

  lua_pushcfunction(L, op__open_main);
  lua_call(L, 0, 1);
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, offpath_loop, 1);
  lua_setfield(L, -2, "loop");
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, -3, 1);
  return 1;
}
