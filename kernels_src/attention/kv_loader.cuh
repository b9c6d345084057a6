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
//     kWarpBytes: shared memory a warp holds besides its STAGES slots (0 for dense; MmaConfig).
//     landed may redirect the kernel's tile pointers (T*&) to tiles of its own.
// INT8 (Int8Loader; codes, a scale per token and head): Vector copies a row's 8 codes and the
// row's scale (kSlotBytes 8 + 4), key/value multiply; Matrix copies code tiles and scales into its
// slots and dequantizes in landed into one pair of T tiles per warp (kWarpBytes). KIVI INT4: K codes with a
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
    static constexpr int kWarpBytes = 0;  // nothing beside the ring slots
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

// The matrix kernel's copies of a quantized cache's code tiles (Int8Loader, KiviLoader): lane copy c
// of a tile moves one 16-byte chunk of codes, chunk (lane + c * WS) % R16 of row (lane + c * WS) / R16
// of the step's 16 rows (ROW_BYTES bytes of codes a row), from the row's page where paged. What a
// loader adds: its slots (tile, dest's side), its side values (copy_side) and landed.
template <class Code, int HEAD_DIM, int ROW_BYTES, bool PAGED>
struct CodeTileCopies {
  using Tiles = MatrixTiles<HEAD_DIM>;
  static constexpr int kTile = Tiles::kTile, kLd = Tiles::kLd, WS = ik::kWarpSize;
  static_assert(ROW_BYTES % 16 == 0, "a row of codes is whole 16-byte chunks");
  static constexpr int R16 = ROW_BYTES / 16;                   // 16-byte chunks of a row
  static constexpr int kCopies = (kTile * R16 + WS - 1) / WS;  // a lane's per tile and tensor
  static constexpr bool kTileCursor = false;
  struct Located {  // paged: the page ids of a step's copies
    int page[kCopies] = {};
  };

  const int b, hk, lane;
  const Code* kbase;  // also the in-bounds source of the zero-byte copies past the end
  const Code* vbase;
  const int* bt_row;

  IK_DEVICE CodeTileCopies(const DecodeParams& params, const SplitBlock& blk, int lane_)
      : b(blk.b), hk(blk.hk), lane(lane_),
        kbase(static_cast<const Code*>(params.k)), vbase(static_cast<const Code*>(params.v)),
        bt_row(PAGED ? params.block_table + blk.b * params.bt_sb : nullptr) {}

  IK_DEVICE bool copy_in_tile(int c) const { return (kTile * R16) % WS == 0 || lane + c * WS < kTile * R16; }
  IK_DEVICE int copy_row(int c) const {
    if constexpr (WS % R16 == 0) return lane / R16 + c * (WS / R16);
    return (lane + c * WS) / R16;
  }
  IK_DEVICE int copy_col(int c) const { return (WS % R16 == 0 ? lane % R16 : (lane + c * WS) % R16) * 16; }  // bytes
  template <class T>
  IK_DEVICE unsigned char* dest(T* side, int c) const {
    return reinterpret_cast<unsigned char*>(side) + copy_row(c) * ROW_BYTES + copy_col(c);
  }
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
  // Offset (elements) of row t0 + copy_row(c) in a tensor of these strides.
  IK_DEVICE long long offset(const DecodeParams& p, const Located& at, long long sb, long long sh, long long st,
                             int t0, int c) const {
    const int t = t0 + copy_row(c);
    if constexpr (PAGED) return paged_offset(p, at.page[c], sb, sh, st, hk, t);
    return b * sb + hk * sh + static_cast<long long>(t) * st;
  }
  IK_DEVICE const Code* key_source(const DecodeParams& p, const Located& at, int t0, int c) const {
    return kbase + offset(p, at, p.k_sb, p.k_sh, p.k_st, t0, c) + copy_col(c);
  }
  IK_DEVICE const Code* value_source(const DecodeParams& p, const Located& at, int t0, int c) const {
    return vbase + offset(p, at, p.v_sb, p.v_sh, p.v_st, t0, c) + copy_col(c);
  }
  IK_DEVICE bool whole(int, int) const { return false; }  // every copy checks its row
  IK_DEVICE void advance(const DecodeParams&) {}
};

