"""The GPU path of prefill attention (query lengths past decode's, q_lens, packed varlen batches):
a launch of attn_prefill (kernels_src/attention/prefill.cuh) planned by ikport.plan.prefill. The
checks and the CPU reference run before this, in ikport/impl/attention.py.

A call fills the parameter struct from the tensors and launches: no host synchronization (lengths
and offsets stay on the device), so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import logging
import math

import torch

from .. import dispatch
from ..backends.base import Backend
from ..kernels import Kernel, PrefillParams, get_kernel
from ..launch import raw_stream
from ..plan import prefill as prefill_plan
from ..plan.prefill import PrefillOptions, PrefillPlan, PrefillProblem

_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_LOG2E = 1.4426950408889634


class _Prepared:
    """A plan with its kernel loaded and bound on one device."""

    def __init__(self, plan: PrefillPlan, backend: Backend, device: int) -> None:
        self.plan, self.backend, self.device = plan, backend, device
        self.kernel: Kernel = get_kernel(plan.kernel, backend, device)
        self.launch = self.kernel.bind(plan.grid, plan.block, plan.shared_bytes)
        self._by_batch: dict[int, object] = {}

    def launch_batch(self, batch: int):
        """The launcher with the grid's batch dimension set (varlen: the batch is cu_seqlens' length)."""
        launch = self._by_batch.get(batch)
        if launch is None:
            grid = (self.plan.grid[0], batch, self.plan.grid[2])
            launch = self._by_batch[batch] = self.kernel.bind(grid, self.plan.block, self.plan.shared_bytes)
        return launch


_prepared: dict[tuple, _Prepared] = {}


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def prepare(backend: Backend, problem: PrefillProblem, device: int, options: PrefillOptions) -> _Prepared:
    key = (backend.name, device, problem, options)
    prepared = _prepared.get(key)
    if prepared is None:
        plan = prefill_plan.plan(problem, backend.device_info(device), options)
        logging.getLogger("ikport").debug(
            "plan %s %s -> %s grid=%s block=%s smem=%d", backend.name, problem, plan.kernel.uri, plan.grid,
            plan.block, plan.shared_bytes)
        if len(_prepared) > 4096:  # varlen keys carry the max lengths: a server sees many
            _prepared.clear()
        prepared = _prepared[key] = _Prepared(plan, backend, device)
    return prepared


def plan_of(q: torch.Tensor, k: torch.Tensor, block_table: torch.Tensor | None = None,
            options: PrefillOptions | None = None, *, varlen_max: tuple[int, int] | None = None,
            fmt: tuple = ("dense",)) -> PrefillPlan:
    """The launch plan a GPU prefill call with these tensors runs (tests and benchmarks): q and k as
    `attention` / `paged_attention` take them, or packed with `varlen_max` = (max_seqlen_q, max_seqlen_k);
    `fmt` a compressed cache's (kv_format, kivi_group) with k its codes."""
    backend = dispatch.backend_for(q.device)
    if backend is None:
        raise ValueError(f"plan_of: {q.device} tensors run the PyTorch reference, not a planned kernel")
    return prepare(backend, _problem(q, k, block_table, varlen_max, fmt), _device_index(q),
                   options or prefill_plan.DEFAULT_OPTIONS).plan


def clear_plans() -> None:
    _prepared.clear()


def _problem(q, k, block_table, varlen_max, fmt: tuple = ("dense",)) -> PrefillProblem:
    """The planner's problem; `fmt`: the cache's (kv_format[, kivi_group]) (k: its codes, whose last
    dim need not be head_dim: q's is)."""
    if varlen_max is not None:  # q [total_q, Hq, D], k [total_k, Hkv, D]
        _, Hq, D = q.shape
        # batch 1: the batch comes from cu_seqlens at launch (Prepared.launch_batch), not the plan
        return PrefillProblem(_DTYPE_NAME[q.dtype], 1, Hq, k.shape[1], D, varlen_max[0], varlen_max[1])
    B, Hq, Tq, D = q.shape
    page = k.shape[2] if block_table is not None else 0
    capacity = block_table.shape[1] * page if block_table is not None else k.shape[2]
    return PrefillProblem(_DTYPE_NAME[q.dtype], B, Hq, k.shape[1], D, Tq, capacity, page, *fmt)


