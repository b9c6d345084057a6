#!/usr/bin/env bash
# CPU-side AMD toolchain for the amd_offline tests (Debian 12): clang-19 compiles for every AMD
# target, HIP 5.2's hipRTC (inside libamdhip64.so.5) for gfx90a, the ROCm device libraries for both.
# Idempotent: apt runs only when a package is missing, pip only when the pinned hip-python is not
# installed. Called from ci/setup-tests.sh; safe to run by hand.
set -euo pipefail

PACKAGES=(clang-19 lld-19 libamdhip64-5 libamdhip64-dev libhiprtc-builtins5 libamd-comgr2 rocm-device-libs)
# The oldest hip-python on PyPI; the compile-only calls ikport makes work with HIP 5.2 through it
# (7.2.2.562.43 was checked too). A real AMD machine wants the release matching its ROCm.
HIP_PYTHON_VERSION="${HIP_PYTHON_VERSION:-6.2.0.499.16}"
PYTHON="${PYTHON:-python3}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

installed="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("hip-python"))' 2>/dev/null || true)"
if [ "$installed" != "$HIP_PYTHON_VERSION" ]; then
  "$PYTHON" -m pip install "hip-python==$HIP_PYTHON_VERSION"
fi
