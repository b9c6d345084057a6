#!/usr/bin/env bash
# Everything the CPU test suite needs on a fresh Debian 12 machine: ikport with its NVIDIA
# compile-time wheels (NVRTC + headers, no toolkit), test tools and transformers (tests/test_hf.py:
# a pure-Python wheel and a few small ones beside the CPU torch already there), then the AMD toolchain
# (Debian's HIP 5.2 hipRTC and clang-19 for the compile-all check). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -e ".[cuda,test,transformers]"
PYTHON="$PYTHON" bash ci/setup-amd.sh
