// decode_main.cpp -- the attention_decode family (kernels_src/attention/decode.cuh) run on the CPU
// by the block emulator, as a shared library the test loads with ctypes. One build per kernel
// configuration (-D EMU_*; EMU_LOADER: the KV loader's C++ name, from the manifest's cpp_names).
#include "block_emu.hpp"
#include "attention/decode.cuh"

#if !defined(EMU_T) || !defined(EMU_HEAD_DIM) || !defined(EMU_ROWS) || !defined(EMU_THREADS) || \
    !defined(EMU_UNROLL) || !defined(EMU_STAGES) || !defined(EMU_CLUSTER) || !defined(EMU_MMA) || !defined(EMU_LOADER)
#error "define EMU_T, EMU_HEAD_DIM, EMU_ROWS, EMU_THREADS, EMU_UNROLL, EMU_STAGES, EMU_CLUSTER, EMU_MMA and EMU_LOADER"
#endif

namespace {
DecodeParams params;
#if EMU_MMA  // v11, the matrix units (a build with an emulated AMD or NVIDIA layout: matrix_emu.hpp)
template <bool PAGED>
void split_body() { attn_decode_split_mma<EMU_T, EMU_HEAD_DIM, EMU_ROWS, PAGED, EMU_THREADS, EMU_STAGES, EMU_LOADER>(params); }
#if EMU_CLUSTER > 1
template <bool PAGED>
void cluster_body() {
  attn_decode_split_mma_cluster<EMU_T, EMU_HEAD_DIM, EMU_ROWS, PAGED, EMU_THREADS, EMU_STAGES, EMU_CLUSTER, EMU_LOADER>(params);
}
#endif
#else
template <bool PAGED>
void split_body() { attn_decode_split<EMU_T, EMU_HEAD_DIM, EMU_ROWS, PAGED, EMU_THREADS, EMU_UNROLL, EMU_STAGES, EMU_LOADER>(params); }
#if EMU_CLUSTER > 1
template <bool PAGED>
void cluster_body() {
  attn_decode_split_cluster<EMU_T, EMU_HEAD_DIM, EMU_ROWS, PAGED, EMU_THREADS, EMU_UNROLL, EMU_STAGES, EMU_CLUSTER, EMU_LOADER>(params);
}
#endif
#endif
void combine_body() { attn_decode_combine<EMU_T, EMU_HEAD_DIM>(params); }
void naive_body() { attn_decode_naive<EMU_T, EMU_HEAD_DIM>(params); }
}  // namespace

extern "C" {
int emu_cluster() { return EMU_CLUSTER; }
// grid (num_splits, Hkv * row tiles, B), as the library launches attn_decode_split (with EMU_MMA,
// attn_decode_split_mma); with `clustered`, its clustered kernel (num_splits == EMU_CLUSTER, one
// cluster per group).
const char* emu_decode_split(const DecodeParams* p, int paged, int clustered, int gx, int gy, int gz,
                             unsigned long long seed) {
  params = *p;
  void (*body)() = paged ? split_body<true> : split_body<false>;
  int cluster = 1;
#if EMU_CLUSTER > 1
  if (clustered) {
    if (gx != EMU_CLUSTER) return "a clustered launch needs num_splits == EMU_CLUSTER";
    body = paged ? cluster_body<true> : cluster_body<false>;
    cluster = EMU_CLUSTER;
  }
#else
  if (clustered) return "built without clusters (EMU_CLUSTER <= 1)";
#endif
  return emu::run_grid(body, {unsigned(gx), unsigned(gy), unsigned(gz)}, EMU_THREADS, cluster, seed);
}
// grid (Tq * Hq, B), block 128: v0, the journey's naive kernel.
const char* emu_decode_naive(const DecodeParams* p, unsigned long long seed) {
  params = *p;
  return emu::run_grid(naive_body, {unsigned(p->q_len * p->num_q_heads), unsigned(p->batch), 1}, 128, 1, seed);
}
// grid (B * Hq * Tq), block `threads` (configs.decode_combine_threads): the separate split-K merge.
const char* emu_decode_combine(const DecodeParams* p, int rows, int threads, unsigned long long seed) {
  params = *p;
  return emu::run_grid(combine_body, {unsigned(rows), 1, 1}, threads, 1, seed);
}
}
