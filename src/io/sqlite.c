/* SPDX-License-Identifier: MIT */
/*
** sqlite.c - offpath.sqlite: SQLite databases used from a pool (io by
** default), with one connection per worker thread and database.
** Thread: loop, except sq_work() and the thread caches (pool threads).
**
** DESIGN
**
** A database (sq_db) is shared by its Lua object and by the pool threads
** that used it, through an atomic reference count. Each pool thread keeps
** its own connections in a thread cache (a pthread key whose destructor
** closes them when the thread exits), so no connection is ever used by two
** threads and SQLite runs without its connection mutex. Concurrent writers
** on different threads wait for each other with a busy handler (WAL mode
** lets readers go on meanwhile). An in-memory database (":memory:" or "")
** would be a different database on every thread, so it has one connection
** instead, used under the sq_db's mutex.
**
** A db:exec call is one malloc'ed job whose first member is the op_task
** the pool runs, like fs.c's operations:
**
**   call --> wait made --> submitted (pool queue) --> sq_work() on a worker
**                               ^                      --> sq_complete()
**               queue full:     | queued as room          on the loop:
**               parked by the --+ comes (pool.c)          rows or error to
**               pool                                      the waiter, freed
**
** Abort (timeout, cancel, shutdown) clears job->id, then: a queued or
** parked job is taken off by op__pool_stop_task() and comes back through
** sq_complete(); a running one
** sees t->stop in SQLite's progress and busy handlers and stops with
** SQLITE_INTERRUPT. sq_complete() runs exactly once for every submitted
** job and is the only place that frees it.
**
** The worker touches only the job and its thread cache; results are kept
** as C values and turned into Lua tables on the loop thread.
**
** Lock order: sq_db.mu (in-memory databases), then SQLite's own locks.
*/
#include <pthread.h>
#include <stdarg.h>
#include <string.h>
#include <sqlite3.h>

#include "internal.h"

#define DB_MT           "offpath.sqlite"
#define DEFAULT_BUSY_MS 5000
#define SQL_SHOWN       80 /* characters of SQL quoted in messages */

typedef struct sq_db {
  atomic_int refs; /* the Lua object + each thread cache entry */
  atomic_int closed;
  int memory; /* one shared connection, under mu */
  int wal;    /* put file databases in WAL mode */
  int busy_ms;
  uv_mutex_t mu;
  sqlite3 *shared; /* memory: the connection, opened lazily */
  char path[];
} sq_db;

/* A connection of one pool thread to one database. */
typedef struct sq_conn {
  struct sq_conn *next;
  sq_db *db; /* holds a reference */
  sqlite3 *conn;
  struct sq_job *job; /* running now, for the handlers */
  int waited_ms;      /* in the current busy episode */
} sq_conn;

typedef struct sq_val {
  int type; /* SQLITE_INTEGER, _FLOAT, _TEXT, _BLOB, _NULL */
  union {
    sqlite3_int64 i;
    double d;
    struct {
      size_t off, len; /* in strs (results) or the job (params) */
    } s;
  } u;
} sq_val;

enum { SQ_NEW, SQ_SUBMITTED, SQ_FAILING };

typedef struct sq_job sq_job;

struct sq_job {
  op_task t; /* first: the pool's view */
  op_runtime *rt;
  sq_db *db; /* holds a reference */
  op_pool *pool;
  op_wait_id id; /* 0 once the wait is gone */
  int where;
  int abort_code;
  int queue_err;
  const char *sql; /* in the same allocation */
  size_t sqllen;
  int nparams;
  sq_val *params; /* in the same allocation; strings after */
  const char *pstr;
  /* Results, written by the worker. */
  char *errmsg;
  int ncols;
  op_buf names; /* ncols nul-terminated names */
  sq_val *vals; /* rows * ncols, row-major */
  size_t nvals, capvals;
  op_buf strs;
  sqlite3_int64 changes, rowid, nrows;
  int has_cols; /* the last statement returns rows */
};

/* ---- databases ---- */

