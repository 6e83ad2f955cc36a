/* SPDX-License-Identifier: MIT */
/*
** embed-uv.c - embedding offpath in a host that runs its own libuv loop.
** Thread: main (the host's loop thread), except the pool threads offpath
** starts itself.
**
** The host makes events: a timer fires COUNT times, standing for packets or
** requests. For each one it calls the script's handler on_event(engine, n)
** in a coroutine. The handler offloads its work to a pool and reports back
** through engine:done(n, result), a C function of this host. The loop thread
** never waits: while workers compute, the timer keeps ticking.
**
**   usage: embed-uv SCRIPT [COUNT]
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <offpath.h>
#include <uv.h>

/* The host's own state, reachable from engine methods via op_engine_ud().
** The loop's data field is left to offpath. */
typedef struct host {
  op_runtime *rt;
  uv_timer_t tick;
  int count; /* events to make */
  int sent;  /* events handed to the script */
  int done;  /* results reported back */
} host;

/* engine:done(n, result): the handler reports a result. */
static int engine_done(lua_State *L) {
  host *h = op_engine_ud(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  const char *result = luaL_tolstring(L, 3, NULL);

  h->done++;
  printf("event %lld: %s\n", (long long)n, result);
  return 0;
}

/* One event: call on_event(engine, n). It returns at once if the handler
** suspends (here: while its work runs on a pool thread). */
static void tick_cb(uv_timer_t *timer) {
  host *h = timer->data;
  lua_State *L = op_runtime_lua(h->rt);
  int rc;

  op_push_engine(h->rt);
  lua_pushinteger(L, ++h->sent);
  rc = op_call(h->rt, "on_event", 2);
  if (rc != 0)
    fprintf(stderr, "embed-uv: on_event: %s\n", op_errmsg(h->rt));
  if (h->sent == h->count)
    uv_timer_stop(timer); /* the loop ends once offpath is idle too */
}

/* Errors that happen after a handler suspended land here. */
static void on_error(op_runtime *rt, const char *msg, void *ud) {
  (void)rt;
  (void)ud;
  fprintf(stderr, "embed-uv: script error: %s\n", msg);
}

int main(int argc, char **argv) {
  static const luaL_Reg engine[] = { { "done", engine_done }, { NULL, NULL } };
  uv_loop_t loop;
  op_config cfg;
  op_stats st;
  host h;
  int i, rc;

  if (argc < 2) {
    fprintf(stderr, "usage: embed-uv SCRIPT [COUNT]\n");
    return 2;
  }
  memset(&h, 0, sizeof h);
  h.count = argc > 2 ? (int)strtol(argv[2], NULL, 10) : 10;
  if (h.count < 1)
    h.count = 1;

  /* The host's loop; offpath adds its handles to it. */
  uv_loop_init(&loop);
  op_config_init(&cfg);
  cfg.loop = &loop;
  op_config_pool(&cfg, "cpu", 2, 0);
  if ((rc = op_runtime_new(&cfg, &h.rt)) != 0) {
    fprintf(stderr, "embed-uv: %s\n", op_strerror(rc));
    return 1;
  }
  op_runtime_on_error(h.rt, on_error, NULL);
  op_register_engine(h.rt, engine, &h);
  if (op_load_script(h.rt, argv[1]) != 0) {
    fprintf(stderr, "embed-uv: %s\n", op_errmsg(h.rt));
    op_runtime_free(h.rt);
    uv_loop_close(&loop);
    return 1;
  }

  uv_timer_init(&loop, &h.tick);
  h.tick.data = &h;
  uv_timer_start(&h.tick, tick_cb, 1, 1);

  /* The host's own loop: it returns when the timer has stopped and no
  ** handler, task or timer of offpath is pending. */
  uv_run(&loop, UV_RUN_DEFAULT);

  op_stats_get(h.rt, &st);
  printf("events %d, results %d, handler calls %llu, errors %llu\n", h.sent,
         h.done, (unsigned long long)st.calls,
         (unsigned long long)st.call_errors);
  for (i = 0; i < st.npools; i++)
    if (st.pools[i].submitted > 0)
      printf("pool %s: %d threads, %llu tasks completed\n", st.pools[i].name,
             st.pools[i].threads, (unsigned long long)st.pools[i].completed);

  uv_close((uv_handle_t *)&h.tick, NULL);
  rc = op_runtime_free(h.rt); /* drains offpath; the loop stays ours */
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0) {
    fprintf(stderr, "embed-uv: handles left open\n");
    return 1;
  }
  return rc == 0 && h.done == h.count ? 0 : 1;
}
