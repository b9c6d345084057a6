"""W4A16 matrix products: ikport beside cuBLAS fp16 and torch's tinygemm INT4 kernel, in one process.

Workloads W1-W3 are the protocol's locked ids (Llama 3 8B projections: K=4096 N=4096, K=4096
N=14336, K=14336 N=4096) at M=1; `W2@16` is W2 at M=16, and so on for M up to 2048. Weights are
INT4, symmetric, in groups of 128 along K with fp16 (bf16) scales: ikport.int4.quantize_weight (method "rtn").
Bytes that must move are the INT4 codes and the scales (K*N/2 + K/128*N*2) plus x and the
output, for every implementation; from M=128 on the product becomes compute-bound and TFLOP/s
(2*M*N*K) is reported beside GB/s. Each implementation is checked against a float32 reference,
x.float() @ W_dequant.T with W_dequant from the same quantized weight, before it is timed:
max |out - ref| / max |ref| must stay below 2e-3 for fp16 and 1e-2 for bf16 (the output's own
rounding is 5e-4 and 4e-3 of the largest value); ikport failing the check aborts the run. The
peers compute the same product: cuBLAS multiplies the dequantized weight in fp16, tinygemm
(torch.ops.aten._weight_int4pack_mm, bf16 only) gets the bf16 weight's own codes and scales.
"""

from __future__ import annotations

import argparse
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import ikport
from ikport.plan import w4a16 as w4a16_plan
from ikport.bench import harness

GROUP_SIZE = 128
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# max |out - ref| / max |ref| above which an output is wrong.
TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2}
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048)
QUICK_M = (1, 16)
VARIANT_M = (1, 16)  # journey variants are timed at these M only
# The tiled kernel (explicit until a GPU run sets its crossover) is timed at these M, beside the
# default path, cuBLAS and dequant-gemm (the default from DENSE_MIN_M rows, its own row below).
TILED_M = (32, 64, 128, 256, 512, 2048)
DEFAULT_VARIANT = "mma"  # what the default plan runs below DENSE_MIN_M rows: the "ikport" row
DENSE_MIN_M = w4a16_plan.DENSE_MIN_M  # from here the default plan runs "dequant-gemm"
TFLOPS_FROM_M = 128  # rows from this M on also carry TFLOP/s
WEIGHT_STD = 0.02
# tinygemm packs 8 k-tiles of 16 back to back (16-byte loads), as torchao's int4 weight-only does.
TINYGEMM_INNER_K_TILES = 8
# A timed loop runs 50 calls unless that would take longer than this; --quick caps it at 20.
CALL_BUDGET_S = 1.0
MIN_ITERS = 10
QUICK_MAX_ITERS = 20
# Informational streaming-read passes: W2's weight size and 1 GiB.
READ_PASS_BYTES = (30_277_632, 1 << 30)


@dataclass(frozen=True)
class Shape:
    """One weight: out_features N by in_features K (y = x @ W.T with W [N, K])."""

    id: str
    k: int
    n: int

    @property
    def weight_bytes(self) -> int:
        """INT4 codes plus one 2-byte scale per group of GROUP_SIZE along K."""
        return self.k * self.n // 2 + self.k // GROUP_SIZE * self.n * 2


SHAPES = (Shape("W1", 4096, 4096), Shape("W2", 4096, 14336), Shape("W3", 14336, 4096))


@dataclass(frozen=True)
class Workload:
    shape: Shape
    m: int

    @property
    def id(self) -> str:
        return self.shape.id if self.m == 1 else f"{self.shape.id}@{self.m}"

    @property
    def bytes(self) -> int:
        """Weights and scales, x [M, K] and the output [M, N] in 16-bit."""
        return self.shape.weight_bytes + 2 * self.m * (self.shape.k + self.shape.n)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.shape.n * self.shape.k


def workloads(quick: bool, only: Sequence[str] | None = None) -> list[tuple[Shape, list[Workload]]]:
    """Each shape (those in `only`, default all) with its workloads, M ascending."""
    ms = QUICK_M if quick else M_VALUES
    shapes = [s for s in SHAPES if not only or s.id in only]
    return [(s, [Workload(s, m) for m in ms]) for s in shapes]


