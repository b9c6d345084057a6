"""`python -m ikport warmup`: compile (and load) every kernel configuration before the first call.

On a GPU machine, warmup compiles the kernels the dispatcher picks for this GPU's target, stores
them in the disk cache (IKPORT_CACHE_DIR) and loads them on the device; a process started later
then loads each kernel from the cache instead of compiling it. Without a GPU, `--target sm_90`
compiles the same set into the cache without loading it (a shared cache can be filled on a build
machine with the same NVRTC).

The default set is what the planners' default plans may launch on the target
(ikport.plan.decode.default_kernels): the split decode kernels for fp16 and bf16, head dims 64,
128 and 256 (`head_dims`), every query-row tile, contiguous and paged, in every launch shape the
launch rules pick (128-thread and one-block-per-SM versions; on targets with block clusters, the
clustered versions for 2, 4 and 8 splits); and the prefill kernels of those head dims, contiguous
and paged (ikport.plan.prefill.default_kernels). `all_kernels=True` adds every instantiation of
kernels_src/manifest.yaml (naive and combine kernels, the register-load pipeline, mma_tile).

After the cold pass, a warm pass clears the in-process map and loads every kernel again from
the disk cache (and onto the device when there is one): the time a fresh process needs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TextIO

from . import kernels, knobs
from ._version import __version__
from .backends.base import Backend
from .backends.cache import DiskCache, cache_key
from .backends.source import kernel_source
from .backends.target import Target
from .manifest import KernelSpec, default_instantiations, spec
from .plan import decode as decode_plan
from .plan import prefill as prefill_plan

GOAL_COLD_PER_KERNEL_S = 5.0  # compiling one kernel from scratch
GOAL_WARM_TOTAL_S = 1.0  # loading every kernel of the default set from the disk cache


def kernel_set(target: Target, all_kernels: bool = False, head_dims: Iterable[int] | None = None,
               name_filter: str = "") -> list[KernelSpec]:
    """The specs warmup builds for `target`, without duplicates, in a stable order: the kernels the
    planners' default plans may launch there (plan.decode and plan.prefill's default_kernels), and with
    `all_kernels` every manifest instantiation too (plus the naive and combine kernels of
    `head_dims`)."""
    dims = tuple(int(d) for d in head_dims) if head_dims else None
    specs = decode_plan.default_kernels(target, *((dims,) if dims else ()))
    specs += prefill_plan.default_kernels(target, *((dims,) if dims else ()))
    if all_kernels:
        specs += list(default_instantiations())
        for dtype in decode_plan.DTYPES:
            specs += [spec("attention_decode", k, dtype=dtype, head_dim=d)
                      for d in dims or () for k in ("naive", "combine")]
    return [s for s in dict.fromkeys(specs) if name_filter in s.uri]


def entry_key(s: KernelSpec, backend: Backend, target: Target) -> str:
    """The disk-cache key `kernels.compile_spec` files `s` under (same inputs, same order)."""
    source = kernel_source(s.source_file, [(s.name_expr, s.params_type)])
    return cache_key(source, [s.name_expr], [], target, backend.compiler_version(), __version__)


@dataclass
class KernelRow:
    kernel: str
    status: str  # "compiled", "cached" (from the disk cache), "memory" (this process), "failed"
    compile_s: float = 0.0  # compile, or read from the cache
    load_s: float = 0.0  # load onto the device (0 without a GPU)
    warm_s: float | None = None  # the warm pass: cache read (+ load)
    error: str = ""


@dataclass
class WarmupReport:
    target: str
    backend: str
    device: str | None  # "0: NVIDIA H100 80GB HBM3", or None when compiling without a GPU
    cache_dir: str | None  # None: disk cache off (IKPORT_NO_DISK_CACHE)
    rows: list[KernelRow] = field(default_factory=list)
    cold_s: float = 0.0
    warm_s: float | None = None  # None: no warm pass

    @property
    def failed(self) -> list[KernelRow]:
        return [r for r in self.rows if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    def compile_times(self) -> list[float]:
        return sorted(r.compile_s for r in self.rows if r.status == "compiled")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = {
            "kernels": len(self.rows), "compiled": self.count("compiled"),
            "cached": self.count("cached"), "memory": self.count("memory"),
            "failed": len(self.failed), "cold_s": self.cold_s, "warm_s": self.warm_s,
            "max_compile_s": max(self.compile_times(), default=None),
            "goal_cold_per_kernel_s": GOAL_COLD_PER_KERNEL_S, "goal_warm_total_s": GOAL_WARM_TOTAL_S,
        }
        return d

    def summary(self, verbose: bool = False) -> str:
        where = f"device {self.device}" if self.device else "no GPU: compiled, not loaded"
        lines = [f"ikport warmup: {len(self.rows)} kernels for {self.target} ({self.backend}, {where})"]
        times = self.compile_times()
        cold = (f"  cold: {self.count('compiled')} compiled, {self.count('cached')} from the disk "
                f"cache, {self.count('memory')} already in memory, {len(self.failed)} failed, in "
                f"{self.cold_s:.2f} s")
        if times:
            slowest = max((r for r in self.rows if r.status == "compiled"), key=lambda r: r.compile_s)
            cold += (f"\n  cold compile per kernel: median {times[len(times) // 2]:.2f} s, max "
                     f"{times[-1]:.2f} s ({slowest.kernel})")
        lines.append(cold)
        if self.warm_s is not None:
            n = sum(r.warm_s is not None for r in self.rows)
            what = "read from the disk cache and loaded" if self.device else "read from the disk cache"
            lines.append(f"  warm: {n} kernels {what} in {self.warm_s:.3f} s "
                         f"({1000 * self.warm_s / max(n, 1):.1f} ms per kernel)")
        if self.cache_dir:
            entries = list(DiskCache(self.cache_dir).root.glob("*/*.bin"))
            size = sum(p.stat().st_size for p in entries)
            lines.append(f"  cache dir: {self.cache_dir} ({len(entries)} entries, {size / 2**20:.1f} MiB)")
        else:
            lines.append("  cache dir: none (IKPORT_NO_DISK_CACHE is set: nothing persists)")
        goals = []
        if times:
            goals.append(f"cold compile of one kernel < {GOAL_COLD_PER_KERNEL_S:g} s: "
                         f"{'ok' if times[-1] < GOAL_COLD_PER_KERNEL_S else 'MISSED'} (max {times[-1]:.2f} s)")
        if self.warm_s is not None:
            goals.append(f"warm start of all kernels < {GOAL_WARM_TOTAL_S:g} s: "
                         f"{'ok' if self.warm_s < GOAL_WARM_TOTAL_S else 'MISSED'} ({self.warm_s:.3f} s)")
        if goals:
            lines.append("  goals: " + "; ".join(goals))
        for r in self.failed:
            lines.append(f"  FAILED {r.kernel}: {r.error}")
        if verbose:
            for r in self.rows:
                warm = "" if r.warm_s is None else f" warm {1000 * r.warm_s:7.1f} ms"
                lines.append(f"    {r.status:<8} compile {r.compile_s:6.2f} s load "
                             f"{1000 * r.load_s:6.1f} ms{warm}  {r.kernel}")
        return "\n".join(lines)


class Progress:
    """A text progress bar on a terminal, one line per kernel otherwise (logs, CI); both with the
    time elapsed and an estimate of the time left (at the rate so far). `clock`: for tests."""

    def __init__(self, total: int, stream: TextIO | None, width: int = 30,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.stream, self.width, self.clock = total, stream, width, clock
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.t0 = clock()

    def update(self, done: int, kernel: str, status: str, seconds: float) -> None:
        """`done` of `total` finished, the last one `kernel` (its status and seconds)."""
        if self.stream is None:
            return
        elapsed = self.clock() - self.t0
        left = elapsed / max(done, 1) * (self.total - done)
        times = f"{_clock(elapsed)} elapsed, ~{_clock(left)} left"
        if self.tty:
            filled = self.width * done // max(self.total, 1)
            bar = "#" * filled + "-" * (self.width - filled)
            columns = shutil.get_terminal_size().columns - 1  # one line, rewritten in place
            line = f"[{bar}] {done}/{self.total} {times}  {kernel}"[:columns]
            self.stream.write(f"\r{line:<{columns}}")
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"[{done:>{len(str(self.total))}}/{self.total}] {status:<8} "
                              f"{seconds:6.2f} s  {kernel}  ({times})\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    """m:ss"""
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


def _resolve(target: str | None, device: int | None) -> tuple[Backend, Target, int | None, str | None]:
    """(backend, target, device to load on or None, device description)."""
    import torch

    from .dispatch import backend_for, get_backend

    gpu = torch.cuda.is_available()
    if target is None:
        if not gpu:
            raise RuntimeError(
                "no GPU is visible to torch: pass --target (e.g. --target sm_90) to compile the "
                "kernels into the cache without loading them")
        dev = torch.cuda.current_device() if device is None else device
        backend = backend_for(torch.device("cuda", dev))
        assert backend is not None
        return backend, backend.target_for(dev), dev, f"{dev}: {backend.device_info(dev).name}"
    t = Target(target)
    backend = get_backend(t.vendor)
    if gpu:
        dev = torch.cuda.current_device() if device is None else device
        here = backend_for(torch.device("cuda", dev))
        if here is backend and backend.target_for(dev) == t:
            return backend, t, dev, f"{dev}: {backend.device_info(dev).name}"
    return backend, t, None, None


def warmup(
    *,
    target: str | None = None,
    device: int | None = None,
    all_kernels: bool = False,
    head_dims: Iterable[int] | None = None,
    name_filter: str = "",
    force: bool = False,
    warm_pass: bool = True,
    progress: TextIO | None = None,
) -> WarmupReport:
    """Compile (and, on a GPU of `target`, load) the kernel set; see the module docstring.

    Args:
        target: an arch ("sm_90", "gfx942"); default: the current GPU's. Without a GPU of that
            target the kernels are compiled into the cache, not loaded.
        device: the GPU to load on (default: torch's current device).
        all_kernels: every manifest instantiation too, not only the dispatcher's set.
        head_dims: head dims of the dispatcher's set (default: those of the manifest, 64/128/256).
        name_filter: only kernels whose URI contains this text.
        force: drop existing cache entries first, so every kernel is compiled (cold timings).
        warm_pass: afterwards, time loading every kernel again from the disk cache. On a GPU this
            loads a second copy of each module (a few MB of device memory, for the process' life).
        progress: where the progress bar goes (None: nowhere).

    Returns:
        A WarmupReport; `.summary()` is the text the CLI prints. Compile errors are rows with
        status "failed", never exceptions. Raises RuntimeError without a GPU and without `target`.
    """
    backend, tgt, dev, desc = _resolve(target, device)
    cache = DiskCache(knobs.cache_dir()) if knobs.disk_cache_enabled() else None
    specs = kernel_set(tgt, all_kernels, head_dims, name_filter)
    report = WarmupReport(tgt.arch, backend.name, desc, str(cache.root) if cache else None)
    bar = Progress(len(specs), progress)
    t_start = time.perf_counter()
    for i, s in enumerate(specs):
        mem_key = (backend.name, tgt.arch, s.uri)
        row = KernelRow(s.uri, "compiled")
        try:
            key = entry_key(s, backend, tgt)
            if force:
                kernels._compiled.pop(mem_key, None)
                if cache:
                    cache.path(key).unlink(missing_ok=True)
            if mem_key in kernels._compiled:
                row.status = "memory"
            elif cache and cache.get(key) is not None:
                row.status = "cached"
            t0 = time.perf_counter()
            kernels.compile_spec(s, backend, tgt)
            row.compile_s = time.perf_counter() - t0
            if dev is not None:
                t0 = time.perf_counter()
                kernels.get_kernel(s, backend, dev)
                row.load_s = time.perf_counter() - t0
        except Exception as e:  # one failed row, never an aborted warmup
            row.status = "failed"
            lines = str(e).strip().splitlines() or [repr(e)]
            row.error = f"{type(e).__name__}: {lines[0][:300]}"
        report.rows.append(row)
        bar.update(i + 1, row.kernel, row.status, row.compile_s)
    report.cold_s = time.perf_counter() - t_start
    if warm_pass and cache is not None:
        ok = [(s, r) for s, r in zip(specs, report.rows) if r.status != "failed"]
        for s, _ in ok:
            kernels._compiled.pop((backend.name, tgt.arch, s.uri), None)
        t_start = time.perf_counter()
        for s, r in ok:
            t0 = time.perf_counter()
            module = kernels.compile_spec(s, backend, tgt)
            if dev is not None:
                backend.get_function(backend.load(module, dev), module, s.name_expr)
            r.warm_s = time.perf_counter() - t0
        report.warm_s = time.perf_counter() - t_start
    return report


def main(args: argparse.Namespace) -> int:
    """The CLI subcommand (arguments parsed by ikport.__main__); the process exit code."""
    import json

    head_dims = [int(x) for x in args.head_dims.split(",") if x.strip()] if args.head_dims else None
    try:
        report = warmup(target=args.target, device=args.device, all_kernels=args.all,
                        head_dims=head_dims, name_filter=args.filter, force=args.force,
                        warm_pass=not args.no_warm, progress=None if args.json else sys.stderr)
    except Exception as e:
        print(f"ikport warmup: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print(report.summary(verbose=args.verbose))
    return 1 if report.failed else 0
