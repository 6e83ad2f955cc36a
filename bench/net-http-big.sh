#!/bin/sh
# SPDX-License-Identifier: MIT
# net-http-big.sh - a download of SIZE bytes (default 1 GiB) from a local
# nginx with offpath.http, to a file (`output`) and through `on_data`: the
# rate and the peak resident memory, which stays that of an idle engine
# (bench/net-http-big.lua).
#
# usage: sh bench/net-http-big.sh BUILD_DIR
# Environment: SIZE=1073741824 (bytes). Needs nginx and openssl.
set -eu
BUILD=${1:?usage: sh bench/net-http-big.sh BUILD_DIR}
SIZE=${SIZE:-1073741824}
SRC=$(cd "$(dirname "$0")/.." && pwd)
case $BUILD in /*) ;; *) BUILD=$(pwd)/$BUILD ;; esac
DIR=$(mktemp -d "${TMPDIR:-/tmp}/offpath-bench-big.XXXXXX")
trap 'sh "$SRC/tests/fixtures/nginx.sh" stop "$DIR" >/dev/null 2>&1; rm -rf "$DIR"' EXIT
trap 'exit 130' INT TERM

sh "$SRC/tests/fixtures/nginx.sh" start "$DIR"
. "$DIR/nginx.env"
# A sparse file: nginx sends SIZE bytes without the disk holding them.
truncate -s "$SIZE" "$NGINX_DIR/www/huge.bin"
URL=$NGINX_URL/huge.bin OUTPUT=/dev/null \
  "$BUILD/offpath" run "$SRC/bench/net-http-big.lua" --input /dev/null 2>/dev/null
