// w4a16.cuh -- out[M, N] = x[M, K] * W[N, K]^T with W held as 4-bit codes (weight-only INT4,
// fp16/bf16 activations): w[n][k] = (q[n][k] - z[k/G][n]) * s[k/G][n], z = 8 when symmetric.
// Written once in the ik:: vocabulary (portability/ik.cuh); no vendor branches.
//
// Packed weights (ikport/int4.py builds them): the codes sit in the order the target's matrix
// unit wants its B fragment (B = W^T, a 16x16 tile is k x n), so a lane turns one 16-byte load
// straight into B fragments with no shuffles. Per tile a lane holds kB codes (8 on NVIDIA, 4 on
// CDNA, 16 on RDNA3 whose lanes 16-31 repeat 0-15): 256/kB "unique lanes" hold a tile, and one
// 16-byte lane vector covers TPC = 32/kB tiles along k: a chunk of KC = 16*TPC k. The vector of
// unique lane u for n-tile nt and chunk c is uint4 #((nt * (K/KC) + c) * UL + u). Inside it,
// register r = t*(kB/2) + p (tile t of the chunk, B slot pair p) is word r/4, nibbles r%4 (slot
// 2p) and r%4 + 4 (slot 2p + 1): the pair one int4_pair() call unpacks.
//   x [M, K] (row stride x_sm, 16-byte aligned rows), scales/zeros [K/G, N], out [M, N] (o_sm).
//   N % 16 == 0, K % 128 == 0 (the Python side checks).
#pragma once
#include "ik.cuh"

// Must match ikport/kernels.py W4A16Params field for field.
struct W4A16Params {
  const void* x;
  const unsigned int* qweight;
  const void* scales;  // [K/G, N], x's dtype
  const void* zeros;   // [K/G, N] integer zero points in x's dtype, or null: symmetric (8)
  void* out;
  float* partials;     // [num_splits, M, N] fp32 split-K partial sums (num_splits > 1)
  int* tile_counters;  // [gridDim.z * gridDim.x], zero at rest: the last split block sums
  long long x_sm, o_sm;
  int m, n, k;
  int group_log2;  // log2 of the group size G; 31 for per-channel groups (G = K): k >> 31 == 0
  int num_splits, chunks_per_split;  // split-K: blockIdx.y covers chunks_per_split chunks of KC
};

namespace w4 {

using L = ik::mma::Layout;
constexpr int kB = L::kB;                // B elements a lane holds per 16x16 tile
constexpr int kPairs = kB / 2;           // ... as 32-bit pairs
constexpr int kTilesPerChunk = 32 / kB;  // tiles one 16-byte lane vector covers along k
constexpr int kChunk = 16 * kTilesPerChunk;
constexpr int kUniqueLanes = 256 / kB;

IK_DEVICE unsigned int word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
IK_DEVICE const uint4* lane_vector(const W4A16Params& p, int ntile, int chunk, int lane) {
  return reinterpret_cast<const uint4*>(p.qweight) +
         (static_cast<long long>(ntile) * (p.k / kChunk) + chunk) * kUniqueLanes + lane % kUniqueLanes;
}

// Scale and zero point of (group, column) as the packed pairs int4_pair() takes.
template <class T>
struct GroupParams {
  unsigned int z2, s2;
};
template <class T>
IK_DEVICE GroupParams<T> group_params(const W4A16Params& p, int group, int col) {
  long long i = static_cast<long long>(group) * p.n + col;
  unsigned int s = *(static_cast<const unsigned short*>(p.scales) + i);
  unsigned int z = 8;
  if (p.zeros) z = static_cast<unsigned int>(ik::dtype<T>::to_float(static_cast<const T*>(p.zeros)[i]));
  return {(ik::dtype<T>::kInt4Base + z) * 0x10001u, s * 0x10001u};
}

// Code of slot s of register pair r, as an integer (the scalar, pre-"magic number" path).
IK_DEVICE int code_at(const uint4& v, int r, int half) {
  return static_cast<int>((word_of(v, r / 4) >> (4 * (r % 4 + 4 * half))) & 0xfu);
}

// Sums, over the 16 columns of a tile, what every lane holds for that column in acc[slot]
// (slot -> column from the layout), and writes column c's total to red[c] (lane c, c < 16).
IK_DEVICE void reduce_columns(const float (&acc)[kB], float (&red)[16]) {
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    float v = 0.f;
#pragma unroll
    for (int s = 0; s < kB; ++s) v += ik::mma::b_col(s) == c ? acc[s] : 0.f;
    red[c] = ik::warp_sum(v);
  }
}

}  // namespace w4

