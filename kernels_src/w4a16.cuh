// w4a16.cuh -- out[M, N] = x[M, K] * W[N, K]^T with W held as 4-bit codes (weight-only INT4,
// fp16/bf16 activations): w[n][k] = (q[n][k] - z[k/G][n]) * s[k/G][n], z = 8 when symmetric.
// Written once in the ik:: vocabulary (portability/ik.cuh); no vendor branches.
//
// Packed weights (ikport/int4.py builds them): the codes sit in the order the target's matrix
// unit wants its B fragment (B = W^T, a 16x16 tile is k x n), so a lane turns one 16-byte load
// straight into B fragments with no shuffles. Per tile a lane holds kB codes (8 on NVIDIA, 4 on
// CDNA, 16 on RDNA3 whose lanes 16-31 repeat 0-15): 256/kB "unique lanes" hold a tile, and one
// 16-byte lane vector covers TPC = 32/kB tiles along k: a chunk of KC = 16*TPC k. The vector of
// unique lane u for n-tile nt and chunk c is uint4 #((nt * (Kp/KC) + c) * UL + u). Inside it,
// register r = t*(kB/2) + p (tile t of the chunk, B slot pair p) is word r/4, nibbles r%4 (slot
// 2p) and r%4 + 4 (slot 2p + 1): the pair one int4_pair() call unpacks.
//   x [M, K] (row stride x_sm, 16-byte aligned rows), scales/zeros [ceil(K/G), N], out [M, N] (o_sm).
//   N % 16 == 0, K % 32 == 0 (the Python side checks). K tails: the codes are stored for
//   Kp = packed_k (K rounded up to 128, the largest chunk, so every layout holds every weight),
//   but the kernels walk only the ceil(K/KC) chunks that hold real k; in the last, partial one
//   x is zero past K (a 16-byte piece of x, 8 k, is all in or all out as K % 32 == 0), and the
//   group index is clamped to K - 1's (the matrix-unit kernel zero-fills a scale period past K
//   instead), so the padded codes multiply zeros with finite scales.
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
  int packed_k;    // the codes' K in storage: K rounded up to 128 (ikport.int4.packed_k)
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
constexpr int kLdX = kChunk + 8;  // row stride (elements) of the matrix-unit kernel's x slabs

IK_DEVICE unsigned int word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
IK_DEVICE const uint4* lane_vector(const W4A16Params& p, int ntile, int chunk, int lane) {
  return reinterpret_cast<const uint4*>(p.qweight) +
         (static_cast<long long>(ntile) * (p.packed_k / kChunk) + chunk) * kUniqueLanes + lane % kUniqueLanes;
}
// Chunks holding real k (the last may be partial); the padded chunks after them are never read.
IK_DEVICE int num_chunks(const W4A16Params& p) { return (p.k + kChunk - 1) / kChunk; }
// The group of input channel k, clamped to the last real one (a padded k of the partial chunk).
IK_DEVICE int group_of(const W4A16Params& p, int k) { return min(k, p.k - 1) >> p.group_log2; }

// Scale and zero point of (group, column) as the packed pairs int4_pair() takes.
template <class T>
struct GroupParams {
  unsigned int z2, s2;
};
// A zero point (the bits of a small integer in T, as `zeros` holds it) as the pair int4_pair()
// subtracts: base + z in both halves, exact in T's bits.
template <class T>
IK_DEVICE unsigned int zero_pair(unsigned short bits) {
  return (ik::dtype<T>::kInt4Base + static_cast<unsigned int>(ik::dtype<T>::unpack2(bits).x)) * 0x10001u;
}
template <class T>
inline constexpr unsigned int kSymmetricZeroPair = (ik::dtype<T>::kInt4Base + 8) * 0x10001u;
template <class T>
IK_DEVICE GroupParams<T> group_params(const W4A16Params& p, int group, int col) {
  long long i = static_cast<long long>(group) * p.n + col;
  unsigned int s = *(static_cast<const unsigned short*>(p.scales) + i);
  unsigned int z2 = kSymmetricZeroPair<T>;
  if (p.zeros) z2 = zero_pair<T>(static_cast<const unsigned short*>(p.zeros)[i]);
  return {z2, s * 0x10001u};
}

// Code of slot s of register pair r, as an integer (the scalar, pre-"magic number" path).
IK_DEVICE int code_at(const uint4& v, int r, int half) {
  return static_cast<int>((word_of(v, r / 4) >> (4 * (r % 4 + 4 * half))) & 0xfu);
}

