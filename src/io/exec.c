/* SPDX-License-Identifier: MIT */
/*
** exec.c - offpath.exec: child processes on the libuv loop, no thread.
** Thread: loop, always.
**
** DESIGN
**
** Starting: posix_spawnp() (glibc: clone with CLONE_VM|CLONE_VFORK), not
** fork(): the cost of a fork grows with the engine's memory (page tables:
** about 25 ms of a blocked main thread for a 1 GB heap), a vfork-style
** spawn does not (about 1 ms, most of it the child's exec). The child gets
** its own session and process group (POSIX_SPAWN_SETSID), default signal
** handling and an empty signal mask. Its pipes are opened on our side as
** uv_pipe_t. Exits are seen through one SIGCHLD watcher per runtime
** (exec_state.chld, active while children run) that calls waitpid() on our
** own pids only, so the child is always reaped (no zombie).
**
** One exec_op per call owns up to three uv_pipe_t (stdin only when
** opts.stdin is given; stdout and stderr always) and, once the child has
** to be stopped, a kill timer. `refs` counts the handles that are
** initialised and not yet through their close callback, the child until
** it is reaped, and a pending deferred call; the struct is freed when it
** drops to zero, so no handle memory is released before libuv is done
** with it, and a child is never left without its op.
**
**   offpath.exec --> wait made --> spawn ok --> RUNNING
**                                   spawn fails: the wait fails on the
**                                   next turn (op__defer)
**   RUNNING --> reaped AND stdout EOF AND stderr EOF --> result delivered
**           --> timeout/cancel/shutdown (abort), or output too large -->
**               STOPPING: pipes closed at once, SIGTERM to the child's
**               process group, SIGKILL after kill_grace; the exit is
**               still awaited, so the child is reaped
**   every way ends in close_all() once the child is reaped (or never
**   started); the last close callback frees the op.
**
** Invariants: op->id != 0 exactly while a coroutine waits for this op, and
** it is cleared by whoever resolves the wait (delivery, failure, abort);
** after that nothing touches Lua for this op except releasing the stdin
** anchor in exec_free(). Signalling the whole process group stops a shell
** and every program it started, which would otherwise keep the pipes open.
**
** exec_free() runs before the main VM is closed: exec_shutdown()
** kills what is left and runs the loop until every op is freed.
*/
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

extern char **environ;

#define DEFAULT_GRACE      1.0                /* seconds */
#define DEFAULT_MAX_OUTPUT ((size_t)64 << 20) /* bytes, per stream */
#define READ_CHUNK         65536

typedef struct exec_op exec_op;

typedef struct exec_state {
  exec_op *live;    /* ops not yet freed */
  int running;      /* children spawned and not reaped yet */
  uv_signal_t chld; /* SIGCHLD, active while running > 0 */
  int chld_inited;
  int chld_closed;     /* its close callback ran */
  int sigpipe_checked; /* SIGPIPE disposition looked at */
} exec_state;

enum {
  H_STDIN = 1 << 0,
  H_STDOUT = 1 << 1,
  H_STDERR = 1 << 2,
  H_TIMER = 1 << 3
};

struct exec_op {
  exec_op *next, *prev; /* exec_state.live */
  op_runtime *rt;
  exec_state *st;
  op_wait_id id;     /* the waiting coroutine, 0 once resolved */
  uv_pipe_t pipe[3]; /* [0] child's stdin, [1] stdout, [2] stderr */
  uv_write_t wreq;
  uv_timer_t timer; /* SIGTERM -> SIGKILL grace period */
  op_buf out[3];    /* [1] stdout, [2] stderr */
  int stdin_ref;    /* registry anchor of the stdin string */
  const char *stdin_p;
  size_t stdin_len;
  int refs;        /* handles not closed yet + deferred calls */
  unsigned inited; /* H_* initialised */
  int has_stdin;
  int spawned;
  int exited;
  int stopping; /* abort or overflow: kill, drop the output */
  int eof[3];
  int read_err; /* a uv error reading output, or 0 */
  int lost;     /* the exit status was collected by other code */
  int pid;
  int64_t code;
  int signal;
  double grace;
  size_t max_output;
  char name[256]; /* the command, for messages */
  char msg[1024]; /* a spawn failure, delivered on the next turn */
};

