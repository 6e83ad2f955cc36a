/* SPDX-License-Identifier: MIT */
/*
** fs.c - offpath.copy, offpath.cat, offpath.readfile, offpath.writefile:
** whole-file operations run as C tasks on a pool (default "io"), since
** Linux has no non-blocking file I/O without threads.
** Thread: loop, except fs_work() (a pool thread).
**
** DESIGN
**
** An fs_op is one malloc'ed block: the op_task the pool runs (first
** member), the paths, and the result. Its life:
**
**   call --> wait made --> submitted (pool queue) --> work() on a worker
**                               ^                        --> fs_complete()
**               queue full:     | queued as room            on the loop:
**               parked by the --+ comes (pool.c)            result or error
**               pool                                        to the waiter,
**                                                           then freed
** Abort (timeout, cancel, shutdown) clears op->id first, then: a queued
** or parked op is taken off by op__pool_stop_task() and comes back
** through fs_complete() with its status set; a running one cannot be
** interrupted (plain system calls):
** it finishes in the background and fs_complete() drops its result. So
** fs_complete() runs exactly once for every submitted op and is the only
** place that frees it. A queued op can also come back never run without an
** abort (shutdown with OP_SHUTDOWN_CANCEL): fs_complete() then fails the
** wait itself, so the waiter is told exactly once either way.
**
** The worker touches only the op: paths and the data to write are owned by
** it (the data string is anchored in the registry until the op is freed,
** on the loop thread, before the main VM is closed: shutdown drains the
** pools first).
*/
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define COPY_CHUNK ((size_t)1 << 17) /* read/write fallback buffer */
#define CFR_CHUNK                                                              \
  ((size_t)1 << 24)                /* copy_file_range request: small
                                       enough to look at the stop often */
#define IO_CHUNK ((size_t)1 << 24) /* most one read or write asks for */
/* readfile's default size limit (opts.max_size), like exec's max_output. */
#define DEFAULT_MAX_SIZE ((size_t)64 << 20)

typedef enum fs_kind { FS_READ = 0, FS_WRITE, FS_COPY, FS_CAT } fs_kind;

static const char *const call_names[] = { "readfile", "writefile", "copy",
                                          "cat" };
static const char *const wait_names[] = { "offpath.readfile",
                                          "offpath.writefile", "offpath.copy",
                                          "offpath.cat" };

/* Which step failed, for the message. */
typedef enum fs_step {
  STEP_NONE = 0,
  STEP_OPEN_SRC,
  STEP_OPEN_DST,
  STEP_READ,
  STEP_WRITE,
  STEP_SAME,
  STEP_NOMEM,
  STEP_TOO_BIG, /* readfile: over max_size */
  STEP_STOPPED  /* the stop was seen between two system calls */
} fs_step;

typedef enum fs_where {
  FS_NEW = 0,   /* being set up */
  FS_SUBMITTED, /* the pool has it (queued, parked or running);
                   fs_complete() will run */
  FS_FAILING    /* could not be queued; a deferred call fails it */
} fs_where;

typedef struct fs_op {
  op_task t; /* first: the pool's view */
  op_runtime *rt;
  op_pool *pool;
  op_wait_id id;  /* the waiting coroutine, 0 once resolved */
  uint8_t kind;   /* fs_kind */
  uint8_t where;  /* fs_where */
  int abort_code; /* OP_ETIMEDOUT / OP_ECANCELED once aborted */
  int queue_err;  /* why it could not be queued */
  int data_ref;   /* writefile: registry anchor of the data */
  const char *data;
  size_t len;
  size_t max_size; /* readfile: most bytes to read */
  const char *src; /* point into the same allocation */
  const char *dst;
  /* Results, written by the worker. */
  op_buf buf; /* readfile: the contents */
  uint64_t nbytes;
  int err;      /* errno of the failed step */
  uint8_t step; /* fs_step */
} fs_op;

/* ---- the work, on a pool thread ---- */

static int fail(fs_op *op, fs_step step, int err) {
  op->step = (uint8_t)step;
  op->err = err;
  return -1;
}

