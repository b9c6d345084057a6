"""The eager attention path behind `ikport.attention` / `ikport.paged_attention` and their custom
ops: checks, then the PyTorch reference (CPU tensors) or a prepared GPU launch of the decode
kernels (kernels_src/attention/), planned by ikport.plan.decode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import checks, dispatch, knobs, reference
from ..backends.base import Backend
from ..kernels import DecodeParams, Kernel, get_kernel
from ..launch import capturing, raw_stream, split_counters, split_scratch
from ..plan import decode as decode_plan
from ..plan.decode import DecodeOptions, DecodePlan, DecodeProblem
from ..plan.prefill import PrefillOptions
from . import prefill as _prefill_impl

_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_LOG2E = 1.4426950408889634


def attention(q, k, v, causal: bool = False, scale: float | None = None,
              kv_lens: torch.Tensor | None = None, out: torch.Tensor | None = None,
              options: DecodeOptions | PrefillOptions | None = None,
              q_lens: torch.Tensor | None = None) -> torch.Tensor:
    """`ikport.attention`, eager (see its docstring; positional: this is the per-call path)."""
    if _is_prefill(q, q_lens, options):
        return _prefill(q, k, v, None, q_lens, kv_lens, causal, scale, out, options)
    scale = checks.scale(scale)  # every call: the scale is not part of the cached layout
    kind = ("attention", options) if options is None or type(options) is DecodeOptions else None
    sig = _signature(kind, q, k, v, kv_lens, out)
    call = _checked_call(sig, q, k, v)
    if call is _UNCHECKED:
        checks.attention(q, k, v, kv_lens)
        checks.out(out, q)
        checks.options(options, DecodeOptions)
        call = _remember(sig, q, k, v, None, kv_lens, out, options)
    if call is None:
        scale = _default_scale(q) if scale is None else float(scale)
        return _into(out, reference.attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens))
    return call(q, k, v, None, kv_lens, causal, scale, out)


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal: bool = False,
                    scale: float | None = None, out: torch.Tensor | None = None,
                    options: DecodeOptions | PrefillOptions | None = None,
                    q_lens: torch.Tensor | None = None) -> torch.Tensor:
    """`ikport.paged_attention`, eager (see its docstring)."""
    if _is_prefill(q, q_lens, options):
        return _prefill(q, k_pages, v_pages, block_table, q_lens, kv_lens, causal, scale, out, options)
    scale = checks.scale(scale)  # every call: the scale is not part of the cached layout
    kind = ("paged", options) if options is None or type(options) is DecodeOptions else None
    sig = _signature(kind, q, k_pages, v_pages, block_table, kv_lens, out)
    call = _checked_call(sig, q, k_pages, v_pages)
    if call is _UNCHECKED:
        checks.paged(q, k_pages, v_pages, block_table, kv_lens)
        checks.out(out, q)
        checks.options(options, DecodeOptions)
        call = _remember(sig, q, k_pages, v_pages, block_table, kv_lens, out, options)
    if call is None or call.check_tables:  # the CPU always; the GPU with IKPORT_CHECK_TABLES=1
        checks.block_table_ids(block_table, kv_lens, k_pages, gpu=call is not None)
    if call is None:
        scale = _default_scale(q) if scale is None else float(scale)
        ref = reference.paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal=causal, scale=scale)
        return _into(out, ref)
    return call(q, k_pages, v_pages, block_table, kv_lens, causal, scale, out)


def int8_attention(q, k, v, k_scale, v_scale, block_table=None, kv_lens=None, causal: bool = False,
                   scale: float | None = None, out: torch.Tensor | None = None,
                   options: DecodeOptions | PrefillOptions | None = None) -> torch.Tensor:
    """Attention over an INT8 cache (ikport.KVCache(kv_format="int8")): int8 codes k, v and their fp32
    scales, contiguous or paged (`block_table`). The CPU runs the reference on the dequantized
    cache; a GPU the split kernels with the int8 KV loader, or for a prefill chunk (`_is_prefill`)
    the prefill kernel with it (no dequantized copy anywhere)."""
    scale = checks.scale(scale)
    call = _prepared_compressed(("int8",), q, k, v, (k_scale, v_scale), block_table, kv_lens, out, options)
    if call is not None:
        return call(q, k, v, block_table, kv_lens, causal, scale, out, k_scale, v_scale)
    checks.int8_cache(q, k, v, k_scale, v_scale, block_table, kv_lens, prefill=_is_prefill(q, None, options))
    return _compressed(
        ("int8",), q, k, v, (k_scale, v_scale), block_table, kv_lens, causal, scale, out, options,
        lambda s: reference.int8_attention(q, k, v, k_scale, v_scale, block_table=block_table, causal=causal,
                                           scale=s, kv_lens=kv_lens),
        lambda: _Side(k_scale.stride(), v_scale.stride()))


def kivi_attention(q, k, v, k_scale, v_scale, k_resid, group: int, block_table=None, kv_lens=None,
                   causal: bool = False, scale: float | None = None, out: torch.Tensor | None = None,
                   options: DecodeOptions | PrefillOptions | None = None) -> torch.Tensor:
    """Attention over a KIVI INT4 cache (ikport.KVCache(kv_format="kivi4")): uint8 codes k, v, the
    (scale, zero) pairs k_scale (K, per group of `group` rows and channel) and v_scale (V, per
    token), and K's full-precision residual k_resid. The CPU runs the reference on the
    dequantized cache; a GPU the split kernels with the kivi4_g<group> KV loader, or for a
    prefill chunk the prefill kernel with it."""
    scale = checks.scale(scale)
    side = (k_scale, v_scale, k_resid)
    call = _prepared_compressed(("kivi4", group), q, k, v, side, block_table, kv_lens, out, options)
    if call is not None:
        return call(q, k, v, block_table, kv_lens, causal, scale, out, *side)
    checks.kivi_cache(q, k, v, k_scale, v_scale, k_resid, group, block_table, kv_lens,
                      prefill=_is_prefill(q, None, options))
    # pairs are 4-byte words: their strides in pairs
    return _compressed(
        ("kivi4", group), q, k, v, (k_scale, v_scale, k_resid), block_table, kv_lens, causal, scale, out, options,
        lambda s: reference.kivi_attention(q, k, v, k_scale, v_scale, k_resid, group, block_table=block_table,
                                           causal=causal, scale=s, kv_lens=kv_lens),
        lambda: _Side(tuple(st // 2 for st in k_scale.stride()[:3]), tuple(st // 2 for st in v_scale.stride()[:3]),
                      tuple(k_resid.stride()[:3])))


def _prepared_compressed(fmt: tuple, q, k, v, side: tuple, block_table, kv_lens, out,
                         options) -> _DecodeCall | None:
    """The prepared decode launch of a compressed-cache layout that passed every check before, or
    None for the full path (a first call, the CPU, a prefill chunk, unusual arguments, a misaligned
    pointer, IKPORT_CHECK_TABLES): the checks depend only on the layout, as decode's do."""
    if options is not None and type(options) is not DecodeOptions:
        return None
    sig = _signature((*fmt, options), q, k, v, *side, block_table, kv_lens, out)
    call = _checked.get(sig) if sig is not None else None
    if call is None or call.check_tables:
        return None
    ptrs = q.data_ptr() | k.data_ptr() | v.data_ptr()
    for t in side:
        ptrs |= t.data_ptr()
    return None if ptrs & 15 else call


