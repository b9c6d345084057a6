// kv_loader.cuh -- KV loaders: the code that knows the K/V cache's format. A split kernel keeps the
// stream's schedule (which rows a step holds, how far the ring runs ahead, when copies are issued,
// committed and waited for); the loader its LOADER parameter names (the manifest's `loader`,
// mapped by cpp_names) does the addressing (strides, pages), the copies, the early copy's bounds
// and the values the math reads.
//
// A new format (INT8, KIVI INT4) is a new loader type, not a new kernel: a struct with the two
// member templates DenseLoader has, each with DenseLoader's members:
//   Vector (decode_vector.cuh; lanes: VectorLanes): kSlotBytes, a lane's ring bytes per row and
//     tensor (SplitConfig::smem_bytes, mirrored by ikport/plan/decode.py); Keys and Values, a step's
//     rows in registers; Located, what locate finds a step ahead (page ids); locate, clamp_early,
//     copy (into a ring stage), read (step i from its stage; zeroes V past the early copy's
//     end), load (STAGES == 0), key and value (a row's 8 dims as floats: where codes are
//     dequantized).
//   Matrix (decode_mma.cuh; tiles: MatrixTiles): kSlotBytes, a warp's ring slot (MmaConfig);
//     Located, locate, clamp_early; a tile's 16-byte copies (kCopies, copy_in_tile, copy_row,
//     dest, key_source, value_source, kbase/vbase for the zero-byte ones, whole, advance);
//     copy_side, after a step's copies (scales); landed, once they land (before the warp reads
//     the tiles): where codes become the T tiles `tile` returns for the fragment loads.
// INT8 (codes, a scale per token and head): Vector copies a row's 8 codes (kSlotBytes 8) and the
// row's scale, key/value multiply; Matrix copies code tiles and scales into its slot (kSlotBytes
// covers codes, scales and the T tiles) and dequantizes in landed. KIVI INT4: K codes with a
// per-channel scale and zero per group of G tokens (copied once per group), the newest < G tokens
// from the full-precision residual (located per row), V with a per-token scale and zero per
// channel group.
#pragma once
#include "common.cuh"

namespace decode {

// The vector kernel's lanes: a "row group" of kLPR lanes holds one K/V row, kVec dims a lane.
template <int HEAD_DIM, int THREADS>
struct VectorLanes {
  static constexpr int kVec = 8;  // dims per lane per row (dense: one 16-byte load)
  static constexpr int kLanesNeeded = HEAD_DIM / kVec;
  static constexpr int kLPR = kLanesNeeded <= 1 ? 1 : kLanesNeeded <= 2 ? 2 : kLanesNeeded <= 4 ? 4
                            : kLanesNeeded <= 8 ? 8 : kLanesNeeded <= 16 ? 16 : 32;
  static constexpr int kGroups = THREADS / kLPR;  // row groups per block
};

// The matrix kernel's K/V tiles in shared memory, as its fragment loads read them.
template <int HEAD_DIM>
struct MatrixTiles {
  static constexpr int kTile = 16;          // K/V rows per warp step: Q K^T's n, P V's k
  static constexpr int kLd = HEAD_DIM + 8;  // row stride in shared memory: 16 bytes of padding keep
                                            // the 8 rows of each matrix load on different banks
  static constexpr int kRow16 = HEAD_DIM / 8;  // 16-byte chunks of a row of T
  static constexpr int tile_elems() { return kTile * kLd; }
};

// fp16/bf16 K/V as the query's dtype T: copied as they are, 16 bytes at a time.
struct DenseLoader {
  template <class T, int HEAD_DIM, bool PAGED, int THREADS, int UNROLL, int STAGES>
  struct Vector {
    using Lanes = VectorLanes<HEAD_DIM, THREADS>;
    static constexpr int kVec = Lanes::kVec, kGroups = Lanes::kGroups;
    static constexpr int kSlotBytes = kVec * sizeof(T);  // a lane's 8 elements of a row
    static_assert(kSlotBytes == 16, "a lane's share of a row is one 16-byte copy");
    struct Keys {  // a step's K rows of this lane, as copied
      uint4 raw[UNROLL];
    };
    using Values = Keys;  // and its V rows
    // What locate finds for a step, carried to its copy (paged: the page ids, loaded one step
    // before the copies are issued so that an issue never waits on a block-table load; page
    // size 1: one id per row, D1 67.0 -> 57.2 us).
    struct Located {
      int page[UNROLL];
    };

    const int b, hk;
    const bool lane_active;
    const T* kbase;
    const T* vbase;
    const int* bt_row;
    uint4* ring;  // the block's dynamic shared memory

    IK_DEVICE Vector(const DecodeParams& params, const SplitBlock& blk, int d0, bool active, float* smem)
        : b(blk.b), hk(blk.hk), lane_active(active),
          kbase(static_cast<const T*>(params.k) + d0), vbase(static_cast<const T*>(params.v) + d0),
          bt_row(PAGED ? params.block_table + blk.b * params.bt_sb : nullptr),
          ring(reinterpret_cast<uint4*>(smem)) {}

