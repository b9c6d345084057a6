"""CPU tests of the prefill benchmark: the FLOP count, the workloads, the reference, the goals, and
the area end to end with ikport's prefill entry points, FlashInfer and the GPU timers faked."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ikport
from ikport import reference as ref_impl
from ikport.bench import __main__ as bench_main
from ikport.bench import harness
from ikport.bench import prefill as bench

META = {
    "device": "NVIDIA H100 80GB HBM3",
    "driver": "580.159.04",
    "commit": "0" * 40,
    "date": "2026-12-08",
    "versions": {"torch": "2.11.0+cu130"},
}


# ---- the FLOP count ---------------------------------------------------------------------------
def _mask_count(q_len: int, kv_len: int, causal: bool) -> int:
    """Query-key pairs ikport.reference's mask keeps (bottom-right: j <= kv_len - q_len + i)."""
    i = torch.arange(q_len).view(-1, 1)
    j = torch.arange(kv_len).view(1, -1)
    keep = (j <= kv_len - q_len + i) if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
    return int(keep.sum())


@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (7, 7), (64, 64), (5, 40), (40, 5), (0, 9), (9, 0), (128, 300)])
@pytest.mark.parametrize("causal", [True, False])
def test_keys_seen_counts_the_mask(q_len: int, kv_len: int, causal: bool) -> None:
    assert bench.keys_seen(q_len, kv_len, causal) == _mask_count(q_len, kv_len, causal)


