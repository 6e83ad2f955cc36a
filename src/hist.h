/* SPDX-License-Identifier: MIT */
/*
** hist.h - log-linear latency histograms, in nanoseconds: exact below
** 8 ns, then 8 sub-buckets per octave, so every value is reported within
** 12.5% (a quantile is the midpoint of its bucket, within 6.25% of the
** true value), and always inside [min, max], which are exact; and a cheap
** clock for the intervals they hold. Self-contained: the runtime (stats,
** pools) and the offpath command (record latency) both use it.
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

/* An interval clock for the latencies the histograms hold, on one thread.
** Where the CPU's time-stamp counter runs at a constant rate (x86 with an
** invariant TSC) a reading is that counter, which costs a third of a
** clock_gettime() on a virtual machine (10 against 26 ns here, twice per
** handler resume); its rate is measured against uv_hrtime() once 10 ms
** have passed, again each time the span has doubled, and past a minute
** over the last minute or two. Until then, and where there is no such
** counter, a reading is uv_hrtime() (marked, so an interval that began
** before the rate was known still ends right). */
typedef struct op_ticker {
  uint64_t tsc0, ns0; /* the anchor: a counter reading and its time */
  uint64_t recal;     /* measure the rate again past this counter value */
  uint64_t mult;      /* ns per tick, 32.32 fixed point; 0: not known */
  int ok;             /* the counter is usable */
} op_ticker;

void op__ticker_init(op_ticker *k);
/* A reading, for op__ticker_since. */
uint64_t op__ticker_read(const op_ticker *k);
/* Nanoseconds from the reading from to now (0 if the counter went back,
** as across CPUs whose counters differ). May measure the rate. */
uint64_t op__ticker_since(op_ticker *k, uint64_t from);
/* Nanoseconds from the reading from to the later reading to (0 if to is
** not later). May measure the rate, from the clock read in to. */
uint64_t op__ticker_span(op_ticker *k, uint64_t from, uint64_t to);

#endif
