// kv_append.cuh -- the kv_append family (kernels_src/manifest.yaml): one launch writes T new K/V
// rows of every sequence and KV head into an ikport.KVCache, quantizing on the way (the formats of
// ikport/kvquant.py, code for code and pair for pair), and sets each sequence's length.
//
//   dense   the rows copied
//   int8    a row's codes and its fp32 scale (amax / 127)
//   kivi4   V per row (4-bit codes and a (scale, zero) pair); K to the full-precision residual, and
//           each group of G rows the new rows complete (with the residual's earlier rows) quantized
//           per channel into codes and the group's pairs
//
// Work units, one per block of the grid (grid x = row blocks + group blocks):
//   row blocks    a wave per new row (dense and int8: K's rows, then V's; kivi4: V's)
//   group blocks  kivi4 only, one per sequence and KV head: K's groups the new rows touch, in order
//                 (a completed group reads the residual's earlier rows before a later group of the
//                 same span writes the residual)
// The last block to finish (a counter, zero at rest: it resets it) writes lens[b] = positions[b] +
// T: positions may be the lengths themselves, which every other block has read by then. So a decode
// step's append is one launch with no host synchronization (CUDA-graph safe).
// Rows at or past the capacity are not written (the caller's to avoid, as in KVCache.append).
#pragma once
#include "ik.cuh"

// Must match ikport/kernels.py KvAppendParams field for field (ctypes mirrors C layout).
struct KvAppendParams {
  const void* k_new;  // [B, Hkv, T, D] in the cache dtype
  const void* v_new;
  void* k;            // the stores: dense T / int8 codes / kivi4 codes (D / 2 bytes a row)
  void* v;
  void* k_scale;      // int8: fp32 per row; kivi4: K's pairs [B, Hkv, groups, D] (one 4-byte word each)
  void* v_scale;      // int8: fp32 per row; kivi4: V's pairs, one word per row
  void* k_resid;      // kivi4: K's residual [B, Hkv, G, D] in T, row t at t % G
  const int* block_table;  // paged: [B, bt_sb] page ids, else null
  const int* positions;    // [B] each sequence's first new row
  int* lens;               // [B] set to positions + T (may be `positions`)
  int* counter;            // one int, zero at rest
  long long kn_sb, kn_sh, kn_st;  // k_new strides (elements)
  long long vn_sb, vn_sh, vn_st;
  long long s_sb, s_sh, s_st;     // the stores' strides in elements (codes: bytes; paged: s_sb the page stride)
  long long sc_sb, sc_sh, sc_st;  // int8 scales (floats) / kivi4 V pairs (words), beside the rows
  long long kp_sb, kp_sh, kp_sg;  // kivi4 K pairs (words; channel stride 1)
  long long kr_sb, kr_sh, kr_st;  // kivi4 residual (elements)
  long long bt_sb;
  int batch, kv_heads, new_tokens;
  int capacity;        // rows a sequence may hold
  int page_size_log2;  // paged only
  int k_groups;        // kivi4: K pair groups a sequence holds
  int rewrite;         // kivi4: positions may land inside a group already quantized (its rows from codes)
};

