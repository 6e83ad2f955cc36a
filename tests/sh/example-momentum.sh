# SPDX-License-Identifier: MIT
# example-momentum.sh - the Momentum examples run by the offpath host:
# policy.lua (msys.runInPool in its suspending, fire-and-forget and
# scheduler-completion forms, _TLS and _OSTLS) and validate.lua (a module
# of validation callbacks with the page's examples, run as written with
# --compat momentum).
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
# ---- validate.lua, with --compat momentum ----
cat > "$T/msgs.jsonl" <<'EOF'
{"mailfrom": "alice@ok.org", "rcptto": ["bob@example.com", "carol@example.com"], "headers": {"Subject": "hello"}}
{"mailfrom": "mallory@SPAM.example", "rcptto": "bob@example.com"}
{"mailfrom": "dave@ok.org", "rcptto": "bob@example.com", "headers": {"Subject": "win $$$ now"}}
EOF
(cd "$SRC" && "$OFFPATH" run --compat momentum "$EX/validate.lua" --format json --input "$T/msgs.jsonl") > "$T/v.out" 2> "$T/v.err"
check "validate.lua exits 0" [ $? -eq 0 ]
check "validate.lua: accepted" contains "$T/v.out" '{"code":250,"mailfrom":"alice@ok.org","text":"ok"}'
check "validate.lua: a blocked sender" contains "$T/v.out" '{"code":550,"mailfrom":"mallory@SPAM.example","text":"sender domain SPAM.example is blocked"}'
check "validate.lua: a rejected message" contains "$T/v.out" '{"code":554,"mailfrom":"dave@ok.org","text":"message content rejected"}'
check "validate.lua: the scheduler completion's results reach 'res'" [ "$(grep -c "^SCHED	status	true	res	done	from	ok.org$" "$T/v.out")" -eq 2 ]
check "validate.lua: the completion ran" [ "$(grep -c '^Done!$' "$T/v.out")" -eq 2 ]
check "validate.lua: the scheduler thread's _OSTLS" [ "$(grep -c "^SCHED	validate_data	42$" "$T/v.out")" -eq 2 ]
check "validate.lua: a pool thread's own _OSTLS" [ "$(grep -c "^CPU	in cpu	nil$" "$T/v.out")" -eq 2 ]
check "validate.lua: the pool-thread completion" [ "$(grep -c "^CB	cb completing	nil$" "$T/v.out")" -eq 2 ]
check "validate.lua: no errors" contains "$T/v.err" "errors 0,"
# A line is the envelope sender.
printf 'erin@ok.org\nzed@bad.test\n' > "$T/senders2"
(cd "$SRC" && "$OFFPATH" run --compat momentum "$EX/validate.lua" --input "$T/senders2") > "$T/v2.out" 2> "$T/v2.err"
check "validate.lua: lines exit 0" [ $? -eq 0 ]
check "validate.lua: lines, accepted" contains "$T/v2.out" '{"code":250,"mailfrom":"erin@ok.org","text":"ok"}'
check "validate.lua: lines, blocked" contains "$T/v2.out" '{"code":550,"mailfrom":"zed@bad.test","text":"sender domain bad.test is blocked"}'
# init() must return true, as in Momentum: otherwise nothing is validated.
cat > "$T/badinit.lua" <<'EOF'
local mod = {}
function mod:init() return nil end
function mod:validate_mailfrom(str, accept, vctx) return msys.core.VALIDATE_CONT end
msys.registerModule("badinit", mod)
EOF
"$OFFPATH" run --compat momentum "$T/badinit.lua" --input "$T/senders2" > "$T/bi.out" 2> "$T/bi.err"
check "--compat momentum: a failed init is exit 1" [ $? -eq 1 ]
check "--compat momentum: says which module" contains "$T/bi.err" "msys: module 'badinit': init did not return true"
check "--compat momentum: no verdicts" [ "$(lines "$T/bi.out")" -eq 0 ]
"$OFFPATH" run --compat smtp "$T/badinit.lua" > /dev/null 2> "$T/usage.err"
check "--compat with an unknown product: usage error" [ $? -eq 2 ]
check "--compat: says what it takes" contains "$T/usage.err" "--compat must be 'trisul' or 'momentum', not 'smtp'"
finish
