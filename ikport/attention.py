"""Public attention API: `attention` (contiguous KV cache) and `paged_attention` (paged cache).

Both take torch-SDPA-style [batch, heads, seq, head_dim] tensors; fewer KV heads than query
heads means grouped-query attention. GPU tensors run the decode kernels of
kernels_src/attention/decode.cuh; CPU tensors run ikport.reference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from . import checks, configs, dispatch, reference
from .backends.base import Backend
from .kernels import DecodeParams, Kernel, get_kernel
from .launch import capturing as _capturing
from .launch import raw_stream as _raw_stream
from .launch import split_counters as _split_counters
from .launch import split_scratch as _split_scratch
from .manifest import spec

# Journey variants a caller (the benchmark) may force; None picks the default, "split".
#   naive          v0: one block per query head, scalar loads
#   split1         one block per KV head for its whole GQA group, 16-byte loads, no split-K
#   split-unfused  + split-K, partial results merged by a second launch
#   split-vector   + the merge fused into the last block of each split group (v1-v9: fp32
#                  dot products on the vector units)
#   split-mma      the same split and merge, the math on the matrix units (v11)
#   split          the default: split-mma where a block serves enough query rows
#                  (configs.decode_use_mma), else split-vector
DECODE_VARIANTS = ("naive", "split1", "split-unfused", "split-vector", "split-mma", "split")
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_LOG2E = 1.4426950408889634


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    variant: str | None = None,
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
        variant: force a journey variant (see DECODE_VARIANTS); default "split".

    Returns:
        [B, Hq, Tq, D] in q's dtype.

    Example:
        >>> q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.float16)
        >>> k = torch.randn(8, 8, 4096, 128, device="cuda", dtype=torch.float16)
        >>> out = ikport.attention(q, k, k, kv_lens=torch.full((8,), 4000, dtype=torch.int32, device="cuda"))
    """
    if torch.compiler.is_compiling():  # traced: one custom-op node (ikport/ops.py)
        from .ops import traced_attention

        return traced_attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, out=out,
                                variant=variant)
    sig = _signature(("attention", variant), q, k, v, kv_lens, out)
    call = _checked_call(sig, q, k, v)
    if call is _UNCHECKED:
        checks.attention(q, k, v, kv_lens)
        checks.out(out, q)
        call = _remember(sig, q, k, v, None, kv_lens, out, variant)
    if call is None:
        scale = _default_scale(q) if scale is None else float(scale)
        return _into(out, reference.attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens))
    return call(q, k, v, None, kv_lens, causal, scale, out)


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
    variant: str | None = None,
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
    if torch.compiler.is_compiling():  # traced: one custom-op node (ikport/ops.py)
        from .ops import traced_paged_attention

        return traced_paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal=causal,
                                      scale=scale, out=out, variant=variant)
    sig = _signature(("paged", variant), q, k_pages, v_pages, block_table, kv_lens, out)
    call = _checked_call(sig, q, k_pages, v_pages)
    if call is _UNCHECKED:
        checks.paged(q, k_pages, v_pages, block_table, kv_lens)
        checks.out(out, q)
        call = _remember(sig, q, k_pages, v_pages, block_table, kv_lens, out, variant)
    if call is None:
        scale = _default_scale(q) if scale is None else float(scale)
        ref = reference.paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal=causal, scale=scale)
        return _into(out, ref)
    return call(q, k_pages, v_pages, block_table, kv_lens, causal, scale, out)


# Input layouts that passed every check, with what runs them: a _DecodeCall (GPU) or None (the
# CPU reference). The checks depend only on types, shapes, strides, dtypes and devices (plus
# pointer alignment, re-checked on every call), so a call whose signature is here skips them and
# goes straight to its prepared launch: ~15 us of Python per call on the H100 machine's CPU
# (docs/results/host-profile-h100.log).
_UNCHECKED = object()
_checked: dict[tuple, "_DecodeCall | None"] = {}


def _signature(kind: tuple, q: object, k: object, v: object, *more: object) -> tuple | None:
    # Spelled out for q, k and v: this runs on every call (~0.3 us less than a loop over all).
    T = torch.Tensor
    if type(q) is not T or type(k) is not T or type(v) is not T:
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


def _remember(sig: tuple | None, q, k, v, block_table, kv_lens, out, variant) -> "_DecodeCall | None":
    """What runs this (checked) layout: None on the CPU, else its prepared GPU launch."""
    backend = dispatch.backend_for(q.device)
    call = None
    if backend is not None:
        call = _DecodeCall(_plan(backend, q, k, block_table, variant), q, k, v, block_table, kv_lens, out)
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


# ---- GPU path ------------------------------------------------------------------------------------
@dataclass
class _DecodePlan:
    device: int
    backend: Backend
    main: Kernel
    combine: Kernel | None  # the separate merge launch (split-K without counters)
    fused: bool  # merge in the split kernel's last block when counters are available
    clustered: bool  # the splits of a group merge inside a block cluster: no scratch, no counters
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    num_splits: int
    rows_per_split: int
    kv_capacity: int
    page_size_log2: int


