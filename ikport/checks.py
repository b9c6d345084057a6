"""Every input check, raised before anything launches, naming the offending tensor and value."""

from __future__ import annotations

import math
import numbers

import torch

from . import knobs

GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_DECODE_QUERY_TOKENS = 128  # where decode ends: longer queries run the prefill kernel (the planners' boundary)
VECTOR_ELEMS = 8  # kernels read 16-byte vectors: 8 fp16/bf16 elements


def describe(t: object) -> str:
    """A bad argument for an error message: a tensor's dtype, shape and device, else its type."""
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)} on {t.device}"
    return type(t).__name__


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


def _qkv(q: object, k: object, v: object, ndim: int, gpu: bool | None) -> bool:
    """Ranks, device, dtype, shapes, head_dim and head counts of q, k, v (heads at dim 1 in both
    layouts: [B, H, T, D] and varlen [T, H, D]); returns whether the GPU's limits apply."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim)
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
    if D == 0:
        raise ValueError("head_dim (the last dim of q, k and v) is 0")
    if k.shape[-1] != D:
        raise ValueError(f"head_dim of q ({D}) and k/v ({k.shape[-1]}) differ")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if gpu and (D % 16 or not 16 <= D <= 256):
        raise ValueError(f"head_dim {D} is not supported on the GPU: it must be a multiple of 16 in [16, 256]")
    return gpu


def common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gpu: bool | None = None) -> None:
    """Checks shared by every [B, H, T, D] attention entry point. `gpu` (default: q.is_cuda) adds
    the kernels' own limits; tests pass it to check those limits without a GPU. Any number of
    query tokens: up to MAX_DECODE_QUERY_TOKENS the decode kernels run, past it the prefill
    kernel (the planners choose; nothing here refuses a length)."""
    gpu = _qkv(q, k, v, 4, gpu)
    if q.shape[2] == 0:
        raise ValueError("q has no query tokens (dim 2 is 0)")
    if gpu:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_vector_layout(name, t)


def scale(value: object, traced: bool = False) -> float | None:
    """The softmax scale as a float: None (the default, 1/sqrt(head_dim)) or a finite real
    number of any sign. Checked on every call (it is not part of a call's cached layout).
    `traced`: torch.compile is tracing and the value may be symbolic; only its type is checked
    (the op's eager run checks the number it gets)."""
    if value is None:
        return None
    real = (numbers.Real, torch.SymFloat, torch.SymInt)  # Sym*: a traced value
    if isinstance(value, bool) or not isinstance(value, real):
        hint = " (pass float(t): a tensor would be read back to the host)" if isinstance(
            value, torch.Tensor) else ""
        raise TypeError(f"scale must be a float (or None for 1/sqrt(head_dim)), got "
                        f"{type(value).__name__}{hint}")
    value = float(value)
    if not traced and not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, got {value}")
    return value


def page_size(ps: object, name: str = "page_size") -> int | torch.SymInt:
    """A page size the paged kernels take: a power of two in [1, 256] (one shared rule for
    `paged_attention`'s pages and `paged_kv_from_dense`)."""
    if isinstance(ps, bool) or not isinstance(ps, (int, torch.SymInt)):  # SymInt: traced shapes
        raise TypeError(f"{name} must be an int, got {type(ps).__name__}")
    if ps < 1 or ps > 256 or ps & (ps - 1):
        raise ValueError(f"{name} {ps} is not supported: use a power of two from 1 to 256")
    return ps


def _lens(name: str, lens: object, batch: int, device: torch.device) -> torch.Tensor:
    t = _check_tensor(name, lens, 1)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} entries for a batch of {batch}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def kv_lens(lens: object, batch: int, device: torch.device) -> None:
    """Keys per sequence: int32 [B] on q's device, contiguous (the kernels read it as a plain array)."""
    if lens is None:
        return
    t = _lens("kv_lens", lens, batch, device)
    if not t.is_contiguous():
        raise ValueError(f"kv_lens must be contiguous, got stride {t.stride(0)}")


def q_lens(lens: object, batch: int, device: torch.device) -> None:
    """Valid query tokens per sequence: int32 [B] on q's device, contiguous (the kernels read it
    as a plain array). Values are clamped to [0, Tq] on the device, as kv_lens to [0, L]."""
    if lens is None:
        return
    t = _lens("q_lens", lens, batch, device)
    if not t.is_contiguous():
        raise ValueError(f"q_lens must be contiguous, got stride {t.stride(0)}")


def out(o: object, q: torch.Tensor) -> None:
    """A caller-provided output: q's shape, dtype and device, contiguous."""
    if o is None:
        return
    t = _check_tensor("out", o, q.dim())
    if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
        raise ValueError(
            f"out must match q: shape {tuple(q.shape)}, {q.dtype} on {q.device}; "
            f"got {tuple(t.shape)}, {t.dtype} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError("out must be contiguous")


def attention(q, k, v, kv_lens_: object, gpu: bool | None = None, q_lens_: object = None) -> None:
    common(q, k, v, gpu)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k/v ({k.shape[0]}) differ")
    kv_lens(kv_lens_, q.shape[0], q.device)
    q_lens(q_lens_, q.shape[0], q.device)


def paged(q, k_pages, v_pages, block_table: object, lens: object, gpu: bool | None = None,
          q_lens_: object = None) -> int:
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
    if k_pages.shape[0] == 0:
        raise ValueError("k_pages and v_pages hold no pages (dim 0 is 0)")
    ps = page_size(k_pages.shape[2], "k_pages/v_pages page size")
    if lens is None:
        raise ValueError("paged attention needs kv_lens (int32 [B] on the device)")
    kv_lens(lens, q.shape[0], q.device)
    q_lens(q_lens_, q.shape[0], q.device)
    return ps


def _quantized_cache(q, k, block_table: object, lens: object, what: str, head_dim: int, prefill: bool) -> None:
    """What attention over any quantized cache checks besides its own tensors: q [B, Hq, Tq, D]
    fp16/bf16 (decode: at most MAX_DECODE_QUERY_TOKENS tokens; `prefill`: any number, the
    prefill kernel's), head_dim and head counts, then the batch and kv_lens (contiguous) or the
    int32 `block_table`, page size and kv_lens (paged)."""
    q = _check_tensor("q", q, 4)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q must be fp16 or bf16, got {q.dtype}")
    if q.shape[2] == 0:
        raise ValueError("q has no query tokens (dim 2 is 0)")
    _check_vector_layout("q", q)  # the kernels read q in 16-byte vectors
    if not prefill and q.shape[2] > MAX_DECODE_QUERY_TOKENS:
        raise ValueError(f"q has {q.shape[2]} query tokens: DecodeOptions pin the decode kernels, which take at "
                         f"most {MAX_DECODE_QUERY_TOKENS} over an {what} cache (longer queries run the prefill "
                         f"kernel: pass PrefillOptions or no options)")
    if q.shape[3] != head_dim or q.shape[3] % 16 or q.shape[3] > 256 or q.shape[1] % k.shape[1]:
        raise ValueError(f"head_dim {q.shape[3]} (the cache's {head_dim}, a multiple of 16, <= 256) and "
                         f"{q.shape[1]} query heads (a multiple of {k.shape[1]} KV heads) needed")
    if block_table is None:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"batch of q ({q.shape[0]}) and k/v ({k.shape[0]}) differ")
        kv_lens(lens, q.shape[0], q.device)
        return
    bt = _check_tensor("block_table", block_table, 2)
    if bt.dtype != torch.int32 or bt.device != q.device or bt.shape[0] != q.shape[0] or bt.stride(-1) != 1:
        raise ValueError("block_table must be int32 [B, max_pages] on q's device, last dim contiguous")
    page_size(k.shape[2], "k/v page size")
    if lens is None:
        raise ValueError("paged attention needs kv_lens (int32 [B] on the device)")
    kv_lens(lens, q.shape[0], q.device)


def int8_cache(q, k, v, k_scale, v_scale, block_table: object, lens: object, prefill: bool = False) -> None:
    """Checks attention over an INT8 cache (ikport.kvquant; `prefill`: the prefill kernel's, any
    number of query tokens): q [B, Hq, Tq, D] fp16/bf16; codes k, v
    int8 [B, Hkv, L, D] (paged: [pages, Hkv, page_size, D] with an int32 `block_table`), rows
    16-byte aligned; scales fp32 [B, Hkv, L] / [pages, Hkv, page_size]."""
    q = _check_tensor("q", q, 4)
    for name, t in (("k", k), ("v", v)):
        t = _check_tensor(name, t, 4)
        if t.dtype != torch.int8:
            raise TypeError(f"{name} (INT8 codes) must be int8, got {t.dtype}")
        if t.shape != k.shape or t.shape[3] != q.shape[3] or t.device != q.device:
            raise ValueError(f"{name} {tuple(t.shape)} on {t.device} does not match k {tuple(k.shape)} "
                             f"and q {tuple(q.shape)} on {q.device}")
        if t.stride(-1) != 1 or any(st % 16 for st in t.stride()[:3]) or t.data_ptr() % 16:
            raise ValueError(f"{name}: the last dim must be contiguous, rows 16-byte aligned")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        t = _check_tensor(name, t, 3)
        if t.dtype != torch.float32 or t.shape != k.shape[:3] or t.device != q.device:
            raise ValueError(f"{name} must be fp32 {tuple(k.shape[:3])} on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    _quantized_cache(q, k, block_table, lens, "INT8", q.shape[3], prefill)


KIVI_GROUPS = (32, 64, 128)  # ikport.kvquant.KIVI_GROUPS (the loaders kivi4_g32/64/128)


def kivi_cache(q, k, v, k_scale, v_scale, k_resid, group: object, block_table: object, lens: object,
               prefill: bool = False) -> None:
    """Checks attention over a KIVI INT4 cache (ikport.kvquant; `prefill`: the prefill kernel's, any
    number of query tokens): codes k, v uint8 [B, Hkv, L, D / 2]
    (paged: [pages, Hkv, page_size, D / 2] with an int32 `block_table`), rows 8-byte aligned (16
    where D is a multiple of 32: the matrix kernel's chunks); q's dtype for the pairs: k_scale
    [B, Hkv, >= ceil(capacity / G), D, 2], v_scale k's [:3] + [2], and the residual k_resid
    [B, Hkv, G, D], each with its last dims contiguous and 16-byte aligned."""
    q = _check_tensor("q", q, 4)
    if isinstance(group, bool) or group not in KIVI_GROUPS:
        raise ValueError(f"kivi_group must be one of {KIVI_GROUPS}, got {group!r}")
    row_align = 16 if k.shape[3] % 16 == 0 else 8  # bytes: D / 2 codes a row
    for name, t in (("k", k), ("v", v)):
        t = _check_tensor(name, t, 4)
        if t.dtype != torch.uint8:
            raise TypeError(f"{name} (KIVI codes, two a byte) must be uint8, got {t.dtype}")
        if t.shape != k.shape or 2 * t.shape[3] != q.shape[3] or t.device != q.device:
            raise ValueError(f"{name} {tuple(t.shape)} on {t.device} does not match k {tuple(k.shape)} "
                             f"and q {tuple(q.shape)} (head_dim / 2 bytes a row) on {q.device}")
        if t.stride(-1) != 1 or any(st % row_align for st in t.stride()[:3]) or t.data_ptr() % 16:
            raise ValueError(f"{name}: the last dim must be contiguous, rows {row_align}-byte aligned")
    D, B, Hkv = q.shape[3], q.shape[0], k.shape[1]
    paged = block_table is not None
    capacity = block_table.shape[1] * k.shape[2] if paged and isinstance(block_table, torch.Tensor) else k.shape[2]
    want = {"k_scale": (B, Hkv, -(-capacity // group), D, 2), "v_scale": (*k.shape[:3], 2),
            "k_resid": (B, Hkv, group, D)}
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale), ("k_resid", k_resid)):
        t = _check_tensor(name, t, len(want[name]))
        shape_ok = t.shape[:2] == want[name][:2] and t.shape[3:] == want[name][3:] and (
            t.shape[2] >= want[name][2] if name == "k_scale" else t.shape[2] == want[name][2])
        if t.dtype != q.dtype or not shape_ok or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} {want[name]} on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
        inner, align = {"k_scale": ((2, 1), 8), "v_scale": ((1,), 2), "k_resid": ((1,), 8)}[name]
        if tuple(t.stride()[-len(inner):]) != inner or any(st % align for st in t.stride()[:3]) or t.data_ptr() % 16:
            raise ValueError(f"{name}: its last dims must be contiguous, the others {2 * align}-byte aligned")
    _quantized_cache(q, k, block_table, lens, "KIVI", 2 * k.shape[3], prefill)


def _max_seqlen(name: str, value: object, total: int | torch.SymInt, holds: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):  # SymInt: traced
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value == 0 and total > 0:
        raise ValueError(f"{name} is 0 but {holds} holds {total} tokens")


def varlen(q, k, v, cu_seqlens_q: object, cu_seqlens_k: object, max_seqlen_q: object,
           max_seqlen_k: object, out_: object, return_lse: object = False, gpu: bool | None = None) -> None:
    """`attention_varlen`'s inputs, without reading any data: q [total_q, Hq, D], k/v
    [total_k, Hkv, D]; cu_seqlens_q/k int32 [B + 1] (B >= 1) on q's device, contiguous;
    max_seqlen_q/k ints >= 0 (>= 1 when there are tokens); `out_` q's shape, dtype and device,
    contiguous; return_lse a bool. The offsets' values: `varlen_offsets`."""
    gpu = _qkv(q, k, v, 3, gpu)
    if gpu:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_vector_layout(name, t)
    lengths = []
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        t = _check_tensor(name, cu_seqlens_q if name == "cu_seqlens_q" else cu_seqlens_k, 1)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape[0] < 2:
            raise ValueError(f"{name} has {t.shape[0]} entries; it needs B + 1 >= 2 (offsets of B >= 1 "
                             f"sequences, starting at 0)")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")
        lengths.append(t.shape[0])
    if lengths[0] != lengths[1]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got "
                         f"{lengths[0]} and {lengths[1]}")
    _max_seqlen("max_seqlen_q", max_seqlen_q, q.shape[0], "q")
    _max_seqlen("max_seqlen_k", max_seqlen_k, k.shape[0], "k")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    out(out_, q)


