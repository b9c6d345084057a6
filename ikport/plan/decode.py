"""The decode-attention planner: problem shape, the device's facts, an occupancy answer and frozen
options in; a launch plan out (kernels, grid, block, shared memory, split-K, scratch).

Pure functions: no tensors, no driver calls. The call path (ikport/impl/attention.py) asks it
with occupancy answers from the loaded kernels; warmup asks `default_kernels` which kernels plans
may name; the portability report asks `launch_of` how a kernel is launched. Nothing else computes
a launch. Every tuning choice below was measured on the H100; docs/results/decode.md has the
numbers (the journey section each comment names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..backends.base import DeviceInfo
from ..backends.target import ArchFacts, Target
from ..manifest import KernelSpec, spec
from .launch import Launch
from .options import Options

# Journey variants (DecodeOptions.variant):
#   naive          v0: one block per query head, scalar loads
#   split1         one block per KV head for its whole GQA group, 16-byte loads, no split-K
#   split-unfused  + split-K, partial results merged by a second launch
#   split-vector   + the merge fused into the last block of each split group (v1-v9: fp32
#                  dot products on the vector units)
#   split-mma      the same split and merge, the math on the matrix units (v11)
#   split          the default: split-mma where a block serves enough query rows
#                  (use_mma), else split-vector
VARIANTS = ("naive", "split1", "split-unfused", "split-vector", "split-mma", "split")


@dataclass(frozen=True)
class DecodeOptions(Options):
    """Tuning and journey knobs for benchmarks and A/B runs; the default plans need none.

    variant: one of VARIANTS. Any other field pins that choice of the plan: query `rows` per block,
    `threads`, `unroll` (K/V rows per row group per step), `stages` (async-copy ring depth, 0:
    loads to registers), `num_splits`, `cluster` (False: merge splits through global memory, not a
    block cluster), `mma` (the matrix-unit kernel on or off under the default variant). The
    manifest checks the values at plan time.
    """

    variant: str = "split"
    rows: int | None = None
    threads: int | None = None
    unroll: int | None = None
    stages: int | None = None
    num_splits: int | None = None
    cluster: bool | None = None
    mma: bool | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"DecodeOptions: unknown variant {self.variant!r}; choose from {VARIANTS}")
        for f in ("rows", "threads", "unroll", "stages", "num_splits"):
            value = getattr(self, f)
            if value is not None and (type(value) is not int or value < (0 if f == "stages" else 1)):
                raise ValueError(f"DecodeOptions: {f} must be a positive int (or None), got {value!r}")
        for f in ("cluster", "mma"):
            value = getattr(self, f)
            if value is not None and type(value) is not bool:
                raise ValueError(f"DecodeOptions: {f} must be True, False or None, got {value!r}")


DEFAULT_OPTIONS = DecodeOptions()


@dataclass(frozen=True)
class DecodeProblem:
    """One decode call's shape: `kv_capacity` is L (contiguous) or max_pages * page_size (paged)."""

    dtype: str  # "fp16" | "bf16"
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    head_dim: int
    kv_capacity: int
    page_size: int = 0  # 0: a contiguous cache
    kv_format: str = "dense"  # the cache format: the split kernels' KV loader (ikport.kvquant.KV_FORMATS)
    kivi_group: int = 0  # kivi4: K's group of G rows (the loader kivi4_g<G>)

    @property
    def loader(self) -> str:
        """The manifest's `loader` value for this cache format."""
        return loader_name(self.kv_format, self.kivi_group)

    @property
    def paged(self) -> bool:
        return self.page_size > 0

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def page_size_log2(self) -> int:
        return self.page_size.bit_length() - 1 if self.paged else 0


@dataclass(frozen=True)
class DecodePlan:
    """Everything a launch needs besides the tensors. Split-K (num_splits > 1) merges in a block
    cluster (`clustered`), in the last block of each group (`fused`: needs arrival counters), or
    in the `combine` kernel (unfused, and under CUDA-graph capture)."""

    kernel: KernelSpec
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    num_splits: int
    rows_per_split: int
    kv_capacity: int
    page_size_log2: int
    fused: bool
    clustered: bool
    combine: KernelSpec | None  # the separate merge (split-K without a cluster)
    combine_grid: tuple[int, int, int]
    combine_block: tuple[int, int, int]
    scratch_bytes: int  # fp32 partial outputs [rows, D] then log-sum-exps [rows]
    lse_offset: int
    counters: int  # two arrival counters per (sequence, KV head, row tile)


# Blocks of a kernel resident on one SM at once with (threads, dynamic shared bytes), or None
# where the backend cannot say; clusters of `cluster` blocks resident on the whole device.
Occupancy = Callable[[KernelSpec, int, int], "int | None"]
ClustersResident = Callable[[KernelSpec, int, int, int], int]

