"""Every input check, raised before anything launches, naming the offending tensor and value."""

from __future__ import annotations

import torch

GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_DECODE_QUERY_TOKENS = 128  # longer queries are prefill: its own kernel and issue
VECTOR_ELEMS = 8  # kernels read 16-byte vectors: 8 fp16/bf16 elements


def _check_tensor(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    return t


def _check_vector_layout(name: str, t: torch.Tensor) -> None:
    """Last dim contiguous, other strides and the base address 16-byte aligned."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")
    bad = [i for i, s in enumerate(t.stride()[:-1]) if s % VECTOR_ELEMS and t.shape[i] > 1]
    if bad:
        raise ValueError(
            f"{name}: stride of dim {bad[0]} is {t.stride(bad[0])} elements; ikport needs strides "
            f"that are multiples of {VECTOR_ELEMS} elements (16 bytes)"
        )
    if t.data_ptr() % 16:
        raise ValueError(f"{name}: data pointer is not 16-byte aligned (a sliced view?); pass .clone()")


def common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gpu: bool | None = None) -> None:
    """Checks shared by every attention entry point. `gpu` (default: q.is_cuda) adds the
    kernels' own limits; tests pass it to check those limits without a GPU."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    gpu = q.is_cuda if gpu is None else gpu
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = GPU_DTYPES if gpu else CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"dtype {q.dtype} is not supported on {q.device.type}; use one of {allowed}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"head_dim of q ({D}) and k/v ({k.shape[-1]}) differ")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if q.shape[2] == 0:
        raise ValueError("q has no query tokens (dim 2 is 0)")
    if gpu:
        if D % 16 or not 16 <= D <= 256:
            raise ValueError(f"head_dim {D} is not supported on the GPU: it must be a multiple of 16 in [16, 256]")
        if q.shape[2] > MAX_DECODE_QUERY_TOKENS:
            raise NotImplementedError(
                f"{q.shape[2]} query tokens: the GPU decode kernel takes at most "
                f"{MAX_DECODE_QUERY_TOKENS}; prefill attention is not implemented yet"
            )
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_vector_layout(name, t)


def kv_lens(lens: object, batch: int, device: torch.device) -> None:
    if lens is None:
        return
    t = _check_tensor("kv_lens", lens, 1)
    if t.dtype != torch.int32:
        raise TypeError(f"kv_lens must be int32, got {t.dtype}")
    if t.shape[0] != batch:
        raise ValueError(f"kv_lens has {t.shape[0]} entries for a batch of {batch}")
    if t.device != device:
        raise ValueError(f"kv_lens is on {t.device} but q is on {device}")


def out(o: object, q: torch.Tensor) -> None:
    """A caller-provided output: q's shape, dtype and device, contiguous."""
    if o is None:
        return
    t = _check_tensor("out", o, 4)
    if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
        raise ValueError(
            f"out must match q: shape {tuple(q.shape)}, {q.dtype} on {q.device}; "
            f"got {tuple(t.shape)}, {t.dtype} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError("out must be contiguous")


def attention(q, k, v, kv_lens_: object, gpu: bool | None = None) -> None:
    common(q, k, v, gpu)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k/v ({k.shape[0]}) differ")
    kv_lens(kv_lens_, q.shape[0], q.device)


def paged(q, k_pages, v_pages, block_table: object, lens: object, gpu: bool | None = None) -> int:
    """Checks the paged layout; returns the page size."""
    common(q, k_pages, v_pages, gpu)
    bt = _check_tensor("block_table", block_table, 2)
    if bt.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {bt.dtype}")
    if bt.device != q.device:
        raise ValueError(f"block_table is on {bt.device} but q is on {q.device}")
    if bt.shape[0] != q.shape[0]:
        raise ValueError(f"block_table has {bt.shape[0]} rows for a batch of {q.shape[0]}")
    if bt.stride(-1) != 1:
        raise ValueError("block_table's last dim must be contiguous")
    ps = k_pages.shape[2]
    if ps < 1 or ps > 256 or ps & (ps - 1):
        raise ValueError(f"page size {ps} is not supported: use a power of two from 1 to 256")
    if lens is None:
        raise ValueError("paged attention needs kv_lens (int32 [B] on the device)")
    kv_lens(lens, q.shape[0], q.device)
    return ps


def w4a16(x: object, weight: object, out_: object, gpu: bool | None = None) -> None:
    """x [..., K] against an Int4Weight [N, K]; `out_` [..., N] if given."""
    from .int4 import Int4Weight  # int4 imports nothing from here; keeps checks import-light

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be an ikport.int4.Int4Weight (ikport.quantize_weight), got {type(weight).__name__}")
    gpu = x.is_cuda if gpu is None else gpu
    if x.dim() < 1 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x's last dim must be the weight's in_features {weight.in_features}, got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}; use weight.to(x.device)")
    allowed = GPU_DTYPES if gpu else CPU_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"x dtype {x.dtype} is not supported on {x.device.type}; use one of {allowed}")
    if gpu and x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the weight's scales are {weight.dtype}: the kernel "
                        f"dequantizes into x's dtype; use weight.to(dtype={x.dtype})")
    if gpu and weight.scales.numel() >= 2**31:  # the kernel indexes scales with 32-bit offsets
        raise ValueError(f"weight has {weight.scales.numel()} scales; at most 2**31 - 1 are supported")
    if gpu:
        for name in ("qweight", "scales", "zeros"):
            t = getattr(weight, name)
            if t is not None and t.data_ptr() % 16:
                raise ValueError(f"weight.{name}: data pointer is not 16-byte aligned (a sliced "
                                 f"view?); pass .clone()")
    if out_ is None:
        return
    t = out_
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(t).__name__}")
    want = (*x.shape[:-1], weight.out_features)
    if tuple(t.shape) != want or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"out must be {want}, {x.dtype} on {x.device}; got {tuple(t.shape)}, {t.dtype} on {t.device}")
    if not t.is_contiguous():
        raise ValueError("out must be contiguous")


def vector_rows(name: str, t: torch.Tensor) -> None:
    """A 2-D operand the kernels read in 16-byte vectors along its rows."""
    _check_vector_layout(name, t)


def options(value: object, kind: type) -> None:
    """`options` is None or a `kind` (DecodeOptions, W4A16Options)."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"options must be an ikport.{kind.__name__} or None, got {type(value).__name__}")