namespace kv_append {

struct Dense { static constexpr int kKind = 0, kGroup = 0; };
struct Int8 { static constexpr int kKind = 1, kGroup = 0; };
template <int G>
struct Kivi { static constexpr int kKind = 2, kGroup = G; };

constexpr int kInt8Max = 127;
constexpr float kInt4Max = 15.f;

// Threads a block: a group block's threads each hold one channel pair of a slice of the group's rows.
template <int HEAD_DIM>
constexpr int threads() { return HEAD_DIM > 128 ? 256 : 128; }

template <bool PAGED>
IK_DEVICE long long row_offset(const KvAppendParams& p, int b, int h, int row, long long sb, long long sh,
                               long long st) {
  if (PAGED) {
    const int page = p.block_table[b * p.bt_sb + (row >> p.page_size_log2)];
    return page * sb + h * sh + static_cast<long long>(row & ((1 << p.page_size_log2) - 1)) * st;
  }
  return b * sb + h * sh + static_cast<long long>(row) * st;
}

// (scale, zero) of 4-bit codes over [lo, hi], as kvquant._int4_pairs: zero = lo in T, scale =
// (hi - lo) / 15 rounded up to T; the word holds scale in its low half.
template <class T>
IK_DEVICE unsigned int int4_pair_word(float lo, float hi, float& scale, float& zero) {
  const unsigned int zb = ik::dtype<T>::bits_from_float(lo);
  const float want = hi / kInt4Max - lo / kInt4Max;
  unsigned int sb = ik::dtype<T>::bits_from_float(want);
  if (ik::dtype<T>::unpack2(sb).x < want) ++sb;  // nextafter toward +inf (want >= 0)
  scale = ik::dtype<T>::unpack2(sb).x;
  zero = ik::dtype<T>::unpack2(zb).x;
  return sb | (zb << 16);
}

IK_DEVICE unsigned int int4_code(float x, float scale, float zero) {
  const float q = rintf((x - zero) / (scale > 0.f ? scale : 1.f));
  return static_cast<unsigned int>(fminf(fmaxf(q, 0.f), kInt4Max));
}

// One new row, a wave: lane l holds channel pairs l, l + wave, ...
template <class T, int HEAD_DIM, class F, bool PAGED>
IK_DEVICE void append_row(const KvAppendParams& p, bool is_v, int b, int h, int t) {
  constexpr int kPairs = HEAD_DIM / 2;
  constexpr int kPerLane = (kPairs + ik::kWarpSize - 1) / ik::kWarpSize;
  const int row = p.positions[b] + t;
  if (row < 0 || row >= p.capacity) return;
  const unsigned int* src = reinterpret_cast<const unsigned int*>(
      static_cast<const T*>(is_v ? p.v_new : p.k_new) +
      (is_v ? b * p.vn_sb + h * p.vn_sh + t * p.vn_st : b * p.kn_sb + h * p.kn_sh + t * p.kn_st));
  const long long off = row_offset<PAGED>(p, b, h, row, p.s_sb, p.s_sh, p.s_st);
  const int lane = ik::lane_id();
  unsigned int w[kPerLane];
  float2 x[kPerLane];
  float lo = IK_INFINITY, hi = -IK_INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c2 = lane + i * ik::kWarpSize;
    w[i] = c2 < kPairs ? src[c2] : 0u;
    x[i] = ik::dtype<T>::unpack2(w[i]);
    if (c2 < kPairs) {
      lo = fminf(lo, fminf(x[i].x, x[i].y));
      hi = fmaxf(hi, fmaxf(x[i].x, x[i].y));
    }
  }
  void* store = is_v ? p.v : p.k;
  if constexpr (F::kKind == 0) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c2 = lane + i * ik::kWarpSize;
      if (c2 < kPairs) reinterpret_cast<unsigned int*>(static_cast<T*>(store) + off)[c2] = w[i];
    }
  } else if constexpr (F::kKind == 1) {
    const float amax = ik::warp_max(fmaxf(hi, -lo));
    const float scale = amax / kInt8Max;
    const float safe = scale > 0.f ? scale : 1.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c2 = lane + i * ik::kWarpSize;
      if (c2 >= kPairs) continue;
      const float q0 = fminf(fmaxf(rintf(x[i].x / safe), -kInt8Max), kInt8Max);
      const float q1 = fminf(fmaxf(rintf(x[i].y / safe), -kInt8Max), kInt8Max);
      const unsigned int bytes = (static_cast<unsigned int>(static_cast<int>(q0)) & 0xffu) |
                                 ((static_cast<unsigned int>(static_cast<int>(q1)) & 0xffu) << 8);
      reinterpret_cast<unsigned short*>(static_cast<signed char*>(store) + off)[c2] = static_cast<unsigned short>(bytes);
    }
    if (lane == 0) {
      float* scales = static_cast<float*>(is_v ? p.v_scale : p.k_scale);
      scales[row_offset<PAGED>(p, b, h, row, p.sc_sb, p.sc_sh, p.sc_st)] = scale;
    }
  } else {  // kivi4: V per row
    lo = -ik::warp_max(-lo);
    hi = ik::warp_max(hi);
    float scale, zero;
    const unsigned int pair = int4_pair_word<T>(lo, hi, scale, zero);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c2 = lane + i * ik::kWarpSize;
      if (c2 < kPairs) {
        static_cast<unsigned char*>(store)[off + c2] =
            static_cast<unsigned char>(int4_code(x[i].x, scale, zero) | (int4_code(x[i].y, scale, zero) << 4));
      }
    }
    if (lane == 0) {
      static_cast<unsigned int*>(p.v_scale)[row_offset<PAGED>(p, b, h, row, p.sc_sb, p.sc_sh, p.sc_st)] = pair;
    }
  }
}

