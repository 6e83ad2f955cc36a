/* SPDX-License-Identifier: MIT */
/*
** test-cmalloc.c - failure injection for C allocations: the linker sends
** the malloc, calloc and realloc calls of liboffpath's own objects (and
** this file's) through the wrappers below (cmake/tests.cmake links this
** test with --wrap), which fail the n-th call from when they are armed.
** Swept over every n for submit and completion: each run ends with the
** error in the one wording or succeeds, never crashes, leaks nothing
** (LeakSanitizer) and ends every task exactly once.
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

static int nerrors;

static void check_message(const char *msg) {
  if (strstr(msg, "not enough memory") == NULL)
    TEST_FAIL_("unexpected error under failing C allocations: %s", msg);
}

static void on_error(op_runtime *rt, const char *msg, void *ud) {
  (void)rt;
  (void)ud;
  nerrors++;
  if (strncmp(msg, "unobserved task failure", 23) != 0)
    check_message(msg);
}

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

static const char script[] =
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

static op_runtime *rt;

static int run(long n) {
  int rc, reached;

  nerrors = 0;
  atomic_store(&fail_in, n);
  rc = op_call(rt, "h", 0);
  if (rc == OP_ESCRIPT || rc == OP_ENOMEM)
    check_message(op_errmsg(rt));
  else
    ASSERT_OK(rc);
  rc = op_runtime_run(rt);
  reached = atomic_load(&fail_in) == 0;
  atomic_store(&fail_in, 0);
  ASSERT(rc == 0 || rc == OP_ESCRIPT);
  check_tasks(rt);
  return reached;
}

int main(void) {
  op_config cfg;
  long n, last = 0;

  setvbuf(stdout, NULL, _IOLBF, 0);
  op_config_init(&cfg);
  ASSERT_OK(op_config_pool(&cfg, "io", 1, 0));
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  op_runtime_on_error(rt, on_error, NULL);
  ASSERT_OK(op_load_string(rt, script, "=cmalloc.lua"));
  ASSERT_OK(op_runtime_start(rt));
  ASSERT_OK(op_call(rt, "h", 0)); /* warm: caches and the worker's VM */
  ASSERT_OK(op_runtime_run(rt));
  for (n = 1; n <= last + 3; n++)
    if (run(n))
      last = n;
  printf("submit and completion: %ld C allocations swept\n", last);
  ASSERT_EQ(op_runtime_free(rt) & ~OP_ESCRIPT, 0);
  printf("ok\n");
  return 0;
}