static void db_unref(sq_db *db) {
  if (atomic_fetch_sub(&db->refs, 1) != 1)
    return;
  if (db->shared != NULL)
    sqlite3_close_v2(db->shared);
  if (db->memory)
    uv_mutex_destroy(&db->mu);
  free(db);
}

/* ---- the thread caches (pool threads) ---- */

static pthread_key_t cache_key;
static pthread_once_t cache_once = PTHREAD_ONCE_INIT;

static void conn_close(sq_conn *c) {
  sqlite3_close_v2(c->conn);
  db_unref(c->db);
  free(c);
}

/* pthread key destructor: the thread exits. Thread: worker. */
static void cache_destroy(void *p) {
  sq_conn *c = p, *next;

  for (; c != NULL; c = next) {
    next = c->next;
    conn_close(c);
  }
}

static void cache_init(void) {
  if (pthread_key_create(&cache_key, cache_destroy) != 0)
    OP_PANIC("cannot make the SQLite thread cache key");
}

/* Stop handlers: the job was cancelled or timed out. Thread: worker. */
static int progress_cb(void *arg) {
  sq_conn *c = arg;
  return c->job != NULL && atomic_load(&c->job->t.stop) != 0;
}

static int busy_cb(void *arg, int count) {
  sq_conn *c = arg;
  int ms;

  if (count == 0)
    c->waited_ms = 0;
  if (c->job != NULL && atomic_load(&c->job->t.stop) != 0)
    return 0;
  if (c->waited_ms >= c->db->busy_ms)
    return 0;
  ms = count < 4 ? 1 : count < 16 ? 4 : 16;
  uv_sleep((unsigned)ms);
  c->waited_ms += ms;
  return 1;
}

/* Open a connection to db. Returns NULL with *err set (malloc'ed).
** Thread: worker. */
static sqlite3 *conn_open(sq_db *db, char **err) {
  sqlite3 *conn = NULL;
  int rc;

  rc = sqlite3_open_v2(db->path, &conn,
                       SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                           SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_URI,
                       NULL);
  if (rc != SQLITE_OK) {
    const char *m = conn != NULL ? sqlite3_errmsg(conn) : sqlite3_errstr(rc);
    size_t n = strlen(m) + strlen(db->path) + 32;

    if ((*err = malloc(n)) != NULL)
      snprintf(*err, n, "sqlite: cannot open '%s': %s", db->path, m);
    sqlite3_close_v2(conn);
    return NULL;
  }
  sqlite3_extended_result_codes(conn, 1);
  if (!db->memory && db->wal)
    sqlite3_exec(conn, "PRAGMA journal_mode=WAL", NULL, NULL, NULL);
  return conn;
}

/* This thread's connection to db, made on first use; connections of
** closed databases are closed on the way. Thread: worker. */
static sq_conn *cache_get(sq_db *db, char **err) {
  sq_conn *head, *c, **pp;

  pthread_once(&cache_once, cache_init);
  head = pthread_getspecific(cache_key);
  for (pp = &head; (c = *pp) != NULL;) {
    if (c->db == db) {
      pp = &c->next;
      continue;
    }
    if (atomic_load(&c->db->closed)) {
      *pp = c->next;
      conn_close(c);
      continue;
    }
    pp = &c->next;
  }
  for (c = head; c != NULL && c->db != db; c = c->next)
    ;
  if (c == NULL && (c = calloc(1, sizeof *c)) != NULL) {
    if ((c->conn = conn_open(db, err)) == NULL) {
      free(c);
      c = NULL;
    } else {
      atomic_fetch_add(&db->refs, 1);
      c->db = db;
      c->next = head;
      head = c;
    }
  } else if (c == NULL) {
    *err = NULL;
  }
  pthread_setspecific(cache_key, head);
  return c;
}

/* ---- the work (pool thread) ---- */

