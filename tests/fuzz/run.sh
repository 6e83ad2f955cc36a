#!/bin/sh
# SPDX-License-Identifier: MIT
# run.sh BUILD_DIR [SECONDS] - run every libFuzzer target built in BUILD_DIR
# (cmake -DOP_FUZZ=ON, see cmake/fuzz.cmake) for SECONDS each (default 30),
# starting from its seed corpus tests/fuzz/corpus/<name>. New inputs go to
# BUILD_DIR/fuzz-work/corpus/<name>; an input that fails a target is
# written to BUILD_DIR/fuzz-work/crash/ and the script fails. Such an input belongs in
# tests/fuzz/corpus/<name>/ once fixed: the ctest fuzz/<name> replays it.
set -eu
build=$1
secs=${2:-30}
src=$(cd "$(dirname "$0")/../.." && pwd)
found=0
work=$build/fuzz-work
for bin in "$build"/fuzz-*; do
  [ -f "$bin" ] && [ -x "$bin" ] || continue
  name=$(basename "$bin")
  area=${name#fuzz-}
  found=$((found + 1))
  mkdir -p "$work/corpus/$area" "$work/crash"
  echo "fuzz: $name for ${secs}s"
  # -rss_limit_mb: the targets are not meant to grow; -timeout: one input
  # taking seconds is a bug too (a loop on malformed bytes).
  if ! "$bin" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 \
      -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="$work/crash/$area-" \
      "$work/corpus/$area" "$src/tests/fuzz/corpus/$area" \
      >"$work/$area.log" 2>&1; then
    tail -n 60 "$work/$area.log" >&2
    echo "fuzz: $name failed; the input is in $work/crash/" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' \
    "$work/$area.log" | sed "s/^/fuzz: $area /"
done
if [ "$found" -eq 0 ]; then
  echo "fuzz: no targets in $build" >&2
  exit 1
fi
