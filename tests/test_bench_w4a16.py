"""CPU tests of the W4A16 benchmark's pure-Python parts: workloads, tinygemm's operands, rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ikport
from ikport.bench import __main__ as bench_main
from ikport.bench import harness
from ikport.bench import w4a16 as bench


class FakeInt4Weight:
    """Stands in for ikport.int4.Int4Weight: symmetric INT4 codes -8..7 (stored +8) times one
    scale per group of `group` along K, scales in the weight's dtype, [N, K/G] or transposed."""

    def __init__(self, w: torch.Tensor, group: int = 128, *, transposed: bool = False) -> None:
        n, k = w.shape
        g = w.float().reshape(n, k // group, group)
        scales = (g.abs().amax(-1) / 7).clamp_min(1e-8).to(w.dtype)
        codes = torch.round(g / scales.float().unsqueeze(-1)).clamp(-8, 7) + 8
        self.codes = codes.to(torch.uint8).reshape(n, k)
        self.scales = scales.t().contiguous() if transposed else scales
        self._scales_nk = scales
        self.zeros = None
        self.group_size = group
        self.in_features, self.out_features = k, n
        self.qweight = bench.pack_nibbles(self.codes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.codes.shape
        q = self.codes.float().reshape(n, k // self.group_size, self.group_size) - 8
        return (q * self._scales_nk.float().unsqueeze(-1)).reshape(n, k).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()


def fake_matmul(x: torch.Tensor, weight: Any, *, options: Any = None) -> torch.Tensor:
    if options is not None and options.variant == "gemv" and x.shape[0] > 1:
        raise ValueError("the gemv variant takes M=1 only")
    return (x.float() @ weight.dequantize().T).to(x.dtype)


def test_workload_table() -> None:
    by_id = {s.id: s for s in bench.SHAPES}
    assert [(s.k, s.n) for s in bench.SHAPES] == [(4096, 4096), (4096, 14336), (14336, 4096)]
    assert by_id["W1"].weight_bytes == 4096 * 4096 // 2 + 32 * 4096 * 2 == 8_650_752
    assert by_id["W2"].weight_bytes == by_id["W3"].weight_bytes == 30_277_632  # docs/benchmarks.md: 30.3 MB
    w = bench.Workload(by_id["W2"], 1)
    assert w.id == "W2" and w.bytes == 30_277_632 + 2 * (4096 + 14336)
    w16 = bench.Workload(by_id["W2"], 16)
    assert w16.id == "W2@16" and w16.flops == 2 * 16 * 14336 * 4096
    assert w16.bytes == 30_277_632 + 2 * 16 * (4096 + 14336)
    full = bench.workloads(quick=False)
    assert [s.id for s, _ in full] == ["W1", "W2", "W3"]
    ids = [w.id for _, ws in full for w in ws]
    assert len(ids) == len(set(ids)) == 3 * len(bench.M_VALUES)
    assert {"W1", "W3@2048", "W2@128"} <= set(ids)
    quick = bench.workloads(quick=True, only=("W2",))
    assert [(s.id, [w.m for w in ws]) for s, ws in quick] == [("W2", [1, 16])]


def test_parse_only() -> None:
    assert bench.parse_only("w2") == ("W2",)
    assert bench.parse_only("W1, W3") == ("W1", "W3")
    for bad in ("W4", "", "W1,D1"):
        with pytest.raises(Exception, match="unknown shape"):
            bench.parse_only(bad)


def test_implementations_per_m() -> None:
    w1 = bench.Workload(bench.SHAPES[0], 1)
    names = [i.name for i in bench.implementations(w1, ("naive", "gemv"))]
    assert names == [
        "ikport",
        "ikport-bf16",
        "ikport-naive",
        "ikport-gemv",
        "cublas-fp16",
        "tinygemm",
    ]
    big = bench.Workload(bench.SHAPES[0], 128)
    assert [i.name for i in bench.implementations(big, ("naive",))] == [
        "ikport",
        "ikport-bf16",
        "ikport-mma",  # the default is dequant-gemm from DENSE_MIN_M rows: the kernel beside it
        "ikport-tiled",  # the tiled kernel at bench.TILED_M
        "cublas-fp16",
        "tinygemm",
    ]
    w32 = bench.Workload(bench.SHAPES[0], 32)
    assert [i.name for i in bench.implementations(w32, ("naive",))] == [
        "ikport",
        "ikport-bf16",
        "ikport-dequant-gemm",  # the default is mma below DENSE_MIN_M rows
        "ikport-tiled",
        "cublas-fp16",
        "tinygemm",
    ]
    assert [i.name for i in bench.implementations(bench.Workload(bench.SHAPES[0], 8), ())] == [
        "ikport", "ikport-bf16", "cublas-fp16", "tinygemm"]
    dtypes = {i.name: i.dtype for i in bench.implementations(w1, ())}
    assert dtypes == {
        "ikport": "fp16",
        "ikport-bf16": "bf16",
        "cublas-fp16": "fp16",
        "tinygemm": "bf16",
    }


def test_pack_nibbles_even_k_in_high_nibble() -> None:
    codes = torch.randint(0, 16, (8, 32), dtype=torch.int32)
    packed = bench.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 16) and packed.is_contiguous()
    assert torch.equal((packed >> 4).int(), codes[:, 0::2])
    assert torch.equal((packed & 0xF).int(), codes[:, 1::2])
    assert bench.pack_nibbles(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x12, 0xF0]]


def test_pack_scales_and_zeros_layout() -> None:
    s = torch.arange(6, dtype=torch.float32).reshape(3, 2)  # [N=3, K/G=2]
    z = -s
    sz = bench.pack_scales_and_zeros(s, z)
    assert sz.shape == (2, 3, 2) and sz.dtype == torch.bfloat16 and sz.is_contiguous()
    assert torch.equal(sz[..., 0].float(), s.T) and torch.equal(sz[..., 1].float(), z.T)


def _affine(
    n: int, k: int, g: int, offset: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen).float()
    s = torch.rand(n, k // g, generator=gen) * 0.1 + 0.01
    w = (q.reshape(n, k // g, g) - offset.unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(n, k), s


@pytest.mark.parametrize("kind", ["symmetric", "int-zero-point", "float-offset"])
def test_codes_for_scales_reproduce_the_weight(kind: str) -> None:
    n, k, g = 16, 256, 64
    if kind == "symmetric":
        offset = torch.full((n, k // g), 8.0)
    elif kind == "int-zero-point":
        offset = torch.randint(0, 16, (n, k // g)).float()
    else:
        offset = torch.rand(n, k // g) * 15
    w, s = _affine(n, k, g, offset)
    codes, zeros = bench.codes_for_scales(w, s, g)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 15
    again = (codes.float().reshape(n, k // g, g) - 8) * s.unsqueeze(-1) + zeros.unsqueeze(-1)
    torch.testing.assert_close(again.reshape(n, k), w, rtol=0, atol=1e-5)
    if kind == "symmetric":
        assert torch.equal(zeros, torch.zeros_like(zeros))  # exact in bf16 too


def test_codes_for_scales_rejects_other_scales() -> None:
    w, s = _affine(8, 128, 64, torch.full((8, 2), 8.0))
    with pytest.raises(ValueError, match="integer steps"):
        bench.codes_for_scales(w, s * 0.7, 64)
    with pytest.raises(ValueError):
        bench.codes_for_scales(w, s * 2.5, 64)  # 2.5 x the step: codes off-grid


def test_estimate_group_scales_is_exact_for_code_times_scale() -> None:
    w, s = _affine(8, 256, 128, torch.full((8, 2), 8.0), seed=3)
    torch.testing.assert_close(bench.estimate_group_scales(w, 128), s, rtol=1e-6, atol=0)
    flat = torch.zeros(2, 128)
    assert torch.equal(bench.estimate_group_scales(flat, 128), torch.ones(2, 1))


@pytest.mark.parametrize("transposed", [False, True])
def test_tinygemm_codes_from_an_int4_weight(transposed: bool) -> None:
    w = torch.randn(24, 384) * 0.02
    wq = FakeInt4Weight(w.to(torch.bfloat16), 128, transposed=transposed)
    tc = bench.tinygemm_codes(wq)
    assert tc.source == (
        "Int4Weight.scales [K/G, N]" if transposed else "Int4Weight.scales [N, K/G]"
    )
    assert torch.equal(tc.codes, wq.codes.int())  # the weight's own codes
    assert torch.equal(tc.zeros, torch.zeros_like(tc.zeros))
    wq.scales = torch.ones(5)  # a layout it cannot read: falls back to the value steps
    assert bench.tinygemm_codes(wq).source.startswith("the dequantized weight's step")


def test_tinygemm_on_cpu_matches_the_reference() -> None:
    """The same codes, scales and zeros through torch's CPU tinygemm (the CUDA one packs the
    codes as pack_nibbles does, then computes the same (q - 8) * scale + zero)."""
    w = torch.randn(64, 512) * 0.02
    wq = FakeInt4Weight(w.to(torch.bfloat16))
    tg, source = bench.tinygemm_weight(wq)
    assert tg.scales_and_zeros.shape == (4, 64, 2) and "Int4Weight.scales" in source
    assert source.endswith("zeros 0")
    x = torch.randn(3, 512).to(torch.bfloat16)
    out = bench.tinygemm_mm(x, tg)
    assert out.shape == (3, 64) and out.dtype == torch.bfloat16
    assert bench.relative_error(out, bench.reference(x, wq.dequantize())) < bench.TOLERANCE["bf16"]


def test_relative_error() -> None:
    ref = torch.tensor([[1.0, -4.0]])
    assert bench.relative_error(torch.tensor([[1.0, -3.0]]), ref) == 0.25
    assert bench.relative_error(torch.tensor([[1.0, float("nan")]]), ref) == float("inf")
    assert bench.relative_error(torch.zeros(2, 2), ref) == float("inf")


SMALL = bench.Shape("T1", 256, 64)


def _fake_timing(*_args: object, **_kwargs: object) -> harness.Timing:
    return harness.Timing.from_samples([10.0, 11.0, 12.0], sleep_cycles=1000, sleep_us=100.0)


@pytest.fixture
def cpu_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake Int4Weight and ikport.w4a16_matmul, inputs on the CPU, GPU timers replaced."""
    monkeypatch.setattr(bench, "quantize", lambda w: FakeInt4Weight(w, bench.GROUP_SIZE))
    monkeypatch.setattr(ikport, "w4a16_matmul", fake_matmul, raising=False)
    monkeypatch.setattr(harness, "l2_cache_bytes", lambda: 1 << 16)
    monkeypatch.setattr(harness, "kernel_time", _fake_timing)
    monkeypatch.setattr(harness, "eager_time", _fake_timing)
    monkeypatch.setattr(
        harness, "check_sleep_insensitive", lambda *a, **k: (_fake_timing(), _fake_timing())
    )


def _bench(work: list[bench.Workload], variants: tuple[str, ...] = ()) -> bench.Results:
    data = bench.make_weight_sets(work[0].shape, 2, device="cpu")
    assert data.tinygemm_problem is None and len(data.tinygemm) == 2
    results = bench.Results()
    for w in work:
        bench.bench_workload(w, data, results, variants, bench.Options())
    return results


def test_bench_workload_rows(cpu_bench: None) -> None:
    results = _bench([bench.Workload(SMALL, 1), bench.Workload(SMALL, 128)], ("naive", "gemv"))
    assert not results.errors and not results.skipped
    by = {(r["workload"], r["impl"]): r for r in results.rows}
    assert set(by) == {
        *(
            (wid, i)
            for wid in ("T1", "T1@128")
            for i in ("ikport", "ikport-bf16", "cublas-fp16", "tinygemm")
        ),
        ("T1", "ikport-naive"),
        ("T1", "ikport-gemv"),
        ("T1@128", "ikport-mma"),
        ("T1@128", "ikport-tiled"),
    }
    for (wid, impl), row in by.items():
        assert set(harness.ROW_KEYS) <= set(row)
        m = 1 if wid == "T1" else 128
        assert (row["M"], row["N"], row["K"], row["shape_id"]) == (m, 64, 256, "T1")
        assert row["dtype"] == ("bf16" if impl in ("ikport-bf16", "tinygemm") else "fp16")
        assert row["bytes"] == bench.Workload(SMALL, m).bytes
        assert row["median_us"] == 11.0 and row["median_us_sleep2x"] == 11.0
        assert row["rel_err"] < bench.TOLERANCE[row["dtype"]]
        assert ("TFLOPs" in row) == (m >= bench.TFLOPS_FROM_M)
    assert by[("T1@128", "ikport")]["TFLOPs"] == round(2 * 128 * 64 * 256 / 11e6, 1)
    assert results.speedups["T1"] == {"cublas-fp16": 1.0, "tinygemm": 1.0}
    assert results.speedups_bf16["T1"] == {"tinygemm": 1.0}
    # tinygemm carries where its scales came from
    assert "Int4Weight.scales" in by[("T1", "tinygemm")]["note"]


def test_variant_refusing_an_m_is_unsupported(cpu_bench: None) -> None:
    results = _bench([bench.Workload(SMALL, 16)], ("gemv",))
    assert results.unsupported == [
        {
            "workload": "T1@16",
            "impl": "ikport-gemv",
            "reason": "ValueError: the gemv variant takes M=1 only",
        }
    ]
    assert not results.errors


def test_wrong_ikport_result_aborts(cpu_bench: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def off(x: torch.Tensor, weight: Any, *, options: Any = None) -> torch.Tensor:
        return fake_matmul(x, weight) * 1.01

    monkeypatch.setattr(ikport, "w4a16_matmul", off, raising=False)
    with pytest.raises(bench.WrongResult, match="tolerance"):
        _bench([bench.Workload(SMALL, 1)])


def test_ikport_exception_is_an_error(cpu_bench: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> torch.Tensor:
        raise ValueError("no kernel")

    monkeypatch.setattr(ikport, "w4a16_matmul", broken, raising=False)
    results = _bench([bench.Workload(SMALL, 1)])
    assert [(e["impl"], e["reason"]) for e in results.errors] == [
        ("ikport", "ValueError: no kernel"),
        ("ikport-bf16", "ValueError: no kernel"),
    ]
    assert {r["impl"] for r in results.rows} == {"cublas-fp16", "tinygemm"}
    assert "T1" not in results.speedups


def test_results_file_and_tables(
    cpu_bench: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _bench([bench.Workload(SMALL, 1), bench.Workload(SMALL, 16)])
    meta = {
        "device": "NVIDIA H100 80GB HBM3",
        "driver": "580.159.04",
        "commit": "0" * 40,
        "date": "2026-11-25",
        "versions": {"torch": "2.11.0+cu130"},
    }
    path = harness.write_results(
        tmp_path / "w4a16-h100.json",
        command="nox -s bench-cuda -- w4a16",
        ceiling_GBps=harness.READ_ROOF_GBPS,
        results=results.rows,
        extra={"speedup_vs_peers": results.speedups, "unsupported": results.unsupported},
        meta=meta,
    )
    doc = json.loads(path.read_text())
    assert doc["ceiling_GBps"] == 3087.0 and len(doc["results"]) == 8
    results.errors.append({"workload": "T1", "impl": "ikport-x", "reason": "RuntimeError: no"})
    bench.print_tables(results)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("IKPORT ERROR T1 ikport-x")
    assert lines[-2].startswith("T1@16") and lines[-2].split()[-1] == "1.00"
    pytest.importorskip("matplotlib")
    plot = bench.plot_rows(results.rows, tmp_path / "w4a16-h100.png", "test device")
    assert plot is not None and plot.stat().st_size > 0
    assert bench.plot_rows([], tmp_path / "none.png", "test device") is None


def test_with_ikports_own_int4_api_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real quantize_weight / w4a16_matmul on the CPU (the PyTorch reference): tinygemm's
    re-encoding reproduces the Int4Weight, and the bench rows come out. Both run on the CPU, so
    a failure here is a failure."""
    from ikport import int4

    w = torch.randn(SMALL.n, SMALL.k) * 0.02
    wq = int4.quantize_weight(w.to(torch.bfloat16), group_size=128, symmetric=True)
    tc = bench.tinygemm_codes(wq)
    assert tc.source == "Int4Weight.scales [K/G, N]"  # Int4Weight keeps scales [K // G, N]
    assert torch.equal(tc.codes, wq.codes().int())  # symmetric: its own codes, zero 0
    assert torch.equal(tc.zeros, torch.zeros_like(tc.zeros))
    again = (tc.codes.float().reshape(SMALL.n, -1, 128) - 8) * tc.scales.unsqueeze(-1)
    again = again + tc.zeros.unsqueeze(-1)
    torch.testing.assert_close(again.reshape(SMALL.n, SMALL.k), wq.dequantize().float())
    variants = bench.journey_variants()
    assert variants and bench.DEFAULT_VARIANT not in variants
    monkeypatch.setattr(harness, "kernel_time", _fake_timing)
    monkeypatch.setattr(harness, "eager_time", _fake_timing)
    monkeypatch.setattr(
        harness, "check_sleep_insensitive", lambda *a, **k: (_fake_timing(), _fake_timing())
    )
    data = bench.make_weight_sets(SMALL, 2, device="cpu")
    results = bench.Results()
    bench.bench_workload(bench.Workload(SMALL, 1), data, results, variants, bench.Options())
    assert not results.errors, results.errors
    impls = {r["impl"] for r in results.rows}
    assert {"ikport", "ikport-bf16", "cublas-fp16", "tinygemm"} | {
        f"ikport-{v}" for v in variants
    } <= impls


def test_run_writes_json_and_plot(
    cpu_bench: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """run() end to end on the CPU: one small shape, M=1 and 128, fake timers and device."""
    make = bench.make_weight_sets
    monkeypatch.setattr(bench, "make_weight_sets", lambda s, n: make(s, n, device="cpu"))
    monkeypatch.setattr(bench, "SHAPES", (SMALL,))
    monkeypatch.setattr(bench, "M_VALUES", (1, 128))
    monkeypatch.setattr(bench, "journey_variants", lambda: ("gemv",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        harness, "measure_read_roof", lambda n: {"bytes": n, "median_us": 1.0, "GBps": 1.0}
    )
    monkeypatch.setattr(
        harness, "measure_read_pass", lambda n: {"bytes": n, "median_us": 8.0, "GBps": 1.0}
    )
    meta = {
        "device": "NVIDIA H100 80GB HBM3",
        "driver": "580.159.04",
        "commit": "0" * 40,
        "date": "2026-11-25",
        "versions": {"torch": "2.11.0+cu130"},
    }
    monkeypatch.setattr(harness, "device_meta", lambda commit=None: dict(meta))
    out = tmp_path / "w4a16-h100.json"
    args = bench_main.build_parser().parse_args(["w4a16", "--out", str(out)])
    args.command = "nox -s bench-cuda -- w4a16"
    assert args.run(args) == 0
    doc = json.loads(out.read_text())
    assert set(harness.FILE_KEYS) <= set(doc) and doc["command"] == "nox -s bench-cuda -- w4a16"
    assert (
        doc["M"] == [1, 128]
        and doc["variants"] == ["gemv"]
        and doc["rotated_sets"] == {"T1": harness.rotation_count(SMALL.weight_bytes, 1 << 16)}
    )
    assert doc["speedup_vs_peers"]["T1@128"] == {"cublas-fp16": 1.0, "tinygemm": 1.0}
    rows = {(r["workload"], r["impl"]) for r in doc["results"]}
    assert ("T1", "ikport-gemv") in rows and ("T1@128", "ikport-gemv") not in rows
    for r in doc["results"]:
        assert {"M", "N", "K", "dtype", "bytes", "rel_err", "pct_roof"} <= set(r)
    # the read pass of the weight's bytes in the same run; M=1 rows against it (the fake timer's us)
    assert doc["read_pass"] == [{"bytes": SMALL.weight_bytes, "median_us": 8.0, "GBps": 1.0}]
    m1 = [r for r in doc["results"] if r["M"] == 1]
    assert m1 and all(r["pct_read_pass"] == round(100 * 8.0 / r["median_us"], 1) for r in m1)
    assert all("pct_read_pass" not in r for r in doc["results"] if r["M"] != 1)
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_main.main(["w4a16", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--only" in out and "tinygemm" in out
    if not torch.cuda.is_available():
        assert bench_main.main(["w4a16", "--quick", "--only", "W1"]) == 2
        assert "no CUDA" in capsys.readouterr().out


def test_harness_run_counts_budget() -> None:
    assert harness.run_counts(10.0, budget_s=1.0) == (10, 50)
    assert harness.run_counts(10.0, budget_s=1.0, max_iters=bench.QUICK_MAX_ITERS) == (10, 20)
    assert harness.run_counts(50_000.0, budget_s=1.0, min_iters=10) == (2, 20)  # 20 x 50 ms
    assert harness.run_counts(500_000.0, budget_s=1.0, min_iters=10) == (2, 10)
    assert harness.run_counts(0.0, budget_s=1.0) == (10, 50)  # no division by zero
