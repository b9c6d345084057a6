"""`ikport.KVCache`: preallocated decode K/V storage in one of the KV cache formats (ikport.kvquant),
contiguous or paged, with on-device append and attention through the decode kernels' KV loaders.

    cache = ikport.KVCache(batch=8, kv_heads=8, max_len=4096, head_dim=128, dtype=torch.float16,
                           kv_format="int8", device="cuda")           # page_size=16: paged
    cache.append(k_new, v_new)              # [B, Hkv, T, D] at each sequence's length; lens += T
    out = cache.attend(q)                   # q [B, Hq, Tq, D] over rows [0, lens[b])
    out = cache.attend(q_chunk, causal=True)  # a 512-token chunk (appended first) over its prefix
    cache.nbytes, cache.bytes_per_token     # 4096 x 8 x 8 tokens: 134 MB fp16, 69 MB int8

    cache = ikport.KVCache(..., kv_format="kivi4", kivi_group=128)    # KIVI INT4: 37.7 MB at D1, 0.281x

Everything stays on the device: on a GPU `append` is one kernel (kernels_src/kv_append.cuh: the
rows quantized, written and the lengths set), on the CPU a few torch ops (the kernel's oracle); no
host synchronization, so a decode step with it can be captured in a CUDA graph.
KIVI's K (per channel over groups of G tokens) keeps each sequence's newest len % G tokens in a
full-precision residual; an append quantizes every group it completes (the residual's rows and
the new ones) and writes the new partial group's rows to the residual (the torch ops without a
data-dependent branch: they quantize the whole span of groups the new tokens touch and write only
the groups that completed; the kernel walks the span's groups in order).
`attend` reads the compressed cache once (codes and scales or pairs, dequantized in registers or
shared memory), never a full-precision copy: decode through the decode kernels, a prefill chunk
(Tq > 128) through the prefill kernel. CPU caches run the reference on the dequantized cache, which is
also the GPU suite's oracle (`reference_attend`).
"""

from __future__ import annotations

import warnings

import torch

from . import kvquant, reference
from .checks import describe
from .impl import attention as _impl
from .impl import kvcache as _append_impl
from .plan.decode import DecodeOptions
from .plan.prefill import PrefillOptions


