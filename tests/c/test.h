/* SPDX-License-Identifier: MIT */
/*
** test.h - assertions for the C unit tests. Never compiled out; a failure
** prints file, line, both expressions and both values, then aborts.
*/
#ifndef OFFPATH_TEST_H
#define OFFPATH_TEST_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_FAIL_(fmt, ...)                                                   \
  do {                                                                         \
    fprintf(stderr, "%s:%d: " fmt "\n", __FILE__, __LINE__, __VA_ARGS__);      \
    fflush(stderr);                                                            \
    abort();                                                                   \
  } while (0)

#define ASSERT(c)                                                              \
  do {                                                                         \
    if (!(c))                                                                  \
      TEST_FAIL_("assertion failed: %s", #c);                                  \
  } while (0)

#define ASSERT_INT_OP_(a, op, b)                                               \
  do {                                                                         \
    int64_t a_ = (int64_t)(a), b_ = (int64_t)(b);                              \
    if (!(a_ op b_))                                                           \
      TEST_FAIL_("expected %s %s %s, got %" PRId64 " and %" PRId64, #a, #op,   \
                 #b, a_, b_);                                                  \
  } while (0)

#define ASSERT_EQ(a, b) ASSERT_INT_OP_(a, ==, b)
#define ASSERT_NE(a, b) ASSERT_INT_OP_(a, !=, b)
#define ASSERT_LT(a, b) ASSERT_INT_OP_(a, <, b)
#define ASSERT_LE(a, b) ASSERT_INT_OP_(a, <=, b)
#define ASSERT_GT(a, b) ASSERT_INT_OP_(a, >, b)
#define ASSERT_GE(a, b) ASSERT_INT_OP_(a, >=, b)
#define ASSERT_OK(e)    ASSERT_EQ(e, 0)

#define ASSERT_STR_EQ(a, b)                                                    \
  do {                                                                         \
    const char *a_ = (a), *b_ = (b);                                           \
    if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0)                       \
      TEST_FAIL_("expected %s == %s, got \"%s\" and \"%s\"", #a, #b,           \
                 a_ ? a_ : "(null)", b_ ? b_ : "(null)");                      \
  } while (0)

/* a contains b */
#define ASSERT_STR_HAS(a, b)                                                   \
  do {                                                                         \
    const char *a_ = (a), *b_ = (b);                                           \
    if (a_ == NULL || strstr(a_, b_) == NULL)                                  \
      TEST_FAIL_("expected %s to contain %s, got \"%s\"", #a, #b,              \
                 a_ ? a_ : "(null)");                                          \
  } while (0)

#define ASSERT_NULL(p)     ASSERT((p) == NULL)
#define ASSERT_NOT_NULL(p) ASSERT((p) != NULL)

/* The whole of a small file, or "" if it cannot be read. */
static inline const char *slurp(const char *file, char *buf, size_t len) {
  FILE *f = fopen(file, "r");
  size_t n = 0;

  if (f != NULL) {
    n = fread(buf, 1, len - 1, f);
    fclose(f);
  }
  buf[n] = '\0';
  return buf;
}

#endif /* OFFPATH_TEST_H */
