// attention_decode.cuh -- decode attention: a few new query tokens per sequence attend to the
// whole KV cache. Written once in the ik:: vocabulary (portability/ik.cuh); no vendor branches.
//
// Shapes (strides in elements; the last dim of every tensor is contiguous):
//   q    [B, Hq, Tq, D]            out [B, Hq, Tq, D]
//   K, V contiguous: [B, Hkv, L, D] (any batch/head/seq strides)
//   K, V paged:      [num_pages, Hkv, page_size, D], block_table [B, max_pages] (int32)
//   kv_lens [B] int32 on the device (clamped to [0, L] in the kernel: no host synchronization)
// Query token t of Tq (causal) sees keys [0, kv_len - Tq + t]: aligned bottom-right.
// kv_len == 0 gives a zero output row (documented in docs/api.md).
#pragma once
#include "ik.cuh"

// Must match ikport/kernels.py DecodeParams field for field (ctypes mirrors C layout).
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* part_out;         // [B, Hq, Tq, num_splits, D] fp32, normalized partial outputs
  float* part_lse;         // [B, Hq, Tq, num_splits] log2-sum-exp of each split (-inf if empty)
  const int* kv_lens;      // [B]
  const int* block_table;  // [B, bt_stride_b] or null when not paged
  int* split_counters;     // [2 * B * gridDim.y], zero at rest: the last split block merges
                           // (null: a separate attn_decode_combine launch merges)
  long long q_sb, q_sh, q_st;
  long long k_sb, k_sh, k_st;  // paged: k_sb is the page stride
  long long v_sb, v_sh, v_st;
  long long o_sb, o_sh, o_st;
  long long bt_sb;
  int batch, num_q_heads, num_kv_heads, q_len;
  int kv_capacity;     // L (contiguous) or max_pages * page_size (paged)
  int page_size_log2;  // paged only
  int num_splits, rows_per_split;
  int causal;
  float scale_log2;  // softmax scale * log2(e): scores are kept in the log2 domain
  int num_pages;     // paged: pages in the pool (the early copy clamps its page ids into it)
};

namespace decode {

// Sentinel for "no score yet": finite, so exp2(m_old - m_new) never sees (-inf) - (-inf).
constexpr float kNoScore = -1.0e30f;

IK_DEVICE int kv_len_of(const DecodeParams& p, int b) {
  int n = p.kv_lens ? p.kv_lens[b] : p.kv_capacity;
  return n < 0 ? 0 : (n > p.kv_capacity ? p.kv_capacity : n);
}

// Last key index (inclusive) query token tq may see, given the sequence length.
IK_DEVICE int key_limit(const DecodeParams& p, int kv_len, int tq) {
  return p.causal ? kv_len - p.q_len + tq : kv_len - 1;
}

// Offset of row t of KV head h in a paged cache, the row's page id given.
IK_DEVICE long long paged_offset(const DecodeParams& p, int page, long long sb, long long sh,
                                 long long st, int h, int t) {
  int off = t & ((1 << p.page_size_log2) - 1);
  return page * sb + h * sh + off * st;
}

template <bool PAGED>
IK_DEVICE long long row_offset(const DecodeParams& p, const int* bt_row, long long sb, long long sh,
                               long long st, int b, int h, int t) {
  if (PAGED) return paged_offset(p, bt_row[t >> p.page_size_log2], sb, sh, st, h, t);
  return b * sb + h * sh + static_cast<long long>(t) * st;
}

// Page ids of rows t0, t0 + STRIDE, ... (U of them) below `end` (0 elsewhere, never used).
template <int U, int STRIDE>
IK_DEVICE void load_page_ids(const DecodeParams& p, const int* bt_row, int t0, int end, bool active,
                             int (&page)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int t = t0 + u * STRIDE;
    page[u] = active && t < end ? bt_row[t >> p.page_size_log2] : 0;
  }
}

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

