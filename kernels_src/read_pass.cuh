// read_pass.cuh -- the read_pass family (kernels_src/manifest.yaml): a plain streaming read of a
// buffer, 16-byte vector loads, UNROLL of them in flight a thread, grid-stride. The benchmarks'
// floor for a memory-bound kernel of the same bytes (ikport.bench.harness.measure_read_pass; the
// goals of docs/benchmarks.md are stated against it). Each warp XORs what it read and writes one
// word, so nothing is dead code and a test can check every byte was read once.
#pragma once
#include "ik.cuh"

// Must match ikport/kernels.py ReadPassParams field for field (ctypes mirrors C layout).
struct ReadPassParams {
  const void* src;     // 16-byte aligned
  unsigned int* sink;  // one word a warp of the grid
  long long n16;       // 16-byte vectors to read
};

template <int UNROLL>
__global__ void __launch_bounds__(512) read_pass(const ReadPassParams p) {
  const uint4* src = static_cast<const uint4*>(p.src);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned int acc = 0;
  for (; i + (UNROLL - 1) * stride < p.n16; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = ik::load16_stream(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < p.n16; i += stride) {
    const uint4 v = ik::load16_stream(src + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  int a = static_cast<int>(acc);
#pragma unroll
  for (int m = ik::kWarpSize / 2; m > 0; m /= 2) a ^= ik::shfl_xor(a, m);
  if (ik::lane_id() == 0) {
    p.sink[(static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / ik::kWarpSize] =
        static_cast<unsigned int>(a);
  }
}
