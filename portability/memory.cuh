// memory.cuh -- 16-byte vector access and the asynchronous global->shared copy.
#pragma once

namespace ik {

IK_DEVICE uint4 load16(const void* p) { return vendor::load16(p); }
// For data read exactly once (a KV cache stream): bypasses L1 where the vendor allows.
IK_DEVICE uint4 load16_stream(const void* p) { return vendor::load16_stream(p); }
IK_DEVICE void store16(void* p, uint4 v) { vendor::store16(p, v); }

// Handing results between blocks of one launch (e.g. the last split-K block merges the others):
// write, fence_device, then atomic_add a counter; the block that sees the final count reads the
// others' results with load_coherent (load_coherent4: 4 floats, 16-byte aligned).
IK_DEVICE void fence_device() { vendor::fence_device(); }
IK_DEVICE int atomic_add(int* p, int v) { return vendor::atomic_add(p, v); }
IK_DEVICE float load_coherent(const float* p) { return vendor::load_coherent(p); }
IK_DEVICE float4 load_coherent4(const float* p) { return vendor::load_coherent4(p); }

// Async copy: cp.async on NVIDIA sm_80+, a synchronous copy elsewhere (IK_HAS_ASYNC_COPY says
// which). Usage is the same on every target: issue copies, commit a group, wait until at most N
// groups are pending, then a barrier before other threads read the shared memory.
IK_DEVICE void cp_async16(void* smem, const void* gmem) { vendor::cp_async16(smem, gmem); }
IK_DEVICE void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  vendor::cp_async16_zfill(smem, gmem, valid);
}
// Smaller copies for compressed caches (an INT8 KV cache: a lane's 8 codes, a row's fp32 scale):
// 8 or 4 bytes, zero-filled when !valid (gmem is then never read); the same groups and waits.
IK_DEVICE void cp_async8_zfill(void* smem, const void* gmem, bool valid) {
  vendor::cp_async8_zfill(smem, gmem, valid);
}
IK_DEVICE void cp_async4_zfill(void* smem, const void* gmem, bool valid) {
  vendor::cp_async4_zfill(smem, gmem, valid);
}
IK_DEVICE void cp_async_commit() { vendor::cp_async_commit(); }
template <int N>
IK_DEVICE void cp_async_wait() { vendor::cp_async_wait<N>(); }

// Block clusters, where IK_HAS_CLUSTERS (NVIDIA sm_90+; elsewhere these trap and a kernel that
// needs them must static_assert IK_HAS_CLUSTERS). A kernel declared with IK_CLUSTER_DIMS(n) runs
// its blocks in clusters of n along x. cluster_store writes `v` at the address `smem` has in the
// shared memory of the cluster's block `rank`. Every thread of the cluster alternates arrive and
// wait: arrive_relaxed at entry and a wait before the first cluster_store (the other blocks have
// started), then arrive (release: this thread's stores) and wait (acquire: everyone's stores).
IK_DEVICE void cluster_store(float* smem, unsigned int rank, float v) { vendor::cluster_store(smem, rank, v); }
IK_DEVICE void cluster_arrive_relaxed() { vendor::cluster_arrive_relaxed(); }
IK_DEVICE void cluster_arrive() { vendor::cluster_arrive(); }
IK_DEVICE void cluster_wait() { vendor::cluster_wait(); }

}  // namespace ik
