"""The decode kernel's own source, executed on the CPU, checked against the fp32 reference.

tests/emu/decode_main.cpp includes the attention_decode family (kernels_src/attention/decode.cuh)
after tests/emu/block_emu.hpp, a host stand-in for the ik::vendor layer that runs every thread of a
block as a coroutine. The kernel text is unchanged but for its shared-memory declarations, which
`emulation.emulated_source` rewrites into calls that give each block its own. Each configuration below is
one build: a warp/wave size and what a class of targets has (cp.async on NVIDIA sm_80+, block
clusters on sm_90, plain copies and 64-lane waves on CDNA, the AMD matrix units), with the
kernel's template values. So the AMD wave64 path, the sm_90 cluster merge and the split-K, paged, strided,
causal and empty-sequence logic run on every CI machine, not only where a GPU is lent. The
emulator is adversarial where it can be (block_emu.hpp): shared memory starts as NaN, cp.async
copies land only when waited for, warps run at random speeds.

What this does not cover: timing, the weak memory model and the vendor intrinsics themselves;
the GPU suite (tests/test_attention_gpu.py) does.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import pytest
import torch

import ikport
from ikport import kvquant, manifest, reference
from ikport.plan import decode as decode_plan
from ikport.attention import paged_kv_from_dense
from ikport.kernels import DecodeParams

import emulation

KERNELS = sorted((emulation.KERNELS / "attention").glob("*.cuh"))  # the family's files
CXX = emulation.GXX
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++ or clang++)")

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # max abs error, as the GPU suite
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


CUDA = dict(wave=32, mask="unsigned int", async_copy=1, cluster=0)  # sm_80-sm_89
SM90 = dict(CUDA, cluster=2)  # + block clusters (the clustered entry built for `cluster` splits)
CDNA = dict(wave=64, mask="unsigned long long", async_copy=0, cluster=0)  # gfx90a, gfx942
RDNA3 = dict(CDNA, wave=32)  # gfx1100: 32-lane waves, 64-bit ballots
# name: target facts, then the kernel's template values (head_dim, query rows, threads, rows per
# row group a step, ring stages: 0 reads K/V straight into registers; `loader`, the KV loader,
# dense unless named)
CONFIGS = {
    "cuda-ring4-d128-r4-t128-fp16": dict(CUDA, dtype="fp16", head_dim=128, rows=4, threads=128, unroll=2, stages=4),
    # head_dim 96 leaves 4 of 16 lanes of a row group idle
    "cuda-ring2-d96-r2-t128-bf16": dict(CUDA, dtype="bf16", head_dim=96, rows=2, threads=128, unroll=4, stages=2),
    "cuda-regs-d64-r8-t128-fp16": dict(CUDA, dtype="fp16", head_dim=64, rows=8, threads=128, unroll=2, stages=0),
    "sm90-cluster4-ring4-d128-r4-t128-bf16": dict(SM90, cluster=4, dtype="bf16", head_dim=128, rows=4,
                                                  threads=128, unroll=2, stages=4),
    # the H100's own launches at GQA 4 (plan.decode.vector_tiles): one block per SM with the 4-stage
    # ring (D1, 2 splits in a cluster), and paged caches at 512 threads with 2 stages
    "sm90-one-per-sm-d128-r4-t256-fp16": dict(SM90, dtype="fp16", head_dim=128, rows=4, threads=256,
                                              unroll=2, stages=4),
    "sm90-one-per-sm-paged-d128-r4-t512-fp16": dict(SM90, dtype="fp16", head_dim=128, rows=4, threads=512,
                                                    unroll=2, stages=2),
    # AMD: the 2-stage ring with synchronous copies (the planner's choice there), and registers only
    "cdna-ring2-d128-r4-t256-bf16": dict(CDNA, dtype="bf16", head_dim=128, rows=4, threads=256, unroll=2, stages=2),
    "cdna-regs-d256-r1-t128-fp16": dict(CDNA, dtype="fp16", head_dim=256, rows=1, threads=128, unroll=2, stages=0),
    "rdna3-ring2-d128-r8-t128-fp16": dict(RDNA3, dtype="fp16", head_dim=128, rows=8, threads=128, unroll=2, stages=2),
    # v11, the matrix units (attn_decode_split_mma; `stages`: 16-row tiles in each warp's ring),
    # over emulated matrix instructions (host clang): CDNA's MFMA on 64-lane waves, RDNA3's WMMA
    # (P through the per-warp scratch); NVIDIA's mma.sync layout (P kept in registers, rows over
    # 4 lanes) with cp.async copies that land only when waited for, as sm_90 (the cluster merge)
    # and sm_80; and WMMA's layout with cp.async and clusters. The NVIDIA PTX itself (ldmatrix,
    # mma.sync) runs in the GPU suite only.
    "cdna-mma-st2-d128-r4-t128-fp16": dict(CDNA, mma="mfma", dtype="fp16", head_dim=128, rows=4, threads=128,
                                           unroll=1, stages=2),
    "rdna3-mma-st3-d64-r8-t128-bf16": dict(RDNA3, mma="wmma", dtype="bf16", head_dim=64, rows=8, threads=128,
                                           unroll=1, stages=3),
    "sm90-cluster2-mma-st6-d128-r4-t128-fp16": dict(SM90, mma="nv", dtype="fp16", head_dim=128, rows=4,
                                                    threads=128, unroll=1, stages=6),
    "cuda-mma-st2-d80-r8-t64-bf16": dict(CUDA, mma="nv", dtype="bf16", head_dim=80, rows=8, threads=64,
                                         unroll=1, stages=2),
    # the head_dim extremes: 256 (16 output tiles a warp) at one query row (15 padding rows), and 16
    "cuda-mma-st2-d256-r1-t64-fp16": dict(CUDA, mma="nv", dtype="fp16", head_dim=256, rows=1, threads=64,
                                          unroll=1, stages=2),
    "cuda-mma-st3-d16-r2-t128-bf16": dict(CUDA, mma="nv", dtype="bf16", head_dim=16, rows=2, threads=128,
                                          unroll=1, stages=3),
    "wmma-async-cluster2-mma-st4-d96-r2-t64-fp16": dict(RDNA3, async_copy=1, cluster=2, mma="wmma", dtype="fp16",
                                                        head_dim=96, rows=2, threads=64, unroll=1, stages=4),
    # INT8 KV caches (loader int8: codes and a per-token scale, dequantized in registers or, for the
    # matrix units, into the warp's T tiles), against the reference on the dequantized cache
    "cuda-ring4-d128-r4-t128-fp16-int8": dict(CUDA, dtype="fp16", head_dim=128, rows=4, threads=128, unroll=2,
                                              stages=4, loader="int8"),
    "cuda-regs-d64-r8-t128-bf16-int8": dict(CUDA, dtype="bf16", head_dim=64, rows=8, threads=128, unroll=2, stages=0,
                                            loader="int8"),
    "sm90-cluster2-ring4-d128-r4-t256-fp16-int8": dict(SM90, dtype="fp16", head_dim=128, rows=4, threads=256,
                                                       unroll=4, stages=4, loader="int8"),  # the D1 plan
    "cdna-ring2-d128-r4-t256-fp16-int8": dict(CDNA, dtype="fp16", head_dim=128, rows=4, threads=256, unroll=2,
                                              stages=2, loader="int8"),
    "rdna3-ring2-d96-r2-t128-bf16-int8": dict(RDNA3, dtype="bf16", head_dim=96, rows=2, threads=128, unroll=4,
                                              stages=2, loader="int8"),
    "cdna-mma-st2-d128-r4-t128-fp16-int8": dict(CDNA, mma="mfma", dtype="fp16", head_dim=128, rows=4, threads=128,
                                                unroll=1, stages=2, loader="int8"),
    "rdna3-mma-st3-d64-r8-t128-bf16-int8": dict(RDNA3, mma="wmma", dtype="bf16", head_dim=64, rows=8, threads=128,
                                                unroll=1, stages=3, loader="int8"),
    "sm90-cluster2-mma-st4-d128-r4-t128-fp16-int8": dict(SM90, mma="nv", dtype="fp16", head_dim=128, rows=4,
                                                         threads=128, unroll=1, stages=4, loader="int8"),
    # head_dim 80: 5 chunks of 16 codes a row, a tile's 80 chunks not a multiple of the warp
    "cuda-mma-st2-d80-r8-t64-bf16-int8": dict(CUDA, mma="nv", dtype="bf16", head_dim=80, rows=8, threads=64,
                                              unroll=1, stages=2, loader="int8"),
    # KIVI INT4 caches (loader kivi4_g<G>: 4-bit codes, K per channel over groups of G rows with a
    # full-precision residual, V per token), against the reference on the same cache
    # (test_emulated_kivi_decode_matches_reference): wave32 NVIDIA and wave64 CDNA vector kernels with
    # each group size, registers and the ring, spare lanes (head_dim 96); the matrix units on MFMA,
    # WMMA and NVIDIA's layout with a cluster merge
    "cuda-ring4-d128-r4-t128-fp16-kivi128": dict(CUDA, dtype="fp16", head_dim=128, rows=4, threads=128, unroll=2,
                                                 stages=4, loader="kivi4_g128"),
    "cuda-regs-d64-r8-t128-bf16-kivi64": dict(CUDA, dtype="bf16", head_dim=64, rows=8, threads=128, unroll=4,
                                              stages=0, loader="kivi4_g64"),
    "cdna-ring2-d128-r4-t256-bf16-kivi32": dict(CDNA, dtype="bf16", head_dim=128, rows=4, threads=256, unroll=2,
                                                stages=2, loader="kivi4_g32"),
    "rdna3-ring2-d96-r2-t128-fp16-kivi32": dict(RDNA3, dtype="fp16", head_dim=96, rows=2, threads=128, unroll=4,
                                                stages=2, loader="kivi4_g32"),
    "sm90-cluster2-ring4-d128-r4-t256-fp16-kivi128": dict(SM90, dtype="fp16", head_dim=128, rows=4, threads=256,
                                                          unroll=8, stages=4, loader="kivi4_g128"),
    "cdna-mma-st2-d128-r4-t128-fp16-kivi128": dict(CDNA, mma="mfma", dtype="fp16", head_dim=128, rows=4,
                                                   threads=128, unroll=1, stages=2, loader="kivi4_g128"),
    "rdna3-mma-st3-d64-r8-t128-bf16-kivi32": dict(RDNA3, mma="wmma", dtype="bf16", head_dim=64, rows=8, threads=128,
                                                  unroll=1, stages=3, loader="kivi4_g32"),
    "sm90-cluster2-mma-st4-d96-r4-t64-fp16-kivi64": dict(SM90, mma="nv", dtype="fp16", head_dim=96, rows=4,
                                                         threads=64, unroll=1, stages=4, loader="kivi4_g64"),
}
KIVI_CONFIGS = [c for c in CONFIGS if CONFIGS[c].get("loader", "").startswith("kivi4")]
MATRIX_LAYOUT = {"mfma": "IK_MMA_AMD_MFMA_16X16X16", "wmma": "IK_MMA_AMD_WMMA_W32", "nv": "IK_MMA_EMULATED_NV"}


def build_args(name: str, tmp: Path) -> tuple:
    """emulation.compile_library's arguments for configuration `name`."""
    c = CONFIGS[name]
    defines = {
        "IK_WARP_SIZE": c["wave"], "EMU_LANE_MASK_T": c["mask"], "EMU_ASYNC_COPY": c["async_copy"],
        "EMU_CLUSTERS": int(c["cluster"] > 0),
        "EMU_CLUSTER": max(c["cluster"], 1), "EMU_T": manifest.cpp_name("attention_decode", "dtype", c["dtype"]),
        "EMU_HEAD_DIM": c["head_dim"], "EMU_ROWS": c["rows"], "EMU_THREADS": c["threads"], "EMU_UNROLL": c["unroll"],
        "EMU_STAGES": c["stages"], "EMU_MMA": int("mma" in c),
        "EMU_LOADER": manifest.cpp_name("attention_decode", "loader", c.get("loader", "dense")),
    }
    cxx = CXX
    if c.get("mma"):
        defines[MATRIX_LAYOUT[c["mma"]]] = 1
        cxx = emulation.CLANG
    return KERNELS, "decode_main.cpp", defines, tmp / f"{name}.so", cxx


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for fn in (lib.emu_decode_split, lib.emu_decode_combine, lib.emu_decode_naive):
        fn.restype = ctypes.c_char_p
    lib.emu_decode_split.argtypes = [ctypes.POINTER(DecodeParams), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong]
    lib.emu_decode_combine.argtypes = [ctypes.POINTER(DecodeParams), ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong]
    lib.emu_decode_naive.argtypes = [ctypes.POINTER(DecodeParams), ctypes.c_ulonglong]
    return lib