    // Ring stage `stage`, row u of the step, K (kv 0) or V (1): this thread's own 16-byte slot.
    IK_DEVICE uint4* slot(int stage, int u, int kv) const {
      return ring + ((stage * UNROLL + u) * 2 + kv) * THREADS + threadIdx.x;
    }
    // The rows of a step: t0, t0 + kGroups, ... (UNROLL of them), those below `end` valid.
    IK_DEVICE void locate(const DecodeParams& p, Located& at, int t0, int end) const {
      if constexpr (PAGED) load_page_ids<UNROLL, kGroups>(p, bt_row, t0, end, lane_active, at.page);
    }
    IK_DEVICE void clamp_early(const DecodeParams& p, Located& at) const {
      if constexpr (PAGED) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) at.page[u] = clamp_page(p, at.page[u]);
      }
    }
    // Copies this lane's chunks of a step's rows into ring stage `stage` (zeros past `end`).
    IK_DEVICE void copy(const DecodeParams& p, const Located& at, int stage, int t0, int end) const {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        int t = t0 + u * kGroups;
        bool valid = t < end && lane_active;
        long long ko = 0, vo = 0;
        if (valid && PAGED) {
          ko = paged_offset(p, at.page[u], p.k_sb, p.k_sh, p.k_st, hk, t);
          vo = paged_offset(p, at.page[u], p.v_sb, p.v_sh, p.v_st, hk, t);
        } else if (valid) {
          ko = row_offset<false>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t);
          vo = row_offset<false>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t);
        }
        ik::cp_async16_zfill(slot(stage, u, 0), kbase + ko, valid);
        ik::cp_async16_zfill(slot(stage, u, 1), vbase + vo, valid);
      }
    }
    // Step i's rows from ring stage i % STAGES, once this thread's copies have landed. Step 0 is
    // the early copy: its V rows past `end` (kv_len) are zeroed, as a zero weight times stale V
    // could still be NaN. (Stage and condition computed here, per row: computed by the caller,
    // they changed gfx1100's code.)
    IK_DEVICE void read(Keys& kr, Values& vr, int i, int t0, int end) const {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        kr.raw[u] = *slot(i % STAGES, u, 0);
        vr.raw[u] = *slot(i % STAGES, u, 1);
        if (STAGES > 0 && i == 0 && t0 + u * kGroups >= end) vr.raw[u] = make_uint4(0, 0, 0, 0);
      }
    }
    // STAGES == 0: a step's rows straight from memory into registers.
    IK_DEVICE void load(const DecodeParams& p, Keys& kr, Values& vr, int t0, int end) const {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {  // issue every load of the step before using any
        int t = t0 + u * kGroups;
        kr.raw[u] = vr.raw[u] = make_uint4(0, 0, 0, 0);
        if (t < end && lane_active) {
          kr.raw[u] = ik::load16_stream(kbase + row_offset<PAGED>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t));
          vr.raw[u] = ik::load16_stream(vbase + row_offset<PAGED>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t));
        }
      }
    }
    IK_DEVICE void key(const Keys& kr, int u, float (&f)[kVec]) const { ik::unpack8<T>(kr.raw[u], f); }
    IK_DEVICE void value(const Values& vr, int u, float (&f)[kVec]) const { ik::unpack8<T>(vr.raw[u], f); }
  };

  template <class T, int HEAD_DIM, bool PAGED, int THREADS, int STAGES>
  struct Matrix {
    using Tiles = MatrixTiles<HEAD_DIM>;
    static constexpr int kTile = Tiles::kTile, kLd = Tiles::kLd, R16 = Tiles::kRow16, WS = ik::kWarpSize;
    static constexpr int kWarps = THREADS / WS;
    static constexpr int kCopies = (kTile * R16 + WS - 1) / WS;  // a lane's per tile and tensor
    static constexpr int kSlotBytes = 2 * Tiles::tile_elems() * sizeof(T);  // a step's K and V tiles
    // Where copies are asynchronous an issue is nothing but address work: a warp keeps its next
    // tile's start in a contiguous cache and moves it on by its tile stride (issue takes the steps
    // in order), and whole tiles skip the row checks (sm_90, D1: 592 -> 378 loop instructions a
    // whole tile, decode.md v11). Synchronous copies (AMD, NVIDIA before sm_80) and paged
    // caches recompute each source from (b, hk, t) or the page: with synchronous copies the
    // hoisted offsets stay in registers (gfx1100 spilled).
    static constexpr bool kTileCursor = IK_HAS_ASYNC_COPY && !PAGED;
    struct Located {  // as Vector's: paged, the page ids of a step's copies
      int page[kCopies];
    };

    const int b, hk, warp, lane;
    T* ring;  // the block's dynamic shared memory: kWarps rings of STAGES slots
    const T* kbase;  // also the in-bounds source of the zero-byte copies past the end
    const T* vbase;
    const int* bt_row;
    const T* k_next;  // the cursor (kTileCursor): the warp's next tile
    const T* v_next;

    // tile_row0(i): the first row of the warp's step i. (The cursor's start is row_offset<false>
    // written out: calling it changed gfx942's code.)
    template <class TileRow0>
    IK_DEVICE Matrix(const DecodeParams& params, const SplitBlock& blk, int warp_, int lane_, float* smem,
                     TileRow0 tile_row0)
        : b(blk.b), hk(blk.hk), warp(warp_), lane(lane_), ring(reinterpret_cast<T*>(smem)),
          kbase(static_cast<const T*>(params.k)), vbase(static_cast<const T*>(params.v)),
          bt_row(PAGED ? params.block_table + blk.b * params.bt_sb : nullptr),
          k_next(kbase + (PAGED ? 0 : b * params.k_sb + hk * params.k_sh +
                                          static_cast<long long>(tile_row0(0)) * params.k_st)),
          v_next(vbase + (PAGED ? 0 : b * params.v_sb + hk * params.v_sh +
                                          static_cast<long long>(tile_row0(0)) * params.v_st)) {}

    // Slot `stage` of the warp's ring: the K (tensor 0) or V (1) tile, 16 rows of kLd.
    IK_DEVICE T* tile(int stage, int tensor) const {
      return ring + ((warp * STAGES + stage) * 2 + tensor) * Tiles::tile_elems();
    }
    // Lane copy c of a tile moves 16 bytes: chunk (lane + c * WS) % R16 of row (lane + c * WS) / R16.
    // Where a row's chunks divide the warp (head_dim 16-256 in powers of two on 32 lanes) the row
    // is the lane's plus a constant per copy, so the shared-memory offsets fold into immediates.
    IK_DEVICE bool copy_in_tile(int c) const { return (kTile * R16) % WS == 0 || lane + c * WS < kTile * R16; }
    IK_DEVICE int copy_row(int c) const {
      if constexpr (WS % R16 == 0) return lane / R16 + c * (WS / R16);
      return (lane + c * WS) / R16;
    }
    IK_DEVICE int copy_col(int c) const { return (WS % R16 == 0 ? lane % R16 : (lane + c * WS) % R16) * 8; }
    IK_DEVICE T* dest(T* tile_, int c) const { return tile_ + copy_row(c) * kLd + copy_col(c); }

    // The rows of step i: tile_row0(i) + copy_row(c), those below `end` valid.
    template <class TileRow0>
    IK_DEVICE void locate(const DecodeParams& p, Located& at, TileRow0& tile_row0, int i, int end) const {
      if constexpr (PAGED) {
#pragma unroll
        for (int c = 0; c < kCopies; ++c) {
          const int t = tile_row0(i) + copy_row(c);
          at.page[c] = copy_in_tile(c) && t < end ? bt_row[t >> p.page_size_log2] : 0;
        }
      }
    }
    IK_DEVICE void clamp_early(const DecodeParams& p, Located& at) const {
      if constexpr (PAGED) {
#pragma unroll
        for (int c = 0; c < kCopies; ++c) at.page[c] = clamp_page(p, at.page[c]);
      }
    }
    // The source of lane copy c of the tile from row t0.
    IK_DEVICE const T* key_source(const DecodeParams& p, const Located& at, int t0, int c) const {
      return source(p, at, kbase, k_next, p.k_sb, p.k_sh, p.k_st, t0, c);
    }
    IK_DEVICE const T* value_source(const DecodeParams& p, const Located& at, int t0, int c) const {
      return source(p, at, vbase, v_next, p.v_sb, p.v_sh, p.v_st, t0, c);
    }
    IK_DEVICE const T* source(const DecodeParams& p, const Located& at, const T* base, const T* next, long long sb,
                              long long sh, long long st, int t0, int c) const {
      const int r = copy_row(c), col = copy_col(c);
      if constexpr (PAGED) return base + paged_offset(p, at.page[c], sb, sh, st, hk, t0 + r) + col;
      if constexpr (kTileCursor) return next + r * st + col;
      return base + b * sb + hk * sh + static_cast<long long>(t0 + r) * st + col;
    }
    // Whether the tile from r0 may skip the row checks (every row below `end`).
    IK_DEVICE bool whole(int r0, int end) const { return kTileCursor && r0 + kTile <= end; }
    // After a step's tile copies: copies of its side values (none for dense).
    IK_DEVICE void copy_side(const DecodeParams&, const Located&, int, int, int) const {}
    IK_DEVICE void advance(const DecodeParams& p) {  // the cursor to the warp's next tile
      if constexpr (kTileCursor) {
        k_next += static_cast<long long>(kWarps * kTile) * p.k_st;
        v_next += static_cast<long long>(kWarps * kTile) * p.v_st;
      }
    }
    // A step's tiles kt, vt, once this lane's copies have landed (before the warp barrier that
    // shows them to the warp): dense zeroes the V rows of the early copy past `end` (a zero
    // weight times stale V could be NaN).
    IK_DEVICE void landed(T* kt, T* vt, int r0, int end, bool early) const {
      if (early) {
#pragma unroll
        for (int c = 0; c < kCopies; ++c) {
          if (copy_in_tile(c) && r0 + copy_row(c) >= end) ik::store16(dest(vt, c), make_uint4(0, 0, 0, 0));
        }
      }
    }
  };
};

}  // namespace decode
