#!/usr/bin/env bash
# Elastic resume after a lost rank (issue 17): a job at 4 ranks saving every 2 steps loses one
# rank; every other rank stops naming it; the last complete checkpoint then resumes at a smaller
# world, in another layout, with the same global batch, and its per-step losses after the resume
# point equal an uninterrupted run's (serial, dp 1) within fp32 round-off (relative 1e-4), as a
# torchelastic restart through resharding would continue.
#
#  threads: dp 2 x tp 2 with ZeRO-1. A rank that throws mid-run: the fail_io interposer makes
#           the fsync of world rank 2's own file (optim-rank00002) fail at its third save
#           (step 6), so rank 2 throws inside the collective save; every rank must stop with
#           exit code 1 and one error line naming rank 2. The step-4 checkpoint resumes at
#           dp 1 x tp 2, dp 2 (ZeRO-1) and dp 1 x pp 2 (threads) to step 14.
#  threads, outside a save: dp 2 x pp 2 with --inject-fault throw@5:3 (world rank 3 throws
#           before step 5's forward, between collectives) and TESSERA_TIMEOUT=10: every other
#           rank stops with an error naming rank 3 within 10 + 5 s of the throw, exit code 1,
#           the job's one error line is rank 3's; the step-4 checkpoint resumes at dp 1 x tp 2.
#  mpirun:  (when MPIRUN is given) dp 4 on 4 processes, TESSERA_TIMEOUT=10; after step 5 world
#           rank 1 is killed with SIGKILL (kill_rank_mpi.sh: every other process gone and mpirun
#           exited non-zero naming rank 1 within 10 + 5 s). The last complete checkpoint (step
#           K) resumes at dp 1 x tp 2 on 2 processes and at dp 2 on threads, to step K + 10.
# Each time the resumed losses are compared with the reference's; the killed jobs' own losses
# before the loss must equal it too. A check of the comparison itself: resuming with --batch 16
# (another global batch) must differ by more than the tolerance.
# Usage: elastic_resume.sh TRAIN_GPT FAIL_IO_SO [MPIRUN]
set -uo pipefail
train=$1
fail_io=$(realpath "$2")  # LD_PRELOAD needs it from any directory
mpirun=${3:-}
work=$(mktemp -d)
job=
cleanup() { [ -n "$job" ] && kill -9 "$job" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }
source "$(dirname "$0")/kill_rank_mpi.sh"
export OPENBLAS_NUM_THREADS=1
python3 -c "print('And God said, Let there be light: and there was light. ' * 300)" > "$work/text.txt"
# A fixed learning-rate schedule (warmup 4, cosine over 40 steps) whatever --steps is: the
# resumed runs take its length from the checkpoint, the others from the command line.
model=(--data "$work/text.txt" --layers 2 --d-model 32 --heads 4 --context 16 --val-every 0 --sample-len 0
       --warmup 4)
schedule=(--schedule-steps 40)
batch=8  # the global batch of every run (sequences per step); the planted resume changes it
tolerance=1e-4

# compare NAME FILE REF FROM TO: the losses of steps FROM..TO-1 in the --log-json FILE against
# REF's; FILE must hold exactly those steps from FROM on (before FROM: the killed run's, checked
# up to its last line). Prints the largest relative difference; returns 1 past the tolerance.
compare() {
  python3 - "$@" "$tolerance" <<'PY'
import json, sys
name, path, ref_path, first, end, tol = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
def losses(p):
    return {j["step"]: j["loss"] for j in map(json.loads, filter(str.strip, open(p)))}
got, ref = losses(path), losses(ref_path)
steps = sorted(got)
if first >= 0 and steps != list(range(first, end)):
    sys.exit(f"FAIL: {name}: steps {steps[:1]}..{steps[-1:]} in {path}, expected {first}..{end - 1}")
missing = [s for s in steps if s not in ref]
if missing:
    sys.exit(f"FAIL: {name}: the reference has no step {missing[0]}")
worst, at = max((abs(got[s] - ref[s]) / abs(ref[s]), s) for s in steps)
print(f"{name}: steps {steps[0]}..{steps[-1]}, largest relative loss difference {worst:.2e} (step {at})")
sys.exit(0 if worst < tol else 1)
PY
}
ref_steps=0
reference() {  # the uninterrupted serial run, to step $1 at least
  [ "$1" -le "$ref_steps" ] && return
  "$train" "${model[@]}" --batch "$batch" "${schedule[@]}" --dp 1 --steps "$1" --quiet --log-json "$work/ref.jsonl" > "$work/ref.log" 2>&1 \
    || { cat "$work/ref.log"; fail "the reference run"; }
  ref_steps=$1
}
ck_step() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$1/index.json"; }
# resume NAME CK N LAUNCH... -- LAYOUT...: resumes CK to step N, compares its losses.
resume() {
  local name=$1 ck=$2 n=$3 launch=() layout=()
  shift 3
  while [ "$1" != -- ]; do launch+=("$1"); shift; done
  shift
  layout=("$@")
  local from
  from=$(ck_step "$ck")
  rm -f "$work/r.jsonl"
  "${launch[@]}" "$train" "${model[@]}" --batch "$batch" "${layout[@]}" --steps "$n" --resume "$ck" --quiet --log-json "$work/r.jsonl" \
    > "$work/r.log" 2>&1 || { cat "$work/r.log"; fail "$name: the resume"; }
  grep -q "resumed .*: step $from, saved at" "$work/r.log" || { cat "$work/r.log"; fail "$name: no 'resumed ... step $from' line"; }
  reference "$n"
  compare "$name" "$work/r.jsonl" "$work/ref.jsonl" "$from" "$n" || fail "$name: past the tolerance $tolerance"
  resumed=$((resumed + 1))
}
resumed=0