@pytest.fixture(scope="module")
def libs(request, tmp_path_factory):
    """lib(config): every configuration this run's tests here use, built together up front (the
    compilers run in parallel), each loaded on first use. The matrix-unit configurations need host
    clang (ext_vector_type): their tests skip without it."""
    used = emulation.selected_params(request, "config")
    buildable = sorted(c for c in used if emulation.CLANG is not None or "mma" not in CONFIGS[c])
    tmp = tmp_path_factory.mktemp("decode-emu")
    built = emulation.compile_libraries([build_args(c, tmp) for c in buildable])
    paths = dict(zip(buildable, built))
    loaded: dict[str, ctypes.CDLL] = {}

    def get(name: str) -> ctypes.CDLL:
        if name not in paths:
            pytest.skip("the emulated matrix units need host clang++ (ext_vector_type)")
        if name not in loaded:
            loaded[name] = load(paths[name])
        return loaded[name]
    return get


def run_decode(lib, name: str, *, B: int, Hq: int, Hkv: int, L: int, Tq: int = 1, causal: bool = False,
               kv_lens: list[int] | None = None, page: int = 0, splits: int = 1, fused: bool = True,
               strided: bool = False, clustered: bool = False, naive: bool = False,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, fp32 reference) for one case on fresh random inputs; `clustered`: the
    split merge in a block cluster of `splits` blocks; `naive`: v0 instead of the split kernel."""
    c = CONFIGS[name]
    dtype, D, rows = DTYPES[c["dtype"]], c["head_dim"], c["rows"]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    if strided:  # a [B, L, Hkv, D] cache read as [B, Hkv, L, D]: sequence stride Hkv * D
        k = torch.randn(B, L, Hkv, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, L, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    lens = torch.tensor(kv_lens if kv_lens is not None else [L] * B, dtype=torch.int32)
    int8 = c.get("loader", "dense") == "int8"
    ks = vs = None
    if int8:  # the oracle: the reference on the dequantized cache (the quantization is in both)
        (k, ks), (v, vs) = kvquant.quantize_int8(k), kvquant.quantize_int8(v)
        ref = reference.int8_attention(q, k, v, ks, vs, causal=causal, kv_lens=lens)
        # rows past kv_len may hold anything (the early copy reads them): stale scales of NaN, inf
        for b, n in enumerate(lens.tolist()):
            ks[b, :, n:] = float("nan")
            vs[b, :, n:] = float("inf")
    else:
        ref = reference.attention(q, k, v, causal=causal, kv_lens=lens)
    out = torch.full_like(q, float("nan"))
    table = None
    if page and int8:
        k, v, ks, vs, table = paged_int8(k, v, ks, vs, page, g)
    elif page:
        k, v, table = paged_kv_from_dense(k.contiguous(), v.contiguous(), page, generator=g)
    if page:
        # entries past kv_len may hold anything: the kernel must not follow them
        for b, n in enumerate(lens.tolist()):
            table[b, -(-n // page):] = -1 if b % 2 else 2**31 - 1
    capacity = table.shape[1] * page if page else L
    rows_per_split = -(-(-(-capacity // splits)) // 16) * 16  # as plan.decode.split rounds
    splits = -(-capacity // rows_per_split)
    part_out = torch.full((B, Hq, Tq, splits, D), float("nan"))
    part_lse = torch.full((B, Hq, Tq, splits), float("nan"))
    row_tiles = -(-(Hq // Hkv * Tq) // rows)
    counters = torch.zeros(2 * B * Hkv * row_tiles, dtype=torch.int32)
    p = DecodeParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.part_out, p.part_lse = part_out.data_ptr(), part_lse.data_ptr()
    p.kv_lens = lens.data_ptr()
    p.block_table = table.data_ptr() if page else None
    p.split_counters = counters.data_ptr() if fused and splits > 1 and not clustered else None
    p.q_sb, p.q_sh, p.q_st = q.stride()[:3]
    p.k_sb, p.k_sh, p.k_st = k.stride()[:3]
    p.v_sb, p.v_sh, p.v_st = v.stride()[:3]
    p.o_sb, p.o_sh, p.o_st = out.stride()[:3]
    p.bt_sb = table.stride(0) if page else 0
    p.batch, p.num_q_heads, p.num_kv_heads, p.q_len = B, Hq, Hkv, Tq
    p.kv_capacity, p.page_size_log2 = capacity, page.bit_length() - 1 if page else 0
    p.num_splits, p.rows_per_split, p.causal = splits, rows_per_split, int(causal)
    p.scale_log2 = D ** -0.5 * math.log2(math.e)
    p.num_pages = k.shape[0] if page else 0
    if int8:
        p.k_scale, p.v_scale = ks.data_ptr(), vs.data_ptr()
        p.ks_sb, p.ks_sh, p.ks_st = ks.stride()
        p.vs_sb, p.vs_sh, p.vs_st = vs.stride()
    if naive:
        err = lib.emu_decode_naive(ctypes.byref(p), seed)
        assert err is None, err.decode()
        return out, ref
    err = lib.emu_decode_split(ctypes.byref(p), int(bool(page)), int(clustered), splits, Hkv * row_tiles, B, seed)
    assert err is None, err.decode()
    if splits > 1 and not fused and not clustered:
        err = lib.emu_decode_combine(ctypes.byref(p), B * Hq * Tq, decode_plan.combine_threads(D), seed)
        assert err is None, err.decode()
    if fused and splits > 1:
        assert not counters.any(), "split counters not back at zero"
    return out, ref


def paged_int8(k, v, ks, vs, page: int, g: torch.Generator):
    """INT8 codes [B, Hkv, L, D] and scales [B, Hkv, L] into shuffled pages (as paged_kv_from_dense)."""
    B, Hkv, L, _ = k.shape
    n = -(-L // page)
    order = torch.randperm(B * n, generator=g)

    def pages(x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(-1) if x.dim() == 3 else x
        x = torch.cat([x, x[:, :, :1].expand(B, Hkv, n * page - L, x.shape[-1])], dim=2) if n * page > L else x
        x = x.reshape(B, Hkv, n, page, x.shape[-1]).permute(0, 2, 1, 3, 4).reshape(B * n, Hkv, page, x.shape[-1])
        out = torch.empty_like(x)
        out[order] = x
        return out

    return (pages(k), pages(v), pages(ks).squeeze(-1).contiguous(), pages(vs).squeeze(-1).contiguous(),
            order.view(B, n).to(torch.int32).contiguous())


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "NaN in the output (a row never written, or stale shared memory read)"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[out.dtype], f"max abs error {err:.3e} > {TOL[out.dtype]:.1e}"


# (label, case kwargs): shapes chosen to cross every branch at a few blocks each
CASES = {
    "gqa4-one-split": dict(B=2, Hq=8, Hkv=2, L=100, kv_lens=[100, 37]),
    "split-fused-ragged": dict(B=2, Hq=4, Hkv=1, L=300, kv_lens=[300, 129], splits=3),
    "split-unfused-combine": dict(B=1, Hq=6, Hkv=2, L=200, splits=4, fused=False),
    "empty-and-single-row": dict(B=3, Hq=4, Hkv=2, L=70, kv_lens=[0, 1, 70], splits=2),
    "causal-three-tokens": dict(B=2, Hq=4, Hkv=2, L=90, Tq=3, causal=True, kv_lens=[90, 5], splits=2),
    "strided-cache": dict(B=1, Hq=2, Hkv=2, L=77, strided=True, splits=2),
    "paged-16-shuffled": dict(B=2, Hq=4, Hkv=1, L=150, kv_lens=[150, 33], page=16, splits=2),
    "paged-1": dict(B=1, Hq=3, Hkv=1, L=40, page=1, splits=2),
    # splits start 112 rows apart: a split starts inside a 64-row page
    "paged-64-unaligned-splits": dict(B=1, Hq=4, Hkv=1, L=300, kv_lens=[290], page=64, splits=3),
}


# The clustered entry (sm_90): one cluster of `splits` blocks a group, splits == the config's cluster.
CLUSTER_CASES = {
    "cluster-ragged": dict(B=2, Hq=8, Hkv=2, L=300, kv_lens=[300, 130]),
    "cluster-empty-splits": dict(B=3, Hq=4, Hkv=1, L=260, kv_lens=[0, 1, 200]),  # later splits empty
    "cluster-causal-three-tokens": dict(B=1, Hq=4, Hkv=2, L=150, Tq=3, causal=True),
    "cluster-paged-16": dict(B=2, Hq=4, Hkv=1, L=200, kv_lens=[200, 75], page=16),
}



@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in KIVI_CONFIGS])
def test_emulated_decode_matches_reference(libs, config, case):
    kw = CASES[case]
    out, ref = run_decode(libs(config), config, seed=sum(map(ord, config + case)), **kw)
    check(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CLUSTER_CASES))
@pytest.mark.parametrize("config", [c for c in CONFIGS if CONFIGS[c]["cluster"] and c not in KIVI_CONFIGS])
def test_emulated_cluster_merge_matches_reference(libs, config, case):
    kw = CLUSTER_CASES[case]
    out, ref = run_decode(libs(config), config, seed=sum(map(ord, config + case)),
                          splits=CONFIGS[config]["cluster"], clustered=True, **kw)
    check(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gqa4-one-split", "causal-three-tokens", "strided-cache", "paged-16-shuffled"])
@pytest.mark.parametrize("config", ["cuda-ring4-d128-r4-t128-fp16", "cdna-ring2-d128-r4-t256-bf16"])
def test_emulated_naive_decode_matches_reference(libs, config, case):
    """v0 (the journey's naive kernel: static shared arrays, block-wide tree reductions)."""
    out, ref = run_decode(libs(config), config, seed=sum(map(ord, config + case)), naive=True, **CASES[case])
    check(out, ref)


@pytest.mark.parametrize("paged", [False, True])
def test_emulated_configs_include_the_h100_launches(paged):
    """The two sm_90 configurations above are the planner's own choice at GQA 4 (if the planner
    changes, this names the configuration to update)."""
    name = "sm90-one-per-sm-paged-d128-r4-t512-fp16" if paged else "sm90-one-per-sm-d128-r4-t256-fp16"
    t = decode_plan.vector_tiles(4, 1, one_per_sm=True, paged=paged)
    rows, threads, unroll, stages = t.rows, t.threads, t.unroll, t.stages
    c = CONFIGS[name]
    assert (c["rows"], c["threads"], c["unroll"], c["stages"]) == (rows, threads, unroll, stages)


# ---- KIVI INT4 -------------------------------------------------------------------------------------
def kivi_cache(name: str, *, B: int, Hkv: int, L: int, lens: list[int], page: int = 0, seed: int = 0):
    """An ikport.KVCache(kv_format="kivi4") built as a server would: a prefill chunk, a few single
    tokens, then each sequence rewound to its own length by a one-token rewrite at lens - 1 (a
    rewrite inside a folded group takes its rows back from the codes). K has persistent
    per-channel outliers and offsets, never zeros."""
    c = CONFIGS[name]
    dtype, D, G = DTYPES[c["dtype"]], c["head_dim"], int(c["loader"].removeprefix("kivi4_g"))
    g = torch.Generator().manual_seed(seed)
    table = emulation.shuffled_table(g, B, L, page)
    cache = ikport.KVCache(B, Hkv, L, D, dtype=dtype, kv_format="kivi4", kivi_group=G, page_size=page,
                           block_table=table)
    # (outliers of 4x: larger ones put the oracle's rounding of K to fp16 above the tolerance, where
    # the vector kernel keeps K in fp32; the accuracy tests in test_kvcache.py take 16x)
    rows = emulation.outlier_rows(g, B, Hkv, D, dtype)
    top = max(lens)
    first = max(top - 3, 1)
    cache.append(*rows(first))
    for _ in range(top - first):
        cache.append(*rows(1))
    k1, v1 = rows(1)
    pos = torch.tensor([max(n - 1, 0) for n in lens], dtype=torch.int32)
    cache.append(k1, v1, positions=pos)
    cache.lens.copy_(torch.tensor(lens, dtype=torch.int32))  # (lens 0: nothing of the sequence is read)
    return cache


def run_kivi(lib, name: str, cache, *, Hq: int, Tq: int = 1, causal: bool = False, splits: int = 1,
             fused: bool = True, clustered: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, the reference on the same cache) for a KIVI cache, the splits starting at
    multiples of G as plan.decode aligns them."""
    c = CONFIGS[name]
    B, Hkv, D, G = cache.batch, cache.kv_heads, cache.head_dim, cache.kivi_group
    q = torch.randn(B, Hq, Tq, D, generator=torch.Generator().manual_seed(seed)).to(cache.dtype)
    ref = cache.reference_attend(q, causal=causal)
    emulation.poison_cache(cache, torch.Generator().manual_seed(seed))
    page = cache.page_size
    table = cache.block_table
    if page:  # entries past a sequence's pages may hold anything: the kernel must not follow them
        table = table.clone()
        for b, n in enumerate(cache.lens.tolist()):
            table[b, -(-n // page):] = -1 if b % 2 else 2**31 - 1
    capacity = cache.capacity
    rows_per_split = -(-(-(-capacity // splits)) // G) * G
    splits = -(-capacity // rows_per_split)
    out = torch.full_like(q, float("nan"))
    part_out = torch.full((B, Hq, Tq, splits, D), float("nan"))
    part_lse = torch.full((B, Hq, Tq, splits), float("nan"))
    row_tiles = -(-(Hq // Hkv * Tq) // c["rows"])
    counters = torch.zeros(2 * B * Hkv * row_tiles, dtype=torch.int32)
    p = DecodeParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), out.data_ptr()
    p.part_out, p.part_lse = part_out.data_ptr(), part_lse.data_ptr()
    p.kv_lens = cache.lens.data_ptr()
    p.block_table = table.data_ptr() if page else None
    p.split_counters = counters.data_ptr() if fused and splits > 1 and not clustered else None
    p.q_sb, p.q_sh, p.q_st = q.stride()[:3]
    p.k_sb, p.k_sh, p.k_st = cache.k.stride()[:3]
    p.v_sb, p.v_sh, p.v_st = cache.v.stride()[:3]
    p.o_sb, p.o_sh, p.o_st = out.stride()[:3]
    p.bt_sb = table.stride(0) if page else 0
    p.batch, p.num_q_heads, p.num_kv_heads, p.q_len = B, Hq, Hkv, Tq
    p.kv_capacity, p.page_size_log2 = capacity, page.bit_length() - 1 if page else 0
    p.num_splits, p.rows_per_split, p.causal = splits, rows_per_split, int(causal)
    p.scale_log2 = D ** -0.5 * math.log2(math.e)
    p.num_pages = cache.k.shape[0] if page else 0
    p.k_scale, p.v_scale, p.k_resid = cache.k_scale.data_ptr(), cache.v_scale.data_ptr(), cache.k_resid.data_ptr()
    p.ks_sb, p.ks_sh, p.ks_st = (st // 2 for st in cache.k_scale.stride()[:3])  # in pairs
    p.vs_sb, p.vs_sh, p.vs_st = (st // 2 for st in cache.v_scale.stride()[:3])
    p.kr_sb, p.kr_sh, p.kr_st = cache.k_resid.stride()[:3]
    err = lib.emu_decode_split(ctypes.byref(p), int(bool(page)), int(clustered), splits, Hkv * row_tiles, B, seed)
    assert err is None, err.decode()
    if splits > 1 and not fused and not clustered:
        err = lib.emu_decode_combine(ctypes.byref(p), B * Hq * Tq, decode_plan.combine_threads(D), seed)
        assert err is None, err.decode()
    return out, ref


# lengths: not a multiple of G, shorter than G, whole groups (for every G here: 128, 256, 384)
KIVI_CASES = {
    "gqa4-ragged-split2": dict(cache=dict(B=3, Hkv=2, L=300, lens=[300, 128, 17]), Hq=8, splits=2),
    "whole-groups-split3-unfused": dict(cache=dict(B=2, Hkv=1, L=384, lens=[384, 256]), Hq=4, splits=3, fused=False),
    "causal-three-tokens": dict(cache=dict(B=2, Hkv=2, L=150, lens=[150, 70]), Hq=4, Tq=3, causal=True, splits=2),
    "empty-and-single-row": dict(cache=dict(B=3, Hkv=1, L=70, lens=[0, 1, 70]), Hq=4),
    "paged-16-shuffled": dict(cache=dict(B=2, Hkv=1, L=260, lens=[260, 100], page=16), Hq=4, splits=2),
    "paged-64": dict(cache=dict(B=2, Hkv=1, L=256, lens=[250, 33], page=64), Hq=2),
}


@pytest.mark.parametrize("case", list(KIVI_CASES))
@pytest.mark.parametrize("config", KIVI_CONFIGS)
def test_emulated_kivi_decode_matches_reference(libs, config, case):
    kw = dict(KIVI_CASES[case])
    seed = sum(map(ord, config + case))
    cache = kivi_cache(config, seed=seed, **kw.pop("cache"))
    out, ref = run_kivi(libs(config), config, cache, seed=seed, **kw)
    check(out, ref)


@pytest.mark.parametrize("config", [c for c in KIVI_CONFIGS if CONFIGS[c]["cluster"]])
def test_emulated_kivi_cluster_merge_matches_reference(libs, config):
    cache = kivi_cache(config, B=2, Hkv=2, L=300, lens=[300, 130], seed=5)
    out, ref = run_kivi(libs(config), config, cache, Hq=8, splits=CONFIGS[config]["cluster"], clustered=True)
    check(out, ref)