// The end of a split block, shared by both stream loops. Shared memory holds each warp's online
// softmax state: [warp][row] maxima, then sums, then [warp][row][dim] unnormalized outputs, and
// every thread has passed a barrier since they were written. Merges the warps, then the splits:
// fused (the last block), clustered (into block 0's `c_out`, past the kernel's own shared
// memory), or later by attn_decode_combine.
template <class T, int HEAD_DIM, int ROWS, int THREADS, int WARPS, int CLUSTER>
IK_DEVICE void finish_split(const DecodeParams& p, const float* smem, float* c_out, int b, int hk, int row0) {
  const int split = blockIdx.x;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows_total = group * p.q_len;
  const float* s_m = smem;
  const float* s_l = s_m + WARPS * ROWS;
  const float* s_acc = s_l + WARPS * ROWS;
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
    for (int w = 0; w < WARPS; ++w) m_all = fmaxf(m_all, s_m[w * ROWS + r]);
    float l_all = 0.f, o = 0.f;
    for (int w = 0; w < WARPS; ++w) {
      float f = ik::exp2_fast(s_m[w * ROWS + r] - m_all);
      l_all += s_l[w * ROWS + r] * f;
      o += s_acc[(w * ROWS + r) * HEAD_DIM + d] * f;
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

// ---------------------------------------------------------------------------------------------
// v0 naive: one block per (query token, query head, sequence); each thread scores one key of a
// 128-key tile with a scalar dot product, then the block folds the tile into an online softmax.
// K/V are re-read for every query head of a GQA group. Kept as the journey's baseline.
// grid (Tq * Hq, B), block 128.
template <class T, int HEAD_DIM>
__global__ void __launch_bounds__(128) attn_decode_naive(DecodeParams p) {
  constexpr int kTile = 128;
  constexpr int kDimsPerThread = (HEAD_DIM + kTile - 1) / kTile;
  __shared__ float s_score[kTile];
  __shared__ float s_red[kTile];
  const int tid = threadIdx.x;
  const int tq = blockIdx.x % p.q_len, hq = blockIdx.x / p.q_len, b = blockIdx.y;
  const int group = p.num_q_heads / p.num_kv_heads, hk = hq / group;
  const int kv_len = decode::kv_len_of(p, b);
  const int last = decode::key_limit(p, kv_len, tq);
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh + tq * p.q_st;
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const int* bt_row = p.block_table ? p.block_table + b * p.bt_sb : nullptr;

  float m = decode::kNoScore, l = 0.f, acc[kDimsPerThread];
  for (int i = 0; i < kDimsPerThread; ++i) acc[i] = 0.f;

  for (int t0 = 0; t0 <= last; t0 += kTile) {
    int t = t0 + tid;
    float s = -IK_INFINITY;
    if (t <= last) {
      long long off = bt_row ? decode::row_offset<true>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t)
                             : decode::row_offset<false>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t);
      float dot = 0.f;
      for (int d = 0; d < HEAD_DIM; ++d)
        dot += ik::dtype<T>::to_float(q[d]) * ik::dtype<T>::to_float(kbase[off + d]);
      s = dot * p.scale_log2;
    }
    s_red[tid] = s;
    ik::block_sync();
    for (int w = kTile / 2; w > 0; w /= 2) {  // tile max
      if (tid < w) s_red[tid] = fmaxf(s_red[tid], s_red[tid + w]);
      ik::block_sync();
    }
    float m_new = fmaxf(m, s_red[0]);
    float alpha = exp2f(m - m_new);
    s_score[tid] = exp2f(s - m_new);
    ik::block_sync();
    float psum = 0.f;
    for (int j = 0; j < kTile && t0 + j <= last; ++j) psum += s_score[j];
    l = l * alpha + psum;
    for (int i = 0; i < kDimsPerThread; ++i) {
      int d = tid + i * kTile;
      float a = acc[i] * alpha;
      if (d < HEAD_DIM) {
        for (int j = 0; j < kTile && t0 + j <= last; ++j) {
          int tj = t0 + j;
          long long off = bt_row ? decode::row_offset<true>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, tj)
                                 : decode::row_offset<false>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, tj);
          a += s_score[j] * ik::dtype<T>::to_float(vbase[off + d]);
        }
      }
      acc[i] = a;
    }
    m = m_new;
    ik::block_sync();
  }
  T* out = static_cast<T*>(p.out) + b * p.o_sb + hq * p.o_sh + tq * p.o_st;
  float inv = l > 0.f ? 1.f / l : 0.f;
  for (int i = 0; i < kDimsPerThread; ++i) {
    int d = tid + i * kTile;
    if (d < HEAD_DIM) out[d] = ik::dtype<T>::from_float(acc[i] * inv);
  }
}

