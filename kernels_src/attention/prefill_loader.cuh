// prefill_loader.cuh -- the prefill kernel's K/V tiles per KV loader (the manifest's `loader`, the
// decode family's loader types of kv_loader.cuh, whose formats and dequantization this reuses).
// Included by prefill.cuh after PrefillParams and prefill::Sequence.
//
// prefill::KVTiles<LOADER, T, HEAD_DIM, TILE_N, THREADS, STAGES, PAGED, PAD> is what attn_prefill asks
// of a format, the kernel's ring `ring` (STAGES slots, then the loader's own tiles) passed in:
// kSlotBytes, one slot (a K/V tile as copied); kTileBytes, shared memory after the slots (the T
// tiles a compressed format dequantizes into; dense: the page ids of two tiles); Located and
// locate(p, j, ring, at), the page ids of tile j (paged; loaded a tile ahead, into registers, or
// with kSharedPageIds into shared memory, where the kernel's barriers make them every thread's
// before copy reads them); copy(p, j, ring, at), tile j's async copies into
// slot j % STAGES (rows past kv_end zero-filled); land(ring, j), called by the whole block once
// the slot has landed and the block has synchronized; k_tile(ring, j), the K tile of rows of LD
// elements the fragment loads then read, the V tile right after it (TILE_N rows on).
//
// Compressed formats (INT8, KIVI INT4): the slot holds the tile's compressed bytes only (codes,
// scales or pairs), copied from global memory once; land dequantizes them shared -> shared into
// one pair of T tiles and synchronizes the block (a second barrier per tile; the ring keeps the
// next tiles' copies in flight meanwhile). Never an fp16 copy of the cache in global memory.
// Alternatives, not taken (nothing is measured on a CPU): a pair of T tiles per ring slot, each
// thread dequantizing the chunks it copied itself before the kernel's barrier (no second barrier,
// STAGES times the T tiles' shared memory: past AMD's 64 KB at the default tiles); or
// dequantizing straight from the staged codes into the fragments (no T tiles; the fragment
// layouts of three matrix units to write per format).
#pragma once
#include "kv_loader.cuh"

namespace prefill {

template <class LOADER, class T, int HEAD_DIM, int TILE_N, int THREADS, int STAGES, bool PAGED, bool PAD>
struct KVTiles;  // one specialization per loader below

// fp16/bf16 K/V as the query's dtype: the slot is the tiles the fragment loads read.
template <class T, int HEAD_DIM, int TILE_N, int THREADS, int STAGES, bool PAGED, bool PAD>
struct KVTiles<decode::DenseLoader, T, HEAD_DIM, TILE_N, THREADS, STAGES, PAGED, PAD> {
  static constexpr int LD = HEAD_DIM + (PAD ? 8 : 0), CH = HEAD_DIM / 8;  // CH: 16-byte chunks of a row
  static constexpr int kSlotBytes = 2 * TILE_N * LD * 2;  // one K tile and one V tile
  static constexpr int kTileBytes = (2 * TILE_N * 4 + 15) / 16 * 16;  // page ids (paged or not: one size)
  static constexpr int kCopies = (TILE_N * CH + THREADS - 1) / THREADS;  // 16-byte copies a thread per tensor
  // Where a row's chunks divide the block, a thread's copies keep one 16-byte column of the rows,
  // kRowStep rows apart, and the tile's rows divide into whole steps.
  static constexpr bool kUniformColumn = THREADS % CH == 0 && TILE_N * CH % THREADS == 0;
  static constexpr int kRowStep = kUniformColumn ? THREADS / CH : 1;

  const T* kg;  // the sequence's (unpaged) and head's row 0
  const T* vg;
  const int* bt_row;
  const int page_mask, n_tiles, kv_end;