// K of a kivi4 cache, one sequence b and KV head h: the groups rows positions[b] .. + T - 1 touch.
// Thread (slice s, pair c) reads channels 2c, 2c + 1 of the group's rows s * kRows .. + kRows - 1
// twice (min and max, then codes; the second pass from the caches: the rows held in registers
// spilled on gfx1100); min and max meet across slices in shared memory.
template <class T, int HEAD_DIM, int G, bool PAGED>
IK_DEVICE void append_kivi_k(const KvAppendParams& p, int b, int h) {
  constexpr int kThreads = threads<HEAD_DIM>();
  constexpr int kPairs = HEAD_DIM / 2;
  constexpr int kSlices = kThreads / kPairs;  // (at least 1: the static_assert below)
  constexpr int kRows = (G + kSlices - 1) / kSlices;
  static_assert(kPairs <= kThreads, "a group block holds every channel pair of a row");
  __shared__ float part[kSlices][kPairs][4];
  const int tid = threadIdx.x;
  const int slice = tid / kPairs, c = tid % kPairs;
  const bool active = slice < kSlices;
  const int T_new = p.new_tokens;
  const int pos = p.positions[b];
  const int end = pos + T_new;
  if (T_new <= 0 || pos < 0) return;
  const int g0 = pos / G, g_last = (end - 1) / G;
  const int complete = min(end / G, p.capacity / G);  // groups below this one are quantized
  // rewrite into a group already folded: its earlier rows come from its codes (old pairs)
  const bool folded0 = p.rewrite && (g0 + 1) * G <= p.lens[b];
  unsigned int* pairs = static_cast<unsigned int*>(p.k_scale) + b * p.kp_sb + h * p.kp_sh;
  float old_s0 = 0.f, old_z0 = 0.f, old_s1 = 0.f, old_z1 = 0.f;
  if (folded0 && active && g0 < p.k_groups) {
    const float2 a = ik::dtype<T>::unpack2(pairs[g0 * p.kp_sg + 2 * c]);
    const float2 bb = ik::dtype<T>::unpack2(pairs[g0 * p.kp_sg + 2 * c + 1]);
    old_s0 = a.x; old_z0 = a.y; old_s1 = bb.x; old_z1 = bb.y;
  }
  const unsigned int* k_new = reinterpret_cast<const unsigned int*>(static_cast<const T*>(p.k_new) + b * p.kn_sb + h * p.kn_sh);
  unsigned int* resid = reinterpret_cast<unsigned int*>(static_cast<T*>(p.k_resid) + b * p.kr_sb + h * p.kr_sh);
  unsigned char* codes = static_cast<unsigned char*>(p.k);
  // Channel pair c of row `row` (in group g) as a word of two T.
  auto word = [&](int row, int g) -> unsigned int {
    if (row >= pos) return k_new[(row - pos) * (p.kn_st / 2) + c];
    if (folded0 && g == g0) {
      const unsigned int q = codes[row_offset<PAGED>(p, b, h, row, p.s_sb, p.s_sh, p.s_st) + c];
      const float v0 = old_z0 + static_cast<float>(q & 15u) * old_s0;
      const float v1 = old_z1 + static_cast<float>(q >> 4) * old_s1;
      return ik::dtype<T>::bits_from_float(v0) | (static_cast<unsigned int>(ik::dtype<T>::bits_from_float(v1)) << 16);
    }
    return resid[(row % G) * (p.kr_st / 2) + c];
  };
  for (int g = g0; g <= g_last; ++g) {
    const int r0 = g * G;
    // The previous group's reads (its rows, of the residual too; `part`) before this group's writes
    if (g > g0) ik::block_sync();
    if (g < complete) {
      float m[4] = {IK_INFINITY, IK_INFINITY, -IK_INFINITY, -IK_INFINITY};  // lo, lo, hi, hi of the two channels
#pragma unroll 8
      for (int i = 0; i < kRows; ++i) {
        const int r = slice * kRows + i;
        if (active && r < G) {
          const float2 x = ik::dtype<T>::unpack2(word(r0 + r, g));
          m[0] = fminf(m[0], x.x); m[1] = fminf(m[1], x.y);
          m[2] = fmaxf(m[2], x.x); m[3] = fmaxf(m[3], x.y);
        }
      }
      if (active) {
#pragma unroll
        for (int j = 0; j < 4; ++j) part[slice][c][j] = m[j];
      }
      ik::block_sync();
      if (!active) continue;
#pragma unroll
      for (int s = 0; s < kSlices; ++s) {
        m[0] = fminf(m[0], part[s][c][0]); m[1] = fminf(m[1], part[s][c][1]);
        m[2] = fmaxf(m[2], part[s][c][2]); m[3] = fmaxf(m[3], part[s][c][3]);
      }
      float s0, z0, s1, z1;
      const unsigned int pair0 = int4_pair_word<T>(m[0], m[2], s0, z0);
      const unsigned int pair1 = int4_pair_word<T>(m[1], m[3], s1, z1);
      if (slice == 0 && g < p.k_groups) {
        pairs[g * p.kp_sg + 2 * c] = pair0;
        pairs[g * p.kp_sg + 2 * c + 1] = pair1;
      }
#pragma unroll 8
      for (int i = 0; i < kRows; ++i) {  // the rows again (cached): codes
        const int r = slice * kRows + i;
        if (r >= G) continue;
        const float2 x = ik::dtype<T>::unpack2(word(r0 + r, g));
        codes[row_offset<PAGED>(p, b, h, r0 + r, p.s_sb, p.s_sh, p.s_st) + c] =
            static_cast<unsigned char>(int4_code(x.x, s0, z0) | (int4_code(x.y, s1, z1) << 4));
      }
    } else if (g == end / G && active) {
      // The new partial group: its new rows (and, rewriting a folded group, its earlier ones) to
      // the residual. Slices split the rows.
      const int first = folded0 && g == g0 ? r0 : (pos > r0 ? pos : r0);
      for (int row = first + slice; row < end; row += kSlices) resid[(row % G) * (p.kr_st / 2) + c] = word(row, g);
    }
  }
}

