// decode_vector.cuh -- split-K decode (flash-decoding) on the vector units, one KV head per block
// serving all the query rows of its GQA group, so every K/V row is read once from memory.
//
// A "row group" of LPR lanes holds one K/V row: 8 elements per lane (VectorLanes). Each row group
// streams rows start+g, start+g+G, ... of its block's split, UNROLL rows per step with all loads
// issued before first use, and keeps its own online softmax (fp32, log2 domain) for the block's
// ROWS query rows. Row groups merge by shuffles, warps through shared memory, splits in
// attn_decode_combine (or directly into `out` when num_splits == 1).
//
// Query rows of a block: r = (head in group) * Tq + token, row tile blockIdx.y % row_tiles.
// grid (num_splits, Hkv * row_tiles, B), block THREADS, dynamic shared memory smem_bytes().
//
// Splits merge in one of two ways. attn_decode_split: through global memory, by the last block of
// the group to finish (split_counters) or by attn_decode_combine. attn_decode_split_cluster (block
// clusters, NVIDIA sm_90+): the CLUSTER == num_splits blocks of a group form one cluster and store
// their partial results into block 0's shared memory, which merges them after a cluster barrier: no
// global round trips, counters or scratch (H100 D1: see docs/results/decode.md, v8).
#pragma once
#include "common.cuh"
#include "kv_loader.cuh"
#include "merge.cuh"

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int UNROLL, int STAGES, class LOADER>
struct SplitConfig {
  using Lanes = decode::VectorLanes<HEAD_DIM, THREADS>;
  using Loader = typename LOADER::template Vector<T, HEAD_DIM, PAGED, THREADS, UNROLL, STAGES>;
  using States = decode::WarpStates<THREADS / ik::kWarpSize, ROWS, HEAD_DIM>;
  static constexpr int kVec = Lanes::kVec;  // dims per lane per row
  static constexpr int kLanesNeeded = Lanes::kLanesNeeded;
  static constexpr int kLPR = Lanes::kLPR;  // lanes per row group
  static constexpr int kWarps = THREADS / ik::kWarpSize;
  static constexpr int kGroups = Lanes::kGroups;  // row groups per block
  static constexpr int kUnroll = UNROLL;  // rows per row group per step, loads all in flight
  static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "head_dim must be a multiple of 16, <= 256");
  static_assert(THREADS % ik::kWarpSize == 0, "block must be whole warps");
  // STAGES == 0: K/V go straight to registers. STAGES >= 2: a cp.async ring of STAGES steps in
  // shared memory, STAGES - 1 steps ahead of the math; each thread reads back only the slots it
  // copied itself, so the ring needs no barrier. It aliases the merge buffer.
  static_assert(STAGES == 0 || STAGES >= 2, "STAGES is 0 (registers) or a pipeline depth >= 2");
  static constexpr int merge_bytes() { return States::bytes(); }
  static constexpr int ring_bytes() { return STAGES * UNROLL * 2 * THREADS * Loader::kSlotBytes; }
  static constexpr int smem_bytes() { return merge_bytes() > ring_bytes() ? merge_bytes() : ring_bytes(); }
  // Clustered merge: block 0 holds every split's partial outputs [split][row][dim] and
  // log2-sum-exps [split][row] after the ring (which it may still be using when they arrive).
  static constexpr int cluster_bytes(int cluster) { return cluster > 1 ? cluster * ROWS * (HEAD_DIM + 1) * 4 : 0; }
};

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int UNROLL, int STAGES, int CLUSTER, class LOADER>
IK_DEVICE void decode_split(const DecodeParams& p) {
  using C = SplitConfig<T, HEAD_DIM, ROWS, PAGED, THREADS, UNROLL, STAGES, LOADER>;
  constexpr int LPR = C::kLPR, VEC = C::kVec, U = C::kUnroll;
  extern __shared__ __attribute__((aligned(16))) float smem[];
  if constexpr (CLUSTER > 1) ik::cluster_arrive_relaxed();  // "started", waited on before the stores

  const decode::SplitBlock blk = decode::split_block<ROWS>(p);
  const int lane = ik::lane_id(), warp = ik::warp_id();
  const int sub = lane % LPR;                         // lane within the row group
  const int g = static_cast<int>(threadIdx.x) / LPR;  // row group within the block
  const bool lane_active = sub < C::kLanesNeeded;     // head dims like 96 leave spare lanes
  const int d0 = sub * VEC;
  const decode::SplitRange range = decode::split_range(p, blk);
  constexpr bool kEarlyCopy = STAGES > 0;  // (SplitRange::t_early_end)
  typename C::Loader kv(p, blk, d0, lane_active, smem);

  // The trip count is the same for every lane of the block (shuffles below need the whole warp);
  // rows past the split's end are masked, not skipped.
  constexpr int kStep = C::kGroups * U;
  const int n_steps = range.t_end > range.t_begin ? (range.t_end - range.t_begin + kStep - 1) / kStep : 0;
  auto step_row = [&](int i) { return range.t_begin + i * kStep + g; };  // this row group's row in step i
  typename C::Loader::Located next;  // the next step to copy, located a step ahead
  // (Lambdas around the loader, as in decode_mma.cuh: the generated code stays as it was.)
  auto locate = [&](int i) { kv.locate(p, next, step_row(i), range.t_end); };
  // Copies step i's K/V rows of this thread into ring stage i % STAGES (zeros past `end`); a
  // step's addresses must have been located.
  auto issue = [&](int i, int end) {
    if (range.t_begin + i * kStep < end) kv.copy(p, next, i % (STAGES > 0 ? STAGES : 1), step_row(i), end);
    ik::cp_async_commit();  // one group per step, empty past the end: the wait count stays uniform
  };
  if constexpr (kEarlyCopy) {  // before the query loads: nothing waits ahead of it
    kv.locate(p, next, step_row(0), range.t_early_end);
    kv.clamp_early(p, next);
    issue(0, range.t_early_end);
  }

  // Query rows of this block, pre-scaled into the log2 domain; their key limits.
  float q[ROWS][VEC];
  int limit[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    int rr = blk.row0 + r;
    bool valid = rr < blk.rows_total && lane_active;
    int hq = blk.hk * blk.group + (rr < blk.rows_total ? rr / p.q_len : 0), tq = rr < blk.rows_total ? rr % p.q_len : 0;
    limit[r] = rr < blk.rows_total ? decode::key_limit(p, range.kv_len, tq) : -1;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (valid) raw = ik::load16(static_cast<const T*>(p.q) + blk.b * p.q_sb + hq * p.q_sh + tq * p.q_st + d0);
    ik::unpack8<T>(raw, q[r]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) q[r][i] *= p.scale_log2;
  }

  float m[ROWS], l[ROWS], acc[ROWS][VEC];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = decode::kNoScore;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[r][i] = 0.f;
  }

  if constexpr (STAGES > 0) {
#pragma unroll
    for (int i = kEarlyCopy ? 1 : 0; i < STAGES - 1; ++i) {
      locate(i);
      issue(i, range.t_end);
    }
    locate(STAGES - 1);
  }

  for (int i = 0; i < n_steps; ++i) {
    const int t0 = step_row(i);
    typename C::Loader::Keys kr;
    typename C::Loader::Values vr;
    if constexpr (STAGES > 0) {
      issue(i + STAGES - 1, range.t_end);
      locate(i + STAGES);  // for the next iteration's issue: in flight during this step's math
      ik::cp_async_wait<STAGES - 1>();  // this thread's copies of step i have landed
      kv.read(kr, vr, i, t0, range.t_end);
    } else {
      kv.load(p, kr, vr, t0, range.t_end);
    }
    float s[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VEC];
      kv.key(kr, u, kf);
      int t = t0 + u * C::kGroups;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += q[r][i] * kf[i];
        dot = ik::group_sum<LPR>(dot);
        s[u][r] = (t < range.t_end && t <= limit[r]) ? dot : -IK_INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float m_new = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) m_new = fmaxf(m_new, s[u][r]);
      float alpha = ik::exp2_fast(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[r][i] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) s[u][r] = ik::exp2_fast(s[u][r] - m_new);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[VEC];
      kv.value(vr, u, vf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        l[r] += s[u][r];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[r][i] += s[u][r] * vf[i];
      }
    }
  }

  // Merge the row groups of each warp (lanes LPR, 2*LPR, ... apart hold the same dims).
