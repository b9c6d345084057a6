"""Prefill attention: ikport beside SDPA's backends and FlashInfer, in one process.

Workloads P1 and P2 are the protocol's locked ids (Llama 3 8B: 32 query heads, 8 KV heads,
head_dim 128, fp16, causal, the whole prompt at once: Tq = L): P1 is B=4 L=4096, P2 B=1 L=16384.
The sweep runs L = 512..32768 at 16384 tokens a batch (P1 and P2 are two of its points), head dims
64 and 256, bf16, GQA ratios 1 and 8 and non-causal at P1's shape (`sweep-B<b>-L<l>-D<d>-<dtype>`,
`-H<q>x<kv>` where the heads differ from 32x8, `-noncausal`), a batch of 8 sequences of mixed
lengths through attention_varlen (`varlen-N8-T16384`), and chunked prefill: 512 new tokens over
8192 cached ones, contiguous and in 16-token pages (`chunk-B4-T512-L8704`, `...-paged16`).
Causal masks are aligned bottom-right (query i of Tq sees keys <= L - Tq + i).

Prefill is compute-bound: rows carry TFLOP/s counting only the query-key pairs the mask keeps
(prefill_flops) and its fraction of the H100's dense fp16 matrix roof; GBps (Q, K, V and the
output moved once) stays for the protocol's row shape. Each implementation's output (ikport's
written into a NaN-filled `out=`) is compared with a float32 reference before it is timed: max abs
error within 2x SDPA-flash's own on the same inputs, plus 1e-3. One that misses is listed under
`failed` and not timed; the run goes on and exits non-zero if an ikport implementation failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

import ikport
from ikport.bench import harness

Q_HEADS = 32
KV_HEADS = 8
HEAD_DIM = 128
PAGE_SIZE = 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The length sweep keeps the tokens of a batch constant (B = max(1, SWEEP_TOKENS // L)), so every
# point does the same work but for the causal triangle's size: what changes is the per-sequence
# shape the kernel schedules. B=4 L=4096 is P1, B=1 L=16384 is P2.
SWEEP_TOKENS = 16384
SWEEP_LEN = (512, 1024, 2048, 4096, 8192, 16384, 32768)
# Head dims beside P1's 128, with the (query, KV) heads they run with: 256 at half the heads keeps
# Q, K and V the size of P1's (and the fp32 reference's tiles modest).
HEAD_DIM_HEADS = {64: (32, 8), 256: (16, 4)}
GQA_KV_HEADS = (32, 4)  # 32 query heads over these: ratios 1 and 8 (P1 is ratio 4)
# Varlen: fixed lengths between 300 and 6000, none a multiple of a 64- or 128-row tile but 2048,
# 16384 tokens in all (the sweep's count).
VARLEN_LENS = (5911, 317, 2048, 4001, 731, 1500, 333, 1543)
# Chunked prefill: CHUNK_NEW new tokens per sequence over CHUNK_CACHED already in the cache.
CHUNK_BATCH, CHUNK_NEW, CHUNK_CACHED = 4, 512, 8192

# The journey: each step of the kernel's story as a named implementation with the PrefillOptions
# fields it pins (ikport.PrefillOptions(**fields)); "ikport" itself passes options=None.
JOURNEY: dict[str, dict[str, Any]] = {
    "ikport-naive": {"variant": "naive"},
    "ikport-mma-nopipe": {"variant": "fa2", "stages": 1, "pad": False, "longest_first": False},
    "ikport-pipe": {"variant": "fa2", "pad": False, "longest_first": False},
    "ikport-pad": {"variant": "fa2", "pad": True, "longest_first": False},
    "ikport-sched": {"variant": "fa2", "longest_first": True},
}
NAIVE = "ikport-naive"  # on P1 only, and only timed while a call stays under NAIVE_CAP_S

# Correctness: max abs error against the float32 reference within TOLERANCE_FACTOR x SDPA-flash's
# own plus TOLERANCE_SLACK; where SDPA-flash did not run, FALLBACK_TOLERANCE (decode's values).
TOLERANCE_FACTOR = 2.0
TOLERANCE_SLACK = 1e-3
FALLBACK_TOLERANCE = {"fp16": 2e-2, "bf16": 5e-2}
# A call that takes longer than this (host clock, after its first, compiling call) is not timed:
# a journey step or a peer falling back to a slow path must not eat a device session.
CALL_CAP_S = 2.0
NAIVE_CAP_S = 0.5
# A timed loop runs 50 calls unless that would take longer than this.
CALL_BUDGET_S = 3.0
MIN_ITERS = 10
# The reference keeps its float32 score tiles (query heads of a group x query block x keys) under
# this many elements (512 MB).
REF_TILE_ELEMENTS = 1 << 27
FLASHINFER_WORKSPACE_BYTES = 128 * 1024 * 1024
READ_PASS_BYTES = 1 << 30  # one informational streaming read, as the other areas record


# ---- workloads --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """q [B, Hq, Tq, D] against K/V [B, Hkv, L, D]: Tq new tokens per sequence attending to L keys
    (the L - Tq cached ones and themselves). Varlen workloads list each sequence's length in
    `seq_lens` (Tq = L per sequence; `batch` is their count, `q_len`/`kv_len` the longest)."""

    id: str
    batch: int
    kv_len: int
    q_len: int
    q_heads: int = Q_HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    dtype: str = "fp16"
    causal: bool = True
    page_size: int = 0  # 0: contiguous K/V; else paged behind a shuffled block table
    seq_lens: tuple[int, ...] = ()
    journey: tuple[str, ...] = ()  # JOURNEY names timed beside "ikport"

    @property
    def locked(self) -> bool:
        return self.id in LOCKED_IDS

    @property
    def varlen(self) -> bool:
        return bool(self.seq_lens)

    def sequences(self) -> list[tuple[int, int]]:
        """(query tokens, keys) of each sequence."""
        if self.varlen:
            return [(n, n) for n in self.seq_lens]
        return [(self.q_len, self.kv_len)] * self.batch

    @property
    def flops(self) -> int:
        return prefill_flops(self.q_heads, self.head_dim, self.sequences(), self.causal)

    @property
    def bytes(self) -> int:
        """Q and the output, K and V, each moved once."""
        tq = sum(t for t, _ in self.sequences())
        tk = sum(n for _, n in self.sequences())
        elements = 2 * tq * self.q_heads * self.head_dim + 2 * tk * self.kv_heads * self.head_dim
        return elements * DTYPES[self.dtype].itemsize

    def shape(self) -> dict[str, Any]:
        shape = {
            "B": self.batch,
            "Hq": self.q_heads,
            "Hkv": self.kv_heads,
            "L": self.kv_len,
            "Tq": self.q_len,
            "D": self.head_dim,
            "dtype": self.dtype,
            "causal": self.causal,
            "page_size": self.page_size,
        }
        if self.varlen:
            shape["seq_lens"] = list(self.seq_lens)
        return shape


def keys_seen(q_len: int, kv_len: int, causal: bool) -> int:
    """Query-key pairs of one sequence and head: the sum over its q_len query rows of the keys
    each attends to. Causal is aligned bottom-right: row i (from 0) sees keys 0..kv_len - q_len + i,
    kv_len - q_len + i + 1 of them, none while that count is not positive."""
    if not causal:
        return q_len * kv_len
    first = max(1, kv_len - q_len + 1)  # keys seen by the first row that sees any
    if kv_len < first:
        return 0
    return (first + kv_len) * (kv_len - first + 1) // 2


def prefill_flops(q_heads: int, head_dim: int, sequences: Iterable[tuple[int, int]],
                  causal: bool) -> int:
    """Matrix FLOPs of attention over `sequences` of (query tokens, keys): every query-key pair the
    mask keeps costs a D-long dot product (Q K^T) and a D-long multiply-add into the output (P V),
    2 FLOPs an element each: 4 * Hq * D * keys_seen, summed over the sequences. The masked half
    of a causal product is not counted, nor the softmax (FlashAttention's convention).
    Causal Tq = L: 4 * Hq * D * L * (L + 1) / 2 per sequence."""
    return 4 * q_heads * head_dim * sum(keys_seen(tq, n, causal) for tq, n in sequences)


def sweep_id(w: Workload) -> str:
    heads = "" if (w.q_heads, w.kv_heads) == (Q_HEADS, KV_HEADS) else f"-H{w.q_heads}x{w.kv_heads}"
    mask = "" if w.causal else "-noncausal"
    return f"sweep-B{w.batch}-L{w.kv_len}-D{w.head_dim}-{w.dtype}{heads}{mask}"


P1 = Workload("P1", 4, 4096, 4096, journey=tuple(JOURNEY))
P2 = Workload("P2", 1, 16384, 16384, journey=tuple(n for n in JOURNEY if n != NAIVE))
LOCKED = (P1, P2)
LOCKED_IDS = frozenset(w.id for w in LOCKED)
CHUNK = Workload(f"chunk-B{CHUNK_BATCH}-T{CHUNK_NEW}-L{CHUNK_CACHED + CHUNK_NEW}", CHUNK_BATCH,
                 CHUNK_CACHED + CHUNK_NEW, CHUNK_NEW)
CHUNK_PAGED = dataclasses.replace(CHUNK, id=f"{CHUNK.id}-paged{PAGE_SIZE}", page_size=PAGE_SIZE)
VARLEN = Workload(f"varlen-N{len(VARLEN_LENS)}-T{sum(VARLEN_LENS)}", len(VARLEN_LENS),
                  max(VARLEN_LENS), max(VARLEN_LENS), seq_lens=VARLEN_LENS)


def at_p1(**changes: Any) -> Workload:
    """P1's shape with `changes`, under its sweep id, without the journey."""
    w = dataclasses.replace(P1, journey=(), **changes)
    return dataclasses.replace(w, id=sweep_id(w))


HEAD_DIMS = tuple(at_p1(head_dim=d, q_heads=hq, kv_heads=hkv) for d, (hq, hkv) in HEAD_DIM_HEADS.items())
D64, D256 = HEAD_DIMS
BF16 = at_p1(dtype="bf16")
GQA = tuple(at_p1(kv_heads=hkv) for hkv in GQA_KV_HEADS)
NONCAUSAL = at_p1(causal=False)


def length_sweep() -> list[Workload]:
    """L = 512..32768 at SWEEP_TOKENS tokens a batch; P1 and P2 stand for their own points."""
    out = []
    for n in SWEEP_LEN:
        b = max(1, SWEEP_TOKENS // n)
        locked = next((w for w in LOCKED if (w.batch, w.kv_len, w.q_len) == (b, n, n)), None)
        out.append(locked or at_p1(batch=b, kv_len=n, q_len=n))
    return out


def all_workloads() -> list[Workload]:
    """The locked workloads first, then the length sweep, P1's variations, varlen, chunked."""
    sweep = [w for w in length_sweep() if not w.locked]
    return [*LOCKED, *sweep, *HEAD_DIMS, BF16, *GQA, NONCAUSAL, VARLEN, CHUNK, CHUNK_PAGED]


QUICK_IDS = (P1.id, CHUNK.id, CHUNK_PAGED.id)


def workloads(quick: bool, only: Sequence[str] | None = None) -> list[Workload]:
    """--quick: P1 and the chunked pair; `only`: those ids (of the full list), in its order."""
    ids = set(only or ()) or (set(QUICK_IDS) if quick else None)
    return [w for w in all_workloads() if ids is None or w.id in ids]


def parse_only(text: str) -> tuple[str, ...]:
    """--only's value: workload ids separated by commas ('P1', 'P1,chunk-B4-T512-L8704')."""
    known = [w.id for w in all_workloads()]
    ids = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in ids if t not in known]
    if not ids or unknown:
        raise argparse.ArgumentTypeError(f"unknown workload id(s) {unknown or [text]}; choose {known}")
    return ids


# ---- inputs and the reference -----------------------------------------------------------------
@dataclass
class PagedKV:
    """pages [num_pages, kv_heads, page_size, head_dim] and an int32 block table [batch, pages]."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor


@dataclass
class InputSet:
    """One set of inputs. Dense: q [B, Hq, Tq, D], k/v [B, Hkv, L, D] (paged workloads carry the
    pages too: the peers read the dense copy). Varlen: q [total, Hq, D], k/v [total, Hkv, D] and
    cu_seqlens int32 [B + 1]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_lens: torch.Tensor | None = None
    paged: PagedKV | None = None
    cu_seqlens: torch.Tensor | None = None

    def pages(self) -> PagedKV:
        if self.paged is None:
            raise ValueError("this input set has no paged copy of its cache")
        return self.paged


def make_sets(w: Workload, count: int, device: str = "cuda") -> list[InputSet]:
    """`count` sets drawn from N(0, 1) (scaled scores then spread about 1: a softmax neither flat
    nor one-hot), seeded by the workload id."""
    seed = zlib.crc32(w.id.encode())
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = partial(torch.randn, generator=gen, device=device, dtype=DTYPES[w.dtype])
    sets = []
    for i in range(count):
        if w.varlen:
            total = sum(w.seq_lens)
            cu = torch.tensor([0, *itertools.accumulate(w.seq_lens)], dtype=torch.int32, device=device)
            sets.append(InputSet(randn(total, w.q_heads, w.head_dim), randn(total, w.kv_heads, w.head_dim),
                                 randn(total, w.kv_heads, w.head_dim), cu_seqlens=cu))
            continue
        q = randn(w.batch, w.q_heads, w.q_len, w.head_dim)
        k = randn(w.batch, w.kv_heads, w.kv_len, w.head_dim)
        v = randn(w.batch, w.kv_heads, w.kv_len, w.head_dim)
        lens = torch.full((w.batch,), w.kv_len, dtype=torch.int32, device=device)
        s = InputSet(q, k, v, lens)
        if w.page_size:
            order = torch.Generator().manual_seed(seed + i)  # paged_kv_from_dense shuffles on the host
            s.paged = PagedKV(*ikport.paged_kv_from_dense(k, v, w.page_size, shuffle=True, generator=order))
        sets.append(s)
    return sets


def check_rows(w: Workload) -> list[int] | None:
    """Sequences compared with the reference: first, middle and last of a dense batch; every
    sequence of a varlen one (None)."""
    return None if w.varlen else sorted({0, w.batch // 2, w.batch - 1})


def reference_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """float32 attention of one sequence, q [Hq, Tq, D] over k/v [Hkv, L, D] -> [Hq, Tq, D].

    Per KV head and block of queries, so the score tile stays under REF_TILE_ELEMENTS; a causal
    block reads only the keys its last row sees. Matmuls at full float32 precision (no TF32).
    """
    hq, tq, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    block = max(1, REF_TILE_ELEMENTS // (g * max(n, 1)))
    out = torch.empty(hq, tq, d, dtype=torch.float32, device=q.device)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for h in range(hkv):
            kf, vf = k[h].float(), v[h].float()
            heads = slice(h * g, (h + 1) * g)
            for s in range(0, tq, block):
                e = min(tq, s + block)
                end = n - tq + e if causal else n  # keys the block's last row sees
                scores = (q[heads, s:e].float() @ kf[:end].T) * d**-0.5  # [g, e - s, end]
                if causal:
                    i = torch.arange(s, e, device=q.device).view(-1, 1)
                    j = torch.arange(end, device=q.device).view(1, -1)
                    scores.masked_fill_(j > n - tq + i, -math.inf)
                out[heads, s:e] = scores.softmax(-1) @ vf[:end]
    finally:
        torch.set_float32_matmul_precision(previous)
    return out


def reference(w: Workload, s: InputSet, rows: list[int] | None) -> torch.Tensor:
    """float32 output of the checked sequences, in the workload's own layout: [len(rows), Hq, Tq, D]
    for a dense batch, [total, Hq, D] for varlen."""
    if rows is None:
        bounds = list(itertools.accumulate(w.seq_lens, initial=0))
        parts = [reference_sequence(s.q[a:b].transpose(0, 1), s.k[a:b].transpose(0, 1),
                                    s.v[a:b].transpose(0, 1), w.causal).transpose(0, 1)
                 for a, b in itertools.pairwise(bounds)]
        return torch.cat(parts)
    return torch.stack([reference_sequence(s.q[b], s.k[b], s.v[b], w.causal) for b in rows])


def max_abs_error(out: torch.Tensor, ref: torch.Tensor, rows: list[int] | None) -> float:
    """max |out - ref| over the checked sequences; inf for a wrong shape or any non-finite value
    (a poisoned `out=` element left unwritten)."""
    got = out if rows is None else out[rows]
    if tuple(got.shape) != tuple(ref.shape):
        return math.inf
    got = got.float()
    if not torch.isfinite(got).all():
        return math.inf
    return (got - ref).abs().max().item()


def tolerance(dtype: str, flash_err: float | None) -> tuple[float, str]:
    """(tolerance, how it was set) from SDPA-flash's own error on the workload."""
    if flash_err is not None and math.isfinite(flash_err):
        tol = TOLERANCE_FACTOR * flash_err + TOLERANCE_SLACK
        return tol, f"{TOLERANCE_FACTOR:g} x sdpa-flash's {flash_err:.3g} + {TOLERANCE_SLACK:g}"
    return FALLBACK_TOLERANCE[dtype], f"fallback for {dtype} (sdpa-flash did not run)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _number(x: float) -> float | str:
    """A JSON-safe error figure: 3 significant digits, or 'inf'/'nan'."""
    return float(f"{x:.3g}") if math.isfinite(x) else str(x)


# ---- implementations --------------------------------------------------------------------------
def _same(out: Any) -> torch.Tensor:
    return out


@dataclass
class Prepared:
    """An implementation bound to every input set: `fns[i]()` runs it on set i under `context`
    (timed); `checked()` is the call whose output is compared with the reference (set 0; ikport's
    into a NaN-filled out=), and `canon` turns an output into the workload's layout."""

    fns: Sequence[Callable[[], Any]]
    checked: Callable[[], Any]
    canon: Callable[[Any], torch.Tensor] = _same
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    note: str = ""
    plan: Any = None


Builder = Callable[[Workload, list[InputSet]], Prepared]


@dataclass(frozen=True)
class Impl:
    name: str
    build: Builder
    cap_s: float = CALL_CAP_S

    @property
    def ours(self) -> bool:
        return self.name.startswith("ikport")


def _ikport_call(w: Workload, s: InputSet, options: Any) -> tuple[Callable[..., torch.Tensor], tuple, dict]:
    """(function, args, kwargs) of ikport's call on one set."""
    if w.varlen:
        cu = s.cu_seqlens
        args = (s.q, s.k, s.v, cu, cu, max(w.seq_lens), max(w.seq_lens))
        return ikport.attention_varlen, args, {"causal": w.causal, "options": options}
    if w.page_size:
        p = s.pages()
        args = (s.q, p.k_pages, p.v_pages, p.block_table, s.kv_lens)
        return ikport.paged_attention, args, {"causal": w.causal, "options": options}
    return ikport.attention, (s.q, s.k, s.v), {"causal": w.causal, "options": options}


def plan_info(w: Workload, s: InputSet, options: Any) -> Any:
    """What ikport.impl.prefill.plan_of says about a dense call, where that function exists
    (a dict of a dataclass plan's fields, else its text); None where it does not."""
    try:
        from ikport.impl import prefill as impl_prefill
    except ImportError:
        return None
    plan_of = getattr(impl_prefill, "plan_of", None)
    if plan_of is None or w.varlen or w.page_size:
        return None
    try:
        try:
            plan = plan_of(s.q, s.k, causal=w.causal, options=options)
        except TypeError:
            plan = plan_of(s.q, s.k)
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"plan_of failed: {type(exc).__name__}: {exc}"[:300]
    if dataclasses.is_dataclass(plan) and not isinstance(plan, type):
        return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
                for k, v in dataclasses.asdict(plan).items()}
    return str(plan)[:300]


def _ikport(options: dict[str, Any] | None) -> Builder:
    def build(w: Workload, sets: list[InputSet]) -> Prepared:
        opts = None if options is None else ikport.PrefillOptions(**options)
        calls = [_ikport_call(w, s, opts) for s in sets]
        fn, args, kwargs = calls[0]

        def poisoned() -> torch.Tensor:
            out = torch.full_like(sets[0].q, math.nan)
            fn(*args, **kwargs, out=out)
            return out  # what landed in out=, whatever the call returned

        note = fn.__name__
        if w.page_size:
            note += f", page {w.page_size}, shuffled block table"
        if options is not None:
            note += ", PrefillOptions(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
        return Prepared([partial(f, *a, **k) for f, a, k in calls], poisoned, note=note,
                        plan=plan_info(w, sets[0], opts))

    return build


# How SDPA gets the mask and the KV heads: alternatives, first choice first; the first that runs
# is timed and the row's note says which (and why the earlier ones did not).
def _sdpa_masks(w: Workload, device: torch.device) -> list[tuple[str, dict[str, Any]]]:
    if not w.causal:
        return [("no mask", {})]
    if w.varlen or w.q_len == w.kv_len:
        return [("is_causal=True (Tq = L: top-left and bottom-right agree)", {"is_causal": True})]
    # SDPA's is_causal is aligned top-left; chunked prefill needs bottom-right.
    tq, n = w.q_len, w.kv_len
    boolean = torch.ones(tq, n, dtype=torch.bool, device=device).tril(n - tq)
    return [
        (f"attn_mask=causal_lower_right({tq}, {n})", {"attn_mask": causal_lower_right(tq, n)}),
        (f"explicit bottom-right boolean mask [{tq}, {n}]", {"attn_mask": boolean}),
    ]


KVHeads = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


def _sdpa_kv_heads(w: Workload) -> list[tuple[str, KVHeads]]:
    if w.q_heads == w.kv_heads:
        return [("", lambda k, v: (k, v, {}))]
    g = w.q_heads // w.kv_heads

    def repeat(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), {}

    return [("enable_gqa=True", lambda k, v: (k, v, {"enable_gqa": True})),
            ("K/V repeat_interleave'd to every query head", repeat)]


def _first_that_runs(candidates: Iterable[tuple[str, Callable[[], list[Callable[[], Any]]]]],
                     context: Callable[[], contextlib.AbstractContextManager[Any]],
                     canon: Callable[[Any], torch.Tensor], label: str, device: torch.device) -> Prepared:
    problems = []
    for note, make in candidates:
        try:
            fns = make()
            with context():
                fns[0]()
            _synchronize(device)
        except Exception as exc:  # noqa: BLE001 - the next alternative, or the peer is skipped
            first = (str(exc).strip().splitlines() or [""])[0]
            problems.append(f"{note}: {type(exc).__name__}: {first}"[:300])
            continue
        tried = f"; tried first: {' | '.join(problems)}" if problems else ""
        return Prepared(fns, fns[0], canon, context, f"{label}, {note}{tried}")
    raise RuntimeError(" | ".join(problems))


def _sdpa_each(calls: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]]) -> list[torch.Tensor]:
    return [F.scaled_dot_product_attention(q, k, v, **kw) for q, k, v, kw in calls]


def _cat_sequences(outs: list[torch.Tensor]) -> torch.Tensor:
    """One [1, Hq, n, D] output per sequence -> [total, Hq, D]."""
    return torch.cat([o[0].transpose(0, 1) for o in outs])


def _per_sequence(w: Workload, t: torch.Tensor) -> list[torch.Tensor]:
    """[total, H, D] -> one contiguous [1, H, n, D] per sequence."""
    bounds = list(itertools.accumulate(w.seq_lens, initial=0))
    return [t[a:b].transpose(0, 1).unsqueeze(0).contiguous() for a, b in itertools.pairwise(bounds)]


def _sdpa(backend: SDPBackend | None) -> Builder:
    def build(w: Workload, sets: list[InputSet]) -> Prepared:
        context = contextlib.nullcontext if backend is None else partial(sdpa_kernel, backend)
        label = "backend chosen by torch" if backend is None else backend.name
        device = sets[0].q.device

        def dense(heads: KVHeads, mask: dict[str, Any]) -> list[Callable[[], Any]]:
            fns = []
            for s in sets:
                k, v, kw = heads(s.k, s.v)
                fns.append(partial(F.scaled_dot_product_attention, s.q, k, v, **kw, **mask))
            return fns

        def each(heads: KVHeads, mask: dict[str, Any]) -> list[Callable[[], Any]]:
            fns = []
            for s in sets:
                calls = []
                for q, k, v in zip(*(_per_sequence(w, t) for t in (s.q, s.k, s.v)), strict=True):
                    k, v, kw = heads(k, v)
                    calls.append((q, k, v, {**kw, **mask}))
                fns.append(partial(_sdpa_each, calls))
            return fns

        make = each if w.varlen else dense
        if w.varlen:
            label += ", one call per sequence ([1, H, n, D] copies made ahead, untimed)"
        candidates = (
            (", ".join(filter(None, (h_note, m_note))), partial(make, heads, mask))
            for h_note, heads in _sdpa_kv_heads(w)
            for m_note, mask in _sdpa_masks(w, device)
        )
        return _first_that_runs(candidates, context, _cat_sequences if w.varlen else _same, label, device)

    return build


def _torch_flash_varlen(w: Workload, sets: list[InputSet]) -> Prepared:
    """SDPA's FA2 kernel through its varlen entry, torch.ops.aten._flash_attention_forward with
    cu_seqlens (a private op): the one-call varlen peer inside torch."""
    if not w.varlen:
        raise ValueError("varlen workloads only")
    longest = max(w.seq_lens)
    fns = [partial(torch.ops.aten._flash_attention_forward, s.q, s.k, s.v, s.cu_seqlens, s.cu_seqlens,
                   longest, longest, 0.0, w.causal, False) for s in sets]
    return Prepared(fns, fns[0], lambda out: out[0],
                    note="torch.ops.aten._flash_attention_forward(cu_seqlens), GQA native")


def _flashinfer(w: Workload, sets: list[InputSet]) -> Prepared:
    """FlashInfer's fa2 batch prefill: the ragged wrapper over contiguous K/V (dense batches copied
    to its [tokens, heads, D] layout ahead, untimed), the paged wrapper over ikport's own HND pages.
    Its causal mask is aligned bottom-right. plan() is untimed."""
    import flashinfer

    device = sets[0].q.device
    dtype = DTYPES[w.dtype]
    common = {"causal": w.causal, "q_data_type": dtype, "kv_data_type": dtype}

    def workspace() -> torch.Tensor:
        return torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)

    heads_d = (w.q_heads, w.kv_heads, w.head_dim)
    if w.varlen:
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend="fa2")
        cu = sets[0].cu_seqlens
        wrapper.plan(cu, cu, *heads_d, **common)
        fns = [partial(wrapper.run, s.q, s.k, s.v) for s in sets]
        return Prepared(fns, fns[0], note="BatchPrefillWithRaggedKVCacheWrapper, NHD, fa2")

    def ragged(t: torch.Tensor) -> torch.Tensor:  # [B, H, n, D] -> [B * n, H, D], a copy
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b * n, h, d)

    def canon(out: torch.Tensor) -> torch.Tensor:
        return out.view(w.batch, w.q_len, w.q_heads, w.head_dim).transpose(1, 2)

    qo = torch.arange(w.batch + 1, dtype=torch.int32, device=device) * w.q_len
    if w.page_size:
        used = -(-w.kv_len // w.page_size)
        kv = torch.arange(w.batch + 1, dtype=torch.int32, device=device) * used
        last = torch.full((w.batch,), w.kv_len - (used - 1) * w.page_size, dtype=torch.int32, device=device)
        fns = []
        for s in sets:  # one plan per block table (each set's pages are shuffled its own way)
            p = s.pages()
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "HND", backend="fa2")
            indices = p.block_table[:, :used].reshape(-1).contiguous()
            wrapper.plan(qo, kv, indices, last, *heads_d, w.page_size, **common)
            fns.append(partial(wrapper.run, ragged(s.q), (p.k_pages, p.v_pages)))
        note = f"BatchPrefillWithPagedKVCacheWrapper, HND, fa2, ikport's pages (page {w.page_size})"
        return Prepared(fns, fns[0], canon, note=note)
    kv = torch.arange(w.batch + 1, dtype=torch.int32, device=device) * w.kv_len
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend="fa2")
    wrapper.plan(qo, kv, *heads_d, **common)
    fns = [partial(wrapper.run, ragged(s.q), ragged(s.k), ragged(s.v)) for s in sets]
    return Prepared(fns, fns[0], canon, note="BatchPrefillWithRaggedKVCacheWrapper, NHD copies, fa2")