static void job_error(sq_job *j, sqlite3 *conn, const char *sql, size_t sqllen,
                      const char *fmt, ...) {
  char msg[512];
  size_t shown = sqllen;
  const char *dots = "";
  va_list ap;
  size_t n;

  if (j->errmsg != NULL)
    return;
  if (fmt != NULL) {
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
  } else {
    snprintf(msg, sizeof msg, "%s", sqlite3_errmsg(conn));
  }
  while (shown > 0 && (sql[shown - 1] == ' ' || sql[shown - 1] == '\n' ||
                       sql[shown - 1] == ';'))
    shown--;
  while (shown > 0 && (*sql == ' ' || *sql == '\n'))
    sql++, shown--;
  if (shown > SQL_SHOWN) {
    shown = SQL_SHOWN;
    dots = "...";
  }
  n = strlen(msg) + shown + 32;
  if ((j->errmsg = malloc(n)) != NULL)
    snprintf(j->errmsg, n, "sqlite: %s (in '%.*s%s')", msg, (int)shown, sql,
             dots);
}

/* Append one row of stmt to the results. Returns 0 or OP_ENOMEM. */
static int collect_row(sq_job *j, sqlite3_stmt *stmt) {
  int i;

  if (j->nvals + (size_t)j->ncols > j->capvals) {
    size_t cap = j->capvals ? j->capvals * 2 : 64;
    sq_val *v;

    while (cap < j->nvals + (size_t)j->ncols)
      cap *= 2;
    if ((v = realloc(j->vals, cap * sizeof *v)) == NULL)
      return OP_ENOMEM;
    j->vals = v;
    j->capvals = cap;
  }
  for (i = 0; i < j->ncols; i++) {
    sq_val *v = &j->vals[j->nvals++];
    const void *p;
    size_t len;

    v->type = sqlite3_column_type(stmt, i);
    switch (v->type) {
    case SQLITE_INTEGER:
      v->u.i = sqlite3_column_int64(stmt, i);
      break;
    case SQLITE_FLOAT:
      v->u.d = sqlite3_column_double(stmt, i);
      break;
    case SQLITE_TEXT:
    case SQLITE_BLOB:
      p = v->type == SQLITE_TEXT ? (const void *)sqlite3_column_text(stmt, i)
                                 : sqlite3_column_blob(stmt, i);
      len = (size_t)sqlite3_column_bytes(stmt, i);
      v->u.s.off = j->strs.len;
      v->u.s.len = len;
      if (len > 0 && op__buf_append(&j->strs, p, len) != 0)
        return OP_ENOMEM;
      break;
    default:
      v->type = SQLITE_NULL;
      break;
    }
  }
  j->nrows++;
  return 0;
}

/* Start the results of a new statement: the last one's rows are kept. */
static int begin_results(sq_job *j, sqlite3_stmt *stmt) {
  int i;
  const char *name;

  j->nvals = 0;
  j->nrows = 0;
  op__buf_free(&j->strs);
  op__buf_free(&j->names);
  j->ncols = sqlite3_column_count(stmt);
  j->has_cols = j->ncols > 0;
  for (i = 0; i < j->ncols; i++) {
    name = sqlite3_column_name(stmt, i);
    if (name == NULL)
      name = "?";
    if (op__buf_append(&j->names, name, strlen(name) + 1) != 0)
      return OP_ENOMEM;
  }
  return 0;
}

static int bind_params(sq_job *j, sqlite3_stmt *stmt) {
  int i, rc = SQLITE_OK;

  for (i = 0; i < j->nparams && rc == SQLITE_OK; i++) {
    sq_val *v = &j->params[i];

    switch (v->type) {
    case SQLITE_INTEGER:
      rc = sqlite3_bind_int64(stmt, i + 1, v->u.i);
      break;
    case SQLITE_FLOAT:
      rc = sqlite3_bind_double(stmt, i + 1, v->u.d);
      break;
    case SQLITE_TEXT:
      rc = sqlite3_bind_text64(stmt, i + 1, j->pstr + v->u.s.off, v->u.s.len,
                               SQLITE_STATIC, SQLITE_UTF8);
      break;
    default:
      rc = sqlite3_bind_null(stmt, i + 1);
      break;
    }
  }
  return rc;
}

