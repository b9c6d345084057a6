"""CPU tests of the compressed-KV benchmark: its workloads, its goals, and a whole run at a toy size
with the GPU timers faked (ikport's CPU path computes every row)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ikport import kvquant
from ikport.bench import __main__ as bench_main
from ikport.bench import decode, harness
from ikport.bench import kvcache as bench

META = {"device": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "commit": "0" * 40, "date": "2026-12-08",
        "versions": {"torch": "2.11.0+cu130"}}


def test_locked_workloads_follow_the_protocol() -> None:
    ids = [w.id for w in bench.workloads(quick=True)]
    assert ids[:2] == ["K8", "K8-paged16"]
    assert ("K4" in ids) == ("kivi4" in kvquant.KV_FORMATS)
    k8 = bench.workloads(quick=True)[0]
    assert (k8.kv_format, k8.dense.batch, k8.dense.kv_len, k8.dense.head_dim) == ("int8", 8, 4096, 128)
    full = bench.workloads(quick=False)
    sweep = [w for w in full if not w.locked]
    assert sweep and all(w.dense.kv_bytes <= bench.SWEEP_MAX_FP16_BYTES for w in sweep)
    assert len({w.id for w in full}) == len(full)


def test_outliers_scale_every_sixteenth_channel() -> None:
    k = torch.ones(1, 1, 2, 32)
    bench.with_outliers(k)
    assert k[..., 0].eq(bench.OUTLIER_SCALE).all() and k[..., 16].eq(bench.OUTLIER_SCALE).all()
    assert k[..., 1].eq(1).all() and int(k.ne(1).sum()) == 2 * 2


def _timing(*args: Any, **kwargs: Any) -> harness.Timing:
    fns = args[0] if args else kwargs["fns"]
    for fn in fns:
        fn()  # the calls run (appends, attention) as a real timing would run them
    return harness.Timing(median_us=10.0, min_us=9.0, max_us=11.0, n=3, sleep_us=100.0, host_us=5.0, late=0)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> list[bench.Workload]:
    ws = [bench.Workload("K8", "int8", decode.Workload("K8", 2, 40, head_dim=32, q_heads=4, kv_heads=2)),
          bench.Workload("K8-paged16", "int8",
                         decode.Workload("K8-paged16", 2, 48, head_dim=32, q_heads=4, kv_heads=2, page_size=16))]
    monkeypatch.setattr(bench, "CHUNK", 8)
    monkeypatch.setattr(bench, "workloads", lambda quick: ws)
    prefill = [bench.PrefillWorkload("K8-prefill8", "int8", batch=2, prefix=24, chunk=8, q_heads=4, kv_heads=2,
                                     head_dim=32)]
    monkeypatch.setattr(bench, "prefill_workloads", lambda: prefill)
    real_prefill = bench.bench_prefill
    monkeypatch.setattr(bench, "bench_prefill", lambda w, results: real_prefill(w, results, device="cpu"))
    monkeypatch.setattr(harness, "l2_cache_bytes", lambda: 1 << 12)
    monkeypatch.setattr(harness, "kernel_time", _timing)
    monkeypatch.setattr(harness, "eager_time", _timing)
    real_make_sets = bench.make_sets
    monkeypatch.setattr(bench, "make_sets", lambda w, n, device="cuda": real_make_sets(w, n, "cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(harness, "measure_read_roof", lambda n: {"bytes": n, "median_us": 1.0, "GBps": 1.0})
    monkeypatch.setattr(harness, "measure_read_pass", lambda n: {"bytes": n, "median_us": 8.0, "GBps": 1.0})
    monkeypatch.setattr(harness, "device_meta", lambda commit=None: json.loads(json.dumps(META)))
    return ws


def test_run_checks_times_and_writes(toy: list[bench.Workload], tmp_path: Path) -> None:
    out = tmp_path / "kvcache.json"
    assert bench_main.main(["kvcache", "--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {(r["workload"], r["impl"]): r for r in doc["results"]}
    for impl in ("ikport", "ikport-dequant-attend", "ikport-fp16"):
        assert ("K8", impl) in rows and rows[("K8", impl)]["max_abs_err"] <= decode.TOLERANCE["fp16"]
    assert ("K8-paged16", "ikport") in rows and ("K8-paged16", "ikport-dequant-attend") not in rows
    # the compressed rows count the cache's bytes, the fp16 rows the dense K + V
    assert rows[("K8", "ikport")]["bytes"] < rows[("K8", "ikport-fp16")]["bytes"] == toy[0].dense.kv_bytes
    assert {"K8-append1", "K8-append8", "K8-chunk8"} <= {w for w, _ in rows}
    assert doc["goals"]["K8"]["paged_ratio"] == 1.0 and doc["goals"]["K8"]["met"] is True
    assert doc["goals"]["K8"]["append_chunk_vs_prefill"] == 1.0
    # the read pass of the cache's bytes, measured in the same run: 8 us against the row's 10
    assert doc["read_pass"]["K8"]["bytes"] == rows[("K8", "ikport")]["bytes"]
    assert rows[("K8", "ikport")]["pct_read_pass"] == 80.0 and doc["goals"]["K8"]["pct_read_pass"] == 80.0
    # chunked prefill over the compressed prefix beside the same over an fp16 one (the goal: no slower)
    for impl, fmt in (("ikport", "int8"), ("ikport-fp16", "dense")):
        row = rows[("K8-prefill8", impl)]
        assert row["shape"]["kv_format"] == fmt and (row["shape"]["T"], row["shape"]["L"]) == (8, 32)
        assert row["max_abs_err"] <= decode.TOLERANCE["fp16"]
    assert rows[("K8-prefill8", "ikport")]["bytes"] < rows[("K8-prefill8", "ikport-fp16")]["bytes"]
    assert doc["goals"]["K8-prefill8"] == {"us": 10.0, "fp16_us": 10.0, "vs_fp16": 1.0, "met": True}
    # the CPU has no cuDNN / flash SDPA: skipped peers with their reason, not errors
    assert {e["impl"] for e in doc["skipped"]} <= {"sdpa-cudnn", "sdpa-flash"} and not doc["errors"]


def test_wrong_compressed_result_stops_the_run(toy: list[bench.Workload], monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setattr(bench, "compressed_reference", lambda c, q, rows: c.reference_attend(q)[rows].float() + 1)
    with pytest.raises(decode.WrongResult, match="ikport on K8"):
        bench_main.main(["kvcache", "--quick", "--out", str(tmp_path / "x.json")])


def test_only_rejects_unknown_ids(toy: list[bench.Workload], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown workload ids"):
        bench_main.main(["kvcache", "--only", "K9", "--out", str(tmp_path / "x.json")])


def test_only_runs_the_prefill_rows_alone(toy: list[bench.Workload], tmp_path: Path) -> None:
    out = tmp_path / "prefill.json"
    assert bench_main.main(["kvcache", "--only", "K8-prefill8", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {(r["workload"], r["impl"]) for r in doc["results"]} == {("K8-prefill8", "ikport"),
                                                                    ("K8-prefill8", "ikport-fp16")}


def test_prefill_workloads_follow_the_issue() -> None:
    """Issue 29's shape: a 512-token chunk over 8192 cached tokens, B 4, 32 / 8 heads, head_dim 128."""
    ws = bench.prefill_workloads()
    assert [w.id for w in ws] == [f"{bench.FORMATS[f]}-prefill512" for f in bench.formats()]
    w = ws[0]
    assert (w.batch, w.prefix, w.chunk, w.q_heads, w.kv_heads, w.head_dim, w.kv_len) == (4, 8192, 512, 32, 8, 128,
                                                                                           8704)
