#!/usr/bin/env bash
# A lost rank under mpirun (issue 17): train_gpt --backend mpi at dp 2 x tp 2 on 4 processes,
# TESSERA_TIMEOUT=10; once it is training, world rank 2 is killed with SIGKILL. Every other
# process must be gone, and mpirun must have exited non-zero naming rank 2, within the timeout
# plus 5 s: no hang. Usage: lost_rank_mpi.sh MPIRUN TRAIN_GPT
set -uo pipefail
mpirun=$1
train=$2
work=$(mktemp -d)
job=
cleanup() { [ -n "$job" ] && kill -9 "$job" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }
source "$(dirname "$0")/kill_rank_mpi.sh"
python3 -c "print('And God said, Let there be light: and there was light. ' * 300)" > "$work/text.txt"
timeout_s=10
"$mpirun" --allow-run-as-root --oversubscribe -np 4 -x OPENBLAS_NUM_THREADS=1 -x TESSERA_TIMEOUT=$timeout_s \
  "$train" --backend mpi --dp 2 --tp 2 --data "$work/text.txt" --layers 2 --d-model 32 --heads 4 --context 16 \
  --batch 8 --val-every 0 --sample-len 0 --steps 1000000 --log-every 1 > "$work/job.log" 2>&1 &
job=$!
for _ in $(seq 600); do grep -q "^step    5" "$work/job.log" 2>/dev/null && break; sleep 0.1; done
grep -q "^step    5" "$work/job.log" || { cat "$work/job.log"; fail "the job did not reach step 5 within 60 s"; }
kill_world_rank "$job" 2 $((timeout_s + 5)) "$work/job.log"
rc=$lost_rank_rc
job=
echo "lost rank: mpirun exited $rc $lost_rank_seconds s after world rank 2 was killed (bound $((timeout_s + 5)) s); the message:"
grep -E "rank 2\b|rank 2 " "$work/job.log" | head -3
