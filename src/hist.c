/* SPDX-License-Identifier: MIT */
/*
** hist.c - log-linear latency histograms (see hist.h).
** Thread: the histogram's owner.
*/
#include "hist.h"

/* Bucket of a duration: exact below 8 ns, then 8 sub-buckets per octave,
** so every bucket is within 12.5% of its values. */
static unsigned bucket_of(uint64_t ns) {
  unsigned octave;

  if (ns < 8)
    return (unsigned)ns;
  octave = 63u - (unsigned)__builtin_clzll(ns); /* >= 3 */
  return (octave - 2) * 8 + (unsigned)((ns >> (octave - 3)) & 7);
}

/* The smallest value of bucket b. */
static uint64_t bucket_low(unsigned b) {
  unsigned octave;

  if (b < 8)
    return b;
  octave = b / 8 + 2;
  return ((uint64_t)8 + (b & 7)) << (octave - 3);
}

void op__hist_add(op_hist *h, uint64_t ns) {
  op__hist_add_n(h, ns, 1);
}

void op__hist_add_n(op_hist *h, uint64_t ns, uint64_t n) {
  unsigned b = bucket_of(ns), nb = sizeof h->bucket / sizeof h->bucket[0];

  if (b >= nb)
    b = nb - 1;
  if (n == 0)
    return;
  h->bucket[b] += (uint32_t)n;
  if (h->count == 0 || ns < h->min)
    h->min = ns;
  h->count += n;
  h->sum += ns * n;
  if (ns > h->max)
    h->max = ns;
}

double op__hist_quantile(const op_hist *h, double q) {
  uint64_t rank, seen = 0, lo, hi, mid;
  unsigned b, n = sizeof h->bucket / sizeof h->bucket[0];

  if (h->count == 0)
    return 0;
  rank = (uint64_t)(q * (double)h->count);
  if (rank >= h->count)
    rank = h->count - 1;
  for (b = 0; b < n; b++) {
    seen += h->bucket[b];
    if (seen > rank) {
      lo = bucket_low(b);
      hi = b + 1 < n ? bucket_low(b + 1) : h->max;
      mid = lo + (hi - lo) / 2;
      if (mid < h->min)
        mid = h->min;
      if (mid > h->max)
        mid = h->max;
      return (double)mid / 1e9;
    }
  }
  return (double)h->max / 1e9;
}

uint64_t op__hist_count_le(const op_hist *h, uint64_t ns) {
  unsigned b, n = sizeof h->bucket / sizeof h->bucket[0];
  uint64_t c = 0;

  /* The last bucket is open-ended: it counts only in +Inf. */
  for (b = 0; b + 1 < n && bucket_low(b + 1) - 1 <= ns; b++)
    c += h->bucket[b];
  return c;
}