static int open_retry(const char *path, int flags, mode_t mode) {
  int fd;

  do
    fd = open(path, flags | O_CLOEXEC, mode);
  while (fd < 0 && errno == EINTR);
  return fd;
}

/* Whether op was asked to stop (timeout, cancel, shutdown): every loop
** below looks between two system calls, so an endless source (/dev/zero,
** a pipe that never ends) stops within one call of the request. Returns
** -1 with op failed, or 0. Thread: worker. */
static int stopped(fs_op *op) {
  if (atomic_load_explicit(&op->t.stop, memory_order_relaxed) == 0)
    return 0;
  return fail(op, STEP_STOPPED, ECANCELED);
}

/* Write all of p[0..n) to fd. Returns 0, or -1 (failed: op->step set). */
static int write_all(fs_op *op, int fd, const char *p, size_t n) {
  ssize_t w;

  while (n > 0) {
    if (stopped(op))
      return -1;
    w = write(fd, p, n > IO_CHUNK ? IO_CHUNK : n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return fail(op, STEP_WRITE, errno);
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static void do_read(fs_op *op) {
  op_buf *b = &op->buf;
  struct stat sb;
  ssize_t n;
  int fd = open_retry(op->src, O_RDONLY, 0);

  if (fd < 0) {
    fail(op, STEP_OPEN_SRC, errno);
    return;
  }
  if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size > 0) {
    if ((uint64_t)sb.st_size > op->max_size) {
      fail(op, STEP_TOO_BIG, EFBIG);
      close(fd);
      return;
    }
    if (op__buf_reserve(b, (size_t)sb.st_size + 1) != 0) {
      fail(op, STEP_NOMEM, ENOMEM);
      close(fd);
      return;
    }
  }
  for (;;) {
    size_t want;
    if (stopped(op))
      break;
    if (b->cap - b->len < 4096 && op__buf_reserve(b, 65536) != 0) {
      fail(op, STEP_NOMEM, ENOMEM);
      break;
    }
    /* One byte past the limit tells a file of exactly max_size bytes
    ** from a longer one. */
    want = b->cap - b->len;
    if (want > IO_CHUNK)
      want = IO_CHUNK;
    if (b->len + want > op->max_size + 1)
      want = op->max_size + 1 - b->len;
    n = read(fd, b->p + b->len, want);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      fail(op, STEP_READ, errno);
      break;
    }
    if (n == 0)
      break;
    b->len += (size_t)n;
    if (b->len > op->max_size) {
      fail(op, STEP_TOO_BIG, EFBIG);
      break;
    }
  }
  op->nbytes = b->len;
  close(fd);
}

static void do_write(fs_op *op) {
  int fd = open_retry(op->dst, O_WRONLY | O_CREAT | O_TRUNC, 0666);

  if (fd < 0) {
    fail(op, STEP_OPEN_DST, errno);
    return;
  }
  if (write_all(op, fd, op->data, op->len) == 0)
    op->nbytes = op->len;
  if (close(fd) != 0 && op->step == STEP_NONE)
    fail(op, STEP_WRITE, errno);
}

/* Copy in to out with read/write. Returns 0 or -1 (op failed). */
static int copy_rw(fs_op *op, int in, int out) {
  char *p = malloc(COPY_CHUNK);
  ssize_t n;

  if (p == NULL)
    return fail(op, STEP_NOMEM, ENOMEM);
  for (;;) {
    if (stopped(op)) {
      free(p);
      return -1;
    }
    n = read(in, p, COPY_CHUNK);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      free(p);
      return fail(op, STEP_READ, errno);
    }
    if (n == 0)
      break;
    if (write_all(op, out, p, (size_t)n) != 0) {
      free(p);
      return -1;
    }
    op->nbytes += (uint64_t)n;
  }
  free(p);
  return 0;
}