  IK_DEVICE KVTiles(const PrefillParams& p, const Sequence& seq, int b, int hk, int n_tiles_, int kv_end_)
      : kg(static_cast<const T*>(p.k) + (PAGED ? 0 : seq.k_off) + hk * p.k_sh),
        vg(static_cast<const T*>(p.v) + (PAGED ? 0 : seq.v_off) + hk * p.v_sh),
        bt_row(PAGED ? p.block_table + b * p.bt_sb : nullptr), page_mask((1 << p.page_size_log2) - 1),
        n_tiles(n_tiles_), kv_end(kv_end_) {}

  // Paged: the page ids of a tile's copies, loaded a tile ahead (right after the previous copies
  // are issued) so that no copy waits on its block-table read. Few copies a thread: the ids of its
  // copies in registers. Eight or more (64-key tiles of head_dim 128 at 4 warps): those stayed live
  // across a tile's math and spilled (244 bytes on sm_90), so each row's id goes to shared memory
  // instead, two tiles' worth, tile j's at (j % 2) * TILE_N (docs/results/prefill.md, session 18).
  static constexpr bool kSharedPageIds = PAGED && kUniformColumn && kCopies >= 8;
  // (A variable of the kernel's, passed in: as a member of this struct it changed the dense
  // kernel's generated code.)
  struct Located {
    int page[PAGED && !kSharedPageIds ? kCopies : 1];
  };
  IK_DEVICE static int* page_ids(T* ring, int j) {
    return reinterpret_cast<int*>(ring + STAGES * (kSlotBytes / 2)) + (j & 1) * TILE_N;
  }
  IK_DEVICE void locate(const PrefillParams& p, int j, T* ring, Located& at) const {
    if constexpr (kSharedPageIds) {
      int* ids = page_ids(ring, j);
      for (int r = threadIdx.x; r < TILE_N; r += THREADS) {
        const int t = j * TILE_N + r;
        ids[r] = j < n_tiles && t < kv_end ? bt_row[t >> p.page_size_log2] : 0;
      }
    } else if constexpr (PAGED) {
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const int t = j * TILE_N + (threadIdx.x + i * THREADS) / CH;
        at.page[i] = j < n_tiles && t < kv_end ? bt_row[t >> p.page_size_log2] : 0;
      }
    }
  }
  // K/V tile j into its slot, the K tile then the V tile (rows past kv_end zero: P V then adds
  // nothing there). (The slot's address is written out here and in k_tile: through a shared
  // helper it changed NVIDIA's generated code.)
  IK_DEVICE void copy(const PrefillParams& p, int j, T* ring, const Located& at) const {
    T* kd = ring + (j % STAGES) * (2 * TILE_N * LD);
    T* vd = kd + TILE_N * LD;
    if constexpr (kSharedPageIds) {
      // As below, each row's source from its page id (shared memory) and its row in the page.
      const int r0 = threadIdx.x / CH, ch = threadIdx.x % CH;
      const int left = kv_end - (j * TILE_N + r0);
      const int* ids = page_ids(ring, j) + r0;
      const int t0 = j * TILE_N + r0;
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const bool valid = i * kRowStep < left;
        const long long page = ids[i * kRowStep], off = (t0 + i * kRowStep) & page_mask;
        T* dst = kd + (r0 + i * kRowStep) * LD + ch * 8;
        ik::cp_async16_zfill(dst, valid ? kg + page * p.k_sb + off * p.k_st + ch * 8 : kg, valid);
        ik::cp_async16_zfill(dst + TILE_N * LD, valid ? vg + page * p.v_sb + off * p.v_st + ch * 8 : vg, valid);
      }
    } else if constexpr (kUniformColumn && !PAGED) {
      // Copy i of a thread is row r0 + i * kRowStep of the tile, so its source is the previous
      // copy's plus one stride and its bound a compare with a constant (per-copy offsets and
      // bounds hoisted out of the loop held 3 x kCopies registers and spilled 128-row tiles).
      const int r0 = threadIdx.x / CH, ch = threadIdx.x % CH;
      const int left = kv_end - (j * TILE_N + r0);  // copy i is valid while i * kRowStep < left
      const T* ks = kg + static_cast<long long>(j * TILE_N + r0) * p.k_st + ch * 8;
      const T* vs = vg + static_cast<long long>(j * TILE_N + r0) * p.v_st + ch * 8;
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const bool valid = i * kRowStep < left;
        T* dst = kd + (r0 + i * kRowStep) * LD + ch * 8;
        ik::cp_async16_zfill(dst, valid ? ks : kg, valid);
        ik::cp_async16_zfill(dst + TILE_N * LD, valid ? vs : vg, valid);
        ks += kRowStep * p.k_st;
        vs += kRowStep * p.v_st;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        if (TILE_N * CH % THREADS == 0 || idx < TILE_N * CH) {
          const int r = idx / CH, ch = idx % CH, t = j * TILE_N + r;
          const bool valid = t < kv_end;
          long long ko = 0, vo = 0;
          if (valid) {
            if constexpr (PAGED) {
              const long long off = t & page_mask;
              ko = at.page[i] * p.k_sb + off * p.k_st;
              vo = at.page[i] * p.v_sb + off * p.v_st;
            } else {
              ko = t * p.k_st;
              vo = t * p.v_st;
            }
          }
          ik::cp_async16_zfill(kd + r * LD + ch * 8, kg + ko + ch * 8, valid);
          ik::cp_async16_zfill(vd + r * LD + ch * 8, vg + vo + ch * 8, valid);
        }
      }
    }
  }
  IK_DEVICE void land(T*, int) const {}  // the slot is the tiles
  IK_DEVICE const T* k_tile(T* ring, int j) const { return ring + (j % STAGES) * (2 * TILE_N * LD); }
};