FLASH = Impl("sdpa-flash", _sdpa(SDPBackend.FLASH_ATTENTION))  # the reference peer of every ratio
PEERS = (
    FLASH,
    Impl("sdpa-cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION)),
    Impl("sdpa-default", _sdpa(None)),
)


def implementations(w: Workload, with_flashinfer: bool) -> list[Impl]:
    impls = [Impl("ikport", _ikport(None))]
    impls += [Impl(name, _ikport(JOURNEY[name]), NAIVE_CAP_S if name == NAIVE else CALL_CAP_S)
              for name in w.journey]
    impls += PEERS
    if w.varlen:
        impls.append(Impl("torch-flash-varlen", _torch_flash_varlen))
    if with_flashinfer:
        impls.append(Impl("flashinfer-fa2", _flashinfer))
    return impls


def api_problem() -> str | None:
    """None when ikport's prefill API is there, else what is missing."""
    missing = [n for n in ("attention", "paged_attention", "attention_varlen", "PrefillOptions")
               if not hasattr(ikport, n)]
    return f"ikport lacks {', '.join(missing)}" if missing else None


def flashinfer_problem() -> str | None:
    """None when FlashInfer imports, else why it does not."""
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes it an absent peer
        return f"{type(exc).__name__}: {exc}"
    return None


# ---- checking and timing ----------------------------------------------------------------------
@dataclass
class Results:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # peers that could not run, too slow
    failed: list[dict[str, Any]] = field(default_factory=list)  # outside the tolerance: not timed
    errors: list[dict[str, Any]] = field(default_factory=list)  # ikport calls that raised
    tolerances: dict[str, dict[str, Any]] = field(default_factory=dict)  # workload -> value, how
    vs_sdpa_flash: dict[str, dict[str, float]] = field(default_factory=dict)  # flash us / impl us

    @property
    def ikport_failed(self) -> bool:
        return bool(self.errors) or any(e["impl"].startswith("ikport") for e in self.failed)


def check(prepared: Prepared, ref: torch.Tensor, rows: list[int] | None) -> float:
    with prepared.context():
        out = prepared.canon(prepared.checked())
    return max_abs_error(out, ref, rows)


def call_seconds(prepared: Prepared, device: torch.device) -> float:
    """Host time of one synchronized call on set 0 (after the checked one: compiled, warm)."""
    with prepared.context():
        _synchronize(device)
        t0 = time.perf_counter()
        prepared.fns[0]()
        _synchronize(device)
    return time.perf_counter() - t0


def time_prepared(w: Workload, impl: str, prepared: Prepared) -> dict[str, Any]:
    """Kernel and eager time as one result row (locked workloads re-timed with the sleep doubled),
    with TFLOP/s and its fraction of the matrix roof."""
    with prepared.context():
        m = harness.measure(prepared.fns, budget_s=CALL_BUDGET_S, min_iters=MIN_ITERS, check_sleep=w.locked)
    row = harness.measurement_row(m, workload=w.id, impl=impl, nbytes=w.bytes, note=prepared.note)
    tflops = w.flops / (m.kernel.median_us * 1e6)
    row.update(
        shape=w.shape(),
        bytes=w.bytes,
        flops=w.flops,
        TFLOPs=round(tflops, 1),
        pct_matrix_roof=round(100.0 * tflops / harness.MATRIX_ROOF_TFLOPS, 1),
    )
    if prepared.plan is not None:
        row["plan"] = prepared.plan
    return row


def flash_error(w: Workload, sets: list[InputSet], ref: torch.Tensor, rows: list[int] | None) -> float | None:
    """SDPA-flash's max abs error on the workload (the tolerance's base); None where it cannot run."""
    try:
        return check(FLASH.build(w, sets), ref, rows)
    except Exception:  # noqa: BLE001 - recorded when sdpa-flash's own turn comes
        return None


def bench_workload(w: Workload, results: Results, with_flashinfer: bool) -> int:
    """Check and time every implementation on `w`; returns the number of rotated input sets.

    One that raises goes to `errors` (ikport) or `skipped` (a peer), one outside the tolerance to
    `failed`, one slower than its cap to `skipped`; none of these is timed.
    """
    sets = make_sets(w, harness.rotation_count(w.bytes, harness.l2_cache_bytes()))
    device = sets[0].q.device
    rows = check_rows(w)
    ref = reference(w, sets[0], rows)
    tol, how = tolerance(w.dtype, flash_error(w, sets, ref, rows))
    results.tolerances[w.id] = {"value": _number(tol), "from": how}
    print(f"{w.id}: {w.flops / 1e12:.2f} TFLOP, {w.bytes / 1e6:.0f} MB, {len(sets)} rotated sets, "
          f"tolerance {tol:.3g} ({how})", flush=True)
    for impl in implementations(w, with_flashinfer):
        entry: dict[str, Any] = {"workload": w.id, "impl": impl.name}
        try:
            prepared = impl.build(w, sets)
            err = check(prepared, ref, rows)
            if not err <= tol:
                entry.update(max_abs_err=_number(err), tolerance=_number(tol), note=prepared.note)
                results.failed.append(entry)
                print(f"  {impl.name:20s} FAILED: max abs error {err:.3g} > {tol:.3g}, not timed", flush=True)
                continue
            seconds = call_seconds(prepared, device)
            if seconds > impl.cap_s:
                entry.update(reason=f"too slow: {seconds:.2f} s a call (cap {impl.cap_s:g} s), not timed",
                             max_abs_err=_number(err))
                results.skipped.append(entry)
                print(f"  {impl.name:20s} skipped: {entry['reason']}", flush=True)
                continue
            row = time_prepared(w, impl.name, prepared)
        except Exception as exc:  # noqa: BLE001 - recorded with its reason, never fatal
            entry["reason"] = f"{type(exc).__name__}: {exc}".strip()[:400]
            (results.errors if impl.ours else results.skipped).append(entry)
            label = "ERROR" if impl.ours else "skipped"
            print(f"  {impl.name:20s} {label}: {entry['reason'].splitlines()[0]}", flush=True)
            continue
        row.update(max_abs_err=_number(err), tolerance=_number(tol))
        results.rows.append(row)
        print(f"  {impl.name:20s} {row['median_us']:10.1f} us {row['TFLOPs']:7.1f} TFLOP/s "
              f"{row['pct_matrix_roof']:5.1f}%  eager {row['eager_us']:10.1f} us  err {err:.1e}", flush=True)
    flash = find(results.rows, w.id, FLASH.name)
    if flash is not None:
        results.vs_sdpa_flash[w.id] = {
            r["impl"]: round(flash["median_us"] / r["median_us"], 3)
            for r in results.rows if r["workload"] == w.id and r["impl"] != FLASH.name
        }
    return len(sets)


def find(rows: list[dict[str, Any]], workload: str, impl: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["workload"] == workload and r["impl"] == impl), None)


