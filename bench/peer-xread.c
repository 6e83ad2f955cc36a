/* SPDX-License-Identifier: MIT */
/*
** peer-xread.c - the plain consumer-group reader offpath's redis-stream://
** input is measured against: hiredis' blocking API, XREADGROUP of up to
** --batch entries, then one XACK of their ids, until the stream has no new
** entry for the group. It does nothing with an entry but look at its data
** field. Prints the CPU it spent per entry.
**
** usage: peer-xread --port N --stream KEY [--group G] [--batch N]
*/
#define BENCH_NAME "peer-xread"
#include <string.h>
#include <hiredis/hiredis.h>

#include "bench.h"

int main(int argc, char **argv) {
  const char *stream = NULL, *group = "offpath";
  long port = 0, batch = 1000, entries = 0, i;
  const char **av;
  size_t *al, bytes = 0;
  struct rusage ru;
  redisContext *c;
  redisReply *r, *list, *kv;
  char count[24];
  uint64_t t0;
  int n, k;

  for (k = 1; k + 1 < argc; k += 2) {
    if (strcmp(argv[k], "--port") == 0)
      port = parse_long("--port", argv[k + 1], 1, 65535);
    else if (strcmp(argv[k], "--stream") == 0)
      stream = argv[k + 1];
    else if (strcmp(argv[k], "--group") == 0)
      group = argv[k + 1];
    else if (strcmp(argv[k], "--batch") == 0)
      batch = parse_long("--batch", argv[k + 1], 1, 100000);
  }
  if (port == 0 || stream == NULL) {
    fprintf(stderr, "usage: peer-xread --port N --stream KEY [--group G] "
                    "[--batch N]\n");
    return 2;
  }
  if ((c = redisConnect("127.0.0.1", (int)port)) == NULL || c->err) {
    fprintf(stderr, "peer-xread: cannot connect\n");
    return 1;
  }
  av = malloc((size_t)(batch + 3) * sizeof *av);
  al = malloc((size_t)(batch + 3) * sizeof *al);
  if (av == NULL || al == NULL)
    return 1;
  snprintf(count, sizeof count, "%ld", batch);
  t0 = now_ns();
  for (;;) {
    r = redisCommand(c, "XREADGROUP GROUP %s peer COUNT %s STREAMS %s >", group,
                     count, stream);
    if (r == NULL) {
      fprintf(stderr, "peer-xread: %s\n", c->errstr);
      return 1;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
      freeReplyObject(r);
      break;
    }
    list = r->element[0]->element[1];
    if (list->elements == 0) {
      freeReplyObject(r);
      break;
    }
    av[0] = "XACK";
    av[1] = stream;
    av[2] = group;
    n = 3;
    for (i = 0; i < (long)list->elements; i++) {
      av[n++] = list->element[i]->element[0]->str;
      kv = list->element[i]->element[1];
      for (k = 0; k + 1 < (int)kv->elements; k += 2)
        if (strcmp(kv->element[k]->str, "data") == 0)
          bytes += kv->element[k + 1]->len;
    }
    for (k = 0; k < n; k++)
      al[k] = strlen(av[k]);
    entries += (long)list->elements;
    freeReplyObject(redisCommandArgv(c, n, av, al));
    freeReplyObject(r);
  }
  t0 = now_ns() - t0;
  getrusage(RUSAGE_SELF, &ru);
  printf("name=peer-xread entries=%ld bytes=%zu us_cpu_per_entry=%.3f "
         "entries_per_s=%.0f",
         entries, bytes,
         entries ? ((double)ru.ru_utime.tv_sec * 1e6 + ru.ru_utime.tv_usec +
                    (double)ru.ru_stime.tv_sec * 1e6 + ru.ru_stime.tv_usec) /
                       (double)entries
                 : 0.0,
         (double)entries / ((double)t0 / 1e9));
  print_usage(&ru, t0);
  redisFree(c);
  free(av);
  free(al);
  return 0;
}
