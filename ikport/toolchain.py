"""Compile manifest kernels for any target without a GPU: the compile-all check behind
`python -m ikport compile`, the CI test and the portability report.

Routes: NVRTC for sm_*; Debian's clang-19 (offline) for every AMD target; the real hipRTC for the
AMD targets the installed one supports (run in a subprocess: an old comgr aborts on new targets).
compile_all runs the compiles in threads: NVRTC releases the GIL, clang-19 and hipRTC run in child
processes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

from .backends.base import CompiledModule
from .backends.source import kernel_source
from .backends.target import ALL_TARGETS, Target
from .manifest import KernelSpec

ROUTES = ("nvrtc", "clang-19", "hiprtc")
# Instructions that prove a shim became the vendor's own (counted in PTX or AMD ISA text).
INSTRUCTION_PATTERNS = {
    "mma": r"\bmma\.sync\.aligned\.m16n8k16|\bv_mfma_f32_16x16x16|\bv_wmma_f32_16x16x16",
    "ldmatrix": r"\bldmatrix\.sync",
    "cp_async": r"\bcp\.async\.c[ag]\b",  # .cg (16 bytes) and .ca (8 and 4: the INT8 loader)
}


@dataclass
class CompileRow:
    kernel: str
    target: str
    compiler: str
    status: str  # "ok" or "failed"
    error: str = ""
    registers: int | None = None
    agprs: int | None = None
    sgprs: int | None = None
    shared_bytes: int | None = None
    spill_bytes: int | None = None
    wavefront_size: int | None = None
    seconds: float = 0.0
    instructions: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def default_route(target: Target) -> str:
    return "nvrtc" if target.vendor == "cuda" else "clang-19"


def _compile(route: str, source: str, names: list[str], target: Target) -> CompiledModule:
    if route == "nvrtc":
        from .dispatch import get_backend

        return get_backend("cuda").compile(source, names, [], target)
    if route == "clang-19":
        from .backends.amd_offline import AmdOfflineCompiler

        return AmdOfflineCompiler().compile(source, names, [], target)
    if route == "hiprtc":
        from .backends.hip import compile_in_subprocess

        return compile_in_subprocess(source, names, [], target.arch)
    raise ValueError(f"unknown compile route {route!r}; choose from {ROUTES}")


def count_instructions(assembly: str) -> dict[str, int]:
    return {k: len(re.findall(p, assembly)) for k, p in INSTRUCTION_PATTERNS.items()}


def kernel_assembly(module: CompiledModule, name_expr: str) -> str:
    """One kernel's part of a module's assembly text: in PTX from its `.entry` to the next; in
    AMD ISA from its label to its `.Lfunc_end` label. '' for a module without text (hipRTC)."""
    if not module.assembly:
        return ""
    sym = re.escape(module.lowered_names[name_expr])
    m = (re.search(rf"\.entry\s+{sym}\s*\((.*?)(?=\.entry\s|\Z)", module.assembly, re.S)
         or re.search(rf"^{sym}:(.*?)\.Lfunc_end", module.assembly, re.S | re.M))
    if m is None:
        raise RuntimeError(f"{name_expr} ({module.lowered_names[name_expr]}) not found in the "
                           f"{module.target.arch} assembly")
    return m.group(1)


def _failed_row(spec: KernelSpec, target: Target, route: str, e: Exception,
                seconds: float) -> CompileRow:
    """The row of a compile that raised `e`: its first error line."""
    lines = str(e).splitlines()
    lines = [ln for ln in lines if "error" in ln.lower()] or lines or [repr(e)]
    return CompileRow(spec.uri, target.arch, route, "failed", lines[0].strip()[:300],
                      seconds=seconds)


def _ok_row(spec: KernelSpec, target: Target, route: str, module: CompiledModule, assembly: str,
            seconds: float) -> CompileRow:
    row = CompileRow(spec.uri, target.arch, route, "ok", seconds=seconds,
                     instructions=count_instructions(assembly))
    res = module.resources.get(spec.name_expr)
    if res is not None:
        for k in ("registers", "agprs", "sgprs", "shared_bytes", "spill_bytes", "wavefront_size"):
            setattr(row, k, getattr(res, k))
    return row


def compile_one(spec: KernelSpec, target: Target, route: str | None = None) -> CompileRow:
    """The kernel alone in one program, as the runtime compiles it."""
    route = route or default_route(target)
    source = kernel_source(spec.source_file, [(spec.name_expr, spec.params_type)])
    t0 = time.perf_counter()
    try:
        module = _compile(route, source, [spec.name_expr], target)
    except Exception as e:  # a failed row, with its first error line, never a crashed table
        return _failed_row(spec, target, route, e, time.perf_counter() - t0)
    return _ok_row(spec, target, route, module, module.assembly, time.perf_counter() - t0)


def compile_together(specs: list[KernelSpec], target: Target,
                     route: str | None = None) -> list[CompileRow]:
    """Kernels of one source file in one program: a row per kernel with what compile_one gives
    (its resources; the instructions of its own part of the assembly; `seconds` its share of the
    program's time). Several times faster where starting a compile costs more than a kernel
    (clang-19, hipRTC). If the program fails, each kernel is compiled alone, so that each row
    carries its own error."""
    route = route or default_route(target)
    files = {s.source_file for s in specs}
    if len(files) != 1:
        raise ValueError(f"specs: kernels of one source file, got {sorted(files)}")
    source = kernel_source(specs[0].source_file, [(s.name_expr, s.params_type) for s in specs])
    t0 = time.perf_counter()
    try:
        module = _compile(route, source, [s.name_expr for s in specs], target)
    except Exception:
        return [compile_one(s, target, route) for s in specs]
    share = (time.perf_counter() - t0) / len(specs)
    return [_ok_row(s, target, route, module, kernel_assembly(module, s.name_expr), share)
            for s in specs]


def native_target() -> Target:
    """The target of the GPU torch sees (its current device); a clear error without one."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("'native' is the local GPU's target, and torch sees no GPU here; name "
                         f"targets instead ('all' or a comma list of {', '.join(ALL_TARGETS)})")
    from .dispatch import backend_for

    dev = torch.cuda.current_device()
    backend = backend_for(torch.device("cuda", dev))
    assert backend is not None  # a "cuda" device always has a backend
    return backend.target_for(dev)


