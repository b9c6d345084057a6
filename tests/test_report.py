"""The portability report (ikport/report.py), on the CPU: the occupancy estimate against hand-computed
cases, REPORT.md/compile.json from fake compile rows and a fake result file, and the instruction
checks over the real manifest for the NVIDIA targets (the AMD ones: tests/test_compile.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ikport import manifest, plan, report
from ikport.backends.target import ALL_TARGETS, ARCH_TABLE, Target
from ikport.manifest import spec_from_uri
from ikport.toolchain import CompileRow

NVIDIA_TARGETS = ["sm_80", "sm_89", "sm_90"]
SPLIT = "attention_decode.split[dtype=fp16,head_dim=128,rows=4,paged=false,threads=128,unroll=4,stages={s}]"
MMA = "mma_tile.tile[dtype=fp16,b_transposed=false]"


# ---- occupancy: each case worked by hand ------------------------------------------------------
def test_nvidia_register_limited():
    # 160 regs x 32 lanes = 5120 per warp (a multiple of 256); 65536 // 5120 = 12 warps = 3 blocks of 4.
    o = report.estimate_occupancy("sm_90", 160, None, None, 128, 8320)
    assert (o.blocks, o.warps, o.limiter) == (3, 12, "registers")
    assert o.percent == 18.8  # 12 warps x 32 / 2048 threads


def test_nvidia_full_occupancy_names_threads():
    # 32 regs -> 1024 per warp -> 64 warps = 16 blocks; 2048 threads // 128 = 16 too: a tie.
    o = report.estimate_occupancy("sm_90", 32, None, None, 128, 1024)
    assert (o.blocks, o.percent, o.limiter) == (16, 100.0, "threads")


def test_nvidia_register_granularity_rounds_up():
    # 33 regs x 32 = 1056 -> 1280 per warp; 65536 // 1280 = 51 warps = 12 blocks of 4 (not 15).
    o = report.estimate_occupancy("sm_90", 33, None, None, 128, 0)
    assert (o.blocks, o.limiter) == (12, "registers")


def test_nvidia_block_cap_and_shared_memory():
    # sm_89: 80 regs -> 2560 per warp -> 25 one-warp blocks, but at most 24 blocks per SM.
    o = report.estimate_occupancy("sm_89", 80, None, None, 32, 1536)
    assert (o.blocks, o.limiter, o.percent) == (24, "blocks", 50.0)
    # sm_80: 164 KiB per SM // (80 KiB + 1 KiB reserved) = 2 blocks.
    o = report.estimate_occupancy("sm_80", 32, None, None, 128, 80 * 1024)
    assert (o.blocks, o.limiter) == (2, "shared")


def test_cdna_unified_vgprs_and_agprs():
    # .vgpr_count 314 already holds the 58 AGPRs: 314 -> 320 (granule 8); 512 // 320 = 1 wave per
    # SIMD; 4 SIMDs = 4 waves = 2 blocks of 2 waves (128 threads, wave64).
    o = report.estimate_occupancy("gfx90a", 314, 58, 100, 128, 4160)
    assert (o.blocks, o.warps, o.limiter, o.waves_per_simd) == (2, 4, "registers", 1.0)
    assert o.percent == 12.5


def test_cdna_sgprs_limit():
    # 40 VGPRs allow the maximum 8 waves; 800 // 112 SGPRs = 7 waves per SIMD -> 28 one-wave blocks.
    o = report.estimate_occupancy("gfx942", 40, 0, 112, 64, 0)
    assert (o.blocks, o.limiter) == (28, "sgprs")


def test_cdna_lds_limit():
    o = report.estimate_occupancy("gfx942", 32, 0, 30, 256, 40 * 1024)
    assert (o.blocks, o.limiter) == (1, "shared")  # 64 KiB // 40 KiB


def test_rdna3_wave32_register_file():
    # 145 -> 168 (granule 24); 1536 // 168 = 9 waves per SIMD x 4 SIMD32 = 36 waves = 9 blocks of 4.
    o = report.estimate_occupancy("gfx1100", 145, None, 63, 128, 8320)
    assert (o.blocks, o.warps, o.limiter) == (9, 36, "registers")


def test_no_register_count_no_estimate():
    assert report.estimate_occupancy("sm_90", None, None, None, 128, 0) is None


# ---- launch shapes (the planners') ------------------------------------------------------------
def test_every_manifest_kernel_has_a_launch_shape():
    """A new kernel needs a launch shape from its planner (ikport.plan.launch_of), or its occupancy
    goes blank in the report."""
    for arch in ("sm_90", "gfx942"):
        missing = {s.uri for s in manifest.default_instantiations() if plan.launch_of(s, ARCH_TABLE[arch]) is None}
        assert not missing, arch


def test_split_shared_memory_follows_warp_size_and_ring():
    merge32 = plan.launch_of(spec_from_uri(SPLIT.format(s=0)), ARCH_TABLE["sm_90"])
    merge64 = plan.launch_of(spec_from_uri(SPLIT.format(s=0)), ARCH_TABLE["gfx942"])
    assert merge32.dynamic_shared_bytes == 4 * 4 * 130 * 4 and merge64.dynamic_shared_bytes == 2 * 4 * 130 * 4
    ring = plan.launch_of(spec_from_uri(SPLIT.format(s=3)), ARCH_TABLE["sm_90"])
    assert ring.dynamic_shared_bytes == 3 * 4 * 2 * 128 * 16 and ring.async_copy
    mma = plan.launch_of(spec_from_uri(MMA), ARCH_TABLE["gfx942"])
    assert mma.threads == 64 and mma.matrix


def test_report_rows_take_the_planners_launch():
    entry = report.enrich(row(SPLIT.format(s=3), "sm_90"))
    assert entry.launch == plan.launch_of(spec_from_uri(SPLIT.format(s=3)), ARCH_TABLE["sm_90"])


# ---- instruction checks on fake rows ----------------------------------------------------------
def row(kernel: str, target: str, compiler: str | None = None, **kw) -> CompileRow:
    defaults = {"status": "ok", "registers": 64, "shared_bytes": 1536, "spill_bytes": 0,
                "instructions": {"mma": 0, "ldmatrix": 0, "cp_async": 0}}
    if Target(target).vendor == "hip":
        defaults.update(agprs=0, sgprs=30, wavefront_size=Target(target).warp_size)
    defaults.update(kw)
    return CompileRow(kernel, target, compiler or report.default_route(Target(target)), **defaults)


def test_checks_catch_a_shim_regression():
    good = report.enrich(row(MMA, "sm_90", instructions={"mma": 2, "ldmatrix": 2, "cp_async": 0}))
    assert [c.name for c in good.checks] == ["mma", "ldmatrix", "cp_async"] and all(c.ok for c in good.checks)
    scalar = report.enrich(row(MMA, "gfx942", instructions={"mma": 0, "ldmatrix": 0, "cp_async": 0}))
    assert [c.name for c in scalar.checks if not c.ok] == ["mma"]
    no_async = report.enrich(row(SPLIT.format(s=3), "sm_80"))
    assert [c.name for c in no_async.checks if not c.ok] == ["cp_async"]
    amd_ring = report.enrich(row(SPLIT.format(s=3), "gfx90a"))  # no cp.async on AMD: 0 expected
    assert all(c.ok for c in amd_ring.checks)
    assert report.enrich(row(MMA, "gfx90a", "hiprtc")).checks == []  # no ISA text to count


# ---- the whole report from fake data ----------------------------------------------------------
def fake_rows() -> list[CompileRow]:
    rows = []
    for t in ALL_TARGETS:
        hip = Target(t).vendor == "hip"
        mma = {"mma": 1 if hip else 2, "ldmatrix": 0 if hip else 2, "cp_async": 0}
        rows.append(row(MMA, t, instructions=mma))
        rows.append(row(SPLIT.format(s=0), t, registers=160, shared_bytes=0))
    rows.append(row(MMA, "gfx90a", "hiprtc", registers=32, agprs=4))
    rows.append(CompileRow(SPLIT.format(s=3), "gfx1100", "clang-19", "failed",
                           "ikport.hip:12: error: no matching function"))
    return rows


def fake_results(folder: Path) -> None:
    folder.mkdir()
    shape = {"B": 8, "Hq": 32, "Hkv": 8, "L": 4096, "D": 128, "dtype": "fp16", "page_size": 0}
    (folder / "decode-h100.json").write_text(json.dumps({
        "device": "NVIDIA H100 80GB HBM3", "ceiling_GBps": 3000.0, "results": [
            {"workload": "D1", "impl": "ikport", "median_us": 60.0, "GBps": 2000.0, "shape": shape},
            {"workload": "D1", "impl": "sdpa-cudnn", "median_us": 55.0, "GBps": 2400.0},
            {"workload": "D1", "impl": "hf-repeat-kv", "median_us": 700.0, "GBps": 190.0},
        ]}))
    (folder / "decode-tuning-h100.json").write_text(json.dumps(  # not the protocol shape: skipped
        {"device": "NVIDIA H100 80GB HBM3", "results": [{"workload": "D1", "unroll": 2, "median_us": 1.0}]}))
    (folder / "decode-h100-abc123.json").write_text(json.dumps({  # an earlier run kept: skipped
        "device": "NVIDIA H100 80GB HBM3", "ceiling_GBps": 3000.0, "results": [
            {"workload": "D1", "impl": "ikport", "median_us": 90.0, "GBps": 1500.0}]}))


@pytest.fixture
def written(tmp_path):
    fake_results(tmp_path / "results")
    entries = [report.enrich(r) for r in fake_rows()]
    meta = report.Meta("2026-01-01", "abc123", {"nvrtc": "nvrtc 13.0"}, list(ALL_TARGETS))
    path = report.write_outputs(entries, report.load_results(tmp_path / "results"), meta, tmp_path / "out")
    return path, path.read_text()


def test_report_has_header_tables_and_no_amd_gpu_text(written):
    _, text = written
    assert text.startswith("<!-- generated by `nox -s report`") and "do not edit" in text.splitlines()[0]
    assert "| sm_80 | sm_89 | sm_90 | gfx90a | gfx942 | gfx1100 | gfx90a (hiprtc) |" in text
    assert "| gfx90a | not measured: no AMD GPU | - |" in text
    assert "| gfx1100 | not measured: no AMD GPU | - |" in text
    assert "| sm_90 | NVIDIA H100 80GB HBM3 | [decode-h100.json](../results/decode-h100.json) |" in text
    # ikport 2000 of 3000 GB/s; the best peer is the fastest one, not the first one.
    assert ("| D1 | B=8 Hq=32 Hkv=8 L=4096 D=128 fp16 | ikport | 60 | 2000.0 GB/s | 66.7% | sdpa-cudnn | 55 | 80.0% "
            "| 0.92x |") in text
    assert "decode-tuning-h100.json" not in text and "decode-h100-abc123.json" not in text
    assert "**failed**: `ikport.hip:12: error: no matching function`" in text
    assert "13 of 14 compiled" in text
    assert "no hand-written CUDA-only variant" in text
    assert "[../rocm.md](../rocm.md)" in text


def test_report_checks_and_side_by_side(written):
    _, text = written
    check_row = next(ln for ln in text.splitlines() if ln.startswith("| mma_tile.tile | PASS"))
    assert "mma.sync x2" in check_row and "mfma x1" in check_row and "wmma x1" in check_row
    assert "| registers / VGPRs | 64 | 64 | 64 | 64 | 64 | 64 | 32 |" in text


def test_compile_json_is_machine_readable(written):
    path, _ = written
    data = json.loads((path.parent / "compile.json").read_text())
    assert data["targets"] == list(ALL_TARGETS) and data["arch_facts"]["gfx942"]["warp_size"] == 64
    r = next(r for r in data["rows"] if r["kernel"] == SPLIT.format(s=0) and r["target"] == "sm_90")
    assert r["occupancy"]["blocks"] == 3 and r["dynamic_shared_bytes"] == 8320 and r["wavefront_size"] == 32
    assert {c["name"] for c in r["instruction_checks"]} == {"mma", "ldmatrix", "cp_async"}
    assert "seconds" not in r


def test_images_are_linked_or_their_absence_said(written, tmp_path, monkeypatch):
    path, text = written
    have = report._pyplot() is not None
    assert ("![roof](roof.png)" in text) == have and (path.parent / "roof.png").exists() == have
    monkeypatch.setattr(report, "_pyplot", lambda: None)  # CI without matplotlib
    entries = [report.enrich(r) for r in fake_rows()]
    meta = report.Meta("2026-01-01", "abc", {}, list(ALL_TARGETS))
    again = report.write_outputs(entries, [], meta, path.parent)
    text = again.read_text()
    assert "Plots omitted: matplotlib is not installed" in text and "![roof]" not in text
    assert not (path.parent / "roof.png").exists() and not (path.parent / "resources.png").exists()


def test_amd_result_file_fills_its_row_and_uses_its_own_roof(tmp_path):
    """A run on an MI300X whose file still carries the H100's ceiling: % of roof uses the
    device's own measured reads, and gfx942 is no longer 'not measured'."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "decode-mi300x.json").write_text(json.dumps({
        "device": "AMD Instinct MI300X", "ceiling_GBps": 3087.0,
        "read_measured": [{"bytes": 1 << 30, "GBps": 4000.0}],
        "results": [{"workload": "D1", "impl": "ikport", "median_us": 50.0, "GBps": 3000.0}]}))
    (f,) = report.load_results(folder)
    assert f.target == "gfx942" and f.roof_GBps == 4000.0 and report.rate(f, f.rows[0])[2] == 75.0
    text = report.performance_section([f], list(ALL_TARGETS))
    assert "| gfx942 | AMD Instinct MI300X |" in text and "| gfx90a | not measured: no AMD GPU | - |" in text