class KVCache:
    """K/V storage for `batch` sequences of up to `max_len` tokens, `kv_heads` x `head_dim` each.

    kv_format: "dense" (K/V in `dtype`), "int8" (codes + one fp32 scale per token and KV head,
    quantized on append; `dtype` is then the dtype they dequantize to: the queries') or "kivi4"
    (ikport.kvquant: 4-bit codes; K per channel over groups of `kivi_group` tokens, 32, 64 or 128,
    with a full-precision residual of the newest < G tokens; V per token). page_size > 0:
    a paged cache of `num_pages` pages (default: enough for every sequence), addressed through
    `block_table` (int32 [batch, ceil(max_len / page_size)]; default: each sequence its own run
    of pages), which a server's page allocator may rewrite between steps.

    Attributes: k, v (the storage: dense [batch, Hkv, max_len, D] or paged [pages, Hkv,
    page_size, D]; int8 codes; kivi4 uint8 codes [..., D / 2]), k_scale, v_scale (int8: fp32
    [batch, Hkv, max_len] / [pages, Hkv, page_size]; kivi4: (scale, zero) pairs in `dtype`, K's
    [batch, Hkv, ceil(capacity / G), D, 2] per sequence even when paged, V's [..., L or page_size, 2]
    beside V's rows; None for dense), k_resid (kivi4: K's residual [batch, Hkv, G, D] in `dtype`,
    token t at row t % G; else None), lens (int32 [batch] on the device: each sequence's length),
    block_table (paged) or None.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float16, kv_format: str = "dense", page_size: int = 0,
                 num_pages: int | None = None, block_table: torch.Tensor | None = None,
                 device: torch.device | str | None = None, kivi_group: int | None = None) -> None:
        if kv_format not in kvquant.KV_FORMATS:
            raise ValueError(f"KVCache: unknown kv_format {kv_format!r}; choose from {kvquant.KV_FORMATS}")
        if kv_format != "kivi4" and kivi_group is not None:
            raise ValueError(f"KVCache: kivi_group is for kv_format='kivi4', not {kv_format!r}")
        kivi_group = 128 if kivi_group is None and kv_format == "kivi4" else kivi_group
        if kv_format == "kivi4" and (isinstance(kivi_group, bool) or kivi_group not in kvquant.KIVI_GROUPS):
            raise ValueError(f"KVCache: kivi_group must be one of {kvquant.KIVI_GROUPS}, got {kivi_group!r}")
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
        self.kivi_group = kivi_group or 0
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
        store = {"int8": torch.int8, "kivi4": torch.uint8}.get(kv_format, dtype)
        if kv_format == "kivi4":
            shape = (*shape[:3], head_dim // 2)  # two codes a byte
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.k_scale = self.v_scale = self.k_resid = None
        if kv_format == "int8":
            self.k_scale = torch.zeros(shape[:3], dtype=kvquant.SCALE_DTYPE, device=device)
            self.v_scale = torch.zeros(shape[:3], dtype=kvquant.SCALE_DTYPE, device=device)
        elif kv_format == "kivi4":
            groups = -(-self.capacity // kivi_group)
            self.k_scale = torch.zeros((batch, kv_heads, groups, head_dim, 2), dtype=dtype, device=device)
            self.v_scale = torch.zeros((*shape[:3], 2), dtype=dtype, device=device)
            self.k_resid = torch.zeros((batch, kv_heads, kivi_group, head_dim), dtype=dtype, device=device)
        self.lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self._append_counter = torch.zeros(1, dtype=torch.int32, device=device)  # the append kernel's, zero at rest
        self._append_calls: dict = {}  # the GPU append's prepared launches (ikport.impl.kvcache)
        self.device = self.k.device  # "cuda" resolved to the current card ("cuda:0"), as tensors report it

    @property
    def paged(self) -> bool:
        return self.page_size > 0

    @property
    def capacity(self) -> int:
        """Rows a sequence may hold (max_len, or its block-table row's pages)."""
        return self.block_table.shape[1] * self.page_size if self.paged else self.max_len

    @property
    def nbytes(self) -> int:
        """Device bytes of the K/V storage (codes, scales, KIVI's residual; not the lengths or block
        table)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale, self.k_resid)
                   if t is not None)

    @property
    def bytes_per_token(self) -> float:
        """Bytes one token costs: K and V of every KV head, scales included (head_dim 128, per KV
        head: fp16 2 x 256, int8 2 x 132, 0.516x; kivi4 at G 128: 2 x 64 codes + V's pair 4 + K's
        pairs 512 / 128 = 136, 0.266x, plus the residual, G rows a sequence, in nbytes)."""
        return kvquant.bytes_per_token(self.kv_format, self.kv_heads, self.head_dim, self.dtype,
                                       self.kivi_group or 128)

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
        if positions is not None and (not isinstance(positions, torch.Tensor) or positions.shape != (self.batch,)
                                      or positions.dtype.is_floating_point or positions.dtype == torch.bool
                                      or positions.device != self.device):
            raise ValueError(f"KVCache.append: positions must be an integer tensor [{self.batch}] on {self.device}, "
                             f"got {describe(positions)}")
        if _append_impl.available(self):
            _append_impl.append(self, k_new, v_new, positions)
            return
        self._append_torch(k_new, v_new, positions)

    def _append_torch(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor | None) -> None:
        """`append` in torch ops: the CPU path, and the oracle of the GPU's append kernel
        (kernels_src/kv_append.cuh), which writes the same codes and pairs."""
        rewrite = positions is not None  # may land inside a group already quantized (kivi4)
        positions = self.lens if positions is None else positions
        n = k_new.shape[2]
        i0, i2 = self._rows(positions, n)
        if self.kv_format == "kivi4":
            if n:
                self._append_kivi_k(k_new.to(self.dtype), positions.to(torch.long), rewrite)
                codes, pairs = kvquant.quantize_int4_tokens(v_new.to(self.dtype))
                self.v[i0, :, i2] = codes.permute(0, 2, 1, 3)
                self.v_scale[i0, :, i2] = pairs.permute(0, 2, 1, 3)
            self.lens.copy_(positions.to(torch.int32) + n)
            return
        for dst, dst_scale, new in ((self.k, self.k_scale, k_new), (self.v, self.v_scale, v_new)):
            if self.kv_format == "int8":  # (in the cache dtype first, as the GPU's kernel reads it)
                codes, scales = kvquant.quantize_int8(new.to(self.dtype))
                dst[i0, :, i2] = codes.permute(0, 2, 1, 3)
                dst_scale[i0, :, i2] = scales.permute(0, 2, 1)
            else:
                dst[i0, :, i2] = new.permute(0, 2, 1, 3).to(self.dtype)
        self.lens.copy_(positions.to(torch.int32) + n)

    def _code_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Flat row indices [B, Hkv, n] into self.k.view(-1, D / 2) of each sequence's `rows` [B, n]
        (paged: through the block table, page ids clamped into the pool: rows past a sequence's
        pages are never written with anything but their own values, see _append_kivi_k)."""
        heads = torch.arange(self.kv_heads, device=self.device).view(1, -1, 1)
        rows = rows.clamp(0, self.capacity - 1)
        if self.paged:
            page = torch.gather(self.block_table.to(torch.long), 1, rows // self.page_size)
            page = page.clamp(0, self.k.shape[0] - 1)
            return (page.unsqueeze(1) * self.kv_heads + heads) * self.page_size + (rows % self.page_size).unsqueeze(1)
        seq = torch.arange(self.batch, device=self.device).view(-1, 1, 1)
        return (seq * self.kv_heads + heads) * self.max_len + rows.unsqueeze(1)

    def _append_kivi_k(self, k_new: torch.Tensor, pos: torch.Tensor, rewrite: bool) -> None:
        """K's part of a kivi4 append of k_new [B, Hkv, T, D] at rows pos[b]...: the span of groups
        from pos's group g0 that the new rows touch (a static count for T), assembled from the
        group's earlier rows (the residual; where `rewrite` lands inside a group already folded,
        its dequantized codes) and the new rows, quantized per group; the groups that complete
        go to the code store, the last partial one to the residual. Device ops only."""
        B, H, T, D = k_new.shape
        G, dev = self.kivi_group, self.device
        n_g = -(-(G - 1 + T) // G)  # groups a span of at most G - 1 earlier rows + T new ones touches
        g0 = pos // G
        j = torch.arange(n_g * G, device=dev)
        t = g0.view(-1, 1) * G + j  # [B, S] the span's rows
        newer = (t - pos.view(-1, 1)).clamp(0, T - 1)
        span = torch.gather(k_new, 2, newer.view(B, 1, -1, 1).expand(B, H, -1, D))
        earlier = self.k_resid  # rows g0 * G .. pos - 1, at row % G
        if rewrite:  # the group may be folded already: its earlier rows from its codes
            folded = (g0 + 1) * G <= self.lens.to(torch.long)
            rows = self._code_rows(g0.view(-1, 1) * G + j[:G])
            codes = self.k.view(-1, D // 2)[rows.flatten()].view(B, H, G, D // 2)
            gi = g0.clamp(max=self.k_scale.shape[2] - 1).view(-1, 1, 1, 1, 1).expand(B, H, 1, D, 2)
            pairs = torch.gather(self.k_scale, 2, gi)
            deq = kvquant.dequantize_kivi_k(codes, pairs, G, self.dtype)
            earlier = torch.where(folded.view(-1, 1, 1, 1), deq, earlier)
        before = (t < pos.view(-1, 1)).view(B, 1, -1, 1)
        span = torch.where(before, earlier[:, :, j % G], span)
        codes, pairs = kvquant.quantize_int4_channels(span, G)  # [B, H, S, D/2], [B, H, n_g, D, 2]
        # Completed groups (below the new length and inside the code store) into the store: two
        # reductions, min with 0 / the dtype's +inf, then max with the values / the minimum, write
        # exactly those rows and leave the others as they are, whatever (in-bounds) row they name.
        end = pos + T
        g = g0.view(-1, 1) + torch.arange(n_g, device=dev)  # [B, n_g]
        done = (g < torch.clamp(end // G, max=self.capacity // G).view(-1, 1)).view(B, 1, n_g, 1)
        row_idx = self._code_rows(t).view(B, H, n_g, G)
        self._write_where(self.k.view(-1, D // 2), row_idx, codes.view(B, H, n_g, G, D // 2),
                          done.unsqueeze(-1))
        seqs = torch.arange(B, device=dev).view(-1, 1, 1)
        heads = torch.arange(H, device=dev).view(1, -1, 1)
        ngroups = self.k_scale.shape[2]
        pair_idx = (seqs * H + heads) * ngroups + g.clamp(max=ngroups - 1).view(B, 1, n_g)
        self._write_where(self.k_scale.view(-1, D * 2), pair_idx, pairs.view(B, H, n_g, D * 2), done)
        # The new partial group's rows (end % G of them) into the residual.
        last = (end // G - g0).clamp(max=n_g - 1).view(-1, 1, 1, 1, 1).expand(B, H, 1, G, D)
        tail = torch.gather(span.view(B, H, n_g, G, D), 2, last).squeeze(2)
        keep = (torch.arange(G, device=dev).view(1, -1) >= (end % G).view(-1, 1)).view(B, 1, G, 1)
        self.k_resid.copy_(torch.where(keep, self.k_resid, tail))

    @staticmethod
    def _write_where(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, write: torch.Tensor) -> None:
        """dst[idx] = src where `write` (broadcast over src), else dst unchanged: by index_reduce_
        min then max with neutral values (the indices need not be distinct, only in bounds)."""
        info = torch.finfo(dst.dtype) if dst.dtype.is_floating_point else torch.iinfo(dst.dtype)
        low, high = (float("-inf"), float("inf")) if dst.dtype.is_floating_point else (info.min, info.max)
        # (fills, not torch.tensor: no host-to-device copy, which a CUDA-graph capture refuses)
        lo = torch.full((), low, dtype=dst.dtype, device=dst.device)
        hi = torch.full((), high, dtype=dst.dtype, device=dst.device)
        flat = idx.reshape(-1)
        width = dst.shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "index_reduce() is in beta"
            dst.index_reduce_(0, flat, torch.where(write, lo, hi).expand(src.shape).reshape(-1, width), "amin")
            dst.index_reduce_(0, flat, torch.where(write, src, lo).reshape(-1, width), "amax")

    def attend(self, q: torch.Tensor, *, causal: bool = False, scale: float | None = None,
               out: torch.Tensor | None = None, options: DecodeOptions | PrefillOptions | None = None) -> torch.Tensor:
        """Attention of q [B, Hq, Tq, D] (the cache's dtype) over each sequence's `lens` rows, as
        `ikport.attention` (causal: query token t sees rows up to lens - Tq + t, aligned
        bottom-right). Decode-sized queries (Tq <= 128) run the decode kernels; a prefill chunk
        (Tq > 128, or PrefillOptions), whose own K/V were appended first, the prefill kernel, which
        attends to the cached prefix and causally to the chunk itself. Dense caches go through
        `ikport.attention` / `ikport.paged_attention`; int8 and kivi4 through their KV loaders
        (the compressed bytes read once, dequantized on chip; no fp16 copy of the cache). Eager
        (not a torch.compile custom op yet)."""
        if self.kv_format == "kivi4":
            return _impl.kivi_attention(q, self.k, self.v, self.k_scale, self.v_scale, self.k_resid, self.kivi_group,
                                        self.block_table, self.lens, causal, scale, out, options)
        if self.kv_format == "int8":
            return _impl.int8_attention(q, self.k, self.v, self.k_scale, self.v_scale, self.block_table, self.lens,
                                        causal, scale, out, options)
        if self.paged:
            return _impl.paged_attention(q, self.k, self.v, self.block_table, self.lens, causal, scale, out, options)
        return _impl.attention(q, self.k, self.v, causal, scale, self.lens, out, options)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The storage's K and V in `dtype` (int8: code * scale; kivi4: as the kernels read them, K's
        rows past a sequence's quantized length from the residual; paged: in the pages the block
        table names, other pages zero): for tests and debugging only."""
        if self.kv_format == "kivi4":
            k, v = reference.kivi_kv(self.k, self.v, self.k_scale, self.v_scale, self.k_resid, self.lens,
                                     self.kivi_group, self.dtype, self.block_table)
            if not self.paged:
                return k, v
            pages = []
            for dense in (k, v):  # back into the pages of the block table
                out = torch.zeros((*self.k.shape[:3], self.head_dim), dtype=self.dtype, device=self.device)
                blocks = dense.view(self.batch, self.kv_heads, -1, self.page_size, self.head_dim).transpose(1, 2)
                out[self.block_table.to(torch.long).clamp(0, out.shape[0] - 1)] = blocks
                pages.append(out)
            return pages[0], pages[1]
        if self.kv_format == "int8":
            return (kvquant.dequantize_int8(self.k, self.k_scale, self.dtype),
                    kvquant.dequantize_int8(self.v, self.v_scale, self.dtype))
        return self.k, self.v

    def reference_attend(self, q: torch.Tensor, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
        """The oracle of `attend`: plain PyTorch on the dequantized cache, fp32 math."""
        if self.kv_format == "kivi4":
            k, v = reference.kivi_kv(self.k, self.v, self.k_scale, self.v_scale, self.k_resid, self.lens,
                                     self.kivi_group, self.dtype, self.block_table)
            return reference.attention(q, k, v, causal=causal, scale=scale, kv_lens=self.lens)
        k, v = self.dequantized()
        if self.paged:
            return reference.paged_attention(q, k, v, self.block_table, self.lens, causal=causal, scale=scale)
        return reference.attention(q, k, v, causal=causal, scale=scale, kv_lens=self.lens)

    def __repr__(self) -> str:
        layout = f"paged {self.page_size}" if self.paged else "contiguous"
        fmt = f"kivi4 G {self.kivi_group}" if self.kv_format == "kivi4" else self.kv_format
        return (f"KVCache({fmt}, {layout}, batch={self.batch}, kv_heads={self.kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}, dtype={self.dtype}, nbytes={self.nbytes})")
