"""The W4A16 kernels' own source on AMD's two matrix units, executed on the CPU.

tests/emu/w4a16_main.cpp includes kernels_src/w4a16.cuh over the block emulator
(tests/emu/block_emu.hpp, see test_decode_emulation.py) with portability/mma.cuh's AMD branch,
whose matrix builtins (CDNA's 16x16x16 MFMA on 64-lane waves, RDNA3's 16x16x16 WMMA on 32-lane
waves) are emulated from the fragment layouts that tests/test_mma_layout.py checks against AMD's
own tables (tests/emu/matrix_emu.hpp). So the matrix-unit kernel (B fragments straight from the
packed codes, warps splitting K inside a block, split-K across blocks with the last block's merge),
the GEMVs, the naive kernel and the dequantizing kernel run as an AMD GPU would run them, against
the fp32 reference, with the launch the library's planner gives (ikport/w4a16.py). Needs clang
(ext_vector_type, as the device code); CI installs clang-19 (ci/setup-amd.sh).

The tiled kernel (variant "tiled") also runs NVIDIA's fragment layout (IK_MMA_EMULATED_NV: the
fragments element by element) with cp.async modelled. Not covered: NVIDIA's inline PTX (the GPU
suite runs it), timing, and the hardware's rounding inside a matrix instruction (emulated in
fp32, k in order).
"""

from __future__ import annotations

import ctypes
import hashlib

import pytest
import torch

import ikport
from ikport import int4, reference
from ikport.plan import w4a16 as W
from ikport.kernels import MmaTileParams, W4A16Params
from ikport.impl.w4a16 import _group_log2

import emulation

KERNEL = emulation.ROOT / "kernels_src" / "w4a16.cuh"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(emulation.CLANG is None,
                                                    reason="no host clang++ (ext_vector_type)")]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |reference|, as the GPU suite
DTYPES = {"fp16": (torch.float16, "ik::half_t"), "bf16": (torch.bfloat16, "ik::bf16_t")}
# target class: (wave size, matrix-unit macro, packed layout)
TARGETS = {
    "cdna": (64, "IK_MMA_AMD_MFMA_16X16X16", "amd_mfma16"),  # gfx90a, gfx942
    "rdna3": (32, "IK_MMA_AMD_WMMA_W32", "amd_wmma16_w32"),  # gfx1100
}
# The tiled kernel also runs NVIDIA's fragment layout (IK_MMA_EMULATED_NV, fragments element by
# element) with cp.async modelled (a slot read before its wait sees stale bytes).
TILED_TARGETS = {**TARGETS, "nv": (32, "IK_MMA_EMULATED_NV", "nv_m16n8k16")}
MAX_SMEM = {"cdna": 64 * 1024, "rdna3": 64 * 1024, "nv": 227 * 1024}
KERNELS = {"mma": 0, "gemv": 1, "gemv-scalar": 2, "naive": 3, "dequant": 4, "tiled": 5}
SM_COUNT = 4  # a small device: the planner splits K across blocks for few output tiles


def mma_plan(target: str, M: int, N: int, K: int, group_size: int) -> dict[str, int]:
    """The matrix-unit kernel's template values and launch, as ikport/plan/w4a16.py plans them."""
    wave, _, layout = TARGETS[target]
    chunk_k = int4.layout_info(layout).chunk_k
    cfg = W.tiles(m=M, n=N, k=K, chunk_k=chunk_k, sm_count=SM_COUNT)
    stages = W.stages(cfg.warps * wave, cfg.n_tiles)
    return dict(mt=cfg.m_tiles, nt=cfg.n_tiles, warps=cfg.warps, gt=W.group_tiles(group_size, K),
                stages=stages, grid=cfg.grid, splits=cfg.num_splits, per_split=cfg.chunks_per_split)


