// merge.cuh -- merging the online-softmax states of a split block's warps, then the split-K
// partial results of a (sequence, KV head, row tile): fused into the last split block to finish,
// through a block cluster's shared memory, or by attn_decode_combine, a separate launch.
#pragma once
#include "common.cuh"

namespace decode {

// Merging split-K partial results. kMergeLanes consecutive lanes (a "merge group") produce dims
// d..d+3 of one query row: lane j folds splits j, j + kMergeLanes, ... with 16-byte loads, the
// loads of kMergeBatch splits in flight at once, then the group combines by shuffles. The fused
// merge (last split block) and attn_decode_combine (separate launch, used under graph capture)
// both call this with the same layout, so they compute the same bits. Two lanes, not four or
// eight: the block covers its rows in fewer passes (H100, decode-ab-h100-run5.json).
constexpr int kMergeLanes = 2;
constexpr int kMergeBatch = 4;  // splits per lane loaded together (8: 113 registers at ROWS=1 on sm_90, not 62)

// Every lane of the warp must call this (shuffles); `first` < 0: no row here (returns 0).
// Weights from the log2-sum-exps; empty splits have -inf and weigh 0; all empty gives 0.
template <int HEAD_DIM>
IK_DEVICE void merge_splits4(const DecodeParams& p, long long first, int d, float res[4]) {
  const int S = p.num_splits, j = ik::lane_id() % kMergeLanes;
  float m = -IK_INFINITY, l = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s0 = j; first >= 0 && s0 < S; s0 += kMergeBatch * kMergeLanes) {
    float lse[kMergeBatch];
    float4 part[kMergeBatch];
#pragma unroll
    for (int c = 0; c < kMergeBatch; ++c) {
      const int s = s0 + c * kMergeLanes;
      lse[c] = s < S ? ik::load_coherent(p.part_lse + first + s) : -IK_INFINITY;
      part[c] = s < S ? ik::load_coherent4(p.part_out + (first + s) * HEAD_DIM + d) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float m_new = m;
#pragma unroll
    for (int c = 0; c < kMergeBatch; ++c) m_new = fmaxf(m_new, lse[c]);
    if (m_new == -IK_INFINITY) continue;  // every split so far empty
    const float a = ik::exp2_fast(m - m_new);
    l *= a;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] *= a;
#pragma unroll
    for (int c = 0; c < kMergeBatch; ++c) {
      const float w = ik::exp2_fast(lse[c] - m_new);
      l += w;
      o[0] += w * part[c].x; o[1] += w * part[c].y; o[2] += w * part[c].z; o[3] += w * part[c].w;
    }
    m = m_new;
  }
#pragma unroll
  for (int x = 1; x < kMergeLanes; x *= 2) {
    const float m_o = ik::shfl_xor(m, x), l_o = ik::shfl_xor(l, x), m_n = fmaxf(m, m_o);
    const float a = m_n == -IK_INFINITY ? 0.f : ik::exp2_fast(m - m_n);
    const float c = m_n == -IK_INFINITY ? 0.f : ik::exp2_fast(m_o - m_n);
    l = l * a + l_o * c;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = o[i] * a + ik::shfl_xor(o[i], x) * c;
    m = m_n;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) res[i] = o[i] * inv;
}

// Lane j of a merge group writes its share of the group's 4 merged dims (d..d+3) to `out`.
template <class T>
IK_DEVICE void store_merged(T* out, int d, const float res[4]) {
  constexpr int kDimsPerLane = 4 / kMergeLanes;
  const int j = ik::lane_id() % kMergeLanes;
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int dim = j * kDimsPerLane + i;
    float v = res[0];
#pragma unroll
    for (int c = 1; c < 4; ++c) v = dim == c ? res[c] : v;  // a select chain: no dynamic register index
    out[d + dim] = ik::dtype<T>::from_float(v);
  }
}

// Merges the partial results of ROWS query rows of one (sequence, KV head, row tile): THREADS
// threads walk the rows' dims four at a time, a merge group per 4 dims.
template <class T, int HEAD_DIM, int ROWS, int THREADS>
IK_DEVICE void merge_rows(const DecodeParams& p, int b, int hk, int row0, int rows_total) {
  static_assert(4 % kMergeLanes == 0 && THREADS % kMergeLanes == 0, "merge groups split 4 dims");
  constexpr int kGroups = ROWS * HEAD_DIM / 4;
  const int group = p.num_q_heads / p.num_kv_heads;
#pragma unroll
  for (int it = 0; it < (kGroups * kMergeLanes + THREADS - 1) / THREADS; ++it) {
    const int mg = (it * THREADS + static_cast<int>(threadIdx.x)) / kMergeLanes;
    const int r = mg / (HEAD_DIM / 4), d = (mg % (HEAD_DIM / 4)) * 4, rr = row0 + r;
    const bool valid = mg < kGroups && rr < rows_total;
    const int hq = hk * group + (valid ? rr / p.q_len : 0), tq = valid ? rr % p.q_len : 0;
    const long long first = valid ? ((static_cast<long long>(b) * p.num_q_heads + hq) * p.q_len + tq) * p.num_splits : -1;
    float res[4];
    merge_splits4<HEAD_DIM>(p, first, d, res);  // every lane: the groups shuffle
    if (valid) store_merged(static_cast<T*>(p.out) + b * p.o_sb + hq * p.o_sh + tq * p.o_st, d, res);
  }
}