def test_prefill_flops_formulas() -> None:
    hq, d = 32, 128
    # causal, Tq = L: the triangle with its diagonal, L (L + 1) / 2 pairs a sequence
    assert bench.prefill_flops(hq, d, [(4096, 4096)] * 4, True) == 4 * 4 * hq * d * 4096 * 4097 // 2
    assert bench.P1.flops == 4 * 4 * 32 * 128 * 4096 * 4097 // 2 == 549_890_031_616
    assert bench.P2.flops == 4 * 1 * 32 * 128 * 16384 * 16385 // 2
    # non-causal: every pair
    assert bench.prefill_flops(hq, d, [(4096, 4096)] * 4, False) == 4 * 4 * hq * d * 4096 * 4096
    assert bench.NONCAUSAL.flops == 4 * 4 * 32 * 128 * 4096 * 4096
    # chunked: row i of the 512 new tokens sees 8192 + i + 1 keys
    rows = sum(8192 + i + 1 for i in range(512))
    assert bench.CHUNK.flops == bench.CHUNK_PAGED.flops == 4 * 4 * 32 * 128 * rows
    assert rows == 512 * 8192 + 512 * 513 // 2
    # varlen: the sum of each sequence's triangle
    assert bench.VARLEN.flops == sum(4 * 32 * 128 * n * (n + 1) // 2 for n in bench.VARLEN_LENS)
    assert bench.prefill_flops(2, 8, [(3, 3), (2, 5)], True) == 4 * 2 * 8 * (6 + 4 + 5)


# ---- workloads --------------------------------------------------------------------------------
def test_locked_workloads_match_the_protocol() -> None:
    by_id = {w.id: w for w in bench.all_workloads()}
    for wid, b, n in (("P1", 4, 4096), ("P2", 1, 16384)):  # PROTOCOL.md: causal prefill fp16
        w = by_id[wid]
        assert (w.batch, w.kv_len, w.q_len) == (b, n, n) and w.locked
        assert (w.q_heads, w.kv_heads, w.head_dim, w.dtype, w.causal, w.page_size) == (32, 8, 128, "fp16", True, 0)
    assert set(by_id["P1"].journey) == set(bench.JOURNEY)
    assert set(by_id["P2"].journey) == set(bench.JOURNEY) - {bench.NAIVE}
    assert not any(w.journey for w in bench.all_workloads() if not w.locked)
    assert [w.id for w in bench.all_workloads() if w.locked] == ["P1", "P2"]


def test_full_workload_list() -> None:
    full = bench.all_workloads()
    ids = [w.id for w in full]
    assert len(ids) == len(set(ids)) == 16
    sweep = bench.length_sweep()
    assert [w.kv_len for w in sweep] == list(bench.SWEEP_LEN)
    assert [w.id for w in sweep if w.locked] == ["P1", "P2"]
    for w in sweep:
        assert w.batch == max(1, 16384 // w.kv_len) and w.q_len == w.kv_len
        assert (w.q_heads, w.kv_heads, w.head_dim, w.dtype, w.causal) == (32, 8, 128, "fp16", True)
    assert sweep[0].id == "sweep-B32-L512-D128-fp16" and sweep[-1].id == "sweep-B1-L32768-D128-fp16"
    by_id = {w.id: w for w in full}
    heads = {w.head_dim: (w.q_heads, w.kv_heads) for w in bench.HEAD_DIMS}
    assert heads == {64: (32, 8), 256: (16, 4)}
    assert {"sweep-B4-L4096-D64-fp16", "sweep-B4-L4096-D256-fp16-H16x4", "sweep-B4-L4096-D128-bf16",
            "sweep-B4-L4096-D128-fp16-H32x32", "sweep-B4-L4096-D128-fp16-H32x4",
            "sweep-B4-L4096-D128-fp16-noncausal"} <= set(ids)
    assert by_id["sweep-B4-L4096-D128-fp16-H32x4"].kv_heads == 4 and not bench.NONCAUSAL.causal
    chunk, paged = by_id["chunk-B4-T512-L8704"], by_id["chunk-B4-T512-L8704-paged16"]
    assert (chunk.batch, chunk.q_len, chunk.kv_len, chunk.page_size, paged.page_size) == (4, 512, 8704, 0, 16)
    varlen = by_id["varlen-N8-T16384"]
    assert varlen.varlen and len(varlen.seq_lens) == 8 and sum(varlen.seq_lens) == 16384
    assert all(300 <= n <= 6000 for n in varlen.seq_lens)
    assert varlen.bytes == 2 * (2 * 16384 * 32 * 128 + 2 * 16384 * 8 * 128)
    assert bench.P1.bytes == 2 * (2 * 4 * 32 * 4096 * 128 + 2 * 4 * 8 * 4096 * 128)


def test_quick_and_only_subsets() -> None:
    assert [w.id for w in bench.workloads(quick=True)] == ["P1", "chunk-B4-T512-L8704", "chunk-B4-T512-L8704-paged16"]
    assert [w.id for w in bench.workloads(quick=False)] == [w.id for w in bench.all_workloads()]
    assert [w.id for w in bench.workloads(False, ("P2", "P1"))] == ["P1", "P2"]  # the list's order
    assert bench.parse_only("P2, varlen-N8-T16384") == ("P2", "varlen-N8-T16384")
    for bad in ("P3", "", "D1"):
        with pytest.raises(Exception, match="unknown workload"):
            bench.parse_only(bad)


# ---- the reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("q_len, kv_len, causal", [(13, 13, True), (5, 29, True), (7, 20, False)])
def test_blocked_reference_matches_ikports_reference(
    monkeypatch: pytest.MonkeyPatch, q_len: int, kv_len: int, causal: bool
) -> None:
    """The blocked float32 reference (tiles forced small) agrees with ikport.reference, whose
    causal mask is aligned bottom-right, at GQA 3."""
    monkeypatch.setattr(bench, "REF_TILE_ELEMENTS", 3 * 4 * kv_len)  # query blocks of 4 rows
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, q_len, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_len, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_len, 16, generator=gen, dtype=torch.float64)
    got = bench.reference_sequence(q, k, v, causal)
    want = ref_impl.attention(q[None], k[None], v[None], causal=causal, upcast=torch.float64)[0]
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_max_abs_error_and_tolerance() -> None:
    ref = torch.zeros(3, 2, 4, 8)
    out = torch.zeros(4, 2, 4, 8)
    out[1, 0, 0, 0] = 0.25
    assert bench.max_abs_error(out, ref, [0, 1, 3]) == 0.25
    out[2] = math.nan  # a sequence not checked
    assert bench.max_abs_error(out, ref, [0, 1, 3]) == 0.25
    out[3, 1, 1, 1] = math.nan  # a poisoned element left unwritten
    assert bench.max_abs_error(out, ref, [0, 1, 3]) == math.inf
    assert bench.max_abs_error(out, ref, [0, 1]) == math.inf  # wrong shape
    assert bench.tolerance("fp16", 1e-3) == (pytest.approx(3e-3), "2 x sdpa-flash's 0.001 + 0.001")
    assert bench.tolerance("bf16", None)[0] == bench.FALLBACK_TOLERANCE["bf16"]
    assert bench.tolerance("fp16", math.inf)[1].startswith("fallback")


# ---- goals ------------------------------------------------------------------------------------
def _row(workload: str, impl: str, us: float, flops: int = 10**12) -> dict[str, Any]:
    return {"workload": workload, "impl": impl, "median_us": us, "flops": flops}


def test_goals() -> None:
    p1 = bench.P1.flops
    rows = [
        _row("P1", "ikport", 1000.0, p1), _row("P1", "sdpa-flash", 1300.0, p1),
        _row("P2", "ikport", 1000.0), _row("P2", "sdpa-flash", 1100.0),
        _row(bench.D64.id, "ikport", 1000.0, int(p1 * 0.85)),  # 0.85 of P1's rate
        _row(bench.D256.id, "ikport", 1000.0, int(p1 * 0.75)),
        _row(bench.CHUNK.id, "ikport", 100.0), _row(bench.CHUNK_PAGED.id, "ikport", 108.0),
    ]
    table = bench.goals(rows)
    assert list(table) == [g.name for g in bench.GOALS]
    assert table["P1_vs_sdpa_flash"] | {} == {
        "what": "P1: sdpa-flash kernel time / ikport's", "goal": ">= 1.2", "rows": ["P1/sdpa-flash", "P1/ikport"],
        "value": 1.3, "pass": True,
    }
    assert (table["P2_vs_sdpa_flash"]["value"], table["P2_vs_sdpa_flash"]["pass"]) == (1.1, False)
    assert (table["D64_vs_D128"]["value"], table["D64_vs_D128"]["pass"]) == (0.85, True)
    assert (table["D256_vs_D128"]["value"], table["D256_vs_D128"]["pass"]) == (0.75, False)
    assert table["chunked_paged_vs_contiguous"] | {} == {
        **table["chunked_paged_vs_contiguous"], "value": 1.08, "pass": True, "goal": "<= 1.1"}
    bf16 = table["bf16_vs_fp16"]
    assert bf16["value"] is None and bf16["pass"] is None and bf16["missing"] == [f"{bench.BF16.id}/ikport"]
    json.dumps(table, allow_nan=False)


# ---- fakes: ikport's prefill API, FlashInfer, the GPU timers --------------------------------
@dataclasses.dataclass(frozen=True)
class FakePrefillOptions:
    """The contract's ikport.PrefillOptions."""

    variant: str = "fa2"
    stages: int | None = None
    pad: bool | None = None
    longest_first: bool | None = None
    tile_m: int | None = None
    tile_n: int | None = None
    warps: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in ("naive", "fa2"):
            raise ValueError(f"unknown variant {self.variant}")


class FakeIkport:
    """ikport.attention / paged_attention / attention_varlen computed by ikport.reference on the CPU,
    writing into out= as the contract says; `calls` keeps (entry point, options) of each call.
    `scale_by` spoils the values, `ignore_out` leaves out= untouched."""

    def __init__(self, scale_by: float = 1.0, ignore_out: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.scale_by = scale_by
        self.ignore_out = ignore_out

    def _finish(self, res: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        res = (res.float() * self.scale_by).to(res.dtype)
        if out is None or self.ignore_out:
            return res
        return out.copy_(res)

    def attention(self, q, k, v, *, causal=False, scale=None, kv_lens=None, q_lens=None, out=None, options=None):
        self.calls.append(("attention", options))
        return self._finish(ref_impl.attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens), out)

    def paged_attention(self, q, k_pages, v_pages, block_table, kv_lens, *, causal=False, scale=None, q_lens=None,
                        out=None, options=None):
        self.calls.append(("paged_attention", options))
        res = ref_impl.paged_attention(q, k_pages, v_pages, block_table, kv_lens, causal=causal, scale=scale)
        return self._finish(res, out)

    def attention_varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                         scale=None, out=None, return_lse=False, options=None):
        self.calls.append(("attention_varlen", options))
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:]))
        parts = []
        for i in range(len(cq) - 1):
            qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]))
            parts.append(ref_impl.attention(qs, ks, vs, causal=causal, scale=scale)[0].transpose(0, 1))
        return self._finish(torch.cat(parts), out)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeIkport:
        for name in ("attention", "paged_attention", "attention_varlen"):
            monkeypatch.setattr(ikport, name, getattr(self, name), raising=False)
        monkeypatch.setattr(ikport, "PrefillOptions", FakePrefillOptions, raising=False)
        return self


