#!/usr/bin/env bash
# Tokens/s of the main job's model (examples/train_gpt, scripts/main_job.sh's sizes) at every
# layout of 2 ranks against 1 rank, measured side by side in one run (threads backend,
# OPENBLAS_NUM_THREADS=1 per rank). Prints one line per layout and its ratio to 1 rank.
# Usage: bash bench/hybrid/run_layout_bench.sh [BUILD_DIR] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-build}
steps=${2:-40}
mkdir -p data
[ -s data/kjv.txt ] || bible "Gen1:1-Rev22:21" > data/kjv.txt
export OPENBLAS_NUM_THREADS=1
model=(--data data/kjv.txt --layers 6 --d-model 192 --heads 6 --context 128 --batch 32 --steps "$steps"
       --val-every 0 --sample-len 0 --warmup 5)
run() {  # label, layout flags...
  local label=$1; shift
  # tokens/s of the whole run after the first step (the first step pays one-time costs)
  local out
  out=$("$dir/examples/train_gpt" "${model[@]}" "$@" --log-every 1 | grep '^step' | tail -n +2 |
        awk '{s += $7; n++} END {printf "%.0f", s / n}')
  echo "$label $out"
}
base=$(run "1 rank (dp1 pp1 tp1)" --dp 1 --microbatches 1 | awk '{print $NF}')
echo "layout                      tokens/s   vs 1 rank"
printf "%-28s %8s   %.2f\n" "1 rank (dp1 pp1 tp1)" "$base" 1
for layout in "--dp 2 --microbatches 1" "--pp 2 --dp 1 --microbatches 4" "--tp 2 --dp 1 --microbatches 1"; do
  # shellcheck disable=SC2086
  t=$(run x $layout | awk '{print $NF}')
  printf "%-28s %8s   %.2f\n" "$(echo $layout | sed 's/--microbatches [0-9]*//; s/--//g')" "$t" "$(echo "$t / $base" | bc -l)"
done
