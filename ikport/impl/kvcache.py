"""The GPU path of `ikport.KVCache.append`: one launch of kernels_src/kv_append.cuh writes the new
rows of every sequence and KV head in the cache's format (the codes and pairs ikport.kvquant's
torch functions give, which stay the CPU path and the oracle) and sets the lengths. No host
synchronization: a decode step's append can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import dispatch, manifest
from ..kernels import Kernel, KvAppendParams, get_kernel
from ..launch import raw_stream
from ..plan import kv_append as append_plan
from ..plan.decode import loader_name

KVCache = Any  # an ikport.KVCache (the API layer above: not imported here)

_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def kv_format(cache: KVCache) -> str:
    """The manifest's kv_format value of a cache."""
    return loader_name(cache.kv_format, cache.kivi_group)


def grid_blocks(cache: KVCache, new_tokens: int, warp_size: int) -> int:
    """The launch's blocks for `new_tokens` rows a sequence into `cache` (ikport.plan.kv_append)."""
    return append_plan.grid_blocks(batch=cache.batch, kv_heads=cache.kv_heads, new_tokens=new_tokens,
                                   head_dim=cache.head_dim, kivi=cache.kv_format == "kivi4", warp_size=warp_size)


def _words(strides: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a tensor of (scale, zero) pairs in 4-byte words (two elements each)."""
    return tuple(s // 2 for s in strides)


def params(cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor,
           rewrite: bool) -> KvAppendParams:
    """The kernel's argument for this append (k_new, v_new in the cache dtype with even strides,
    positions int32 [B]): the library's and the emulator tests' one construction."""
    fmt = cache.kv_format

    def ptr(t: torch.Tensor | None) -> int:
        return t.data_ptr() if t is not None else 0

    return KvAppendParams(
        k_new.data_ptr(), v_new.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), ptr(cache.k_scale),
        ptr(cache.v_scale), ptr(cache.k_resid), ptr(cache.block_table), positions.data_ptr(),
        cache.lens.data_ptr(), cache._append_counter.data_ptr(),
        *k_new.stride()[:3], *v_new.stride()[:3], *cache.k.stride()[:3],
        *((cache.k_scale.stride()[:3] if fmt == "int8" else _words(cache.v_scale.stride()[:3]))
          if fmt != "dense" else (0, 0, 0)),
        *(_words(cache.k_scale.stride()[:3]) if fmt == "kivi4" else (0, 0, 0)),
        *(cache.k_resid.stride()[:3] if fmt == "kivi4" else (0, 0, 0)),
        cache.block_table.stride(0) if cache.paged else 0,
        cache.batch, cache.kv_heads, k_new.shape[2], cache.capacity,
        cache.page_size.bit_length() - 1 if cache.paged else 0,
        cache.k_scale.shape[2] if fmt == "kivi4" else 0, int(rewrite),
    )


def _kernel_ready(t: torch.Tensor) -> bool:
    """Whether the kernel reads `t` as it is: the last dim contiguous, pairs of elements 4-byte
    aligned (even strides, an aligned start)."""
    return t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:3]) and t.data_ptr() % 4 == 0


def _kernel_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` in a fresh contiguous tensor (an aligned start, whatever t's offset)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def available(cache: KVCache) -> bool:
    """Whether the cache's device has a kernel backend (else KVCache.append runs its torch ops)."""
    return dispatch.backend_for(cache.device) is not None


_kernels: dict[tuple, tuple[Kernel, int]] = {}  # (backend, device, cache layout) -> (kernel, warp size)


class _AppendCall:
    """One append layout's launch (the cache, T, the new rows' and the block table's strides): the
    parameter struct built once, the launcher with its grid bound; a call copies the struct and
    fills in every pointer (the new rows, positions, and the cache's tensors, which a caller may
    replace by others of the same layout: a block table of the same shape, for one)."""

    def __init__(self, kernel: Kernel, warp_size: int, device: int, cache: KVCache, k_new: torch.Tensor,
                 v_new: torch.Tensor, positions: torch.Tensor, rewrite: bool) -> None:
        self.template = params(cache, k_new, v_new, positions, rewrite)
        grid = (grid_blocks(cache, k_new.shape[2], warp_size), 1, 1)
        self.launch = kernel.bind(grid, (append_plan.block_threads(cache.head_dim), 1, 1), 0)
        self.device = device

    def __call__(self, cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        p = KvAppendParams.from_buffer_copy(self.template)
        p.k_new, p.v_new, p.positions, p.lens = k_new.data_ptr(), v_new.data_ptr(), positions.data_ptr(), \
            cache.lens.data_ptr()
        p.k, p.v = cache.k.data_ptr(), cache.v.data_ptr()
        if cache.k_scale is not None:
            p.k_scale, p.v_scale = cache.k_scale.data_ptr(), cache.v_scale.data_ptr()
        if cache.k_resid is not None:
            p.k_resid = cache.k_resid.data_ptr()
        if cache.block_table is not None:
            p.block_table = cache.block_table.data_ptr()
        self.launch(p, raw_stream(self.device))


def append(cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor | None) -> None:
    """KVCache.append on a GPU, its arguments checked: one kernel launch (prepared once per layout)."""
    k_new, v_new = (t if t.dtype == cache.dtype and _kernel_ready(t) else _kernel_copy(t, cache.dtype)
                    for t in (k_new, v_new))
    rewrite = positions is not None
    if positions is None:
        positions = cache.lens
    elif positions.dtype != torch.int32 or not positions.is_contiguous():
        positions = positions.to(torch.int32).contiguous()
    table = cache.block_table
    layout = (k_new.shape[2], k_new.stride(), v_new.stride(), rewrite,
              None if table is None else (table.shape, table.stride(), table.dtype, table.device))
    call = cache._append_calls.get(layout)
    if call is None:  # (a new layout: the table checked once, as the dense paged path does)
        if table is not None and (table.dtype != torch.int32 or table.dim() != 2 or table.device != cache.device):
            raise ValueError(f"KVCache.append: block_table must be int32 [batch, pages] on {cache.device}, got "
                             f"{table.dtype} {list(table.shape)} on {table.device}")
        backend = dispatch.backend_for(cache.device)
        dev = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        key = (backend.name, dev, cache.dtype, cache.head_dim, kv_format(cache), cache.paged)
        found = _kernels.get(key)
        if found is None:
            spec = manifest.spec("kv_append", "append", dtype=_DTYPE_NAME[cache.dtype], head_dim=cache.head_dim,
                                 kv_format=kv_format(cache), paged=cache.paged)
            found = _kernels[key] = (get_kernel(spec, backend, dev), backend.device_info(dev).warp_size)
        if len(cache._append_calls) > 64:  # (chunk lengths vary: keep the decode step's and a few)
            cache._append_calls.clear()
        call = cache._append_calls[layout] = _AppendCall(*found, dev, cache, k_new, v_new, positions, rewrite)
    call(cache, k_new, v_new, positions)
