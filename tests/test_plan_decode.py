"""The decode planner (CPU, pure): split-K fills the SMs' waves, from the SM count and the
kernel's occupancy, never a device name; launch rules; options pin choices; whole plans."""

import pytest

from ikport.backends.base import DeviceInfo
from ikport.backends.target import Target
from ikport.plan import decode as P
from ikport.plan.decode import DecodeOptions, DecodeProblem


def cfg(B, L, sm=132, per_sm=3, group=4, q_len=1, options=DecodeOptions()):
    tiles = P.vector_tiles(group, q_len, options=options)
    s = P.split(sm_count=sm, occupancy=per_sm, groups=B * 8 * tiles.row_tiles, kv_capacity=L, tiles=tiles,
                options=options)
    return tiles, s


def test_split_count_fills_the_waves():
    # H100-like: 132 SMs x 3 blocks. Measured: D3 with 384 blocks 62 us, with 400 blocks 83 us.
    for B, L in [(8, 4096), (32, 8192), (1, 32768), (4, 131072)]:
        _, c = cfg(B, L)
        blocks = B * 8 * c.num_splits
        assert P.wave_utilization(blocks, 132 * 3) >= P.GOOD_WAVE_UTILIZATION, (B, L, c)
        assert c.rows_per_split * c.num_splits >= L and c.rows_per_split % 16 == 0


def test_split_count_scales_with_the_sm_count():
    assert cfg(1, 32768, sm=108)[1].num_splits < cfg(1, 32768, sm=132)[1].num_splits


def test_short_caches_are_not_split_below_the_minimum():
    assert cfg(1, 300)[1].num_splits == 300 // P.MIN_ROWS_PER_SPLIT
    assert cfg(1, P.MIN_ROWS_PER_SPLIT - 1)[1].num_splits == 1


def test_row_tiles_cover_gqa_group_times_query_tokens():
    t, _ = cfg(2, 4096, group=8, q_len=3)  # 24 query rows per KV head -> 3 tiles of 8
    assert (t.rows, t.row_tiles) == (8, 3)
    assert cfg(2, 4096, group=1)[0].rows == 1
    assert P.rows(24, DecodeOptions(rows=4)) == (4, 6)


def test_threads_drop_to_128_where_the_merge_buffer_would_not_fit():
    # gfx1100 (wave32, 64 KiB LDS): 8 warps x 8 rows x (256 + 2) x 4 B = 66 KB > 64 KiB.
    t = P.vector_tiles(8, 1, head_dim=256, warp_size=32, max_smem=65536)
    assert (t.rows, t.threads) == (8, 128)
    # the same shape on an H100 (227 KiB) and a smaller head dim on gfx1100 keep 256 threads
    assert P.vector_tiles(8, 1, head_dim=256, warp_size=32, max_smem=227 * 1024).threads == 256
    assert P.vector_tiles(8, 1, head_dim=128, warp_size=32, max_smem=65536).threads == 256


def test_short_splits_fill_one_block_per_sm_not_every_slot():
    # Filling 2 blocks x 132 SMs would cut these into splits under SHORT_SPLIT_ROWS rows.
    assert cfg(16, 512, per_sm=2)[1].num_splits == 1  # 128 blocks
    assert cfg(4, 512, per_sm=2)[1].num_splits == 4  # 128 blocks of 128 rows, not 256 of 64
    assert cfg(1, 4096, per_sm=2)[1].num_splits == 16  # 128 blocks either way
    # Long splits keep filling every slot: D1, D3.
    assert cfg(8, 4096, per_sm=2)[1].num_splits == 4
    assert cfg(1, 32768, per_sm=2)[1].num_splits == 32


