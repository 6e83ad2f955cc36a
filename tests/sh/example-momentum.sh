# example-momentum.sh - the Momentum example (examples/momentum/policy.lua)
# run by the offpath host: msys.runInPool in its suspending, fire-and-forget
# and scheduler-completion forms, _TLS and _OSTLS.
# LABELS: examples compat
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"
EX=$SRC/examples/momentum

printf 'alice@ok.org\nbob@SPAM.example\ncarol@bad.test\nnobody\n' > "$T/senders"
(cd "$SRC" && AUDIT="$T/audit" "$OFFPATH" run "$EX/policy.lua" --input "$T/senders") > "$T/out" 2> "$T/err"
check "policy.lua exits 0" [ $? -eq 0 ]
printf 'accept alice@ok.org\nreject bob@SPAM.example\nreject carol@bad.test\naccept nobody\n' > "$T/want"
# Sessions suspend independently: verdicts come in completion order.
check "policy.lua: a verdict per sender" diff <(sort "$T/want") <(grep -E '^(accept|reject)' "$T/out" | sort)
check "policy.lua: the fire-and-forget audit lines" diff <(sort "$T/want") <(sort "$T/audit")
check "policy.lua: rejections counted on the scheduler thread" contains "$T/err" "rejected SPAM.example=1, rejected bad.test=1"
check "policy.lua: threadpool.stat" contains "$T/out" "IO pool: 8 invocations, 4 threads"

# A blocklist that cannot be read: each message gets a temporary failure
# from the pcall-style status, and the script keeps going.
(cd "$SRC" && BLOCKLIST="$T/none" "$OFFPATH" run "$EX/policy.lua" --input "$T/senders") > "$T/out2" 2> "$T/err2"
check "policy.lua: exits 0 without a blocklist" [ $? -eq 0 ]
check "policy.lua: tempfail with the reason" contains "$T/out2" "tempfail alice@ok.org ("
check "policy.lua: four tempfails" [ "$(grep -c '^tempfail ' "$T/out2")" -eq 4 ]
finish
