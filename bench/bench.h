/* SPDX-License-Identifier: MIT */
/*
** bench.h - what the benchmark programs share: the clock and option
** parsing. A program defines BENCH_NAME (its name, for messages) before
** including it.
*/
#ifndef OFFPATH_BENCH_H
#define OFFPATH_BENCH_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

/* CLOCK_MONOTONIC in nanoseconds. */
static inline uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Parse the integer value s of option opt, in min..max; exit 2 with a
** message otherwise. */
static inline long parse_long(const char *opt, const char *s, long min,
                              long max) {
  char *end;
  long v;

  errno = 0;
  v = strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < min || v > max) {
    fprintf(stderr, BENCH_NAME ": bad value for %s: '%s' (%ld..%ld)\n", opt, s,
            min, max);
    exit(2);
  }
  return v;
}

/* End a result line: wall time, CPU from ru (taken right after the run),
** CPU per cent of wall time (100: one core busy) and peak RSS. */
static inline void print_usage(const struct rusage *ru, uint64_t wall_ns) {
  double user = (double)ru->ru_utime.tv_sec + ru->ru_utime.tv_usec / 1e6;
  double sys = (double)ru->ru_stime.tv_sec + ru->ru_stime.tv_usec / 1e6;
  double wall = (double)wall_ns / 1e9;

  printf(" wall_s=%.3f cpu_user=%.3f cpu_sys=%.3f cpu_pct=%.1f maxrss_kb=%ld\n",
         wall, user, sys, 100.0 * (user + sys) / wall, ru->ru_maxrss);
}

#endif /* OFFPATH_BENCH_H */
