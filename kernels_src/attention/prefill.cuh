// prefill.cuh -- the attention_prefill family (kernels_src/manifest.yaml): attention of many query
// tokens (a prompt, or a chunk of one over a cached prefix), a FlashAttention-2 style forward on
// the matrix units, written once over ik::mma (mma.sync on NVIDIA, MFMA on CDNA, WMMA on RDNA3).
//
// Shapes (strides in elements; the last dim of every tensor is contiguous):
//   q, out  [B, Hq, Tq, D], or packed [total_q, Hq, D] with cu_q (varlen: sequence b is rows
//           cu_q[b] .. cu_q[b + 1])
//   K, V    [B, Hkv, L, D], packed [total_k, Hkv, D] with cu_k, or paged [num_pages, Hkv,
//           page_size, D] with block_table [B, max_pages]
//   lse     optional fp32 natural-log log-sum-exp of each query row's scaled scores: [B, Hq, Tq]
//           or (varlen) [Hq, total_q]
// Query row i of a sequence with q_len rows and kv_len keys sees keys t < kv_len, and with causal
// t <= kv_len - q_len + i (aligned bottom-right: a chunk attends to the whole cached prefix and
// causally to itself). A row that sees no key gives zeros (lse -inf), and so do the padding rows
// q_len .. Tq - 1 of the [B, Hq, Tq, D] layout.
//
// One block: TILE_M query rows of one query head (WARPS warps of TILE_M / WARPS rows each, the
// warp's rows in 16-row matrix tiles). K/V tiles of TILE_N rows stream through a ring of STAGES
// slots in shared memory (async copies STAGES - 1 tiles ahead; STAGES 1: copy, wait, compute),
// shared by the block's warps. Per tile each warp computes S = Q K^T on the matrix units, masks
// (only tiles crossing the diagonal or the end), updates its online softmax in fp32 and adds P V.
// Tiles wholly above a warp's diagonal are skipped. PAD: 16 bytes after each shared-memory row,
// so the 8 rows of a fragment load fall on different banks (without it: 8-way conflicts).
// grid (Hq, B, q_tiles); with longest_first, blockIdx.z counts q tiles from the last (the one
// with the most keys under causal) so the longest blocks start first. Block WARPS * warp size;
// dynamic shared memory PrefillConfig::smem_bytes() (ikport/plan/prefill.py mirrors it).
// LOADER (the manifest's `loader`): the K/V cache's format, prefill::KVTiles (prefill_loader.cuh).
// Dense: the ring's slots are the tiles the fragment loads read. INT8 / KIVI INT4 (an
// ikport.KVCache; [B, Hkv, L] or paged, not packed varlen): the slots hold a tile's compressed
// bytes, which the block dequantizes into one pair of T tiles after the barrier that lands them.
#pragma once
#include "ik.cuh"

// Must match ikport/kernels.py PrefillParams field for field (ctypes mirrors C layout).
struct PrefillParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;              // null: not written
  const int* cu_q;         // [B + 1] packed query offsets (varlen), or null
  const int* cu_k;         // [B + 1] packed key offsets (varlen), or null
  const int* q_lens;       // [B] query rows per sequence (clamped to [0, q_capacity]), or null: q_capacity
  const int* kv_lens;      // [B] keys per sequence (clamped to [0, kv_capacity]), or null: kv_capacity
  const int* block_table;  // [B, bt_sb] page ids when paged, else null
  long long q_sb, q_sh, q_st;  // varlen: q_sb unused (a sequence starts at row cu_q[b])
  long long k_sb, k_sh, k_st;  // paged: k_sb is the page stride
  long long v_sb, v_sh, v_st;
  long long o_sb, o_sh, o_st;
  long long lse_sb, lse_sh;  // token stride 1
  long long bt_sb;
  int batch, num_q_heads, num_kv_heads;
  int q_capacity;   // Tq, or max_seqlen_q (varlen)
  int kv_capacity;  // L, max_seqlen_k (varlen), or max_pages * page_size (paged)
  int page_size_log2;
  int causal;
  int longest_first;
  float scale_log2;  // softmax scale * log2(e): scores are kept in the log2 domain
  // Appended (every field above keeps its offset): a quantized cache (loader int8 or kivi4_g*;
  // kv_loader.cuh, ikport.kvquant; [B, Hkv, L, ...] or paged, not packed varlen): k and v hold its
  // codes, k_scale and v_scale its 4-byte words, strides in words (int8: fp32 scales per row,
  // [B, Hkv, L] / [num_pages, Hkv, page_size]; kivi4: (scale, zero) pairs of T, K's [B, Hkv,
  // groups, D] per sequence paged or not, V's per row), k_resid KIVI's K residual [B, Hkv, G, D]
  // in T (row t at t % G). Null for dense.
  const void* k_scale;
  const void* v_scale;
  long long ks_sb, ks_sh, ks_st;
  long long vs_sb, vs_sh, vs_st;
  const void* k_resid;
  long long kr_sb, kr_sh, kr_st;
};

