/*
** io.c - the list of built-in I/O modules: each io/ file adds its functions
** to the main-thread offpath table, and closes what it keeps open at
** shutdown. Thread: loop.
*/
#include "internal.h"

void op__open_io(lua_State *L) {
  op__open_io_http(L);
  op__open_io_redis(L);
  op__open_io_exec(L);
  op__open_io_fs(L);
  op__open_io_pg(L);
  op__open_io_sqlite(L);
  (void)L;
}

void op__io_shutdown(op_runtime *rt) {
  op__io_http_shutdown(rt);
  op__io_redis_shutdown(rt);
  op__io_exec_shutdown(rt);
  op__io_fs_shutdown(rt);
  op__io_pg_shutdown(rt);
  op__io_sqlite_shutdown(rt);
  (void)rt;
}