/* Copy with copy_file_range (in-kernel, reflinks where the file system
** can), falling back to read/write where it is not supported. */
static int copy_fast(fs_op *op, int in, int out) {
  ssize_t n;

  for (;;) {
    if (stopped(op))
      return -1;
    n = copy_file_range(in, NULL, out, NULL, CFR_CHUNK, 0);
    if (n > 0) {
      op->nbytes += (uint64_t)n;
      continue;
    }
    if (n == 0)
      return 0;
    if (errno == EINTR)
      continue;
    if (op->nbytes == 0 &&
        (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
         errno == EOPNOTSUPP || errno == EBADF || errno == EPERM))
      return copy_rw(op, in, out);
    /* Which side failed is not told; EIO/ENOSPC/EFBIG/EDQUOT are writes
    ** more often than not, and reading is what else can fail. */
    return fail(op,
                errno == ENOSPC || errno == EFBIG || errno == EDQUOT
                    ? STEP_WRITE
                    : STEP_READ,
                errno);
  }
}

static void do_copy(fs_op *op, int append) {
  struct stat si, so;
  int in, out;

  in = open_retry(op->src, O_RDONLY, 0);
  if (in < 0) {
    fail(op, STEP_OPEN_SRC, errno);
    return;
  }
  if (fstat(in, &si) != 0) {
    fail(op, STEP_READ, errno);
    close(in);
    return;
  }
  out = open_retry(op->dst, O_WRONLY | O_CREAT | (append ? O_APPEND : 0), 0666);
  if (out < 0) {
    fail(op, STEP_OPEN_DST, errno);
    close(in);
    return;
  }
  if (fstat(out, &so) != 0) {
    fail(op, STEP_WRITE, errno);
  } else if (si.st_dev == so.st_dev && si.st_ino == so.st_ino) {
    fail(op, STEP_SAME, 0);
  } else if (!append && S_ISREG(so.st_mode) && ftruncate(out, 0) != 0) {
    fail(op, STEP_WRITE, errno);
  } else if (!append && S_ISREG(si.st_mode) && si.st_size > 0) {
    copy_fast(op, in, out);
  } else {
    /* Appending (copy_file_range refuses O_APPEND), or a source whose size
    ** says nothing (pipes, /proc). */
    copy_rw(op, in, out);
  }
  close(in);
  if (close(out) != 0 && op->step == STEP_NONE)
    fail(op, STEP_WRITE, errno);
}

/* Thread: worker. */
static void fs_work(void *arg) {
  fs_op *op = arg;

  switch (op->kind) {
  case FS_READ:
    do_read(op);
    break;
  case FS_WRITE:
    do_write(op);
    break;
  case FS_COPY:
    do_copy(op, 0);
    break;
  default:
    do_copy(op, 1);
    break;
  }
  op->t.failed = op->step != STEP_NONE;
}

/* ---- results, on the loop thread ---- */

static void fs_free(fs_op *op) {
  if (op->data_ref != LUA_NOREF)
    luaL_unref(op->rt->L, LUA_REGISTRYINDEX, op->data_ref);
  op__buf_free(&op->buf);
  op__task_release(&op->t);
  free(op);
}

/* The message for a failed op, in buf. */
static const char *fs_message(fs_op *op, char *buf, size_t len) {
  const char *call = call_names[op->kind];
  char ebuf[128];
  const char *reason = strerror_r(op->err, ebuf, sizeof ebuf);
  const char *path =
      op->step == STEP_OPEN_SRC || op->step == STEP_READ ? op->src : op->dst;

  switch (op->step) {
  case STEP_SAME:
    snprintf(buf, len, "%s: '%s' and '%s' are the same file", call, op->src,
             op->dst);
    break;
  case STEP_READ:
    snprintf(buf, len, "%s: cannot read '%s': %s", call, path, reason);
    break;
  case STEP_WRITE:
    snprintf(buf, len, "%s: cannot write '%s': %s", call, path, reason);
    break;
  case STEP_NOMEM:
    snprintf(buf, len, "%s: not enough memory for '%s'", call,
             op->kind == FS_READ ? op->src : op->dst);
    break;
  case STEP_TOO_BIG:
    snprintf(buf, len, "%s: '%s' is larger than %zu bytes (max_size)", call,
             op->src, op->max_size);
    break;
  case STEP_STOPPED:
    snprintf(buf, len, "cancelled: %s of '%s' stopped", call,
             op->kind == FS_READ ? op->src : op->dst);
    break;
  default:
    snprintf(buf, len, "%s: cannot open '%s': %s", call, path, reason);
    break;
  }
  return buf;
}

