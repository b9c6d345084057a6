"""The compiled-code cache: keys, hits, damaged entries, unwritable dirs (CPU, no compiler)."""

import os
import stat

import pytest

from ikport import kernels, manifest
from ikport.backends.base import Backend, CompiledModule, KernelResources
from ikport.backends.cache import DiskCache, cache_key
from ikport.backends.target import Target


def module(binary=b"\x7fELF-code"):
    return CompiledModule(Target("sm_90"), binary, {"k<1>": "_Z1kILi1EEvv"}, "nvrtc 13.0", "log",
                          {"k<1>": KernelResources(registers=40, shared_bytes=0, spill_bytes=0)}, "ptx")


def test_key_moves_with_every_part():
    base = dict(source="src", names=["k<1>"], options=["-O3"], target=Target("sm_90"),
                compiler="nvrtc 13.0", library_version="0.1.0")
    k0 = cache_key(**base)
    for field, other in [("source", "src2"), ("names", ["k<2>"]), ("options", ["-O2"]),
                         ("target", Target("sm_80")), ("compiler", "nvrtc 13.1"),
                         ("library_version", "0.2.0")]:
        assert cache_key(**{**base, field: other}) != k0, field
    assert cache_key(**base) == k0


def test_round_trip(tmp_path):
    c = DiskCache(tmp_path)
    assert c.get("ab" * 32) is None
    c.put("ab" * 32, module())
    got = c.get("ab" * 32)
    assert got.binary == b"\x7fELF-code" and got.lowered_names == {"k<1>": "_Z1kILi1EEvv"}
    assert got.resources["k<1>"].registers == 40 and got.target == Target("sm_90")
    assert not [p for p in c.path("ab" * 32).parent.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_entry_is_a_miss(tmp_path, damage, caplog):
    c = DiskCache(tmp_path)
    key = "cd" * 32
    c.put(key, module())
    p = c.path(key)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[:-5])
    elif damage == "flip":
        p.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "garbage":
        p.write_bytes(b"not a cache entry at all" * 3)
    else:
        p.write_bytes(b"")
    assert c.get(key) is None
    c.put(key, module())  # rebuilt entry is whole again
    assert c.get(key).binary == b"\x7fELF-code"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write read-only dirs")
def test_read_only_dir_warns_and_keeps_working(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    c = DiskCache(ro / "cache")
    with pytest.warns(RuntimeWarning, match="in memory"):
        c.put("ef" * 32, module())
    c.put("ef" * 32, module())  # warns once, never raises


def test_unwritable_path_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    c = DiskCache(blocker / "cache")  # a file where the directory should be
    with pytest.warns(RuntimeWarning, match="in memory"):
        c.put("ef" * 32, module())


class CountingBackend(Backend):
    name = "counting"

    def __init__(self):
        self.compiles = 0

    def compiler_version(self):
        return "counting 1.0"

    def compile(self, source, names, options, target):
        self.compiles += 1
        return CompiledModule(target, b"bin", {n: "sym" for n in names}, "counting 1.0")

    def load(self, module, device):
        return object()

    def get_function(self, loaded, module, name):
        return object()

    def set_max_dynamic_shared(self, fn, nbytes):
        pass

    def launch(self, *a):
        pass

    def device_info(self, device):
        raise NotImplementedError


def test_compile_once_per_process_and_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("IKPORT_CACHE_DIR", str(tmp_path))
    s = manifest.spec("mma_tile", "tile", dtype="fp16", b_transposed=False)
    be = CountingBackend()
    kernels._compiled.clear()
    kernels.compile_spec(s, be, Target("sm_90"))
    kernels.compile_spec(s, be, Target("sm_90"))
    assert be.compiles == 1  # in-process map
    kernels._compiled.clear()
    kernels.compile_spec(s, be, Target("sm_90"))
    assert be.compiles == 1  # disk cache hit in a "new process"
    kernels.compile_spec(s, be, Target("sm_80"))
    assert be.compiles == 2  # another target is another entry
    kernels._compiled.clear()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "header"])
def test_tampered_entry_is_rebuilt_through_compile_spec(tmp_path, monkeypatch, caplog, damage):
    """A damaged entry on disk is a miss for the next process: it compiles again, says so in the
    log, and leaves a whole entry behind."""
    monkeypatch.setenv("IKPORT_CACHE_DIR", str(tmp_path))
    s = manifest.spec("mma_tile", "tile", dtype="bf16", b_transposed=True)
    be = CountingBackend()
    kernels._compiled.clear()
    kernels.compile_spec(s, be, Target("sm_90"))
    (entry,) = tmp_path.glob("*/*.bin")
    data = entry.read_bytes()
    entry.write_bytes({
        "truncate": data[: len(data) // 2], "flip": data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:],
        "garbage": os.urandom(len(data)), "empty": b"", "header": b"IKPORT-CACHE-0\n" + data[15:],
    }[damage])
    kernels._compiled.clear()  # a new process
    with caplog.at_level("WARNING", logger="ikport"):
        m = kernels.compile_spec(s, be, Target("sm_90"))
    assert be.compiles == 2 and m.binary == b"bin"
    assert "rebuilding" in caplog.text
    assert DiskCache(tmp_path).get(entry.stem).binary == b"bin"  # whole again
    kernels._compiled.clear()
    kernels.compile_spec(s, be, Target("sm_90"))
    assert be.compiles == 2  # and used from then on
    kernels._compiled.clear()


def test_unwritable_cache_dir_falls_back_to_memory_through_compile_spec(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache directory should be (works as root too)
    monkeypatch.setenv("IKPORT_CACHE_DIR", str(blocker / "cache"))
    s = manifest.spec("mma_tile", "tile", dtype="fp16", b_transposed=True)
    be = CountingBackend()
    kernels._compiled.clear()
    with pytest.warns(RuntimeWarning, match="kept in memory"):
        m = kernels.compile_spec(s, be, Target("sm_90"))
    assert m.binary == b"bin" and be.compiles == 1
    kernels.compile_spec(s, be, Target("sm_90"))
    assert be.compiles == 1  # the in-process map serves it
    kernels._compiled.clear()


def test_occupancy_is_asked_with_the_shared_memory_allowed():
    """The driver answers 0 blocks for a launch above the kernel's opt-in shared-memory limit:
    Kernel.occupancy raises the limit first (once per new high-water mark), so the first plan of
    a kernel sees the real occupancy, not the fallback estimate."""
    calls = []

    class Driverish(CountingBackend):
        limit = 48 * 1024

        def set_max_dynamic_shared(self, fn, nbytes):
            calls.append(("limit", nbytes))
            self.limit = nbytes

        def occupancy(self, fn, block_threads, shared_bytes):
            calls.append(("occupancy", shared_bytes))
            return 0 if shared_bytes > self.limit else 1

    k = kernels.Kernel(manifest.spec("mma_tile", "tile", dtype="fp16", b_transposed=False), Driverish(), object())
    assert k.occupancy(128, 200_000) == 1
    assert k.occupancy(128, 100_000) == 1
    assert calls == [("limit", 200_000), ("occupancy", 200_000), ("occupancy", 100_000)]
