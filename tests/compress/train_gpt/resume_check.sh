#!/usr/bin/env bash
# Resuming compressed and DiLoCo runs of train_gpt from a checkpoint: the dp state each rank
# keeps (PowerSGD's residuals, warm starts and warm-up count; top-k's residuals; DiLoCo's
# replica weights, anchor, outer momentum, counters and each replica's AdamW moments; top-k's
# warm-up count with AdamW's frozen second moment; top-k's sparsity warm-up count) is saved
# per rank beside the shards, so a run stopped at step 5 and resumed at the same layout
# continues bitwise as the uninterrupted one: the losses of steps 5..9 (as --log-json prints
# them, round-trip digits) must be equal as strings. (dp 2 at tp 1 x pp 1: PowerSGD and top-k are
# refused at tp > 1 or pp > 1, see dp_communication.hpp.) A resume at another dp size restarts the
# dp state and says so. A tiny model: seconds.
# Usage: resume_check.sh TRAIN_GPT
set -euo pipefail
train=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OPENBLAS_NUM_THREADS=1
fail() { echo "FAIL: $*"; exit 1; }
for i in $(seq 1 300); do echo "In the beginning God created the heaven and the earth. And the earth was without form."; done > "$work/text.txt"
model=(--data "$work/text.txt" --layers 2 --d-model 32 --heads 4 --context 16 --batch 8 --warmup 2 --val-every 0
       --log-every 1 --sample-len 0 --schedule-steps 10)
stop=5 steps=10

