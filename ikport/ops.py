"""ikport's public ops as PyTorch custom ops, for torch.compile and torch.export.

    torch.ops.ikport.attention(q, k, v, kv_lens, causal, scale, variant) -> Tensor
    torch.ops.ikport.paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal, scale,
                                     variant) -> Tensor
    torch.ops.ikport.w4a16_matmul(x, qweight, scales, zeros, perm, group_size, in_features,
                                  out_features, layout, variant) -> Tensor

Eager calls of `ikport.attention` / `ikport.paged_attention` never go through these: a custom-op
dispatch costs 10-20 us of Python per call. Only while torch.compile (or torch.export) traces a
function do the public functions route here, so the compiled graph holds one opaque node per
call (no graph break, `fullgraph=True` holds). The real implementation of each op is the eager
path itself; the fake (meta) implementation checks what can be checked without data (ranks,
dtypes, devices, head counts) and returns an empty contiguous [B, Hq, Tq, D] tensor.

The ops mutate nothing and return a new tensor. An `out=` given to a public function under
torch.compile is filled by a copy after the op (`out.copy_(result)`), outside the op.

Importing ikport registers both ops once (re-importing or reloading this module keeps the first
registration).
"""

# No `from __future__ import annotations` here: torch.library infers each op's schema from the
# annotations, which stay real types (every torch >= 2.4 reads them the same way).
from typing import Optional

import torch

from . import checks
from .attention import attention as _eager_attention
from .attention import paged_attention as _eager_paged_attention
from .int4 import Int4Weight
from .w4a16 import w4a16_matmul as _eager_w4a16_matmul

__all__ = ["attention", "paged_attention", "w4a16_matmul", "traced_attention",
           "traced_paged_attention", "traced_w4a16_matmul"]


def _new_output(q: torch.Tensor) -> torch.Tensor:
    # Contiguous [B, Hq, Tq, D] like the real op's output, whatever q's strides.
    return q.new_empty(q.shape)


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: Optional[torch.Tensor],
    causal: bool, scale: Optional[float], variant: Optional[str],
) -> torch.Tensor:
    return _eager_attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, variant=variant)


def _attention_fake(q, k, v, kv_lens, causal, scale, variant):
    # Layout and alignment need data pointers: the real op checks them at run time.
    checks.attention(q, k, v, kv_lens, gpu=False)
    return _new_output(q)


def _paged_impl(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
    kv_lens: torch.Tensor, causal: bool, scale: Optional[float], variant: Optional[str],
) -> torch.Tensor:
    return _eager_paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal=causal,
                                  scale=scale, variant=variant)


def _paged_fake(q, k_pages, v_pages, block_table, kv_lens, causal, scale, variant):
    checks.paged(q, k_pages, v_pages, block_table, kv_lens, gpu=False)
    return _new_output(q)


def _w4a16_impl(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
    perm: Optional[torch.Tensor], group_size: int, in_features: int, out_features: int,
    layout: str, variant: Optional[str],
) -> torch.Tensor:
    w = Int4Weight(qweight, scales, zeros, group_size, in_features, out_features, layout, perm)
    return _eager_w4a16_matmul(x, w, variant=variant)


def _w4a16_fake(x, qweight, scales, zeros, perm, group_size, in_features, out_features, layout,
                variant):
    w = Int4Weight(qweight, scales, zeros, group_size, in_features, out_features, layout, perm)
    checks.w4a16(x, w, None, gpu=False)
    return x.new_empty((*x.shape[:-1], out_features))


def _registered(name: str) -> bool:
    try:
        getattr(torch.ops.ikport, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _register() -> None:
    if not _registered("attention"):
        op = torch.library.custom_op("ikport::attention", mutates_args=())(_attention_impl)
        op.register_fake(_attention_fake)
    if not _registered("paged_attention"):
        op = torch.library.custom_op("ikport::paged_attention", mutates_args=())(_paged_impl)
        op.register_fake(_paged_fake)
    if not _registered("w4a16_matmul"):
        op = torch.library.custom_op("ikport::w4a16_matmul", mutates_args=())(_w4a16_impl)
        op.register_fake(_w4a16_fake)


_register()
attention = torch.ops.ikport.attention.default
paged_attention = torch.ops.ikport.paged_attention.default
w4a16_matmul = torch.ops.ikport.w4a16_matmul.default


def traced_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    scale: float | None = None, kv_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None, variant: str | None = None,
) -> torch.Tensor:
    """`ikport.attention` while torch.compile traces: one custom-op node, then `out` by copy."""
    result = torch.ops.ikport.attention.default(
        q, k, v, kv_lens, bool(causal), checks.scale(scale, traced=True), variant)
    if out is None:
        return result
    checks.out(out, q)
    out.copy_(result)
    return out


def traced_paged_attention(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
    kv_lens: torch.Tensor, *, causal: bool = False, scale: float | None = None,
    out: torch.Tensor | None = None, variant: str | None = None,
) -> torch.Tensor:
    """`ikport.paged_attention` while torch.compile traces (see `traced_attention`)."""
    result = torch.ops.ikport.paged_attention.default(
        q, k_pages, v_pages, block_table, kv_lens, bool(causal), checks.scale(scale, traced=True),
        variant)
    if out is None:
        return result
    checks.out(out, q)
    out.copy_(result)
    return out


def traced_w4a16_matmul(x: torch.Tensor, weight: Int4Weight, *, out: torch.Tensor | None = None,
                        variant: str | None = None) -> torch.Tensor:
    """`ikport.w4a16_matmul` while torch.compile traces (see `traced_attention`)."""
    w = weight
    result = torch.ops.ikport.w4a16_matmul.default(
        x, w.qweight, w.scales, w.zeros, w.perm, w.group_size, w.in_features, w.out_features,
        w.layout, variant)
    if out is None:
        return result
    checks.w4a16(x, w, out, gpu=False)
    out.copy_(result)
    return out
