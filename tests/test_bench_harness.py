"""CPU tests of the benchmark harness and the decode benchmark's pure-Python parts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ikport
from ikport.bench import __main__ as bench_main
from ikport.bench import decode, harness

REPO = Path(__file__).resolve().parents[1]

META = {
    "device": "NVIDIA H100 80GB HBM3",
    "driver": "580.159.04",
    "commit": "0" * 40,
    "date": "2026-11-25",
    "versions": {"torch": "2.11.0+cu130", "cuda-python": "13.3.1"},
}


def _row(**overrides: object) -> dict:
    row = {
        "workload": "D1",
        "impl": "ikport",
        "median_us": 50.0,
        "min_us": 49.0,
        "max_us": 52.0,
        "GBps": 2684.4,
        "eager_us": 80.0,
    }
    row.update(overrides)
    return row


def test_write_results_has_protocol_shape(tmp_path: Path) -> None:
    rows = [_row(), _row(impl="sdpa-cudnn", pct_roof=79.0, note="n=50")]
    path = harness.write_results(
        tmp_path / "results" / "decode-h100.json",
        command="python -m ikport.bench decode",
        ceiling_GBps=3087,
        results=rows,
        extra={"skipped": []},
        meta=META,
    )
    doc = json.loads(path.read_text())
    for key in harness.FILE_KEYS:
        assert key in doc, key
    assert doc["ceiling_GBps"] == 3087.0 and isinstance(doc["ceiling_GBps"], float)
    assert doc["versions"]["torch"] == "2.11.0+cu130"
    assert doc["skipped"] == []
    assert [r["impl"] for r in doc["results"]] == ["ikport", "sdpa-cudnn"]
    for row in doc["results"]:
        assert set(harness.ROW_KEYS) <= set(row)


def test_write_results_default_meta_without_gpu(tmp_path: Path) -> None:
    path = harness.write_results(tmp_path / "r.json", command="c", ceiling_GBps=1.0, results=[])
    doc = json.loads(path.read_text())
    assert set(harness.FILE_KEYS) <= set(doc)
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["ikport"] == ikport.__version__


@pytest.mark.parametrize(
    "rows, extra, meta",
    [
        ([{k: v for k, v in _row().items() if k != "eager_us"}], None, META),  # row lacks a key
        ([_row(median_us=float("nan"))], None, META),  # not JSON-safe
        ([_row()], {"results": []}, META),  # extra replaces a protocol key
        ([_row()], None, {k: v for k, v in META.items() if k != "driver"}),  # meta incomplete
    ],
)
def test_write_results_rejects_bad_input(tmp_path: Path, rows, extra, meta) -> None:
    with pytest.raises(ValueError):
        harness.write_results(
            tmp_path / "r.json", command="c", ceiling_GBps=1.0, results=rows, extra=extra, meta=meta
        )
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("per_set", [1, 2 << 20, 134_217_728, 150 << 20, 1 << 30, 8 << 30])
def test_rotation_count_exceeds_three_l2(per_set: int) -> None:
    l2 = 50 << 20
    n = harness.rotation_count(per_set, l2)
    assert n >= 2
    assert n * per_set > 3 * l2
    assert n == 2 or (n - 1) * per_set <= 3 * l2  # no more sets than needed


def test_rotation_count_values() -> None:
    assert harness.rotation_count(134_217_728, 50 << 20) == 2
    assert harness.rotation_count(2 << 20, 50 << 20) == 76
    with pytest.raises(ValueError):
        harness.rotation_count(0, 50 << 20)


def test_timing_and_row_math() -> None:
    t = harness.Timing.from_samples([3.0, 1.0, 2.0, 10.0, 2.5])
    assert (t.median_us, t.min_us, t.max_us, t.n) == (2.5, 1.0, 10.0, 5)
    kernel = harness.Timing.from_samples([134_217_728 / 3087e3])  # exactly the roof
    row = harness.result_row(
        workload="D1",
        impl="ikport",
        kernel=kernel,
        eager=harness.Timing.from_samples([80.0]),
        nbytes=134_217_728,
    )
    assert row["GBps"] == pytest.approx(3087.0, abs=0.1)
    assert row["pct_roof"] == pytest.approx(100.0, abs=0.1)
    assert row["eager_us"] == 80.0


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 PCIe", "h100"),
        ("AMD Instinct MI300X", "mi300x"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ],
)
def test_device_slug(name: str, slug: str) -> None:
    assert harness.device_slug(name) == slug


def test_locked_workloads() -> None:
    by_id = {w.id: w for w in decode.LOCKED}
    assert by_id["D1"].kv_bytes == 134_217_728
    assert by_id["D2"].kv_bytes == 1_073_741_824
    assert by_id["D3"].kv_bytes == 134_217_728
    assert by_id["D1-paged16"].kv_bytes == by_id["D1"].kv_bytes
    assert by_id["D2-paged16"].page_size == 16
    for w in decode.LOCKED:
        assert (w.q_heads, w.kv_heads, w.head_dim, w.dtype) == (32, 8, 128, "fp16")
        assert w.locked
    assert set(by_id["D1"].variants) == {"naive", "split1", "split-unfused", "split-vector", "split-mma"}
    assert decode.workloads(quick=True) == list(decode.LOCKED)


def test_sweep_workloads() -> None:
    sweep = decode.sweep_workloads()
    ids = [w.id for w in sweep]
    assert len(ids) == len(set(ids))
    assert not set(ids) & {w.id for w in decode.LOCKED}
    assert all(w.kv_bytes <= decode.SWEEP_MAX_KV_BYTES and not w.locked for w in sweep)
    assert "sweep-B4-L32768-D128-fp16" in ids
    assert "sweep-B64-L131072-D128-fp16" not in ids  # 34 GB of KV
    assert {
        "sweep-B8-L4096-D64-fp16",
        "sweep-B8-L4096-D96-fp16",
        "sweep-B8-L4096-D256-fp16",
        "sweep-B8-L4096-D128-bf16",
    } <= set(ids)
    bf16 = next(w for w in sweep if w.dtype == "bf16")
    assert bf16.kv_bytes == 134_217_728
    for w in sweep:
        assert w.id == decode.sweep_id(w.batch, w.kv_len, w.head_dim, w.dtype)


def test_run_counts() -> None:
    assert decode.run_counts(55.0) == (10, 50)
    warmup, iters = decode.run_counts(200_000.0)  # a 200 ms call
    assert warmup == 2 and decode.MIN_ITERS <= iters < 50


def test_reference_and_eager_peers_agree() -> None:
    w = decode.Workload("T", 3, 40, head_dim=16, dtype="fp16", q_heads=4, kv_heads=2)
    (s,) = decode.make_sets(w, 1, device="cpu")
    rows = decode.check_rows(w.batch)
    ref = decode.reference(s, rows)
    for fn in (decode.grouped_matmul_attention, decode.repeat_kv_attention):
        assert decode.max_abs_error(fn(s.q, s.k, s.v), ref, rows, s.q.shape) < 2e-3
    assert decode.max_abs_error(torch.full_like(s.q, float("nan")), ref, rows, s.q.shape) == float(
        "inf"
    )


def _fake_timing(*_args: object, **_kwargs: object) -> harness.Timing:
    return harness.Timing.from_samples([10.0, 11.0, 12.0], sleep_cycles=1000, sleep_us=100.0)


@pytest.fixture
def cpu_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run bench_workload on the CPU: inputs on the CPU, the GPU timers replaced by a constant."""
    make_sets = decode.make_sets
    monkeypatch.setattr(decode, "make_sets", lambda w, n: make_sets(w, n, device="cpu"))
    monkeypatch.setattr(harness, "l2_cache_bytes", lambda: 1 << 16)
    monkeypatch.setattr(harness, "kernel_time", _fake_timing)
    monkeypatch.setattr(harness, "eager_time", _fake_timing)
    monkeypatch.setattr(
        harness, "check_sleep_insensitive", lambda *a, **k: (_fake_timing(), _fake_timing())
    )


