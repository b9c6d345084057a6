"""`ikport.KVCache`: preallocated decode K/V storage in one of the KV cache formats (ikport.kvquant),
contiguous or paged, with on-device append and attention through the decode kernels' KV loaders.

    cache = ikport.KVCache(batch=8, kv_heads=8, max_len=4096, head_dim=128, dtype=torch.float16,
                           kv_format="int8", device="cuda")           # page_size=16: paged
    cache.append(k_new, v_new)              # [B, Hkv, T, D] at each sequence's length; lens += T
    out = cache.attend(q)                   # q [B, Hq, Tq, D] over rows [0, lens[b])
    cache.nbytes, cache.bytes_per_token     # 4096 x 8 x 8 tokens: 134 MB fp16, 69 MB int8

Everything stays on the device: `append` is a few torch kernels (quantize, scatter, the new
lengths), no host synchronization, so a decode step with it can be captured in a CUDA graph.
`attend` reads the compressed cache once (int8: codes and scales, dequantized in registers),
never a full-precision copy. CPU caches run the reference on the dequantized cache, which is
also the GPU suite's oracle (`reference_attend`).
"""

from __future__ import annotations

import torch

from . import kvquant, reference
from .impl import attention as _impl
from .plan.decode import DecodeOptions


class KVCache:
    """K/V storage for `batch` sequences of up to `max_len` tokens, `kv_heads` x `head_dim` each.

    kv_format: "dense" (K/V in `dtype`) or "int8" (codes + one fp32 scale per token and KV head,
    quantized on append; `dtype` is then the dtype they dequantize to: the queries'). page_size > 0:
    a paged cache of `num_pages` pages (default: enough for every sequence), addressed through
    `block_table` (int32 [batch, ceil(max_len / page_size)]; default: each sequence its own run
    of pages), which a server's page allocator may rewrite between steps.

    Attributes: k, v (the storage: dense [batch, Hkv, max_len, D] or paged [pages, Hkv,
    page_size, D]; int8 codes), k_scale, v_scale (int8: fp32 [batch, Hkv, max_len] / [pages, Hkv,
    page_size]; None for dense), lens (int32 [batch] on the device: each sequence's length),
    block_table (paged) or None.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float16, kv_format: str = "dense", page_size: int = 0,
                 num_pages: int | None = None, block_table: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        if kv_format not in kvquant.KV_FORMATS:
            raise ValueError(f"KVCache: unknown kv_format {kv_format!r}; choose from {kvquant.KV_FORMATS}")
        cpu_dense = torch.device(device if device is not None else "cpu").type == "cpu" and kv_format == "dense"
        if dtype not in (torch.float16, torch.bfloat16) and not (cpu_dense and dtype == torch.float32):
            raise TypeError(f"KVCache: dtype must be torch.float16 or torch.bfloat16 (torch.float32 too for a dense "
                            f"CPU cache: the reference's arithmetic, for tests), got {dtype}")
        if min(batch, kv_heads, max_len, head_dim) < 1 or head_dim % 16 or head_dim > 256:
            raise ValueError("KVCache: batch, kv_heads, max_len >= 1; head_dim a multiple of 16, <= 256")
        if page_size < 0 or page_size & (page_size - 1):
            raise ValueError(f"KVCache: page_size must be 0 (contiguous) or a power of two, got {page_size}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch, self.kv_heads, self.max_len, self.head_dim = batch, kv_heads, max_len, head_dim
        self.dtype, self.kv_format, self.page_size, self.device = dtype, kv_format, page_size, device
        self.block_table: torch.Tensor | None = None
        if page_size:
            per_seq = -(-max_len // page_size)
            num_pages = batch * per_seq if num_pages is None else num_pages
            if block_table is None:
                block_table = torch.arange(batch * per_seq, dtype=torch.int32, device=device).view(batch, per_seq)
                if num_pages < batch * per_seq:
                    raise ValueError(f"KVCache: {num_pages} pages cannot hold the default block table; pass one")
            if block_table.dtype != torch.int32 or tuple(block_table.shape) != (batch, per_seq):
                raise ValueError(f"KVCache: block_table must be int32 [{batch}, {per_seq}]")
            self.block_table = block_table.to(device).contiguous()
            shape = (num_pages, kv_heads, page_size, head_dim)
        elif block_table is not None or num_pages is not None:
            raise ValueError("KVCache: block_table and num_pages are for paged caches (page_size > 0)")
        else:
            shape = (batch, kv_heads, max_len, head_dim)
        store = torch.int8 if kv_format == "int8" else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.k_scale = self.v_scale = None
        if kv_format == "int8":
            self.k_scale = torch.zeros(shape[:3], dtype=kvquant.SCALE_DTYPE, device=device)
            self.v_scale = torch.zeros(shape[:3], dtype=kvquant.SCALE_DTYPE, device=device)
        self.lens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def paged(self) -> bool:
        return self.page_size > 0

    @property
    def capacity(self) -> int:
        """Rows a sequence may hold (max_len, or its block-table row's pages)."""
        return self.block_table.shape[1] * self.page_size if self.paged else self.max_len

    @property
    def nbytes(self) -> int:
        """Device bytes of the K/V storage (codes and scales; not the lengths or block table)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale)
                   if t is not None)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token costs: K and V of every KV head, scales included (head_dim 128, per KV
        head: fp16 2 x 256, int8 2 x 132, 0.516x)."""
        return kvquant.bytes_per_token(self.kv_format, self.kv_heads, self.head_dim, self.dtype)

    def _rows(self, positions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dim-0 index, row index) of the n rows from each sequence's `positions`, [B, n] each."""
        rows = positions.to(torch.long).view(-1, 1) + torch.arange(n, device=self.device)
        if self.paged:
            page = torch.gather(self.block_table.to(torch.long), 1, rows // self.page_size)
            return page, rows % self.page_size
        return torch.arange(self.batch, device=self.device).view(-1, 1).expand_as(rows), rows

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Write k_new, v_new [B, Hkv, T, D] at rows positions[b] .. positions[b] + T - 1 of each
        sequence (default: its length, `lens`), quantizing on the device for int8; then lens =
        positions + T. Device ops only (no host synchronization): rows past the capacity are the
        caller's to avoid, as kv_lens past it are for `ikport.attention`."""
        want = (self.batch, self.kv_heads, self.head_dim)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
                raise ValueError(f"KVCache.append: {name} must be [{self.batch}, {self.kv_heads}, T, "
                                 f"{self.head_dim}], got {getattr(t, 'shape', type(t))}")
            if t.device != self.device:
                raise ValueError(f"KVCache.append: {name} is on {t.device}, the cache on {self.device}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"KVCache.append: k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} differ")
        positions = self.lens if positions is None else positions
        n = k_new.shape[2]
        i0, i2 = self._rows(positions, n)
        for dst, dst_scale, new in ((self.k, self.k_scale, k_new), (self.v, self.v_scale, v_new)):
            if self.kv_format == "int8":
                codes, scales = kvquant.quantize_int8(new)
                dst[i0, :, i2] = codes.permute(0, 2, 1, 3)
                dst_scale[i0, :, i2] = scales.permute(0, 2, 1)
            else:
                dst[i0, :, i2] = new.permute(0, 2, 1, 3).to(self.dtype)
        self.lens.copy_(positions.to(torch.int32) + n)

    def attend(self, q: torch.Tensor, *, causal: bool = False, scale: float | None = None,
               out: torch.Tensor | None = None, options: DecodeOptions | None = None) -> torch.Tensor:
        """Decode attention of q [B, Hq, Tq, D] (the cache's dtype) over each sequence's `lens`
        rows, as `ikport.attention` (causal: query token t sees rows up to lens - Tq + t). Dense
        caches go through `ikport.attention` / `ikport.paged_attention`; int8 through the int8
        KV loader. Eager (not a torch.compile custom op yet)."""
        if self.kv_format == "int8":
            return _impl.int8_attention(q, self.k, self.v, self.k_scale, self.v_scale, self.block_table, self.lens,
                                        causal, scale, out, options)
        if self.paged:
            return _impl.paged_attention(q, self.k, self.v, self.block_table, self.lens, causal, scale, out, options)
        return _impl.attention(q, self.k, self.v, causal, scale, self.lens, out, options)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The storage's K and V in `dtype` (int8: code * scale): for tests and debugging only."""
        if self.kv_format == "int8":
            return (kvquant.dequantize_int8(self.k, self.k_scale, self.dtype),
                    kvquant.dequantize_int8(self.v, self.v_scale, self.dtype))
        return self.k, self.v

    def reference_attend(self, q: torch.Tensor, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
        """The oracle of `attend`: plain PyTorch on the dequantized cache, fp32 math."""
        k, v = self.dequantized()
        if self.paged:
            return reference.paged_attention(q, k, v, self.block_table, self.lens, causal=causal, scale=scale)
        return reference.attention(q, k, v, causal=causal, scale=scale, kv_lens=self.lens)

    def __repr__(self) -> str:
        layout = f"paged {self.page_size}" if self.paged else "contiguous"
        return (f"KVCache({self.kv_format}, {layout}, batch={self.batch}, kv_heads={self.kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}, dtype={self.dtype}, nbytes={self.nbytes})")