/* The data read by op (the argument) as a string.  [-0, +1, m] */
static int push_data_p(lua_State *L) {
  fs_op *op = lua_touserdata(L, 1);

  lua_pushlstring(L, op->buf.p, op->buf.len);
  return 1;
}

/* Resolve the wait of op (if any) with its result or error. */
static void deliver(fs_op *op) {
  op_wait_id id = op->id;
  lua_State *co;
  char msg[1024];
  int ok;

  op->id = 0;
  if (id == 0 || (co = op__wait_thread(op->rt, id)) == NULL)
    return;
  if (op->t.status != 0) {
    /* Never ran and nobody aborted it: the pool's queue was cancelled
    ** (runtime shutdown with OP_SHUTDOWN_CANCEL). */
    snprintf(msg, sizeof msg,
             "cancelled: %s (the queue of pool '%s' was "
             "cancelled at shutdown)",
             wait_names[op->kind], op__pool_name(op->pool));
    op__wait_fail(op->rt, id, msg);
    return;
  }
  if (op->step != STEP_NONE) {
    op__wait_fail(op->rt, id, fs_message(op, msg, sizeof msg));
    return;
  }
  if (op->kind == FS_READ) {
    /* Made on the main thread in protected mode, then moved: out of
    ** memory, the waiter is given the error ("not enough memory"). */
    ok = op__protect(op->rt->L, push_data_p, op, 1) == LUA_OK;
    op__wait_move(op->rt, id, op->rt->L, 1, ok);
    return;
  }
  lua_pushinteger(co, (lua_Integer)op->nbytes);
  op__wait_resume(op->rt, id, 1);
}

/* The pool hands the task back (drain): exactly once per submitted op. */
static void fs_complete(op_task *t) {
  fs_op *op = (fs_op *)t;

  deliver(op);
  fs_free(op);
}

/* Fail an op that could not be queued, on the turn after its call. */
static void queue_failed(op_runtime *rt, void *arg) {
  fs_op *op = arg;
  op_wait_id id = op->id;
  char msg[256];

  op->id = 0;
  if (id != 0) {
    snprintf(msg, sizeof msg, "%s: cannot queue on pool '%s': %s",
             call_names[op->kind], op__pool_name(op->pool),
             op_strerror(op->queue_err));
    op__wait_fail(rt, id, msg);
  }
  fs_free(op);
}

/* ---- queueing ---- */

/* Hand op to its pool, which parks it while the queue is full. */
static void submit(fs_op *op) {
  int rc = op__pool_submit(op->pool, &op->t, 1);

  if (rc >= 0) {
    op->where = FS_SUBMITTED;
  } else {
    op->where = FS_FAILING;
    op->queue_err = rc;
    op__defer(op->rt, queue_failed, op);
  }
}

/* The wait ended early (timeout, task cancelled, shutdown). */
static void fs_abort(void *what, int code) {
  fs_op *op = what;

  op->id = 0;
  op->abort_code = code;
  switch (op->where) {
  case FS_SUBMITTED:
    /* Queued or parked: taken off and completed; running: runs to its
    ** end. */
    op__pool_stop_task(op->pool, &op->t, code);
    break;
  default:
    break; /* FS_FAILING: queue_failed() frees it */
  }
}

/* ---- the Lua functions ---- */

static void discard(lua_State *L, void *p) {
  fs_op *op = p;

  if (op->data_ref != LUA_NOREF)
    luaL_unref(L, LUA_REGISTRYINDEX, op->data_ref);
  free(op);
}