def _compressed(fmt: tuple, q, k, v, side: tuple, block_table, kv_lens, causal: bool, scale: float | None,
                out: torch.Tensor | None, options: DecodeOptions | PrefillOptions | None,
                cpu_reference: Callable[[float], torch.Tensor], side_strides: Callable[[], _Side]) -> torch.Tensor:
    """The call path of a compressed cache whose format-specific arguments were checked: `fmt` the
    loader's (format, group) for the planner, `side` its tensors beside the codes (scales, pairs,
    residual), passed to the kernel in that order; the CPU runs `cpu_reference(scale)`. A GPU
    runs the decode kernels, or the prefill kernel for a prefill chunk (`_is_prefill`)."""
    checks.out(out, q)
    checks.options(options, (DecodeOptions, PrefillOptions))
    backend = dispatch.backend_for(q.device)
    if block_table is not None and (backend is None or knobs.check_tables()):
        checks.block_table_ids(block_table, kv_lens, k, gpu=backend is not None)
    if backend is None:
        return _into(out, cpu_reference(_default_scale(q) if scale is None else float(scale)))
    if _is_prefill(q, None, options):
        options = options or PrefillOptions()
        if options.variant != "fa2":
            raise ValueError(f"PrefillOptions(variant={options.variant!r}): a {fmt[0]} cache's prefill runs the fa2 "
                             f"kernel (the naive journey step reads dense caches only)")
        return _prefill_impl.attention(backend, q, k, v, block_table, None, kv_lens, causal, scale, out,
                                       options, fmt=fmt, side=side, side_strides=side_strides())
    sig = _signature((*fmt, options), q, k, v, *side, block_table, kv_lens, out)
    call = _checked.get(sig) if sig is not None else None
    if call is None:
        prepared = _prepare(backend, q, k, block_table, options or decode_plan.DEFAULT_OPTIONS, *fmt)
        call = _DecodeCall(prepared, q, k, v, block_table, out, side_strides())
        if sig is not None:
            _checked[sig] = call
    return call(q, k, v, block_table, kv_lens, causal, scale, out, *side)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     causal: bool = False, scale: float | None = None, out: torch.Tensor | None = None,
                     return_lse: bool = False, options: PrefillOptions | None = None):
    """`ikport.attention_varlen`, eager (see its docstring)."""
    scale = checks.scale(scale)
    checks.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, return_lse)
    checks.options(options, PrefillOptions)
    backend = dispatch.backend_for(q.device)
    # the CPU always; the GPU with IKPORT_CHECK_TABLES=1, outside graph capture
    checks.varlen_offsets(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0],
                          gpu=backend is not None)
    options = options or PrefillOptions()
    if backend is None:
        res = reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                         scale=_default_scale(q) if scale is None else float(scale),
                                         return_lse=return_lse)
        if not return_lse:
            return _into(out, res)
        return _into(out, res[0]), res[1]
    if options.variant != "fa2":
        raise ValueError(f"attention_varlen: options.variant {options.variant!r}: packed batches run the fa2 kernel")
    return _prefill_impl.varlen(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                scale, out, return_lse, options)