// ---------------------------------------------------------------------------------------------
// v0 naive: one warp per (row m, 16-column tile), scalar code extraction, fp32 math, x read from
// global memory element by element, the whole K in one warp. grid (N/16, M), block one warp.
template <class T>
__global__ void __launch_bounds__(IK_WARP_SIZE) w4a16_naive(W4A16Params p) {
  const int lane = ik::lane_id(), ntile = blockIdx.x, m = blockIdx.y;
  const T* x = static_cast<const T*>(p.x) + m * p.x_sm;
  const T* scales = static_cast<const T*>(p.scales);
  const T* zeros = static_cast<const T*>(p.zeros);
  float acc[w4::kB] = {};
  if (lane < w4::kUniqueLanes) {  // RDNA3: lanes 16-31 only repeat what 0-15 hold
    for (int c = 0; c < p.k / w4::kChunk; ++c) {
      const uint4 v = *w4::lane_vector(p, ntile, c, lane);
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int t = r / w4::kPairs, pair = r % w4::kPairs;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int s = 2 * pair + h;
          const int k = c * w4::kChunk + 16 * t + ik::mma::b_row(s);
          const int n = 16 * ntile + ik::mma::b_col(s);
          const long long g = static_cast<long long>(k >> p.group_log2) * p.n + n;
          const float z = zeros ? ik::dtype<T>::to_float(zeros[g]) : 8.f;
          const float w = (static_cast<float>(w4::code_at(v, r, h)) - z) * ik::dtype<T>::to_float(scales[g]);
          acc[s] += w * ik::dtype<T>::to_float(x[k]);
        }
      }
    }
  }
  float red[16];
  w4::reduce_columns(acc, red);
  if (lane < 16) {
    float v = red[0];
#pragma unroll
    for (int c = 1; c < 16; ++c) v = lane == c ? red[c] : v;
    static_cast<T*>(p.out)[m * p.o_sm + 16 * ntile + lane] = ik::dtype<T>::from_float(v);
  }
}

