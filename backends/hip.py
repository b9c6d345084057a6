"""AMD backend: hipRTC compiles a code object for the device's gfx target, HIP's module API loads
and launches it on torch's current stream; both through hip-python (`pip install hip-python`,
the release matching the installed ROCm). Registers, LDS and scratch come from the code object's
metadata (backends/amd_metadata.py).

`compile_in_subprocess` runs the same hipRTC compile in a child process. CI needs it: it makes
`libhiprtc.so` resolvable for Debian's HIP 5.2 (whose hipRTC lives inside libamdhip64.so.5), which
must happen before the process starts, and an old comgr asked for a target it does not know
(gfx942, gfx1100 on 5.2) aborts its whole process.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import amd_metadata
from .cache import default_cache_dir
from .base import (
    Backend,
    BackendUnavailable,
    CompiledModule,
    CompileError,
    DeviceInfo,
    params_pointer,
)
from .target import Target


def _import_bindings() -> tuple[Any, Any]:
    try:
        from hip import hip, hiprtc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(
            "the HIP backend needs hip-python: pip install 'ikport[hip]' (the hip-python release "
            f"that matches your ROCm); import failed: {e}"
        ) from e
    try:  # hip-python opens libhiprtc.so at the first call, not at import
        hiprtc.hiprtcVersion()
    except RuntimeError as e:
        raise BackendUnavailable(
            f"hip-python cannot open the hipRTC library ({e}); add ROCm's lib folder to "
            "LD_LIBRARY_PATH (a HIP without a separate libhiprtc.so needs a libhiprtc.so symlink "
            "to libamdhip64.so: see hiprtc_library_dir)"
        ) from e
    return hip, hiprtc


def _comgr_version() -> str:
    """comgr does hipRTC's compiling and carries the device libraries: its version names both."""
    for lib in ("libamd_comgr.so.3", "libamd_comgr.so.2", "libamd_comgr.so"):
        try:
            get = ctypes.CDLL(lib).amd_comgr_get_version
        except (OSError, AttributeError):
            continue
        major, minor = ctypes.c_size_t(), ctypes.c_size_t()
        get(ctypes.byref(major), ctypes.byref(minor))
        return f"{major.value}.{minor.value}"
    return "unknown"


