/*
** hang.h - helpers for tests of connects that never complete: a loopback
** listener whose accept queue is full (backlog 0, never accepts, filled by
** a few connections of our own), so the kernel drops further SYNs and a
** connect to it hangs until the client gives up. Also counts this
** process's open file descriptors, to show an aborted connect closed its
** socket.
*/
#ifndef OFFPATH_TEST_HANG_H
#define OFFPATH_TEST_HANG_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "test.h"

#define HANG_FILLERS 4

typedef struct hang_listener {
  int fd;
  int port;
  int fillers[HANG_FILLERS];
} hang_listener;

static void hang_open(hang_listener *h) {
  struct sockaddr_in sa;
  socklen_t len = sizeof sa;
  int i;

  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  h->fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT(h->fd >= 0);
  ASSERT_OK(bind(h->fd, (struct sockaddr *)&sa, sizeof sa));
  ASSERT_OK(listen(h->fd, 0));
  ASSERT_OK(getsockname(h->fd, (struct sockaddr *)&sa, &len));
  h->port = ntohs(sa.sin_port);
  /* Fill the accept queue; the later fillers hang themselves. */
  for (i = 0; i < HANG_FILLERS; i++) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT(s >= 0);
    ASSERT_OK(fcntl(s, F_SETFL, O_NONBLOCK));
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0)
      ASSERT_EQ(errno, EINPROGRESS);
    h->fillers[i] = s;
  }
  usleep(100 * 1000); /* let the handshakes that can complete do so */
}

static void hang_close(hang_listener *h) {
  int i;

  for (i = 0; i < HANG_FILLERS; i++)
    close(h->fillers[i]);
  close(h->fd);
}

/* Open file descriptors of this process. */
static int open_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  struct dirent *e;
  int n = 0;

  ASSERT_NOT_NULL(d);
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(d);
  return n - 1; /* the directory's own descriptor */
}

#endif /* OFFPATH_TEST_HANG_H */