static void check_done(exec_op *op);

/* ---- freeing ---- */

static void exec_free(exec_op *op) {
  exec_state *st = op->st;

  if (op->prev != NULL)
    op->prev->next = op->next;
  else
    st->live = op->next;
  if (op->next != NULL)
    op->next->prev = op->prev;
  if (op->stdin_ref != LUA_NOREF)
    luaL_unref(op->rt->L, LUA_REGISTRYINDEX, op->stdin_ref);
  op__buf_free(&op->out[1]);
  op__buf_free(&op->out[2]);
  free(op);
}

static void unref_op(exec_op *op) {
  if (--op->refs == 0)
    exec_free(op);
}

static void close_cb(uv_handle_t *h) {
  unref_op(h->data);
}

/* Close the handle h (flag bit) if it is initialised and not closing. */
static void close_one(exec_op *op, uv_handle_t *h, unsigned bit) {
  if ((op->inited & bit) && !uv_is_closing(h))
    uv_close(h, close_cb);
}

static void close_pipes(exec_op *op) {
  close_one(op, (uv_handle_t *)&op->pipe[0], H_STDIN);
  close_one(op, (uv_handle_t *)&op->pipe[1], H_STDOUT);
  close_one(op, (uv_handle_t *)&op->pipe[2], H_STDERR);
  op->eof[1] = op->eof[2] = 1;
}

static void close_all(exec_op *op) {
  close_pipes(op);
  if (op->inited & H_TIMER)
    uv_timer_stop(&op->timer);
  close_one(op, (uv_handle_t *)&op->timer, H_TIMER);
}

/* ---- stopping the child ---- */

/* Signal the child's process group (it is a group leader: detached). */
static void signal_group(exec_op *op, int sig) {
  kill(-op->pid, sig);
}

static void grace_cb(uv_timer_t *timer) {
  exec_op *op = timer->data;

  if (!op->exited)
    signal_group(op, SIGKILL);
}

/* Stop the operation: its output is no longer wanted. Close the pipes,
** send SIGTERM now and SIGKILL after the grace period, and wait for the
** exit (so the child is reaped). */
static void stop(exec_op *op) {
  if (op->stopping)
    return;
  op->stopping = 1;
  close_pipes(op);
  if (op->spawned && !op->exited) {
    if (op->grace <= 0) {
      signal_group(op, SIGKILL);
    } else {
      signal_group(op, SIGTERM);
      uv_timer_init(op->rt->loop, &op->timer);
      op->timer.data = op;
      op->inited |= H_TIMER;
      op->refs++;
      uv_timer_start(&op->timer, grace_cb, (uint64_t)(op->grace * 1000.0 + 0.5),
                     0);
    }
  }
  check_done(op);
}

/* The wait ended early (timeout, task cancelled, shutdown). */
static void exec_abort(void *what, int code) {
  exec_op *op = what;

  (void)code;
  op->id = 0;
  stop(op);
}

/* ---- completion ---- */

static void set_field_buf(lua_State *L, const char *k, op_buf *b) {
  lua_pushlstring(L, b->p, b->len);
  lua_setfield(L, -2, k);
}

/* The result table of op (the argument), made on the main thread in
** protected mode and then moved to the waiter: a memory error must not
** unwind libuv's frames.  [-0, +1, m] */
static int push_result_p(lua_State *L) {
  exec_op *op = lua_touserdata(L, 1);

  lua_createtable(L, 0, 4);
  if (op->signal != 0) {
    lua_pushinteger(L, op->signal);
    lua_setfield(L, -2, "signal");
  } else {
    lua_pushinteger(L, (lua_Integer)op->code);
    lua_setfield(L, -2, "code");
  }
  set_field_buf(L, "stdout", &op->out[1]);
  set_field_buf(L, "stderr", &op->out[2]);
  return 1;
}