def varlen_offsets(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   total_q: int, total_k: int, gpu: bool = False) -> None:
    """The offsets' values: each of cu_seqlens_q/k starts at 0, never decreases, ends at the total
    (q's and k's dim 0), and no sequence is longer than max_seqlen_q/k. This reads the offsets
    back to the host: pass gpu=True for GPU tensors, then it checks only with
    IKPORT_CHECK_TABLES=1 (a host synchronization per call) and never while a CUDA graph is being
    captured, as `block_table_ids`; the CPU always checks."""
    if gpu and (not knobs.check_tables() or torch.cuda.is_current_stream_capturing()):
        return
    for name, cu, total, most, side in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "q"),
                                        ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "k")):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{name}[0] = {c[0]}: the offsets must start at 0")
        for b in range(len(c) - 1):
            n = c[b + 1] - c[b]
            if n < 0:
                raise ValueError(f"{name}[{b + 1}] = {c[b + 1]} < {name}[{b}] = {c[b]}: the offsets must "
                                 f"not decrease")
            if n > most:
                raise ValueError(f"sequence {b} has {n} tokens ({name}[{b + 1}] - {name}[{b}]), more than "
                                 f"max_seqlen_{side} = {most}")
        if c[-1] != total:
            raise ValueError(f"{name}[-1] = {c[-1]} but {side} holds {total} tokens: the last offset must "
                             f"be the total")