def test_groups_that_fit_the_sms_run_one_block_per_sm_with_a_deeper_ring():
    one = dict(sm_count=132, kv_capacity=4096, paged=False, async_copy=True)
    assert P.one_block_per_sm(groups=64, **one)  # D1: 8 sequences x 8 KV heads
    assert P.one_block_per_sm(groups=128, **one)
    assert not P.one_block_per_sm(groups=256, **one)  # two per SM, no split already
    # paged caches too, up to 4 query rows a block (512 threads at 8 rows would spill)
    assert P.one_block_per_sm(groups=64, **{**one, "paged": True}, rows=4)
    assert not P.one_block_per_sm(groups=64, **{**one, "paged": True}, rows=8)
    assert P.one_block_per_sm(groups=64, **one, rows=8)
    assert not P.one_block_per_sm(groups=64, **{**one, "async_copy": False})
    # Splits shorter than SHORT_SPLIT_ROWS rows keep the 2-stage ring: B=1 L=4096 (16 x 256 rows),
    # B=4 L=512 (4 x 128); B=16 L=512 (one split of 512) and L=1024 take the deeper one.
    assert not P.one_block_per_sm(groups=8, **one)
    assert not P.one_block_per_sm(groups=32, **{**one, "kv_capacity": 512})
    assert P.one_block_per_sm(groups=128, **{**one, "kv_capacity": 512})
    assert P.one_block_per_sm(groups=128, **{**one, "kv_capacity": 1024})
    assert P.vector_tiles(4, 1, one_per_sm=True).stages == P.ONE_PER_SM_STAGES
    assert P.vector_tiles(4, 1).stages == P.DECODE_STAGES
    # paged: 512 threads x 2 stages, the same bytes in flight as 256 x 4 in twice the warps
    t = P.vector_tiles(4, 1, one_per_sm=True, paged=True)
    assert (t.threads, t.unroll, t.stages) == (P.ONE_PER_SM_PAGED_THREADS, 2, P.ONE_PER_SM_PAGED_STAGES)
    assert P.vector_tiles(4, 1, paged=True).threads == P.DECODE_THREADS
    assert P.vector_tiles(4, 1, one_per_sm=True, paged=True, options=DecodeOptions(threads=256)).threads == 256

    def one_per_sm(B, L):
        tiles = P.vector_tiles(4, 1, one_per_sm=True)
        return P.split(sm_count=132, occupancy=2, groups=B * 8, kv_capacity=L, tiles=tiles, one_per_sm=True)
    # Splits fill the SMs once: D1 2 x 64 blocks, D3 16 x 8, B=16 no split (128 blocks).
    assert one_per_sm(8, 4096).num_splits == 2
    assert one_per_sm(1, 32768).num_splits == 16
    assert one_per_sm(16, 4096).num_splits == 1


def test_one_block_per_sm_takes_four_rows_a_step_where_idle_lanes_shrink_the_step():
    # K+V bytes a step at 2 rows per row group, 256 threads: 80 -> 10 KB, 96 -> 12 KB, 112 -> 14,
    # 128 -> 16, 192 -> 12 (24 of 32 lanes busy); 4 rows where that lands nearer 20 KB.
    unroll = {d: P.vector_tiles(4, 1, head_dim=d, one_per_sm=True).unroll for d in (64, 80, 96, 112, 128, 192, 256)}
    assert unroll == {64: 2, 80: 4, 96: 4, 112: 2, 128: 2, 192: 4, 256: 2}
    # the two-blocks-per-SM kernel and explicit options keep theirs
    assert P.vector_tiles(4, 1, head_dim=96).unroll == P.DECODE_UNROLL
    assert P.vector_tiles(4, 1, head_dim=96, one_per_sm=True, options=DecodeOptions(unroll=2)).unroll == 2


