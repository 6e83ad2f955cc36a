#!/bin/sh
# SPDX-License-Identifier: MIT
# docs.sh - the docs match the code: the README's tour runs as written
# (its scripts are saved under the names they give, its shell commands run
# from a copy of the tree's layout, its other Lua and C compile); docs/api.md
# lists exactly the functions include/offpath.h exports; the docs speak of
# the project alone.
# LABELS: host examples
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
B=${OFFPATH_BINARY_DIR:?}
W=$T/tree
mkdir -p "$W/build/release" "$T/blocks"
ln -s "$OFFPATH" "$W/build/release/offpath"
ln -s "$B/offpath.so" "$W/build/release/offpath.so"
ln -s "$SRC/examples" "$W/examples"
ln -s "$SRC/docs" "$W/docs"
ln -s "$SRC/include" "$W/include"

# ---- the README's tour, block by block: T/blocks/N.LANG ----
awk -v dir="$T/blocks" '
  /^## / { tour = ($0 == "## A five-minute tour") }
  !tour { next }
  /^```/ && !inblock { inblock = 1; n++; lang = substr($0, 4); f = dir "/" n "." lang; printf "" > f; next }
  /^```/ && inblock { inblock = 0; close(f); next }
  inblock { print >> f }
' "$SRC/README.md"
nblocks=$(ls "$T/blocks" | wc -l)
check "README: the tour has its blocks" [ "$nblocks" -ge 8 ]

# A sanitized offpath.so needs its runtime first in a stock lua5.4.
case "${OFFPATH_SANITIZE:-}" in
*address*) PRE=$(cc -print-file-name=libasan.so) ;;
*thread*) PRE=$(cc -print-file-name=libtsan.so) ;;
*) PRE="" ;;
esac

for f in $(ls "$T/blocks" | sort -n); do
  b=$T/blocks/$f
  case $f in
  *.lua)
    name=$(sed -n '1s/^-- \([a-z_]*\.lua\):.*/\1/p' "$b")
    if [ -n "$name" ]; then
      cp "$b" "$W/$name"
      check "README block $f: $name is a script" lua5.4 -e "assert(loadfile('$b'))"
    else
      check "README block $f: Lua that compiles" lua5.4 -e "assert(loadfile('$b'))"
    fi
    ;;
  *.c)
    { echo '#include <offpath.h>'; echo 'int main(void) {'; cat "$b"; echo 'return 0; }'; } > "$T/block.c"
    check "README block $f: C that compiles" \
      cc -fsyntax-only -I "$SRC/include" $(pkg-config --cflags lua5.4) "$T/block.c"
    ;;
  *.sh)
    # One command per block, continuation lines joined.
    cmd=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$b")
    out=$T/$f.out
    err=$T/$f.err
    case $cmd in
    *tcp://*)
      # A server: runs until it is stopped.
      : > "$err"
      (cd "$W" && eval "exec $cmd") > "$out" 2> "$err" &
      pid=$!
      PIDS="$PIDS $pid"
      wait_for 30 grep -q "serving metrics on" "$err"
      kill -TERM $pid
      wait $pid
      check "README block $f: the server runs and stops on SIGTERM" [ $? -eq 0 ]
      check "README block $f: it listens on tcp" contains "$err" "listening on tcp://127.0.0.1:"
      check "README block $f: and udp" contains "$err" "listening on udp://127.0.0.1:"
      ;;
    LUA_CPATH=*)
      (cd "$W" && export LD_PRELOAD="$PRE" && eval "$cmd") > "$out" 2> "$err"
      check "README block $f: runs ($cmd)" [ $? -eq 0 ]
      check "README block $f: the module did the work" contains "$out" "report: done"
      ;;
    *)
      (cd "$W" && eval "$cmd") > "$out" 2> "$err"
      check "README block $f: runs ($cmd)" [ $? -eq 0 ] || sed 's/^/  | /' "$err" >&2
      ;;
    esac
    ;;
  esac
done
# What the tour's commands print.
ndocs=$(ls "$SRC"/docs/*.md | wc -l)
count_out=$(grep -l 'count.lua' "$T"/blocks/*.sh | head -1)
count_out=$T/$(basename "$count_out").out
check "count.lua: one line per file" [ "$(wc -l < "$count_out")" -eq "$ndocs" ]
check "count.lua: sha1, lines, name" \
  grep -qE "^$(sha1sum "$SRC/docs/api.md" | cut -c1-40) $(wc -l < "$SRC/docs/api.md") docs/api.md\$" "$count_out"
hello_out=$(grep -l -- '--format json' "$T"/blocks/*.sh | head -1)
hello_out=$T/$(basename "$hello_out").out
check "hello.lua: every event answered as JSON" \
  [ "$(grep -c '^{"id":[0-9]*,"op":"[a-z]*"}$' "$hello_out")" -eq "$(wc -l < "$SRC/examples/demo/events.jsonl")" ]

# ---- docs/api.md lists exactly the exported functions ----
grep -oE 'OP_EXTERN [^(]*\bop_[a-z_]+\(' "$SRC/include/offpath.h" |
  grep -oE 'op_[a-z_]+\($' | tr -d '(' | sort -u > "$T/exported"
grep -oE '^\| `op_[a-z_]+\(' "$SRC/docs/api.md" | grep -oE 'op_[a-z_]+' | sort -u > "$T/documented"
check "the header exports functions" [ "$(wc -l < "$T/exported")" -ge 28 ]
check "docs/api.md documents every exported function" \
  sh -c "! grep -vxFf '$T/documented' '$T/exported'" || grep -vxFf "$T/documented" "$T/exported" | sed 's/^/  missing: /' >&2
check "docs/api.md documents no function the header lacks" \
  sh -c "! grep -vxFf '$T/exported' '$T/documented'"

# ---- the docs speak of the project alone ----
check "no SPEC in the docs" sh -c "! grep -nw 'SPEC' '$SRC'/README.md '$SRC'/docs/*.md"
check "no issues in the docs" sh -c "! grep -niw 'issues\?' '$SRC'/README.md '$SRC'/docs/*.md"
finish
