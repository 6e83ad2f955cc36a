/* SPDX-License-Identifier: MIT */
/*
** offpath.h - the public C API of liboffpath.
** Keeps blocking work off the fast path of Lua-scripted engines: named
** worker pools with their own Lua VMs, coroutine suspend/resume, and
** non-blocking I/O, all driven by one libuv loop. See docs/api.md.
**
** Unless a comment says otherwise, every function here must be called on
** the loop thread: the thread that runs the runtime's libuv loop.
*/
#ifndef OFFPATH_H
#define OFFPATH_H

#include <stddef.h>
#include <stdint.h>
#include <lua.h>
#include <lauxlib.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(OP_BUILDING) && defined(__GNUC__)
#define OP_EXTERN __attribute__((visibility("default")))
#else
#define OP_EXTERN /* nothing */
#endif

#define OP_VERSION_MAJOR  0
#define OP_VERSION_MINOR  1
#define OP_VERSION_PATCH  0
#define OP_VERSION_STRING "0.1.0"
#define OP_VERSION_HEX                                                         \
  ((OP_VERSION_MAJOR << 16) | (OP_VERSION_MINOR << 8) | OP_VERSION_PATCH)

/* The linked library's version, e.g. "0.1.0". */
OP_EXTERN const char *op_version(void);

/*
** Error codes. Where the meaning is the same as libuv's, the value is
** libuv's (OP_EINVAL == UV_EINVAL), so libuv errors pass straight through.
** Codes only offpath has live in -30000..-30099, which libuv never uses.
*/
#define OP_ERRNO_MAP(XX)                                                       \
  XX(EINVAL, -22, "invalid argument")                                          \
  XX(ENOMEM, -12, "out of memory")                                             \
  XX(ENOENT, -2, "no such file or directory")                                  \
  XX(EBUSY, -16, "resource busy")                                              \
  XX(EAGAIN, -11, "queue full")                                                \
  XX(ECANCELED, -125, "operation cancelled")                                   \
  XX(ETIMEDOUT, -110, "timed out")                                             \
  XX(ESHUTDOWN, -108, "runtime is shutting down")                              \
  XX(ESCRIPT, -30001, "script error")                                          \
  XX(ENOPOOL, -30002, "no such pool")                                          \
  XX(ECOPY, -30003, "value cannot be copied between Lua states")               \
  XX(ESTARTED, -30004, "pool already started")                                 \
  XX(ENOHANDLER, -30005, "no such handler")                                    \
  XX(ENOTHREAD, -30006, "cannot start a pool thread")

typedef enum op_errno {
#define OP_ERRNO_ENUM(name, value, text) OP_##name = (value),
  OP_ERRNO_MAP(OP_ERRNO_ENUM)
#undef OP_ERRNO_ENUM
      OP_EMAX_SENTINEL = -30099
} op_errno;

/* A static description of an error code; "unknown error" if unknown. */
OP_EXTERN const char *op_strerror(int err);
/* The code's name without the prefix, e.g. "ETIMEDOUT". */
OP_EXTERN const char *op_err_name(int err);

/* ---- configuration ---- */

#define OP_MAX_POOLS     16
#define OP_POOL_NAME_MAX 32

typedef struct op_pool_config {
  const char *name;    /* "io", "cpu", or any name up to 31 bytes */
  int threads;         /* worker threads; 0 means the default */
  int queue;           /* bounded queue length; 0 means the default (4096) */
  const char *init;    /* a Lua file run once in each worker VM, or NULL */
  size_t memory_limit; /* bytes per worker VM; 0: op_config.memory_limit */
} op_pool_config;

/* The memory limit of each worker VM unless configured (1 GiB), and the
** value that means no limit in op_pool_config.memory_limit. */
#define OP_MEMORY_LIMIT_DEFAULT ((size_t)1 << 30)
#define OP_MEMORY_UNLIMITED     ((size_t)-1)

/* What happens to queued tasks when the runtime is freed. */
typedef enum op_shutdown_mode {
  OP_SHUTDOWN_DRAIN = 0, /* queued tasks still run (default) */
  OP_SHUTDOWN_CANCEL = 1 /* queued tasks end as cancelled */
} op_shutdown_mode;

/* What happens when an offpath.block section overruns its budget. */
typedef enum op_block_policy {
  OP_BLOCK_ABORT = 0,   /* raise an error inside the section (default) */
  OP_BLOCK_CONTINUE = 1 /* log a warning and let it finish */
} op_block_policy;

