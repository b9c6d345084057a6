"""Targets: which GPU a kernel is built for, and the hardware facts the kernels and configs use.

A target is a frozen value; everything that differs between GPU generations lives in ARCH_TABLE,
never in an `if arch == ...` in the code that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchFacts:
    vendor: str  # "cuda" or "hip"
    warp_size: int  # threads that execute in lockstep: 32 (NVIDIA, RDNA) or 64 (CDNA)
    max_smem_per_block: int  # bytes of shared memory / LDS one block may use (opt-in maximum)
    max_smem_per_sm: int  # bytes per SM / CU
    regs_per_sm: int  # 32-bit registers (NVIDIA) or VGPRs per SIMD x lanes (AMD), for occupancy
    max_threads_per_sm: int
    matrix_unit: str  # what the mma shim becomes: "mma.sync", "mfma", "wmma"
    async_copy: bool  # cp.async present
    clusters: bool = False  # block clusters with distributed shared memory (sm_90+)


ARCH_TABLE: dict[str, ArchFacts] = {
    "sm_80": ArchFacts("cuda", 32, 163 * 1024, 164 * 1024, 65536, 2048, "mma.sync", True),
    "sm_86": ArchFacts("cuda", 32, 99 * 1024, 100 * 1024, 65536, 1536, "mma.sync", True),
    "sm_89": ArchFacts("cuda", 32, 99 * 1024, 100 * 1024, 65536, 1536, "mma.sync", True),
    "sm_90": ArchFacts("cuda", 32, 227 * 1024, 228 * 1024, 65536, 2048, "mma.sync", True, True),
    "sm_90a": ArchFacts("cuda", 32, 227 * 1024, 228 * 1024, 65536, 2048, "mma.sync", True, True),
    # CDNA2 (MI200), CDNA3 (MI300): wave64, 64 KiB LDS per CU, 512 VGPRs x 64 lanes per SIMD.
    "gfx90a": ArchFacts("hip", 64, 64 * 1024, 64 * 1024, 4 * 512 * 64, 2048, "mfma", False),
    "gfx942": ArchFacts("hip", 64, 64 * 1024, 64 * 1024, 4 * 512 * 64, 2048, "mfma", False),
    # RDNA3 (RX 7900): wave32, 64 KiB LDS per workgroup (128 KiB per WGP).
    "gfx1100": ArchFacts("hip", 32, 64 * 1024, 128 * 1024, 4 * 1536 * 32, 2048, "wmma", False),
}

# The targets `python -m ikport compile --target all` and CI build for.
ALL_TARGETS = ("sm_80", "sm_89", "sm_90", "gfx90a", "gfx942", "gfx1100")


@dataclass(frozen=True)
class Target:
    """One GPU instruction set: `arch` is "sm_90", "gfx942", ...; facts come from ARCH_TABLE."""

    arch: str

    def __post_init__(self) -> None:
        if self.arch not in ARCH_TABLE:
            known = ", ".join(sorted(ARCH_TABLE))
            raise ValueError(f"unknown target {self.arch!r}; known targets: {known}")

    @property
    def facts(self) -> ArchFacts:
        return ARCH_TABLE[self.arch]

    @property
    def vendor(self) -> str:
        return self.facts.vendor

    @property
    def warp_size(self) -> int:
        return self.facts.warp_size

    def defines(self) -> dict[str, str]:
        """The -D facts every kernel of this target is compiled with (see portability/ik.cuh)."""
        sm = int(self.arch[3:5]) * 10 if self.vendor == "cuda" else 0
        return {"IK_WARP_SIZE": str(self.warp_size), "IK_ARCH_SM": str(sm)}

    def __str__(self) -> str:
        return self.arch


def cuda_arch_from_capability(major: int, minor: int) -> str:
    return f"sm_{major}{minor}"