def _is_prefill(q: object, q_lens: object, options: object) -> bool:
    """Whether a call runs the prefill kernel: more query tokens than decode takes, per-sequence
    query lengths, or prefill options."""
    if type(options) is DecodeOptions:  # pins a decode kernel (the naive one takes any length)
        return False
    return (q_lens is not None or type(options) is PrefillOptions
            or (type(q) is torch.Tensor and q.dim() == 4 and q.shape[2] > checks.MAX_DECODE_QUERY_TOKENS))


def _prefill(q, k, v, block_table, q_lens, kv_lens, causal, scale, out, options) -> torch.Tensor:
    """Prefill through `attention` / `paged_attention`: the checks, then the reference (CPU), the
    journey's naive kernel (options.variant "naive") or the prefill kernel."""
    scale = checks.scale(scale)
    if block_table is None:
        checks.attention(q, k, v, kv_lens, q_lens_=q_lens)
    else:
        checks.paged(q, k, v, block_table, kv_lens, q_lens_=q_lens)
    checks.out(out, q)
    checks.options(options, PrefillOptions)
    options = options or PrefillOptions()
    backend = dispatch.backend_for(q.device)
    if block_table is not None and (backend is None or knobs.check_tables()):
        checks.block_table_ids(block_table, kv_lens, k, gpu=backend is not None)
    if backend is None:
        s = _default_scale(q) if scale is None else float(scale)
        if block_table is None:
            ref = reference.attention(q, k, v, causal=causal, scale=s, kv_lens=kv_lens, q_lens=q_lens)
        else:
            ref = reference.paged_attention(q, k, v, block_table, kv_lens, causal=causal, scale=s, q_lens=q_lens)
        return _into(out, ref)
    if options.variant == "naive":  # v0: the decode family's naive kernel, one block per query row
        if q_lens is not None:
            raise ValueError("PrefillOptions(variant='naive') takes no q_lens (the journey's baseline)")
        naive = DecodeOptions(variant="naive")
        if block_table is None:
            return attention(q, k, v, causal, scale, kv_lens, out, naive)
        return paged_attention(q, k, v, block_table, kv_lens, causal, scale, out, naive)
    return _prefill_impl.attention(backend, q, k, v, block_table, q_lens, kv_lens, causal, scale, out, options)


