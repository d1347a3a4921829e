#!/usr/bin/env bash
# A save that the disk fails (issue 17): train_gpt at dp 2 x tp 2 (threads) resumes a
# checkpoint and saves over it while an LD_PRELOAD interposer (fail_io.cpp) makes pwrite
# return ENOSPC or fsync return EIO on the save's files, at the first call or a later one.
# Each time the run must end with exit code 1 and one error line naming the failure, leave no
# staging directory, and leave the previous checkpoint intact: bitwise what it was, and
# resumable. Usage: disk_faults.sh TRAIN_GPT CONSOLIDATE FAIL_IO_SO
set -uo pipefail
train=$1
consolidate=$2
fail_io=$3
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
echo "disk_faults: $n failed saves, each an error with the previous checkpoint bitwise intact; then resumed and saved"
