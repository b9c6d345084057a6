"""Sessions, one per platform. Every session runs in the interpreter nox itself runs in
(python=False): the GPU machines already have their vendor's torch, and a fresh venv would pull
another one.

  nox -s tests          CPU: references, checks, dispatcher, cache, compile every kernel for every
                        NVIDIA and AMD target (needs ci/setup-tests.sh's toolchain for AMD)
  nox -s compile-cuda   compile table for sm_80, sm_89, sm_90
  nox -s compile-hip    compile table for gfx90a, gfx942, gfx1100 (+ hipRTC for gfx90a)
  nox -s test-cuda      the correctness suite on the NVIDIA GPU present
  nox -s test-hip       the same suite on the AMD GPU present (ROCm torch + hip-python)
  nox -s bench-cuda -- decode [--quick]    benchmarks (PROTOCOL.md) -> docs/results/*.json
  nox -s bench-hip  -- decode [--quick]
  nox -s report         CPU: docs/portability/REPORT.md (compile table for all six targets,
                        instruction checks, docs/results/*.json numbers, plots if matplotlib)
"""

from __future__ import annotations


import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "none"


def _require_gpu(session: nox.Session, vendor: str) -> None:
    """Fail (never pass empty) when this machine has no GPU of `vendor`."""
    probe = (
        "import sys, torch; hip = getattr(torch.version, 'hip', None); "
        f"ok = torch.cuda.is_available() and bool(hip) == ({vendor!r} == 'hip'); "
        "print(torch.__version__, torch.version.cuda, hip, torch.cuda.is_available()); "
        "sys.exit(0 if ok else 1)"
    )
    try:
        session.run("python", "-c", probe, silent=True)
    except Exception:
        build = "a ROCm build of torch and an AMD GPU" if vendor == "hip" else "a CUDA build of torch and an NVIDIA GPU"
        session.error(f"{session.name} needs {build}; none is visible here. Run `nox -s tests` on a CPU machine.")


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The CPU suite: GPU tests are skipped, AMD/NVIDIA compile-all runs."""
    session.run("python", "-m", "pytest", "-m", "not gpu", *session.posargs)


@nox.session(name="compile-cuda", python=False)
def compile_cuda(session: nox.Session) -> None:
    session.run("python", "-m", "ikport", "compile", "--target", "sm_80,sm_89,sm_90", *session.posargs)


@nox.session(name="compile-hip", python=False)
def compile_hip(session: nox.Session) -> None:
    session.run("python", "-m", "ikport", "compile", "--target", "gfx90a,gfx942,gfx1100", "--hiprtc",
                *session.posargs)


def _gpu_suite(session: nox.Session, vendor: str) -> None:
    _require_gpu(session, vendor)
    env = {"IKPORT_BACKEND": vendor}
    # The same tests as the CPU suite plus the GPU ones; the AMD offline compile checks belong to CI.
    session.run("python", "-m", "pytest", "-m", "not amd_offline", "-rs", *session.posargs, env=env)


@nox.session(name="test-cuda", python=False)
def test_cuda(session: nox.Session) -> None:
    _gpu_suite(session, "cuda")


@nox.session(name="test-hip", python=False)
def test_hip(session: nox.Session) -> None:
    _gpu_suite(session, "hip")


def _bench(session: nox.Session, vendor: str) -> None:
    _require_gpu(session, vendor)
    args = session.posargs or ["decode"]
    session.run("python", "-m", "ikport.bench", *args, env={"IKPORT_BACKEND": vendor})


@nox.session(name="bench-cuda", python=False)
def bench_cuda(session: nox.Session) -> None:
    _bench(session, "cuda")


@nox.session(name="bench-hip", python=False)
def bench_hip(session: nox.Session) -> None:
    _bench(session, "hip")


@nox.session(python=False)
def report(session: nox.Session) -> None:
    """The portability report (CPU only; GPU rows come from docs/results/*.json when present)."""
    session.run("python", "-m", "ikport.report", *session.posargs)