// INT8 K/V, symmetric, one fp32 scale per token and KV head (ikport/kvcache.py quantizes: scale =
// amax / 127, code = round(x / scale) in [-127, 127]; a value is code * scale). Codes: p.k, p.v as
// int8 with the dense cache's shapes and strides (elements = bytes; rows 16-byte aligned). Scales:
// p.k_scale, p.v_scale, [B, Hkv, L] or [num_pages, Hkv, page_size] with strides p.ks_*, p.vs_*.
// fp32, not fp16: exact for every amax of fp16 and bf16 data (an fp16 scale overflows past
// amax 8.3e6 of bf16 data and goes subnormal below amax 7.8e-3), no conversion in the loop, and 4
// bytes against a row's head_dim of codes (head_dim 128: 132 bytes a token and head, 0.516x fp16).
// The codes are read once, straight into the ring, and dequantized in registers (Vector) or into
// the warp's T tiles (Matrix): never an fp16 copy of the cache in memory.
struct Int8Loader {
  using Code = signed char;
  // Code j (0-7) of 8 packed little-endian codes, times `s`.
  static IK_DEVICE float code(unsigned long long raw, int j, float s) {
    return ik::int8_to_float(static_cast<unsigned int>(raw >> (8 * j))) * s;
  }
  // 16 codes at `src` (shared memory) times `s` into 16 elements of T at `dst` (the matrix
  // kernels' dequantization: decode's Matrix and prefill's tiles).
  template <class T>
  static IK_DEVICE void dequant16(T* dst, const unsigned char* src, float s) {
    const uint4 raw = ik::load16(src);
    const unsigned long long lo = raw.x | (static_cast<unsigned long long>(raw.y) << 32);
    const unsigned long long hi = raw.z | (static_cast<unsigned long long>(raw.w) << 32);
    float f[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = code(lo, j, s);
    ik::store16(dst, ik::pack8<T>(f));
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = code(hi, j, s);
    ik::store16(dst + 8, ik::pack8<T>(f));
  }

  template <class T, int HEAD_DIM, bool PAGED, int THREADS, int UNROLL, int STAGES>
  struct Vector {
    using Lanes = VectorLanes<HEAD_DIM, THREADS>;
    static constexpr int kVec = Lanes::kVec, kGroups = Lanes::kGroups;
    static constexpr int kCodeBytes = kVec;  // a lane's 8 codes of a row: one 8-byte copy
    // + the row's scale: every lane of a row group copies it itself, so a thread still reads back
    // only its own slots (no barrier)
    static constexpr int kSlotBytes = kCodeBytes + 4;
    struct Keys {  // a step's K rows of this lane: codes and scales
      unsigned long long raw[UNROLL];
      float scale[UNROLL];
    };
    using Values = Keys;
    struct Located {  // as DenseLoader's (zeroed: host compilers warn where a contiguous cache never sets it)
      int page[UNROLL] = {};
    };

    const int b, hk;
    const bool lane_active;
    const Code* kbase;
    const Code* vbase;
    const float* ksbase;
    const float* vsbase;
    const int* bt_row;
    unsigned char* ring;

    IK_DEVICE Vector(const DecodeParams& params, const SplitBlock& blk, int d0, bool active, float* smem)
        : b(blk.b), hk(blk.hk), lane_active(active),
          kbase(static_cast<const Code*>(params.k) + d0), vbase(static_cast<const Code*>(params.v) + d0),
          ksbase(params.k_scale), vsbase(params.v_scale),
          bt_row(PAGED ? params.block_table + blk.b * params.bt_sb : nullptr),
          ring(reinterpret_cast<unsigned char*>(smem)) {}

    // Ring stage `stage`, row u, K (kv 0) or V (1): THREADS 8-byte code slots, then THREADS scales.
    IK_DEVICE unsigned char* region(int stage, int u, int kv) const {
      return ring + ((stage * UNROLL + u) * 2 + kv) * (THREADS * kSlotBytes);
    }
    IK_DEVICE unsigned long long* code_slot(int stage, int u, int kv) const {
      return reinterpret_cast<unsigned long long*>(region(stage, u, kv)) + threadIdx.x;
    }
    IK_DEVICE float* scale_slot(int stage, int u, int kv) const {
      return reinterpret_cast<float*>(region(stage, u, kv) + THREADS * kCodeBytes) + threadIdx.x;
    }
    IK_DEVICE void locate(const DecodeParams& p, Located& at, int t0, int end) const {
      if constexpr (PAGED) load_page_ids<UNROLL, kGroups>(p, bt_row, t0, end, lane_active, at.page);
    }
    IK_DEVICE void clamp_early(const DecodeParams& p, Located& at) const {
      if constexpr (PAGED) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) at.page[u] = clamp_page(p, at.page[u]);
      }
    }
    IK_DEVICE void copy(const DecodeParams& p, const Located& at, int stage, int t0, int end) const {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        int t = t0 + u * kGroups;
        bool valid = t < end && lane_active;
        long long ko = 0, vo = 0, kso = 0, vso = 0;
        if (valid && PAGED) {
          ko = paged_offset(p, at.page[u], p.k_sb, p.k_sh, p.k_st, hk, t);
          vo = paged_offset(p, at.page[u], p.v_sb, p.v_sh, p.v_st, hk, t);
          kso = paged_offset(p, at.page[u], p.ks_sb, p.ks_sh, p.ks_st, hk, t);
          vso = paged_offset(p, at.page[u], p.vs_sb, p.vs_sh, p.vs_st, hk, t);
        } else if (valid) {
          ko = row_offset<false>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t);
          vo = row_offset<false>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t);
          kso = row_offset<false>(p, bt_row, p.ks_sb, p.ks_sh, p.ks_st, b, hk, t);
          vso = row_offset<false>(p, bt_row, p.vs_sb, p.vs_sh, p.vs_st, b, hk, t);
        }
        ik::cp_async8_zfill(code_slot(stage, u, 0), kbase + ko, valid);
        ik::cp_async8_zfill(code_slot(stage, u, 1), vbase + vo, valid);
        ik::cp_async4_zfill(scale_slot(stage, u, 0), ksbase + kso, valid);
        ik::cp_async4_zfill(scale_slot(stage, u, 1), vsbase + vso, valid);
      }
    }
    // As DenseLoader's: the early copy's V rows past `end` are zeroed, codes and scale (a stale
    // scale may be NaN).
    IK_DEVICE void read(Keys& kr, Values& vr, int i, int t0, int end) const {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        kr.raw[u] = *code_slot(i % STAGES, u, 0);
        vr.raw[u] = *code_slot(i % STAGES, u, 1);
        kr.scale[u] = *scale_slot(i % STAGES, u, 0);
        vr.scale[u] = *scale_slot(i % STAGES, u, 1);
        if (STAGES > 0 && i == 0 && t0 + u * kGroups >= end) {
          vr.raw[u] = 0;
          vr.scale[u] = 0.f;
        }
      }
    }
    IK_DEVICE void load(const DecodeParams& p, Keys& kr, Values& vr, int t0, int end) const {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        int t = t0 + u * kGroups;
        kr.raw[u] = vr.raw[u] = 0;
        kr.scale[u] = vr.scale[u] = 0.f;
        if (t < end && lane_active) {
          kr.raw[u] = *reinterpret_cast<const unsigned long long*>(
              kbase + row_offset<PAGED>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t));
          vr.raw[u] = *reinterpret_cast<const unsigned long long*>(
              vbase + row_offset<PAGED>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t));
          kr.scale[u] = ksbase[row_offset<PAGED>(p, bt_row, p.ks_sb, p.ks_sh, p.ks_st, b, hk, t)];
          vr.scale[u] = vsbase[row_offset<PAGED>(p, bt_row, p.vs_sb, p.vs_sh, p.vs_st, b, hk, t)];
        }
      }
    }
    IK_DEVICE void key(const Keys& kr, int u, float (&f)[kVec]) const {
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = code(kr.raw[u], j, kr.scale[u]);
    }
    IK_DEVICE void value(const Values& vr, int u, float (&f)[kVec]) const {
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = code(vr.raw[u], j, vr.scale[u]);
    }
  };

  // Each lane copies 16-byte chunks (16 codes) of a step's K and V tiles into its slot, with the
  // scale of each chunk's row beside it (its own copy: landed reads only what this lane copied),
  // and in landed dequantizes exactly those chunks into the warp's one pair of T tiles, which the
  // kernel's fragment loads then read (the kernel's warp barrier after landed shows them to the
  // warp; the one at the top of its loop says every lane is done with the previous step's).
  template <class T, int HEAD_DIM, bool PAGED, int THREADS, int STAGES>
  struct Matrix : CodeTileCopies<Code, HEAD_DIM, HEAD_DIM, PAGED> {
    using Base = CodeTileCopies<Code, HEAD_DIM, HEAD_DIM, PAGED>;
    using Tiles = MatrixTiles<HEAD_DIM>;
    using typename Base::Located;
    using Base::kCopies, Base::kTile, Base::kLd, Base::WS, Base::lane, Base::copy_in_tile, Base::copy_row,
        Base::copy_col, Base::dest, Base::offset;
    static constexpr int kWarps = THREADS / WS;
    static constexpr int kCodeBytes = kTile * HEAD_DIM;          // a tensor's code tile (rows of HEAD_DIM)
    static constexpr int kScaleBytes = kCopies * WS * 4;         // a scale per lane copy
    static constexpr int kSideBytes = kCodeBytes + kScaleBytes;  // one tensor of a slot
    static constexpr int kSlotBytes = 2 * kSideBytes;            // a step's K and V
    static constexpr int kWarpBytes = 2 * Tiles::tile_elems() * sizeof(T);  // the dequantized K, V tiles

    unsigned char* wbase;  // the warp's shared memory: its T tiles, then its STAGES slots
    const float* ksbase;
    const float* vsbase;

    template <class TileRow0>
    IK_DEVICE Matrix(const DecodeParams& params, const SplitBlock& blk, int warp_, int lane_, float* smem, TileRow0)
        : Base(params, blk, lane_),
          wbase(reinterpret_cast<unsigned char*>(smem) + warp_ * (STAGES * kSlotBytes + kWarpBytes)),
          ksbase(params.k_scale), vsbase(params.v_scale) {}

    // The kernel's tile(stage, tensor): slot `stage`'s codes of K (0) or V (1), typed as the
    // kernel's T* (what the kernel hands to dest and landed); landed redirects it to dequantized().
    IK_DEVICE T* tile(int stage, int tensor) const {
      return reinterpret_cast<T*>(wbase + kWarpBytes + stage * kSlotBytes + tensor * kSideBytes);
    }
    IK_DEVICE T* dequantized(int tensor) const { return reinterpret_cast<T*>(wbase) + tensor * Tiles::tile_elems(); }
    IK_DEVICE float* scale_dest(T* side, int c) const {
      return reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(side) + kCodeBytes) + c * WS + lane;
    }
    // The scales of the rows this lane's chunks of step i belong to (zeros past `end`).
    IK_DEVICE void copy_side(const DecodeParams& p, const Located& at, int i, int r0, int end) const {
      if (r0 >= end) return;
      T* kd = tile(i % STAGES, 0);
      T* vd = tile(i % STAGES, 1);
#pragma unroll
      for (int c = 0; c < kCopies; ++c) {
        if (copy_in_tile(c)) {
          const bool valid = r0 + copy_row(c) < end;
          const float* ks = valid ? ksbase + offset(p, at, p.ks_sb, p.ks_sh, p.ks_st, r0, c) : ksbase;
          const float* vs = valid ? vsbase + offset(p, at, p.vs_sb, p.vs_sh, p.vs_st, r0, c) : vsbase;
          ik::cp_async4_zfill(scale_dest(kd, c), ks, valid);
          ik::cp_async4_zfill(scale_dest(vd, c), vs, valid);
        }
      }
    }
    // Step tiles kt, vt (this lane's copies have landed): this lane's chunks dequantized into the
    // warp's T tiles, which kt and vt then point to. The early copy's V rows past `end` become
    // zeros (a stale scale may be NaN).
    IK_DEVICE void landed(T*& kt, T*& vt, int r0, int end, bool early) const {
      T* kd = dequantized(0);
      T* vd = dequantized(1);
#pragma unroll
      for (int c = 0; c < kCopies; ++c) {
        if (copy_in_tile(c)) {
          const int at = copy_row(c) * kLd + copy_col(c);
          dequant16<T>(kd + at, dest(kt, c), *scale_dest(kt, c));
          if (early && r0 + copy_row(c) >= end) {
            ik::store16(vd + at, make_uint4(0, 0, 0, 0));
            ik::store16(vd + at + 8, make_uint4(0, 0, 0, 0));
          } else {
            dequant16<T>(vd + at, dest(vt, c), *scale_dest(vt, c));
          }
        }
      }
      kt = kd;
      vt = vd;
    }
  };
};