# ---- tiles -----------------------------------------------------------------------------------
DECODE_THREADS = 256
DECODE_UNROLL = 2  # KV rows per row group per step
DECODE_STAGES = 2  # 0: K/V loads straight to registers; >= 2: cp.async ring this deep
ROW_TILES = (1, 2, 4, 8)  # query rows one block serves (GQA group x query tokens)
MIN_ROWS_PER_SPLIT = 64  # a split streams at least this many KV rows
# Blocks of 128 threads resident per SM, by query-row tile, for backends that cannot answer
# occupancy (compiler register counts ~100-170 -> 3-4 blocks per SM).
BLOCKS_PER_SM_ESTIMATE = {1: 4, 2: 4, 4: 3, 8: 2}


def row_tile(rows_total: int) -> int:
    return next((r for r in ROW_TILES if rows_total <= r), ROW_TILES[-1])


def rows(rows_total: int, options: DecodeOptions = DEFAULT_OPTIONS) -> tuple[int, int]:
    """(query rows per block, row tiles per KV head) for `rows_total` query rows per KV head."""
    r = options.rows or row_tile(rows_total)
    return r, -(-rows_total // r)


# One block per SM with a deeper ring where every group fits the SMs once (decode.md, v6): the same
# bytes in flight as two blocks with 2 stages, half the partials to merge. Only with async copies;
# not for splits under SHORT_SPLIT_ROWS rows, which gained nothing.
ONE_PER_SM_STAGES = 4
# Paged caches at one block per SM: 512 threads x 2 stages (16 warps hide the page-id loads; decode.md,
# v9). Not at 8 query rows, where 512 threads spill at their 128 registers a thread.
ONE_PER_SM_PAGED_THREADS = 512
ONE_PER_SM_PAGED_STAGES = 2
ONE_PER_SM_PAGED_MAX_ROWS = 4
# The one-block-per-SM ring moves best at ~16-24 KB of K and V per step; head dims that leave lanes
# of a row group idle (80, 96, 192) take 4 rows a step where that lands nearer (decode.md, v8).
ONE_PER_SM_STEP_BYTES = 20 * 1024
# A split shorter than this is latency-bound: one block per SM streams it as fast as two (decode.md,
# "Short splits fill one block per SM").
SHORT_SPLIT_ROWS = 512
# Short caches (<= SMALL_BLOCK_MAX_ROWS) with one to two waves of 256-thread groups take 128-thread
# blocks, one wave (decode.md, v6). Contiguous caches only (paged ones were not measured).
SMALL_BLOCK_MAX_ROWS = 1024
SMALL_BLOCK_THREADS = 128


# Bytes a K/V element costs in memory per KV loader (scales aside): the one-block-per-SM step
# sizes its rows by the bytes it moves, so compressed caches take more rows a step.
KV_ELEMENT_BYTES = {"dense": 2.0, "int8": 1.0, "kivi4": 0.5}


def one_per_sm_unroll(head_dim: int, threads: int, warp_size: int = 32, loader: str = "dense") -> int:
    """Rows per row group per step (2, 4 or 8) of the one-block-per-SM kernel: the one whose K+V
    bytes per step lie nearer ONE_PER_SM_STEP_BYTES (ties: fewer). Dense head_dim 128: 2; INT8
    4, KIVI 8 (their bytes in flight then match dense's: 2 rows of INT8 read 918 GB/s at D1,
    kvcache-h100.json)."""
    lanes = 1
    while lanes < head_dim // 8 and lanes < warp_size:
        lanes *= 2  # lanes per row group, as SplitConfig::kLPR
    element = KV_ELEMENT_BYTES[loader.split("_")[0]]

    def step_bytes(unroll: int) -> float:
        return threads // lanes * unroll * head_dim * 2 * element  # row groups x rows x (K + V)

    return min((2, 4, 8), key=lambda u: abs(step_bytes(u) - ONE_PER_SM_STEP_BYTES))


def vector_step_rows(head_dim: int, threads: int, unroll: int, warp_size: int = 32) -> int:
    """K/V rows a step of the vector kernel holds (SplitConfig: row groups x unroll): a KIVI
    step must lie in one group of G rows (KiviLoader::Vector's static_assert)."""
    lanes = 1
    while lanes < head_dim // 8 and lanes < warp_size:
        lanes *= 2
    return threads // lanes * unroll


def one_block_per_sm(*, groups: int, kv_capacity: int, sm_count: int, paged: bool, async_copy: bool,
                     rows: int = 1) -> bool:
    """Whether a launch of `groups` (sequence, KV head, row tile) groups of `rows` query rows over
    caches of `kv_capacity` rows runs one block per SM with the deeper ring (see above)."""
    if not async_copy or groups > sm_count or (paged and rows > ONE_PER_SM_PAGED_MAX_ROWS):
        return False
    splits = _wave_filling_splits(groups, kv_capacity, sm_count)
    return -(-kv_capacity // splits) >= SHORT_SPLIT_ROWS


def blocks_per_sm(occupancy: int | None, rows: int, threads: int) -> int:
    """Blocks per SM: the backend's occupancy answer, else the BLOCKS_PER_SM_ESTIMATE."""
    return max(1, occupancy or BLOCKS_PER_SM_ESTIMATE[rows] * 128 // threads)


def small_blocks(*, groups: int, kv_capacity: int, slots: int, paged: bool,
                 options: DecodeOptions = DEFAULT_OPTIONS) -> bool:
    """Whether to launch SMALL_BLOCK_THREADS-thread blocks (see above); `slots`: blocks of the
    default kernel the device holds at once."""
    return (not paged and options.threads is None and kv_capacity <= SMALL_BLOCK_MAX_ROWS
            and slots < groups <= 2 * slots)


@dataclass(frozen=True)
class Tiles:
    """The split kernel's template choice, before split-K."""

    rows: int
    row_tiles: int
    threads: int
    unroll: int  # the vector kernel's rows per row group per step (1: the matrix-unit kernel)
    stages: int


def vector_tiles(group: int, q_len: int, *, head_dim: int = 128, warp_size: int = 32,
                 max_smem: int | None = None, one_per_sm: bool = False, threads: int = DECODE_THREADS,
                 paged: bool = False, options: DecodeOptions = DEFAULT_OPTIONS, loader: str = "dense") -> Tiles:
    """The vector kernel's tiles. With `max_smem` (the target's per-block limit), 128 threads where
    256 would not fit: the merge buffer grows with warps x rows x head_dim (gfx1100, wave32: 8
    warps x 8 rows x 256 dims needs 66 KB of its 64 KB LDS). `one_per_sm`: the one-block-per-SM
    ring (ONE_PER_SM_STAGES; paged: ONE_PER_SM_PAGED_THREADS threads and _STAGES stages)."""
    r, row_tiles = rows(group * q_len, options)
    paged_one_per_sm = one_per_sm and paged
    threads = options.threads or (ONE_PER_SM_PAGED_THREADS if paged_one_per_sm else threads)
    unroll = options.unroll or (one_per_sm_unroll(head_dim, threads, warp_size, loader) if one_per_sm
                                else DECODE_UNROLL)
    stages = options.stages if options.stages is not None else (
        ONE_PER_SM_PAGED_STAGES if paged_one_per_sm else ONE_PER_SM_STAGES if one_per_sm else DECODE_STAGES)
    group = kivi_group(loader)
    while group and vector_step_rows(head_dim, threads, unroll, warp_size) > group:
        if options.unroll is None and unroll > DECODE_UNROLL:
            unroll //= 2
        elif options.threads is None and threads > 64:
            threads //= 2
        else:
            raise ValueError(f"KIVI groups of {group} rows: a vector step of {threads} threads x unroll {unroll} "
                             f"holds {vector_step_rows(head_dim, threads, unroll, warp_size)} rows (at most {group})")
    if max_smem is not None and options.threads is None:
        while threads > 128 and vector_smem_bytes(threads=threads, warp_size=warp_size, rows=r, head_dim=head_dim,
                                                  unroll=unroll, stages=stages, loader=loader) > max_smem:
            threads //= 2
    return Tiles(r, row_tiles, threads, unroll, stages)


# ---- the KV loaders' shared memory (kernels_src/attention/kv_loader.cuh; tests/test_plan_sizes.py
# checks every value against the compiled constants) --------------------------------------------
LOADERS = ("dense", "int8", "kivi4_g32", "kivi4_g64", "kivi4_g128")
INT8_SCALE_BYTES = 4  # fp32, one per token and KV head (ikport.kvquant)
KIVI_PAIR_BYTES = 4  # a (scale, zero) pair of fp16/bf16


def kivi_group(loader: str) -> int:
    """G of a kivi4_g<G> loader; 0 for the others."""
    return int(loader.removeprefix("kivi4_g")) if loader.startswith("kivi4_g") else 0


def loader_name(kv_format: str, group: int = 0) -> str:
    """The manifest's `loader` (and kv_append's `kv_format`) value of a cache format: kivi4_g<G>
    for KIVI with K groups of G rows, else the format's own name (kivi_group's inverse)."""
    return f"kivi4_g{group}" if kv_format == "kivi4" else kv_format


def vector_slot_bytes(loader: str = "dense", unroll: int = DECODE_UNROLL) -> int:
    """A lane's ring bytes per row and tensor in attn_decode_split (the loader's Vector::kSlotBytes):
    dense, 8 elements in one 16-byte copy; int8, 8 codes and the row's fp32 scale; kivi4, per step
    K's 16-byte cells, max(unroll (residual rows), 2 (8 pairs) + ceil(unroll / 4) (4 codes a row)),
    and V's unroll x (4 codes + a pair), over the step's 2 x unroll row-tensors."""
    if loader == "dense":
        return 16
    if loader == "int8":
        return 8 + INT8_SCALE_BYTES
    if kivi_group(loader):
        k_area = 16 * max(unroll, 2 + -(-unroll // 4))
        return (k_area + unroll * (4 + KIVI_PAIR_BYTES)) // (2 * unroll)
    raise ValueError(f"unknown KV loader {loader!r}; choose from {LOADERS}")


def mma_slot_bytes(loader: str, head_dim: int, warp_size: int) -> int:
    """A warp's ring bytes per stage in attn_decode_split_mma (the loader's Matrix::kSlotBytes):
    dense, the K and V tiles of 16 rows (head_dim + 8 padded, fp16/bf16); int8, the two code tiles
    (16 x head_dim bytes) and a scale per lane copy of 16 codes."""
    if loader == "dense":
        return 2 * MMA_TILE_ROWS * (head_dim + 8) * 2
    if loader == "int8":
        copies = -(-(MMA_TILE_ROWS * head_dim // 16) // warp_size)
        return 2 * (MMA_TILE_ROWS * head_dim + copies * warp_size * INT8_SCALE_BYTES)
    if kivi_group(loader):  # K: codes, the group's pairs, a residual tile of T; V: codes, a pair a copy
        codes = MMA_TILE_ROWS * head_dim // 2
        copies = -(-(codes // 16) // warp_size)
        k_side = codes + head_dim * KIVI_PAIR_BYTES + MMA_TILE_ROWS * (head_dim + 8) * 2
        return k_side + codes + copies * warp_size * KIVI_PAIR_BYTES
    raise ValueError(f"unknown KV loader {loader!r}; choose from {LOADERS}")


def mma_warp_bytes(loader: str, head_dim: int) -> int:
    """A warp's shared memory beside its ring slots (Matrix::kWarpBytes): int8's one pair of
    dequantized K and V tiles."""
    return 2 * MMA_TILE_ROWS * (head_dim + 8) * 2 if loader == "int8" or kivi_group(loader) else 0


def vector_smem_bytes(*, threads: int, warp_size: int, rows: int, head_dim: int, unroll: int,
                      stages: int, cluster: int = 1, loader: str = "dense") -> int:
    """Dynamic shared memory of attn_decode_split (SplitConfig::smem_bytes: the merge buffer, or the
    ring of the loader's slots, whichever is larger), plus the cluster buffer of its clustered kernel."""
    merge = threads // warp_size * rows * (head_dim + 2) * 4
    ring = stages * unroll * 2 * threads * vector_slot_bytes(loader, unroll)
    return max(merge, ring) + cluster_bytes(cluster, rows, head_dim)


def cluster_bytes(cluster: int, rows: int, head_dim: int) -> int:
    """Block 0's buffer for the cluster's partial outputs and log-sum-exps (SplitConfig::cluster_bytes)."""
    return cluster * rows * (head_dim + 1) * 4 if cluster > 1 else 0


# v11, decode on the matrix units: each warp scores 16 K rows for up to 16 query rows with one
# matrix product. Four warps, each streaming its own ring of MMA_STAGES tiles of 16 K/V rows, as
# deep as the shared memory allows. MMA_MIN_ROWS: the default plan takes it from blocks of this
# many query rows; None: it ran slower than the vector kernel on the H100 at GQA 4 (decode.md, v11),
# so it stays the journey variant "split-mma" (or DecodeOptions(mma=True)).
MMA_MIN_ROWS: int | None = None
MMA_WARPS = 4
MMA_STAGES = 6
MMA_TILE_ROWS = 16  # K/V rows per ring tile (MmaConfig::kTile)
C_TO_A_LD = 24  # ik::mma::kCToALd: the per-warp scratch rows where C is not A's layout (AMD)


def use_mma(rows: int, options: DecodeOptions = DEFAULT_OPTIONS) -> bool:
    """Whether the default variant takes the matrix-unit kernel for blocks of `rows` query rows."""
    if options.mma is not None:
        return options.mma
    return MMA_MIN_ROWS is not None and rows >= MMA_MIN_ROWS


def mma_smem_bytes(*, threads: int, warp_size: int, rows: int, head_dim: int, stages: int,
                   c_is_a: bool, cluster: int = 1, loader: str = "dense") -> int:
    """Dynamic shared memory of attn_decode_split_mma (MmaConfig::smem_bytes), plus the cluster
    buffer of its clustered kernel. `c_is_a`: the target keeps P in registers (NVIDIA)."""
    warps, ld = threads // warp_size, head_dim + 8
    ring = warps * (stages * mma_slot_bytes(loader, head_dim, warp_size) + mma_warp_bytes(loader, head_dim))
    stream = ring + 16 * ld * 2 + (0 if c_is_a else warps * 16 * C_TO_A_LD * 2)
    merge = warps * rows * (head_dim + 2) * 4
    return max(merge, stream) + cluster_bytes(cluster, rows, head_dim)


def mma_tiles(group: int, q_len: int, *, head_dim: int, warp_size: int, max_smem: int, c_is_a: bool,
              options: DecodeOptions = DEFAULT_OPTIONS, loader: str = "dense") -> Tiles:
    """The matrix-unit kernel's tiles: MMA_WARPS warps with the deepest ring up to MMA_STAGES that
    fits `max_smem`; where even 2 stages do not fit (64 KB of LDS at head_dim 128), half the warps,
    and so on."""
    r, row_tiles = rows(group * q_len, options)
    threads = options.threads or MMA_WARPS * warp_size
    stages = options.stages if options.stages is not None else MMA_STAGES

    def fits(threads: int, stages: int) -> bool:
        return mma_smem_bytes(threads=threads, warp_size=warp_size, rows=r, head_dim=head_dim,
                              stages=stages, c_is_a=c_is_a, loader=loader) <= max_smem

    if options.threads is None:
        while threads > warp_size and not fits(threads, 2):
            threads //= 2
    if options.stages is None:
        while stages > 2 and not fits(threads, stages):
            stages -= 1
    return Tiles(r, row_tiles, threads, 1, stages)


# ---- split-K ---------------------------------------------------------------------------------
# Split-K groups of at most MAX_CLUSTER splits merge inside a block cluster where the target has
# clusters: the partials go to one block's shared memory instead of global memory, counters and a
# fence (decode.md, v8). Only launches of at most one block per SM, asking for enough shared
# memory that no SM takes two blocks, and only if the driver says every cluster is resident at
# once. Past 8 blocks a cluster is a non-portable size (the H100 allows 16), opted in at load.
MAX_CLUSTER = 16
GOOD_WAVE_UTILIZATION = 0.95  # take the fewest splits that keep the waves this full


def cluster_size(num_splits: int, *, clusters: bool, blocks: int, sm_count: int,
                 options: DecodeOptions = DEFAULT_OPTIONS) -> int:
    """Blocks per cluster for a split-K launch of `blocks` blocks in `num_splits` splits:
    num_splits where the target has clusters, it is 2..MAX_CLUSTER and the blocks fit one per SM,
    else 1 (merge through global memory)."""
    if not clusters or not 2 <= num_splits <= MAX_CLUSTER or blocks > sm_count:
        return 1
    return 1 if options.cluster is False else num_splits


def fewer_splits_for_clusters(num_splits: int, rows_per_split: int,
                              options: DecodeOptions = DEFAULT_OPTIONS) -> int | None:
    """Short splits whose clusters cannot all be resident try one split less, where that count's
    clusters fit (the cluster merge saves more than the idle SMs cost; decode.md, v9). None: keep."""
    if rows_per_split >= SHORT_SPLIT_ROWS or num_splits <= 2 or options.num_splits is not None:
        return None
    return num_splits - 1


def cluster_smem(smem: int, max_smem_per_sm: int) -> int:
    """Shared memory a clustered launch asks for: at least half the SM's and one byte, so no SM
    holds two of its blocks."""
    return max(smem, max_smem_per_sm // 2 + 1)


def combine_threads(head_dim: int) -> int:
    """Block of attn_decode_combine: a merge pair per 4 output dims, at least 64 threads, whole
    64-lane waves (mirrors its __launch_bounds__)."""
    return -(-max(head_dim, 64) // 64) * 64


def _rounded_splits(kv_capacity: int, splits: int, align: int = 16) -> int:
    """Splits actually launched once each split's rows are rounded up to whole 16-row steps (KIVI:
    whole groups of G rows, `align`)."""
    rows = -(-(-(-kv_capacity // splits)) // align) * align
    return -(-kv_capacity // rows)


def wave_utilization(blocks: int, slots: int) -> float:
    """Fraction of the SM slots busy over the waves `blocks` need (1.0: every wave full)."""
    waves = -(-blocks // slots)
    return blocks / (waves * slots)


def _wave_filling_splits(base_blocks: int, kv_capacity: int, slots: int) -> int:
    """Fewest splits whose blocks fill `slots`-sized waves to GOOD_WAVE_UTILIZATION (else the
    best filling), within the split-length limits: short splits pay a fixed cost per block and a
    longer merge, so at most 16 splits of fewer than 256 rows."""
    max_splits = max(1, min(kv_capacity // MIN_ROWS_PER_SPLIT, 16), kv_capacity // 256)
    best = (0.0, 1)
    for s in range(1, min(max_splits, 4 * -(-slots // base_blocks)) + 1):
        util = wave_utilization(base_blocks * _rounded_splits(kv_capacity, s), slots)
        if util >= GOOD_WAVE_UTILIZATION:
            return s
        best = max(best, (util, s), key=lambda b: b[0])
    return best[1]


@dataclass(frozen=True)
class Split:
    num_splits: int
    rows_per_split: int  # KV rows each split streams, a multiple of 16


def split(*, sm_count: int, occupancy: int | None, groups: int, kv_capacity: int, tiles: Tiles,
          num_splits: int | None = None, one_per_sm: bool = False,
          options: DecodeOptions = DEFAULT_OPTIONS, align: int = 16) -> Split:
    """Split-K count from the SM count and the kernel's occupancy: every block streams an equal
    chunk, so the time is set by the number of waves; pick the split count whose blocks fill the
    waves best (fewest splits on ties), each split at least MIN_ROWS_PER_SPLIT rows. Splits
    shorter than SHORT_SPLIT_ROWS fill one block per SM instead; so does `one_per_sm`. `align`:
    rows_per_split a multiple of it (16; KIVI: G, so that every split starts a K group)."""
    num_splits = options.num_splits or num_splits
    if num_splits is None:
        per_sm = 1 if one_per_sm else blocks_per_sm(occupancy, tiles.rows, tiles.threads)
        num_splits = _wave_filling_splits(groups, kv_capacity, sm_count * per_sm)
        if per_sm > 1 and -(-kv_capacity // num_splits) < SHORT_SPLIT_ROWS:
            num_splits = _wave_filling_splits(groups, kv_capacity, sm_count)
    num_splits = _rounded_splits(kv_capacity, max(1, min(num_splits, kv_capacity)), align)
    rows_per_split = -(-(-(-kv_capacity // num_splits)) // align) * align
    return Split(num_splits, rows_per_split)


# ---- the plan --------------------------------------------------------------------------------
def _split_spec(problem: DecodeProblem, tiles: Tiles, mma: bool, cluster: int = 1) -> KernelSpec:
    common = dict(dtype=problem.dtype, head_dim=problem.head_dim, rows=tiles.rows, paged=problem.paged,
                  threads=tiles.threads, stages=tiles.stages, loader=problem.loader)
    if cluster > 1:
        common["cluster"] = cluster
    if mma:
        return spec("attention_decode", "split_mma_cluster" if cluster > 1 else "split_mma", **common)
    return spec("attention_decode", "split_cluster" if cluster > 1 else "split", unroll=tiles.unroll, **common)


def _split_smem(problem: DecodeProblem, tiles: Tiles, mma: bool, warp_size: int, c_is_a: bool,
                cluster: int = 1) -> int:
    if mma:
        return mma_smem_bytes(threads=tiles.threads, warp_size=warp_size, rows=tiles.rows,
                              head_dim=problem.head_dim, stages=tiles.stages, c_is_a=c_is_a,
                              cluster=cluster, loader=problem.loader)
    return vector_smem_bytes(threads=tiles.threads, warp_size=warp_size, rows=tiles.rows,
                             head_dim=problem.head_dim, unroll=tiles.unroll, stages=tiles.stages,
                             cluster=cluster, loader=problem.loader)


def plan(problem: DecodeProblem, device: DeviceInfo, occupancy: Occupancy,
         clusters_resident: ClustersResident, options: DecodeOptions = DEFAULT_OPTIONS) -> DecodePlan:
    """The launch of `problem` on `device` (ValueError where the manifest refuses a kernel)."""
    p, facts = problem, Target(device.arch).facts
    if options.variant == "naive":
        if p.kv_format != "dense":
            raise ValueError(f"DecodeOptions(variant='naive') reads a dense cache, not {p.kv_format!r}")
        return _finish(p, spec("attention_decode", "naive", dtype=p.dtype, head_dim=p.head_dim),
                       (p.q_len * p.q_heads, p.batch, 1), 128, 0, Split(1, p.kv_capacity), False, False, None)
    r, row_tiles = rows(p.group * p.q_len, options)
    groups = p.batch * p.kv_heads * row_tiles
    mma = options.variant == "split-mma" or (options.variant == "split" and use_mma(r, options))
    if mma and p.kv_format == "kivi4" and p.head_dim % 32:
        raise ValueError(f"the matrix-unit kernel reads KIVI codes in 32-channel chunks: head_dim {p.head_dim} "
                         "is not a multiple of 32 (take the vector kernel: DecodeOptions(mma=False))")
    default = options.variant in ("split", "split-vector", "split-mma")  # fused merge, tuned launches
    one_per_sm = default and not mma and one_block_per_sm(
        groups=groups, kv_capacity=p.kv_capacity, sm_count=device.sm_count, paged=p.paged,
        async_copy=facts.async_copy, rows=r)

    def tiles_for(threads: int) -> Tiles:
        if mma:
            return mma_tiles(p.group, p.q_len, head_dim=p.head_dim, warp_size=device.warp_size,
                             max_smem=device.max_smem_per_block, c_is_a=facts.c_is_a, options=options,
                             loader=p.loader)
        return vector_tiles(p.group, p.q_len, head_dim=p.head_dim, warp_size=device.warp_size,
                            max_smem=device.max_smem_per_block, one_per_sm=one_per_sm, threads=threads,
                            paged=p.paged, options=options, loader=p.loader)

    tiles = tiles_for(DECODE_THREADS)
    kernel, smem = _split_spec(p, tiles, mma), _split_smem(p, tiles, mma, device.warp_size, facts.c_is_a)
    per_sm = occupancy(kernel, tiles.threads, smem)
    if default and not mma and not one_per_sm and small_blocks(
            groups=groups, kv_capacity=p.kv_capacity, paged=p.paged, options=options,
            slots=device.sm_count * blocks_per_sm(per_sm, tiles.rows, tiles.threads)):
        tiles = tiles_for(SMALL_BLOCK_THREADS)
        kernel, smem = _split_spec(p, tiles, mma), _split_smem(p, tiles, mma, device.warp_size, facts.c_is_a)
        per_sm = occupancy(kernel, tiles.threads, smem)

    def split_of(num_splits: int | None) -> Split:
        return split(sm_count=device.sm_count, occupancy=per_sm, groups=groups,
                     kv_capacity=p.kv_capacity, tiles=tiles, num_splits=num_splits,
                     one_per_sm=one_per_sm, options=options, align=max(16, p.kivi_group))

    def clustered_kernel(s: Split) -> tuple[KernelSpec, int] | None:
        cluster = cluster_size(s.num_splits, clusters=facts.clusters, blocks=groups * s.num_splits,
                               sm_count=device.sm_count, options=options)
        if not default or cluster == 1:
            return None
        k = _split_spec(p, tiles, mma, cluster)
        asked = cluster_smem(_split_smem(p, tiles, mma, device.warp_size, facts.c_is_a, cluster), facts.max_smem_per_sm)
        if asked <= device.max_smem_per_block and clusters_resident(k, cluster, tiles.threads, asked) >= groups:
            return k, asked
        return None

    s = split_of(1 if options.variant == "split1" else None)
    fit = clustered_kernel(s)
    fewer = fewer_splits_for_clusters(s.num_splits, s.rows_per_split, options)
    if fit is None and fewer and facts.clusters and default:
        fewer_split = split_of(fewer)
        fit = clustered_kernel(fewer_split)
        s = fewer_split if fit is not None else s
    if fit is not None:
        kernel, smem = fit
    combine = None
    if s.num_splits > 1 and fit is None:
        combine = spec("attention_decode", "combine", dtype=p.dtype, head_dim=p.head_dim)
    return _finish(p, kernel, (s.num_splits, p.kv_heads * row_tiles, p.batch), tiles.threads, smem, s,
                   default and fit is None, fit is not None, combine)


def _finish(p: DecodeProblem, kernel: KernelSpec, grid: tuple[int, int, int], threads: int, smem: int,
            s: Split, fused: bool, clustered: bool, combine: KernelSpec | None) -> DecodePlan:
    scratch_rows = p.batch * p.q_heads * p.q_len * s.num_splits if s.num_splits > 1 and not clustered else 0
    return DecodePlan(
        kernel=kernel, grid=grid, block=(threads, 1, 1), shared_bytes=smem, num_splits=s.num_splits,
        rows_per_split=s.rows_per_split, kv_capacity=p.kv_capacity, page_size_log2=p.page_size_log2,
        fused=fused, clustered=clustered, combine=combine,
        combine_grid=(p.batch * p.q_heads * p.q_len, 1, 1), combine_block=(combine_threads(p.head_dim), 1, 1),
        scratch_bytes=scratch_rows * (p.head_dim + 1) * 4, lse_offset=scratch_rows * p.head_dim * 4,
        counters=2 * grid[1] * grid[2])


# ---- what plans may launch, and how a kernel is launched -------------------------------------
WARMUP_CLUSTERS = (2, 4, 8)  # clustered split counts built ahead; others compile on first use
DTYPES = ("fp16", "bf16")


def default_kernels(target: Target, head_dims: tuple[int, ...] = (64, 128, 256),
                    dtypes: tuple[str, ...] = DTYPES) -> list[KernelSpec]:
    """The kernels default plans may launch on `target`, for these head dims: the split kernels of
    every row tile, contiguous and paged; the 128-thread version (small_blocks); with async
    copies the one-block-per-SM versions (the deeper ring, 512 threads for paged caches of at most
    ONE_PER_SM_PAGED_MAX_ROWS rows); with clusters the clustered versions of the contiguous
    256-thread and all one-block-per-SM kernels (WARMUP_CLUSTERS); the merge kernel every split-K
    plan loads. Row tiles the default sends to the matrix units (use_mma) get the matrix-unit
    kernel, contiguous and paged, with its clustered versions."""
    facts = target.facts
    # (paged, one block per SM, threads asked)
    layouts = [(False, False, DECODE_THREADS), (True, False, DECODE_THREADS), (False, False, SMALL_BLOCK_THREADS)]
    if facts.async_copy:
        layouts += [(False, True, DECODE_THREADS), (True, True, DECODE_THREADS)]
    out = []
    for dtype in dtypes:
        for d in head_dims:
            for rows_total in ROW_TILES:
                if use_mma(rows_total):
                    t = mma_tiles(rows_total, 1, head_dim=d, warp_size=facts.warp_size,
                                  max_smem=facts.max_smem_per_block, c_is_a=facts.c_is_a)
                    for paged in (False, True):
                        problem = DecodeProblem(dtype, 1, rows_total, 1, 1, d, 1, 16 if paged else 0)
                        out.append(_split_spec(problem, t, True))
                        if facts.clusters:
                            out += [_split_spec(problem, t, True, c) for c in WARMUP_CLUSTERS]
                    continue
                for paged, one_per_sm, block in layouts:
                    if paged and one_per_sm and rows_total > ONE_PER_SM_PAGED_MAX_ROWS:
                        continue  # two blocks per SM there (one_block_per_sm)
                    t = vector_tiles(rows_total, 1, head_dim=d, warp_size=facts.warp_size,
                                     max_smem=facts.max_smem_per_block, one_per_sm=one_per_sm, threads=block,
                                     paged=paged)
                    problem = DecodeProblem(dtype, 1, rows_total, 1, 1, d, 1, 16 if paged else 0)
                    out.append(_split_spec(problem, t, False))
                    if facts.clusters and block == DECODE_THREADS and (one_per_sm or not paged):
                        out += [_split_spec(problem, t, False, c) for c in WARMUP_CLUSTERS]
            out.append(spec("attention_decode", "combine", dtype=dtype, head_dim=d))
    return list(dict.fromkeys(out))  # unique, in order


def launch_of(s: KernelSpec, facts: ArchFacts) -> Launch | None:
    """Block size and dynamic shared memory a plan launches the attention kernel `s` with on a
    target of `facts` (clustered kernels: without the cluster request); None for another family."""
    p = dict(s.params)
    if s.family != "attention_decode":
        return None
    cluster = p.get("cluster", 1)
    if s.kernel == "naive":
        return Launch(128, 0, False, False)
    if s.kernel in ("split", "split_cluster"):
        smem = vector_smem_bytes(threads=p["threads"], warp_size=facts.warp_size, rows=p["rows"],
                                 head_dim=p["head_dim"], unroll=p["unroll"], stages=p["stages"], cluster=cluster,
                                 loader=p.get("loader", "dense"))
        return Launch(p["threads"], smem, p["stages"] > 0, False)
    if s.kernel in ("split_mma", "split_mma_cluster"):
        smem = mma_smem_bytes(threads=p["threads"], warp_size=facts.warp_size, rows=p["rows"],
                              head_dim=p["head_dim"], stages=p["stages"], c_is_a=facts.c_is_a, cluster=cluster,
                              loader=p.get("loader", "dense"))
        return Launch(p["threads"], smem, True, True)
    if s.kernel == "combine":
        return Launch(combine_threads(p["head_dim"]), 0, False, False)
    return None
