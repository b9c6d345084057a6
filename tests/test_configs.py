"""Launch heuristics (CPU): split-K fills the SMs' waves, from the SM count, not a device name."""

import pytest

from ikport import configs


def cfg(B, L, sm=132, per_sm=3, group=4, q_len=1):
    return configs.decode_config(sm_count=sm, blocks_per_sm=per_sm, batch=B, kv_heads=8,
                                 group=group, q_len=q_len, kv_capacity=L)


def test_split_count_fills_the_waves():
    # H100-like: 132 SMs x 3 blocks. Measured: D3 with 384 blocks 62 us, with 400 blocks 83 us.
    for B, L in [(8, 4096), (32, 8192), (1, 32768), (4, 131072)]:
        c = cfg(B, L)
        blocks = B * 8 * c.num_splits
        assert configs.wave_utilization(blocks, 132 * 3) >= configs.GOOD_WAVE_UTILIZATION, (B, L, c)
        assert c.rows_per_split * c.num_splits >= L and c.rows_per_split % 16 == 0


def test_split_count_scales_with_the_sm_count():
    assert cfg(1, 32768, sm=108).num_splits < cfg(1, 32768, sm=132).num_splits


def test_short_caches_are_not_split_below_the_minimum():
    c = cfg(1, 300)
    assert c.num_splits == 300 // configs.MIN_ROWS_PER_SPLIT
    assert cfg(1, configs.MIN_ROWS_PER_SPLIT - 1).num_splits == 1


def test_row_tiles_cover_gqa_group_times_query_tokens():
    c = cfg(2, 4096, group=8, q_len=3)  # 24 query rows per KV head -> 3 tiles of 8
    assert (c.rows, c.row_tiles) == (8, 3)
    assert cfg(2, 4096, group=1).rows == 1


def test_threads_drop_to_128_where_the_merge_buffer_would_not_fit():
    # gfx1100 (wave32, 64 KiB LDS): 8 warps x 8 rows x (256 + 2) x 4 B = 66 KB > 64 KiB.
    rows, _, threads, _, _ = configs.decode_tiles(8, 1, head_dim=256, warp_size=32, max_smem=65536)
    assert (rows, threads) == (8, 128)
    # the same shape on an H100 (227 KiB) and a smaller head dim on gfx1100 keep 256 threads
    assert configs.decode_tiles(8, 1, head_dim=256, warp_size=32, max_smem=227 * 1024)[2] == 256
    assert configs.decode_tiles(8, 1, head_dim=128, warp_size=32, max_smem=65536)[2] == 256


def test_short_splits_fill_one_block_per_sm_not_every_slot():
    # Filling 2 blocks x 132 SMs would cut these into splits under SHORT_SPLIT_ROWS rows.
    assert cfg(16, 512, per_sm=2).num_splits == 1  # 128 blocks
    assert cfg(4, 512, per_sm=2).num_splits == 4  # 128 blocks of 128 rows, not 256 of 64
    assert cfg(1, 4096, per_sm=2).num_splits == 16  # 128 blocks either way
    # Long splits keep filling every slot: D1, D3.
    assert cfg(8, 4096, per_sm=2).num_splits == 4
    assert cfg(1, 32768, per_sm=2).num_splits == 32


