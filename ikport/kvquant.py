"""KV cache formats: what the decode kernels' KV loaders read (kernels_src/attention/kv_loader.cuh).

  dense  K and V in the query's dtype (fp16/bf16)
  int8   symmetric INT8, one fp32 scale per token and KV head: scale = amax / 127 over the head's
         head_dim values (0 for an all-zero row), code = round(x / scale) clamped to [-127, 127];
         a value reads back as code * scale. Codes keep the dense cache's shape ([B, Hkv, L, D] or
         paged [pages, Hkv, page_size, D]), scales drop the last dim ([B, Hkv, L] / [pages, Hkv,
         page_size]). fp32 scales: exact for any fp16/bf16 range (an fp16 scale overflows past
         amax 8.3e6 and goes subnormal below 7.8e-3), 4 bytes beside head_dim bytes of codes.

Torch ops only, on whatever device the tensors live: quantizing on the GPU is a few elementwise
kernels with no host synchronization (CUDA-graph safe).
"""

from __future__ import annotations

import torch

KV_FORMATS = ("dense", "int8")
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


def bytes_per_token(kv_format: str, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token costs a cache of this format: K and V of every KV head (scales included)."""
    if kv_format == "dense":
        return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    if kv_format == "int8":
        return 2 * kv_heads * (head_dim + torch.empty((), dtype=SCALE_DTYPE).element_size())
    raise ValueError(f"unknown KV cache format {kv_format!r}; choose from {KV_FORMATS}")
