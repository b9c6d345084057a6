"""Every manifest kernel compiles for every NVIDIA target (NVRTC) and every AMD target
(Debian's clang-19), no GPU needed (CPU). hipRTC specifics are in tests/test_amd.py."""

import json
import subprocess
import sys

import pytest

from ikport import manifest, toolchain
from ikport.backends.base import CompileError
from ikport.backends.target import Target

NVIDIA_TARGETS = ["sm_80", "sm_89", "sm_90"]


@pytest.fixture(scope="module")
def nvidia_rows():
    pytest.importorskip("cuda.bindings", reason="pip install 'ikport[cuda]'")
    specs = list(manifest.default_instantiations())
    return toolchain.compile_all(specs, [Target(t) for t in NVIDIA_TARGETS])


def test_every_kernel_compiles_for_every_nvidia_target(nvidia_rows):
    failed = [(r.kernel, r.target, r.error) for r in nvidia_rows if r.status != "ok"]
    assert not failed
    assert {r.target for r in nvidia_rows} == set(NVIDIA_TARGETS)
    assert all(r.registers and r.registers <= 255 for r in nvidia_rows)


def test_decode_kernels_do_not_spill(nvidia_rows):
    spills = [(r.kernel, r.target, r.spill_bytes) for r in nvidia_rows
              if r.kernel.startswith("attention_decode") and r.spill_bytes]
    assert not spills


def test_matrix_shim_becomes_mma_sync_and_ldmatrix(nvidia_rows):
    for r in nvidia_rows:
        if r.kernel.startswith("mma_tile"):
            assert r.instructions["mma"] == 2, r  # 16x16x16 = two m16n8k16
            assert r.instructions["ldmatrix"] >= 2, r


def test_cluster_decode_kernel_builds_for_sm_90_and_is_refused_below():
    """The clustered decode merge (block clusters, sm_90+; not in the default set every target
    builds): on sm_90 the kernel carries its cluster shape and the distributed-shared-memory
    stores and barriers; on sm_80 its instantiation stops at the static_assert, never a kernel
    that would trap."""
    pytest.importorskip("cuda.bindings")
    s = manifest.spec("attention_decode", "split_cluster", dtype="fp16", head_dim=128, rows=4, paged=False,
                      threads=256, unroll=2, stages=4, cluster=2)
    row = toolchain.compile_one(s, Target("sm_90"))
    assert row.status == "ok" and row.spill_bytes == 0, row
    from ikport.dispatch import get_backend
    from ikport.backends.source import kernel_source

    be = get_backend("cuda")
    source = kernel_source(s.source_file, [(s.name_expr, s.params_type)])
    ptx = be.compile(source, [s.name_expr], [], Target("sm_90")).assembly
    assert ".reqnctapercluster 2, 1, 1" in ptx
    assert "st.shared::cluster.f32" in ptx and "mapa.shared::cluster" in ptx
    assert "barrier.cluster.arrive.release" in ptx and "barrier.cluster.wait.acquire" in ptx
    with pytest.raises(CompileError, match="block clusters: NVIDIA sm_90 and newer only"):
        be.compile(source, [s.name_expr], [], Target("sm_80"))


def test_compile_error_names_kernel_target_options_and_log():
    pytest.importorskip("cuda.bindings")
    from ikport.dispatch import get_backend

    with pytest.raises(CompileError) as e:
        get_backend("cuda").compile("__global__ void broken( { }", ["broken"], ["-DX=1"], Target("sm_90"))
    msg = str(e.value)
    assert "broken" in msg and "sm_90" in msg and "-DX=1" in msg and "error" in msg.lower()


def test_failed_row_carries_first_error_line(monkeypatch):
    def boom(*a, **k):
        raise CompileError("k", Target("sm_90"), [], "ikport.cu(3): error: expected a ;\nmore")

    monkeypatch.setattr(toolchain, "_compile", boom)
    row = toolchain.compile_one(next(manifest.default_instantiations()), Target("sm_90"))
    assert row.status == "failed" and "expected a ;" in row.error


def test_cli_compile_json():
    pytest.importorskip("cuda.bindings")
    out = subprocess.run(
        [sys.executable, "-m", "ikport", "compile", "--target", "sm_90", "--json", "--filter", "mma_tile"],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = json.loads(out)
    assert len(rows) == 4 and all(r["status"] == "ok" and r["target"] == "sm_90" for r in rows)
    assert {"kernel", "target", "status", "error"} <= set(rows[0])


AMD_TARGETS = ["gfx90a", "gfx942", "gfx1100"]


@pytest.fixture(scope="module")
def amd_rows():
    from ikport.backends.amd_offline import AmdOfflineCompiler

    if not AmdOfflineCompiler.available():
        pytest.fail("clang-19 / ROCm device libraries missing: run ci/setup-tests.sh")
    specs = list(manifest.default_instantiations())
    return toolchain.compile_all(specs, [Target(t) for t in AMD_TARGETS])


@pytest.mark.amd_offline
def test_every_kernel_compiles_for_every_amd_target(amd_rows):
    failed = [(r.kernel, r.target, r.error) for r in amd_rows if r.status != "ok"]
    assert not failed
    for r in amd_rows:
        assert r.wavefront_size == Target(r.target).warp_size, r
        assert r.spill_bytes == 0, r  # no scratch in any kernel
        if r.kernel.startswith("mma_tile"):
            assert r.instructions["mma"] >= 1, r  # v_mfma / v_wmma, never a scalar fallback


@pytest.mark.amd_offline
def test_cluster_decode_kernel_is_refused_on_amd():
    """No block clusters on AMD: instantiating the clustered decode kernel stops at its
    static_assert (the dispatcher never asks: ArchFacts.clusters is False there)."""
    s = manifest.spec("attention_decode", "split_cluster", dtype="bf16", head_dim=64, rows=8, paged=True,
                      threads=256, unroll=2, stages=2, cluster=4)
    row = toolchain.compile_one(s, Target("gfx942"))
    assert row.status == "failed" and "block clusters" in row.error, row
