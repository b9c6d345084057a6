"""Decode attention: ikport beside SDPA's backends, eager PyTorch and FlashInfer, in one process.

Workloads D1-D3 are the protocol's locked ids (Llama 3 8B: 32 query heads, 8 KV heads, head_dim
128, fp16, one query token); D1-paged16/D2-paged16 are the same caches as 16-token pages behind a
shuffled block table; `sweep-B<b>-L<l>-D<d>-<dtype>` ids cover batch, length, head dim and dtype.
Bytes that must move are K + V (every sequence holds its full L). Each implementation is checked
against a float32 reference before it is timed; ikport failing the check aborts the run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ikport
from ikport.bench import harness

Q_HEADS = 32
KV_HEADS = 8
HEAD_DIM = 128
PAGE_SIZE = 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Max abs error against the float32 reference above which ikport's output is wrong.
TOLERANCE = {"fp16": 2e-2, "bf16": 5e-2}
SWEEP_BATCH = (1, 4, 16, 64)
SWEEP_LEN = (512, 4096, 32768, 131072)
SWEEP_HEAD_DIM = (64, 96, 256)  # head_dim 128 at B=8, L=4096 is D1; 96: the issue's roof-fraction goal
SWEEP_MAX_KV_BYTES = 4 * 10**9
# A measurement runs 50 timed calls unless that would take longer than this (slow journey variants).
CALL_BUDGET_S = 3.0
MIN_ITERS = 10
# Locked workloads also time every implementation's eager call in interleaved rounds (each round
# times them in turn, the order reversed every other round; the median over rounds is
# `eager_us_rounds`): a slow host spell then lands on every implementation alike instead of
# deciding one row (H100, decode-h100.json at 4305f28: every impl of the D1 row read 46-59 us of
# host time a call against 29-39 in the other rows).
EAGER_ROUNDS = 5
EAGER_ROUND_ITERS = 10


@dataclass(frozen=True)
class Workload:
    """A decode shape: q [batch, q_heads, 1, head_dim], K/V [batch, kv_heads, kv_len, head_dim]."""

    id: str
    batch: int
    kv_len: int
    head_dim: int = HEAD_DIM
    dtype: str = "fp16"
    page_size: int = 0  # 0: contiguous K/V; else paged with a shuffled block table
    variants: tuple[str, ...] = ()  # ikport journey variants timed beside the default
    q_heads: int = Q_HEADS
    kv_heads: int = KV_HEADS

    @property
    def locked(self) -> bool:
        return not self.id.startswith("sweep-")

    @property
    def kv_bytes(self) -> int:
        element = DTYPES[self.dtype].itemsize
        return 2 * self.batch * self.kv_heads * self.kv_len * self.head_dim * element

    def shape(self) -> dict[str, Any]:
        return {
            "B": self.batch,
            "Hq": self.q_heads,
            "Hkv": self.kv_heads,
            "L": self.kv_len,
            "D": self.head_dim,
            "dtype": self.dtype,
            "page_size": self.page_size,
        }


LOCKED = (
    Workload("D1", 8, 4096, variants=("naive", "split1", "split-unfused", "split-vector", "split-mma")),
    Workload("D2", 32, 8192, variants=("split1", "split-unfused", "split-vector", "split-mma")),
    Workload("D3", 1, 32768, variants=("naive", "split1", "split-unfused", "split-vector", "split-mma")),
    Workload("D1-paged16", 8, 4096, page_size=PAGE_SIZE),
    Workload("D2-paged16", 32, 8192, page_size=PAGE_SIZE),
)


def sweep_id(batch: int, kv_len: int, head_dim: int, dtype: str) -> str:
    return f"sweep-B{batch}-L{kv_len}-D{head_dim}-{dtype}"


def sweep_workloads() -> list[Workload]:
    """Batch x length at head_dim 128 fp16 (caches over ~4 GB left out), head dims, bf16."""
    grid = [
        Workload(sweep_id(b, n, HEAD_DIM, "fp16"), b, n) for b in SWEEP_BATCH for n in SWEEP_LEN
    ]
    out = [w for w in grid if w.kv_bytes <= SWEEP_MAX_KV_BYTES]
    out += [Workload(sweep_id(8, 4096, d, "fp16"), 8, 4096, head_dim=d) for d in SWEEP_HEAD_DIM]
    out.append(Workload(sweep_id(8, 4096, HEAD_DIM, "bf16"), 8, 4096, dtype="bf16"))
    return out


def workloads(quick: bool) -> list[Workload]:
    return list(LOCKED) if quick else [*LOCKED, *sweep_workloads()]


@dataclass
class PagedKV:
    """pages [num_pages, kv_heads, page_size, head_dim] and an int32 block table [batch, pages]."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor


