/*
** io.c - the list of built-in I/O modules: each io/ file adds its functions
** to the main-thread offpath table, and closes what it keeps open at
** shutdown. Thread: loop.
*/
#include "internal.h"

void op__open_io(lua_State *L) {
  (void)L;
}

void op__io_shutdown(op_runtime *rt) {
  (void)rt;
}
