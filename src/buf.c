/* SPDX-License-Identifier: MIT */
/*
** buf.c - growable byte buffers with inline storage for small payloads.
** Thread: any; a buffer belongs to one thread at a time.
*/
#include <string.h>

#include "internal.h"

void op__buf_init(op_buf *b) {
  b->p = b->small;
  b->len = 0;
  b->cap = sizeof b->small;
}

void op__buf_free(op_buf *b) {
  if (b->p != b->small)
    free(b->p);
  op__buf_init(b);
}

/* Make room for extra more bytes. Returns 0 or OP_ENOMEM (b unchanged). */
int op__buf_reserve(op_buf *b, size_t extra) {
  size_t need, cap;
  char *p;

  if (extra > SIZE_MAX - b->len)
    return OP_ENOMEM;
  need = b->len + extra;
  if (need <= b->cap)
    return 0;
  cap = b->cap * 2;
  if (cap < need)
    cap = need;
  if (b->p == b->small) {
    p = malloc(cap);
    if (p != NULL)
      memcpy(p, b->small, b->len);
  } else {
    p = realloc(b->p, cap);
  }
  if (p == NULL)
    return OP_ENOMEM;
  b->p = p;
  b->cap = cap;
  return 0;
}

int op__buf_append(op_buf *b, const void *p, size_t n) {
  if (op__buf_reserve(b, n) != 0)
    return OP_ENOMEM;
  memcpy(b->p + b->len, p, n);
  b->len += n;
  return 0;
}
