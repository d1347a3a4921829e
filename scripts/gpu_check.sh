#!/usr/bin/env bash
# gpu_check.sh: the NCCL backend's checks on a machine with a GPU, in under 3 minutes.
#
#   1. builds the NCCL test program and nccl_bench (Meson, only those targets, -Dnccl=enabled;
#      where Meson cannot configure the project there, e.g. without doctest / OpenBLAS /
#      nlohmann-json, it compiles the two programs directly with the C++ compiler),
#   2. runs the NCCL tests (host checks + collectives on the GPU; the multi-rank cases run
#      where 2 or more GPUs exist),
#   3. prints an nccl-tests-style table of all_reduce on 1 GPU from 4 KiB to 256 MiB.
#
# Usage, from the repository root:
#   bash scripts/gpu_check.sh --prepare   # on the build machine (no GPU): copies the
#                                         # header-only doctest and CLI11 into .gpu/include
#                                         # (ignored by git), for a GPU machine without them
#   bash scripts/gpu_check.sh             # on the GPU machine (carry .gpu along)
#
# Environment: CXX (default g++, else c++ / clang++), CUDA_HOME (default /usr/local/cuda),
# NCCL_HOME (where include/nccl.h and lib/libnccl.so* are; searched if unset), BUILD (default
# build-gpu), GPU_CHECK_DIRECT=1 (skip Meson, compile directly). Exit status: 0 when every test passed (or skipped) and the bench found no wrong
# value, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
BUILD=${BUILD:-build-gpu}
SETUP_LOG=${TMPDIR:-/tmp}/gpu_check_meson_setup.log
T0=$SECONDS
say() { printf '\n=== %s (t=%ds)\n' "$*" $((SECONDS - T0)); }

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p .gpu/include
  for d in doctest CLI; do
    if [[ -d /usr/include/$d ]]; then cp -r "/usr/include/$d" .gpu/include/; else echo "no /usr/include/$d here" >&2; fi
  done
  exclude="$(git rev-parse --git-path info/exclude)"
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
  du -sh .gpu
  echo "prepared .gpu/include; name .gpu in the device run's carry list"
  exit 0
fi

say "machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
command -v nvcc >/dev/null && nvcc --version | tail -n 2
CXX=${CXX:-}
if [[ -z "$CXX" ]]; then
  for c in g++ c++ clang++; do command -v "$c" >/dev/null && { CXX=$c; break; }; done
fi
[[ -n "$CXX" ]] || { echo "FAIL: no C++ compiler found"; exit 1; }
$CXX --version | head -n 1
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

# ---- locate NCCL: NCCL_HOME, the CUDA toolkit, the system, or the pip wheel nvidia-nccl-cu* --
nccl_roots=()
[[ -n "${NCCL_HOME:-}" ]] && nccl_roots+=("$NCCL_HOME")
nccl_roots+=("$CUDA_HOME" /usr /usr/local)
for py in python3 /opt/torch/.venv/bin/python3; do
  if command -v "$py" >/dev/null 2>&1; then
    p=$("$py" -c 'import nvidia.nccl as m, os; print(list(m.__path__)[0])' 2>/dev/null) && nccl_roots+=("$p")
  fi
done
NCCL_INC="" NCCL_LIB=""
for r in "${nccl_roots[@]}"; do
  [[ -z "$NCCL_INC" && -f "$r/include/nccl.h" ]] && NCCL_INC="$r/include"
  for l in "$r/lib64" "$r/lib" "$r/lib/x86_64-linux-gnu"; do
    [[ -z "$NCCL_LIB" ]] && compgen -G "$l/libnccl.so*" >/dev/null && NCCL_LIB="$l"
  done
done
if [[ -z "$NCCL_INC" || -z "$NCCL_LIB" ]]; then  # last resort: search the usual trees
  h=$(find /opt /usr -name nccl.h -path '*include*' 2>/dev/null | head -n 1)
  [[ -n "$h" ]] && r=$(dirname "$(dirname "$h")") && NCCL_INC="$r/include" &&
    for l in "$r/lib64" "$r/lib"; do
      [[ -z "$NCCL_LIB" ]] && compgen -G "$l/libnccl.so*" >/dev/null && NCCL_LIB="$l"
    done
fi
echo "nccl.h: ${NCCL_INC:-NOT FOUND}   libnccl: ${NCCL_LIB:-NOT FOUND}"
[[ -n "$NCCL_INC" && -n "$NCCL_LIB" ]] || { echo "FAIL: NCCL not found (set NCCL_HOME)"; exit 1; }
grep -E '^#define NCCL_(MAJOR|MINOR|PATCH) ' "$NCCL_INC/nccl.h" | awk '{printf "%s=%s ", $2, $3} END {print ""}'
export LD_LIBRARY_PATH="$NCCL_LIB:$CUDA_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# ---- build --------------------------------------------------------------------------------
TEST_BIN="" BENCH_BIN="" USED_MESON=0
say "build with Meson"
if [[ -z "${GPU_CHECK_DIRECT:-}" ]] && command -v meson >/dev/null 2>&1 &&
   { [[ -f "$BUILD/build.ninja" ]] || meson setup "$BUILD" -Dnccl=enabled -Dmpi=disabled \
       -Dexamples=false -Dbench=true -Dtests=true --buildtype=release >"$SETUP_LOG" 2>&1; } &&
   meson compile -C "$BUILD" nccl_test; then
  TEST_BIN="$BUILD/tests/nccl/nccl_test"
  USED_MESON=1
  meson compile -C "$BUILD" nccl_bench && BENCH_BIN="$BUILD/bench/nccl/nccl_bench"