/* Deliver {code=, signal=, stdout=, stderr=} to the waiter. */
static void deliver(exec_op *op) {
  op_runtime *rt = op->rt;
  op_wait_id id = op->id;
  lua_State *co = op__wait_thread(rt, id);
  char msg[512];
  int ok;

  op->id = 0;
  if (co == NULL)
    return;
  if (op->read_err != 0) {
    snprintf(msg, sizeof msg, "exec: cannot read the output of '%s': %s",
             op->name, uv_strerror(op->read_err));
    op__wait_fail(rt, id, msg);
    return;
  }
  if (op->lost) {
    snprintf(msg, sizeof msg,
             "exec: the exit status of '%s' was collected by other code "
             "(waitpid)",
             op->name);
    op__wait_fail(rt, id, msg);
    return;
  }
  /* Out of memory: the waiter is given the error ("not enough memory"). */
  ok = op__protect(rt->L, push_result_p, op, 1) == LUA_OK;
  op__wait_move(rt, id, rt->L, 1, ok);
}

/* Called after every event: finish when the child has exited and, unless
** stopping, both output pipes reached EOF. */
static void check_done(exec_op *op) {
  if (op->spawned && !op->exited)
    return;
  if (op->id != 0) {
    if (!op->eof[1] || !op->eof[2])
      return;
    deliver(op);
  }
  close_all(op);
}

/* The child of op was reaped with wait status `status`. */
static void exited(exec_op *op, int status) {
  exec_state *st = op->st;

  op->exited = 1;
  op->code = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  op->signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  if (--st->running == 0)
    uv_signal_stop(&st->chld);
  if (op->stopping) {
    /* Leftovers of the group (a shell's children) go with the child. */
    signal_group(op, SIGKILL);
  }
  check_done(op);
  unref_op(op); /* the running child's reference */
}

/* SIGCHLD: reap whichever of our children have ended. Only our own pids
** are waited for, so other code's children are left alone. */
static void chld_cb(uv_signal_t *h, int signum) {
  exec_state *st = h->data;
  exec_op *op, *next;
  pid_t pid;
  int status;

  (void)signum;
  for (op = st->live; op != NULL; op = next) {
    next = op->next; /* exited() may run Lua, which may add ops at the head */
    if (!op->spawned || op->exited)
      continue;
    do
      pid = waitpid(op->pid, &status, WNOHANG);
    while (pid < 0 && errno == EINTR);
    if (pid == op->pid)
      exited(op, status);
    else if (pid < 0 && errno == ECHILD) {
      op->lost = 1; /* other code reaped it (waitpid(-1)): status unknown */
      exited(op, 0);
    }
  }
}

/* The output of one stream went over max_output: fail and stop. */
static void overflow(exec_op *op, int i) {
  char msg[512];
  op_wait_id id = op->id;

  op->id = 0;
  snprintf(msg, sizeof msg,
           "exec: output larger than %zu bytes on %s of '%s' (max_output)",
           op->max_output, i == 1 ? "stdout" : "stderr", op->name);
  stop(op);
  op__wait_fail(op->rt, id, msg);
}

static void alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  exec_op *op = h->data;
  op_buf *b = &op->out[(uv_pipe_t *)h - op->pipe];

  (void)hint;
  if (b->cap - b->len < 4096 && op__buf_reserve(b, READ_CHUNK) != 0) {
    buf->base = NULL;
    buf->len = 0;
    return;
  }
  buf->base = b->p + b->len;
  buf->len = b->cap - b->len;
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  exec_op *op = s->data;
  int i = (int)((uv_pipe_t *)s - op->pipe);

  (void)buf;
  if (nread > 0) {
    op->out[i].len += (size_t)nread;
    if (op->out[i].len > op->max_output && op->id != 0)
      overflow(op, i);
    return;
  }
  if (nread == 0)
    return;
  if (nread != UV_EOF && op->read_err == 0)
    op->read_err = (int)nread;
  op->eof[i] = 1;
  close_one(op, (uv_handle_t *)s, i == 1 ? H_STDOUT : H_STDERR);
  check_done(op);
}

static void write_cb(uv_write_t *req, int status) {
  exec_op *op = req->data;

  /* EPIPE: the child did not read all of its stdin; not an error. */
  (void)status;
  close_one(op, (uv_handle_t *)&op->pipe[0], H_STDIN);
}

/* The spawn failed: fail the wait now that the caller has yielded. */
static void spawn_failed(op_runtime *rt, void *arg) {
  exec_op *op = arg;
  op_wait_id id = op->id;

  op->id = 0;
  if (id != 0)
    op__wait_fail(rt, id, op->msg);
  unref_op(op);
}

