#!/usr/bin/env bash
# DataParallel benchmark: tessera (threads backend; 1 rank, 2 ranks bucketed / per parameter /
# without overlap) and PyTorch 1.13 DDP with gloo on the same model and batch, interleaved round
# by round in one run, then a table of medians and ratios with the targets:
#   - tessera's data-parallel overhead T(2 ranks) - T(1 rank) <= half of PyTorch DDP's
#   - tessera's 2-rank step time below PyTorch DDP's
# Model: MLP of 4 x (Linear(1024, 1024) + ReLU), batch 64 per rank, SGD, 1 BLAS thread per rank.
#
# Usage: bash bench/dp/run_dp_bench.sh [BUILD_DIR]    (ROUNDS=5 STEPS=20 in the environment)
# PyTorch comes from Debian's python3-torch, importable only by /usr/bin/python3; the script
# installs it with apt-get when missing (as root), else prints a skip line for the PyTorch rows.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
bench="$build/bench/dp/dp_bench"
rounds=${ROUNDS:-5}
steps=${STEPS:-20}
warmup=${WARMUP:-3}
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

[ -x "$bench" ] || { echo "dp_bench not built: run 'meson compile -C $build dp_bench' first" >&2; exit 1; }

py=/usr/bin/python3
torch_ok=0
if "$py" -c "import torch" 2>/dev/null; then
  torch_ok=1
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "# installing python3-torch with apt-get" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-torch) >&2 || true
  "$py" -c "import torch" 2>/dev/null && torch_ok=1
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for ((r = 0; r < rounds; r++)); do
  "$bench" --rounds 1 --steps "$steps" --warmup "$warmup" | sed "s/^tessera \([a-z0-9_]*\) 0 /tessera \1 $r /" | tee -a "$log"
  if [ "$torch_ok" = 1 ]; then
    "$py" bench/dp/torch_ddp.py --mode single --steps "$steps" --warmup "$warmup" --round "$r" | tee -a "$log"
    "$py" bench/dp/torch_ddp.py --mode ddp --steps "$steps" --warmup "$warmup" --round "$r" | tee -a "$log"
  fi
done

python3 - "$log" "$torch_ok" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) == 4 and p[0] in ("tessera", "torch"):
        rows.setdefault(f"{p[0]} {p[1]}", []).append(float(p[3]))
torch_ok = sys.argv[2] == "1"
med = {k: statistics.median(v) for k, v in rows.items()}
names = {
    "tessera serial": "tessera, bare model, 1 thread",
    "tessera dp1": "tessera DataParallel, 1 rank",
    "tessera dp2": "tessera DataParallel, 2 ranks (25 MiB buckets, overlap)",
    "tessera dp2_per_param": "tessera, 2 ranks, one all-reduce per parameter",
    "tessera dp2_no_overlap": "tessera, 2 ranks, buckets reduced after backward",
    "tessera allreduce2": "tessera threads all_reduce of the 16.8 MB of gradients",
    "torch single": "PyTorch 1.13, bare model, 1 thread",
    "torch ddp2": "PyTorch 1.13 DDP gloo, 2 processes",
}
print()
print(f"{'configuration':58s} {'ms/step (median)':>17s}  rounds")
for k, label in names.items():
    if k in med:
        print(f"{label:58s} {med[k]:17.2f}  {len(rows[k])}")
    elif k.startswith("torch"):
        print(f"{label:58s} {'skipped':>17s}  (python3-torch not importable by /usr/bin/python3)")
t1, t2 = med["tessera dp1"], med["tessera dp2"]
print()
print(f"bucketed vs one all-reduce per parameter: {med['tessera dp2_per_param'] / t2:.2f}x (per-parameter time / bucketed time)")
print(f"overlap on vs off:                        {med['tessera dp2_no_overlap'] / t2:.2f}x (no-overlap time / overlap time)")
print(f"scaling, 2 ranks vs 1 rank:               {t2 / t1:.2f}x step time at the same per-rank batch "
      f"({2 * t1 / t2:.2f}x samples per second)")
ovh = t2 - t1
print(f"tessera data-parallel overhead T(2) - T(1): {ovh:.2f} ms")
if torch_ok and "torch ddp2" in med:
    tovh = med["torch ddp2"] - med["torch single"]
    print(f"PyTorch DDP overhead T(2) - T(1):           {tovh:.2f} ms")
    r1 = ovh / tovh if tovh > 0 else float("inf")
    r2 = t2 / med["torch ddp2"]
    print(f"target 1: tessera overhead / DDP overhead = {r1:.2f} (<= 0.50): {'PASS' if r1 <= 0.5 else 'FAIL'}")
    print(f"target 2: tessera 2-rank step / DDP step  = {r2:.2f} (< 1.00): {'PASS' if r2 < 1 else 'FAIL'}")
else:
    print("PyTorch rows skipped: targets against DDP not evaluated")
PY
