"""The eager W4A16 path behind `ikport.w4a16_matmul` and its custom op: checks, then the PyTorch
reference (CPU tensors) or a launch of kernels_src/w4a16.cuh planned by ikport.plan.w4a16.
"""

from __future__ import annotations

import logging

import torch

from .. import checks, dispatch, reference
from ..backends.base import Backend
from ..int4 import Int4Weight, layout_for_device, packed_k
from ..kernels import Kernel, W4A16Params, get_kernel
from ..launch import raw_stream, split_counters, split_scratch
from ..plan import w4a16 as w4a16_plan
from ..plan.w4a16 import W4A16Options, W4A16Plan, W4A16Problem

_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def w4a16_matmul(x: torch.Tensor, weight: Int4Weight, out: torch.Tensor | None = None,
                 options: W4A16Options | None = None) -> torch.Tensor:
    """`ikport.w4a16_matmul`, eager, x not needing a gradient (see its docstring)."""
    sig = _signature(x, weight, out, options)
    backend = _checked.get(sig) if sig is not None else None
    if backend is None or _misaligned(x, weight):
        checks.w4a16(x, weight, out)
        checks.options(options, W4A16Options)
        backend = dispatch.backend_for(x.device)
        if backend is None:
            result = reference.w4a16_matmul(x, weight)
            if out is None:
                return result
            out.copy_(result)
            return out
        want = layout_for_device(x.device)
        if weight.layout != want:
            raise ValueError(f"weight is packed as {weight.layout!r} but {x.device} runs {want!r}: "
                             f"use weight.to({str(x.device)!r}) (repacks once)")
        checks.vector_rows("x", x.reshape(-1, weight.in_features))
        if sig is not None:
            if len(_checked) > 4096:
                _checked.clear()
            _checked[sig] = backend
    N, K = weight.out_features, weight.in_features
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # (reshape and view cost host time: skip at 2-D)
    if weight.perm is not None:  # act-order checkpoint: codes are stored in sorted-group order
        x2 = x2.index_select(1, weight.perm)
    M = x2.shape[0]
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    _launch(backend, x2, weight, out if out.dim() == 2 else out.view(M, N), options)
    return out


# Call signatures that passed every check on a GPU, with their backend: the checks depend only on
# types, shapes, strides, dtypes, devices and the weight's layout, plus pointer alignment, which
# is re-checked on every call (as ikport.attention does).
_checked: dict[tuple, Backend] = {}


def _signature(x: object, weight: object, out: object, options: object) -> tuple | None:
    if type(x) is not torch.Tensor or type(weight) is not Int4Weight:
        return None
    if options is not None and type(options) is not W4A16Options:
        return None  # the full checks name it
    if out is not None and type(out) is not torch.Tensor:
        return None
    o = None if out is None else (out.shape, out.stride(), out.dtype, out.device)
    return (x.shape, x.stride(), x.dtype, x.device, weight.in_features, weight.out_features,
            weight.scales.dtype, weight.qweight.device, weight.layout, weight.zeros is None,
            weight.perm is None, weight.group_size, options, o)


def _misaligned(x: torch.Tensor, weight: Int4Weight) -> bool:
    ptrs = x.data_ptr() | weight.qweight.data_ptr() | weight.scales.data_ptr()
    if weight.zeros is not None:
        ptrs |= weight.zeros.data_ptr()
    return bool(ptrs & 15)


def plan_of(x: torch.Tensor, weight: Int4Weight, options: W4A16Options | None = None) -> W4A16Plan:
    """The launch plan a GPU call with x (2-D) and this weight runs (for tests and benchmarks)."""
    backend = dispatch.backend_for(x.device)
    if backend is None:
        raise ValueError(f"plan_of: {x.device} tensors run the PyTorch reference, not a planned kernel")
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    problem = W4A16Problem(_DTYPE_NAME[x.dtype], x.shape[0], weight.out_features, weight.in_features,
                           weight.layout, weight.group_size)
    return _plan(backend, dev, problem, options or w4a16_plan.DEFAULT_OPTIONS)[0]


def clear_plans() -> None:
    """Forget every launch plan (tests that change the planner's constants)."""
    _plans.clear()


# ---- GPU path ------------------------------------------------------------------------------------
_plans: dict[tuple, tuple[W4A16Plan, Kernel]] = {}


def _plan(backend: Backend, dev: int, problem: W4A16Problem, options: W4A16Options) -> tuple[W4A16Plan, Kernel]:
    key = (backend.name, dev, problem, options)
    found = _plans.get(key)
    if found is not None:
        return found
    plan = w4a16_plan.plan(problem, backend.device_info(dev),
                           lambda spec: get_kernel(spec, backend, dev).static_shared, options)
    logging.getLogger("ikport").debug(
        "plan w4a16 %s %s%s -> %s grid=%s block=%s smem=%d splits=%d", backend.name, problem,
        f" {options.pinned()}" if options.pinned() else "", plan.kernel.uri, plan.grid, plan.block,
        plan.shared_bytes, plan.num_splits)
    if len(_plans) > 4096:
        _plans.clear()
    found = _plans[key] = (plan, get_kernel(plan.kernel, backend, dev))
    return found


def _group_log2(group_size: int) -> int:
    """The kernels find a group with a shift: log2 G, or 31 for one non-power-of-two group
    spanning all of K (per-channel), which every k < 2**31 shifts to group 0."""
    if group_size & (group_size - 1) == 0:
        return group_size.bit_length() - 1
    return 31


def _launch(backend: Backend, x: torch.Tensor, weight: Int4Weight, out: torch.Tensor,
            options: W4A16Options | None) -> None:
    M, K = x.shape
    N = weight.out_features
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    problem = W4A16Problem(_DTYPE_NAME[x.dtype], M, N, K, weight.layout, weight.group_size)
    plan, kernel = _plan(backend, dev, problem, options or w4a16_plan.DEFAULT_OPTIONS)
    S = plan.num_splits
    stream = raw_stream(dev)
    partials = counters = None
    partials_ptr = counters_ptr = 0
    if S > 1:
        partials_ptr, partials = split_scratch(backend, dev, stream, S * M * N * 4)
        counters_ptr = split_counters(backend, dev, stream, plan.counters)
        if not counters_ptr:  # capturing a graph: zeroed inside it, so every replay starts clean
            counters = torch.zeros(plan.counters, dtype=torch.int32, device=x.device)
            counters_ptr = counters.data_ptr()
    zeros = weight.zeros
    if plan.dense:  # dequantize once into a dense [N, K], then the vendor's GEMM
        dense = torch.empty((N, K), dtype=x.dtype, device=x.device)
        p = W4A16Params(0, weight.qweight.data_ptr(), weight.scales.data_ptr(),
                        zeros.data_ptr() if zeros is not None else 0, dense.data_ptr(), 0, 0,
                        0, K, 0, N, K, packed_k(K), _group_log2(weight.group_size), 1,
                        plan.chunks_per_split)
        kernel.launch(plan.grid, plan.block, 0, p, stream)
        torch.matmul(x, dense.T, out=out)
        return
    p = W4A16Params(
        x.data_ptr(), weight.qweight.data_ptr(), weight.scales.data_ptr(),
        zeros.data_ptr() if zeros is not None else 0, out.data_ptr(),
        partials_ptr, counters_ptr,
        x.stride(0), out.stride(0), M, N, K, packed_k(K), _group_log2(weight.group_size), S,
        plan.chunks_per_split,
    )
    kernel.launch(plan.grid, plan.block, plan.shared_bytes, p, stream)