/* Run every statement of the job's SQL on conn. Thread: worker. */
static void run_sql(sq_job *j, sqlite3 *conn) {
  const char *tail = j->sql, *end = j->sql + j->sqllen, *next;
  sqlite3_stmt *stmt;
  int rc, nstmt = 0, expected;

  while (tail < end && j->errmsg == NULL) {
    rc = sqlite3_prepare_v2(conn, tail, (int)(end - tail), &stmt, &next);
    if (rc != SQLITE_OK) {
      job_error(j, conn, tail, (size_t)(end - tail), NULL);
      break;
    }
    if (stmt == NULL) { /* white space or a comment */
      tail = next;
      continue;
    }
    nstmt++;
    expected = sqlite3_bind_parameter_count(stmt);
    if (j->nparams > 0 && nstmt > 1) {
      job_error(j, conn, tail, (size_t)(next - tail),
                "parameters given for several statements");
    } else if (expected != (nstmt == 1 ? j->nparams : 0)) {
      job_error(j, conn, tail, (size_t)(next - tail),
                "%d parameters expected, %d given", expected,
                nstmt == 1 ? j->nparams : 0);
    } else if (bind_params(j, stmt) != SQLITE_OK) {
      job_error(j, conn, tail, (size_t)(next - tail), NULL);
    } else if (begin_results(j, stmt) != 0) {
      job_error(j, conn, tail, (size_t)(next - tail), "not enough memory");
    } else {
      while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        if (collect_row(j, stmt) != 0) {
          job_error(j, conn, tail, (size_t)(next - tail), "not enough memory");
          break;
        }
      }
      if (rc != SQLITE_DONE && rc != SQLITE_ROW)
        job_error(j, conn, tail, (size_t)(next - tail), NULL);
      j->changes = sqlite3_changes64(conn);
    }
    sqlite3_finalize(stmt);
    tail = next;
  }
  j->rowid = sqlite3_last_insert_rowid(conn);
  if (!sqlite3_get_autocommit(conn)) {
    /* A transaction must not outlive its call: the next call may run on
    ** another thread's connection. */
    sqlite3_exec(conn, "ROLLBACK", NULL, NULL, NULL);
    job_error(j, conn, j->sql, j->sqllen,
              "transaction left open at the end of db:exec (rolled back)");
  }
}

/* The C task. Thread: worker. */
static void sq_run(sq_job *j) {
  sq_db *db = j->db;
  sq_conn tmp, *c;
  char *err = NULL;

  if (db->memory) {
    uv_mutex_lock(&db->mu);
    if (db->shared == NULL)
      db->shared = conn_open(db, &err);
    if (db->shared == NULL) {
      uv_mutex_unlock(&db->mu);
      j->errmsg = err != NULL ? err : NULL;
      if (j->errmsg == NULL)
        job_error(j, NULL, "", 0, "not enough memory");
      return;
    }
    memset(&tmp, 0, sizeof tmp);
    tmp.db = db;
    tmp.conn = db->shared;
    c = &tmp;
  } else if ((c = cache_get(db, &err)) == NULL) {
    j->errmsg = err;
    if (j->errmsg == NULL)
      job_error(j, NULL, "", 0, "not enough memory");
    return;
  }
  c->job = j;
  sqlite3_busy_handler(c->conn, busy_cb, c);
  sqlite3_progress_handler(c->conn, 1000, progress_cb, c);
  run_sql(j, c->conn);
  sqlite3_progress_handler(c->conn, 0, NULL, NULL);
  sqlite3_busy_handler(c->conn, NULL, NULL);
  c->job = NULL;
  if (db->memory)
    uv_mutex_unlock(&db->mu);
}

/* Run the job (Thread: worker). */
static void sq_work(void *arg) {
  sq_job *j = arg;

  sq_run(j);
  j->t.failed = j->errmsg != NULL;
}

