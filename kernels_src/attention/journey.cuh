// journey.cuh -- the journey's kernels kept callable (docs/results/decode.md): v0, the baseline
// every later version is measured against.
#pragma once
#include "common.cuh"

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