def test_groups_that_fit_the_sms_run_one_block_per_sm_with_a_deeper_ring():
    one = dict(sm_count=132, kv_capacity=4096, paged=False, async_copy=True)
    assert configs.decode_one_block_per_sm(groups=64, **one)  # D1: 8 sequences x 8 KV heads
    assert configs.decode_one_block_per_sm(groups=128, **one)
    assert not configs.decode_one_block_per_sm(groups=256, **one)  # two per SM, no split already
    # paged caches too, up to 4 query rows a block (512 threads at 8 rows would spill)
    assert configs.decode_one_block_per_sm(groups=64, **{**one, "paged": True}, rows=4)
    assert not configs.decode_one_block_per_sm(groups=64, **{**one, "paged": True}, rows=8)
    assert configs.decode_one_block_per_sm(groups=64, **one, rows=8)
    assert not configs.decode_one_block_per_sm(groups=64, **{**one, "async_copy": False})
    # Splits shorter than SHORT_SPLIT_ROWS rows keep the 2-stage ring: B=1 L=4096 (16 x 256 rows),
    # B=4 L=512 (4 x 128); B=16 L=512 (one split of 512) and L=1024 take the deeper one.
    assert not configs.decode_one_block_per_sm(groups=8, **one)
    assert not configs.decode_one_block_per_sm(groups=32, **{**one, "kv_capacity": 512})
    assert configs.decode_one_block_per_sm(groups=128, **{**one, "kv_capacity": 512})
    assert configs.decode_one_block_per_sm(groups=128, **{**one, "kv_capacity": 1024})
    assert configs.decode_tiles(4, 1, one_per_sm=True)[4] == configs.ONE_PER_SM_STAGES
    assert configs.decode_tiles(4, 1)[4] == configs.DECODE_STAGES
    # paged: 512 threads x 2 stages, the same bytes in flight as 256 x 4 in twice the warps
    _, _, threads, unroll, stages = configs.decode_tiles(4, 1, one_per_sm=True, paged=True)
    assert (threads, unroll, stages) == (configs.ONE_PER_SM_PAGED_THREADS, 2, configs.ONE_PER_SM_PAGED_STAGES)
    assert configs.decode_tiles(4, 1, paged=True)[2] == configs.DECODE_THREADS
    configs.decode_overrides["threads"] = 256
    try:
        assert configs.decode_tiles(4, 1, one_per_sm=True, paged=True)[2] == 256
    finally:
        configs.decode_overrides.clear()

    def one_per_sm(B, L):
        return configs.decode_config(sm_count=132, blocks_per_sm=2, batch=B, kv_heads=8, group=4,
                                     q_len=1, kv_capacity=L, one_per_sm=True)
    # Splits fill the SMs once: D1 2 x 64 blocks, D3 16 x 8, B=16 no split (128 blocks).
    assert one_per_sm(8, 4096).num_splits == 2
    assert one_per_sm(1, 32768).num_splits == 16
    assert one_per_sm(16, 4096).num_splits == 1
    assert one_per_sm(8, 4096).stages == configs.ONE_PER_SM_STAGES


def test_one_block_per_sm_takes_four_rows_a_step_where_idle_lanes_shrink_the_step():
    # K+V bytes a step at 2 rows per row group, 256 threads: 80 -> 10 KB, 96 -> 12 KB, 112 -> 14,
    # 128 -> 16, 192 -> 12 (24 of 32 lanes busy); 4 rows where that lands nearer 20 KB.
    unroll = {d: configs.decode_tiles(4, 1, head_dim=d, one_per_sm=True)[3] for d in (64, 80, 96, 112, 128, 192, 256)}
    assert unroll == {64: 2, 80: 4, 96: 4, 112: 2, 128: 2, 192: 4, 256: 2}
    # the two-blocks-per-SM kernel and explicit overrides keep theirs
    assert configs.decode_tiles(4, 1, head_dim=96)[3] == configs.DECODE_UNROLL
    configs.decode_overrides["unroll"] = 2
    try:
        assert configs.decode_tiles(4, 1, head_dim=96, one_per_sm=True)[3] == 2
    finally:
        configs.decode_overrides.clear()


def test_split_groups_of_up_to_eight_merge_in_a_cluster_where_the_target_has_clusters():
    one = dict(clusters=True, blocks=128, sm_count=132)
    assert [configs.decode_cluster(s, **one) for s in (1, 2, 5, 8, 9, 16, 17)] == [1, 2, 5, 8, 9, 16, 1]
    assert configs.decode_cluster(4, **{**one, "clusters": False}) == 1
    assert configs.decode_cluster(4, **{**one, "blocks": 256}) == 1  # two blocks per SM: no
    configs.decode_overrides["cluster"] = 1
    try:
        assert configs.decode_cluster(4, **one) == 1
    finally:
        configs.decode_overrides.clear()
    # a clustered launch asks for more than half an SM's shared memory: one block per SM
    assert configs.decode_cluster_smem(70000, 228 * 1024) == 114 * 1024 + 1
    assert configs.decode_cluster_smem(200000, 228 * 1024) == 200000
    base = dict(threads=256, warp_size=32, rows=4, head_dim=128, unroll=2, stages=4)
    assert configs.decode_smem_bytes(**base, cluster=2) == configs.decode_smem_bytes(**base) + 2 * 4 * 129 * 4


def test_short_caches_with_two_waves_of_groups_take_128_thread_blocks():
    # H100-like: 132 SMs x 2 blocks of 256 threads = 264 slots.
    small = dict(slots=264, paged=False)
    assert configs.decode_small_blocks(groups=512, kv_capacity=512, **small)  # B=64 L=512
    assert configs.decode_small_blocks(groups=512, kv_capacity=1024, **small)
    assert not configs.decode_small_blocks(groups=512, kv_capacity=4096, **small)  # long: 256 wins
    assert not configs.decode_small_blocks(groups=256, kv_capacity=512, **small)  # one wave already
    assert not configs.decode_small_blocks(groups=1024, kv_capacity=512, **small)  # not measured
    assert not configs.decode_small_blocks(groups=512, kv_capacity=512, slots=264, paged=True)
    assert configs.decode_tiles(4, 1, threads=configs.SMALL_BLOCK_THREADS)[2] == 128


