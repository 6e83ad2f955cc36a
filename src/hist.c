/* SPDX-License-Identifier: MIT */
/*
** hist.c - log-linear latency histograms, and the interval clock that
** feeds them (see hist.h).
** Thread: the histogram's owner.
*/
#include <uv.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <x86intrin.h>
#define HAVE_TSC 1
#endif

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

/* ---- the interval clock ---- */

#define NS_MARK       ((uint64_t)1 << 63)      /* a reading in ns, not ticks */
#define CAL_FIRST_NS  10000000u                /* first rate after 10 ms */
#define CAL_WINDOW_NS ((uint64_t)60000000000u) /* then over the last 60 s */
#define CAL_SLACK     20000 /* ticks: counter reads around a clock read */

/* The counter, or 0. */
static uint64_t counter(void) {
#ifdef HAVE_TSC
  return __rdtsc();
#else
  return 0;
#endif
}

/* A counter reading and the time, read close together (a preemption in
** between would skew the rate): 0, or 1 with *tsc and *ns set. */
static int pair(uint64_t *tsc, uint64_t *ns) {
  uint64_t a, b;
  int i;

  for (i = 0; i < 3; i++) {
    a = counter();
    *ns = uv_hrtime();
    b = counter();
    if (b >= a && b - a < CAL_SLACK) {
      *tsc = a + (b - a) / 2;
      return 1;
    }
  }
  return 0;
}

void op__ticker_init(op_ticker *k) {
  k->recal = 0;
  k->mult = 0;
  k->ok = 0;
#ifdef HAVE_TSC
  {
    unsigned a, b, c, d;

    /* CPUID 0x80000007, EDX bit 8: the counter is invariant (constant
    ** rate, runs in deep sleep states). */
    if (__get_cpuid(0x80000007, &a, &b, &c, &d) && (d & (1u << 8)))
      k->ok = pair(&k->tsc0, &k->ns0);
  }
#endif
}

/* Measure the rate from the anchor to now, if the span allows, and again
** when the span has doubled. Past a minute the anchor moves to now, so
** the rate is that of the last minute or two: a virtual machine moved to
** another host may see its counter's rate change. */
static void calibrate(op_ticker *k) {
  uint64_t tsc, ns, dns, dt;

  if (!pair(&tsc, &ns)) {
    k->recal = 0; /* try again at the next reading */
    return;
  }
  if (tsc <= k->tsc0 || ns <= k->ns0) {
    /* The counter went back (another CPU's, or a virtual machine moved
    ** to another host): measure from here, keeping the rate meanwhile. */
    k->tsc0 = tsc;
    k->ns0 = ns;
    k->recal =
        k->mult != 0 ? tsc + ((uint64_t)CAL_FIRST_NS << 32) / k->mult : 0;
    return;
  }
  dns = ns - k->ns0;
  dt = tsc - k->tsc0;
  if (dns < CAL_FIRST_NS)
    return;
  k->mult = (uint64_t)((double)dns / (double)dt * 4294967296.0);
  if (dns >= CAL_WINDOW_NS) {
    /* The next measure a window from now, however long this span was
    ** (a loop thread idle for an hour read no clock meanwhile). */
    k->tsc0 = tsc;
    k->ns0 = ns;
    dt = (uint64_t)((double)dt / (double)dns * (double)CAL_WINDOW_NS);
  }
  k->recal = tsc + dt;
}

uint64_t op__ticker_read(const op_ticker *k) {
  return k->mult != 0 ? counter() : uv_hrtime() | NS_MARK;
}

/* d ticks in ns. */
static uint64_t ticks_ns(const op_ticker *k, uint64_t d) {
#ifdef __SIZEOF_INT128__
  return (uint64_t)(((unsigned __int128)d * k->mult) >> 32);
#else
  return (uint64_t)((double)d * (double)k->mult / 4294967296.0);
#endif
}

/* A reading in ns was taken at now: measure the rate if the counter is
** usable and the anchor is old enough. Costs no clock read before that. */
static void calibrate_ns(op_ticker *k, uint64_t now) {
  if (k->ok && k->mult == 0 && now > k->ns0 && now - k->ns0 >= CAL_FIRST_NS)
    calibrate(k);
}

uint64_t op__ticker_span(op_ticker *k, uint64_t from, uint64_t to) {
  if ((from ^ to) & NS_MARK) /* the rate became known between them */
    return op__ticker_since(k, from);
  /* A user of spans alone (the C API's pools) measures the rate too, and
  ** again when it is due, as op__ticker_since does. */
  if (to & NS_MARK) {
    calibrate_ns(k, to & ~NS_MARK);
    return to > from ? to - from : 0;
  }
  if (to >= k->recal)
    calibrate(k);
  return to > from ? ticks_ns(k, to - from) : 0;
}

uint64_t op__ticker_since(op_ticker *k, uint64_t from) {
  uint64_t now;

  if (from & NS_MARK) {
    now = uv_hrtime();
    from &= ~NS_MARK;
    calibrate_ns(k, now);
    return now > from ? now - from : 0;
  }
  now = counter();
  if (now >= k->recal)
    calibrate(k);
  if (now <= from)
    return 0;
  return ticks_ns(k, now - from);
}
