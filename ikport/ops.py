"""ikport's public ops as PyTorch custom ops, for torch.compile and torch.export.

    torch.ops.ikport.attention(q, k, v, kv_lens, causal, scale, options, q_lens=None) -> Tensor
    torch.ops.ikport.paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal, scale,
                                     options, q_lens=None) -> Tensor
    torch.ops.ikport.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, causal, scale, return_lse, options) -> (Tensor, Tensor)
    torch.ops.ikport.w4a16_matmul(x, qweight, scales, zeros, perm, group_size, in_features,
                                  out_features, layout, options) -> Tensor

`options` is the text form of an ikport.DecodeOptions / PrefillOptions / W4A16Options
(`Options.as_text`; None or "" for the defaults): torch.library schemas carry no dataclasses.
attention and paged_attention take either options kind: there a PrefillOptions' text starts with
"prefill:"; attention_varlen takes only PrefillOptions (its text as is).
`q_lens` comes last with a default, so calls and graphs written before it still hold.
`attention_varlen` always returns two tensors: the log-sum-exp [Hq, total_q] (fp32) with
`return_lse`, else an empty fp32 tensor [0] in its place.

Eager calls of the public functions never go through these: a custom-op dispatch costs 10-20 us
of Python per call. Only while torch.compile (or torch.export) traces a function do the public
functions route here, so the compiled graph holds one opaque node per call (no graph break,
`fullgraph=True` holds). The real implementation of each op is the eager path (ikport.impl); the
fake (meta) implementation checks what can be checked without data (ranks, dtypes, devices,
head counts) and returns an empty contiguous output.

The ops mutate nothing and return a new tensor. An `out=` given to a public function under
torch.compile is filled by a copy after the op (`out.copy_(result)`), outside the op.

Importing ikport registers the ops once (re-importing or reloading this module keeps the first
registration). OPS names them.
"""

# No `from __future__ import annotations` here: torch.library infers each op's schema from the
# annotations, which stay real types (every torch >= 2.4 reads them the same way).
from typing import Optional

import torch

from . import checks
from .impl import attention as _attention
from .impl import w4a16 as _w4a16
from .int4 import Int4Weight
from .plan import DecodeOptions, PrefillOptions, W4A16Options
from .plan.options import Options

OPS = ("attention", "paged_attention", "attention_varlen", "w4a16_matmul")  # torch.ops.ikport.<name>

__all__ = ["OPS", "attention", "paged_attention", "attention_varlen", "w4a16_matmul", "traced_attention",
           "traced_paged_attention", "traced_attention_varlen", "traced_w4a16_matmul"]
_PREFILL_TEXT = "prefill:"  # the text form of a PrefillOptions starts with this


def _new_output(q: torch.Tensor) -> torch.Tensor:
    # Contiguous [B, Hq, Tq, D] like the real op's output, whatever q's strides.
    return q.new_empty(q.shape)


def _attention_options(text: Optional[str]):
    """DecodeOptions or PrefillOptions (or None) from the attention ops' `options` text."""
    if not text:
        return None
    if text.startswith(_PREFILL_TEXT):
        return PrefillOptions.from_text(text[len(_PREFILL_TEXT):])
    return DecodeOptions.from_text(text)


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: Optional[torch.Tensor],
    causal: bool, scale: Optional[float], options: Optional[str], q_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _attention.attention(q, k, v, causal, scale, kv_lens, None, _attention_options(options), q_lens=q_lens)


def _attention_fake(q, k, v, kv_lens, causal, scale, options, q_lens=None):
    # Layout and alignment need data pointers: the real op checks them at run time.
    checks.attention(q, k, v, kv_lens, gpu=False, q_lens_=q_lens)
    return _new_output(q)


def _paged_impl(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
    kv_lens: torch.Tensor, causal: bool, scale: Optional[float], options: Optional[str],
    q_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _attention.paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal, scale, None,
                                      _attention_options(options), q_lens=q_lens)


def _paged_fake(q, k_pages, v_pages, block_table, kv_lens, causal, scale, options, q_lens=None):
    checks.paged(q, k_pages, v_pages, block_table, kv_lens, gpu=False, q_lens_=q_lens)
    return _new_output(q)


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def _varlen_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: Optional[float], return_lse: bool,
    options: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    opts = PrefillOptions.from_text(options) if options else None
    result = _attention.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                         scale, None, return_lse, opts)
    return result if return_lse else (result, _no_lse(q))


