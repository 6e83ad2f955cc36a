#!/bin/bash
# SPDX-License-Identifier: MIT
# host-memory.sh - --pool NAME=THREADS,mem=SIZE sets the memory limit of the
# pool's worker VMs (and wins over offpath.configure); a task past it fails
# with the limit and its line while the records go on; bad sizes are usage
# errors.
# LABELS: host memory
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "$(dirname "$0")/_host.sh"

cat > "$T/mem.lua" <<'EOF'
offpath.configure { pools = { grow = { threads = 1, memory_limit = "512MB" } } }
function on_event(engine, rec)
  if rec == "grow" then
    pcall(offpath.run, "grow", function()
      local t = {}
      for i = 1, math.maxinteger do t[i] = { i } end
    end)
  end
  local st = offpath.stats().pools.grow
  engine:emit(rec .. " " .. st.memory_limit)
end
EOF
cat > "$T/fail.lua" <<'EOF'
offpath.configure { pools = { grow = { threads = 1 } } }
function on_event(engine, rec)
  offpath.run("grow", function()
    local t = {}
    for i = 1, math.maxinteger do t[i] = { i } end
  end)
end
EOF
printf 'a\ngrow\nb\n' | "$OFFPATH" run "$T/mem.lua" --pool grow=1,mem=8MB \
  > "$T/out" 2> "$T/err"
check "exit 0" test $? = 0
check "the limit is the one given" contains "$T/out" "a 8388608"
check "the other records go on" contains "$T/out" "b 8388608"
echo x | "$OFFPATH" run "$T/fail.lua" --pool grow=1,mem=8M > "$T/out" 2> "$T/err"
check "the task fails with the limit and its line" contains "$T/err" \
  "memory limit of 8 MB reached in task at $T/fail.lua:5"

"$OFFPATH" run "$T/mem.lua" --pool grow=1,mem=lots < /dev/null > /dev/null 2> "$T/err"
check "a bad size is a usage error" test $? = 2
check "saying what is expected" contains "$T/err" "expected NAME=THREADS,mem=SIZE"
"$OFFPATH" run "$T/mem.lua" --pool grow=1,mem=1000 < /dev/null > /dev/null 2> "$T/err"
check "below 1 MB is refused" test $? = 2

finish