/* ---- arguments ---- */

/* Refuse option names exec does not know (a typo would be silent).
** [-0, +0, e] */
static void check_option_names(lua_State *L, int idx) {
  static const char *const known[] = { "stdin",      "timeout", "env",
                                       "env_add",    "cwd",     "kill_grace",
                                       "max_output", NULL };
  int i;

  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "bad option to 'offpath.exec' (option names are strings)");
    for (i = 0; known[i] != NULL; i++)
      if (strcmp(known[i], lua_tostring(L, -1)) == 0)
        break;
    if (known[i] == NULL)
      luaL_error(L, "bad option '%s' to 'offpath.exec' (unknown option)",
                 lua_tostring(L, -1));
  }
}

/* Copy the variables of the table at tidx into the table at midx
** (name -> value), checking names and values.  [-0, +0, e] */
static void env_merge(lua_State *L, int tidx, int midx, const char *opt) {
  const char *k;

  if (!lua_istable(L, tidx))
    luaL_error(L, "bad option '%s' to 'offpath.exec' (table expected, got %s)",
               opt, luaL_typename(L, tidx));
  lua_pushnil(L);
  while (lua_next(L, tidx)) {
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_error(L, "bad option '%s' to 'offpath.exec' (names must be strings)",
                 opt);
    k = lua_tostring(L, -2);
    if (k[0] == '\0' || strchr(k, '=') != NULL)
      luaL_error(L,
                 "bad option '%s' to 'offpath.exec' (bad variable name '%s')",
                 opt, k);
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
      luaL_error(L,
                 "bad option '%s' to 'offpath.exec' (value of '%s' must be a "
                 "string)",
                 opt, k);
    lua_pushvalue(L, -2);
    lua_pushstring(L, lua_tostring(L, -2));
    lua_rawset(L, midx);
    lua_pop(L, 1);
  }
}

/* Build the child's environment from the options at oidx: NULL to inherit
** ours, else a NULL-terminated array (in a userdata left on L) of
** "NAME=value" strings anchored in the table at aidx. env replaces the
** environment, env_add adds to it (or to env).  [-0, +k, e] */
static char **build_env(lua_State *L, int oidx, int aidx) {
  int env, add, merged, n = 0, i;
  const char *eq;
  char **envp;

  lua_getfield(L, oidx, "env");
  env = lua_gettop(L);
  lua_getfield(L, oidx, "env_add");
  add = lua_gettop(L);
  if (lua_isnil(L, env) && lua_isnil(L, add))
    return NULL;
  lua_newtable(L);
  merged = lua_gettop(L);
  if (!lua_isnil(L, env)) {
    env_merge(L, env, merged, "env");
  } else {
    for (i = 0; environ[i] != NULL; i++) {
      if ((eq = strchr(environ[i], '=')) == NULL)
        continue;
      lua_pushlstring(L, environ[i], (size_t)(eq - environ[i]));
      lua_pushstring(L, eq + 1);
      lua_rawset(L, merged);
    }
  }
  if (!lua_isnil(L, add))
    env_merge(L, add, merged, "env_add");
  lua_pushnil(L);
  while (lua_next(L, merged)) {
    lua_pushfstring(L, "%s=%s", lua_tostring(L, -2), lua_tostring(L, -1));
    lua_rawseti(L, aidx, (lua_Integer)lua_rawlen(L, aidx) + 1);
    lua_pop(L, 1);
    n++;
  }
  envp = lua_newuserdatauv(L, ((size_t)n + 1) * sizeof *envp, 0);
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, aidx, (lua_Integer)lua_rawlen(L, aidx) - n + 1 + i);
    envp[i] = (char *)lua_tostring(L, -1); /* anchored in aidx */
    lua_pop(L, 1);
  }
  envp[n] = NULL;
  return envp;
}

