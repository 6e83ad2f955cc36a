/* SPDX-License-Identifier: MIT */
/*
** test-hist.c - latency histograms (hist.c): quantiles stay inside the
** exact minimum and maximum, and are within the documented precision.
** LABELS: tsan
*/
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

int main(void) {
  test_all_equal();
  test_bounds();
  test_add_n();
  puts("ok");
  return 0;
}