// KIVI INT4 K/V (Liu et al. 2024; ikport.kvquant, kv_format "kivi4"): asymmetric 4-bit codes, two a
// byte (channel 2i in the low nibble of byte i), a value is zero + code * scale with (scale, zero)
// a pair of T in one 4-byte word (low half the scale). K: per channel over groups of G rows (keys
// carry persistent per-channel outliers), pairs [B, Hkv, groups, D] per sequence, paged or not;
// the rows at or past qlen = kv_len rounded down to G come from the full-precision residual
// (p.k_resid, row t at t % G). V: per row, one pair per token and head. The planner starts every
// split at a multiple of G, and a vector step's rows (kGroups * UNROLL) are at most G, so a step
// (and a matrix tile of 16 rows) lies in one group: one set of K pairs a step, and a step is all
// codes or all residual. The early copy is issued before kv_len is known: it takes codes, and where
// its step turns out residual (a split starting in the last partial group) read / landed load the
// residual rows themselves.
template <int G>
struct KiviLoader {
  static_assert(G == 32 || G == 64 || G == 128, "KIVI groups of 32, 64 or 128 rows");
  using Pair = unsigned int;  // (scale, zero) of T
  static IK_DEVICE float nibble(unsigned int w, int j) { return static_cast<float>((w >> (4 * j)) & 15u); }
  // Rows below this read codes; rows from it to kv_len, the residual.
  static IK_DEVICE int quantized_len(const DecodeParams& p, int b) { return kv_len_of(p, b) & ~(G - 1); }
  // 32 codes at `src` (shared memory; channels ch0..ch0+31) into 32 elements of T at `dst`: K with
  // each channel's pair from `pairs` (per_channel), V with the row's one pair `row_pair` (the matrix
  // kernels' dequantization: decode's Matrix and prefill's tiles).
  template <class T, bool PER_CHANNEL>
  static IK_DEVICE void dequant32(T* dst, const unsigned char* src, const Pair* pairs, Pair row_pair) {
    const uint4 raw = ik::load16(src);
    const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
    const float2 row = ik::dtype<T>::unpack2(row_pair);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      float f[8];
      if constexpr (PER_CHANNEL) {
        const uint4 lo = ik::load16(pairs + 8 * w), hi = ik::load16(pairs + 8 * w + 4);
        const unsigned int pw[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 sz = ik::dtype<T>::unpack2(pw[j]);
          f[j] = sz.y + nibble(words[w], j) * sz.x;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = row.y + nibble(words[w], j) * row.x;
      }
      ik::store16(dst + 8 * w, ik::pack8<T>(f));
    }
  }

