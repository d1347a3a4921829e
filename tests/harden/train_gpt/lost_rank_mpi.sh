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
python3 -c "print('And God said, Let there be light: and there was light. ' * 300)" > "$work/text.txt"
timeout_s=10
"$mpirun" --allow-run-as-root --oversubscribe -np 4 -x OPENBLAS_NUM_THREADS=1 -x TESSERA_TIMEOUT=$timeout_s \
  "$train" --backend mpi --dp 2 --tp 2 --data "$work/text.txt" --layers 2 --d-model 32 --heads 4 --context 16 \
  --batch 8 --val-every 0 --sample-len 0 --steps 1000000 --log-every 1 > "$work/job.log" 2>&1 &
job=$!
for _ in $(seq 600); do grep -q "^step    5" "$work/job.log" && break; sleep 0.1; done
grep -q "^step    5" "$work/job.log" || { cat "$work/job.log"; fail "the job did not reach step 5 within 60 s"; }
# World rank 2: the train_gpt process whose environment says OMPI_COMM_WORLD_RANK=2.
victim=
for p in $(pgrep -P "$job"); do
  tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=2" && victim=$p
done
[ -n "$victim" ] || fail "no process of world rank 2 found"
others=$(for p in $(pgrep -P "$job"); do [ "$p" != "$victim" ] && echo "$p"; done)
t0=$(date +%s.%N)
kill -9 "$victim"
for _ in $(seq $(( (timeout_s + 5) * 10 ))); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
t1=$(date +%s.%N)
if kill -0 "$job" 2>/dev/null; then
  cat "$work/job.log"
  fail "mpirun still running $(python3 -c "print(f'{$t1 - $t0:.1f}')") s after rank 2 was killed"
fi
wait "$job"
rc=$?
job=
sleep 0.5  # the kernel reaps what mpirun killed
for p in $others; do  # gone, or a zombie (dead, not yet reaped by the container's init)
  st=$(ps -o stat= -p "$p" 2>/dev/null | tr -d ' ')
  [ -z "$st" ] || [[ $st == Z* ]] || { ps -o pid,stat,cmd -p "$p"; fail "process $p of the job still running"; }
done
[ $rc -ne 0 ] || fail "mpirun exited 0 after losing rank 2"
grep -Eq "rank 2\b|rank 2 " "$work/job.log" || { tail -20 "$work/job.log"; fail "the output does not name rank 2"; }
echo "lost rank: mpirun exited $rc $(python3 -c "print(f'{$t1 - $t0:.2f}')") s after world rank 2 was killed (bound $((timeout_s + 5)) s); the message:"
grep -E "rank 2\b|rank 2 " "$work/job.log" | head -3