def parse_only(text: str) -> tuple[str, ...]:
    """--only's value: shape ids separated by commas ('W2', 'W1,W3')."""
    known = [s.id for s in SHAPES]
    ids = tuple(t.strip().upper() for t in text.split(",") if t.strip())
    unknown = [t for t in ids if t not in known]
    if not ids or unknown:
        raise argparse.ArgumentTypeError(f"unknown shape id(s) {unknown or [text]}; choose {known}")
    return ids


# ---- tinygemm's operands from an INT4 weight --------------------------------------------------
# torch.ops.aten._convert_weight_to_int4pack(Tensor self, int innerKTiles) -> Tensor
#   CUDA: self uint8 [N, K/2], two codes a byte, the even k in the high nibble; returns int32
#   [N/8, K/(innerKTiles*16), 32, innerKTiles/2] (aten/src/ATen/native/cuda/int4mm.cu).
#   CPU (_convert_weight_to_int4pack_for_cpu): self int32 [N, K], one code per element.
# torch.ops.aten._weight_int4pack_mm(Tensor self, Tensor mat2, int qGroupSize,
#                                    Tensor qScaleAndZeros) -> Tensor
#   self bf16 [M, K] (CUDA takes bf16 only), qGroupSize 32/64/128/256, qScaleAndZeros bf16
#   [K/G, N, 2] (scale, zero); each weight is (q - 8) * scale + zero, q in 0..15, then
#   out = self @ W.T in bf16.