/* ---- results on the loop thread ---- */

/* Protected: push rows, count and last rowid of the job (light userdata
** 1).  [-0, +3, m] */
static int push_result(lua_State *L) {
  sq_job *j = lua_touserdata(L, 1);
  const char *name = j->names.p;
  sqlite3_int64 r;
  size_t k = 0;
  int i, base;

  luaL_checkstack(L, j->ncols + 8, "too many columns");
  lua_createtable(L, (int)j->nrows, 0);
  base = lua_gettop(L);
  for (i = 0; i < j->ncols; i++) {
    lua_pushstring(L, name);
    name += strlen(name) + 1;
  }
  for (r = 0; r < j->nrows; r++) {
    lua_createtable(L, 0, j->ncols);
    for (i = 0; i < j->ncols; i++) {
      sq_val *v = &j->vals[k++];

      if (v->type == SQLITE_NULL)
        continue;
      lua_pushvalue(L, base + 1 + i);
      switch (v->type) {
      case SQLITE_INTEGER:
        lua_pushinteger(L, (lua_Integer)v->u.i);
        break;
      case SQLITE_FLOAT:
        lua_pushnumber(L, (lua_Number)v->u.d);
        break;
      default:
        lua_pushlstring(L, j->strs.p + v->u.s.off, v->u.s.len);
        break;
      }
      lua_rawset(L, -3);
    }
    lua_rawseti(L, base, (lua_Integer)r + 1);
  }
  lua_settop(L, base);
  lua_pushinteger(L, (lua_Integer)(j->has_cols ? j->nrows : j->changes));
  lua_pushinteger(L, (lua_Integer)j->rowid);
  return 3;
}

static void job_free(sq_job *j) {
  free(j->errmsg);
  free(j->vals);
  op__buf_free(&j->names);
  op__buf_free(&j->strs);
  op__task_release(&j->t);
  db_unref(j->db);
  free(j);
}

/* The pool hands the job back: exactly once per submitted job. */
static void sq_complete(op_task *t) {
  sq_job *j = (sq_job *)t;
  op_runtime *rt = j->rt;
  op_wait_id id = j->id;
  lua_State *co = id != 0 ? op__wait_thread(rt, id) : NULL;
  lua_State *L = rt->L;
  char where[256], *msg = NULL;
  int nres = -1, top, status = t->status;

  j->id = 0;
  if (co != NULL) {
    if (t->status != 0) {
      msg = NULL; /* never ran: cancelled at shutdown */
    } else if (j->errmsg != NULL) {
      size_t n = strlen(j->errmsg) + 300;

      if ((msg = malloc(n)) != NULL)
        snprintf(msg, n, "%s (db:exec at %s)", j->errmsg,
                 op__where(co, where, sizeof where));
    } else if (lua_checkstack(co, 4)) {
      top = lua_gettop(L);
      lua_pushcfunction(L, push_result);
      lua_pushlightuserdata(L, j);
      if (op__pcall(L, 1, 3, NULL) == LUA_OK) {
        lua_xmove(L, co, 3);
        nres = 3;
      } else {
        lua_settop(L, top);
      }
    }
  }
  job_free(j);
  if (co == NULL)
    return;
  if (nres >= 0)
    op__wait_resume(rt, id, nres);
  else if (msg != NULL)
    op__wait_fail(rt, id, msg);
  else if (status != 0)
    op__wait_fail(rt, id, "cancelled: runtime shutting down (db:exec)");
  else
    op__wait_fail(rt, id, "sqlite: not enough memory for the result");
  free(msg);
}

/* ---- queueing ---- */

static void queue_failed(op_runtime *rt, void *arg) {
  sq_job *j = arg;
  op_wait_id id = j->id;
  char msg[256];

  j->id = 0;
  snprintf(msg, sizeof msg, "sqlite: cannot queue on pool '%s': %s",
           op__pool_name(j->pool), op_strerror(j->queue_err));
  job_free(j);
  if (id != 0)
    op__wait_fail(rt, id, msg);
}

