"""Every manifest kernel compiles for every NVIDIA target (NVRTC) and every AMD target
(Debian's clang-19; hipRTC for gfx90a where installed), no GPU needed (CPU). The rows come from
conftest's session fixtures, one compile-all per session; hipRTC specifics are in
tests/test_amd.py. Also: compile_all's order, parallel runs, programs and progress, and
`python -m ikport compile`."""

import importlib.util
import json
import random
import subprocess
import sys
import time

import pytest
import torch

from ikport import manifest, toolchain
from ikport.__main__ import main as ikport_main
from ikport.backends.base import CompiledModule, CompileError, KernelResources
from ikport.backends.target import ALL_TARGETS, Target

NVIDIA = {t for t in ALL_TARGETS if Target(t).vendor == "cuda"}
AMD = {t for t in ALL_TARGETS if Target(t).vendor == "hip"}


@pytest.mark.slow
def test_every_kernel_compiles_for_every_nvidia_target(nvidia_rows):
    failed = [(r.kernel, r.target, r.error) for r in nvidia_rows if r.status != "ok"]
    assert not failed
    assert {r.target for r in nvidia_rows} == NVIDIA
    assert len(nvidia_rows) == len(NVIDIA) * len(list(manifest.default_instantiations()))
    assert all(r.registers and r.registers <= 255 for r in nvidia_rows)


@pytest.mark.slow
def test_decode_kernels_do_not_spill(nvidia_rows):
    spills = [(r.kernel, r.target, r.spill_bytes) for r in nvidia_rows
              if r.kernel.startswith("attention_decode") and r.spill_bytes]
    assert not spills


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.amd_offline
def test_every_kernel_compiles_for_every_amd_target(amd_rows):
    failed = [(r.kernel, r.target, r.compiler, r.error) for r in amd_rows if r.status != "ok"]
    assert not failed
    clang = [r for r in amd_rows if r.compiler == "clang-19"]
    assert {r.target for r in clang} == AMD
    assert len(clang) == len(AMD) * len(list(manifest.default_instantiations()))
    for r in clang:
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


@pytest.mark.slow
@pytest.mark.amd_offline
def test_hiprtc_compiles_every_kernel_for_gfx90a(amd_rows):
    """The runtime compiler of the installed HIP builds the whole manifest for gfx90a (its code
    objects read back with the resources clang-19's have; HIP 5.2's compiler gives some decode
    kernels 16 bytes of scratch that clang-19 does not, so no scratch check here)."""
    from ikport.backends.hip import amdhip64_path

    if amdhip64_path() is None or importlib.util.find_spec("hip") is None:
        pytest.skip("hip-python or the HIP runtime (libamdhip64) is missing (ci/setup-amd.sh)")
    hiprtc = [r for r in amd_rows if r.compiler == "hiprtc"]
    assert len(hiprtc) == len(list(manifest.default_instantiations()))
    assert not [(r.kernel, r.error) for r in hiprtc if r.status != "ok"]
    assert all(r.target == "gfx90a" and r.wavefront_size == 64 and r.registers for r in hiprtc)


# ---- compile_all: one kernel per program and one program per source file give the same rows -----
def _sample(family: str, n: int, kernel: str | None = None) -> list:
    """The first `n` manifest instantiations of `family` (of its `kernel`)."""
    return [s for s in manifest.default_instantiations()
            if s.family == family and kernel in (None, s.kernel)][:n]


def _same(rows, others) -> list[str]:
    """Rows that differ in anything but the compile time."""
    by_key = {(r.kernel, r.target, r.compiler): r for r in others}
    diffs = []
    for r in rows:
        a, b = r.as_dict(), by_key[(r.kernel, r.target, r.compiler)].as_dict()
        a.pop("seconds"), b.pop("seconds")
        if a != b:
            diffs.append(f"{a}\n  != {b}")
    return diffs


@pytest.mark.slow
def test_one_program_per_source_file_gives_the_rows_of_one_kernel_programs(nvidia_rows):
    """compile_all(together=True), which amd_rows takes, against one kernel per program (what the
    runtime builds): the same status, resources and instruction counts per kernel. NVIDIA: one
    program of a few kernels of each source file against the session's one-kernel rows."""
    specs = (_sample("mma_tile", 4) + _sample("w4a16", 2, "mma") + _sample("w4a16", 1, "gemv")
             + _sample("attention_decode", 2, "split")
             + _sample("attention_decode", 1, "split_mma"))
    together = toolchain.compile_all(specs, [Target("sm_90")], together=True)
    assert len(together) == len(specs) and all(r.status == "ok" for r in together)
    assert not _same(together, nvidia_rows)


@pytest.mark.slow
@pytest.mark.amd_offline
def test_amd_rows_equal_one_kernel_programs(amd_rows):
    """The AMD side of the check above: a kernel of each source file compiled alone (clang-19 on
    both matrix units, and hipRTC where installed) gives the row the session's one program per
    file gave."""
    specs = (_sample("mma_tile", 1) + _sample("w4a16", 1, "mma")
             + _sample("attention_decode", 1, "split_mma"))
    hiprtc = any(r.compiler == "hiprtc" for r in amd_rows)
    alone = toolchain.compile_all(specs, [Target("gfx90a"), Target("gfx1100")], extra_hiprtc=hiprtc)
    assert all(r.status == "ok" for r in alone)
    assert not _same(alone, amd_rows)