# --- threads: a rank that throws at a save mid-run ---
ck="$work/ck_threads"
LD_PRELOAD=$fail_io TESSERA_FAIL=fsync:3:EIO TESSERA_FAIL_PATH=optim-rank00002 \
  "$train" "${model[@]}" --batch "$batch" "${schedule[@]}" --dp 2 --tp 2 --zero 1 --steps 20 --save-every 2 --save "$ck" --quiet \
  --log-json "$work/killed.jsonl" > "$work/t.log" 2> "$work/t.err"
rc=$?
[ $rc -eq 1 ] || { cat "$work/t.log" "$work/t.err"; fail "threads: exit code $rc after rank 2's save failed, expected 1"; }
[ "$(wc -l < "$work/t.err")" -eq 1 ] || { cat "$work/t.err"; fail "threads: not one error line"; }
# Every rank, rank 2 included, throws the same "save_checkpoint(...) failed on rank 2 of
# threads:world: <rank 2's error>" (checkpoint::detail::agree, Blame::shared), so the one line
# names rank 2 whichever rank's error threads::run reports.
grep -Eq "^train_gpt: save_checkpoint\(.*\) failed on rank 2 of threads:world: AtomicFile: fsync of .*/optim-rank00002\.safetensors\.tmp-.* failed: Input/output error" "$work/t.err" \
  || { cat "$work/t.err"; fail "threads: the error does not name rank 2's failed fsync"; }
echo "threads: rank 2 threw at step 5's save; exit 1: $(cut -c1-160 "$work/t.err")..."
[ "$(ck_step "$ck")" -eq 4 ] || fail "threads: the last complete checkpoint is at step $(ck_step "$ck"), expected 4"
reference 14
compare "threads, dp 2 x tp 2 before the throw" "$work/killed.jsonl" "$work/ref.jsonl" 0 6 \
  || fail "the dp 2 x tp 2 run before the throw differs from the reference"
resume "threads dp 2 x tp 2 (ZeRO-1) -> dp 1 x tp 2" "$ck" 14 -- --dp 1 --tp 2
resume "threads dp 2 x tp 2 (ZeRO-1) -> dp 2 (ZeRO-1)" "$ck" 14 -- --dp 2 --zero 1
resume "threads dp 2 x tp 2 (ZeRO-1) -> dp 1 x pp 2" "$ck" 14 -- --dp 1 --pp 2
# The comparison tells another global batch apart (the data of each step depends on it).
compare_out=$(batch=16; resume "planted: --batch 16" "$ck" 14 -- --dp 2 2>&1)
[[ $compare_out == *"past the tolerance"* ]] || { echo "$compare_out"; fail "a resume with --batch 16 did not fail the comparison"; }
echo "planted: --batch 16 fails the comparison as it must: $(echo "$compare_out" | grep -o 'largest.*' | head -1)"

# --- threads: a rank that throws between collectives (not in a save) ---
ck="$work/ck_throw"
t0=$(date +%s.%N)
TESSERA_TIMEOUT=10 "$train" "${model[@]}" --batch "$batch" "${schedule[@]}" --dp 2 --pp 2 --steps 20 --save-every 2 \
  --save "$ck" --quiet --inject-fault throw@5:3 --log-json "$work/thrown.jsonl" > "$work/x.log" 2> "$work/x.err"