/* Build argv for cmd at index 1 in a userdata left on L: a string runs
** under /bin/sh -c, a table is the argv itself. Numbers in the table are
** converted into strings anchored in the table at aidx.  [-0, +1, e] */
static char **build_argv(lua_State *L, int aidx) {
  char **argv;
  lua_Integer n, i;
  int t;

  if (lua_type(L, 1) == LUA_TSTRING) {
    argv = lua_newuserdatauv(L, 4 * sizeof *argv, 0);
    argv[0] = (char *)"/bin/sh";
    argv[1] = (char *)"-c";
    argv[2] = (char *)lua_tostring(L, 1);
    argv[3] = NULL;
    return argv;
  }
  luaL_argexpected(L, lua_istable(L, 1), 1, "command string or argv table");
  n = (lua_Integer)lua_rawlen(L, 1);
  luaL_argcheck(L, n > 0, 1, "argv table is empty");
  luaL_argcheck(L, n < 65536, 1, "argv table too long");
  argv = lua_newuserdatauv(L, ((size_t)n + 1) * sizeof *argv, 0);
  for (i = 1; i <= n; i++) {
    t = lua_rawgeti(L, 1, i);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      luaL_error(L,
                 "bad argument #1 to 'offpath.exec' (argv[%d] is a %s, not a "
                 "string)",
                 (int)i, luaL_typename(L, -1));
    lua_tostring(L, -1); /* a number becomes a string on the stack only */
    argv[i - 1] = (char *)lua_tostring(L, -1);
    lua_rawseti(L, aidx, (lua_Integer)lua_rawlen(L, aidx) + 1);
  }
  argv[n] = NULL;
  return argv;
}

/* A child that exits without reading its stdin must not kill the engine
** with SIGPIPE when we write to it: ignore SIGPIPE if nobody set it. */
static void ignore_sigpipe(exec_state *st) {
  struct sigaction sa;

  if (st->sigpipe_checked)
    return;
  st->sigpipe_checked = 1;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGPIPE, &sa, NULL);
  }
}

/* Make a pipe whose two ends are close-on-exec and not among fds 0-2 (so
** the child's dup2 onto 0-2 always clears close-on-exec). Returns 0 or a
** negative errno. */
static int make_pipe(int p[2]) {
  int i, fd;

  if (pipe2(p, O_CLOEXEC) != 0)
    return -errno;
  for (i = 0; i < 2; i++) {
    if (p[i] > 2)
      continue;
    fd = fcntl(p[i], F_DUPFD_CLOEXEC, 3);
    if (fd < 0) {
      fd = -errno;
      close(p[0]);
      close(p[1]);
      return fd;
    }
    close(p[i]);
    p[i] = fd;
  }
  return 0;
}

/* Start the child of op: pipes, posix_spawnp, the SIGCHLD watcher. On
** success sets op->pid and fds[0..2] to our ends of the pipes (fds[0]
** only with stdin) and returns 0; else returns a negative errno and
** leaves no descriptor open. */
static int spawn(exec_op *op, char **argv, char **envp, const char *cwd,
                 int fds[3]) {
  exec_state *st = op->st;
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  int p[3][2], i, rc = 0, sig;
  sigset_t set;
  pid_t pid;

  for (i = 0; i < 3; i++)
    p[i][0] = p[i][1] = -1;
  for (i = op->has_stdin ? 0 : 1; i < 3 && rc == 0; i++)
    rc = make_pipe(p[i]);
  if (rc == 0 && (rc = -posix_spawn_file_actions_init(&fa)) == 0) {
    if (op->has_stdin)
      rc = -posix_spawn_file_actions_adddup2(&fa, p[0][0], 0);
    else
      rc = -posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (rc == 0)
      rc = -posix_spawn_file_actions_adddup2(&fa, p[1][1], 1);
    if (rc == 0)
      rc = -posix_spawn_file_actions_adddup2(&fa, p[2][1], 2);
    if (rc == 0 && cwd != NULL)
      rc = -posix_spawn_file_actions_addchdir_np(&fa, cwd);
    if (rc == 0 && (rc = -posix_spawnattr_init(&attr)) == 0) {
      /* Default handling for every signal we may ignore (SIGPIPE) or
      ** catch, nothing blocked, a session and process group of its own. */
      sigemptyset(&set);
      for (sig = 1; sig < 32; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
          sigaddset(&set, sig);
      posix_spawnattr_setsigdefault(&attr, &set);
      sigemptyset(&set);
      posix_spawnattr_setsigmask(&attr, &set);
      posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID |
                                          POSIX_SPAWN_SETSIGDEF |
                                          POSIX_SPAWN_SETSIGMASK);
      if (!st->chld_inited) {
        uv_signal_init(op->rt->loop, &st->chld);
        st->chld.data = st;
        st->chld_inited = 1;
      }
      /* Watch before spawning: an exit right away is not missed. */
      if (st->running == 0)
        uv_signal_start(&st->chld, chld_cb, SIGCHLD);
      rc = -posix_spawnp(&pid, argv[0], &fa, &attr, argv,
                         envp != NULL ? envp : environ);
      if (rc == 0) {
        st->running++;
        op->refs++; /* until it is reaped: see exited() */
        op->pid = pid;
        op->spawned = 1;
      } else if (st->running == 0) {
        uv_signal_stop(&st->chld);
      }
      posix_spawnattr_destroy(&attr);
    }
    posix_spawn_file_actions_destroy(&fa);
  }
  /* The child's ends are the child's now; ours stay open on success. */
  if (p[0][0] >= 0)
    close(p[0][0]);
  for (i = 1; i < 3; i++)
    if (p[i][1] >= 0)
      close(p[i][1]);
  fds[0] = p[0][1];
  fds[1] = p[1][0];
  fds[2] = p[2][0];
  if (rc != 0)
    for (i = 0; i < 3; i++)
      if (fds[i] >= 0)
        close(fds[i]);
  return rc;
}

