import importlib.util
import os

import pytest
import torch

from ikport import manifest, toolchain
from ikport.backends.target import Target

NVIDIA_TARGETS = ("sm_80", "sm_89", "sm_90")
AMD_TARGETS = ("gfx90a", "gfx942", "gfx1100")


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


# ---- compile-all, once per session, over every core ---------------------------------------------
@pytest.fixture(scope="session")
def nvidia_rows() -> list[toolchain.CompileRow]:
    """Every manifest instantiation for every NVIDIA target, one NVRTC program per kernel (as the
    runtime and `python -m ikport compile` build them)."""
    pytest.importorskip("cuda.bindings", reason="pip install 'ikport[cuda]'")
    specs = list(manifest.default_instantiations())
    return toolchain.compile_all(specs, [Target(t) for t in NVIDIA_TARGETS])


@pytest.fixture(scope="session")
def amd_rows() -> list[toolchain.CompileRow]:
    """Every manifest instantiation for every AMD target with clang-19, and for gfx90a with hipRTC
    too where hip-python and libamdhip64 are installed. One program per source file and target
    (compile_all together=True): clang's and hipRTC's start-up dominates a one-kernel compile,
    and test_compile.py checks that the rows equal one-kernel compiles."""
    from ikport.backends.amd_offline import AmdOfflineCompiler

    if not AmdOfflineCompiler.available():
        pytest.fail("clang-19 / ROCm device libraries missing: run ci/setup-tests.sh")
    specs = list(manifest.default_instantiations())
    return toolchain.compile_all(specs, [Target(t) for t in AMD_TARGETS],
                                 extra_hiprtc=_hiprtc_available(), together=True)


def gpu_available() -> bool:
    return torch.cuda.is_available()


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)")