@dataclass
class TinyGemmCodes:
    """Codes [N, K] in 0..15, scales and zeros [N, K/G] (float32), so that
    (codes - 8) * scale + zero reproduces the dequantized weight group by group."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    source: str  # where the scales came from


def _group_scale_candidates(
    weight: Any, n: int, k: int, g: int
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """weight.scales as [N, K/G] (either orientation it comes in), then None: estimate them."""
    scales = getattr(weight, "scales", None)
    if isinstance(scales, torch.Tensor) and scales.dim() == 2:
        if tuple(scales.shape) == (n, k // g):
            yield "Int4Weight.scales [N, K/G]", scales
        if tuple(scales.shape) == (k // g, n):
            yield "Int4Weight.scales [K/G, N]", scales.t()
    yield "the dequantized weight's step in each group", None


def estimate_group_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """Scale of each group of a dequantized weight [N, K]: the smallest step between its distinct
    values (a group holding one value gets 1.0). Exact where those values are code * scale."""
    n, k = w.shape
    v = w.reshape(n, k // group, group).sort(-1).values
    steps = v.diff(dim=-1)
    spread = (v[..., -1] - v[..., 0]).unsqueeze(-1)
    steps = torch.where(steps > spread * 1e-3, steps, torch.full_like(steps, math.inf))
    s = steps.amin(-1)
    return torch.where(torch.isinf(s), torch.ones_like(s), s)


def codes_for_scales(
    w: torch.Tensor, scales: torch.Tensor, group: int, *, tol: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 [N, K] in 0..15, zeros [N, K/G]) with (codes - 8) * scales + zeros == w.

    In each group w / scale lies on integers shifted by one offset c; the codes are
    w / scale - c and the zero is scale * (c + 8). Of the offsets that keep the codes in 0..15
    the one nearest -8 is taken, so a symmetric weight (codes -8..7 times the scale) gets zero 0
    and tinygemm computes exactly what the weight holds. Raises ValueError where w is not
    integer steps of `scales` within `tol`, or a group spans more than 16 codes.
    """
    n, k = w.shape
    s = scales.float().reshape(n, k // group)
    s_safe = torch.where(s == 0, torch.ones_like(s), s)
    t = w.float().reshape(n, k // group, group) / s_safe.unsqueeze(-1)
    lo, hi = t.amin(-1), t.amax(-1)
    room = torch.floor(15.0 - (hi - lo) + tol)  # how far the offset may sit below the minimum
    shift = torch.minimum(torch.clamp(torch.round(lo + 8.0), min=0.0), room)
    offset = lo - shift
    exact = t - offset.unsqueeze(-1)
    codes = torch.round(exact)
    off_grid = (exact - codes).abs().max().item() if codes.numel() else 0.0
    if not off_grid <= tol or bool((room < 0).any()):
        raise ValueError(
            f"the weight is not 16 integer steps of these scales per group (off by {off_grid:.3g} "
            f"of a step, widest group {((hi - lo).max().item()):.3g} steps)"
        )
    zeros = s * (offset + 8.0)
    return codes.clamp_(0, 15).to(torch.int32).reshape(n, k), zeros


def tinygemm_codes(weight: Any) -> TinyGemmCodes:
    """tinygemm's codes, scales and zeros for an ikport Int4Weight (or anything with
    .dequantize(), .group_size and [N, K/G] scales): the same quantized weight, re-encoded.

    The scales come from weight.scales ([N, K/G] or [K/G, N]) when the dequantized weight is
    integer steps of them, else from the steps between the dequantized values themselves.
    """
    w = weight.dequantize().float()
    n, k = w.shape
    g = int(weight.group_size)
    if k % g:
        raise ValueError(f"K={k} is not a multiple of the group size {g}")
    problems = []
    for source, scales in _group_scale_candidates(weight, n, k, g):
        s = estimate_group_scales(w, g) if scales is None else scales.to(w.device).float()
        try:
            codes, zeros = codes_for_scales(w, s, g)
        except ValueError as exc:
            problems.append(f"{source}: {exc}")
            continue
        return TinyGemmCodes(codes, s, zeros, source)
    raise ValueError("no scales reproduce the weight: " + "; ".join(problems))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] of codes [N, K] in 0..15: k even in the high nibble, k + 1 in the low one
    (the input of the CUDA _convert_weight_to_int4pack, as torch's test_linalg packs it)."""
    c = codes.to(torch.uint8)
    return ((c[:, ::2] << 4) | c[:, 1::2]).contiguous()


def pack_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """bf16 [K/G, N, 2] of scales and zeros [N, K/G] (torchao's pack_tinygemm_scales_and_zeros)."""
    return (
        torch.stack([scales.float(), zeros.float()], dim=-1)
        .transpose(0, 1)
        .contiguous()
        .to(torch.bfloat16)
    )


@dataclass
class TinyGemmWeight:
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int


def tinygemm_weight(
    weight: Any, *, inner_k_tiles: int = TINYGEMM_INNER_K_TILES
) -> tuple[TinyGemmWeight, str]:
    """tinygemm's packed weight of an Int4Weight, on the weight's device; (weight, where its
    scales came from and whether its zeros are 0: exact, as for a symmetric weight)."""
    tc = tinygemm_codes(weight)
    if tc.codes.is_cuda:
        packed = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(tc.codes), inner_k_tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(tc.codes, inner_k_tiles)
    sz = pack_scales_and_zeros(tc.scales, tc.zeros)
    zero = "zeros 0" if bool((sz[..., 1] == 0).all()) else "nonzero zeros (rounded to bf16)"
    return TinyGemmWeight(packed, sz, int(weight.group_size)), f"{tc.source}, {zero}"


def tinygemm_mm(x: torch.Tensor, w: TinyGemmWeight) -> torch.Tensor:
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, w.packed, w.group_size, w.scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group_size, w.scales_and_zeros)


# ---- inputs -----------------------------------------------------------------------------------
def quantize(w: torch.Tensor) -> Any:
    """ikport's INT4 weight of `w` [N, K]: symmetric, groups of GROUP_SIZE along K, round to nearest
    (the kernels' speed does not depend on the values; rtn keeps `quantization.rel_rms_error`
    comparable with the results recorded before "mse" became the default)."""
    from ikport.int4 import quantize_weight

    return quantize_weight(w, group_size=GROUP_SIZE, symmetric=True, method="rtn")


def journey_variants() -> tuple[str, ...]:
    """The planner's W4A16 variants less the default path's own (timed as "ikport")."""
    return tuple(v for v in w4a16_plan.VARIANTS if v != DEFAULT_VARIANT)


def api_problem() -> str | None:
    """None when ikport's W4A16 API imports, else why not."""
    try:
        from ikport.int4 import quantize_weight  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure stops this benchmark
        return f"ikport.int4.quantize_weight: {type(exc).__name__}: {exc}"
    if not hasattr(ikport, "w4a16_matmul"):
        return "ikport.w4a16_matmul is absent"
    return None


@dataclass
class ShapeData:
    """`count` weight sets of one shape: the INT4 weight in each dtype, the fp16 dequantized
    weight (cuBLAS's), tinygemm's packing of the bf16 weight, and set 0 dequantized in float32
    for the references."""

    shape: Shape
    device: str
    weights: dict[str, list[Any]]
    dense_fp16: list[torch.Tensor]
    dequantized: dict[str, torch.Tensor]
    tinygemm: list[TinyGemmWeight] = field(default_factory=list)
    tinygemm_note: str = ""
    tinygemm_problem: str | None = None
    # set 0: ||dequantize(quantize(w)) - w|| / ||w|| per dtype (the quantization error itself)
    quant_rel_rms: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.dense_fp16)


