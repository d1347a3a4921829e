#!/usr/bin/env bash
# Builds tessera and runs every test (threads, MPI under mpirun, build/consumer checks; GPU tests
# skip without a GPU). Usage: bash scripts/test.sh [BUILD_DIR] [meson -D options...]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
bash scripts/build.sh "$@"
export OPENBLAS_NUM_THREADS=1
meson test -C "$dir" --print-errorlogs
