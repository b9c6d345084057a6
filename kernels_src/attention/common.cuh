// common.cuh -- what every decode attention kernel shares (the family: decode.cuh): the parameter
// struct, sequence lengths and key limits, K/V row addressing (contiguous and paged), and the split
// kernels' block coordinates (one prologue for the vector and the matrix-unit kernel).
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
  // Appended (every field above keeps its offset): the INT8 cache's scales (loader int8; null for
  // dense), fp32, one per token and KV head: [B, Hkv, L] or paged [num_pages, Hkv, page_size],
  // strides in elements (paged: ks_sb / vs_sb the page stride). k and v then hold the int8 codes.
  const float* k_scale;
  const float* v_scale;
  long long ks_sb, ks_sh, ks_st;
  long long vs_sb, vs_sh, vs_st;
  // Appended: the KIVI INT4 cache (loader kivi4_g*; ikport.kvquant): k, v hold 4-bit codes two a
  // byte, k_scale and v_scale (scale, zero) pairs of T, each pair one 4-byte word (strides above
  // in pairs): K's per group of G rows and channel [B, Hkv, groups, D] (per sequence, paged or
  // not), V's per row [B, Hkv, L] / [num_pages, Hkv, page_size]. k_resid: K's newest rows in T,
  // [B, Hkv, G, D], row t at t % G, for rows at or past kv_len rounded down to G.
  const void* k_resid;
  long long kr_sb, kr_sh, kr_st;
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

// Offset of row t of KV head h of sequence b (the page from the sequence's table row when paged).
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

// A page id read for the early copy (see SplitRange::t_early_end), clamped into the pool: table
// entries past kv_len may hold anything.
IK_DEVICE int clamp_page(const DecodeParams& p, int page) { return min(max(page, 0), p.num_pages - 1); }

// The prologue of both split kernels, in two parts (each kernel computes its lane coordinates in
// between, where they always were: the generated code follows the statement order).
// grid (num_splits, Hkv * row_tiles, B): blockIdx.x is the split, blockIdx.y the KV head and row
// tile, blockIdx.z the sequence. The block serves ROWS of its KV head's query rows
// r = (head in group) * Tq + token, from row0.
struct SplitBlock {
  int split;
  int group;       // query heads per KV head
  int rows_total;  // query rows of a KV head: group * q_len
  int hk, row0, b;
};

template <int ROWS>
IK_DEVICE SplitBlock split_block(const DecodeParams& p) {
  SplitBlock blk;
  blk.split = blockIdx.x;
  blk.group = p.num_q_heads / p.num_kv_heads;
  blk.rows_total = blk.group * p.q_len;
  const int row_tiles = (blk.rows_total + ROWS - 1) / ROWS;
  blk.hk = blockIdx.y / row_tiles;
  blk.row0 = (blockIdx.y % row_tiles) * ROWS;
  blk.b = blockIdx.z;
  return blk;
}

// The K/V rows the split streams: [t_begin, t_end).
struct SplitRange {
  int kv_len;
  int t_begin, t_end;
  // Early copy: the first ring step is copied before anything else, bounded by the split and the
  // cache's capacity (allocated memory) instead of kv_len, so the K/V copies, the kv_len load and
  // the query loads are in flight together rather than one after another (H100: 0.55-0.8 us less
  // on every contiguous shape measured, docs/results/decode.md v7; paged 0.5-1 us, v9). Its rows
  // past kv_len get -inf scores and zeroed V in the loop. A paged table past kv_len may hold
  // garbage: those page ids are clamped into the pool (clamp_page), so the copy stays in bounds.
  int t_early_end;
};

IK_DEVICE SplitRange split_range(const DecodeParams& p, const SplitBlock& blk) {
  SplitRange range;
  range.kv_len = kv_len_of(p, blk.b);
  range.t_begin = blk.split * p.rows_per_split;
  range.t_end = min(range.t_begin + p.rows_per_split, range.kv_len);
  range.t_early_end = min(range.t_begin + p.rows_per_split, p.kv_capacity);
  return range;
}

}  // namespace decode