namespace prefill {

// "No score yet": finite, so exp2(m_old - m_new) never sees (-inf) - (-inf).
constexpr float kNoScore = -1.0e30f;
constexpr float kLn2 = 0.6931471805599453f;

// Where sequence b lives and how long it is.
struct Sequence {
  int q_len, kv_len;
  long long q_off, o_off, lse_off, k_off, v_off;  // element offsets of its first row (k/v: unpaged)
};

IK_DEVICE int clamp_len(int n, int capacity) { return n < 0 ? 0 : (n > capacity ? capacity : n); }

IK_DEVICE Sequence sequence(const PrefillParams& p, int b) {
  Sequence s;
  if (p.cu_q) {
    const int first = p.cu_q[b];
    s.q_len = clamp_len(p.cu_q[b + 1] - first, p.q_capacity);
    s.q_off = first * p.q_st;
    s.o_off = first * p.o_st;
    s.lse_off = first;
  } else {
    s.q_len = p.q_lens ? clamp_len(p.q_lens[b], p.q_capacity) : p.q_capacity;
    s.q_off = b * p.q_sb;
    s.o_off = b * p.o_sb;
    s.lse_off = b * p.lse_sb;
  }
  if (p.cu_k) {
    const int first = p.cu_k[b];
    s.kv_len = clamp_len(p.cu_k[b + 1] - first, p.kv_capacity);
    s.k_off = first * p.k_st;
    s.v_off = first * p.v_st;
  } else {
    s.kv_len = p.kv_lens ? clamp_len(p.kv_lens[b], p.kv_capacity) : p.kv_capacity;
    s.k_off = b * p.k_sb;
    s.v_off = b * p.v_sb;
  }
  return s;
}

}  // namespace prefill

// prefill::KVTiles, the K/V tiles of each KV loader (it needs PrefillParams and Sequence)
#include "prefill_loader.cuh"

namespace prefill {

template <class T, int HEAD_DIM, int TILE_M, int TILE_N, int WARPS, int STAGES, bool PAD, class LOADER>
struct PrefillConfig {
  static constexpr int kThreads = WARPS * ik::kWarpSize;
  using KV = KVTiles<LOADER, T, HEAD_DIM, TILE_N, kThreads, STAGES, false, PAD>;  // (its shared memory: paged or not)
  static constexpr int kWarpRows = TILE_M / WARPS;  // query rows of a warp
  static constexpr int kMt = kWarpRows / 16;        // its 16-row matrix tiles
  static constexpr int kNt = TILE_N / 16;           // 16-key column tiles of S
  static constexpr int kDt = HEAD_DIM / 16;         // 16-dim tiles of Q K^T's k and of the output
  static constexpr int kLd = HEAD_DIM + (PAD ? 8 : 0);  // shared-memory row stride (elements)
  static constexpr int kChunks = HEAD_DIM / 8;          // 16-byte chunks of a row
  static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "head_dim must be a multiple of 16, <= 256");
  static_assert(TILE_M % (16 * WARPS) == 0, "each warp takes whole 16-row tiles of the query tile");
  static_assert(TILE_N % 16 == 0, "K/V tiles of whole 16-row matrix tiles");
  static_assert(STAGES >= 1, "at least one K/V slot");
  static constexpr int q_elems() { return TILE_M * kLd; }
  // The K/V ring (STAGES slots of the loader's tiles as copied) and the loader's own T tiles.
  static constexpr int ring_bytes() { return STAGES * KV::kSlotBytes + KV::kTileBytes; }
  static constexpr int q_bytes() { return q_elems() * 2; }
  static constexpr int scratch_bytes() { return WARPS * ik::mma::kCToAScratch * 2; }
  static constexpr int smem_bytes() { return ring_bytes() + q_bytes() + scratch_bytes(); }
};

}  // namespace prefill