def test_decode_config_keeps_the_launched_kernels_tiles():
    # gfx1100-like: the merge buffer of 8 rows x head_dim 256 forces 128 threads; the split count
    # must be planned for the kernel actually launched, not a recomputed 256-thread one.
    tiles = configs.decode_tiles(8, 1, head_dim=256, warp_size=32, max_smem=65536)
    c = configs.decode_config(sm_count=48, blocks_per_sm=None, batch=2, kv_heads=4, group=8,
                              q_len=1, kv_capacity=8192, tiles=tiles)
    assert (c.rows, c.threads) == (8, 128)


def test_short_splits_try_one_split_less_for_resident_clusters():
    assert configs.decode_fewer_splits_for_clusters(4, 128) == 3  # B=4 L=512
    assert configs.decode_fewer_splits_for_clusters(4, 1024) is None  # long splits keep theirs
    assert configs.decode_fewer_splits_for_clusters(2, 256) is None  # no cluster below 2 splits
    configs.decode_overrides["num_splits"] = 4
    try:
        assert configs.decode_fewer_splits_for_clusters(4, 128) is None  # an explicit split count stays
    finally:
        configs.decode_overrides.clear()


@pytest.mark.parametrize("warp_size,max_smem,c_is_a", [(32, 227 * 1024, True), (32, 99 * 1024, True),
                                                       (64, 64 * 1024, False), (32, 64 * 1024, False)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_mma_tiles_fit_the_targets_shared_memory(warp_size, max_smem, c_is_a, head_dim):
    """The matrix-unit kernel's ring shrinks to the target: stages first, then warps (64 KB of LDS
    cannot hold 4 waves x 2 tiles at head_dim 128)."""
    rows, _, threads, _, stages = configs.decode_mma_tiles(4, 1, head_dim=head_dim, warp_size=warp_size,
                                                           max_smem=max_smem, c_is_a=c_is_a)
    smem = configs.decode_mma_smem_bytes(threads=threads, warp_size=warp_size, rows=rows, head_dim=head_dim,
                                         stages=stages, c_is_a=c_is_a)
    assert smem <= max_smem and 2 <= stages <= configs.DECODE_MMA_STAGES and threads % warp_size == 0
    if threads < configs.DECODE_MMA_WARPS * warp_size:  # fewer warps only where 2 stages did not fit
        assert configs.decode_mma_smem_bytes(threads=threads * 2, warp_size=warp_size, rows=rows,
                                             head_dim=head_dim, stages=2, c_is_a=c_is_a) > max_smem
    elif stages < configs.DECODE_MMA_STAGES:  # the deepest ring that fits
        assert configs.decode_mma_smem_bytes(threads=threads, warp_size=warp_size, rows=rows,
                                             head_dim=head_dim, stages=stages + 1, c_is_a=c_is_a) > max_smem


def test_mma_smem_mirrors_the_kernel_layout():
    # 4 warps x 6 stages x (K + V) x 16 rows x (128 + 8) halves, + Q's 16 rows; AMD adds 4 x 16 x 24 halves
    nv = configs.decode_mma_smem_bytes(threads=128, warp_size=32, rows=4, head_dim=128, stages=6, c_is_a=True)
    assert nv == 4 * 6 * 2 * 16 * 136 * 2 + 16 * 136 * 2
    amd = configs.decode_mma_smem_bytes(threads=128, warp_size=32, rows=4, head_dim=128, stages=6, c_is_a=False)
    assert amd - nv == 4 * 16 * 24 * 2
    assert configs.decode_mma_smem_bytes(threads=128, warp_size=32, rows=4, head_dim=128, stages=6, c_is_a=True,
                                         cluster=2) == nv + 2 * 4 * 129 * 4


def test_mma_is_opt_in(monkeypatch):
    assert configs.DECODE_MMA_MIN_ROWS is None and not configs.decode_use_mma(8)
    monkeypatch.setitem(configs.decode_overrides, "mma", 1)
    assert configs.decode_use_mma(1)
    monkeypatch.setattr(configs, "DECODE_MMA_MIN_ROWS", 4)
    monkeypatch.setitem(configs.decode_overrides, "mma", 0)
    assert not configs.decode_use_mma(8)
    monkeypatch.delitem(configs.decode_overrides, "mma")
    assert configs.decode_use_mma(4) and not configs.decode_use_mma(2)