def test_compute_bound_files_report_tflops(tmp_path):
    """A prefill file (a compute ceiling; every row also carries an informational GB/s) is rated in
    TFLOP/s against its ceiling, not against the read roof."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "prefill-h100.json").write_text(json.dumps({
        "device": "NVIDIA H100 80GB HBM3", "ceiling_GBps": 3087.0, "ceiling_TFLOPs": 989.0,
        "results": [{"workload": "P1", "impl": "ikport", "median_us": 1000.0, "GBps": 100.0, "TFLOPs": 494.5}]}))
    (f,) = report.load_results(folder)
    assert report.rate(f, f.rows[0]) == (494.5, "TFLOP/s", 50.0)


def test_main_exit_status_with_check(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "compile_rows", lambda *a, **k: fake_rows())
    args = ["--out", str(tmp_path / "out"), "--results", str(tmp_path / "none"), "--no-hiprtc"]
    assert report.main(args) == 0
    assert report.main(args + ["--check"]) == 1  # the failed gfx1100 row
    assert (tmp_path / "out" / "REPORT.md").is_file()


def test_row_cache_compiles_once_and_never_keeps_failures(monkeypatch):
    calls = []

    def fake_compile(spec, target, route):
        calls.append(target.arch)
        status = "ok" if target.arch == "sm_90" else "failed"
        return CompileRow(spec.uri, target.arch, route, status, registers=1)

    monkeypatch.setattr(report, "compile_one", fake_compile)
    spec = next(manifest.default_instantiations())
    for _ in range(2):
        report._cached_compile(spec, Target("sm_90"), "nvrtc", "test-compiler")
        report._cached_compile(spec, Target("sm_80"), "nvrtc", "test-compiler")
    assert calls == ["sm_90", "sm_80", "sm_80"]


# ---- the real manifest, NVIDIA targets: what CI asserts --------------------------------------
@pytest.fixture(scope="module")
def nvidia_entries(nvidia_rows):
    """The session's NVIDIA compile-all (conftest), as the report enriches it."""
    return [report.enrich(r) for r in nvidia_rows]


