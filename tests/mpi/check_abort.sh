#!/bin/sh
# Runs run_check with a failing rank and checks that the job ends with a non-zero exit code
# and that the failing rank named itself and its error on stderr.
# Usage: check_abort.sh MPIRUN PROGRAM NP FAIL_RANK
mpirun=$1 program=$2 np=$3 fail=$4
out=$("$mpirun" -np "$np" --oversubscribe -x OPENBLAS_NUM_THREADS=1 "$program" "$fail" 2>&1)
rc=$?
printf '%s\n' "$out"
if [ "$rc" -eq 0 ]; then
  echo "FAIL: exit code 0, expected non-zero after rank $fail threw"
  exit 1
fi
want="tessera::mpi::run: rank $fail of $np failed: tessera::CommError: deliberate failure for the test"
if ! printf '%s\n' "$out" | grep -qF "$want"; then
  echo "FAIL: output lacks: $want"
  exit 1
fi
echo "PASS: exit code $rc and: $want"