def positive_scale(q: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, float]:
    """(q, scale * log2(e)) for the kernel, whose scale is positive: it folds the scale into its
    exp2's FMA and takes row maxima of the unscaled scores. The same scores for any other finite
    scale: q * scale == (-q) * -scale, and a zero scale is q * 0 at scale 1 (one copy of q)."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if s > 0:
        return q, s * _LOG2E
    return q * (-1.0 if s < 0 else 0.0), (-s if s < 0 else 1.0) * _LOG2E


def attention(backend: Backend, q, k, v, block_table, q_lens, kv_lens, causal: bool, scale: float | None,
              out: torch.Tensor | None, options: PrefillOptions, *, fmt: tuple = ("dense",), side: tuple = (),
              side_strides=None) -> torch.Tensor:
    """q [B, Hq, Tq, D]; k, v [B, Hkv, L, D] or pages [num_pages, Hkv, page_size, D] with
    `block_table`; checked by the caller. A compressed cache (ikport.KVCache): `fmt` its
    (kv_format, kivi_group), k and v its codes, `side` its scales or pairs (and KIVI's residual),
    `side_strides` their strides in 4-byte words (impl.attention._Side)."""
    dev = _device_index(q)
    problem = _problem(q, k, block_table, None, fmt)
    prepared = prepare(backend, problem, dev, options)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q, scale_log2 = positive_scale(q, scale)
    p = PrefillParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.q_lens = q_lens.data_ptr() if q_lens is not None else None
    p.kv_lens = kv_lens.data_ptr() if kv_lens is not None else None
    if block_table is not None:
        p.block_table, p.bt_sb, p.page_size_log2 = block_table.data_ptr(), block_table.stride(0), problem.page_size_log2
    p.q_sb, p.q_sh, p.q_st = q.stride()[:3]
    p.k_sb, p.k_sh, p.k_st = k.stride()[:3]
    p.v_sb, p.v_sh, p.v_st = v.stride()[:3]
    p.o_sb, p.o_sh, p.o_st = out.stride()[:3]
    if side:  # the compressed cache's words (and KIVI's residual), alive until the launch is queued
        p.k_scale, p.v_scale = side[0].data_ptr(), side[1].data_ptr()
        p.ks_sb, p.ks_sh, p.ks_st = side_strides.k_scale
        p.vs_sb, p.vs_sh, p.vs_st = side_strides.v_scale
        if len(side) > 2:
            p.k_resid = side[2].data_ptr()
            p.kr_sb, p.kr_sh, p.kr_st = side_strides.k_resid
    _finish(p, prepared, problem, causal, scale_log2)
    prepared.launch(p, raw_stream(dev))
    return out


def varlen(backend: Backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
           causal: bool, scale: float | None, out: torch.Tensor | None, return_lse: bool,
           options: PrefillOptions):
    """FlashAttention's packed layout: q [total_q, Hq, D], k/v [total_k, Hkv, D]; checked by the caller."""
    dev = _device_index(q)
    problem = _problem(q, k, None, (max_seqlen_q, max_seqlen_k))
    prepared = prepare(backend, problem, dev, options)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device) if return_lse else None
    q, scale_log2 = positive_scale(q, scale)
    p = PrefillParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.cu_q, p.cu_k = cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr()
    p.q_sh, p.q_st = q.stride(1), q.stride(0)
    p.k_sh, p.k_st = k.stride(1), k.stride(0)
    p.v_sh, p.v_st = v.stride(1), v.stride(0)
    p.o_sh, p.o_st = out.stride(1), out.stride(0)
    if lse is not None:
        p.lse, p.lse_sh = lse.data_ptr(), lse.stride(0)
    batch = cu_seqlens_q.shape[0] - 1
    _finish(p, prepared, problem, causal, scale_log2, batch)
    if batch > 0 and max_seqlen_q > 0:
        prepared.launch_batch(batch)(p, raw_stream(dev))
    elif out.numel():
        out.zero_()
    return (out, lse) if return_lse else out


def _finish(p: PrefillParams, prepared: _Prepared, problem: PrefillProblem, causal: bool, scale_log2: float,
            batch: int | None = None) -> None:
    p.batch = problem.batch if batch is None else batch
    p.num_q_heads, p.num_kv_heads = problem.q_heads, problem.kv_heads
    p.q_capacity, p.kv_capacity = problem.q_capacity, problem.kv_capacity
    p.causal, p.longest_first = int(causal), int(prepared.plan.longest_first)
    p.scale_log2 = scale_log2
