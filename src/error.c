/* SPDX-License-Identifier: MIT */
/*
** error.c - errors: codes and their names, the runtime's error message and
** callback, panics, protected calls with a traceback, and where Lua code
** stands. The ground floor: it calls no other file of offpath.
** Thread: any, except the runtime's message and callback (loop).
*/
#include <stdarg.h>
#include <string.h>

#include "internal.h"

const char *op_version(void) {
  return OP_VERSION_STRING;
}

const char *op_strerror(int err) {
  switch (err) {
#define OP_STRERROR_CASE(name, value, text)                                    \
  case OP_##name:                                                              \
    return text;
    OP_ERRNO_MAP(OP_STRERROR_CASE)
#undef OP_STRERROR_CASE
  case 0:
    return "success";
  default:
    return err < 0 && err > -4096 ? uv_strerror(err) : "unknown error";
  }
}

const char *op_err_name(int err) {
  switch (err) {
#define OP_ERRNAME_CASE(name, value, text)                                     \
  case OP_##name:                                                              \
    return #name;
    OP_ERRNO_MAP(OP_ERRNAME_CASE)
#undef OP_ERRNAME_CASE
  case 0:
    return "OK";
  default:
    return err < 0 && err > -4096 ? uv_err_name(err) : "UNKNOWN";
  }
}

void op__panic(const char *file, int line, const char *msg) {
  fprintf(stderr, "offpath: %s:%d: %s\n", file, line, msg);
  fflush(stderr);
  abort();
}

/* ---- the runtime's error message ---- */

void op__set_errmsg(op_runtime *rt, const char *fmt, ...) {
  va_list ap;
  int n;
  char *p;

  va_start(ap, fmt);
  n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0 || (p = malloc((size_t)n + 1)) == NULL)
    return;
  va_start(ap, fmt);
  vsnprintf(p, (size_t)n + 1, fmt, ap);
  va_end(ap);
  free(rt->errmsg);
  rt->errmsg = p;
}

const char *op_errmsg(op_runtime *rt) {
  op__assert_loop_thread(rt);
  return rt->errmsg != NULL ? rt->errmsg : "";
}

void op__report_error(op_runtime *rt, const char *msg) {
  if (msg == NULL)
    msg = "(no message)";
  op__set_errmsg(rt, "%s", msg);
  if (rt->on_error != NULL)
    rt->on_error(rt, msg, rt->on_error_ud);
  else
    fprintf(stderr, "offpath: %s\n", msg);
}

void op_runtime_on_error(op_runtime *rt, op_error_cb cb, void *ud) {
  op__assert_loop_thread(rt);
  rt->on_error = cb;
  rt->on_error_ud = ud;
}

/* ---- protected calls ---- */

const char *op__error_object(lua_State *L, int idx, char *buf, size_t len) {
  snprintf(buf, len, "(error object is a %s value)", luaL_typename(L, idx));
  return buf;
}

const char *op__error_text(lua_State *L, int idx) {
  char buf[64];

  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
    lua_pushvalue(L, idx);
    return lua_tostring(L, -1);
  }
  if (luaL_callmeta(L, idx, "__tostring")) {
    if (lua_type(L, -1) == LUA_TSTRING)
      return lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  return lua_pushstring(L, op__error_object(L, idx, buf, sizeof buf));
}

int op__traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  char buf[64];

  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      return 1;
    msg = op__error_object(L, 1, buf, sizeof buf);
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

int op__pcall(lua_State *L, int nargs, int nres, lua_CFunction msgh) {
  int base = 0, status;

  if (msgh != NULL) {
    base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, msgh);
    lua_insert(L, base);
  }
  status = lua_pcall(L, nargs, nres, base);
  if (msgh != NULL)
    lua_remove(L, base);
  return status;
}

int op__pcall_at(lua_State *L, int nargs, int nres, int msgh) {
  return lua_pcall(L, nargs, nres, msgh);
}

int op__protect(lua_State *L, lua_CFunction fn, void *ud, int nres) {
  /* A light C function and a light userdata: pushing them allocates
  ** nothing, and lua_pcall's own needs (stack, call info) are met inside
  ** the protected call. */
  lua_pushcfunction(L, fn);
  lua_pushlightuserdata(L, ud);
  return op__pcall(L, 1, nres, NULL);
}

/* Registry key of the string "not enough memory" (main VM). */
static const char nomem_key = 'N';

void op__nomem_open(lua_State *L) {
  lua_pushliteral(L, OP_NOMEM);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &nomem_key);
}

void op__push_nomem(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &nomem_key);
}

/* The protected body of op__push_text: the string is the argument. */
static int push_text_p(lua_State *L) {
  lua_pushstring(L, lua_touserdata(L, 1));
  return 1;
}

void op__push_text(lua_State *L, const char *s) {
  if (op__protect(L, push_text_p, (void *)s, 1) != LUA_OK &&
      lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    op__push_nomem(L);
  }
}

#ifdef OP_DEBUG
void op__check_loop_thread(op_runtime *rt, const char *fn) {
  uv_thread_t me = uv_thread_self();
  char msg[128];

  if (!uv_thread_equal(&me, &rt->loop_thread)) {
    snprintf(msg, sizeof msg,
             "%s called off the loop thread (the thread that made the "
             "runtime)",
             fn);
    OP_PANIC(msg);
  }
}
#endif

/* ---- where an error comes from ---- */

const char *op__where(lua_State *co, char *buf, size_t len) {
  lua_Debug ar;
  int level;

  for (level = 0; level < 8; level++) {
    if (!lua_getstack(co, level, &ar))
      break;
    if (lua_getinfo(co, "Sl", &ar) && ar.currentline > 0) {
      snprintf(buf, len, "%s:%d", ar.short_src, ar.currentline);
      return buf;
    }
  }
  snprintf(buf, len, "?");
  return buf;
}

/* Weak-keyed table in the registry: error value -> the traceback of the
** task that raised it, for offpath.traceback(err). */
static const char tracebacks_key = 'B';

void op__tracebacks_open(lua_State *L) {
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &tracebacks_key);
}

/* Remember the traceback tb (at -1) of the error value at -2, if that
** value has an identity offpath.traceback can find it by.  [-0, +0, m] */
void op__note_traceback(lua_State *L) {
  switch (lua_type(L, -2)) {
  case LUA_TTABLE:
  case LUA_TUSERDATA:
  case LUA_TFUNCTION:
  case LUA_TTHREAD:
    if (lua_type(L, -1) != LUA_TSTRING)
      return;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &tracebacks_key);
    lua_pushvalue(L, -3);
    lua_pushvalue(L, -3);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    break;
  default:
    break;
  }
}

int op__error_traceback(lua_State *L, int idx) {
  int t = lua_type(L, idx);

  if (t != LUA_TTABLE && t != LUA_TUSERDATA && t != LUA_TFUNCTION &&
      t != LUA_TTHREAD)
    return 0;
  idx = lua_absindex(L, idx);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &tracebacks_key);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushvalue(L, idx);
  lua_rawget(L, -2);
  lua_remove(L, -2);
  if (lua_type(L, -1) == LUA_TSTRING)
    return 1;
  lua_pop(L, 1);
  return 0;
}