// The clustered merge: block 0 of the cluster merges the CLUSTER partial results in its shared
// memory (c_out [split][row][dim], c_lse [split][row]; -inf: an empty split, weight 0).
template <class T, int HEAD_DIM, int ROWS, int THREADS, int CLUSTER>
IK_DEVICE void merge_cluster(const DecodeParams& p, const float* c_out, const float* c_lse, int b, int hk,
                             int row0, int rows_total) {
  const int group = p.num_q_heads / p.num_kv_heads;
  for (int idx = threadIdx.x; idx < ROWS * HEAD_DIM; idx += THREADS) {
    const int r = idx / HEAD_DIM, d = idx % HEAD_DIM, rr = row0 + r;
    if (rr >= rows_total) continue;
    float m = -IK_INFINITY;
#pragma unroll
    for (int s = 0; s < CLUSTER; ++s) m = fmaxf(m, c_lse[s * ROWS + r]);
    float l = 0.f, o = 0.f;
    if (m != -IK_INFINITY) {
#pragma unroll
      for (int s = 0; s < CLUSTER; ++s) {
        const float w = ik::exp2_fast(c_lse[s * ROWS + r] - m);
        l += w;
        o += w * c_out[(s * ROWS + r) * HEAD_DIM + d];
      }
    }
    const int hq = hk * group + rr / p.q_len, tq = rr % p.q_len;
    static_cast<T*>(p.out)[b * p.o_sb + hq * p.o_sh + tq * p.o_st + d] = ik::dtype<T>::from_float(l > 0.f ? o / l : 0.f);
  }
}

// The clustered entries' limits (dependent on CLUSTER, so checked when an entry is instantiated).
template <int CLUSTER>
IK_DEVICE void check_cluster() {
  static_assert(IK_HAS_CLUSTERS || CLUSTER < 0, "block clusters: NVIDIA sm_90 and newer only");
  static_assert(CLUSTER >= 2 && CLUSTER <= 16, "2 to 16 splits a cluster (9-16: non-portable sizes, allowed at load)");
}

// Each warp's online softmax state for the block's query rows, in shared memory where the warps
// of a split block merge: [warp][row] maxima, then [warp][row] sums, then [warp][row][dim]
// unnormalized outputs. Both split kernels write it (aliasing their K/V ring), finish_split reads
// it. Functions of the buffer's address, not a struct of pointers: pointers kept in a struct
// lost their address space on AMD (generic stores instead of LDS ones).
template <int WARPS, int ROWS, int HEAD_DIM>
struct WarpStates {
  static constexpr int bytes() { return WARPS * ROWS * (HEAD_DIM + 2) * 4; }
  static IK_DEVICE float* m(float* buf) { return buf; }
  static IK_DEVICE float* l(float* buf) { return buf + WARPS * ROWS; }
  static IK_DEVICE float* acc(float* buf) { return buf + 2 * WARPS * ROWS; }
  // Index of warp w's row r in m and l; in acc, row(w, r) * HEAD_DIM + dim.
  static IK_DEVICE int row(int w, int r) { return w * ROWS + r; }
};

