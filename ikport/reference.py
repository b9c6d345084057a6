"""Plain-PyTorch attention: the correctness oracle of every kernel, and the CPU path.

Computed in fp32 (or fp64 when asked) whatever the input dtype; the result is cast back (the
log-sum-exp stays in the computing dtype). Scores are formed in blocks of sequences and query rows
of at most SCORE_BLOCK elements, so the GPU suites can use it as the oracle of long prefills
(4097 x 4097 tokens x 32 heads) without holding the whole score tensor.
"""

from __future__ import annotations

import math

import torch

from .kvquant import dequantize_int4, dequantize_int8, dequantize_kivi_k

SCORE_BLOCK = 2**26  # most scores held at once (256 MiB in fp32; the softmax keeps a few copies)


def _lengths(lens: torch.Tensor | None, batch: int, cap: int, device: torch.device) -> torch.Tensor:
    """int64 [batch]: `lens` clamped to [0, cap], or cap everywhere when None."""
    if lens is None:
        return torch.full((batch,), cap, dtype=torch.int64, device=device)
    return lens.to(device=device, dtype=torch.int64).clamp(0, cap)


def _attention_lse(q, k, v, causal: bool, scale: float | None, kv_lens, q_lens, upcast: torch.dtype,
                   want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Out [B, Hq, Tq, D] and, if `want_lse`, the log-sum-exp [B, Hq, Tq] of the visible scaled
    scores (-inf for a row that sees no key), both in `upcast`. One block when the scores fit in
    SCORE_BLOCK elements (every small call: the same operations as a single batched softmax);
    else per block of sequences, then of query rows."""
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = Hq // Hkv
    kv = _lengths(kv_lens, B, L, q.device).view(B, 1, 1, 1)
    ql = _lengths(q_lens, B, Tq, q.device).view(B, 1, 1, 1)
    out = torch.empty((B, Hq, Tq, v.shape[-1]), dtype=upcast, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=upcast, device=q.device) if want_lse else None
    per_row = max(Hq * L, 1)  # scores of one query row of one sequence
    rows = max(1, min(Tq, SCORE_BLOCK // per_row))
    seqs = max(1, min(B, SCORE_BLOCK // (per_row * Tq))) if rows == Tq else 1
    j = torch.arange(L, device=q.device).view(1, 1, 1, L)
    for b0 in range(0, B, seqs):
        b1 = min(B, b0 + seqs)
        kf = k[b0:b1].to(upcast).repeat_interleave(group, dim=1)
        vf = v[b0:b1].to(upcast).repeat_interleave(group, dim=1)
        for r0 in range(0, Tq, rows):
            r1 = min(Tq, r0 + rows)
            scores = torch.matmul(q[b0:b1, :, r0:r1].to(upcast), kf.transpose(-1, -2)) * scale
            i = torch.arange(r0, r1, device=q.device).view(1, 1, r1 - r0, 1)
            limit = kv[b0:b1] - 1  # last visible key per row
            if causal:  # bottom-right: the sequence's last query token sees its last key
                limit = limit - (ql[b0:b1] - 1) + i
            visible = j <= limit
            if q_lens is not None:
                visible = visible & (i < ql[b0:b1])
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key: all -inf -> zeros
            o = torch.matmul(probs, vf)
            if q_lens is not None:  # rows past q_len: zeros, even where v holds NaN
                o = o.masked_fill(i >= ql[b0:b1], 0.0)
            out[b0:b1, :, r0:r1] = o
            if lse is not None:
                lse[b0:b1, :, r0:r1] = torch.logsumexp(scores, dim=-1)
    return out, lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    upcast: torch.dtype = torch.float32,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Tq, D], k/v [B, Hkv, L, D] (Hq a multiple of Hkv), kv_lens [B] or None (= L),
    q_lens [B] or None (= Tq); both clamped to [0, L] and [0, Tq].

    Query token i < q_lens[b] of sequence b sees keys j < kv_lens[b], and, when causal,
    j <= kv_lens[b] - q_lens[b] + i (bottom-right alignment). A query row that sees no key, and
    every row i >= q_lens[b], returns zeros. With `return_lse` also the log-sum-exp of each row's
    visible scaled scores, [B, Hq, Tq] in `upcast` (-inf where a row sees no key).
    """
    out, lse = _attention_lse(q, k, v, causal, scale, kv_lens, q_lens, upcast, return_lse)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    upcast: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's varlen layout: q [total_q, Hq, D], k/v [total_k, Hkv, D], sequence b
    holding query tokens cu_seqlens_q[b]:cu_seqlens_q[b + 1] and keys cu_seqlens_k[b]:cu_seqlens_k[b + 1].
    Each sequence is `attention` of its own tokens (causal: bottom-right within the sequence).
    Returns out [total_q, Hq, D] in q's dtype and, with `return_lse`, the log-sum-exp [Hq, total_q]
    in `upcast` (-inf for rows that see no key). Reads the offsets back to the host (a GPU
    synchronization): an oracle, not a fast path."""
    total_q, Hq, D = q.shape
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros((total_q, Hq, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=upcast, device=q.device) if return_lse else None
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 <= q0:
            continue
        o, s = _attention_lse(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                              v[k0:k1].transpose(0, 1)[None], causal, scale, None, None, upcast, return_lse)
        out[q0:q1] = o[0].transpose(0, 1).to(q.dtype)
        if lse is not None:
            lse[:, q0:q1] = s[0]
    return (out, lse) if return_lse else out


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
    q_lens: torch.Tensor | None = None,
    upcast: torch.dtype = torch.float32,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The paged layout's reference: gather the pages, then `attention` (chunked prefill: the
    chunk's own K/V already written to the pages, q_lens its query tokens per sequence)."""
    length = block_table.shape[1] * k_pages.shape[2]
    k = gather_pages(k_pages, block_table, length)
    v = gather_pages(v_pages, block_table, length)
    return attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, q_lens=q_lens, upcast=upcast,
                     return_lse=return_lse)


