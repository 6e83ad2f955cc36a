#!/bin/bash
# SPDX-License-Identifier: MIT
# license.sh - the tree can be reused: a LICENSE at the top, and every
# source file (C, Lua, shell, Python, CMake, the Makefile) names its
# licence in an SPDX line within its first three lines.
# LABELS: docs
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

check "LICENSE is the MIT licence" grep -q "^MIT License" "$SRC/LICENSE"
find "$SRC/src" "$SRC/include" "$SRC/lua" "$SRC/tests" "$SRC/bench" \
  "$SRC/examples" "$SRC/scripts" "$SRC/cmake" "$SRC/CMakeLists.txt" \
  "$SRC/Makefile" -type f \
  \( -name '*.[ch]' -o -name '*.lua' -o -name '*.sh' -o -name '*.py' \
  -o -name '*.cmake' -o -name CMakeLists.txt -o -name Makefile \
  -o -name checksrc \) -print > "$T/files"
: > "$T/missing"
while IFS= read -r f; do
  head -n 3 "$f" | grep -q "SPDX-License-Identifier: MIT" || echo "$f" >> "$T/missing"
done < "$T/files"
check "source files found" test -s "$T/files"
check "every source file has its SPDX line" test ! -s "$T/missing"
[ -s "$T/missing" ] && sed 's/^/  missing: /' "$T/missing" >&2
finish
