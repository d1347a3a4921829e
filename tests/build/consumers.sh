#!/usr/bin/env bash
# Builds and runs tiny consumers of tessera, each the way a user would write it
# (docs/consuming.md):
#   meson  -- tessera as a Meson subproject (subprojects/tessera + a wrap that provides it)
#   cmake  -- pkg_check_modules(... IMPORTED_TARGET tessera) against an installed tessera
#   make   -- a plain Makefile with `pkg-config --cflags --libs tessera`
# The install goes into a temporary prefix from a separate configure of this source tree
# (no tests, examples or benchmarks, so it is quick). With the MPI / NCCL backend enabled, the
# consumers also build a program through tessera-mpi / tessera-nccl. Works offline.
#
# usage: consumers.sh SOURCE_ROOT CONSUMERS_DIR MESON MPI NCCL
#   MPI, NCCL: enabled | disabled (the backends of the build that runs this test)
#   environment: CXX (the compiler of that build)
# Exit status: 0 all passed, 1 a step failed (its log is printed). A consumer whose tool
# (pkg-config, make, cmake) is missing is skipped with a line that says so.
set -euo pipefail

src=$1 fixtures=$2 meson=$3 mpi=$4 nccl=$5
export CXX=${CXX:-c++}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tessera-consumers.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export OPENBLAS_NUM_THREADS=1

# step NAME COMMAND...: runs COMMAND with its output in a log; on failure prints the log.
step() {
  local name=$1 start=$SECONDS
  shift
  if "$@" >"$tmp/log" 2>&1; then
    echo "ok    $name ($((SECONDS - start)) s)"
  else
    echo "FAIL  $name: $*"
    sed 's/^/    /' "$tmp/log"
    exit 1
  fi
}
# expect TEXT WHAT...: fails unless the output of WHAT contains TEXT.
expect() {
  local text=$1 out
  shift
  out=$("$@")
  if [[ $out != *"$text"* ]]; then
    echo "expected \"$text\" in the output of: $*"
    echo "got: $out"
    return 1
  fi
}
# copy_consumer KIND: the consumer's build file(s) and the sources into $tmp/KIND.
copy_consumer() {
  cp -r "$fixtures/$1" "$tmp/$1"
  cp "$fixtures"/*.cpp "$tmp/$1/"
}
with_mpi=$([[ $mpi == enabled ]] && echo ON || echo OFF)
with_nccl=$([[ $nccl == enabled ]] && echo ON || echo OFF)
echo "compiler: $CXX; MPI backend: $mpi; NCCL backend: $nccl"

# ---- install tessera into $prefix -----------------------------------------------------------
step "configure tessera for install" "$meson" setup "$tmp/tessera-build" "$src" \
  --prefix "$prefix" --libdir lib -Dtests=false -Dexamples=false -Dbench=false \
  -Dmpi="$mpi" -Dnccl="$nccl" --wrap-mode=nodownload
step "install tessera" "$meson" install -C "$tmp/tessera-build" --quiet
installed_headers() {
  diff <(cd "$src/include" && find tessera -name '*.hpp' | sort) \
       <(cd "$prefix/include" && find tessera -name '*.hpp' | sort)
}
step "every header is installed" installed_headers

if command -v pkg-config >/dev/null; then
  step "tessera.pc: -std=c++20" expect "-std=c++20" pkg-config --cflags tessera
  step "tessera.pc: include dir" expect "-I$prefix/include" pkg-config --cflags tessera
  step "tessera.pc: -pthread" expect "-pthread" pkg-config --libs tessera
  step "tessera.pc: requires nlohmann_json" expect "nlohmann_json" pkg-config --print-requires tessera
  for backend in mpi nccl; do
    if [[ ${!backend} == enabled ]]; then
      define=TESSERA_HAVE_${backend^^}=1
      step "tessera-$backend.pc: defines $define" expect "-D$define" pkg-config --cflags tessera-$backend
      step "tessera-$backend.pc: requires tessera" expect "tessera" pkg-config --print-requires tessera-$backend
    else
      step "no tessera-$backend.pc without the $backend backend" test ! -e "$prefix/lib/pkgconfig/tessera-$backend.pc"
    fi
  done
else
  echo "skip  pkg-config consumers: no pkg-config"
fi

tested=0
# ---- a plain Makefile ----------------------------------------------------------------------------
if command -v pkg-config >/dev/null && command -v make >/dev/null; then
  copy_consumer make
  step "make: build" make -j -C "$tmp/make" WITH_MPI="$with_mpi" WITH_NCCL="$with_nccl"
  step "make: run" expect "tessera consumer: ok" "$tmp/make/consumer"
  if [[ $mpi == enabled ]]; then step "make: run the MPI consumer" "$tmp/make/consumer_mpi"; fi
  tested=$((tested + 1))
else
  echo "skip  make consumer: no make or pkg-config"
fi

# ---- CMake through pkg-config -----------------------------------------------------------------
if command -v pkg-config >/dev/null && command -v cmake >/dev/null; then
  copy_consumer cmake
  # CXX may be "ccache c++": CMake takes the compiler and the launcher apart.
  read -ra cxx_words <<<"$CXX"
  cmake_cxx=(-DCMAKE_CXX_COMPILER="${cxx_words[-1]}")
  if ((${#cxx_words[@]} > 1)); then cmake_cxx+=(-DCMAKE_CXX_COMPILER_LAUNCHER="${cxx_words[0]}"); fi
  step "cmake: configure" cmake -S "$tmp/cmake" -B "$tmp/cmake/build" "${cmake_cxx[@]}" \
    -DTESSERA_CONSUMER_MPI="$with_mpi" -DTESSERA_CONSUMER_NCCL="$with_nccl"
  step "cmake: build" cmake --build "$tmp/cmake/build" --parallel
  step "cmake: run" expect "tessera consumer: ok" "$tmp/cmake/build/consumer"
  if [[ $mpi == enabled ]]; then step "cmake: run the MPI consumer" "$tmp/cmake/build/consumer_mpi"; fi
  tested=$((tested + 1))
else
  echo "skip  cmake consumer: no cmake or pkg-config"
fi

# ---- Meson, tessera as a subproject ----------------------------------------------------------
# subprojects/tessera is a link to this source tree; the wrap says which dependencies the
# subproject provides, so plain dependency('tessera') finds it (a wrap-git whose directory
# already exists is used as it is, nothing is fetched).
copy_consumer meson
mkdir -p "$tmp/meson/subprojects"
ln -s "$src" "$tmp/meson/subprojects/tessera"
cat >"$tmp/meson/subprojects/tessera.wrap" <<WRAP
[wrap-git]
url = $src
revision = HEAD

[provide]
dependency_names = tessera, tessera-mpi, tessera-nccl
WRAP
step "meson: configure (tessera as subproject)" "$meson" setup "$tmp/meson/build" "$tmp/meson" \
  --wrap-mode=nodownload --force-fallback-for=tessera,tessera-mpi,tessera-nccl \
  -Dmpi="$mpi" -Dnccl="$nccl" -Dtessera:mpi="$mpi" -Dtessera:nccl="$nccl"
step "meson: build" "$meson" compile -C "$tmp/meson/build"
step "meson: run" expect "tessera consumer: ok" "$tmp/meson/build/consumer"
if [[ $mpi == enabled ]]; then step "meson: run the MPI consumer" "$tmp/meson/build/consumer_mpi"; fi
tested=$((tested + 1))

echo "$tested consumers built and ran"
