"""GPTQ and AWQ checkpoints -> `Int4Weight`, converted once at load time.

Both formats are unpacked to codes [N, K] and zero points, then repacked in the kernel's fragment
layout (ikport.int4); nothing of the original packing survives the load.

GPTQ ("gptq", AutoGPTQ / GPTQModel checkpoint_format "gptq", a.k.a. v1), per linear layer:
  qweight int32 [K // 8, N]: 8 codes along K per word, the code of input channel 8i + j in bits
    4j..4j+3 of row i.
  qzeros int32 [ceil(K / G), N // 8]: 8 zero points along N per word (column 8c + j in bits 4j..4j+3),
    stored as z - 1 (v1's off-by-one).
  scales float16 [ceil(K / G), N]; g_idx int32 [K]: the group of every input channel (act-order /
    desc_act checkpoints have a non-monotonic g_idx); w[n, k] = (q[k, n] - z[g_idx[k], n]) *
    s[g_idx[k], n].
  checkpoint_format "gptq_v2" (GPTQModel's internal format) stores z itself.

AWQ (AutoAWQ "GEMM" version), per linear layer:
  qweight int32 [K, N // 8]: packed along N; nibble j of word i holds column 8i + AWQ_ORDER[j]
    with AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7].
  qzeros int32 [ceil(K / G), N // 8]: the same packing, no offset.
  scales float16 [ceil(K / G), N]; w = (q - z) * s.

Checked against the projects' own code (read only, nothing copied):
- AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda.py and qlinear_cuda_old.py (QuantLinear.pack
  and the torch forward): qweight rows hold 8 consecutive input channels, channel 8i + j at shift
  4j; `zeros -= 1` before packing qzeros along N at shift 4j; the reader computes
  ((qzeros >> 4j) & 15) + 1 and indexes scales / zeros by g_idx per input channel.
- GPTQModel gptqmodel/utils/model.py, convert_gptq_v1_to_v2_format_module /
  convert_gptq_v2_to_v1_format_module: for 4 bits v1 <-> v2 is one integer add / subtract of
  0x11111111 on each packed qzeros word (with carries and borrows between nibbles).
- AutoAWQ awq/utils/packing_utils.py (AWQ_ORDER, AWQ_REVERSE_ORDER, unpack_awq, reverse_awq_order,
  dequantize_gemm) and awq/modules/linear/gemm.py (WQLinear_GEMM.from_linear: qweight
  [in_features, out_features // 8] with `qweight[:, col] |= intweight[:, 8 col + order_map[i]] << 4i`,
  qzeros packed the same way, scales [in_features // G, out_features], dequant (q - z) * s).

The GPTQ v1 zero-point wrap. A group whose zero point is 0 is stored as -1. GPTQModel writes v1 by
subtracting 0x11111111 from the v2 word, so that nibble becomes 15 and the next nibble up loses one
(a borrow); its v1 -> v2 load adds 0x11111111 back, which undoes both exactly. `from_gptq` decodes
v1 the same way (a 32-bit word add, then nibbles), so z = 0 round-trips. Where no nibble is 15 this
is the same as z = nibble + 1. Two caveats, both about asymmetric checkpoints with z = 0 only:
AutoGPTQ's own reader computes nibble + 1 = 16 for such a nibble (no wrap), so its results differ
from ours there; and AutoGPTQ's numpy packer ORs uint32(-1) << 4j into the word, which sets every
higher nibble of that word to 15: those zero points are lost in the file and no reader recovers them.
Symmetric checkpoints (z = 8, stored 7) are unaffected by all of this.

A GPTQ act-order g_idx becomes a permutation: perm = argsort(g_idx, stable), the codes are reordered
to it (each group then holds G consecutive channels, checked) and Int4Weight.perm = perm; the kernel
then computes x[:, perm] @ W_sorted^T. An identity permutation is dropped.
Zero points that are all 8 are dropped too (zeros = None: the symmetric kernel path).
"""

from __future__ import annotations

import torch

