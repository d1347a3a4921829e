#!/usr/bin/env bash
# train_gpt --device cuda: where CUDA sees no device, every device run is refused with the
# runtime's reason and exit code 2 (no hang, nothing trained); the layout and flag refusals name
# their values on any machine; where a GPU exists, 6 steps train, save, and resume on the CPU, and
# dp 2 (ZeRO 0 to 3), tp 2 (with and without sequence parallelism), dp 2 x tp 2 (ZeRO-1 and
# ZeRO-2 with accumulation; ZeRO-3), dp 2 x pp 2 with ZeRO-2, pp 2 (1F1B, GPipe) and
# dp 2 x pp 2 x tp 2 on the GPU (threads sharing it) equal the serial CPU run (--verify).
# Usage: train_gpt_device_check.sh TRAIN_GPT DATA_FILE [MPIRUN (Open MPI's mpirun; given where
#        train_gpt has the MPI backend)]
set -uo pipefail
exe=$1 data=$2 mpirun=${3:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
expect() {  # exit code, message fragment, args...
  local code=$1 msg=$2; shift 2
  local out rc
  out=$(timeout 60 "$exe" --data "$data" "$@" 2>&1); rc=$?
  if [[ $rc != "$code" || "$out" != *"$msg"* ]]; then
    echo "FAIL: train_gpt $* -> exit $rc (expected $code), output: $out"
    fails=$((fails + 1))
  else
    echo "ok: train_gpt $* -> exit $rc: $(echo "$out" | head -n 1)"
  fi
}
expect 2 "--virtual-stages 2 is for --schedule interleaved (got --schedule 1f1b)" --device cuda --pp 2 --virtual-stages 2 --steps 2
expect 2 "num_microbatches % group = 3 % 2 = 1 must be 0 or >= pp_size = 2" --device cuda --pp 2 --schedule interleaved --virtual-stages 2 --microbatches 3 --batch 6 --steps 2
expect 2 "--pp 4 x --virtual-stages 2 = 8 stages, but a GPT of 2 layers has 4" --device cuda --pp 4 --schedule interleaved --virtual-stages 2 --layers 2 --steps 2
expect 2 "give --microbatches 4 instead of --accum 2" --device cuda --pp 2 --accum 2 --steps 2
expect 2 "--schedule, --microbatches and --virtual-stages are for a pipeline" --device cuda --schedule gpipe --steps 2
expect 2 "--pp 5 x --virtual-stages 1 = 5 stages, but a GPT of 2 layers has 4 pipeline layers" --device cuda --pp 5 --layers 2 --steps 2
expect 2 "--batch 6 does not split into --dp 1 x 4 micro-batches" --device cuda --pp 2 --microbatches 4 --batch 6 --steps 2
expect 2 "dp x tp x pp = 8 x 4 x 4 = 128 ranks as threads" --device cuda --dp 8 --tp 4 --pp 4 --heads 8 --batch 64 --steps 2
expect 2 "--tp 3 does not divide --heads 4" --device cuda --tp 3 --heads 4 --steps 2
expect 2 "dp x tp x pp = 16 x 8 x 1 = 128 ranks as threads; at most 64" --device cuda --dp 16 --tp 8 --heads 8 --batch 64 --steps 2
expect 2 "--recompute is not used on the device" --device cuda --recompute full --steps 2
expect 2 "--inject-fault is not used on the device" --device cuda --inject-fault throw@1:0 --steps 2
expect 2 "--compress and --sync-every are not built on the device yet" --device cuda --dp 2 --compress bf16 --steps 2
expect 2 "--device cuda --zero 3 with --schedule zb-h1" --device cuda --dp 2 --pp 2 --zero 3 --schedule zb-h1 --microbatches 4 --steps 2
expect 2 "--device cuda --zero 2 with --schedule zb-h1" --device cuda --dp 2 --pp 2 --zero 2 --schedule zb-h1 --microbatches 4 --steps 2
expect 2 "--dtype bf16 is for --device cuda" --dtype bf16 --steps 2
expect 2 "--attention flash is for --device cuda" --attention flash --steps 2
expect 2 "--attention: fused not in" --device cuda --attention fused --steps 2
expect 2 "--attention flash takes a head dimension (--d-model / --heads = 512 / 2 = 256) of at most 128" --device cuda --attention flash --d-model 512 --heads 2 --steps 2
expect 2 "--device: gpu not in" --device gpu --steps 2
expect 2 "--plan auto plans CPU ranks" --device cuda --plan auto --world 2 --steps 2
if ! grep -q -- "--device" <<<"$("$exe" --help)"; then echo "FAIL: --help does not list --device"; fails=$((fails + 1)); fi
if [[ -n "${TESSERA_CUDA_GPU:-}" ]] || nvidia-smi -L >/dev/null 2>&1; then
  out=$(timeout 120 "$exe" --device cuda --data "$data" --steps 6 --layers 2 --d-model 32 --heads 2 --context 16 \
        --batch 4 --sample-len 0 --val-every 3 --save "$tmp/ck" 2>&1); rc=$?
  echo "$out" | tail -n 4
  [[ $rc == 0 && -f "$tmp/ck/index.json" ]] || { echo "FAIL: a GPU run (exit $rc)"; fails=$((fails + 1)); }
  timeout 120 "$exe" --data "$data" --resume "$tmp/ck" --steps 8 --layers 2 --d-model 32 --heads 2 --context 16 \
    --batch 4 --sample-len 0 --val-every 0 --dp 2 || { echo "FAIL: the GPU checkpoint resumed on the CPU"; fails=$((fails + 1)); }
  # dp 2 on the one GPU (threads, DeviceDataParallel) against the serial CPU run (--verify).
  for zero in 0 1 2 3; do
    out=$(timeout 180 "$exe" --device cuda --dp 2 --accum 2 --zero $zero --data "$data" --steps 6 --layers 2 --d-model 32 \
          --heads 2 --context 16 --batch 8 --sample-len 0 --val-every 3 --verify --save "$tmp/dp2z$zero" 2>&1); rc=$?
    echo "$out" | tail -n 3
    [[ $rc == 0 ]] || { echo "FAIL: --device cuda --dp 2 --zero $zero --verify (exit $rc)"; fails=$((fails + 1)); }
  done
  # tp 2 and dp 2 x tp 2 (each rank its shard of every block) against the serial CPU run; the
  # checkpoint holds the whole model and resumes on the CPU at dp 2.
  # pp 2 (1F1B and GPipe) and dp 2 x pp 2 x tp 2: each rank one stage, the tied wte's copies summed.
  for layout in "--tp 2" "--dp 2 --tp 2" "--dp 2 --bucket-mb 0.01" "--dp 2 --bucket-mb 0.01 --zero 2 --accum 2" "--tp 2 --sequence-parallel" "--dp 2 --tp 2 --zero 1 --accum 2" "--dp 2 --tp 2 --zero 2 --accum 2" "--dp 2 --pp 2 --zero 2" "--dp 2 --tp 2 --zero 3" \
                "--dp 2 --pp 2 --zero 3" "--dp 2 --pp 2 --schedule interleaved --virtual-stages 2 --microbatches 4 --zero 3" "--pp 2" \
                "--pp 2 --schedule gpipe --microbatches 4" "--dp 2 --pp 2 --tp 2 --sequence-parallel --zero 1" \
                "--pp 2 --schedule interleaved --virtual-stages 2 --microbatches 4" "--pp 2 --schedule zb-h1 --microbatches 4" \
                "--attention flash" "--dp 2 --tp 2 --sequence-parallel --attention flash" \
                "--pp 2 --schedule zb-h1 --microbatches 4 --attention flash"; do
    out=$(timeout 180 "$exe" --device cuda $layout --data "$data" --steps 6 --layers 2 --d-model 32 --heads 2 \
          --context 16 --batch 8 --sample-len 0 --val-every 3 --verify --save "$tmp/tp" 2>&1); rc=$?
    echo "$out" | tail -n 3
    [[ $rc == 0 ]] || { echo "FAIL: --device cuda $layout --verify (exit $rc)"; fails=$((fails + 1)); }
    timeout 120 "$exe" --data "$data" --resume "$tmp/tp" --steps 8 --layers 2 --d-model 32 --heads 2 --context 16 \
      --batch 8 --sample-len 0 --val-every 0 --dp 2 >/dev/null || \
      { echo "FAIL: the --device cuda $layout checkpoint resumed on the CPU"; fails=$((fails + 1)); }
  done
  # Processes under mpirun, one GPU each through NCCL: at world 1 on a one-GPU machine (MPIRUN:
  # meson passes it where train_gpt has the MPI backend).
  if [[ -n "$mpirun" ]]; then
    out=$(timeout 180 "$mpirun" --allow-run-as-root -np 1 "$exe" --device cuda --backend mpi --data "$data" --steps 6 \
          --layers 2 --d-model 32 --heads 2 --context 16 --batch 8 --sample-len 0 --val-every 3 --verify 2>&1); rc=$?
    echo "$out" | tail -n 3
    [[ $rc == 0 ]] || { echo "FAIL: mpirun -np 1 --device cuda --backend mpi --verify (exit $rc)"; fails=$((fails + 1)); }
  fi
  # ZeRO-1 changes where AdamW's state lives, not the arithmetic: the weights and AdamW's state
  # saved equal those of plain dp 2 byte for byte.
  for f in "$tmp"/dp2z0/*.safetensors; do
    cmp -s "$f" "$tmp/dp2z1/$(basename "$f")" || \
      { echo "FAIL: --zero 1 on the device changed $(basename "$f")"; fails=$((fails + 1)); }
  done
else
  # No GPU: the device run is refused with the runtime's reason, exit 2 (nothing started).
  expect 2 "no CUDA device" --device cuda --steps 2 --layers 1 --d-model 16 --heads 2 --context 8 --batch 2
  expect 2 "no CUDA device" --device cuda --dp 2 --steps 2 --layers 1 --d-model 16 --heads 2 --context 8 --batch 2
  expect 2 "no CUDA device" --device cuda --tp 2 --steps 2 --layers 1 --d-model 16 --heads 2 --context 8 --batch 2
  expect 2 "no CUDA device" --device cuda --pp 2 --steps 2 --layers 1 --d-model 16 --heads 2 --context 8 --batch 2
  expect 2 "no CUDA device" --device cuda --dp 2 --backend mpi --steps 2 --layers 1 --d-model 16 --heads 2 --context 8 --batch 2
fi
[[ $fails == 0 ]] && echo "train_gpt --device checks: all passed" || echo "train_gpt --device checks: $fails failed"
exit $((fails > 0))