# ---- goals ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    """value = metric of (workload, impl) `num` / metric of `den`; met when value `op` target.
    Metrics: "us" (kernel time, median) or "rate" (FLOPs per us: a ratio of roof fractions)."""

    name: str
    what: str
    metric: str
    num: tuple[str, str]
    den: tuple[str, str]
    op: str  # ">=" or "<="
    target: float


GOALS = (
    Goal("P1_vs_sdpa_flash", "P1: sdpa-flash kernel time / ikport's", "us", ("P1", "sdpa-flash"),
         ("P1", "ikport"), ">=", 1.2),
    Goal("P2_vs_sdpa_flash", "P2: sdpa-flash kernel time / ikport's", "us", ("P2", "sdpa-flash"),
         ("P2", "ikport"), ">=", 1.2),
    Goal("D64_vs_D128", "ikport's fraction of the roof at head_dim 64 / at 128 (P1): within 20% "
         "(no more than 20% below)", "rate", (D64.id, "ikport"), ("P1", "ikport"), ">=", 0.8),
    Goal("D256_vs_D128", "ikport's fraction of the roof at head_dim 256 (16/4 heads) / at 128 (P1): "
         "within 20% (no more than 20% below)", "rate", (D256.id, "ikport"), ("P1", "ikport"), ">=", 0.8),
    Goal("bf16_vs_fp16", "ikport's TFLOP/s in bf16 / in fp16 at P1: within 3%", "rate",
         (BF16.id, "ikport"), ("P1", "ikport"), ">=", 0.97),
    Goal("chunked_paged_vs_contiguous", "ikport's chunked-prefill kernel time over 16-token pages / "
         "over the contiguous cache", "us", (CHUNK_PAGED.id, "ikport"), (CHUNK.id, "ikport"), "<=", 1.1),
)


def _metric(rows: list[dict[str, Any]], key: tuple[str, str], metric: str) -> float | None:
    row = find(rows, *key)
    if row is None or not row["median_us"] > 0:
        return None
    return row["median_us"] if metric == "us" else row["flops"] / row["median_us"]


def goals(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each goal's value, target ("goal") and "pass" (None, with `missing`, where a row is absent)."""
    out = {}
    for g in GOALS:
        num, den = _metric(rows, g.num, g.metric), _metric(rows, g.den, g.metric)
        entry: dict[str, Any] = {"what": g.what, "goal": f"{g.op} {g.target:g}",
                                 "rows": ["/".join(g.num), "/".join(g.den)]}
        if num is None or den is None:
            entry.update({"value": None, "pass": None},
                         missing=["/".join(k) for k, v in ((g.num, num), (g.den, den)) if v is None])
        else:
            value = round(num / den, 3)
            entry.update({"value": value, "pass": value >= g.target if g.op == ">=" else value <= g.target})
        out[g.name] = entry
    return out


