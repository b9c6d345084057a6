"""Public attention API: `attention` (contiguous KV cache) and `paged_attention` (paged cache).

Both take torch-SDPA-style [batch, heads, seq, head_dim] tensors; fewer KV heads than query
heads means grouped-query attention. GPU tensors run the decode kernels of
kernels_src/attention/decode.cuh; CPU tensors run ikport.reference. Eager calls go to
ikport.impl.attention; while torch.compile traces, each call becomes one custom-op node
(ikport.ops).
"""

from __future__ import annotations

import torch

from . import checks, ops
from .impl import attention as _impl
from .plan.decode import DecodeOptions


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    options: DecodeOptions | None = None,
) -> torch.Tensor:
    """Attention of a few query tokens over a KV cache.

    Args:
        q: [B, Hq, Tq, D] fp16/bf16 (fp32/fp64 too on the CPU). Tq <= 128 on the GPU.
        k, v: [B, Hkv, L, D], Hq a multiple of Hkv. Any strides in the first three dims (e.g. a
            slice of a preallocated cache) as long as the last dim is contiguous and the other
            strides are multiples of 8 elements.
        causal: query token i sees keys up to kv_len - Tq + i (aligned bottom-right).
        scale: softmax scale, default 1/sqrt(D).
        kv_lens: int32 [B] on q's device: valid keys per sequence (default L). Values are
            clamped to [0, L] on the device; a sequence of length 0 gives zeros.
        out: optional [B, Hq, Tq, D] contiguous tensor (q's dtype) to write the result into.
        options: an `ikport.DecodeOptions` pinning a journey variant or a launch choice, for
            benchmarks and tuning runs; default None (the planner decides).

    Returns:
        [B, Hq, Tq, D] in q's dtype.

    Example:
        >>> q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.float16)
        >>> k = torch.randn(8, 8, 4096, 128, device="cuda", dtype=torch.float16)
        >>> out = ikport.attention(q, k, k, kv_lens=torch.full((8,), 4000, dtype=torch.int32, device="cuda"))
    """
    if torch.compiler.is_compiling():  # traced: one custom-op node
        return ops.traced_attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, out=out,
                                    options=options)
    return _impl.attention(q, k, v, causal, scale, kv_lens, out, options)


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    options: DecodeOptions | None = None,
) -> torch.Tensor:
    """Attention over a paged KV cache (the vLLM/SGLang layout).

    Args:
        q: [B, Hq, Tq, D].
        k_pages, v_pages: [num_pages, Hkv, page_size, D]; page_size a power of two in [1, 256].
        block_table: int32 [B, max_pages]: page ids of each sequence, in order. Entries for
            pages below kv_len must be valid page ids (they are not range-checked on the device);
            entries past kv_len may hold anything.
        kv_lens: int32 [B] on the device (clamped to [0, max_pages * page_size]).
    Other arguments as in `attention`.
    """
    if torch.compiler.is_compiling():  # traced: one custom-op node
        return ops.traced_paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal=causal,
                                          scale=scale, out=out, options=options)
    return _impl.paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal, scale, out, options)


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
