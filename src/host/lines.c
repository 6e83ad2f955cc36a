/* SPDX-License-Identifier: MIT */
/*
** lines.c - the line splitter: bytes in at the end, lines out at the front,
** with a bound on line length. Pure C (no libuv, no Lua), fuzzed by
** tests/fuzz/fuzz-records.c.
** Thread: loop.
*/
#include <stdlib.h>
#include <string.h>

#include "host.h"

void ls_init(linesplit *ls, size_t max) {
  memset(ls, 0, sizeof *ls);
  ls->max = max;
}

void ls_free(linesplit *ls) {
  free(ls->buf);
  ls->buf = NULL;
  ls->cap = ls->start = ls->end = ls->scan = 0;
}

char *ls_space(linesplit *ls, size_t want, size_t *avail) {
  size_t live = ls->end - ls->start, cap;
  char *p;

  if (ls->start > 0 && (ls->cap - ls->end < want || ls->start == ls->end)) {
    /* Move the unread bytes to the front. */
    memmove(ls->buf, ls->buf + ls->start, live);
    ls->scan -= ls->start;
    ls->start = 0;
    ls->end = live;
  }
  if (ls->cap - ls->end < want) {
    cap = ls->cap ? ls->cap : 4096;
    while (cap - ls->end < want)
      cap *= 2;
    p = realloc(ls->buf, cap);
    if (p == NULL)
      return NULL;
    ls->buf = p;
    ls->cap = cap;
  }
  *avail = ls->cap - ls->end;
  return ls->buf + ls->end;
}

void ls_commit(linesplit *ls, size_t n) {
  ls->end += n;
}

int ls_append(linesplit *ls, const char *p, size_t n) {
  size_t avail;
  char *dst;

  if (n == 0)
    return 0;
  dst = ls_space(ls, n, &avail);
  if (dst == NULL)
    return -1;
  memcpy(dst, p, n);
  ls_commit(ls, n);
  return 0;
}

/* Return the line [start, stop) and move past its terminator. */
static int take(linesplit *ls, size_t stop, size_t skip, const char **line,
                size_t *len) {
  size_t n = stop - ls->start;

  *line = ls->buf + ls->start;
  if (n > 0 && ls->buf[ls->start + n - 1] == '\r')
    n--;
  *len = n;
  ls->start = stop + skip;
  ls->scan = ls->start;
  return LS_LINE;
}

int ls_next(linesplit *ls, int eof, const char **line, size_t *len) {
  const char *nl;
  size_t from;

  for (;;) {
    from = ls->scan > ls->start ? ls->scan : ls->start;
    nl = from < ls->end ? memchr(ls->buf + from, '\n', ls->end - from) : NULL;
    if (ls->discarding) {
      /* Skip the rest of an oversize line. */
      if (nl == NULL) {
        ls->dropped += ls->end - ls->start;
        ls->start = ls->scan = ls->end;
        if (eof)
          ls->discarding = 0;
        return LS_NONE;
      }
      ls->dropped += (size_t)(nl - (ls->buf + ls->start));
      ls->start = ls->scan = (size_t)(nl - ls->buf) + 1;
      ls->discarding = 0;
      continue;
    }
    if (nl != NULL) {
      if ((size_t)(nl - (ls->buf + ls->start)) > ls->max) {
        *len = (size_t)(nl - (ls->buf + ls->start));
        *line = NULL;
        ls->start = ls->scan = (size_t)(nl - ls->buf) + 1;
        return LS_OVERSIZE;
      }
      return take(ls, (size_t)(nl - ls->buf), 1, line, len);
    }
    ls->scan = ls->end;
    if (ls->end - ls->start > ls->max) {
      /* Too long and no end in sight: drop what we have, skip the rest. */
      ls->dropped = ls->end - ls->start;
      ls->start = ls->scan = ls->end;
      ls->discarding = !eof;
      *line = NULL;
      *len = ls->dropped;
      return LS_OVERSIZE;
    }
    if (eof && ls->end > ls->start)
      return take(ls, ls->end, 0, line, len);
    return LS_NONE;
  }
}

uint64_t ls_pending(const linesplit *ls) {
  uint64_t n = 0;
  const char *p, *e, *nl;

  if (ls->buf == NULL)
    return 0;
  p = ls->buf + ls->start;
  e = ls->buf + ls->end;
  while (p < e && (nl = memchr(p, '\n', (size_t)(e - p))) != NULL) {
    n++;
    p = nl + 1;
  }
  return n + (p < e && !ls->discarding ? 1 : 0);
}
