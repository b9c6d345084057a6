// warp.cuh -- lanes, shuffles and reductions over IK_WARP_SIZE (32 on NVIDIA/RDNA, 64 on CDNA).
#pragma once

namespace ik {

constexpr int kWarpSize = IK_WARP_SIZE;
using lane_mask_t = vendor::lane_mask_t;

IK_DEVICE int lane_id() { return vendor::lane_id(); }
IK_DEVICE int warp_id() { return static_cast<int>(threadIdx.x) / kWarpSize; }

IK_DEVICE float shfl_xor(float v, int mask, int width = kWarpSize) { return vendor::shfl_xor(v, mask, width); }
IK_DEVICE int shfl_xor(int v, int mask, int width = kWarpSize) { return vendor::shfl_xor(v, mask, width); }
// Value of `v` held by lane `src` (of the `width`-lane group the caller is in).
IK_DEVICE float broadcast(float v, int src, int width = kWarpSize) { return vendor::shfl(v, src, width); }
IK_DEVICE int broadcast(int v, int src, int width = kWarpSize) { return vendor::shfl(v, src, width); }
IK_DEVICE lane_mask_t ballot(bool p) { return vendor::ballot(p); }
IK_DEVICE bool any(bool p) { return vendor::ballot(p) != 0; }
IK_DEVICE void warp_sync() { vendor::warp_sync(); }
IK_DEVICE void block_sync() { vendor::block_sync(); }
// Barrier that also tells every thread whether any thread of the block passed `p`.
IK_DEVICE bool block_any(bool p) { return vendor::block_any(p); }
IK_DEVICE float exp2_fast(float x) { return vendor::exp2_fast(x); }

// Butterfly reductions over groups of WIDTH consecutive lanes (WIDTH a power of two <= warp size):
// every lane of the group ends with the group's result.
template <int WIDTH = kWarpSize>
IK_DEVICE float group_sum(float v) {
  static_assert(WIDTH >= 1 && WIDTH <= kWarpSize && (WIDTH & (WIDTH - 1)) == 0, "bad group width");
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o /= 2) v += vendor::shfl_xor(v, o, kWarpSize);
  return v;
}
template <int WIDTH = kWarpSize>
IK_DEVICE float group_max(float v) {
  static_assert(WIDTH >= 1 && WIDTH <= kWarpSize && (WIDTH & (WIDTH - 1)) == 0, "bad group width");
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o /= 2) v = fmaxf(v, vendor::shfl_xor(v, o, kWarpSize));
  return v;
}
IK_DEVICE float warp_sum(float v) { return group_sum<kWarpSize>(v); }
IK_DEVICE float warp_max(float v) { return group_max<kWarpSize>(v); }

}  // namespace ik