# ---- compile_all's machinery, with a stand-in compiler -------------------------------------------
def _fake_compile(calls: list, fail: str = ""):
    """A compiler that takes a few random milliseconds, 'assembles' each kernel to a PTX .entry
    with as many mma.sync as its name has characters, and fails any program naming `fail`."""
    def compile_(route, source, names, target):
        calls.append((route, target.arch, tuple(names)))
        time.sleep(random.uniform(0, 0.005))
        if fail and any(fail in n for n in names):
            raise CompileError(names[0], target, [], f"ikport.cu(1): error: {fail} is broken")
        lowered = {n: f"_Z{i}k" for i, n in enumerate(names)}
        asm = "".join(f".visible .entry {lowered[n]}(\n" + "mma.sync.aligned.m16n8k16 x;\n" * len(n)
                      for n in names)
        resources = {n: KernelResources(registers=len(n)) for n in names}
        return CompiledModule(target, b"", lowered, "fake", "", resources, asm)
    return compile_


def test_compile_all_rows_come_in_plan_order_whatever_finishes_first(monkeypatch):
    calls, seen = [], []
    monkeypatch.setattr(toolchain, "_compile", _fake_compile(calls))
    monkeypatch.setattr(toolchain, "_prepare", lambda route: None)
    specs = list(manifest.default_instantiations())[:7]
    targets = [Target("sm_80"), Target("gfx90a")]
    rows = toolchain.compile_all(specs, targets, extra_hiprtc=True, jobs=3,
                                 progress=lambda done, total, row: seen.append((done, total, row)))
    plan = toolchain.compile_plan(specs, targets, extra_hiprtc=True)
    assert len(plan) == len(rows) == len(calls) == 7 * 3
    assert [(r.kernel, r.target, r.compiler) for r in rows] == [
        (s.uri, t.arch, route) for s, t, route in plan]
    assert [r.compiler for r in rows[:3]] == ["nvrtc", "clang-19", "hiprtc"]
    assert [d for d, _, _ in seen] == list(range(1, 22)) and {t for _, t, _ in seen} == {21}
    assert sorted(id(r) for _, _, r in seen) == sorted(id(r) for r in rows)
    assert all(r.status == "ok" and r.registers == len(s.name_expr)
               for r, (s, _, _) in zip(rows, plan))
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        toolchain.compile_all(specs, targets, jobs=0)


def test_compile_all_together_compiles_one_program_per_source_file(monkeypatch):
    calls = []
    monkeypatch.setattr(toolchain, "_compile", _fake_compile(calls))
    monkeypatch.setattr(toolchain, "_prepare", lambda route: None)
    specs = _sample("mma_tile", 3) + _sample("w4a16", 2)
    rows = toolchain.compile_all(specs, [Target("sm_90"), Target("gfx942")], jobs=2, together=True)
    assert sorted((arch, len(names)) for _, arch, names in calls) == [
        ("gfx942", 2), ("gfx942", 3), ("sm_90", 2), ("sm_90", 3)]
    # each row counts its own kernel's part of the program's assembly
    assert [r.instructions["mma"] for r in rows] == [
        len(s.name_expr) for s in specs for _ in range(2)]


def test_compile_all_together_names_the_kernel_that_breaks_a_program(monkeypatch):
    """A failed program is compiled again kernel by kernel: only the broken kernel's row fails,
    with its own error."""
    calls = []
    specs = _sample("mma_tile", 4)
    broken = specs[2].name_expr
    monkeypatch.setattr(toolchain, "_compile", _fake_compile(calls, fail=broken))
    monkeypatch.setattr(toolchain, "_prepare", lambda route: None)
    rows = toolchain.compile_all(specs, [Target("sm_90")], jobs=1, together=True)
    assert [r.status for r in rows] == ["ok", "ok", "failed", "ok"]
    assert rows[2].error == f"ikport.cu(1): error: {broken} is broken"
    assert len(calls) == 1 + 4


def test_targets_all_native_and_lists():
    assert [t.arch for t in toolchain.parse_targets("all")] == list(ALL_TARGETS)
    assert [t.arch for t in toolchain.parse_targets("sm_90, gfx942")] == ["sm_90", "gfx942"]
    with pytest.raises(ValueError, match="unknown target 'sm_12'"):
        toolchain.parse_targets("sm_12")
    with pytest.raises(ValueError, match="name 'all', 'native' or a comma list"):
        toolchain.parse_targets(" , ")
    if torch.cuda.is_available():
        assert toolchain.parse_targets("native")[0].arch in ALL_TARGETS + ("sm_86", "sm_90a")
    else:
        with pytest.raises(ValueError, match="'native' is the local GPU's target, and torch sees"):
            toolchain.parse_targets("native")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ikport", "compile", *args], capture_output=True,
                          text=True)


def test_cli_progress_lines_and_jobs():
    """Not on a terminal (a log): one line per compile on stderr, with the time elapsed and left."""
    pytest.importorskip("cuda.bindings")
    done = _cli("--target", "sm_80,sm_90", "--filter", "mma_tile", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [ln.split("]")[0] for ln in lines] == [f"[{i}/8" for i in range(1, 9)]
    assert all(" ok " in ln and "mma_tile.tile[" in ln and " elapsed, ~" in ln for ln in lines)
    assert "8 compiled, 0 failed" in done.stdout


def test_cli_errors_name_the_argument(capsys):
    assert ikport_main(["compile", "--target", "sm_12"]) == 2
    assert "--target sm_12: unknown target 'sm_12'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        ikport_main(["compile", "--jobs", "0"])
    assert exit_.value.code == 2
    assert "argument --jobs: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_native_without_a_gpu_says_so(capsys):
    assert ikport_main(["compile", "--target", "native"]) == 2
    out, err = capsys.readouterr()
    assert not out
    assert "--target native: 'native' is the local GPU's target, and torch sees no GPU" in err
