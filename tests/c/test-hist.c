/* SPDX-License-Identifier: MIT */
/*
** test-hist.c - latency histograms (hist.c): quantiles stay inside the
** exact minimum and maximum, and are within the documented precision; the
** interval clock agrees with uv_hrtime() before and after it knows the
** counter's rate.
** LABELS: tsan
*/
#include <time.h>
#include <uv.h>

#include "hist.h"
#include "test.h"

static op_hist h;

/* Every value equal: every quantile is that value, exactly. */
static void test_all_equal(void) {
  int i;

  memset(&h, 0, sizeof h);
  for (i = 0; i < 1000; i++)
    op__hist_add(&h, 300000000u); /* 300 ms */
  ASSERT_EQ(h.min, 300000000u);
  ASSERT_EQ(h.max, 300000000u);
  ASSERT_EQ((int64_t)(op__hist_quantile(&h, 0.50) * 1e9 + 0.5), 300000000);
  ASSERT_EQ((int64_t)(op__hist_quantile(&h, 0.99) * 1e9 + 0.5), 300000000);
}

/* Quantiles are within 6.25% of the value they stand for and never leave
** [min, max]. */
static void test_bounds(void) {
  uint64_t v;
  double q;

  memset(&h, 0, sizeof h);
  for (v = 1000; v <= 1000000; v += 997)
    op__hist_add(&h, v);
  q = op__hist_quantile(&h, 0.0) * 1e9;
  ASSERT_GE((int64_t)q, (int64_t)h.min);
  ASSERT_LE((int64_t)q, (int64_t)(h.min * 1.0625));
  q = op__hist_quantile(&h, 1.0) * 1e9;
  ASSERT_LE((int64_t)q, (int64_t)h.max);
  q = op__hist_quantile(&h, 0.5) * 1e9;
  ASSERT_GE((int64_t)q, (int64_t)(500000 * 0.93));
  ASSERT_LE((int64_t)q, (int64_t)(500000 * 1.07));
  ASSERT_EQ(h.min, 1000);
}

/* A sample standing for n values; n = 0 adds nothing. */
static void test_add_n(void) {
  memset(&h, 0, sizeof h);
  op__hist_add_n(&h, 5, 0);
  ASSERT_EQ(h.count, 0);
  ASSERT_EQ(op__hist_quantile(&h, 0.5), 0);
  op__hist_add_n(&h, 7000, 10);
  op__hist_add(&h, 9000);
  ASSERT_EQ(h.count, 11);
  ASSERT_EQ(h.min, 7000);
  ASSERT_EQ(h.max, 9000);
  ASSERT_EQ((int64_t)(op__hist_quantile(&h, 0.5) * 1e9 + 0.5), 7000);
}

static void sleep_ms(long ms) {
  struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

  while (nanosleep(&ts, &ts) != 0)
    ;
}

/* got, an interval of a sleep of ms measured by the ticker, against the
** interval from h0 to h1 by uv_hrtime(), which encloses it: never longer,
** and short of the sleep by no more than 1 % (the rate is measured over
** 10 ms at least, from clock reads a few microseconds apart). */
static void check_measure(uint64_t got, long ms, uint64_t h0, uint64_t h1) {
  ASSERT_GE(got, (uint64_t)ms * 1000000 / 100 * 99);
  ASSERT(got <= (h1 - h0) + (h1 - h0) / 100);
}

/* A sleep of ms measured from a reading to now. */
static void check_interval(op_ticker *k, long ms) {
  uint64_t h0, h1, r, got;

  h0 = uv_hrtime();
  r = op__ticker_read(k);
  sleep_ms(ms);
  got = op__ticker_since(k, r);
  h1 = uv_hrtime();
  check_measure(got, ms, h0, h1);
}

/* Move k's anchor s seconds back, as if taken then; 0 if the counter or
** the clock has not run that long. */
static int age_anchor(op_ticker *k, double s) {
  uint64_t back = (uint64_t)(s * 1e9 * 4294967296.0 / (double)k->mult);
  uint64_t ns = (uint64_t)(s * 1e9);

  if (k->tsc0 <= back || k->ns0 <= ns)
    return 0;
  k->tsc0 -= back;
  k->ns0 -= ns;
  k->recal = 0;
  return 1;
}

