#!/bin/sh
# Runs run_check in "skip" mode (rank 1 of 2 never calls the all_reduce that rank 0 waits in,
# timeout 0.5 s) and checks that the job ends within seconds with a non-zero exit code and the
# watchdog's message naming the call, the communicator and the rank.
# Usage: check_watchdog.sh MPIRUN PROGRAM
mpirun=$1 program=$2
start=$(date +%s)
out=$("$mpirun" -np 2 --oversubscribe -x OPENBLAS_NUM_THREADS=1 "$program" skip 1 2>&1)
rc=$?
took=$(( $(date +%s) - start ))
printf '%s\n' "$out"
[ "$rc" -ne 0 ] || { echo "FAIL: exit code 0, expected the watchdog to abort the job"; exit 1; }
want="tessera: all_reduce(float32, count=1024, sum) on mpi:world (rank 0 of 2) waited past its timeout of 0.5 s in MPI_Allreduce"
printf '%s\n' "$out" | grep -qF "$want" || { echo "FAIL: output lacks: $want"; exit 1; }
[ "$took" -lt 15 ] || { echo "FAIL: took $took s (rank 1 sleeps 20 s: the abort must end it sooner)"; exit 1; }
echo "PASS: exit code $rc after $took s and: $want"
