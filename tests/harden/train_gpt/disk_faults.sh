#!/usr/bin/env bash
# A save that the disk fails (issue 17): train_gpt at dp 2 x tp 2 (threads) resumes a
# checkpoint and saves over it while an LD_PRELOAD interposer (fail_io.cpp) makes pwrite
# return ENOSPC or fsync return EIO on the save's files, at the first call or a later one.
# Each time the run must end with exit code 1 and one error line naming the failure, leave no
# staging directory, and leave the previous checkpoint intact: bitwise what it was, and
# resumable. Then:
#  - 3 ranks (dp 3 with ZeRO-1, threads), the fsync of rank 1's own file fails: the one error line is the
#    shared "save_checkpoint(...) failed on rank 1 of threads:world: ..." (every rank, rank 1
#    included, throws that same Error);
#  - the same under mpirun (-np 3, the interposer through -x LD_PRELOAD): each of the 3
#    processes prints that same line naming rank 1 of mpi:world; mpirun exits non-zero;
#  - a full file system: the checkpoint on a 700 KiB tmpfs (mounted in a private mount namespace,
#    unshare -m; skipped with a note where mounting is not allowed) holds one checkpoint (about
#    480 KB) but not a second beside it: the next save fails with ENOSPC, the previous checkpoint
#    is bitwise intact and no staging directory is left.
# Usage: disk_faults.sh TRAIN_GPT CONSOLIDATE FAIL_IO_SO [MPIRUN]
set -uo pipefail
train=$(realpath "$1")
consolidate=$(realpath "$2")
fail_io=$(realpath "$3")  # LD_PRELOAD needs it from any directory
mpirun=${4:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
export OPENBLAS_NUM_THREADS=1
python3 -c "print('And God said, Let there be light: and there was light. ' * 300)" > "$work/text.txt"
model=(--data "$work/text.txt" --layers 2 --d-model 32 --heads 4 --context 16 --batch 8 --val-every 0 --sample-len 0
       --dp 2 --tp 2 --quiet)
ck="$work/ck"
"$train" "${model[@]}" --steps 3 --save "$ck" > "$work/a.log" 2>&1 || { cat "$work/a.log"; fail "the first save"; }
"$consolidate" "$ck" "$work/before.safetensors" > /dev/null 2>&1 || fail "the first checkpoint does not load"
n=0
for spec in pwrite:1:ENOSPC pwrite:4:ENOSPC fsync:1:EIO fsync:3:EIO; do
  LD_PRELOAD=$fail_io TESSERA_FAIL=$spec TESSERA_FAIL_PATH="ck.tmp-" \
    "$train" "${model[@]}" --steps 5 --resume "$ck" --save "$ck" > "$work/f.log" 2> "$work/f.err"
  rc=$?
  [ $rc -eq 1 ] || { cat "$work/f.log" "$work/f.err"; fail "$spec: exit code $rc, expected 1"; }
  [ "$(wc -l < "$work/f.err")" -eq 1 ] || { cat "$work/f.err"; fail "$spec: not one error line"; }
  want=$([ "${spec##*:}" = EIO ] && echo "Input/output error" || echo "No space left on device")
  grep -q "$want" "$work/f.err" || { cat "$work/f.err"; fail "$spec: the error does not say '$want'"; }
  ls -d "$ck".tmp-* > /dev/null 2>&1 && fail "$spec: a staging directory was left beside the checkpoint"
  "$consolidate" "$ck" "$work/after.safetensors" > /dev/null 2>&1 || fail "$spec: the previous checkpoint does not load"
  cmp -s "$work/before.safetensors" "$work/after.safetensors" || fail "$spec: the previous checkpoint changed"
  n=$((n + 1))
  echo "$spec: exit 1, '$(cut -c1-150 "$work/f.err")...'; the step-3 checkpoint intact"
done
"$train" "${model[@]}" --steps 5 --resume "$ck" --save "$ck" > "$work/r.log" 2>&1 || { cat "$work/r.log"; fail "resume after the faults"; }

# --- 3 ranks, the fault on rank 1: every rank names rank 1 ---
three=(--data "$work/text.txt" --layers 2 --d-model 32 --heads 4 --context 16 --batch 6 --val-every 0 --sample-len 0
       --dp 3 --zero 1 --quiet)  # ZeRO-1: each rank writes its own optimizer shard
ck3="$work/ck3"
"$train" "${three[@]}" --steps 3 --save "$ck3" > "$work/a3.log" 2>&1 || { cat "$work/a3.log"; fail "the dp 3 save"; }
"$consolidate" "$ck3" "$work/before3.safetensors" > /dev/null 2>&1 || fail "the dp 3 checkpoint does not load"
want3='^train_gpt: save_checkpoint\(.*/ck3\) failed on rank 1 of (threads|mpi):world: AtomicFile: fsync of .*/optim-rank00001\.safetensors\.tmp-.* failed: Input/output error'
check3() {  # NAME [mpi]: the dp 3 checkpoint unchanged, no staging directory (under mpirun,
  # MPI_ABORT may kill rank 0 before it removes the staging directory: the next save removes it)
  if ls -d "$ck3".tmp-* > /dev/null 2>&1; then
    [ "${2:-}" = mpi ] || fail "$1: a staging directory was left beside the checkpoint"
    stale=1
  fi
  "$consolidate" "$ck3" "$work/after3.safetensors" > /dev/null 2>&1 || fail "$1: the previous checkpoint does not load"
  cmp -s "$work/before3.safetensors" "$work/after3.safetensors" || fail "$1: the previous checkpoint changed"
  n=$((n + 1))
}
LD_PRELOAD=$fail_io TESSERA_FAIL=fsync:1:EIO TESSERA_FAIL_PATH=optim-rank00001 \
  "$train" "${three[@]}" --steps 5 --resume "$ck3" --save "$ck3" > "$work/f.log" 2> "$work/f.err"
rc=$?
[ $rc -eq 1 ] || { cat "$work/f.log" "$work/f.err"; fail "dp 3 threads: exit code $rc, expected 1"; }
[ "$(wc -l < "$work/f.err")" -eq 1 ] || { cat "$work/f.err"; fail "dp 3 threads: not one error line"; }
grep -Eq "$want3" "$work/f.err" || { cat "$work/f.err"; fail "dp 3 threads: the error does not name rank 1's failed fsync"; }
check3 "dp 3 threads"
echo "dp 3 threads, fsync of rank 1's file: exit 1, '$(cut -c1-110 "$work/f.err")...'"
if [ -n "$mpirun" ]; then
  "$mpirun" --allow-run-as-root --oversubscribe -np 3 -x OPENBLAS_NUM_THREADS=1 -x LD_PRELOAD="$fail_io" \
    -x TESSERA_FAIL=fsync:1:EIO -x TESSERA_FAIL_PATH=optim-rank00001 \
    "$train" --backend mpi "${three[@]}" --steps 5 --resume "$ck3" --save "$ck3" > "$work/f.log" 2> "$work/f.err"
  rc=$?
  [ $rc -ne 0 ] || { cat "$work/f.log" "$work/f.err"; fail "dp 3 mpirun: exit code 0 after a failed save"; }
  # Each process that gets to print before MPI_ABORT ends the job prints "tessera::mpi::run:
  # rank R of 3 failed: tessera::Error: <the error>"; the errors must be the same one.
  sed -nE 's/^tessera::mpi::run: rank [0-2] of 3 failed: tessera::Error: /train_gpt: /p' "$work/f.err" > "$work/f.lines"
  printed=$(wc -l < "$work/f.lines")
  [ "$printed" -ge 1 ] || { cat "$work/f.err"; fail "dp 3 mpirun: no process printed its error"; }
  [ "$(sort -u "$work/f.lines" | wc -l)" -eq 1 ] || { cat "$work/f.lines"; fail "dp 3 mpirun: the processes' errors differ"; }
  grep -Eq "$want3" "$work/f.lines" || { cat "$work/f.lines"; fail "dp 3 mpirun: the error does not name rank 1's failed fsync"; }
  stale=0
  check3 "dp 3 mpirun" mpi
  "$mpirun" --allow-run-as-root --oversubscribe -np 3 -x OPENBLAS_NUM_THREADS=1 \
    "$train" --backend mpi "${three[@]}" --steps 5 --resume "$ck3" --save "$ck3" > "$work/f.log" 2>&1 \
    || { cat "$work/f.log"; fail "dp 3 mpirun: the resume and save after the failed save"; }
  ls -d "$ck3".tmp-* > /dev/null 2>&1 && fail "dp 3 mpirun: the next save left a staging directory"
  [ $stale -eq 1 ] && echo "dp 3 mpirun: MPI_ABORT ended rank 0 before it removed the staging directory; the next save removed it"
  echo "dp 3 mpirun, fsync of rank 1's file: mpirun exit $rc, the same error naming rank 1 from the $printed of 3 processes that printed"
fi

# --- a full file system: a small tmpfs ---
small="$work/small"
mkdir -p "$small"
# shellcheck disable=SC2016  # expanded by the inner shell
tmpfs_out=$(unshare -m bash -c '
  set -u
  mount -t tmpfs -o size=700k tmpfs "$1" 2> /dev/null || { echo SKIP; exit 0; }
  mnt=$1 train=$2 consolidate=$3 work=$4; shift 4
  ck="$work/small/ck"
  "$train" "$@" --steps 3 --save "$ck" > "$work/s.log" 2>&1 || { echo "FAIL: the first save on the tmpfs"; cat "$work/s.log"; exit 1; }
  "$consolidate" "$ck" "$work/before_full.safetensors" > /dev/null 2>&1 || { echo "FAIL: the tmpfs checkpoint does not load"; exit 1; }
  "$train" "$@" --steps 5 --resume "$ck" --save "$ck" > "$work/s.log" 2> "$work/s.err"
  rc=$?
  [ $rc -eq 1 ] || { echo "FAIL: full tmpfs: exit code $rc, expected 1"; cat "$work/s.log" "$work/s.err"; exit 1; }
  [ "$(wc -l < "$work/s.err")" -eq 1 ] || { echo "FAIL: full tmpfs: not one error line"; cat "$work/s.err"; exit 1; }
  grep -q "No space left on device" "$work/s.err" || { echo "FAIL: full tmpfs: the error does not say ENOSPC"; cat "$work/s.err"; exit 1; }
  ls -d "$ck".tmp-* > /dev/null 2>&1 && { echo "FAIL: full tmpfs: a staging directory was left"; exit 1; }
  "$consolidate" "$ck" "$work/after_full.safetensors" > /dev/null 2>&1 || { echo "FAIL: full tmpfs: the previous checkpoint does not load"; exit 1; }
  cmp -s "$work/before_full.safetensors" "$work/after_full.safetensors" || { echo "FAIL: full tmpfs: the previous checkpoint changed"; exit 1; }
  echo "OK $(df -k "$mnt" | tail -1 | awk "{print \$2}") KiB tmpfs: $(cut -c1-120 "$work/s.err")..."
' bash "$small" "$train" "$consolidate" "$work" "${model[@]}" 2>&1)
case $tmpfs_out in
  SKIP*|"") echo "full tmpfs: skipped (mount -t tmpfs is not allowed here); the interposer's ENOSPC stands for a full disk" ;;
  OK*) n=$((n + 1)); echo "full tmpfs: exit 1, the previous checkpoint intact; ${tmpfs_out#OK }" ;;
  *) echo "$tmpfs_out"; fail "full tmpfs" ;;
esac
echo "disk_faults: $n failed saves, each an error with the previous checkpoint bitwise intact; then resumed and saved"