// Sums, over the warp, what every lane holds for each of the tile's 16 columns in acc[slot]
// (slot -> column from the layout); lane c < 16 gets column c's total.
IK_DEVICE float column_total(const float (&acc)[kB]) {
  const int lane = ik::lane_id();
  float mine = 0.f;
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    float v = 0.f;
#pragma unroll
    for (int s = 0; s < kB; ++s) v += L::b_col(lane, s) == c ? acc[s] : 0.f;
    v = ik::warp_sum(v);
    mine = lane == c ? v : mine;
  }
  return mine;
}

// Split-K's end, after every block wrote its fp32 partial tile (rows x cols at m0, n0) to
// `partials`: the last block of the output tile to arrive (a counter) adds the partials in split
// order (deterministic), writes the output and resets its counter for the next call or graph
// replay. Every thread of the block calls it.
template <class T, int kCols, int kThreads>
IK_DEVICE void merge_splits(const W4A16Params& p, int m0, int rows, int n0, int cols) {
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
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < rows * kCols; i += kThreads) {
    if (i % kCols >= cols) continue;
    const int r = i / kCols, n = n0 + i % kCols;
    const float* src = p.partials + static_cast<long long>(m0 + r) * p.n + n;
    const long long stride = static_cast<long long>(p.m) * p.n;
    float v = 0.f;
#pragma unroll 4
    for (int s = 0; s < p.num_splits; ++s) v += ik::load_coherent(src + s * stride);
    out[(m0 + r) * p.o_sm + n] = ik::dtype<T>::from_float(v);
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
    for (int c = 0; c < w4::num_chunks(p); ++c) {
      const uint4 v = *w4::lane_vector(p, ntile, c, lane);
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int t = r / w4::kPairs, pair = r % w4::kPairs;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int s = 2 * pair + h;
          const int k = c * w4::kChunk + 16 * t + ik::mma::b_row(s);
          if (k >= p.k) continue;  // padding in the last chunk
          const int n = 16 * ntile + ik::mma::b_col(s);
          const long long g = static_cast<long long>(k >> p.group_log2) * p.n + n;
          const float z = zeros ? ik::dtype<T>::to_float(zeros[g]) : 8.f;
          const float w = (static_cast<float>(w4::code_at(v, r, h)) - z) * ik::dtype<T>::to_float(scales[g]);
          acc[s] += w * ik::dtype<T>::to_float(x[k]);
        }
      }
    }
  }
  const float total = w4::column_total(acc);
  if (lane < 16) static_cast<T*>(p.out)[m * p.o_sm + 16 * ntile + lane] = ik::dtype<T>::from_float(total);
}