def tiled_plan(target: str, M: int, N: int, K: int, options: W.W4A16Options) -> dict[str, int]:
    """The tiled kernel's template values and launch (ikport/plan/w4a16.py), beside a fixed
    matrix-unit configuration the same build compiles (tests/emu/w4a16_main.cpp builds both)."""
    wave, _, layout = TILED_TARGETS[target]
    chunk_k = int4.layout_info(layout).chunk_k
    t = W.tiled_tiles(m=M, n=N, k=K, chunk_k=chunk_k, sm_count=SM_COUNT, max_smem=MAX_SMEM[target],
                      options=options)
    wm, wn = W.tiled_warps(t.block_m, t.block_n)
    return dict(mt=1, nt=2, warps=1, gt=8, stages=2, bm=t.block_m, bn=t.block_n, wm=wm, wn=wn,
                tstages=t.stages, grid=t.grid, splits=t.num_splits, per_split=t.chunks_per_split,
                threads=wm * wn * wave)


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    cache: dict[tuple, ctypes.CDLL] = {}

    def get(target: str, dt: str, plan: dict[str, int]) -> ctypes.CDLL:
        tiled = tuple(plan.get(k) for k in ("bm", "bn", "wm", "wn", "tstages"))
        key = (target, dt, plan["mt"], plan["nt"], plan["warps"], plan["gt"], plan["stages"]) + tiled
        if key not in cache:
            wave, macro, _ = TILED_TARGETS[target]
            defines = {
                "IK_WARP_SIZE": wave, "EMU_LANE_MASK_T": "unsigned long long",
                "EMU_ASYNC_COPY": int(target == "nv"), "EMU_CLUSTERS": 0, macro: 1, "EMU_T": DTYPES[dt][1],
                "EMU_MT": plan["mt"], "EMU_NT": plan["nt"], "EMU_WARPS": plan["warps"], "EMU_GT": plan["gt"],
                "EMU_STAGES": plan["stages"], "EMU_GEMV_WARPS": W.GEMV_WARPS,
            }
            if tiled[0] is not None:
                defines.update(EMU_BM=plan["bm"], EMU_BN=plan["bn"], EMU_WARPS_M=plan["wm"],
                               EMU_WARPS_N=plan["wn"], EMU_TILED_STAGES=plan["tstages"])
            name = "-".join(map(str, key))
            tmp = tmp_path_factory.mktemp(hashlib.sha1(name.encode()).hexdigest()[:8])
            lib = emulation.build([KERNEL, KERNEL.with_name("mma_tile.cuh")], "w4a16_main.cpp", defines,
                                  tmp / "w4a16.so", emulation.CLANG)
            lib.emu_w4a16.restype = ctypes.c_char_p
            lib.emu_w4a16.argtypes = [ctypes.POINTER(W4A16Params)] + [ctypes.c_int] * 5 + [ctypes.c_ulonglong]
            lib.emu_mma_tile.restype = ctypes.c_char_p
            lib.emu_mma_tile.argtypes = [ctypes.POINTER(MmaTileParams), ctypes.c_int, ctypes.c_ulonglong]
            cache[key] = lib
        return cache[key]

    return get


