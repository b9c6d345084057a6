"""Weight-only INT4 matrix product: `w4a16_matmul(x, weight)` = x @ W^T with W an `Int4Weight`.

GPU tensors run kernels_src/w4a16.cuh; CPU tensors run `ikport.reference.w4a16_matmul` (the
dequantized weight in fp32). The weight must be packed for the GPU's matrix-unit family
(`weight.to(device)` repacks; `ikport.int4.layout_for_device` says which one a device wants).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import checks, configs, dispatch, reference
from .backends.base import Backend
from .int4 import Int4Weight, layout_for_device, layout_info
from .kernels import Kernel, W4A16Params, get_kernel
from .launch import raw_stream, split_counters, split_scratch
from .manifest import spec

# Journey variants a caller (the benchmark) may force; None picks the default, "mma".
#   naive        v0: one warp per 16 output columns, scalar unpacking, x read element by element
#   gemv-scalar  v1: 4 warps split K, x staged in shared memory, codes unpacked one at a time
#   gemv         v2: + "magic number" unpacking, two codes to one fp16/bf16 pair per OR
#   mma-nosplit  v3: the matrix units (B fragments built in registers from the packed codes), x
#                    shared by 4 warps side by side along N, one block column per 128 outputs
#   mma          v4: + split-K across blocks chosen from the SM count (default below
#                    configs.W4A16_DENSE_MIN_M rows)
#   dequant-gemm     the weights dequantized to a dense [N, K] in x's dtype by one kernel, then
#                    torch's dense matmul (default from configs.W4A16_DENSE_MIN_M rows: prefill)
VARIANTS = ("naive", "gemv-scalar", "gemv", "mma-nosplit", "mma", "dequant-gemm")
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def w4a16_matmul(
    x: torch.Tensor,
    weight: Int4Weight,
    *,
    out: torch.Tensor | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """out[..., N] = x[..., K] @ W^T, W dequantized from 4-bit codes: (q - z) * s per group.

    Args:
        x: [..., K] fp16/bf16 activations (fp32 too on the CPU), the dtype of `weight.scales`.
            Any leading dims; rows must be 16-byte aligned (a contiguous tensor is).
        weight: an `Int4Weight` (`ikport.int4.quantize_weight`, `ikport.formats.from_gptq` /
            `from_awq`) on x's device, packed for it.
        out: optional contiguous [..., N] tensor of x's dtype to write into.
        variant: force a journey variant (see VARIANTS); default "mma".

    Returns:
        [..., N] in x's dtype. When x requires grad (and grad mode is on), the result carries a
        gradient for x (grad @ W, W dequantized); the INT4 weights are frozen.

    Example:
        >>> w = ikport.quantize_weight(torch.randn(4096, 4096, device="cuda", dtype=torch.float16))
        >>> y = ikport.w4a16_matmul(torch.randn(1, 4096, device="cuda", dtype=torch.float16), w)
    """
    if torch.compiler.is_compiling():  # traced: one custom-op node (ikport/ops.py)
        from .ops import traced_w4a16_matmul

        return traced_w4a16_matmul(x, weight, out=out, variant=variant)
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        if out is not None:
            raise ValueError("out= is not supported when x requires grad (autograd needs a new tensor)")
        return _W4A16Grad.apply(x, weight, variant)
    sig = _signature(x, weight, out, variant)
    backend = _checked.get(sig) if sig is not None else None
    if backend is None or _misaligned(x, weight):
        checks.w4a16(x, weight, out)
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown w4a16 variant {variant!r}; choose from {VARIANTS}")
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
    _launch(backend, x2, weight, out if out.dim() == 2 else out.view(M, N), variant)
    return out


class _W4A16Grad(torch.autograd.Function):
    """x may need a gradient (a model called outside torch.no_grad): the product is computed as
    usual, and the gradient with respect to x is grad @ W with W dequantized in the gradient's
    dtype. The INT4 weights are frozen: they get none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Int4Weight, variant: str | None) -> torch.Tensor:
        ctx.weight = weight
        with torch.no_grad():
            return w4a16_matmul(x, weight, variant=variant)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.weight.dequantize(torch.float32).to(grad.device)
        return (grad.float() @ w).to(grad.dtype), None, None