static void test_ticker(void) {
  op_ticker k;
  uint64_t r;

  op__ticker_init(&k);
  ASSERT_EQ(k.mult, 0);
  check_interval(&k, 5);  /* in ns: the rate is not known yet */
  check_interval(&k, 60); /* its end measures the rate, if there is one */
  if (k.ok)
    ASSERT(k.mult != 0);
  check_interval(&k, 5);   /* in counter ticks, where there is a counter */
  check_interval(&k, 120); /* the rate measured again on the way */
  /* An anchor a minute old moves to now at the next measure, and the
  ** clock still agrees. */
  if (k.ok && age_anchor(&k, 61)) {
    (void)op__ticker_since(&k, op__ticker_read(&k));
    ASSERT(uv_hrtime() - k.ns0 < 1000000000u);
    check_interval(&k, 5);
  }
  /* An anchor long past (a loop thread idle for minutes) moves to now,
  ** and the rate is measured again a window later, not a span later. */
  if (k.ok && age_anchor(&k, 600)) {
    r = op__ticker_read(&k);
    (void)op__ticker_since(&k, r);
    ASSERT(k.recal > r);
    ASSERT((double)(k.recal - r) * (double)k.mult / 4294967296.0 < 61e9);
  }
  /* An anchor ahead of the counter (it went back): the clock measures
  ** from a new anchor instead of trying again at every reading. */
  if (k.ok) {
    k.tsc0 = op__ticker_read(&k) + ((uint64_t)1 << 40);
    k.recal = 0;
    r = op__ticker_read(&k);
    (void)op__ticker_since(&k, r);
    ASSERT(k.tsc0 <= op__ticker_read(&k));
    ASSERT(k.recal > k.tsc0);
    check_interval(&k, 5);
  }
  /* A reading from the future (another CPU's counter ahead): 0. */
  r = op__ticker_read(&k);
  ASSERT_EQ(op__ticker_since(&k, r + 1000000000u), 0);
}

/* A span between two readings: as long as the clock between them, right
** across the point where the rate becomes known (the first reading in ns,
** the second in ticks), and 0 when the second is not later. */
static void test_ticker_span(void) {
  op_ticker k;
  uint64_t h0, h1, a, b, got;

  op__ticker_init(&k);
  h0 = uv_hrtime();
  a = op__ticker_read(&k); /* in ns: the rate is not known yet */
  sleep_ms(60);
  (void)op__ticker_since(&k, op__ticker_read(&k)); /* measures it */
  b = op__ticker_read(&k);
  h1 = uv_hrtime();
  got = op__ticker_span(&k, a, b);
  check_measure(got, 60, h0, h1);
  h0 = uv_hrtime();
  a = op__ticker_read(&k);
  sleep_ms(5);
  b = op__ticker_read(&k);
  h1 = uv_hrtime();
  got = op__ticker_span(&k, a, b);
  check_measure(got, 5, h0, h1);
  ASSERT_EQ(op__ticker_span(&k, b, a), 0);
  ASSERT_EQ(op__ticker_span(&k, b, b), 0);
}

/* A span of a sleep of ms, checked as check_measure does; returns its
** first reading. */
static uint64_t check_span(op_ticker *k, long ms) {
  uint64_t h0, h1, a, b;

  h0 = uv_hrtime();
  a = op__ticker_read(k);
  sleep_ms(ms);
  b = op__ticker_read(k);
  h1 = uv_hrtime();
  check_measure(op__ticker_span(k, a, b), ms, h0, h1);
  return a;
}

/* A user of spans alone (a drain's shared reading against each submit's,
** with no since() anywhere) measures the rate too, once its anchor is
** 10 ms old: before, its readings stayed clock reads for good. It measures
** it again when the span has doubled. */
static void test_ticker_span_only(void) {
  op_ticker k;
  uint64_t a, due;
  int i;

  op__ticker_init(&k);
  a = check_span(&k, 15);
  if (!k.ok)
    return;
  /* A measure can fail when the thread is preempted between its reads;
  ** the next span tries again. */
  for (i = 0; i < 10 && k.mult == 0; i++)
    (void)op__ticker_span(&k, a, op__ticker_read(&k));
  ASSERT(k.mult != 0);
  due = k.recal;
  sleep_ms(40); /* past twice the first span */
  a = op__ticker_read(&k);
  for (i = 0; i < 10 && k.recal <= due; i++)
    (void)op__ticker_span(&k, a, op__ticker_read(&k));
  ASSERT(k.recal > due);
  (void)check_span(&k, 5);
}

int main(void) {
  test_all_equal();
  test_bounds();
  test_add_n();
  test_ticker();
  test_ticker_span();
  test_ticker_span_only();
  puts("ok");
  return 0;
}
