/* SPDX-License-Identifier: MIT */
/*
** test-stdfds.c - op_runtime_new in a process started with its standard
** descriptors closed: they are opened on /dev/null first, so that none of
** the runtime's descriptors takes 0, 1 or 2 and is used as stdin or
** stdout. The runtime still works, and a watchdog can ask which lua_State
** the loop thread runs.
*/
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "offpath.h"
#include "test.h"

static int is_devnull(int fd) {
  struct stat a, b;

  if (fstat(fd, &a) != 0 || stat("/dev/null", &b) != 0)
    return 0;
  return a.st_rdev == b.st_rdev && S_ISCHR(a.st_mode);
}

int main(void) {
  op_runtime *rt;
  int err = dup(2), fd;

  ASSERT_GE(err, 3);
  fcntl(err, F_SETFD, FD_CLOEXEC);
  close(0);
  close(1);
  close(2); /* messages go to err until the end */
  ASSERT_OK(op_runtime_new(NULL, &rt));
  if (!is_devnull(0) || !is_devnull(1) || !is_devnull(2)) {
    dup2(err, 2);
    TEST_FAIL_("%s", "0, 1 and 2 are not /dev/null");
  }
  fd = op_runtime_fd(rt);
  ASSERT_OK(op_load_string(rt, "x = 6 * 7", "=t.lua"));
  ASSERT(op_runtime_running(rt) == op_runtime_lua(rt));
  ASSERT_OK(op_runtime_free(rt));
  dup2(err, 2);
  ASSERT_GT(fd, 2);
  puts("ok");
  return 0;
}