// ---------------------------------------------------------------------------------------------
// v1/v2 GEMV: WARPS warps share one 16-column tile and split K between them; the row of x is
// staged in shared memory once per block. MAGIC picks the unpacking: false extracts each code
// with a shift and a mask and converts it to float; true turns two codes at once into a packed
// fp16/bf16 pair with one OR against a magic exponent (int4_pair), then one subtract-multiply.
// grid (N/16, M), block WARPS warps, dynamic shared memory K elements of T.
template <class T, bool MAGIC, int WARPS>
__global__ void __launch_bounds__(WARPS * IK_WARP_SIZE) w4a16_gemv(W4A16Params p) {
  extern __shared__ __attribute__((aligned(16))) unsigned char w4_smem[];
  T* s_x = reinterpret_cast<T*>(w4_smem);
  __shared__ float s_red[WARPS][16];
  const int lane = ik::lane_id(), warp = ik::warp_id(), ntile = blockIdx.x, m = blockIdx.y;
  const T* x = static_cast<const T*>(p.x) + m * p.x_sm;
  for (int i = threadIdx.x; i < p.k / 8; i += WARPS * IK_WARP_SIZE)
    ik::store16(s_x + 8 * i, ik::load16(x + 8 * i));
  ik::block_sync();

  const T* scales = static_cast<const T*>(p.scales);
  const T* zeros = static_cast<const T*>(p.zeros);
  float acc[w4::kB] = {};
  if (lane < w4::kUniqueLanes) {
    for (int c = warp; c < p.k / w4::kChunk; c += WARPS) {
      const uint4 v = *w4::lane_vector(p, ntile, c, lane);
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int t = r / w4::kPairs, pair = r % w4::kPairs;
        const int k = c * w4::kChunk + 16 * t + ik::mma::b_row(2 * pair);  // even: k, k + 1
        const int n = 16 * ntile + ik::mma::b_col(2 * pair);
        const float2 xv = ik::dtype<T>::unpack2(*reinterpret_cast<const unsigned int*>(s_x + k));
        float2 w;
        if constexpr (MAGIC) {
          const w4::GroupParams<T> gp = w4::group_params<T>(p, k >> p.group_log2, n);
          w = ik::dtype<T>::unpack2(ik::int4_pair<T>(w4::word_of(v, r / 4), r % 4, gp.z2, gp.s2));
        } else {
          const long long g = static_cast<long long>(k >> p.group_log2) * p.n + n;
          const float z = zeros ? ik::dtype<T>::to_float(zeros[g]) : 8.f;
          const float s = ik::dtype<T>::to_float(scales[g]);
          w.x = (static_cast<float>(w4::code_at(v, r, 0)) - z) * s;
          w.y = (static_cast<float>(w4::code_at(v, r, 1)) - z) * s;
        }
        acc[2 * pair] += w.x * xv.x;
        acc[2 * pair + 1] += w.y * xv.y;
      }
    }
  }
  float red[16];
  w4::reduce_columns(acc, red);
  if (lane < 16) {
    float v = red[0];
#pragma unroll
    for (int c = 1; c < 16; ++c) v = lane == c ? red[c] : v;
    s_red[warp][lane] = v;
  }
  ik::block_sync();
  if (threadIdx.x < 16) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += s_red[w][threadIdx.x];
    static_cast<T*>(p.out)[m * p.o_sm + 16 * ntile + threadIdx.x] = ik::dtype<T>::from_float(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Matrix-unit path (default for every M): each warp owns NT 16-column tiles and MT 16-row tiles
// of x; the block's WARPS warps sit side by side along N and walk the same K chunks, so a slab of
// x (and the slab's scales and zero points for the block's columns) staged in shared memory serves
// them all. Each lane keeps kDepth chunks of its weight vectors in flight (a cp.async ring) and
// unpacks them straight into B fragments as exact q - z (int4_pair_unscaled: two codes per OR and
// one subtract); the matrix unit sums (q - z) * x over a group in fp32, and the group's scales
// multiply that sum once per output element (fp32) when the group ends. Split-K: blockIdx.y takes
// chunks_per_split chunks; partial sums go to `partials`, and the last block of each output tile
// to finish (a counter) adds them up in split order (deterministic) and writes the output,
// resetting its counter for the next call or graph replay.
// grid (ceil(N / (16 NT WARPS)), num_splits, ceil(M / (16 MT))), block WARPS warps.
template <class T, int MT, int NT, int WARPS>
__global__ void __launch_bounds__(WARPS * IK_WARP_SIZE) w4a16_mma(W4A16Params p) {
  using L = w4::L;
  constexpr int kRows = 16 * MT;
  constexpr int kSlabK = 512 / MT;  // k of x staged per slab
  static_assert(kSlabK % w4::kChunk == 0, "a slab holds whole chunks");
  constexpr int kSlabChunks = kSlabK / w4::kChunk;
  constexpr int kLd = kSlabK + 8;  // rows stay 16-byte aligned; +16 B shifts ldmatrix banks
  constexpr int kThreads = WARPS * IK_WARP_SIZE;
  constexpr int kCols = 16 * NT * WARPS;
  constexpr int kSlabGroups = kSlabK / 32 + 1;  // groups (G >= 32) a slab can touch
  constexpr int kDepth = 4;                     // weight chunks in flight per lane
  constexpr int kC = ik::mma::kCSlots;
  __shared__ __attribute__((aligned(16))) T s_x[kRows * kLd];
  __shared__ unsigned short s_scale[kSlabGroups * kCols];  // raw T bits
  __shared__ unsigned short s_zero[kSlabGroups * kCols];   // base + zero point, ready for int4_pair
  // Weight ring: kDepth chunks in flight, each lane copying (cp.async) and later reading back only
  // its own 16-byte vectors, so the ring needs no barrier. (A register ring let the compiler wait
  // for every outstanding load at once: measured ~1 us per chunk on the H100.)
  __shared__ __attribute__((aligned(16))) uint4 s_ring[kDepth][NT][kThreads];

  // The lane index once, as a plain value: the layout math below then folds and is shared.
  const int lane = ik::lane_id(), warp = ik::warp_id();
  const int num_chunks = p.k / w4::kChunk;
  const int c_begin = blockIdx.y * p.chunks_per_split;
  const int c_end = min(num_chunks, c_begin + p.chunks_per_split);
  const int n_block = blockIdx.x * kCols;
  const int ntile0 = n_block / 16 + warp * NT;
  const int m0 = blockIdx.z * kRows;
  const int rows = min(kRows, p.m - m0);
  const T* x = static_cast<const T*>(p.x) + m0 * p.x_sm;
  const unsigned short* scales = static_cast<const unsigned short*>(p.scales);

  // Rows of the tile past M stay zero for the whole kernel.
  for (int i = threadIdx.x; i < kRows * kLd / 8; i += kThreads)
    if (i / (kLd / 8) >= rows) ik::store16(s_x + 8 * i, make_uint4(0, 0, 0, 0));

  bool has_tile[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) has_tile[nt] = 16 * (ntile0 + nt) < p.n;

  ik::mma::FragC acc[MT][NT], gacc[MT][NT];  // the total, and the current group's unscaled sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      ik::mma::zero(acc[mt][nt]);
      ik::mma::zero(gacc[mt][nt]);
    }
  unsigned int z2[NT][w4::kPairs];  // current group: zero points of this lane's B columns
  float sc[NT][kC];                 // ... and scales of its C columns

  // Issue chunk `c` of this lane's weight vectors into ring slot `slot`; always commit a group,
  // so "wait until kDepth - 1 groups are pending" always means "chunk c has landed".
  auto issue = [&](int c, int slot) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      if (has_tile[nt] && c < c_end)
        ik::cp_async16(&s_ring[slot][nt][threadIdx.x], w4::lane_vector(p, ntile0 + nt, c, lane));
    ik::cp_async_commit();
  };