rc=$?
took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)")
[ $rc -eq 1 ] || { cat "$work/x.log" "$work/x.err"; fail "throw: exit code $rc after rank 3 threw, expected 1"; }
python3 -c "import sys; sys.exit(float(sys.argv[1]) >= 15)" "$took" || fail "throw: the job took $took s, beyond 10 + 5 s"
# The job's error line is rank 3's own (the last line); before it each other rank's stop
# ("[inject-fault] world rank R stopped S s after the fault: world rank 3 failed, so ...").
tail -1 "$work/x.err" | grep -q "^train_gpt: injected fault (--inject-fault throw@5:3): world rank 3 throws before step 5's forward" \
  || { cat "$work/x.err"; fail "throw: the last error line is not rank 3's fault"; }
for r in 0 1 2; do
  line=$(grep "^train_gpt: \[inject-fault\] world rank $r stopped" "$work/x.err")
  [ -n "$line" ] || { cat "$work/x.err"; fail "throw: world rank $r did not stop with an error"; }
  [[ $line == *"world rank 3 failed"* ]] || { echo "$line"; fail "throw: world rank $r's error does not name rank 3"; }
  s=$(echo "$line" | sed -E 's/.* stopped ([0-9.e+-]+) s after the fault.*/\1/')
  python3 -c "import sys; sys.exit(float(sys.argv[1]) >= 15)" "$s" || fail "throw: world rank $r stopped $s s after the fault"
done
[ "$(grep -c . "$work/x.err")" -eq 4 ] || { cat "$work/x.err"; fail "throw: expected 3 stop lines and the error"; }
echo "threads: world rank 3 threw before step 5's forward; ranks 0-2 stopped naming it within" \
  "$(grep -o 'stopped [0-9.e+-]* s' "$work/x.err" | awk '{print $2}' | sort -g | tail -1) s; exit 1 after $took s"
[ "$(ck_step "$ck")" -eq 4 ] || fail "throw: the last complete checkpoint is at step $(ck_step "$ck"), expected 4"
compare "threads, dp 2 x pp 2 before the throw" "$work/thrown.jsonl" "$work/ref.jsonl" 0 5 \
  || fail "the dp 2 x pp 2 run before the throw differs from the reference"
resume "threads dp 2 x pp 2 (thrown) -> dp 1 x tp 2" "$ck" 14 -- --dp 1 --tp 2

# --- mpirun: a rank killed with SIGKILL ---
if [ -n "$mpirun" ]; then
  ck="$work/ck_mpi"
  timeout_s=10
  "$mpirun" --allow-run-as-root --oversubscribe -np 4 -x OPENBLAS_NUM_THREADS=1 -x TESSERA_TIMEOUT=$timeout_s \
    "$train" --backend mpi "${model[@]}" --batch "$batch" "${schedule[@]}" --dp 4 --steps 1000000 --log-every 1 --save-every 2 --save "$ck" \
    --log-json "$work/killed_mpi.jsonl" > "$work/job.log" 2>&1 &
  job=$!
  for _ in $(seq 600); do grep -q "^step    5" "$work/job.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "^step    5" "$work/job.log" || { cat "$work/job.log"; fail "mpirun: the job did not reach step 5 within 60 s"; }
  kill_world_rank "$job" 1 $((timeout_s + 5)) "$work/job.log"
  job=
  echo "mpirun: world rank 1 of 4 killed; mpirun exited $lost_rank_rc $lost_rank_seconds s later (bound $((timeout_s + 5)) s): $(grep -E 'rank 1\b' "$work/job.log" | head -1)"
  [ -f "$ck/index.json" ] || fail "mpirun: no complete checkpoint"
  k=$(ck_step "$ck")
  last_saved=$(grep -o "^step *[0-9]*  saved" "$work/job.log" | awk '{print $2}' | tail -1)
  [ "$k" -ge $((last_saved + 1)) ] || fail "mpirun: the checkpoint is at step $k, older than the save after step $last_saved"
  reference $((k + 10))
  logged=$(grep -c . "$work/killed_mpi.jsonl")
  compare "mpirun dp 4 before the kill" "$work/killed_mpi.jsonl" "$work/ref.jsonl" 0 "$logged" \
    || fail "the dp 4 MPI run before the kill differs from the reference"
  resume "mpirun dp 4 -> dp 1 x tp 2 (mpirun -np 2)" "$ck" $((k + 10)) \
    "$mpirun" --allow-run-as-root --oversubscribe -np 2 -x OPENBLAS_NUM_THREADS=1 -- --backend mpi --dp 1 --tp 2
  resume "mpirun dp 4 -> dp 2 (threads)" "$ck" $((k + 10)) -- --dp 2
fi
echo "elastic_resume: $resumed resumes at a smaller world, each within $tolerance of the uninterrupted run$([ -z "$mpirun" ] && echo ' (no mpirun: the MPI half skipped)')"
