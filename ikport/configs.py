"""Launch configurations: the only place tuning choices live. Derived from the device's SM/CU
count and the shapes, never from a device name.
"""

from __future__ import annotations

from dataclasses import dataclass

# Decode defaults, measured on the H100 (docs/results/decode.md, decode-tuning2-h100.json).
DECODE_THREADS = 256
DECODE_UNROLL = 2  # KV rows per row group per step
DECODE_STAGES = 2  # 0: K/V loads straight to registers; >= 2: cp.async ring this deep
DECODE_ROW_TILES = (1, 2, 4, 8)  # query rows one block serves (GQA group x query tokens)
MIN_ROWS_PER_SPLIT = 64  # a split streams at least this many KV rows
# Decode blocks of 128 threads that fit on one SM/CU at once, by query-row tile, for backends
# that cannot query occupancy (compiler register counts ~100-170 -> 3-4 blocks per SM).
DECODE_BLOCKS_PER_SM = {1: 4, 2: 4, 4: 3, 8: 2}

# Benchmarks and tuning runs may pin any DecodeConfig field here (e.g. {"num_splits": 8});
# call ikport.attention.clear_plans() after changing it. Empty in normal use.
decode_overrides: dict[str, int] = {}


@dataclass(frozen=True)
class DecodeConfig:
    rows: int  # query rows per block (template parameter)
    row_tiles: int  # blocks per KV head along the query rows
    threads: int
    num_splits: int
    rows_per_split: int  # KV rows each split streams
    unroll: int = DECODE_UNROLL  # KV rows per row group per step (template parameter)
    stages: int = DECODE_STAGES  # async-copy pipeline depth (template parameter)


def decode_row_tile(rows_total: int) -> int:
    for r in DECODE_ROW_TILES:
        if rows_total <= r:
            return r
    return DECODE_ROW_TILES[-1]


