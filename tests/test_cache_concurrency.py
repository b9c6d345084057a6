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
# it got. (The deadlines only end a hung run: no assertion rests on how fast anything ran.)
CHILD = textwrap.dedent("""
    import glob, hashlib, json, os, sys, time
    from ikport import kernels, manifest
    from ikport.backends.base import Backend, CompiledModule
    from ikport.backends.target import Target

    class SlowBackend(Backend):
        # 4 MiB of this process' own bytes per module. The first compile waits inside compile()
        # until every process is inside it: none can have cached the first kernel before the
        # others start compiling it, so all of them write its entry, at once.
        name = "slow"
        met = False
        def compiler_version(self): return "slow 1.0"
        def compile(self, source, names, options, target):
            if not self.met:
                open(os.path.join(gate, f"compiling-{os.getpid()}"), "w").close()
                deadline = time.time() + 120
                while len(glob.glob(os.path.join(gate, "compiling-*"))) < n_procs:
                    if time.time() > deadline:
                        sys.exit("the other processes never started compiling")
                    time.sleep(0.001)
                self.met = True
            blob = (f"{os.getpid()}:".encode() * (1 << 20))[: 4 << 20]
            return CompiledModule(target, blob, {n: "sym" for n in names}, "slow 1.0")
        def load(self, module, device): return object()
        def get_function(self, loaded, module, name): return object()
        def set_max_dynamic_shared(self, fn, nbytes): pass
        def launch(self, *a): pass
        def device_info(self, device): raise NotImplementedError

    backend_name, gate, n_procs = sys.argv[1], sys.argv[2], int(sys.argv[4])
    specs = json.loads(sys.argv[3])
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
    got = {}
    for s in specs:
        m = kernels.compile_spec(s, backend, Target("sm_90"))
        got[s.uri] = hashlib.sha256(m.binary).hexdigest()
    print(json.dumps({"pid": os.getpid(), "got": got, "met": getattr(backend, "met", None)}))
""")

MMA_SPECS = [["mma_tile", "tile", {"dtype": d, "b_transposed": t}] for d in ("fp16", "bf16") for t in (False, True)]


def _run_at_once(backend: str, specs, cache_dir: Path):
    """N children, released together once every one of them has imported ikport."""
    env = {**os.environ, "IKPORT_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    env.pop("IKPORT_NO_DISK_CACHE", None)
    gate = cache_dir.parent / "gate"
    gate.mkdir()
    args = [sys.executable, "-c", CHILD, backend, str(gate), json.dumps(specs), str(N)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(N)]
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
    # They really ran at once: every process was inside its first compile with all the others.
    assert all(r["met"] is True for r in results)


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


# Writers put the same keys over and over until the reader says stop; the reader waits until
# every key has an entry, then reads for `seconds`. (The deadlines only end a hung run.)
READER = textwrap.dedent("""
    import logging, os, sys, time
    from ikport.backends.cache import DiskCache
    damaged = []
    class H(logging.Handler):
        def emit(self, record): damaged.append(record.getMessage())
    logging.getLogger("ikport").addHandler(H())
    cache = DiskCache(sys.argv[1]); keys = sys.argv[2].split(","); seconds = float(sys.argv[3])
    stop_file = os.path.join(sys.argv[1], "..", "stop")
    deadline = time.time() + 120
    while not all(cache.path(k).exists() for k in keys):
        if time.time() > deadline:
            sys.exit("the writers never wrote every key")
        time.sleep(0.001)
    stop = time.time() + seconds
    reads = hits = 0
    while time.time() < stop:
        for k in keys:
            m = cache.get(k); reads += 1; hits += m is not None
    open(stop_file, "w").close()
    print(reads, hits, len(damaged))
""")

WRITER = textwrap.dedent("""
    import os, sys, time
    from ikport.backends.base import CompiledModule
    from ikport.backends.cache import DiskCache
    from ikport.backends.target import Target
    cache = DiskCache(sys.argv[1]); keys = sys.argv[2].split(",")
    stop_file = os.path.join(sys.argv[1], "..", "stop")
    deadline = time.time() + 300
    blob = f"{os.getpid()}:".encode() * (1 << 19)
    n = 0
    while not os.path.exists(stop_file) and time.time() < deadline:
        for k in keys:
            cache.put(k, CompiledModule(Target("sm_90"), blob, {"k": "s"}, "w")); n += 1
    print(n)
""")


def test_readers_never_see_a_partial_entry(tmp_path):
    keys = ",".join(c * 64 for c in "abc")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cache_dir = tmp_path / "cache"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(cache_dir), keys],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(cache_dir), keys, "1.0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = reader.communicate(timeout=300)
    finally:
        (tmp_path / "stop").touch()  # the writers stop, whatever became of the reader
    assert reader.returncode == 0, err
    for w in writers:
        wout, werr = w.communicate(timeout=300)
        assert w.returncode == 0, werr
        assert int(wout.split()[0]) > 0
    reads, hits, damaged = map(int, out.split())
    assert reads > 0 and hits == reads  # every key had an entry before the first read
    assert damaged == 0, "a reader saw a partial or damaged entry"
    assert len(_entries(cache_dir)) == 3
