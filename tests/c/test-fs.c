/* SPDX-License-Identifier: MIT */
/*
** test-fs.c - the file calls at runtime shutdown with OP_SHUTDOWN_CANCEL: a
** readfile still queued behind a busy worker never runs, and its waiter is
** told "cancelled" exactly once. LABELS: io fs tsan
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "offpath.h"
#include "test.h"

static const char script[] =
    "local offpath = require 'offpath'\n"
    "function start(out)\n"
    "  -- keep the only thread of 'one' busy for a while\n"
    "  offpath.launch('one', function()\n"
    "    local t = os.clock() + 0.3\n"
    "    while os.clock() < t do end\n"
    "  end)\n"
    "  offpath.go(function()\n"
    "    local ok, err = pcall(offpath.readfile, '/dev/null',\n"
    "                          { pool = 'one' })\n"
    "    local f = io.open(out, 'a')\n"
    "    f:write(tostring(ok), ' ', tostring(err), '\\n')\n"
    "    f:close()\n"
    "  end)\n"
    "end\n";

int main(void) {
  char dir[] = "/tmp/offpath-test-fs-XXXXXX";
  char out[256], buf[1024];
  op_config cfg;
  op_stats st;
  op_runtime *rt;
  lua_State *L;
  int i, j;

  ASSERT_NOT_NULL(mkdtemp(dir));
  snprintf(out, sizeof out, "%s/out", dir);
  op_config_init(&cfg);
  cfg.shutdown = OP_SHUTDOWN_CANCEL;
  ASSERT_OK(op_config_pool(&cfg, "one", 1, 0));
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  ASSERT_OK(op_load_string(rt, script, "=test-fs"));
  L = op_runtime_lua(rt);
  lua_pushstring(L, out);
  ASSERT_OK(op_call(rt, "start", 1));
  /* Let the go coroutine queue its readfile and the worker take the busy
  ** task (a loaded machine may take a while to start the thread). */
  for (j = 0; j < 5000; j++) {
    op_runtime_poll(rt);
    ASSERT_OK(op_stats_get(rt, &st));
    for (i = 0; i < st.npools; i++)
      if (strcmp(st.pools[i].name, "one") == 0)
        break;
    ASSERT_LT(i, st.npools);
    if (st.pools[i].submitted == 2 && st.pools[i].queued == 1)
      break;
    usleep(1000);
  }
  ASSERT_EQ(st.pools[i].submitted, 2);
  ASSERT_EQ(st.pools[i].queued, 1);
  ASSERT_STR_EQ(slurp(out, buf, sizeof buf), "");
  ASSERT_OK(op_runtime_free(rt));
  ASSERT_STR_EQ(slurp(out, buf, sizeof buf),
                "false cancelled: offpath.readfile (the queue of pool 'one' "
                "was cancelled at shutdown)\n");
  unlink(out);
  rmdir(dir);
  printf("ok - a queued readfile is cancelled at shutdown, told once\n");
  return 0;
}
