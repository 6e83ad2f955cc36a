/* SPDX-License-Identifier: MIT */
/*
** hang.h - helpers for tests of connects that never complete: a loopback
** listener whose accept queue is full (backlog 0, never accepts, filled by
** a few connections of our own), so the kernel drops further SYNs and a
** connect to it hangs until the client gives up. Also counts this
** process's open file descriptors, to show an aborted connect closed its
** socket.
*/
#ifndef OFFPATH_TEST_HANG_H
#define OFFPATH_TEST_HANG_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <string.h>
#include <uv.h>

#include "offpath.h"
#include "test.h"

#define HANG_FILLERS 4

typedef struct hang_listener {
  int fd;
  int port;
  int fillers[HANG_FILLERS];
} hang_listener;

static void hang_open(hang_listener *h) {
  struct sockaddr_in sa;
  socklen_t len = sizeof sa;
  int i;

  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  h->fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT(h->fd >= 0);
  ASSERT_OK(bind(h->fd, (struct sockaddr *)&sa, sizeof sa));
  ASSERT_OK(listen(h->fd, 0));
  ASSERT_OK(getsockname(h->fd, (struct sockaddr *)&sa, &len));
  h->port = ntohs(sa.sin_port);
  /* Fill the accept queue; the later fillers hang themselves. */
  for (i = 0; i < HANG_FILLERS; i++) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT(s >= 0);
    ASSERT_OK(fcntl(s, F_SETFL, O_NONBLOCK));
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0)
      ASSERT_EQ(errno, EINPROGRESS);
    h->fillers[i] = s;
  }
  usleep(100 * 1000); /* let the handshakes that can complete do so */
}

static void hang_close(hang_listener *h) {
  int i;

  for (i = 0; i < HANG_FILLERS; i++)
    close(h->fillers[i]);
  close(h->fd);
}

/* Open file descriptors of this process. */
static int open_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  struct dirent *e;
  int n = 0;

  ASSERT_NOT_NULL(d);
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(d);
  return n - 1; /* the directory's own descriptor */
}

/* ---- driving a runtime from a hang test ---- */

/* Ticks of a host timer that proves the loop kept serving. */
static int c_ticks;

static void tick_cb(uv_timer_t *t) {
  (void)t;
  c_ticks++;
}

static int global_is_set(op_runtime *rt, const char *name) {
  lua_State *L = op_runtime_lua(rt);
  int set = lua_getglobal(L, name) != LUA_TNIL;
  lua_pop(L, 1);
  return set;
}

static double global_num(op_runtime *rt, const char *name) {
  lua_State *L = op_runtime_lua(rt);
  double v;
  lua_getglobal(L, name);
  v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

static void global_str(op_runtime *rt, const char *name, char *buf,
                       size_t len) {
  lua_State *L = op_runtime_lua(rt);
  lua_getglobal(L, name);
  snprintf(buf, len, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "");
  lua_pop(L, 1);
}

static void clear_global(op_runtime *rt, const char *name) {
  lua_State *L = op_runtime_lua(rt);
  lua_pushnil(L);
  lua_setglobal(L, name);
}

/* Run the loop until the global `flag` is set (10 s at most). */
static void run_until(op_runtime *rt, const char *flag) {
  uint64_t deadline = uv_hrtime() + 10000000000u;

  while (!global_is_set(rt, flag)) {
    ASSERT(uv_hrtime() < deadline);
    uv_run(op_runtime_uv_loop(rt), UV_RUN_ONCE);
  }
}

/* Run the loop for about ms milliseconds. */
static void run_for(op_runtime *rt, int ms) {
  uint64_t end = uv_hrtime() + (uint64_t)ms * 1000000u;

  while (uv_hrtime() < end)
    uv_run(op_runtime_uv_loop(rt), UV_RUN_ONCE);
}

/* Open the listener, make a runtime running chunk (which defines
** ticker(), a Lua ticker that runs until the global `stop` is set and then
** sets `ticker_done`), and start the host timer and the Lua ticker. */
static void hang_start(hang_listener *h, op_runtime **rt, uv_timer_t *timer,
                       const char *chunk) {
  hang_open(h);
  ASSERT_OK(op_runtime_new(NULL, rt));
  ASSERT_OK(op_load_string(*rt, chunk, "=hang.lua"));
  uv_timer_init(op_runtime_uv_loop(*rt), timer);
  uv_timer_start(timer, tick_cb, 10, 10);
  ASSERT_OK(op_call(*rt, "ticker", 0));
}

/* Stop the Lua ticker and the timer, free the runtime, close the
** listener. */
static void hang_finish(hang_listener *h, op_runtime *rt, uv_timer_t *timer) {
  lua_pushboolean(op_runtime_lua(rt), 1);
  lua_setglobal(op_runtime_lua(rt), "stop");
  run_until(rt, "ticker_done");
  uv_close((uv_handle_t *)timer, NULL);
  ASSERT_OK(op_runtime_free(rt));
  hang_close(h);
}

#endif /* OFFPATH_TEST_HANG_H */
