"""The Python host cost of an eager W4A16 call, on a machine without a GPU (a fake device).

CPU tensors are routed to the real CudaBackend as if they lived on a GPU: the driver calls are
stand-ins (cuLaunchKernel is a ctypes call of a C no-op with the same argument types, so the
argument conversion still counts; loads, shared-memory opt-ins and allocations return at once) and
the plans are made for an H100's facts. What is timed is ikport's Python per call plus torch's
CPU allocation of the output: NOT a GPU measurement (tools/host_ab.py measures that).

    PYTHONPATH=<tree> python tools/w4a16_host_probe.py [--calls 20000] [--repeats 7]
prints, per case, the best over repeats of the mean time per call in microseconds (the best: the
host is shared, and slower repeats measure the neighbours).
Needs cuda-python (CudaBackend's import), not a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import torch

import ikport
from ikport import dispatch, kernels
from ikport.backends import cuda
from ikport.backends.base import CompiledModule, DeviceInfo, KernelResources
from ikport.backends.target import Target

H100 = DeviceInfo("NVIDIA H100 80GB HBM3 (fake)", "sm_90", 132, 227 * 1024, 32, 50 << 20)
SHAPES = {"W1": (4096, 4096), "W2": (4096, 14336), "W3": (14336, 4096)}  # K, N (bench/w4a16.py)


def fake_gpu() -> cuda.CudaBackend:
    """Route CPU tensors to a CudaBackend whose driver does nothing."""
    # labs(first argument) ignores the rest and returns 0 for the function handle 0: the ctypes
    # conversion of cuLaunchKernel's arguments is what counts
    noop = ctypes.CDLL(None).labs
    u = ctypes.c_uint
    noop.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    noop.restype = ctypes.c_int
    cuda._launch_kernel = lambda: noop
    backend = cuda.CudaBackend()
    backend.set_max_dynamic_shared = lambda fn, n: None
    backend.device_info = lambda dev: H100
    backend.target_for = lambda dev: Target("sm_90")
    backend.load = lambda module, dev: None
    backend.get_function = lambda loaded, module, name: 0
    backend.alloc_async = lambda dev, n, stream: 0x100000
    backend.alloc_zeroed = lambda dev, n: 0x200000
    kernels.compile_spec = lambda spec, b, target: CompiledModule(
        target, b"", {spec.name_expr: "k"}, "fake", resources={spec.name_expr: KernelResources(shared_bytes=0)})
    dispatch.backend_for = lambda device: backend
    torch.cuda.current_device = lambda: 0
    torch._C._cuda_getCurrentRawStream = lambda device: 7
    torch._C._cuda_isCurrentStreamCapturing = lambda: False
    return backend


def per_call_us(fn, calls: int, repeats: int) -> float:
    for _ in range(200):
        fn()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return round(min(means), 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    fake_gpu()
    torch.manual_seed(0)
    cases = {}
    for name, (K, N) in SHAPES.items():
        w = ikport.quantize_weight(torch.randn(N, K) * 0.02, group_size=128, method="rtn").to(dtype=torch.float16)
        layer = ikport.nn.W4A16Linear.from_int4(w)  # no bias: its add would time a CPU kernel
        for M in (1, 16):
            x = torch.randn(M, K, dtype=torch.float16)
            out = torch.empty(M, N, dtype=torch.float16)
            x3 = x.view(1, M, K)
            cases[f"{name}-M{M}"] = lambda x=x, w=w: ikport.w4a16_matmul(x, w)
            cases[f"{name}-M{M} out="] = lambda x=x, w=w, out=out: ikport.w4a16_matmul(x, w, out=out)
            cases[f"{name}-M{M} W4A16Linear [1,M,K]"] = lambda x3=x3, layer=layer: layer(x3)
            # the custom op, as a torch.compile'd graph calls it
            cases[f"{name}-M{M} torch.ops.ikport"] = lambda x=x, w=w: torch.ops.ikport.w4a16_matmul(
                x, w.qweight, w.scales, w.zeros, w.perm, w.group_size, w.in_features, w.out_features, w.layout, None)
            cases[f"{name}-M{M} torch.empty alone"] = lambda M=M, N=N: torch.empty(
                (M, N), dtype=torch.float16, device="cpu")  # what the output costs on its own here
    res = {"ikport_file": ikport.__file__, "note": "fake GPU on a CPU: Python host cost only, not a GPU time"}
    for case, fn in cases.items():
        res[case] = per_call_us(fn, args.calls, args.repeats)
        print(f"{case:36s} {res[case]:7.2f} us", flush=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
