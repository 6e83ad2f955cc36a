/* SPDX-License-Identifier: MIT */
/*
** test-oom.c - failure injection, as SQLite does it: the n-th Lua
** allocation fails (op__alloc_fail, alloc.c), for every n until a run
** completes without reaching it: in the worker VMs only, then in every VM,
** the main VM included. Each run must end cleanly, never in a Lua panic:
** the failure
** surfaces as "not enough memory" (or the run succeeds when Lua's
** emergency collection or an error handler absorbed it), nothing crashes
** or leaks (LeakSanitizer), and every pool task ends exactly once.
**
** C allocations fail the same way: the linker sends the malloc, calloc and
** realloc calls of liboffpath's own objects (and this file's) through the
** wrappers below (cmake/tests.cmake links this test with --wrap), which
** fail the n-th call once armed; swept over submit and completion.
*/
#include <string.h>

#include "internal.h"
#include "test.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t n);

/* Calls left before one fails (0: off). Any thread: workers allocate
** too. */
static atomic_long fail_in;

static int fail_now(void) {
  long n = atomic_load(&fail_in);

  while (n > 0) {
    if (atomic_compare_exchange_weak(&fail_in, &n, n - 1))
      return n == 1;
  }
  return 0;
}

void *__wrap_malloc(size_t n) {
  return fail_now() ? NULL : __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t size) {
  return fail_now() ? NULL : __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t n) {
  return n > 0 && fail_now() ? NULL : __real_realloc(p, n);
}

static char last_error[2048];
static int nerrors;

/* An error that an injected failure may cause: it says so in the one
** wording, possibly inside a longer message (a task's error as seen by the
** handler, a copy refusal). */
static void check_oom_message(const char *msg) {
  if (strstr(msg, "not enough memory") == NULL)
    TEST_FAIL_("unexpected error under injected failures: %s", msg);
}

/* An error reported under injected failures: check_oom_message, or the
** report of a task made to fail on purpose that a handler cut short by
** the failure left unobserved (due; it also becomes op_errmsg). */
static void check_report(const char *msg) {
  if (strncmp(msg, "unobserved task failure", 23) != 0)
    check_oom_message(msg);
}

static void on_error(op_runtime *rt, const char *msg, void *ud) {
  (void)rt;
  (void)ud;
  snprintf(last_error, sizeof last_error, "%s", msg);
  nerrors++;
  check_report(msg);
}

/* Every task the pools took ended once: nothing in flight, and the
** submitted ones are counted in exactly one outcome. */
static void check_tasks(op_runtime *rt) {
  op_stats st;
  int i;

  ASSERT_OK(op_stats_get(rt, &st));
  for (i = 0; i < st.npools; i++) {
    op_pool_stats *p = &st.pools[i];
    ASSERT_EQ(p->inflight, 0);
    ASSERT_EQ(p->submitted,
              p->completed + p->failed + p->timedout + p->cancelled);
  }
}

/* Sweep n = 1, 2, ... over run(n) until three runs in a row no longer
** reach the n-th allocation (run returns whether it did): how many a run
** makes varies a little with timing (a worker's collection, a cancel that
** finds its task queued or running). Returns the last n reached. */
static long sweep(const char *what, int (*run)(long n)) {
  long n, last = 0;

  for (n = 1; n <= last + 3; n++)
    if (run(n))
      last = n;
  printf("%s: %ld allocations swept\n", what, last);
  return last;
}

/* ---- runtime start and free ---- */

static int run_start(long n) {
  op_runtime *rt = NULL;
  op_config cfg;
  int rc, reached;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "io", 1, 0));
  ASSERT_OK(op_config_pool(&cfg, "cpu", 1, 0));
  op__alloc_fail(n, 2, 0);
  rc = op_runtime_new(&cfg, &rt);
  if (rc == 0) {
    ASSERT_OK(op_runtime_free(rt));
  } else {
    ASSERT_EQ(rc, OP_ENOMEM);
  }
  reached = !op__alloc_pending();
  op__alloc_fail(0, 0, 0);
  return reached;
}

/* ---- copies both ways, tasks, go/all/wait/cancel, a timer ---- */

