/* SPDX-License-Identifier: MIT */
/*
** test-pg-hang.c - offpath.pg.connect against a server that never answers:
** a listening socket nobody accepts on. The connect must end with a
** timeout while other events are served, and a shutdown during such a
** connect must end it with "cancelled" and free everything.
*/
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "offpath.h"
#include "test.h"

static char note[1024];
static double note_elapsed;
static lua_Integer note_ticks;
static int notes;

/* engine:note(msg, elapsed, ticks) */
static int engine_note(lua_State *L) {
  snprintf(note, sizeof note, "%s", luaL_optstring(L, 2, "(nil)"));
  note_elapsed = luaL_optnumber(L, 3, 0);
  note_ticks = luaL_optinteger(L, 4, 0);
  notes++;
  return 0;
}

static const luaL_Reg engine[] = { { "note", engine_note }, { NULL, NULL } };

static const char script[] =
    "local offpath = require 'offpath'\n"
    "local done = false\n"
    "function hang(engine, port, timeout, extra)\n"
    "  local ticks = 0\n"
    "  offpath.go(function()\n"
    "    while not done do offpath.sleep(0.02); ticks = ticks + 1 end\n"
    "  end)\n"
    "  local t0 = offpath.now()\n"
    "  local ok, e = pcall(offpath.pg.connect,\n"
    "    'host=127.0.0.1 user=x dbname=x port=' .. port .. (extra or ''),\n"
    "    { timeout = timeout })\n"
    "  done = true\n"
    "  engine:note(ok and 'connected?' or e, offpath.now() - t0, ticks)\n"
    "end\n";

/* A socket that listens on a free loopback port and never accepts. */
static int deaf_listener(int *port) {
  struct sockaddr_in a;
  socklen_t len = sizeof a;
  int fd = socket(AF_INET, SOCK_STREAM, 0);

  ASSERT(fd >= 0);
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_OK(bind(fd, (struct sockaddr *)&a, sizeof a));
  ASSERT_OK(listen(fd, 8));
  ASSERT_OK(getsockname(fd, (struct sockaddr *)&a, &len));
  *port = ntohs(a.sin_port);
  return fd;
}

static op_runtime *make(void) {
  op_runtime *rt;

  ASSERT_OK(op_runtime_new(NULL, &rt));
  ASSERT_OK(op_register_engine(rt, engine, NULL));
  ASSERT_OK(op_load_string(rt, script, "=hang.lua"));
  return rt;
}

static void call_hang_with(op_runtime *rt, int port, double timeout,
                           const char *extra) {
  lua_State *L = op_runtime_lua(rt);

  lua_getglobal(L, "hang");
  op_push_engine(rt);
  lua_pushinteger(L, port);
  if (timeout > 0)
    lua_pushnumber(L, timeout);
  else
    lua_pushnil(L);
  lua_pushstring(L, extra);
  ASSERT_OK(op_call_value(rt, 4));
}

static void call_hang(op_runtime *rt, int port, double timeout) {
  call_hang_with(rt, port, timeout, "");
}

/* The server accepts the TCP connection (the kernel does) but never
** speaks: the connect times out, and the loop ticks meanwhile. */
static void test_connect_timeout(void) {
  int port, fd = deaf_listener(&port);
  op_runtime *rt = make();

  notes = 0;
  call_hang(rt, port, 0.3);
  ASSERT_EQ(notes, 0); /* suspended, not blocked */
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(notes, 1);
  ASSERT_STR_HAS(note, "timeout after 0.3 s in offpath.pg.connect at "
                       "hang.lua:");
  ASSERT(note_elapsed >= 0.29 && note_elapsed < 1.5);
  /* The loop served the ticker all along: about 15 ticks in 0.3 s. */
  ASSERT_GE(note_ticks, 5);
  ASSERT_OK(op_runtime_free(rt));
  close(fd);
}

