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
from ..launch import capturing, raw_stream, split_counters, split_scratch
from ..plan import w4a16 as w4a16_plan
from ..plan.w4a16 import W4A16Options, W4A16Plan, W4A16Problem

_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def w4a16_matmul(x: torch.Tensor, weight: Int4Weight, out: torch.Tensor | None = None,
                 options: W4A16Options | None = None) -> torch.Tensor:
    """`ikport.w4a16_matmul`, eager, x not needing a gradient (see its docstring)."""
    sig = _signature(x, weight, out, options)
    call = _checked.get(sig, _UNCHECKED) if sig is not None else _UNCHECKED
    if call is _UNCHECKED:
        backend = _check(x, weight, out, options)
        call = None if backend is None else _W4A16Call(backend, x, weight, out, options)
        if sig is not None:
            if len(_checked) > 4096:
                _checked.clear()
            _checked[sig] = call
    if call is None:  # the CPU
        result = reference.w4a16_matmul(x, weight)
        if out is None:
            return result
        out.copy_(result)
        return out
    return call(x, weight, out)


# Call signatures that passed every check, with what runs them: a _W4A16Call (GPU) or None (the
# CPU reference). The checks depend only on types, shapes, strides, dtypes, devices and the
# weight's layout, plus pointer alignment, which the call re-checks every time (as
# ikport.impl.attention does).
_UNCHECKED = object()
_checked: dict[tuple, _W4A16Call | None] = {}


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


def _check(x: object, weight: object, out: object, options: object) -> Backend | None:
    """Every check of a call (raising on the first problem); the backend that runs it, or None
    for the CPU reference."""
    checks.w4a16(x, weight, out)
    checks.options(options, W4A16Options)
    backend = dispatch.backend_for(x.device)
    if backend is None:
        return None
    want = layout_for_device(x.device)
    if weight.layout != want:
        raise ValueError(f"weight is packed as {weight.layout!r} but {x.device} runs {want!r}: "
                         f"use weight.to({str(x.device)!r}) (repacks once)")
    checks.vector_rows("x", x.reshape(-1, weight.in_features))
    return backend


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
    """Forget every launch plan and prepared call (tests that change the planner's constants)."""
    _plans.clear()
    _checked.clear()


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


class _W4A16Call:
    """One checked call layout's launch: the plan, a parameter struct holding the layout's strides
    and sizes, and the kernel's launcher with grid, block and shared memory bound. A call copies
    the struct, fills in the pointers and launches: no per-call work that depends only on the
    layout (as ikport.impl.attention's _DecodeCall)."""

    def __init__(self, backend: Backend, x: torch.Tensor, weight: Int4Weight, out: torch.Tensor | None,
                 options: W4A16Options | None) -> None:
        N, K = weight.out_features, weight.in_features
        M = x.numel() // K
        self.backend, self.options, self.m, self.n, self.k = backend, options, M, N, K
        self.device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        self.out_shape = (*x.shape[:-1], N)
        if M == 0:  # nothing to launch: a call returns the empty output
            return
        problem = W4A16Problem(_DTYPE_NAME[x.dtype], M, N, K, weight.layout, weight.group_size)
        plan, kernel = _plan(backend, self.device, problem, options or w4a16_plan.DEFAULT_OPTIONS)
        self.plan = plan
        group_log2 = _group_log2(weight.group_size)
        if plan.dense:  # the kernel writes a dense [N, K] (row stride K): no x, no split-K
            self.template = W4A16Params(0, 0, 0, 0, 0, 0, 0, 0, K, 0, N, K, packed_k(K), group_log2, 1,
                                        plan.chunks_per_split)
            self.launch = kernel.bind(plan.grid, plan.block, 0)
            return
        # The kernel reads x itself where its leading dims flatten to one row dim (a view), else a
        # copy of its rows made per call (_rows), as it reads an act-order weight's permuted x.
        row_stride = _row_stride(x, K)
        self.copy_rows = row_stride is None or weight.perm is not None
        o_sm = N if out is None else (out if out.dim() == 2 else out.view(M, N)).stride(0)
        self.template = W4A16Params(0, 0, 0, 0, 0, 0, 0, row_stride or 0, o_sm, M, N, K, packed_k(K),
                                    group_log2, plan.num_splits, plan.chunks_per_split)
        self.launch = kernel.bind(plan.grid, plan.block, plan.shared_bytes)
        self.scratch_bytes = plan.num_splits * M * N * 4  # split-K partials, fp32

    def __call__(self, x: torch.Tensor, weight: Int4Weight, out: torch.Tensor | None) -> torch.Tensor:
        zeros = weight.zeros
        xp, qp, sp = x.data_ptr(), weight.qweight.data_ptr(), weight.scales.data_ptr()
        zp = 0 if zeros is None else zeros.data_ptr()
        if (xp | qp | sp | zp) & 15:
            _check(x, weight, out, self.options)  # names the misaligned pointer
        if out is None:
            out = x.new_empty(self.out_shape)
        if not self.m:
            return out
        p = W4A16Params.from_buffer_copy(self.template)
        p.qweight, p.scales, p.zeros = qp, sp, zp
        stream = raw_stream(self.device)
        plan = self.plan
        if plan.dense:
            self._dense(p, stream, x, weight, out)
            return out
        rows = None  # a copy of x's rows where the kernel cannot read x itself
        if self.copy_rows:
            rows = self._rows(x, weight)
            p.x, p.x_sm = rows.data_ptr(), rows.stride(0)
        else:
            p.x = xp
        p.out = out.data_ptr()
        partials = counters = None  # torch tensors owning scratch, if any: alive until the launch is queued
        if plan.num_splits > 1:
            in_capture = capturing()
            p.partials, partials = split_scratch(self.backend, self.device, stream, self.scratch_bytes,
                                                 in_capture=in_capture)
            p.tile_counters = split_counters(self.backend, self.device, stream, plan.counters,
                                             in_capture=in_capture)
            if not p.tile_counters:  # capturing a graph: zeroed inside it, so every replay starts clean
                counters = torch.zeros(plan.counters, dtype=torch.int32, device=x.device)
                p.tile_counters = counters.data_ptr()
        self.launch(p, stream)
        return out

    def _rows(self, x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
        """x as [M, K] rows in the weight's channel order (an act-order checkpoint's codes are
        stored in sorted-group order)."""
        rows = x.reshape(-1, self.k)
        if weight.perm is not None:
            rows = rows.index_select(1, weight.perm)
        return rows

    def _dense(self, p: W4A16Params, stream: int, x: torch.Tensor, weight: Int4Weight, out: torch.Tensor) -> None:
        """Dequantize once into a dense [N, K] in x's dtype, then the vendor's GEMM."""
        dense = x.new_empty((self.n, self.k))
        p.out = dense.data_ptr()
        self.launch(p, stream)
        torch.matmul(self._rows(x, weight), dense.T, out=out if out.dim() == 2 else out.view(self.m, self.n))


def _row_stride(x: torch.Tensor, K: int) -> int | None:
    """The row stride of x as [M, K] rows, or None where its leading dims do not flatten to one."""
    try:
        return x.view(-1, K).stride(0)
    except RuntimeError:
        return None
