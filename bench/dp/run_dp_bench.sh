#!/usr/bin/env bash
# DataParallel benchmark: tessera (threads backend: bare model, 1 rank, 2 ranks bucketed / per
# parameter / without overlap; MPI backend: 2 processes, when built) and PyTorch 1.13 DDP with
# gloo on the same model and batch, interleaved round by round in one run, then a table of medians
# and ratios with the targets (evaluated for the threads backend, tessera's default):
#   - tessera's data-parallel overhead <= half of PyTorch DDP's, where on both sides the overhead
#     is T(DP, 2 ranks) - T(the same framework's bare model, 1 rank, no DP wrapper)
#   - tessera's 2-rank step time below PyTorch DDP's
# Model: MLP of 4 x (Linear(1024, 1024) + ReLU), batch 64 per rank, SGD, 1 BLAS thread per rank.
#
# Every run is also checked (the programs print "check ..." lines and exit non-zero on a failure):
# tessera's DataParallel runs must apply the updates of the bare model trained on the global
# batch (within 1e-4) with every replica bitwise equal (bench/dp/dp_bench_model.hpp); PyTorch
# DDP's replicas must be bitwise equal after the run (each rank has its own input).
#
# Usage: bash bench/dp/run_dp_bench.sh [--no-torch] [BUILD_DIR]   (ROUNDS=5 STEPS=20 WARMUP=3 in
# the environment). PyTorch is Debian's python3-torch, importable only by /usr/bin/python3.
#
# Exit status:
#   0  every check passed and both targets were met
#   1  a target was missed
#   2  a check failed (a run did not compute what it should), or a program failed
#   3  PyTorch is not importable, so the targets could not be measured (pass --no-torch to
#      measure tessera alone; then no target is evaluated and the status is 0 or 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
no_torch=0
if [ "${1:-}" = "--no-torch" ]; then
  no_torch=1
  shift
fi
build=${1:-build}
bench="$build/bench/dp/dp_bench"
bench_mpi="$build/bench/dp/dp_bench_mpi"
rounds=${ROUNDS:-5}
steps=${STEPS:-20}
warmup=${WARMUP:-3}
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

[ -x "$bench" ] || { echo "dp_bench not built: run 'meson compile -C $build bench/dp/dp_bench' first" >&2; exit 2; }

py=${TORCH_PYTHON:-/usr/bin/python3}  # the interpreter with PyTorch (override for a test)
torch_ok=0
if [ "$no_torch" = 0 ]; then
  if "$py" -c "import torch" 2>/dev/null; then
    torch_ok=1
  else
    echo "########################################################################################" >&2
    echo "# run_dp_bench.sh: PyTorch is not importable by $py: the PyTorch rows and both targets" >&2
    echo "# CANNOT be measured. Install it (apt-get install python3-torch) or pass --no-torch." >&2
    echo "# tessera's rows are still measured and checked; the exit status will be 3." >&2
    echo "########################################################################################" >&2
  fi
fi

failed=0  # a program exited non-zero (its check failed, or it crashed)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for ((r = 0; r < rounds; r++)); do
  if ! "$bench" --rounds 1 --steps "$steps" --warmup "$warmup" |
       sed -E "s/^(check )?tessera ([a-z0-9_]+) 0 /\1tessera \2 $r /" | tee -a "$log"; then
    echo "# dp_bench failed in round $r" >&2
    failed=1
  fi
  if [ -x "$bench_mpi" ] && command -v mpirun >/dev/null; then
    if ! OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -np 2 -x OPENBLAS_NUM_THREADS=1 \
         "$bench_mpi" --steps "$steps" --warmup "$warmup" --round "$r" | tee -a "$log"; then
      echo "# dp_bench_mpi failed in round $r" >&2
      failed=1
    fi
  fi
  if [ "$torch_ok" = 1 ]; then
    for mode in single ddp; do
      if ! "$py" bench/dp/torch_ddp.py --mode "$mode" --steps "$steps" --warmup "$warmup" --round "$r" | tee -a "$log"; then
        echo "# torch_ddp.py --mode $mode failed in round $r" >&2
        failed=1
      fi
    done
  fi
done

status=0
python3 - "$log" "$torch_ok" "$no_torch" "$failed" <<'PY' || status=$?
import math, statistics, sys
rows, checks = {}, {}
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) == 4 and p[0] in ("tessera", "torch"):
        rows.setdefault(f"{p[0]} {p[1]}", []).append(float(p[3]))
    elif len(p) == 7 and p[0] == "check":
        checks.setdefault(f"{p[1]} {p[2]}", []).append((float(p[4]), p[5] == "1", p[6] == "ok"))