def test_split_groups_of_up_to_sixteen_merge_in_a_cluster_where_the_target_has_clusters():
    one = dict(clusters=True, blocks=128, sm_count=132)
    assert [P.cluster_size(s, **one) for s in (1, 2, 5, 8, 9, 16, 17)] == [1, 2, 5, 8, 9, 16, 1]
    assert P.cluster_size(4, **{**one, "clusters": False}) == 1
    assert P.cluster_size(4, **{**one, "blocks": 256}) == 1  # two blocks per SM: no
    assert P.cluster_size(4, **one, options=DecodeOptions(cluster=False)) == 1
    # a clustered launch asks for more than half an SM's shared memory: one block per SM
    assert P.cluster_smem(70000, 228 * 1024) == 114 * 1024 + 1
    assert P.cluster_smem(200000, 228 * 1024) == 200000
    base = dict(threads=256, warp_size=32, rows=4, head_dim=128, unroll=2, stages=4)
    assert P.vector_smem_bytes(**base, cluster=2) == P.vector_smem_bytes(**base) + P.cluster_bytes(2, 4, 128)


def test_short_caches_with_two_waves_of_groups_take_128_thread_blocks():
    # H100-like: 132 SMs x 2 blocks of 256 threads = 264 slots.
    small = dict(slots=264, paged=False)
    assert P.small_blocks(groups=512, kv_capacity=512, **small)  # B=64 L=512
    assert P.small_blocks(groups=512, kv_capacity=1024, **small)
    assert not P.small_blocks(groups=512, kv_capacity=4096, **small)  # long: 256 wins
    assert not P.small_blocks(groups=256, kv_capacity=512, **small)  # one wave already
    assert not P.small_blocks(groups=1024, kv_capacity=512, **small)  # not measured
    assert not P.small_blocks(groups=512, kv_capacity=512, slots=264, paged=True)
    assert not P.small_blocks(groups=512, kv_capacity=512, **small, options=DecodeOptions(threads=256))
    assert P.vector_tiles(4, 1, threads=P.SMALL_BLOCK_THREADS).threads == 128


def test_short_splits_try_one_split_less_for_resident_clusters():
    assert P.fewer_splits_for_clusters(4, 128) == 3  # B=4 L=512
    assert P.fewer_splits_for_clusters(4, 1024) is None  # long splits keep theirs
    assert P.fewer_splits_for_clusters(2, 256) is None  # no cluster below 2 splits
    assert P.fewer_splits_for_clusters(4, 128, DecodeOptions(num_splits=4)) is None  # a pinned count stays


