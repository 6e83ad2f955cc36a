/* SPDX-License-Identifier: MIT */
/*
** test-http-oom.c - an HTTP response too big for the main VM's memory
** limit: building the response table fails in protected mode, so the
** request fails with "http: not enough memory for the response" and the
** runtime goes on (never a Lua panic inside curl's callback), and a
** response that fits still arrives.
*/
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "offpath.h"
#include "test.h"

#define BIG (8u << 20) /* the body: larger than the VM's limit */

/* A one-shot HTTP server on the runtime's loop: answers every request
** on a connection with the body size asked for in the path ("/n"). */
typedef struct conn {
  uv_tcp_t tcp;
  uv_write_t wr;
  char in[1024];
  size_t len;
  char *out;
} conn;

static void conn_close_cb(uv_handle_t *h) {
  conn *c = (conn *)h;
  free(c->out);
  free(c);
}

static void write_cb(uv_write_t *wr, int status) {
  (void)status;
  uv_close((uv_handle_t *)wr->data, conn_close_cb);
}

static void alloc_cb(uv_handle_t *h, size_t want, uv_buf_t *buf) {
  conn *c = (conn *)h;
  (void)want;
  *buf = uv_buf_init(c->in + c->len, (unsigned)(sizeof c->in - 1 - c->len));
}

static void read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  conn *c = (conn *)s;
  size_t body, head;
  uv_buf_t b;

  (void)buf;
  if (n < 0) {
    uv_close((uv_handle_t *)s, conn_close_cb);
    return;
  }
  c->len += (size_t)n;
  c->in[c->len] = '\0';
  if (strstr(c->in, "\r\n\r\n") == NULL)
    return;
  uv_read_stop(s);
  body = strtoul(c->in + 5, NULL, 10); /* "GET /n HTTP/1.1" */
  c->out = malloc(body + 128);
  ASSERT(c->out != NULL);
  head = (size_t)snprintf(c->out, 128,
                          "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n"
                          "Connection: close\r\n\r\n",
                          body);
  memset(c->out + head, 'x', body);
  b = uv_buf_init(c->out, (unsigned)(head + body));
  c->wr.data = c;
  ASSERT_OK(uv_write(&c->wr, s, &b, 1, write_cb));
}

static void accept_cb(uv_stream_t *server, int status) {
  conn *c = calloc(1, sizeof *c);

  ASSERT_OK(status);
  ASSERT(c != NULL);
  uv_tcp_init(server->loop, &c->tcp);
  ASSERT_OK(uv_accept(server, (uv_stream_t *)&c->tcp));
  uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
}

static const char chunk[] =
    "local offpath = require 'offpath'\n"
    "function get(port, n)\n"
    "  local url = 'http://127.0.0.1:' .. port .. '/' .. n\n"
    "  local ok, r = pcall(offpath.http.get, url)\n"
    "  if ok then result = #r.body else result = r end\n"
    "end\n";

static void get(op_runtime *rt, int port, unsigned n) {
  lua_State *L = op_runtime_lua(rt);

  lua_pushinteger(L, port);
  lua_pushinteger(L, n);
  ASSERT_OK(op_call(rt, "get", 2));
  ASSERT_OK(op_runtime_run(rt));
  lua_getglobal(L, "result");
}

static void server_close_cb(uv_handle_t *h) {
  (void)h;
}

int main(void) {
  op_config cfg;
  op_runtime *rt;
  lua_State *L;
  uv_tcp_t server;
  struct sockaddr_in addr;
  struct sockaddr_storage bound;
  int len = sizeof bound, port;

  op_config_init(&cfg);
  cfg.main_memory_limit = 4u << 20;
  ASSERT_OK(op_runtime_new(&cfg, &rt));
  L = op_runtime_lua(rt);
  ASSERT_OK(op_load_string(rt, chunk, "=oom.lua"));

  uv_tcp_init(op_runtime_uv_loop(rt), &server);
  ASSERT_OK(uv_ip4_addr("127.0.0.1", 0, &addr));
  ASSERT_OK(uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0));
  ASSERT_OK(uv_tcp_getsockname(&server, (struct sockaddr *)&bound, &len));
  port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
  ASSERT_OK(uv_listen((uv_stream_t *)&server, 8, accept_cb));
  uv_unref((uv_handle_t *)&server);

  get(rt, port, BIG);
  ASSERT_STR_HAS(lua_tostring(L, -1),
                 "http: not enough memory for the response");
  lua_pop(L, 1);
  get(rt, port, 1000); /* the runtime goes on */
  ASSERT_EQ(lua_tointeger(L, -1), 1000);
  lua_pop(L, 1);

  uv_close((uv_handle_t *)&server, server_close_cb);
  ASSERT_OK(op_runtime_free(rt));
  printf("test-http-oom: ok\n");
  return 0;
}