_plans: dict[tuple, _DecodePlan] = {}


def clear_plans() -> None:
    """Forget every launch plan and prepared call (after changing configs.decode_overrides)."""
    _plans.clear()
    _checked.clear()


def _plan(backend: Backend, q, k, block_table, variant: str | None) -> _DecodePlan:
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    paged = block_table is not None
    if paged:
        page_size = k.shape[2]
        capacity, ps_log2 = block_table.shape[1] * page_size, page_size.bit_length() - 1
    else:
        capacity, ps_log2 = k.shape[2], 0
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    key = (backend.name, dev, q.dtype, B, Hq, Hkv, Tq, D, capacity, paged, ps_log2, variant)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    variant = variant or "split"
    if variant not in DECODE_VARIANTS:
        raise ValueError(f"unknown decode variant {variant!r}; choose from {DECODE_VARIANTS}")
    dtype = _DTYPE_NAME[q.dtype]
    if variant == "naive":
        main = get_kernel(spec("attention_decode", "naive", dtype=dtype, head_dim=D), backend, dev)
        plan = _DecodePlan(dev, backend, main, None, False, False, (Tq * Hq, B, 1), (128, 1, 1), 0, 1,
                           capacity, capacity, ps_log2)
    else:
        info = backend.device_info(dev)
        facts = backend.target_for(dev).facts
        rows, row_tiles = configs.decode_rows(Hq // Hkv * Tq)
        groups = B * Hkv * row_tiles
        mma = variant == "split-mma" or (variant == "split" and configs.decode_use_mma(rows))
        c_is_a = facts.matrix_unit == "mma.sync"  # P stays in registers (ik::mma::kCIsA)
        default = variant in ("split", "split-vector", "split-mma")  # fused merge, tuned launches
        one_per_sm = default and not mma and configs.decode_one_block_per_sm(
            groups=groups, kv_capacity=capacity, sm_count=info.sm_count, paged=paged,
            async_copy=facts.async_copy, rows=rows)

        def kernel_spec(tiles, cluster: int = 1):  # the split kernel of these tiles, its shared memory
            rows, _, threads, unroll, stages = tiles
            clustered = {"cluster": cluster} if cluster > 1 else {}
            if mma:
                return (spec("attention_decode", "split_mma_cluster" if cluster > 1 else "split_mma", dtype=dtype,
                             head_dim=D, rows=rows, paged=paged, threads=threads, stages=stages, **clustered),
                        configs.decode_mma_smem_bytes(threads=threads, warp_size=info.warp_size, rows=rows,
                                                      head_dim=D, stages=stages, c_is_a=c_is_a, cluster=cluster))
            return (spec("attention_decode", "split_cluster" if cluster > 1 else "split", dtype=dtype, head_dim=D,
                         rows=rows, paged=paged, threads=threads, unroll=unroll, stages=stages, **clustered),
                    configs.decode_smem_bytes(threads=threads, warp_size=info.warp_size, rows=rows, head_dim=D,
                                              unroll=unroll, stages=stages, cluster=cluster))

        def load(threads: int):  # the kernel's tiles, the kernel, its shared memory, blocks per SM
            if mma:
                tiles = configs.decode_mma_tiles(Hq // Hkv, Tq, head_dim=D, warp_size=info.warp_size,
                                                 max_smem=info.max_smem_per_block, c_is_a=c_is_a)
            else:
                tiles = configs.decode_tiles(Hq // Hkv, Tq, head_dim=D, warp_size=info.warp_size,
                                             max_smem=info.max_smem_per_block, one_per_sm=one_per_sm,
                                             threads=threads, paged=paged)
            kspec, smem = kernel_spec(tiles)
            main = get_kernel(kspec, backend, dev)
            return tiles, main, smem, main.occupancy(tiles[2], smem)

        tiles, main, smem, per_sm = load(configs.DECODE_THREADS)
        if default and not mma and not one_per_sm and configs.decode_small_blocks(
                groups=groups, kv_capacity=capacity, paged=paged,
                slots=info.sm_count * configs.decode_blocks_per_sm(per_sm, tiles[0], tiles[2])):
            tiles, main, smem, per_sm = load(configs.SMALL_BLOCK_THREADS)

        def split_config(num_splits: int | None) -> configs.DecodeConfig:
            return configs.decode_config(
                sm_count=info.sm_count, blocks_per_sm=per_sm, batch=B, kv_heads=Hkv, group=Hq // Hkv,
                q_len=Tq, kv_capacity=capacity, num_splits=num_splits, one_per_sm=one_per_sm, tiles=tiles)

        def cluster_kernel(cfg: configs.DecodeConfig):  # (kernel, shared memory) or None
            cluster = configs.decode_cluster(cfg.num_splits, clusters=facts.clusters,
                                             blocks=groups * cfg.num_splits, sm_count=info.sm_count)
            if not default or cluster == 1:
                return None
            kspec, need = kernel_spec(tiles, cluster)
            kernel = get_kernel(kspec, backend, dev)
            asked = configs.decode_cluster_smem(need, facts.max_smem_per_sm)
            if asked <= info.max_smem_per_block and backend.max_active_clusters(
                    kernel.fn, cluster, tiles[2], asked) >= groups:
                return kernel, asked
            return None

        cfg = split_config(1 if variant == "split1" else None)
        fit = cluster_kernel(cfg)
        fewer = configs.decode_fewer_splits_for_clusters(cfg.num_splits, cfg.rows_per_split)
        if fit is None and fewer and facts.clusters and default:
            fewer_cfg = split_config(fewer)  # short splits: one split less if its clusters all fit
            fit = cluster_kernel(fewer_cfg)
            cfg = fewer_cfg if fit is not None else cfg
        clustered = fit is not None
        if clustered:
            main, smem = fit
        combine = None
        if cfg.num_splits > 1 and not clustered:
            combine = get_kernel(spec("attention_decode", "combine", dtype=dtype, head_dim=D), backend, dev)
        plan = _DecodePlan(
            dev, backend, main, combine, default and not clustered, clustered,
            (cfg.num_splits, Hkv * cfg.row_tiles, B), (cfg.threads, 1, 1), smem,
            cfg.num_splits, cfg.rows_per_split, capacity, ps_log2,
        )
    logging.getLogger("ikport").debug(
        "plan %s %s B=%d Hq=%d Hkv=%d Tq=%d D=%d capacity=%d paged=%s -> %s%s grid=%s block=%s "
        "smem=%d splits=%d rows/split=%d", backend.name, q.dtype, B, Hq, Hkv, Tq, D, capacity, paged,
        plan.main.spec.uri, f" + {plan.combine.spec.uri}" if plan.combine else "", plan.grid,
        plan.block, plan.shared_bytes, plan.num_splits, plan.rows_per_split)
    _plans[key] = plan
    return plan


class _DecodeCall:
    """One checked input layout's launch: the plan, a parameter struct holding the layout's
    strides and sizes, and launchers with grid and block bound. A call copies the struct, fills
    in the pointers and launches: no per-call work that depends only on the layout."""

    def __init__(self, plan: _DecodePlan, q, k, v, block_table, kv_lens, out) -> None:
        B, Hq, Tq, D = q.shape
        self.plan = plan
        self.scratch_rows = B * Hq * Tq * plan.num_splits if plan.num_splits > 1 and not plan.clustered else 0
        self.scratch_bytes = self.scratch_rows * (D + 1) * 4  # partial outputs, then log-sum-exps
        self.lse_offset = self.scratch_rows * D * 4
        self.counters = 2 * plan.grid[1] * plan.grid[2]  # two per (sequence, KV head, row tile)
        self.default_scale_log2 = _default_scale(q) * _LOG2E
        self.multi_token = Tq > 1  # causal masking matters only with several query tokens
        out_strides = out.stride()[:3] if out is not None else (Hq * Tq * D, Tq * D, D)
        self.template = DecodeParams(
            0, 0, 0, 0, 0, 0, 0, 0, 0,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out_strides,
            block_table.stride(0) if block_table is not None else 0,
            B, Hq, k.shape[1], Tq, plan.kv_capacity, plan.page_size_log2, plan.num_splits,
            plan.rows_per_split, 0, 0.0, k.shape[0] if block_table is not None else 0,
        )
        self.main = plan.main.bind(plan.grid, plan.block, plan.shared_bytes)
        self.combine = None
        if plan.combine is not None:
            self.combine = plan.combine.bind((B * Hq * Tq, 1, 1), (configs.decode_combine_threads(D), 1, 1), 0)

    def __call__(self, q, k, v, block_table, kv_lens, causal, scale, out) -> torch.Tensor:
        plan = self.plan
        if out is None:  # (empty_like: ~1 us of host time less than torch.empty with its arguments)
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        p = DecodeParams.from_buffer_copy(self.template)
        p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
        if kv_lens is not None:
            p.kv_lens = kv_lens.data_ptr()
        if block_table is not None:
            p.block_table = block_table.data_ptr()
        p.causal = 1 if causal and self.multi_token else 0
        p.scale_log2 = self.default_scale_log2 if scale is None else float(scale) * _LOG2E
        stream = _raw_stream(plan.device)
        owner = None  # a torch tensor owning the scratch, if any, lives until the launch is queued
        if self.scratch_rows:
            in_capture = _capturing()
            scratch, owner = _split_scratch(plan.backend, plan.device, stream, self.scratch_bytes,
                                            in_capture=in_capture)
            p.part_out, p.part_lse = scratch, scratch + self.lse_offset
            if plan.fused:  # arrival counters: the last block of each group merges
                p.split_counters = _split_counters(plan.backend, plan.device, stream, self.counters,
                                                   in_capture=in_capture)
        self.main(p, stream)
        if self.scratch_rows and not p.split_counters:
            self.combine(p, stream)
        return out
