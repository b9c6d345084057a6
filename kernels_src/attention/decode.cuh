// decode.cuh -- the attention_decode family (kernels_src/manifest.yaml): decode attention, a few
// new query tokens per sequence attend to the whole KV cache. Written once in the ik:: vocabulary
// (portability/ik.cuh); no vendor branches.
//
// Shapes (strides in elements; the last dim of every tensor is contiguous):
//   q    [B, Hq, Tq, D]            out [B, Hq, Tq, D]
//   K, V contiguous: [B, Hkv, L, D] (any batch/head/seq strides)
//   K, V paged:      [num_pages, Hkv, page_size, D], block_table [B, max_pages] (int32)
//   kv_lens [B] int32 on the device (clamped to [0, L] in the kernel: no host synchronization)
// Query token t of Tq (causal) sees keys [0, kv_len - Tq + t]: aligned bottom-right.
// kv_len == 0 gives a zero output row (documented in docs/api.md).
//
//   common.cuh         DecodeParams, lengths, K/V addressing, a split block's coordinates
//   kv_loader.cuh      KV loaders: the K/V reads of the split kernels (the manifest's `loader`)
//   merge.cuh          warp and split-K merges; attn_decode_combine
//   journey.cuh        attn_decode_naive (v0)
//   decode_vector.cuh  attn_decode_split, attn_decode_split_cluster (vector units)
//   decode_mma.cuh     attn_decode_split_mma, attn_decode_split_mma_cluster (matrix units)
#pragma once
#include "common.cuh"
#include "kv_loader.cuh"
#include "merge.cuh"
#include "journey.cuh"
#include "decode_vector.cuh"
#include "decode_mma.cuh"
