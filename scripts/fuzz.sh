#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ (clang++, -fsanitize=fuzzer,address,undefined) and runs
# each for a bounded time on its seed corpus (fuzz/corpus/<target>/, read-only) plus a working
# corpus that grows between runs (build-fuzz/libfuzzer/corpus/<target>/, not committed).
# Prints, per target, the executions, the working corpus size and the result. A crash, leak,
# timeout or out-of-memory input is saved under build-fuzz/libfuzzer/artifacts/<target>/; copy
# it into fuzz/regressions/<target>/ with the fix so tests/fuzz replays it in every build.
#
# Usage: scripts/fuzz.sh [-t SECONDS_PER_TARGET] [-o OUT_DIR] [TARGET...]
#   TARGET: safetensors, checkpoint_index, token_file (default: all three)
#   -t: seconds each target runs (default 60; $FUZZ_SECONDS too)
#   -o: build and work directory (default build-fuzz/libfuzzer)
# Exits non-zero when a target fails to build or finds an input that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
out=build-fuzz/libfuzzer
while getopts "t:o:h" opt; do
  case $opt in
    t) seconds=$OPTARG ;;
    o) out=$OPTARG ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(safetensors checkpoint_index token_file)
export OPENBLAS_NUM_THREADS=1
# The targets write each input to a file: a memory file system keeps that off the disk.
[ -d /dev/shm ] && [ -w /dev/shm ] && export TMPDIR=/dev/shm
CXX=${FUZZ_CXX:-clang++}
mkdir -p "$out"
rc=0
for t in "${targets[@]}"; do
  src=fuzz/fuzz_$t.cpp
  [ -f "$src" ] || { echo "fuzz.sh: no target $t ($src)"; exit 2; }
  bin=$out/fuzz_$t
  if [ ! -x "$bin" ] || [ -n "$(find "$src" tests/fuzz/fuzz_inputs.hpp include -newer "$bin" -print -quit)" ]; then
    echo "=== fuzz: building $bin"
    start=$(date +%s)
    $CXX -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
      -Iinclude -Itests "$src" -lopenblas -pthread -o "$bin"
    echo "=== fuzz: built $bin in $(( $(date +%s) - start )) s"
  fi
  work=$out/corpus/$t
  artifacts=$out/artifacts/$t
  mkdir -p "$work" "$artifacts"
  log=$out/$t.log
  echo "=== fuzz: $t for $seconds s"
  # rss/malloc limits: an input that makes the parser allocate more than 1 GiB (a size it
  # believed from the file) is a finding, as a crash is.
  if "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=1024 \
       -dict=fuzz/json.dict -print_final_stats=1 -artifact_prefix="$artifacts/" \
       "$work" "fuzz/corpus/$t" > "$log" 2>&1; then
    result=ok
  else
    result="FAILED (input saved in $artifacts/; log $log)"
    rc=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  files=$(find "$work" -type f | wc -l)
  bytes=$(du -sb "$work" | cut -f1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  echo "fuzz: $t: ${runs:-?} executions in $seconds s, working corpus $files files ($bytes bytes), $cov: $result"
done
exit $rc
