"""The prefill kernel's own source (kernels_src/attention/prefill.cuh), executed on the CPU by the
block emulator (tests/emu/block_emu.hpp, see test_decode_emulation.py), checked against an fp64
oracle: causal (bottom-right) and not, chunked (fewer queries than keys), ragged q_lens/kv_lens,
packed varlen sequences (one empty), rows that see no key, paged caches with garbage past the end
of each table row, strided queries and the log-sum-exp output. Each configuration is one build:
a warp size, a matrix layout (NVIDIA's mma.sync fragments, CDNA's MFMA on 64-lane waves, RDNA3's
WMMA with P through shared memory), async copies or not, and the kernel's tiles.

Compressed caches (loader int8 / kivi4_g<G>: an ikport.KVCache's codes read by the kernel and
dequantized in shared memory): a chunk of Tq > 128 new tokens, appended to the cache first as a
server does, attending causally to itself and to a cached prefix, ragged lengths that are not
multiples of the tile or the KIVI group, GQA 4, contiguous and paged, against
reference.int8_attention / reference.kivi_attention on the same cache (test_emulated_chunk_over_a_
compressed_prefix).

What this does not cover: timing and the vendor intrinsics themselves (the GPU suite,
tests/test_prefill_gpu.py, does).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import pytest
import torch

import ikport
from ikport import manifest, reference
from ikport.attention import paged_kv_from_dense
from ikport.kernels import PrefillParams
from ikport.plan import prefill as prefill_plan

import emulation

KERNELS = sorted((emulation.KERNELS / "attention").glob("*.cuh"))
pytestmark = pytest.mark.skipif(emulation.CLANG is None, reason="the emulated matrix units need host clang++")

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # max abs error against fp64, as decode's
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CUDA = dict(wave=32, mask="unsigned int", async_copy=1, mma="nv")
CDNA = dict(wave=64, mask="unsigned long long", async_copy=0, mma="mfma")
RDNA3 = dict(CDNA, wave=32, mma="wmma")
MATRIX_LAYOUT = {"mfma": "IK_MMA_AMD_MFMA_16X16X16", "wmma": "IK_MMA_AMD_WMMA_W32", "nv": "IK_MMA_EMULATED_NV"}
# name: target facts, then the kernel's template values
CONFIGS = {
    # the planner's AMD tiles and the tiles every target builds (manifest instantiations)
    "nv-d64-m64-n32-w4-st2-fp16": dict(CUDA, dtype="fp16", head_dim=64, tile_m=64, tile_n=32, warps=4, stages=2, pad=1),
    "cdna-d128-m64-n32-w4-st2-bf16": dict(CDNA, dtype="bf16", head_dim=128, tile_m=64, tile_n=32, warps=4, stages=2,
                                          pad=1),
    "rdna3-d64-m64-n32-w4-st2-fp16": dict(RDNA3, dtype="fp16", head_dim=64, tile_m=64, tile_n=32, warps=4, stages=2,
                                          pad=1),
    "rdna3-d128-m64-n16-w4-st2-bf16": dict(RDNA3, dtype="bf16", head_dim=128, tile_m=64, tile_n=16, warps=4, stages=2,
                                           pad=1),
    # two 16-row tiles a warp (Q reloaded from shared memory), 64-key tiles (paged: a row's page
    # id through shared memory, kSharedPageIds), a 2-slot ring (the H100's default) and a 3-slot one
    "nv-d128-m128-n64-w4-st2-fp16": dict(CUDA, dtype="fp16", head_dim=128, tile_m=128, tile_n=64, warps=4, stages=2,
                                         pad=1),
    "nv-d128-m128-n64-w4-st3-bf16": dict(CUDA, dtype="bf16", head_dim=128, tile_m=128, tile_n=64, warps=4, stages=3,
                                         pad=1),
    # the journey's unpipelined, unpadded step at an odd head_dim, and head_dim 256
    "nv-d80-m32-n16-w2-st1-fp16": dict(CUDA, dtype="fp16", head_dim=80, tile_m=32, tile_n=16, warps=2, stages=1, pad=0),
    "cdna-d256-m32-n16-w2-st2-fp16": dict(CDNA, dtype="fp16", head_dim=256, tile_m=32, tile_n=16, warps=2, stages=2,
                                          pad=1),
    "rdna3-async-d96-m64-n32-w2-st3-bf16": dict(RDNA3, async_copy=1, dtype="bf16", head_dim=96, tile_m=64, tile_n=32,
                                                warps=2, stages=3, pad=1),
    # compressed caches (`loader`): 32-lane waves with cp.async (NVIDIA's layout) and 64-lane waves
    # with synchronous copies (CDNA), INT8 and KIVI with groups of 32 (tiles of a whole group) and
    # 128 (four tiles a group; a 1-slot ring)
    "nv-d128-m64-n32-w4-st2-fp16-int8": dict(CUDA, dtype="fp16", head_dim=128, tile_m=64, tile_n=32, warps=4,
                                             stages=2, pad=1, loader="int8"),
    "cdna-d64-m32-n16-w2-st2-bf16-int8": dict(CDNA, dtype="bf16", head_dim=64, tile_m=32, tile_n=16, warps=2,
                                              stages=2, pad=1, loader="int8"),
    "nv-d64-m64-n32-w4-st3-bf16-kivi32": dict(CUDA, dtype="bf16", head_dim=64, tile_m=64, tile_n=32, warps=4,
                                              stages=3, pad=1, loader="kivi4_g32"),
    "cdna-d128-m32-n32-w2-st1-fp16-kivi128": dict(CDNA, dtype="fp16", head_dim=128, tile_m=32, tile_n=32, warps=2,
                                                  stages=1, pad=1, loader="kivi4_g128"),
}
COMPRESSED = [c for c in CONFIGS if "loader" in CONFIGS[c]]


def defines(c: dict) -> dict:
    """The -D values of a build of prefill_main.cpp for configuration `c` (a CONFIGS value; also
    tools/emulated_accuracy.py's)."""
    return {
        "IK_WARP_SIZE": c["wave"], "EMU_LANE_MASK_T": c["mask"], "EMU_ASYNC_COPY": c["async_copy"],
        "EMU_CLUSTERS": 0, "EMU_T": manifest.cpp_name("attention_prefill", "dtype", c["dtype"]),
        "EMU_HEAD_DIM": c["head_dim"], "EMU_TILE_M": c["tile_m"], "EMU_TILE_N": c["tile_n"],
        "EMU_WARPS": c["warps"], "EMU_STAGES": c["stages"], "EMU_PAD": c["pad"], MATRIX_LAYOUT[c["mma"]]: 1,
        "EMU_LOADER": manifest.cpp_name("attention_prefill", "loader", c.get("loader", "dense")),
    }


def build_args(name: str, tmp: Path) -> tuple:
    return KERNELS, "prefill_main.cpp", defines(CONFIGS[name]), tmp / f"{name}.so", emulation.CLANG


@pytest.fixture(scope="module")
def libs(request, tmp_path_factory):
    """lib(config): this run's configurations, built together up front, loaded on first use."""
    used = sorted(emulation.selected_params(request, "config"))
    tmp = tmp_path_factory.mktemp("prefill-emu")
    paths = dict(zip(used, emulation.compile_libraries([build_args(c, tmp) for c in used])))
    loaded: dict[str, ctypes.CDLL] = {}

    def get(name: str) -> ctypes.CDLL:
        if name not in loaded:
            lib = ctypes.CDLL(str(paths[name]))
            lib.emu_prefill.restype = ctypes.c_char_p
            lib.emu_prefill.argtypes = [ctypes.POINTER(PrefillParams), ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong]
            loaded[name] = lib
        return loaded[name]
    return get


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """fp64 attention of one sequence, q [Hq, Tq, D], k/v [Hkv, L, D]: (out, natural-log lse);
    bottom-right causal; rows that see no key give 0 and -inf."""
    Hq, Tq, _ = q.shape
    Hkv, L, _ = k.shape
    g = Hq // Hkv
    kk, vv = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)
    s = q.double() @ kk.transpose(1, 2) * scale
    if causal:
        visible = torch.arange(L)[None, :] <= torch.arange(Tq)[:, None] + (L - Tq)
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return p @ vv, lse


