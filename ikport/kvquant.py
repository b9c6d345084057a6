"""KV cache formats: what the decode kernels' KV loaders read (kernels_src/attention/kv_loader.cuh).

  dense  K and V in the query's dtype (fp16/bf16)
  int8   symmetric INT8, one fp32 scale per token and KV head: scale = amax / 127 over the head's
         head_dim values (0 for an all-zero row), code = round(x / scale) clamped to [-127, 127];
         a value reads back as code * scale. Codes keep the dense cache's shape ([B, Hkv, L, D] or
         paged [pages, Hkv, page_size, D]), scales drop the last dim ([B, Hkv, L] / [pages, Hkv,
         page_size]). fp32 scales: exact for any fp16/bf16 range (an fp16 scale overflows past
         amax 8.3e6 and goes subnormal below 7.8e-3), 4 bytes beside head_dim bytes of codes.

  kivi4  KIVI INT4 (Liu et al. 2024), asymmetric 4-bit codes two a byte (channel 2i in the low
         nibble of byte i); a value is zero + code * scale. K per channel over groups of G tokens
         (G 32, 64 or 128; default 128): keys carry persistent per-channel outliers, which a
         per-token scale spreads over every channel of the token. The newest len % G tokens of K
         stay in the cache dtype (the residual, [B, Hkv, G, D], row t at t % G) until their group
         fills and is quantized. V per token, one (scale, zero) pair per token and KV head.
         Layout: codes uint8 in the dense cache's row layout with D / 2 bytes a row; K's pairs
         [B, Hkv, ceil(capacity / G), D, 2] per sequence for contiguous and paged caches alike (a
         page of 16 tokens holds no whole group of 128; the residual is per sequence anyway); V's
         pairs beside V's rows ([B, Hkv, L, 2] or [pages, Hkv, page_size, 2]).
         Byte choices, at the D1 shape (B 8, L 4096, Hkv 8, D 128, G 128; fp16 134,217,728 bytes)
         against the 0.30x budget (40.27 MB): codes 33,554,432 (0.25x); K pairs 1,048,576 (4
         bytes a token and head: D pairs over G tokens); V pairs 1,048,576; K's residual 2,097,152:
         37,748,736 bytes, 0.281x. Alternatives: fp32 pairs 0.297x (inside the budget, but 5%
         more bytes for every decode step to read); V in KIVI's 32-channel groups 0.305x (over);
         a full-precision V residual as KIVI keeps 0.297x (V is per token, so nothing waits for a
         group to fill; at the budget's edge, and a second residual path in the loaders). Pairs
         in the cache dtype: zero is the group's minimum, a value of that dtype, so exact; scale =
         (max - min) / 15 is rounded up to the dtype (nextafter), so that 15 steps always reach
         the maximum (no code clamps) and the round trip stays within half a step; an fp16 scale
         cannot overflow for fp16 data (131008 / 15), bf16 has fp32's range; below fp16's normal
         range (a group spanning less than 9.2e-4) the scale loses relative precision, not its
         bound (the int8 format's fp32 scale avoided that with one scale per 128 codes; here a
         pair serves 128 codes of K or a whole row of V, and the cache dtype halves those bytes).
  int4t  per-token INT4 K and V (one pair per token and head, as kivi4's V): the accuracy
         study's baseline beside KIVI, quantize / dequantize only (no cache or kernel).

Torch ops only, on whatever device the tensors live: quantizing on the GPU is a few elementwise
kernels with no host synchronization (CUDA-graph safe).
"""

from __future__ import annotations

import torch

