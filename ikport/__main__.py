"""Command line: `python -m ikport info | compile | warmup`.

  python -m ikport info                         environment, for bug reports
  python -m ikport warmup [--all]               compile + load every kernel this GPU will use,
                                                with cold/warm timings (IKPORT_CACHE_DIR)
  python -m ikport warmup --target sm_90        the same without a GPU: compile into the cache
  python -m ikport compile --target all         every manifest kernel for sm_80, sm_89, sm_90,
                                                gfx90a, gfx942, gfx1100 (no GPU needed)
  python -m ikport compile --target sm_90 --json --filter decode
  python -m ikport compile --target native --jobs 8   the local GPU's target, 8 compiles at once
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from . import knobs
from ._version import __version__


def _info() -> int:
    import torch

    print(f"ikport {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"torch build: cuda={torch.version.cuda} hip={getattr(torch.version, 'hip', None)}")
    disk = "on" if knobs.disk_cache_enabled() else "off"
    print(f"cache dir: {knobs.cache_dir()}  (IKPORT_CACHE_DIR; disk cache {disk})")
    log = os.environ.get("IKPORT_LOG") or "(unset)"
    print(f"IKPORT_BACKEND: {knobs.forced_backend() or '(auto)'}  IKPORT_LOG: {log}")
    entries = list(knobs.cache_dir().glob("*/*.bin"))
    print(f"cache entries: {len(entries)} ({sum(p.stat().st_size for p in entries) / 2**20:.1f} MiB)"
          "  (python -m ikport warmup fills it)")
    import ikport.ops  # noqa: F401  registers the custom ops

    # From torch's dispatcher registry ("ikport::name" or "ikport::name.overload"), so a new op
    # shows up without a list to keep in step.
    ops = sorted({n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("ikport::")})
    print("torch ops: " + (", ".join(f"torch.ops.ikport.{n}" for n in ops) or "(none registered)"))
    try:
        from .dispatch import get_backend

        print(f"cuda backend: {get_backend('cuda').compiler_version()}")
    except Exception as e:
        print(f"cuda backend: unavailable ({e.__class__.__name__}: {str(e).splitlines()[0]})")
    try:
        from .backends.amd_offline import AmdOfflineCompiler

        c = AmdOfflineCompiler()
        print(f"amd offline compiler: {c.compiler_version() if c.available() else 'not installed'}")
    except Exception as e:
        print(f"amd offline compiler: unavailable ({e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            arch = getattr(p, "gcnArchName", None) or f"sm_{p.major}{p.minor}"
            print(f"gpu {i}: {p.name} {arch} {p.multi_processor_count} SMs/CUs {p.total_memory >> 20} MiB")
        try:
            from .dispatch import backend_for

            print(f"driver: {backend_for(torch.device('cuda', 0)).driver_version() or 'unknown'}")
        except Exception as e:  # a report, not a check: say what failed and go on
            print(f"driver: unknown ({e.__class__.__name__})")
    else:
        print("gpu: none visible to torch")
    return 0


def _compile(args: argparse.Namespace) -> int:
    from .manifest import default_instantiations
    from .toolchain import compile_all, compile_plan, parse_targets
    from .warmup import Progress

    try:
        targets = parse_targets(args.target)
    except ValueError as e:
        print(f"ikport compile: --target {args.target}: {e}", file=sys.stderr)
        return 2
    specs = [s for s in default_instantiations() if args.filter in s.uri]
    # On stderr: a bar on a terminal, one line per compile otherwise; stdout keeps the table/JSON.
    bar = Progress(len(compile_plan(specs, targets, extra_hiprtc=args.hiprtc)), sys.stderr)

    def progress(done: int, total: int, r) -> None:
        bar.update(done, f"{r.target} {r.compiler} {r.kernel}", r.status, r.seconds)

    rows = compile_all(specs, targets, extra_hiprtc=args.hiprtc, jobs=args.jobs, progress=progress)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        hdr = (f"{'kernel':<78} {'target':<8} {'compiler':<9} {'status':<6} {'regs':>5} {'agpr':>5} {'sgpr':>5} "
               f"{'smem/LDS':>8} {'spill':>6} {'mma':>4}")
        print(hdr)
        for r in rows:
            f = lambda v: "-" if v is None else str(v)  # noqa: E731
            print(f"{r.kernel:<78} {r.target:<8} {r.compiler:<9} {r.status:<6} {f(r.registers):>5} "
                  f"{f(r.agprs):>5} {f(r.sgprs):>5} {f(r.shared_bytes):>8} {f(r.spill_bytes):>6} "
                  f"{r.instructions.get('mma', 0):>4}")
            if r.status != "ok":
                print(f"    error: {r.error}")
        failed = sum(r.status != "ok" for r in rows)
        print(f"{len(rows) - failed} compiled, {failed} failed")
    return 1 if any(r.status != "ok" for r in rows) else 0


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ikport", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print the environment")
    c = sub.add_parser("compile", help="compile manifest kernels for targets (no GPU needed)")
    c.add_argument("--target", default="all",
                   help="'all', 'native' (the local GPU's target) or a comma list: "
                        "sm_80,sm_90,gfx942,...")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--filter", default="", help="only kernels whose URI contains this text")
    c.add_argument("--hiprtc", action="store_true",
                   help="also compile gfx90a with the installed hipRTC (subprocess)")
    c.add_argument("--jobs", type=_positive_int, default=None,
                   help="compiles at once (default: the cores this process may use)")
    w = sub.add_parser("warmup", help="compile and load every kernel configuration this GPU will use")
    w.add_argument("--all", action="store_true",
                   help="every manifest instantiation too (naive, combine, stages=0, mma_tile)")
    w.add_argument("--target", default=None,
                   help="compile for this arch (sm_90, gfx942, ...) instead of the current GPU's; "
                        "without a GPU of that arch the kernels are compiled, not loaded")
    w.add_argument("--device", type=int, default=None, help="GPU index (default: torch's current)")
    w.add_argument("--head-dims", default="", help="comma list of head dims (default: 64,128,256)")
    w.add_argument("--filter", default="", help="only kernels whose URI contains this text")
    w.add_argument("--force", action="store_true",
                   help="drop the cache entries first, so every kernel is compiled (cold timings)")
    w.add_argument("--no-warm", action="store_true", help="skip the warm (load from cache) pass")
    w.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    w.add_argument("-v", "--verbose", action="store_true", help="one line per kernel")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        return _info()
    if args.cmd == "warmup":
        from .warmup import main as warmup_main

        return warmup_main(args)
    return _compile(args)


if __name__ == "__main__":
    sys.exit(main())