/* The common body: kind, the paths (dst may be NULL), the data string at
** index didx (0: none) and the options table at oidx ({timeout=, pool=},
** and max_size= for readfile).
** Suspends; returns what deliver() pushed.  [-0, +1, e] */
static int fs_call(lua_State *L, fs_kind kind, int sidx, int didx_path,
                   int didx, int oidx) {
  op_runtime *rt = op__runtime(L);
  const char *src = NULL, *dst = NULL, *pname = "io";
  size_t slen = 0, dlen = 0;
  double timeout = 0, max_size = (double)DEFAULT_MAX_SIZE;
  op_pool *pool;
  op_guard *g;
  fs_op *op;
  char *p;

  if (sidx != 0)
    src = luaL_checklstring(L, sidx, &slen);
  if (didx_path != 0)
    dst = luaL_checklstring(L, didx_path, &dlen);
  if (didx != 0)
    luaL_checktype(L, didx, LUA_TSTRING);
  if (!lua_isnoneornil(L, oidx)) {
    luaL_checktype(L, oidx, LUA_TTABLE);
    if (lua_getfield(L, oidx, "timeout") != LUA_TNIL) {
      if (!lua_isnumber(L, -1) || (timeout = lua_tonumber(L, -1)) < 0)
        luaL_argerror(L, oidx, "field 'timeout' must be a number >= 0");
    }
    if (lua_getfield(L, oidx, "pool") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TSTRING)
        luaL_argerror(L, oidx, "field 'pool' must be a pool name");
      pname = lua_tostring(L, -1);
    }
    lua_pop(L, 2);
    if (kind == FS_READ)
      max_size = op__opt_number(L, oidx, "max_size", max_size, "readfile");
  }
  if ((pool = op__pool_find(rt, pname)) == NULL)
    return luaL_error(L, "%s: no such pool '%s'", call_names[kind], pname);
  op__check_suspend(L, wait_names[kind]);

  g = op__guard_new(L, discard);
  op = calloc(1, sizeof *op + slen + 1 + dlen + 1);
  if (op == NULL)
    return luaL_error(L, "not enough memory");
  op->data_ref = LUA_NOREF;
  g->p = op;
  op__task_init(&op->t, OP_TASK_C);
  op->t.work = fs_work;
  op->t.arg = op;
  op->t.complete = fs_complete;
  op__buf_init(&op->buf);
  op->rt = rt;
  op->pool = pool;
  op->kind = (uint8_t)kind;
  op->max_size =
      max_size >= (double)(SIZE_MAX - 1) ? SIZE_MAX - 1 : (size_t)max_size;
  p = (char *)(op + 1);
  if (src != NULL)
    memcpy(p, src, slen + 1);
  op->src = p;
  p += slen + 1;
  if (dst != NULL)
    memcpy(p, dst, dlen + 1);
  op->dst = p;
  if (didx != 0) {
    op->data = lua_tolstring(L, didx, &op->len);
    lua_pushvalue(L, didx);
    op->data_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  op->id = op__wait_new(L, wait_names[kind], timeout, fs_abort, op);
  g->p = NULL; /* the wait owns op now: nothing below raises */
  submit(op);
  return op__wait_yield(L);
}

/* offpath.readfile(path, [opts]) -> contents */
static int offpath_readfile(lua_State *L) {
  return fs_call(L, FS_READ, 1, 0, 0, 2);
}

/* offpath.writefile(path, data, [opts]) -> bytes written */
static int offpath_writefile(lua_State *L) {
  return fs_call(L, FS_WRITE, 0, 1, 2, 3);
}

/* offpath.copy(src, dst, [opts]) -> bytes copied */
static int offpath_copy(lua_State *L) {
  return fs_call(L, FS_COPY, 1, 2, 0, 3);
}

/* offpath.cat(src, dst, [opts]) -> bytes appended */
static int offpath_cat(lua_State *L) {
  return fs_call(L, FS_CAT, 1, 2, 0, 3);
}

/* ---- module ---- */

void op__open_io_fs(lua_State *L) {
  static const luaL_Reg funcs[] = { { "readfile", offpath_readfile },
                                    { "writefile", offpath_writefile },
                                    { "copy", offpath_copy },
                                    { "cat", offpath_cat },
                                    { NULL, NULL } };
  luaL_setfuncs(L, funcs, 0);
}