static const char script[] =
    "local offpath = require 'offpath'\n"
    "offpath.configure { pools = { w = { threads = 1 } } }\n"
    "local shared = { 1, 2 }\n"
    "local value = { n = 1, f = 2.5, i = 1 << 40, s = 'str', b = true,\n"
    "  long = string.rep('x', 100), a = shared, c = shared, nested = {\n"
    "  deep = { 'x' } }, fmt = string.format, mt = setmetatable({}, {\n"
    "  __index = shared }) }\n"
    "value.self = value\n"
    "local k = 3\n"
    "local function add(x) return x + k end\n"
    "function copies()\n"
    "  local r = offpath.run('w', function(v, f)\n"
    "    assert(v.self == v and v.a == v.c)\n"
    "    return v, f(1), function() return v.n end, {1, 2, 3}\n"
    "  end, value, add)\n"
    "  assert(r.n == 1)\n"
    "end\n"
    "function tasks()\n"
    "  local t1 = offpath.launch('w', function(x) return x * 2 end, 21)\n"
    "  local t2 = offpath.launch('w', function() offpath.sleep(0.05) end)\n"
    "  local g = offpath.go(function(a) offpath.sleep(0.001) return a end, 5)\n"
    "  local r = { offpath.all({ t1, g }) }\n"
    "  t2:cancel()\n"
    "  pcall(t2.wait, t2)\n"
    "  assert(g:wait() == 5)\n"
    "  offpath.sleep(0.001)\n"
    "  return r\n"
    "end\n"
    /* Each callback counts its calls: none may run twice. */
    "ncalls = {}\n"
    "local function once(name)\n"
    "  return function(...)\n"
    "    ncalls[name] = (ncalls[name] or 0) + 1\n"
    "  end\n"
    "end\n"
    "function callbacks()\n"
    "  local ok = offpath.launch('w', function() return 'r', { 1 } end)\n"
    "  ok:on_done(once('ok1'))\n"
    "  ok:on_done(once('ok2'))\n"
    "  local bad = offpath.launch('w', function() error({ code = 7 }) end)\n"
    "  bad:on_done(once('bad'))\n"
    "  offpath.schedule { pool = 'w', data = 1,\n"
    "    onexecute = function(d) return d + 1 end,\n"
    "    onresult = once('sched_ok'), onerror = once('sched_ok_err') }\n"
    "  offpath.schedule { pool = 'w', data = 1,\n"
    "    onexecute = function() error('no') end,\n"
    "    onresult = once('sched_bad_res'), onerror = once('sched_bad') }\n"
    "  local slow = offpath.launch({ pool = 'w', timeout = 0.001 },\n"
    "    function() offpath.sleep(0.05) end)\n"
    "  slow:on_done(once('slow'))\n"
    "  local g = offpath.go(function() error('go failed') end)\n"
    "  g:on_done(once('go'))\n"
    "  pcall(bad.wait, bad)\n"
    "  pcall(g.wait, g)\n"
    "  pcall(slow.wait, slow)\n"
    "  assert(ok:wait() == 'r')\n"
    "  local r = offpath.exec({ 'echo', 'hi' })\n"
    "  assert(r.stdout == 'hi\\n')\n"
    "  assert(#offpath.readfile('tests/c/test-oom.c') > 0)\n"
    "end\n"
    "function check_calls()\n"
    "  for k, n in pairs(ncalls) do\n"
    "    if n ~= 1 then error(k .. ' ran ' .. n .. ' times') end\n"
    "  end\n"
    "  ncalls = {}\n"
    "end\n";

static op_runtime *rt_tasks;

/* Run handler with the n-th allocation failing in the worker VMs only
** (workers set) or in any VM, the main VM included. */
static int run_handler(const char *handler, long n, int workers) {
  int rc, reached;

  op__alloc_fail(n, 2, workers);
  nerrors = 0;
  rc = op_call(rt_tasks, handler, 0);
  if (rc == OP_ESCRIPT || rc == OP_ENOMEM)
    check_report(op_errmsg(rt_tasks));
  else
    ASSERT_OK(rc);
  rc = op_runtime_run(rt_tasks);
  reached = !op__alloc_pending();
  op__alloc_fail(0, 0, 0);
  ASSERT(rc == 0 || rc == OP_ESCRIPT);
  check_tasks(rt_tasks);
  /* no callback ran twice */
  if (op_call(rt_tasks, "check_calls", 0) != 0)
    TEST_FAIL_("%s, n = %ld: %s", handler, n, op_errmsg(rt_tasks));
  return reached;
}

/* The handler sweep_handlers sweeps now, and where it fails. */
static const char *swept;
static int swept_workers;

static int run_swept(long n) {
  return run_handler(swept, n, swept_workers);
}

/* Sweep each handler with the failures in the worker VMs only, then in
** every VM. */
static void sweep_handlers(void) {
  static const char *const handlers[] = { "copies", "tasks", "callbacks" };
  char what[64];
  size_t i;

  for (swept_workers = 1; swept_workers >= 0; swept_workers--) {
    for (i = 0; i < sizeof handlers / sizeof handlers[0]; i++) {
      swept = handlers[i];
      snprintf(what, sizeof what, "%s%s", swept,
               swept_workers ? "" : ", main VM too");
      sweep(what, run_swept);
    }
  }
}