def _fake_timing(*_args: object, **_kwargs: object) -> harness.Timing:
    return harness.Timing.from_samples([10.0, 11.0, 12.0], sleep_cycles=1000, sleep_us=100.0)


def shrink(w: bench.Workload) -> bench.Workload:
    """The same id and kind at a CPU size: heads and head_dim / 8, lengths / 128."""
    return dataclasses.replace(
        w, q_heads=max(1, w.q_heads // 8), kv_heads=max(1, w.kv_heads // 8), head_dim=w.head_dim // 8,
        kv_len=w.kv_len // 128, q_len=w.q_len // 128, seq_lens=tuple(max(2, n // 128) for n in w.seq_lens))


SMALL = {w.id: shrink(w) for w in bench.all_workloads()}


@pytest.fixture
def fake_ikport(monkeypatch: pytest.MonkeyPatch) -> FakeIkport:
    """ikport's prefill API faked, inputs on the CPU, the GPU timers replaced, FlashInfer absent."""
    make = bench.make_sets
    monkeypatch.setattr(bench, "make_sets", lambda w, n: make(w, n, device="cpu"))
    monkeypatch.setattr(bench, "all_workloads", lambda: list(SMALL.values()))
    monkeypatch.setattr(harness, "l2_cache_bytes", lambda: 1 << 12)
    monkeypatch.setattr(harness, "kernel_time", _fake_timing)
    monkeypatch.setattr(harness, "eager_time", _fake_timing)
    monkeypatch.setattr(harness, "check_sleep_insensitive", lambda *a, **k: (_fake_timing(), _fake_timing()))
    monkeypatch.setattr(bench, "flashinfer_problem", lambda: "ModuleNotFoundError: No module named 'flashinfer'")
    return FakeIkport().install(monkeypatch)


def _bench(*ids: str, with_flashinfer: bool = False) -> bench.Results:
    results = bench.Results()
    for wid in ids:
        bench.bench_workload(SMALL[wid], results, with_flashinfer)
    return results


def _by(results: bench.Results) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["workload"], r["impl"]): r for r in results.rows}