@pytest.mark.parametrize("warp_size,max_smem,c_is_a", [(32, 227 * 1024, True), (32, 99 * 1024, True),
                                                       (64, 64 * 1024, False), (32, 64 * 1024, False)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_mma_tiles_fit_the_targets_shared_memory(warp_size, max_smem, c_is_a, head_dim):
    """The matrix-unit kernel's ring shrinks to the target: stages first, then warps (64 KB of LDS
    cannot hold 4 waves x 2 tiles at head_dim 128)."""
    t = P.mma_tiles(4, 1, head_dim=head_dim, warp_size=warp_size, max_smem=max_smem, c_is_a=c_is_a)

    def smem(threads, stages):
        return P.mma_smem_bytes(threads=threads, warp_size=warp_size, rows=t.rows, head_dim=head_dim,
                                stages=stages, c_is_a=c_is_a)
    assert smem(t.threads, t.stages) <= max_smem and 2 <= t.stages <= P.MMA_STAGES and t.threads % warp_size == 0
    if t.threads < P.MMA_WARPS * warp_size:  # fewer warps only where 2 stages did not fit
        assert smem(t.threads * 2, 2) > max_smem
    elif t.stages < P.MMA_STAGES:  # the deepest ring that fits
        assert smem(t.threads, t.stages + 1) > max_smem


def test_mma_is_opt_in(monkeypatch):
    assert P.MMA_MIN_ROWS is None and not P.use_mma(8)
    assert P.use_mma(1, DecodeOptions(mma=True))
    monkeypatch.setattr(P, "MMA_MIN_ROWS", 4)
    assert not P.use_mma(8, DecodeOptions(mma=False))
    assert P.use_mma(4) and not P.use_mma(2)


# ---- whole plans, with the device's answers faked -------------------------------------------
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "sm_90", 132, 227 * 1024, 32, 50 << 20)
GFX942 = DeviceInfo("AMD Instinct MI300X", "gfx942", 304, 64 * 1024, 64, 256 << 20)


def plan(problem, device=H100, per_sm=2, resident=10**6, options=DecodeOptions()):
    asked = []

    def occupancy(spec, threads, smem):
        asked.append((spec.uri, threads, smem))
        return per_sm

    return P.plan(problem, device, occupancy, lambda spec, c, t, s: resident, options), asked


D1 = DecodeProblem("fp16", 8, 32, 8, 1, 128, 4096)


def test_d1_on_an_h100_streams_one_block_per_sm_and_merges_in_clusters():
    p, asked = plan(D1)
    assert p.kernel.kernel == "split_cluster" and dict(p.kernel.params)["cluster"] == 2
    assert p.clustered and not p.fused and p.combine is None and p.scratch_bytes == 0
    assert p.grid == (2, 8, 8) and p.block == (256, 1, 1) and p.num_splits == 2
    assert dict(p.kernel.params)["stages"] == P.ONE_PER_SM_STAGES
    assert p.shared_bytes > 228 * 1024 // 2  # no SM holds two of a cluster's blocks
    # the occupancy question is asked of the kernel the plan launches, with its shared memory
    assert asked[0][1:] == (256, P.vector_smem_bytes(threads=256, warp_size=32, rows=4, head_dim=128,
                                                     unroll=2, stages=4))


def test_without_resident_clusters_the_last_block_of_a_split_group_merges():
    p, _ = plan(D1, resident=0)
    assert p.kernel.kernel == "split" and p.fused and not p.clustered
    assert p.combine is not None and p.combine.kernel == "combine"  # the graph-capture merge
    assert p.scratch_bytes == 8 * 32 * p.num_splits * (128 + 1) * 4 and p.counters == 2 * 8 * 8
    assert p.lse_offset == 8 * 32 * p.num_splits * 128 * 4


def test_amd_plans_take_the_register_path_and_merge_through_memory():
    p, _ = plan(D1, device=GFX942)
    params = dict(p.kernel.params)
    assert p.kernel.kernel == "split" and params["stages"] == P.DECODE_STAGES and not p.clustered
    assert p.shared_bytes <= 64 * 1024


@pytest.mark.parametrize("variant,kernel,fused,splits", [
    ("naive", "naive", False, 1), ("split1", "split", False, 1), ("split-unfused", "split", False, None),
    ("split-vector", "split_cluster", False, None), ("split-mma", "split_mma", True, None)])
def test_journey_variants_plan_their_own_kernels(variant, kernel, fused, splits):
    p, _ = plan(D1, options=DecodeOptions(variant=variant))
    assert p.kernel.kernel == kernel and p.fused == fused
    if splits is not None:
        assert p.num_splits == splits
    if variant == "split-unfused":
        assert p.num_splits > 1 and p.combine is not None and not p.clustered


def test_options_pin_the_plan():
    p, _ = plan(D1, options=DecodeOptions(num_splits=8, cluster=False))
    assert p.num_splits == 8 and not p.clustered and p.fused
    p, _ = plan(D1, options=DecodeOptions(threads=128, stages=3, unroll=4))
    params = dict(p.kernel.params)
    assert (params["threads"], params["stages"], params["unroll"]) == (128, 3, 4)
    with pytest.raises(ValueError, match="stages"):
        plan(D1, options=DecodeOptions(stages=5))  # the manifest refuses it, naming the parameter


def test_paged_plans_carry_the_page_size():
    p, _ = plan(DecodeProblem("bf16", 8, 32, 8, 1, 128, 4096, page_size=16))
    params = dict(p.kernel.params)
    assert params["paged"] and params["dtype"] == "bf16" and p.page_size_log2 == 4
    assert params["threads"] == P.ONE_PER_SM_PAGED_THREADS


def test_options_are_validated_and_round_trip_as_text():
    with pytest.raises(ValueError, match="variant"):
        DecodeOptions(variant="fast")
    with pytest.raises(ValueError, match="num_splits"):
        DecodeOptions(num_splits=0)
    with pytest.raises(ValueError, match="cluster"):
        DecodeOptions(cluster=2)
    o = DecodeOptions(variant="split-mma", num_splits=4, cluster=False, stages=0)
    assert DecodeOptions.from_text(o.as_text()) == o and DecodeOptions().as_text() == ""


def test_default_kernels_cover_what_plans_launch():
    """Every kernel a plan picks for common shapes on a target is in that target's default set
    (warmup builds it ahead), clustered kernels for the warmed cluster sizes included."""
    from ikport.backends.target import Target

    for device in (H100, GFX942):
        target = Target(device.arch)
        every = set(P.default_kernels(target))
        for B, L, group, page in [(8, 4096, 4, 0), (1, 32768, 4, 0), (16, 512, 4, 0), (64, 512, 4, 0),
                                  (8, 4096, 4, 16), (4, 8192, 8, 0), (2, 1024, 1, 0)]:
            for per_sm in (1, 2):
                p, _ = plan(DecodeProblem("fp16", B, 8 * group, 8, 1, 128, L, page), device, per_sm)
                cluster = dict(p.kernel.params).get("cluster", 0)
                if cluster in (0,) + P.WARMUP_CLUSTERS:
                    assert p.kernel in every, (device.arch, B, L, group, page, p.kernel.uri)
                assert p.combine is None or p.combine in every


# ---- compressed caches: the same plans, the loader named, its shared memory -------------------
D1_INT8 = DecodeProblem("fp16", 8, 32, 8, 1, 128, 4096, kv_format="int8")


@pytest.mark.parametrize("device", [H100, GFX942], ids=["h100", "mi300x"])
@pytest.mark.parametrize("variant", ["split", "split-mma", "split1"])
def test_int8_plans_name_the_int8_loader_with_its_shared_memory(device, variant):
    p, asked = plan(D1_INT8, device=device, options=DecodeOptions(variant=variant))
    dense, _ = plan(D1, device=device, options=DecodeOptions(variant=variant))
    params = dict(p.kernel.params)
    assert params["loader"] == "int8" and dict(dense.kernel.params)["loader"] == "dense"
    assert p.kernel.kernel == dense.kernel.kernel
    facts = Target(device.arch).facts
    launch = P.launch_of(p.kernel, facts)
    assert p.shared_bytes == (P.cluster_smem(launch.dynamic_shared_bytes, facts.max_smem_per_sm) if p.clustered
                              else launch.dynamic_shared_bytes)
    assert all("loader=int8" in uri for uri, _, _ in asked)


def test_int8_slots_are_smaller_than_dense():
    assert P.vector_slot_bytes("int8") == 12 < P.vector_slot_bytes("dense") == 16
    # the matrix-unit ring: codes and scales per stage, one pair of T tiles per warp
    for d in (64, 128, 256):
        assert P.mma_slot_bytes("int8", d, 32) < 0.65 * P.mma_slot_bytes("dense", d, 32)
    t = P.mma_tiles(4, 1, head_dim=128, warp_size=32, max_smem=64 * 1024, c_is_a=False, loader="int8")
    dense = P.mma_tiles(4, 1, head_dim=128, warp_size=32, max_smem=64 * 1024, c_is_a=False)
    assert (t.threads, t.stages) >= (dense.threads, dense.stages)
    with pytest.raises(ValueError, match="loader"):
        P.vector_slot_bytes("int4")


def test_the_naive_kernel_reads_only_dense_caches():
    with pytest.raises(ValueError, match="dense"):
        plan(D1_INT8, options=DecodeOptions(variant="naive"))