def make_weight_sets(shape: Shape, count: int, device: str = "cuda") -> ShapeData:
    """`count` weights drawn from N(0, WEIGHT_STD^2), seeded by the shape id, quantized by ikport
    in fp16 and in bf16."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(shape.id.encode()))
    weights: dict[str, list[Any]] = {d: [] for d in DTYPES}
    dense = []
    quant_rel_rms: dict[str, float] = {}
    for i in range(count):
        w = torch.randn(shape.n, shape.k, generator=gen, device=device) * WEIGHT_STD
        for name, dtype in DTYPES.items():
            weights[name].append(quantize(w.to(dtype)))
            if i == 0:
                err = weights[name][-1].dequantize().float() - w.to(dtype).float()
                quant_rel_rms[name] = round(float(err.norm() / w.to(dtype).float().norm()), 5)
        del w
        dense.append(weights["fp16"][-1].dequantize().to(torch.float16))
    dequantized = {d: weights[d][0].dequantize().float() for d in DTYPES}
    data = ShapeData(shape, device, weights, dense, dequantized, quant_rel_rms=quant_rel_rms)
    try:
        for wq in weights["bf16"]:
            tg, source = tinygemm_weight(wq)
            data.tinygemm.append(tg)
        data.tinygemm_note = (
            f"bf16, group {GROUP_SIZE}, innerKTiles {TINYGEMM_INNER_K_TILES}, the bf16 "
            f"Int4Weight's codes; scales from {source}"
        )
    except Exception as exc:  # noqa: BLE001 - the peer is skipped with its reason
        data.tinygemm = []
        data.tinygemm_problem = f"{type(exc).__name__}: {exc}".strip()[:400]
    return data


def make_inputs(w: Workload, count: int, device: str) -> dict[str, list[torch.Tensor]]:
    """`count` activations x [M, K] from N(0, 1) in each dtype, seeded by the workload id."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(w.id.encode()))
    xs: dict[str, list[torch.Tensor]] = {d: [] for d in DTYPES}
    for _ in range(count):
        x = torch.randn(w.m, w.shape.k, generator=gen, device=device)
        for name, dtype in DTYPES.items():
            xs[name].append(x.to(dtype))
    return xs


