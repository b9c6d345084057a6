"""Compile-only AMD route: Debian's clang-19 builds a code object and its ISA text for any AMD
target, on a machine with no GPU and no full ROCm (CI). The installed hipRTC may not know a target
(HIP 5.2's comgr aborts on gfx942/gfx1100); clang-19 does, given the ROCm device libraries.

It checks that every kernel compiles for every AMD target and reads registers, LDS, scratch and
instruction counts from the result. Those numbers are close estimates of what a current ROCm
emits, not the same numbers. Kernel symbols come from probe kernels (backends/amd_metadata.py).

Needs: clang++-19 (apt: clang-19 lld-19), HIP headers (libamdhip64-dev) and the ROCm device
libraries (rocm-device-libs); ci/setup-amd.sh installs them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import amd_metadata
from .base import CompiledModule, CompileError
from .hip import cache_root
from .target import ARCH_TABLE, Target

CLANG = "clang++-19"
_STOCK_BITCODE_DIRS = (
    "amdgcn/bitcode",
    "lib/x86_64-linux-gnu/amdgcn/bitcode",
    "lib/amdgcn/bitcode",
)


def _rocm_roots() -> list[str]:
    """ROCM_PATH (read at use), a ROCm install, then Debian's packages under /usr."""
    return [r for r in (os.environ.get("ROCM_PATH"), "/opt/rocm", "/usr") if r]


def rocm_root() -> Path | None:
    """The prefix holding include/hip/hip_runtime.h (clang's --rocm-path)."""
    for root in _rocm_roots():
        if Path(root, "include/hip/hip_runtime.h").is_file():
            return Path(root)
    return None


def stock_bitcode_dir() -> Path | None:
    """Where the ROCm device libraries (ocml.bc, ockl.bc, oclc_*.bc) are installed."""
    for root in _rocm_roots():
        for sub in _STOCK_BITCODE_DIRS:
            if Path(root, sub, "ockl.bc").is_file():
                return Path(root, sub)
    return None


def isa_version(arch: str) -> tuple[str, int]:
    """gfx942 -> ("942", 9402): the oclc_isa_version_<suffix>.bc file and the value it holds
    (major * 1000 + minor * 100 + stepping; the stepping digit is hex, as in gfx90a -> 9010)."""
    suffix = arch.removeprefix("gfx")
    return suffix, int(suffix[:-2]) * 1000 + int(suffix[-2]) * 100 + int(suffix[-1], 16)


_ISA_IR = (
    'target triple = "amdgcn-amd-amdhsa"\n'
    "@__oclc_ISA_version = linkonce_odr protected local_unnamed_addr addrspace(4) "
    "constant i32 {value}, align 4\n"
)