/* Which pools keep their workers off the loop thread's CPU. A worker that
** wakes up, sleeps or takes a timer interrupt on that CPU stalls the
** handler running there; a pool kept off it costs the process one CPU of
** parallelism in that pool. The CPU is the one the loop thread runs on
** when the first such pool starts; the loop thread itself is not pinned.
** Workers start with the CPUs the loop thread may use, and it is those
** that are counted: a loop thread pinned to one CPU keeps every worker
** there. */
typedef enum op_loop_cpu {
  OP_LOOP_CPU_AUTO = 0, /* pools with more threads than the loop thread may
                           use CPUs (waiting, not computing) keep off it */
  OP_LOOP_CPU_KEEP = 1, /* every pool keeps off it (2 CPUs or more) */
  OP_LOOP_CPU_SHARE = 2 /* no pool keeps off it: the kernel places all */
} op_loop_cpu;

struct uv_loop_s;

typedef struct op_config {
  struct uv_loop_s *loop; /* host's loop, or NULL: the runtime makes one */
  op_pool_config pools[OP_MAX_POOLS]; /* extra pools or overrides of io/cpu */
  int npools;
  op_shutdown_mode shutdown;
  double block_budget; /* seconds; default 0.1 */
  op_block_policy block_policy;
  const char *package_path; /* prepended to package.path in every VM */
  int spin_us;              /* spin up to this long before sleeping, when
                               the other side runs on another CPU: on the
                               loop thread while tasks are in flight, on a
                               worker after a task; adaptive. Default 50;
                               0: never (docs/benchmarks.md) */
  int stop_signal;          /* signal that makes a worker install the stop
                               hook in a running task: 0 for SIGRTMIN+4,
                               < 0 to run every task under the hook
                               (about 2x slower Lua in workers) */
  size_t memory_limit;      /* bytes per worker VM for pools that set none:
                               a task that needs more fails with "memory
                               limit of N MB reached in task at file:line".
                               Default OP_MEMORY_LIMIT_DEFAULT; 0 or
                               OP_MEMORY_UNLIMITED: none */
  size_t main_memory_limit; /* bytes for the main VM; 0 (default): none.
                               Past it, allocations fail with "not enough
                               memory" */
  double stuck_grace;       /* seconds a stopped task may run on before its
                               worker is declared stuck, abandoned and
                               replaced; 0 for the default, 1 */
  int busy_poll;            /* nonzero: while tasks are in flight the loop
                               thread spins for completions, timers and
                               I/O instead of sleeping (one CPU kept busy;
                               no wake-up latency). Default 0 */
  op_loop_cpu loop_cpu;     /* which pools keep off the loop thread's CPU;
                               default OP_LOOP_CPU_AUTO. Read as each pool
                               starts */
} op_config;

/* Fill cfg with the defaults: io (4 threads) and cpu (one per CPU the
** calling thread may run on) pools, drain at shutdown, block budget 0.1 s
** with the abort policy, spin_us 50, 1 GiB per worker VM. */
OP_EXTERN void op_config_init(op_config *cfg);

/* Add or override one pool in cfg. Returns 0, OP_EINVAL for a bad name or
** size, or OP_ENOMEM when cfg already holds OP_MAX_POOLS pools. */
OP_EXTERN int op_config_pool(op_config *cfg, const char *name, int threads,
                             int queue);

/* ---- the runtime ---- */

typedef struct op_runtime op_runtime;

/* Make a runtime: the main lua_State with the offpath module loaded, the
** pools (threads start on first use) and the loop hooks. cfg may be NULL for
** the defaults; it is copied. Returns 0 and sets *out, or a negative code. */
OP_EXTERN int op_runtime_new(const op_config *cfg, op_runtime **out);

/* Shut the runtime down: stops intake, drains or cancels queued tasks as
** configured (every waiter and callback is told exactly once), runs the loop
** until every task has ended, joins the workers and frees everything. A
** loop handed in by the host is left open but has no offpath handles left.
** Returns 0, or OP_ESCRIPT if a handler failed during the drain. */
OP_EXTERN int op_runtime_free(op_runtime *rt);

/* The main lua_State: push handler arguments here before op_call. */
OP_EXTERN lua_State *op_runtime_lua(op_runtime *rt);

/* The last error message with detail (file and line for script errors), or
** "" if none. Valid until the next call into the runtime. */
OP_EXTERN const char *op_errmsg(op_runtime *rt);

/* ---- loop integration ---- */

