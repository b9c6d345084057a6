// vendor_hip.cuh -- AMD spelling of every shim concept. Same names, same order as vendor_cuda.cuh.
//
// hipRTC pre-includes its runtime and fp16 headers and defines __HIPCC_RTC__; an offline clang
// (-x hip) build needs the includes. HIP 5.2's hipRTC has no bf16 type: bf16 is bit-level here.
#pragma once
#if !defined(__HIPCC_RTC__)
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#endif

#define IK_VENDOR_AMD 1
#define IK_VENDOR_NAME "amd"
#define IK_DEVICE __device__ __forceinline__
#define IK_HD __host__ __device__ __forceinline__
#define IK_RESTRICT __restrict__
#define IK_INFINITY __builtin_huge_valf()

#if defined(__AMDGCN_WAVEFRONT_SIZE) && defined(IK_WARP_SIZE)
static_assert(IK_WARP_SIZE == __AMDGCN_WAVEFRONT_SIZE,
              "IK_WARP_SIZE injected by the backend disagrees with the compiler's wavefront size");
#endif

namespace ik {
namespace vendor {

using half_t = __half;
struct bf16_t {
  unsigned short bits;
};
// __ballot returns 64 bits on AMD, also under wave32: never truncate it to 32.
using lane_mask_t = unsigned long long;

IK_DEVICE int lane_id() {
  return static_cast<int>(__builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u)));
}
// A wavefront runs in lockstep: HIP's shuffles take no mask.
IK_DEVICE float shfl_xor(float v, int mask, int width) { return __shfl_xor(v, mask, width); }
IK_DEVICE int shfl_xor(int v, int mask, int width) { return __shfl_xor(v, mask, width); }
IK_DEVICE float shfl(float v, int src, int width) { return __shfl(v, src, width); }
IK_DEVICE int shfl(int v, int src, int width) { return __shfl(v, src, width); }
IK_DEVICE lane_mask_t ballot(bool p) { return __ballot(p); }
// No independent thread scheduling: a wave is always converged; only LDS ordering is needed.
// The wave barrier alone orders no memory for the compiler (LLVM's intrinsic touches none): the
// wavefront-scope fences keep a lane's LDS writes before it and other lanes' reads after it.
IK_DEVICE void warp_sync() {
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "wavefront");
  __builtin_amdgcn_wave_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "wavefront");
}
IK_DEVICE void block_sync() { __syncthreads(); }
IK_DEVICE bool block_any(bool p) { return __syncthreads_or(p) != 0; }

IK_DEVICE float exp2_fast(float x) { return __builtin_exp2f(x); }