// A quantized cache's code tiles (Int8Loader, KiviLoader): per tensor TILE_N rows of ROW_BYTES
// bytes of codes in 16-byte chunks, copy i of a thread chunk threadIdx.x + i * THREADS (row
// idx / R16), and one 4-byte word per row (a scale, a pair: V's always, K's where K_WORDS),
// copied by the thread that copies the row's first chunk, from that chunk's page where paged.
// A slot's tensor side: [codes: TILE_N x ROW_BYTES][words: TILE_N x 4] (KIVI's K side: pairs
// after its codes instead). Sources: the sequence's and head's row 0 ([B, Hkv, L, ...]) or the
// head's (paged, [pages, Hkv, page_size, ...]); word strides in words. The loader's T tiles, one
// K and one V tile of rows of LD, follow the STAGES slots.
template <class T, int HEAD_DIM, int ROW_BYTES, int TILE_N, int THREADS, int STAGES, bool PAGED, bool PAD,
          bool K_WORDS>
struct CodeTiles {
  static_assert(ROW_BYTES % 16 == 0, "a row of codes is whole 16-byte chunks");
  static constexpr int LD = HEAD_DIM + (PAD ? 8 : 0);
  static constexpr int R16 = ROW_BYTES / 16;
  static constexpr int kChunks = TILE_N * R16;                       // per tensor
  static constexpr int kCopies = (kChunks + THREADS - 1) / THREADS;  // a thread's per tensor
  static constexpr int kCodeBytes = TILE_N * ROW_BYTES;
  static constexpr int kSideBytes = kCodeBytes + TILE_N * 4;  // codes and a word per row
  static constexpr int kTileBytes = 2 * TILE_N * LD * sizeof(T);  // the dequantized K and V tiles
  struct Located {  // as the dense tiles'
    int page[PAGED ? kCopies : 1];
  };

  const unsigned char* kc;
  const unsigned char* vc;
  const unsigned int* kw;  // (unused without K_WORDS)
  const unsigned int* vw;
  const int* bt_row;
  const int n_tiles, kv_end;

