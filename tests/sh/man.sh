#!/bin/sh
# SPDX-License-Identifier: MIT
# man.sh - the man page and the bash completion: docs/offpath.1 is what
# scdoc makes of docs/offpath.1.scd, it renders, and it names every option
# of `offpath --help`, as the completion offers them; the completion
# completes options and their values.
# LABELS: host
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
MAN=$SRC/docs/offpath.1
SCD=$SRC/docs/offpath.1.scd
COMP=$SRC/dist/offpath.bash

scdoc < "$SCD" | grep -v '^\.TH ' > "$T/made.1"
grep -v '^\.TH ' "$MAN" > "$T/committed.1"
check "docs/offpath.1 is in sync with its source (make man)" cmp -s "$T/made.1" "$T/committed.1"
MANWIDTH=80 man -l "$MAN" > "$T/man.txt" 2> "$T/man.err"
check "the page renders" contains "$T/man.txt" "offpath - feed records to a Lua script"
check "without warnings" [ ! -s "$T/man.err" ]

"$OFFPATH" --help > "$T/help"
grep -oE '^  --[a-z-]+' "$T/help" | tr -d ' ' | sort -u > "$T/opts"
check "the usage lists options" [ "$(wc -l < "$T/opts")" -ge 10 ]
# shellcheck disable=SC1090
. "$COMP"
for o in $(cat "$T/opts"); do
  check "man page: $o" grep -qF -- "*$o*" "$SCD"
  COMP_WORDS=(offpath run x.lua "${o:0:4}"); COMP_CWORD=3; COMPREPLY=()
  _offpath
  check "completion: $o" sh -c "printf '%s\n' ${COMPREPLY[*]} | grep -qx -- '$o'"
done
# Nothing documented or completed that the command does not have.
grep -oE '^\*--[a-z-]+\*' "$SCD" | tr -d '*' | sort -u > "$T/man-opts"
check "man page: no option the command lacks" sh -c "! grep -vxFf '$T/opts' '$T/man-opts' | grep -v -e --help -e --version"

COMP_WORDS=(offpath run x.lua --format ''); COMP_CWORD=4; COMPREPLY=()
_offpath
check "completion: --format values" [ "${COMPREPLY[*]}" = "lines json" ]
COMP_WORDS=(offpath ''); COMP_CWORD=1; COMPREPLY=()
_offpath
check "completion: the command" [ "${COMPREPLY[*]}" = "run --help --version" ]
mkdir "$T/d" && touch "$T/d/a.lua" "$T/d/b.txt"
COMP_WORDS=(offpath run "$T/d/"); COMP_CWORD=2; COMPREPLY=()
_offpath
check "completion: scripts are Lua files" [ "${COMPREPLY[*]}" = "$T/d/a.lua" ]
finish