# ---- one workload at a time -------------------------------------------------------------------
def test_p1_rows_and_journey_options(fake_ikport: FakeIkport) -> None:
    results = _bench("P1")
    by = _by(results)
    timed = {impl for _, impl in by}
    assert timed == {"ikport", *bench.JOURNEY, "sdpa-flash", "sdpa-default"}
    # SDPA's cuDNN backend has no CPU kernel: a skipped peer with its reason, the run goes on
    assert [(e["impl"], "No viable backend" in e["reason"]) for e in results.skipped] == [("sdpa-cudnn", True)]
    assert not results.failed and not results.errors
    w = SMALL["P1"]
    for (wid, impl), row in by.items():
        assert set(harness.ROW_KEYS) <= set(row) and wid == "P1"
        assert row["median_us"] == 11.0 and row["median_us_sleep2x"] == 11.0  # locked: re-timed
        assert row["flops"] == w.flops and row["bytes"] == w.bytes
        assert row["TFLOPs"] == round(w.flops / 11e6, 1)
        assert row["pct_matrix_roof"] == round(100 * w.flops / 11e6 / 989.0, 1)
        assert row["shape"] == {"B": 4, "Hq": 4, "Hkv": 1, "L": 32, "Tq": 32, "D": 16, "dtype": "fp16",
                                "causal": True, "page_size": 0}
        assert 0 <= row["max_abs_err"] <= row["tolerance"]
    assert by[("P1", "sdpa-flash")]["note"].endswith("FLASH_ATTENTION, enable_gqa=True, is_causal=True "
                                                      "(Tq = L: top-left and bottom-right agree)")
    assert results.tolerances["P1"]["from"].startswith("2 x sdpa-flash's")
    assert results.vs_sdpa_flash["P1"]["ikport"] == 1.0 and "sdpa-flash" not in results.vs_sdpa_flash["P1"]
    # each journey step called with its own options; "ikport" with none
    options = {o for _, o in fake_ikport.calls}
    assert None in options
    for name, fields in bench.JOURNEY.items():
        assert FakePrefillOptions(**fields) in options, name
        assert "PrefillOptions(" in by[("P1", name)]["note"]
    assert FakePrefillOptions(variant="fa2", stages=1, pad=False, longest_first=False) in options


