#!/usr/bin/env bash
# gpu_check.sh: every GPU check and benchmark of tessera, prepared on the build machine (which has
# nvcc, the CUDA 13 libraries, NCCL, OpenBLAS and the header-only libraries, but no GPU) and run on
# the GPU machine (which has the driver, cuBLASLt, cuDNN, NCCL and PyTorch, but no OpenBLAS or
# build dependencies). Designed to finish in under 6 minutes of device time;
# GPU_CHECK_BUDGET bounds it. The device run (tool `run`, carry [".gpu"], timeout_s 470):
#   set -o pipefail; GPU_CHECK_SANITIZE=1 bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu.log
# Each figure is also appended to $OUT/figures.txt as it is measured (a killed run keeps them).
#
#   bash scripts/gpu_check.sh --prepare   # build machine: Meson release build (-Dcuda=enabled
#                                         # -Dnccl=enabled) of the GPU programs, packed with the
#                                         # shared libraries the GPU machine lacks and the KJV text
#                                         # into .gpu/ (ignored by git; name .gpu in the run's carry)
#   bash scripts/gpu_check.sh             # GPU machine: unpack .gpu, then run these sections, in
#                                         # this order (issue 12's one-GPU checks first):
#     1   every CUDA device test case in its own process (a CUDA error ends the process's context,
#         so one case's failure cannot hide the others): every kernel and cuBLASLt product against
#         the CPU layers; DeviceGPT against the CPU GPT over 20 AdamW steps; data, tensor and
#         pipeline parallelism as threads sharing the GPU; the Llama example's device kernels,
#         layer and model against its CPU layers;
#     3b  train_gpt --device cuda --verify: 20 fp32 steps against the serial CPU run (1e-4), with the
#         unfused attention and with the fused kernels (--attention flash);
#     3   train_gpt --device cuda for 200 steps on the KJV in fp32, bf16 and bf16 with the fused
#         attention (tensor cores): each bf16 curve within 2% of fp32;
#     4   checkpoints across devices: a GPU run's checkpoint resumed on the CPU at dp 2, and a CPU
#         run's resumed on the GPU;
#     2   training speed of DeviceGPT and of PyTorch on the same models, side by side: the main
#         job's model (6 layers, d 192, context 128, batch 32) in fp32 and bf16, GPT-2 124M (12
#         layers, d 768, context 1024, batch 16) in bf16, unfused and fused attention (--attention
#         flash: the tensor-core kernels; flash-cuda-cores: the CUDA-core ones); tokens/s, step time, MFU against 989
#         TFLOP/s (bench/cuda/gpt_device_bench.cu, bench/cuda/pytorch_gpt.py);
#     1d  example 06: the Llama (examples/llama) trained on the GPU against the CPU run, alone and
#         at dp 2 x tp 2 x pp 2 (threads sharing the GPU);
#     3c-3e  --verify at dp 2 and 4, tp 2 and 4 (and with sequence parallelism), dp 2 x tp 2, ZeRO-1,
#         pp 2 (1F1B, GPipe, interleaved, ZB-H1) and dp 2 x pp 2 x tp 2, as threads sharing the GPU;
#     2b  DeviceDataParallel at dp 2 on the GPU: the reduction overlapped with backward, after it,
#         and none (bench/cuda/device_dp_bench.cu);
#     1b  the NCCL tests; 5  NCCL all_reduce on 1 GPU, through tessera and raw;
#   and ends with a table of every figure. Exit status 0 when every check passed.
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python3, else python3), GPU_CHECK_QUICK=1
# (fewer timed steps), GPU_CHECK_ONLY="1 3b 4" (run only these sections), GPU_CHECK_ORDER
# (another order), GPU_CHECK_SANITIZE=1 (the first test case failing with a CUDA error runs again
# under compute-sanitizer), GPU_CHECK_MAX_TIMEOUT=S (no command runs longer than S seconds), GPU_CHECK_BUDGET=S (default
# 430, 0 for none: no command runs past S seconds from the start, and what would start after it is
# reported as NOT RUN, which fails the check, so that the figures table still comes back inside
# the device run's limit).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
T0=$SECONDS
say() { printf '\n=== %s (t=%ds)\n' "$*" $((SECONDS - T0)); }