from .int4 import GROUP_SIZES, Int4Weight, check_shape, num_groups

__all__ = ["AWQ_ORDER", "from_awq", "from_gptq"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8i + AWQ_ORDER[j]
_V1_ZERO_OFFSET = 0x11111111  # GPTQModel's v1 -> v2 conversion for 4 bits: +1 in every nibble
_GPTQ_FORMATS = ("gptq", "gptq_v2")


def _check_int32(name: str, t: object, ndim: int = 2) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (packed INT4), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {list(t.shape)}")
    return t


def _check_scales(t: object, groups: int, n: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"scales must be float16, bfloat16 or float32, got {t.dtype}")
    if tuple(t.shape) != (groups, n):
        raise ValueError(f"scales must have shape [ceil(K / G), N] = {[groups, n]}, got {list(t.shape)}")
    return t


def _group_size(k: int, groups: int, what: str) -> int:
    """G from the rows of scales: K / groups, or the G of GROUP_SIZES with ceil(K / G) = groups (a
    shorter last group, as GPTQ stores K = 576 at G = 128: 5 groups)."""
    if groups > 0 and k % groups == 0:
        return k // groups
    for g in GROUP_SIZES:
        if num_groups(k, g) == groups:
            return g
    raise ValueError(f"{what}: {groups} groups fit no group size of in_features K={k} (K / G groups, "
                     f"or ceil(K / G) for G in {GROUP_SIZES})")


def _nibbles_last(words: torch.Tensor) -> torch.Tensor:
    """int32/int64 [..., M] -> int64 [..., M * 8]: nibble j of word m at index 8m + j."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device)
    return ((words.to(torch.int64)[..., None] >> shifts) & 15).flatten(-2)


def _zeros_or_none(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Zero points [ceil(K / G), N] as `dtype`, or None when all are 8 (symmetric)."""
    if bool((z == 8).all()):
        return None
    return z.to(dtype)


def _scales_dtype(scales: torch.Tensor) -> torch.Tensor:
    return scales.to(torch.float16) if scales.dtype == torch.float32 else scales


def _groups_and_scales(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, k: int,
                       n: int, what: str) -> tuple[int, torch.Tensor]:
    """Both formats store zeros as [ceil(K / G), N // 8] int32 and scales as [ceil(K / G), N]: check them and
    return (G, scales in a supported dtype on qweight's device)."""
    groups = qzeros.shape[0]
    if tuple(qzeros.shape) != (groups, n // 8):
        raise ValueError(f"qzeros must have shape [ceil(K / G), N // 8] = [{groups}, {n // 8}] for "
                         f"qweight {list(qweight.shape)}, got {list(qzeros.shape)}")
    g = _group_size(k, groups, what)
    return g, _scales_dtype(_check_scales(scales, groups, n)).to(qweight.device)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int = 4,
    layout: str | None = None,
    checkpoint_format: str = "gptq",
) -> Int4Weight:
    """One GPTQ linear layer (AutoGPTQ / GPTQModel tensors) -> `Int4Weight`.

    qweight: int32 [K // 8, N]; qzeros: int32 [ceil(K / G), N // 8]; scales: float16/bfloat16
    [ceil(K / G), N] (float32 is stored as float16; K any multiple of 32, N of 16; a G that does not
    divide K leaves a shorter last group, as AutoGPTQ stores it); g_idx: optional int [K] group
    index per input channel (act-order checkpoints: non-monotonic; each group must hold exactly G
    channels, the last group K - (groups - 1) G). bits: only 4.
    checkpoint_format: "gptq" (v1, zero points stored minus one; the HF default) or "gptq_v2".
    layout: default `layout_for_device(qweight.device)`. Everything runs on qweight's device.
    See the module docstring for the bit layout and the z = 0 wrap.
    """
    if bits != 4:
        raise ValueError(f"from_gptq: only bits=4 is supported, got bits={bits}")
    if checkpoint_format not in _GPTQ_FORMATS:
        raise ValueError(f"from_gptq: checkpoint_format must be one of {_GPTQ_FORMATS}, "
                         f"got {checkpoint_format!r}")
    _check_int32("qweight", qweight)
    _check_int32("qzeros", qzeros)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    check_shape(n, k, "GPTQ qweight [K // 8, N]")
    g, scales = _groups_and_scales(qweight, qzeros, scales, k, n, "GPTQ qzeros")
    groups = num_groups(k, g)
    dev = qweight.device

    # codes [N, K]: row i of qweight holds input channels 8i .. 8i + 7 at shifts 0, 4, .., 28.
    codes = _nibbles_last(qweight.T).to(torch.uint8)  # [N, K]
    words = qzeros.to(dev, torch.int64)
    if checkpoint_format == "gptq":
        words = (words + _V1_ZERO_OFFSET) & 0xFFFFFFFF  # undo v1's z - 1 as GPTQModel does
    zeros = _nibbles_last(words)  # [ceil(K / G), N]

    perm = None
    if g_idx is not None:
        if not isinstance(g_idx, torch.Tensor) or g_idx.dtype.is_floating_point or g_idx.dim() != 1:
            raise TypeError(f"g_idx must be an integer tensor [K], got "
                            f"{getattr(g_idx, 'dtype', type(g_idx).__name__)}")
        if g_idx.numel() != k:
            raise ValueError(f"g_idx must have shape [K] = [{k}], got {list(g_idx.shape)}")
        gi = g_idx.to(dev, torch.int64)
        if int(gi.min()) < 0 or int(gi.max()) >= groups:
            raise ValueError(f"g_idx values must lie in [0, {groups}) (the rows of scales)")
        sequential = torch.arange(k, device=dev) // g
        if not torch.equal(gi, sequential):
            perm = torch.sort(gi, stable=True).indices
            if not torch.equal(gi[perm], sequential):
                counts = torch.bincount(gi, minlength=groups)
                want = torch.bincount(sequential, minlength=groups)
                bad = int(torch.nonzero(counts != want)[0, 0])
                raise ValueError(
                    f"g_idx: every group must hold exactly group_size={g} input channels (the last "
                    f"{int(want[-1])}) for the act-order permutation, but group {bad} holds "
                    f"{int(counts[bad])}"
                )
            codes = codes[:, perm].contiguous()
    return Int4Weight.from_codes(codes, scales, _zeros_or_none(zeros, scales.dtype), g,
                                 perm=perm, layout=layout)


def from_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    *,
    layout: str | None = None,
) -> Int4Weight:
    """One AutoAWQ GEMM-format linear layer -> `Int4Weight`.

    qweight: int32 [K, N // 8]; qzeros: int32 [ceil(K / G), N // 8] (both packed along N in AWQ_ORDER);
    scales: float16/bfloat16 [ceil(K / G), N] (float32 is stored as float16); w = (q - z) * s.
    layout: default `layout_for_device(qweight.device)`. The GEMV / GEMV_fast / Marlin AWQ
    versions pack differently and are not accepted.
    """
    _check_int32("qweight", qweight)
    _check_int32("qzeros", qzeros)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    check_shape(n, k, "AWQ qweight [K, N // 8]")
    g, scales = _groups_and_scales(qweight, qzeros, scales, k, n, "AWQ qzeros")
    dev = qweight.device
    # nibble j of word i holds column 8i + AWQ_ORDER[j]: column 8i + m is nibble inverse[m].
    inverse = [AWQ_ORDER.index(m) for m in range(8)]
    cols = torch.tensor(inverse, device=dev)
    sel = (torch.arange(n // 8, device=dev)[:, None] * 8 + cols).flatten()

    codes = _nibbles_last(qweight).index_select(1, sel).T.to(torch.uint8)  # [N, K]
    zeros = _nibbles_last(qzeros.to(dev)).index_select(1, sel)  # [ceil(K / G), N]
    return Int4Weight.from_codes(codes.contiguous(), scales, _zeros_or_none(zeros, scales.dtype), g,
                                 layout=layout)