// ---------------------------------------------------------------------------------------------
// Split-K decode (flash-decoding) with one KV head per block serving all the query rows of its
// GQA group, so every K/V row is read once from memory.
//
// A "row group" of LPR lanes holds one K/V row: 8 elements (16 bytes) per lane. Each row group
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
template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int UNROLL, int STAGES>
struct SplitConfig {
  static constexpr int kVec = 8;  // elements per lane per row: one 16-byte load
  static constexpr int kLanesNeeded = HEAD_DIM / kVec;
  static constexpr int kLPR = kLanesNeeded <= 1 ? 1 : kLanesNeeded <= 2 ? 2 : kLanesNeeded <= 4 ? 4
                            : kLanesNeeded <= 8 ? 8 : kLanesNeeded <= 16 ? 16 : 32;
  static constexpr int kWarps = THREADS / ik::kWarpSize;
  static constexpr int kGroups = THREADS / kLPR;  // row groups per block
  static constexpr int kUnroll = UNROLL;  // rows per row group per step, loads all in flight
  static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "head_dim must be a multiple of 16, <= 256");
  static_assert(THREADS % ik::kWarpSize == 0, "block must be whole warps");
  // STAGES == 0: K/V go straight to registers. STAGES >= 2: a cp.async ring of STAGES steps in
  // shared memory, STAGES - 1 steps ahead of the math; each thread reads back only the 16-byte
  // slots it copied itself, so the ring needs no barrier. It aliases the merge buffer.
  static_assert(STAGES == 0 || STAGES >= 2, "STAGES is 0 (registers) or a pipeline depth >= 2");
  static constexpr int merge_bytes() { return kWarps * ROWS * (HEAD_DIM + 2) * 4; }
  static constexpr int ring_bytes() { return STAGES * UNROLL * 2 * THREADS * 16; }
  static constexpr int smem_bytes() { return merge_bytes() > ring_bytes() ? merge_bytes() : ring_bytes(); }
  // Clustered merge: block 0 holds every split's partial outputs [split][row][dim] and
  // log2-sum-exps [split][row] after the ring (which it may still be using when they arrive).
  static constexpr int cluster_bytes(int cluster) { return cluster > 1 ? cluster * ROWS * (HEAD_DIM + 1) * 4 : 0; }
};

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int UNROLL, int STAGES, int CLUSTER>
IK_DEVICE void decode_split(const DecodeParams& p) {
  using C = SplitConfig<T, HEAD_DIM, ROWS, PAGED, THREADS, UNROLL, STAGES>;
  constexpr int LPR = C::kLPR, VEC = C::kVec, U = C::kUnroll;
  extern __shared__ __attribute__((aligned(16))) float smem[];
  if constexpr (CLUSTER > 1) ik::cluster_arrive_relaxed();  // "started", waited on before the stores

  const int split = blockIdx.x;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows_total = group * p.q_len;
  const int row_tiles = (rows_total + ROWS - 1) / ROWS;
  const int hk = blockIdx.y / row_tiles, row0 = (blockIdx.y % row_tiles) * ROWS;
  const int b = blockIdx.z;
  const int lane = ik::lane_id(), warp = ik::warp_id();
  const int sub = lane % LPR;                         // lane within the row group
  const int g = static_cast<int>(threadIdx.x) / LPR;  // row group within the block
  const bool lane_active = sub < C::kLanesNeeded;     // head dims like 96 leave spare lanes
  const int d0 = sub * VEC;

  const int kv_len = decode::kv_len_of(p, b);
  const int t_begin = split * p.rows_per_split;
  const int t_end = min(t_begin + p.rows_per_split, kv_len);
  // Early copy: the first ring step is copied before anything else, bounded by the split and the
  // cache's capacity (allocated memory) instead of kv_len, so the K/V copies, the kv_len load and
  // the query loads are in flight together rather than one after another (H100: 0.55-0.8 us less
  // on every contiguous shape measured, docs/results/decode.md v7; paged 0.5-1 us, v9). Its rows
  // past kv_len get -inf scores and zeroed V in the loop. A paged table past kv_len may hold
  // garbage: those page ids are clamped into the pool, so the copy stays in bounds.
  constexpr bool kEarlyCopy = STAGES > 0;
  const int t_early_end = min(t_begin + p.rows_per_split, p.kv_capacity);

  const T* kbase = static_cast<const T*>(p.k) + d0;
  const T* vbase = static_cast<const T*>(p.v) + d0;
  const int* bt_row = PAGED ? p.block_table + b * p.bt_sb : nullptr;

  // The trip count is the same for every lane of the block (shuffles below need the whole warp);
  // rows past the split's end are masked, not skipped.
  constexpr int kStep = C::kGroups * U;
  const int n_steps = t_end > t_begin ? (t_end - t_begin + kStep - 1) / kStep : 0;
  auto step_row = [&](int i) { return t_begin + i * kStep + g; };  // this row group's row in step i
  uint4* ring = reinterpret_cast<uint4*>(smem);
  auto ring_slot = [&](int stage, int u, int kv) -> uint4* {
    return ring + ((stage * U + u) * 2 + kv) * THREADS + threadIdx.x;
  };
  // Paged: the ring's page ids are loaded one iteration before their copies are issued, so an
  // issue never waits on a block-table load (page size 1: one id per row; D1 67.0 -> 57.2 us).
  int page[U];
  auto load_pages = [&](int i) {
    if constexpr (PAGED) decode::load_page_ids<U, C::kGroups>(p, bt_row, step_row(i), t_end, lane_active, page);
  };
  // Copies step i's K/V chunks of this thread into ring stage i % STAGES (zeros past `end`);
  // a paged step's page ids must be in page[].
  auto issue = [&](int i, int end) {
    if (t_begin + i * kStep < end) {
      const int t0 = step_row(i);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        int t = t0 + u * C::kGroups;
        bool valid = t < end && lane_active;
        long long ko = 0, vo = 0;
        if (valid && PAGED) {
          ko = decode::paged_offset(p, page[u], p.k_sb, p.k_sh, p.k_st, hk, t);
          vo = decode::paged_offset(p, page[u], p.v_sb, p.v_sh, p.v_st, hk, t);
        } else if (valid) {
          ko = decode::row_offset<false>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t);
          vo = decode::row_offset<false>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t);
        }
        ik::cp_async16_zfill(ring_slot(i % (STAGES > 0 ? STAGES : 1), u, 0), kbase + ko, valid);
        ik::cp_async16_zfill(ring_slot(i % (STAGES > 0 ? STAGES : 1), u, 1), vbase + vo, valid);
      }
    }
    ik::cp_async_commit();  // one group per step, empty past the end: the wait count stays uniform
  };
  if constexpr (kEarlyCopy) {  // before the query loads: nothing waits ahead of it
    if constexpr (PAGED) {
      decode::load_page_ids<U, C::kGroups>(p, bt_row, step_row(0), t_early_end, lane_active, page);
#pragma unroll
      for (int u = 0; u < U; ++u) page[u] = min(max(page[u], 0), p.num_pages - 1);
    }
    issue(0, t_early_end);
  }

  // Query rows of this block, pre-scaled into the log2 domain; their key limits.
  float q[ROWS][VEC];
  int limit[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    int rr = row0 + r;
    bool valid = rr < rows_total && lane_active;
    int hq = hk * group + (rr < rows_total ? rr / p.q_len : 0), tq = rr < rows_total ? rr % p.q_len : 0;
    limit[r] = rr < rows_total ? decode::key_limit(p, kv_len, tq) : -1;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (valid) raw = ik::load16(static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh + tq * p.q_st + d0);
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
      load_pages(i);
      issue(i, t_end);
    }
    load_pages(STAGES - 1);
  }

  for (int i = 0; i < n_steps; ++i) {
    const int t0 = step_row(i);
    uint4 kr[U], vr[U];
    if constexpr (STAGES > 0) {
      issue(i + STAGES - 1, t_end);
      load_pages(i + STAGES);  // for the next iteration's issue: in flight during this step's math
      ik::cp_async_wait<STAGES - 1>();  // this thread's copies of step i have landed
#pragma unroll
      for (int u = 0; u < U; ++u) {
        kr[u] = *ring_slot(i % STAGES, u, 0);
        vr[u] = *ring_slot(i % STAGES, u, 1);
        // the early copy's rows past kv_len: a zero weight times stale V could still be NaN
        if (kEarlyCopy && i == 0 && t0 + u * C::kGroups >= t_end) vr[u] = make_uint4(0, 0, 0, 0);
      }
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {  // issue every load of the step before using any
        int t = t0 + u * C::kGroups;
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
        if (t < t_end && lane_active) {
          kr[u] = ik::load16_stream(kbase + decode::row_offset<PAGED>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t));
          vr[u] = ik::load16_stream(vbase + decode::row_offset<PAGED>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t));
        }
      }
    }
    float s[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VEC];
      ik::unpack8<T>(kr[u], kf);
      int t = t0 + u * C::kGroups;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += q[r][i] * kf[i];
        dot = ik::group_sum<LPR>(dot);
        s[u][r] = (t < t_end && t <= limit[r]) ? dot : -IK_INFINITY;
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
      ik::unpack8<T>(vr[u], vf);
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

  // Then the warps, through shared memory: [warp][row] m, l and [warp][row][dim] acc. The merge
  // buffer reuses the ring: every thread's copies must have landed and been read first.
  if constexpr (STAGES > 0) {
    ik::cp_async_wait<0>();
    ik::block_sync();
  }
  float* s_m = smem;
  float* s_l = s_m + C::kWarps * ROWS;
  float* s_acc = s_l + C::kWarps * ROWS;
  if (lane < LPR) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (lane == 0) { s_m[warp * ROWS + r] = m[r]; s_l[warp * ROWS + r] = l[r]; }
      if (lane_active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) s_acc[(warp * ROWS + r) * HEAD_DIM + d0 + i] = acc[r][i];
      }
    }
  }
  ik::block_sync();

  decode::finish_split<T, HEAD_DIM, ROWS, THREADS, C::kWarps, CLUSTER>(p, smem, smem + C::smem_bytes() / 4, b, hk, row0);
}

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int UNROLL, int STAGES>
__global__ void __launch_bounds__(THREADS) attn_decode_split(DecodeParams p) {
  decode_split<T, HEAD_DIM, ROWS, PAGED, THREADS, UNROLL, STAGES, 1>(p);
}