  IK_DEVICE CodeTiles(const PrefillParams& p, int b, int hk, int n_tiles_, int kv_end_)
      : kc(static_cast<const unsigned char*>(p.k) + (PAGED ? 0 : b * p.k_sb) + hk * p.k_sh),
        vc(static_cast<const unsigned char*>(p.v) + (PAGED ? 0 : b * p.v_sb) + hk * p.v_sh),
        kw(K_WORDS ? static_cast<const unsigned int*>(p.k_scale) + (PAGED ? 0 : b * p.ks_sb) + hk * p.ks_sh
                   : nullptr),  // (KIVI's K pairs are per sequence and group: its own ksbase)
        vw(static_cast<const unsigned int*>(p.v_scale) + (PAGED ? 0 : b * p.vs_sb) + hk * p.vs_sh),
        bt_row(PAGED ? p.block_table + b * p.bt_sb : nullptr), n_tiles(n_tiles_), kv_end(kv_end_) {}

  IK_DEVICE bool in_tile(int i) const { return kChunks % THREADS == 0 || threadIdx.x + i * THREADS < kChunks; }
  IK_DEVICE int row(int i) const { return (threadIdx.x + i * THREADS) / R16; }
  IK_DEVICE int col(int i) const { return (threadIdx.x + i * THREADS) % R16 * 16; }  // bytes
  // Slot j % STAGES, as bytes; the T tiles after the slots.
  template <int SLOT_BYTES>
  static IK_DEVICE unsigned char* slot(T* ring, int j) {
    return reinterpret_cast<unsigned char*>(ring) + (j % STAGES) * SLOT_BYTES;
  }
  template <int SLOT_BYTES>
  static IK_DEVICE T* tiles(T* ring) { return ring + STAGES * SLOT_BYTES / static_cast<int>(sizeof(T)); }

  static constexpr bool kSharedPageIds = false;  // a thread's page ids, in registers
  IK_DEVICE void locate(const PrefillParams& p, int j, T*, Located& at) const {
    if constexpr (PAGED) {
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const int t = j * TILE_N + row(i);
        at.page[i] = j < n_tiles && in_tile(i) && t < kv_end ? bt_row[t >> p.page_size_log2] : 0;
      }
    }
  }
  // Offset of row t, copy i's, in a tensor of sequence (paged: page) stride sb and row stride st.
  IK_DEVICE long long offset(const PrefillParams& p, const Located& at, int i, long long sb, long long st,
                             int t) const {
    if constexpr (PAGED) return at.page[i] * sb + static_cast<long long>(t & ((1 << p.page_size_log2) - 1)) * st;
    return static_cast<long long>(t) * st;
  }
  // Tile j's codes and words into the K side `kd` and V side `vd` of its slot (zeros past kv_end).
  IK_DEVICE void copy_codes(const PrefillParams& p, const Located& at, int j, unsigned char* kd,
                            unsigned char* vd) const {
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      if (in_tile(i)) {
        const int r = row(i), c = col(i), t = j * TILE_N + r;
        const bool valid = t < kv_end;
        ik::cp_async16_zfill(kd + r * ROW_BYTES + c, valid ? kc + offset(p, at, i, p.k_sb, p.k_st, t) + c : kc, valid);
        ik::cp_async16_zfill(vd + r * ROW_BYTES + c, valid ? vc + offset(p, at, i, p.v_sb, p.v_st, t) + c : vc, valid);
        if (c == 0) {
          if constexpr (K_WORDS) {
            ik::cp_async4_zfill(reinterpret_cast<unsigned int*>(kd + kCodeBytes) + r,
                                valid ? kw + offset(p, at, i, p.ks_sb, p.ks_st, t) : kw, valid);
          }
          ik::cp_async4_zfill(reinterpret_cast<unsigned int*>(vd + kCodeBytes) + r,
                              valid ? vw + offset(p, at, i, p.vs_sb, p.vs_st, t) : vw, valid);
        }
      }
    }
  }
};