def reference(x: torch.Tensor, w_dequant: torch.Tensor) -> torch.Tensor:
    """x.float() @ W_dequant.T in float32 at full precision (no TF32)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return x.float() @ w_dequant.float().T
    finally:
        torch.set_float32_matmul_precision(previous)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|; inf for a wrong shape or a non-finite output."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    got = out.float()
    if not torch.isfinite(got).all():
        return math.inf
    scale = ref.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((got - ref).abs().max() / scale).item()


# ---- implementations --------------------------------------------------------------------------
Builder = Callable[[ShapeData, list[torch.Tensor]], list[Callable[[], Any]]]


@dataclass(frozen=True)
class Impl:
    name: str
    dtype: str
    build: Builder
    variant: str | None = None
    note: str = ""

    @property
    def ours(self) -> bool:
        return self.name.startswith("ikport")


def _ikport(dtype: str, variant: str | None) -> Builder:
    def build(data: ShapeData, xs: list[torch.Tensor]) -> list[Callable[[], Any]]:
        matmul = ikport.w4a16_matmul
        return [
            partial(matmul, x, wq, options=None if variant is None else ikport.W4A16Options(variant=variant))
            for x, wq in zip(xs, data.weights[dtype], strict=True)
        ]

    return build


def _cublas(data: ShapeData, xs: list[torch.Tensor]) -> list[Callable[[], Any]]:
    return [partial(F.linear, x, w) for x, w in zip(xs, data.dense_fp16, strict=True)]


def _tinygemm(data: ShapeData, xs: list[torch.Tensor]) -> list[Callable[[], Any]]:
    if data.tinygemm_problem is not None:
        raise RuntimeError(f"packing failed: {data.tinygemm_problem}")
    return [partial(tinygemm_mm, x, w) for x, w in zip(xs, data.tinygemm, strict=True)]


def implementations(w: Workload, variants: Sequence[str]) -> list[Impl]:
    impls = [
        Impl("ikport", "fp16", _ikport("fp16", None)),
        Impl("ikport-bf16", "bf16", _ikport("bf16", None)),
    ]
    if w.m in VARIANT_M:
        impls += [Impl(f"ikport-{v}", "fp16", _ikport("fp16", v), variant=v) for v in variants]
    else:
        if w.m >= DENSE_MIN_M:  # the default there is dequant-gemm: show the matrix-unit kernel too
            impls.append(Impl("ikport-mma", "fp16", _ikport("fp16", "mma"), variant="mma"))
        elif w.m in TILED_M:  # the default there is mma: show dequant-gemm too
            impls.append(Impl("ikport-dequant-gemm", "fp16", _ikport("fp16", "dequant-gemm"),
                              variant="dequant-gemm"))
        if w.m in TILED_M:
            impls.append(Impl("ikport-tiled", "fp16", _ikport("fp16", "tiled"), variant="tiled"))
    impls.append(
        Impl("cublas-fp16", "fp16", _cublas, note="F.linear with the dequantized fp16 weight")
    )
    impls.append(Impl("tinygemm", "bf16", _tinygemm))
    return impls


class WrongResult(AssertionError):
    """ikport's output differs from the reference: the run stops, nothing more is timed or written."""


@dataclass
class Results:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # peers that could not run
    unsupported: list[dict[str, str]] = field(default_factory=list)  # variants refusing an M
    errors: list[dict[str, str]] = field(default_factory=list)  # ikport calls that raised
    speedups: dict[str, dict[str, float]] = field(default_factory=dict)  # peer us / ikport us
    speedups_bf16: dict[str, dict[str, float]] = field(default_factory=dict)  # vs ikport-bf16
    quant_rel_rms: dict[str, dict[str, float]] = field(default_factory=dict)  # shape -> dtype -> err


@dataclass(frozen=True)
class Options:
    budget_s: float = CALL_BUDGET_S
    max_iters: int = 50


def check_and_time(
    w: Workload,
    impl: Impl,
    data: ShapeData,
    xs: list[torch.Tensor],
    ref: torch.Tensor,
    options: Options,
) -> dict[str, Any]:
    """Bind `impl` to the sets, compare its output on set 0 with the reference, then time it.

    Raises WrongResult where an ikport implementation misses the tolerance.
    """
    fns = impl.build(data, xs)
    err = relative_error(fns[0](), ref)
    tol = TOLERANCE[impl.dtype]
    if impl.ours and not err <= tol:
        raise WrongResult(
            f"{impl.name} on {w.id} (M={w.m} N={w.shape.n} K={w.shape.k} {impl.dtype}): "
            f"max abs error / max abs reference {err:.3g} (tolerance {tol})"
        )
    notes = [impl.note] if impl.note else []
    if impl.name == "tinygemm":
        notes.append(data.tinygemm_note)
    if not err <= tol:
        notes.append(f"outside the {impl.dtype} tolerance {tol}")
    m = harness.measure(
        fns, budget_s=options.budget_s, min_iters=MIN_ITERS, max_iters=options.max_iters
    )
    row = harness.measurement_row(
        m, workload=w.id, impl=impl.name, nbytes=w.bytes, note="; ".join(notes)
    )
    row.update(
        shape_id=w.shape.id,
        M=w.m,
        N=w.shape.n,
        K=w.shape.k,
        dtype=impl.dtype,
        group_size=GROUP_SIZE,
        bytes=w.bytes,
        flops=w.flops,
    )
    if w.m >= TFLOPS_FROM_M:
        row["TFLOPs"] = round(w.flops / (m.kernel.median_us * 1e6), 1)
    row["rel_err"] = float(f"{err:.3g}")
    return row


