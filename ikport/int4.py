"""Packed INT4 weights for the W4A16 kernel, in the matrix unit's own B-fragment order.

The kernel loads INT4 codes straight into the B fragments of the matrix instruction
(portability/mma_layout.cuh), so where a code sits in memory depends on the instruction family,
the *layout*:

=================  ==========================  =====  =====  ===  ===  ===
layout             instruction (struct)        lanes  kB     UL   TPC  KC
=================  ==========================  =====  =====  ===  ===  ===
"nv_m16n8k16"      2 x mma.sync.m16n8k16        32     8      32   4    64
                   (NvM16n8k16x2)
"amd_mfma16"       v_mfma_f32_16x16x16 wave64   64     4      64   8    128
                   (AmdMfma16x16x16; CDNA2/3)
"amd_wmma16_w32"   v_wmma_f32_16x16x16 wave32   32     16     16   2    32
                   (AmdWmma16x16x16W32; RDNA3)
=================  ==========================  =====  =====  ===  ===  ===

kB is the number of 16-bit B elements a lane holds per 16x16 tile; b_row(l, s) / b_col(l, s) say
which k / n of the tile slot s of lane l holds. On RDNA3 lanes 16-31 repeat lanes 0-15, so only the
UL = 256 / kB "unique lanes" are stored. TPC = 32 / kB tiles (along K) make one chunk of
KC = 16 * TPC input channels, in which every unique lane owns exactly 16 contiguous bytes (4 int32
words, 32 codes): one 16-byte load per lane per chunk.

Packing of codes q[n, k] (0..15; W is [N, K] = [out_features, in_features]). Tile (nt, kt) covers
n in [16nt, 16nt + 16), k in [16kt, 16kt + 16); chunk c = kt // TPC, t = kt % TPC. For unique lane
u and pair p in [0, kB/2): register r = t * (kB / 2) + p, word w = r // 4, j = r % 4. The element in
slot 2p, (k = 16kt + b_row(u, 2p), n = 16nt + b_col(u, 2p)), is nibble j (bits 4j..4j+3) of that
word; the element in slot 2p + 1 is nibble j + 4. The word's flat int32 index is
((nt * (Kp // KC) + c) * UL + u) * 4 + w, and the packed tensor is int32 [N, Kp // 8] in that
flat order, Kp = `packed_k(K)`. (Nibbles j and j + 4 make one fp16 pair: `(word >> 4j) & 0x000F000F | 0x64006400` is
(1024 + q_lo, 1024 + q_hi).)

Shapes: N % 16 == 0 (a tile row) and K % 32 == 0 (an RDNA3 chunk, and a 16-byte piece of a K
tail is all in or all out). K tails: the codes are stored for Kp = K rounded up to 128 (K_PAD, the
largest chunk), whatever the layout, so a checkpoint moves between vendors by repacking only
(`Int4Weight.to(device)` repacks when the device wants another layout) and qweight's shape does
not depend on the layout. The padded codes are zero and mean nothing: the kernels walk only the
ceil(K / KC) chunks holding real k (NVIDIA and RDNA3 read no padding at K = 576; CDNA reads the
second half of its last 128-k chunk) and use zeros for x past K in the last, partial chunk, so
no scale row is stored for the padding. K = 576 stores 640 k of codes, 11% more code bytes.

Groups: G is 32, 64, 128 or K (per-channel); scales and zeros have ceil(K / G) rows. When G does
not divide K (K = 576, G = 128) the last group is shorter (576 = 4 x 128 + 64), as in GPTQ's own
layout (g_idx = k // G); the kernels need no case for it.

Meaning of an `Int4Weight`: w[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n] for k < K, z = 8
when `zeros` is None, in the permuted input-channel order when `perm` is set (GPTQ act-order: the kernel
computes x[:, perm] @ W_sorted^T). `dequantize()` undoes `perm`, so `x @ w.dequantize().T` is the
reference result.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch

from .backends.target import ARCH_TABLE, MATRIX_LAYOUTS, cuda_arch_from_capability
from .checks import describe

__all__ = [
    "DEFAULT_LAYOUT",
    "DEFAULT_METHOD",
    "GROUP_SIZES",
    "K_MULTIPLE",
    "K_PAD",
    "LAYOUTS",
    "METHODS",
    "N_MULTIPLE",
    "SCALE_DTYPES",
    "Int4Weight",
    "LayoutInfo",
    "check_shape",
    "layout_for_device",
    "layout_info",
    "num_groups",
    "pack_int4",
    "packed_k",
    "quantize_weight",
    "resolve_group_size",
    "unpack_int4",
]

DeviceLike = Union[torch.device, str, int, None]  # noqa: UP007  (a runtime alias)

N_MULTIPLE = 16  # out_features: one 16-wide tile row
K_MULTIPLE = 32  # in_features: the smallest chunk (amd_wmma16_w32); a tail of x is 16-byte pieces
K_PAD = 128  # the codes are stored for K rounded up to this: the largest chunk (amd_mfma16)
GROUP_SIZES = (32, 64, 128)  # quantization groups along K; per-channel (G = K) is allowed too
SCALE_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_LAYOUT = MATRIX_LAYOUTS["mma.sync"]  # NVIDIA's, and what the CPU path packs
_SYMMETRIC_ZERO = 8


@dataclass(frozen=True)
class LayoutInfo:
    """One matrix-instruction family's B-fragment geometry (see the module docstring)."""

    name: str
    lanes: int  # lanes of the wave
    k_b: int  # 16-bit B elements a lane holds per 16x16 tile
    b_row: Callable[[int, int], int]  # (lane, slot) -> k within the tile
    b_col: Callable[[int, int], int]  # (lane, slot) -> n within the tile

    @property
    def unique_lanes(self) -> int:
        """Lanes whose B fragments are stored (UL = 256 // kB)."""
        return 256 // self.k_b

    @property
    def tiles_per_chunk(self) -> int:
        """16x16 tiles along K per chunk (TPC = 32 // kB: 16 bytes of codes per lane)."""
        return 32 // self.k_b

    @property
    def chunk_k(self) -> int:
        """Input channels per chunk (KC = 16 * TPC)."""
        return 16 * self.tiles_per_chunk


