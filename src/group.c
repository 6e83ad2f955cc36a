/* SPDX-License-Identifier: MIT */
/*
** group.c - invocation groups: a handler call made with op_call_track()
** and everything it started, counted until the last of them ends.
** Thread: loop, always.
**
** DESIGN
**
** A group counts its live members: the handler's coroutine, the
** coroutines it starts (offpath.go, on_done callbacks) and the tasks it
** queues (run, launch, schedule, go). rt->grp is the group of the Lua
** code running now (NULL outside any): co_resume() sets it for the
** coroutine it resumes and task_notify() for the callbacks of the task it
** ends, so whatever that code starts joins the same group.
**
**     op_call_track --> members: handler coroutine (n = 1)
**        handler starts a go coroutine, a launch ------> n = 3
**        a member ends (coroutine returns or fails,
**        task ends and its callbacks have started) ----> n - 1
**        n == 0 --> cb(rt, err, ud), the group is freed
**
** A member joins before the one that started it can end (the starter is
** running), so n reaches 0 exactly once. The first failure that nobody
** handles is kept as the group's error: a coroutine that ends with an
** error that no waiter receives, a task that failed or timed out with no
** waiter and no callback, a schedule callback that raised or a failed
** schedule without onerror. Untracked calls have no group: each hook is one
** NULL test. A host holds the group of the code running now open with
** op_track_hold() for work of its own (an emitted record not yet written)
** and lets go with op_track_release(), as a member.
*/
#include <string.h>

#include "internal.h"

/* The error of a group whose message could not be copied. */
static char nomem_err[] = "failed (no memory for the message)";

struct op_track {
  uint32_t n; /* live members */
  op_track_cb cb;
  void *ud;
  char *err; /* the first failure (malloc), or NULL */
};

void op__group_join(op_group *g) {
  if (g != NULL)
    g->n++;
}

void op__group_fail(op_group *g, const char *msg) {
  if (g == NULL || g->err != NULL)
    return;
  if (msg == NULL)
    msg = "(no message)";
  /* Out of memory: the group still fails, without its text. */
  g->err = strdup(msg);
  if (g->err == NULL)
    g->err = nomem_err;
}

void op__group_leave(op_runtime *rt, op_group *g, const char *err) {
  if (g == NULL)
    return;
  if (err != NULL)
    op__group_fail(g, err);
  op_assert(g->n > 0);
  if (--g->n > 0)
    return;
  g->cb(rt, g->err, g->ud);
  if (g->err != nomem_err)
    free(g->err);
  free(g);
}

op_track *op_track_hold(op_runtime *rt) {
  op__assert_loop_thread(rt);
  op__group_join(rt->grp);
  return rt->grp;
}

void op_track_release(op_runtime *rt, op_track *t, const char *err) {
  op__assert_loop_thread(rt);
  op__group_leave(rt, t, err);
}

op_group *op__group_new(op_track_cb cb, void *ud) {
  op_group *g = malloc(sizeof *g);

  if (g == NULL)
    return NULL;
  g->n = 1; /* held by its maker until the handler has started */
  g->cb = cb;
  g->ud = ud;
  g->err = NULL;
  return g;
}

void op__group_drop(op_group *g) {
  op_assert(g->n == 1 && g->err == NULL);
  free(g);
}
