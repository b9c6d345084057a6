"""Timing utilities shared by every benchmark area, following the project's benchmark protocol.

Kernel time: a ``torch.cuda._sleep`` kernel is queued just before the start event, so the GPU is
still busy while the CPU dispatches the call and the events time the GPU work, not the launch.
Eager time: the same call on an idle GPU, synchronized after each call, timed by the host clock.
Both rotate among several input sets whose total is well above the L2, so runs miss the cache.

Nothing here touches ``torch.cuda`` at import time: the module imports on CPU-only machines.
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import json
import math
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ikport.backends.target import device_facts

# The read ceiling of the lent H100 (16-byte vector reads over 1 GB; backends/target.py's table):
# % of roof is taken against it. Its L2 stands in where a device does not report its own.
_H100 = device_facts("H100")
READ_ROOF_GBPS = _H100.read_GBps
DEFAULT_L2_BYTES = _H100.l2_bytes
# Its dense fp16/bf16 matrix rate (datasheet): the roof of compute-bound areas (prefill's TFLOP/s).
MATRIX_ROOF_TFLOPS = _H100.fp16_TFLOPs
# Keys every result row carries (docs/benchmarks.md, "Result files"); other keys may follow.
ROW_KEYS = ("workload", "impl", "median_us", "min_us", "max_us", "GBps", "eager_us")
# Top-level keys of a result file that `extra` may not replace.
FILE_KEYS = ("device", "driver", "commit", "date", "versions", "command", "ceiling_GBps", "results")

_MIN_SLEEP_US = 100.0
# Warm-up keeps the GPU busy at least this long before anything is timed: after an idle spell (a
# kernel compile, building input sets) its clocks need time to come back up, and a short kernel
# timed first would read slow (docs/results/decode.md, "first-timed artifact").
WARMUP_MIN_S = 0.05
# A call whose host time is this long waits on the GPU itself; no sleep can hide that.
_MAX_SLEEP_US = 20_000.0
_SLEEP_RETRIES = 3
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Timing:
    """Summary of one timed loop, in microseconds.

    ``sleep_cycles``/``sleep_us``: the sleep queued ahead of each run (0 for eager time).
    ``host_us``: median host time of one call. ``late``: runs whose dispatch outlasted the sleep
    (their times may include launch latency; kernel_time retries with a longer sleep first).
    """

    median_us: float
    min_us: float
    max_us: float
    n: int
    sleep_cycles: int = 0
    sleep_us: float = 0.0
    host_us: float = 0.0
    late: int = 0

    @classmethod
    def from_samples(cls, samples_us: Sequence[float], **fields: Any) -> Timing:
        return cls(
            median_us=statistics.median(samples_us),
            min_us=min(samples_us),
            max_us=max(samples_us),
            n=len(samples_us),
            **fields,
        )


@functools.cache
def sleep_cycles_per_us() -> float:
    """GPU clock cycles ``torch.cuda._sleep`` spins per microsecond, measured once with events."""
    cycles = 1_000_000
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(3):
        torch.cuda._sleep(100_000)  # keeps the GPU busy while the timed sleep is launched
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return cycles / statistics.median(samples)


def _warm_up(fns: Sequence[Callable[[], Any]], count: int) -> list[float]:
    """Call the rotation `count` times, and again until the GPU has been kept busy for
    WARMUP_MIN_S; returns the host time (us) of each call of the first round."""
    host_us: list[float] = []
    deadline = time.perf_counter() + WARMUP_MIN_S
    while True:
        for i in range(count):
            t0 = time.perf_counter_ns()
            fns[i % len(fns)]()
            if len(host_us) < count:
                host_us.append((time.perf_counter_ns() - t0) / 1e3)
        torch.cuda.synchronize()
        if count == 0 or time.perf_counter() >= deadline:
            return host_us


def _sleep_us_for(host_us: list[float]) -> float:
    """A sleep comfortably above the host time of one call (first call left out: it compiles)."""
    steady = host_us[1:] or host_us or [0.0]
    return min(_MAX_SLEEP_US, max(_MIN_SLEEP_US, 2.0 * max(steady)))


def kernel_time(
    fns: Sequence[Callable[[], Any]],
    *,
    warmup: int = 10,
    iters: int = 50,
    sleep_cycles: int | None = None,
) -> Timing:
    """Kernel time of one call, rotating over `fns` (the same call on different input sets).

    Each run queues ``torch.cuda._sleep(sleep_cycles)``, then start event, call, end event; one
    synchronize at the end reads all the pairs. Without `sleep_cycles` the sleep is sized at twice
    the call's steady host time (within 100 us - 20 ms), and doubled and re-timed (up to 3 times,
    20 ms at most) if any run's dispatch outlasted it.
    """
    if not fns:
        raise ValueError("kernel_time needs at least one callable")
    host = _warm_up(fns, warmup)
    auto = sleep_cycles is None
    rate = sleep_cycles_per_us()
    cycles = round(_sleep_us_for(host) * rate) if sleep_cycles is None else sleep_cycles
    timing = _timed_loop(fns, iters, cycles, rate)
    longest = round(_MAX_SLEEP_US * rate)
    for _ in range(_SLEEP_RETRIES if auto else 0):
        if timing.late == 0 or cycles >= longest:
            break
        cycles = min(2 * cycles, longest)
        timing = _timed_loop(fns, iters, cycles, rate)
    return timing


def _timed_loop(fns: Sequence[Callable[[], Any]], iters: int, cycles: int, rate: float) -> Timing:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    sleep_ns = cycles / rate * 1e3
    host_us = []
    late = 0
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iters):
            torch.cuda._sleep(cycles)
            t0 = time.perf_counter_ns()
            starts[i].record()
            fns[i % len(fns)]()
            ends[i].record()
            elapsed = time.perf_counter_ns() - t0
            host_us.append(elapsed / 1e3)
            late += elapsed > sleep_ns
    finally:
        if gc_enabled:
            gc.enable()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]
    return Timing.from_samples(
        samples,
        sleep_cycles=cycles,
        sleep_us=sleep_ns / 1e3,
        host_us=statistics.median(host_us),
        late=late,
    )


def check_sleep_insensitive(
    fns: Sequence[Callable[[], Any]], *, warmup: int = 10, iters: int = 50
) -> tuple[Timing, Timing]:
    """The protocol's check: kernel time with the auto-sized sleep, then with that sleep doubled.

    The two medians should agree to noise; a second one clearly lower means the first sleep was
    too short and launch latency leaked into the events.
    """
    first = kernel_time(fns, warmup=warmup, iters=iters)
    second = kernel_time(
        fns, warmup=min(warmup, 2), iters=iters, sleep_cycles=2 * first.sleep_cycles
    )
    return first, second


def eager_time(fns: Sequence[Callable[[], Any]], *, warmup: int = 10, iters: int = 50) -> Timing:
    """Eager call time: each call on an idle GPU, host clock around call + synchronize."""
    if not fns:
        raise ValueError("eager_time needs at least one callable")
    _warm_up(fns, warmup)
    samples = []
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            fns[i % len(fns)]()
            torch.cuda.synchronize()
            samples.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        if gc_enabled:
            gc.enable()
    return Timing.from_samples(samples)


def run_counts(
    call_us: float, *, budget_s: float, min_iters: int = 10, max_iters: int = 50
) -> tuple[int, int]:
    """(warmup, iters) for a call of `call_us`: `max_iters` timed runs unless they would take
    longer than `budget_s` (never fewer than `min_iters`); 10 warm-up calls, 2 for calls over 5 ms."""
    fit = int(budget_s / (max(call_us, 1e-3) * 1e-6))
    iters = max(min_iters, min(max_iters, fit))
    return (10 if call_us < 5000 else 2), iters


@dataclass(frozen=True)
class Measurement:
    """Kernel and eager time of one implementation; `doubled`: kernel time re-taken with the
    sleep doubled (the protocol's check), None where it was not taken."""

    kernel: Timing
    eager: Timing
    doubled: Timing | None = None


def measure(
    fns: Sequence[Callable[[], Any]],
    *,
    budget_s: float,
    min_iters: int = 10,
    max_iters: int = 50,
    check_sleep: bool = True,
) -> Measurement:
    """Kernel time (auto-sized sleep; with `check_sleep` also re-timed with it doubled) and eager
    time of one call rotating over `fns`, with run counts fitted to `budget_s` per timed loop
    from a two-call eager probe."""
    probe = eager_time(fns, warmup=1, iters=2)
    warmup, iters = run_counts(
        probe.median_us, budget_s=budget_s, min_iters=min_iters, max_iters=max_iters
    )
    doubled: Timing | None
    if check_sleep:
        kernel, doubled = check_sleep_insensitive(fns, warmup=warmup, iters=iters)
    else:
        kernel, doubled = kernel_time(fns, warmup=warmup, iters=iters), None
    eager = eager_time(fns, warmup=warmup, iters=iters)
    return Measurement(kernel, eager, doubled)


def measurement_row(
    m: Measurement,
    *,
    workload: str,
    impl: str,
    nbytes: int,
    note: str = "",
    ceiling_GBps: float = READ_ROOF_GBPS,
) -> dict[str, Any]:
    """result_row of a Measurement, plus ``median_us_sleep2x`` (when the check ran) and a
    ``note`` giving the sleep, the host time per call, late dispatches and `note`."""
    row = result_row(
        workload=workload,
        impl=impl,
        kernel=m.kernel,
        eager=m.eager,
        nbytes=nbytes,
        ceiling_GBps=ceiling_GBps,
    )
    if m.doubled is not None:
        row["median_us_sleep2x"] = round(m.doubled.median_us, 2)
    notes = [f"sleep {m.kernel.sleep_us:.0f} us", f"host {m.kernel.host_us:.1f} us/call"]
    if m.kernel.late:
        notes.append(f"{m.kernel.late} runs dispatched slower than the sleep")
    if note:
        notes.append(note)
    row["note"] = "; ".join(notes)
    return row


def rotation_count(
    bytes_per_set: int, l2_bytes: int, *, factor: float = 3.0, minimum: int = 2
) -> int:
    """Input sets to rotate among so their total exceeds `factor` x the L2 (at least `minimum`)."""
    if bytes_per_set <= 0 or l2_bytes <= 0:
        raise ValueError(
            f"sizes must be positive: bytes_per_set={bytes_per_set}, l2_bytes={l2_bytes}"
        )
    return max(minimum, int(factor * l2_bytes // bytes_per_set) + 1)


def l2_cache_bytes() -> int:
    """L2 size of the current CUDA device (the H100's 50 MiB if torch does not report it)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0)) or DEFAULT_L2_BYTES


def measure_read_roof(nbytes: int) -> dict[str, Any]:
    """Informational streaming-read rate: kernel time of ``torch.sum`` over `nbytes` of float32.

    torch's reduction kernel reads a contiguous float32 tensor with 16-byte vector loads and writes
    one scalar, so this is a plain read pass; inputs rotate beyond the L2. It is a practical floor
    for one pass, not the ceiling: % of roof is always taken against READ_ROOF_GBPS.
    """
    sets = rotation_count(nbytes, l2_cache_bytes())
    xs = [torch.randn(nbytes // 4, device="cuda", dtype=torch.float32) for _ in range(sets)]
    timing = kernel_time([functools.partial(torch.sum, x) for x in xs])
    return {
        "bytes": nbytes,
        "median_us": round(timing.median_us, 2),
        "GBps": round(gbps(nbytes, timing.median_us), 1),
        "method": f"torch.sum over float32, {sets} rotated sets, kernel time",
    }


READ_PASS_SHAPES = tuple((unroll, per_sm, threads) for unroll in (1, 2, 4, 8) for per_sm in (1, 2, 4)
                         for threads in (256, 512))


def measure_read_pass(nbytes: int) -> dict[str, Any]:
    """The read pass of `nbytes` (docs/benchmarks.md): the practical floor of a memory-bound kernel
    of that size. kernels_src/read_pass.cuh (16-byte streaming loads, grid-stride) over rotated
    buffers, kernel time; the best of `unroll` 1, 2, 4, 8 loads in flight a thread at 1, 2 or 4
    blocks of 256 or 512 threads an SM (its median)."""
    from ikport import dispatch
    from ikport.kernels import ReadPassParams, get_kernel
    from ikport.launch import raw_stream
    from ikport.manifest import spec

    dev = torch.cuda.current_device()
    backend = dispatch.backend_for(torch.device("cuda", dev))
    if backend is None:
        raise RuntimeError("measure_read_pass: no ikport backend for the current device")
    info = backend.device_info(dev)
    sets = rotation_count(nbytes, l2_cache_bytes())
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_() for _ in range(sets)]
    stream = raw_stream(dev)
    best: tuple[float, tuple[int, int, int]] | None = None
    for unroll, per_sm, threads in READ_PASS_SHAPES:
        kernel = get_kernel(spec("read_pass", "pass", unroll=unroll), backend, dev)
        grid = info.sm_count * per_sm
        sink = torch.empty(grid * threads // info.warp_size, dtype=torch.int32, device="cuda")
        params = [ReadPassParams(b.data_ptr(), sink.data_ptr(), nbytes // 16) for b in bufs]
        launch = kernel.bind((grid, 1, 1), (threads, 1, 1), 0)
        timing = kernel_time([functools.partial(launch, p, stream) for p in params], warmup=3, iters=30)
        if best is None or timing.median_us < best[0]:
            best = (timing.median_us, (unroll, per_sm, threads))
    del bufs
    us, (unroll, per_sm, threads) = best
    return {"bytes": nbytes, "median_us": round(us, 2), "GBps": round(gbps(nbytes, us), 1),
            "unroll": unroll, "blocks_per_sm": per_sm, "threads": threads,
            "method": f"kernels_src/read_pass.cuh, {sets} rotated sets, kernel time; best of "
                      f"{len(READ_PASS_SHAPES)} launch shapes (harness.READ_PASS_SHAPES)"}


def gbps(nbytes: int, us: float) -> float:
    """Bytes moved in `us` microseconds, in GB/s (1e9 bytes)."""
    return nbytes / (us * 1e3)


def result_row(
    *,
    workload: str,
    impl: str,
    kernel: Timing,
    eager: Timing,
    nbytes: int,
    ceiling_GBps: float = READ_ROOF_GBPS,
) -> dict[str, Any]:
    """One result row in the protocol's shape, plus ``pct_roof`` and the run count ``n``."""
    rate = gbps(nbytes, kernel.median_us)
    return {
        "workload": workload,
        "impl": impl,
        "median_us": round(kernel.median_us, 2),
        "min_us": round(kernel.min_us, 2),
        "max_us": round(kernel.max_us, 2),
        "GBps": round(rate, 1),
        "eager_us": round(eager.median_us, 2),
        "pct_roof": round(100.0 * rate / ceiling_GBps, 1),
        "n": kernel.n,
    }


def device_slug(name: str) -> str:
    """Short device id for file names: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    drop = {"nvidia", "amd", "geforce", "tesla", "instinct", "radeon", "pcie", "nvl"}
    words = [
        w
        for w in re.split(r"[^a-z0-9]+", name.lower())
        if w and w not in drop and not re.fullmatch(r"\d+gb|hbm\d*e?|sxm\d*", w)
    ]
    return "-".join(words) or "unknown"


def _command_output(args: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _driver_version() -> str:
    smi = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi:
        return smi.splitlines()[0].strip()
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 - any failure means the version is unknown
        return "unknown"


def _git_commit() -> tuple[str, bool | None]:
    """(HEAD sha, tree has uncommitted changes) of the checkout this package lives in."""
    if not (_REPO_ROOT / ".git").exists():
        return "unknown", None
    sha = _command_output(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT)
    if sha is None:
        return "unknown", None
    status = _command_output(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO_ROOT
    )
    return sha, bool(status)


def _versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "hip": str(torch.version.hip),
    }
    try:  # the distribution's metadata: only backends/ imports the vendor bindings
        versions["cuda-python"] = importlib.metadata.version("cuda-bindings")
    except importlib.metadata.PackageNotFoundError:
        versions["cuda-python"] = "absent"
    if torch.backends.cudnn.is_available():
        versions["cudnn"] = str(torch.backends.cudnn.version())
    try:
        import ikport

        versions["ikport"] = str(getattr(ikport, "__version__", "unknown"))
    except ImportError:
        versions["ikport"] = "absent"
    return versions


def device_meta(*, commit: str | None = None) -> dict[str, Any]:
    """Device, driver, commit, date and versions for a result file (`commit` overrides git's)."""
    cuda = torch.cuda.is_available()
    sha, dirty = _git_commit()
    meta: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "driver": _driver_version() if cuda and torch.version.cuda else "unknown",
        "commit": commit or sha,
        "date": datetime.now(timezone.utc).date().isoformat(),
        "versions": _versions(),
    }
    if commit is None and dirty is not None:
        meta["commit_dirty"] = dirty
    return meta


def write_results(
    path: str | Path,
    *,
    command: str,
    ceiling_GBps: float,
    results: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a result file in the protocol's shape; returns its path.

    `meta` defaults to device_meta(); `extra` adds top-level keys (skipped peers, notes, ...) but
    may not replace the protocol's own. Every row must carry ROW_KEYS with finite numbers.
    """
    for i, row in enumerate(results):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(
                f"result row {i} ({row.get('workload')}/{row.get('impl')}) lacks {missing}"
            )
        bad = [k for k in ROW_KEYS[2:] if not math.isfinite(row[k])]
        if bad:
            raise ValueError(f"result row {i} has non-finite {bad}")
    extra = extra or {}
    clash = [k for k in extra if k in FILE_KEYS]
    if clash:
        raise ValueError(f"extra keys {clash} would replace the protocol's own")
    doc: dict[str, Any] = dict(meta if meta is not None else device_meta())
    doc.update(command=command, ceiling_GBps=float(ceiling_GBps))
    doc.update(extra)
    doc["results"] = results
    absent = [k for k in FILE_KEYS if k not in doc]
    if absent:
        raise ValueError(f"meta lacks {absent}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return path


def finish_run(
    path: str | Path,
    *,
    command: str,
    rows: list[dict[str, Any]],
    extra: dict[str, Any],
    meta: dict[str, Any],
    roof: list[dict[str, Any]],
    print_tables: Callable[[], None],
    plot: Callable[[Path], Path | None] | None,
    started: float,
    failed: bool,
) -> int:
    """The end of every benchmark run: write the result file, print its tables and the read-pass
    figures, draw the plot next to the file (unless `plot` is None); exit status 1 if `failed`."""
    out = write_results(path, command=command, ceiling_GBps=READ_ROOF_GBPS, results=rows,
                        extra=extra, meta=meta)
    print_tables()
    print("\nread pass (informational): " + ", ".join(
        f"{r['bytes'] / 1e6:.0f} MB {r['median_us']:.1f} us {r['GBps']:.0f} GB/s" for r in roof))
    print(f"wrote {out}")
    if plot is not None:
        png = plot(out.with_suffix(".png"))
        print(f"wrote {png}" if png else "plot skipped (no matplotlib or nothing to plot)")
    print(f"{meta['device']}, commit {meta['commit'][:12]}, {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0
