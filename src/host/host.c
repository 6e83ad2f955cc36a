/* SPDX-License-Identifier: MIT */
/*
** host.c - the ground floor of the offpath command, which every other
** part of it uses: rate-limited messages on stderr, and the requests a
** part makes of the floors above it (pump the inputs, stop), which go
** through the callbacks those floors install in the host; and the door
** through which the host calls into Lua.
** Thread: loop.
*/
#include <stdarg.h>
#include <string.h>

#include "internal.h"
#include "host.h"

/* ---- messages ---- */

void host_report(host *h, const char *fmt, ...) {
  uint64_t now = uv_hrtime();
  va_list ap;

  if (now - h->report_window >= 1000000000u) {
    h->report_window = now;
    h->reports = 0;
    if (h->suppressed > 0) {
      fprintf(stderr, "offpath: %llu more messages suppressed\n",
              (unsigned long long)h->suppressed);
      h->suppressed = 0;
    }
  }
  if (h->reports >= HOST_REPORTS_SEC) {
    h->suppressed++;
    return;
  }
  h->reports++;
  if (h->stats_line_open) {
    fputs("\r\033[K", stderr);
    h->stats_line_open = 0;
  }
  fputs("offpath: ", stderr);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}

void host_report_flush(host *h) {
  if (h->suppressed > 0) {
    fprintf(stderr, "offpath: %llu more messages suppressed\n",
            (unsigned long long)h->suppressed);
    h->suppressed = 0;
    h->reports = 0;
    h->report_window = uv_hrtime();
  }
}

/* ---- requests to the floors above ---- */

static void pump_cb(uv_idle_t *idle) {
  host *h = idle->data;

  h->pump(h);
}

void host_pump_soon(host *h) {
  if (!uv_is_closing((uv_handle_t *)&h->pump_idle))
    uv_idle_start(&h->pump_idle, pump_cb);
}

static void stop_cb(uv_timer_t *t) {
  host *h = t->data;

  h->stop(h);
}

void host_stop_soon(host *h) {
  if (!h->stopping && !uv_is_active((uv_handle_t *)&h->grace_timer))
    uv_timer_start(&h->grace_timer, stop_cb, 0, 0);
}

/* ---- the door into Lua ---- */

int host_msgh(lua_State *L) {
  static const char bottom[] = "\n\t[C]: in ?";
  const size_t n = sizeof bottom - 1;
  const char *tb;
  size_t len, cut = 0;

  op__traceback(L);
  /* A record's handler is called through C functions of engine.c (the
  ** coroutine's body, and event_line or event_by_name): their "[C]: in ?"
  ** lines at the bottom say no more than one does, which is what every
  ** other handler's traceback ends with. */
  tb = lua_tolstring(L, -1, &len);
  while (tb != NULL && len >= cut + 2 * n &&
         memcmp(tb + len - cut - n, bottom, n) == 0 &&
         memcmp(tb + len - cut - 2 * n, bottom, n) == 0)
    cut += n;
  if (cut > 0)
    lua_pushlstring(L, tb, len - cut);
  return 1;
}

#ifdef OP_DEBUG
void host_test_oom(uint64_t n) {
  static int on = -1;

  if (on < 0)
    on = getenv("OFFPATH_TEST_OOM") != NULL;
  if (on)
    op__alloc_fail((long)n, 2, 0);
}
#endif
