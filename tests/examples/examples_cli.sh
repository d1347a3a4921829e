#!/usr/bin/env bash
# The small examples' command line (examples/example_main.hpp): --help says what the example
# does (exit 0, nothing run), an argument is a usage error (exit 2), and an error such as a
# TESSERA_TIMEOUT that is not a number ends with one line and exit code 1; before session 18
# every argument was ignored (the whole example ran) and such an error aborted (exit 134).
# Usage: examples_cli.sh EXAMPLE...
set -uo pipefail
fail() { echo "FAIL: $*"; exit 1; }
export OPENBLAS_NUM_THREADS=1
for exe in "$@"; do
  name=$(basename "$exe")
  out=$(timeout 60 "$exe" --help 2>&1); rc=$?
  [ $rc -eq 0 ] || fail "$name --help: exit $rc: $out"
  grep -q "It takes no arguments" <<< "$out" || fail "$name --help: $out"
  grep -q "^step\|^world of" <<< "$out" && fail "$name --help ran the example: $out"
  out=$(timeout 60 "$exe" --bogus 2>&1); rc=$?
  [ $rc -eq 2 ] || fail "$name --bogus: exit $rc, expected 2: $out"
  grep -q "unexpected argument '--bogus'" <<< "$out" || fail "$name --bogus: $out"
  for v in abc 0; do
    out=$(TESSERA_TIMEOUT=$v timeout 60 "$exe" 2>&1); rc=$?
    [ $rc -eq 1 ] || fail "$name with TESSERA_TIMEOUT=$v: exit $rc, expected 1: $out"
    grep -q "TESSERA_TIMEOUT='$v' is not a number of seconds" <<< "$out" || fail "$name with TESSERA_TIMEOUT=$v: $out"
  done
  out=$(TESSERA_DEBUG_COLLECTIVES=bogus timeout 60 "$exe" 2>&1); rc=$?
  [ $rc -eq 1 ] || fail "$name with TESSERA_DEBUG_COLLECTIVES=bogus: exit $rc, expected 1: $out"
  echo "ok: $name"
done
echo "examples_cli: all passed"