IK_DEVICE unsigned short half_bits(half_t h) { return __builtin_bit_cast(unsigned short, h); }
IK_DEVICE half_t half_from_bits(unsigned short b) { return __builtin_bit_cast(half_t, b); }
IK_DEVICE float half_to_float(half_t h) {
  return static_cast<float>(__builtin_bit_cast(_Float16, half_bits(h)));
}
IK_DEVICE half_t float_to_half(float f) {
  return half_from_bits(__builtin_bit_cast(unsigned short, static_cast<_Float16>(f)));
}
IK_DEVICE float2 half2_bits_to_float2(unsigned int u) {
  _Float16 lo = __builtin_bit_cast(_Float16, static_cast<unsigned short>(u & 0xffffu));
  _Float16 hi = __builtin_bit_cast(_Float16, static_cast<unsigned short>(u >> 16));
  return make_float2(static_cast<float>(lo), static_cast<float>(hi));
}
IK_DEVICE unsigned short bf16_bits(bf16_t h) { return h.bits; }
IK_DEVICE bf16_t bf16_from_bits(unsigned short b) { return bf16_t{b}; }
// (a - z) * s on two packed elements, each step rounded as the dtype rounds: INT4 dequantization
// (a and z hold small integers, so a - z is exact and the product is rounded once).
typedef _Float16 ik_f16x2_t __attribute__((ext_vector_type(2)));
IK_DEVICE unsigned int half2_sub_mul(unsigned int a, unsigned int z, unsigned int s) {
  ik_f16x2_t r = (__builtin_bit_cast(ik_f16x2_t, a) - __builtin_bit_cast(ik_f16x2_t, z)) *
                 __builtin_bit_cast(ik_f16x2_t, s);
  return __builtin_bit_cast(unsigned int, r);
}
IK_DEVICE unsigned int half2_sub(unsigned int a, unsigned int z) {
  return __builtin_bit_cast(unsigned int, __builtin_bit_cast(ik_f16x2_t, a) - __builtin_bit_cast(ik_f16x2_t, z));
}
// a * b + c (contracted to v_pk_fma_f16 where the compiler fuses; hipRTC 5.2's clang has no
// __builtin_elementwise_fma: its callers' operands make both roundings exact), and a * b (INT4
// dequantization's high nibbles, types.cuh).
IK_DEVICE unsigned int half2_fma(unsigned int a, unsigned int b, unsigned int c) {
  return __builtin_bit_cast(unsigned int, __builtin_bit_cast(ik_f16x2_t, a) * __builtin_bit_cast(ik_f16x2_t, b) +
                                              __builtin_bit_cast(ik_f16x2_t, c));
}
IK_DEVICE unsigned int half2_mul(unsigned int a, unsigned int b) {
  return __builtin_bit_cast(unsigned int, __builtin_bit_cast(ik_f16x2_t, a) * __builtin_bit_cast(ik_f16x2_t, b));
}
// bf16 through fp32: the difference and the product are exact there, so one round-to-nearest-even
// gives what a native bf16 multiply gives.
IK_DEVICE unsigned int bf16_round_bits(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
IK_DEVICE unsigned short float_to_bf16_bits(float f) { return static_cast<unsigned short>(bf16_round_bits(f)); }
IK_DEVICE unsigned int bf162_sub(unsigned int a, unsigned int z) {
  float lo = __uint_as_float(a << 16) - __uint_as_float(z << 16);
  float hi = __uint_as_float(a & 0xffff0000u) - __uint_as_float(z & 0xffff0000u);
  return bf16_round_bits(lo) | (bf16_round_bits(hi) << 16);
}
IK_DEVICE unsigned int bf162_sub_mul(unsigned int a, unsigned int z, unsigned int s) {
  float lo = (__uint_as_float(a << 16) - __uint_as_float(z << 16)) * __uint_as_float(s << 16);
  float hi = (__uint_as_float(a & 0xffff0000u) - __uint_as_float(z & 0xffff0000u)) *
             __uint_as_float(s & 0xffff0000u);
  return bf16_round_bits(lo) | (bf16_round_bits(hi) << 16);
}

IK_DEVICE uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
// The nontemporal builtin takes only native vector pointers; HIP's uint4 is a struct around one.
typedef unsigned int ik_u32x4_t __attribute__((ext_vector_type(4)));
IK_DEVICE uint4 load16_stream(const void* p) {
  ik_u32x4_t v = __builtin_nontemporal_load(reinterpret_cast<const ik_u32x4_t*>(p));
  return make_uint4(v.x, v.y, v.z, v.w);
}
IK_DEVICE void store16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// __threadfence is an agent-scope seq_cst fence: on CDNA it also invalidates the vector L1, so a
// plain load after it sees what other blocks wrote before their fence.
IK_DEVICE void fence_device() { __threadfence(); }
IK_DEVICE int atomic_add(int* p, int v) { return atomicAdd(p, v); }
IK_DEVICE float load_coherent(const float* p) { return *p; }
IK_DEVICE float4 load_coherent4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// No cp.async on AMD: a plain 16-byte load and LDS store; the caller's barrier orders them.
#define IK_HAS_ASYNC_COPY 0
IK_DEVICE void cp_async16(void* smem, const void* gmem) { store16(smem, load16(gmem)); }
IK_DEVICE void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  store16(smem, valid ? load16(gmem) : make_uint4(0, 0, 0, 0));
}
IK_DEVICE void cp_async8_zfill(void* smem, const void* gmem, bool valid) {
  *static_cast<unsigned long long*>(smem) = valid ? *static_cast<const unsigned long long*>(gmem) : 0ull;
}
IK_DEVICE void cp_async4_zfill(void* smem, const void* gmem, bool valid) {
  *static_cast<unsigned int*>(smem) = valid ? *static_cast<const unsigned int*>(gmem) : 0u;
}
IK_DEVICE void cp_async_commit() {}
template <int N>
IK_DEVICE void cp_async_wait() {}

// No block clusters on AMD (kernels that need them static_assert IK_HAS_CLUSTERS).
#define IK_HAS_CLUSTERS 0
#define IK_CLUSTER_DIMS(n)
IK_DEVICE void cluster_store(float*, unsigned int, float) { __builtin_trap(); }
IK_DEVICE void cluster_arrive_relaxed() { __builtin_trap(); }
IK_DEVICE void cluster_arrive() { __builtin_trap(); }
IK_DEVICE void cluster_wait() { __builtin_trap(); }

}  // namespace vendor
}  // namespace ik

// Matrix units: CDNA2/CDNA3 have MFMA (wave64), RDNA3 has WMMA (wave32). The backend passes the
// target's unit as -DIK_MMA_AMD_MFMA_16X16X16 or -DIK_MMA_AMD_WMMA_W32 (backends/target.py);
// other AMD targets have no shim yet: a kernel that needs one fails to compile rather than
// silently running scalar code.
