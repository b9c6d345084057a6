"""The sizes the planners compute must be the ones the compiled kernels use. The planners mirror a
few C++ constants (the decode kernels' dynamic shared memory: SplitConfig::smem_bytes,
MmaConfig::smem_bytes, cluster_bytes; the W4A16 chunk and x-slab stride): here the compiler
itself checks each value the planner computes, as a static_assert in a program made of the
family's own source, for NVIDIA (NVRTC, sm_90: 32 lanes, P kept in registers) and AMD (clang-19:
gfx942's 64-lane waves, gfx1100's 32 with the C-to-A scratch). A planted wrong value fails."""

from __future__ import annotations

import itertools

import pytest

from ikport.backends.base import CompileError
from ikport.backends.source import kernel_source
from ikport.backends.target import Target
from ikport.int4 import layout_info
from ikport.plan import decode as P
from ikport.plan import prefill as PF
from ikport.plan import w4a16 as W

DTYPE = "ik::half_t"
LOADERS = {"dense": "decode::DenseLoader", "int8": "decode::Int8Loader",  # the manifest's cpp_names
           "kivi4_g128": "decode::KiviLoader<128>"}


def decode_asserts(target: Target, wrong_by: int = 0) -> list[str]:
    """static_asserts of every planner size on a grid of launches the planner may ask for."""
    facts = target.facts
    out = []
    for loader, d, rows, threads, unroll, stages in itertools.product(LOADERS, (64, 80, 128, 256), (1, 4, 8),
                                                                      (128, 256, 512), (2, 4), (0, 2, 4)):
        if P.kivi_group(loader) and P.vector_step_rows(d, threads, unroll, facts.warp_size) > P.kivi_group(loader):
            continue  # a KIVI step lies in one group (the loader's static_assert; the planner never asks)
        want = P.vector_smem_bytes(threads=threads, warp_size=facts.warp_size, rows=rows, head_dim=d,
                                   unroll=unroll, stages=stages, loader=loader) + wrong_by
        cfg = f"SplitConfig<{DTYPE}, {d}, {rows}, false, {threads}, {unroll}, {stages}, {LOADERS[loader]}>"
        out.append(f'static_assert({cfg}::smem_bytes() == {want}, "{cfg} smem_bytes");')
        for cluster in (2, 8):
            extra = P.cluster_bytes(cluster, rows, d)
            out.append(f'static_assert({cfg}::cluster_bytes({cluster}) == {extra}, "{cfg} cluster_bytes");')
    mma = []
    for loader, d, rows, threads, stages in itertools.product(LOADERS, (64, 80, 128, 256), (1, 4, 8), (64, 128),
                                                              (2, 6)):
        if P.kivi_group(loader) and d % 32:
            continue  # KIVI's matrix copies: head_dim a multiple of 32 (the planner refuses the rest)
        want = P.mma_smem_bytes(threads=threads, warp_size=facts.warp_size, rows=rows, head_dim=d, stages=stages,
                                c_is_a=facts.c_is_a, loader=loader) + wrong_by
        cfg = f"MmaConfig<{DTYPE}, {d}, {rows}, false, {threads}, {stages}, {LOADERS[loader]}>"
        mma.append(f'static_assert({cfg}::smem_bytes() == {want}, "{cfg} smem_bytes");')
    return out + ["#ifdef IK_HAS_MMA", *mma, "#endif"]


def prefill_asserts(target: Target) -> list[str]:
    """PrefillConfig::smem_bytes against plan.prefill.smem_bytes, over tiles the planner may ask for."""
    out = []
    tiles = ((128, 64, 8), (64, 32, 4), (32, 16, 2))
    for loader, d, (tm, tn, warps), stages, pad in itertools.product(LOADERS, (64, 96, 128, 256), tiles, (1, 2, 3),
                                                                     (False, True)):
        want = PF.smem_bytes(head_dim=d, tile_m=tm, tile_n=tn, warps=warps, stages=stages, pad=pad,
                             c_is_a=target.facts.c_is_a, loader=loader)
        cfg = (f"prefill::PrefillConfig<{DTYPE}, {d}, {tm}, {tn}, {warps}, {stages}, {str(pad).lower()}, "
               f"{LOADERS[loader]}>")
        out.append(f'static_assert({cfg}::smem_bytes() == {want}, "{cfg} smem_bytes");')
    return ["#ifdef IK_HAS_MMA", *out, "#endif"]


def w4a16_asserts(target: Target) -> list[str]:
    chunk = layout_info(target.facts.matrix_layout).chunk_k
    return [f'static_assert(w4::kChunk == {chunk}, "chunk_k of {target.facts.matrix_layout}");',
            f'static_assert(w4::kLdX == {chunk} + 8, "x slab stride (plan.w4a16.mma_x_smem)");',
            *(f'static_assert({W.tiled_smem(bm, bn, 1, chunk)} == w4::tiled_stage_bytes({bm}, {bn}), '
              f'"tiled ring stage {bm} x {bn} (plan.w4a16.tiled_smem)");'
              for bm in W.TILED_BLOCK_M for bn in W.TILED_BLOCK_N)]


def compile_checks(target: Target, family_file: str, asserts: list[str]):
    source = kernel_source(family_file, []) + "\n" + "\n".join(asserts) + "\n__global__ void ikport_sizes() {}\n"
    if target.vendor == "cuda":
        from ikport.backends.cuda import CudaBackend

        return CudaBackend().compile(source, ["ikport_sizes"], [], target)
    from ikport.backends.amd_offline import AmdOfflineCompiler

    return AmdOfflineCompiler().compile(source, ["ikport_sizes"], [], target)


@pytest.mark.parametrize("family_file,asserts", [("attention/decode.cuh", decode_asserts),
                                                  ("attention/prefill.cuh", prefill_asserts),
                                                  ("w4a16.cuh", w4a16_asserts)], ids=["decode", "prefill", "w4a16"])
def test_planner_sizes_match_the_nvidia_kernels(family_file, asserts):
    pytest.importorskip("cuda.bindings")
    compile_checks(Target("sm_90"), family_file, asserts(Target("sm_90")))


@pytest.mark.slow
@pytest.mark.amd_offline
@pytest.mark.parametrize("arch", ["gfx942", "gfx1100"])
@pytest.mark.parametrize("family_file,asserts", [("attention/decode.cuh", decode_asserts),
                                                  ("attention/prefill.cuh", prefill_asserts),
                                                  ("w4a16.cuh", w4a16_asserts)], ids=["decode", "prefill", "w4a16"])
def test_planner_sizes_match_the_amd_kernels(arch, family_file, asserts):
    compile_checks(Target(arch), family_file, asserts(Target(arch)))


def test_a_wrong_planner_size_fails_to_compile():
    pytest.importorskip("cuda.bindings")
    with pytest.raises(CompileError, match="smem_bytes"):
        compile_checks(Target("sm_90"), "attention/decode.cuh", decode_asserts(Target("sm_90"), wrong_by=16))
