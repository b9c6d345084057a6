"""Weight-only INT4 matrix product: `w4a16_matmul(x, weight)` = x @ W^T with W an `Int4Weight`.

GPU tensors run kernels_src/w4a16.cuh; CPU tensors run `ikport.reference.w4a16_matmul` (the
dequantized weight in fp32). The weight must be packed for the GPU's matrix-unit family
(`weight.to(device)` repacks; `ikport.int4.layout_for_device` says which one a device wants).
Eager calls go to ikport.impl.w4a16; while torch.compile traces, each call becomes one custom-op
node (ikport.ops).
"""

from __future__ import annotations

import torch

from . import ops
from .impl import w4a16 as _impl
from .int4 import Int4Weight
from .plan.w4a16 import W4A16Options


def w4a16_matmul(
    x: torch.Tensor,
    weight: Int4Weight,
    *,
    out: torch.Tensor | None = None,
    options: W4A16Options | None = None,
) -> torch.Tensor:
    """out[..., N] = x[..., K] @ W^T, W dequantized from 4-bit codes: (q - z) * s per group.

    Args:
        x: [..., K] fp16/bf16 activations (fp32 too on the CPU), the dtype of `weight.scales`.
            Any leading dims; rows must be 16-byte aligned (a contiguous tensor is).
        weight: an `Int4Weight` (`ikport.int4.quantize_weight`, `ikport.formats.from_gptq` /
            `from_awq`) on x's device, packed for it.
        out: optional contiguous [..., N] tensor of x's dtype to write into.
        options: an `ikport.W4A16Options` pinning a journey variant or a launch choice, for
            benchmarks and tuning runs; default None (the planner decides by M).

    Returns:
        [..., N] in x's dtype. When x requires grad (and grad mode is on), the result carries a
        gradient for x (grad @ W, W dequantized); the INT4 weights are frozen.

    Example:
        >>> w = ikport.quantize_weight(torch.randn(4096, 4096, device="cuda", dtype=torch.float16))
        >>> y = ikport.w4a16_matmul(torch.randn(1, 4096, device="cuda", dtype=torch.float16), w)
    """
    if torch.compiler.is_compiling():  # traced: one custom-op node
        return ops.traced_w4a16_matmul(x, weight, out=out, options=options)
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        if out is not None:
            raise ValueError("out= is not supported when x requires grad (autograd needs a new tensor)")
        return _W4A16Grad.apply(x, weight, options)
    return _impl.w4a16_matmul(x, weight, out, options)


class _W4A16Grad(torch.autograd.Function):
    """x may need a gradient (a model called outside torch.no_grad): the product is computed as
    usual, and the gradient with respect to x is grad @ W with W dequantized in the gradient's
    dtype. The INT4 weights are frozen: they get none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Int4Weight, options: W4A16Options | None) -> torch.Tensor:
        ctx.weight = weight
        with torch.no_grad():
            return _impl.w4a16_matmul(x, weight, None, options)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.weight.dequantize(torch.float32).to(grad.device)
        return (grad.float() @ w).to(grad.dtype), None, None