#ifdef IK_HAS_MMA
template <class T, int HEAD_DIM, int TILE_M, int TILE_N, int WARPS, int STAGES, bool PAGED, bool PAD, class LOADER>
__global__ void __launch_bounds__(WARPS * ik::kWarpSize) attn_prefill(PrefillParams p) {
  using C = prefill::PrefillConfig<T, HEAD_DIM, TILE_M, TILE_N, WARPS, STAGES, PAD, LOADER>;
  namespace mm = ik::mma;
  constexpr int LD = C::kLd, MT = C::kMt, NT = C::kNt, DT = C::kDt, CH = C::kChunks;
  // Q's fragments stay in registers where they are few (NVIDIA: 4 registers each); else each tile
  // reloads them from shared memory.
  constexpr bool kQInRegisters = MT * DT * sizeof(mm::FragA<T>) <= 128;
  extern __shared__ __attribute__((aligned(16))) float smem[];

  const int hq = blockIdx.x, b = blockIdx.y;
  const int q_tile = p.longest_first ? static_cast<int>(gridDim.z - 1 - blockIdx.z) : static_cast<int>(blockIdx.z);
  const prefill::Sequence seq = prefill::sequence(p, b);
  const int m0 = q_tile * TILE_M;
  T* og = static_cast<T*>(p.out) + seq.o_off + hq * p.o_sh;
  // Rows q_len .. q_capacity - 1 of a [B, Hq, Tq, D] output are padding: written as zeros (lse
  // -inf), as the reference gives, so no stale value flows on. (Packed varlen rows past a
  // sequence are the next sequence's.)
  const int pad_end = p.cu_q ? 0 : p.q_capacity;
  if (m0 >= seq.q_len) {  // the whole block: before any barrier
    const int rows = min(m0 + TILE_M, pad_end) - m0;
    for (int idx = threadIdx.x; idx < rows * CH; idx += C::kThreads)
      ik::store16(og + (m0 + idx / CH) * p.o_st + idx % CH * 8, make_uint4(0, 0, 0, 0));
    if (p.lse)
      for (int r = threadIdx.x; r < rows; r += C::kThreads) p.lse[seq.lse_off + hq * p.lse_sh + m0 + r] = -IK_INFINITY;
    return;
  }
  const int hk = hq / (p.num_q_heads / p.num_kv_heads);
  const int warp = ik::warp_id();
  const int diag = seq.kv_len - seq.q_len;  // causal: row i sees keys t <= i + diag
  const int last_row = min(m0 + TILE_M, seq.q_len) - 1;
  const int kv_end = p.causal ? min(seq.kv_len, last_row + diag + 1) : seq.kv_len;  // keys any row sees
  const int n_tiles = kv_end > 0 ? (kv_end + TILE_N - 1) / TILE_N : 0;

  using KV = prefill::KVTiles<LOADER, T, HEAD_DIM, TILE_N, C::kThreads, STAGES, PAGED, PAD>;
  static_assert(KV::kSlotBytes == C::KV::kSlotBytes && KV::kTileBytes == C::KV::kTileBytes, "paged or not, one size");
  static_assert(KV::kSlotBytes % 16 == 0 && KV::kTileBytes % 16 == 0, "16-byte aligned slots and tiles");
  T* s_ring = reinterpret_cast<T*>(smem);  // the K/V ring, then the loader's own (T tiles, or dense: page ids)
  T* s_q = s_ring + C::ring_bytes() / 2;  // (int arithmetic, as the rest: T is 2 bytes)
  T* scratch = s_q + C::q_elems() + warp * mm::kCToAScratch;
  const T* qg = static_cast<const T*>(p.q) + seq.q_off + hq * p.q_sh;
  const KV kv(p, seq, b, hk, n_tiles, kv_end);
  typename KV::Located at;  // paged, ids in registers: the next tile's page ids

  // The query tile into shared memory (rows past q_len zero), in the first copy group.
  for (int idx = threadIdx.x; idx < TILE_M * CH; idx += C::kThreads) {
    const int r = idx / CH, ch = idx % CH, row = m0 + r;
    const bool valid = row < seq.q_len;
    ik::cp_async16_zfill(s_q + r * LD + ch * 8, valid ? qg + row * p.q_st + ch * 8 : qg, valid);
  }
  // K/V tile j into ring slot j % STAGES (the loader's copies: rows past kv_end zero); one commit
  // group per call, empty past the last tile, so the wait counts stay uniform.
  auto issue = [&](int j) {
    if (j < n_tiles) kv.copy(p, j, s_ring, at);
    ik::cp_async_commit();
    kv.locate(p, j + 1, s_ring, at);  // paged: the next tile's page ids, in flight while this one's copies and math run
  };

  // Per warp: its rows [w_row0, w_row0 + 16 * MT); per row of the lane's accumulator slots the
  // online softmax state (m, in the log2 domain of the scaled scores, equal across the row's
  // lanes; l this lane's part of the row sum until the row_reduce after the loop), per slot the
  // P V outputs. (Per row, not per slot: on NVIDIA 2 values for 8 slots, and 2 exp2 for alpha.)
  const int w_row0 = m0 + warp * C::kWarpRows;
  const T* s_qw = s_q + warp * C::kWarpRows * LD;
  constexpr int RW = mm::kCRows;
  float m[MT][RW], l[MT][RW];
  mm::FragC o[MT][DT];
  mm::FragA<T> qa[kQInRegisters ? MT : 1][kQInRegisters ? DT : 1];  // (one unused one otherwise)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      m[mt][r] = prefill::kNoScore;
      l[mt][r] = 0.f;
    }