# ---- output -----------------------------------------------------------------------------------
def print_tables(results: Results, goal_table: dict[str, dict[str, Any]]) -> None:
    """Every row; what was skipped or failed; per workload ikport against sdpa-flash; the goals."""
    print(f"\n{'workload':34s} {'impl':20s} {'median':>10s} {'min':>10s} {'max':>10s} {'TFLOP/s':>7s} "
          f"{'%roof':>6s} {'eager':>10s} {'err':>8s} {'tol':>8s} {'sleep2x':>10s}")
    for r in results.rows:
        print(f"{r['workload']:34s} {r['impl']:20s} {r['median_us']:10.1f} {r['min_us']:10.1f} "
              f"{r['max_us']:10.1f} {r['TFLOPs']:7.1f} {r['pct_matrix_roof']:6.1f} {r['eager_us']:10.1f} "
              f"{r['max_abs_err']:>8} {r['tolerance']:>8} {r.get('median_us_sleep2x', '-'):>10}")
    for kind, entries in (("skipped", results.skipped), ("FAILED", results.failed)):
        for e in entries:
            why = e.get("reason") or f"max abs error {e['max_abs_err']} > {e['tolerance']}"
            print(f"{kind} {e['workload']} {e['impl']}: {why.splitlines()[0][:160]}")
    print(f"\n{'workload':34s} {'ikport us':>10s} {'TFLOP/s':>7s} {'%roof':>6s} {'flash us':>10s} "
          f"{'TFLOP/s':>7s} {'x':>6s}")
    for wid in dict.fromkeys(r["workload"] for r in results.rows):
        ours, flash = find(results.rows, wid, "ikport"), find(results.rows, wid, FLASH.name)
        if ours is None or flash is None:
            continue
        print(f"{wid:34s} {ours['median_us']:10.1f} {ours['TFLOPs']:7.1f} {ours['pct_matrix_roof']:6.1f} "
              f"{flash['median_us']:10.1f} {flash['TFLOPs']:7.1f} {flash['median_us'] / ours['median_us']:6.2f}")
    print()
    for name, g in goal_table.items():
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[g["pass"]]
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        print(f"goal {name:30s} {value:>7s} {g['goal']:>7s} {verdict}")
    for e in results.errors:
        print(f"IKPORT ERROR {e['workload']} {e['impl']}: {e['reason'].splitlines()[0][:200]}")


