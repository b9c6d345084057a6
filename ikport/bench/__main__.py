"""`python -m ikport.bench AREA [options]`: run one benchmark area and write its result JSON.

Each area is a module with `add_arguments(parser)` and `run(args) -> exit code`; add an area by
listing its module in AREAS.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

AREAS = {
    "decode": "ikport.bench.decode",
    "prefill": "ikport.bench.prefill",
    "kvcache": "ikport.bench.kvcache",
    "w4a16": "ikport.bench.w4a16",
    "e2e": "ikport.bench.e2e",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ikport.bench",
        description="Benchmark ikport beside its peers in one process (kernel and eager time).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result JSON (default: docs/results/<area>-<device>.json; a plot goes beside it)",
    )
    common.add_argument(
        "--commit",
        default=None,
        help="git commit to record (default: git rev-parse HEAD of this checkout, else 'unknown')",
    )
    common.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (decode: locked workloads only, no sweep; prefill: P1 and chunked prefill; "
        "w4a16: M=1 and 16, 20 runs; e2e: 64 new tokens, hf-sdpa and ikport's implementations)",
    )
    areas = parser.add_subparsers(dest="area", required=True, metavar="AREA")
    for area, module_name in AREAS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or area).strip().splitlines()[0]
        sub = areas.add_parser(
            area,
            parents=[common],
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["python", "-m", "ikport.bench", *argv])
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