#pragma unroll
  for (int o = LPR; o < ik::kWarpSize; o *= 2) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float m_o = ik::shfl_xor(m[r], o), l_o = ik::shfl_xor(l[r], o);
      float m_n = fmaxf(m[r], m_o);
      float a = ik::exp2_fast(m[r] - m_n), c = ik::exp2_fast(m_o - m_n);
      l[r] = l[r] * a + l_o * c;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[r][i] = acc[r][i] * a + ik::shfl_xor(acc[r][i], o) * c;
      m[r] = m_n;
    }
  }

  // Then the warps, through shared memory. The merge buffer reuses the ring: every thread's
  // copies must have landed and been read first.
  if constexpr (STAGES > 0) {
    ik::cp_async_wait<0>();
    ik::block_sync();
  }
  using S = typename C::States;
  float* s_m = S::m(smem);
  float* s_l = S::l(smem);
  float* s_acc = S::acc(smem);
  if (lane < LPR) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (lane == 0) { s_m[S::row(warp, r)] = m[r]; s_l[S::row(warp, r)] = l[r]; }
      if (lane_active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) s_acc[S::row(warp, r) * HEAD_DIM + d0 + i] = acc[r][i];
      }
    }
  }
  ik::block_sync();

  decode::finish_split<T, HEAD_DIM, ROWS, THREADS, C::kWarps, CLUSTER>(p, smem, smem + C::smem_bytes() / 4, blk.b, blk.hk, blk.row0);
}

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int UNROLL, int STAGES, class LOADER>
__global__ void __launch_bounds__(THREADS) attn_decode_split(DecodeParams p) {
  decode_split<T, HEAD_DIM, ROWS, PAGED, THREADS, UNROLL, STAGES, 1, LOADER>(p);
}

// grid (CLUSTER, Hkv * row_tiles, B): num_splits == CLUSTER; dynamic shared memory
// smem_bytes() + cluster_bytes(CLUSTER).
template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int UNROLL, int STAGES, int CLUSTER, class LOADER>
__global__ void __launch_bounds__(THREADS) IK_CLUSTER_DIMS(CLUSTER) attn_decode_split_cluster(DecodeParams p) {
  decode::check_cluster<CLUSTER>();
  decode_split<T, HEAD_DIM, ROWS, PAGED, THREADS, UNROLL, STAGES, CLUSTER, LOADER>(p);
}