# Call signatures that passed every check on a GPU, with their backend: the checks depend only on
# types, shapes, strides, dtypes, devices and the weight's layout, plus pointer alignment, which
# is re-checked on every call (as ikport.attention does).
_checked: dict[tuple, Backend] = {}


def _signature(x: object, weight: object, out: object, variant: str | None) -> tuple | None:
    if type(x) is not torch.Tensor or type(weight) is not Int4Weight:
        return None
    if out is not None and type(out) is not torch.Tensor:
        return None
    o = None if out is None else (out.shape, out.stride(), out.dtype, out.device)
    return (x.shape, x.stride(), x.dtype, x.device, weight.in_features, weight.out_features,
            weight.scales.dtype, weight.qweight.device, weight.layout, weight.zeros is None,
            weight.perm is None, weight.group_size, variant, o)


def _misaligned(x: torch.Tensor, weight: Int4Weight) -> bool:
    ptrs = x.data_ptr() | weight.qweight.data_ptr() | weight.scales.data_ptr()
    if weight.zeros is not None:
        ptrs |= weight.zeros.data_ptr()
    return bool(ptrs & 15)


# ---- GPU path ------------------------------------------------------------------------------------
@dataclass
class _Plan:
    device: int
    kernel: Kernel
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    num_splits: int
    chunks_per_split: int
    dense: bool = False  # the kernel writes a dense weight; torch's matmul does the product


_plans: dict[tuple, _Plan] = {}


