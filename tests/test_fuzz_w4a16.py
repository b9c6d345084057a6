"""Fuzz for w4a16_matmul: random valid shapes, group sizes, zero points, act-order permutations,
layouts, dtypes and activation strides against an independent float64 oracle built straight from
the codes (not from Int4Weight.dequantize), plus invalid inputs that must raise before launch.

CPU part (CI): the CPU path, the checks, the out= path inside a poisoned guard buffer, and the
GPU-only checks (`gpu=True`) on the same tensors against the documented rule. GPU part (marked
gpu): a few hundred random valid cases on the device, outputs poisoned inside guard regions.
"""

from __future__ import annotations

import random

import pytest
import torch

import ikport
from ikport import checks, int4

CPU_CASES = 1000
GPU_CASES = 300
GUARD = -7.25  # exactly representable in every dtype
GPU_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # x max |ref|, as tests/test_w4a16_gpu.py


def oracle(x, codes, scales, zeros, group, perm):
    """float64 x @ W^T, W[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n] in the stored order."""
    x64 = x.detach().to("cpu", torch.float64).reshape(-1, codes.shape[1])
    if perm is not None:
        x64 = x64[:, perm.cpu()]
    g = torch.arange(codes.shape[1]) // group
    s = scales.cpu().double()[g].T                     # [N, K]
    z = 8.0 if zeros is None else zeros.cpu().double()[g].T
    w = (codes.cpu().double() - z) * s
    return (x64 @ w.T).reshape(*x.shape[:-1], codes.shape[0])


