"""Targets: which GPU a kernel is built for, and every hardware fact ikport uses, in one table.

A target is a frozen value; everything that differs between GPU generations lives in ARCH_TABLE
(per instruction set) or KNOWN_DEVICES (per product: measured bandwidth, L2), never in an
`if arch == ...` elsewhere. The planner, the INT4 layout choice, the portability report and the
benchmark harness read these tables; the kernels get the facts they need as -D values
(Target.defines).
"""

from __future__ import annotations

from dataclasses import dataclass

# What each matrix unit's fragments look like to the INT4 packer (ikport/int4.py's layouts).
MATRIX_LAYOUTS = {"mma.sync": "nv_m16n8k16", "mfma": "amd_mfma16", "wmma": "amd_wmma16_w32"}
# The shim portability/mma.cuh compiles for each AMD matrix unit (passed as a -D by defines()).
_AMD_MATRIX_DEFINES = {"mfma": "IK_MMA_AMD_MFMA_16X16X16", "wmma": "IK_MMA_AMD_WMMA_W32"}


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
    max_blocks_per_sm: int = 32  # resident blocks per SM (NVIDIA's occupancy limit)
    # AMD register file per SIMD (LLVM AMDGPUBaseInfo): VGPRs per lane (CDNA2/3: one file shared
    # with the AGPRs), the allocation granule of a wave's registers, wave slots, SGPRs (None: no
    # limit, RDNA). Zero on NVIDIA.
    simd_vgprs: int = 0
    vgpr_granule: int = 0
    max_waves_per_simd: int = 0
    simd_sgprs: int | None = None

    @property
    def matrix_layout(self) -> str:
        """The INT4 weight layout whose B fragments this target's matrix unit reads."""
        return MATRIX_LAYOUTS[self.matrix_unit]

    @property
    def c_is_a(self) -> bool:
        """The matrix unit's accumulator fragment can be fed back as an A operand in registers
        (NVIDIA's mma.sync: ik::mma::kCIsA); AMD's go through a per-warp scratch."""
        return self.matrix_unit == "mma.sync"


_CDNA = dict(vendor="hip", warp_size=64, max_smem_per_block=64 * 1024, max_smem_per_sm=64 * 1024,
             regs_per_sm=4 * 512 * 64, max_threads_per_sm=2048, matrix_unit="mfma", async_copy=False,
             simd_vgprs=512, vgpr_granule=8, max_waves_per_simd=8, simd_sgprs=800)
# RDNA3 wave32, WGP mode: 4 SIMD32 per WGP share 128 KiB of LDS (64 KiB per workgroup); the "SM"
# of these facts is the WGP.
_RDNA3 = dict(vendor="hip", warp_size=32, max_smem_per_block=64 * 1024, max_smem_per_sm=128 * 1024,
              regs_per_sm=4 * 1536 * 32, max_threads_per_sm=2048, matrix_unit="wmma", async_copy=False,
              simd_vgprs=1536, vgpr_granule=24, max_waves_per_simd=16, simd_sgprs=None)

ARCH_TABLE: dict[str, ArchFacts] = {
    "sm_80": ArchFacts("cuda", 32, 163 * 1024, 164 * 1024, 65536, 2048, "mma.sync", True, max_blocks_per_sm=32),
    "sm_86": ArchFacts("cuda", 32, 99 * 1024, 100 * 1024, 65536, 1536, "mma.sync", True, max_blocks_per_sm=16),
    "sm_89": ArchFacts("cuda", 32, 99 * 1024, 100 * 1024, 65536, 1536, "mma.sync", True, max_blocks_per_sm=24),
    "sm_90": ArchFacts("cuda", 32, 227 * 1024, 228 * 1024, 65536, 2048, "mma.sync", True, True, 32),
    "sm_90a": ArchFacts("cuda", 32, 227 * 1024, 228 * 1024, 65536, 2048, "mma.sync", True, True, 32),
    # CDNA2 (MI200) and CDNA3 (MI300): wave64, 64 KiB LDS per CU, 512 VGPRs x 64 lanes per SIMD.
    "gfx90a": ArchFacts(**_CDNA),
    "gfx940": ArchFacts(**_CDNA),
    "gfx941": ArchFacts(**_CDNA),
    "gfx942": ArchFacts(**_CDNA),
    # RDNA3 (RX 7900 and its smaller siblings).
    "gfx1100": ArchFacts(**_RDNA3),
    "gfx1101": ArchFacts(**_RDNA3),
    "gfx1102": ArchFacts(**_RDNA3),
}

# The targets `python -m ikport compile --target all` and CI build for.
ALL_TARGETS = ("sm_80", "sm_89", "sm_90", "gfx90a", "gfx942", "gfx1100")


@dataclass(frozen=True)
class DeviceFacts:
    """A product's facts beyond its instruction set, for result files that name only the device."""

    arch: str
    read_GBps: float | None = None  # measured streaming-read ceiling (16-byte reads over 1 GB)
    l2_bytes: int | None = None
    fp16_TFLOPs: float | None = None  # dense fp16/bf16 matrix-unit rate, datasheet (no sparsity)


# Device-name fragment -> facts, first match wins (so "H100" must not shadow a longer name).
# read_GBps: the lent H100 80GB HBM3 measured 3087 GB/s (docs/benchmarks.md); others unmeasured.
# fp16_TFLOPs: the H100 SXM5 datasheet's 1979 TFLOP/s fp16 tensor rate is with 2:4 sparsity; dense
# is half (the PCIe card's is lower; "H100" covers both, as it does for the read ceiling).
KNOWN_DEVICES: tuple[tuple[str, DeviceFacts], ...] = (
    ("H100", DeviceFacts("sm_90", 3087.0, 50 * 1024 * 1024, 989.0)),
    ("H200", DeviceFacts("sm_90", None, 60 * 1024 * 1024)),
    ("H800", DeviceFacts("sm_90")), ("A100", DeviceFacts("sm_80")), ("A800", DeviceFacts("sm_80")),
    ("L40", DeviceFacts("sm_89")), ("L4", DeviceFacts("sm_89")), ("4090", DeviceFacts("sm_89")),
    ("MI250", DeviceFacts("gfx90a")), ("MI210", DeviceFacts("gfx90a")),
    ("MI300", DeviceFacts("gfx942")), ("MI325", DeviceFacts("gfx942")), ("7900", DeviceFacts("gfx1100")),
)


def device_facts(name: str) -> DeviceFacts | None:
    """The KNOWN_DEVICES entry whose key occurs in the device name `name`, or None."""
    return next((facts for key, facts in KNOWN_DEVICES if key in name), None)


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
        defines = {"IK_WARP_SIZE": str(self.warp_size), "IK_ARCH_SM": str(sm)}
        if self.facts.matrix_unit in _AMD_MATRIX_DEFINES:
            defines[_AMD_MATRIX_DEFINES[self.facts.matrix_unit]] = "1"
        return defines

    def __str__(self) -> str:
        return self.arch


def cuda_arch_from_capability(major: int, minor: int) -> str:
    return f"sm_{major}{minor}"
