// ik.cuh stand-in for the block emulator (tests/test_decode_emulation.py): block_emu.hpp plays the
// vendor layer, then the real shims (portability/, on the include path after this directory).
// A build that defines IK_MMA_AMD_MFMA_16X16X16 or IK_MMA_AMD_WMMA_W32 gets mma.cuh's AMD branch
// over emulated matrix instructions (matrix_emu.hpp); IK_MMA_EMULATED_NV, NVIDIA's layout there.
#pragma once
#include "block_emu.hpp"
#include "types.cuh"
#include "warp.cuh"
#include "memory.cuh"
#if defined(IK_MMA_AMD_MFMA_16X16X16) || defined(IK_MMA_AMD_WMMA_W32) || defined(IK_MMA_EMULATED_NV)
#include "matrix_emu.hpp"  // the AMD matrix builtins (or NVIDIA's layout), emulated (host clang)
#endif
#include "mma.cuh"