def test_bench_workload_records_rows_and_skips(cpu_bench: None) -> None:
    w = decode.Workload("T1", 2, 64, head_dim=16, q_heads=4, kv_heads=2, variants=("split1",))
    results = decode.Results()
    decode.bench_workload(w, results, with_flashinfer=False)
    impls = {r["impl"] for r in results.rows}
    assert {"ikport", "ikport-split1", "eager-grouped-matmul", "hf-repeat-kv"} <= impls
    assert not results.errors
    for row in results.rows:
        assert set(harness.ROW_KEYS) <= set(row)
        assert row["bytes"] == w.kv_bytes and row["median_us_sleep2x"] == 11.0
        assert row["eager_us_rounds"] == 11.0  # a locked workload: the interleaved eager rounds
    # a peer that cannot run on this device is skipped with its reason, not fatal
    for entry in results.skipped:
        assert entry["workload"] == "T1" and entry["reason"]
    assert results.speedups["T1"]["hf-repeat-kv"] == 1.0


def test_interleaved_eager_alternates_order_and_takes_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    per_call = {"a": iter([5.0, 1.0, 9.0]), "b": iter([2.0, 4.0, 3.0])}

    def fake_eager(fns, **_kw):
        name = fns[0]()
        calls.append(name)
        us = next(per_call[name])
        return harness.Timing.from_samples([us])

    monkeypatch.setattr(harness, "eager_time", fake_eager)
    prepared = {n: decode.Prepared([lambda n=n: n]) for n in ("a", "b")}
    assert decode.interleaved_eager(prepared, rounds=3, iters=1) == {"a": 5.0, "b": 3.0}
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_sweep_rows_skip_the_eager_rounds(cpu_bench: None) -> None:
    w = decode.Workload("sweep-T", 1, 32, head_dim=16, q_heads=2, kv_heads=1)
    results = decode.Results()
    decode.bench_workload(w, results, with_flashinfer=False)
    assert results.rows and all("eager_us_rounds" not in r for r in results.rows)