// ---------------------------------------------------------------------------------------------
// v1/v2 GEMV: WARPS warps share one 16-column tile and split K between them; the row of x is
// staged in shared memory once per block. MAGIC picks the unpacking: false extracts each code
// with a shift and a mask and converts it to float; true turns two codes at once into a packed
// fp16/bf16 pair with one OR against a magic exponent (int4_pair), then one subtract-multiply.
// grid (N/16, M), block WARPS warps, dynamic shared memory ceil(K/KC)*KC elements of T (x, then
// zeros up to the end of the last chunk).
template <class T, bool MAGIC, int WARPS>
__global__ void __launch_bounds__(WARPS * IK_WARP_SIZE) w4a16_gemv(W4A16Params p) {
  extern __shared__ __attribute__((aligned(16))) unsigned char w4_smem[];
  T* s_x = reinterpret_cast<T*>(w4_smem);
  __shared__ float s_red[WARPS][16];
  const int lane = ik::lane_id(), warp = ik::warp_id(), ntile = blockIdx.x, m = blockIdx.y;
  const T* x = static_cast<const T*>(p.x) + m * p.x_sm;
  const int chunks = w4::num_chunks(p);
  for (int i = threadIdx.x; i < chunks * (w4::kChunk / 8); i += WARPS * IK_WARP_SIZE)
    ik::store16(s_x + 8 * i, 8 * i < p.k ? ik::load16(x + 8 * i) : make_uint4(0, 0, 0, 0));
  ik::block_sync();

  const T* scales = static_cast<const T*>(p.scales);
  const T* zeros = static_cast<const T*>(p.zeros);
  float acc[w4::kB] = {};
  if (lane < w4::kUniqueLanes) {
    for (int c = warp; c < chunks; c += WARPS) {
      const uint4 v = *w4::lane_vector(p, ntile, c, lane);
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int t = r / w4::kPairs, pair = r % w4::kPairs;
        const int k = c * w4::kChunk + 16 * t + ik::mma::b_row(2 * pair);  // even: k, k + 1
        const int n = 16 * ntile + ik::mma::b_col(2 * pair);
        const float2 xv = ik::dtype<T>::unpack2(*reinterpret_cast<const unsigned int*>(s_x + k));
        float2 w;
        if constexpr (MAGIC) {
          const w4::GroupParams<T> gp = w4::group_params<T>(p, w4::group_of(p, k), n);
          w = ik::dtype<T>::unpack2(ik::int4_pair<T>(w4::word_of(v, r / 4), r % 4, gp.z2, gp.s2));
        } else {
          const long long g = static_cast<long long>(w4::group_of(p, k)) * p.n + n;
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
  const float total = w4::column_total(acc);
  if (lane < 16) s_red[warp][lane] = total;
  ik::block_sync();
  if (threadIdx.x < 16) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += s_red[w][threadIdx.x];
    static_cast<T*>(p.out)[m * p.o_sm + 16 * ntile + threadIdx.x] = ik::dtype<T>::from_float(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Matrix-unit path (default below ikport.plan.w4a16.DENSE_MIN_M rows). Each warp streams its own
// contiguous K range of the block's NT 16-column tiles (the chunks a warp has in flight are
// neighbours in memory: giving warps alternate chunks instead was 1.4x slower on the H100,
// w4a16.md v7) with no block-wide barrier in the loop: a per-lane cp.async ring
// keeps STAGES chunks of weights, of the matching scale rows (zero points likewise) and of the
// warp's slab of x in flight. Codes become B fragments in registers as exact q - z
// (int4_pair_unscaled); x becomes A fragments from its slab in the ring (loaded straight from
// global memory, every tile waited on an L2 round trip: w4a16.md v7's profile); the matrix
// unit sums (q - z) * x over a "scale period" in fp32, and the period's scales multiply that sum
// once per output element. A period is the whole chunk when a group spans it (GT tiles of 16 k
// per group, capped at the chunk), else one group. The loop body has no data-dependent branch
// but the group start (one per chunk): column tiles past N (N/16 not a multiple of NT) read the
// last real tile and are never stored, and the source pointers advance by a constant per chunk.
// The block's warps then add their partial tiles in shared memory. Split-K across blocks:
// blockIdx.y takes chunks_per_split chunks; partial sums go to `partials`, and the last block of
// each output tile to finish (a counter) adds them in split order (deterministic), writes the
// output and resets its counter for the next call or graph replay.
// grid (N / (16 NT), num_splits, ceil(M / (16 MT))), block WARPS warps, dynamic shared memory
// for the x slabs: STAGES * WARPS * min(M, 16 MT) * w4::kLdX elements (ikport/w4a16.py).
// GT = min(G / 16, 8): 16-k tiles per group as far as the kernel cares (ikport.plan.w4a16.group_tiles).
template <class T, int MT, int NT, int WARPS, int GT, int STAGES>
__global__ void __launch_bounds__(WARPS * IK_WARP_SIZE) w4a16_mma(W4A16Params p) {
  using L = w4::L;
  constexpr int kRows = 16 * MT, kCols = 16 * NT;
  constexpr int kThreads = WARPS * IK_WARP_SIZE;
  // Ring slots per lane: STAGES, fewer where the weight ring would pass 32 KB (CDNA's 64-lane
  // waves double a block's lanes); ikport.plan.w4a16.stages applies the same rule.
  constexpr int kDepth = STAGES * NT * kThreads * 16 <= 32768 ? STAGES : 32768 / (NT * kThreads * 16);
  static_assert(kDepth >= 2, "the ring needs two slots: fewer column tiles or warps");
  constexpr int kTiles = w4::kTilesPerChunk;
  constexpr int kPeriodTiles = GT < kTiles ? GT : kTiles;
  constexpr int kPeriods = kTiles / kPeriodTiles;
  static_assert(kTiles % kPeriodTiles == 0, "a scale period divides the chunk");
  constexpr int kC = ik::mma::kCSlots;
  // Per warp and ring slot: one row of scales (and zero points) of its kCols columns per period,
  // 16 bytes = 8 columns per copy.
  constexpr int kScaleVecs = kPeriods * kCols / 8;
  static_assert(kScaleVecs <= IK_WARP_SIZE, "one 16-byte scale vector per lane at most");
  // The weight ring is dead once the loop ends: the warps' partial tiles reuse its bytes.
  constexpr int kRingBytes = kDepth * NT * kThreads * 16, kRedBytes = WARPS * kRows * kCols * 4;
  __shared__ __attribute__((aligned(16))) unsigned char s_mem[kRingBytes > kRedBytes ? kRingBytes : kRedBytes];
  __shared__ __attribute__((aligned(16))) unsigned short s_scale[kDepth][WARPS][kPeriods][kCols];
  __shared__ __attribute__((aligned(16))) unsigned short s_zero[kDepth][WARPS][kPeriods][kCols];
  auto s_ring = reinterpret_cast<uint4(*)[NT][kThreads]>(s_mem);
  auto s_red = reinterpret_cast<float(*)[kRows * kCols]>(s_mem);

  const int lane = ik::lane_id(), warp = ik::warp_id();
  // x slabs: [kDepth][WARPS][x_rows][kLdX] elements, x_rows = min(M, kRows) rows (M = 1 needs one)
  extern __shared__ __attribute__((aligned(16))) unsigned char w4_smem[];
  constexpr int kLdX = w4::kLdX;
  const int x_rows = min(p.m, kRows);
  T* s_x = reinterpret_cast<T*>(w4_smem) + warp * x_rows * kLdX;  // + slot * WARPS * x_rows * kLdX
  const int num_chunks = w4::num_chunks(p);
  const int b_begin = blockIdx.y * p.chunks_per_split;
  const int b_end = min(num_chunks, b_begin + p.chunks_per_split);
  const int per_warp = (b_end - b_begin + WARPS - 1) / WARPS;
  const int c_begin = min(b_end, b_begin + warp * per_warp);  // this warp's chunks: c_begin + i
  const int iters = min(b_end, c_begin + per_warp) - c_begin;
  const int ntile0 = blockIdx.x * NT;
  const int n0 = ntile0 * 16;
  const int m0 = blockIdx.z * kRows;
  const int rows = min(kRows, p.m - m0);
  const int cols = min(kCols, p.n - n0);  // N % 16 == 0: a tile is all in or all out
  const T* x = static_cast<const T*>(p.x) + m0 * p.x_sm;
  const unsigned short* scales = static_cast<const unsigned short*>(p.scales);
  const unsigned short* zeros = static_cast<const unsigned short*>(p.zeros);

  // Where the next chunk's copies come from: this lane's weight vector of each column tile (tiles
  // past N repeat the last real one), and (lanes < kScaleVecs) one 16-byte piece of a period's
  // scale row.
  const uint4* w_next[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) w_next[nt] = w4::lane_vector(p, min(ntile0 + nt, p.n / 16 - 1), c_begin, lane);
  // ... and of the chunk's x slab: 8 elements of row x_r0 + j * kXRowsPerPass (j < kXPasses)
  constexpr int kXVecsPerRow = w4::kChunk / 8;
  constexpr int kXRowsPerPass = IK_WARP_SIZE / kXVecsPerRow;
  constexpr int kXPasses = (kRows + kXRowsPerPass - 1) / kXRowsPerPass;
  const int x_r0 = lane / kXVecsPerRow, x_c8 = lane % kXVecsPerRow;
  const T* x_src = x + x_r0 * p.x_sm + c_begin * w4::kChunk + 8 * x_c8;
  const long long x_pass = kXRowsPerPass * p.x_sm;
  T* const x_dst = s_x + x_r0 * kLdX + 8 * x_c8;  // in ring slot 0
  const int s_period = lane / (kCols / 8), s_c8 = lane % (kCols / 8);
  const unsigned short* s_src = scales + min(n0 + 8 * s_c8, p.n - 8);
  const unsigned short* z_src = zeros ? zeros + min(n0 + 8 * s_c8, p.n - 8) : nullptr;
  // K tails: this lane's x piece of chunk c is real while c * KC < x_limit; a scale period past K
  // (the last chunk's padding) gets zero scales and zero points, its rows never read.
  const int x_limit = p.k - 8 * x_c8;
  // Issue this warp's i-th chunk into ring slot `slot` (in order of i). Always commit, so
  // "kDepth - 1 groups pending" always means "chunk i has landed".
  auto issue = [&](int i, int slot) {
    if (i < iters) {
      const int c = c_begin + i;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        ik::cp_async16(&s_ring[slot][nt][threadIdx.x], w_next[nt]);
        w_next[nt] += w4::kUniqueLanes;
      }
      T* xs = x_dst + slot * WARPS * x_rows * kLdX;
      const bool x_in = c * w4::kChunk < x_limit;  // else a K tail: zeros, x not read
#pragma unroll
      for (int j = 0; j < kXPasses; ++j) {
        if (j * kXRowsPerPass >= rows) break;  // the same for the whole warp: M = 1 takes one pass
        if (x_r0 + j * kXRowsPerPass < rows)
          ik::cp_async16_zfill(xs + j * kXRowsPerPass * kLdX, x_src + j * x_pass, x_in);
      }
      x_src += w4::kChunk;
      if (lane < kScaleVecs) {  // 32-bit offsets: K/G * N < 2^31 (the Python side checks)
        const int k0 = c * w4::kChunk + 16 * kPeriodTiles * s_period;  // the period's first k
        const unsigned int g = static_cast<unsigned int>(k0) >> p.group_log2;
        const unsigned int off = g * static_cast<unsigned int>(p.n);
        ik::cp_async16_zfill(&s_scale[slot][warp][s_period][8 * s_c8], s_src + off, k0 < p.k);
        if (zeros) ik::cp_async16_zfill(&s_zero[slot][warp][s_period][8 * s_c8], z_src + off, k0 < p.k);
      }
    }
    ik::cp_async_commit();
  };
  ik::mma::FragC acc[MT][NT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) ik::mma::zero(acc[mt][nt]);

#pragma unroll
  for (int d = 0; d < kDepth - 1; ++d) issue(d, d);
  constexpr unsigned int sym_z2 = w4::kSymmetricZeroPair<T>;
  float sc[NT][kC];                 // the current group's scales, at this lane's C columns
  unsigned int z2[NT][w4::kPairs];  // ... and its zero points (base + z), at its B columns

  int scale_group = -1;  // the group whose scales sc / z2 hold
  for (int i = 0; i < iters; ++i) {
    const int c = c_begin + i;
    const int slot = i % kDepth;
    issue(i + kDepth - 1, (slot + kDepth - 1) % kDepth);
    ik::cp_async_wait<kDepth - 1>();
    ik::warp_sync();  // scale rows were copied by other lanes of this warp
    uint4 wv[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) wv[nt] = s_ring[slot][nt][threadIdx.x];
    const T* xs = s_x + slot * WARPS * x_rows * kLdX;
    // With one period per chunk a group may span several of this warp's chunks (per-channel
    // scales: all of them): its scales are read once.
    const int chunk_group = (c * w4::kChunk) >> p.group_log2;
    const bool new_group = chunk_group != scale_group;
    scale_group = chunk_group;
#pragma unroll
    for (int j = 0; j < kPeriods; ++j) {
      if (kPeriods > 1 || new_group) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int s = 0; s < kC; ++s)
            sc[nt][s] = ik::dtype<T>::unpack2(s_scale[slot][warp][j][16 * nt + L::c_col(lane, s)]).x;
#pragma unroll
          for (int pair = 0; pair < w4::kPairs; ++pair) {
            const int col = 16 * nt + L::b_col(lane, 2 * pair);
            z2[nt][pair] = zeros ? w4::zero_pair<T>(s_zero[slot][warp][j][col]) : sym_z2;
          }
        }
      }
      // Within a period the matrix unit sums (q - z) * x exactly (small integers times x, fp32
      // accumulation); the period's scales multiply that sum once per output element.
      ik::mma::FragC pacc[MT][NT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) ik::mma::zero(pacc[mt][nt]);
#pragma unroll
      for (int tt = 0; tt < kPeriodTiles; ++tt) {
        const int t = j * kPeriodTiles + tt;
        ik::mma::FragA<T> a[MT] = {};  // rows past M: garbage in, garbage out, never stored
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          if (mt == 0 || 16 * mt < rows) ik::mma::load_a_rows(a[mt], xs + 16 * mt * kLdX + 16 * t, kLdX, rows - 16 * mt);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          ik::mma::FragB<T> b;
#pragma unroll
          for (int pair = 0; pair < w4::kPairs; ++pair) {
            const int r = t * w4::kPairs + pair;
            ik::mma::set_b_pair(b, pair, ik::int4_pair_unscaled<T>(w4::word_of(wv[nt], r / 4), r % 4, z2[nt][pair]));
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) ik::mma::mma(pacc[mt][nt], a[mt], b);
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int s = 0; s < kC; ++s) acc[mt][nt].x[s] += sc[nt][s] * pacc[mt][nt].x[s];
    }
    ik::warp_sync();  // every lane has read this slot's scales before a later issue refills it
  }
  ik::cp_async_wait<0>();
  ik::block_sync();  // every warp is done with the ring
  // The block's warps add their partial tiles (fixed order: deterministic).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int s = 0; s < kC; ++s)
        s_red[warp][(16 * mt + L::c_row(lane, s)) * kCols + 16 * nt + L::c_col(lane, s)] = acc[mt][nt].x[s];
  ik::block_sync();
  T* out = static_cast<T*>(p.out);
  float* part = p.partials + static_cast<long long>(blockIdx.y) * p.m * p.n;
  for (int i = threadIdx.x; i < rows * kCols; i += kThreads) {
    if (i % kCols >= cols) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += s_red[w][i];
    const int r = i / kCols, n = n0 + i % kCols;
    if (p.num_splits == 1) out[(m0 + r) * p.o_sm + n] = ik::dtype<T>::from_float(v);
    else part[static_cast<long long>(m0 + r) * p.n + n] = v;
  }
  if (p.num_splits == 1) return;
  w4::merge_splits<T, kCols, kThreads>(p, m0, rows, n0, cols);
}

// ---------------------------------------------------------------------------------------------
// Tiled matrix-unit GEMM for prefill-sized M (Marlin's idea over the shim): a block computes a
// BM x BN tile of out; K advances a stage of kStageK at a time (one chunk or more: 64 k on
// NVIDIA and RDNA3, CDNA's 128-k chunk) through a STAGES-deep cp.async ring in dynamic shared
// memory holding, per stage, the block's x rows (padded rows: the matrix loads hit no bank
// twice), its packed weights (the library's layout as is: a column tile's chunks are one
// contiguous run of lane vectors, so the copy is coalesced) and the stage's scale and zero-point
// rows (one per 32 k, the smallest group). Warps tile the block WARPS_M x WARPS_N; each keeps
// fp32 accumulators for its (BM / WARPS_M) x (BN / WARPS_N) sub-tile, loads A fragments from the
// x ring and turns each 16-byte lane vector of codes into B fragments in registers right before
// the matrix unit, scaled per group on the way ((q - z) * s in T, int4_pair: the same rounding as
// the dequantizing kernel's dense weight). Rows past M are zero-filled copies (never read),
// column tiles past N read the last real one (never stored), a K tail is zeros in x with the
// group clamped to K - 1's (w4::group_of). Split-K across blocks (few output tiles): blockIdx.y
// takes chunks_per_split chunks (a multiple of the stage's), partials and the last block's merge
// as the skinny kernel's (w4::merge_splits).
// grid (ceil(N / BN), num_splits, ceil(M / BM)), block WARPS_M * WARPS_N warps, dynamic shared
// memory STAGES * w4::tiled_stage_bytes(BM, BN) (ikport.plan.w4a16.tiled_smem).
namespace w4 {
constexpr int kStageChunks = kChunk >= 64 ? 1 : 64 / kChunk;  // chunks per ring stage
constexpr int kStageK = kStageChunks * kChunk;
constexpr int kStageLd = kStageK + 8;   // x rows in the ring: 16-byte aligned, 4 banks apart
constexpr int kStageScaleRows = kStageK / 32;
constexpr int tiled_x_bytes(int bm) { return bm * kStageLd * 2; }
constexpr int tiled_w_bytes(int bn) { return bn * kStageK / 2; }
constexpr int tiled_scale_bytes(int bn) { return kStageScaleRows * bn * 2; }
constexpr int tiled_stage_bytes(int bm, int bn) { return tiled_x_bytes(bm) + tiled_w_bytes(bn) + 2 * tiled_scale_bytes(bn); }
}  // namespace w4

template <class T, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * IK_WARP_SIZE) w4a16_tiled(W4A16Params p) {
  using L = w4::L;
  constexpr int kThreads = WARPS_M * WARPS_N * IK_WARP_SIZE;
  constexpr int kMt = BM / (16 * WARPS_M), kNt = BN / (16 * WARPS_N);  // warp sub-tile, in 16s
  static_assert(kMt * 16 * WARPS_M == BM && kNt * 16 * WARPS_N == BN, "the warps tile the block");
  static_assert(STAGES >= 2, "the ring overlaps a stage's copy with another's math");
  constexpr int kChunks = w4::kStageChunks, kBK = w4::kStageK, kLd = w4::kStageLd;
  constexpr int kUL = w4::kUniqueLanes, kSRows = w4::kStageScaleRows;
  constexpr int kXBytes = w4::tiled_x_bytes(BM), kWBytes = w4::tiled_w_bytes(BN);
  constexpr int kSBytes = w4::tiled_scale_bytes(BN), kStageBytes = w4::tiled_stage_bytes(BM, BN);
  static_assert(kXBytes % 16 == 0 && kWBytes % 16 == 0 && kSBytes % 16 == 0, "16-byte copies");
  extern __shared__ __attribute__((aligned(16))) unsigned char w4_smem[];

  const int tid = threadIdx.x, lane = ik::lane_id(), warp = ik::warp_id();
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.z * BM;
  const int ntile0 = n0 / 16, last_ntile = p.n / 16 - 1;
  const int stages_total = (w4::num_chunks(p) + kChunks - 1) / kChunks;
  const int st_per_split = p.chunks_per_split / kChunks;
  const int st_begin = blockIdx.y * st_per_split;
  const int iters = max(0, min(stages_total, st_begin + st_per_split) - st_begin);
  const T* x = static_cast<const T*>(p.x);
  const uint4* qw = reinterpret_cast<const uint4*>(p.qweight);
  const long long qw_ntile = static_cast<long long>(p.packed_k / w4::kChunk) * kUL;  // vectors per column tile
  const unsigned short* scales = static_cast<const unsigned short*>(p.scales);
  const unsigned short* zeros = static_cast<const unsigned short*>(p.zeros);

  // Stage s of this split into ring slot `slot`; always commit, so "STAGES - 2 groups pending"
  // always means "the stage about to be read has landed".
  auto issue = [&](int s, int slot) {
    if (s < iters) {
      unsigned char* base = w4_smem + slot * kStageBytes;
      T* xs = reinterpret_cast<T*>(base);
      uint4* ws = reinterpret_cast<uint4*>(base + kXBytes);
      unsigned short* ss = reinterpret_cast<unsigned short*>(base + kXBytes + kWBytes);
      const int c0 = (st_begin + s) * kChunks, k0 = c0 * w4::kChunk;
      // (each loop: a fixed number of copies a thread, unrolled; the block's last pass may be partial)
#pragma unroll
      for (int j = 0; j < (BM * (kBK / 8) + kThreads - 1) / kThreads; ++j) {  // x: 8 elements a copy
        const int i = tid + j * kThreads;
        if ((BM * (kBK / 8)) % kThreads != 0 && i >= BM * (kBK / 8)) break;
        const int r = i / (kBK / 8), k = k0 + 8 * (i % (kBK / 8));
        const bool in = m0 + r < p.m && k < p.k;  // rows past M and a K tail: zeros, x not read
        ik::cp_async16_zfill(xs + r * kLd + (k - k0), in ? x + (m0 + r) * p.x_sm + k : x, in);
      }
#pragma unroll
      for (int j = 0; j < ((BN / 16) * kChunks * kUL + kThreads - 1) / kThreads; ++j) {  // codes: a run per column tile
        const int i = tid + j * kThreads;
        if (((BN / 16) * kChunks * kUL) % kThreads != 0 && i >= (BN / 16) * kChunks * kUL) break;
        const int nt = i / (kChunks * kUL);
        const long long src = min(ntile0 + nt, last_ntile) * qw_ntile + static_cast<long long>(c0) * kUL;
        ik::cp_async16(ws + i, qw + src + i % (kChunks * kUL));
      }
#pragma unroll
      for (int j = 0; j < (kSRows * (BN / 8) + kThreads - 1) / kThreads; ++j) {  // a scale row per 32 k, 8 columns a copy
        const int i = tid + j * kThreads;
        if (i >= kSRows * (BN / 8)) break;
        const int row = i / (BN / 8), n = min(n0 + 8 * (i % (BN / 8)), p.n - 8);
        const long long off = static_cast<long long>(w4::group_of(p, k0 + 32 * row)) * p.n + n;
        ik::cp_async16(ss + i * 8, scales + off);
        if (zeros) ik::cp_async16(ss + kSRows * BN + i * 8, zeros + off);
      }
    }
    ik::cp_async_commit();
  };

  ik::mma::FragC acc[kMt][kNt];
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) ik::mma::zero(acc[mt][nt]);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s, s);

  unsigned int s2[kNt][w4::kPairs], z2[kNt][w4::kPairs];  // the current group's, at this lane's B columns
  for (int s = 0; s < iters; ++s) {
    ik::cp_async_wait<STAGES - 2>();
    ik::block_sync();  // stage s landed for every thread; every warp is done with stage s - 1's slot
    issue(s + STAGES - 1, (s + STAGES - 1) % STAGES);
    const unsigned char* base = w4_smem + (s % STAGES) * kStageBytes;
    const T* xs = reinterpret_cast<const T*>(base) + wm * (16 * kMt) * kLd;
    const uint4* ws = reinterpret_cast<const uint4*>(base + kXBytes) + wn * kNt * kChunks * kUL;
    const unsigned short* ss = reinterpret_cast<const unsigned short*>(base + kXBytes + kWBytes);
    const int k0 = (st_begin + s) * kBK;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      uint4 wv[kNt];
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) wv[nt] = ws[(nt * kChunks + c) * kUL + lane % kUL];
#pragma unroll
      for (int tt = 0; tt < w4::kTilesPerChunk; ++tt) {
        const int t = c * w4::kTilesPerChunk + tt;  // 16-k tile of the stage
        const int row = t / 2;                      // its scale row
        // A new scale row is a new group only for G = 32 (or a group boundary): reload then.
        if (t % 2 == 0 && (row == 0 || ((k0 + 32 * row) >> p.group_log2) != ((k0 + 32 * row - 32) >> p.group_log2))) {
#pragma unroll
          for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
            for (int pair = 0; pair < w4::kPairs; ++pair) {
              const int col = row * BN + 16 * (wn * kNt + nt) + L::b_col(lane, 2 * pair);
              s2[nt][pair] = ss[col] * 0x10001u;
              z2[nt][pair] = zeros ? w4::zero_pair<T>(ss[kSRows * BN + col]) : w4::kSymmetricZeroPair<T>;
            }
        }
        ik::mma::FragA<T> a[kMt];
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt) ik::mma::load_a(a[mt], xs + 16 * mt * kLd + 16 * t, kLd);
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
          ik::mma::FragB<T> b;