def block_table_ids(block_table: torch.Tensor, lens: torch.Tensor, k_pages: torch.Tensor,
                    gpu: bool) -> None:
    """Every page id a sequence reads (those of its pages below kv_len) is a page of the pool;
    entries past kv_len may hold anything. This reads the table: always on the CPU; on the GPU
    only with IKPORT_CHECK_TABLES=1, at the cost of a host synchronization per call, and never
    while a CUDA graph is being captured (a synchronization is not allowed there)."""
    if gpu and (not knobs.check_tables() or torch.cuda.is_current_stream_capturing()):
        return
    num_pages, ps, max_pages = k_pages.shape[0], k_pages.shape[2], block_table.shape[1]
    used = (lens.to(torch.int64).clamp(0, max_pages * ps) + ps - 1) // ps  # pages read per sequence
    read = torch.arange(max_pages, device=block_table.device) < used[:, None]
    bad = read & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page id: k_pages/v_pages "
            f"hold {num_pages} pages (ids 0..{num_pages - 1}), and sequence {b} reads its page {j} "
            f"(kv_lens[{b}] = {int(lens[b])}, page size {ps})"
        )


def paged_kv_from_dense(k: object, v: object, page_size_: object) -> None:
    """`paged_kv_from_dense`'s inputs: dense k and v of one shape [B, Hkv, L, D], a page size
    `paged_attention` takes."""
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    if k.shape != v.shape or k.device != v.device:
        raise ValueError(f"k and v must have the same shape and device, got {tuple(k.shape)} on "
                         f"{k.device} and {tuple(v.shape)} on {v.device}")
    page_size(page_size_)


def w4a16(x: object, weight: object, out_: object, gpu: bool | None = None) -> None:
    """x [..., K] against an Int4Weight [N, K]; `out_` [..., N] if given."""
    from .int4 import Int4Weight  # int4 imports nothing from here; keeps checks import-light

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Int4Weight):
        raise TypeError("weight must be an ikport.int4.Int4Weight (ikport.quantize_weight), got "
                        f"{type(weight).__name__}")
    gpu = x.is_cuda if gpu is None else gpu
    if x.dim() < 1 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x's last dim must be the weight's in_features {weight.in_features}, got shape "
                         f"{tuple(x.shape)}")
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


def options(value: object, kind: type | tuple[type, ...]) -> None:
    """`options` is None or a `kind` (DecodeOptions, W4A16Options, PrefillOptions; a tuple: any of
    them)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is not None and not isinstance(value, kinds):
        names = " or ".join(f"ikport.{k.__name__}" for k in kinds)
        raise TypeError(f"options must be an {names} or None, got {type(value).__name__}")
