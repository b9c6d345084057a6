"""The W4A16 planner: problem shape, the device's facts, the kernels' static shared memory and
frozen options in; a launch plan out (kernel, grid, block, shared memory, split-K).

Pure functions: no tensors, no driver calls. The call path (ikport/impl/w4a16.py) asks it; the
portability report asks `launch_of`. Tuning choices were measured on the H100
(docs/results/w4a16.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..backends.base import DeviceInfo
from ..backends.target import ArchFacts
from ..int4 import layout_info
from ..manifest import KernelSpec, spec
from .launch import Launch
from .options import Options

# Journey variants (W4A16Options.variant; None picks "mma" below DENSE_MIN_M rows, else
# "dequant-gemm"):
#   naive        v0: one warp per 16 output columns, scalar unpacking, x read element by element
#   gemv-scalar  v1: 4 warps split K, x staged in shared memory, codes unpacked one at a time
#   gemv         v2: + "magic number" unpacking, two codes to one fp16/bf16 pair per OR
#   mma-nosplit  v3: the matrix units (B fragments built in registers from the packed codes), x
#                    shared by the warps side by side along N
#   mma          v4: + split-K across blocks chosen from the SM count
#   dequant-gemm     the weights dequantized to a dense [N, K] in x's dtype by one kernel, then
#                    torch's dense matmul (prefill-sized M: a tuned dense GEMM wins)
#   tiled            a tiled GEMM for M from ~17 rows: BM x BN blocks, a multi-stage async ring of
#                    x, packed codes and scales, B dequantized in registers (Marlin's idea);
#                    explicit only until a GPU run sets its crossover (w4a16.md, "tiled")
VARIANTS = ("naive", "gemv-scalar", "gemv", "mma-nosplit", "mma", "dequant-gemm", "tiled")

# The tiled kernel (variant "tiled"): block rows by M (the first that holds M, else the last),
# 128 columns, a 4-deep ring (fewer where shared memory is short; then fewer rows), and K split
# across blocks only while the output tiles leave SMs idle (at most TILED_MAX_SPLITS: the fp32
# partials' traffic grows with M), each split keeping TILED_MIN_STAGES ring stages.
TILED_BLOCK_M = (32, 64, 128)
TILED_BLOCK_N = (64, 128, 256)
TILED_BN = 128
TILED_STAGES = 4
TILED_MAX_SPLITS = 4
TILED_MIN_STAGES = 8
TILED_WARP_N = 32  # columns of a warp's sub-tile (two 16-column tiles)


@dataclass(frozen=True)
class W4A16Options(Options):
    """Tuning and journey knobs for benchmarks and A/B runs; the default plans need none.

    variant: one of VARIANTS, or None (the default by M). The other fields pin the matrix-unit
    kernel's tiles (`m_tiles`, `n_tiles` of 16 rows / columns), its `warps`, the split-K count
    `num_splits`, the warps per SM the split rule aims for (`warps_per_sm`) and the weight-ring
    depth (`stages`). The tiled kernel takes `block_m` x `block_n` output tiles (TILED_BLOCK_M,
    TILED_BLOCK_N), `stages` and `num_splits` too."""

    variant: str | None = None
    m_tiles: int | None = None
    n_tiles: int | None = None
    warps: int | None = None
    num_splits: int | None = None
    warps_per_sm: int | None = None
    stages: int | None = None
    block_m: int | None = None
    block_n: int | None = None

    def __post_init__(self) -> None:
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(f"W4A16Options: unknown variant {self.variant!r}; choose from {VARIANTS}")
        for f in ("m_tiles", "n_tiles", "warps", "num_splits", "warps_per_sm", "stages", "block_m", "block_n"):
            value = getattr(self, f)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"W4A16Options: {f} must be a positive int (or None), got {value!r}")
        for f, allowed in (("block_m", TILED_BLOCK_M), ("block_n", TILED_BLOCK_N)):
            value = getattr(self, f)
            if value is not None and value not in allowed:
                raise ValueError(f"W4A16Options: {f} must be one of {allowed} (or None), got {value!r}")


DEFAULT_OPTIONS = W4A16Options()

GEMV_WARPS = 4  # journey GEMV variants: warps splitting K per 16-column tile
WARPS = 8  # matrix-unit kernel: warps splitting the block's K range (fewer where shared memory is short)
N_TILES = 2  # 16-column tiles per block: 32 output columns
M_TILES = (1, 2)  # 16-row tiles of x per block (M > 32 adds blocks along M; 4 spills on gfx1100)
WARPS_PER_SM = 6  # split K across blocks below this many warps per SM (w4a16.md, v7)
MIN_CHUNKS_PER_WARP = 2  # split K across blocks only while each warp keeps this many chunks
RING_BYTES = 32768  # the weight ring's cap (the kernel applies the same)
# From this many rows of x, dequantize to a dense weight once and use the vendor's GEMM.
DENSE_MIN_M = 128
DEQUANT_THREADS = 256


@dataclass(frozen=True)
class W4A16Problem:
    dtype: str  # "fp16" | "bf16" (x, scales and the output)
    m: int
    n: int
    k: int
    layout: str  # the packed weight's layout (ikport/int4.py)
    group_size: int


@dataclass(frozen=True)
class W4A16Plan:
    kernel: KernelSpec
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    num_splits: int
    chunks_per_split: int
    dense: bool = False  # the kernel writes a dense weight; torch's matmul does the product

    @property
    def counters(self) -> int:
        """Split-K arrival counters: one per output tile (column block x row block)."""
        return self.grid[0] * self.grid[2] if self.num_splits > 1 else 0


StaticShared = Callable[[KernelSpec], int]  # a kernel's static shared memory, as compiled


def group_tiles(group_size: int, k: int | None = None) -> int:
    """The matrix-unit kernel's GT: 16-k tiles per quantization group, capped at 8 (a group of 128
    or more spans a whole chunk on every target, so its scales apply once per chunk). Per-channel
    scales (group_size >= k, e.g. K = 96: one group) are 8 too: one scale period per chunk."""
    if k is not None and group_size >= k:
        return 8
    return min(group_size // 16, 8)


def stages(block_threads: int, n_tiles: int, options: W4A16Options = DEFAULT_OPTIONS) -> int:
    """Weight-ring slots per lane of the matrix-unit kernel: 4 (w4a16.md, v7), fewer where the
    ring would pass RING_BYTES."""
    return min(options.stages or 4, RING_BYTES // (n_tiles * block_threads * 16))


@dataclass(frozen=True)
class Tiles:
    m_tiles: int
    n_tiles: int
    warps: int
    num_splits: int
    chunks_per_split: int
    grid: tuple[int, int, int]  # (column blocks, splits, row blocks)


def tiles(*, m: int, n: int, k: int, chunk_k: int, sm_count: int, num_splits: int | None = None,
          options: W4A16Options = DEFAULT_OPTIONS) -> Tiles:
    """Tiles, warps and split-K of the matrix-unit kernel. The weights dominate every decode-sized
    M, so the grid must hold enough warps to keep every SM streaming: blocks of 8 warps split K
    inside the block; K splits across blocks (partials in memory, a counter, a last-block merge)
    only for few output tiles (w4a16.md, v7)."""
    o = options
    m_tiles = o.m_tiles or next((t for t in M_TILES if m <= 16 * t), M_TILES[-1])
    n_tiles = o.n_tiles or N_TILES
    col_blocks = -(-n // (16 * n_tiles))
    row_blocks = -(-m // (16 * m_tiles))
    chunks = -(-k // chunk_k)  # a K tail: the last chunk is partial
    target = (o.warps_per_sm or WARPS_PER_SM) * sm_count
    warps = o.warps or WARPS
    num_splits = o.num_splits or num_splits
    if num_splits is None:
        num_splits = -(-target // (col_blocks * row_blocks * warps))
        num_splits = min(num_splits, max(1, chunks // (MIN_CHUNKS_PER_WARP * warps)))
    num_splits = max(1, min(num_splits, chunks))
    per_split = -(-chunks // num_splits)
    num_splits = -(-chunks // per_split)  # no empty splits
    return Tiles(m_tiles, n_tiles, warps, num_splits, per_split, (col_blocks, num_splits, row_blocks))


def plan(problem: W4A16Problem, device: DeviceInfo, static_shared: StaticShared,
         options: W4A16Options = DEFAULT_OPTIONS) -> W4A16Plan:
    """The launch of `problem` on `device`; ValueError where the variant cannot take it."""
    p = problem
    M, N, K = p.m, p.n, p.k
    variant = options.variant or ("dequant-gemm" if M >= DENSE_MIN_M else "mma")
    warp = device.warp_size
    layout = layout_info(p.layout)
    chunks = -(-K // layout.chunk_k)  # chunks holding real k: the last may be partial (a K tail)
    itemsize = 2  # fp16 / bf16 activations
    if variant == "naive":
        return W4A16Plan(spec("w4a16", "naive", dtype=p.dtype), (N // 16, M, 1), (warp, 1, 1), 0, 1, chunks)
    if variant == "dequant-gemm":
        chunks_per_block = DEQUANT_THREADS // layout.unique_lanes  # one lane vector a thread
        return W4A16Plan(spec("w4a16", "dequant", dtype=p.dtype), (N // 16, -(-chunks // chunks_per_block), 1),
                         (DEQUANT_THREADS, 1, 1), 0, 1, chunks, dense=True)
    if variant in ("gemv-scalar", "gemv"):
        smem = chunks * layout.chunk_k * itemsize  # x, then zeros to the end of the last chunk
        if smem > device.max_smem_per_block:
            raise ValueError(f"variant {variant!r} stages x in shared memory: K={K} needs {smem} B, "
                             f"the device allows {device.max_smem_per_block} B")
        kernel = spec("w4a16", "gemv", dtype=p.dtype, magic=variant == "gemv", warps=GEMV_WARPS)
        return W4A16Plan(kernel, (N // 16, M, 1), (GEMV_WARPS * warp, 1, 1), smem, 1, chunks)
    if variant == "tiled":
        tt = tiled_tiles(m=M, n=N, k=K, chunk_k=layout.chunk_k, sm_count=device.sm_count,
                         max_smem=device.max_smem_per_block, options=options)
        warps_m, warps_n = tiled_warps(tt.block_m, tt.block_n)
        kernel = spec("w4a16", "tiled", dtype=p.dtype, block_m=tt.block_m, block_n=tt.block_n,
                      warps_m=warps_m, warps_n=warps_n, stages=tt.stages)
        return W4A16Plan(kernel, tt.grid, (warps_m * warps_n * warp, 1, 1),
                         tiled_smem(tt.block_m, tt.block_n, tt.stages, layout.chunk_k), tt.num_splits,
                         tt.chunks_per_split)
    t = tiles(m=M, n=N, k=K, chunk_k=layout.chunk_k, sm_count=device.sm_count,
              num_splits=1 if variant == "mma-nosplit" else None, options=options)
    # Fewer warps where the ring (static) plus the x slabs (dynamic) would pass the device's
    # shared memory per block (e.g. 64 KB of LDS on CDNA, whose 64-lane waves double the ring).
    warps = t.warps
    while True:
        ring = stages(warps * warp, t.n_tiles, options)
        kernel = spec("w4a16", "mma", dtype=p.dtype, m_tiles=t.m_tiles, n_tiles=t.n_tiles, warps=warps,
                      group_tiles=group_tiles(p.group_size, K), stages=ring)
        x_smem = mma_x_smem(ring, warps, M, t.m_tiles, layout.chunk_k, itemsize)
        if static_shared(kernel) + x_smem <= device.max_smem_per_block:
            break
        if warps == 1:
            raise ValueError(f"w4a16: {M} rows of x need {static_shared(kernel) + x_smem} B of shared "
                             f"memory per block, the device allows {device.max_smem_per_block} B")
        warps //= 2
    return W4A16Plan(kernel, t.grid, (warps * warp, 1, 1), x_smem, t.num_splits, t.chunks_per_split)


def mma_x_smem(ring: int, warps: int, m: int, m_tiles: int, chunk_k: int, itemsize: int = 2) -> int:
    """The matrix-unit kernel's x slabs (dynamic shared memory): ring x warps x min(M, rows per
    block) rows of chunk_k + 8 elements."""
    return ring * warps * min(m, 16 * m_tiles) * (chunk_k + 8) * itemsize


def tiled_stage_k(chunk_k: int) -> int:
    """K of one ring stage of the tiled kernel: whole chunks, at least 64 (w4::kStageK)."""
    return max(chunk_k, 64)


def tiled_smem(block_m: int, block_n: int, stages: int, chunk_k: int) -> int:
    """The tiled kernel's ring (dynamic shared memory), as w4::tiled_stage_bytes: per stage x's
    block_m rows of stage_k + 8 elements, the codes (4 bits a weight), a scale and a zero-point
    row of block_n per 32 k."""
    sk = tiled_stage_k(chunk_k)
    return stages * (block_m * (sk + 8) * 2 + block_n * sk // 2 + 2 * (sk // 32) * block_n * 2)


def tiled_warps(block_m: int, block_n: int) -> tuple[int, int]:
    """(warps along M, warps along N): warp sub-tiles of 32 x 32, with 64 rows from 128 block
    rows and 64 columns from 256 block columns (more matrix work per A and per dequantized B
    fragment; at most 8 warps)."""
    return block_m // (32 if block_m <= 64 else 64), min(block_n // TILED_WARP_N, 4)


@dataclass(frozen=True)
class TiledTiles:
    block_m: int
    block_n: int
    stages: int
    num_splits: int
    chunks_per_split: int
    grid: tuple[int, int, int]  # (column blocks, splits, row blocks)


def tiled_tiles(*, m: int, n: int, k: int, chunk_k: int, sm_count: int, max_smem: int,
                options: W4A16Options = DEFAULT_OPTIONS) -> TiledTiles:
    """Block tile, ring depth and split-K of the tiled kernel (see TILED_*); ValueError where even
    a 2-stage ring of the smallest block does not fit `max_smem`."""
    o = options
    block_m = o.block_m or next((b for b in TILED_BLOCK_M if m <= b), TILED_BLOCK_M[-1])
    block_n = o.block_n or TILED_BN
    while True:
        ring = min(o.stages or TILED_STAGES, max_smem // tiled_smem(block_m, block_n, 1, chunk_k))
        if ring >= 2 or o.block_m or block_m == TILED_BLOCK_M[0]:
            break
        block_m //= 2
    if ring < 2:
        raise ValueError(f"w4a16 tiled: a {block_m} x {block_n} block's 2-stage ring needs "
                         f"{tiled_smem(block_m, block_n, 2, chunk_k)} B of shared memory, the device "
                         f"allows {max_smem} B")
    stage_chunks = tiled_stage_k(chunk_k) // chunk_k
    stages_total = -(-k // tiled_stage_k(chunk_k))  # ring stages holding real k
    col_blocks, row_blocks = -(-n // block_n), -(-m // block_m)
    num_splits = o.num_splits or max(1, min(sm_count // (col_blocks * row_blocks), TILED_MAX_SPLITS,
                                            stages_total // TILED_MIN_STAGES))
    num_splits = max(1, min(num_splits, stages_total))
    per_split = -(-stages_total // num_splits)
    num_splits = -(-stages_total // per_split)  # no empty splits
    return TiledTiles(block_m, block_n, ring, num_splits, per_split * stage_chunks,
                      (col_blocks, num_splits, row_blocks))


# The GEMV variants' dynamic shared memory is one row of x: K elements; launch_of shows Llama's 4096.
REPORT_K = 4096


def launch_of(s: KernelSpec, facts: ArchFacts) -> Launch | None:
    """Block size and dynamic shared memory of a W4A16 kernel on a target of `facts`, for M = 1
    (one row of x a slab); None for another family."""
    if s.family != "w4a16":
        return None
    p = dict(s.params)
    warp = facts.warp_size
    if s.kernel == "naive":
        return Launch(warp, 0, False, False)  # one warp per 16 output columns
    if s.kernel == "gemv":
        return Launch(p["warps"] * warp, REPORT_K * 2, False, False)
    if s.kernel == "dequant":
        return Launch(DEQUANT_THREADS, 0, False, False)
    if s.kernel == "mma":
        # A via the shim's shared-memory fragment load, B built in registers
        chunk_k = layout_info(facts.matrix_layout).chunk_k
        return Launch(p["warps"] * warp, mma_x_smem(p["stages"], p["warps"], 1, p["m_tiles"], chunk_k), True, True)
    if s.kernel == "tiled":
        chunk_k = layout_info(facts.matrix_layout).chunk_k
        return Launch(p["warps_m"] * p["warps_n"] * warp,
                      tiled_smem(p["block_m"], p["block_n"], p["stages"], chunk_k), True, True)
    return None
