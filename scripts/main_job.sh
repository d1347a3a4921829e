#!/usr/bin/env bash
# The main job on the default (threads) backend: writes the King James Bible (Debian's bible-kjv)
# to data/kjv.txt, then trains a GPT on it over 8 thread ranks as dp 2 x pp 2 x tp 2 (1F1B, 4
# micro-batches), checks the first 20 steps against a serial run in the same process, saves a
# sharded checkpoint, draws the loss curve, and prints a sample.
# It builds only what it runs (examples/train_gpt, a release build when it configures BUILD_DIR
# itself): the tests and benchmarks are scripts/test.sh's.
# Usage: bash scripts/main_job.sh [BUILD_DIR] [train_gpt options...]: the options go after the
# script's own, and train_gpt takes a flag's last value, so `bash scripts/main_job.sh build --steps 2`
# trains 2 steps (tests/harden/train_gpt/bad_flags.py checks a flag given twice).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
[ $# -gt 0 ] && shift
[ -f "$dir/build.ninja" ] || meson setup "$dir" -Dbuildtype=release >/dev/null
meson compile -C "$dir" examples/train_gpt
mkdir -p data
if [ ! -s data/kjv.txt ]; then
  bible "Gen1:1-Rev22:21" > data/kjv.txt
fi
export OPENBLAS_NUM_THREADS=1
exec "$dir/examples/train_gpt" --data data/kjv.txt --dp 2 --pp 2 --tp 2 --schedule 1f1b --microbatches 4 \
  --layers 6 --d-model 192 --heads 6 --context 128 --batch 32 --steps 400 --log-every 20 --val-every 100 \
  --save data/ckpt --loss-svg data/loss.svg --loss-csv data/loss.csv --verify "$@"
