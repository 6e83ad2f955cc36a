# example-trisul.sh - the Trisul examples (examples/trisul/) run by the
# offpath host: T.async:copy of each input path, and the SHA-1 of each file
# computed in onexecute with io.popen and printed in onresult.
# LABELS: examples compat
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
EX=$SRC/examples/trisul

# Files to work on: text, binary, a name with a space is avoided (the seed
# passes the path to the shell unquoted).
printf 'first file\n' > "$T/a.txt"
head -c 200000 /dev/urandom > "$T/b.bin"
printf '%s\n' "$T/a.txt" "$T/b.bin" > "$T/paths"

"$OFFPATH" run "$EX/sha1sum.lua" --input "$T/paths" > "$T/sha.out" 2> "$T/sha.err"
check "sha1sum.lua exits 0" [ $? -eq 0 ]
for f in a.txt b.bin; do
  check "sha1sum.lua: $f" contains "$T/sha.out" \
    "The SHA1 sum of  $T/$f IS $(sha1sum "$T/$f")"
done
check "sha1sum.lua: one result per file" [ "$(grep -c '^The SHA1 sum of' "$T/sha.out")" -eq 2 ]
check "sha1sum.lua: its two workers" contains "$T/sha.err" "trisul: 2 threads, 2 tasks: 2 done"

printf '%s\n' "$T/b.bin" > "$T/one"
COPY_TO="$T/copy.out" "$OFFPATH" run "$EX/copy-file.lua" --input "$T/one" > "$T/copy.stdout" 2> "$T/copy.err"
check "copy-file.lua exits 0" [ $? -eq 0 ]
check "copy-file.lua: the copy is identical" cmp -s "$T/b.bin" "$T/copy.out"
check "copy-file.lua: nothing pending at the end" contains "$T/copy.stdout" "copied to $T/copy.out, 0 items pending"
check "copy-file.lua: Trisul's default of one worker" contains "$T/copy.err" "trisul: 1 threads, 1 tasks: 1 done"

# A path that does not exist: the failure is reported, the host goes on.
printf '%s\n' "$T/missing" "$T/a.txt" > "$T/paths2"
COPY_TO="$T/copy2.out" "$OFFPATH" run "$EX/copy-file.lua" --input "$T/paths2" > "$T/copy2.stdout" 2> "$T/copy2.err"
check "copy-file.lua: a missing source is reported" contains "$T/copy2.err" "T.async:copy: copy: cannot open source: $T/missing"
check "copy-file.lua: the next copy still runs" cmp -s "$T/a.txt" "$T/copy2.out"
finish