def test_chunked_prefill_masks_and_pages(fake_ikport: FakeIkport) -> None:
    results = _bench("chunk-B4-T512-L8704", "chunk-B4-T512-L8704-paged16")
    by = _by(results)
    for wid in ("chunk-B4-T512-L8704", "chunk-B4-T512-L8704-paged16"):
        assert "median_us_sleep2x" not in by[(wid, "ikport")]  # not locked
        # SDPA's is_causal is top-left aligned: the row says how the bottom-right mask went in
        assert "attn_mask=causal_lower_right(4, 68)" in by[(wid, "sdpa-flash")]["note"]
    paged_note = by[("chunk-B4-T512-L8704-paged16", "ikport")]["note"]
    assert paged_note.endswith("; paged_attention, page 16, shuffled block table")
    assert {c for c, _ in fake_ikport.calls} == {"attention", "paged_attention"}
    assert by[("chunk-B4-T512-L8704", "ikport")]["shape"]["Tq"] == 4


def test_varlen_through_attention_varlen(fake_ikport: FakeIkport) -> None:
    results = _bench("varlen-N8-T16384")
    by = _by(results)
    assert {c for c, _ in fake_ikport.calls} == {"attention_varlen"}
    assert {"ikport", "sdpa-flash", "sdpa-default"} <= {i for _, i in by}
    assert "one call per sequence" in by[("varlen-N8-T16384", "sdpa-flash")]["note"]
    assert by[("varlen-N8-T16384", "ikport")]["shape"]["seq_lens"] == list(SMALL["varlen-N8-T16384"].seq_lens)
    skipped = {e["impl"]: e["reason"] for e in results.skipped}
    assert set(skipped) == {"sdpa-cudnn", "torch-flash-varlen"}  # no CPU kernels: recorded, not fatal


def test_sdpa_falls_back_to_repeated_kv(fake_ikport: FakeIkport, monkeypatch: pytest.MonkeyPatch) -> None:
    sdpa = F.scaled_dot_product_attention

    def no_gqa(*args: Any, enable_gqa: bool = False, **kwargs: Any) -> torch.Tensor:
        if enable_gqa:
            raise RuntimeError("no GQA here")
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_gqa)
    note = _by(_bench("P1"))[("P1", "sdpa-flash")]["note"]
    assert "K/V repeat_interleave'd to every query head" in note
    assert "tried first: enable_gqa=True, is_causal=True" in note and "RuntimeError: no GQA here" in note