#pragma unroll
    for (int n = 0; n < DT; ++n) mm::zero(o[mt][n]);
  }

  if (STAGES == 1) ik::cp_async_commit();  // the query tile alone; each tile then copies and waits
  kv.locate(p, 0, s_ring, at);
  // Page ids in shared memory (KV::kSharedPageIds) reach every thread through a barrier before the
  // copies that read them: here before each of the first tiles, then the loop's own barriers (tile
  // j + 1's ids are written a barrier before its copies, over tile j - 1's, whose copies are done).
  if constexpr (KV::kSharedPageIds) ik::block_sync();
#pragma unroll
  for (int j = 0; j < STAGES - 1; ++j) {  // the first group also holds the query tile
    if constexpr (KV::kSharedPageIds)
      if (j > 0) ik::block_sync();
    issue(j);
  }

  for (int j = 0; j < n_tiles; ++j) {
    if (STAGES == 1) {
      issue(j);
      ik::cp_async_wait<0>();
    } else {
      ik::cp_async_wait<(STAGES > 1 ? STAGES - 2 : 0)>();  // this thread's copies of tile j landed
    }
    ik::block_sync();  // everyone's copies of tile j landed; everyone is done with tile j - 1
    if (STAGES > 1) issue(j + STAGES - 1);  // into tile j - 1's slot
    if constexpr (kQInRegisters) {
      if (j == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kc = 0; kc < DT; ++kc) mm::load_a(qa[mt][kc], s_qw + mt * 16 * LD + kc * 16, LD);
      }
    }
    kv.land(s_ring, j);  // compressed formats: the block dequantizes tile j's slot into its T tiles
    const int n0 = j * TILE_N;
    // Warp-uniform: skip a warp whose rows are all padding or whose rows see none of these keys.
    const bool active = w_row0 < seq.q_len && !(p.causal && n0 > w_row0 + C::kWarpRows - 1 + diag);
    if (active) {
      const T* kt = kv.k_tile(s_ring, j);  // rows of LD, as the fragment loads read them
      const T* vt = kt + TILE_N * LD;       // (every loader's V tile follows its K tile)
      mm::FragC s[MT][NT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mm::zero(s[mt][nt]);
#pragma unroll
      for (int kc = 0; kc < DT; ++kc) {
        mm::FragA<T> a[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (kQInRegisters) {
            a[mt] = qa[mt][kc];
          } else {
            mm::load_a(a[mt], s_qw + mt * 16 * LD + kc * 16, LD);
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mm::FragB<T> bk;
          mm::load_bt(bk, kt + nt * 16 * LD + kc * 16, LD);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            mm::mma(s[mt][nt], a[mt], bk);
        }
      }
      // Masks only where a key of the tile is past the end or past this warp's first row's diagonal
      // (one warp-uniform branch around the whole tile). Key n0 + c of row w_row0 + r is masked
      // where c >= kv_len - n0 or (causal) c - r > w_row0 + diag - n0; c and r are the lane's
      // base plus slot constants, so each side is a per-lane value against a constant.
      if (n0 + TILE_N > seq.kv_len || (p.causal && n0 + TILE_N - 1 > w_row0 + diag)) {
        const int lane_col = mm::c_col(0), lane_row = mm::c_row(0);
        const int key_lim = seq.kv_len - n0 - lane_col;
        const int diag_lim = p.causal ? w_row0 + diag - n0 - (lane_col - lane_row) : TILE_N;  // (c - r < TILE_N)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            ik::static_for<0, mm::kCSlots>([&, mt, nt](auto js_) {
              constexpr int js = decltype(js_)::value;
              const int c = nt * 16 + mm::c_col_offset(js), r = mt * 16 + mm::c_row_offset(js);
              if (c >= key_lim || c - r > diag_lim) s[mt][nt].x[js] = -IK_INFINITY;
            });
      }
      // Online softmax in the log2 domain of the scaled scores, the scale folded into the exp2's
      // FMA (s * scale_log2 - m): the row maxima are taken on the raw scores, which is the same
      // for a positive scale (the launch makes it positive: ikport/impl/prefill.py).
      const float c_log2 = p.scale_log2;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float mx[mm::kCSlots];
#pragma unroll
        for (int js = 0; js < mm::kCSlots; ++js) mx[js] = s[mt][0].x[js];
#pragma unroll
        for (int nt = 1; nt < NT; ++nt)
#pragma unroll
          for (int js = 0; js < mm::kCSlots; ++js) mx[js] = fmaxf(mx[js], s[mt][nt].x[js]);
        mm::row_reduce(mx, [](float x, float y) { return fmaxf(x, y); });
        // (Slot and row indices as constants, ik::static_for: see there; loop indices captured by
        // value, so the loops keep countable induction variables.)
        float alpha[RW], sum[RW], neg_m[RW];
        ik::static_for<0, RW>([&, mt](auto r_) {
          constexpr int r = decltype(r_)::value;
          const float m_new = fmaxf(m[mt][r], mx[mm::c_lead_of_row(r)] * c_log2);  // (a row with no key yet: -inf, kept out)
          alpha[r] = ik::exp2_fast(m[mt][r] - m_new);
          m[mt][r] = m_new;
          neg_m[r] = -m_new;
          sum[r] = 0.f;
        });
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          ik::static_for<0, mm::kCSlots>([&, mt, nt](auto js_) {
            constexpr int js = decltype(js_)::value, r = mm::c_row_index(js);
            s[mt][nt].x[js] = ik::exp2_fast(fmaf(s[mt][nt].x[js], c_log2, neg_m[r]));
            sum[r] += s[mt][nt].x[js];
          });
        }
