"""Compile manifest kernels for any target without a GPU: the compile-all check behind
`python -m ikport compile`, the CI test and the portability report.

Routes: NVRTC for sm_*; Debian's clang-19 (offline) for every AMD target; the real hipRTC for the
AMD targets the installed one supports (run in a subprocess: an old comgr aborts on new targets).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

from .backends.base import CompiledModule
from .backends.source import kernel_source
from .backends.target import ALL_TARGETS, Target
from .manifest import KernelSpec

ROUTES = ("nvrtc", "clang-19", "hiprtc")
# Instructions that prove a shim became the vendor's own (counted in PTX or AMD ISA text).
INSTRUCTION_PATTERNS = {
    "mma": r"\bmma\.sync\.aligned\.m16n8k16|\bv_mfma_f32_16x16x16|\bv_wmma_f32_16x16x16",
    "ldmatrix": r"\bldmatrix\.sync",
    "cp_async": r"\bcp\.async\.cg",
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


def compile_one(spec: KernelSpec, target: Target, route: str | None = None) -> CompileRow:
    route = route or default_route(target)
    source = kernel_source(spec.source_file, [(spec.name_expr, spec.params_type)])
    t0 = time.perf_counter()
    try:
        module = _compile(route, source, [spec.name_expr], target)
    except Exception as e:  # a failed row, with its first error line, never a crashed table
        lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or [repr(e)]
        return CompileRow(spec.uri, target.arch, route, "failed", lines[0].strip()[:300],
                          seconds=time.perf_counter() - t0)
    res = module.resources.get(spec.name_expr)
    row = CompileRow(spec.uri, target.arch, route, "ok", seconds=time.perf_counter() - t0,
                     instructions=count_instructions(module.assembly))
    if res is not None:
        for k in ("registers", "agprs", "sgprs", "shared_bytes", "spill_bytes", "wavefront_size"):
            setattr(row, k, getattr(res, k))
    return row


def parse_targets(text: str) -> list[Target]:
    names = ALL_TARGETS if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    return [Target(n) for n in names]


def compile_all(specs: Iterable[KernelSpec], targets: Iterable[Target], routes: dict[str, str] | None = None,
                extra_hiprtc: bool = False) -> list[CompileRow]:
    rows = []
    targets = list(targets)
    for spec in specs:
        for t in targets:
            rows.append(compile_one(spec, t, (routes or {}).get(t.arch)))
            if extra_hiprtc and t.arch == "gfx90a":
                rows.append(compile_one(spec, t, "hiprtc"))
    return rows
