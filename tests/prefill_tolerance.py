"""The prefill GPU suite's yardstick (tests/test_prefill_gpu.py), kept apart so the CPU suite can
test it (tests/test_prefill_tolerance.py).

A kernel's fp16/bf16 output is compared with the fp32 oracle: ikport.reference on fp32 copies of
the very same inputs. It passes when its max abs error, over every element, is at most

    SDPA_FACTOR x (max abs error of torch's F.scaled_dot_product_attention, run in the same dtype
                   on the same inputs with an explicit bottom-right mask, against the same oracle)
    + SLACK[dtype]

    fp16: 2 x SDPA + 1e-3
    bf16: 2 x SDPA + 8e-3

SDPA's error is measured over the rows that see at least one key (SDPA is undefined, NaN, for the
others); those rows must be exact zeros in the kernel's output. The slack covers the rounding of
the output itself where SDPA happens to be exact (one key: the output is a value of v).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SDPA_FACTOR = 2.0
SLACK = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tolerance(sdpa_err: float, dtype: torch.dtype) -> float:
    """The largest max-abs error a kernel in `dtype` may have where SDPA's is `sdpa_err`."""
    return SDPA_FACTOR * sdpa_err + SLACK[dtype]


def visible(Tq: int, L: int, q_len: int, kv_len: int, causal: bool, device="cpu") -> torch.Tensor:
    """bool [Tq, L]: query i sees key t (the contract: i < q_len, t < kv_len, and when causal
    t <= kv_len - q_len + i; lengths clamped to [0, Tq] and [0, L])."""
    q_len, kv_len = min(max(q_len, 0), Tq), min(max(kv_len, 0), L)
    i = torch.arange(Tq, device=device).view(-1, 1)
    t = torch.arange(L, device=device).view(1, -1)
    mask = (i < q_len) & (t < kv_len)
    if causal:
        mask &= t <= kv_len - q_len + i
    return mask


def dense_masks(B: int, Tq: int, L: int, q_lens, kv_lens, causal: bool, device="cpu") -> torch.Tensor:
    """bool [B, Tq, L]: `visible` per sequence; q_lens / kv_lens int tensors or lists, or None."""
    ql = [Tq] * B if q_lens is None else [int(x) for x in q_lens]
    kl = [L] * B if kv_lens is None else [int(x) for x in kv_lens]
    return torch.stack([visible(Tq, L, ql[b], kl[b], causal, device) for b in range(B)])


def sdpa_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: torch.Tensor, masks: torch.Tensor,
               scale: float | None = None) -> float:
    """Max |SDPA - ref| over the rows that see a key. q [B, Hq, Tq, D], k/v [B, Hkv, L, D] in the
    kernel's dtype; ref [B, Hq, Tq, D] fp32; masks bool [B, Tq, L]. One sequence at a time."""
    group = q.shape[1] // k.shape[1]
    err = 0.0
    for b in range(q.shape[0]):
        rows = masks[b].any(-1)
        if not bool(rows.any()):
            continue
        kb = k[b:b + 1].repeat_interleave(group, dim=1)
        vb = v[b:b + 1].repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q[b:b + 1], kb, vb, attn_mask=masks[b:b + 1, None], scale=scale)
        err = max(err, (o[0][:, rows].float() - ref[b][:, rows].float()).abs().max().item())
    return err


def sdpa_error_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, ref: torch.Tensor, causal: bool,
                      scale: float | None = None) -> float:
    """`sdpa_error` of the packed layout: q [total_q, Hq, D], k/v [total_k, Hkv, D], ref
    [total_q, Hq, D] fp32, sequence by sequence."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    err = 0.0
    for b in range(len(cq) - 1):
        nq, nk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if nq == 0 or nk == 0:
            continue
        def seq(x, c, n):
            return x[c:c + n].transpose(0, 1)[None]
        mask = visible(nq, nk, nq, nk, causal, q.device)[None]
        err = max(err, sdpa_error(seq(q, cq[b], nq), seq(k, ck[b], nk), seq(v, ck[b], nk),
                                  seq(ref, cq[b], nq), mask, scale))
    return err