def decode_rows(rows_total: int) -> tuple[int, int]:
    """(query rows per block, row tiles per KV head) for `rows_total` query rows per KV head
    (GQA group x query tokens); tuning runs may pin the rows ("rows" in decode_overrides)."""
    rows = decode_overrides.get("rows", decode_row_tile(rows_total))
    return rows, -(-rows_total // rows)


# One block per SM with a deeper ring, where every (sequence, KV head, row tile) group fits on the
# SMs at one block each (split-K then fills the SMs once): the same bytes in flight per SM as two
# blocks with 2 stages, but half the split partials to merge and half the prologues. Measured on
# the H100 against two blocks per SM with 2 stages, in the same rounds
# (docs/results/decode-ab-rule-h100.json): D1 54.66 -> 53.57 us, D3 55.55 -> 54.24, B=16 L=4096
# 96.83 -> 94.74 and L=1024 33.18 -> 30.58 (no split left), head_dim 64 33.02 -> 32.27. Only
# with async copies (the ring is what keeps the bytes in flight); not for splits shorter than
# SHORT_SPLIT_ROWS rows, which gained nothing (B=1 L=512, 64-row splits: 10.90 -> 11.44 us). Splits
# of exactly that many gain (decode-ab-split512-h100.json, A B B A): B=16 L=512 19.34 -> 18.72 us,
# B=8 L=1024 19.83 -> 19.28, B=1 L=8192 21.89 -> 20.91.
ONE_PER_SM_STAGES = 4
# Paged caches at one block per SM take 512 threads and 2 stages: the same 64 KB in flight per SM
# as 256 threads x 4 stages, in twice the warps. Each step's copies wait on block-table loads; at
# 8 warps an SM then stalls (D1-paged16: 56.6 us at 256 x 4 against 52.7 with the page ids computed,
# not loaded), at 16 it does not (51.6-52.0 us, in-order tables, decode-ab-lead-h100.json). Against
# two blocks per SM, shuffled tables: 56.48 -> 54.26 us (decode-ab-paged512-h100.json). Not at 8
# query rows, where 512 threads spill (their limit is 128 registers): those keep two blocks per SM.
ONE_PER_SM_PAGED_THREADS = 512
ONE_PER_SM_PAGED_STAGES = 2
ONE_PER_SM_PAGED_MAX_ROWS = 4
# The one-block-per-SM ring moves about 16-24 KB of K and V per step at its best. Head dims that
# leave lanes of a row group idle (80, 96, 192: 10 of 16, 12 of 16, 24 of 32 lanes busy) move less
# per step at 2 rows per row group, so they take 4 rows where that lands nearer ONE_PER_SM_STEP_BYTES.
# H100, B=8 L=4096, 2 rows -> 4 in A B B A order (decode-ab-unroll-h100.json): head_dim 80
# 49.0 -> 47.4 us, 96 48.9 -> 47.7, 192 93.5 -> 83.8; 112 (14 KB a step at 2 rows) loses at 4:
# 50.3 -> 52.2, as 128 does (16 KB; 53.1 -> 53.7, decode-ab-probe2-h100.json).
ONE_PER_SM_STEP_BYTES = 20 * 1024


def decode_one_per_sm_unroll(head_dim: int, threads: int, warp_size: int = 32) -> int:
    """Rows per row group per step (2 or 4) of the one-block-per-SM kernel: the one whose K+V
    bytes per step lie nearer ONE_PER_SM_STEP_BYTES (ties: 2)."""
    lanes = 1
    while lanes < head_dim // 8 and lanes < warp_size:
        lanes *= 2  # lanes per row group, as SplitConfig::kLPR
    def step_bytes(unroll: int) -> int:
        return threads // lanes * unroll * head_dim * 2 * 2  # row groups x rows x (K + V) x fp16
    return min((2, 4), key=lambda u: abs(step_bytes(u) - ONE_PER_SM_STEP_BYTES))


def decode_one_block_per_sm(*, groups: int, kv_capacity: int, sm_count: int, paged: bool,
                            async_copy: bool, rows: int = 1) -> bool:
    """Whether a decode launch of `groups` (sequence, KV head, row tile) groups of `rows` query
    rows over caches of `kv_capacity` rows runs one block per SM with the deeper ring (see above)."""
    if not async_copy or groups > sm_count or (paged and rows > ONE_PER_SM_PAGED_MAX_ROWS):
        return False
    splits = _wave_filling_splits(groups, kv_capacity, sm_count)
    return -(-kv_capacity // splits) >= SHORT_SPLIT_ROWS


# Caches of at most SMALL_BLOCK_MAX_ROWS rows with more groups than one wave of 256-thread blocks
# holds, but no more than twice that: 128-thread blocks (twice as many per SM) take them in one
# wave, where two waves of 256-thread blocks start and end in lockstep with DRAM idle between.
# H100, same rounds (docs/results/decode-ab-rows-h100.json): B=64 L=512 56.53 -> 53.97 us, L=1024
# 99.50 -> 97.39; long caches lose (B=64 L=4096 355.76 -> 361.73, decode-ab-onepersm-h100.json).
# Contiguous caches only (paged ones were not measured).
SMALL_BLOCK_MAX_ROWS = 1024
SMALL_BLOCK_THREADS = 128


def decode_blocks_per_sm(blocks_per_sm: int | None, rows: int, threads: int) -> int:
    """Blocks per SM: the backend's occupancy answer, else the DECODE_BLOCKS_PER_SM estimate."""
    return max(1, blocks_per_sm or DECODE_BLOCKS_PER_SM[rows] * 128 // threads)


def decode_small_blocks(*, groups: int, kv_capacity: int, slots: int, paged: bool) -> bool:
    """Whether to launch SMALL_BLOCK_THREADS-thread blocks (see above); `slots`: blocks of the
    default kernel the device holds at once."""
    return (not paged and "threads" not in decode_overrides
            and kv_capacity <= SMALL_BLOCK_MAX_ROWS and slots < groups <= 2 * slots)


def decode_tiles(group: int, q_len: int, *, head_dim: int = 128, warp_size: int = 32,
                 max_smem: int | None = None, one_per_sm: bool = False,
                 threads: int = DECODE_THREADS, paged: bool = False) -> tuple[int, int, int, int, int]:
    """(rows, row_tiles, threads, unroll, stages): the kernel template choice, before split-K.
    With `max_smem` (the target's per-block limit), 128 threads where 256 would not fit: the
    merge buffer grows with warps x rows x head_dim (gfx1100, wave32: 8 warps x 8 rows x 256
    dims needs 66 KB of its 64 KB LDS). `one_per_sm`: the one-block-per-SM ring (ONE_PER_SM_STAGES;
    paged: ONE_PER_SM_PAGED_THREADS threads, ONE_PER_SM_PAGED_STAGES stages)."""
    rows, row_tiles = decode_rows(group * q_len)
    paged_one_per_sm = one_per_sm and paged
    threads = decode_overrides.get("threads", ONE_PER_SM_PAGED_THREADS if paged_one_per_sm else threads)
    unroll = decode_overrides.get("unroll", decode_one_per_sm_unroll(head_dim, threads, warp_size)
                                  if one_per_sm else DECODE_UNROLL)
    stages = decode_overrides.get("stages", ONE_PER_SM_PAGED_STAGES if paged_one_per_sm
                                  else ONE_PER_SM_STAGES if one_per_sm else DECODE_STAGES)
    if max_smem is not None and "threads" not in decode_overrides:
        while threads > 128 and decode_smem_bytes(threads=threads, warp_size=warp_size, rows=rows,
                                                  head_dim=head_dim, unroll=unroll,
                                                  stages=stages) > max_smem:
            threads //= 2
    return rows, row_tiles, threads, unroll, stages


def decode_smem_bytes(*, threads: int, warp_size: int, rows: int, head_dim: int, unroll: int,
                      stages: int, cluster: int = 1) -> int:
    """Dynamic shared memory of attn_decode_split (mirrors SplitConfig::smem_bytes), and of
    attn_decode_split_cluster with `cluster` > 1 (+ SplitConfig::cluster_bytes)."""
    merge = threads // warp_size * rows * (head_dim + 2) * 4
    ring = stages * unroll * 2 * threads * 16
    return max(merge, ring) + (cluster * rows * (head_dim + 1) * 4 if cluster > 1 else 0)


# v11, decode on the matrix units (attn_decode_split_mma): each warp scores 16 K rows for up to
# 16 query rows with one matrix product, so it should pay off once a block serves several query
# rows (GQA group x query tokens). Four warps, each streaming its own ring of DECODE_MMA_STAGES
# tiles of 16 K/V rows (as deep as the target's shared memory allows): fewer warps with deeper
# rings keep the same bytes in flight (the premise; measured, each warp's chain of products and
# reductions per tile made it latency-bound at 4-8 warps an SM).
# DECODE_MMA_MIN_ROWS: the default plan takes it from blocks of this many query rows; None: on
# the H100 it ran slower than the vector kernel at GQA 4 (D1 54.9-55.1 us against 51.8-52.4, D3
# 56.4-58.6 against 53.6-54.4, B=16 L=512 19.6-20.0 against 18.4-19.0: decode-ab-mma*-h100.json,
# decode.md v11), so it stays the journey variant "split-mma" (or decode_overrides["mma"] = 1).
DECODE_MMA_MIN_ROWS: int | None = None
DECODE_MMA_WARPS = 4
DECODE_MMA_STAGES = 6
MMA_TILE_ROWS = 16  # K/V rows per ring tile (MmaConfig::kTile)
C_TO_A_LD = 24  # ik::mma::kCToALd: the per-warp scratch rows where C is not A's layout (AMD)


def decode_use_mma(rows: int) -> bool:
    """Whether the default decode plan takes the matrix-unit kernel for blocks of `rows` query
    rows (decode_rows). Override: "mma" in decode_overrides (0 or 1)."""
    default = DECODE_MMA_MIN_ROWS is not None and rows >= DECODE_MMA_MIN_ROWS
    return bool(decode_overrides.get("mma", default))


def decode_mma_smem_bytes(*, threads: int, warp_size: int, rows: int, head_dim: int, stages: int,
                          c_is_a: bool, cluster: int = 1) -> int:
    """Dynamic shared memory of attn_decode_split_mma (mirrors MmaConfig::smem_bytes), and of its
    clustered kernel with `cluster` > 1. `c_is_a`: the target keeps P in registers (NVIDIA)."""
    warps, ld = threads // warp_size, head_dim + 8
    stream = (warps * stages * 2 * MMA_TILE_ROWS * ld * 2 + 16 * ld * 2
              + (0 if c_is_a else warps * 16 * C_TO_A_LD * 2))
    merge = warps * rows * (head_dim + 2) * 4
    return max(merge, stream) + (cluster * rows * (head_dim + 1) * 4 if cluster > 1 else 0)


def decode_mma_tiles(group: int, q_len: int, *, head_dim: int, warp_size: int, max_smem: int,
                     c_is_a: bool) -> tuple[int, int, int, int, int]:
    """(rows, row_tiles, threads, unroll, stages) of the matrix-unit kernel (unroll unused: 1):
    DECODE_MMA_WARPS warps with the deepest ring up to DECODE_MMA_STAGES that fits `max_smem`;
    where even 2 stages do not fit (64 KB of LDS at head_dim 128), half the warps, and so on.
    Overrides: "threads", "stages", "rows"."""
    rows, row_tiles = decode_rows(group * q_len)
    threads = decode_overrides.get("threads", DECODE_MMA_WARPS * warp_size)
    stages = decode_overrides.get("stages", DECODE_MMA_STAGES)

    def fits(threads: int, stages: int) -> bool:
        return decode_mma_smem_bytes(threads=threads, warp_size=warp_size, rows=rows, head_dim=head_dim,
                                     stages=stages, c_is_a=c_is_a) <= max_smem

    if "threads" not in decode_overrides:
        while threads > warp_size and not fits(threads, 2):
            threads //= 2
    if "stages" not in decode_overrides:
        while stages > 2 and not fits(threads, stages):
            stages -= 1
    return rows, row_tiles, threads, 1, stages


# Split-K groups of at most MAX_CLUSTER splits merge inside a block cluster where the target has
# clusters (attn_decode_split_cluster): the partial results go to one block's shared memory, not
# through global memory, counters and a fence. Only launches of at most one block per SM: the
# launch then asks for enough shared memory that no SM takes two blocks (a cluster's blocks may
# otherwise share an SM while others idle), and the planner keeps it only if the driver says
# every cluster is resident at once (a cluster's blocks share a GPC, so fewer clusters of 4 than
# SMs / 4 may fit). H100, in A B B A order (decode-ab-cluster-h100.json): D1 53.43 -> 52.52 us,
# bf16 53.94 -> 52.49, head_dim 96 44.94 -> 44.24, B=1 L=512 (8 splits) 10.69 -> 9.20; without
# those two guards B=4 L=4096 (4 splits) went 31.74 -> 42.75 and D1-paged16 (256 blocks) 56.3 -> 78.7.
# With them (decode-ab-cluster2-h100.json, another host): D1 52.00 -> 50.90, B=1 L=512 10.58 -> 9.44;
# B=4 at L=512 and 4096 keep the global merge (the driver fits fewer than 32 clusters of 4).
# Past 8 blocks a cluster is a non-portable size (the H100 allows 16), opted in at load.
MAX_CLUSTER = 16


def decode_cluster(num_splits: int, *, clusters: bool, blocks: int, sm_count: int) -> int:
    """Blocks per cluster for a split-K launch of `blocks` blocks in `num_splits` splits:
    num_splits where the target has clusters, it is 2..MAX_CLUSTER and the blocks fit one per SM,
    else 1 (merge through global memory). Override: "cluster" in decode_overrides (1: off)."""
    if not clusters or not 2 <= num_splits <= MAX_CLUSTER or blocks > sm_count:
        return 1
    return num_splits if decode_overrides.get("cluster", num_splits) > 1 else 1


# Short splits (under SHORT_SPLIT_ROWS rows) whose clusters the driver cannot fit all at once take
# one split less where that count's clusters do fit: the cluster merge saves more than the SMs
# left idle cost. H100, B=4 x 8 KV heads, 4 splits (128 blocks, global merge) against 3 (96 blocks
# in clusters of 3), A B B A (decode-ab-b4s3-h100.json): L=512 12.84 -> 12.09 us, L=1024 15.83 ->
# 15.03; long splits lose (L=4096, 1024-row splits: 32.22 -> 34.72), so they keep theirs.
def decode_fewer_splits_for_clusters(num_splits: int, rows_per_split: int) -> int | None:
    """The split count to try when `num_splits` splits cannot merge in resident clusters, or None."""
    if rows_per_split >= SHORT_SPLIT_ROWS or num_splits <= 2 or "num_splits" in decode_overrides:
        return None
    return num_splits - 1


def decode_cluster_smem(smem: int, max_smem_per_sm: int) -> int:
    """Shared memory a clustered launch asks for: at least half the SM's and one byte, so no SM
    holds two of its blocks."""
    return max(smem, max_smem_per_sm // 2 + 1)


def decode_combine_threads(head_dim: int) -> int:
    """Block of attn_decode_combine (the separate split-K merge): a merge pair per 4 output dims,
    at least 64 threads, whole 64-lane waves (mirrors its __launch_bounds__)."""
    return -(-max(head_dim, 64) // 64) * 64


GOOD_WAVE_UTILIZATION = 0.95  # take the fewest splits that keep the waves this full


def _rounded_splits(kv_capacity: int, splits: int) -> int:
    """Splits actually launched once each split's rows are rounded up to whole 16-row steps."""
    rows = -(-(-(-kv_capacity // splits)) // 16) * 16
    return -(-kv_capacity // rows)


def wave_utilization(blocks: int, slots: int) -> float:
    """Fraction of the SM slots busy over the waves `blocks` need (1.0: every wave full)."""
    waves = -(-blocks // slots)
    return blocks / (waves * slots)


# A split shorter than this is latency-bound (a few ring steps between a prologue and a merge):
# one block per SM streams it as fast as two do, and the second block per SM only adds merges.
# Measured on the H100 (decode-ab-configs-h100-run2.json): B=16 L=512 19.7 us in 1 split against
# 24.5 us in the 2 that fill both slots of every SM; B=4 L=512 13.8 us in 4 splits against 15.5
# in 8; B=1 L=4096 keeps its 16 splits (128 blocks: 17.4 us; 8 splits 21.0).
SHORT_SPLIT_ROWS = 512


def _wave_filling_splits(base_blocks: int, kv_capacity: int, slots: int) -> int:
    """Fewest splits whose blocks fill `slots`-sized waves to GOOD_WAVE_UTILIZATION (else the
    best filling), within the split-length limits."""
    # Short splits pay a fixed cost per block and a longer merge: at most 16 splits of fewer
    # than 256 rows (H100, B=1: L=512 12.2 us with 8 splits vs 15.4 with 2; L=4096 19.2 us
    # with 16 splits vs 22.5 with 32).
    max_splits = max(1, min(kv_capacity // MIN_ROWS_PER_SPLIT, 16), kv_capacity // 256)
    best = (0.0, 1)
    for s in range(1, min(max_splits, 4 * -(-slots // base_blocks)) + 1):
        util = wave_utilization(base_blocks * _rounded_splits(kv_capacity, s), slots)
        if util >= GOOD_WAVE_UTILIZATION:
            return s
        best = max(best, (util, s), key=lambda b: b[0])
    return best[1]


def decode_config(
    *, sm_count: int, blocks_per_sm: int | None, batch: int, kv_heads: int, group: int,
    q_len: int, kv_capacity: int, num_splits: int | None = None, one_per_sm: bool = False,
    tiles: tuple[int, int, int, int, int] | None = None,
) -> DecodeConfig:
    """Split-K count from the SM count and the kernel's occupancy: every block streams an equal
    chunk, so the time is set by the number of waves; pick the split count whose blocks fill the
    waves best (fewest splits on ties), keeping each split at least MIN_ROWS_PER_SPLIT rows.
    Measured on the H100 (D3): 384 blocks in 396 slots 62 us, 400 blocks 83 us. Splits shorter
    than SHORT_SPLIT_ROWS fill one block per SM instead; so does `one_per_sm` (see
    decode_one_block_per_sm), with the deeper ring. `tiles`: the launched kernel's decode_tiles
    (default: computed here without a shared-memory limit)."""
    rows, row_tiles, threads, unroll, stages = tiles or decode_tiles(group, q_len, one_per_sm=one_per_sm)
    base_blocks = batch * kv_heads * row_tiles
    num_splits = decode_overrides.get("num_splits", num_splits)
    if num_splits is None:
        per_sm = 1 if one_per_sm else decode_blocks_per_sm(blocks_per_sm, rows, threads)
        num_splits = _wave_filling_splits(base_blocks, kv_capacity, sm_count * per_sm)
        if per_sm > 1 and -(-kv_capacity // num_splits) < SHORT_SPLIT_ROWS:
            num_splits = _wave_filling_splits(base_blocks, kv_capacity, sm_count)
    num_splits = _rounded_splits(kv_capacity, max(1, min(num_splits, kv_capacity)))
    rows_per_split = -(-kv_capacity // num_splits)
    rows_per_split = -(-rows_per_split // 16) * 16
    return DecodeConfig(rows, row_tiles, threads, num_splits, rows_per_split, unroll, stages)


# ---- W4A16 (kernels_src/w4a16.cuh) ---------------------------------------------------------------
W4A16_GEMV_WARPS = 4  # journey GEMV variants: warps splitting K per 16-column tile
W4A16_WARPS = 8  # matrix-unit kernel: warps splitting the block's K range (fewer where shared memory is short)
W4A16_N_TILES = 2  # 16-column tiles per block: 32 output columns
W4A16_M_TILES = (1, 2)  # 16-row tiles of x per block (M > 32 adds blocks along M; 4 spills on gfx1100)
W4A16_WARPS_PER_SM = 6  # split K across blocks below this many warps per SM (w4a16-tuning-v7d-h100.json)
W4A16_MIN_CHUNKS_PER_WARP = 2  # split K across blocks only while each warp keeps this many chunks
# From this many rows of x, dequantize to a dense weight once and use the vendor's GEMM
# (prefill-sized M: the product is compute-bound and a tuned dense GEMM wins).
W4A16_DENSE_MIN_M = 128


def w4a16_group_tiles(group_size: int) -> int:
    """The matrix-unit kernel's GT: 16-k tiles per quantization group, capped at 8 (a group of 128
    or more spans a whole chunk on every target, so its scales apply once per chunk)."""
    return min(group_size // 16, 8)


def w4a16_stages(block_threads: int, n_tiles: int) -> int:
    """Weight-ring slots per lane of the matrix-unit kernel: 4 (w4a16-tuning-v7e-h100.json), fewer
    where the ring would pass 32 KB (the kernel applies the same cap). Override: "stages"."""
    want = w4a16_overrides.get("stages", 4)
    return min(want, 32768 // (n_tiles * block_threads * 16))


# Benchmarks and tuning runs may pin any W4A16Config field here; clear ikport.w4a16._plans after.
w4a16_overrides: dict[str, int] = {}


@dataclass(frozen=True)
class W4A16Config:
    m_tiles: int
    n_tiles: int
    warps: int
    num_splits: int
    chunks_per_split: int
    grid: tuple[int, int, int]  # (column blocks, splits, row blocks)


def w4a16_config(*, m: int, n: int, k: int, chunk_k: int, sm_count: int,
                 num_splits: int | None = None) -> W4A16Config:
    """Tiles, warps and split-K for the matrix-unit kernel. The weights dominate every
    decode-sized M, so the grid must hold enough warps to keep every SM streaming."""
    o = w4a16_overrides
    m_tiles = o.get("m_tiles") or next((t for t in W4A16_M_TILES if m <= 16 * t), W4A16_M_TILES[-1])
    n_tiles = o.get("n_tiles", W4A16_N_TILES)
    col_blocks = -(-n // (16 * n_tiles))
    row_blocks = -(-m // (16 * m_tiles))
    chunks = k // chunk_k
    target = o.get("warps_per_sm", W4A16_WARPS_PER_SM) * sm_count
    # Blocks of 8 warps that split K inside the block and add up in shared memory; split K across
    # blocks (partial sums in memory, a counter, a last-block merge) only for few output tiles:
    # on the H100, 8 warps without split beat 4 warps (+ split) at W1/W3 for M = 1..32 and at
    # W2 for M = 16; W2 at M = 1-4 and 32 is 2-6% faster with 4 (w4a16-tuning-v7d/e-h100.json).
    warps = o.get("warps") or W4A16_WARPS
    num_splits = o.get("num_splits", num_splits)
    if num_splits is None:
        num_splits = -(-target // (col_blocks * row_blocks * warps))
        num_splits = min(num_splits, max(1, chunks // (W4A16_MIN_CHUNKS_PER_WARP * warps)))
    num_splits = max(1, min(num_splits, chunks))
    per_split = -(-chunks // num_splits)
    num_splits = -(-chunks // per_split)  # no empty splits
    return W4A16Config(m_tiles, n_tiles, warps, num_splits, per_split,
                       (col_blocks, num_splits, row_blocks))
