// ik.cuh -- the one header every ikport kernel includes.
//
// Kernels are written only in the vocabulary below (namespace ik). This is the only place that
// branches on the vendor; docs/portability.md lists every shim with its NVIDIA and AMD mapping.
//
// Facts about the target are injected by the backend as -D values (backends/target.py):
//   IK_WARP_SIZE   32 on NVIDIA and RDNA, 64 on CDNA
//   IK_ARCH_SM     compute capability * 10 on NVIDIA (e.g. 900), 0 on AMD
//   IK_MMA_AMD_MFMA_16X16X16 / IK_MMA_AMD_WMMA_W32   AMD's matrix unit (CDNA / RDNA3), from the
//                  target's table entry (ArchFacts.matrix_unit); NVIDIA's follows IK_ARCH_SM
#pragma once

#if defined(__HIPCC_RTC__) || defined(__HIP__) || defined(__HIP_PLATFORM_AMD__)
#include "vendor_hip.cuh"
#else
#include "vendor_cuda.cuh"
#endif

#ifndef IK_WARP_SIZE
#error "IK_WARP_SIZE must be defined by the backend (-DIK_WARP_SIZE=32|64)"
#endif

#include "types.cuh"
#include "warp.cuh"
#include "memory.cuh"
#include "mma.cuh"