#pragma unroll
          for (int pair = 0; pair < w4::kPairs; ++pair) {
            const int r = tt * w4::kPairs + pair;
            ik::mma::set_b_pair(b, pair, ik::int4_pair<T>(w4::word_of(wv[nt], r / 4), r % 4, z2[nt][pair], s2[nt][pair]));
          }
#pragma unroll
          for (int mt = 0; mt < kMt; ++mt) ik::mma::mma(acc[mt][nt], a[mt], b);
        }
      }
    }
  }
  ik::cp_async_wait<0>();  // no copy outlives the block

  // Straight from the accumulators: the output (T) or this split's fp32 partials.
  T* out = static_cast<T*>(p.out);
  float* part = p.partials + static_cast<long long>(blockIdx.y) * p.m * p.n;
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int s = 0; s < ik::mma::kCSlots; ++s) {
        const int r = m0 + wm * 16 * kMt + 16 * mt + L::c_row(lane, s);
        const int n = n0 + 16 * (wn * kNt + nt) + L::c_col(lane, s);
        if (r >= p.m || n >= p.n) continue;
        if (p.num_splits == 1) out[r * p.o_sm + n] = ik::dtype<T>::from_float(acc[mt][nt].x[s]);
        else part[static_cast<long long>(r) * p.n + n] = acc[mt][nt].x[s];
      }
  if (p.num_splits == 1) return;
  w4::merge_splits<T, BN, kThreads>(p, m0, min(BM, p.m - m0), n0, min(BN, p.n - n0));
}

