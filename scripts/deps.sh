#!/bin/sh
# SPDX-License-Identifier: MIT
# deps.sh - install the Debian packages offpath needs to build, test and
# benchmark, if any are missing. Idempotent: when everything is present it
# only runs one dpkg-query and exits.
#
# usage: scripts/deps.sh [build|test|bench|check]   (default: test)
set -eu

build="cmake make gcc pkg-config liblua5.4-dev lua5.4 libuv1-dev
libcurl4-openssl-dev libpq-dev libhiredis-dev libsqlite3-dev libjansson-dev
libmicrohttpd-dev"
# Sanitizer runtimes, the real servers the integration tests start (python3
# for the HTTP test server), curl
# and promtool (prometheus) to scrape and check --metrics, and scdoc to
# check that the man page is in sync with its source.
test="$build clang libclang-rt-dev redis-server postgresql nginx-light
ca-certificates procps python3 curl prometheus scdoc"
# Peers measured next to offpath.
bench="$test lua-luv wrk postgresql-contrib"
# The formatter and source checks of `make check` (the file list comes
# from git).
check="clang-format git"

case "${1:-test}" in
build) want=$build ;;
test) want=$test ;;
bench) want=$bench ;;
check) want=$check ;;
*) echo "usage: $0 [build|test|bench|check]" >&2; exit 2 ;;
esac

missing=""
for p in $want; do
  s=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
  case "$s" in
  ii*) ;;
  *) missing="$missing $p" ;;
  esac
done
[ -z "$missing" ] && exit 0

echo "offpath: installing missing Debian packages:$missing" >&2
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
else
  echo "offpath: need root or sudo to install:$missing" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# Services must not start on install (no init system in containers, and the
# tests start their own servers on free ports).
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  made_policy=1
fi
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
[ -n "$made_policy" ] && $sudo rm -f "$policy"
exit 0
