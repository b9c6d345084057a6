"""The backend interface: compile source text for a target, load it, launch its kernels.

Two implementations: backends/cuda.py (NVRTC + driver API through cuda-python) and
backends/hip.py (hipRTC + module API through hip-python). backends/amd_offline.py is a third,
compile-only route (Debian's clang-19) used to check AMD targets the installed hipRTC cannot build.
"""

from __future__ import annotations

import abc
import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .target import Target


@dataclass
class KernelResources:
    """What the compiler reports for one kernel; None where the toolchain does not say."""

    registers: int | None = None  # per thread (NVIDIA registers, AMD VGPRs)
    agprs: int | None = None  # CDNA accumulation registers
    sgprs: int | None = None  # AMD scalar registers
    shared_bytes: int | None = None  # static shared memory / LDS
    spill_bytes: int | None = None  # spill stores (NVIDIA) or scratch (AMD) bytes
    wavefront_size: int | None = None  # AMD code-object metadata


@dataclass
class CompiledModule:
    """A compiled code object plus what the caller needs to find and judge its kernels."""

    target: Target
    binary: bytes  # CUBIN (NVIDIA) or code object (AMD)
    lowered_names: dict[str, str]  # name expression -> symbol in the binary
    compiler: str  # compiler id and version, e.g. "nvrtc 13.0"
    log: str = ""
    resources: dict[str, KernelResources] = field(default_factory=dict)  # by name expression
    assembly: str = ""  # SASS/ISA text when the route produces it (for instruction checks)


class CompileError(RuntimeError):
    """A kernel failed to compile: says which kernel, for which target, with which options."""

    def __init__(self, kernel: str, target: Target, options: Sequence[str], log: str):
        self.kernel, self.target, self.options, self.log = kernel, target, list(options), log
        super().__init__(
            f"compiling {kernel} for {target.arch} failed\n"
            f"options: {' '.join(self.options)}\ncompiler log:\n{log.strip()}"
        )


class BackendUnavailable(RuntimeError):
    """The vendor package a backend needs is not installed (or finds no driver/library)."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    arch: str
    sm_count: int  # SMs (NVIDIA) or CUs (AMD)
    max_smem_per_block: int  # opt-in maximum, bytes
    warp_size: int
    l2_bytes: int


class Backend(abc.ABC):
    """Compile, load and launch. One instance per vendor per process."""

    name: str  # "cuda" or "hip"

    @abc.abstractmethod
    def compiler_version(self) -> str:
        """Compiler id + version; part of every cache key."""

    @abc.abstractmethod
    def compile(
        self, source: str, names: Sequence[str], options: Sequence[str], target: Target
    ) -> CompiledModule:
        """Compile `source` for `target`, keeping the kernels named by `names` (C++ name
        expressions such as "attn_decode_split<ik::half_t, 128, 4, false, 128>")."""

    @abc.abstractmethod
    def load(self, module: CompiledModule, device: int) -> Any:
        """Load a compiled module on `device`; returns an opaque module handle."""

    @abc.abstractmethod
    def get_function(self, loaded: Any, module: CompiledModule, name: str) -> Any:
        """The kernel `name` (a name expression given to compile) of a loaded module."""

    @abc.abstractmethod
    def set_max_dynamic_shared(self, fn: Any, nbytes: int) -> None:
        """Allow `fn` to launch with `nbytes` of dynamic shared memory (above 48 KiB)."""

    @abc.abstractmethod
    def launch(
        self,
        fn: Any,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_bytes: int,
        params: ctypes.Structure,
        stream: int,
    ) -> None:
        """Launch `fn` with one by-value parameter struct on `stream` (a raw stream handle)."""

    @abc.abstractmethod
    def device_info(self, device: int) -> DeviceInfo:
        """Arch string, SM/CU count, shared-memory limit, warp size of `device`."""

    def bind_launch(
        self, fn: Any, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int
    ) -> Callable[[ctypes.Structure, int], None]:
        """`launch` with everything but the parameters and the stream fixed: the per-call host
        path of a cached launch plan (a backend may prepare the driver call once here)."""

        def launch(params: ctypes.Structure, stream: int) -> None:
            self.launch(fn, grid, block, shared_bytes, params, stream)

        return launch

    def driver_version(self) -> str | None:
        """The GPU driver's version as the vendor's runtime reports it, or None where unknown."""
        return None

    def alloc_zeroed(self, device: int, nbytes: int) -> int:
        """A zero-filled device allocation made outside torch's allocator (kept for the process's
        life): state that must survive CUDA-graph pools, such as split-K arrival counters."""
        raise NotImplementedError

    def alloc_async(self, device: int, nbytes: int, stream: int) -> int:
        """A stream-ordered device allocation outside torch's allocator (the driver's pool), for
        per-stream scratch that must stay out of CUDA-graph pools; free it with free_async."""
        raise NotImplementedError

    def free_async(self, ptr: int, stream: int) -> None:
        """Release an alloc_async allocation once the work queued on `stream` is done with it."""
        raise NotImplementedError

    def occupancy(self, fn: Any, block_threads: int, shared_bytes: int) -> int | None:
        """Blocks of `fn` resident on one SM/CU at once, or None where the backend cannot say."""
        return None

    def max_active_clusters(self, fn: Any, cluster: int, block_threads: int, shared_bytes: int) -> int:
        """Clusters of `fn` (compiled with `cluster` blocks a cluster) resident on the device at
        once; 0 where the backend has no clusters."""
        return 0

    def target_for(self, device: int) -> Target:
        return Target(self.device_info(device).arch)


def params_pointer(params: ctypes.Structure) -> tuple[int, Any]:
    """The void** the launch APIs want for a single struct argument, plus the object that keeps
    it alive until the launch returns (both drivers copy the arguments at launch time)."""
    arr = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    return ctypes.addressof(arr), arr