def rand_case(rng: random.Random, gen: torch.Generator, device: str, dtype: torch.dtype, layout: str):
    N = 16 * rng.randint(1, 12)
    K = 32 * rng.randint(1, 16)  # K tails too: any multiple of 32 (stored padded to 128)
    group = rng.choice([32, 64, 128, K])  # a G not dividing K: a shorter last group; G >= K: one group
    codes = torch.randint(0, 16, (N, K), generator=gen).to(torch.uint8)
    scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
    groups = -(-K // group)
    scales = (torch.rand(groups, N, generator=gen) * 0.05 + 0.001).to(scale_dtype)
    zeros = None if rng.random() < 0.5 else torch.randint(0, 16, (groups, N), generator=gen).to(scale_dtype)
    perm = torch.randperm(K, generator=gen) if rng.random() < 0.25 else None
    w = int4.Int4Weight.from_codes(codes.to(device), scales.to(device),
                                   None if zeros is None else zeros.to(device), group,
                                   perm=None if perm is None else perm.to(device), layout=layout)
    lead = rng.choice([(rng.randint(1, 40),), (rng.randint(1, 3), rng.randint(1, 5)), (0,)])
    pad = rng.choice([0, 8, 16, 3])  # row padding in elements: 3 breaks the 16-byte row rule
    offset = rng.choice([0, 8, 1])  # 1 breaks the 16-byte base alignment
    rows = 1
    for d in lead:
        rows *= d
    buf = torch.randn(rows * (K + pad) + offset + 8, generator=gen).to(dtype).to(device)
    x = buf[offset:offset + rows * (K + pad)].view(rows, K + pad)[:, :K].reshape(*lead, K) if rows else \
        torch.empty(*lead, K, dtype=dtype, device=device)
    return x, w, codes, scales, zeros, group, perm


def gpu_rule_ok(x: torch.Tensor, w) -> bool:
    """The documented GPU rule: fp16/bf16 x of the scales' dtype, rows 16-byte aligned."""
    if x.dtype not in (torch.float16, torch.bfloat16) or x.dtype != w.dtype:
        return False
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return True
    return x2.stride(-1) == 1 and (x2.stride(0) % 8 == 0 or x2.shape[0] == 1) and x2.data_ptr() % 16 == 0


def test_fuzz_w4a16_cpu():
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for case in range(CPU_CASES):
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
        layout = rng.choice(int4.LAYOUTS)
        x, w, codes, scales, zeros, group, perm = rand_case(rng, gen, "cpu", dtype, layout)
        N = w.out_features
        # out= inside a poisoned bigger buffer: nothing outside the view may change
        shape = (*x.shape[:-1], N)
        numel = x.reshape(-1, x.shape[-1]).shape[0] * N
        guard = torch.full((numel + 32,), GUARD, dtype=dtype)
        out = guard[16:16 + numel].view(shape)
        out.fill_(float("nan"))
        res = ikport.w4a16_matmul(x, w, out=out)
        assert res is out
        assert (guard[:16] == GUARD).all() and (guard[16 + numel:] == GUARD).all(), f"case {case}: guard"
        ref = oracle(x, codes, scales, zeros, group, perm)
        if numel:
            err = (out.double() - ref).abs().max().item()
            bound = (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, ref.abs().max().item())
            assert err <= bound, f"case {case}: {err:.3e} > {bound:.3e} ({dtype}, {tuple(x.shape)}, G={group})"
        # the GPU-only checks on the same CPU tensors agree with the documented rule
        try:
            checks.w4a16(x, w, None, gpu=True)
            checks.vector_rows("x", x.reshape(-1, x.shape[-1]))
            verdict = True
        except (TypeError, ValueError):
            verdict = False
        assert verdict == gpu_rule_ok(x, w), f"case {case}: GPU checks said {verdict}"


def _small():
    w = ikport.quantize_weight(torch.randn(32, 256, dtype=torch.float16))
    return torch.randn(3, 256, dtype=torch.float16), w


INVALID = [  # name, call, exception, message fragment
    ("not a weight", lambda x, w: ikport.w4a16_matmul(x, w.qweight), TypeError, "Int4Weight"),
    ("not a tensor", lambda x, w: ikport.w4a16_matmul(x.tolist(), w), TypeError, "torch.Tensor"),
    ("int activations", lambda x, w: ikport.w4a16_matmul(x.to(torch.int32), w), TypeError, "not supported"),
    ("wrong K", lambda x, w: ikport.w4a16_matmul(x[:, :128], w), ValueError, "in_features"),
    ("0-d x", lambda x, w: ikport.w4a16_matmul(x[0, 0], w), ValueError, "in_features"),
    ("out shape", lambda x, w: ikport.w4a16_matmul(x, w, out=torch.empty(3, 31, dtype=x.dtype)), ValueError,
     "out must be"),
    ("out dtype", lambda x, w: ikport.w4a16_matmul(x, w, out=torch.empty(3, 32)), ValueError, "out must be"),
    ("out strided", lambda x, w: ikport.w4a16_matmul(x, w, out=torch.empty(32, 3, dtype=x.dtype).T), ValueError,
     "contiguous"),
    ("options", lambda x, w: ikport.w4a16_matmul(x, w, options="fastest"), TypeError, "options must be"),
    ("variant", lambda x, w: ikport.W4A16Options(variant="fastest"), ValueError, "unknown variant"),
    ("gpu: dtype mismatch", lambda x, w: checks.w4a16(x.bfloat16(), w, None, gpu=True), TypeError, "scales are"),
    ("gpu: fp32", lambda x, w: checks.w4a16(x.float(), w, None, gpu=True), TypeError, "not supported"),
    ("gpu: misaligned rows", lambda x, w: checks.vector_rows("x", torch.randn(3, 257, dtype=x.dtype)[:, 1:]),
     ValueError, "16 bytes|aligned"),
    ("bad group size", lambda x, w: ikport.quantize_weight(torch.randn(32, 256), group_size=48), ValueError,
     "group_size"),
    ("K not a multiple of 32", lambda x, w: ikport.quantize_weight(torch.randn(32, 200)), ValueError,
     "K=200 is not a positive multiple of 32"),
    ("N not a multiple of 16", lambda x, w: ikport.quantize_weight(torch.randn(30, 256)), ValueError, "16"),
]


@pytest.mark.parametrize("name,call,exc,msg", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_w4a16_inputs_raise(name, call, exc, msg):
    x, w = _small()
    with pytest.raises(exc, match=msg):
        call(x, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)")
@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
def test_fuzz_w4a16_gpu(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    layout = int4.layout_for_device("cuda")
    done = 0
    while done < GPU_CASES // 3:
        dtype = rng.choice([torch.float16, torch.bfloat16])
        x, w, codes, scales, zeros, group, perm = rand_case(rng, gen, "cuda", dtype, layout)
        if not gpu_rule_ok(x, w):
            with pytest.raises((TypeError, ValueError)):
                ikport.w4a16_matmul(x, w)
            continue
        shape = (*x.shape[:-1], w.out_features)
        numel = x.reshape(-1, x.shape[-1]).shape[0] * w.out_features
        guard = torch.full((numel + 64,), GUARD, dtype=dtype, device="cuda")
        out = guard[32:32 + numel].view(shape)
        out.fill_(float("nan"))
        variant = rng.choice([None, None, "mma-nosplit", "dequant-gemm"])
        ikport.w4a16_matmul(x, w, out=out, options=ikport.W4A16Options(variant=variant))
        assert (guard[:32] == GUARD).all() and (guard[32 + numel:] == GUARD).all(), "guard overwritten"
        if numel:
            ref = oracle(x, codes, scales, zeros, group, perm)
            assert torch.isfinite(out).all()
            err = (out.cpu().double() - ref).abs().max().item()
            assert err <= GPU_TOL[dtype] * ref.abs().max().item() + 1e-6, \
                f"{dtype} {tuple(x.shape)} N={w.out_features} G={group} zeros={zeros is not None} " \
                f"perm={perm is not None} variant={variant}: {err:.3e}"
        done += 1