@pytest.mark.slow
def test_every_nvidia_instruction_check_passes(nvidia_entries):
    assert all(e.row.status == "ok" for e in nvidia_entries), [e.row.error for e in nvidia_entries]
    failed = [(e.row.kernel, e.row.target, c) for e in nvidia_entries for c in e.checks if not c.ok]
    assert not failed
    assert all(len(e.checks) == 3 for e in nvidia_entries)


@pytest.mark.slow
def test_matrix_shim_is_mma_sync_on_every_nvidia_target(nvidia_entries):
    tile = [e for e in nvidia_entries if e.launch.matrix and e.row.kernel.startswith("mma_tile.")]
    assert {e.row.target for e in tile} == set(NVIDIA_TARGETS)
    assert all(e.row.instructions["mma"] == 2 and e.row.instructions["ldmatrix"] >= 2 for e in tile)
    # W4A16 builds B in registers and loads A (x) from shared memory: mma.sync with ldmatrix
    w4 = [e for e in nvidia_entries if e.row.kernel.startswith("w4a16.mma[")]
    assert {e.row.target for e in w4} == set(NVIDIA_TARGETS)
    assert all(e.row.instructions["mma"] > 0 and e.row.instructions["ldmatrix"] > 0 for e in w4)


@pytest.mark.slow
def test_cp_async_exactly_where_the_async_shim_is_used(nvidia_entries):
    """Consistency, not presence: the manifest may or may not list async-copy instantiations."""
    uses = {(e.row.kernel, e.row.target) for e in nvidia_entries if e.launch.async_copy}
    emits = {(e.row.kernel, e.row.target) for e in nvidia_entries if e.row.instructions["cp_async"]}
    assert uses == emits


@pytest.mark.slow
def test_nvidia_occupancy_is_estimated_for_every_row(nvidia_entries):
    for e in nvidia_entries:
        assert e.occupancy is not None and 1 <= e.occupancy.blocks <= 32, e.row
