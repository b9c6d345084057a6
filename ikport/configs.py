"""Launch configurations: the only place tuning choices live. Derived from the device's SM/CU
count and the shapes, never from a device name.
"""

from __future__ import annotations

from dataclasses import dataclass

DECODE_THREADS = 128
DECODE_ROW_TILES = (1, 2, 4, 8)  # query rows one block serves (GQA group x query tokens)
# Each split should stream at least this many KV rows, so the merge stays a small fraction.
MIN_ROWS_PER_SPLIT = 256
# Decode blocks that fit on one SM/CU at once, by query-row tile (from the compiler's register
# counts at 128 threads: ~100-170 registers -> 3-4 blocks per SM on sm_80/sm_90).
DECODE_BLOCKS_PER_SM = {1: 4, 2: 4, 4: 3, 8: 2}


# Benchmarks and tuning runs may pin any DecodeConfig field here (e.g. {"num_splits": 8});
# the dispatcher's plan cache must be cleared after changing it. Empty in normal use.
decode_overrides: dict[str, int] = {}
DECODE_UNROLL = 4
DECODE_ROTATE = 0


@dataclass(frozen=True)
class DecodeConfig:
    rows: int  # query rows per block (template parameter)
    row_tiles: int  # blocks per KV head along the query rows
    threads: int
    num_splits: int
    rows_per_split: int  # KV rows each split streams
    unroll: int = DECODE_UNROLL  # KV rows per row group per step (template parameter)
    rotate: int = DECODE_ROTATE  # stagger each block's start within its split


def decode_row_tile(rows_total: int) -> int:
    for r in DECODE_ROW_TILES:
        if rows_total <= r:
            return r
    return DECODE_ROW_TILES[-1]


def decode_config(
    *, sm_count: int, batch: int, kv_heads: int, group: int, q_len: int, kv_capacity: int,
    num_splits: int | None = None,
) -> DecodeConfig:
    """Split-K so that blocks fill every SM about once: each block streams a contiguous chunk."""
    num_splits = decode_overrides.get("num_splits", num_splits)
    threads = decode_overrides.get("threads", DECODE_THREADS)
    rows_total = group * q_len
    rows = decode_row_tile(rows_total)
    row_tiles = -(-rows_total // rows)
    base_blocks = batch * kv_heads * row_tiles
    if num_splits is None:
        slots = sm_count * DECODE_BLOCKS_PER_SM[rows] * DECODE_THREADS // threads
        num_splits = max(1, round(slots / base_blocks))
        num_splits = min(num_splits, max(1, kv_capacity // MIN_ROWS_PER_SPLIT))
    num_splits = max(1, min(num_splits, kv_capacity))
    rows_per_split = -(-kv_capacity // num_splits)
    rows_per_split = -(-rows_per_split // 16) * 16  # whole steps of the row groups
    num_splits = -(-kv_capacity // rows_per_split)
    return DecodeConfig(
        rows, row_tiles, threads, num_splits, rows_per_split,
        decode_overrides.get("unroll", DECODE_UNROLL), decode_overrides.get("rotate", DECODE_ROTATE),
    )
