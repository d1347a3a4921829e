#!/usr/bin/env bash
# Builds the threads-backend test programs under sanitizers and runs them; any finding fails
# the run (-fno-sanitize-recover=all, halt_on_error). No MPI, no CUDA, no examples.
#
# Usage: scripts/sanitize.sh [asan|tsan] [core|full] [BUILD_DIR]
#   asan (default): AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer).
#   tsan: ThreadSanitizer on the threads backend's own suite (tests/comm) and CollectiveChecker's.
#   core (default): comm, nn, schedule, testing, fuzz, harden (NonfiniteCheck, CollectiveChecker).
#   full: also dp, tp, pipe, hybrid, ckpt, ps.
#   BUILD_DIR: default build-asan / build-tsan.
# Compiler: $CXX, default clang++ (its -fsanitize=undefined also checks float-to-integer
# overflow, and at -O1 it builds these programs about 3 times faster than g++ -O2 here); a new
# build directory is configured with -O1. An existing one keeps its compiler and optimization.
# Prints the seconds the build and the tests took. Test timeouts are multiplied by 4: the
# sanitizers make the programs 2-5 times slower.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-asan}
level=${2:-core}
case $mode in
  asan) sanitize=address,undefined ;;
  tsan) sanitize=thread ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
dir=${3:-build-$mode}
export OPENBLAS_NUM_THREADS=1
# Findings stop the program with a non-zero exit; stacks are printed.
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}

# test name -> build target
declare -A targets=(
  [threads_comm]=test_thread_comm [schedule]=test_schedule [schedule_pictures_up_to_date]=schedule_picture
  [testing]=test_compare [nn]=nn_tests [fuzz_regressions]=fuzz_regression_tests
  [dp]=test_dp [tp]=tp_tests [pipe]=pipe_tests [hybrid]=hybrid_tests [ckpt]=ckpt_tests
  [parameter_server]=test_parameter_server [nonfinite_check]=test_nonfinite_check
  [collective_checker]=test_collective_checker [collective_checker_env]=test_collective_checker)
if [ "$mode" = tsan ]; then
  tests=(threads_comm collective_checker)
elif [ "$level" = full ]; then
  tests=(threads_comm schedule schedule_pictures_up_to_date testing nn fuzz_regressions nonfinite_check collective_checker
         collective_checker_env dp tp pipe hybrid ckpt parameter_server)
else
  tests=(threads_comm schedule schedule_pictures_up_to_date testing nn fuzz_regressions nonfinite_check collective_checker
         collective_checker_env)
fi
meson_level=core
for t in "${tests[@]}"; do case $t in dp|tp|pipe|hybrid|ckpt|parameter_server) meson_level=full ;; esac; done

opts=(-Dtest_level=$meson_level -Db_sanitize=$sanitize -Dcpp_args=-fno-sanitize-recover=all
      -Dmpi=disabled -Dnccl=disabled -Dexamples=false -Dbench=false)
if [ -f "$dir/build.ninja" ]; then
  meson setup --reconfigure "$dir" "${opts[@]}" > /dev/null
else
  CXX=${CXX:-clang++} meson setup "$dir" "${opts[@]}" -Doptimization=1 > /dev/null
fi
build=()
for t in "${tests[@]}"; do build+=("${targets[$t]}"); done
# ckpt's test runs the consolidation tool when CLI11 is there.
if [[ " ${tests[*]} " == *" ckpt "* ]] && meson introspect "$dir" --targets |
     python3 -c 'import json, sys; sys.exit(all(t["name"] != "ckpt_consolidate_checkpoint" for t in json.load(sys.stdin)))'; then
  build+=(ckpt_consolidate_checkpoint)
fi
start=$(date +%s)
meson compile -C "$dir" "${build[@]}"
built=$(date +%s)
echo "=== sanitize ($mode, $level): built ${#build[@]} programs in $((built - start)) s"
rc=0
meson test -C "$dir" --no-rebuild --print-errorlogs --timeout-multiplier 4 "${tests[@]}" || rc=$?
echo "=== sanitize ($mode, $level): ran ${#tests[@]} tests in $(( $(date +%s) - built )) s: $([ $rc -eq 0 ] && echo 'no findings, all passed' || echo FAILED)"
exit $rc