def run_w4a16(libs, target: str, dt: str, variant: str, M: int, N: int, K: int, *, group_size: int = 128,
              symmetric: bool = True, seed: int = 0,
              options: W.W4A16Options | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, fp32 reference) on fresh random inputs, the output poisoned with NaN, and NaN
    just past what the kernel may read: x's columns from K up to its row stride, the rows after
    the scales and zero points (a K tail must read neither: the output would be NaN)."""
    wave, _, layout = TILED_TARGETS[target]
    dtype = DTYPES[dt][0]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(dtype)
    weight = ikport.quantize_weight(w, group_size=group_size, symmetric=symmetric, layout=layout)
    x = torch.randn(M, K, generator=g).to(dtype)
    ref = reference.w4a16_matmul(x, weight)
    x_buf = torch.full((M, int4.packed_k(K) + 16), float("nan"), dtype=dtype)
    x_buf[:, :K] = x
    x = x_buf[:, :K]  # rows of stride packed_k(K) + 16, NaN past K

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        buf = torch.full((t.shape[0] + 2, t.shape[1]), float("nan"), dtype=t.dtype)
        buf[:t.shape[0]] = t
        return buf

    scales = poisoned(weight.scales)
    zeros_buf = poisoned(weight.zeros) if weight.zeros is not None else None
    if variant == "tiled":
        plan = tiled_plan(target, M, N, K, options or W.DEFAULT_OPTIONS)
    else:
        plan = mma_plan(target, M, N, K, weight.group_size)
    lib = libs(target, dt, plan)
    chunk_k = int4.layout_info(layout).chunk_k
    chunks = -(-K // chunk_k)  # a K tail: the last chunk is partial
    zeros = zeros_buf.data_ptr() if zeros_buf is not None else None
    if variant == "dequant":  # a dense [N, K] weight, then the product on the host (torch's GEMM on a GPU)
        dense = torch.full((N, K + 32), float("nan"), dtype=dtype)  # columns past K must stay NaN
        p = W4A16Params(None, weight.qweight.data_ptr(), scales.data_ptr(), zeros, dense.data_ptr(),
                        None, None, 0, dense.stride(0), 0, N, K, int4.packed_k(K), _group_log2(weight.group_size),
                        1, chunks)
        chunks_per_block = 256 // int4.layout_info(layout).unique_lanes
        err = lib.emu_w4a16(ctypes.byref(p), KERNELS[variant], N // 16, -(-chunks // chunks_per_block), 1,
                            256, seed)
        assert err is None, err.decode()
        assert dense[:, K:].isnan().all(), "the dequantizing kernel wrote past K"
        return (x.float() @ dense[:, :K].float().T).to(dtype), ref
    out = torch.full((M, N), float("nan"), dtype=dtype)
    splits, per_split, grid, threads = 1, chunks, (N // 16, M, 1), wave
    if variant == "mma":
        splits, per_split, grid, threads = plan["splits"], plan["per_split"], plan["grid"], plan["warps"] * wave
    elif variant == "tiled":
        splits, per_split, grid, threads = plan["splits"], plan["per_split"], plan["grid"], plan["threads"]
    elif variant.startswith("gemv"):
        threads = W.GEMV_WARPS * wave
    partials = torch.full((splits, M, N), float("nan"))
    counters = torch.zeros(grid[0] * grid[2], dtype=torch.int32)
    p = W4A16Params(x.data_ptr(), weight.qweight.data_ptr(), scales.data_ptr(), zeros, out.data_ptr(),
                    partials.data_ptr(), counters.data_ptr(), x.stride(0), out.stride(0), M, N, K,
                    int4.packed_k(K), _group_log2(weight.group_size), splits, per_split)
    err = lib.emu_w4a16(ctypes.byref(p), KERNELS[variant], *grid, threads, seed)
    assert err is None, err.decode()
    assert not counters.any(), "split counters not back at zero"
    return out, ref


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "NaN in the output (unwritten, or stale shared memory read)"
    err = (out.float() - ref.float()).abs().max().item()
    bound = TOL[out.dtype] * ref.float().abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


SHAPES = [(1, 32, 256), (3, 48, 1024), (17, 64, 512), (33, 32, 256)]  # M, N, K: tails of 16-row tiles


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("target", list(TARGETS))
def test_emulated_matrix_kernel_matches_reference(libs, target, dt, shape):
    M, N, K = shape
    check(*run_w4a16(libs, target, dt, "mma", M, N, K, seed=M * 7 + N + K))


def test_emulated_matrix_kernel_splits_k_across_blocks(libs):
    """Few output tiles on a small device: K split across blocks, the last block merges."""
    plan = mma_plan("cdna", 1, 32, 4096, 128)
    assert plan["splits"] > 1
    check(*run_w4a16(libs, "cdna", "fp16", "mma", 1, 32, 4096, seed=5))


@pytest.mark.parametrize("group", [(32, False), (64, True), (-1, False)], ids=["g32-asym", "g64", "per-channel-asym"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_emulated_groups_and_zero_points(libs, target, group):
    group_size, symmetric = group
    check(*run_w4a16(libs, target, "bf16", "mma", 5, 32, 512, group_size=group_size, symmetric=symmetric, seed=9))


@pytest.mark.parametrize("variant", ["gemv", "gemv-scalar", "naive", "dequant"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_emulated_other_variants_match_reference(libs, target, variant):
    check(*run_w4a16(libs, target, "fp16", variant, 2, 48, 384, symmetric=False, seed=3))


# K tails (K % 128 != 0): (K, group_size, symmetric). Ragged last groups (96 at G 64: 64 + 32; 576 at
# G 128: 4 x 128 + 64), per-channel groups of a K that is no power of two (96: the shift of 31) and
# of a K below every chunk but RDNA3's (32), G 32 over a partial chunk (160 = 128 + 32 on CDNA).
K_TAILS = [(32, None, True), (96, 64, False), (96, None, False), (160, 32, True), (576, 128, False)]


@pytest.mark.parametrize("tail", K_TAILS, ids=lambda t: f"K{t[0]}-G{t[1] or 'K'}-{'sym' if t[2] else 'asym'}")
@pytest.mark.parametrize("target", list(TARGETS))
def test_emulated_k_tails_every_variant(libs, target, tail):
    """Every kernel over a K that is not a multiple of 128: the last chunk partial on CDNA (KC 128)
    and, for K = 96 and 160, on NVIDIA's layout geometry too; x, scales and zeros poisoned past what
    may be read."""
    K, group_size, symmetric = tail
    for i, variant in enumerate(("mma", "gemv", "gemv-scalar", "naive", "dequant")):
        check(*run_w4a16(libs, target, "bf16", variant, 3, 32, K, group_size=group_size, symmetric=symmetric,
                         seed=K + i))


@pytest.mark.parametrize("target", list(TARGETS))
def test_emulated_k_tail_two_row_tiles_and_split_k(libs, target):
    """A K tail with 17 rows (two 16-row tiles), and one long enough to split K across blocks (on
    CDNA the last split ends in the partial chunk)."""
    check(*run_w4a16(libs, target, "bf16", "mma", 17, 64, 576, group_size=128, symmetric=False, seed=21))
    K = 4096 + 32
    plan = mma_plan(target, 1, 32, K, 128)
    assert plan["splits"] > 1
    check(*run_w4a16(libs, target, "fp16", "mma", 1, 32, K, seed=22))


@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("target", list(TARGETS))
def test_emulated_matrix_shim_tile_product(libs, target, dt, b_transposed):
    """portability/mma.cuh's AMD branch alone (kernels_src/mma_tile.cuh): C = A B in fp32."""
    dtype = DTYPES[dt][0]
    g = torch.Generator().manual_seed(11)
    a = torch.randn(32, 48, generator=g).to(dtype)
    b = torch.randn(32, 48, generator=g).to(dtype) if b_transposed else torch.randn(48, 32, generator=g).to(dtype)
    c = torch.full((32, 32), float("nan"))
    lib = libs(target, dt, mma_plan(target, 1, 32, 256, 128))  # (any build of this target and dtype)
    err = lib.emu_mma_tile(ctypes.byref(MmaTileParams(a.data_ptr(), b.data_ptr(), c.data_ptr(), 32, 32, 48)),
                           int(b_transposed), 1)
    assert err is None, err.decode()
    torch.testing.assert_close(c, reference.mma_tile(a, b, b_transposed), rtol=1e-4, atol=1e-4)


