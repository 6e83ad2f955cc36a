#!/bin/bash
# SPDX-License-Identifier: MIT
# floors.sh - the sources stand in floors: a file calls functions of files
# on the floors below it only, never of one on its own floor or above, so
# no two files call each other, however indirectly. Read from the object
# files (nm): what each one leaves undefined and another one defines is a
# call between them. A new source file must be given its floor here; the
# picture and the walk of one task are in docs/design.md.
# LABELS: docs
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
: "${OFFPATH_BINARY_DIR:?OFFPATH_BINARY_DIR must name the build directory}"

# The library, top floor first; files on one line share a floor.
cat > "$T/floors.lib" <<'EOF'
src/lua_module.c
src/runtime.c
src/lua_main.c
src/task.c src/stats.c
src/io/io.c
src/io/exec.c src/io/fs.c src/io/http.c src/io/pg.c src/io/redis.c src/io/sqlite.c
src/io/common.c
src/sched.c
src/loop.c src/lua_worker.c
src/pool.c
src/worker.c
src/transfer.c
src/protostore.c
src/lua54.c
src/vm.c
src/group.c
src/error.c src/wake.c src/alloc.c src/buf.c src/hist.c generated/lua_modules.c
EOF

# The offpath command: it stands on the library's public face.
cat > "$T/floors.host" <<'EOF'
src/host/main.c
src/host/metrics.c
src/host/stats.c
src/host/engine.c
src/host/input.c
src/host/rstream.c
src/host/host.c
src/host/json.c src/host/lines.c
EOF

# obj FILE: the object file the build made of FILE.
obj() {
  find "$OFFPATH_BINARY_DIR/CMakeFiles" -path "*/$1.o" -print | head -n 1
}

# check_floors LIST: every call between the files of LIST runs downward.
# Prints each call that does not, as "caller -> symbol (callee)".
check_floors() {
  local list=$1 floor=0 f o
  : > "$T/defs"
  : > "$T/uses"
  : > "$T/floor"
  while read -r line; do
    floor=$((floor + 1))
    for f in $line; do
      o=$(obj "$f")
      if [ -z "$o" ]; then
        echo "$f: no object file in $OFFPATH_BINARY_DIR" >&2
        echo "missing $f"
        continue
      fi
      echo "$f $floor" >> "$T/floor"
      nm --defined-only -g "$o" | awk -v f="$f" 'NF == 3 { print $3, f }' >> "$T/defs"
      nm -u "$o" | awk -v f="$f" '{ print f, $NF }' >> "$T/uses"
    done
  done < "$list"
  awk 'FILENAME == ARGV[1] { floor[$1] = $2; next }
       FILENAME == ARGV[2] { def[$1] = $2; next }
       ($2 in def) && def[$2] != $1 && floor[def[$2]] <= floor[$1] {
         print $1, "->", $2, "(" def[$2] ")"
       }' "$T/floor" "$T/defs" "$T/uses"
}

# Every source file has a floor.
git -C "$SRC" ls-files 'src/*.c' > "$T/sources" 2> /dev/null ||
  find "$SRC/src" -name '*.c' | sed "s|^$SRC/||" > "$T/sources"
cat "$T/floors.lib" "$T/floors.host" | tr ' ' '\n' | sort > "$T/placed"
sort "$T/sources" | comm -23 - "$T/placed" > "$T/unplaced"
check "every source file has a floor" test ! -s "$T/unplaced"
sed 's/^/  no floor: /' "$T/unplaced" >&2

check_floors "$T/floors.lib" > "$T/up.lib"
check "the library's files call only downward" test ! -s "$T/up.lib"
sed 's/^/  upward or sideways: /' "$T/up.lib" >&2
# The check itself sees calls: runtime.c calls into the pools.
check "calls are seen at all" grep -q "^src/runtime.c op__pool" "$T/uses"

check_floors "$T/floors.host" > "$T/up.host"
check "the host's files call only downward" test ! -s "$T/up.host"
sed 's/^/  upward or sideways: /' "$T/up.host" >&2
finish