class HipBackend(Backend):
    name = "hip"

    def __init__(self) -> None:
        self._hip, self._rtc = _import_bindings()
        self._version: str | None = None
        self._devices: dict[int, DeviceInfo] = {}

    # ---- compile ------------------------------------------------------------------------------
    def _rtc_check(self, result: tuple, what: str) -> Any:
        err = result[0]
        if err != self._rtc.hiprtcResult.HIPRTC_SUCCESS:
            raise RuntimeError(f"hipRTC {what} failed: {getattr(err, 'name', err)}")
        return result[1] if len(result) == 2 else result[1:]

    def compiler_version(self) -> str:
        if self._version is None:
            major, minor = self._rtc_check(self._rtc.hiprtcVersion(), "version")
            err, v = self._hip.hipRuntimeGetVersion()  # major * 10^7 + minor * 10^5 + patch
            ok = err == self._hip.hipError_t.hipSuccess
            hip = f"{v // 10_000_000}.{v // 100_000 % 100}.{v % 100_000}" if ok else "unknown"
            self._version = f"hiprtc {major}.{minor} hip {hip} comgr {_comgr_version()}"
        return self._version

    def driver_version(self) -> str | None:
        err, version = self._hip.hipDriverGetVersion()
        return f"HIP {version}" if err == self._hip.hipError_t.hipSuccess else None

    def base_options(self, target: Target) -> list[str]:
        return [f"--offload-arch={target.arch}", "-O3", "-std=c++17"] + [
            f"-D{k}={v}" for k, v in target.defines().items()
        ]

    def compile(
        self, source: str, names: Sequence[str], options: Sequence[str], target: Target
    ) -> CompiledModule:
        rtc = self._rtc
        opts = self.base_options(target) + list(options)
        text = source + amd_metadata.probe_source(names)
        prog = self._rtc_check(
            rtc.hiprtcCreateProgram(text.encode(), b"ikport.hip", 0, [], []), "create"
        )
        try:
            for n in names:
                self._rtc_check(rtc.hiprtcAddNameExpression(prog, n.encode()), "add name")
            err = rtc.hiprtcCompileProgram(prog, len(opts), [o.encode() for o in opts])[0]
            log = self._program_log(prog)
            if err != rtc.hiprtcResult.HIPRTC_SUCCESS:
                raise CompileError(", ".join(names) or "<module>", target, opts, log)
            size = self._rtc_check(rtc.hiprtcGetCodeSize(prog), "code size")
            buf = bytearray(size)
            self._rtc_check((rtc.hiprtcGetCode(prog, buf)[0], None), "get code")
            code = bytes(buf)
            lowered = self._lowered_names(prog, names, code)
        finally:
            rtc.hiprtcDestroyProgram(prog.createRef())
        resources = amd_metadata.resources_by_name(code, lowered)
        return CompiledModule(target, code, lowered, self.compiler_version(), log, resources)

    def _program_log(self, prog: Any) -> str:
        size = self._rtc_check(self._rtc.hiprtcGetProgramLogSize(prog), "log size")
        buf = bytearray(max(size, 1))
        self._rtc.hiprtcGetProgramLog(prog, buf)
        return buf.decode(errors="replace").rstrip("\x00")

    def _lowered_names(self, prog: Any, names: Sequence[str], code: bytes) -> dict[str, str]:
        """hiprtcGetLoweredName where it answers; HIP 5.x refuses expressions that use aliases
        (see amd_metadata), so the probes appended to the source answer for those."""
        lowered, missing = {}, []
        for n in names:
            err, sym = self._rtc.hiprtcGetLoweredName(prog, n.encode())
            if err == self._rtc.hiprtcResult.HIPRTC_SUCCESS and sym is not None:
                lowered[n] = sym.decode()
            else:
                missing.append(n)
        if missing:
            from_probes = amd_metadata.lowered_from_probes(code, names)
            lowered.update({n: from_probes[n] for n in missing})
        return lowered

    # ---- load and launch ----------------------------------------------------------------------
    def _check(self, result: tuple, what: str) -> Any:
        err = result[0]
        if err != self._hip.hipError_t.hipSuccess:
            _, msg = self._hip.hipGetErrorString(err)
            raise RuntimeError(f"HIP: {what} failed: {getattr(err, 'name', err)}: {msg}")
        return result[1] if len(result) == 2 else None

    def load(self, module: CompiledModule, device: int) -> Any:
        # torch (ROCm) uses the runtime's primary context: making `device` current is enough. The
        # thread's device is put back after: a launch must happen with its stream's device current.
        previous = self._check(self._hip.hipGetDevice(), "hipGetDevice")
        self._check(self._hip.hipSetDevice(device), "hipSetDevice")
        try:
            return self._check(self._hip.hipModuleLoadData(module.binary), "hipModuleLoadData")
        finally:
            self._hip.hipSetDevice(previous)

    def get_function(self, loaded: Any, module: CompiledModule, name: str) -> Any:
        sym = module.lowered_names[name].encode()
        return self._check(
            self._hip.hipModuleGetFunction(loaded, sym), f"hipModuleGetFunction({name})"
        )

    def alloc_zeroed(self, device: int, nbytes: int) -> int:
        previous = self._check(self._hip.hipGetDevice(), "hipGetDevice")
        self._check(self._hip.hipSetDevice(device), "hipSetDevice")
        try:
            ptr = self._check(self._hip.hipMalloc(nbytes), "hipMalloc")
            self._check(self._hip.hipMemset(ptr, 0, nbytes), "hipMemset")
            self._check(self._hip.hipDeviceSynchronize(), "hipDeviceSynchronize")
            return int(ptr)
        finally:
            self._hip.hipSetDevice(previous)

    def alloc_async(self, device: int, nbytes: int, stream: int) -> int:
        previous = self._check(self._hip.hipGetDevice(), "hipGetDevice")
        self._check(self._hip.hipSetDevice(device), "hipSetDevice")
        try:
            return int(self._check(self._hip.hipMallocAsync(nbytes, stream), "hipMallocAsync"))
        finally:
            self._hip.hipSetDevice(previous)

    def free_async(self, ptr: int, stream: int) -> None:
        self._check(self._hip.hipFreeAsync(ptr, stream), "hipFreeAsync")

    def set_max_dynamic_shared(self, fn: Any, nbytes: int) -> None:
        # AMD needs no opt-in: a launch may use all the LDS of a workgroup. ROCm 6+ still records
        # and range-checks the value for module functions; HIP 5 knows only hipcc-registered
        # kernels here (hipErrorInvalidDeviceFunction), so that answer is ignored.
        attr = self._hip.hipFuncAttribute.hipFuncAttributeMaxDynamicSharedMemorySize
        err = self._hip.hipFuncSetAttribute(fn, attr, nbytes)[0]
        if err != self._hip.hipError_t.hipErrorInvalidDeviceFunction:
            self._check((err,), f"hipFuncSetAttribute(max dynamic LDS = {nbytes})")

    def launch(
        self,
        fn: Any,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_bytes: int,
        params: ctypes.Structure,
        stream: int,
    ) -> None:
        ptr, keep = params_pointer(params)
        err = self._hip.hipModuleLaunchKernel(
            fn,
            grid[0],
            grid[1],
            grid[2],
            block[0],
            block[1],
            block[2],
            shared_bytes,
            stream,
            ptr,
            None,
        )[0]
        del keep
        if err != self._hip.hipError_t.hipSuccess:
            self._check(
                (err,), f"hipModuleLaunchKernel grid={grid} block={block} smem={shared_bytes}"
            )

    def device_info(self, device: int) -> DeviceInfo:
        if device not in self._devices:
            self._devices[device] = self._query_device(device)
        return self._devices[device]

    def _query_device(self, device: int) -> DeviceInfo:
        import torch

        p = torch.cuda.get_device_properties(device)
        attrs = self._hip.hipDeviceAttribute_t

        def attr(a: Any) -> int:
            return int(
                self._check(
                    self._hip.hipDeviceGetAttribute(a, device), f"hipDeviceGetAttribute({a})"
                )
            )

        return DeviceInfo(
            name=p.name,
            arch=p.gcnArchName.split(":")[0],  # "gfx942:sramecc+:xnack-" -> "gfx942"
            sm_count=p.multi_processor_count,
            max_smem_per_block=attr(attrs.hipDeviceAttributeMaxSharedMemoryPerBlock),
            warp_size=attr(attrs.hipDeviceAttributeWarpSize),
            l2_bytes=int(getattr(p, "L2_cache_size", 0)),
        )