static void submit_failed(sq_job *j, int rc) {
  j->where = SQ_FAILING;
  j->queue_err = rc;
  op__defer(j->rt, queue_failed, j);
}

/* Hand j to its pool, which parks it while the queue is full. */
static void submit(sq_job *j) {
  int rc = op__pool_submit(j->pool, &j->t, 1);

  if (rc >= 0)
    j->where = SQ_SUBMITTED;
  else
    submit_failed(j, rc);
}

/* The wait ended early (timeout, task cancelled, shutdown). */
static void sq_abort(void *what, int code) {
  sq_job *j = what;

  j->id = 0;
  j->abort_code = code;
  switch (j->where) {
  case SQ_SUBMITTED:
    /* Queued or parked: taken off and completed; running:
    ** interrupted. */
    op__pool_stop_task(j->pool, &j->t, code);
    break;
  default:
    break; /* SQ_FAILING: queue_failed() frees it */
  }
}

/* ---- Lua ---- */

typedef struct sq_box {
  sq_db *db;
  double timeout; /* default per call, 0: none */
  op_pool *pool;
} sq_box;

/* offpath.sqlite.open(path, [{timeout=, busy_timeout=, wal=, pool=}]) -> db
** Does not suspend: the file is opened by the first db:exec. */
static int sqlite_open(lua_State *L) {
  op_runtime *rt = op__runtime(L);
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  const char *pname = "io";
  double timeout = 0, busy = DEFAULT_BUSY_MS / 1000.0;
  int wal = 1;
  sq_box *box;
  sq_db *db;

  if (memchr(path, '\0', len) != NULL)
    return luaL_argerror(L, 1, "path contains a zero byte");
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    timeout = op__opt_number(L, 2, "timeout", 0, NULL);
    busy = op__opt_number(L, 2, "busy_timeout", busy, NULL);
    if (lua_getfield(L, 2, "wal") != LUA_TNIL)
      wal = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (lua_getfield(L, 2, "pool") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TSTRING)
        return luaL_error(L, "bad option 'pool' (string expected)");
      pname = lua_tostring(L, -1);
    }
  }
  box = lua_newuserdatauv(L, sizeof *box, 0);
  box->db = NULL;
  luaL_setmetatable(L, DB_MT);
  if ((box->pool = op__pool_find(rt, pname)) == NULL)
    return luaL_error(L, "sqlite: no pool named '%s'", pname);
  box->timeout = timeout;
  if ((db = calloc(1, sizeof *db + len + 1)) == NULL)
    return luaL_error(L, "not enough memory");
  atomic_init(&db->refs, 1);
  atomic_init(&db->closed, 0);
  memcpy(db->path, path, len + 1);
  db->memory = len == 0 || strcmp(path, ":memory:") == 0;
  db->wal = wal;
  db->busy_ms = busy * 1000.0 > 1e9 ? 1000000000 : (int)(busy * 1000.0);
  if (db->memory && uv_mutex_init(&db->mu) != 0)
    OP_PANIC("cannot make a SQLite database lock");
  box->db = db;
  return 1;
}

/* The open db object at index 1, or raise.  [-0, +0, e] */
static sq_box *check_box(lua_State *L) {
  sq_box *box = luaL_checkudata(L, 1, DB_MT);

  if (box->db == NULL)
    luaL_error(L, "sqlite: database closed");
  return box;
}

static void discard(lua_State *L, void *p) {
  (void)L;
  job_free(p);
}

