"""NVIDIA backend: NVRTC compiles to a CUBIN for the device's exact sm_XY, the driver API loads and
launches it on torch's current stream. Everything comes from pip wheels (cuda-bindings,
nvidia-cuda-nvrtc, nvidia-cuda-runtime for the fp16/bf16 headers): no CUDA toolkit needed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .base import (
    Backend,
    BackendUnavailable,
    CompiledModule,
    CompileError,
    DeviceInfo,
    KernelResources,
    params_pointer,
)
from .target import Target, cuda_arch_from_capability


def _import_bindings() -> tuple[Any, Any]:
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(
            "the CUDA backend needs cuda-python: pip install 'ikport[cuda]' "
            f"(cuda-bindings, nvidia-cuda-nvrtc, nvidia-cuda-runtime); import failed: {e}"
        ) from e
    return driver, nvrtc


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> str:
    """Folder holding cuda_fp16.h / cuda_bf16.h: the nvidia-cuda-runtime wheel, else a toolkit."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        d = find_nvidia_header_directory("cudart")
        if d and Path(d, "cuda_fp16.h").is_file():
            return str(d)
    except Exception:  # older cuda-pathfinder, or no wheel: try a toolkit below
        pass
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "include", "cuda_fp16.h").is_file():
            return str(Path(root, "include"))
    raise BackendUnavailable(
        "cuda_fp16.h not found: pip install nvidia-cuda-runtime (or set CUDA_HOME to a toolkit)"
    )


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?", re.S)
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Per mangled kernel name: registers, static shared bytes and spill stores from -v output."""
    out: dict[str, KernelResources] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = m.group(1)
            out[current] = KernelResources(spill_bytes=0, shared_bytes=0)
            continue
        if current is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            out[current].spill_bytes = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current].registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[current].shared_bytes = int(s.group(1)) if s else 0
    return out


@functools.lru_cache(maxsize=None)
def _launch_kernel() -> Any:
    """cuLaunchKernel of the driver library that cuda-bindings itself loaded."""
    lib = ctypes.CDLL("libcuda.so.1")
    f = lib.cuLaunchKernel
    u = ctypes.c_uint
    f.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    f.restype = ctypes.c_int
    return f


def _handle(obj: Any) -> int:
    """Raw handle value of a cuda-bindings object (CUfunction, CUstream) or an int."""
    return obj if isinstance(obj, int) else int(obj)


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self) -> None:
        self._driver, self._nvrtc = _import_bindings()
        self._contexts: dict[int, Any] = {}

    # ---- compile ------------------------------------------------------------------------------
    def _nvrtc_check(self, result: Any, what: str) -> Any:
        err = result[0]
        if err != self._nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, msg = self._nvrtc.nvrtcGetErrorString(err)
            raise RuntimeError(f"NVRTC {what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")
        return result[1] if len(result) == 2 else result[1:]

    @functools.lru_cache(maxsize=None)
    def compiler_version(self) -> str:
        major, minor = self._nvrtc_check(self._nvrtc.nvrtcVersion(), "version")
        # The fp16/bf16 headers come from another wheel: their content is part of the identity.
        import hashlib

        inc = Path(cuda_include_dir())
        h = hashlib.sha256()
        for f in ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp"):
            if (inc / f).is_file():
                h.update((inc / f).read_bytes())
        return f"nvrtc {major}.{minor} headers {h.hexdigest()[:12]}"

    def driver_version(self) -> str | None:
        try:  # needs no context, only the driver library (absent on a machine without a GPU)
            err, version = self._driver.cuDriverGetVersion()
        except Exception:  # noqa: BLE001 - any failure means the version is unknown
            return None
        if err != self._driver.CUresult.CUDA_SUCCESS:
            return None
        return f"CUDA {version // 1000}.{version % 1000 // 10}"

    def base_options(self, target: Target) -> list[str]:
        return [
            f"--gpu-architecture={target.arch}",
            "-std=c++17",
            f"-I{cuda_include_dir()}",
            "--ptxas-options=-v",
            "-default-device",
        ] + [f"-D{k}={v}" for k, v in target.defines().items()]

    def compile(
        self, source: str, names: Sequence[str], options: Sequence[str], target: Target
    ) -> CompiledModule:
        nv = self._nvrtc
        opts = self.base_options(target) + list(options)
        prog = self._nvrtc_check(nv.nvrtcCreateProgram(source.encode(), b"ikport.cu", 0, [], []), "create")
        try:
            for n in names:
                self._nvrtc_check(nv.nvrtcAddNameExpression(prog, n.encode()), "add name")
            err = nv.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])[0]
            size = self._nvrtc_check(nv.nvrtcGetProgramLogSize(prog), "log size")
            buf = b" " * size
            nv.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace").rstrip("\x00")
            if err != nv.nvrtcResult.NVRTC_SUCCESS:
                raise CompileError(", ".join(names), target, opts, log)
            size = self._nvrtc_check(nv.nvrtcGetCUBINSize(prog), "cubin size")
            cubin = b" " * size
            self._nvrtc_check((nv.nvrtcGetCUBIN(prog, cubin)[0], None), "get cubin")
            size = self._nvrtc_check(nv.nvrtcGetPTXSize(prog), "ptx size")
            ptx = b" " * size
            self._nvrtc_check((nv.nvrtcGetPTX(prog, ptx)[0], None), "get ptx")
            lowered = {}
            for n in names:
                sym = self._nvrtc_check(nv.nvrtcGetLoweredName(prog, n.encode()), "lowered name")
                lowered[n] = sym.decode() if isinstance(sym, bytes) else str(sym)
        finally:
            nv.nvrtcDestroyProgram(prog)
        by_symbol = parse_ptxas_log(log)
        resources = {n: by_symbol.get(sym, KernelResources()) for n, sym in lowered.items()}
        assembly = ptx.decode(errors="replace").rstrip("\x00")  # PTX: what the shims became
        return CompiledModule(
            target, bytes(cubin), lowered, self.compiler_version(), log, resources, assembly
        )

    # ---- load and launch ----------------------------------------------------------------------
    def _check(self, result: Any, what: str) -> Any:
        err = result[0]
        if err != self._driver.CUresult.CUDA_SUCCESS:
            _, msg = self._driver.cuGetErrorString(err)
            raise RuntimeError(f"CUDA driver: {what} failed: {err.name}: {msg.decode() if msg else ''}")
        return result[1] if len(result) == 2 else None

    def _ensure_context(self, device: int) -> None:
        """Make the device's primary context (the one torch uses) current on this thread."""
        cu = self._driver
        ctx = self._contexts.get(device)
        if ctx is None:
            self._check(cu.cuInit(0), "cuInit")
            dev = self._check(cu.cuDeviceGet(device), "cuDeviceGet")
            ctx = self._check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            self._contexts[device] = ctx
        self._check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def load(self, module: CompiledModule, device: int) -> Any:
        self._ensure_context(device)
        return self._check(self._driver.cuModuleLoadData(module.binary), "cuModuleLoadData")

    def get_function(self, loaded: Any, module: CompiledModule, name: str) -> Any:
        sym = module.lowered_names[name].encode()
        return self._check(self._driver.cuModuleGetFunction(loaded, sym), f"cuModuleGetFunction({name})")

    def set_max_dynamic_shared(self, fn: Any, nbytes: int) -> None:
        attr = self._driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        self._check(self._driver.cuFuncSetAttribute(fn, attr, nbytes), "cuFuncSetAttribute")

    def launch(self, fn, grid, block, shared_bytes, params: ctypes.Structure, stream: int) -> None:
        # The hot path calls the driver's cuLaunchKernel through ctypes: the cuda-bindings wrapper
        # costs tens of microseconds per call in argument conversion (measured on the H100).
        ptr, keep = params_pointer(params)
        err = _launch_kernel()(
            _handle(fn), grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_bytes,
            stream, ptr, None,
        )
        del keep
        if err:
            self._launch_failed(err, grid, block, shared_bytes)

    def bind_launch(self, fn, grid, block, shared_bytes):
        # The argument conversions done once: per call, one ctypes call with the struct's address.
        launch_kernel, handle = _launch_kernel(), _handle(fn)
        gx, gy, gz = grid
        bx, by, bz = block

        def launch(params: ctypes.Structure, stream: int) -> None:
            args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
            err = launch_kernel(handle, gx, gy, gz, bx, by, bz, shared_bytes, stream, args, None)
            if err:
                self._launch_failed(err, grid, block, shared_bytes)

        return launch

    def _launch_failed(self, err: int, grid, block, shared_bytes: int) -> None:
        self._check((self._driver.CUresult(err),), f"cuLaunchKernel grid={grid} block={block} smem={shared_bytes}")

    def alloc_zeroed(self, device: int, nbytes: int) -> int:
        self._ensure_context(device)
        ptr = self._check(self._driver.cuMemAlloc(nbytes), "cuMemAlloc")
        self._check(self._driver.cuMemsetD8(ptr, 0, nbytes), "cuMemsetD8")
        self._check(self._driver.cuCtxSynchronize(), "cuCtxSynchronize")
        return int(ptr)

    def alloc_async(self, device: int, nbytes: int, stream: int) -> int:
        self._ensure_context(device)
        return int(self._check(self._driver.cuMemAllocAsync(nbytes, self._driver.CUstream(stream)),
                               "cuMemAllocAsync"))

    def free_async(self, ptr: int, stream: int) -> None:
        self._check(self._driver.cuMemFreeAsync(ptr, self._driver.CUstream(stream)), "cuMemFreeAsync")

    def occupancy(self, fn: Any, block_threads: int, shared_bytes: int) -> int:
        """Blocks of `fn` that fit on one SM at once."""
        return self._check(
            self._driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, block_threads, shared_bytes),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )

    def max_active_clusters(self, fn: Any, cluster: int, block_threads: int, shared_bytes: int) -> int:
        """Clusters of `fn` resident at once: the GPCs' SM counts decide (a cluster's blocks share
        one GPC), so this is the driver's answer, not SMs / cluster. Clusters past 8 blocks (the
        portable limit) are allowed on `fn` first, for the query and the launches after it."""
        cu = self._driver
        self.set_max_dynamic_shared(fn, shared_bytes)  # the query counts against the kernel's limit
        if cluster > 8:
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
            self._check(cu.cuFuncSetAttribute(fn, attr, 1), "cuFuncSetAttribute")
        cfg = cu.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = cluster, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block_threads, 1, 1
        cfg.sharedMemBytes = shared_bytes
        return self._check(cu.cuOccupancyMaxActiveClusters(fn, cfg), "cuOccupancyMaxActiveClusters")

    @functools.lru_cache(maxsize=None)
    def device_info(self, device: int) -> DeviceInfo:
        import torch

        p = torch.cuda.get_device_properties(device)
        cu = self._driver
        self._ensure_context(device)
        dev = self._check(cu.cuDeviceGet(device), "cuDeviceGet")
        attr = cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        smem = self._check(cu.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute")
        return DeviceInfo(
            name=p.name,
            arch=cuda_arch_from_capability(p.major, p.minor),
            sm_count=p.multi_processor_count,
            max_smem_per_block=int(smem),
            warp_size=32,
            l2_bytes=int(getattr(p, "L2_cache_size", 0)),
        )