static void discard(lua_State *L, void *p) {
  exec_op *op = p;

  if (op->stdin_ref != LUA_NOREF)
    luaL_unref(L, LUA_REGISTRYINDEX, op->stdin_ref);
  free(op);
}

/* ---- offpath.exec ---- */

/* offpath.exec(cmd, [opts]) -> {code=, signal=, stdout=, stderr=} */
static int offpath_exec(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  exec_state *st = rt->io_exec;
  char **argv, **envp = NULL;
  const char *cwd = NULL;
  double timeout = 0, grace = DEFAULT_GRACE;
  double maxout = (double)DEFAULT_MAX_OUTPUT;
  op_guard *g;
  exec_op *op;
  int rc, i, fds[3];

  lua_settop(L, 2);
  lua_newtable(L); /* 3: anchors the strings argv and envp point to */
  lua_pushnil(L);  /* 4: stdin */
  argv = build_argv(L, 3);
  if (!lua_isnil(L, 2)) {
    luaL_argexpected(L, lua_istable(L, 2), 2, "options table");
    check_option_names(L, 2);
    timeout = op__opt_number(L, 2, "timeout", 0, "offpath.exec");
    grace = op__opt_number(L, 2, "kill_grace", DEFAULT_GRACE, "offpath.exec");
    maxout = op__opt_number(L, 2, "max_output", maxout, "offpath.exec");
    if (maxout < 1)
      luaL_error(
          L, "bad option 'max_output' to 'offpath.exec' (must be positive)");
    if (lua_getfield(L, 2, "cwd") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(
            L, "bad option 'cwd' to 'offpath.exec' (string expected, got %s)",
            luaL_typename(L, -1));
      cwd = lua_tostring(L, -1);
      lua_rawseti(L, 3, (lua_Integer)lua_rawlen(L, 3) + 1);
    }
    if (lua_getfield(L, 2, "stdin") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(
            L, "bad option 'stdin' to 'offpath.exec' (string expected, got %s)",
            luaL_typename(L, -1));
      if (lua_rawlen(L, -1) > UINT32_MAX)
        luaL_error(L, "bad option 'stdin' to 'offpath.exec' (too large)");
    }
    lua_replace(L, 4);
    envp = build_env(L, 2, 3);
  }
  op__check_suspend(L, "offpath.exec");

  g = op__guard_new(L, discard);
  op = calloc(1, sizeof *op);
  if (op == NULL)
    return luaL_error(L, "not enough memory");
  op->stdin_ref = LUA_NOREF;
  g->p = op;
  op->rt = rt;
  op->st = st;
  op->grace = grace;
  op->max_output = maxout >= (double)SIZE_MAX ? SIZE_MAX : (size_t)maxout;
  op__buf_init(&op->out[1]);
  op__buf_init(&op->out[2]);
  /* Messages name the command: the string run by /bin/sh -c, or the
  ** program of an argv table (cut to fit, marked with "..."). */
  if (snprintf(op->name, sizeof op->name, "%s",
               lua_type(L, 1) == LUA_TSTRING ? argv[2] : argv[0]) >=
      (int)sizeof op->name)
    memcpy(op->name + sizeof op->name - 4, "...", 4);
  if (lua_type(L, 4) == LUA_TSTRING) {
    op->has_stdin = 1;
    op->stdin_p = lua_tolstring(L, 4, &op->stdin_len);
    lua_pushvalue(L, 4);
    op->stdin_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  op->id = op__wait_new(L, "offpath.exec", timeout, exec_abort, op);
  g->p = NULL; /* the wait owns op now: nothing below raises */

  op->next = st->live;
  if (st->live != NULL)
    st->live->prev = op;
  st->live = op;
  if (op->has_stdin)
    ignore_sigpipe(st);
  rc = spawn(op, argv, envp, cwd, fds);
  if (rc != 0) {
    if (cwd != NULL)
      snprintf(op->msg, sizeof op->msg, "exec: cannot run '%s' (cwd '%s'): %s",
               argv[0], cwd, uv_strerror(rc));
    else
      snprintf(op->msg, sizeof op->msg, "exec: cannot run '%s': %s", argv[0],
               uv_strerror(rc));
    op->refs++;
    op__defer(rt, spawn_failed, op);
    return op__wait_yield(L);
  }
  for (i = op->has_stdin ? 0 : 1; i < 3; i++) {
    uv_pipe_init(rt->loop, &op->pipe[i], 0);
    op->pipe[i].data = op;
    op->inited |= 1u << i;
    op->refs++;
    if (uv_pipe_open(&op->pipe[i], fds[i]) != 0) {
      close(fds[i]);
      op->eof[i] = 1;
      close_one(op, (uv_handle_t *)&op->pipe[i], 1u << i);
    } else if (i > 0 && uv_read_start((uv_stream_t *)&op->pipe[i], alloc_cb,
                                      read_cb) != 0) {
      op->eof[i] = 1;
      close_one(op, (uv_handle_t *)&op->pipe[i], 1u << i);
    }
  }
  if (op->has_stdin && !uv_is_closing((uv_handle_t *)&op->pipe[0])) {
    uv_buf_t b = uv_buf_init((char *)op->stdin_p, (unsigned)op->stdin_len);
    op->wreq.data = op;
    if (op->stdin_len == 0 ||
        uv_write(&op->wreq, (uv_stream_t *)&op->pipe[0], &b, 1, write_cb))
      close_one(op, (uv_handle_t *)&op->pipe[0], H_STDIN);
  }
  return op__wait_yield(L);
}

/* ---- module ---- */

/* At runtime shutdown (every wait already ended). */
static void exec_shutdown(op_runtime *rt);

void op__open_io_exec(lua_State *L) {
  op_runtime *rt = op__runtime(L);

  /* First: whatever fails after this, the hook frees what was made. */
  op__io_at_shutdown(rt, exec_shutdown);

  if (rt->io_exec == NULL) {
    rt->io_exec = calloc(1, sizeof(exec_state));
    if (rt->io_exec == NULL)
      luaL_error(L, "not enough memory");
  }
  lua_pushcfunction(L, offpath_exec);
  lua_setfield(L, -2, "exec");
}

static void chld_close_cb(uv_handle_t *h) {
  exec_state *st = h->data;
  st->chld_closed = 1;
}

static void exec_shutdown(op_runtime *rt) {
  exec_state *st = rt->io_exec;
  exec_op *op;

  if (st == NULL)
    return;
  /* Every wait has ended, so every op left is stopping: do not wait for
  ** the grace periods. */
  for (op = st->live; op != NULL; op = op->next) {
    op->id = 0;
    stop(op);
    if (op->spawned && !op->exited)
      signal_group(op, SIGKILL);
  }
  while (st->live != NULL)
    uv_run(rt->loop, UV_RUN_ONCE);
  if (st->chld_inited) {
    uv_close((uv_handle_t *)&st->chld, chld_close_cb);
    while (!st->chld_closed)
      uv_run(rt->loop, UV_RUN_NOWAIT);
  }
  free(st);
  rt->io_exec = NULL;
}