def int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    upcast: torch.dtype = torch.float32,
) -> torch.Tensor:
    """An INT8 cache's reference (ikport.kvquant): codes k, v [B, Hkv, L, D] with scales [B, Hkv, L]
    (or pages [P, Hkv, page_size, D], [P, Hkv, page_size] and `block_table`) dequantized to q's
    dtype (code * scale in fp32, rounded once), then `attention` / `paged_attention`."""
    kd, vd = dequantize_int8(k, k_scale, q.dtype), dequantize_int8(v, v_scale, q.dtype)
    if block_table is not None:
        return paged_attention(q, kd, vd, block_table, kv_lens, causal=causal, scale=scale, upcast=upcast)
    return attention(q, kd, vd, causal=causal, scale=scale, kv_lens=kv_lens, upcast=upcast)


def kivi_kv(k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, k_resid: torch.Tensor,
            kv_lens: torch.Tensor, group: int, dtype: torch.dtype,
            block_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A KIVI INT4 cache (ikport.kvquant) as dense K, V [B, Hkv, capacity, D] in `dtype`, as the
    kernels read it: K rows below kv_len rounded down to `group` from the codes and their group's
    pairs, the rest from the residual (row t at t % group); V from its codes and per-token pairs.
    Paged caches ([pages, Hkv, page_size, ...] with `block_table`) are gathered first."""
    if block_table is not None:
        cap = block_table.shape[1] * k.shape[2]
        k, v, v_scale = (gather_pages(t, block_table, cap) for t in (k, v, v_scale))
    B, Hkv, cap = k.shape[:3]
    kd = dequantize_kivi_k(k, k_scale[:, :, :-(-cap // group)], group, dtype)
    rows = torch.arange(cap, device=k.device)
    qlen = _lengths(kv_lens, B, cap, k.device) // group * group
    resid = k_resid[:, :, rows % group].to(dtype)
    kd = torch.where((rows.view(1, -1) >= qlen.view(-1, 1)).view(B, 1, cap, 1), resid, kd)
    return kd, dequantize_int4(v, v_scale, dtype)


def kivi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                   k_resid: torch.Tensor, group: int, *, block_table: torch.Tensor | None = None,
                   causal: bool = False, scale: float | None = None, kv_lens: torch.Tensor | None = None,
                   upcast: torch.dtype = torch.float32) -> torch.Tensor:
    """A KIVI INT4 cache's reference: `kivi_kv` (dequantized to q's dtype), then `attention`."""
    cap = block_table.shape[1] * k.shape[2] if block_table is not None else k.shape[2]
    lens = kv_lens if kv_lens is not None else torch.full((q.shape[0],), cap, dtype=torch.int32, device=q.device)
    kd, vd = kivi_kv(k, v, k_scale, v_scale, k_resid, lens, group, q.dtype, block_table)
    return attention(q, kd, vd, causal=causal, scale=scale, kv_lens=lens, upcast=upcast)


def mma_tile(a: torch.Tensor, b: torch.Tensor, b_transposed: bool) -> torch.Tensor:
    """fp32 A @ B (B given as Bt [N, K] when b_transposed): the matrix shim's oracle."""
    bf = b.float().t() if b_transposed else b.float()
    return a.float() @ bf


def w4a16_matmul(x: torch.Tensor, weight, upcast: torch.dtype = torch.float32) -> torch.Tensor:
    """x [..., K] @ W^T with W = weight.dequantize() (an ikport.int4.Int4Weight), in `upcast`;
    cast back to x's dtype."""
    w = weight.dequantize(upcast).to(x.device)
    return (x.to(upcast) @ w.T).to(x.dtype)