/* No timeout option: conninfo's connect_timeout bounds the connect. */
static void test_conninfo_connect_timeout(void) {
  int port, fd = deaf_listener(&port);
  op_runtime *rt = make();

  notes = 0;
  call_hang_with(rt, port, 0, " connect_timeout=1");
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(notes, 1);
  ASSERT_STR_HAS(note, "timeout after 1 s in offpath.pg.connect");
  ASSERT(note_elapsed >= 0.99 && note_elapsed < 2.5);
  ASSERT_OK(op_runtime_free(rt));
  close(fd);
}

/* Connected where nothing may suspend (a main chunk): the connect runs in
** the background with its own deadline, and the query waiting for it fails
** with the reason. */
static void test_background_connect_deadline(void) {
  int port, fd = deaf_listener(&port);
  op_runtime *rt;
  lua_State *L;

  ASSERT_OK(op_runtime_new(NULL, &rt));
  ASSERT_OK(op_register_engine(rt, engine, NULL));
  L = op_runtime_lua(rt);
  lua_pushinteger(L, port);
  lua_setglobal(L, "PORT");
  ASSERT_OK(op_load_string(
      rt,
      "local offpath = require 'offpath'\n"
      "local db = offpath.pg.connect('host=127.0.0.1 user=x port=' .. PORT,\n"
      "  { connect_timeout = 0.3 })\n"
      "function q(engine)\n"
      "  local t0 = offpath.now()\n"
      "  local ok, e = pcall(db.query, db, 'SELECT 1')\n"
      "  engine:note(e, offpath.now() - t0, db:stats().connections)\n"
      "end\n",
      "=lazy.lua"));
  notes = 0;
  op_push_engine(rt);
  ASSERT_OK(op_call(rt, "q", 1));
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(notes, 1);
  ASSERT_STR_HAS(note, "pg: connection failed: timeout after 0.3 s "
                       "(db:query at lazy.lua:");
  ASSERT(note_elapsed >= 0.25 && note_elapsed < 1.5);
  ASSERT_EQ(note_ticks, 0); /* no connection left */
  ASSERT_OK(op_runtime_free(rt));
  close(fd);
}

/* Several hanging connects at once, each ends once. */
static void test_many_hanging(void) {
  int port, fd = deaf_listener(&port), i;
  op_runtime *rt = make();

  notes = 0;
  for (i = 0; i < 5; i++)
    call_hang(rt, port, 0.1 + 0.05 * i);
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(notes, 5);
  ASSERT_STR_HAS(note, "timeout after 0.3 s in offpath.pg.connect");
  ASSERT_OK(op_runtime_free(rt));
  close(fd);
}

/* No timeout: the shutdown ends the connect, exactly once, and frees
** the connection. */
static void test_shutdown_while_connecting(void) {
  int port, fd = deaf_listener(&port), i;
  op_runtime *rt = make();

  notes = 0;
  call_hang(rt, port, 0);
  for (i = 0; i < 20; i++) {
    op_runtime_poll(rt);
    usleep(5000);
  }
  ASSERT_EQ(notes, 0);
  ASSERT_OK(op_runtime_free(rt));
  ASSERT_EQ(notes, 1);
  ASSERT_STR_HAS(note, "cancelled: runtime shutting down");
  close(fd);
}

/* Nothing listens: refused at once, with the reason. */
static void test_refused(void) {
  int port, fd = deaf_listener(&port);
  op_runtime *rt = make();

  close(fd); /* the port is free now: connections are refused */
  notes = 0;
  call_hang(rt, port, 5);
  ASSERT_OK(op_runtime_run(rt));
  ASSERT_EQ(notes, 1);
  ASSERT_STR_HAS(note, "pg: connection failed: Connection refused (server "
                       "at \"127.0.0.1\", port ");
  ASSERT(note_elapsed < 1);
  ASSERT_OK(op_runtime_free(rt));
}

int main(void) {
  test_connect_timeout();
  test_conninfo_connect_timeout();
  test_background_connect_deadline();
  test_many_hanging();
  test_shutdown_while_connecting();
  test_refused();
  printf("ok\n");
  return 0;
}
