import fcntl
import importlib.util
import json
import os
from collections.abc import Callable

import pytest
import torch

from ikport import manifest, toolchain
from ikport.backends.target import ALL_TARGETS, Target

# One CPU thread per test process: the tests' tensors are small, and torch's thread pool made them
# several times slower, not faster, on a two-core machine (the more so beside other processes).
torch.set_num_threads(1)

# `python -m ikport compile --target all`'s targets, by vendor
NVIDIA_TARGETS = [t for t in ALL_TARGETS if Target(t).vendor == "cuda"]
AMD_TARGETS = [t for t in ALL_TARGETS if Target(t).vendor == "hip"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The test session compiles into its own cache dir unless the caller chose one."""
    if "IKPORT_CACHE_DIR" in os.environ:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IKPORT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ikport-cache"))
        yield


def _hiprtc_available() -> bool:
    from ikport.backends.hip import amdhip64_path

    return importlib.util.find_spec("hip") is not None and amdhip64_path() is not None


# ---- compile-all, once per test run, over every core --------------------------------------------
def _once_per_run(tmp_path_factory, name: str,
                  compute: Callable[[], list[toolchain.CompileRow]]) -> list[toolchain.CompileRow]:
    """compute() once per run. pytest-xdist's workers each have their own session: the first to
    ask computes (under a lock in their common temp folder) and files the rows; the others wait
    for them and read them."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return compute()
    shared = tmp_path_factory.getbasetemp().parent
    path = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return [toolchain.CompileRow(**row) for row in json.loads(path.read_text())]
        rows = compute()
        path.write_text(json.dumps([r.as_dict() for r in rows]))
        return rows


@pytest.fixture(scope="session")
def nvidia_rows(tmp_path_factory) -> list[toolchain.CompileRow]:
    """Every manifest instantiation for every NVIDIA target, one NVRTC program per kernel (as the
    runtime and `python -m ikport compile` build them)."""
    pytest.importorskip("cuda.bindings", reason="pip install 'ikport[cuda]'")
    specs = list(manifest.default_instantiations())
    return _once_per_run(tmp_path_factory, "nvidia-rows",
                         lambda: toolchain.compile_all(specs, [Target(t) for t in NVIDIA_TARGETS]))


@pytest.fixture(scope="session")
def amd_rows(tmp_path_factory) -> list[toolchain.CompileRow]:
    """Every manifest instantiation for every AMD target with clang-19, and for gfx90a with hipRTC
    too where hip-python and libamdhip64 are installed. One program per source file and target
    (compile_all together=True): clang's and hipRTC's start-up dominates a one-kernel compile,
    and test_compile.py checks that the rows equal one-kernel compiles."""
    from ikport.backends.amd_offline import AmdOfflineCompiler

    if not AmdOfflineCompiler.available():
        pytest.fail("clang-19 / ROCm device libraries missing: run ci/setup-tests.sh")
    specs = list(manifest.default_instantiations())
    targets = [Target(t) for t in AMD_TARGETS]
    return _once_per_run(tmp_path_factory, "amd-rows", lambda: toolchain.compile_all(
        specs, targets, extra_hiprtc=_hiprtc_available(), together=True))
