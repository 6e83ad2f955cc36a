#!/bin/sh
# SPDX-License-Identifier: MIT
# install.sh - installing and linking like any C library: `make install
# PREFIX=` installs under PREFIX even though the build directory was
# configured for another prefix; offpath.pc names the prefix installed to;
# a small project builds and runs against the installed CMake package
# (shared and static), against offpath.pc, and with add_subdirectory() of
# the source tree, which must not install the command into its prefix.
# LABELS: install
. "$(dirname "$0")/_host.sh"
B=${OFFPATH_BINARY_DIR:?}
CONSUMER=$SRC/tests/consumer
# Sanitized builds: the consumers need the same runtime.
CFLAGS=""
if [ -n "${OFFPATH_SANITIZE:-}" ]; then
  CFLAGS="-fsanitize=$(echo "$OFFPATH_SANITIZE" | tr ';' ',') -fno-omit-frame-pointer"
fi
unset MAKEFLAGS MFLAGS MAKELEVEL

# ---- make install PREFIX=... into a prefix the build was not made for ----
configured=$(sed -n 's/^CMAKE_INSTALL_PREFIX:PATH=//p' "$B/CMakeCache.txt")
P=$T/prefix
mkdir -p "$T/b"
ln -s "$B" "$T/b/release"
# -o: never reconfigure the build directory the tests run from.
make -C "$SRC" -o "$T/b/release/Makefile" install BUILD="$T/b" PREFIX="$P" \
  > "$T/make.out" 2>&1
check "make install PREFIX= exits 0" [ $? -eq 0 ]
check "the build was configured for another prefix" [ "$configured" != "$P" ]
for f in bin/offpath include/offpath.h lib/liboffpath.a lib/pkgconfig/offpath.pc \
    lib/cmake/offpath/offpathConfig.cmake lib/cmake/offpath/offpathConfigVersion.cmake \
    share/man/man1/offpath.1 share/bash-completion/completions/offpath \
    lib/lua/5.4/offpath.so; do
  check "installed $f" [ -f "$P/$f" ]
done
check "installed the shared library" [ -e "$P/lib/liboffpath.so" ]
check "nothing went to the configured prefix" \
  sh -c "! grep -q '$configured/' '$T/make.out'"
check "offpath.pc names the prefix installed to" \
  [ "$(PKG_CONFIG_PATH=$P/lib/pkgconfig pkg-config --variable=prefix offpath)" = "$P" ]
check "offpath.pc: the include directory" \
  contains "$P/lib/pkgconfig/offpath.pc" "includedir=\${prefix}/include"
check "the installed command runs" sh -c "'$P/bin/offpath' --version | grep -q '^offpath '"

# ---- pkg-config ----
# shellcheck disable=SC2046,SC2086
cc $CFLAGS -o "$T/pc-consumer" "$CONSUMER/consumer.c" \
  $(PKG_CONFIG_PATH=$P/lib/pkgconfig pkg-config --cflags --libs offpath) \
  -Wl,-rpath,"$P/lib" 2> "$T/pc.err"
check "pkg-config: builds" [ $? -eq 0 ]
"$T/pc-consumer" > "$T/pc.out" 2>&1
check "pkg-config: runs" contains "$T/pc.out" "offpath 0.1.0: 42"

# ---- find_package(offpath) ----
for via in package static; do
  cmake -S "$CONSUMER" -B "$T/c-$via" -DVIA=$via -DCMAKE_PREFIX_PATH="$P" \
    -DCMAKE_C_FLAGS="$CFLAGS" > "$T/c-$via.log" 2>&1 &&
    cmake --build "$T/c-$via" >> "$T/c-$via.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || sed 's/^/  | /' "$T/c-$via.log" >&2
  check "find_package ($via): configures and builds" [ $rc -eq 0 ]
  "$T/c-$via/consumer" > "$T/c-$via.out" 2>&1
  check "find_package ($via): runs" contains "$T/c-$via.out" "offpath 0.1.0: 42"
done
check "the static consumer does not need liboffpath.so" \
  sh -c "! ldd '$T/c-static/consumer' | grep -q liboffpath"
check "the shared consumer uses the installed liboffpath.so" \
  sh -c "ldd '$T/c-package/consumer' | grep -q '$P/lib/liboffpath.so'"

# ---- add_subdirectory(offpath) ----
cmake -S "$CONSUMER" -B "$T/c-subdir" -DVIA=subdir -DOFFPATH_SOURCE="$SRC" \
  -DCMAKE_BUILD_TYPE=Debug -DCMAKE_INSTALL_PREFIX="$T/parent" > "$T/c-subdir.log" 2>&1 &&
  cmake --build "$T/c-subdir" -j 2 >> "$T/c-subdir.log" 2>&1 &&
  cmake --install "$T/c-subdir" >> "$T/c-subdir.log" 2>&1
rc=$?
[ $rc -eq 0 ] || sed 's/^/  | /' "$T/c-subdir.log" >&2
check "add_subdirectory: configures, builds, installs" [ $rc -eq 0 ]
"$T/c-subdir/consumer" > "$T/c-subdir.out" 2>&1
check "add_subdirectory: runs" contains "$T/c-subdir.out" "offpath 0.1.0: 42"
check "add_subdirectory: the parent installs its program" [ -x "$T/parent/bin/consumer" ]
check "add_subdirectory: and the library it links" [ -e "$T/parent/lib/liboffpath.so.0" ]
check "add_subdirectory: but not the offpath command" [ ! -e "$T/parent/bin/offpath" ]
check "add_subdirectory: nor the Lua module" [ ! -e "$T/parent/lib/lua/5.4/offpath.so" ]
check "add_subdirectory: the command is not even built" [ ! -e "$T/c-subdir/offpath/offpath" ]
check "add_subdirectory: no tests built" [ ! -e "$T/c-subdir/offpath/test-runtime" ]
finish