# Mirrors portability/mma_layout.cuh (b_row / b_col of each struct).
_LAYOUTS: dict[str, LayoutInfo] = {
    "nv_m16n8k16": LayoutInfo(
        "nv_m16n8k16", 32, 8,
        lambda lane, s: (lane % 4) * 2 + 8 * ((s // 2) % 2) + s % 2,
        lambda lane, s: 8 * (s // 4) + lane // 4,
    ),
    "amd_mfma16": LayoutInfo(
        "amd_mfma16", 64, 4,
        lambda lane, s: 4 * (lane // 16) + s,
        lambda lane, s: lane % 16,
    ),
    "amd_wmma16_w32": LayoutInfo(
        "amd_wmma16_w32", 32, 16,
        lambda lane, s: s,
        lambda lane, s: lane % 16,
    ),
}
LAYOUTS: tuple[str, ...] = tuple(_LAYOUTS)


def layout_info(layout: str) -> LayoutInfo:
    """The geometry of `layout` (one of `LAYOUTS`); ValueError for an unknown name."""
    try:
        return _LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(f"unknown INT4 layout {layout!r}; expected one of {LAYOUTS}") from None


def layout_for_device(device: DeviceLike = None) -> str:
    """The packed layout the W4A16 kernel wants on `device`: the B-fragment layout of its target's
    matrix unit (backends/target.py's ARCH_TABLE): "nv_m16n8k16" on NVIDIA, "amd_mfma16" on
    CDNA2/3 (gfx90a, gfx940-942), "amd_wmma16_w32" on RDNA3 (gfx1100-1102). CPU and meta devices
    (and `device` None) -> "nv_m16n8k16" (the CPU path only unpacks). A GPU whose target is not in
    the table raises ValueError.
    """
    if device is None:
        return DEFAULT_LAYOUT
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type in ("cpu", "meta"):
        return DEFAULT_LAYOUT
    if dev.type != "cuda":  # torch reports ROCm GPUs as "cuda" too
        raise ValueError(f"ikport's W4A16 runs on CPU, CUDA and ROCm tensors, not on {dev.type!r}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    if getattr(torch.version, "hip", None):
        arch = str(getattr(props, "gcnArchName", "")).split(":")[0]
    else:
        arch = cuda_arch_from_capability(props.major, props.minor)
    facts = ARCH_TABLE.get(arch)
    if facts is None:
        raise ValueError(f"no W4A16 INT4 layout for {dev} ({arch or 'unknown arch'}): ikport knows "
                         f"the targets {sorted(ARCH_TABLE)} (backends/target.py)")
    return facts.matrix_layout


def _nearest(v: int, m: int) -> str:
    lo, hi = v // m * m, -(-v // m) * m
    return f"{hi}" if lo <= 0 else f"{lo} or {hi}"


def check_shape(n: int, k: int, what: str = "weight") -> None:
    """ValueError unless out_features N is a positive multiple of 16 and in_features K a positive
    multiple of 32 (every layout); the message names the failing sizes and the nearest that work."""
    bad = []
    if n <= 0 or n % N_MULTIPLE:
        near = f" (the nearest that work: {_nearest(n, N_MULTIPLE)})" if n > 0 else ""
        bad.append(f"out_features N={n} is not a positive multiple of {N_MULTIPLE}{near}")
    if k <= 0 or k % K_MULTIPLE:
        near = f" (the nearest that work: {_nearest(k, K_MULTIPLE)})" if k > 0 else ""
        bad.append(f"in_features K={k} is not a positive multiple of {K_MULTIPLE}{near}")
    if bad:
        raise ValueError(f"{what}: INT4 weights need out_features N % {N_MULTIPLE} == 0 and in_features "
                         f"K % {K_MULTIPLE} == 0 (every layout; pad the weight with zeros, or keep the "
                         f"layer in floating point): " + "; ".join(bad))


def packed_k(k: int) -> int:
    """The codes' K in storage: K rounded up to K_PAD = 128 (qweight is int32 [N, packed_k(K) // 8])."""
    return -(-k // K_PAD) * K_PAD


def num_groups(k: int, group_size: int) -> int:
    """Rows of scales (and zeros): ceil(K / G); the last group is shorter when G does not divide K."""
    return -(-k // group_size)


@functools.cache
def _chunk_maps(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fwd, inv) for one chunk of 16 rows x KC columns, on the CPU.

    fwd[i] = element offset n_local * KC + k_local of code slot i = (u * 4 + w) * 8 + nibble;
    inv is its inverse permutation (element offset -> code slot).
    """
    info = layout_info(layout)
    kc, half = info.chunk_k, info.k_b // 2
    fwd = [-1] * (info.unique_lanes * 32)
    for t in range(info.tiles_per_chunk):
        for u in range(info.unique_lanes):
            for p in range(half):
                r = t * half + p
                w, j = divmod(r, 4)
                for h in (0, 1):
                    s = 2 * p + h
                    k_local = 16 * t + info.b_row(u, s)
                    n_local = info.b_col(u, s)
                    fwd[(u * 4 + w) * 8 + j + 4 * h] = n_local * kc + k_local
    fwd_t = torch.tensor(fwd, dtype=torch.int64)
    if sorted(fwd) != list(range(16 * kc)):  # every element of the chunk exactly once
        raise AssertionError(f"layout {layout}: the fragment map is not a bijection")
    inv_t = torch.argsort(fwd_t)
    return fwd_t, inv_t


def _maps_on(layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    fwd, inv = _chunk_maps(layout)
    if device.type == "cpu":
        return fwd, inv
    return fwd.to(device), inv.to(device)


_SHIFTS = tuple(4 * i for i in range(8))


def pack_int4(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """Pack integer codes [N, K] (values 0..15, any integer dtype, usually uint8) into the int32
    [N, packed_k(K) // 8] fragment order of `layout` (module docstring; codes past K are 0). Runs
    on the codes' device.

    Raises ValueError for a bad shape (N % 16, K % 32) or a code outside 0..15 (this one check
    reads the data: packing is a load-time step), TypeError for a non-integer tensor.
    """
    info = layout_info(layout)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D tensor [N, K], got {getattr(codes, 'shape', codes)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (uint8), got {codes.dtype}")
    n, k = codes.shape
    check_shape(n, k, "codes")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("codes must hold INT4 values in 0..15")
    kc = info.chunk_k
    fwd, _ = _maps_on(layout, codes.device)
    if k != packed_k(k):
        codes = torch.nn.functional.pad(codes, (0, packed_k(k) - k))
        k = packed_k(k)
    blocks = codes.reshape(n // 16, 16, k // kc, kc).permute(0, 2, 1, 3).reshape(n // 16, k // kc, 16 * kc)
    nib = blocks.index_select(2, fwd).to(torch.int64).reshape(n // 16, k // kc, info.unique_lanes * 4, 8)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=codes.device)
    words = (nib << shifts).sum(dim=-1)  # 0 .. 2**32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(n, k // 8)


def unpack_int4(packed: torch.Tensor, layout: str, n: int, k: int) -> torch.Tensor:
    """The exact inverse of `pack_int4`: int32 [N, packed_k(K) // 8] in `layout` -> uint8 codes
    [N, K] (the padding dropped)."""
    info = layout_info(layout)
    check_shape(n, k, "packed weight")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        raise TypeError(f"packed must be an int32 tensor, got {getattr(packed, 'dtype', type(packed))}")
    k_true, k = k, packed_k(k)
    if tuple(packed.shape) != (n, k // 8):
        raise ValueError(f"packed must have shape [N, packed_k(K) // 8] = {[n, k // 8]} for K={k_true}, "
                         f"got {list(packed.shape)}")
    kc = info.chunk_k
    _, inv = _maps_on(layout, packed.device)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    words = packed.reshape(n // 16, k // kc, info.unique_lanes * 4, 1)
    nib = ((words >> shifts) & 15).to(torch.uint8).reshape(n // 16, k // kc, 16 * kc)
    blocks = nib.index_select(2, inv)
    codes = blocks.reshape(n // 16, k // kc, 16, kc).permute(0, 2, 1, 3).reshape(n, k)
    return codes if k_true == k else codes[:, :k_true].contiguous()


def resolve_group_size(group_size: int | None, k: int) -> int:
    """None or -1 -> per-channel (G = K); else one of GROUP_SIZES or K itself. A group size of
    GROUP_SIZES at least K is one group: per-channel (G = K, e.g. 128 for K = 96). A group size
    that does not divide K leaves a shorter last group (128 for K = 576: 4 x 128 + 64)."""
    if group_size is None or group_size == -1 or group_size == k:
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(
            f"group_size must be one of {GROUP_SIZES}, or None / -1 / K={k} for per-channel scales, "
            f"got {group_size!r}"
        )
    return k if group_size >= k else group_size


@dataclass(frozen=True, eq=False, repr=False)
class Int4Weight:
    """A W4A16 weight: INT4 codes packed for one matrix-instruction layout, plus group scales.

    Fields:
      qweight: int32 [N, packed_k(K) // 8], `pack_int4` order for `layout` (K rounded up to 128).
      scales: [ceil(K / G), N], float16 or bfloat16: the activation dtype the kernel runs in.
      zeros: None (symmetric, zero point 8) or [ceil(K / G), N], same dtype as `scales`, integer zero
        points 0..15 (`from_codes` checks this; the raw constructor reads no data, and the GPU
        kernels take the integer part of what they find).
      group_size: G, the group length along K (per-channel: G = K; the last group is shorter
        when G does not divide K).
      in_features: K; out_features: N.
      layout: one of `LAYOUTS`.
      perm: None, or int64 [K]: the input-channel permutation of a GPTQ act-order checkpoint; the
        codes, scales and zeros are in the permuted order and the kernel computes
        x[:, perm] @ W_sorted^T.

    Meaning: w[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n] in the (permuted) stored order.
    Construction checks shapes, dtypes, devices and contiguity, never the data (no host sync);
    `from_codes` and `quantize_weight` are the checked ways in. Instances are immutable: `to`
    returns a new one.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    in_features: int
    out_features: int
    layout: str = DEFAULT_LAYOUT
    perm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.out_features, self.in_features
        for name in ("in_features", "out_features", "group_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"Int4Weight.{name} must be an int, got {v!r}")
        check_shape(n, k, "Int4Weight")
        layout_info(self.layout)
        g = self.group_size
        if g != k and (g not in GROUP_SIZES or g > k):
            raise ValueError(
                f"Int4Weight.group_size must be one of {GROUP_SIZES} below in_features={k}, or "
                f"{k} itself (per-channel), got {g}"
            )
        groups, kp = num_groups(k, g), packed_k(k)
        qw = self.qweight
        if not isinstance(qw, torch.Tensor) or qw.dtype != torch.int32:
            raise TypeError(f"Int4Weight.qweight must be an int32 tensor, got {describe(qw)}")
        if tuple(qw.shape) != (n, kp // 8):
            raise ValueError(f"Int4Weight.qweight must have shape [N, packed_k(K) // 8] = {[n, kp // 8]}, "
                             f"got {list(qw.shape)}")
        s = self.scales
        if not isinstance(s, torch.Tensor) or s.dtype not in SCALE_DTYPES:
            raise TypeError(f"Int4Weight.scales must be a float16 or bfloat16 tensor, got {describe(s)}")
        if tuple(s.shape) != (groups, n):
            raise ValueError(f"Int4Weight.scales must have shape [ceil(K / G), N] = {[groups, n]}, "
                             f"got {list(s.shape)}")
        tensors = {"qweight": qw, "scales": s}
        z = self.zeros
        if z is not None:
            if not isinstance(z, torch.Tensor) or z.dtype != s.dtype:
                raise TypeError(f"Int4Weight.zeros must be None or a {s.dtype} tensor like scales, "
                                f"got {describe(z)}")
            if tuple(z.shape) != (groups, n):
                raise ValueError(f"Int4Weight.zeros must have shape [ceil(K / G), N] = {[groups, n]}, "
                                 f"got {list(z.shape)}")
            tensors["zeros"] = z
        p = self.perm
        if p is not None:
            if not isinstance(p, torch.Tensor) or p.dtype != torch.int64:
                raise TypeError(f"Int4Weight.perm must be None or an int64 tensor, got {describe(p)}")
            if tuple(p.shape) != (k,):
                raise ValueError(f"Int4Weight.perm must have shape [K] = [{k}], got {list(p.shape)}")
            tensors["perm"] = p
        for name, t in tensors.items():
            if t.device != qw.device:
                raise ValueError(f"Int4Weight.{name} is on {t.device} but qweight is on {qw.device}")
            if not t.is_contiguous():
                raise ValueError(f"Int4Weight.{name} must be contiguous (pass .contiguous())")

    def __repr__(self) -> str:
        return (f"Int4Weight(out_features={self.out_features}, in_features={self.in_features}, "
                f"group_size={self.group_size}, symmetric={self.zeros is None}, "
                f"act_order={self.perm is not None}, layout={self.layout!r}, dtype={self.dtype}, "
                f"device={self.device})")

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of `scales`)."""
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        """The device all tensors live on."""
        return self.qweight.device

    @property
    def symmetric(self) -> bool:
        """True when `zeros` is None (zero point 8 everywhere)."""
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held (codes, scales, zeros, perm)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.zeros, self.perm) if t is not None)

    def codes(self) -> torch.Tensor:
        """The uint8 codes [N, K], in the stored (permuted, when `perm` is set) channel order."""
        return unpack_int4(self.qweight, self.layout, self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in the ORIGINAL input-channel order (`perm` undone), computed in fp32
        and returned as `dtype`: `x @ w.dequantize().T` is the reference product."""
        n, k, g = self.out_features, self.in_features, self.group_size
        q = self.codes().to(torch.float32)
        s = self.scales.to(torch.float32).repeat_interleave(g, dim=0)[:k].T  # [N, K]
        if self.zeros is None:
            w = (q - float(_SYMMETRIC_ZERO)) * s
        else:
            w = (q - self.zeros.to(torch.float32).repeat_interleave(g, dim=0)[:k].T) * s
        if self.perm is not None:
            out = torch.empty((n, k), dtype=torch.float32, device=w.device)
            out[:, self.perm] = w
            w = out
        return w.to(dtype)

    def with_layout(self, layout: str) -> Int4Weight:
        """The same weight packed for `layout` (self when it already is)."""
        layout_info(layout)
        if layout == self.layout:
            return self
        codes = unpack_int4(self.qweight, self.layout, self.out_features, self.in_features)
        return dataclasses.replace(self, qweight=pack_int4(codes, layout), layout=layout)

    def to(self, device: DeviceLike = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> Int4Weight:
        """Move to `device` and/or cast scales and zeros to `dtype` (float16 or bfloat16).

        When `device` is given, the result is packed in `layout_for_device(device)` (repacked on
        the target device if that differs from `layout`; e.g. an "amd_mfma16" checkpoint moved to
        an NVIDIA GPU or the CPU becomes "nv_m16n8k16"). Without `device` the layout is kept.
        """
        if dtype is not None and dtype not in SCALE_DTYPES:
            raise TypeError(f"Int4Weight.to: dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        if device is None:
            dev, layout = self.device, self.layout
        else:
            dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            layout = layout_for_device(dev)
        dt = dtype or self.dtype

        def move(t: torch.Tensor, cast: bool) -> torch.Tensor:
            return t.to(dev, dtype=dt if cast else None, non_blocking=non_blocking)

        out = dataclasses.replace(
            self, qweight=move(self.qweight, False), scales=move(self.scales, True),
            zeros=None if self.zeros is None else move(self.zeros, True),
            perm=None if self.perm is None else move(self.perm, False),
        )
        return out.with_layout(layout)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int | None,
        *,
        perm: torch.Tensor | None = None,
        layout: str | None = None,
    ) -> Int4Weight:
        """Build from unpacked codes (for importers).

        codes: integer [N, K] in 0..15, in the stored order (already permuted when `perm` is set).
        scales: [ceil(K / G), N] float16/bfloat16 (float32 is cast to float16). zeros: None
        (symmetric, 8) or [ceil(K / G), N] integer zero points in 0..15 (any dtype; cast to the scales' dtype; checked).
        group_size: G, or
        None / -1 for per-channel. perm: None or [K] permutation of range(K) (checked; an identity
        permutation is dropped). layout: default `layout_for_device(codes.device)`.
        Tensors are made contiguous and moved to the codes' device.
        """
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            raise ValueError(f"codes must be a 2-D tensor [N, K], got {describe(codes)}")
        n, k = codes.shape
        check_shape(n, k, "codes")
        g = resolve_group_size(group_size, k)
        dev = codes.device
        layout = layout_for_device(dev) if layout is None else layout
        if not isinstance(scales, torch.Tensor):
            raise TypeError(f"scales must be a tensor, got {describe(scales)}")
        if scales.dtype == torch.float32:
            scales = scales.to(torch.float16)
        if scales.dtype not in SCALE_DTYPES:
            raise TypeError(f"scales must be float16 or bfloat16 (or float32, stored as float16), "
                            f"got {scales.dtype}")
        scales = scales.to(dev).contiguous()
        if zeros is not None:
            if not isinstance(zeros, torch.Tensor):
                raise TypeError(f"zeros must be None or a tensor, got {describe(zeros)}")
            zeros = zeros.to(dev, dtype=scales.dtype).contiguous()
            # The kernels read a zero point as a small integer (base + z in the fp16/bf16 bits).
            if zeros.numel() and not (torch.equal(zeros, zeros.round()) and
                                      bool(((zeros >= 0) & (zeros <= 15)).all())):
                raise ValueError("zeros must hold integer zero points in 0..15")
        if perm is not None:
            if not isinstance(perm, torch.Tensor) or perm.dtype.is_floating_point or perm.dim() != 1:
                raise TypeError(f"perm must be an integer tensor [K], got {describe(perm)}")
            perm = perm.to(dev, dtype=torch.int64).contiguous()
            if perm.numel() != k:
                raise ValueError(f"perm must have shape [K] = [{k}], got {list(perm.shape)}")
            ar = torch.arange(k, device=dev)
            if not torch.equal(torch.sort(perm).values, ar):
                raise ValueError("perm must be a permutation of range(in_features)")
            if torch.equal(perm, ar):
                perm = None
        return cls(pack_int4(codes, layout), scales, zeros, g, k, n, layout, perm)


METHODS = ("rtn", "mse")  # quantize_weight's ways of choosing each group's scale and zero point
DEFAULT_METHOD = "mse"  # the measured choice of issue 30 (docs/results/w4a16.md)
# "mse": the scale candidates, as multiples of round-to-nearest's scale (0.50, 0.53, ..., 1.10; a
# step of 0.01 found no lower error on SmolLM2's down_proj), then this many least-squares refits
# of the scale to the chosen codes.
_MSE_RATIOS = tuple(round(0.5 + 0.03 * i, 2) for i in range(21))
_MSE_REFITS = 2
_MSE_CHUNK = 1 << 17  # elements of w searched at once on the CPU (0.5 MB of fp32: stays in cache)
_MSE_CHUNK_GPU = 1 << 24  # on a GPU: fewer, larger launches


def _group_error(wg: torch.Tensor, h: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum(h * e^2) over each group, e = dequantized - w, for scales s and zero points z ([R, G]
    fp32, s already rounded to the storage dtype): e is exactly Int4Weight.dequantize() - w."""
    s3, z3 = s[..., None], z[..., None]
    e2 = torch.div(wg, s3).round_().add_(z3).clamp_(0, 15).sub_(z3).mul_(s3).sub_(wg).square_()
    return e2.mul_(h).sum(dim=-1)


def _mse_importance(wg: torch.Tensor) -> torch.Tensor:
    """The "mse" method's weight of each element's squared error: w^2 + mean(w^2) over its group.
    (tools/quantizer_study.py swaps in ones to measure the unweighted search.)"""
    sq = wg.square()
    return sq.add_(sq.mean(dim=-1, keepdim=True))


def _mse_search(wg: torch.Tensor, s0: torch.Tensor, z0: torch.Tensor, base: torch.Tensor,
                lo: torch.Tensor | None, hi: torch.Tensor | None, store: torch.dtype) -> None:
    """The "mse" method, in place over s0 / z0 (round-to-nearest's [R, G] fp32 scales and zero
    points on entry) for the groups wg [R, G, g] (fp32).

    Per group it picks, among round-to-nearest's own (scale, zero point), the scales `base * r`
    for r in _MSE_RATIOS (symmetric: zero point 8; asymmetric: each with the integer zero points
    that put the low end, the high end or the middle of the range on the grid) and weighted
    least-squares refits of the scale to the codes chosen, the one of least weighted squared error
    sum_i h_i e_i^2, h_i = w_i^2 + mean_group(w^2). The weight h (llama.cpp's k-quants weigh their
    search alike when they have no importance matrix) keeps a group's large weights close: an
    unweighted search clips them to refine the many small ones, which lowered the weight error
    and raised SmolLM2's perplexity (docs/results/w4a16.md, issue 30). Ties keep the earlier
    candidate (round-to-nearest first), so no group's weighted error exceeds round-to-nearest's.
    """
    tiny = torch.finfo(store).tiny
    h = _mse_importance(wg)
    best = _group_error(wg, h, s0, z0)

    def rounded(s: torch.Tensor) -> torch.Tensor:
        return s.clamp_min(tiny).to(store).to(torch.float32)

    def consider(s: torch.Tensor, z: torch.Tensor) -> None:
        e = _group_error(wg, h, s, z)
        better = e < best  # a NaN error (a scale that overflowed the storage dtype) never wins
        best.copy_(torch.where(better, e, best))
        s0.copy_(torch.where(better, s, s0))
        z0.copy_(torch.where(better, z, z0))

    for r in _MSE_RATIOS:
        s = rounded(base * r)
        if lo is None:
            consider(s, z0)  # symmetric: z0 is 8 everywhere
            continue
        for z in (-lo / s, 15.0 - hi / s, 7.5 - (lo + hi) / (2.0 * s)):
            consider(s, z.round_().clamp_(0, 15))
    for _ in range(_MSE_REFITS):
        s3, z3 = s0[..., None], z0[..., None]
        hd = torch.div(wg, s3).round_().add_(z3).clamp_(0, 15).sub_(z3)  # q - z
        num = (hd * wg * h).sum(dim=-1)
        den = hd.square_().mul_(h).sum(dim=-1)
        consider(rounded(torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), s0)), z0)


def quantize_weight(
    w: torch.Tensor,
    group_size: int | None = 128,
    symmetric: bool = True,
    *,
    layout: str | None = None,
    method: str | None = None,
) -> Int4Weight:
    """INT4 quantization of a weight w [N, K] = [out_features, in_features], without calibration data.

    GPTQ's conventions, computed in fp32 per group of `group_size` input channels (None or -1:
    one group per output channel, G = K; else 32, 64 or 128; a G that does not divide K leaves a
    shorter last group, quantized as a group of its own, and a G of at least K is per-channel).
    K is any multiple of 32, N any multiple of 16. A group's scale s and zero point z
    give its codes q = clamp(round(w / s) + z, 0, 15) and its values (q - z) * s:
      symmetric:  z = 8
      asymmetric: z an integer in 0..15 (so 0 is always one of the 16 levels), stored in `zeros`
    `method` chooses s (and z):
      "rtn" (round to nearest): symmetric s = 2 * absmax / 15; asymmetric: the range [min, max]
          widened to include 0, s = (max - min) / 15, z = clamp(round(-min / s), 0, 15).
      "mse": per group, a search of s (and z) for the least weighted squared weight error
          sum_i (w_i^2 + mean(w^2)) (dequantized_i - w_i)^2, weighing the group's large weights
          more: among round-to-nearest's own and a grid of narrower and wider ranges (s from 0.5
          to 1.1 times round-to-nearest's, in steps of 0.03; asymmetric: with the zero points that
          align the low end, the high end or the middle of the range), then two weighted
          least-squares refits of s to the chosen codes. No group's weighted error is larger than
          round-to-nearest's. (Weighing the error matters: the plain squared error, minimized,
          clips a group's largest weights, and that raised a real model's perplexity, issue 30.)
          Deterministic; about 20 (symmetric) or 60 (asymmetric) passes over w in chunks that stay
          in cache (seconds for a 14336 x 4096 matrix on one CPU core).
      None: DEFAULT_METHOD ("mse": on SmolLM2-135M it removed 38% of round to nearest's perplexity
          increase at symmetric group 128 and matched it asymmetric; docs/results/w4a16.md).
    The format is the same whatever the method: only the values chosen differ.
    s is clamped to the storage dtype's smallest normal number (an all-zero group), rounded to the
    storage dtype first and q computed with that rounded s, so dequantize() is exactly what the
    codes mean. Scales (and zeros) are stored in w's dtype: float16 or bfloat16; float32 input is
    stored as float16. layout: default `layout_for_device(w.device)`. A weight whose
    round-to-nearest scales are not finite in the storage dtype (inf/NaN in w) raises ValueError,
    whatever the method.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a 2-D tensor [out_features, in_features], got {describe(w)}")
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D tensor [out_features, in_features], got {describe(w)}")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"w must be float16, bfloat16 or float32, got {w.dtype}")
    method = DEFAULT_METHOD if method is None else method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (or None: {DEFAULT_METHOD!r}), got {method!r}")
    n, k = w.shape
    check_shape(n, k, "w")
    g = resolve_group_size(group_size, k)
    store = w.dtype if w.dtype in SCALE_DTYPES else torch.float16
    wf = w.detach().to(torch.float32)
    full = k // g * g  # a K tail shorter than G (K = 576, G = 128) is a group of its own
    parts = [(wf[:, :full].reshape(n, k // g, g), 0)] if full else []
    if full < k:
        parts.append((wf[:, full:].reshape(n, 1, k - full), full))
    codes, scales, zeros = [], [], []
    for wg, k0 in parts:
        q, sf, z = _quantize_groups(wg, k0, symmetric, method, store)
        codes.append(q.reshape(n, -1))
        scales.append(sf)
        zeros.append(z)
    codes_t = torch.cat(codes, dim=1).to(torch.uint8)
    s = torch.cat(scales, dim=1).to(store)  # exact: every scale was rounded to the storage dtype
    zeros_t = None if symmetric else torch.cat(zeros, dim=1).T.to(store)
    return Int4Weight.from_codes(codes_t, s.T, zeros_t, g, layout=layout)


def _quantize_groups(wg: torch.Tensor, k0: int, symmetric: bool, method: str,
                     store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_weight over groups wg [N, groups, g] (fp32) starting at input channel k0: (codes
    [N, groups, g] as fp32 integers, scales [N, groups] fp32 rounded to `store`, zero points)."""
    n, _, g = wg.shape
    tiny = torch.finfo(store).tiny
    if symmetric:
        base = wg.abs().amax(dim=-1) * (2.0 / 15.0)
        lo = hi = None
        s = base.clamp_min(tiny).to(store)
        sf = s.to(torch.float32)
        z = torch.full_like(sf, float(_SYMMETRIC_ZERO))
    else:
        lo = wg.amin(dim=-1).clamp_max(0.0)
        hi = wg.amax(dim=-1).clamp_min(0.0)
        base = (hi - lo) / 15.0
        s = base.clamp_min(tiny).to(store)
        sf = s.to(torch.float32)
        z = torch.round(-lo / sf).clamp_(0, 15)
    bad = ~torch.isfinite(s)  # a NaN/inf in w, or a float32 w too large for the scales' dtype
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        first = k0 + group * g
        raise ValueError(
            f"w: {int(bad.sum())} group scale(s) are not finite in {store} (first: row {row}, input "
            f"channels {first}..{first + g - 1}); w holds inf/NaN, or values too large for "
            f"{store} scales (|w| above about {torch.finfo(store).max * 7.5:.3g})"
        )
    if method == "mse":
        rows = max(1, (_MSE_CHUNK if wg.device.type == "cpu" else _MSE_CHUNK_GPU) // (wg.shape[1] * g))
        for i in range(0, n, rows):
            j = slice(i, i + rows)
            _mse_search(wg[j], sf[j], z[j], base[j], None if lo is None else lo[j],
                        None if hi is None else hi[j], store)
    q = (torch.round(wg / sf[..., None]) + z[..., None]).clamp_(0, 15)
    return q, sf, z