def _plan(backend: Backend, dev: int, dtype: torch.dtype, M: int, N: int, K: int, layout: str,
          group_size: int, variant: str | None) -> _Plan:
    key = (backend.name, dev, dtype, M, N, K, layout, group_size, variant)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    variant = variant or ("dequant-gemm" if M >= configs.W4A16_DENSE_MIN_M else "mma")
    info = backend.device_info(dev)
    warp = info.warp_size
    dt = _DTYPE_NAME[dtype]
    chunk_k = layout_info(layout).chunk_k
    if variant == "naive":
        kernel = get_kernel(spec("w4a16", "naive", dtype=dt), backend, dev)
        plan = _Plan(dev, kernel, (N // 16, M, 1), (warp, 1, 1), 0, 1, K // chunk_k)
    elif variant == "dequant-gemm":
        kernel = get_kernel(spec("w4a16", "dequant", dtype=dt), backend, dev)
        chunks_per_block = 256 // layout_info(layout).unique_lanes  # one lane vector a thread
        plan = _Plan(dev, kernel, (N // 16, -(-(K // chunk_k) // chunks_per_block), 1), (256, 1, 1),
                     0, 1, K // chunk_k, dense=True)
    elif variant in ("gemv-scalar", "gemv"):
        smem = K * dtype.itemsize
        if smem > info.max_smem_per_block:
            raise ValueError(f"variant {variant!r} stages x in shared memory: K={K} needs {smem} B, "
                             f"the device allows {info.max_smem_per_block} B")
        kernel = get_kernel(spec("w4a16", "gemv", dtype=dt, magic=variant == "gemv",
                                 warps=configs.W4A16_GEMV_WARPS), backend, dev)
        plan = _Plan(dev, kernel, (N // 16, M, 1), (configs.W4A16_GEMV_WARPS * warp, 1, 1), smem, 1,
                     K // chunk_k)
    else:
        cfg = configs.w4a16_config(m=M, n=N, k=K, chunk_k=chunk_k, sm_count=info.sm_count,
                                   num_splits=1 if variant == "mma-nosplit" else None)
        # Fewer warps where the ring (static) plus the x slabs (dynamic) would pass the device's
        # shared memory per block (e.g. 64 KB of LDS on CDNA, whose 64-lane waves double the ring).
        warps = cfg.warps
        while True:
            stages = configs.w4a16_stages(warps * warp, cfg.n_tiles)
            kernel = get_kernel(spec("w4a16", "mma", dtype=dt, m_tiles=cfg.m_tiles, n_tiles=cfg.n_tiles,
                                     warps=warps, group_tiles=configs.w4a16_group_tiles(group_size),
                                     stages=stages), backend, dev)
            # x slabs: stages x warps x min(M, rows per block) rows of chunk_k + 8 elements
            x_smem = stages * warps * min(M, 16 * cfg.m_tiles) * (chunk_k + 8) * dtype.itemsize
            if kernel.static_shared + x_smem <= info.max_smem_per_block:
                break
            if warps == 1:
                raise ValueError(f"w4a16: {M} rows of x need {kernel.static_shared + x_smem} B of shared "
                                 f"memory per block, the device allows {info.max_smem_per_block} B")
            warps //= 2
        plan = _Plan(dev, kernel, cfg.grid, (warps * warp, 1, 1), x_smem, cfg.num_splits,
                     cfg.chunks_per_split)
    logging.getLogger("ikport").debug(
        "plan w4a16 %s %s M=%d N=%d K=%d -> %s grid=%s block=%s smem=%d splits=%d",
        backend.name, dtype, M, N, K, plan.kernel.spec.uri, plan.grid, plan.block,
        plan.shared_bytes, plan.num_splits)
    if len(_plans) > 4096:
        _plans.clear()
    _plans[key] = plan
    return plan


def _group_log2(group_size: int) -> int:
    """The kernels find a group with a shift: log2 G, or 31 for one non-power-of-two group
    spanning all of K (per-channel), which every k < 2**31 shifts to group 0."""
    if group_size & (group_size - 1) == 0:
        return group_size.bit_length() - 1
    return 31


def _launch(backend: Backend, x: torch.Tensor, weight: Int4Weight, out: torch.Tensor,
            variant: str | None) -> None:
    M, K = x.shape
    N = weight.out_features
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    plan = _plan(backend, dev, x.dtype, M, N, K, weight.layout, weight.group_size, variant)
    S = plan.num_splits
    stream = raw_stream(dev)
    partials = counters = None
    partials_ptr = counters_ptr = 0
    if S > 1:
        partials_ptr, partials = split_scratch(backend, dev, stream, S * M * N * 4)
        n_counters = plan.grid[0] * plan.grid[2]
        counters_ptr = split_counters(backend, dev, stream, n_counters)
        if not counters_ptr:  # capturing a graph: zeroed inside it, so every replay starts clean
            counters = torch.zeros(n_counters, dtype=torch.int32, device=x.device)
            counters_ptr = counters.data_ptr()
    zeros = weight.zeros
    if plan.dense:  # dequantize once into a dense [N, K], then the vendor's GEMM
        dense = torch.empty((N, K), dtype=x.dtype, device=x.device)
        p = W4A16Params(0, weight.qweight.data_ptr(), weight.scales.data_ptr(),
                        zeros.data_ptr() if zeros is not None else 0, dense.data_ptr(), 0, 0,
                        0, K, 0, N, K, _group_log2(weight.group_size), 1, plan.chunks_per_split)
        plan.kernel.launch(plan.grid, plan.block, 0, p, stream)
        torch.matmul(x, dense.T, out=out)
        return
    p = W4A16Params(
        x.data_ptr(), weight.qweight.data_ptr(), weight.scales.data_ptr(),
        zeros.data_ptr() if zeros is not None else 0, out.data_ptr(),
        partials_ptr, counters_ptr,
        x.stride(0), out.stride(0), M, N, K, _group_log2(weight.group_size), S, plan.chunks_per_split,
    )
    plan.kernel.launch(plan.grid, plan.block, plan.shared_bytes, p, stream)
