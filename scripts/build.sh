#!/usr/bin/env bash
# Configures (or reconfigures) and compiles tessera. Usage: bash scripts/build.sh [BUILD_DIR] [meson -D options...]
# The compiler comes from $CXX as usual for Meson (default g++).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
[ $# -gt 0 ] && shift
if [ -f "$dir/build.ninja" ]; then
  meson setup --reconfigure "$dir" "$@" >/dev/null
else
  meson setup "$dir" "$@" >/dev/null
fi
meson compile -C "$dir"
