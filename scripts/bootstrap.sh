#!/usr/bin/env bash
# Installs the Debian packages tessera's build, tests and main job need -- only those missing.
# Usage: bash scripts/bootstrap.sh            (run as root, or with sudo available)
set -euo pipefail
pkgs=(meson ninja-build pkg-config cmake g++ clang doctest-dev libboost-mpi-dev libopenmpi-dev openmpi-bin
      libopenblas-dev nlohmann-json3-dev libcli11-dev bible-kjv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "bootstrap: all ${#pkgs[@]} packages present"
  exit 0
fi
echo "bootstrap: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "bootstrap: done"
