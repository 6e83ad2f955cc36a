/* SPDX-License-Identifier: MIT */
/*
** test-exec.c - offpath.exec at runtime shutdown: a child still running
** when the runtime is freed is killed at once (no grace period wait) and
** reaped, and the waiting coroutine is told. LABELS: io exec
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "offpath.h"
#include "test.h"

static const char script[] =
    "local offpath = require 'offpath'\n"
    "function start(pidfile)\n"
    "  offpath.go(function()\n"
    "    local ok, err = pcall(offpath.exec,\n"
    "      \"trap '' TERM; echo $$ > \" .. pidfile ..\n"
    "      '; while :; do sleep 0.05; done', { kill_grace = 30 })\n"
    "    local f = io.open(pidfile .. '.end', 'a')\n"
    "    f:write(tostring(ok), ' ', tostring(err), '\\n')\n"
    "    f:close()\n"
    "  end)\n"
    "end\n";

/* The pid a child wrote to file, or 0 while there is none. */
static int read_pid(const char *file) {
  FILE *f = fopen(file, "r");
  int pid = 0;

  if (f == NULL)
    return 0;
  if (fscanf(f, "%d", &pid) != 1)
    pid = 0;
  fclose(f);
  return pid;
}

int main(void) {
  char dir[] = "/tmp/offpath-test-exec-XXXXXX";
  char pidfile[256], endfile[300], proc[64], buf[1024];
  op_runtime *rt;
  lua_State *L;
  uint64_t t0;
  int i, pid = 0;

  ASSERT_NOT_NULL(mkdtemp(dir));
  snprintf(pidfile, sizeof pidfile, "%s/pid", dir);
  snprintf(endfile, sizeof endfile, "%s.end", pidfile);
  ASSERT_OK(op_runtime_new(NULL, &rt));
  ASSERT_OK(op_load_string(rt, script, "=test-exec"));
  L = op_runtime_lua(rt);
  lua_pushstring(L, pidfile);
  ASSERT_OK(op_call(rt, "start", 1));
  for (i = 0; i < 1000 && pid == 0; i++) {
    op_runtime_poll(rt);
    usleep(5000);
    pid = read_pid(pidfile);
  }
  ASSERT_GT(pid, 0);
  /* The child ignores SIGTERM and has a 30 s grace period: shutdown must
  ** not wait for it. */
  ASSERT_STR_EQ(slurp(endfile, buf, sizeof buf), "");
  t0 = uv_hrtime();
  ASSERT_OK(op_runtime_free(rt));
  ASSERT_LT(uv_hrtime() - t0, (uint64_t)10 * 1000000000u);
  /* Reaped: no /proc entry (a zombie would keep one). */
  snprintf(proc, sizeof proc, "/proc/%d", pid);
  ASSERT(access(proc, F_OK) != 0);
  /* The waiting coroutine was told, exactly once. */
  ASSERT_STR_HAS(slurp(endfile, buf, sizeof buf),
                 "false cancelled: runtime shutting down");
  ASSERT(strchr(buf, '\n') == strrchr(buf, '\n'));
  unlink(endfile);
  unlink(pidfile);
  rmdir(dir);
  printf("ok - a running child is killed and reaped at shutdown (%.3f s)\n",
         (double)(uv_hrtime() - t0) / 1e9);
  return 0;
}