/* The libuv loop the runtime runs on, for hosts that use libuv. Thread:
** any. */
OP_EXTERN struct uv_loop_s *op_runtime_uv_loop(op_runtime *rt);

/* For hosts with their own poll/epoll loop: a file descriptor that becomes
** readable when the runtime has work. Watch it for reading, and call
** op_runtime_poll() when it is readable or when the timeout passes.
** Thread: any. */
OP_EXTERN int op_runtime_fd(op_runtime *rt);

/* Run whatever is ready without blocking. Returns the milliseconds until the
** runtime next needs a call (a timer), -1 if it waits only on the fd, or a
** negative code below -1 on error. */
OP_EXTERN int op_runtime_poll(op_runtime *rt);

/* Run the loop until no handler, task or I/O operation is pending.
** Returns 0, or OP_ESCRIPT if a handler failed meanwhile (see op_errmsg). */
OP_EXTERN int op_runtime_run(op_runtime *rt);

/* Whether anything is pending: suspended handlers, tasks, timers, I/O. */
OP_EXTERN int op_runtime_busy(op_runtime *rt);

/* ---- scripts and handlers ---- */

/* Load and run a script's main chunk (from a file, or from memory with a
** chunk name for messages). Returns 0 or OP_ESCRIPT (see op_errmsg). */
OP_EXTERN int op_load_script(op_runtime *rt, const char *path);
OP_EXTERN int op_load_string(op_runtime *rt, const char *chunk,
                             const char *name);

/* Start the threads of every pool now. Pools otherwise start on their
** first task, which then pays for making the threads and their Lua states
** (tens of ms for big pools) on the loop thread. Call it once the script
** has configured its pools. Returns 0 or OP_ENOMEM. */
OP_EXTERN int op_runtime_start(op_runtime *rt);

/* Call the global function `handler` with the nargs values on top of the
** main lua_State's stack (popped), in a coroutine. Returns at once if the
** handler suspends. Returns 0 (done or suspended), OP_ENOHANDLER if there is
** no such global function (the arguments are popped too), OP_ENOMEM if
** there is no memory to start it (popped too), or OP_ESCRIPT if it raised
** before suspending (see op_errmsg). Errors after a suspension
** are reported through the error callback and counted in op_stats. */
OP_EXTERN int op_call(op_runtime *rt, const char *handler, int nargs);

/* Like op_call, with the function on the stack below its nargs arguments. */
OP_EXTERN int op_call_value(op_runtime *rt, int nargs);

/* The end of a call made with op_call_track: err is NULL if nothing of it
** failed, else the first failure nobody handled (borrowed: valid until cb
** returns). Runs on the loop thread, possibly while Lua code runs (a
** task:cancel() may end the last member): it must only record the
** outcome, never call into Lua or the runtime. */
typedef void (*op_track_cb)(op_runtime *rt, const char *err, void *ud);
typedef struct op_track op_track;

/* Like op_call_value, and track the call with everything it starts:
** offpath.go coroutines, run/launch/schedule tasks, their on_done,
** onresult and onerror callbacks, and what those start in turn. cb(rt,
** err, ud) runs once when the last of them has ended (before this returns
** if nothing suspended). err counts an error that ends the handler's
** coroutine, a coroutine or task of the call that failed or timed out
** with nobody waiting for it or listening to it, and a schedule callback
** that raised. Returns like op_call_value; cb runs exactly once when it
** returns 0 or OP_ESCRIPT, never otherwise. */
OP_EXTERN int op_call_track(op_runtime *rt, int nargs, op_track_cb cb,
                            void *ud);

/* Hold the tracked call whose Lua code runs now open, for host work done on
** its behalf (a record it emitted, not yet written): its callback waits
** until op_track_release(). Returns NULL outside a tracked call. Release
** exactly once, with err NULL or a failure (copied). Thread: loop. */
OP_EXTERN op_track *op_track_hold(op_runtime *rt);
OP_EXTERN void op_track_release(op_runtime *rt, op_track *t, const char *err);

/* Called on the loop thread when a handler, task callback or block section
** fails after it could no longer return the error to a caller. msg has the
** file, line and traceback. The default prints to stderr. */
typedef void (*op_error_cb)(op_runtime *rt, const char *msg, void *ud);
OP_EXTERN void op_runtime_on_error(op_runtime *rt, op_error_cb cb, void *ud);

