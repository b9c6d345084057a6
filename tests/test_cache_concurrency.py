"""The compile cache under concurrency: N processes compiling the same kernels at the same moment
end with exactly one valid entry per kernel and no failure; readers racing the writers never see a
partial entry (CPU; the NVRTC variant needs cuda-bindings, no GPU)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ikport import manifest, warmup
from ikport.backends.cache import DiskCache
from ikport.backends.target import Target

N = 4
ROOT = Path(__file__).resolve().parent.parent

# A child process: say it is ready, wait for the common go signal, compile the specs, print what
# it got.
CHILD = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from ikport import kernels, manifest
    from ikport.backends.base import Backend, CompiledModule
    from ikport.backends.target import Target

    class SlowBackend(Backend):
        # 4 MiB of this process' own bytes per module, written slowly enough to overlap.
        name = "slow"
        def compiler_version(self): return "slow 1.0"
        def compile(self, source, names, options, target):
            time.sleep(0.2)
            blob = (f"{os.getpid()}:".encode() * (1 << 20))[: 4 << 20]
            return CompiledModule(target, blob, {n: "sym" for n in names}, "slow 1.0")
        def load(self, module, device): return object()
        def get_function(self, loaded, module, name): return object()
        def set_max_dynamic_shared(self, fn, nbytes): pass
        def launch(self, *a): pass
        def device_info(self, device): raise NotImplementedError

    backend_name, gate, specs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if backend_name == "slow":
        backend = SlowBackend()
    else:
        from ikport.dispatch import get_backend
        backend = get_backend(backend_name)
        backend.compiler_version()  # warm the NVRTC import before the start line
    specs = [manifest.spec(*s[:2], **s[2]) for s in specs]
    open(os.path.join(gate, f"ready-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(gate, "go")):
        time.sleep(0.001)
    t0 = time.time()
    got = {}
    for s in specs:
        m = kernels.compile_spec(s, backend, Target("sm_90"))
        got[s.uri] = hashlib.sha256(m.binary).hexdigest()
    print(json.dumps({"pid": os.getpid(), "start": t0, "got": got}))
""")

MMA_SPECS = [["mma_tile", "tile", {"dtype": d, "b_transposed": t}] for d in ("fp16", "bf16") for t in (False, True)]


def _run_at_once(backend: str, specs, cache_dir: Path):
    """N children, released together once every one of them has imported ikport."""
    env = {**os.environ, "IKPORT_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    env.pop("IKPORT_NO_DISK_CACHE", None)
    gate = cache_dir.parent / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, backend, str(gate), json.dumps(specs)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(N)]
    deadline = time.time() + 120
    while len(list(gate.glob("ready-*"))) < N:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a child did not start"
        time.sleep(0.01)
    (gate / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _entries(cache_dir: Path):
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".tmp")], "a temporary file was left behind"
    return [p for p in files if p.suffix == ".bin"]


def test_processes_compiling_the_same_kernels_at_once_fake_backend(tmp_path):
    specs = MMA_SPECS[:3]
    results = _run_at_once("slow", specs, tmp_path / "cache")
    entries = _entries(tmp_path / "cache")
    assert len(entries) == len(specs)  # one entry per kernel, whoever wrote last
    cache = DiskCache(tmp_path / "cache")
    written = {}
    for p in entries:
        m = cache.get(p.stem)
        assert m is not None, f"{p} is not a whole entry"
        written[p.stem] = m.binary
    # Each entry is one process' module, whole (4 MiB of a single pid), never a mix of two.
    pids = {r["pid"] for r in results}
    assert len(pids) == N
    for blob in written.values():
        pid = int(blob.split(b":", 1)[0])
        assert pid in pids and blob == (f"{pid}:".encode() * (1 << 20))[: 4 << 20]
    # They really ran at once: all started within one compile (0.2 s) of each other... give or
    # take a loaded machine.
    starts = [r["start"] for r in results]
    assert max(starts) - min(starts) < 2.0


def test_processes_compiling_the_same_kernels_at_once_nvrtc(tmp_path):
    pytest.importorskip("cuda.bindings", reason="pip install 'ikport[cuda]'")
    results = _run_at_once("cuda", MMA_SPECS, tmp_path / "cache")
    entries = _entries(tmp_path / "cache")
    assert len(entries) == len(MMA_SPECS)
    cache = DiskCache(tmp_path / "cache")
    from ikport.dispatch import get_backend

    be = get_backend("cuda")
    for s in MMA_SPECS:
        spec = manifest.spec(*s[:2], **s[2])
        m = cache.get(warmup.entry_key(spec, be, Target("sm_90")))
        assert m is not None and spec.name_expr in m.lowered_names and m.binary
        # What every process got is what it compiled or read: the same code.
        digests = {r["got"][spec.uri] for r in results}
        assert hashlib.sha256(m.binary).hexdigest() in digests


READER = textwrap.dedent("""
    import logging, sys, time
    from ikport.backends.cache import DiskCache
    damaged = []
    class H(logging.Handler):
        def emit(self, record): damaged.append(record.getMessage())
    logging.getLogger("ikport").addHandler(H())
    cache = DiskCache(sys.argv[1]); keys = sys.argv[2].split(","); stop = time.time() + float(sys.argv[3])
    reads = hits = 0
    while time.time() < stop:
        for k in keys:
            m = cache.get(k); reads += 1; hits += m is not None
    print(reads, hits, len(damaged))
""")

WRITER = textwrap.dedent("""
    import os, sys, time
    from ikport.backends.base import CompiledModule
    from ikport.backends.cache import DiskCache
    from ikport.backends.target import Target
    cache = DiskCache(sys.argv[1]); keys = sys.argv[2].split(","); stop = time.time() + float(sys.argv[3])
    blob = f"{os.getpid()}:".encode() * (1 << 19)
    n = 0
    while time.time() < stop:
        for k in keys:
            cache.put(k, CompiledModule(Target("sm_90"), blob, {"k": "s"}, "w")); n += 1
    print(n)
""")


def test_readers_never_see_a_partial_entry(tmp_path):
    keys = ",".join(c * 64 for c in "abc")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seconds = "2.0"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), keys, seconds],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path), keys, seconds],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    for w in writers:
        wout, werr = w.communicate(timeout=120)
        assert w.returncode == 0, werr
        assert int(wout.split()[0]) > 0
    reads, hits, damaged = map(int, out.split())
    assert reads > 0 and hits > 0
    assert damaged == 0, "a reader saw a partial or damaged entry"
    assert len(_entries(tmp_path)) == 3