  template <class T, int HEAD_DIM, bool PAGED, int THREADS, int UNROLL, int STAGES>
  struct Vector {
    using Lanes = VectorLanes<HEAD_DIM, THREADS>;
    static constexpr int kVec = Lanes::kVec, kGroups = Lanes::kGroups;
    static_assert(kGroups * UNROLL <= G, "a step's rows lie in one group of G (plan.decode.kivi_tiles)");
    // A lane's ring bytes per stage. K, in 16-byte cells of this lane's own (THREADS-strided, so that a
    // cell one lane reuses is never another lane's): the step's pairs of its 8 channels (cells 0, 1)
    // and a row's 8 codes (4 bytes) per row (from cell 2), or on a residual step a row's 8 values of T
    // per row (cells 0 ..), in the same cells; V: a row's codes (4) and pair (4). Each lane reads
    // back only its own copies (no barrier).
    static constexpr int kCodeCells = (UNROLL + 3) / 4;
    static constexpr int kKCells = UNROLL > 2 + kCodeCells ? UNROLL : 2 + kCodeCells;
    static constexpr int kKBytes = 16 * kKCells;
    static constexpr int kStageBytes = kKBytes + UNROLL * 8;
    static_assert(kStageBytes % (2 * UNROLL) == 0, "whole bytes per row and tensor");
    static constexpr int kSlotBytes = kStageBytes / (2 * UNROLL);  // per row and tensor, as SplitConfig counts
    struct Keys {
      uint4 raw[UNROLL];              // codes in .x, or (a residual step) the row's 8 values
      float scale[kVec], zero[kVec];  // the step's group, this lane's channels
      bool resid;
    };
    struct Values {
      unsigned int code[UNROLL];
      float scale[UNROLL], zero[UNROLL];
    };
    struct Located {
      int page[UNROLL] = {};
      bool early = false;  // the early copy (clamp_early): codes, whatever kv_len turns out to be
    };

