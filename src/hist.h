/* SPDX-License-Identifier: MIT */
/*
** hist.h - log-linear latency histograms, in nanoseconds: exact below
** 8 ns, then 8 sub-buckets per octave, so every value is reported within
** 12.5% (a quantile is the midpoint of its bucket, within 6.25% of the
** true value), and always inside [min, max], which are exact. Self-contained: the runtime (stats, pools) and the offpath
** command (record latency) both use it.
** Thread: a histogram belongs to one thread.
*/
#ifndef OFFPATH_HIST_H
#define OFFPATH_HIST_H

#include <stdint.h>

typedef struct op_hist {
  uint64_t count;
  uint64_t min; /* exact; meaningful when count > 0 */
  uint64_t max; /* exact */
  uint64_t sum; /* of all values, in ns */
  uint32_t bucket[64 * 8];
} op_hist;

void op__hist_add(op_hist *h, uint64_t ns);
/* Add n values of ns (a sample standing for n). */
void op__hist_add_n(op_hist *h, uint64_t ns, uint64_t n);
/* The q-quantile (0..1) in seconds, or 0 if empty: the midpoint of the
** bucket holding it, moved into [min, max], so that a run whose values
** are all equal reports that value exactly. */
double op__hist_quantile(const op_hist *h, double q);
/* How many values lie at or below ns, counting only buckets that lie
** wholly at or below it (cumulative buckets of a Prometheus histogram). */
uint64_t op__hist_count_le(const op_hist *h, uint64_t ns);

#endif
