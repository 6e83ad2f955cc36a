# SPDX-License-Identifier: MIT
# example-trisul.sh - the Trisul examples (examples/trisul/) run by the
# offpath host: T.async:copy of each input path, and the SHA-1 of each file
# computed in onexecute with io.popen and printed in onresult, the plugin
# run as written with --compat trisul.
# LABELS: examples compat
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
EX=$SRC/examples/trisul

# Files to work on: text, binary, a name with a space is avoided (the seed
# passes the path to the shell unquoted).
printf 'first file\n' > "$T/a.txt"
head -c 200000 /dev/urandom > "$T/b.bin"
: > "$T/empty"
printf '%s\n' "$T/a.txt" "$T/b.bin" "$T/empty" > "$T/paths"

"$OFFPATH" run --compat trisul "$EX/sha1sum.lua" --input "$T/paths" > "$T/sha.out" 2> "$T/sha.err"
check "sha1sum.lua exits 0" [ $? -eq 0 ]
for f in a.txt b.bin empty; do
  check "sha1sum.lua: $f" contains "$T/sha.out" \
    "The SHA1 sum of  $T/$f IS $(sha1sum "$T/$f")"
done
check "sha1sum.lua: one result per file" [ "$(grep -c '^The SHA1 sum of' "$T/sha.out")" -eq 3 ]
check "sha1sum.lua: its two workers" contains "$T/sha.err" "trisul: 2 threads, 3 tasks: 3 done"
check "sha1sum.lua: update_counter counts" contains "$T/sha.err" "{B91A8AD4-C6B6-4FBC-E862-FF94BC204A35}/extracted files/0=3"
check "sha1sum.lua: add_alert alerts" contains "$T/sha.err" "alert: EMPTY-FILE (priority 2): empty file $T/empty"
check "sha1sum.lua: no errors" contains "$T/sha.err" "errors 0,"

# The command line sizes the pool, over request_async_workers.
"$OFFPATH" run --compat trisul "$EX/sha1sum.lua" --input "$T/paths" --pool trisul=3 > "$T/sha3.out" 2> "$T/sha3.err"
check "sha1sum.lua --pool trisul=3 exits 0" [ $? -eq 0 ]
check "sha1sum.lua --pool trisul=3: every result" [ "$(grep -c '^The SHA1 sum of' "$T/sha3.out")" -eq 3 ]
check "sha1sum.lua --pool trisul=3: three workers" contains "$T/sha3.err" "trisul: 3 threads, 3 tasks: 3 done"
lacks "$T/sha3.err" "has already started" || fail "sha1sum.lua --pool trisul=3: no configure error"

# JSON records carry onfile_http's other arguments.
printf '{"path": "%s", "flowkey": "06A:C0.A8.01.02:p-0050_0A.00.00.01:p-C350", "length": 0}\n' "$T/empty" > "$T/recs.json"
"$OFFPATH" run --compat trisul "$EX/sha1sum.lua" --format json --input "$T/recs.json" > "$T/shaj.out" 2> "$T/shaj.err"
check "sha1sum.lua --format json exits 0" [ $? -eq 0 ]
check "sha1sum.lua: the flowkey reaches the alert" contains "$T/shaj.err" "EMPTY-FILE (priority 2) flow 06A:C0.A8.01.02:p-0050_0A.00.00.01:p-C350: empty file $T/empty"

# --compat with a script that is no Trisul plugin: each record fails, said.
printf 'x = 1\n' > "$T/notaplugin.lua"
"$OFFPATH" run --compat trisul "$T/notaplugin.lua" --input "$T/paths" > /dev/null 2> "$T/np.err"
check "--compat trisul without TrisulPlugin: said" contains "$T/np.err" "--compat trisul: the script defines no TrisulPlugin table"

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