# losses LOG.json FROM: "step loss" lines from FROM on, the loss as printed (round-trip digits).
losses() { python3 -c "
import json, sys
for line in open(sys.argv[1]):
    j = json.loads(line)
    if j['step'] >= int(sys.argv[2]): print(j['step'], repr(j['loss']))" "$1" "$2"; }

check() {  # NAME FLAGS...: uninterrupted vs stopped at $stop and resumed, same layout
  local name=$1; shift
  "$train" "${model[@]}" "$@" --steps $steps --log-json "$work/$name.full.json" > "$work/$name.full.log" 2>&1 \
    || { cat "$work/$name.full.log"; fail "$name: the uninterrupted run failed"; }
  "$train" "${model[@]}" "$@" --steps $stop --save "$work/$name.ckpt" > "$work/$name.a.log" 2>&1 \
    || { cat "$work/$name.a.log"; fail "$name: the first half failed"; }
  ls "$work/$name.ckpt"/dp-state-rank*.safetensors > /dev/null 2>&1 || fail "$name: no dp state in the checkpoint"
  "$train" "${model[@]}" "$@" --steps $steps --resume "$work/$name.ckpt" --log-json "$work/$name.b.json" \
    > "$work/$name.b.log" 2>&1 || { cat "$work/$name.b.log"; fail "$name: the resumed run failed"; }
  grep -q "resumed the dp state" "$work/$name.b.log" || { cat "$work/$name.b.log"; fail "$name: dp state not resumed"; }
  diff <(losses "$work/$name.full.json" $stop) <(losses "$work/$name.b.json" $stop) \
    || fail "$name: the resumed losses (right) differ from the uninterrupted run's (left)"
  [ "$(losses "$work/$name.b.json" $stop | wc -l)" -eq $((steps - stop)) ] || fail "$name: resumed steps missing"
  echo "ok: $name: steps $stop..$((steps - 1)) after the resume equal the uninterrupted run bitwise"
}

check powersgd --dp 2 --compress powersgd:2,warmup=3
check topk --dp 2 --compress topk:0.1
check diloco --dp 2 --sync-every 3
check topk-updates --dp 2 --sync-every 1 --outer-lr 1 --outer-momentum 0 --compress topk:0.1
# top-k's warm-up count and AdamW's frozen second moment (v frozen after step 3, before the stop).
check topk-warmup-frozen-v --dp 2 --compress topk:0.1,warmup=3 --freeze-variance 3
# DGC's sparsity warm-up, stopped mid-schedule (stages of 2 reductions: 1/4, 1/16, 1/64, then 1%).
check topk-sparsity-warmup --dp 2 --compress topk:0.01,sparsity_warmup=8

# Another dp size with warm-ups: the note says they run again.
"$train" "${model[@]}" --dp 4 --compress topk:0.01,sparsity_warmup=8 --steps $steps \
  --resume "$work/topk-sparsity-warmup.ckpt" > "$work/dp4s.log" 2>&1 || { cat "$work/dp4s.log"; fail "resume at dp 4 failed"; }
grep -q "note: the dp state (error-feedback residuals; its sparsity warm-up starts again from 1/4 of the entries over 8 reductions) restarts (it was saved at dp=2" \
  "$work/dp4s.log" || { cat "$work/dp4s.log"; fail "no sparsity warm-up note at dp 4"; }
echo "ok: a resume at dp 4 says the sparsity warm-up starts again"
# The same under DiLoCo: the pseudo-gradient compressor's state restarts too.
"$train" "${model[@]}" --dp 4 --sync-every 1 --outer-lr 1 --outer-momentum 0 --compress topk:0.1 --steps $steps \
  --resume "$work/topk-updates.ckpt" > "$work/dp4d.log" 2>&1 || { cat "$work/dp4d.log"; fail "DiLoCo resume at dp 4 failed"; }
grep -q "note: the dp state (the outer momentum; the anchor is the loaded weights; the pseudo-gradient compressor's error-feedback residuals) restarts (it was saved at dp=2" \
  "$work/dp4d.log" || { cat "$work/dp4d.log"; fail "no compressor in the DiLoCo note at dp 4"; }
echo "ok: a DiLoCo resume at dp 4 says its compressor's state restarts"

# Another dp size: the residuals restart, with a note; the run goes on.
"$train" "${model[@]}" --dp 4 --compress topk:0.1 --steps $steps --resume "$work/topk.ckpt" > "$work/dp4.log" 2>&1 \
  || { cat "$work/dp4.log"; fail "resume at dp 4 failed"; }
grep -q "note: the dp state (error-feedback residuals) restarts (it was saved at dp=2 pp=1 tp=1" "$work/dp4.log" \
  || { cat "$work/dp4.log"; fail "no note at dp 4"; }
grep -q "^step    9" "$work/dp4.log" || fail "the dp 4 resume did not reach step 9"
echo "ok: a resume at dp 4 restarts the residuals with a note"

# Other gradient buckets (--zero 3's per-layer units, or --bucket-mb): the per-bucket residuals
# restart with a note, where they used to be loaded into buckets of other sizes.
for other in "--zero 3" "--bucket-mb 0.001"; do
  # shellcheck disable=SC2086
  "$train" "${model[@]}" --dp 2 --compress topk:0.1 $other --steps $steps --resume "$work/topk.ckpt" > "$work/bk.log" 2>&1 \
    || { cat "$work/bk.log"; fail "resume with $other failed"; }
  grep -q "restarts (its gradient buckets differ" "$work/bk.log" || { cat "$work/bk.log"; fail "no bucket note with $other"; }
  grep -q "^step    9" "$work/bk.log" || fail "the resume with $other did not reach step 9"
done
echo "ok: a resume into other gradient buckets restarts the residuals with a note"

# Resumed without the compressor (or without DiLoCo): the saved state goes unused, with a note.
"$train" "${model[@]}" --dp 2 --steps $steps --resume "$work/topk.ckpt" > "$work/plain.log" 2>&1 \
  || { cat "$work/plain.log"; fail "resume without --compress failed"; }
grep -q "note: the checkpoint holds the dp state of compression topk:0.1, which this run (fp32 all-reduce) does not use" \
  "$work/plain.log" || { cat "$work/plain.log"; fail "no note for the unused dp state"; }
"$train" "${model[@]}" --dp 2 --compress bf16 --steps $steps --resume "$work/diloco.ckpt" > "$work/plain.log" 2>&1 \
  || { cat "$work/plain.log"; fail "resume of DiLoCo with bf16 failed"; }
grep -q "note: the checkpoint holds the dp state of DiLoCo: sync every 3 steps" "$work/plain.log" \
  || { cat "$work/plain.log"; fail "no note for the unused DiLoCo state"; }
echo "ok: a resume without the saved policy says that its dp state goes unused"

# A corrupted dp state file of rank 1: every rank stops naming rank 1, the file and the cause.
cp -r "$work/powersgd.ckpt" "$work/bad.ckpt"
python3 - "$work/bad.ckpt/dp-state-rank00001.safetensors" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[-3] ^= 0xFF  # a flipped byte in the last tensor's data
open(p, "wb").write(bytes(b))
PY
if "$train" "${model[@]}" --dp 2 --compress powersgd:2,warmup=3 --steps $steps --resume "$work/bad.ckpt" > "$work/bad.log" 2>&1; then
  fail "a corrupted dp state was resumed"
fi
grep -q "loading the dp state from .* failed on rank 1 of .*dp-state-rank00001.safetensors.*corrupted" "$work/bad.log" \
  || { cat "$work/bad.log"; fail "the corrupted dp state's message"; }
echo "ok: a corrupted dp state file stops the resume naming rank 1 and its file"

# PowerSGD / top-k at tp > 1 or pp > 1 are refused on every rank, naming the layout.
if "$train" "${model[@]}" --dp 2 --pp 2 --compress topk:0.1 --steps 2 > "$work/pp.log" 2>&1; then fail "topk at pp 2 accepted"; fi
grep -q "compress topk:0.1 at tp 1 x pp 2: PowerSGD and top-k need tp 1 and pp 1" "$work/pp.log" || { cat "$work/pp.log"; fail "pp 2 message"; }
echo "ok: top-k at pp 2 is refused"

# --freeze-variance N needs N uncompressed reductions first: v must not see compressed values.
if "$train" "${model[@]}" --dp 2 --compress topk:0.1,warmup=3 --freeze-variance 5 --steps 2 > "$work/fv.log" 2>&1; then
  fail "--freeze-variance 5 with warmup=3 accepted"; fi
grep -q "freeze-variance 5 with --compress topk:0.1,warmup=3: AdamW's second moment would take 2 compressed" "$work/fv.log" \
  || { cat "$work/fv.log"; fail "--freeze-variance message"; }
echo "ok: --freeze-variance beyond the compressor's warm-up is refused"
