/*
** hist.h - log-linear latency histograms, in nanoseconds: exact below
** 8 ns, then 8 sub-buckets per octave, so every value is reported within
** 12.5%. Self-contained: the runtime (stats, pools) and the offpath
** command (record latency) both use it.
** Thread: a histogram belongs to one thread.
*/
#ifndef OFFPATH_HIST_H
#define OFFPATH_HIST_H

#include <stdint.h>

typedef struct op_hist {
  uint64_t count;
  uint64_t max;
  uint32_t bucket[64 * 8];
} op_hist;

void op__hist_add(op_hist *h, uint64_t ns);
/* Add n values of ns (a sample standing for n). */
void op__hist_add_n(op_hist *h, uint64_t ns, uint64_t n);
/* The q-quantile (0..1) in seconds, or 0 if empty. */
double op__hist_quantile(const op_hist *h, double q);

#endif