def test_bench_workload_paged(cpu_bench: None) -> None:
    w = decode.Workload("T2", 2, 48, head_dim=16, q_heads=4, kv_heads=2, page_size=16)
    results = decode.Results()
    decode.bench_workload(w, results, with_flashinfer=False)
    assert "ikport" in {r["impl"] for r in results.rows}
    assert not results.errors


def test_bench_workload_aborts_on_wrong_ikport(
    cpu_bench: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ikport, "attention", lambda q, k, v, **kw: torch.zeros_like(q) + 1)
    w = decode.Workload("T3", 2, 64, head_dim=16, q_heads=4, kv_heads=2)
    with pytest.raises(decode.WrongResult):
        decode.bench_workload(w, decode.Results(), with_flashinfer=False)


def test_bench_workload_records_ikport_error(
    cpu_bench: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*_a: object, **_k: object) -> torch.Tensor:
        raise NotImplementedError("head_dim 16")

    monkeypatch.setattr(ikport, "attention", unsupported)
    results = decode.Results()
    decode.bench_workload(
        decode.Workload("T4", 2, 64, head_dim=16, q_heads=4, kv_heads=2), results, False
    )
    assert results.errors == [
        {"workload": "T4", "impl": "ikport", "reason": "NotImplementedError: head_dim 16"}
    ]
    assert "T4" not in results.speedups


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m ikport.bench --help` as a process (the entry point), an area's help in process."""
    done = subprocess.run(
        [sys.executable, "-m", "ikport.bench", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "decode" in done.stdout
    with pytest.raises(SystemExit) as exit_:
        bench_main.main(["decode", "--help"])
    assert exit_.value.code == 0 and "decode" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_cli_decode_without_gpu() -> None:
    assert bench_main.main(["decode", "--quick"]) == 2


def _fake_results() -> decode.Results:
    results = decode.Results()
    for w in decode.sweep_workloads()[:6]:
        for impl, us in (("ikport", 50.0), ("sdpa-cudnn", 55.0), ("sdpa-flash", 60.0)):
            t = harness.Timing.from_samples([us])
            row = harness.result_row(workload=w.id, impl=impl, kernel=t, eager=t, nbytes=w.kv_bytes)
            row.update(shape=w.shape(), max_abs_err=1e-3)
            results.rows.append(row)
    return results


def test_print_tables_ends_with_summary(capsys: pytest.CaptureFixture[str]) -> None:
    results = _fake_results()
    results.errors.append({"workload": "x", "impl": "ikport", "reason": "ValueError: no"})
    decode.print_tables(results)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("IKPORT ERROR x ikport")
    assert "sdpa-cudnn" in lines[-2] and lines[-2].split()[-1] == "1.100"


def test_plot_sweep(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = decode.plot_sweep(_fake_results().rows, tmp_path / "decode.png", "test device")
    assert path is not None and path.stat().st_size > 0
    assert decode.plot_sweep([], tmp_path / "none.png", "test device") is None


class _HostEvent:
    """Stands in for torch.cuda.Event on the CPU: records the host clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


@pytest.fixture
def host_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda's event, sleep and synchronize replaced by host-side stand-ins."""
    monkeypatch.setattr(torch.cuda, "Event", _HostEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(harness, "sleep_cycles_per_us", lambda: 1000.0)
    monkeypatch.setattr(harness, "WARMUP_MIN_S", 0.0)  # warm-up by count only: the tests count calls


def test_kernel_time_sizes_sleep_from_host_time(host_cuda: None) -> None:
    t = harness.kernel_time([lambda: time.sleep(200e-6)] * 3, warmup=3, iters=5)
    assert t.n == 5  # `late` is left out: a busy host can outlast even the doubled sleep
    assert t.sleep_us >= 2 * 200 and t.sleep_cycles == round(t.sleep_us * 1000)
    assert t.min_us >= 200 and t.host_us >= 200


def test_kernel_time_retries_when_dispatch_outlasts_sleep(host_cuda: None) -> None:
    calls = []

    def slow_after_warmup() -> None:  # 0 us in warm-up, 300 us when timed
        calls.append(1)
        if len(calls) > 2:
            time.sleep(300e-6)

    t = harness.kernel_time([slow_after_warmup], warmup=2, iters=4)
    # 100 us, then doubled while the 300 us dispatch outlasts it (three times at most)
    assert t.sleep_us >= 400 and (t.late == 0 or t.sleep_us == 800)
    fixed = harness.kernel_time([slow_after_warmup], warmup=0, iters=4, sleep_cycles=1000)
    assert fixed.late == 4 and fixed.sleep_cycles == 1000  # an explicit sleep is kept
    first, doubled = harness.check_sleep_insensitive([slow_after_warmup], warmup=2, iters=4)
    assert doubled.sleep_cycles == 2 * first.sleep_cycles


def test_eager_time_counts_host_time(host_cuda: None) -> None:
    t = harness.eager_time([lambda: time.sleep(100e-6)], warmup=1, iters=4)
    assert t.n == 4 and t.min_us >= 100 and t.sleep_us == 0


def test_warm_up_keeps_the_gpu_busy_for_a_minimum_time(host_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole rounds until WARMUP_MIN_S has passed; the host times of the first round only. A
    stand-in clock, on which each call takes 4 ms: 20 ms take two rounds of three calls."""

    class Clock:
        ns = 0

        def perf_counter(self) -> float:
            return self.ns / 1e9

        def perf_counter_ns(self) -> int:
            return self.ns

    clock = Clock()
    monkeypatch.setattr(harness, "time", clock)
    monkeypatch.setattr(harness, "WARMUP_MIN_S", 0.02)
    calls = []

    def call() -> None:
        calls.append(1)
        clock.ns += 4_000_000

    host = harness._warm_up([call], 3)
    assert len(calls) == 6 and clock.ns == 24_000_000
    assert host == [4000.0, 4000.0, 4000.0]  # us, the first round's
    monkeypatch.setattr(harness, "WARMUP_MIN_S", 0.0)
    calls.clear()
    assert len(harness._warm_up([call], 3)) == 3 and len(calls) == 3  # the count, no minimum
