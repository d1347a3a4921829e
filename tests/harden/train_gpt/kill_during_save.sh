#!/usr/bin/env bash
# Crash-consistent checkpoints (issue 17): train_gpt saving every step at dp 2 x tp 2 (threads)
# is killed with SIGKILL at random times, KILLS times. After each kill the checkpoint directory
# must hold a complete checkpoint: consolidate_checkpoint reads it, and it is bitwise the
# checkpoint an uninterrupted run of the same seed saves at that step (same learning-rate
# schedule); a resume from it trains on. With MPIRUN, the job runs as 4 processes (--backend
# mpi) and a random rank's process is killed (mpirun then ends the others).
# Usage: kill_during_save.sh TRAIN_GPT CONSOLIDATE [KILLS] [SEED] [MPIRUN]
set -uo pipefail
train=$1
consolidate=$2
kills=${3:-6}
RANDOM=${4:-17}
mpirun=${5:-}
launch=()
[ -n "$mpirun" ] && launch=("$mpirun" --allow-run-as-root --oversubscribe -np 4 -x OPENBLAS_NUM_THREADS=1)
backend=()
[ -n "$mpirun" ] && backend=(--backend mpi)
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }
export OPENBLAS_NUM_THREADS=1
python3 -c "print('And God said, Let there be light: and there was light. ' * 300)" > "$work/text.txt"
model=(--data "$work/text.txt" --layers 2 --d-model 32 --heads 4 --context 16 --batch 8 --val-every 0 --sample-len 0
       --dp 2 --tp 2 --schedule-steps 100000 --quiet)
ck="$work/ck"
compared=0 mid_save=0
for k in $(seq "$kills"); do
  "${launch[@]}" "$train" "${backend[@]}" "${model[@]}" --steps 100000 --save-every 1 --save "$ck" \
    $([ -d "$ck" ] && echo --resume "$ck") > "$work/run.log" 2>&1 &
  pid=$!
  # 0.5-2.5 s (MPI: 2-4 s, it starts slower): past the first saves, then anywhere in a step or a save.
  sleep "$(python3 -c "import random; random.seed($RANDOM); print(${mpirun:+1.5 +} 0.5 + 2 * random.random())")"
  if [ -n "$mpirun" ]; then
    ranks=($(pgrep -P "$pid"))
    [ ${#ranks[@]} -gt 0 ] && kill -9 "${ranks[$((RANDOM % ${#ranks[@]}))]}" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  pid=
  ls -d "$ck".tmp-* > /dev/null 2>&1 && mid_save=$((mid_save + 1))  # a save was under way
  [ -f "$ck/index.json" ] || { ls -la "$work"; cat "$work/run.log"; fail "kill $k: no complete checkpoint in $ck"; }
  step=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$ck/index.json")
  "$consolidate" "$ck" "$work/k.safetensors" > "$work/c.log" 2>&1 || { cat "$work/c.log"; fail "kill $k: step $step does not load"; }
  # The uninterrupted run to the same step, saved once at its end.
  rm -rf "$work/ref"
  "${launch[@]}" "$train" "${backend[@]}" "${model[@]}" --steps "$step" --save "$work/ref" > "$work/ref.log" 2>&1 \
    || { cat "$work/ref.log"; fail "reference run"; }
  "$consolidate" "$work/ref" "$work/r.safetensors" > /dev/null 2>&1 || fail "the reference does not load"
  cmp -s "$work/k.safetensors" "$work/r.safetensors" || fail "kill $k: the checkpoint at step $step differs from the uninterrupted run's"
  compared=$((compared + 1))
  echo "kill $k: complete checkpoint at step $step, bitwise the uninterrupted run's$(ls -d "$ck".tmp-* > /dev/null 2>&1 && echo ' (a save was under way)')"
done
# The last one resumes and trains on.
"${launch[@]}" "$train" "${backend[@]}" "${model[@]}" --steps $((step + 2)) --resume "$ck" --save "$ck" > "$work/resume.log" 2>&1 \
  || { cat "$work/resume.log"; fail "resume from step $step"; }
echo "kill_during_save: $kills kills ($mid_save during a save), $compared checkpoints bitwise equal to the uninterrupted runs'"