// grid (CLUSTER, Hkv * row_tiles, B): num_splits == CLUSTER; dynamic shared memory
// smem_bytes() + cluster_bytes(CLUSTER).
template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int UNROLL, int STAGES, int CLUSTER>
__global__ void __launch_bounds__(THREADS) IK_CLUSTER_DIMS(CLUSTER) attn_decode_split_cluster(DecodeParams p) {
  static_assert(IK_HAS_CLUSTERS || CLUSTER < 0, "block clusters: NVIDIA sm_90 and newer only");  // (dependent: checked when instantiated)
  static_assert(CLUSTER >= 2 && CLUSTER <= 16, "2 to 16 splits a cluster (9-16: non-portable sizes, allowed at load)");
  decode_split<T, HEAD_DIM, ROWS, PAGED, THREADS, UNROLL, STAGES, CLUSTER>(p);
}

// ---------------------------------------------------------------------------------------------
// v11: split-K decode on the matrix units. The same split, merge and early copy as decode_split,
// but each warp scores a tile of 16 K rows for the block's query rows with one matrix product
// (S = Q K^T: Q's rows padded to 16, D/16 products) and accumulates P V with D/16 more, instead
// of a dot product per row and lane group with shuffles: the vector path spends ~60 instructions
// per K/V row of a warp at GQA 4, this one ~8 (docs/results/decode.md, v11).
//
// Each warp streams its own tiles (t_begin + 16 * (warp + WARPS * i)) through its own cp.async
// ring of STAGES tiles of K and V in shared memory, STAGES - 1 ahead, so warps synchronize only
// at the end. The block's query rows wait in shared memory as the A operand of every Q K^T.
// grid and merge as attn_decode_split; block THREADS; dynamic shared memory smem_bytes().
#ifdef IK_HAS_MMA
template <class T, int HEAD_DIM, int ROWS, int THREADS, int STAGES>
struct MmaConfig {
  static constexpr int kWarps = THREADS / ik::kWarpSize;
  static constexpr int kTile = 16;          // K/V rows per warp step: Q K^T's n, P V's k
  static constexpr int kLd = HEAD_DIM + 8;  // row stride in shared memory: 16 bytes of padding keep
                                            // the 8 rows of each matrix load on different banks
  static constexpr int kRow16 = HEAD_DIM / 8;  // 16-byte chunks of a K/V row
  static constexpr int kCopies = (kTile * kRow16 + ik::kWarpSize - 1) / ik::kWarpSize;  // a lane's per tile and tensor
  static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "head_dim must be a multiple of 16, <= 256");
  static_assert(ROWS >= 1 && ROWS <= 16, "the query rows of a block fill one 16-row matrix tile");
  static_assert(STAGES >= 2, "a ring of at least 2 tiles a warp");
  static_assert(THREADS % ik::kWarpSize == 0, "block must be whole warps");
  static constexpr int tile_elems() { return kTile * kLd; }
  static constexpr int ring_bytes() { return kWarps * STAGES * 2 * tile_elems() * 2; }
  static constexpr int q_bytes() { return 16 * kLd * 2; }
  static constexpr int scratch_bytes() { return kWarps * ik::mma::kCToAScratch * 2; }
  static constexpr int stream_bytes() { return ring_bytes() + q_bytes() + scratch_bytes(); }
  static constexpr int merge_bytes() { return kWarps * ROWS * (HEAD_DIM + 2) * 4; }
  static constexpr int smem_bytes() { return merge_bytes() > stream_bytes() ? merge_bytes() : stream_bytes(); }
};

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int STAGES, int CLUSTER>
IK_DEVICE void decode_split_mma(const DecodeParams& p) {
  using C = MmaConfig<T, HEAD_DIM, ROWS, THREADS, STAGES>;
  namespace mm = ik::mma;
  constexpr int W = C::kWarps, LD = C::kLd, R16 = C::kRow16, WS = ik::kWarpSize;
  // Q K^T's products unrolled in pairs where C is not A's layout (AMD): fully unrolled, RDNA3's
  // 16-slot fragments of 8 products ran out of registers (gfx1100 spilled)
  constexpr int kQkUnroll = mm::kCIsA ? HEAD_DIM / 16 : 2;
  extern __shared__ __attribute__((aligned(16))) float smem[];
  if constexpr (CLUSTER > 1) ik::cluster_arrive_relaxed();  // "started", waited on before the stores

  const int split = blockIdx.x;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows_total = group * p.q_len;
  const int row_tiles = (rows_total + ROWS - 1) / ROWS;
  const int hk = blockIdx.y / row_tiles, row0 = (blockIdx.y % row_tiles) * ROWS;
  const int b = blockIdx.z;
  const int lane = ik::lane_id(), warp = ik::warp_id();

  const int kv_len = decode::kv_len_of(p, b);
  const int t_begin = split * p.rows_per_split;
  const int t_end = min(t_begin + p.rows_per_split, kv_len);
  const int t_early_end = min(t_begin + p.rows_per_split, p.kv_capacity);  // see decode_split
  const int n_tiles = t_end > t_begin ? (t_end - t_begin + C::kTile - 1) / C::kTile : 0;
  const int n_steps = n_tiles > warp ? (n_tiles - warp + W - 1) / W : 0;  // this warp's tiles
  auto tile_row0 = [&](int i) { return t_begin + (i * W + warp) * C::kTile; };

  T* ring = reinterpret_cast<T*>(smem);
  T* s_q = ring + C::ring_bytes() / 2;
  T* scratch = s_q + 16 * LD + warp * mm::kCToAScratch;
  auto tile = [&](int i, int kv) { return ring + ((warp * STAGES + i % STAGES) * 2 + kv) * C::tile_elems(); };
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const int* bt_row = PAGED ? p.block_table + b * p.bt_sb : nullptr;

  // Lane copy c of a tile moves 16 bytes: chunk (lane + c * WS) % R16 of row (lane + c * WS) / R16.
  // Where a row's chunks divide the warp (head_dim 16-256 in powers of two on 32 lanes) the row
  // is the lane's plus a constant per copy, so the shared-memory offsets fold into immediates.
  auto copy_row = [&](int c) {
    if constexpr (WS % R16 == 0) return lane / R16 + c * (WS / R16);
    return (lane + c * WS) / R16;
  };
  auto copy_col = [&](int c) { return (WS % R16 == 0 ? lane % R16 : (lane + c * WS) % R16) * 8; };
  auto copy_in_tile = [&](int c) { return (C::kTile * R16) % WS == 0 || lane + c * WS < C::kTile * R16; };
  // Paged: the page ids of a step are loaded one step before its copies are issued.
  int page[C::kCopies];
  auto load_pages = [&](int i, int end) {
    if constexpr (PAGED) {
#pragma unroll
      for (int c = 0; c < C::kCopies; ++c) {
        const int t = tile_row0(i) + copy_row(c);
        page[c] = copy_in_tile(c) && t < end ? bt_row[t >> p.page_size_log2] : 0;
      }
    }
  };
  // Copy sources. Where copies are asynchronous an issue is nothing but address work: a warp
  // keeps its next tile's start in a contiguous cache and moves it on by its tile stride (issue
  // takes the steps in order), and whole tiles skip the row checks (sm_90, D1: 592 -> 378 loop
  // instructions a whole tile, decode-sass.json). Synchronous copies (AMD, NVIDIA before sm_80)
  // and paged caches recompute each source from (b, hk, t) or the page: with synchronous copies
  // the hoisted offsets stay in registers (gfx1100 spilled).
  constexpr bool kTileCursor = IK_HAS_ASYNC_COPY && !PAGED;
  const T* k_next = kbase + (PAGED ? 0 : b * p.k_sb + hk * p.k_sh + static_cast<long long>(tile_row0(0)) * p.k_st);
  const T* v_next = vbase + (PAGED ? 0 : b * p.v_sb + hk * p.v_sh + static_cast<long long>(tile_row0(0)) * p.v_st);
  auto source = [&](const T* base, const T* next, long long sb, long long sh, long long st, int t0, int c) {
    const int r = copy_row(c), col = copy_col(c);
    if constexpr (PAGED) return base + decode::paged_offset(p, page[c], sb, sh, st, hk, t0 + r) + col;
    if constexpr (kTileCursor) return next + r * st + col;
    return base + b * sb + hk * sh + static_cast<long long>(t0 + r) * st + col;
  };
  auto issue = [&](int i, int end) {  // step i's tile (rows below `end`; zeros past it), one group
    const int r0 = tile_row0(i);
    T* kd = tile(i, 0);
    T* vd = tile(i, 1);
    if (kTileCursor && r0 + C::kTile <= end) {  // a whole tile (warp-uniform)
#pragma unroll
      for (int c = 0; c < C::kCopies; ++c) {
        if (copy_in_tile(c)) {
          ik::cp_async16(kd + copy_row(c) * LD + copy_col(c), source(kbase, k_next, p.k_sb, p.k_sh, p.k_st, r0, c));
          ik::cp_async16(vd + copy_row(c) * LD + copy_col(c), source(vbase, v_next, p.v_sb, p.v_sh, p.v_st, r0, c));
        }
      }
    } else if (r0 < end) {
#pragma unroll
      for (int c = 0; c < C::kCopies; ++c) {
        if (copy_in_tile(c)) {
          const bool valid = r0 + copy_row(c) < end;  // else a zero-byte copy from an address in bounds
          const T* ks = valid ? source(kbase, k_next, p.k_sb, p.k_sh, p.k_st, r0, c) : kbase;
          const T* vs = valid ? source(vbase, v_next, p.v_sb, p.v_sh, p.v_st, r0, c) : vbase;
          ik::cp_async16_zfill(kd + copy_row(c) * LD + copy_col(c), ks, valid);
          ik::cp_async16_zfill(vd + copy_row(c) * LD + copy_col(c), vs, valid);
        }
      }
    }
    if constexpr (kTileCursor) {
      k_next += static_cast<long long>(W * C::kTile) * p.k_st;
      v_next += static_cast<long long>(W * C::kTile) * p.v_st;
    }
    ik::cp_async_commit();  // one group per step, empty past the end: the wait count stays uniform
  };
  // The early copy, as decode_split's: bounded by the capacity, page ids clamped into the pool.
  load_pages(0, t_early_end);
  if constexpr (PAGED) {
#pragma unroll
    for (int c = 0; c < C::kCopies; ++c) page[c] = min(max(page[c], 0), p.num_pages - 1);
  }
  issue(0, t_early_end);

  // The block's query rows into shared memory, unscaled (exact in T); rows past them zero.
  for (int idx = threadIdx.x; idx < 16 * R16; idx += THREADS) {
    const int r = idx / R16, ch = idx % R16, rr = row0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < ROWS && rr < rows_total) {
      const int hq = hk * group + rr / p.q_len, tq = rr % p.q_len;
      v = ik::load16(static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh + tq * p.q_st + ch * 8);
    }
    ik::store16(s_q + r * LD + ch * 8, v);
  }
  // Per accumulator slot: its query row's last visible key (-1: a padding row), its online
  // softmax state (m equal across the slots and lanes of a row; l this slot's part of the row
  // sum until the row_reduce after the loop), its P V outputs.
  int limit[mm::kCSlots];
  float m[mm::kCSlots], l[mm::kCSlots];
  mm::FragC o[HEAD_DIM / 16];
