#!/usr/bin/env bash
# Builds the threads-backend test programs under sanitizers and runs them; any finding fails
# the run (-fno-sanitize-recover=all, halt_on_error). No MPI, no CUDA (so CI's sanitizer stages
# also show that tessera builds and runs without either); examples only for tsan's hybrid run.
#
# Usage: scripts/sanitize.sh [asan|tsan] [core|full|hybrid|ci] [BUILD_DIR]
#   asan (default): AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer).
#   tsan: ThreadSanitizer on the threads backend's own suite (tests/comm), CollectiveChecker's,
#     and the hybrid run: train_gpt at dp 2 x pp 2 x tp 2 (8 rank threads) for 4 steps, with a
#     checkpoint saved at step 2, resumed and saved again, then 3 steps of each pipeline schedule
#     and dp variant at that layout (tsan.supp: third-party suppressions).
#   core (default): comm, nn, schedule, testing, fuzz, harden (NonfiniteCheck, CollectiveChecker).
#   full: also dp, tp, pipe, hybrid, ckpt, ps.
#   hybrid (tsan only): the hybrid run alone.
#   ci (tsan only, CI's stage): tests/comm and the first hybrid run (saved at step 2, resumed
#     and saved at step 4), not the 6 variants nor the checker's test.
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
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
dir=${3:-build-$mode}
export OPENBLAS_NUM_THREADS=1
# Findings stop the program with a non-zero exit; stacks are printed.
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/scripts/tsan.supp}

# test name -> build target
declare -A targets=(
  [threads_comm]=test_thread_comm [schedule]=test_schedule [schedule_pictures_up_to_date]=schedule_picture
  [testing]=test_compare [nn]=nn_tests [fuzz_regressions]=fuzz_regression_tests
  [dp]=test_dp [tp]=tp_tests [pipe]=pipe_tests [hybrid]=hybrid_tests [ckpt]=ckpt_tests
  [parameter_server]=test_parameter_server [nonfinite_check]=test_nonfinite_check
  [collective_checker]=test_collective_checker [collective_checker_env]=test_collective_checker)
hybrid_run=false
if [ "$mode" = tsan ]; then
  tests=(threads_comm collective_checker)
  hybrid_run=true
  [ "$level" = hybrid ] && tests=()
  [ "$level" = ci ] && tests=(threads_comm)
elif [ "$level" = hybrid ] || [ "$level" = ci ]; then
  echo "sanitize.sh: the $level level is for tsan"; exit 2
elif [ "$level" = full ]; then
  tests=(threads_comm schedule schedule_pictures_up_to_date testing nn fuzz_regressions nonfinite_check collective_checker
         collective_checker_env dp tp pipe hybrid ckpt parameter_server)
else
  tests=(threads_comm schedule schedule_pictures_up_to_date testing nn fuzz_regressions nonfinite_check collective_checker
         collective_checker_env)
fi
meson_level=core
for t in ${tests[@]+"${tests[@]}"}; do case $t in dp|tp|pipe|hybrid|ckpt|parameter_server) meson_level=full ;; esac; done

opts=(-Dtest_level=$meson_level -Db_sanitize=$sanitize -Dcpp_args=-fno-sanitize-recover=all
      -Dmpi=disabled -Dnccl=disabled -Dcuda=disabled -Dexamples=$hybrid_run -Dbench=false)
if [ -f "$dir/build.ninja" ]; then
  meson setup --reconfigure "$dir" "${opts[@]}" > /dev/null
else
  CXX=${CXX:-clang++} meson setup "$dir" "${opts[@]}" -Doptimization=1 > /dev/null
fi
build=()
for t in ${tests[@]+"${tests[@]}"}; do build+=("${targets[$t]}"); done
$hybrid_run && build+=(train_gpt)
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
if [ ${#tests[@]} -gt 0 ]; then
  meson test -C "$dir" --no-rebuild --print-errorlogs --timeout-multiplier 4 "${tests[@]}" || rc=$?
fi
if $hybrid_run; then
  # One hybrid run: every parallelism at once on the threads backend (dp 2 x pp 2 x tp 2, 1F1B
  # over 2 micro-batches, ZeRO-1, the tp collectives, pp sends, dp reduction, a collective save
  # and a resume without ZeRO-1, validation and sampling). A finding exits with TSan's code 66 and prints both stacks.
  work=$(mktemp -d)
  python3 -c "print('And God said, Let there be light: and there was light. ' * 100)" > "$work/text.txt"
  gpt=(--data "$work/text.txt" --d-model 32 --heads 4 --context 16 --val-every 2 --sample-len 8
       --log-every 1 --schedule-steps 4)
  t0=$(date +%s)
  hybrid_rc=0
  "$dir/examples/train_gpt" "${gpt[@]}" --layers 2 --batch 8 --dp 2 --pp 2 --tp 2 --zero 1 --steps 2 --save "$work/ck" || hybrid_rc=$?
  [ $hybrid_rc -eq 0 ] && { "$dir/examples/train_gpt" "${gpt[@]}" --layers 2 --batch 8 --dp 2 --pp 2 --tp 2 --steps 4 --resume "$work/ck" \
    --save "$work/ck" || hybrid_rc=$?; }
  # The other schedules and dp variants, 3 steps each (4 blocks: room for 2 virtual stages).
  variants=("--schedule interleaved --virtual-stages 2" "--schedule zb-h1" "--schedule gpipe --recompute full"
            "--sequence-parallel --zero 2 --accum 2" "--zero 3 --accum 2" "--compress bf16" "--sync-every 2")
  [ "$level" = ci ] && variants=()
  for v in "${variants[@]}"; do
    [ $hybrid_rc -eq 0 ] || break
    # shellcheck disable=SC2086  # $v is several flags
    "$dir/examples/train_gpt" "${gpt[@]}" --layers 4 --batch 16 --dp 2 --pp 2 --tp 2 $v --steps 3 --quiet \
      || { hybrid_rc=$?; echo "=== sanitize ($mode): the hybrid run with $v failed"; }
  done
  rm -rf "$work"
  echo "=== sanitize ($mode): the hybrid run (train_gpt dp 2 x pp 2 x tp 2: 4 steps saved and resumed, then" \
       "${#variants[@]} variants of 3 steps) took $(( $(date +%s) - t0 )) s, exit $hybrid_rc"
  [ $hybrid_rc -eq 0 ] || rc=$hybrid_rc
fi
echo "=== sanitize ($mode, $level): ran ${#tests[@]} tests$($hybrid_run && echo ' and the hybrid run') in $(( $(date +%s) - built )) s: $([ $rc -eq 0 ] && echo 'no findings, all passed' || echo FAILED)"
exit $rc
