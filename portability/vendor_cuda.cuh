// vendor_cuda.cuh -- NVIDIA spelling of every shim concept. Same names, same order as vendor_hip.cuh.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define IK_VENDOR_NVIDIA 1
#define IK_VENDOR_NAME "nvidia"
#define IK_DEVICE __device__ __forceinline__
#define IK_HD __host__ __device__ __forceinline__
#define IK_RESTRICT __restrict__
// +inf without <math.h>: NVRTC ships no libc headers.
#define IK_INFINITY __int_as_float(0x7f800000)

namespace ik {
namespace vendor {

using half_t = __half;
using bf16_t = __nv_bfloat16;
// A ballot over one warp: 32 bits on NVIDIA.
using lane_mask_t = unsigned int;

IK_DEVICE int lane_id() {
  unsigned int l;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(l));
  return static_cast<int>(l);
}
IK_DEVICE float shfl_xor(float v, int mask, int width) { return __shfl_xor_sync(0xffffffffu, v, mask, width); }
IK_DEVICE int shfl_xor(int v, int mask, int width) { return __shfl_xor_sync(0xffffffffu, v, mask, width); }
IK_DEVICE float shfl(float v, int src, int width) { return __shfl_sync(0xffffffffu, v, src, width); }
IK_DEVICE int shfl(int v, int src, int width) { return __shfl_sync(0xffffffffu, v, src, width); }
IK_DEVICE lane_mask_t ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
IK_DEVICE void warp_sync() { __syncwarp(); }
IK_DEVICE void block_sync() { __syncthreads(); }
IK_DEVICE bool block_any(bool p) { return __syncthreads_or(p) != 0; }

// 2^x on the special-function unit (ex2.approx: ~2 ulp, flushes denormals; inputs here are <= 0).
IK_DEVICE float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

IK_DEVICE float half_to_float(half_t h) { return __half2float(h); }
IK_DEVICE half_t float_to_half(float f) { return __float2half_rn(f); }
IK_DEVICE float2 half2_bits_to_float2(unsigned int u) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  return __half22float2(h);
}
IK_DEVICE unsigned short half_bits(half_t h) { return __half_as_ushort(h); }
IK_DEVICE unsigned short bf16_bits(bf16_t h) { return __bfloat16_as_ushort(h); }
IK_DEVICE bf16_t bf16_from_bits(unsigned short b) { return __ushort_as_bfloat16(b); }
// Round to nearest even in one instruction (cvt.rn.bf16.f32, sm_80+; NaN gives the canonical NaN).
IK_DEVICE unsigned short float_to_bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
IK_DEVICE half_t half_from_bits(unsigned short b) { return __ushort_as_half(b); }
// (a - z) * s on two packed elements, each step rounded as the dtype rounds: INT4 dequantization
// (a and z hold small integers, so a - z is exact and the product is rounded once).
IK_DEVICE unsigned int half2_sub_mul(unsigned int a, unsigned int z, unsigned int s) {
  __half2 r = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&z)),
                      *reinterpret_cast<__half2*>(&s));
  return *reinterpret_cast<unsigned int*>(&r);
}
IK_DEVICE unsigned int half2_sub(unsigned int a, unsigned int z) {
  __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&z));
  return *reinterpret_cast<unsigned int*>(&r);
}
// a * b + c rounded once, and a * b (INT4 dequantization's high nibbles, types.cuh).
IK_DEVICE unsigned int half2_fma(unsigned int a, unsigned int b, unsigned int c) {
  __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b), *reinterpret_cast<__half2*>(&c));
  return *reinterpret_cast<unsigned int*>(&r);
}
IK_DEVICE unsigned int half2_mul(unsigned int a, unsigned int b) {
  __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
  return *reinterpret_cast<unsigned int*>(&r);
}
IK_DEVICE unsigned int bf162_sub(unsigned int a, unsigned int z) {
  __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&z));
  return *reinterpret_cast<unsigned int*>(&r);
}
IK_DEVICE unsigned int bf162_sub_mul(unsigned int a, unsigned int z, unsigned int s) {
  __nv_bfloat162 r = __hmul2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&z)),
                             *reinterpret_cast<__nv_bfloat162*>(&s));
  return *reinterpret_cast<unsigned int*>(&r);
}

// 16-byte loads. The streaming form skips L1 for data read exactly once (the KV cache).
IK_DEVICE uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
IK_DEVICE uint4 load16_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
IK_DEVICE void store16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// Cross-block handoff: a device-scope fence, an atomic counter, and a load that skips L1 (data
// another block wrote).
IK_DEVICE void fence_device() { __threadfence(); }
IK_DEVICE int atomic_add(int* p, int v) { return atomicAdd(p, v); }
IK_DEVICE float load_coherent(const float* p) { return __ldcg(p); }
IK_DEVICE float4 load_coherent4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

// Asynchronous global->shared copy of 16 bytes: cp.async on sm_80 and newer, a plain copy before.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define IK_HAS_ASYNC_COPY 1
IK_DEVICE void cp_async16(void* smem, const void* gmem) {
  unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}
// Copies 16 bytes when `valid`, else writes 16 zero bytes (src-size 0), never reading gmem.
IK_DEVICE void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
// 8 and 4 bytes: cp.async.ca (.cg takes only 16), same zero fill.
IK_DEVICE void cp_async8_zfill(void* smem, const void* gmem, bool valid) {
  unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  int n = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
IK_DEVICE void cp_async4_zfill(void* smem, const void* gmem, bool valid) {
  unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
IK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
IK_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
#else
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
#endif

// Block clusters (sm_90+): the blocks of a cluster run at once on one GPC and can store into each
// other's shared memory. The barrier is split: arrive, then wait for every thread of the cluster.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define IK_HAS_CLUSTERS 1
#define IK_CLUSTER_DIMS(n) __cluster_dims__(n, 1, 1)
IK_DEVICE void cluster_store(float* smem, unsigned int rank, float v) {
  unsigned int local = static_cast<unsigned int>(__cvta_generic_to_shared(smem)), remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
}
IK_DEVICE void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); }
IK_DEVICE void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
IK_DEVICE void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
#else
#define IK_HAS_CLUSTERS 0
#define IK_CLUSTER_DIMS(n)
IK_DEVICE void cluster_store(float*, unsigned int, float) { __trap(); }
IK_DEVICE void cluster_arrive_relaxed() { __trap(); }
IK_DEVICE void cluster_arrive() { __trap(); }
IK_DEVICE void cluster_wait() { __trap(); }
#endif

}  // namespace vendor
}  // namespace ik

#define IK_MMA_NV_M16N8K16 1