/* db:exec(sql, ...) or db:exec({sql, timeout=}, ...)
** -> rows, count, last_insert_rowid */
static int db_exec(lua_State *L) {
  sq_box *box = check_box(L);
  op_runtime *rt = op__runtime(L);
  double timeout = box->timeout;
  int nparams = lua_gettop(L) - 2, i;
  const char *sql, *s;
  size_t sqllen, total = 0, n;
  op_guard *g;
  sq_job *j;
  char *p;

  sql = op__sql_arg(L, 2, &timeout, &sqllen);
  if (nparams < 0)
    nparams = 0;
  if (sqllen > 0x7fffffff)
    return luaL_argerror(L, 2, "SQL too long");
  for (i = 0; i < nparams; i++) {
    switch (lua_type(L, 3 + i)) {
    case LUA_TNIL:
    case LUA_TBOOLEAN:
    case LUA_TNUMBER:
      break;
    case LUA_TSTRING:
      lua_tolstring(L, 3 + i, &n);
      total += n + 1;
      break;
    default:
      return luaL_typeerror(L, 3 + i, "nil, boolean, number or string");
    }
  }
  op__check_suspend(L, "db:exec");
  g = op__guard_new(L, discard);
  j = calloc(1,
             sizeof *j + (size_t)nparams * sizeof(sq_val) + sqllen + 1 + total);
  if (j == NULL)
    return luaL_error(L, "not enough memory");
  op__task_init(&j->t, OP_TASK_C);
  j->t.work = sq_work;
  j->t.arg = j;
  j->t.complete = sq_complete;
  op__buf_init(&j->names);
  op__buf_init(&j->strs);
  j->rt = rt;
  j->db = box->db;
  atomic_fetch_add(&j->db->refs, 1);
  j->pool = box->pool;
  g->p = j;
  j->nparams = nparams;
  j->params = (sq_val *)(j + 1);
  p = (char *)(j->params + nparams);
  memcpy(p, sql, sqllen + 1);
  j->sql = p;
  j->sqllen = sqllen;
  p += sqllen + 1;
  j->pstr = p;
  for (i = 0; i < nparams; i++) {
    sq_val *v = &j->params[i];
    int idx = 3 + i;

    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN:
      v->type = SQLITE_INTEGER;
      v->u.i = lua_toboolean(L, idx);
      break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        v->type = SQLITE_INTEGER;
        v->u.i = (sqlite3_int64)lua_tointeger(L, idx);
      } else {
        v->type = SQLITE_FLOAT;
        v->u.d = (double)lua_tonumber(L, idx);
      }
      break;
    case LUA_TSTRING:
      s = lua_tolstring(L, idx, &n);
      v->type = SQLITE_TEXT;
      v->u.s.off = (size_t)(p - j->pstr);
      v->u.s.len = n;
      memcpy(p, s, n);
      p[n] = '\0';
      p += n + 1;
      break;
    default:
      v->type = SQLITE_NULL;
      break;
    }
  }
  j->id = op__wait_new(L, "db:exec", timeout, sq_abort, j);
  g->p = NULL; /* the wait owns j now: nothing below raises */
  submit(j);
  return op__wait_yield(L);
}

/* db:close(): later calls raise; each thread closes its connection on its
** next use of any database, or when it exits. */
static int db_close(lua_State *L) {
  sq_box *box = luaL_checkudata(L, 1, DB_MT);
  sq_db *db = box->db;

  if (db != NULL) {
    box->db = NULL;
    atomic_store(&db->closed, 1);
    db_unref(db);
  }
  return 0;
}

static int db_tostring(lua_State *L) {
  sq_box *box = luaL_checkudata(L, 1, DB_MT);

  if (box->db == NULL)
    lua_pushliteral(L, "sqlite.db (closed)");
  else
    lua_pushfstring(L, "sqlite.db (%s): %p", box->db->path, (void *)box->db);
  return 1;
}

/* ---- opening and shutdown ---- */

void op__open_io_sqlite(lua_State *L) {
  static const luaL_Reg methods[] = { { "exec", db_exec },
                                      { "close", db_close },
                                      { NULL, NULL } };
  static const luaL_Reg meta[] = { { "__gc", db_close },
                                   { "__close", db_close },
                                   { "__tostring", db_tostring },
                                   { NULL, NULL } };
  static const luaL_Reg funcs[] = { { "open", sqlite_open }, { NULL, NULL } };

  op__io_register(L, DB_MT, meta, methods, "sqlite", funcs);
}
