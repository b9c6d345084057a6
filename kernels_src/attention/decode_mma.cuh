// decode_mma.cuh -- v11: split-K decode on the matrix units. The same split, merge and early copy
// as decode_split (decode_vector.cuh), but each warp scores a tile of 16 K rows for the block's
// query rows with one matrix product (S = Q K^T: Q's rows padded to 16, D/16 products) and
// accumulates P V with D/16 more, instead of a dot product per row and lane group with shuffles:
// the vector path spends ~60 instructions per K/V row of a warp at GQA 4, this one ~8
// (docs/results/decode.md, v11).
//
// Each warp streams its own tiles (t_begin + 16 * (warp + WARPS * i)) through its own ring of
// STAGES tiles of K and V in shared memory, STAGES - 1 ahead, so warps synchronize only at the
// end. The block's query rows wait in shared memory as the A operand of every Q K^T.
// grid and merge as attn_decode_split; block THREADS; dynamic shared memory smem_bytes().
#pragma once
#include "common.cuh"
#include "kv_loader.cuh"
#include "merge.cuh"

#ifdef IK_HAS_MMA
template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int STAGES, class LOADER>
struct MmaConfig {
  using Tiles = decode::MatrixTiles<HEAD_DIM>;
  using Loader = typename LOADER::template Matrix<T, HEAD_DIM, PAGED, THREADS, STAGES>;
  using States = decode::WarpStates<THREADS / ik::kWarpSize, ROWS, HEAD_DIM>;
  static constexpr int kWarps = THREADS / ik::kWarpSize;
  static constexpr int kTile = Tiles::kTile;  // K/V rows per warp step
  static constexpr int kLd = Tiles::kLd;      // row stride of the tiles and the query rows
  static constexpr int kRow16 = Tiles::kRow16;
  static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "head_dim must be a multiple of 16, <= 256");
  static_assert(ROWS >= 1 && ROWS <= 16, "the query rows of a block fill one 16-row matrix tile");
  static_assert(STAGES >= 2, "a ring of at least 2 tiles a warp");
  static_assert(THREADS % ik::kWarpSize == 0, "block must be whole warps");
  static constexpr int ring_bytes() { return kWarps * (STAGES * Loader::kSlotBytes + Loader::kWarpBytes); }
  static constexpr int q_bytes() { return 16 * kLd * 2; }
  static constexpr int scratch_bytes() { return kWarps * ik::mma::kCToAScratch * 2; }
  static constexpr int stream_bytes() { return ring_bytes() + q_bytes() + scratch_bytes(); }
  static constexpr int merge_bytes() { return States::bytes(); }
  static constexpr int smem_bytes() { return merge_bytes() > stream_bytes() ? merge_bytes() : stream_bytes(); }
};

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int STAGES, int CLUSTER, class LOADER>
IK_DEVICE void decode_split_mma(const DecodeParams& p) {
  using C = MmaConfig<T, HEAD_DIM, ROWS, PAGED, THREADS, STAGES, LOADER>;
  namespace mm = ik::mma;
  constexpr int W = C::kWarps, LD = C::kLd, R16 = C::kRow16;
  // Q K^T's products unrolled in pairs where C is not A's layout (AMD): fully unrolled, RDNA3's
  // 16-slot fragments of 8 products ran out of registers (gfx1100 spilled)
  constexpr int kQkUnroll = mm::kCIsA ? HEAD_DIM / 16 : 2;
  extern __shared__ __attribute__((aligned(16))) float smem[];
  if constexpr (CLUSTER > 1) ik::cluster_arrive_relaxed();  // "started", waited on before the stores

  const decode::SplitBlock blk = decode::split_block<ROWS>(p);
  const int lane = ik::lane_id(), warp = ik::warp_id();
  const decode::SplitRange range = decode::split_range(p, blk);
  const int n_tiles = range.t_end > range.t_begin ? (range.t_end - range.t_begin + C::kTile - 1) / C::kTile : 0;
  const int n_steps = n_tiles > warp ? (n_tiles - warp + W - 1) / W : 0;  // this warp's tiles
  auto tile_row0 = [&](int i) { return range.t_begin + (i * W + warp) * C::kTile; };

  T* s_q = reinterpret_cast<T*>(smem) + C::ring_bytes() / sizeof(T);  // after the rings
  T* scratch = s_q + 16 * LD + warp * mm::kCToAScratch;
  typename C::Loader kv(p, blk, warp, lane, smem, tile_row0);
  // The loader's address work goes through lambdas, as this code did before the loaders: clang
  // optimizes a lambda before inlining it, and calling the loader directly changed AMD's code.
  auto tile = [&](int i, int tensor) { return kv.tile(i % STAGES, tensor); };
  typename C::Loader::Located located;  // the next step to copy, located a step ahead
  auto locate = [&](int i, int end) { kv.locate(p, located, tile_row0, i, end); };
  auto key_source = [&](int t0, int c) { return kv.key_source(p, located, t0, c); };
  auto value_source = [&](int t0, int c) { return kv.value_source(p, located, t0, c); };
  const auto* k_zero_src = kv.kbase;  // in-bounds sources of the zero-byte copies past the end
  const auto* v_zero_src = kv.vbase;
  auto issue = [&](int i, int end) {  // step i's tiles (rows below `end`; zeros past it), one group
    const int r0 = tile_row0(i);
    T* kd = tile(i, 0);
    T* vd = tile(i, 1);
    if (kv.whole(r0, end)) {  // warp-uniform
#pragma unroll
      for (int c = 0; c < C::Loader::kCopies; ++c) {
        if (kv.copy_in_tile(c)) {
          ik::cp_async16(kv.dest(kd, c), key_source(r0, c));
          ik::cp_async16(kv.dest(vd, c), value_source(r0, c));
        }
      }
    } else if (r0 < end) {
#pragma unroll
      for (int c = 0; c < C::Loader::kCopies; ++c) {
        if (kv.copy_in_tile(c)) {
          const bool valid = r0 + kv.copy_row(c) < end;  // else a zero-byte copy from an address in bounds
          const auto* ks = valid ? key_source(r0, c) : k_zero_src;  // (T, or the loader's codes)
          const auto* vs = valid ? value_source(r0, c) : v_zero_src;
          ik::cp_async16_zfill(kv.dest(kd, c), ks, valid);
          ik::cp_async16_zfill(kv.dest(vd, c), vs, valid);
        }
      }
    }
    kv.copy_side(p, located, i, r0, end);
    kv.advance(p);
    ik::cp_async_commit();  // one group per step, empty past the end: the wait count stays uniform
  };
  // The early copy, as decode_split's (SplitRange::t_early_end).
  locate(0, range.t_early_end);
  kv.clamp_early(p, located);
  issue(0, range.t_early_end);

  // The block's query rows into shared memory, unscaled (exact in T); rows past them zero.
  for (int idx = threadIdx.x; idx < 16 * R16; idx += THREADS) {
    const int r = idx / R16, ch = idx % R16, rr = blk.row0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < ROWS && rr < blk.rows_total) {
      const int hq = blk.hk * blk.group + rr / p.q_len, tq = rr % p.q_len;
      v = ik::load16(static_cast<const T*>(p.q) + blk.b * p.q_sb + hq * p.q_sh + tq * p.q_st + ch * 8);
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
    const int r = mm::c_row(s), rr = blk.row0 + r;
    limit[s] = r < ROWS && rr < blk.rows_total ? decode::key_limit(p, range.kv_len, rr % p.q_len) : -1;
    m[s] = decode::kNoScore;
    l[s] = 0.f;
  }
#pragma unroll
  for (int n = 0; n < HEAD_DIM / 16; ++n) mm::zero(o[n]);

#pragma unroll
  for (int i = 1; i < STAGES - 1; ++i) {
    locate(i, range.t_end);
    issue(i, range.t_end);
  }
  locate(STAGES - 1, range.t_end);
  ik::block_sync();  // the query rows are in shared memory

  for (int i = 0; i < n_steps; ++i) {
    ik::warp_sync();  // every lane is done with step i - 1's tile, whose slot the next issue refills
    issue(i + STAGES - 1, range.t_end);
    locate(i + STAGES, range.t_end);  // for the next iteration's issue: in flight during this math
    ik::cp_async_wait<STAGES - 1>();  // this lane's copies of step i have landed
    const int r0 = tile_row0(i);
    T* kt = tile(i, 0);
    T* vt = tile(i, 1);
    kv.landed(kt, vt, r0, range.t_end, i == 0);  // (a dequantizing loader points kt, vt at its tiles)
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
      s.x[j] = t < range.t_end && t <= limit[j] ? s.x[j] * p.scale_log2 : -IK_INFINITY;
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

  // The warps' states into shared memory (WarpStates, reusing the ring: every copy must have
  // landed and every warp be done reading), then the shared ending.
  ik::cp_async_wait<0>();
  ik::block_sync();
  using S = typename C::States;
  float* s_m = S::m(smem);
  float* s_l = S::l(smem);
  float* s_acc = S::acc(smem);
#pragma unroll
  for (int j = 0; j < mm::kCSlots; ++j) {
    const int r = mm::c_row(j), col = mm::c_col(j);
    if (r < ROWS) {
      // (S::row(warp, r) written out: the call changed gfx942's code)
      if (col == 0) { s_m[warp * ROWS + r] = m[j]; s_l[warp * ROWS + r] = l[j]; }
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 16; ++n) s_acc[(warp * ROWS + r) * HEAD_DIM + n * 16 + col] = o[n].x[j];
    }
  }
  ik::block_sync();
  decode::finish_split<T, HEAD_DIM, ROWS, THREADS, W, CLUSTER>(p, smem, smem + C::smem_bytes() / 4, blk.b, blk.hk, blk.row0);
}

template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int STAGES, class LOADER>
__global__ void __launch_bounds__(THREADS) attn_decode_split_mma(DecodeParams p) {
  decode_split_mma<T, HEAD_DIM, ROWS, PAGED, THREADS, STAGES, 1, LOADER>(p);
}

// grid (CLUSTER, Hkv * row_tiles, B): num_splits == CLUSTER; dynamic shared memory
// smem_bytes() + SplitConfig's cluster_bytes(CLUSTER) (the same partial-result buffer).
template <class T, int HEAD_DIM, int ROWS, bool PAGED, int THREADS, int STAGES, int CLUSTER, class LOADER>
__global__ void __launch_bounds__(THREADS) IK_CLUSTER_DIMS(CLUSTER) attn_decode_split_mma_cluster(DecodeParams p) {
  decode::check_cluster<CLUSTER>();
  decode_split_mma<T, HEAD_DIM, ROWS, PAGED, THREADS, STAGES, CLUSTER, LOADER>(p);
}
#endif  // IK_HAS_MMA