/* A worker VM that cannot be made: tasks fail with "not enough memory"
** until the worker makes it for a later task. */
static int run_worker_start(long n) {
  op_runtime *rt;
  op_config cfg;
  int rc, reached;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "io", 1, 0));
  ASSERT_OK(op_config_pool(&cfg, "cpu", 1, 0));
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  op_runtime_on_error(rt, on_error, NULL);
  ASSERT_OK(op_load_string(rt,
                           "local offpath = require 'offpath'\n"
                           "function h()\n"
                           "  for i = 1, 2 do\n"
                           "    local ok, e = pcall(offpath.run, 'io',\n"
                           "      function(x) return x + 1 end, i)\n"
                           "    assert(ok and e == i + 1 or\n"
                           "      e:find('not enough memory'), e)\n"
                           "  end\n"
                           "end\n"
                           "function after()\n"
                           "  assert(offpath.run('io', function() return 7 "
                           "end) == 7)\n"
                           "end\n",
                           "=worker.lua"));
  op__alloc_fail(n, 2, 1);
  nerrors = 0;
  rc = op_call(rt, "h", 0);
  if (rc == 0)
    rc = op_runtime_run(rt);
  reached = !op__alloc_pending();
  op__alloc_fail(0, 0, 0);
  if (rc == 0 && (rc = op_call(rt, "after", 0)) == 0)
    rc = op_runtime_run(rt); /* the worker serves again */
  if (rc != 0)
    TEST_FAIL_("worker start, n = %ld: %s", n, op_errmsg(rt));
  if (nerrors > 0)
    TEST_FAIL_("worker start, n = %ld: %s", n, last_error);
  check_tasks(rt);
  ASSERT_OK(op_runtime_free(rt));
  return reached;
}

static void test_handlers(void) {
  op_config cfg;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "io", 1, 0));
  ASSERT_OK(op_config_pool(&cfg, "cpu", 1, 0));
  ASSERT_OK(op_runtime_new(&cfg, &rt_tasks));
  op_runtime_on_error(rt_tasks, on_error, NULL);
  ASSERT_OK(op_load_string(rt_tasks, script, "=oom.lua"));
  ASSERT_OK(op_runtime_start(rt_tasks));
  /* one clean run of each first: caches and the worker VM warm */
  ASSERT_OK(op_call(rt_tasks, "copies", 0));
  ASSERT_OK(op_call(rt_tasks, "tasks", 0));
  ASSERT_OK(op_call(rt_tasks, "callbacks", 0));
  ASSERT_OK(op_runtime_run(rt_tasks));
  ASSERT_OK(op_call(rt_tasks, "check_calls", 0));
  sweep_handlers();
  ASSERT_EQ(op_runtime_free(rt_tasks) & ~OP_ESCRIPT, 0);
}

/* ---- C allocations: submit and completion ---- */

static const char cscript[] =
    "local offpath = require 'offpath'\n"
    "offpath.configure { pools = { w = { threads = 1 } } }\n"
    "local big = string.rep('x', 4096)\n"
    "function h()\n"
    "  local r = offpath.run('w', function(s, t) return #s, t end, big,\n"
    "    { 1, 2, { 3 } })\n"
    "  local t = offpath.launch('w', function() return big end)\n"
    "  t:on_done(function() end)\n"
    "  local g = offpath.go(function(x) return x end, 5)\n"
    "  local res = { offpath.all({ t, g }) }\n"
    "  local bad = offpath.launch('w', function() error('no') end)\n"
    "  pcall(bad.wait, bad)\n"
    "  local slow = offpath.launch({ pool = 'w', timeout = 5 },\n"
    "    function() return 1 end)\n"
    "  pcall(slow.wait, slow, 5)\n"
    "  offpath.sleep(0.001)\n"
    "  return r, res\n"
    "end\n";

static op_runtime *rt_c;

static int run_cmalloc(long n) {
  int rc, reached;

  atomic_store(&fail_in, n);
  rc = op_call(rt_c, "h", 0);
  if (rc == OP_ESCRIPT || rc == OP_ENOMEM)
    check_report(op_errmsg(rt_c));
  else
    ASSERT_OK(rc);
  rc = op_runtime_run(rt_c);
  reached = atomic_load(&fail_in) == 0;
  atomic_store(&fail_in, 0);
  ASSERT(rc == 0 || rc == OP_ESCRIPT);
  check_tasks(rt_c);
  return reached;
}

static void test_cmalloc(void) {
  op_config cfg;

  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "io", 1, 0));
  ASSERT_OK(op_runtime_new(&cfg, &rt_c));
  op_runtime_on_error(rt_c, on_error, NULL);
  ASSERT_OK(op_load_string(rt_c, cscript, "=cmalloc.lua"));
  ASSERT_OK(op_runtime_start(rt_c));
  ASSERT_OK(op_call(rt_c, "h", 0)); /* warm: caches and the worker's VM */
  ASSERT_OK(op_runtime_run(rt_c));
  sweep("submit and completion, C allocations", run_cmalloc);
  ASSERT_EQ(op_runtime_free(rt_c) & ~OP_ESCRIPT, 0);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  sweep("runtime start", run_start);
  sweep("worker start", run_worker_start);
  test_handlers();
  test_cmalloc();
  printf("ok\n");
  return 0;
}
