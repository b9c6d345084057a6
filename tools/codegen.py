"""Fingerprints of the generated code of a kernel set, to show that a refactor left it unchanged.

For every (kernel, target): the instruction count and a hash of the instruction text (SASS through
nvdisasm for sm_*, AMD ISA from clang-19 for gfx*), the registers and the spills. Symbol names and
addresses are left out of the hash, so a renamed template or moved file compares equal when the
instructions do.

    python tools/codegen.py fingerprint --out base.json [--targets sm_90,gfx942] [--jobs 2]
    python tools/codegen.py fingerprint --out new.json --uris-from base.json
    python tools/codegen.py fingerprint --out new.json --uris-from base.json --targets sm_90 --filter split_mma
    python tools/codegen.py compare base.json new.json [--strict]   (--strict: kernels of base.json
                                                          missing from new.json fail too)
    python tools/codegen.py fingerprint ... --mix   (NVIDIA rows add `ops`, the opcode histogram,
        and `loop_ops`, that of the span from the barrier before the first HMMA to the last HMMA:
        an attention kernel's K/V loop body, both of its branches; for reading a kernel change)

The default kernel set: every manifest instantiation for the chosen targets, plus the decode
kernels the planner may launch on sm_90 (warmup's set). `--uris-from` recompiles exactly the
kernels another fingerprint file lists (URIs are parsed back into manifest specs, so a template
parameter added later with a manifest default still resolves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

NV_TARGETS = ("sm_80", "sm_89", "sm_90")
AMD_TARGETS = ("gfx90a", "gfx942", "gfx1100")


def _nvdisasm() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    import nvidia.cu13  # pip install nvidia-cuda-nvdisasm

    return str(Path(nvidia.cu13.__path__[0]) / "bin" / "nvdisasm")


def parse_uri(uri: str):
    """'attention_decode.split[dtype=fp16,head_dim=128,...]' -> (family, kernel, {name: value})."""
    m = re.fullmatch(r"([\w]+)\.([\w]+)\[(.*)\]", uri)
    if not m:
        raise ValueError(f"not a kernel URI: {uri!r}")
    values = {}
    for item in filter(None, m.group(3).split(",")):
        k, v = item.split("=", 1)
        values[k] = True if v == "true" else False if v == "false" else int(v) if re.fullmatch(r"-?\d+", v) else v
    return m.group(1), m.group(2), values


def _spec_from_uri(uri: str):
    from ikport.manifest import spec

    family, kernel, values = parse_uri(uri)
    return spec(family, kernel, **values)


def _sass_lines(cubin: bytes) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.cubin"
        p.write_bytes(cubin)
        out = subprocess.run([_nvdisasm(), "-c", str(p)], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            lines.append(" ".join(m.group(1).split()))
    return lines


_AMD_INSTR = re.compile(r"^\s+([sv]_|buffer_|global_|ds_|flat_|scratch_|image_|exp\b)")


def _amd_lines(assembly: str) -> list[str]:
    return [" ".join(line.split("//")[0].split()) for line in assembly.splitlines() if _AMD_INSTR.match(line)]


def _opcode(line: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", line).split()[0].split(".")[0]


def _mix(lines: list[str]) -> dict:
    """Opcode histograms of a kernel's SASS and of its matrix loop's span (see the module doc)."""
    ops = [_opcode(ln) for ln in lines]
    out = {"ops": dict(sorted(((o, ops.count(o)) for o in set(ops)), key=lambda kv: -kv[1]))}
    mma = [i for i, o in enumerate(ops) if o == "HMMA"]
    if mma:
        start = next((i for i in range(mma[0], -1, -1) if ops[i] == "BAR"), mma[0])
        span = ops[start:mma[-1] + 1]
        out["loop_ops"] = dict(sorted(((o, span.count(o)) for o in set(span)), key=lambda kv: -kv[1]))
    return out


def fingerprint_one(uri: str, arch: str, mix: bool = False) -> dict:
    from ikport.backends.source import kernel_source
    from ikport.backends.target import Target

    s = _spec_from_uri(uri)
    target = Target(arch)
    source = kernel_source(s.source_file, [(s.name_expr, s.params_type)])
    try:
        if target.vendor == "cuda":
            from ikport.backends.cuda import CudaBackend

            module = CudaBackend().compile(source, [s.name_expr], [], target)
            lines = _sass_lines(module.binary)
        else:
            from ikport.backends.amd_offline import AmdOfflineCompiler

            module = AmdOfflineCompiler().compile(source, [s.name_expr], [], target)
            lines = _amd_lines(module.assembly)
    except Exception as e:  # noqa: BLE001 - a failed row, reported
        return {"status": "failed", "error": str(e).splitlines()[0][:200] if str(e) else repr(e)}
    res = module.resources.get(s.name_expr)
    # label names (per-function numbering) and mangled symbols (a renamed template) left out
    text = "\n".join(re.sub(r"_Z\w+", "_Z", re.sub(r"\.L\w+", ".L", ln)) for ln in lines)
    row = {"status": "ok", "instructions": len(lines), "sha": hashlib.sha256(text.encode()).hexdigest()[:16],
           "registers": getattr(res, "registers", None), "spill_bytes": getattr(res, "spill_bytes", None),
           "shared_bytes": getattr(res, "shared_bytes", None)}
    if mix and target.vendor == "cuda":
        row.update(_mix(lines))
    return row


def default_uris(targets: list[str]) -> dict[str, list[str]]:
    from ikport.manifest import default_instantiations

    base = [s.uri for s in default_instantiations()]
    out = {t: list(base) for t in targets}
    if "sm_90" in targets:
        try:  # the planner's decode set on sm_90 (its module moved in the structure refactor)
            from ikport.plan.decode import default_kernels
            from ikport.backends.target import Target

            extra = [s.uri for s in default_kernels(Target("sm_90"))]
        except ImportError:
            from ikport.warmup import kernel_set

            extra = [s.uri for s in kernel_set(async_copy=True, clusters=True)]
        out["sm_90"] += [u for u in extra if u not in base]
    return out


def _job(args):
    uri, arch, mix = args
    return uri, arch, fingerprint_one(uri, arch, mix)


def cmd_fingerprint(ns) -> int:
    targets = [t for t in ns.targets.split(",") if t]
    if ns.uris_from:
        prev = json.loads(Path(ns.uris_from).read_text())["kernels"]
        uris = {t: list(prev.get(t, {})) for t in targets}
    else:
        uris = default_uris(targets)
    jobs = [(u, t, ns.mix) for t in targets for u in uris[t] if ns.filter in u]
    result: dict[str, dict[str, dict]] = {t: {} for t in targets}
    with ProcessPoolExecutor(ns.jobs) as pool:
        for i, (uri, arch, fp) in enumerate(pool.map(_job, jobs, chunksize=4)):
            result[arch][uri] = fp
            if fp["status"] != "ok":
                print(f"FAILED {arch} {uri}: {fp['error']}", file=sys.stderr)
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(jobs)}", file=sys.stderr, flush=True)
    from ikport.backends.source import KERNELS_DIR

    tree = KERNELS_DIR.parent  # the tree whose kernels were compiled (PYTHONPATH may pick another)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=tree).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "kernels_src", "portability"],
                                capture_output=True, text=True, cwd=tree).stdout.strip())
    Path(ns.out).write_text(json.dumps({"commit": commit, "dirty": dirty, "kernels": result}, indent=1))
    print(f"{len(jobs)} kernels fingerprinted -> {ns.out}")
    return 0


def _normalize(uri: str) -> str:
    """A URI without parameters whose value is the manifest default added since (loader=dense)."""
    return re.sub(r",loader=dense\b|\bloader=dense,?", "", uri)


def cmd_compare(ns) -> int:
    a = json.loads(Path(ns.a).read_text())["kernels"]
    b = json.loads(Path(ns.b).read_text())["kernels"]
    changed = same = missing = 0
    for target in a:
        bt = {_normalize(u): v for u, v in b.get(target, {}).items()}
        for uri, fa in a[target].items():
            fb = bt.get(_normalize(uri))
            if fb is None:
                missing += 1
                if ns.strict:
                    print(f"missing {target} {uri}")
            elif fa == fb:
                same += 1
            else:
                changed += 1
                print(f"CHANGED {target} {uri}: {fa} -> {fb}")
    print(f"{same} identical, {changed} changed, {missing} missing")
    return 1 if changed or (missing and ns.strict) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fingerprint")
    f.add_argument("--out", required=True)
    f.add_argument("--targets", default=",".join(NV_TARGETS + AMD_TARGETS))
    f.add_argument("--uris-from", default=None)
    f.add_argument("--jobs", type=int, default=2)
    f.add_argument("--filter", default="", help="only kernels whose URI contains this text")
    f.add_argument("--mix", action="store_true", help="NVIDIA rows add opcode histograms (module doc)")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--strict", action="store_true", help="kernels of A missing from B fail too")
    ns = ap.parse_args()
    return cmd_fingerprint(ns) if ns.cmd == "fingerprint" else cmd_compare(ns)


if __name__ == "__main__":
    sys.exit(main())
