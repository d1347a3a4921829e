#!/usr/bin/env bash
# The main job's program end to end on a tiny model (seconds): a dp 2 x pp 2 x tp 2 run whose
# first 20 steps are verified against the serial run (each step's loss within a relative 1e-5,
# recomputed here from the printed values), a checkpoint resumed at dp 1 x tp 4 and sampled at
# pp 2 x tp 2, the consolidated GPT-2 file evaluated at tp 1 and at pp 2 x tp 2 (the same
# cross-entropy to the printed 4 decimals), a run under mpirun (when given) whose losses equal
# the single-rank run's within a relative 1e-5, and bad input failing with a message that names
# the numbers.
# Usage: train_gpt_check.sh TRAIN_GPT CONSOLIDATE [MPIRUN]
set -euo pipefail
train=$1
consolidate=$2
mpirun=${3:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OPENBLAS_NUM_THREADS=1
fail() { echo "FAIL: $*"; exit 1; }

# The tolerance, stated once: relative, per step. Losses of a parallel layout and of the serial
# (or single-rank) run differ by fp32 round-off in the order of the reductions (measured: at
# most 9e-8 over these 20 steps, 0 for the mpi run); the loss CSV carries 6 significant digits,
# 1e-5 absolute or 2e-6 relative for these losses (4.7 to 5.6), so 1e-5 leaves room for the
# rounding of both sides and still fails a loss that is off by 1e-4 of itself.
verify_steps=20
loss_tol=1e-5

# check_verify LOG: LOG's per-step "verify:" lines cover steps 0..verify_steps-1, every loss is
# finite and each parallel loss is within loss_tol (relative) of the serial one.
check_verify() {
  python3 - "$1" "$verify_steps" "$loss_tol" <<'PY'
import math, re, sys
log, n, tol = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rows = [m.groups() for m in re.finditer(r"^verify: step +(\d+) +loss (\S+) +serial (\S+)", open(log, encoding="latin-1").read(), re.M)]
steps = [int(s) for s, _, _ in rows]
if steps != list(range(n)):
    sys.exit(f"FAIL: verified steps {steps}, expected 0..{n - 1}")
worst = 0.0
for s, a, b in rows:
    a, b = float(a), float(b)
    e = abs(a - b) / abs(b) if math.isfinite(a) and math.isfinite(b) and b != 0 else math.inf
    if not e <= tol:
        sys.exit(f"FAIL: step {s}: loss {a} vs serial {b}, relative difference {e:.3g} > {tol}")
    worst = max(worst, e)
print(f"ok: {n} verified steps, largest relative loss difference {worst:.3g} <= {tol}")
PY
}

# compare_losses A.csv B.csv: the same steps in both loss CSVs (--loss-csv), every loss finite
# and within loss_tol (relative).
compare_losses() {
  python3 - "$1" "$2" "$loss_tol" <<'PY'
import csv, math, sys
a, b = ({int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(open(p))} for p in sys.argv[1:3])
tol = float(sys.argv[3])
if sorted(a) != sorted(b) or not a:
    sys.exit(f"FAIL: steps {sorted(a)} vs {sorted(b)}")
worst = 0.0
for s in sorted(a):
    e = abs(a[s] - b[s]) / abs(b[s]) if math.isfinite(a[s]) and math.isfinite(b[s]) and b[s] != 0 else math.inf
    if not e <= tol:
        sys.exit(f"FAIL: step {s}: loss {a[s]} vs {b[s]}, relative difference {e:.3g} > {tol}")
    worst = max(worst, e)
print(f"ok: {len(a)} steps, largest relative loss difference {worst:.3g} <= {tol}")
PY
}

# A small corpus (repetitive, so a few steps learn something).
for i in $(seq 1 400); do echo "In the beginning God created the heaven and the earth. And the earth was without form."; done > "$work/text.txt"
model=(--layers 2 --d-model 32 --heads 4 --context 16 --batch 8 --warmup 2 --val-every 0 --log-every 1)

echo "== dp 2 x pp 2 x tp 2 (ZeRO-1, weight-decay groups, embedding dropout), verified against the serial run, saved"
"$train" --data "$work/text.txt" "${model[@]}" --dp 2 --pp 2 --tp 2 --microbatches 2 --steps $verify_steps --verify \
  --zero1 --weight-decay 0.1 --dropout 0.1 \
  --save "$work/ckpt" --sample-len 20 --loss-svg "$work/loss.svg" | tee "$work/a.log"
grep -q "verify: largest relative loss difference vs the serial run over the first $verify_steps steps" "$work/a.log" \
  || fail "no verify line"
check_verify "$work/a.log"
grep -q "compute .*comm .*bubble" "$work/a.log" || fail "no progress shares"
[ -s "$work/ckpt/index.json" ] || fail "no checkpoint index"
grep -q "<svg" "$work/loss.svg" || fail "no loss picture"

echo "== --optimizer sgd (momentum, weight decay) at dp 2 x pp 2 x tp 2 with ZeRO-1, verified against serial SGD"
"$train" --data "$work/text.txt" "${model[@]}" --dp 2 --pp 2 --tp 2 --microbatches 2 --steps $verify_steps --verify \
  --zero1 --optimizer sgd --lr 0.1 --momentum 0.9 --weight-decay 0.01 --sample-len 0 | tee "$work/sgd.log"
check_verify "$work/sgd.log"
echo "== --optimizer sgd --momentum 0 with top-k's momentum correction (DGC) at dp 2: trains, 1/10 of the entries sent"
"$train" --data "$work/text.txt" "${model[@]}" --dp 2 --steps 10 --optimizer sgd --lr 0.1 --momentum 0 \
  --compress topk:0.1,momentum=0.9 --sample-len 0 | tee "$work/dgc.log"
grep -q "dp sent .* (compression topk:0.1,momentum=0.9)" "$work/dgc.log" || fail "no DGC compression line"

echo "== dp 1 x pp 2 x tp 2 with sequence parallelism, verified against the serial run, sampled"
"$train" --data "$work/text.txt" "${model[@]}" --dp 1 --pp 2 --tp 2 --sequence-parallel --microbatches 2 \
  --steps $verify_steps --verify --sample-len 21 | tee "$work/sp.log"
grep -q "sequence parallel" "$work/sp.log" || fail "no sequence-parallel line"
grep -q -- "--- sample ---" "$work/sp.log" || fail "no sample under sequence parallelism"
check_verify "$work/sp.log"

echo "== the last stage's rank files hold no copy of the tied embedding (saved once, from the first stage)"
python3 - "$work/ckpt" <<'PY'
import json, struct, sys, pathlib
d = pathlib.Path(sys.argv[1])
for f in sorted(d.glob("*-rank*.safetensors")):
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    names = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
    rank = int(f.stem.split("rank")[1])
    has = any(k.startswith("wte.weight") for k in names)
    # dp 2 x pp 2 x tp 2: world ranks 0-3 hold pp stage 0, 4-7 the last stage
    if rank >= 4 and has:
        sys.exit(f"FAIL: {f.name} holds a copy of wte.weight")
print("ok: wte.weight only in the first stage's files")
PY

echo "== resumed at dp 1 x tp 4 (another layout), 2 more steps"
"$train" --data "$work/text.txt" "${model[@]}" --dp 1 --tp 4 --steps $((verify_steps + 2)) --resume "$work/ckpt" \
  --sample-len 0 | tee "$work/b.log"
grep -q "resumed .*step $verify_steps, saved at dp=2 pp=2 tp=2, now dp=1 pp=1 tp=4" "$work/b.log" || fail "resume line"
grep -q "step   $((verify_steps + 1))  loss" "$work/b.log" || fail "did not continue to step $((verify_steps + 1))"

echo "== sampled from the checkpoint at pp 2 x tp 2"
"$train" "${model[@]}" --resume "$work/ckpt" --generate --pp 2 --tp 2 --dp 1 --sample-len 30 --prompt "In the" | tee "$work/c.log"
grep -q "sampled at dp=1 pp=2 tp=2" "$work/c.log" || fail "no sample"

echo "== consolidated GPT-2 file evaluated at tp 1 and at pp 2 x tp 2"
"$consolidate" "$work/ckpt" "$work/model.safetensors"
python3 -c "print(' '.join(str(b) for b in open('$work/text.txt','rb').read()[:200]))" > "$work/ids.txt"
"$train" --eval-model "$work/model.safetensors" --eval-tokens "$work/ids.txt" --heads 4 --dp 1 | tee "$work/d.log"
"$train" --eval-model "$work/model.safetensors" --eval-tokens "$work/ids.txt" --heads 4 --dp 1 --pp 2 --tp 2 | tee "$work/e.log"
ce1=$(sed -n 's/.*mean cross-entropy \([^ ]*\).*/\1/p' "$work/d.log")
ce2=$(sed -n 's/.*mean cross-entropy \([^ ]*\).*/\1/p' "$work/e.log")
# Printed with 4 decimals: equal to within one unit of the last (forward-only round-off is ~1e-6).
python3 -c "import math,sys; a,b=float(sys.argv[1]),float(sys.argv[2]); sys.exit(0 if math.isfinite(a) and abs(a-b)<=1e-4 else 1)" \
  "$ce1" "$ce2" || fail "cross-entropy at tp 1 ($ce1) differs from pp 2 x tp 2 ($ce2) by more than 1e-4"

echo "== bad input (each caught before the first step)"
"$train" --data "$work/text.txt" --layers 2 --d-model 32 --heads 4 --context 16 --batch 8 --steps 3 --val-every 0 \
  --sample-len 0 > "$work/w.log" 2>&1 || { cat "$work/w.log"; fail "a 3-step run with the default warmup of 20 failed"; }
mkdir -p "$work/notckpt" && echo x > "$work/notckpt/file"
if "$train" --data "$work/text.txt" "${model[@]}" --steps 2 --save "$work/notckpt" > "$work/s.log" 2>&1; then fail "--save over a non-checkpoint accepted"; fi
grep -q "neither empty nor a checkpoint" "$work/s.log" || { cat "$work/s.log"; fail "--save message"; }
grep -q "^step" "$work/s.log" && fail "--save was checked only after training"
if "$train" --data "$work/text.txt" "${model[@]}" --steps $verify_steps --resume "$work/ckpt" > "$work/r.log" 2>&1; then
  fail "--steps $verify_steps = the checkpoint's step accepted"
fi
grep -q "steps $verify_steps is not beyond the checkpoint's step $verify_steps" "$work/r.log" \
  || { cat "$work/r.log"; fail "resume steps message"; }
if "$train" --data "$work/text.txt" "${model[@]}" --steps 2 --lr inf > "$work/l.log" 2>&1; then fail "--lr inf accepted"; fi
grep -q "\-\-lr inf must be a finite positive number" "$work/l.log" || { cat "$work/l.log"; fail "--lr message"; }
if "$consolidate" "$work/ckpt" "$work/ckpt/model-rank00000.safetensors" > "$work/k.log" 2>&1; then fail "consolidating into the checkpoint accepted"; fi
grep -q "lies inside the checkpoint directory" "$work/k.log" || { cat "$work/k.log"; fail "consolidate message"; }
# The same output given relative to the checkpoint directory (weakly_canonical left it relative
# and it passed), and --config-json into the checkpoint (it replaced index.json) or onto the output.
if (c=$(realpath "$consolidate") && cd "$work/ckpt" && "$c" . new.safetensors) > "$work/k.log" 2>&1; then fail "a relative output inside the checkpoint accepted"; fi
grep -q "lies inside the checkpoint directory" "$work/k.log" || { cat "$work/k.log"; fail "relative consolidate message"; }
[ -e "$work/ckpt/new.safetensors" ] && fail "the relative output was written into the checkpoint"
if "$consolidate" "$work/ckpt" "$work/m.safetensors" --config-json "$work/ckpt/index.json" > "$work/k.log" 2>&1; then
  fail "--config-json into the checkpoint accepted"
fi
grep -q "\-\-config-json .* lies inside the checkpoint directory" "$work/k.log" || { cat "$work/k.log"; fail "--config-json message"; }
if "$consolidate" "$work/ckpt" "$work/m.safetensors" --config-json "$work/m.safetensors" > "$work/k.log" 2>&1; then
  fail "--config-json onto the output accepted"
fi
grep -q "is the output file" "$work/k.log" || { cat "$work/k.log"; fail "--config-json = output message"; }
"$train" --resume "$work/ckpt" "${model[@]}" --generate --sample-len 5 > /dev/null || fail "the checkpoint was damaged"

if "$train" --data "$work/text.txt" "${model[@]}" --dp 3 --steps 1 > "$work/f.log" 2>&1; then fail "dp 3 accepted"; fi
grep -q "global batch 8 is not divisible by dp(3)" "$work/f.log" || { cat "$work/f.log"; fail "dp 3 message"; }
if "$train" --data "$work/text.txt" --layers 3 --d-model 32 --heads 4 --context 16 --batch 8 --steps $((verify_steps + 1)) \
     --resume "$work/ckpt" --sample-len 0 > "$work/g.log" 2>&1; then fail "another configuration accepted"; fi
grep -q "n_layer" "$work/g.log" || { cat "$work/g.log"; fail "config mismatch message"; }
if "$train" --data "$work/text.txt" "${model[@]}" --tp 3 --steps 1 > "$work/h.log" 2>&1; then fail "tp 3 accepted"; fi
grep -q "tp 3 does not divide the 4 heads" "$work/h.log" || { cat "$work/h.log"; fail "tp 3 message"; }

echo "== --bucket-mb: more dp buckets, the same losses (dp 2: each element's sum has two addends, so bitwise)"
for run in default:25 small:0.0005; do
  name=${run%%:*}; mb=${run#*:}
  "$train" --data "$work/text.txt" "${model[@]}" --dp 2 --steps 4 --sample-len 0 --bucket-mb "$mb" \
    --loss-csv "$work/bucket_$name.csv" > "$work/bucket_$name.log" 2>&1 || { cat "$work/bucket_$name.log"; fail "--bucket-mb $mb"; }
done
nb_default=$(sed -n 's/.*; \([0-9]*\) gradient bucket(s) on rank 0 (--bucket-mb 25).*/\1/p' "$work/bucket_default.log")
nb_small=$(sed -n 's/.*; \([0-9]*\) gradient bucket(s) on rank 0 (--bucket-mb 0.0005).*/\1/p' "$work/bucket_small.log")
[ -n "$nb_default" ] && [ "$nb_default" -le 2 ] || { cat "$work/bucket_default.log"; fail "default buckets: '$nb_default', expected at most 2 (the model is 0.1 MiB)"; }
[ -n "$nb_small" ] && [ "$nb_small" -ge $((nb_default + 4)) ] || { cat "$work/bucket_small.log"; fail "--bucket-mb 0.0005 buckets: '$nb_small', expected at least $((nb_default + 4))"; }
cmp <(cut -d, -f1,2 "$work/bucket_default.csv") <(cut -d, -f1,2 "$work/bucket_small.csv") \
  || fail "--bucket-mb 0.0005 changed the losses (dp 2 sums two addends per element: bitwise the same expected)"
for bad in 0 nan -1 1e9; do
  if "$train" --data "$work/text.txt" "${model[@]}" --dp 2 --steps 1 --bucket-mb "$bad" > "$work/bb.log" 2>&1; then
    fail "--bucket-mb $bad accepted"
  fi
  grep -q "\-\-bucket-mb .* must be a number of MiB" "$work/bb.log" || { cat "$work/bb.log"; fail "--bucket-mb $bad message"; }
done

if [ -n "$mpirun" ]; then
  echo "== mpirun without --backend mpi is refused"
  if "$mpirun" --allow-run-as-root --oversubscribe -np 2 "$train" --data "$work/text.txt" "${model[@]}" --steps 2 > "$work/n.log" 2>&1; then
    fail "mpirun without --backend mpi accepted"
  fi
  grep -q "started by mpirun as 2 processes but --backend is threads" "$work/n.log" || { cat "$work/n.log"; fail "mpirun message"; }
  echo "== 2 ranks under mpirun (dp 2): every step's loss equals the single-rank threads run's"
  "$mpirun" --allow-run-as-root --oversubscribe -np 2 -x OPENBLAS_NUM_THREADS=1 "$train" --backend mpi \
    --data "$work/text.txt" "${model[@]}" --dp 2 --steps 6 --sample-len 0 --loss-csv "$work/m.csv" | tee "$work/m.log"
  "$train" --data "$work/text.txt" "${model[@]}" --dp 1 --steps 6 --sample-len 0 --loss-csv "$work/t.csv" > "$work/t.log"
  compare_losses "$work/m.csv" "$work/t.csv" || fail "the mpi losses differ from the single-rank run's"
fi
echo "train_gpt check: all passed"
