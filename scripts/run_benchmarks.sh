#!/usr/bin/env bash
# Builds the CPU benchmarks (only them) and runs each with its targets and checks, then prints a
# summary table. CI does not run it (timings need a quiet machine); run it by hand.
#
# Usage: bash scripts/run_benchmarks.sh [--no-torch] [BUILD_DIR]     (BUILD_DIR defaults to build)
#   BENCHES="gpt_block dp" in the environment runs only those (names as in the summary table)
#   --no-torch  passed to bench/dp/run_dp_bench.sh: measure tessera without the PyTorch peer
#               (its targets are then not evaluated)
#
# Every benchmark exits 0 when its checks pass and its targets are met, 1 when a target is missed,
# 2 when a check of what it computed fails, and (run_dp_bench.sh) 3 when PyTorch is missing.
# This script exits 0 when every benchmark exited 0; 2 when any check failed or any benchmark
# failed to build or run; else 1 (a target missed or not measured).
# Not here: bench/nccl (GPU: scripts/gpu_check.sh) and bench/hybrid/run_layout_bench.sh (no
# target; it needs examples/train_gpt and the text data).
set -uo pipefail
cd "$(dirname "$0")/.."
dp_flags=()
if [ "${1:-}" = "--no-torch" ]; then
  dp_flags+=(--no-torch)
  shift
fi
build=${1:-build}
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

if [ ! -f "$build/build.ninja" ]; then
  meson setup "$build" || { echo "run_benchmarks: meson setup $build failed" >&2; exit 2; }
fi

# name | build targets | command
benches=(
  "gpt_block|bench/nn/gpt_block_bench|$build/bench/nn/gpt_block_bench"
  "tp_block|bench/tp/tp_block_bench|$build/bench/tp/tp_block_bench"
  "dp|bench/dp/dp_bench bench/dp/dp_bench_mpi|bash bench/dp/run_dp_bench.sh ${dp_flags[*]:-} $build"
  "pipe|bench/pipe/pipe_bench|$build/bench/pipe/pipe_bench"
  "parameter_server|bench/ps/ps_bench|$build/bench/ps/ps_bench"
  "comm|bench/comm/comm_bench|mpirun --oversubscribe -np 2 -x OPENBLAS_NUM_THREADS=1 $build/bench/comm/comm_bench"
  "harden|bench/harden/collective_checker_bench|$build/bench/harden/collective_checker_bench"
)

# Only the benchmarks named in BENCHES, when it is set.
if [ -n "${BENCHES:-}" ]; then
  selected=()
  for b in "${benches[@]}"; do
    [[ " $BENCHES " == *" ${b%%|*} "* ]] && selected+=("$b")
  done
  benches=("${selected[@]}")
  [ "${#benches[@]}" -gt 0 ] || { echo "run_benchmarks: BENCHES=\"$BENCHES\" names no benchmark" >&2; exit 2; }
fi

# Build only the benchmark targets this build has (dp_bench_mpi and comm_bench need MPI, the dp
# and pipe benches CLI11).
known=$(ninja -C "$build" -t targets all 2>/dev/null | sed -n 's/^\(bench\/[^:]*\): .*/\1/p')
wanted=()
for b in "${benches[@]}"; do
  IFS='|' read -r _ targets _ <<<"$b"
  for t in $targets; do
    grep -qx "$t" <<<"$known" && wanted+=("$t")
  done
done
build_ok=1
if [ "${#wanted[@]}" -gt 0 ]; then  # (meson compile without targets would build everything)
  echo "# building: ${wanted[*]}"
  nice meson compile -C "$build" "${wanted[@]}" || build_ok=0
fi

logdir="$build/bench-logs"
mkdir -p "$logdir"
declare -A result seconds
worst=0  # 0 all ok, 1 a target missed or not measured, 2 a check failed or a benchmark broke
for b in "${benches[@]}"; do
  IFS='|' read -r name targets cmd <<<"$b"
  exe=${targets%% *}
  if ! grep -qx "$exe" <<<"$known"; then  # this build has no such target (no MPI, no CLI11)
    result[$name]="NOT MEASURED (not in build)"
    seconds[$name]="--"
    [ "$worst" -lt 1 ] && worst=1
    continue
  fi
  if [ ! -x "$build/$exe" ]; then
    result[$name]="NOT BUILT (build failed)"
    seconds[$name]="--"
    worst=2
    continue
  fi
  echo
  echo "################ $name: $cmd"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  $cmd 2>&1 | tee "$logdir/$name.log"
  rc=${PIPESTATUS[0]}
  seconds[$name]=$(printf '%.0f' "$(echo "$(date +%s.%N) - $start" | bc -l)")
  case $rc in
    0) result[$name]="ok" ;;
    1) result[$name]="TARGET MISSED"; [ "$worst" -lt 1 ] && worst=1 ;;
    2) result[$name]="CHECK FAILED"; worst=2 ;;
    3) result[$name]="NOT MEASURED (no PyTorch)"; [ "$worst" -lt 1 ] && worst=1 ;;
    *) result[$name]="ERROR (exit $rc)"; worst=2 ;;
  esac
done

echo
echo "################ summary ($build; logs in $logdir)"
printf '%-18s %-28s %8s\n' "benchmark" "result" "seconds"
for b in "${benches[@]}"; do
  IFS='|' read -r name _ _ <<<"$b"
  printf '%-18s %-28s %8s\n' "$name" "${result[$name]}" "${seconds[$name]}"
  # the target and check lines of the run, indented
  if [ -f "$logdir/$name.log" ] && [ "${seconds[$name]}" != "--" ]; then
    grep -E 'target|check|FAILED|run_dp_bench:' "$logdir/$name.log" | grep -v '^check tessera\|^check torch\|^scenario\|^check (what' | sed 's/^/    /' | head -n 12
  fi
done
[ "$build_ok" = 1 ] || { echo "run_benchmarks: the build failed"; worst=2; }
exit "$worst"
