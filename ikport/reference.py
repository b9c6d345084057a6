"""Plain-PyTorch attention: the correctness oracle of every kernel, and the CPU path.

Computed in fp32 (or fp64 when asked) whatever the input dtype; the result is cast back.
"""

from __future__ import annotations

import math

import torch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    upcast: torch.dtype = torch.float32,
) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, L, D] (Hq a multiple of Hkv), kv_lens [B] or None (= L).

    Query token i of sequence b sees keys j < kv_lens[b], and, when causal, j <= kv_lens[b] - Tq + i
    (bottom-right alignment). A query row that sees no key returns zeros.
    """
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = Hq // Hkv
    qf = q.to(upcast)
    kf = k.to(upcast).repeat_interleave(group, dim=1)
    vf = v.to(upcast).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hq, Tq, L]
    lens = (
        torch.full((B,), L, dtype=torch.int64, device=q.device)
        if kv_lens is None
        else kv_lens.to(device=q.device, dtype=torch.int64).clamp(0, L)
    )
    j = torch.arange(L, device=q.device).view(1, 1, 1, L)
    limit = lens.view(B, 1, 1, 1) - 1  # last visible key per row
    if causal:
        limit = limit - (Tq - 1) + torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
    visible = j <= limit
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key: all -inf -> zeros
    return torch.matmul(probs, vf).to(q.dtype)


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Dense [B, Hkv, length, D] from pages [num_pages, Hkv, page_size, D] and a block table."""
    num_pages, Hkv, ps, D = pages.shape
    B, max_pages = block_table.shape
    n = (length + ps - 1) // ps
    idx = block_table[:, :n].to(device=pages.device, dtype=torch.int64)
    # Entries past a sequence's kv_len may hold anything (-1, stale ids): clamped into the pool as
    # the kernels' early copies clamp them; the rows they give are masked.
    idx = idx.clamp(0, max(num_pages - 1, 0))
    g = pages[idx.reshape(-1)].view(B, n, Hkv, ps, D).permute(0, 2, 1, 3, 4)
    return g.reshape(B, Hkv, n * ps, D)[:, :, :length]


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    upcast: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The paged layout's reference: gather the pages, then `attention`."""
    length = block_table.shape[1] * k_pages.shape[2]
    k = gather_pages(k_pages, block_table, length)
    v = gather_pages(v_pages, block_table, length)
    return attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, upcast=upcast)


def mma_tile(a: torch.Tensor, b: torch.Tensor, b_transposed: bool) -> torch.Tensor:
    """fp32 A @ B (B given as Bt [N, K] when b_transposed): the matrix shim's oracle."""
    bf = b.float().t() if b_transposed else b.float()
    return a.float() @ bf


def w4a16_matmul(x: torch.Tensor, weight, upcast: torch.dtype = torch.float32) -> torch.Tensor:
    """x [..., K] @ W^T with W = weight.dequantize() (an ikport.int4.Int4Weight), in `upcast`;
    cast back to x's dtype."""
    w = weight.dequantize(upcast).to(x.device)
    return (x.to(upcast) @ w.T).to(x.dtype)
