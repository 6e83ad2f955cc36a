/* SPDX-License-Identifier: MIT */
/*
** op-udpsend.c - a UDP sender at a fixed rate, for the fast-path benchmark
** over UDP (bench/op-udp.sh): COUNT datagrams to 127.0.0.1:PORT, RATE a
** second, each one record in the format of bench/peer-lines.lua --make.
** Thread: main only.
**
** Pacing: datagrams go out in ticks of 1 ms; at each tick the sender sends
** as many as the schedule (start + i / RATE) says are due, then sleeps until
** the next tick with clock_nanosleep(TIMER_ABSTIME), so a late tick is made
** up at once and the mean rate stays exact. A send that fails with ENOBUFS
** or EAGAIN is retried after the next tick (loopback seldom does that).
**
** Prints: sent=N rate=R send_s=SECONDS
*/
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define BENCH_NAME "op-udpsend"
#include "bench.h"

static void sleep_until(uint64_t t) {
  struct timespec ts;

  ts.tv_sec = (time_t)(t / 1000000000u);
  ts.tv_nsec = (long)(t % 1000000000u);
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
  }
}

static void usage(void) {
  fprintf(stderr, "usage: op-udpsend --port PORT --rate PER_SECOND "
                  "--count N\n");
  exit(2);
}

int main(int argc, char **argv) {
  struct sockaddr_in to;
  long port = 0, rate = 0, count = 0, i = 0, due;
  uint64_t start, tick, elapsed;
  char buf[128];
  int fd, len;

  for (int a = 1; a < argc; a++) {
    if (a + 1 >= argc) {
      usage();
    } else if (strcmp(argv[a], "--port") == 0) {
      port = parse_long(argv[a], argv[a + 1], 1, 65535);
    } else if (strcmp(argv[a], "--rate") == 0) {
      rate = parse_long(argv[a], argv[a + 1], 1, 10000000L);
    } else if (strcmp(argv[a], "--count") == 0) {
      count = parse_long(argv[a], argv[a + 1], 1, 1000000000L);
    } else {
      usage();
    }
    a++;
  }
  if (port == 0 || rate == 0 || count == 0) {
    usage();
  }
  fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    perror("op-udpsend: socket");
    return 1;
  }
  memset(&to, 0, sizeof to);
  to.sin_family = AF_INET;
  to.sin_port = htons((uint16_t)port);
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

  start = now_ns();
  tick = start;
  while (i < count) {
    /* Datagrams due by now: i / rate seconds after start. */
    elapsed = now_ns() - start;
    due = (long)((double)elapsed * (double)rate / 1e9) + 1;
    if (due > count) {
      due = count;
    }
    while (i < due) {
      long n = i + 1;
      len = snprintf(
          buf, sizeof buf,
          "%010ld,2024-01-01T00:%02ld:%02ldZ,user%06ld,GET,/item/%ld,200", n,
          n / 60 % 60, n % 60, n % 1000003, n % 9973);
      if (sendto(fd, buf, (size_t)len, 0, (struct sockaddr *)&to, sizeof to) <
          0) {
        if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR) {
          break; /* retry at the next tick */
        }
        perror("op-udpsend: sendto");
        return 1;
      }
      i++;
    }
    tick += 1000000u;
    sleep_until(tick);
  }
  elapsed = now_ns() - start;
  close(fd);
  printf("sent=%ld rate=%ld send_s=%.3f\n", count, rate, (double)elapsed / 1e9);
  return 0;
}