// INT8 (Int8Loader): K and V codes with their fp32 scales, dequantized as decode's matrix kernel
// does (Int8Loader::dequant16: code * scale in fp32, rounded once to T, as ikport.kvquant).
template <class T, int HEAD_DIM, int TILE_N, int THREADS, int STAGES, bool PAGED, bool PAD>
struct KVTiles<decode::Int8Loader, T, HEAD_DIM, TILE_N, THREADS, STAGES, PAGED, PAD>
    : CodeTiles<T, HEAD_DIM, HEAD_DIM, TILE_N, THREADS, STAGES, PAGED, PAD, true> {
  using Base = CodeTiles<T, HEAD_DIM, HEAD_DIM, TILE_N, THREADS, STAGES, PAGED, PAD, true>;
  using typename Base::Located;
  using Base::LD, Base::kCopies, Base::kCodeBytes, Base::kSideBytes, Base::kTileBytes, Base::in_tile, Base::row,
      Base::col;
  static constexpr int kSlotBytes = 2 * kSideBytes;

  IK_DEVICE KVTiles(const PrefillParams& p, const Sequence&, int b, int hk, int n_tiles_, int kv_end_)
      : Base(p, b, hk, n_tiles_, kv_end_) {}

  static IK_DEVICE const float* scales(const unsigned char* side) {
    return reinterpret_cast<const float*>(side + kCodeBytes);
  }
  IK_DEVICE void copy(const PrefillParams& p, int j, T* ring, const Located& at) const {
    unsigned char* slot = Base::template slot<kSlotBytes>(ring, j);
    Base::copy_codes(p, at, j, slot, slot + kSideBytes);
  }
  IK_DEVICE void land(T* ring, int j) const {
    const unsigned char* ks = Base::template slot<kSlotBytes>(ring, j);
    const unsigned char* vs = ks + kSideBytes;
    T* kd = k_tile(ring, j);
    T* vd = kd + TILE_N * LD;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      if (in_tile(i)) {
        const int r = row(i), c = col(i);  // (c codes = c elements)
        decode::Int8Loader::dequant16<T>(kd + r * LD + c, ks + r * HEAD_DIM + c, scales(ks)[r]);
        decode::Int8Loader::dequant16<T>(vd + r * LD + c, vs + r * HEAD_DIM + c, scales(vs)[r]);
      }
    }
    ik::block_sync();  // the whole tile, for every warp's fragment loads
  }
  IK_DEVICE T* k_tile(T* ring, int) const { return Base::template tiles<kSlotBytes>(ring); }
};