// The grid's last block sets the lengths (see the top of the file).
IK_DEVICE void finish(const KvAppendParams& p) {
  ik::block_sync();
  if (threadIdx.x != 0) return;
  ik::fence_device();
  if (ik::atomic_add(p.counter, 1) != static_cast<int>(gridDim.x) - 1) return;
  for (int b = 0; b < p.batch; ++b) p.lens[b] = p.positions[b] + p.new_tokens;
  ik::atomic_add(p.counter, -static_cast<int>(gridDim.x));
}

}  // namespace kv_append

// grid (row blocks + group blocks), block kv_append::threads<HEAD_DIM>(); see the top of the file.
template <class T, int HEAD_DIM, class FORMAT, bool PAGED>
__global__ void __launch_bounds__(kv_append::threads<HEAD_DIM>()) kv_cache_append(const KvAppendParams p) {
  constexpr int kWaves = kv_append::threads<HEAD_DIM>() / ik::kWarpSize;
  const int per_tensor = p.batch * p.kv_heads * p.new_tokens;
  const int rows = FORMAT::kKind == 2 ? per_tensor : 2 * per_tensor;  // kivi4: V's rows only
  const int row_blocks = (rows + kWaves - 1) / kWaves;
  const int block = blockIdx.x;
  if (block < row_blocks) {
    const int r = block * kWaves + ik::warp_id();
    if (r < rows) {
      const bool is_v = FORMAT::kKind == 2 || r >= per_tensor;
      const int i = r % per_tensor;
      const int t = i % p.new_tokens, bh = i / p.new_tokens;
      kv_append::append_row<T, HEAD_DIM, FORMAT, PAGED>(p, is_v, bh / p.kv_heads, bh % p.kv_heads, t);
    }
  } else if constexpr (FORMAT::kKind == 2) {
    const int bh = block - row_blocks;
    if (bh < p.batch * p.kv_heads) {
      kv_append::append_kivi_k<T, HEAD_DIM, FORMAT::kGroup, PAGED>(p, bh / p.kv_heads, bh % p.kv_heads);
    }
  }
  kv_append::finish(p);
}