// The end of a split block, shared by both split kernels. `states` holds each warp's online
// softmax state (WarpStates), and every thread has passed a barrier since it was written. Merges
// the warps, then the splits: fused (the last block), clustered (into block 0's `c_out`, past the
// kernel's own shared memory), or later by attn_decode_combine. The block's other coordinates
// are recomputed here, not kept in registers through the stream (passing its SplitBlock changed
// the generated code).
template <class T, int HEAD_DIM, int ROWS, int THREADS, int WARPS, int CLUSTER>
IK_DEVICE void finish_split(const DecodeParams& p, float* states, float* c_out, int b, int hk, int row0) {
  using S = WarpStates<WARPS, ROWS, HEAD_DIM>;
  const float* s_m = S::m(states);
  const float* s_l = S::l(states);
  const float* s_acc = S::acc(states);
  const int split = blockIdx.x;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows_total = group * p.q_len;
  // Split-K with the fused merge: the last block of this (sequence, KV head, row tile) to finish
  // its stream merges every split's partial result. Two counters per group, zero at rest:
  // `arrived` (taken right after the stream, its round trip hidden behind the partial writes)
  // picks the last block; `written` tells it when the others' partials are visible. The last
  // block thus skips a fence and waits only for partials written long before, usually.
  const bool fused = CLUSTER == 1 && p.num_splits > 1 && p.split_counters != nullptr;
  int* arrived = fused ? p.split_counters + b * gridDim.y + blockIdx.y : nullptr;
  int* written = fused ? arrived + p.batch * gridDim.y : nullptr;
  int arrival = 0;
  if (fused && threadIdx.x == 0) arrival = ik::atomic_add(arrived, 1);
  float* c_lse = c_out + CLUSTER * ROWS * HEAD_DIM;  // clustered merge: [split][row] after [split][row][dim]
  if constexpr (CLUSTER > 1) ik::cluster_wait();  // every block of the cluster is running

  for (int idx = threadIdx.x; idx < ROWS * HEAD_DIM; idx += THREADS) {
    int r = idx / HEAD_DIM, d = idx % HEAD_DIM, rr = row0 + r;
    if (rr >= rows_total) continue;
    float m_all = decode::kNoScore;
    for (int w = 0; w < WARPS; ++w) m_all = fmaxf(m_all, s_m[S::row(w, r)]);
    float l_all = 0.f, o = 0.f;
    for (int w = 0; w < WARPS; ++w) {
      float f = ik::exp2_fast(s_m[S::row(w, r)] - m_all);
      l_all += s_l[S::row(w, r)] * f;
      o += s_acc[S::row(w, r) * HEAD_DIM + d] * f;
    }
    int hq = hk * group + rr / p.q_len, tq = rr % p.q_len;
    float inv = l_all > 0.f ? 1.f / l_all : 0.f;
    if constexpr (CLUSTER > 1) {
      ik::cluster_store(c_out + (split * ROWS + r) * HEAD_DIM + d, 0, o * inv);
      if (d == 0) ik::cluster_store(c_lse + split * ROWS + r, 0, l_all > 0.f ? m_all + __log2f(l_all) : -IK_INFINITY);
    } else if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.o_sb + hq * p.o_sh + tq * p.o_st;
      out[d] = ik::dtype<T>::from_float(o * inv);
    } else {
      long long row = ((static_cast<long long>(b) * p.num_q_heads + hq) * p.q_len + tq) * p.num_splits + split;
      p.part_out[row * HEAD_DIM + d] = o * inv;
      if (d == 0) p.part_lse[row] = l_all > 0.f ? m_all + __log2f(l_all) : -IK_INFINITY;
    }
  }
  if constexpr (CLUSTER > 1) {
    ik::cluster_arrive();  // release: this thread's stores into block 0
    if (split != 0) return;
    ik::cluster_wait();  // acquire: every block's stores
    merge_cluster<T, HEAD_DIM, ROWS, THREADS, CLUSTER>(p, c_out, c_lse, b, hk, row0, rows_total);
    return;
  }
  if (!fused) return;

  // The barrier also makes this block's own partials visible to all its threads.
  if (!ik::block_any(threadIdx.x == 0 && arrival == p.num_splits - 1)) {
    ik::fence_device();  // this block's partials, then its count
    ik::block_sync();
    if (threadIdx.x == 0) ik::atomic_add(written, 1);
    return;
  }
  if (threadIdx.x == 0) {
    // Safe to wait: every other block of the group has arrived, so it is running and its
    // remaining work (write, fence, count) waits on nothing. Then zero the counters for the
    // next call (and for CUDA graph replays).
    while (ik::atomic_add(written, 0) != p.num_splits - 1) {}
    *arrived = 0;
    *written = 0;
    ik::fence_device();  // acquire: the others' partials, for every thread after the barrier
  }
  ik::block_sync();
  merge_rows<T, HEAD_DIM, ROWS, THREADS>(p, b, hk, row0, rows_total);
}

}  // namespace decode

// Merges the num_splits partial results of each (sequence, query head, token) row, when the
// split kernel runs without split_counters (the unfused journey variant, and graph captures).
// grid (B * Hq * Tq), block max(HEAD_DIM, 64) rounded up to whole 64-lane waves: a merge group
// per 4 dims (threads past the row's dims idle). Whole warps/waves: the shuffles need every lane
// (head_dim 80 once launched 80 threads, a partial warp; the CPU emulator deadlocked on it).
template <class T, int HEAD_DIM>
__global__ void __launch_bounds__((HEAD_DIM < 64 ? 64 : HEAD_DIM + 63) / 64 * 64) attn_decode_combine(DecodeParams p) {
  const long long row = blockIdx.x;
  const int tq = row % p.q_len, hq = (row / p.q_len) % p.num_q_heads;
  const int b = row / (static_cast<long long>(p.q_len) * p.num_q_heads);
  const int d = static_cast<int>(threadIdx.x) / decode::kMergeLanes * 4;
  const bool valid = d < HEAD_DIM;
  float res[4];
  decode::merge_splits4<HEAD_DIM>(p, valid ? row * p.num_splits : -1, d, res);
  if (valid) decode::store_merged(static_cast<T*>(p.out) + b * p.o_sb + hq * p.o_sh + tq * p.o_st, d, res);
}
