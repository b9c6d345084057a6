"""AMD compile checks on a machine without an AMD GPU (CI): the shim and the kernels build for
every AMD target, and the code objects say what the kernels cost.

Two routes: Debian's clang-19 for gfx90a, gfx942 and gfx1100 (AmdOfflineCompiler; resources and
ISA), and hipRTC through hip-python for gfx90a (the runtime compiler; in a child process, as CI's
HIP 5.2 needs). ci/setup-amd.sh installs both toolchains.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from ikport import manifest
from ikport.backends.amd_metadata import unpackb
from ikport.backends.amd_offline import AmdOfflineCompiler, isa_version
from ikport.backends.base import CompiledModule, CompileError
from ikport.backends.hip import amdhip64_path, compile_in_subprocess
from ikport.backends.source import kernel_source
from ikport.backends.target import ARCH_TABLE, Target

pytestmark = pytest.mark.amd_offline

DECODE = [
    ("attn_decode_naive<ik::half_t, 128>", "DecodeParams"),
    ("attn_decode_split<ik::half_t, 128, 4, false, 128, 4, 3, decode::DenseLoader>", "DecodeParams"),
    ("attn_decode_split<ik::bf16_t, 64, 8, true, 128, 2, 0, decode::DenseLoader>", "DecodeParams"),
    ("attn_decode_combine<ik::bf16_t, 128>", "DecodeParams"),
]
MMA = [
    ("mma_tile<ik::half_t, false>", "MmaTileParams"),
    ("mma_tile<ik::bf16_t, true>", "MmaTileParams"),
]
FAMILIES = {"attention/decode.cuh": DECODE, "mma_tile.cuh": MMA}

WAVEFRONT = {"gfx90a": 64, "gfx942": 64, "gfx1100": 32}
MATRIX_INSTRUCTION = {  # prefix of the mnemonic; CDNA2 spells `16x16x16f16`, CDNA3 `16x16x16_f16`
    "gfx90a": "v_mfma_f32_16x16x16",
    "gfx942": "v_mfma_f32_16x16x16",
    "gfx1100": "v_wmma_f32_16x16x16",
}
BROKEN = "struct P { int x; };\n__global__ void broken(P p) { int y = ; }\n"

NO_CLANG = f"AMD offline compiler unavailable: needs {AmdOfflineCompiler().missing()}"
needs_clang = pytest.mark.skipif(not AmdOfflineCompiler.available(), reason=NO_CLANG)
needs_hiprtc = pytest.mark.skipif(
    importlib.util.find_spec("hip") is None or amdhip64_path() is None,
    reason="hip-python or the HIP runtime library (libamdhip64) is missing (ci/setup-amd.sh)",
)


def names_of(family: str) -> list[str]:
    return [n for n, _ in FAMILIES[family]]


def build_all(compile_fn) -> dict[str, CompiledModule]:
    """One program per kernel family: every instantiation of it in a single compile."""
    return {f: compile_fn(kernel_source(f, inst), names_of(f)) for f, inst in FAMILIES.items()}


def check_module(m: CompiledModule, family: str, arch: str) -> None:
    assert m.binary.startswith(b"\x7fELF"), "the code object is not an ELF file"
    assert set(m.lowered_names) == set(names_of(family))
    for name in names_of(family):
        symbol, r = m.lowered_names[name], m.resources[name]
        assert symbol.startswith("_Z") and name.split("<")[0] in symbol, (name, symbol)
        assert r.registers and r.sgprs and r.shared_bytes is not None, (name, r)
        assert r.wavefront_size == WAVEFRONT[arch], (name, r)
        assert r.shared_bytes <= ARCH_TABLE[arch].max_smem_per_block, (name, r)
    assert len(set(m.lowered_names.values())) == len(m.lowered_names), m.lowered_names


# ---- clang-19: every AMD target ---------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(WAVEFRONT))
def offline(request) -> tuple[str, dict[str, CompiledModule]]:
    """Both kernel families for one target, compiled once for the tests below."""
    if not AmdOfflineCompiler.available():
        pytest.skip(NO_CLANG)
    arch, compiler = request.param, AmdOfflineCompiler()
    return arch, build_all(lambda src, names: compiler.compile(src, names, [], Target(arch)))


@pytest.mark.slow
def test_offline_kernels_compile_with_resources(offline):
    arch, modules = offline
    for family, m in modules.items():
        check_module(m, family, arch)
        assert "clang version 19" in m.compiler


@pytest.mark.slow
def test_offline_decode_kernels_use_no_scratch(offline):
    arch, modules = offline
    spills = {n: r.spill_bytes for n, r in modules["attention/decode.cuh"].resources.items()}
    assert all(s == 0 for s in spills.values()), f"{arch}: scratch bytes per kernel {spills}"


@pytest.mark.slow
def test_offline_mma_tile_uses_the_matrix_unit(offline):
    arch, modules = offline
    asm = modules["mma_tile.cuh"].assembly
    found = re.findall(rf"\b{MATRIX_INSTRUCTION[arch]}\w*", asm)
    assert len(found) >= len(MMA), (
        f"{arch}: expected {MATRIX_INSTRUCTION[arch]}* per kernel, found {found}"
    )


@needs_clang
def test_offline_compile_error_names_target_and_log():
    with pytest.raises(CompileError) as e:
        AmdOfflineCompiler().compile(BROKEN, ["broken"], [], Target("gfx942"))
    assert e.value.target.arch == "gfx942" and "gfx942" in str(e.value)
    assert "expected expression" in e.value.log


# ---- hipRTC (hip-python) in a child process: gfx90a --------------------------------------------
@pytest.mark.slow
@needs_hiprtc
def test_hiprtc_subprocess_compiles_gfx90a():
    modules = build_all(lambda src, names: compile_in_subprocess(src, names, [], "gfx90a"))
    for family, m in modules.items():
        check_module(m, family, "gfx90a")
        assert m.compiler.startswith("hiprtc")


@needs_hiprtc
def test_hiprtc_subprocess_compile_error_names_target_and_log():
    with pytest.raises(CompileError) as e:
        compile_in_subprocess(BROKEN, ["broken"], [], "gfx90a")
    assert e.value.target.arch == "gfx90a" and "gfx90a" in str(e.value)
    assert "expected expression" in e.value.log


@needs_hiprtc
def test_hiprtc_subprocess_survives_a_target_it_cannot_build():
    """HIP 5.2's comgr aborts its process on gfx942: the caller gets a RuntimeError that says so
    (a newer hipRTC simply builds it)."""
    src = kernel_source("mma_tile.cuh", MMA)
    try:
        m = compile_in_subprocess(src, names_of("mma_tile.cuh"), [], "gfx942")
    except CompileError:
        raise
    except RuntimeError as e:
        assert "gfx942" in str(e) and "cannot build" in str(e), str(e)
    else:
        check_module(m, "mma_tile.cuh", "gfx942")


# ---- pure-Python pieces ------------------------------------------------------------------------
def test_msgpack_reader():
    # {"a": 1, "b": [True, -123, None, "xy"], "c": 65536}
    blob = bytes.fromhex("83 a1 61 01 a1 62 94 c3 d0 85 c0 a2 78 79 a1 63 ce 00 01 00 00")
    assert unpackb(blob) == {"a": 1, "b": [True, -123, None, "xy"], "c": 65536}


def test_isa_version_numbers():
    assert isa_version("gfx90a") == ("90a", 9010)
    assert isa_version("gfx942") == ("942", 9402)
    assert isa_version("gfx1100") == ("1100", 11000)


# ---- every manifest kernel, every AMD target: what the NVIDIA build has, the AMD build has ------
# (the rows of conftest's session compile-all: nvidia_rows, amd_rows)
def dynamic_lds_bytes(spec, arch: str) -> int:
    """The dynamic shared memory the planners launch the kernel with (0: static only)."""
    from ikport import plan

    launch = plan.launch_of(spec, ARCH_TABLE[arch])
    return launch.dynamic_shared_bytes if launch is not None and spec.family == "attention_decode" else 0


@pytest.mark.slow
def test_matrix_unit_on_amd_wherever_nvidia_has_mma(nvidia_rows, amd_rows):
    """Per manifest kernel: mma.sync in the sm_90 PTX <=> v_mfma (gfx90a, gfx942) / v_wmma (gfx1100)
    in that target's ISA. A kernel that loses its matrix instructions on one AMD target (a silent
    scalar fallback), or gains them, fails here."""
    nvidia = {r.kernel: r.instructions["mma"] for r in nvidia_rows if r.target == "sm_90"}
    mismatches = []
    for r in amd_rows:
        if r.compiler != "clang-19":
            continue  # hipRTC gives no ISA text
        if (r.instructions["mma"] > 0) != (nvidia[r.kernel] > 0):
            mismatches.append(f"{r.kernel} on {r.target}: {nvidia[r.kernel]} mma.sync on sm_90, "
                              f"{r.instructions['mma']} {MATRIX_INSTRUCTION[r.target]}*")
    assert sum(n > 0 for n in nvidia.values()) >= 1, (
        "no manifest kernel uses mma on NVIDIA: the cross-check checked nothing")
    assert len({r.kernel for r in amd_rows}) == len(nvidia)
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.slow
def test_every_manifest_kernel_fits_each_amd_target(amd_rows):
    """Static LDS plus the dynamic LDS the launcher asks for within the target's limit; the
    wavefront size the shim assumed (clang-19 and hipRTC); no scratch with clang-19 (HIP 5.2's
    hipRTC gives some decode kernels 16 bytes)."""
    specs = {s.uri: s for s in manifest.default_instantiations()}
    bad = []
    for r in amd_rows:
        limit = ARCH_TABLE[r.target].max_smem_per_block
        lds = r.shared_bytes + dynamic_lds_bytes(specs[r.kernel], r.target)
        scratch = r.spill_bytes if r.compiler == "clang-19" else 0
        if lds > limit or r.wavefront_size != WAVEFRONT[r.target] or scratch != 0:
            bad.append(f"{r.kernel} on {r.target} ({r.compiler}): LDS {lds} (limit {limit}), "
                       f"wave {r.wavefront_size}, scratch {r.spill_bytes}")
    assert {r.target for r in amd_rows} == set(WAVEFRONT)
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@needs_clang
@pytest.mark.parametrize("arch,layout,M", [("gfx90a", "amd_mfma16", 1), ("gfx90a", "amd_mfma16", 16),
                                           ("gfx942", "amd_mfma16", 32), ("gfx1100", "amd_wmma16_w32", 16),
                                           ("gfx1100", "amd_wmma16_w32", 32)])
def test_w4a16_plan_fits_the_lds(arch, layout, M):
    """The W4A16 plan for an AMD GPU, without one: the planner with the target's facts, the
    kernels compiled offline for their real static LDS. Where the weight ring (static) plus the x
    slabs (dynamic) would pass the workgroup's LDS, the plan takes fewer waves; it never plans a
    launch that cannot fit."""
    from ikport.backends.base import DeviceInfo
    from ikport.manifest import spec as make_spec
    from ikport.plan import w4a16 as W

    facts = ARCH_TABLE[arch]
    compiler = AmdOfflineCompiler()
    device = DeviceInfo(arch, arch, 104, facts.max_smem_per_block, facts.warp_size, 8 << 20)

    def static_shared(spec):  # the compiled kernel's own static LDS
        module = compiler.compile(kernel_source(spec.source_file, [(spec.name_expr, spec.params_type)]),
                                  [spec.name_expr], [], Target(arch))
        return module.resources[spec.name_expr].shared_bytes

    plan = W.plan(W.W4A16Problem("fp16", M, 4096, 4096, layout, 128), device, static_shared)
    ring = static_shared(plan.kernel)
    assert ring > 0 and ring + plan.shared_bytes <= facts.max_smem_per_block
    waves = plan.block[0] // facts.warp_size
    if waves < W.WARPS:  # fewer only because twice as many would not have fit
        params = dict(plan.kernel.params)
        params["warps"] = 2 * waves
        params["stages"] = W.stages(2 * waves * facts.warp_size, params["n_tiles"])
        wider = make_spec("w4a16", "mma", **params)
        chunk_k = W.layout_info(layout).chunk_k
        x_bytes = W.mma_x_smem(params["stages"], 2 * waves, M, params["m_tiles"], chunk_k)
        assert static_shared(wider) + x_bytes > facts.max_smem_per_block