# ---- compiling in a child process -------------------------------------------------------------
def amdhip64_path() -> Path | None:
    """The HIP runtime library (hipRTC lives inside it on HIP 5.2), or None."""
    roots = [os.environ.get("ROCM_PATH"), "/opt/rocm", "/usr"]
    dirs = [Path(r, "lib") for r in roots if r] + [
        Path("/usr/lib/x86_64-linux-gnu"),
        Path("/usr/lib64"),
    ]
    for d in dirs:
        for name in ("libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5"):
            if (d / name).exists():
                return d / name
    return None


def hiprtc_library_dir() -> str | None:
    """A folder to put on LD_LIBRARY_PATH so `libhiprtc.so` resolves, or None when it already
    does (ROCm 5.3+ ships libhiprtc.so) or no HIP library is installed. Debian's HIP 5.2 keeps
    hipRTC inside libamdhip64.so.5: a symlink named libhiprtc.so stands in for the library."""
    try:
        ctypes.CDLL("libhiprtc.so")
        return None
    except OSError:
        pass
    amdhip = amdhip64_path()
    if amdhip is None:
        return None
    folder = cache_root() / "hiprtc-lib"
    link = folder / "libhiprtc.so"
    if not (link.is_symlink() and Path(os.readlink(link)) == amdhip.resolve()):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".libhiprtc.so.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(amdhip.resolve())
        os.replace(tmp, link)  # atomic: concurrent processes see an old or a new link, never none
    return str(folder)


def cache_root() -> Path:
    """ikport's cache folder (IKPORT_CACHE_DIR; backends/cache.py), for hipRTC's library link."""
    return default_cache_dir()


# The child imports this file's folder as a package of its own name, so it starts without the
# top-level ikport package (and torch), and no other "backends" package can stand in for it.
_CHILD = (
    "import sys, types; pkg = types.ModuleType('_ikport_amd'); pkg.__path__ = [{folder!r}]; "
    "sys.modules['_ikport_amd'] = pkg; from _ikport_amd.hip import _child_main; _child_main()"
)


def compile_in_subprocess(
    source: str, names: Sequence[str], options: Sequence[str], arch: str, timeout: float = 120
) -> CompiledModule:
    """HipBackend().compile in a child process; raises CompileError as compile does, and
    RuntimeError when the child dies (an old comgr aborts on targets it does not know)."""
    target = Target(arch)
    env = dict(os.environ)
    libdir = hiprtc_library_dir()
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    request = json.dumps(
        {"source": source, "names": list(names), "options": list(options), "arch": arch}
    )
    code = _CHILD.format(folder=str(Path(__file__).resolve().parent))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            input=request,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"hipRTC compile for {arch} took over {timeout} s; child killed") from e
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise RuntimeError(
            f"hipRTC was killed by {sig} compiling for {arch}: the installed hipRTC/comgr cannot "
            f"build {arch} (an old comgr aborts on targets it does not know; use a ROCm that "
            f"supports {arch}, or backends.amd_offline.AmdOfflineCompiler to check it offline)\n"
            f"{proc.stderr[-2000:]}"
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"hipRTC child for {arch} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    reply = json.loads(lines[-1])  # the last line is the reply; the compiler may print above it
    if reply["status"] == "unavailable":
        raise BackendUnavailable(reply["message"])
    if reply["status"] == "compile_error":
        raise CompileError(reply["kernel"], target, reply["options"], reply["log"])
    binary = base64.b64decode(reply["binary"])
    lowered = reply["lowered_names"]
    return CompiledModule(
        target,
        binary,
        lowered,
        reply["compiler"],
        reply["log"],
        amd_metadata.resources_by_name(binary, lowered),
    )


def _child_main() -> None:
    """The child side of compile_in_subprocess: a JSON request on stdin, one JSON line out."""
    req = json.loads(sys.stdin.read())
    try:
        m = HipBackend().compile(req["source"], req["names"], req["options"], Target(req["arch"]))
        reply = {
            "status": "ok",
            "binary": base64.b64encode(m.binary).decode(),
            "log": m.log,
            "lowered_names": m.lowered_names,
            "compiler": m.compiler,
        }
    except BackendUnavailable as e:
        reply = {"status": "unavailable", "message": str(e)}
    except CompileError as e:
        reply = {"status": "compile_error", "kernel": e.kernel, "options": e.options, "log": e.log}
    sys.stdout.write("\n" + json.dumps(reply) + "\n")
