/*
** main.c - the offpath command (minimal form): offpath run SCRIPT
** [--input FILE]. Feeds lines to on_event(engine, line).
** Thread: main (the loop thread).
*/
#include <stdio.h>
#include <string.h>

#include "offpath.h"
#include <uv.h>

static int call0(op_runtime *rt, const char *name) {
  lua_State *L = op_runtime_lua(rt);
  int rc;

  lua_getglobal(L, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  op_push_engine(rt);
  lua_insert(L, -1);
  rc = op_call_value(rt, 1);
  return rc;
}

int main(int argc, char **argv) {
  op_runtime *rt;
  const char *script, *input = "-";
  FILE *in;
  char line[65536];
  int i, rc, failed = 0;
  lua_State *L;

  if (argc < 3 || strcmp(argv[1], "run") != 0) {
    fprintf(stderr, "usage: offpath run SCRIPT [--input FILE]\n");
    return 2;
  }
  script = argv[2];
  for (i = 3; i + 1 < argc; i += 2)
    if (strcmp(argv[i], "--input") == 0)
      input = argv[i + 1];
  if ((rc = op_runtime_new(NULL, &rt)) != 0) {
    fprintf(stderr, "offpath: %s\n", op_strerror(rc));
    return 1;
  }
  L = op_runtime_lua(rt);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_getfield(L, -1, "offpath");
  lua_setglobal(L, "offpath");
  lua_pop(L, 2);
  if (op_load_script(rt, script) != 0) {
    fprintf(stderr, "offpath: %s\n", op_errmsg(rt));
    op_runtime_free(rt);
    return 1;
  }
  failed |= call0(rt, "on_start") != 0;
  op_runtime_run(rt);
  in = strcmp(input, "-") == 0 ? stdin : fopen(input, "r");
  if (in == NULL) {
    perror(input);
    op_runtime_free(rt);
    return 1;
  }
  while (fgets(line, sizeof line, in) != NULL) {
    line[strcspn(line, "\n")] = '\0';
    lua_getglobal(L, "on_event");
    op_push_engine(rt);
    lua_pushstring(L, line);
    failed |= op_call_value(rt, 2) != 0;
    op_runtime_run(rt);
  }
  if (in != stdin)
    fclose(in);
  op_runtime_run(rt);
  failed |= call0(rt, "on_stop") != 0;
  op_runtime_run(rt);
  rc = op_runtime_free(rt);
  return failed || rc != 0 ? 1 : 0;
}