# Input layouts that passed every check, with what runs them: a _DecodeCall (GPU) or None (the
# CPU reference). The checks depend only on types, shapes, strides, dtypes and devices (plus
# pointer alignment, re-checked on every call), so a call whose signature is here skips them and
# goes straight to its prepared launch (~15 us of Python less per call; decode.md, "Host path").
_UNCHECKED = object()
_checked: dict[tuple, _DecodeCall | None] = {}


def _signature(kind: tuple | None, q: object, k: object, v: object, *more: object) -> tuple | None:
    # Spelled out for q, k and v: this runs on every call (~0.3 us less than a loop over all).
    # kind None: unusual options, which the full checks name.
    T = torch.Tensor
    if kind is None or type(q) is not T or type(k) is not T or type(v) is not T:
        return None  # anything unusual takes the full checks (which name the problem)
    sig = (kind, q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
           v.shape, v.stride(), v.dtype, v.device)
    for t in more:
        if t is None:
            sig += (None,)
        elif type(t) is T:
            sig += (t.shape, t.stride(), t.dtype, t.device)
        else:
            return None
    return sig


def _default_scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def _checked_call(sig: tuple | None, q, k, v):
    call = _checked.get(sig, _UNCHECKED) if sig is not None else _UNCHECKED
    if call is not None and call is not _UNCHECKED:
        if (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:
            return _UNCHECKED  # let the checks say which pointer is misaligned
    return call


def _remember(sig: tuple | None, q, k, v, block_table, kv_lens, out, options) -> _DecodeCall | None:
    """What runs this (checked) layout: None on the CPU, else its prepared GPU launch."""
    backend = dispatch.backend_for(q.device)
    call = None
    if backend is not None:
        call = _DecodeCall(_prepare(backend, q, k, block_table, options or decode_plan.DEFAULT_OPTIONS),
                           q, k, v, block_table, out)
    if sig is not None:
        if len(_checked) > 4096:
            _checked.clear()
        _checked[sig] = call
    return call


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def plan_of(q: torch.Tensor, k: torch.Tensor, block_table: torch.Tensor | None = None,
            options: DecodeOptions | None = None) -> DecodePlan:
    """The launch plan a GPU call with these tensors runs (for tests and benchmarks; k is k_pages
    when `block_table` is given)."""
    backend = dispatch.backend_for(q.device)
    if backend is None:
        raise ValueError(f"plan_of: {q.device} tensors run the PyTorch reference, not a planned kernel")
    return _prepare(backend, q, k, block_table, options or decode_plan.DEFAULT_OPTIONS).plan


def clear_plans() -> None:
    """Forget every launch plan and prepared call (tests that change the planner's constants)."""
    _prepared.clear()
    _checked.clear()
    _prefill_impl.clear_plans()


# ---- GPU path ------------------------------------------------------------------------------------
class _Prepared:
    """A plan with its kernels loaded on one device."""

    def __init__(self, plan: DecodePlan, backend: Backend, device: int) -> None:
        self.plan, self.backend, self.device = plan, backend, device
        self.main: Kernel = get_kernel(plan.kernel, backend, device)
        self.combine: Kernel | None = get_kernel(plan.combine, backend, device) if plan.combine else None


_prepared: dict[tuple, _Prepared] = {}


def _prepare(backend: Backend, q, k, block_table, options: DecodeOptions, kv_format: str = "dense",
             kivi_group: int = 0) -> _Prepared:
    B, Hq, Tq, D = q.shape
    paged = block_table is not None
    page_size = k.shape[2] if paged else 0
    capacity = block_table.shape[1] * page_size if paged else k.shape[2]
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    problem = DecodeProblem(_DTYPE_NAME[q.dtype], B, Hq, k.shape[1], Tq, D, capacity, page_size, kv_format,
                            kivi_group)
    key = (backend.name, dev, problem, options)
    prepared = _prepared.get(key)
    if prepared is not None:
        return prepared

    def occupancy(spec, threads: int, smem: int) -> int | None:
        return get_kernel(spec, backend, dev).occupancy(threads, smem)

    def clusters_resident(spec, cluster: int, threads: int, smem: int) -> int:
        return backend.max_active_clusters(get_kernel(spec, backend, dev).fn, cluster, threads, smem)

    plan = decode_plan.plan(problem, backend.device_info(dev), occupancy, clusters_resident, options)
    logging.getLogger("ikport").debug(
        "plan %s %s B=%d Hq=%d Hkv=%d Tq=%d D=%d capacity=%d page_size=%d%s -> %s%s grid=%s block=%s smem=%d "
        "splits=%d rows/split=%d", backend.name, problem.dtype, B, Hq, problem.kv_heads, Tq, D, capacity,
        page_size, f" {options.pinned()}" if options.pinned() else "", plan.kernel.uri,
        f" + {plan.combine.uri}" if plan.combine else "", plan.grid, plan.block, plan.shared_bytes,
        plan.num_splits, plan.rows_per_split)
    prepared = _prepared[key] = _Prepared(plan, backend, dev)
    return prepared


class _Side(NamedTuple):
    """A quantized cache's side tensors' strides (DecodeParams' ks_*, vs_*, kr_*): INT8's scales;
    KIVI's pairs (in pairs) and residual."""

    k_scale: tuple[int, ...]
    v_scale: tuple[int, ...]
    k_resid: tuple[int, ...] = (0, 0, 0)


class _DecodeCall:
    """One checked input layout's launch: the plan, a parameter struct holding the layout's
    strides and sizes, and launchers with grid and block bound. A call copies the struct, fills
    in the pointers and launches: no per-call work that depends only on the layout."""

    def __init__(self, prepared: _Prepared, q, k, v, block_table, out, side: _Side | None = None) -> None:
        B, Hq, Tq, D = q.shape
        plan = prepared.plan
        self.prepared, self.plan = prepared, plan
        self.default_scale_log2 = _default_scale(q) * _LOG2E
        self.multi_token = Tq > 1  # causal masking matters only with several query tokens
        self.check_tables = block_table is not None and knobs.check_tables()  # read once a layout
        out_strides = out.stride()[:3] if out is not None else (Hq * Tq * D, Tq * D, D)
        self.template = DecodeParams(
            0, 0, 0, 0, 0, 0, 0, 0, 0,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out_strides,
            block_table.stride(0) if block_table is not None else 0,
            B, Hq, k.shape[1], Tq, plan.kv_capacity, plan.page_size_log2, plan.num_splits,
            plan.rows_per_split, 0, 0.0, k.shape[0] if block_table is not None else 0,
        )
        if side is not None:  # a quantized cache's side tensors (their pointers per call)
            t = self.template
            t.ks_sb, t.ks_sh, t.ks_st = side.k_scale
            t.vs_sb, t.vs_sh, t.vs_st = side.v_scale
            t.kr_sb, t.kr_sh, t.kr_st = side.k_resid
        self.main = prepared.main.bind(plan.grid, plan.block, plan.shared_bytes)
        self.combine = None
        if prepared.combine is not None:
            self.combine = prepared.combine.bind(plan.combine_grid, plan.combine_block, 0)

    def __call__(self, q, k, v, block_table, kv_lens, causal, scale, out, k_scale=None, v_scale=None,
                 k_resid=None) -> torch.Tensor:
        plan, prepared = self.plan, self.prepared
        if out is None:  # (empty_like: ~1 us of host time less than torch.empty with its arguments)
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        p = DecodeParams.from_buffer_copy(self.template)
        p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
        if kv_lens is not None:
            p.kv_lens = kv_lens.data_ptr()
        if block_table is not None:
            p.block_table = block_table.data_ptr()
        if k_scale is not None:
            p.k_scale, p.v_scale = k_scale.data_ptr(), v_scale.data_ptr()
        if k_resid is not None:
            p.k_resid = k_resid.data_ptr()
        p.causal = 1 if causal and self.multi_token else 0
        p.scale_log2 = self.default_scale_log2 if scale is None else float(scale) * _LOG2E
        stream = raw_stream(prepared.device)
        owner = None  # a torch tensor owning the scratch, if any, lives until the launch is queued
        if plan.scratch_bytes:
            in_capture = capturing()
            scratch, owner = split_scratch(prepared.backend, prepared.device, stream, plan.scratch_bytes,
                                           in_capture=in_capture)
            p.part_out, p.part_lse = scratch, scratch + plan.lse_offset
            if plan.fused:  # arrival counters: the last block of each group merges
                p.split_counters = split_counters(prepared.backend, prepared.device, stream, plan.counters,
                                                  in_capture=in_capture)
        self.main(p, stream)
        if plan.scratch_bytes and not p.split_counters:
            self.combine(p, stream)
        return out