    const int b, hk, qlen;
    const bool lane_active;
    const long long rst;  // p.kr_st
    const unsigned char* kbase;
    const unsigned char* vbase;
    const Pair* ksbase;  // the sequence's and head's K pairs of group 0, this lane's channels
    const Pair* vsbase;
    const T* rbase;  // the sequence's and head's residual row 0, this lane's channels
    const int* bt_row;
    unsigned char* ring;

    IK_DEVICE Vector(const DecodeParams& params, const SplitBlock& blk, int d0, bool active, float* smem)
        : b(blk.b), hk(blk.hk), qlen(quantized_len(params, blk.b)), lane_active(active), rst(params.kr_st),
          kbase(static_cast<const unsigned char*>(params.k) + d0 / 2),
          vbase(static_cast<const unsigned char*>(params.v) + d0 / 2),
          ksbase(reinterpret_cast<const Pair*>(params.k_scale) + blk.b * params.ks_sb + blk.hk * params.ks_sh + d0),
          vsbase(reinterpret_cast<const Pair*>(params.v_scale)),
          rbase(static_cast<const T*>(params.k_resid) + blk.b * params.kr_sb + blk.hk * params.kr_sh + d0),
          bt_row(PAGED ? params.block_table + blk.b * params.bt_sb : nullptr),
          ring(reinterpret_cast<unsigned char*>(smem)) {}

    // Ring stage `stage`: [K: kKCells x THREADS cells][V: UNROLL x 2 x THREADS words].
    IK_DEVICE unsigned char* k_area(int stage) const { return ring + stage * THREADS * kStageBytes; }
    IK_DEVICE uint4* k_cell(int stage, int cell) const {
      return reinterpret_cast<uint4*>(k_area(stage)) + cell * THREADS + threadIdx.x;
    }
    IK_DEVICE uint4* k_resid(int stage, int u) const { return k_cell(stage, u); }
    IK_DEVICE uint4* k_pairs(int stage, int half) const { return k_cell(stage, half); }
    IK_DEVICE unsigned int* k_code(int stage, int u) const {
      return reinterpret_cast<unsigned int*>(k_cell(stage, 2 + u / 4)) + u % 4;
    }
    IK_DEVICE unsigned int* v_code(int stage, int u) const {
      return reinterpret_cast<unsigned int*>(k_area(stage) + THREADS * kKBytes) + u * THREADS + threadIdx.x;
    }
    IK_DEVICE unsigned int* v_pair(int stage, int u) const { return v_code(stage, u) + UNROLL * THREADS; }

