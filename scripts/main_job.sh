#!/usr/bin/env bash
# The main job on the default (threads) backend: writes the King James Bible (Debian's bible-kjv)
# to data/kjv.txt, then trains a small GPT on it data-parallel over 2 thread ranks, checking every
# step against a serial run in the same process, and prints a sample.
# Usage: bash scripts/main_job.sh [BUILD_DIR] [train_gpt options...]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
[ $# -gt 0 ] && shift
mkdir -p data
if [ ! -s data/kjv.txt ]; then
  bible "Gen1:1-Rev22:21" > data/kjv.txt
fi
export OPENBLAS_NUM_THREADS=1
exec "$dir/examples/train_gpt" --data data/kjv.txt --dp 2 --steps 400 --verify "$@"
