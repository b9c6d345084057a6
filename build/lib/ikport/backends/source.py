"""Assembles the exact text a compiler sees: the kernel family file with every quoted include
(portability/ and kernels_src/ headers) inlined once, plus explicit instantiations.

Inlining makes the text self-contained, so its hash covers every header it depends on (the cache
key needs that) and the compiler needs no include path for ikport's own headers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

PORTABILITY_DIR = Path(__file__).resolve().parent.parent / "portability"
KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels_src"

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")


def _resolve(name: str, current_dir: Path) -> Path:
    for d in (current_dir, PORTABILITY_DIR, KERNELS_DIR):
        p = d / name
        if p.is_file():
            return p
    raise FileNotFoundError(f'#include "{name}" not found next to {current_dir} or in portability/')


def inline_includes(path: Path, _seen: set[Path] | None = None) -> str:
    seen = set() if _seen is None else _seen
    path = path.resolve()
    if path in seen:
        return ""
    seen.add(path)
    out = [f"// ---- begin {path.name}"]
    for line in path.read_text().splitlines():
        m = _INCLUDE.match(line)
        if m:
            out.append(inline_includes(_resolve(m.group(1), path.parent), seen))
        elif _PRAGMA_ONCE.match(line):
            continue
        else:
            out.append(line)
    out.append(f"// ---- end {path.name}")
    return "\n".join(out)


def kernel_source(family_file: str, instantiations: Sequence[tuple[str, str]]) -> str:
    """Text of `kernels_src/<family_file>` with includes inlined and one explicit instantiation per
    (name expression, parameter type) pair, e.g. ("attn_decode_naive<ik::half_t, 128>",
    "DecodeParams"): every ikport kernel takes exactly one by-value parameter struct."""
    lines = [inline_includes(KERNELS_DIR / family_file), "", "// ---- explicit instantiations"]
    lines += [f"template __global__ void {expr}({ptype});" for expr, ptype in instantiations]
    return "\n".join(lines) + "\n"