    IK_DEVICE void locate(const DecodeParams& p, Located& at, int t0, int end) const {
      if constexpr (PAGED) load_page_ids<UNROLL, kGroups>(p, bt_row, t0, end, lane_active, at.page);
      at.early = false;
    }
    IK_DEVICE void clamp_early(const DecodeParams& p, Located& at) const {
      if constexpr (PAGED) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) at.page[u] = clamp_page(p, at.page[u]);
      }
      at.early = true;
    }
    IK_DEVICE void copy(const DecodeParams& p, const Located& at, int stage, int t0, int end) const {
      const bool resid = !at.early && t0 >= qlen;  // the same for every row of the step
      if (!resid) {
        const bool valid = t0 < end && lane_active;
        const Pair* src = valid ? ksbase + (t0 / G) * p.ks_st : reinterpret_cast<const Pair*>(p.k_scale);
        ik::cp_async16_zfill(k_pairs(stage, 0), src, valid);
        ik::cp_async16_zfill(k_pairs(stage, 1), src + 4, valid);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int t = t0 + u * kGroups;
        const bool valid = t < end && lane_active;
        long long ko = 0, vo = 0, vso = 0;
        if (valid && PAGED) {
          ko = paged_offset(p, at.page[u], p.k_sb, p.k_sh, p.k_st, hk, t);
          vo = paged_offset(p, at.page[u], p.v_sb, p.v_sh, p.v_st, hk, t);
          vso = paged_offset(p, at.page[u], p.vs_sb, p.vs_sh, p.vs_st, hk, t);
        } else if (valid) {
          ko = row_offset<false>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t);
          vo = row_offset<false>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t);
          vso = row_offset<false>(p, bt_row, p.vs_sb, p.vs_sh, p.vs_st, b, hk, t);
        }
        if (resid) {
          ik::cp_async16_zfill(k_resid(stage, u), valid ? rbase + (t & (G - 1)) * rst : rbase, valid);
        } else {
          ik::cp_async4_zfill(k_code(stage, u), kbase + ko, valid);
        }
        ik::cp_async4_zfill(v_code(stage, u), vbase + vo, valid);
        ik::cp_async4_zfill(v_pair(stage, u), vsbase + vso, valid);
      }
    }
    // The step's K pairs (two 16-byte words: 8 channels) into the lane's scales and zeros.
    static IK_DEVICE void unpack_pairs(Keys& kr, uint4 lo, uint4 hi) {
      const unsigned int w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float2 sz = ik::dtype<T>::unpack2(w[j]);
        kr.scale[j] = sz.x;
        kr.zero[j] = sz.y;
      }
    }
    static IK_DEVICE void unpack_value(Values& vr, int u, unsigned int code, unsigned int pair) {
      const float2 sz = ik::dtype<T>::unpack2(pair);
      vr.code[u] = code;
      vr.scale[u] = sz.x;
      vr.zero[u] = sz.y;
    }
    // A residual row straight from memory (the early copy took codes).
    IK_DEVICE uint4 residual_row(int t) const {
      return lane_active ? ik::load16(rbase + (t & (G - 1)) * rst) : make_uint4(0, 0, 0, 0);
    }
    // As Int8Loader's: the early copy's V rows past `end` read as zeros (a stale pair may be NaN).
    IK_DEVICE void read(Keys& kr, Values& vr, int i, int t0, int end) const {
      const int s = i % (STAGES > 0 ? STAGES : 1);
      kr.resid = t0 >= qlen;
      if (kr.resid) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) kr.raw[u] = i == 0 ? residual_row(t0 + u * kGroups) : *k_resid(s, u);
        unpack_pairs(kr, make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0));
      } else {
#pragma unroll
        for (int c = 0; c < kCodeCells; ++c) {  // a cell holds 4 rows' codes: one 16-byte read
          const uint4 cell = *k_cell(s, 2 + c);
          const unsigned int w[4] = {cell.x, cell.y, cell.z, cell.w};
#pragma unroll
          for (int u = 4 * c; u < UNROLL && u < 4 * c + 4; ++u) kr.raw[u] = make_uint4(w[u % 4], 0, 0, 0);
        }
        unpack_pairs(kr, *k_pairs(s, 0), *k_pairs(s, 1));
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const bool stale = i == 0 && t0 + u * kGroups >= end;
        unpack_value(vr, u, stale ? 0u : *v_code(s, u), stale ? 0u : *v_pair(s, u));
      }
    }
    // STAGES == 0: a step's rows straight from memory into registers.
    IK_DEVICE void load(const DecodeParams& p, Keys& kr, Values& vr, int t0, int end) const {
      kr.resid = t0 >= qlen;
      const bool any = t0 < end && lane_active;
      if (!kr.resid && any) {
        const Pair* src = ksbase + (t0 / G) * p.ks_st;
        unpack_pairs(kr, ik::load16(src), ik::load16(src + 4));
      } else {
        unpack_pairs(kr, make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0));
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {  // issue every load of the step before using any
        const int t = t0 + u * kGroups;
        kr.raw[u] = make_uint4(0, 0, 0, 0);
        unpack_value(vr, u, 0u, 0u);
        if (t < end && lane_active) {
          if (kr.resid) {
            kr.raw[u] = ik::load16(rbase + (t & (G - 1)) * rst);
          } else {
            kr.raw[u].x = *reinterpret_cast<const unsigned int*>(
                kbase + row_offset<PAGED>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t));
          }
          unpack_value(vr, u, *reinterpret_cast<const unsigned int*>(
                                  vbase + row_offset<PAGED>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t)),
                       vsbase[row_offset<PAGED>(p, bt_row, p.vs_sb, p.vs_sh, p.vs_st, b, hk, t)]);
        }
      }
    }
    IK_DEVICE void key(const Keys& kr, int u, float (&f)[kVec]) const {
      if (kr.resid) {
        ik::unpack8<T>(kr.raw[u], f);
        return;
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = kr.zero[j] + nibble(kr.raw[u].x, j) * kr.scale[j];
    }
    IK_DEVICE void value(const Values& vr, int u, float (&f)[kVec]) const {
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = vr.zero[u] + nibble(vr.code[u], j) * vr.scale[u];
    }
  };

  // The code tiles as Int8Loader's (16-byte chunks: 32 codes), the V pair of each chunk's row beside
  // them (this lane's own copy); per step either K's pairs of the tile's group (D x 4 bytes, copied
  // by the whole warp: landed waits for the warp before reading them) or, for a residual tile, the
  // 16 K rows of T (rows of kLd, read by the fragment loads where they landed). landed dequantizes
  // this lane's chunks into the warp's one pair of T tiles, as Int8Loader's.
  template <class T, int HEAD_DIM, bool PAGED, int THREADS, int STAGES>
  struct Matrix : CodeTileCopies<unsigned char, HEAD_DIM, HEAD_DIM / 2, PAGED> {
    static_assert(HEAD_DIM % 32 == 0, "KIVI rows of codes in whole 16-byte chunks: head_dim a multiple of 32");
    using Base = CodeTileCopies<unsigned char, HEAD_DIM, HEAD_DIM / 2, PAGED>;
    using Tiles = MatrixTiles<HEAD_DIM>;
    using Base::kCopies, Base::kTile, Base::kLd, Base::WS, Base::lane, Base::copy_in_tile, Base::copy_row,
        Base::copy_col, Base::dest, Base::offset;
    static constexpr int kWarps = THREADS / WS;
    static constexpr int kCodeBytes = kTile * HEAD_DIM / 2;              // a tensor's code tile
    static constexpr int kKPairBytes = HEAD_DIM * 4;                     // K's pairs of the tile's group
    static constexpr int kResidBytes = Tiles::tile_elems() * sizeof(T);  // a residual K tile
    static constexpr int kKSideBytes = kCodeBytes + kKPairBytes + kResidBytes;
    static constexpr int kVSideBytes = kCodeBytes + kCopies * WS * 4;    // + a pair per lane copy
    static constexpr int kSlotBytes = kKSideBytes + kVSideBytes;
    static constexpr int kWarpBytes = 2 * Tiles::tile_elems() * sizeof(T);  // the dequantized K, V tiles
    static constexpr int kRowChunks = HEAD_DIM / 8;  // 16-byte chunks of a row of T
    struct Located : Base::Located {
      bool early = false;  // the early copy: K pairs, whatever kv_len turns out to be
    };

    unsigned char* wbase;  // the warp's shared memory: its T tiles, then its STAGES slots
    const int qlen;
    const long long rst;  // p.kr_st
    const Pair* ksbase;   // the sequence's and head's K pairs of group 0
    const Pair* vsbase;
    const T* rbase;  // the sequence's and head's residual row 0

    template <class TileRow0>
    IK_DEVICE Matrix(const DecodeParams& params, const SplitBlock& blk, int warp_, int lane_, float* smem, TileRow0)
        : Base(params, blk, lane_),
          wbase(reinterpret_cast<unsigned char*>(smem) + warp_ * (STAGES * kSlotBytes + kWarpBytes)),
          qlen(quantized_len(params, blk.b)), rst(params.kr_st),
          ksbase(reinterpret_cast<const Pair*>(params.k_scale) + blk.b * params.ks_sb + blk.hk * params.ks_sh),
          vsbase(reinterpret_cast<const Pair*>(params.v_scale)),
          rbase(static_cast<const T*>(params.k_resid) + blk.b * params.kr_sb + blk.hk * params.kr_sh) {}

    IK_DEVICE T* tile(int stage, int tensor) const {
      return reinterpret_cast<T*>(wbase + kWarpBytes + stage * kSlotBytes + (tensor ? kKSideBytes : 0));
    }
    IK_DEVICE T* dequantized(int tensor) const { return reinterpret_cast<T*>(wbase) + tensor * Tiles::tile_elems(); }
    IK_DEVICE Pair* k_pairs(T* kside) const {
      return reinterpret_cast<Pair*>(reinterpret_cast<unsigned char*>(kside) + kCodeBytes);
    }
    IK_DEVICE T* resid_tile(T* kside) const {
      return reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(kside) + kCodeBytes + kKPairBytes);
    }
    IK_DEVICE Pair* v_pair(T* vside, int c) const {
      return reinterpret_cast<Pair*>(reinterpret_cast<unsigned char*>(vside) + kCodeBytes) + c * WS + lane;
    }
    template <class TileRow0>
    IK_DEVICE void locate(const DecodeParams& p, Located& at, TileRow0& tile_row0, int i, int end) const {
      Base::locate(p, at, tile_row0, i, end);
      at.early = false;
    }
    IK_DEVICE void clamp_early(const DecodeParams& p, Located& at) const {
      Base::clamp_early(p, at);
      at.early = true;
    }
    IK_DEVICE void copy_side(const DecodeParams& p, const Located& at, int i, int r0, int end) const {
      if (r0 >= end) return;
      T* kd = tile(i % STAGES, 0);
      T* vd = tile(i % STAGES, 1);
#pragma unroll
      for (int c = 0; c < kCopies; ++c) {
        if (copy_in_tile(c)) {
          const bool valid = r0 + copy_row(c) < end;
          const Pair* vs = valid ? vsbase + offset(p, at, p.vs_sb, p.vs_sh, p.vs_st, r0, c) : vsbase;
          ik::cp_async4_zfill(v_pair(vd, c), vs, valid);
        }
      }
      if (!at.early && r0 >= qlen) {  // a residual tile: its rows of T (zeros past `end`)
        constexpr int kChunks = kTile * kRowChunks;
#pragma unroll
        for (int c = 0; c < (kChunks + WS - 1) / WS; ++c) {
          const int idx = lane + c * WS, r = idx / kRowChunks, col = idx % kRowChunks * 8;
          if (kChunks % WS == 0 || idx < kChunks) {
            ik::cp_async16_zfill(resid_tile(kd) + r * kLd + col, rbase + ((r0 + r) & (G - 1)) * rst + col,
                                 r0 + r < end);
          }
        }
      } else {  // K's pairs of the tile's group, 4 a chunk
        constexpr int kChunks = HEAD_DIM / 4;
        const Pair* src = ksbase + (r0 / G) * p.ks_st;
#pragma unroll
        for (int c = 0; c < (kChunks + WS - 1) / WS; ++c) {
          const int idx = lane + c * WS;
          if (kChunks % WS == 0 || idx < kChunks) ik::cp_async16(k_pairs(kd) + idx * 4, src + idx * 4);
        }
      }
    }
    IK_DEVICE void landed(T*& kt, T*& vt, int r0, int end, bool early) const {
      T* kd = dequantized(0);
      T* vd = dequantized(1);
      T* k_tile = kd;
      if (r0 >= qlen && early) {  // the early copy took codes: the residual rows straight from memory
        constexpr int kChunks = kTile * kRowChunks;
#pragma unroll
        for (int c = 0; c < (kChunks + WS - 1) / WS; ++c) {
          const int idx = lane + c * WS, r = idx / kRowChunks, col = idx % kRowChunks * 8;
          if (kChunks % WS == 0 || idx < kChunks) {
            ik::store16(kd + r * kLd + col, ik::load16(rbase + ((r0 + r) & (G - 1)) * rst + col));
          }
        }
      } else if (r0 >= qlen) {
        k_tile = resid_tile(kt);
      } else {
        ik::warp_sync();  // K's pairs were copied by the whole warp (warp-uniform branch)
#pragma unroll
        for (int c = 0; c < kCopies; ++c) {
          if (copy_in_tile(c)) {
            const int ch0 = copy_col(c) * 2;
            dequant32<T, true>(kd + copy_row(c) * kLd + ch0, dest(kt, c), k_pairs(kt) + ch0, 0u);
          }
        }
      }
#pragma unroll
      for (int c = 0; c < kCopies; ++c) {
        if (copy_in_tile(c)) {
          const int at = copy_row(c) * kLd + copy_col(c) * 2;
          if (early && r0 + copy_row(c) >= end) {  // (a stale pair may be NaN)
#pragma unroll
            for (int w = 0; w < 4; ++w) ik::store16(vd + at + 8 * w, make_uint4(0, 0, 0, 0));
          } else {
            dequant32<T, false>(vd + at, dest(vt, c), nullptr, *v_pair(vt, c));
          }
        }
      }
      kt = k_tile;
      vt = vd;
    }
  };
};

}  // namespace decode
