# Sourced by lost_rank_mpi.sh and elastic_resume.sh (issue 17): losing one rank of a job that
# mpirun started. The caller defines fail() (prints and exits non-zero).
#
# kill_world_rank JOB RANK BOUND_S LOG
#   JOB: mpirun's pid (a background job of the caller's shell); RANK: the world rank to kill;
#   BOUND_S: seconds within which the job must be over (TESSERA_TIMEOUT + 5); LOG: the job's
#   output. Kills the train_gpt process whose environment says OMPI_COMM_WORLD_RANK=RANK with
#   SIGKILL, then requires: mpirun exits within BOUND_S, non-zero, with output naming rank RANK,
#   and no other process of the job is left running (a zombie, dead but not yet reaped by the
#   container's init, counts as gone). Sets lost_rank_rc (mpirun's exit code) and
#   lost_rank_seconds (from the kill to mpirun's exit).
kill_world_rank() {
  local job=$1 rank=$2 bound=$3 log=$4 victim= p others t0 t1 st
  for p in $(pgrep -P "$job"); do
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$rank" && victim=$p
  done
  [ -n "$victim" ] || fail "no process of world rank $rank found among mpirun's children"
  others=$(for p in $(pgrep -P "$job"); do [ "$p" != "$victim" ] && echo "$p"; done)
  t0=$(date +%s.%N)
  kill -9 "$victim"
  for _ in $(seq $((bound * 10))); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
  t1=$(date +%s.%N)
  lost_rank_seconds=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  if kill -0 "$job" 2>/dev/null; then
    cat "$log"
    fail "mpirun still running $lost_rank_seconds s after world rank $rank was killed (bound $bound s)"
  fi
  wait "$job"
  lost_rank_rc=$?
  sleep 0.5  # the kernel reaps what mpirun killed
  for p in $others; do
    st=$(ps -o stat= -p "$p" 2>/dev/null | tr -d ' ')
    [ -z "$st" ] || [[ $st == Z* ]] || { ps -o pid,stat,cmd -p "$p"; fail "process $p of the job still running"; }
  done
  [ "$lost_rank_rc" -ne 0 ] || fail "mpirun exited 0 after losing world rank $rank"
  grep -Eq "rank $rank\b" "$log" || { tail -20 "$log"; fail "the output does not name rank $rank"; }
}