#pragma unroll
  for (int s = 0; s < mm::kCSlots; ++s) {
    const int r = mm::c_row(s), rr = row0 + r;
    limit[s] = r < ROWS && rr < rows_total ? decode::key_limit(p, kv_len, rr % p.q_len) : -1;
    m[s] = decode::kNoScore;
    l[s] = 0.f;
  }
#pragma unroll
  for (int n = 0; n < HEAD_DIM / 16; ++n) mm::zero(o[n]);

#pragma unroll
  for (int i = 1; i < STAGES - 1; ++i) {
    load_pages(i, t_end);
    issue(i, t_end);
  }
  load_pages(STAGES - 1, t_end);
  ik::block_sync();  // the query rows are in shared memory

  for (int i = 0; i < n_steps; ++i) {
    ik::warp_sync();  // every lane is done with step i - 1's tile, whose slot the next issue refills
    issue(i + STAGES - 1, t_end);
    load_pages(i + STAGES, t_end);  // for the next iteration's issue: in flight during this math
    ik::cp_async_wait<STAGES - 1>();  // this lane's copies of step i have landed
    const int r0 = tile_row0(i);
    T* kt = tile(i, 0);
    T* vt = tile(i, 1);
    if (i == 0) {  // the early copy's rows past kv_len: a zero weight times stale V could be NaN
#pragma unroll
      for (int c = 0; c < C::kCopies; ++c) {
        if (copy_in_tile(c) && r0 + copy_row(c) >= t_end) ik::store16(vt + copy_row(c) * LD + copy_col(c), make_uint4(0, 0, 0, 0));
      }
    }
    ik::warp_sync();  // every lane's copies of step i are visible to the warp

    mm::FragC s;
    mm::zero(s);
#pragma unroll kQkUnroll
    for (int kc = 0; kc < HEAD_DIM / 16; ++kc) {
      mm::FragA<T> a;
      mm::FragB<T> bk;
      mm::load_a(a, s_q + kc * 16, LD);
      mm::load_bt(bk, kt + kc * 16, LD);
      mm::mma(s, a, bk);
    }
    float mx[mm::kCSlots];
#pragma unroll
    for (int j = 0; j < mm::kCSlots; ++j) {
      const int t = r0 + mm::c_col(j);
      s.x[j] = t < t_end && t <= limit[j] ? s.x[j] * p.scale_log2 : -IK_INFINITY;
      mx[j] = s.x[j];
    }
    mm::row_reduce(mx, [](float x, float y) { return fmaxf(x, y); });
#pragma unroll
    for (int j = 0; j < mm::kCSlots; ++j) {
      const float m_new = fmaxf(m[j], mx[j]);
      const float alpha = ik::exp2_fast(m[j] - m_new);
      m[j] = m_new;
      s.x[j] = ik::exp2_fast(s.x[j] - m_new);
      l[j] = l[j] * alpha + s.x[j];
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 16; ++n) o[n].x[j] *= alpha;
    }
    mm::FragA<T> pa;
    mm::c_to_a(pa, s, scratch);
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 16; ++n) {
      mm::FragB<T> bv;
      mm::load_b(bv, vt + n * 16, LD);
      mm::mma(o[n], pa, bv);
    }
  }
  mm::row_reduce(l, [](float x, float y) { return x + y; });

  // The warps' states into shared memory in decode_split's layout (reusing the ring: every
  // copy must have landed and every warp be done reading), then the shared ending.
  ik::cp_async_wait<0>();
  ik::block_sync();
  float* s_m = smem;
  float* s_l = s_m + W * ROWS;
  float* s_acc = s_l + W * ROWS;
