#!/usr/bin/env bash
# Convergence of compressed and infrequently synchronized data parallelism on the main job's
# model (scripts/main_job.sh: 6 layers, d_model 192, 6 heads, context 128, global batch 32,
# 400 steps, KJV bytes), at dp 4 on the threads backend: one run per dp communication policy,
# each writing its loss curve (CSV) and log under OUT; then a summary table (final validation
# loss, its difference from the uncompressed run, dp MB per step) on stdout.
# Usage: bash bench/compress/convergence.sh [BUILD_DIR] [OUT] [policy...]
#   policies: none bf16 powersgd:4 topk:0.01 diloco:10 (default: all five); a compressor may carry
#   options (--compress's syntax, e.g. powersgd:4,warmup=20 or topk:0.01,momentum=0.9,sparsity_warmup=40;
#   a top-k with momentum=M, Deep Gradient Compression's momentum correction, runs with
#   --momentum 0 added last: it replaces SGD's momentum, so give TRAIN_GPT_ARGS="--optimizer sgd ..."),
#   and diloco:H,lr=X,momentum=Y sets the outer optimizer (--outer-lr, --outer-momentum);
#   diloco:1,lr=1,momentum=0,compress=topk:0.01 compresses each replica's AdamW update instead
#   of its gradient (--sync-every 1 --compress: the pseudo-gradients go through the compressor);
#   a trailing ,freeze=N on any policy adds --freeze-variance N (AdamW's second moment frozen
#   after N steps, 1-bit Adam), e.g. powersgd:4,warmup=20,freeze=20.
# TRAIN_GPT_ARGS="--lr 1.5e-3 --clip 0" adds train_gpt flags to every run (the log's first
#   line names them); TRAIN_GPT_ARGS="--optimizer sgd --lr 0.1" runs every policy with momentum
#   SGD (momentum 0.9), the papers' optimizer (docs/compression.md, session 19).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-build}
out=${2:-data/compress}
shift $(( $# > 2 ? 2 : $# ))
policies=("$@")
[ ${#policies[@]} -gt 0 ] || policies=(none bf16 powersgd:4 topk:0.01 diloco:10)
[ -s data/kjv.txt ] || bible "Gen1:1-Rev22:21" > data/kjv.txt
mkdir -p "$out"
export OPENBLAS_NUM_THREADS=1
for p in "${policies[@]}"; do
  name=${p//[:.,=]/_}
  extra=()
  q=$p
  if [[ $q == *,freeze=* ]]; then extra=(--freeze-variance "${q##*,freeze=}"); q=${q%,freeze=*}; fi
  case $q in
    none) flags=() ;;
    diloco:*)
      IFS=, read -ra opt <<< "${q#diloco:}"
      flags=(--sync-every "${opt[0]}")
      for o in "${opt[@]:1}"; do
        case $o in
          lr=*) flags+=(--outer-lr "${o#lr=}") ;;
          momentum=*) flags+=(--outer-momentum "${o#momentum=}") ;;
          compress=*) flags+=(--compress "${o#compress=}") ;;
          *) echo "convergence.sh: unknown DiLoCo option '$o' in '$p' (lr=X, momentum=Y, compress=C)" >&2; exit 2 ;;
        esac
      done ;;
    *) flags=(--compress "$q") ;;
  esac
  echo "== $p" >&2
  start=$(date +%s)
  read -ra more <<< "${TRAIN_GPT_ARGS:-}"
  if [[ $q == topk:*momentum=* ]]; then more+=(--momentum 0); fi
  echo "convergence.sh: $p, TRAIN_GPT_ARGS='${TRAIN_GPT_ARGS:-}'" > "$out/$name.log"
  "$dir/examples/train_gpt" --data data/kjv.txt --dp 4 --layers 6 --d-model 192 --heads 6 --context 128 --batch 32 \
    --steps 400 --log-every 20 --val-every 50 --sample-len 0 --loss-csv "$out/$name.csv" "${flags[@]}" "${extra[@]}" "${more[@]}" >> "$out/$name.log" 2>&1
  echo "$p: $(( $(date +%s) - start )) s" >&2
done
# Summary: final validation loss (the last step's), mean dp MB/step over the progress lines.
base=$(grep 'validation loss' "$out/none.log" 2>/dev/null | tail -1 | awk '{print $5}')
printf '%-12s %10s %10s %12s\n' policy val_loss vs_none dp_MB/step
for p in "${policies[@]}"; do
  name=${p//[:.,=]/_}
  v=$(grep 'validation loss' "$out/$name.log" | tail -1 | awk '{print $5}')
  mb=$(grep -o 'dp [0-9.e+-]* MB/step' "$out/$name.log" | awk '{s += $2; n++} END {if (n) printf "%.4g", s / n}')
  rel=$(awk -v v="$v" -v b="$base" 'BEGIN {if (b > 0) printf "%+.2f%%", 100 * (v - b) / b; else print "-"}')
  printf '%-12s %10s %10s %12s\n' "$p" "$v" "$rel" "$mb"
done