KV_FORMATS = ("dense", "int8", "kivi4")
KIVI_GROUPS = (32, 64, 128)
INT4_MAX = 15
INT8_MAX = 127
SCALE_DTYPE = torch.float32


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 of x's shape, scales fp32 of x's shape without the last dim): per row of the
    last dim, scale = amax / 127, code = round(x / scale)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(xf / safe.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """code * scale (in fp32), rounded once to `dtype`: the values the kernels compute with."""
    return (codes.float() * scales.float().unsqueeze(-1)).to(dtype)


def _int4_pairs(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) in `dtype` for values in [lo, hi] (fp32): zero = lo (exact where lo is a value
    of `dtype`), scale = (hi - lo) / 15 rounded up to `dtype` (15 steps reach hi)."""
    zero = lo.to(dtype)
    want = hi / INT4_MAX - lo / INT4_MAX  # (divided first: no fp32 overflow at bf16's extremes)
    scale = want.to(dtype)
    scale = torch.where(scale.float() < want, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    return scale, zero


def _int4_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """uint8 codes round((x - zero) / scale) in [0, 15], two a byte along the last dim."""
    s = scale.float()
    q = torch.round((x.float() - zero.float()) / torch.where(s > 0, s, torch.ones_like(s)))
    q = q.clamp_(0, INT4_MAX).to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D / 2] packed codes -> uint8 [..., D], one code each."""
    return torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)


def quantize_int4_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token asymmetric INT4 of x [..., D] (kivi4's V; the per-token K baseline): (codes uint8
    [..., D / 2], pairs [..., 2] of (scale, zero) in x's dtype), over each row's D values."""
    xf = x.float()
    scale, zero = _int4_pairs(xf.amin(dim=-1), xf.amax(dim=-1), x.dtype)
    return _int4_codes(x, scale.unsqueeze(-1), zero.unsqueeze(-1)), torch.stack((scale, zero), dim=-1)


def quantize_int4_channels(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kivi4's K: x [..., n * group, D] per channel over groups of `group` rows: (codes uint8
    [..., n * group, D / 2], pairs [..., n, D, 2] of (scale, zero) in x's dtype)."""
    *lead, rows, d = x.shape
    if rows % group:
        raise ValueError(f"quantize_int4_channels: {rows} rows are not whole groups of {group}")
    xg = x.float().reshape(*lead, rows // group, group, d)
    scale, zero = _int4_pairs(xg.amin(dim=-2), xg.amax(dim=-2), x.dtype)
    codes = _int4_codes(xg, scale.unsqueeze(-2), zero.unsqueeze(-2)).reshape(*lead, rows, d // 2)
    return codes, torch.stack((scale, zero), dim=-1)


def dequantize_int4(codes: torch.Tensor, pairs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """zero + code * scale (fp32), rounded once to `dtype`. codes [..., D / 2]; pairs [..., 2]
    broadcast over the row's D values (per token) or [..., D, 2] (per channel, one group's rows:
    `pairs` then indexed by the caller, see dequantize_kivi_k)."""
    q = unpack_int4(codes).float()
    p = pairs.float()
    if p.dim() == q.dim():  # one pair per row: [..., 2]
        return (p[..., 1:2] + q * p[..., 0:1]).to(dtype)
    return (p[..., 1] + q * p[..., 0]).to(dtype)  # [..., D, 2]: a pair per channel


def dequantize_kivi_k(codes: torch.Tensor, pairs: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """kivi4's K codes [..., L, D / 2] with pairs [..., ceil(L / group), D, 2] -> [..., L, D]."""
    rows = codes.shape[-2]
    per_row = pairs.repeat_interleave(group, dim=-3)[..., :rows, :, :]
    return dequantize_int4(codes, per_row, dtype)


def bytes_per_token(kv_format: str, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    kivi_group: int = 128) -> float:
    """Bytes one token costs a cache of this format: K and V of every KV head (scales included;
    kivi4: K's pairs amortized over the group's tokens, a fraction where head_dim * 4 / G is, and
    not the residual, a fixed G rows a sequence: KVCache.nbytes counts it)."""
    elem = torch.empty((), dtype=dtype).element_size()
    if kv_format == "dense":
        return 2 * kv_heads * head_dim * elem
    if kv_format == "int8":
        return 2 * kv_heads * (head_dim + torch.empty((), dtype=SCALE_DTYPE).element_size())
    if kv_format == "kivi4":
        per_head = head_dim + 2 * elem + head_dim * 2 * elem / kivi_group
        return kv_heads * (int(per_head) if per_head == int(per_head) else per_head)
    raise ValueError(f"unknown KV cache format {kv_format!r}; choose from {KV_FORMATS}")