def run_prefill(lib, name: str, *, B: int, Hq: int, Hkv: int, Tq: int, L: int, causal: bool = True,
                q_lens: list[int] | None = None, kv_lens: list[int] | None = None, varlen: bool = False,
                page: int = 0, strided: bool = False, longest_first: bool = True, seed: int = 0):
    """(kernel output, oracle output, kernel lse, oracle lse) over the valid rows of every sequence,
    flattened as [rows, Hq, D] / [Hq, rows]; fresh random inputs, output and lse poisoned."""
    c = CONFIGS[name]
    dtype, D = DTYPES[c["dtype"]], c["head_dim"]
    g = torch.Generator().manual_seed(seed)
    ql = q_lens if q_lens is not None else [Tq] * B
    kl = kv_lens if kv_lens is not None else [L] * B
    scale = D ** -0.5
    p = PrefillParams()
    if varlen:  # packed [total, H, D] with cumulative offsets
        q = torch.randn(sum(ql), Hq, D, generator=g).to(dtype)
        k = torch.randn(sum(kl), Hkv, D, generator=g).to(dtype)
        v = torch.randn(sum(kl), Hkv, D, generator=g).to(dtype)
        cu_q = torch.tensor([0, *torch.tensor(ql).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(kl).cumsum(0).tolist()], dtype=torch.int32)
        out = torch.full_like(q, float("nan"))
        lse = torch.full((Hq, q.shape[0]), float("nan"))
        p.cu_q, p.cu_k = cu_q.data_ptr(), cu_k.data_ptr()
        p.q_sb, p.q_sh, p.q_st = 0, q.stride(1), q.stride(0)
        p.k_sb, p.k_sh, p.k_st = 0, k.stride(1), k.stride(0)
        p.v_sb, p.v_sh, p.v_st = 0, v.stride(1), v.stride(0)
        p.o_sb, p.o_sh, p.o_st = 0, out.stride(1), out.stride(0)
        p.lse_sb, p.lse_sh = 0, lse.stride(0)
        seqs = [(q[cu_q[b]:cu_q[b + 1]].transpose(0, 1), k[cu_k[b]:cu_k[b + 1]].transpose(0, 1),
                 v[cu_k[b]:cu_k[b + 1]].transpose(0, 1)) for b in range(B)]
        got = [(out[cu_q[b]:cu_q[b + 1]], lse[:, cu_q[b]:cu_q[b + 1]]) for b in range(B)]
        q_cap, kv_cap = max(ql), max(kl)
    else:
        if strided:  # a [B, T, H, D] tensor read as [B, H, T, D]
            q = torch.randn(B, Tq, Hq, D, generator=g).to(dtype).transpose(1, 2)
        else:
            q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
        out = torch.full((B, Hq, Tq, D), float("nan"), dtype=dtype)
        lse = torch.full((B, Hq, Tq), float("nan"))
        seqs = [(q[b, :, :ql[b]], k[b, :, :kl[b]], v[b, :, :kl[b]]) for b in range(B)]
        got = [(out[b, :, :ql[b]].transpose(0, 1), lse[b, :, :ql[b]]) for b in range(B)]
        lens = torch.tensor([ql, kl], dtype=torch.int32)  # (alive until the launch returns)
        if q_lens is not None:
            p.q_lens = lens[0].data_ptr()
        p.kv_lens = lens[1].data_ptr()
        if page:
            k, v, table = paged_kv_from_dense(k.contiguous(), v.contiguous(), page, generator=g)
            for b, n in enumerate(kl):  # entries past kv_len may hold anything
                table[b, -(-n // page):] = -1 if b % 2 else 2**31 - 1
            p.block_table, p.bt_sb, p.page_size_log2 = table.data_ptr(), table.stride(0), page.bit_length() - 1
            L = table.shape[1] * page
        p.q_sb, p.q_sh, p.q_st = q.stride()[:3]
        p.k_sb, p.k_sh, p.k_st = k.stride()[:3]
        p.v_sb, p.v_sh, p.v_st = v.stride()[:3]
        p.o_sb, p.o_sh, p.o_st = out.stride()[:3]
        p.lse_sb, p.lse_sh = lse.stride()[:2]
        q_cap, kv_cap = Tq, L
    p.q, p.k, p.v, p.out, p.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr()
    p.batch, p.num_q_heads, p.num_kv_heads = B, Hq, Hkv
    p.q_capacity, p.kv_capacity, p.causal, p.longest_first = q_cap, kv_cap, int(causal), int(longest_first)
    p.scale_log2 = scale * math.log2(math.e)
    q_tiles = -(-q_cap // c["tile_m"])
    err = lib.emu_prefill(ctypes.byref(p), int(bool(page)), q_tiles, seed)
    assert err is None, err.decode()
    if not varlen:  # the padding rows q_len .. Tq - 1: zeros, lse -inf
        for b, n in enumerate(ql):
            assert not out[b, :, n:].isnan().any() and not out[b, :, n:].any(), f"padding rows of sequence {b}"
            assert lse[b, :, n:].isneginf().all(), f"padding rows' lse of sequence {b}"
    outs, refs, lses, ref_lses = [], [], [], []
    for (qs, ks, vs), (o, ls) in zip(seqs, got):
        ref, ref_lse = oracle(qs, ks, vs, causal, scale)
        outs.append(o.reshape(-1, Hq, D) if varlen else o)
        refs.append(ref.transpose(0, 1))
        lses.append(ls)
        ref_lses.append(ref_lse)
    return torch.cat(outs), torch.cat(refs), torch.cat(lses, 1), torch.cat(ref_lses, 1)


CASES = {
    "causal-square-gqa2": dict(B=2, Hq=4, Hkv=2, Tq=150, L=150),
    "full-gqa3": dict(B=1, Hq=3, Hkv=1, Tq=70, L=200, causal=False),
    "chunk-over-prefix": dict(B=1, Hq=2, Hkv=1, Tq=40, L=190),
    "ragged-lens": dict(B=3, Hq=2, Hkv=2, Tq=100, L=130, q_lens=[100, 1, 0], kv_lens=[130, 17, 50]),
    "more-queries-than-keys": dict(B=1, Hq=2, Hkv=1, Tq=50, L=20),  # rows below 30 see nothing
    "varlen-with-empty": dict(B=3, Hq=4, Hkv=1, Tq=0, L=0, varlen=True, q_lens=[33, 0, 90], kv_lens=[33, 5, 120]),
    "paged16-chunk": dict(B=2, Hq=2, Hkv=1, Tq=64, L=150, kv_lens=[150, 70], page=16),
    "paged1-full": dict(B=1, Hq=2, Hkv=2, Tq=20, L=45, causal=False, page=1),
    "strided-in-order": dict(B=1, Hq=2, Hkv=1, Tq=97, L=97, strided=True, longest_first=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in COMPRESSED])
def test_emulated_prefill_matches_the_oracle(libs, config, case):
    out, ref, lse, ref_lse = run_prefill(libs(config), config, seed=sum(map(ord, config + case)), **CASES[case])
    assert not out.isnan().any(), "NaN in the output (a row never written, or stale shared memory read)"
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= TOL[out.dtype], f"max abs error {err:.3e} > {TOL[out.dtype]:.1e}"
    assert not lse.isnan().any(), "an lse entry never written"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows that see no key: lse -inf"
    finite = ~torch.isinf(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_emulated_shared_memory_is_the_planners(libs, config):
    """The kernel's own shared-memory size (PrefillConfig::smem_bytes) is the planner's formula."""
    c = CONFIGS[config]
    expected = prefill_plan.smem_bytes(head_dim=c["head_dim"], tile_m=c["tile_m"], tile_n=c["tile_n"],
                                       warps=c["warps"], stages=c["stages"], pad=bool(c["pad"]),
                                       c_is_a=c["mma"] == "nv", loader=c.get("loader", "dense"))
    assert libs(config).emu_smem_bytes() == expected


# ---- compressed caches ---------------------------------------------------------------------------
def compressed_cache(name: str, *, B: int, Hkv: int, prefix: list[int], chunk: int, page: int, seed: int):
    """An ikport.KVCache of the configuration's format as a server fills it: each sequence's cached
    prefix (a long append, a few single tokens, then a one-token rewrite at its own length - 1:
    ragged lengths, KIVI groups folded on the way), then a chunk of `chunk` new tokens appended to
    every sequence (the chunk attends to what the cache then holds). K with persistent per-channel
    outliers and offsets (4x: the oracle rounds K to the dtype, see test_decode_emulation)."""
    c = CONFIGS[name]
    dtype, D, loader = DTYPES[c["dtype"]], c["head_dim"], c["loader"]
    g = torch.Generator().manual_seed(seed)
    L = max(prefix) + chunk
    table = emulation.shuffled_table(g, B, L, page)
    fmt = dict(kv_format="int8") if loader == "int8" else dict(kv_format="kivi4",
                                                              kivi_group=int(loader.removeprefix("kivi4_g")))
    cache = ikport.KVCache(B, Hkv, L, D, dtype=dtype, page_size=page, block_table=table, **fmt)
    rows = emulation.outlier_rows(g, B, Hkv, D, dtype)
    top = max(prefix)
    cache.append(*rows(top - 3))
    for _ in range(3):
        cache.append(*rows(1))
    cache.append(*rows(1), positions=torch.tensor([n - 1 for n in prefix], dtype=torch.int32))
    cache.append(*rows(chunk))
    return cache


def run_compressed(lib, name: str, cache, *, Hq: int, Tq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, reference.int8_attention / kivi_attention on the same cache): causal, the
    query chunk the newest Tq rows of each sequence; the cache poisoned past each length and the
    paged table past each sequence's pages, the output NaN before the run."""
    c = CONFIGS[name]
    B, D, page = cache.batch, cache.head_dim, cache.page_size
    q = torch.randn(B, Hq, Tq, D, generator=torch.Generator().manual_seed(seed)).to(cache.dtype)
    table = cache.block_table
    if cache.kv_format == "int8":
        ref = reference.int8_attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale, block_table=table,
                                       causal=True, kv_lens=cache.lens)
    else:
        ref = reference.kivi_attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale, cache.k_resid,
                                       cache.kivi_group, block_table=table, causal=True, kv_lens=cache.lens)
    emulation.poison_cache(cache, torch.Generator().manual_seed(seed))
    if page:  # entries past a sequence's pages may hold anything: the kernel must not follow them
        table = table.clone()
        for b, n in enumerate(cache.lens.tolist()):
            table[b, -(-n // page):] = -1 if b % 2 else 2**31 - 1
    out = torch.full_like(q, float("nan"))
    p = PrefillParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), out.data_ptr()
    p.kv_lens = cache.lens.data_ptr()
    if page:
        p.block_table, p.bt_sb, p.page_size_log2 = table.data_ptr(), table.stride(0), page.bit_length() - 1
    p.q_sb, p.q_sh, p.q_st = q.stride()[:3]
    p.k_sb, p.k_sh, p.k_st = cache.k.stride()[:3]
    p.v_sb, p.v_sh, p.v_st = cache.v.stride()[:3]
    p.o_sb, p.o_sh, p.o_st = out.stride()[:3]
    words = 1 if cache.kv_format == "int8" else 2  # strides in 4-byte words: fp32 scales, pairs of T
    p.k_scale, p.v_scale = cache.k_scale.data_ptr(), cache.v_scale.data_ptr()
    p.ks_sb, p.ks_sh, p.ks_st = (st // words for st in cache.k_scale.stride()[:3])
    p.vs_sb, p.vs_sh, p.vs_st = (st // words for st in cache.v_scale.stride()[:3])
    if cache.k_resid is not None:
        p.k_resid = cache.k_resid.data_ptr()
        p.kr_sb, p.kr_sh, p.kr_st = cache.k_resid.stride()[:3]
    p.batch, p.num_q_heads, p.num_kv_heads = B, Hq, cache.kv_heads
    p.q_capacity, p.kv_capacity, p.causal, p.longest_first = Tq, cache.capacity, 1, 1
    p.scale_log2 = D ** -0.5 * math.log2(math.e)
    err = lib.emu_prefill(ctypes.byref(p), int(bool(page)), -(-Tq // c["tile_m"]), seed)
    assert err is None, err.decode()
    return out, ref


@pytest.mark.parametrize("page", [0, 16])
@pytest.mark.parametrize("config", COMPRESSED)
def test_emulated_chunk_over_a_compressed_prefix(libs, config, page):
    """A 130-token chunk over prefixes of 70 and 33 tokens (lengths 200 and 163: no multiple of a
    tile or a group; KIVI's residual holds the newest len % G rows, some of the chunk's own)."""
    seed = sum(map(ord, config)) + page
    cache = compressed_cache(config, B=2, Hkv=2, prefix=[70, 33], chunk=130, page=page, seed=seed)
    out, ref = run_compressed(libs(config), config, cache, Hq=8, Tq=130, seed=seed)
    assert not out.isnan().any(), "NaN in the output (a row never written, or a stale or poisoned value read)"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[out.dtype], f"max abs error {err:.3e} > {TOL[out.dtype]:.1e}"