#pragma unroll
  for (int j = 0; j < mm::kCSlots; ++j) {
    const int r = mm::c_row(j), col = mm::c_col(j);
    if (r < ROWS) {
      if (col == 0) { s_m[warp * ROWS + r] = m[j]; s_l[warp * ROWS + r] = l[j]; }
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 16; ++n) s_acc[(warp * ROWS + r) * HEAD_DIM + n * 16 + col] = o[n].x[j];
    }
  }
  ik::block_sync();
  decode::finish_split<T, HEAD_DIM, ROWS, THREADS, W, CLUSTER>(p, smem, smem + C::smem_bytes() / 4, b, hk, row0);
}

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int STAGES>
__global__ void __launch_bounds__(THREADS) attn_decode_split_mma(DecodeParams p) {
  decode_split_mma<T, HEAD_DIM, ROWS, PAGED, THREADS, STAGES, 1>(p);
}

// grid (CLUSTER, Hkv * row_tiles, B): num_splits == CLUSTER; dynamic shared memory
// smem_bytes() + SplitConfig's cluster_bytes(CLUSTER) (the same partial-result buffer).
template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int STAGES, int CLUSTER>
__global__ void __launch_bounds__(THREADS) IK_CLUSTER_DIMS(CLUSTER) attn_decode_split_mma_cluster(DecodeParams p) {
  static_assert(IK_HAS_CLUSTERS || CLUSTER < 0, "block clusters: NVIDIA sm_90 and newer only");
  static_assert(CLUSTER >= 2 && CLUSTER <= 16, "2 to 16 splits a cluster (9-16: non-portable sizes, allowed at load)");
  decode_split_mma<T, HEAD_DIM, ROWS, PAGED, THREADS, STAGES, CLUSTER>(p);
}
#endif  // IK_HAS_MMA

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
