#!/usr/bin/env bash
# Everything the CPU test suite needs on a fresh Debian 12 machine: ikport with its NVIDIA
# compile-time wheels (NVRTC + headers, no toolkit) and test tools, then the AMD toolchain
# (Debian's HIP 5.2 hipRTC and clang-19 for the compile-all check). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -e ".[cuda,test]"
PYTHON="$PYTHON" bash ci/setup-amd.sh