# ---- the tiled kernel (variant "tiled") -------------------------------------------------------
# The planner's block for M in 33..64 (64 rows, 128 columns, 8 warps; a 2-stage ring in CDNA's
# 64 KB of LDS) on every target, and on NVIDIA's layout also a 32 x 64 block (2 warps, one warp
# row). M not a multiple of the block's rows, N = 16 x odd (column tiles past N), K tails, every
# group kind with and without zero points, split-K with the last block's merge. One dtype a
# target, few blocks: each target/dtype/block is a clang build of its own (~5 s), the runs
# themselves take well under a second.
BLOCK = W.W4A16Options(variant="tiled", block_m=64)
TILED_DTYPE = {"nv": "bf16", "cdna": "fp16", "rdna3": "bf16"}
TILED_CASES = {  # id: (M, N, K, group_size, symmetric, options)
    "M17-N48-K256-g128-sym": (17, 48, 256, 128, True, BLOCK),
    "M50-N144-K352-g32-asym": (50, 144, 352, 32, False, W.W4A16Options(variant="tiled")),
    "M130-N80-K96-perchannel-asym": (130, 80, 96, None, False, BLOCK),
    "M20-N48-K576-g64-sym-split3": (20, 48, 576, 64, True, W.W4A16Options(variant="tiled", block_m=64,
                                                                          num_splits=3)),
}
SMALL = W.W4A16Options(variant="tiled", block_m=32, block_n=64)
NV_SMALL_CASES = {
    "M50-N80-K256-g128-asym-32x64": (50, 80, 256, 128, False, SMALL),
    "M33-N16-K160-g32-sym-32x64-split2": (33, 16, 160, 32, True, W.W4A16Options(variant="tiled", block_m=32,
                                                                                 block_n=64, num_splits=2)),
}


def run_tiled(libs, target: str, case: tuple) -> None:
    M, N, K, group_size, symmetric, options = case
    plan = tiled_plan(target, M, N, K, options)
    assert plan["bm"] == (options.block_m or 64) and plan["bn"] == (options.block_n or 128)
    assert (plan["splits"] > 1) == (options.num_splits is not None)
    check(*run_w4a16(libs, target, TILED_DTYPE[target], "tiled", M, N, K, group_size=group_size,
                     symmetric=symmetric, seed=M + N + K, options=options))


@pytest.mark.parametrize("case", list(TILED_CASES))
@pytest.mark.parametrize("target", list(TILED_TARGETS))
def test_emulated_tiled_kernel_matches_reference(libs, target, case):
    run_tiled(libs, target, TILED_CASES[case])


@pytest.mark.parametrize("case", list(NV_SMALL_CASES))
def test_emulated_tiled_kernel_small_block_nvidia_layout(libs, case):
    run_tiled(libs, "nv", NV_SMALL_CASES[case])