def plot_sweep(rows: list[dict[str, Any]], sweep: Sequence[Workload], path: Path, device: str) -> Path | None:
    """TFLOP/s against L over the length sweep, one line per implementation (ikport and the peers;
    the journey runs at P1/P2 only). None where matplotlib is absent or nothing was swept."""
    lens = {w.id: w.kv_len for w in sweep}
    points: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["workload"] in lens and r["impl"] not in JOURNEY:
            points.setdefault(r["impl"], []).append((lens[r["workload"]], r["TFLOPs"]))
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (impl, xy) in enumerate(points.items()):
        xy.sort()
        style = "-o" if impl.startswith("ikport") else "--s"
        ax.plot([x for x, _ in xy], [y for _, y in xy], style, color=f"C{i % 10}", label=impl, markersize=4)
    roof = harness.MATRIX_ROOF_TFLOPS
    ax.axhline(roof, color="grey", linestyle=":", linewidth=1)
    ax.annotate(f"dense fp16 roof {roof:.0f}", (min(lens.values()), roof), fontsize=7,
                textcoords="offset points", xytext=(2, -10))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"sequence length L = Tq (batch = {SWEEP_TOKENS} // L)")
    ax.set_ylabel("TFLOP/s (causal half counted), kernel time")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"Causal prefill, Hq=32 Hkv=8 D=128 fp16, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        type=parse_only,
        default=None,
        metavar="ID[,ID...]",
        help="workloads to run, by id (default: all; --quick: P1 and the chunked pair)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the sweep plot")


