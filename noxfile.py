"""Sessions, one per platform. Every session runs in the interpreter nox itself runs in
(python=False): the GPU machines already have their vendor's torch, and a fresh venv would pull
another one.

  nox -s tests          CPU: references, checks, dispatcher, cache, compile every kernel for every
                        NVIDIA and AMD target (needs ci/setup-tests.sh's toolchain for AMD)
  nox -s quick          the same without compile-all and the emulator builds (`slow`): the
                        edit-test loop; CI runs `tests`
  nox -s lint           ruff check . (rules and line length in pyproject.toml)
  nox -s compile-cuda   compile table for sm_80, sm_89, sm_90
  nox -s compile-hip    compile table for gfx90a, gfx942, gfx1100 (+ hipRTC for gfx90a)
  nox -s test-cuda      the correctness suite on the NVIDIA GPU present
  nox -s test-hip       the same suite on the AMD GPU present (ROCm torch + hip-python)
  nox -s bench-cuda -- decode|prefill|w4a16 [--quick]    benchmarks (docs/benchmarks.md) -> docs/results/*.json
  nox -s bench-hip  -- decode|prefill|w4a16 [--quick]
  nox -s report         CPU: docs/portability/REPORT.md (compile table for all six targets,
                        instruction checks, docs/results/*.json numbers, plots if matplotlib)
  nox -s sanitize-cuda  a fast subset of the GPU suite under compute-sanitizer memcheck, racecheck
                        and initcheck -> docs/results/sanitize-cuda-<gpu>.log (zero reports)
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


# One pytest-xdist worker per core, each test file whole on one worker: a file's module fixtures
# (the emulator builds) are made once; the compile-all fixtures once per run (tests/conftest.py).
PARALLEL = ["-n", "auto", "--dist", "loadfile"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The CPU suite: GPU tests are skipped, AMD/NVIDIA compile-all runs."""
    session.run("python", "-m", "pytest", "-m", "not gpu", *PARALLEL, *session.posargs)