def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, return_lse,
                 options):
    checks.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, return_lse, gpu=False)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32) if return_lse else _no_lse(q)
    return _new_output(q), lse


def _w4a16_impl(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
    perm: Optional[torch.Tensor], group_size: int, in_features: int, out_features: int,
    layout: str, options: Optional[str],
) -> torch.Tensor:
    w = Int4Weight(qweight, scales, zeros, group_size, in_features, out_features, layout, perm)
    return _w4a16.w4a16_matmul(x, w, None, W4A16Options.from_text(options) if options else None)


def _w4a16_fake(x, qweight, scales, zeros, perm, group_size, in_features, out_features, layout,
                options):
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
    impls = {"attention": (_attention_impl, _attention_fake), "paged_attention": (_paged_impl, _paged_fake),
             "attention_varlen": (_varlen_impl, _varlen_fake), "w4a16_matmul": (_w4a16_impl, _w4a16_fake)}
    for name in OPS:
        if not _registered(name):
            impl, fake = impls[name]
            torch.library.custom_op(f"ikport::{name}", mutates_args=())(impl).register_fake(fake)


_register()
attention = torch.ops.ikport.attention.default
paged_attention = torch.ops.ikport.paged_attention.default
attention_varlen = torch.ops.ikport.attention_varlen.default
w4a16_matmul = torch.ops.ikport.w4a16_matmul.default


def _options_text(options, kind: type) -> Optional[str]:
    checks.options(options, kind)
    return None if options is None else options.as_text()


def _attention_options_text(options) -> Optional[str]:
    """The attention ops' `options` text: a DecodeOptions' as is, a PrefillOptions' after "prefill:"."""
    if options is None or isinstance(options, DecodeOptions):
        return None if options is None else options.as_text()
    checks.options(options, (DecodeOptions, PrefillOptions) if isinstance(options, Options)
                   else DecodeOptions)
    return _PREFILL_TEXT + options.as_text()


def traced_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    scale: Optional[float] = None, kv_lens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None, options=None, q_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`ikport.attention` while torch.compile traces: one custom-op node, then `out` by copy."""
    result = torch.ops.ikport.attention.default(
        q, k, v, kv_lens, bool(causal), checks.scale(scale, traced=True), _attention_options_text(options),
        q_lens=q_lens)
    if out is None:
        return result
    checks.out(out, q)
    out.copy_(result)
    return out


def traced_paged_attention(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
    kv_lens: torch.Tensor, *, causal: bool = False, scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None, options=None, q_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`ikport.paged_attention` while torch.compile traces (see `traced_attention`)."""
    result = torch.ops.ikport.paged_attention.default(
        q, k_pages, v_pages, block_table, kv_lens, bool(causal), checks.scale(scale, traced=True),
        _attention_options_text(options), q_lens=q_lens)
    if out is None:
        return result
    checks.out(out, q)
    out.copy_(result)
    return out


def traced_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False, scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None, return_lse: bool = False, options=None,
):
    """`ikport.attention_varlen` while torch.compile traces (see `traced_attention`)."""
    if not isinstance(return_lse, bool):  # it decides what is returned: a Python bool while tracing too
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    text = None if options is None else _options_text(options, PrefillOptions)
    result, lse = torch.ops.ikport.attention_varlen.default(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal),
        checks.scale(scale, traced=True), return_lse, text)
    if out is not None:
        checks.out(out, q)
        out.copy_(result)
        result = out
    return (result, lse) if return_lse else result


def traced_w4a16_matmul(x: torch.Tensor, weight: Int4Weight, *, out: Optional[torch.Tensor] = None,
                        options: Optional[W4A16Options] = None) -> torch.Tensor:
    """`ikport.w4a16_matmul` while torch.compile traces (see `traced_attention`)."""
    w = weight
    result = torch.ops.ikport.w4a16_matmul.default(
        x, w.qweight, w.scales, w.zeros, w.perm, w.group_size, w.in_features, w.out_features,
        w.layout, _options_text(options, W4A16Options))
    if out is None:
        return result
    checks.w4a16(x, w, out, gpu=False)
    out.copy_(result)
    return out
