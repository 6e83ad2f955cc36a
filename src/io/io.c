/* SPDX-License-Identifier: MIT */
/*
** io.c - the list of built-in I/O modules: each io/ file adds its functions
** to the main-thread offpath table (and registers what it closes at
** shutdown, io/common.c). Thread: loop.
*/
#include "internal.h"

void op__open_io(lua_State *L) {
  op__open_io_http(L);
  op__open_io_redis(L);
  op__open_io_exec(L);
  op__open_io_fs(L);
  op__open_io_pg(L);
  op__open_io_sqlite(L);
}