def run(args: argparse.Namespace) -> int:
    """Benchmark every workload, write the JSON (and plot); non-zero exit if an ikport
    implementation raised or missed the tolerance."""
    if not torch.cuda.is_available():
        print("prefill benchmark: no CUDA/ROCm device visible to torch")
        return 2
    problem = api_problem()
    if problem is not None:
        print(f"prefill benchmark: ikport's prefill API is not there: {problem}")
        return 2
    start = time.perf_counter()
    meta = harness.device_meta(commit=args.commit)
    out = Path(args.out or f"docs/results/prefill-{harness.device_slug(meta['device'])}.json")
    results = Results()
    fi_problem = flashinfer_problem()
    if fi_problem is None:
        import flashinfer

        meta["versions"]["flashinfer"] = flashinfer.__version__
    else:
        results.skipped.append({"workload": "*", "impl": "flashinfer-fa2", "reason": f"not importable: {fi_problem}"})
    roof = [harness.measure_read_roof(READ_PASS_BYTES)]
    plan = workloads(args.quick, args.only)
    sets = {}
    for w in plan:
        sets[w.id] = bench_workload(w, results, fi_problem is None)
        torch.cuda.empty_cache()
    goal_table = goals(results.rows)
    extra = {
        "ceiling_TFLOPs": harness.MATRIX_ROOF_TFLOPS,
        "flops": (
            "4 * Hq * D * sum over sequences of keys_seen(Tq, L): the query-key pairs the mask keeps "
            "(causal bottom-right: query row i of Tq sees L - Tq + i + 1 keys; Tq = L gives L(L+1)/2; "
            "non-causal Tq * L); softmax not counted. TFLOPs = flops / kernel time; pct_matrix_roof "
            f"against ceiling_TFLOPs, the H100's dense fp16/bf16 rate ({harness.MATRIX_ROOF_TFLOPS:g}, "
            "datasheet)"
        ),
        "bytes": "Q + K + V + output, each once (GBps and pct_roof, against the read roof, are informational)",
        "heads": (
            f"{Q_HEADS} query / {KV_HEADS} KV heads unless the id says -H<q>x<kv>; head_dim 64 runs "
            "32/8 heads, head_dim 256 runs 16/4 (Q, K and V the size of P1's)"
        ),
        "inputs": "q, k, v from N(0, 1); paged caches are the dense ones copied into shuffled 16-token pages",
        "method": (
            "kernel time: torch.cuda._sleep queued before the start event (sized at 2x the call's "
            "host time, >= 100 us; median_us_sleep2x re-times P1/P2 with it doubled); eager_us: call "
            "on an idle GPU, synchronize after each; input sets rotated, > 3x the L2 in total and at "
            f"least 2; up to 50 timed calls, fewer where they would pass {CALL_BUDGET_S} s; a call "
            f"slower than {CALL_CAP_S} s ({NAIVE_CAP_S} s for {NAIVE}, P1 only) is not timed"
        ),
        "check": (
            "max_abs_err = max |out - ref| over the first, middle and last sequence of a batch (every "
            "sequence for varlen), ref in float32 (no TF32) per KV head and query block on the device; "
            "ikport writes into an out= filled with NaN; tolerance = "
            f"{TOLERANCE_FACTOR:g} x sdpa-flash's own max_abs_err + {TOLERANCE_SLACK:g} (fallback "
            f"{FALLBACK_TOLERANCE} where sdpa-flash did not run); outside it: `failed`, not timed"
        ),
        "peers": (
            "sdpa-*: F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION / "
            "CUDNN_ATTENTION) or torch's own choice, enable_gqa=True (else K/V repeated); chunked "
            "prefill gets a bottom-right mask (causal_lower_right, else a boolean one); varlen: one "
            "call per sequence, and torch-flash-varlen for FA2's varlen entry; flashinfer-fa2: "
            "FlashInfer's batch prefill wrappers, backend fa2. Each row's note says which path ran"
        ),
        "journey": {name: opts for name, opts in JOURNEY.items()},
        "quick": bool(args.quick),
        "rotated_sets": sets,
        "read_measured": roof,
        "tolerances": results.tolerances,
        "speedup_vs_sdpa_flash": results.vs_sdpa_flash,
        "goals": goal_table,
        "skipped": results.skipped,
        "failed": results.failed,
        "errors": results.errors,
    }
    sweep = length_sweep()
    return harness.finish_run(
        out, command=args.command, rows=results.rows, extra=extra, meta=meta, roof=roof,
        print_tables=lambda: print_tables(results, goal_table),
        plot=None if args.no_plot else lambda png: plot_sweep(results.rows, sweep, png, meta["device"]),
        started=start, failed=results.ikport_failed,
    )