class AmdOfflineCompiler:
    """clang-19 for any AMD target; compile only (its code objects are not loaded here)."""

    def __init__(self, clang: str = CLANG) -> None:
        self.clang = clang

    def missing(self) -> str | None:
        """What this machine lacks for the offline route, or None when it has everything."""
        clang = shutil.which(self.clang)
        if not clang:
            return f"{self.clang} (apt: clang-19)"
        # clang links AMD code objects with the ld.lld of its own LLVM.
        if not (Path(clang).resolve().parent / "ld.lld").exists():
            return "ld.lld beside clang (apt: lld-19)"
        if rocm_root() is None:
            return "the HIP headers (apt: libamdhip64-dev)"
        if stock_bitcode_dir() is None:
            return "the ROCm device libraries (apt: rocm-device-libs)"
        return None

    @classmethod
    def available(cls, clang: str = CLANG) -> bool:
        """Whether `clang` (default clang++-19), ld.lld, the HIP headers and the device libraries
        are all installed; `missing()` says which is not."""
        return cls(clang).missing() is None

    def _require(self) -> tuple[str, Path, Path]:
        """clang's path, the ROCm prefix and the stock device-library folder, or a clear error."""
        missing = self.missing()
        if missing:
            raise RuntimeError(f"the offline AMD compiler needs {missing}: run ci/setup-amd.sh")
        clang, root, stock = shutil.which(self.clang), rocm_root(), stock_bitcode_dir()
        assert clang and root and stock  # checked by missing()
        return clang, root, stock

    def compiler_version(self) -> str:
        return _version(*self._require())

    def device_lib_dir(self) -> Path:
        """A folder with every stock device library plus the oclc_isa_version_*.bc files an old
        ROCm lacks for the targets in ARCH_TABLE (each is one line of LLVM IR), made once."""
        clang, _, stock = self._require()
        folder = cache_root() / "amd-devlibs"
        folder.mkdir(parents=True, exist_ok=True)
        for f in stock.glob("*.bc"):
            _replace_symlink(folder / f.name, f.resolve())
        for arch, facts in ARCH_TABLE.items():
            if facts.vendor == "hip":
                suffix, value = isa_version(arch)
                if not (folder / f"oclc_isa_version_{suffix}.bc").exists():
                    _write_isa_bitcode(clang, folder / f"oclc_isa_version_{suffix}.bc", value)
        return folder

    def options(self, target: Target) -> list[str]:
        _, root, _ = self._require()
        return [
            "-x",
            "hip",
            "--cuda-device-only",
            f"--offload-arch={target.arch}",
            "-O3",
            "-std=c++17",
            "-mcode-object-version=5",
            f"--rocm-path={root}",
            f"--hip-device-lib-path={self.device_lib_dir()}",
            "--no-gpu-bundle-output",
        ] + [f"-D{k}={v}" for k, v in target.defines().items()]

    def compile(
        self, source: str, names: Sequence[str], options: Sequence[str], target: Target
    ) -> CompiledModule:
        """Code object + ISA text (-save-temps keeps the .s clang makes on the way)."""
        clang, _, _ = self._require()
        opts = self.options(target) + list(options)
        with tempfile.TemporaryDirectory(prefix="ikport-amd-") as tmp:
            Path(tmp, "ikport.hip").write_text(source + amd_metadata.probe_source(names))
            proc = subprocess.run(
                [clang, *opts, "-save-temps", "-o", "ikport.co", "ikport.hip"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if proc.returncode != 0:
                raise CompileError(", ".join(names) or "<module>", target, opts, proc.stderr)
            binary = Path(tmp, "ikport.co").read_bytes()
            assembly = "\n".join(p.read_text() for p in sorted(Path(tmp).glob("*.s")))
        lowered = amd_metadata.lowered_from_probes(binary, names)
        return CompiledModule(
            target,
            binary,
            lowered,
            self.compiler_version(),
            proc.stderr,
            amd_metadata.resources_by_name(binary, lowered),
            assembly,
        )


@functools.cache
def _version(clang: str, root: Path, stock: Path) -> str:
    first = subprocess.run([clang, "--version"], capture_output=True, text=True, check=True).stdout
    # The device libraries and HIP headers decide the code as much as clang does.
    h = hashlib.sha256()
    for f in sorted(stock.glob("*.bc")):
        h.update(f.name.encode() + f.read_bytes())
    version_h = root / "include/hip/hip_version.h"
    if version_h.is_file():
        h.update(version_h.read_bytes())
    return f"{first.splitlines()[0].strip()} devlibs+hip {h.hexdigest()[:12]}"


def _replace_symlink(link: Path, to: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == to:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(to)
    os.replace(tmp, link)  # atomic: a concurrent compile sees the old link or the new one


def _write_isa_bitcode(clang: str, out: Path, value: int) -> None:
    """clang turns one line of IR into bitcode: no llvm-as needed."""
    with tempfile.TemporaryDirectory(prefix="ikport-isa-") as tmp:
        ll, bc = Path(tmp, "isa.ll"), Path(tmp, "isa.bc")
        ll.write_text(_ISA_IR.format(value=value))
        subprocess.run(
            [
                clang,
                "-x",
                "ir",
                "-c",
                "-emit-llvm",
                "-target",
                "amdgcn-amd-amdhsa",
                "-nogpulib",
                str(ll),
                "-o",
                str(bc),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        tmp_out = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.copyfile(bc, tmp_out)
        os.replace(tmp_out, out)
