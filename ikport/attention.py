"""Public attention API: `attention` (contiguous KV cache), `paged_attention` (paged cache) and
`attention_varlen` (FlashAttention's packed variable-length layout).

`attention` and `paged_attention` take torch-SDPA-style [batch, heads, seq, head_dim] tensors;
fewer KV heads than query heads means grouped-query attention. GPU tensors run the decode kernels
of kernels_src/attention/decode.cuh (up to 128 query tokens) or the prefill kernel; CPU tensors
run ikport.reference. Eager calls go to ikport.impl.attention; while torch.compile traces, each
call becomes one custom-op node (ikport.ops).
"""

from __future__ import annotations

import torch

from . import checks, ops
from .impl import attention as _impl
from .plan.decode import DecodeOptions
from .plan.options import Options


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    options: DecodeOptions | Options | None = None,
) -> torch.Tensor:
    """Attention of query tokens over a KV cache: decode (a few tokens) or prefill (any number).

    Args:
        q: [B, Hq, Tq, D] fp16/bf16 (fp32/fp64 too on the CPU), any Tq >= 1: up to 128 run the
            decode kernels on the GPU, longer queries the prefill kernel.
        k, v: [B, Hkv, L, D], Hq a multiple of Hkv. Any strides in the first three dims (e.g. a
            slice of a preallocated cache) as long as the last dim is contiguous and the other
            strides are multiples of 8 elements.
        causal: aligned bottom-right per sequence: query token i (< q_len) sees keys up to
            kv_len - q_len + i. A row that sees no key (q_len > kv_len) gives zeros.
        scale: softmax scale, default 1/sqrt(D).
        kv_lens: int32 [B] on q's device: valid keys per sequence (default L). Values are
            clamped to [0, L] on the device; a sequence of length 0 gives zeros.
        q_lens: int32 [B] on q's device, contiguous: valid query tokens per sequence, the first
            q_lens[b] of Tq (default Tq; a ragged batch padded to Tq). Values are clamped to
            [0, Tq] on the device; rows past q_len are written as zeros.
        out: optional [B, Hq, Tq, D] contiguous tensor (q's dtype) to write the result into.
        options: an `ikport.DecodeOptions` (decode) or `ikport.PrefillOptions` (prefill) pinning
            a journey variant or a launch choice, for benchmarks and tuning runs; default None
            (the planner decides).

    Returns:
        [B, Hq, Tq, D] in q's dtype.

    Example:
        >>> q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.float16)
        >>> k = torch.randn(8, 8, 4096, 128, device="cuda", dtype=torch.float16)
        >>> out = ikport.attention(q, k, k, kv_lens=torch.full((8,), 4000, dtype=torch.int32, device="cuda"))
        >>> x = torch.randn(2, 32, 1000, 128, device="cuda", dtype=torch.float16)    # prefill
        >>> out = ikport.attention(x, x[:, :8], x[:, :8], causal=True)              # [2, 32, 1000, 128]
    """
    if torch.compiler.is_compiling():  # traced: one custom-op node
        return ops.traced_attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, out=out,
                                    options=options, q_lens=q_lens)
    return _impl.attention(q, k, v, causal, scale, kv_lens, out, options, q_lens=q_lens)


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    q_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    options: DecodeOptions | Options | None = None,
) -> torch.Tensor:
    """Attention over a paged KV cache (the vLLM/SGLang layout): decode, or chunked prefill (the
    chunk's own K/V already written to the pages, kv_lens counting them).

    Args:
        q: [B, Hq, Tq, D].
        k_pages, v_pages: [num_pages, Hkv, page_size, D]; page_size a power of two in [1, 256].
        block_table: int32 [B, max_pages]: page ids of each sequence, in order. Entries for
            pages below kv_len must be valid page ids (they are not range-checked on the device);
            entries past kv_len may hold anything.
        kv_lens: int32 [B] on the device (clamped to [0, max_pages * page_size]).
    Other arguments as in `attention` (causal: query i of a chunk of q_len tokens sees keys up
    to kv_len - q_len + i, i.e. the prefix and the chunk up to itself).

    Example:
        >>> # a chunk of 512 new tokens per sequence after a cached prefix of 1000
        >>> lens = torch.full((B,), 1512, dtype=torch.int32, device="cuda")
        >>> out = ikport.paged_attention(q_chunk, k_pages, v_pages, table, lens, causal=True)
    """
    if torch.compiler.is_compiling():  # traced: one custom-op node
        return ops.traced_paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal=causal,
                                          scale=scale, out=out, options=options, q_lens=q_lens)
    return _impl.paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal, scale, out, options,
                                 q_lens=q_lens)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    options: Options | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over sequences of different lengths packed one after another (FlashAttention's
    `flash_attn_varlen_func` layout): no padding.

    Args:
        q: [total_q, Hq, D] fp16/bf16 (fp32/fp64 too on the CPU): the query tokens of every
            sequence, sequence b at rows cu_seqlens_q[b]:cu_seqlens_q[b + 1].
        k, v: [total_k, Hkv, D], Hq a multiple of Hkv; sequence b at rows
            cu_seqlens_k[b]:cu_seqlens_k[b + 1]. Last dim contiguous, other strides multiples of
            8 elements (a slice of a packed QKV projection is fine).
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] on q's device, contiguous: offsets starting at
            0, non-decreasing, ending at total_q / total_k (a sequence may be empty). Checked on
            the CPU; on the GPU only with IKPORT_CHECK_TABLES=1 (it reads them back).
        max_seqlen_q, max_seqlen_k: Python ints >= the longest sequence (the launch grid).
        causal: aligned bottom-right per sequence: query i of sequence b sees keys up to
            k_len_b - q_len_b + i. A row that sees no key gives zeros (and lse -inf).
        scale: softmax scale, default 1/sqrt(D).
        out: optional [total_q, Hq, D] contiguous tensor (q's dtype) to write the result into.
        return_lse: also return the log-sum-exp of each row's scaled scores (natural log).
        options: an `ikport.PrefillOptions` pinning launch choices (benchmarks); default None.

    Returns:
        out [total_q, Hq, D] in q's dtype; with return_lse, (out, lse) with lse fp32 [Hq, total_q]
        (FlashAttention's convention).

    Example:
        >>> lens = [1000, 17, 0, 300]
        >>> cu = torch.tensor([0, 1000, 1017, 1017, 1317], dtype=torch.int32, device="cuda")
        >>> q = torch.randn(1317, 32, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(1317, 8, 128, device="cuda", dtype=torch.bfloat16)
        >>> out, lse = ikport.attention_varlen(q, k, v, cu, cu, 1000, 1000, causal=True, return_lse=True)
    """
    if torch.compiler.is_compiling():  # traced: one custom-op node
        return ops.traced_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           causal=causal, scale=scale, out=out, return_lse=return_lse,
                                           options=options)
    return _impl.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                  out, return_lse, options)


def paged_kv_from_dense(
    k: torch.Tensor,
    v: torch.Tensor,
    page_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy a dense cache [B, Hkv, L, D] into pages [B * ceil(L / page_size), Hkv, page_size, D]
    and an int32 block table [B, ceil(L / page_size)]; `shuffle` scatters the pages in a random
    (non-monotonic) order, as a long-running server's allocator would. For tests and benchmarks."""
    checks.paged_kv_from_dense(k, v, page_size)
    B, Hkv, L, D = k.shape
    n = -(-L // page_size)
    pad = n * page_size - L
    def pages(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        return x.view(B, Hkv, n, page_size, D).permute(0, 2, 1, 3, 4).reshape(B * n, Hkv, page_size, D)
    order = (
        torch.randperm(B * n, generator=generator) if shuffle else torch.arange(B * n)
    ).to(k.device)
    k_pages = torch.empty((B * n, Hkv, page_size, D), dtype=k.dtype, device=k.device)
    v_pages = torch.empty_like(k_pages)
    k_pages[order] = pages(k)
    v_pages[order] = pages(v)
    block_table = order.view(B, n).to(torch.int32).contiguous()
    return k_pages, v_pages, block_table
