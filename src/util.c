/* SPDX-License-Identifier: MIT */
/*
** util.c - error codes, version, panics: small things every file uses.
** Thread: any.
*/
#include "internal.h"

const char *op_version(void) {
  return OP_VERSION_STRING;
}

const char *op_strerror(int err) {
  switch (err) {
#define OP_STRERROR_CASE(name, value, text)                                    \
  case OP_##name:                                                              \
    return text;
    OP_ERRNO_MAP(OP_STRERROR_CASE)
#undef OP_STRERROR_CASE
  case 0:
    return "success";
  default:
    return err < 0 && err > -4096 ? uv_strerror(err) : "unknown error";
  }
}

const char *op_err_name(int err) {
  switch (err) {
#define OP_ERRNAME_CASE(name, value, text)                                     \
  case OP_##name:                                                              \
    return #name;
    OP_ERRNO_MAP(OP_ERRNAME_CASE)
#undef OP_ERRNAME_CASE
  case 0:
    return "OK";
  default:
    return err < 0 && err > -4096 ? uv_err_name(err) : "UNKNOWN";
  }
}

void op__panic(const char *file, int line, const char *msg) {
  fprintf(stderr, "offpath: %s:%d: %s\n", file, line, msg);
  fflush(stderr);
  abort();
}
