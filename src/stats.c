/* SPDX-License-Identifier: MIT */
/*
** stats.c - the statistics the runtime reports (histograms: hist.c).
** Thread: loop.
*/
#include <string.h>

#include "internal.h"

int op_stats_get(op_runtime *rt, op_stats *out) {
  int i;

  op__assert_loop_thread(rt);
  memset(out, 0, sizeof *out);
  out->npools = rt->npools;
  for (i = 0; i < rt->npools; i++) {
    op__pool_stats(rt->pools[i], &out->pools[i]);
    out->stuck += out->pools[i].stuck;
  }
  out->calls = rt->calls;
  out->call_errors = rt->call_errors;
  out->suspended = (uint32_t)rt->suspended;
  out->call_p50 = op__hist_quantile(&rt->call_hist, 0.50);
  out->call_p99 = op__hist_quantile(&rt->call_hist, 0.99);
  out->call_max = (double)rt->call_hist.max / 1e9;
  out->memory = op__vm_used(&rt->mem);
  out->protos = op__protostore_count(rt->protos);
  return 0;
}