// ---------------------------------------------------------------------------------------------
// Dequantize to a dense W [N, K] (row stride o_sm) in T, for large M where a dense GEMM library
// beats streaming INT4 through the matrix units. A block takes one 16-row tile of W and
// kChunksPerBlock chunks of K: each thread unpacks one 16-byte lane vector (32 codes) into a
// shared-memory tile with the same int4_pair as the other kernels, then the block writes the
// tile's rows out in 16-byte stores (contiguous along K).
// Only the first K columns are written (a K tail: the last chunk's padding is dropped).
// grid (N / 16, ceil(ceil(K / KC) / kChunksPerBlock)), block 256 threads.
template <class T>
__global__ void __launch_bounds__(256) w4a16_dequant(W4A16Params p) {
  using L = w4::L;
  constexpr int kChunksPerBlock = 256 / w4::kUniqueLanes;
  constexpr int kTileK = kChunksPerBlock * w4::kChunk;
  constexpr int kLd = kTileK + 8;  // rows stay 16-byte aligned
  __shared__ __attribute__((aligned(16))) T s_w[16 * kLd];
  const int ntile = blockIdx.x, chunks = w4::num_chunks(p);
  const int c0 = blockIdx.y * kChunksPerBlock;
  const int u = threadIdx.x % w4::kUniqueLanes, c = c0 + threadIdx.x / w4::kUniqueLanes;
  const unsigned short* scales = static_cast<const unsigned short*>(p.scales);
  if (c < chunks) {
    const uint4 wv = *w4::lane_vector(p, ntile, c, u);
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int t = r / w4::kPairs, pair = r % w4::kPairs;
      const int kl = (c - c0) * w4::kChunk + 16 * t + L::b_row(u, 2 * pair);  // even
      const int nl = L::b_col(u, 2 * pair);
      const long long g = static_cast<long long>(w4::group_of(p, c * w4::kChunk + 16 * t)) * p.n + 16 * ntile + nl;
      unsigned int z = 8;
      if (p.zeros) z = static_cast<unsigned int>(ik::dtype<T>::to_float(static_cast<const T*>(p.zeros)[g]));
      const unsigned int z2 = (ik::dtype<T>::kInt4Base + z) * 0x10001u, s2 = scales[g] * 0x10001u;
      *reinterpret_cast<unsigned int*>(s_w + nl * kLd + kl) = ik::int4_pair<T>(w4::word_of(wv, r / 4), r % 4, z2, s2);
    }
  }
  ik::block_sync();
  const int width = min(kTileK, p.k - c0 * w4::kChunk);  // a multiple of 32
  T* out = static_cast<T*>(p.out) + static_cast<long long>(16 * ntile) * p.o_sm + c0 * w4::kChunk;
  for (int i = threadIdx.x; i < 16 * (width / 8); i += 256) {
    const int row = i / (width / 8), c8 = i % (width / 8);
    ik::store16(out + row * p.o_sm + 8 * c8, *reinterpret_cast<const uint4*>(s_w + row * kLd + 8 * c8));
  }
}