def bench_workload(
    w: Workload, data: ShapeData, results: Results, variants: Sequence[str], options: Options
) -> None:
    """Check and time every implementation on `w`. A peer that cannot run goes to `skipped`, a
    variant raising ValueError (an M it does not take) to `unsupported`, any other ikport
    exception to `errors`; a wrong ikport result stops the run."""
    xs = make_inputs(w, data.count, data.device)
    refs = {d: reference(xs[d][0], data.dequantized[d]) for d in DTYPES}
    print(f"{w.id}: M={w.m} N={w.shape.n} K={w.shape.k}, {w.bytes / 1e6:.2f} MB", flush=True)
    for impl in implementations(w, variants):
        entry = {"workload": w.id, "impl": impl.name}
        try:
            row = check_and_time(w, impl, data, xs[impl.dtype], refs[impl.dtype], options)
        except WrongResult:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded with its reason, never fatal
            entry["reason"] = f"{type(exc).__name__}: {exc}".strip()[:400]
            if impl.variant is not None and isinstance(exc, ValueError):
                results.unsupported.append(entry)
                label = "unsupported"
            elif impl.ours:
                results.errors.append(entry)
                label = "ERROR"
            else:
                results.skipped.append(entry)
                label = "skipped"
            print(f"  {impl.name:24s} {label}: {entry['reason'].splitlines()[0]}", flush=True)
            continue
        results.rows.append(row)
        tflops = f" {row['TFLOPs']:6.1f} TFLOP/s" if "TFLOPs" in row else ""
        print(
            f"  {impl.name:24s} {row['median_us']:10.2f} us {row['GBps']:7.0f} GB/s "
            f"{row['pct_roof']:5.1f}%{tflops}  eager {row['eager_us']:9.2f} us  "
            f"err {row['rel_err']:.1e}",
            flush=True,
        )
    del xs, refs
    _speedups(w.id, results)


def _find(rows: list[dict[str, Any]], workload: str, impl: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["workload"] == workload and r["impl"] == impl), None)


def _speedups(wid: str, results: Results) -> None:
    peers = [r for r in results.rows if r["workload"] == wid and not r["impl"].startswith("ikport")]
    for ours_impl, table, dtype in (
        ("ikport", results.speedups, None),
        ("ikport-bf16", results.speedups_bf16, "bf16"),
    ):
        ours = _find(results.rows, wid, ours_impl)
        if ours is None:
            continue
        ratios = {
            p["impl"]: round(p["median_us"] / ours["median_us"], 3)
            for p in peers
            if dtype is None or p["dtype"] == dtype
        }
        if ratios:
            table[wid] = ratios


