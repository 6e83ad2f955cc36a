/* SPDX-License-Identifier: MIT */
/*
** consumer.c - a program that uses liboffpath the way an engine does, built
** by tests/sh/install.sh against an installed prefix (CMake package,
** pkg-config) and as a subproject (add_subdirectory).
** Thread: main (the runtime's loop thread).
*/
#include <stdio.h>

#include <offpath.h>

static const char script[] =
    "local offpath = require 'offpath'\n"
    "function on_event(n)\n"
    "  result = offpath.run('cpu', function(x) return x * 2 end, n)\n"
    "end\n";

int main(void) {
  op_runtime *rt;
  op_config cfg;
  lua_State *L;
  int rc;

  op_config_init(&cfg);
  op_config_pool(&cfg, "cpu", 1, 0);
  if ((rc = op_runtime_new(&cfg, &rt)) != 0) {
    fprintf(stderr, "consumer: %s\n", op_strerror(rc));
    return 1;
  }
  L = op_runtime_lua(rt);
  if (op_load_string(rt, script, "=consumer") != 0 ||
      (lua_pushinteger(L, 21), op_call(rt, "on_event", 1)) != 0 ||
      op_runtime_run(rt) != 0) {
    fprintf(stderr, "consumer: %s\n", op_errmsg(rt));
    op_runtime_free(rt);
    return 1;
  }
  lua_getglobal(L, "result");
  printf("offpath %s: %lld\n", op_version(), (long long)lua_tointeger(L, -1));
  lua_pop(L, 1);
  return op_runtime_free(rt) == 0 ? 0 : 1;
}
