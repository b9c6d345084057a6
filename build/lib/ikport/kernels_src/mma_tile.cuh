// mma_tile.cuh -- C[M][N] (fp32) = A[M][K] * B[K][N] through the matrix-fragment shim, one warp per
// 16x16 output tile. Not a fast GEMM: it exists so the shim (ldmatrix/mma.sync, MFMA, WMMA) is
// executed and checked for real on every GPU, and its instructions counted on every target.
//   A row-major [M][K]; B row-major [K][N], or (B_TRANSPOSED) given as Bt[N][K] row-major.
//   M, N, K multiples of 16. grid (N/16, M/16), block one warp.
#pragma once
#include "ik.cuh"

// Must match ikport/kernels.py MmaTileParams.
struct MmaTileParams {
  const void* a;
  const void* b;
  float* c;
  int m, n, k;
};

template <class T, bool B_TRANSPOSED>
__global__ void __launch_bounds__(IK_WARP_SIZE) mma_tile(MmaTileParams p) {
  constexpr int kLd = 24;  // 16 + 8 halves: rows stay 16-byte aligned for ldmatrix
  __shared__ __attribute__((aligned(16))) T s_a[16 * kLd];
  __shared__ __attribute__((aligned(16))) T s_b[16 * kLd];
  const int lane = ik::lane_id();
  const int n0 = blockIdx.x * 16, m0 = blockIdx.y * 16;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);

  ik::mma::FragC c;
  ik::mma::zero(c);
  for (int k0 = 0; k0 < p.k; k0 += 16) {
    // 16 rows x 16 elements = 32 vectors of 8 elements, spread over the warp.
    for (int i = lane; i < 32; i += ik::kWarpSize) {
      int row = i / 2, col = (i % 2) * 8;
      ik::store16(&s_a[row * kLd + col], ik::load16(a + (m0 + row) * (long long)p.k + k0 + col));
      const T* src = B_TRANSPOSED ? b + (n0 + row) * (long long)p.k + k0 + col
                                  : b + (k0 + row) * (long long)p.n + n0 + col;
      ik::store16(&s_b[row * kLd + col], ik::load16(src));
    }
    ik::block_sync();
    ik::mma::FragA<T> fa;
    ik::mma::FragB<T> fb;
    ik::mma::load_a(fa, s_a, kLd);
    if (B_TRANSPOSED) ik::mma::load_bt(fb, s_b, kLd);
    else ik::mma::load_b(fb, s_b, kLd);
    ik::mma::mma(c, fa, fb);
    ik::block_sync();
  }
#pragma unroll
  for (int s = 0; s < ik::mma::kCSlots; ++s) {
    p.c[(m0 + ik::mma::c_row(s)) * (long long)p.n + n0 + ik::mma::c_col(s)] = c.x[s];
  }
}