// KIVI INT4 (KiviLoader<G>): codes two a byte; V with its per-row pair; K with the per-channel
// pairs of the tile's group (D pairs, copied once per tile), or for rows at or past qlen =
// kv_len rounded down to G, the full-precision residual (row t at t % G). Tiles of TILE_N <= G
// rows start at multiples of TILE_N, so a tile lies in one group: one set of K pairs, and all
// codes or all residual. The residual tiles (at most G / TILE_N a sequence, its newest tokens)
// are read straight from memory into the T tile in land: they are already T, and the slot
// stays the size of the codes.
template <int G, class T, int HEAD_DIM, int TILE_N, int THREADS, int STAGES, bool PAGED, bool PAD>
struct KVTiles<decode::KiviLoader<G>, T, HEAD_DIM, TILE_N, THREADS, STAGES, PAGED, PAD>
    : CodeTiles<T, HEAD_DIM, HEAD_DIM / 2, TILE_N, THREADS, STAGES, PAGED, PAD, false> {
  static_assert(HEAD_DIM % 32 == 0, "KIVI rows of codes in whole 16-byte chunks: head_dim a multiple of 32");
  static_assert(TILE_N <= G, "a K/V tile lies in one KIVI group (plan.prefill.tiles: tile_n <= G)");
  using Base = CodeTiles<T, HEAD_DIM, HEAD_DIM / 2, TILE_N, THREADS, STAGES, PAGED, PAD, false>;
  using typename Base::Located;
  using Base::LD, Base::kCopies, Base::kCodeBytes, Base::kSideBytes, Base::kTileBytes, Base::in_tile, Base::row,
      Base::col, Base::kv_end;
  using Pair = typename decode::KiviLoader<G>::Pair;
  static constexpr int CH = HEAD_DIM / 8;                         // 16-byte chunks of a row of T
  static constexpr int kKSideBytes = kCodeBytes + HEAD_DIM * 4;  // K: codes, then the group's pairs
  static constexpr int kSlotBytes = kKSideBytes + kSideBytes;

  const int qlen;
  const long long rst;  // p.kr_st
  const Pair* ksbase;   // the sequence's and head's K pairs of group 0
  const T* rbase;       // the sequence's and head's residual row 0

  IK_DEVICE KVTiles(const PrefillParams& p, const Sequence& seq, int b, int hk, int n_tiles_, int kv_end_)
      : Base(p, b, hk, n_tiles_, kv_end_), qlen(seq.kv_len & ~(G - 1)), rst(p.kr_st),
        ksbase(static_cast<const Pair*>(p.k_scale) + b * p.ks_sb + hk * p.ks_sh),
        rbase(static_cast<const T*>(p.k_resid) + b * p.kr_sb + hk * p.kr_sh) {}

  IK_DEVICE void copy(const PrefillParams& p, int j, T* ring, const Located& at) const {
    unsigned char* slot = Base::template slot<kSlotBytes>(ring, j);
    Base::copy_codes(p, at, j, slot, slot + kKSideBytes);
    const int t0 = j * TILE_N;
    if (t0 < qlen) {  // a code tile: its group's K pairs, 4 a 16-byte copy
      constexpr int kChunks = HEAD_DIM / 4;
      Pair* dst = reinterpret_cast<Pair*>(slot + kCodeBytes);
      const Pair* src = ksbase + (t0 / G) * p.ks_st;
#pragma unroll
      for (int c = 0; c < (kChunks + THREADS - 1) / THREADS; ++c) {
        const int idx = threadIdx.x + c * THREADS;
        if (kChunks % THREADS == 0 || idx < kChunks) ik::cp_async16(dst + idx * 4, src + idx * 4);
      }
    }
  }
  IK_DEVICE void land(T* ring, int j) const {
    const unsigned char* ks = Base::template slot<kSlotBytes>(ring, j);
    const unsigned char* vs = ks + kKSideBytes;
    const Pair* k_pairs = reinterpret_cast<const Pair*>(ks + kCodeBytes);
    const unsigned int* v_pairs = reinterpret_cast<const unsigned int*>(vs + kCodeBytes);
    T* kd = k_tile(ring, j);
    T* vd = kd + TILE_N * LD;
    const int t0 = j * TILE_N;
    const bool codes = t0 < qlen;  // block-uniform
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      if (in_tile(i)) {
        const int r = row(i), c = col(i);  // c bytes: channels 2c .. 2c + 31
        if (codes) {
          decode::KiviLoader<G>::template dequant32<T, true>(kd + r * LD + 2 * c, ks + r * (HEAD_DIM / 2) + c,
                                                              k_pairs + 2 * c, 0u);
        }
        decode::KiviLoader<G>::template dequant32<T, false>(vd + r * LD + 2 * c, vs + r * (HEAD_DIM / 2) + c,
                                                             nullptr, v_pairs[r]);
      }
    }
    if (!codes) {  // the residual's rows (zeros past kv_end: stale rows may hold anything)
      for (int idx = threadIdx.x; idx < TILE_N * CH; idx += THREADS) {
        const int r = idx / CH, col = idx % CH * 8, t = t0 + r;
        ik::store16(kd + r * LD + col,
                    t < kv_end ? ik::load16(rbase + (t & (G - 1)) * rst + col) : make_uint4(0, 0, 0, 0));
      }
    }
    ik::block_sync();  // the whole tile, for every warp's fragment loads
  }
  IK_DEVICE T* k_tile(T* ring, int) const { return Base::template tiles<kSlotBytes>(ring); }
};

}  // namespace prefill