torch_ok, no_torch, failed = sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4] == "1"
med = {k: statistics.median(v) for k, v in rows.items()}
names = {
    "tessera serial": "tessera, bare model, 1 thread",
    "tessera dp1": "tessera DataParallel, 1 rank",
    "tessera dp2": "tessera DataParallel, 2 ranks (25 MiB buckets, overlap)",
    "tessera dp2_per_param": "tessera, 2 ranks, one all-reduce per parameter",
    "tessera dp2_no_overlap": "tessera, 2 ranks, buckets reduced after backward",
    "tessera allreduce2": "tessera threads all_reduce of the 16.8 MB of gradients",
    "tessera mpi_dp2": "tessera DataParallel on MPI, 2 processes",
    "tessera mpi_allreduce2": "tessera MPI all_reduce of the 16.8 MB of gradients",
    "torch single": "PyTorch 1.13, bare model, 1 thread",
    "torch ddp2": "PyTorch 1.13 DDP gloo, 2 processes",
}
print()
print(f"{'configuration':58s} {'ms/step (median)':>17s}  rounds")
for k, label in names.items():
    if k in med:
        print(f"{label:58s} {med[k]:17.2f}  {len(rows[k])}")
    elif k.startswith("torch"):
        why = "--no-torch" if no_torch else "NOT MEASURED: python3-torch not importable by /usr/bin/python3"
        print(f"{label:58s} {'--':>17s}  ({why})")
    elif k.startswith("tessera mpi"):
        print(f"{label:58s} {'--':>17s}  (not run: dp_bench_mpi not built or no mpirun)")

# The checks: what every timed run computed.
print()
print(f"{'check (what the timed runs computed)':58s} {'worst error':>12s}  replicas equal  result")
check_failed = failed
expected = ["tessera dp1", "tessera dp2", "tessera dp2_per_param", "tessera dp2_no_overlap"]
if torch_ok:
    expected.append("torch ddp2")
for k in expected:
    if k not in checks:
        print(f"{k:58s} {'--':>12s}  {'--':>14s}  MISSING")
        check_failed = True
for k, v in checks.items():
    worst = max((e if math.isfinite(e) else math.inf) for e, _, _ in v)
    equal = all(eq for _, eq, _ in v)
    ok = all(o for _, _, o in v)
    check_failed = check_failed or not ok
    what = "vs serial on the global batch" if k.startswith("tessera") else "max |difference| between ranks"
    print(f"{k + ' (' + what + ')':58s} {worst:12.3e}  {'yes' if equal else 'NO':>14s}  {'ok' if ok else 'FAILED'}")

needed = ["tessera serial", "tessera dp1", "tessera dp2", "tessera dp2_per_param", "tessera dp2_no_overlap"]
if any(k not in med for k in needed):
    print("run_dp_bench: FAILED: tessera rows missing (a program failed): " + ", ".join(k for k in needed if k not in med))
    sys.exit(2)
t0, t1, t2 = med["tessera serial"], med["tessera dp1"], med["tessera dp2"]
print()
print(f"bucketed vs one all-reduce per parameter: {med['tessera dp2_per_param'] / t2:.2f}x (per-parameter time / bucketed time)")
print(f"overlap on vs off:                        {med['tessera dp2_no_overlap'] / t2:.2f}x (no-overlap time / overlap time)")
print(f"scaling, 2 ranks vs bare model:           {t2 / t0:.2f}x step time at the same per-rank batch "
      f"({2 * t0 / t2:.2f}x samples per second)")
print(f"DataParallel wrapper on 1 rank:           {t1 - t0:+.2f} ms against the bare model")
ovh = t2 - t0
print(f"tessera data-parallel overhead T(DP 2) - T(bare):  {ovh:.2f} ms")
if "tessera mpi_dp2" in med:
    print(f"tessera on MPI, overhead T(DP 2) - T(bare):        {med['tessera mpi_dp2'] - t0:.2f} ms")
targets_missed = False
if torch_ok and "torch ddp2" in med and "torch single" in med:
    tovh = med["torch ddp2"] - med["torch single"]
    print(f"PyTorch DDP overhead T(DDP 2) - T(bare):           {tovh:.2f} ms")
    r1 = ovh / tovh if tovh > 0 else math.inf
    r2 = t2 / med["torch ddp2"]
    ok1, ok2 = r1 <= 0.5, r2 < 1
    targets_missed = not (ok1 and ok2)
    print(f"target 1: tessera overhead / DDP overhead = {r1:.2f} (<= 0.50): {'met' if ok1 else 'NOT met'}")
    print(f"target 2: tessera 2-rank step / DDP step  = {r2:.2f} (< 1.00): {'met' if ok2 else 'NOT met'}")
    if "tessera mpi_dp2" in med:
        m1 = (med["tessera mpi_dp2"] - t0) / tovh if tovh > 0 else math.inf
        print(f"(MPI backend: overhead ratio {m1:.2f}, step ratio {med['tessera mpi_dp2'] / med['torch ddp2']:.2f})")
elif no_torch:
    print("targets against PyTorch DDP not evaluated (--no-torch)")
else:
    print("TARGETS NOT MEASURED: PyTorch is not importable (install python3-torch, or pass --no-torch)")

print()
if check_failed:
    print("run_dp_bench: FAILED: a check failed or a program exited non-zero (see above)")
    sys.exit(2)
if not no_torch and not torch_ok:
    print("run_dp_bench: INCOMPLETE: the PyTorch targets could not be measured")
    sys.exit(3)
if targets_missed:
    print("run_dp_bench: a target was NOT met")
    sys.exit(1)
print("run_dp_bench: checks passed" + ("" if no_torch else ", targets met"))
PY
exit "$status"