elif [[ -n "${GPU_CHECK_DIRECT:-}" ]]; then
  echo "GPU_CHECK_DIRECT is set: compiling directly"
else
  echo "Meson could not configure or build here (see $SETUP_LOG); compiling directly"
  [[ -f "$SETUP_LOG" ]] && grep -m 3 -iE 'ERROR|not found' "$SETUP_LOG"
fi
if [[ -z "$TEST_BIN" || -z "$BENCH_BIN" ]]; then
  say "build directly with $CXX"
  mkdir -p "$BUILD/direct"
  flags=(-std=c++20 -O2 -Wall -Wextra -Wpedantic -DTESSERA_HAVE_NCCL=1 -I"$ROOT/include"
         -I"$ROOT/tests/nccl" -I"$NCCL_INC" -I"$CUDA_HOME/include")
  [[ -d "$ROOT/.gpu/include" ]] && flags+=(-I"$ROOT/.gpu/include")
  # shellcheck disable=SC2054  # the commas belong to -Wl,-rpath,DIR
  libs=(-L"$NCCL_LIB" -Wl,-rpath,"$NCCL_LIB" -L"$CUDA_HOME/lib64" -Wl,-rpath,"$CUDA_HOME/lib64"
        -l:"$(basename "$(compgen -G "$NCCL_LIB/libnccl.so*" | head -n 1)")" -lcudart -pthread)
  pids=()
  if [[ -z "$TEST_BIN" ]]; then
    for h in tessera/nccl.hpp tessera/comm/nccl/nccl_communicator.hpp tessera/comm/nccl/device_buffer.hpp \
             tessera/comm/nccl/device.hpp tessera/comm/nccl/nccl_error.hpp; do
      f="$BUILD/direct/alone_$(echo "$h" | tr '/' '_' | sed 's/\.hpp$/.cpp/')"
      sed "s|@HEADER@|$h|g" tests/nccl/alone.cpp.in > "$f"
    done
    for f in tests/nccl/nccl_main.cpp tests/nccl/host_test.cpp tests/nccl/gpu_test.cpp "$BUILD"/direct/alone_*.cpp; do
      $CXX "${flags[@]}" -c "$f" -o "$BUILD/direct/$(basename "$f" .cpp).o" & pids+=($!)
    done
  fi
  if [[ -z "$BENCH_BIN" ]]; then
    $CXX "${flags[@]}" -c bench/nccl_bench.cpp -o "$BUILD/direct/nccl_bench.o" & pids+=($!)
  fi
  ok=1
  for p in "${pids[@]}"; do wait "$p" || ok=0; done
  [[ $ok == 1 ]] || { echo "FAIL: compilation failed"; exit 1; }
  if [[ -z "$TEST_BIN" ]]; then
    $CXX "$BUILD"/direct/{nccl_main,host_test,gpu_test}.o "$BUILD"/direct/alone_*.o "${libs[@]}" \
      -o "$BUILD/direct/nccl_test" || { echo "FAIL: link of nccl_test"; exit 1; }
    TEST_BIN="$BUILD/direct/nccl_test"
  fi
  if [[ -z "$BENCH_BIN" ]]; then
    $CXX "$BUILD/direct/nccl_bench.o" "${libs[@]}" -o "$BUILD/direct/nccl_bench" || { echo "FAIL: link of nccl_bench"; exit 1; }
    BENCH_BIN="$BUILD/direct/nccl_bench"
  fi
fi

# ---- tests --------------------------------------------------------------------------------
status=0
if [[ $USED_MESON == 1 ]]; then
  say "meson test --suite nccl"
  meson test -C "$BUILD" --no-rebuild --suite nccl --print-errorlogs -v || status=1
  if grep -q 'SKIP: no CUDA device' "$BUILD/meson-logs/testlog.txt"; then
    echo "FAIL: the GPU tests skipped: CUDA sees no device on this machine"
    status=1
  fi
else
  say "nccl_test --host-only"
  timeout 120 "$TEST_BIN" --host-only --no-colors || status=1
  say "nccl_test (collectives on the GPU)"
  timeout 240 "$TEST_BIN" --no-colors 2>&1 | grep -vE '^\s*$' | tail -n 60
  rc=${PIPESTATUS[0]}
  echo "nccl_test exit status: $rc"
  [[ $rc == 0 ]] || status=1
fi

# ---- bench --------------------------------------------------------------------------------
say "nccl_bench: all_reduce on 1 GPU, 4 KiB .. 256 MiB"
timeout 120 "$BENCH_BIN" -b 4K -e 256M -f 2 -n 20 -w 5 || status=1

say "done: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