def parse_targets(text: str) -> list[Target]:
    """'all' (ALL_TARGETS), 'native' (the local GPU's target) or a comma list of arch names."""
    if text == "native":
        return [native_target()]
    names = ALL_TARGETS if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"targets {text!r}: name 'all', 'native' or a comma list such as "
                         "sm_90,gfx942")
    return [Target(n) for n in names]


def default_jobs() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _prepare(route: str) -> None:
    """The one-time set-up of a route, done before the threads start: the files it writes (device
    libraries, a library symlink) are replaced under a per-process name, so two threads of one
    process must not make them at once. A route that cannot work is left to fail in every row,
    with its own error."""
    try:
        if route == "nvrtc":
            from .dispatch import get_backend

            get_backend("cuda").compiler_version()
        elif route == "clang-19":
            from .backends.amd_offline import AmdOfflineCompiler

            AmdOfflineCompiler().device_lib_dir()
        elif route == "hiprtc":
            from .backends.hip import hiprtc_library_dir

            hiprtc_library_dir()
    except Exception:
        pass  # each row reports it


def compile_plan(specs: Iterable[KernelSpec], targets: Iterable[Target],
                 routes: dict[str, str] | None = None,
                 extra_hiprtc: bool = False) -> list[tuple[KernelSpec, Target, str]]:
    """The (spec, target, route) compiles compile_all runs, in its order: spec by spec, each of
    `targets` in turn, gfx90a twice with `extra_hiprtc` (clang-19, then hipRTC)."""
    targets, plan = list(targets), []
    for spec in specs:
        for t in targets:
            plan.append((spec, t, (routes or {}).get(t.arch) or default_route(t)))
            if extra_hiprtc and t.arch == "gfx90a":
                plan.append((spec, t, "hiprtc"))
    return plan


def compile_all(specs: Iterable[KernelSpec], targets: Iterable[Target],
                routes: dict[str, str] | None = None, extra_hiprtc: bool = False,
                jobs: int | None = None, together: bool = False,
                progress: Callable[[int, int, CompileRow], None] | None = None) -> list[CompileRow]:
    """One row per compile of compile_plan (same arguments), in its order; failures are rows.

    Args:
        routes: arch -> route, for targets that should not take default_route.
        jobs: compiles at once, in threads (default: default_jobs(), the cores).
        progress: called as progress(done, total, row) for each row as it comes, on the
            caller's thread.
        together: one program per source file, target and route (compile_together) instead of
            one per kernel (compile_one).
    """
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    plan = compile_plan(specs, targets, routes, extra_hiprtc)
    programs: dict[object, list[int]] = {}  # program -> the plan's indices it compiles
    for i, (spec, t, route) in enumerate(plan):
        key = (spec.source_file, t, route) if together else i
        programs.setdefault(key, []).append(i)

    def run(indices: list[int]) -> list[CompileRow]:
        _, t, route = plan[indices[0]]
        if together:
            return compile_together([plan[i][0] for i in indices], t, route)
        return [compile_one(*plan[indices[0]])]

    for route in sorted({route for _, _, route in plan}):
        _prepare(route)
    rows: list[CompileRow | None] = [None] * len(plan)
    done = 0
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(run, indices): indices for indices in programs.values()}
        for future in as_completed(futures):
            for i, row in zip(futures[future], future.result()):
                rows[i] = row
                done += 1
                if progress is not None:
                    progress(done, len(plan), row)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after Ctrl-C, no queued compile starts
    return rows  # type: ignore[return-value]  # every slot filled above