/* Make `fns` methods of the `engine` object handed to handlers (and reachable
** as offpath.engine in the main VM and in block sections). ud is the
** host's; Lua functions get it with op_engine_ud(L). Call before loading. */
OP_EXTERN int op_register_engine(op_runtime *rt, const luaL_Reg *fns, void *ud);
/* Push the engine object on the main lua_State.  [-0, +1, m] */
OP_EXTERN void op_push_engine(op_runtime *rt);
/* The host's pointer given to op_register_engine, from any engine method. */
OP_EXTERN void *op_engine_ud(lua_State *L);
/* The runtime that owns a main-VM lua_State (or one of its coroutines). */
OP_EXTERN op_runtime *op_runtime_from_lua(lua_State *L);

/* The lua_State the loop thread runs Lua code on now: a handler's
** coroutine, else the main state. For a watchdog thread that found the
** loop thread stuck: it may lua_sethook() it (as lua.c does from a signal
** handler) or read where it is; the answer is stale as soon as the loop
** thread moves on. Thread: any. */
OP_EXTERN lua_State *op_runtime_running(op_runtime *rt);

/* Suspended handler coroutines right now (for host backpressure). */
OP_EXTERN int op_runtime_suspended(op_runtime *rt);

/* Cancel all work in flight: every task not yet ended (launch, schedule,
** go, run; as task:cancel() does, whether or not anyone waits on it), then
** every suspended wait: each handler gets "cancelled: ..." raised at its
** suspension point, and the operation behind the wait is aborted (a child
** killed, a request removed, a file operation stopped). For a host's
** shutdown deadline. Returns how many tasks and waits were cancelled. */
OP_EXTERN int op_runtime_cancel(op_runtime *rt);

/* ---- C tasks ---- */

/* Work run on a pool thread, then its completion on the loop thread.
** status is 0 when work ran, or OP_ECANCELED when it never ran (cancelled or
** drained at shutdown with OP_SHUTDOWN_CANCEL). done runs exactly once. */
typedef void (*op_work_fn)(void *arg); /* Thread: worker */
typedef void (*op_done_fn)(void *arg, int status);

/* Queue work on the named pool. Returns 0 (done will run exactly once),
** OP_ENOPOOL, OP_EAGAIN if the queue is full, or OP_ESHUTDOWN (done never
** runs on error). Called from a done callback, the task reaches the
** workers when that batch of completions ends, or ~0.1 ms into a long one. */
OP_EXTERN int op_submit(op_runtime *rt, const char *pool, op_work_fn work,
                        op_done_fn done, void *arg);

/* ---- statistics ---- */

typedef struct op_pool_stats {
  char name[OP_POOL_NAME_MAX];
  int threads; /* threads configured */
  int running; /* threads running: fewer if some could not start (0
                  until the pool starts) */
  int queue_cap;
  uint64_t submitted, completed, failed, timedout, cancelled;
  uint64_t stuck;        /* workers given up as stuck (and replaced) */
  uint32_t queued;       /* waiting in the queue now (parked too) */
  uint32_t inflight;     /* submitted and not yet ended */
  uint32_t queue_hwm;    /* most ever waiting in the queue */
  double p50, p99, max;  /* seconds from submit to completion seen */
  uint64_t memory;       /* bytes held by its worker VMs now */
  uint64_t memory_limit; /* per worker VM; 0: none */
  int off_cpu;           /* the CPU its workers keep off (op_config.loop_cpu),
                            or -1 */
} op_pool_stats;

typedef struct op_stats {
  int npools;
  op_pool_stats pools[OP_MAX_POOLS];
  uint64_t calls;                      /* handler calls through op_call */
  uint64_t call_errors;                /* handlers that ended with an error */
  uint32_t suspended;                  /* handler coroutines suspended now */
  uint64_t stuck;                      /* workers given up as stuck, all
                                          pools */
  double call_p50, call_p99, call_max; /* main-thread seconds per resume */
  uint64_t memory;                     /* bytes held by the main VM now */
  uint64_t protos; /* entries in the prototype store (functions sent) */
} op_stats;

/* Fill *out with the runtime's statistics. Returns 0. */
OP_EXTERN int op_stats_get(op_runtime *rt, op_stats *out);
/* The same call under the name the type bears: `op_stats st;` declares,
** `op_stats(rt, &st)` fills (a function-like macro expands only before a
** parenthesis, so the two never meet). */
#define op_stats(rt, out) op_stats_get((rt), (out))

#ifdef __cplusplus
}
#endif
#endif /* OFFPATH_H */