def bench_shape(
    shape: Shape,
    work: list[Workload],
    results: Results,
    variants: Sequence[str],
    options: Options,
) -> int:
    """Quantize enough weight sets of `shape` to rotate beyond the L2, then bench each workload;
    returns the number of sets."""
    count = harness.rotation_count(shape.weight_bytes, harness.l2_cache_bytes())
    t0 = time.perf_counter()
    data = make_weight_sets(shape, count)
    print(
        f"{shape.id}: K={shape.k} N={shape.n}, {shape.weight_bytes / 1e6:.2f} MB INT4 + scales, "
        f"{count} rotated sets (quantized in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    if data.tinygemm_problem:
        print(f"  tinygemm skipped: {data.tinygemm_problem}", flush=True)
    results.quant_rel_rms[shape.id] = data.quant_rel_rms
    for w in work:
        bench_workload(w, data, results, variants, options)
    return count


# ---- output -----------------------------------------------------------------------------------
def print_tables(results: Results) -> None:
    """Every row, then per workload ikport against cuBLAS fp16 and ikport-bf16 against tinygemm
    (speedup = peer time / ikport time); ikport errors last."""
    print(
        f"\n{'workload':10s} {'impl':24s} {'dtype':5s} {'median':>9s} {'min':>9s} {'max':>9s} "
        f"{'GB/s':>6s} {'%roof':>6s} {'TFLOP/s':>7s} {'eager':>9s} {'rel err':>8s} {'sleep2x':>9s}"
    )
    for r in results.rows:
        print(
            f"{r['workload']:10s} {r['impl']:24s} {r['dtype']:5s} {r['median_us']:9.2f} "
            f"{r['min_us']:9.2f} {r['max_us']:9.2f} {r['GBps']:6.0f} {r['pct_roof']:6.1f} "
            f"{r.get('TFLOPs', '-'):>7} {r['eager_us']:9.2f} {r['rel_err']:8.1e} "
            f"{r.get('median_us_sleep2x', '-'):>9}"
        )
    for kind, entries in (("skipped", results.skipped), ("unsupported", results.unsupported)):
        for entry in entries:
            print(f"{kind} {entry['workload']} {entry['impl']}: {entry['reason'][:120]}")
    print(
        f"\n{'workload':10s} {'ikport us':>9s} {'%roof':>6s} {'eager':>8s} {'cuBLAS us':>9s} "
        f"{'x':>6s}  {'ik-bf16 us':>10s} {'tinygemm':>9s} {'x':>6s}"
    )

    def cell(r: dict[str, Any] | None, width: int) -> str:
        return f"{r['median_us']:{width}.2f}" if r else f"{'-':>{width}}"

    def ratio(peer: dict[str, Any] | None, ours: dict[str, Any] | None) -> str:
        return f"{peer['median_us'] / ours['median_us']:6.2f}" if peer and ours else f"{'-':>6}"

    for wid in dict.fromkeys(r["workload"] for r in results.rows):
        ours, ours_bf = _find(results.rows, wid, "ikport"), _find(results.rows, wid, "ikport-bf16")
        cublas, tiny = _find(results.rows, wid, "cublas-fp16"), _find(results.rows, wid, "tinygemm")
        roof = f"{ours['pct_roof']:6.1f} {ours['eager_us']:8.1f}" if ours else f"{'-':>6} {'-':>8}"
        print(
            f"{wid:10s} {cell(ours, 9)} {roof} {cell(cublas, 9)} {ratio(cublas, ours)}  "
            f"{cell(ours_bf, 10)} {cell(tiny, 9)} {ratio(tiny, ours_bf)}"
        )
    for entry in results.errors:
        print(f"IKPORT ERROR {entry['workload']} {entry['impl']}: {entry['reason'][:200]}")


def plot_rows(rows: list[dict[str, Any]], path: Path, device: str) -> Path | None:
    """Kernel time and % of the read roof against M, one panel pair per shape, one line per
    impl. None where matplotlib is absent or there are no rows."""
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shapes = sorted({Shape(r["shape_id"], r["K"], r["N"]) for r in rows}, key=lambda s: s.id)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(
        2, len(shapes), figsize=(5.5 * len(shapes), 8.5), squeeze=False, sharex=True
    )
    for col, shape in enumerate(shapes):
        ax_t, ax_p = axes[0][col], axes[1][col]
        for impl in impls:
            points = sorted(
                (r["M"], r) for r in rows if r["shape_id"] == shape.id and r["impl"] == impl
            )
            if not points:
                continue
            ms = [m for m, _ in points]
            style = "-o" if impl.startswith("ikport") else "--s"
            for ax, key in ((ax_t, "median_us"), (ax_p, "pct_roof")):
                ax.plot(
                    ms,
                    [r[key] for _, r in points],
                    style,
                    color=colors[impl],
                    label=impl,
                    markersize=4,
                )
        ax_t.set_title(f"{shape.id}: K={shape.k} N={shape.n}")
        ax_t.set_yscale("log")
        ax_t.set_ylabel("kernel time (us, median)")
        ax_p.set_ylabel(f"% of read roof ({harness.READ_ROOF_GBPS:.0f} GB/s)")
        ax_p.set_ylim(bottom=0)
        for ax in (ax_t, ax_p):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        ax_p.set_xlabel("M (rows of x)")
    axes[1][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"W4A16, group {GROUP_SIZE}: bytes = INT4 codes + scales + x + output, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        type=parse_only,
        default=None,
        metavar="W1[,W2...]",
        help="shapes to run (default: W1,W2,W3)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")


def run(args: argparse.Namespace) -> int:
    """Benchmark every workload, write the JSON (and plot); non-zero exit if ikport raised."""
    if not torch.cuda.is_available():
        print("w4a16 benchmark: no CUDA/ROCm device visible to torch")
        return 2
    problem = api_problem()
    if problem is not None:
        print(f"w4a16 benchmark: ikport's W4A16 API is not importable: {problem}")
        return 2
    start = time.perf_counter()
    meta = harness.device_meta(commit=args.commit)
    out = Path(args.out or f"docs/results/w4a16-{harness.device_slug(meta['device'])}.json")
    options = Options(max_iters=QUICK_MAX_ITERS) if args.quick else Options()
    variants = journey_variants()
    results = Results()
    roof = [harness.measure_read_roof(n) for n in READ_PASS_BYTES]
    sets = {}
    plan = workloads(args.quick, args.only)
    for shape, work in plan:
        sets[shape.id] = bench_shape(shape, work, results, variants, options)
        torch.cuda.empty_cache()
    # the read pass of each weight size (issue 30's M=1 goal: 85% of its speed), rows at M=1 against it
    passes = {b: harness.measure_read_pass(b) for b in sorted({shape.weight_bytes for shape, _ in plan})}
    for row in results.rows:
        weight_bytes = next((sh.weight_bytes for sh, _ in plan if sh.id == row.get("shape_id")), None)
        if row.get("M") == 1 and weight_bytes in passes and row.get("median_us"):
            row["pct_read_pass"] = round(100 * passes[weight_bytes]["median_us"] / row["median_us"], 1)
    extra = {
        "read_pass": list(passes.values()),
        "bytes": (
            "K*N/2 INT4 codes + K/128*N*2 scales + 2*M*K x + 2*M*N output, for every impl "
            "(cuBLAS reads its fp16 weight, 4x more: GBps is the rate the INT4 problem needs)"
        ),
        "flops": f"2*M*N*K; TFLOPs on rows with M >= {TFLOPS_FROM_M}",
        "method": (
            "kernel time: torch.cuda._sleep queued before the start event (sized at 2x the "
            "call's host time, >= 100 us; median_us_sleep2x re-times with it doubled); eager_us: "
            "call on an idle GPU, synchronize after each; weight sets rotated, > 3x the L2 in "
            f"total (x rotated with them); up to {options.max_iters} timed calls, fewer where "
            f"they would pass {options.budget_s} s"
        ),
        "check": (
            "rel_err = max|out - ref| / max|ref| on set 0, ref = x.float() @ W_dequant.T in "
            "float32 (no TF32), W_dequant = the impl's own Int4Weight dequantized (fp16 weight "
            "for ikport, its variants and cuBLAS; bf16 weight for ikport-bf16 and tinygemm); "
            f"tolerance {TOLERANCE}, ikport outside it aborts the run"
        ),
        "quantization": {
            "group_size": GROUP_SIZE,
            "symmetric": True,
            "weights": f"N(0, {WEIGHT_STD}^2) fp32, cast to fp16 / bf16, then quantize_weight",
            "x": "N(0, 1)",
            "rel_rms_error": results.quant_rel_rms,  # per shape and dtype, weight set 0
        },
        "tinygemm": (
            "torch.ops.aten._convert_weight_to_int4pack(uint8 [N, K/2], "
            f"innerKTiles={TINYGEMM_INNER_K_TILES}) and _weight_int4pack_mm(x bf16, packed, "
            f"{GROUP_SIZE}, scales_and_zeros bf16 [K/G, N, 2]); weight = (q - 8) * scale + zero "
            "with the bf16 Int4Weight's codes and scales, zero chosen so both give one product"
        ),
        "M": [w.m for w in plan[0][1]] if plan else [],
        "variants": list(variants),
        "variant_M": list(VARIANT_M),
        "quick": bool(args.quick),
        "rotated_sets": sets,
        "read_measured": roof,
        "speedup_vs_peers": results.speedups,
        "speedup_bf16_vs_peers": results.speedups_bf16,
        "skipped": results.skipped,
        "unsupported": results.unsupported,
        "errors": results.errors,
    }
    return harness.finish_run(
        out, command=args.command, rows=results.rows, extra=extra, meta=meta, roof=roof,
        print_tables=lambda: print_tables(results),
        plot=None if args.no_plot else lambda png: plot_rows(results.rows, png, meta["device"]),
        started=start, failed=bool(results.errors),
    )