def test_failing_correctness_is_recorded_not_timed(
    fake_ikport: FakeIkport, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed: list[str] = []
    time_prepared = bench.time_prepared
    monkeypatch.setattr(bench, "time_prepared", lambda w, impl, p: timed.append(impl) or time_prepared(w, impl, p))
    fake_ikport.scale_by = 1.05  # 5% off: well past 2 x flash's error + 1e-3
    results = _bench("chunk-B4-T512-L8704")
    assert [e["impl"] for e in results.failed] == ["ikport"]
    entry = results.failed[0]
    assert entry["max_abs_err"] > entry["tolerance"] and entry["note"] == "attention"
    assert "ikport" not in timed and "sdpa-flash" in timed
    assert results.ikport_failed and "ikport" not in results.vs_sdpa_flash["chunk-B4-T512-L8704"]


def test_output_left_unwritten_fails_on_the_poison(fake_ikport: FakeIkport) -> None:
    fake_ikport.ignore_out = True  # right values returned, out= left as it was (NaN)
    results = _bench("chunk-B4-T512-L8704-paged16")
    assert [(e["impl"], e["max_abs_err"]) for e in results.failed] == [("ikport", "inf")]
    assert ("chunk-B4-T512-L8704-paged16", "ikport") not in _by(results)


def test_slow_journey_step_is_capped(fake_ikport: FakeIkport, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "NAIVE_CAP_S", -1.0)  # any call is "too slow" for the naive step
    results = _bench("P1")
    assert [e["impl"] for e in results.skipped if e["reason"].startswith("too slow")] == ["ikport-naive"]
    assert ("P1", "ikport-naive") not in _by(results) and ("P1", "ikport-pipe") in _by(results)


def test_ikport_exception_is_an_error(fake_ikport: FakeIkport, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> torch.Tensor:
        raise ValueError("no prefill kernel")

    monkeypatch.setattr(ikport, "attention", broken)
    results = _bench("P2")
    assert [(e["impl"], e["reason"]) for e in results.errors] == [
        (name, "ValueError: no prefill kernel") for name in ("ikport", *bench.P2.journey)]
    assert {i for _, i in _by(results)} == {"sdpa-flash", "sdpa-default"}


# ---- FlashInfer, faked: the layouts the bench hands it --------------------------------------
class _FakeWrapper:
    """FlashInfer's batch prefill wrappers over ikport.reference: ragged q [tokens, Hq, D], K/V ragged
    [tokens, Hkv, D] or HND pages [pages, Hkv, page, D] with (indptr, indices, last page length)."""

    def __init__(self, workspace: torch.Tensor, kv_layout: str, backend: str = "auto") -> None:
        assert backend == "fa2" and workspace.dtype == torch.uint8
        self.layout = kv_layout

    def plan(self, qo_indptr, kv_indptr, *rest, causal=False, q_data_type=None, kv_data_type=None):
        self.qo, self.kv, self.causal, self.dtype = qo_indptr.tolist(), kv_indptr.tolist(), causal, q_data_type
        if len(rest) == 6:  # paged: indices, last_page_len, Hq, Hkv, D, page_size
            self.indices, self.last = rest[0].tolist(), rest[1].tolist()
            self.page = rest[5]
        self.hq, self.hkv, self.d = rest[2:5] if len(rest) == 6 else rest

    def run(self, q: torch.Tensor, k: Any, v: torch.Tensor | None = None) -> torch.Tensor:
        assert q.dtype == self.dtype and q.shape[1:] == (self.hq, self.d)
        parts = []
        for b in range(len(self.qo) - 1):
            if v is None:  # paged: gather this sequence's pages
                k_pages, v_pages = k
                ids = self.indices[self.kv[b]:self.kv[b + 1]]
                n = (len(ids) - 1) * self.page + self.last[b]
                ks, vs = (p[ids].transpose(0, 1).reshape(self.hkv, -1, self.d)[:, :n] for p in (k_pages, v_pages))
            else:
                assert self.layout == "NHD"
                ks, vs = (t[self.kv[b]:self.kv[b + 1]].transpose(0, 1) for t in (k, v))
            qs = q[self.qo[b]:self.qo[b + 1]].transpose(0, 1)
            o = ref_impl.attention(qs[None], ks[None], vs[None], causal=self.causal)[0]
            parts.append(o.transpose(0, 1))
        return torch.cat(parts)


def test_flashinfer_layouts(fake_ikport: FakeIkport, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("flashinfer")
    fake.BatchPrefillWithRaggedKVCacheWrapper = _FakeWrapper
    fake.BatchPrefillWithPagedKVCacheWrapper = _FakeWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(bench, "FLASHINFER_WORKSPACE_BYTES", 64)
    ids = ("P2", "varlen-N8-T16384", "chunk-B4-T512-L8704", "chunk-B4-T512-L8704-paged16")
    results = _bench(*ids, with_flashinfer=True)
    assert not results.failed, results.failed
    by = _by(results)
    for wid in ids:
        assert by[(wid, "flashinfer-fa2")]["max_abs_err"] <= by[(wid, "flashinfer-fa2")]["tolerance"]
    assert "ikport's pages" in by[("chunk-B4-T512-L8704-paged16", "flashinfer-fa2")]["note"]


def test_missing_flashinfer_is_a_skipped_peer(fake_ikport: FakeIkport) -> None:
    if importlib.util.find_spec("flashinfer") is not None:
        pytest.skip("FlashInfer is installed here")
    results = _bench("chunk-B4-T512-L8704", with_flashinfer=True)
    assert any(e["impl"] == "flashinfer-fa2" and "ModuleNotFoundError" in e["reason"] for e in results.skipped)


# ---- the area end to end ----------------------------------------------------------------------
def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness, "measure_read_roof", lambda n: {"bytes": n, "median_us": 1.0, "GBps": 1.0})
    monkeypatch.setattr(harness, "device_meta", lambda commit=None: json.loads(json.dumps(META)))
    out = tmp_path / "prefill-h100.json"
    args = bench_main.build_parser().parse_args(["prefill", "--out", str(out), *argv])
    args.command = "nox -s bench-cuda -- prefill " + " ".join(argv)
    code = args.run(args)
    return code, json.loads(out.read_text())


def test_run_writes_json_and_plot(fake_ikport: FakeIkport, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, doc = _run(monkeypatch, tmp_path)
    assert code == 0
    assert set(harness.FILE_KEYS) <= set(doc) and doc["ceiling_TFLOPs"] == 989.0
    assert doc["ceiling_GBps"] == harness.READ_ROOF_GBPS
    assert doc["quick"] is False and set(doc["rotated_sets"]) == set(SMALL)
    assert all(n >= 2 for n in doc["rotated_sets"].values())
    assert {r["workload"] for r in doc["results"]} == set(SMALL)
    assert set(doc["goals"]) == {g.name for g in bench.GOALS}
    for g in doc["goals"].values():
        assert {"what", "goal", "value", "pass"} <= set(g) and g["value"] is not None
    # all kernel times 11 us: ratios 1.0
    assert doc["goals"]["P1_vs_sdpa_flash"]["value"] == 1.0 and doc["goals"]["P1_vs_sdpa_flash"]["pass"] is False
    assert doc["goals"]["chunked_paged_vs_contiguous"]["pass"] is True
    assert doc["skipped"][0] == {"workload": "*", "impl": "flashinfer-fa2",
                                 "reason": "not importable: ModuleNotFoundError: No module named 'flashinfer'"}
    assert doc["failed"] == [] and doc["errors"] == []
    assert set(doc["tolerances"]) == set(SMALL) and doc["journey"] == bench.JOURNEY
    assert doc["speedup_vs_sdpa_flash"]["P2"]["ikport-sched"] == 1.0
    for r in doc["results"]:
        assert {"TFLOPs", "pct_matrix_roof", "flops", "bytes", "shape", "max_abs_err", "tolerance", "note"} <= set(r)
    journey_rows = {(r["workload"], r["impl"]) for r in doc["results"] if r["impl"] in bench.JOURNEY}
    assert {w for w, _ in journey_rows} == {"P1", "P2"} and ("P2", bench.NAIVE) not in journey_rows
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "prefill-h100.png").stat().st_size > 0


def test_quick_run_and_failure_exit(fake_ikport: FakeIkport, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_ikport.scale_by = 1.05
    code, doc = _run(monkeypatch, tmp_path, "--quick", "--no-plot")
    assert code == 1  # an ikport implementation missed the tolerance
    assert doc["quick"] is True
    assert list(doc["rotated_sets"]) == list(bench.QUICK_IDS)
    assert {e["workload"] for e in doc["failed"]} == set(bench.QUICK_IDS)
    assert doc["goals"]["P1_vs_sdpa_flash"]["missing"] == ["P1/ikport"]
    assert not (tmp_path / "prefill-h100.png").exists()


def test_plot_sweep(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [{"workload": w.id, "impl": impl, "TFLOPs": 100.0 + w.kv_len / 100}
            for w in bench.length_sweep() for impl in ("ikport", "sdpa-flash", "ikport-pipe")]
    png = bench.plot_sweep(rows, bench.length_sweep(), tmp_path / "p.png", "test device")
    assert png is not None and png.stat().st_size > 0
    assert bench.plot_sweep([], bench.length_sweep(), tmp_path / "none.png", "test device") is None


def test_print_tables(fake_ikport: FakeIkport, capsys: pytest.CaptureFixture[str]) -> None:
    results = _bench("P1")
    results.errors.append({"workload": "P1", "impl": "ikport-x", "reason": "RuntimeError: no"})
    bench.print_tables(results, bench.goals(results.rows))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("IKPORT ERROR P1 ikport-x")
    assert any(line.startswith("goal P1_vs_sdpa_flash") and line.endswith("FAIL") for line in lines)
    assert any(line.startswith("goal bf16_vs_fp16") and line.endswith("n/a") for line in lines)


def test_cli_and_missing_api(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_main.main(["prefill", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--only" in out and "P1" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delattr(ikport, "attention_varlen", raising=False)
    monkeypatch.delattr(ikport, "PrefillOptions", raising=False)
    assert bench_main.main(["prefill", "--quick"]) == 2
    assert "ikport lacks attention_varlen, PrefillOptions" in capsys.readouterr().out
