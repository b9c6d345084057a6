"""AMD compile checks on a machine without an AMD GPU (CI): the shim and the kernels build for
every AMD target, and the code objects say what the kernels cost.

Two routes: Debian's clang-19 for gfx90a, gfx942 and gfx1100 (AmdOfflineCompiler; resources and
ISA), and hipRTC through hip-python for gfx90a (the runtime compiler; in a child process, as CI's
HIP 5.2 needs). ci/setup-amd.sh installs both toolchains.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
from ikport.backends.amd_metadata import unpackb
from ikport.backends.amd_offline import AmdOfflineCompiler, isa_version
from ikport.backends.base import CompiledModule, CompileError
from ikport.backends.hip import amdhip64_path, compile_in_subprocess
from ikport.backends.source import kernel_source
from ikport.backends.target import ARCH_TABLE, Target

pytestmark = pytest.mark.amd_offline

DECODE = [
    ("attn_decode_naive<ik::half_t, 128>", "DecodeParams"),
    ("attn_decode_split<ik::half_t, 128, 4, false, 128, 4>", "DecodeParams"),
    ("attn_decode_split<ik::bf16_t, 64, 8, true, 128, 2>", "DecodeParams"),
    ("attn_decode_combine<ik::bf16_t, 128>", "DecodeParams"),
]
MMA = [
    ("mma_tile<ik::half_t, false>", "MmaTileParams"),
    ("mma_tile<ik::bf16_t, true>", "MmaTileParams"),
]
FAMILIES = {"attention_decode.cuh": DECODE, "mma_tile.cuh": MMA}

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
def offline(request, tmp_path_factory) -> tuple[str, dict[str, CompiledModule]]:
    """Both kernel families for one target, compiled once for the tests below."""
    if not AmdOfflineCompiler.available():
        pytest.skip(NO_CLANG)
    arch, compiler = request.param, AmdOfflineCompiler()
    with pytest.MonkeyPatch.context() as mp:  # conftest's per-session cache, for a module fixture
        if "IKPORT_CACHE_DIR" not in os.environ:
            mp.setenv("IKPORT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ikport-cache"))
        return arch, build_all(lambda src, names: compiler.compile(src, names, [], Target(arch)))


def test_offline_kernels_compile_with_resources(offline):
    arch, modules = offline
    for family, m in modules.items():
        check_module(m, family, arch)
        assert "clang version 19" in m.compiler


def test_offline_decode_kernels_use_no_scratch(offline):
    arch, modules = offline
    spills = {n: r.spill_bytes for n, r in modules["attention_decode.cuh"].resources.items()}
    assert all(s == 0 for s in spills.values()), f"{arch}: scratch bytes per kernel {spills}"


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