@dataclass
class InputSet:
    """One set of random inputs; paged workloads carry both layouts (peers read the dense one)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_lens: torch.Tensor
    paged: PagedKV | None = None

    def pages(self) -> PagedKV:
        if self.paged is None:
            raise ValueError("this input set has no paged copy of its cache")
        return self.paged


def make_sets(w: Workload, count: int, device: str = "cuda") -> list[InputSet]:
    """`count` sets of inputs drawn from N(0, 0.25), seeded by the workload id."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(w.id.encode()))
    randn = partial(torch.randn, generator=gen, device=device, dtype=DTYPES[w.dtype])
    sets = []
    for _ in range(count):
        q = randn(w.batch, w.q_heads, 1, w.head_dim) * 0.5
        k = randn(w.batch, w.kv_heads, w.kv_len, w.head_dim) * 0.5
        v = randn(w.batch, w.kv_heads, w.kv_len, w.head_dim) * 0.5
        lens = torch.full((w.batch,), w.kv_len, dtype=torch.int32, device=device)
        s = InputSet(q, k, v, lens)
        if w.page_size:
            s.paged = PagedKV(*ikport.paged_kv_from_dense(k, v, w.page_size, shuffle=True))
        sets.append(s)
    return sets


def check_rows(batch: int) -> list[int]:
    """Sequences compared with the float32 reference: first, middle, last."""
    return sorted({0, batch // 2, batch - 1})


def reference(s: InputSet, rows: list[int]) -> torch.Tensor:
    """float32 attention of the sequences `rows`: [len(rows), q_heads, 1, head_dim]."""
    q, k, v = (t[rows].float() for t in (s.q, s.k, s.v))
    n, hq, _, d = q.shape
    scores = q.view(n, k.shape[1], -1, d) @ k.transpose(-1, -2) * d**-0.5
    return (scores.softmax(-1) @ v).view(n, hq, 1, d)


def max_abs_error(
    out: torch.Tensor, ref: torch.Tensor, rows: list[int], q_shape: torch.Size
) -> float:
    got = out.reshape(q_shape)[rows].float()
    if not torch.isfinite(got).all():
        return math.inf
    return (got - ref).abs().max().item()


@dataclass
class Prepared:
    """An implementation bound to every input set: `fns[i]()` runs it on set i under `context`."""

    fns: Sequence[Callable[[], Any]]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    note: str = ""


Builder = Callable[[Workload, list[InputSet]], Prepared]


def _ikport(variant: str | None) -> Builder:
    def build(w: Workload, sets: list[InputSet]) -> Prepared:
        if w.page_size:

            def paged_call(s: InputSet) -> Callable[[], torch.Tensor]:
                p = s.pages()
                args = (s.q, p.k_pages, p.v_pages, p.block_table, s.kv_lens)
                return partial(ikport.paged_attention, *args)

            fns = [paged_call(s) for s in sets]
            return Prepared(fns, note=f"paged_attention, page {w.page_size}, shuffled block table")
        options = None if variant is None else ikport.DecodeOptions(variant=variant)
        return Prepared([partial(ikport.attention, s.q, s.k, s.v, options=options) for s in sets])

    return build


def _sdpa(backend: SDPBackend | None) -> Builder:
    def build(w: Workload, sets: list[InputSet]) -> Prepared:
        fns = [
            partial(F.scaled_dot_product_attention, s.q, s.k, s.v, enable_gqa=True) for s in sets
        ]
        if backend is None:
            return Prepared(fns, note="enable_gqa=True, backend chosen by torch")
        return Prepared(fns, partial(sdpa_kernel, backend), f"enable_gqa=True, {backend.name}")

    return build


def grouped_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eager GQA without copying K/V: q grouped per KV head, scores @ K^T, fp32 softmax, @ V."""
    b, hq, tq, d = q.shape
    qg = q.reshape(b, k.shape[1], hq // k.shape[1] * tq, d)
    p = (qg @ k.transpose(-1, -2)).float().mul_(d**-0.5).softmax(-1).to(q.dtype)
    return (p @ v).reshape(b, hq, tq, d)


def repeat_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hugging Face's path: K/V expanded to every query head (repeat_kv), then default SDPA."""
    b, hkv, n, d = k.shape
    rep = q.shape[1] // hkv

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, None].expand(b, hkv, rep, n, d).reshape(b, hkv * rep, n, d)

    return F.scaled_dot_product_attention(q, repeat(k), repeat(v))


def _eager(fn: Callable[..., torch.Tensor], note: str) -> Builder:
    def build(w: Workload, sets: list[InputSet]) -> Prepared:
        return Prepared([partial(fn, s.q, s.k, s.v) for s in sets], note=note)

    return build


def _flashinfer(w: Workload, sets: list[InputSet]) -> Prepared:
    """BatchDecodeWithPagedKVCacheWrapper over HND pages: ikport's own pages where the workload is
    paged (one plan per block table), else the dense cache copied into contiguous pages."""
    import flashinfer

    page = w.page_size or PAGE_SIZE
    used = -(-w.kv_len // page)

    def plan(block_table: torch.Tensor) -> Any:
        workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")
        indices = block_table[:, :used].reshape(-1).to(torch.int32).contiguous()
        indptr = torch.arange(w.batch + 1, dtype=torch.int32, device="cuda") * used
        last = torch.full(
            (w.batch,), w.kv_len - (used - 1) * page, dtype=torch.int32, device="cuda"
        )
        dtype = DTYPES[w.dtype]
        wrapper.plan(
            indptr,
            indices,
            last,
            w.q_heads,
            w.kv_heads,
            w.head_dim,
            page,
            q_data_type=dtype,
            kv_data_type=dtype,
        )
        return wrapper

    def q3(s: InputSet) -> torch.Tensor:  # FlashInfer's decode query is [B, Hq, D]
        return s.q.view(w.batch, w.q_heads, w.head_dim)

    if w.page_size:
        paged = [s.pages() for s in sets]
        fns = [
            partial(plan(p.block_table).run, q3(s), (p.k_pages, p.v_pages))
            for s, p in zip(sets, paged, strict=True)
        ]
        note = f"paged HND, page {page}, ikport's shuffled block table; plan() untimed"
        return Prepared(fns, note=note)

    def pages(t: torch.Tensor) -> torch.Tensor:
        b, h, n, d = t.shape
        return t.view(b, h, n // page, page, d).transpose(1, 2).reshape(b * n // page, h, page, d)

    if w.kv_len % page:
        raise ValueError(f"kv_len {w.kv_len} is not a multiple of page {page}")
    wrapper = plan(
        torch.arange(w.batch * used, dtype=torch.int32, device="cuda").view(w.batch, used)
    )
    fns = [partial(wrapper.run, q3(s), (pages(s.k), pages(s.v))) for s in sets]
    note = f"paged HND copy of the dense cache, page {page}, contiguous pages; plan() untimed"
    return Prepared(fns, note=note)


PEERS: dict[str, Builder] = {
    "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa-default": _sdpa(None),
    "eager-grouped-matmul": _eager(grouped_matmul_attention, "q grouped per KV head, fp32 softmax"),
    "hf-repeat-kv": _eager(repeat_kv_attention, "K/V repeated to every query head, default SDPA"),
}


def implementations(w: Workload, with_flashinfer: bool) -> Iterator[tuple[str, Builder]]:
    yield "ikport", _ikport(None)
    for variant in w.variants:
        yield f"ikport-{variant}", _ikport(variant)
    yield from PEERS.items()
    if with_flashinfer:
        yield "flashinfer", _flashinfer


def flashinfer_problem() -> str | None:
    """None when FlashInfer imports, else why it does not."""
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes it an absent peer
        return f"{type(exc).__name__}: {exc}"
    return None


class WrongResult(AssertionError):
    """ikport's output differs from the reference: the run stops, nothing is timed or written."""


@dataclass
class Results:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    speedups: dict[str, dict[str, float]] = field(default_factory=dict)


def run_counts(call_us: float) -> tuple[int, int]:
    """(warmup, iters) for a call of `call_us`: 10 and 50, fewer only for very slow calls."""
    return harness.run_counts(call_us, budget_s=CALL_BUDGET_S, min_iters=MIN_ITERS)


def time_prepared(w: Workload, impl: str, prepared: Prepared) -> dict[str, Any]:
    """Kernel and eager time of a checked implementation as one result row (locked workloads
    also re-timed with the sleep doubled)."""
    m = harness.measure(
        prepared.fns, budget_s=CALL_BUDGET_S, min_iters=MIN_ITERS, check_sleep=w.locked
    )
    row = harness.measurement_row(
        m, workload=w.id, impl=impl, nbytes=w.kv_bytes, note=prepared.note
    )
    row["shape"] = w.shape()
    row["bytes"] = w.kv_bytes
    return row


def check_and_time(
    w: Workload, impl: str, build: Builder, sets: list[InputSet], ref: torch.Tensor, rows: list[int]
) -> tuple[dict[str, Any], Prepared]:
    """Bind `impl` to the sets, compare its output with the reference, then time it: its row,
    and the bound implementation (for the eager rounds).

    Raises WrongResult where an ikport implementation misses the tolerance.
    """
    prepared = build(w, sets)
    with prepared.context():
        err = max_abs_error(prepared.fns[0](), ref, rows, sets[0].q.shape)
        if impl.startswith("ikport") and not err <= TOLERANCE[w.dtype]:
            raise WrongResult(
                f"{impl} on {w.id} {w.shape()}: max abs error {err:.3g} against the float32 "
                f"reference (tolerance {TOLERANCE[w.dtype]}) on sequences {rows}"
            )
        row = time_prepared(w, impl, prepared)
    row["max_abs_err"] = float(f"{err:.3g}")
    return row, prepared


def interleaved_eager(prepared: dict[str, Prepared], *, rounds: int = EAGER_ROUNDS,
                      iters: int = EAGER_ROUND_ITERS) -> dict[str, float]:
    """Each implementation's eager call time, median over `rounds` rounds that time every
    implementation in turn (see EAGER_ROUNDS)."""
    medians: dict[str, list[float]] = {impl: [] for impl in prepared}
    order = list(prepared)
    for r in range(rounds):
        for impl in order if r % 2 == 0 else order[::-1]:
            with prepared[impl].context():
                medians[impl].append(harness.eager_time(prepared[impl].fns, warmup=2, iters=iters).median_us)
    return {impl: round(statistics.median(m), 2) for impl, m in medians.items()}


def bench_workload(w: Workload, results: Results, with_flashinfer: bool) -> None:
    """Check and time every implementation on `w`; a failing peer goes to `skipped`, a failing
    ikport call to `errors`, a wrong ikport result stops the run."""
    sets = make_sets(w, harness.rotation_count(w.kv_bytes, harness.l2_cache_bytes()))
    rows = check_rows(w.batch)
    ref = reference(sets[0], rows)
    print(f"{w.id}: {w.kv_bytes / 1e6:.0f} MB K+V, {len(sets)} rotated sets", flush=True)
    timed: dict[str, tuple[dict[str, Any], Prepared]] = {}
    for impl, build in implementations(w, with_flashinfer):
        ours = impl.startswith("ikport")
        try:
            row, prepared = check_and_time(w, impl, build, sets, ref, rows)
        except WrongResult:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded with its reason, never fatal
            reason = f"{type(exc).__name__}: {exc}".strip()[:400]
            entry = {"workload": w.id, "impl": impl, "reason": reason}
            (results.errors if ours else results.skipped).append(entry)
            print(
                f"  {impl:22s} {'ERROR' if ours else 'skipped'}: {reason.splitlines()[0]}",
                flush=True,
            )
            continue
        results.rows.append(row)
        timed[impl] = (row, prepared)
        print(
            f"  {impl:22s} {row['median_us']:10.2f} us {row['GBps']:7.0f} GB/s "
            f"{row['pct_roof']:5.1f}%  eager {row['eager_us']:9.2f} us  "
            f"err {row['max_abs_err']:.1e}",
            flush=True,
        )
    if w.locked and timed:
        rounds = interleaved_eager({impl: p for impl, (_, p) in timed.items()})
        for impl, us in rounds.items():
            timed[impl][0]["eager_us_rounds"] = us
        print("  eager, interleaved rounds: " + ", ".join(f"{i} {us:.1f}" for i, us in rounds.items()), flush=True)
    del timed
    ours_row = next(
        (r for r in results.rows if r["workload"] == w.id and r["impl"] == "ikport"), None
    )
    if ours_row is not None:
        # ikport is timed first; its kernel time again after the peers shows any order effect
        # (a B=64 L=512 row once read 63.5 us here and 56.5 us timed alone).
        prepared = _ikport(None)(w, sets)
        with prepared.context():
            ours_row["median_us_last"] = round(
                harness.kernel_time(prepared.fns, iters=run_counts(ours_row["median_us"])[1]).median_us, 2
            )
        print(f"  {'ikport (again, last)':22s} {ours_row['median_us_last']:10.2f} us", flush=True)
        results.speedups[w.id] = {
            r["impl"]: round(r["median_us"] / ours_row["median_us"], 3)
            for r in results.rows
            if r["workload"] == w.id and not r["impl"].startswith("ikport")
        }


def best_peer(rows: list[dict[str, Any]], workload: str) -> dict[str, Any] | None:
    peers = [r for r in rows if r["workload"] == workload and not r["impl"].startswith("ikport")]
    return min(peers, key=lambda r: r["median_us"], default=None)


def plot_sweep(rows: list[dict[str, Any]], path: Path, device: str) -> Path | None:
    """Time and % of read roof against L for ikport and the best peer, one colour per batch size
    (head_dim 128, fp16 sweep). Returns None where matplotlib is absent or nothing was swept."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ours = {
        (r["shape"]["B"], r["shape"]["L"]): r
        for r in rows
        if r["impl"] == "ikport"
        and r["workload"].startswith("sweep-")
        and (r["shape"]["D"], r["shape"]["dtype"]) == (HEAD_DIM, "fp16")
    }
    if not ours:
        return None
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(13, 5))
    for color, b in zip(("C0", "C1", "C2", "C3"), SWEEP_BATCH, strict=True):
        points = sorted((n, r) for (bb, n), r in ours.items() if bb == b)
        if not points:
            continue
        lens = [n for n, _ in points]
        peers = [(n, best_peer(rows, r["workload"])) for n, r in points]
        have = [(n, p) for n, p in peers if p is not None]
        for ax, key in ((ax_t, "median_us"), (ax_p, "pct_roof")):
            ours_y = [r[key] for _, r in points]
            ax.plot(lens, ours_y, "-o", color=color, label=f"ikport B={b}")
            peer_x, peer_y = [n for n, _ in have], [p[key] for _, p in have]
            ax.plot(peer_x, peer_y, "--s", color=color, alpha=0.6, label=f"best peer B={b}")
        for n, p in have:
            where = (n, p["pct_roof"])
            ax_p.annotate(
                p["impl"], where, fontsize=6, alpha=0.7, textcoords="offset points", xytext=(3, -8)
            )
    for ax in (ax_t, ax_p):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV length L (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("kernel time (us, median)")
    ax_p.set_ylabel(f"% of read roof ({harness.READ_ROOF_GBPS:.0f} GB/s)")
    ax_p.set_ylim(0, 105)
    ax_p.legend(fontsize=7, ncol=2, loc="best")
    fig.suptitle(f"Decode attention, Hq=32 Hkv=8 D=128 fp16, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_tables(results: Results) -> None:
    """Every row (sleep2x: median with the sleep doubled, locked workloads), then per workload
    ikport against the best peer: speedup = peer time / ikport time."""
    print(
        f"\n{'workload':26s} {'impl':22s} {'median':>9s} {'min':>9s} {'max':>9s} {'GB/s':>6s} "
        f"{'%roof':>6s} {'eager':>9s} {'err':>8s} {'sleep2x':>9s}"
    )
    for r in results.rows:
        print(
            f"{r['workload']:26s} {r['impl']:22s} {r['median_us']:9.2f} {r['min_us']:9.2f} "
            f"{r['max_us']:9.2f} {r['GBps']:6.0f} {r['pct_roof']:6.1f} {r['eager_us']:9.2f} "
            f"{r['max_abs_err']:8.1e} {r.get('median_us_sleep2x', '-'):>9}"
        )
    for entry in results.skipped:
        reason = entry["reason"].splitlines()[0][:120]
        print(f"skipped {entry['workload']} {entry['impl']}: {reason}")
    print(
        f"\n{'workload':26s} {'ikport us':>9s} {'%roof':>6s} {'eager':>8s} {'rounds':>8s}  {'best peer':22s} "
        f"{'peer us':>9s} {'speedup':>7s}"
    )
    for wid in dict.fromkeys(r["workload"] for r in results.rows):
        ours = next(
            (r for r in results.rows if r["workload"] == wid and r["impl"] == "ikport"), None
        )
        peer = best_peer(results.rows, wid)
        if ours is None or peer is None:
            continue
        speedup = peer["median_us"] / ours["median_us"]
        print(
            f"{wid:26s} {ours['median_us']:9.2f} {ours['pct_roof']:6.1f} {ours['eager_us']:8.1f} "
            f"{ours.get('eager_us_rounds', '-'):>8}  {peer['impl']:22s} {peer['median_us']:9.2f} {speedup:7.3f}"
        )
    for entry in results.errors:
        reason = entry["reason"].splitlines()[0][:200]
        print(f"IKPORT ERROR {entry['workload']} {entry['impl']}: {reason}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-plot", action="store_true", help="do not draw the sweep plot")


def run(args: argparse.Namespace) -> int:
    """Benchmark every workload, write the JSON (and plot); non-zero exit if ikport raised."""
    if not torch.cuda.is_available():
        print("decode benchmark: no CUDA/ROCm device visible to torch")
        return 2
    start = time.perf_counter()
    meta = harness.device_meta(commit=args.commit)
    out = Path(args.out or f"docs/results/decode-{harness.device_slug(meta['device'])}.json")
    problem = flashinfer_problem()
    results = Results()
    if problem is None:
        import flashinfer

        meta["versions"]["flashinfer"] = flashinfer.__version__
    else:
        results.skipped.append(
            {"workload": "*", "impl": "flashinfer", "reason": f"not importable: {problem}"}
        )
    roof = [harness.measure_read_roof(n) for n in (134_217_728, 1 << 30)]
    # One discarded pass over the first workload: the first rows timed in a fresh process read
    # eager times 20-30 us high (H100: D1 ikport 105.0 us there, 76.6-79.4 us in interleaved
    # rounds later in a process, decode-eager-h100-run2/3.json), and ikport is always timed first.
    print("warm-up pass (discarded):", flush=True)
    bench_workload(workloads(args.quick)[0], Results(), problem is None)
    for w in workloads(args.quick):
        bench_workload(w, results, problem is None)
        torch.cuda.empty_cache()
    extra = {
        "bytes": "K+V = 2 * B * Hkv * L * D * element size; every sequence holds L tokens",
        "method": (
            "kernel time: torch.cuda._sleep queued before the start event (sized at 2x the call's "
            "host time, >= 100 us; median_us_sleep2x re-times locked workloads with it doubled; "
            "median_us_last re-times ikport after the peers); "
            "eager_us: call on an idle GPU, synchronize after each; eager_us_rounds (locked "
            f"workloads): median of {EAGER_ROUNDS} rounds timing every impl in turn "
            f"({EAGER_ROUND_ITERS} calls each, order reversed every other round); input sets rotated, "
            "> 3x the L2 in total; max_abs_err against float32 on the first, middle and last "
            "sequence"
        ),
        "read_measured": roof,
        "speedup_vs_peers": results.speedups,
        "skipped": results.skipped,
        "errors": results.errors,
    }
    return harness.finish_run(
        out, command=args.command, rows=results.rows, extra=extra, meta=meta, roof=roof,
        print_tables=lambda: print_tables(results),
        plot=None if args.no_plot else lambda png: plot_sweep(results.rows, png, meta["device"]),
        started=start, failed=bool(results.errors),
    )