@nox.session(python=False)
def quick(session: nox.Session) -> None:
    """The CPU suite without the tests marked `slow` (compile-all, the emulator builds)."""
    session.run("python", "-m", "pytest", "-m", "not gpu and not slow", *PARALLEL, *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("python", "-m", "ruff", "check", ".", *session.posargs)


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


# ---- compute-sanitizer ---------------------------------------------------------------------------
# A fast subset of the GPU suite covering every kernel path (test_attention_gpu.py unless a node id
# names its file): fused split-K, the unfused combine kernel, one block per head (split1, MHA),
# naive, multi-token causal queries, zero and clamped lengths, a strided cache slice, paged (page
# sizes 16 and 1), the cp.async ring (3 and 4 stages, D 96 and 256), the launch rules' kernels
# (one block per SM with the 4-stage ring, paged at 512 threads, 128-thread blocks), the early
# copy's rows past kv_len, the cluster merge and the matrix shim. Node ids, so a renamed test
# fails loudly.
# (The CUDA-graph test is left out: with PYTORCH_NO_CUDA_MEMORY_CACHING=1 the split-K scratch
# allocation inside a capture is a plain cudaMalloc, which stream capture forbids.)
SANITIZE_TESTS = [
    "test_decode_matches_reference[split-B3-Hq8-Hkv4-T1-L4097-D128-fp16]",
    "test_decode_matches_reference[split-unfused-B2-Hq12-Hkv4-T1-L333-D64-bf16]",
    "test_decode_matches_reference[split1-B2-Hq8-Hkv8-T1-L7-D128-fp16]",
    "test_naive_matches_reference[shape1-fp16]",
    "test_multi_token_queries[True-4]",
    "test_zero_length_sequence_gives_zeros[split]",
    "test_lengths_past_the_cache_are_clamped",
    "test_strided_static_cache_slice",
    "test_paged_matches_reference[split-16-fp16]",
    "test_paged_matches_reference[split-1-bf16]",
    "test_async_copy_pipeline_matches_reference[B2-Hq4-Hkv2-T1-L300-D96-3-4]",
    "test_async_copy_pipeline_matches_reference[B2-Hq8-Hkv2-T3-L2049-D256-4-2]",
    "test_launch_rule_shapes_match_reference[16-1024]",
    "test_launch_rule_shapes_match_reference[64-512]",
    # the early copy: rows past kv_len (NaN, Inf) fetched, never used; 2- and 4-stage rings
    "test_cache_rows_past_kv_len_never_leak[two-stage-contiguous-split]",
    "test_cache_rows_past_kv_len_never_leak[one-per-sm-contiguous-split]",
    "test_cache_rows_past_kv_len_never_leak[one-per-sm-paged-split]",  # 512 threads, paged
    "test_matrix_shim_tile_product[True-bf16]",
    # split-K merged inside a block cluster (sm_90+): 2 and 8 blocks, empty splits, paged
    "test_cluster_merge_matches_reference[fp16-2]",
    "test_cluster_merge_matches_reference[bf16-8]",
    # W4A16: split-K with the fused merge, several row tiles, asymmetric groups, every variant
    "test_w4a16_gpu.py::test_default_matches_reference[M33-N96-K1024-fp16]",
    "test_w4a16_gpu.py::test_default_matches_reference[M5-N1024-K14336-bf16]",
    "test_w4a16_gpu.py::test_every_variant_matches_reference[M3-N272-K256-bf16-gemv]",
    "test_w4a16_gpu.py::test_every_variant_matches_reference[M3-N272-K256-fp16-gemv-scalar]",
    "test_w4a16_gpu.py::test_every_variant_matches_reference[M3-N272-K256-fp16-naive]",
    "test_w4a16_gpu.py::test_group_sizes_and_zero_points[g32-asym-mma]",
]
SANITIZE_TOOLS = {
    # Every kernel in the process (torch's too); 256 guard bytes after each allocation. API errors
    # are not reported: ikport checks every driver call itself, and torch probes some APIs that
    # fail by design.
    "memcheck": ["--padding", "256", "--report-api-errors", "no"],
    # Shared-memory hazards in ikport's kernels only (torch's and cuBLAS's own kernels are not
    # ours to fix).
    "racecheck": ["--kernel-name", "kns=attn_decode", "--kernel-name", "kns=mma_tile",
                  "--kernel-name", "kns=w4a16"],
    # Uninitialized global reads: every kernel is tracked, since the inputs are written by
    # torch's kernels (filtering to ikport's made every input read look uninitialized).
    "initcheck": ["--report-api-errors", "no"],
    # Not in the default run; `nox -s sanitize-cuda -- synccheck` adds barrier checks.
    "synccheck": ["--kernel-name", "kns=attn_decode", "--kernel-name", "kns=mma_tile",
                  "--kernel-name", "kns=w4a16"],
}
SANITIZE_DEFAULT = ("memcheck", "racecheck", "initcheck")
_SANITIZER_EXIT = 86  # compute-sanitizer's exit code when it reports anything


def _find_compute_sanitizer() -> str | None:
    """PATH, a CUDA toolkit, or the nvidia-cuda-sanitizer-api wheel in this interpreter."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [Path(r, "bin", "compute-sanitizer") for r in roots if r]
    candidates += [Path(r, "compute-sanitizer", "compute-sanitizer") for r in roots if r]
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        for base in map(Path, nvidia.__path__):
            for sub in ("cu13", "cu12", "cuda_sanitizer_api"):
                candidates += [base / sub / "bin" / "compute-sanitizer",
                               base / sub / "compute-sanitizer" / "compute-sanitizer"]
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _tee(cmd: list[str], env: dict[str, str], log) -> tuple[int, str]:
    """Run `cmd`, its output to the terminal and to `log`; (exit code, output)."""
    lines = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as p:
        assert p.stdout is not None
        for line in p.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
        return p.wait(), "".join(lines)


@nox.session(name="sanitize-cuda", python=False)
def sanitize_cuda(session: nox.Session) -> None:
    """The fast GPU subset under compute-sanitizer memcheck, racecheck, initcheck: zero reports.

    Posargs: tool names (default: memcheck racecheck initcheck; also synccheck). A run of fewer
    than the default three appends to the log, so one tool per command makes one log too. The
    log goes to docs/results/sanitize-cuda-<gpu>.log (commit it)."""
    _require_gpu(session, "cuda")
    exe = _find_compute_sanitizer()
    if exe is None:
        session.error(
            "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, or the "
            "nvidia-cuda-sanitizer-api wheel). Install a CUDA toolkit, or "
            "`pip install nvidia-cuda-sanitizer-api==<the driver's CUDA version, e.g. 13.0.*>`.")
    tools = session.posargs or list(SANITIZE_DEFAULT)
    unknown = [t for t in tools if t not in SANITIZE_TOOLS]
    if unknown:
        session.error(f"unknown tool(s) {unknown}; choose from {list(SANITIZE_TOOLS)}")
    python = shutil.which("python") or sys.executable  # the interpreter the other sessions run
    probe = ("import torch; from ikport.bench.harness import device_slug; "
             "n = torch.cuda.get_device_name(); print(device_slug(n)); print(n); print(torch.__version__)")
    slug, name, torch_version = subprocess.run(
        [python, "-c", probe], check=True, capture_output=True, text=True).stdout.split("\n")[:3]
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "IKPORT_BACKEND": "cuda",
           # torch's caching allocator would hide out-of-bounds accesses inside its big blocks.
           "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    tests = [f"tests/{t}" if "::" in t else f"tests/test_attention_gpu.py::{t}" for t in SANITIZE_TESTS]
    log_path = Path("docs/results") / f"sanitize-cuda-{slug}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    # All tools: a new log. A subset (e.g. one tool per command on a time-limited machine): its
    # sections are appended to the log, so three runs make one log.
    with open(log_path, "w" if set(tools) >= set(SANITIZE_DEFAULT) else "a") as log:
        log.write(f"{name}\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
                  f"commit {commit}\ntorch {torch_version}\n{version[-1] if version else exe}\n")
        for tool in tools:
            cmd = [exe, "--tool", tool, "--target-processes", "all",
                   "--error-exitcode", str(_SANITIZER_EXIT), "--print-limit", "100",
                   *SANITIZE_TOOLS[tool],
                   python, "-m", "pytest", "-m", "gpu", "-q", "-x", "-p", "no:cacheprovider",
                   "-o", "faulthandler_timeout=1200", *tests]
            header = f"\n==== {tool}: {' '.join(cmd)}\n"
            sys.stdout.write(header)
            log.write(header)
            log.flush()
            rc, text = _tee(cmd, env, log)
            if rc == 0 and f"{len(tests)} passed" not in text:
                rc = -1  # some test was skipped or deselected: not a clean run of the subset
            results[tool] = rc
            log.write(f"==== {tool}: exit code {rc}\n")
            log.flush()
        summary = ", ".join(
            f"{t}: " + ("clean" if rc == 0 else "REPORTS" if rc == _SANITIZER_EXIT
                        else "NOT ALL TESTS RAN" if rc == -1 else f"exit {rc}")
            for t, rc in results.items())
        log.write(f"\nsummary: {summary}\n")
    session.log(f"{summary}; log: {log_path}")
    if any(results.values()):
        session.error(f"sanitize-cuda failed ({summary}); see {log_path}")