if [[ "${1:-}" == "--prepare" ]]; then
  BUILD=${BUILD:-build-gpu}
  say "configure $BUILD (release, CUDA + NCCL)"
  if [[ ! -f "$BUILD/build.ninja" ]]; then
    meson setup "$BUILD" --buildtype=release -Dcuda=enabled -Dnccl=enabled -Dmpi=disabled -Dtest_level=core \
      -Dbench=true -Dexamples=true > /tmp/gpu_check_setup.log 2>&1 || { tail -20 /tmp/gpu_check_setup.log; exit 1; }
  fi
  targets=(cuda_host_test cuda_gpu_test nccl_test nccl_bench gpt_device_bench device_dp_bench train_gpt 06_llama_on_gpu)
  say "build ${targets[*]}"
  nice meson compile -C "$BUILD" "${targets[@]}" || exit 1
  rm -rf .gpu/stage && mkdir -p .gpu/stage/bin .gpu/stage/lib .gpu/stage/data
  cp "$BUILD/tests/cuda/cuda_host_test" "$BUILD/tests/cuda/cuda_gpu_test" "$BUILD/tests/nccl/nccl_test" \
     "$BUILD/bench/nccl/nccl_bench" "$BUILD/bench/cuda/gpt_device_bench" "$BUILD/bench/cuda/device_dp_bench" \
     "$BUILD/examples/train_gpt" "$BUILD/examples/06_llama_on_gpu" .gpu/stage/bin/
  strip .gpu/stage/bin/* 2>/dev/null
  # The GPU machine lacks OpenBLAS and the Fortran runtime it links (ENVIRONMENT.md).
  for lib in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
    path=$(ldd "$BUILD/examples/train_gpt" | awk -v l="$lib" '$1 == l {print $3}')
    [[ -z "$path" ]] && path=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')
    [[ -n "$path" ]] && cp -L "$path" .gpu/stage/lib/ || echo "note: $lib not found here"
  done
  [[ -s data/kjv.txt ]] || { mkdir -p data && command -v bible >/dev/null && bible "Gen1:1-Rev22:21" > data/kjv.txt; }
  [[ -f data/kjv.txt ]] && cp data/kjv.txt .gpu/stage/data/ || echo "note: data/kjv.txt missing (run scripts/main_job.sh once)"
  # Which source the binaries were built from (plain mode prints it: a stale payload shows).
  { git rev-parse HEAD; echo "uncommitted changes: $(git status --porcelain --untracked-files=no | wc -l) files"; date -u; } \
    > .gpu/stage/BUILT_FROM 2>/dev/null
  tar -C .gpu/stage -cJf .gpu/payload.tar.xz . && rm -rf .gpu/stage
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
  du -sh .gpu/payload.tar.xz
  echo "prepared .gpu/payload.tar.xz; name .gpu in the device run's carry list and run: bash scripts/gpu_check.sh"
  exit 0
fi

# ---- on the GPU machine ---------------------------------------------------------------------
[[ -f .gpu/payload.tar.xz ]] || { echo "FAIL: .gpu/payload.tar.xz missing: run scripts/gpu_check.sh --prepare on the build machine and carry .gpu"; exit 1; }
RUN=${TMPDIR:-/tmp}/tessera-gpu
rm -rf "$RUN" && mkdir -p "$RUN" || { echo "FAIL: mkdir $RUN"; exit 1; }
# GNU tar needs the xz program for .tar.xz; Python's tarfile does not (it has lzma built in).
if ! tar -C "$RUN" -xJf .gpu/payload.tar.xz 2>/dev/null; then
  echo "note: tar -xJf failed (no xz?); unpacking with Python's tarfile"
  rm -rf "$RUN" && mkdir -p "$RUN"
  for p in python3 /opt/torch/.venv/bin/python3; do
    "$p" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .gpu/payload.tar.xz "$RUN" 2>/dev/null &&
      { unpacked=1; break; }
  done
  [[ -n "${unpacked:-}" ]] || { echo "FAIL: unpack .gpu/payload.tar.xz (neither tar -J nor Python's tarfile)"; exit 1; }
fi
export LD_LIBRARY_PATH="$RUN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OPENBLAS_NUM_THREADS=1
BIN=$RUN/bin
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  for p in /opt/torch/.venv/bin/python3 python3; do command -v "$p" >/dev/null 2>&1 && { PYTHON=$p; break; }; done
fi
STEPS=20
[[ -n "${GPU_CHECK_QUICK:-}" ]] && STEPS=8
# The device run's limit is 470 s here (docs/gpu.md): by default no command runs past 430 s from
# the start, so that the table is printed before the run is killed.
GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-430}
for v in GPU_CHECK_BUDGET GPU_CHECK_MAX_TIMEOUT; do
  [[ -z "${!v:-}" || "${!v}" =~ ^[0-9]+$ ]] || { echo "FAIL: $v='${!v}' is not a whole number of seconds"; exit 2; }
done
[[ "$GPU_CHECK_BUDGET" == 0 ]] && GPU_CHECK_BUDGET=   # 0: no budget
# Where the device run collects files ($OUT): each figure is appended there as it is measured, so
# that a run killed before the end still returns the rows it had.
FIGURES=
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then FIGURES=$OUT/figures.txt; : > "$FIGURES"; fi
status=0
declare -a table=()
row() {
  local r; r=$(printf '%-58s %s' "$1" "$2"); table+=("$r")
  [[ -n "$FIGURES" ]] && printf '%s\n' "$r" >> "$FIGURES"
  return 0
}
fail() { echo "FAIL: $*"; status=1; row "FAIL" "$*"; }
# not_run WHAT...: a "NOT RUN" row (the check does not pass) and the section named for a rerun.
not_run() { echo "NOT RUN: $*"; status=1; row "NOT RUN" "$*"; cut_short; }
# verdict RC WHAT...: nothing for 0; a "NOT RUN" row for a command the budget left out (tmo's
# 125: the check did not pass, but nothing failed); else a FAIL row with the exit status.
verdict() {
  local rc=$1; shift
  [[ $rc == 0 ]] && return 0
  if cut_by_budget "$rc"; then not_run "$* (the budget was spent)"; else fail "$* (exit $rc)"; fi
  return 1
}
# tmo SECONDS command...: timeout (SIGKILL 10 s after SIGTERM), capped by GPU_CHECK_MAX_TIMEOUT
# and by the budget left; exit 125 without running when the budget is spent (not run, not failed).
NOT_RUN=125
tmo() {
  local limit=$1; shift
  [[ -n "${GPU_CHECK_MAX_TIMEOUT:-}" ]] && (( limit > GPU_CHECK_MAX_TIMEOUT )) && limit=$GPU_CHECK_MAX_TIMEOUT
  if [[ -n "${GPU_CHECK_BUDGET:-}" ]]; then
    local left=$((GPU_CHECK_BUDGET - (SECONDS - T0)))
    (( left < 1 )) && { echo "not run (the budget of ${GPU_CHECK_BUDGET} s is spent): $*"; return $NOT_RUN; }
    (( limit > left )) && limit=$left
  fi
  timeout -k 10 "$limit" "$@"
}
# cut_short: the current section did not run whole (for the rerun line at the end).
declare -a unfinished=()
cut_short() { [[ " ${unfinished[*]} " == *" ${section:-?} "* ]] || unfinished+=("${section:-?}"); }
# budget_spent: true once no command would run any more.
budget_spent() { [[ -n "${GPU_CHECK_BUDGET:-}" ]] && (( SECONDS - T0 >= GPU_CHECK_BUDGET )); }
# cut_by_budget RC: the command was not run, or was stopped, because the budget ran out (tmo's
# 125, or timeout's 124 / SIGKILL's 137 at the budget's end; SECONDS counts whole seconds).
cut_by_budget() {
  [[ -n "${GPU_CHECK_BUDGET:-}" ]] && [[ $1 == "$NOT_RUN" || $1 == 124 || $1 == 137 ]] &&
    (( SECONDS - T0 >= GPU_CHECK_BUDGET - 2 ))
}
# begin SECTION TITLE: announce a section; false when GPU_CHECK_ONLY leaves it out or the budget is spent.
begin() {
  local id=$1; shift
  if [[ -n "${GPU_CHECK_ONLY:-}" && " $GPU_CHECK_ONLY " != *" $id "* ]]; then return 1; fi
  say "$id. $*"
  if budget_spent; then
    section=$id; not_run "section $id (the budget of ${GPU_CHECK_BUDGET} s was spent)"; return 1
  fi
  return 0
}

say "machine"
timeout -k 5 20 nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
timeout -k 5 20 nvidia-smi --query-gpu=name,driver_version,memory.total,persistence_mode --format=csv,noheader 2>/dev/null
[[ -f "$RUN/BUILT_FROM" ]] && { echo "payload built from:"; sed 's/^/  /' "$RUN/BUILT_FROM"; }
echo "this tree: $(git rev-parse HEAD 2>/dev/null || echo '(not a git checkout)')"
# The CUDA, cuBLASLt and NCCL libraries come from this machine's loader path (ENVIRONMENT.md);
# where one is missing, PyTorch's bundled copies are tried before the programs fail on it.
missing=$(for b in "$BIN"/*; do ldd "$b" 2>/dev/null | awk '/not found/ {print $1}'; done | sort -u)
if [[ -n "$missing" ]]; then
  echo "libraries not found: $(echo $missing)"
  for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib; do
    [[ -d "$d" ]] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
  done
  export LD_LIBRARY_PATH
  missing=$(for b in "$BIN"/*; do ldd "$b" 2>/dev/null | awk '/not found/ {print $1}'; done | sort -u)
  [[ -n "$missing" ]] && fail "libraries not found (the programs that need them fail): $(echo $missing)"
fi

# The main job's model (sections 2 and 3).
main_model=(--layers 6 --d-model 192 --heads 6 --context 128 --batch 32)

sec_1() {
  tmo 60 "$BIN/cuda_host_test" --no-colors | tail -n 3; verdict "${PIPESTATUS[0]}" "cuda_host_test"
  mapfile -t cases < <(tmo 30 "$BIN/cuda_gpu_test" --list-test-cases --no-colors 2>&1 | awk '/^=+$/ {n++; next} n == 1')
  if (( ${#cases[@]} == 0 )); then
    fail "cuda_gpu_test lists no test cases: $(tmo 30 "$BIN/cuda_gpu_test" --no-colors 2>&1 | tail -n 2)"
  fi
  passed=0; failed=0; not_run=0
  for c in "${cases[@]}"; do
    if budget_spent; then not_run=$((not_run + 1)); cut_short; continue; fi
    t1=$SECONDS
    out=$(tmo 120 "$BIN/cuda_gpu_test" --no-colors -tc="${c//,/?}" 2>&1); rc=$?
    if cut_by_budget "$rc"; then not_run=$((not_run + 1)); cut_short; echo "NOT RUN (budget) $c"; continue; fi
    if [[ $rc == 0 ]] && grep -qE 'test cases: *1 \| *1 passed' <<< "$out"; then
      passed=$((passed + 1)); echo "PASS ($((SECONDS - t1)) s) $c"
    else
      failed=$((failed + 1)); echo "FAIL (exit $rc, $((SECONDS - t1)) s) $c"
      grep -vE '^\s*$' <<< "$out" | tail -n 40
      fail "cuda_gpu_test: ${c:0:70}"
      # The first case that fails with a CUDA error or a signal runs again under compute-sanitizer.
      if [[ -n "${GPU_CHECK_SANITIZE:-}" && -z "${sanitized:-}" ]] && command -v compute-sanitizer >/dev/null &&
         { (( rc > 128 )) || grep -qiE 'cuda|illegal|misaligned|cublas|cudnn' <<< "$out"; }; then
        sanitized=1
        echo "--- compute-sanitizer (memcheck) on this case:"
        tmo 90 compute-sanitizer --tool memcheck --print-limit 10 "$BIN/cuda_gpu_test" --no-colors -tc="${c//,/?}" 2>&1 |
          grep -vE '^\s*$' | head -n 60
      fi
    fi
  done
  row "cuda_gpu_test: test cases passed / listed" "$passed / ${#cases[@]}"
  (( not_run > 0 )) && row "NOT RUN" "cuda_gpu_test: $not_run cases (the budget was spent)"
  return 0
}
sec_1d() {
  out=$(tmo 120 "$BIN/06_llama_on_gpu" 2>&1); rc=$?
  echo "$out" | tail -n 8
  verdict $rc "06_llama_on_gpu"
  row "Llama on one GPU vs CPU (10 steps)" "$(echo "$out" | grep -o 'max relative loss difference .*' | head -n 1)"
  row "Llama on one GPU: step time" "$(echo "$out" | grep -o 'fp32 .* ms, bf16 .* ms')"
  # The same model composed: dp 2 x tp 2 x pp 2 (1F1B) as 8 threads sharing the GPU.
  out=$(tmo 180 "$BIN/06_llama_on_gpu" --dp 2 --tp 2 --pp 2 2>&1); rc=$?
  echo "$out" | tail -n 3
  verdict $rc "06_llama_on_gpu --dp 2 --tp 2 --pp 2"
  row "Llama dp 2 x tp 2 x pp 2 on one GPU vs CPU (10 steps)" "$(echo "$out" | grep -o 'dp 2 x tp 2 x pp 2.*')"
}
sec_1b() {
  tmo 60 "$BIN/nccl_test" --host-only --no-colors | tail -n 3; verdict "${PIPESTATUS[0]}" "nccl_test --host-only"
  tmo 240 "$BIN/nccl_test" --no-colors 2>&1 | tail -n 4; verdict "${PIPESTATUS[0]}" "nccl_test"
}
sec_2() {
  bench() {  # name, dtype, args...
    local name=$1 dtype=$2; shift 2
    local t p out ph
    local rc
    out=$(tmo 240 "$BIN/gpt_device_bench" --name "$name" --dtype "$dtype" --steps "$STEPS" "$@" 2>&1); rc=$?
    if cut_by_budget "$rc"; then verdict "$rc" "gpt_device_bench $name $dtype"; return; fi
    t=$(grep '^tessera ' <<< "$out" | tail -n 1); ph=$(grep '^phases ' <<< "$out" | tail -n 1)
    [[ -z "$t" ]] && t=$(tail -n 1 <<< "$out")
    echo "$t"
    [[ -n "$ph" ]] && { echo "$ph"; row "$name $dtype phases (ms per step)" "${ph#*: }"; }
    if [[ "$name" == *-flash* ]]; then  # the same model as the row before: PyTorch's figure again
      p=${last_pytorch:-"pytorch: no figure"}
      echo "pytorch: the row above's figure"
    elif [[ -n "$PYTHON" ]]; then
      p=$(tmo 240 "$PYTHON" bench/cuda/pytorch_gpt.py --name "$name" --dtype "$dtype" --steps "$STEPS" "$@" 2>&1 | tail -n 1
          exit "${PIPESTATUS[0]}"); rc=$?
      cut_by_budget "$rc" && { verdict "$rc" "pytorch_gpt.py $name $dtype"; p="pytorch: not run"; }
      echo "$p"
      last_pytorch=$p
    else
      p="pytorch: no python"
    fi
    local tt pt
    tt=$(echo "$t" | awk '$1 == "tessera" {print $5}'); pt=$(echo "$p" | awk '$1 == "pytorch" {print $5}')
    [[ -z "$tt" ]] && fail "gpt_device_bench $name $dtype: $t"
    row "$name $dtype tokens/s: tessera / pytorch" "${tt:-?} / ${pt:-?}  (ratio $(awk -v a="${tt:-0}" -v b="${pt:-0}" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "?"}'))"
    row "$name $dtype MFU: tessera / pytorch" "$(echo "$t" | awk '$1 == "tessera" {print $9}') / $(echo "$p" | awk '$1 == "pytorch" {print $9}')"
  }
  bench main-job fp32 "${main_model[@]}"
  bench main-job bf16 "${main_model[@]}"
  bench gpt2-124m bf16 --layers 12 --d-model 768 --heads 12 --context 1024 --batch 16 --vocab 50304
  bench gpt2-124m-flash bf16 --layers 12 --d-model 768 --heads 12 --context 1024 --batch 16 --vocab 50304 --attention flash
  bench gpt2-124m-flash-cuda-cores bf16 --layers 12 --d-model 768 --heads 12 --context 1024 --batch 16 --vocab 50304 \
    --attention flash-cuda-cores
}
sec_2b() {
  d=$(tmo 180 "$BIN/device_dp_bench" --dp 2 2>&1); rc=$?
  echo "$d"
  row "dp 2 on one GPU step ms: none / end / overlap" "$(echo "$d" | awk '/^step_ms/ {print $3 " / " $5 " / " $7}')"
  row "dp 2 exposed reduction ms: end / overlap (hidden share)" "$(echo "$d" | awk '/^step_ms/ {print $10 " / " $12 " (" $14 ")"}')"
  row "dp 2 step ms: plain / ZeRO-1 / ZeRO-2 / ZeRO-3 (overlapped)" "$(echo "$d" | awk '/^zero_step_ms/ {print $3 " / " $5 " / " $7 " / " $9}')"
  row "dp 2 device peak MB (both ranks): plain / ZeRO-1 / ZeRO-2 / ZeRO-3" "$(echo "$d" | awk '/^zero_step_ms/ {print $12 " / " $14 " / " $16 " / " $18}')"
  verdict $rc "device_dp_bench"
}
sec_3() {
  curve() {  # name dtype [train_gpt flags...] -> $RUN/curve_<name>.jsonl
    local name=$1 dtype=$2; shift 2
    tmo 240 "$BIN/train_gpt" --device cuda --dtype "$dtype" --data "$RUN/data/kjv.txt" "${main_model[@]}" --steps 200 \
      --lr 1e-3 --warmup 20 --val-every 50 --log-every 50 --sample-len 0 --log-json "$RUN/curve_$name.jsonl" "$@"
  }
  # compare_curve NAME LABEL: the curve against fp32's (within 2% after the first steps).
  compare_curve() {
    local name=$1 label=$2 cmp worst va vb ta tb
    [[ -s "$RUN/curve_fp32.jsonl" && -s "$RUN/curve_$name.jsonl" ]] || return 0
    cmp=$("${PYTHON:-python3}" - "$RUN/curve_fp32.jsonl" "$RUN/curve_$name.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
n = min(len(a), len(b))
worst = max(abs(b[i]["loss"] - a[i]["loss"]) / abs(a[i]["loss"]) for i in range(10, n))  # after the first steps
va = [r["val_loss"] for r in a if "val_loss" in r][-1]; vb = [r["val_loss"] for r in b if "val_loss" in r][-1]
tps = lambda rs: sum(r["tokens_per_s"] for r in rs[20:]) / max(1, len(rs[20:]))
print(f"{worst:.4f} {va:.4f} {vb:.4f} {tps(a):.0f} {tps(b):.0f}")
PY
    )
    read -r worst va vb ta tb <<< "$cmp"
    [[ -n "$worst" ]] || { fail "$label: the curve comparison failed (a cut or non-finite curve?)"; return; }
    row "KJV 200 steps: largest |$label - fp32| / fp32 loss (steps 10+)" "$worst (target <= 0.02)"
    row "KJV 200 steps: final validation loss fp32 / $label" "$va / $vb"
    row "train_gpt --device cuda tokens/s fp32 / $label" "$ta / $tb"
    awk -v w="$worst" 'BEGIN{ exit !(w <= 0.02) }' || fail "$label loss curve differs from fp32 by $worst (> 2%)"
  }
  curve fp32 fp32; verdict $? "train_gpt --device cuda --dtype fp32 (200 steps)"
  curve bf16 bf16; verdict $? "train_gpt --device cuda --dtype bf16 (200 steps)"
  curve bf16-flash bf16 --attention flash; verdict $? "train_gpt --device cuda --dtype bf16 --attention flash (200 steps)"
  compare_curve bf16 bf16
  compare_curve bf16-flash "bf16 flash (tensor cores)"
}
# A layout's --verify run against the serial CPU run, and its step time over 3b's dp 1:
# verify_layout STEPS TIMEOUT TARGET LAYOUT-FLAGS... (a hang must not use up the device time of
# the sections after it: each run has its own timeout).
verify_layout() {
  local steps=$1 limit=$2 target=$3; shift 3
  local v rc tokn
  v=$(tmo "$limit" "$BIN/train_gpt" --device cuda --dtype fp32 "$@" --verify --data "$RUN/data/kjv.txt" \
      --steps "$steps" --sample-len 0 --val-every 0 --log-every 5 2>&1); rc=$?
  echo "$v" | tail -n 3
  tokn=$(echo "$v" | grep -oE '[0-9]+ tokens/s' | tail -n 1 | awk '{print $1}')
  row "train_gpt --device cuda $* --verify (fp32, $steps steps)" "$(echo "$v" | grep -o 'largest relative loss difference.*' | head -n 1)"
  row "step time ($*) / dp 1 on one GPU$target" "$(awk -v a="${tok1:-0}" -v b="${tokn:-0}" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "?"}')"
  verdict $rc "train_gpt --device cuda $* --verify"
}
sec_3b() {
  v=$(tmo 240 "$BIN/train_gpt" --device cuda --dtype fp32 --verify --data "$RUN/data/kjv.txt" --steps 20 \
      --sample-len 0 --val-every 0 --log-every 10 2>&1); rc=$?
  echo "$v" | tail -n 3
  row "train_gpt --device cuda --verify (fp32, 20 steps)" "$(echo "$v" | grep -o 'largest relative loss difference.*' | head -n 1)"
  verdict $rc "train_gpt --device cuda --verify"
  tok1=$(echo "$v" | grep -oE '[0-9]+ tokens/s' | tail -n 1 | awk '{print $1}')
  # The fused attention kernels in the same trainer (FlashAttention-2's algorithm).
  verify_layout 20 240 " (fused attention)" --attention flash
}
sec_3c() {
  verify_layout 20 240 " (target dp 2 <= 1.15)" --dp 2
  verify_layout 20 240 " (1 MiB buckets: several reduced during backward)" --dp 4 --bucket-mb 1
  verify_layout 10 120 " (ZeRO-2: per-bucket gradient buffers)" --dp 2 --zero 2 --accum 2
  verify_layout 10 120 " (ZeRO-3: the weights gathered bucket by bucket)" --dp 2 --zero 3
}
sec_3d() {
  verify_layout 10 90 "" --tp 2
  verify_layout 10 90 "" --tp 4
  verify_layout 10 90 "" --dp 2 --tp 2
  verify_layout 10 90 "" --tp 2 --sequence-parallel
  verify_layout 10 90 "" --dp 2 --tp 2 --zero 1 --sequence-parallel
  verify_layout 10 90 "" --dp 2 --tp 2 --zero 2 --sequence-parallel
}
sec_3e() {
  verify_layout 10 90 " (the issue's pp 2 figure)" --pp 2
  verify_layout 10 90 "" --pp 2 --schedule gpipe --microbatches 4
  verify_layout 10 90 "" --dp 2 --pp 2 --tp 2 --sequence-parallel
  verify_layout 10 90 "" --pp 2 --schedule interleaved --virtual-stages 2 --microbatches 4
  verify_layout 10 90 "" --pp 2 --schedule zb-h1 --microbatches 4
  verify_layout 10 90 "" --dp 2 --pp 2 --zero 2
  verify_layout 10 90 "" --dp 2 --pp 2 --zero 3
}
sec_4() {
  ck() { tmo 240 "$BIN/train_gpt" --data "$RUN/data/kjv.txt" --sample-len 0 --val-every 0 --log-every 5 "$@"; }
  rm -rf "$RUN/ck_gpu" "$RUN/ck_cpu"
  local rc
  ck --device cuda --steps 10 --save "$RUN/ck_gpu" && ck --dp 2 --resume "$RUN/ck_gpu" --steps 14; rc=$?
  verdict "$rc" "GPU checkpoint resumed on the CPU" && row "GPU checkpoint resumed on the CPU at dp 2" "ok"
  ck --dp 2 --steps 10 --save "$RUN/ck_cpu" && ck --device cuda --resume "$RUN/ck_cpu" --steps 14; rc=$?
  verdict "$rc" "CPU checkpoint resumed on the GPU" && row "CPU checkpoint (dp 2) resumed on the GPU" "ok"
}
sec_5() {
  tmo 120 "$BIN/nccl_bench" -b 4K -e 256M -f 4 -n 20 -w 5 | tail -n 10; verdict "${PIPESTATUS[0]}" "nccl_bench"
}
declare -A title=(
  [1]="tests: every CUDA device test case in its own process (a CUDA error ends the context, so one case's failure cannot hide the others): kernels and products vs the CPU layers, DeviceGPT vs the CPU GPT, tensor parallelism, pipelines, the Llama example's device layers"
  [1d]="example 06: the Llama (examples/llama) on one GPU, against the serial CPU Llama, fp32 and bf16 step time; then at dp 2 x tp 2 x pp 2 as threads sharing the GPU"
  [1b]="tests: NCCL"
  [2]="speed: tessera (DeviceGPT) and PyTorch on the same models"
  [2b]="data parallelism on one GPU (threads): reduction overlapped with backward vs after it vs none; ZeRO-1, 2 and 3 step time and device peak"
  [3]="train_gpt --device cuda, 200 steps on the KJV: fp32 and bf16"
  [3b]="train_gpt --device cuda --verify: 20 steps against the serial CPU run in the same process"
  [3c]="train_gpt --device cuda --dp 2 and 4 (threads sharing the GPU, DeviceDataParallel) --verify: 20 steps; --dp 2 --zero 2 --accum 2, --dp 2 --zero 3: 10 steps"
  [3d]="train_gpt --device cuda --tp 2, --tp 4, --dp 2 --tp 2, --tp 2 --sequence-parallel, with ZeRO-1 and ZeRO-2 (threads sharing the GPU, DeviceGPT tensor parallelism) --verify: 10 steps"
  [3e]="train_gpt --device cuda --pp 2 (1F1B, GPipe, interleaved with 2 chunks, ZB-H1), --dp 2 --pp 2 --tp 2, --dp 2 --pp 2 --zero 2 and --zero 3 (threads sharing the GPU, DevicePipeline) --verify: 10 steps"
  [4]="checkpoints across devices"
  [5]="NCCL all_reduce on 1 GPU, through tessera and raw (issue 13: tessera / raw <= 1.02 above 1 MiB)"
)
for id in ${GPU_CHECK_ONLY:-} ${GPU_CHECK_ORDER:-}; do
  [[ -n "${title[$id]:-}" ]] || { echo "FAIL: no section '$id' (GPU_CHECK_ONLY / GPU_CHECK_ORDER); sections: ${!title[*]}"; exit 2; }
done
# Issue 12's checks (one GPU) first, then the policies on the device (issue 13): a budget cut
# leaves out the last.
for id in ${GPU_CHECK_ORDER:-1 3b 3 4 2 1d 3c 3d 3e 2b 1b 5}; do
  [[ -n "${title[$id]:-}" ]] || { fail "no section $id"; continue; }
  begin "$id" "${title[$id]}" && { section=$id; "sec_$id"; }
done

say "figures"
printf '%s\n' "${table[@]}"
if (( ${#unfinished[@]} > 0 )); then
  echo "cut short by the budget: sections ${unfinished[*]}; run them next with GPU_CHECK_ONLY=\"${unfinished[*]}\""
  [[ -n "$FIGURES" ]] && echo "rerun: GPU_CHECK_ONLY=\"${unfinished[*]}\"" >> "$FIGURES"
fi
say "done: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