#pragma unroll
        for (int r = 0; r < RW; ++r) l[mt][r] = l[mt][r] * alpha[r] + sum[r];
#pragma unroll
        for (int n = 0; n < DT; ++n) {
          ik::static_for<0, mm::kCSlots>([&, mt, n](auto js_) {
            constexpr int js = decltype(js_)::value;
            o[mt][n].x[js] *= alpha[mm::c_row_index(js)];
          });
        }
      }
      // O += P V: P's 16-key column tiles become A fragments (in registers on NVIDIA).
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mm::FragA<T> pa[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mm::c_to_a(pa[mt], s[mt][nt], scratch);
#pragma unroll
        for (int n = 0; n < DT; ++n) {
          mm::FragB<T> bv;
          mm::load_b(bv, vt + nt * 16 * LD + n * 16, LD);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mm::mma(o[mt][n], pa[mt], bv);
        }
      }
    }
    if (STAGES == 1) ik::block_sync();  // everyone is done with the one slot before the next copy
  }
  ik::cp_async_wait<0>();  // no copy outlives the block (a block with no tiles issued the query's)

  // The rows' sums, then out = O / l and the log-sum-exp (natural log) of rows below q_len. O goes
  // through the warp's own query rows in shared memory (done with them now), so the output leaves
  // as whole 16-byte row chunks rather than 2-byte scattered stores; rows q_len .. pad_end - 1 as zeros.
  T* s_ow = s_q + warp * C::kWarpRows * LD;
  ik::warp_sync();  // the warp's last fragment loads of its query rows are done
  const int lane_row = mm::c_row(0), lane_col = mm::c_col(0);
  const int write_end = max(seq.q_len, pad_end);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    // The row sums (over the row's lanes) and maxima in slot form (ik::static_for: see there).
    float row_l[mm::kCSlots], row_m[mm::kCSlots];
    ik::static_for<0, mm::kCSlots>([&, mt](auto js_) {
      constexpr int js = decltype(js_)::value;
      row_l[js] = mm::c_row_lead(js) == js ? l[mt][mm::c_row_index(js)] : 0.f;
      row_m[js] = m[mt][mm::c_row_index(js)];
    });
    mm::row_reduce(row_l, [](float x, float y) { return x + y; });
    ik::static_for<0, mm::kCSlots>([&, mt](auto js_) {
      constexpr int js = decltype(js_)::value;
      const int r = mt * 16 + lane_row + mm::c_row_offset(js), row = w_row0 + r;
      const float sum = row_l[js];
      const bool sees_keys = row < seq.q_len && sum > 0.f;
      const float inv = sees_keys ? 1.f / sum : 0.f;
      T* dst = s_ow + r * LD + lane_col + mm::c_col_offset(js);
      // Slot pairs that are neighbours in one row (NVIDIA's layout) store one 4-byte word.
      constexpr bool kPairLead = js % 2 == 0 && js + 1 < mm::kCSlots && mm::c_row_offset(js + 1) == mm::c_row_offset(js) &&
                                 mm::c_col_offset(js + 1) == mm::c_col_offset(js) + 1;
      constexpr bool kPairTail = js % 2 == 1 && mm::c_row_offset(js - 1) == mm::c_row_offset(js) &&
                                 mm::c_col_offset(js - 1) + 1 == mm::c_col_offset(js);
#pragma unroll
      for (int n = 0; n < DT; ++n) {
        if constexpr (kPairLead) {
          const unsigned int lo = ik::dtype<T>::bits_from_float(o[mt][n].x[js] * inv);
          const unsigned int hi = ik::dtype<T>::bits_from_float(o[mt][n].x[js + 1] * inv);
          *reinterpret_cast<unsigned int*>(dst + n * 16) = lo | (hi << 16);
        } else if constexpr (!kPairTail) {
          dst[n * 16] = ik::dtype<T>::from_float(o[mt][n].x[js] * inv);
        }
      }
      if (p.lse && lane_col + mm::c_col_offset(js) == 0 && row < write_end)
        p.lse[seq.lse_off + hq * p.lse_sh + row] = sees_keys ? (row_m[js] + log2f(sum)) * prefill::kLn2 : -IK_INFINITY;
    });
  }
  ik::warp_sync();
  for (int idx = ik::lane_id(); idx < C::kWarpRows * CH; idx += ik::kWarpSize) {
    const int r = idx / CH, ch = idx % CH, row = w_row0 + r;
    if (row < write_end) ik::store16(og + row * p.o_st + ch * 8, ik::load16(s_ow + r * LD + ch * 8));
  }
}
#endif  // IK_HAS_MMA