#pragma unroll
  for (int d = 0; d < kDepth - 1; ++d) issue(c_begin + d, d);
  int group0 = 0;  // first group of the staged slab
  for (int c = c_begin; c < c_end; ++c) {
    {
      const int slot = (c - c_begin) % kDepth;
      issue(c + kDepth - 1, (slot + kDepth - 1) % kDepth);
      ik::cp_async_wait<kDepth - 1>();
      uint4 wv[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) wv[nt] = s_ring[slot][nt][threadIdx.x];
      const int slab_pos = (c - c_begin) % kSlabChunks;
      if (slab_pos == 0) {  // stage x rows < M and the slab's scales/zero points, block-wide
        const int k0 = c * w4::kChunk, width = min(kSlabChunks, c_end - c) * w4::kChunk;
        group0 = k0 >> p.group_log2;
        const int groups = ((k0 + width - 1) >> p.group_log2) - group0 + 1;
        ik::block_sync();
        for (int i = threadIdx.x; i < rows * (width / 8); i += kThreads) {
          const int r = i / (width / 8), c8 = i % (width / 8);
          ik::store16(s_x + r * kLd + 8 * c8, ik::load16(x + r * p.x_sm + k0 + 8 * c8));
        }
        for (int i = threadIdx.x; i < groups * kCols; i += kThreads) {
          const int g = i / kCols, n = n_block + i % kCols;
          const long long src = static_cast<long long>(group0 + g) * p.n + n;
          const bool ok = n < p.n;
          s_scale[i] = ok ? scales[src] : 0;
          const int z = (ok && p.zeros) ? static_cast<int>(ik::dtype<T>::to_float(static_cast<const T*>(p.zeros)[src])) : 8;
          s_zero[i] = static_cast<unsigned short>(ik::dtype<T>::kInt4Base + z);
        }
        ik::block_sync();
      }
#pragma unroll
      for (int t = 0; t < w4::kTilesPerChunk; ++t) {
        const int k_tile = c * w4::kChunk + 16 * t;
        const int group = k_tile >> p.group_log2;
        if (t == 0 ? (c == c_begin || (k_tile & ((1 << p.group_log2) - 1)) == 0)
                   : (k_tile & ((1 << p.group_log2) - 1)) == 0) {  // a group starts: its constants
          const int gl = (group - group0) * kCols;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int col0 = (warp * NT + nt) * 16;
#pragma unroll
            for (int pair = 0; pair < w4::kPairs; ++pair)
              z2[nt][pair] = s_zero[gl + col0 + L::b_col(lane, 2 * pair)] * 0x10001u;
#pragma unroll
            for (int s = 0; s < kC; ++s)
              sc[nt][s] = ik::dtype<T>::unpack2(s_scale[gl + col0 + L::c_col(lane, s)]).x;
          }
        }
        ik::mma::FragA<T> a[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ik::mma::load_a(a[mt], s_x + 16 * mt * kLd + slab_pos * w4::kChunk + 16 * t, kLd);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (!has_tile[nt]) continue;
          ik::mma::FragB<T> b;
#pragma unroll
          for (int pair = 0; pair < w4::kPairs; ++pair) {
            const int r = t * w4::kPairs + pair;
            ik::mma::set_b_pair(b, pair, ik::int4_pair_unscaled<T>(w4::word_of(wv[nt], r / 4), r % 4, z2[nt][pair]));
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) ik::mma::mma(gacc[mt][nt], a[mt], b);
        }
        const bool group_ends = ((k_tile + 16) >> p.group_log2) != group ||
                                (t == w4::kTilesPerChunk - 1 && c == c_end - 1);
        if (group_ends) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int s = 0; s < kC; ++s) {
                acc[mt][nt].x[s] += sc[nt][s] * gacc[mt][nt].x[s];
                gacc[mt][nt].x[s] = 0.f;
              }
        }
      }
    }
  }
  ik::cp_async_wait<0>();

  T* out = static_cast<T*>(p.out);
  if (p.num_splits == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int s = 0; s < ik::mma::kCSlots; ++s) {
          const int r = 16 * mt + L::c_row(lane, s), n = 16 * (ntile0 + nt) + L::c_col(lane, s);
          if (r < rows && has_tile[nt]) out[(m0 + r) * p.o_sm + n] = ik::dtype<T>::from_float(acc[mt][nt].x[s]);
        }
    return;
  }
  float* part = p.partials + static_cast<long long>(blockIdx.y) * p.m * p.n;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int s = 0; s < ik::mma::kCSlots; ++s) {
        const int r = 16 * mt + L::c_row(lane, s), n = 16 * (ntile0 + nt) + L::c_col(lane, s);
        if (r < rows && has_tile[nt]) part[static_cast<long long>(m0 + r) * p.n + n] = acc[mt][nt].x[s];
      }
  ik::fence_device();
  ik::block_sync();
  bool last = false;
  if (threadIdx.x == 0) {
    int* counter = p.tile_counters + blockIdx.z * gridDim.x + blockIdx.x;
    last = ik::atomic_add(counter, 1) == p.num_splits - 1;
    if (last) *counter = 0;
  }
  if (!ik::block_any(last)) return;
  ik::fence_device();
  const int cols = min(kCols, p.n - n_block);
  for (int i = threadIdx.x; i < rows * cols; i += kThreads) {
    const int r = i / cols, n = n_block + i % cols;
    const float* src = p.partials + static_cast<long long>(m0 + r) * p.n + n;
    const long long stride = static_cast<long long>(p.m) * p.n;
    float v = 0.f;
#pragma unroll 4
    for (int s = 0; s < p.num_splits; ++s) v += ik::load_coherent(src + s * stride);
    out[(m0 + r) * p.o_sm + n] = ik::dtype<T>::from_float(v);
  }
}
