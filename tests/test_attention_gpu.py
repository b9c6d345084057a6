"""Decode kernels on the GPU against the fp32 reference (nox -s test-cuda / test-hip).

Every case: fresh random inputs, the output pre-filled with NaN (poisoned) and passed as `out=`,
so an element the kernel fails to write fails the test. Tolerances (max abs error against the
fp32 reference, outputs are O(1)): fp16 2e-3, bf16 1.6e-2 (a few ulps of each format at 1.0).
"""


import pytest
import torch

import ikport
from ikport import DecodeOptions, reference
from ikport.impl.attention import plan_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)"),
]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEV = "cuda"


def rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)


def poisoned(q):
    return torch.full_like(q, float("nan"))


def check(out, ref, dtype):
    assert torch.isfinite(out).all(), "kernel left NaN (unwritten or bad math)"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err:.3e} > {TOL[dtype]:.1e}"


def case(B, Hq, Hkv, Tq, L, D, dtype, seed, lens="random"):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = rand(B, Hq, Tq, D, dtype=dtype, gen=g)
    k = rand(B, Hkv, L, D, dtype=dtype, gen=g)
    v = rand(B, Hkv, L, D, dtype=dtype, gen=g)
    if lens == "full":
        kv_lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
    else:  # all different where possible, the first sequence full
        kv_lens = torch.randint(1, L + 1, (B,), generator=g, device=DEV, dtype=torch.int32)
        kv_lens[0] = L
    return q, k, v, kv_lens


SHAPES = [  # B, Hq, Hkv, Tq, L, D
    (1, 1, 1, 1, 1, 64), (2, 8, 8, 1, 7, 128), (3, 8, 4, 1, 4097, 128), (4, 32, 8, 1, 1000, 128),
    (2, 12, 4, 1, 333, 64), (1, 16, 2, 1, 9000, 128), (5, 8, 1, 1, 515, 128),
    (2, 4, 2, 1, 300, 80), (2, 4, 2, 1, 300, 96), (2, 4, 2, 1, 300, 112), (2, 4, 2, 1, 300, 192),
    (2, 8, 2, 1, 2049, 256), (1, 32, 8, 1, 32768, 128), (2, 16, 1, 1, 100, 16),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-T{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("variant", ["split-mma", "split-vector", "split-unfused", "split1"])
def test_decode_matches_reference(shape, dtype, variant):
    q, k, v, lens = case(*shape, dtype, seed=hash(shape) % 1000)
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out, options=DecodeOptions(variant=variant))
    check(out, reference.attention(q, k, v, kv_lens=lens), dtype)


# Shapes the launch rules send to their other kernels on a 132-SM H100 (ikport/plan/decode.py): one block per
# SM with the 4-stage ring (B=16 L=1024: 128 groups, one split of 1024 rows; B=8 L=4096: D1) and
# 128-thread blocks (B=64 L=512 and L=1000: 512 groups, two waves of 256-thread blocks).
RULE_SHAPES = {(16, 1024): (256, 4), (8, 4096): (256, 4), (64, 512): (128, 2), (64, 1000): (128, 2)}


@pytest.mark.parametrize("B,L", list(RULE_SHAPES))
def test_launch_rule_shapes_match_reference(B, L):
    q, k, v, lens = case(B, 32, 8, 1, L, 128, torch.float16, seed=B + L)
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out, options=DecodeOptions(variant="split-vector"))
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)
    plan = plan_of(q, k, None, DecodeOptions(variant="split-vector"))
    if torch.cuda.get_device_properties(q.device).multi_processor_count == 132:
        assert (plan.block[0], dict(plan.kernel.params)["stages"]) == RULE_SHAPES[(B, L)]


def test_short_splits_take_one_split_less_where_its_clusters_fit():
    """B=4 x 8 KV heads, L=512: 4 splits' clusters of 4 do not all fit on the H100 at one block
    per SM, 3 splits' clusters of 3 do (plan.decode.fewer_splits_for_clusters)."""
    q, k, v, lens = case(4, 32, 8, 1, 512, 128, torch.float16, seed=45)
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out, options=DecodeOptions(variant="split-vector"))
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)
    plan = plan_of(q, k, None, DecodeOptions(variant="split-vector"))
    props = torch.cuda.get_device_properties(q.device)
    if props.multi_processor_count == 132 and (props.major, props.minor) >= (9, 0):
        assert (plan.num_splits, plan.clustered) == (3, True)


@pytest.mark.parametrize("group", [4, 8])
def test_paged_launch_rule_matches_reference(group):
    """Paged caches whose groups fit the SMs run one 512-thread block per SM (plan.decode.
    ONE_PER_SM_PAGED_THREADS) at up to 4 query rows; 8 rows keep two 256-thread blocks per SM."""
    q, k, v, lens = case(8, 8 * group, 8, 1, 4096, 128, torch.float16, seed=group)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(group))
    out = poisoned(q)
    ikport.paged_attention(q, kp, vp, bt, lens, out=out, options=DecodeOptions(variant="split-vector"))
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)
    plan = plan_of(q, kp, bt, DecodeOptions(variant="split-vector"))
    if torch.cuda.get_device_properties(q.device).multi_processor_count == 132:
        assert plan.block[0] == (512 if group == 4 else 256)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 1, 129, 128), (1, 4, 4, 3, 50, 64), (3, 6, 2, 1, 1, 128)])
def test_naive_matches_reference(shape, dtype):
    q, k, v, lens = case(*shape, dtype, seed=7)
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out, options=DecodeOptions(variant="naive"))
    check(out, reference.attention(q, k, v, kv_lens=lens), dtype)


@pytest.mark.parametrize("variant", ["split-mma", "split-vector"])
@pytest.mark.parametrize("Tq", [2, 4, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_multi_token_queries(Tq, causal, variant):
    q, k, v, lens = case(3, 8, 2, Tq, 700, 128, torch.float16, seed=Tq)
    lens[1] = Tq  # shortest length that keeps every causal row non-empty
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, causal=causal, out=out, options=DecodeOptions(variant=variant))
    check(out, reference.attention(q, k, v, kv_lens=lens, causal=causal), torch.float16)


@pytest.mark.parametrize("variant", ["split-mma", "split-vector", "split-unfused", "split1", "naive"])
def test_zero_length_sequence_gives_zeros(variant):
    q, k, v, lens = case(3, 8, 2, 1, 600, 128, torch.float16, seed=3)
    lens[1] = 0
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out, options=DecodeOptions(variant=variant))
    assert torch.all(out[1] == 0)
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)


def test_lengths_past_the_cache_are_clamped():
    q, k, v, _ = case(2, 8, 2, 1, 300, 128, torch.float16, seed=4)
    lens = torch.tensor([10_000, -5], dtype=torch.int32, device=DEV)
    out = ikport.attention(q, k, v, kv_lens=lens)
    check(out, reference.attention(q, k, v, kv_lens=lens.clamp(0, 300)), torch.float16)


# (B, Hq, Hkv, L, a length ending inside the first step of a later split): a 2-stage launch,
# and D1's shape, which takes one block per SM with the 4-stage ring on the H100 (2 splits of 2048)
LEAK_SHAPES = {"two-stage": (4, 16, 4, 1500, 700), "one-per-sm": (8, 32, 8, 4096, 2060)}


@pytest.mark.parametrize("variant", ["split-mma", "split-vector", "split-unfused", "split1"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("shape", list(LEAK_SHAPES))
def test_cache_rows_past_kv_len_never_leak(variant, paged, shape):
    """Rows at or past kv_len hold NaN and Inf (a never-written cache slot may): the kernel may
    fetch them (the first ring step is copied before kv_len arrives) but must ignore them. Paged:
    the block table past each sequence's last page holds garbage ids (-1, huge), which the early
    copy must clamp into the pool."""
    B, Hq, Hkv, L, inside = LEAK_SHAPES[shape]
    q, k, v, lens = case(B, Hq, Hkv, 1, L, 128, torch.float16, seed=12)
    lens[1], lens[2] = 1, inside  # splits past the end, and one ending inside a step
    ref = reference.attention(q, k, v, kv_lens=lens)
    pos = torch.arange(L, device=DEV).view(1, 1, -1, 1)
    past = pos >= lens.view(-1, 1, 1, 1).long()
    k, v = k.masked_fill(past, float("nan")), v.masked_fill(past, float("inf"))
    out = poisoned(q)
    if paged:
        kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(2))
        page = torch.arange(bt.shape[1], device=DEV).view(1, -1)
        unused = page * 16 >= lens.view(-1, 1).long()  # pages wholly past kv_len
        garbage = torch.where(page % 2 == 0, -1, 2**31 - 1).to(torch.int32).expand_as(bt)
        bt = torch.where(unused, garbage, bt)
        ikport.paged_attention(q, kp, vp, bt, lens, out=out, options=DecodeOptions(variant=variant))
    else:
        ikport.attention(q, k, v, kv_lens=lens, out=out, options=DecodeOptions(variant=variant))
    check(out, ref, torch.float16)


def test_strided_static_cache_slice():
    """A view into a preallocated [B_max, Hkv, L_max, D] cache, no copy."""
    g = torch.Generator(device=DEV).manual_seed(5)
    cache_k = rand(6, 4, 2048, 128, dtype=torch.float16, gen=g)
    cache_v = rand(6, 4, 2048, 128, dtype=torch.float16, gen=g)
    k, v = cache_k[1:4, :, :1500], cache_v[1:4, :, :1500]
    assert not k.is_contiguous()
    q = rand(3, 16, 1, 128, dtype=torch.float16, gen=g)
    lens = torch.tensor([1500, 700, 1], dtype=torch.int32, device=DEV)
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out)
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)


def test_query_head_strides():
    """q as a transposed view of [B, Tq, Hq, D] (the layout a QKV projection produces)."""
    g = torch.Generator(device=DEV).manual_seed(6)
    q = rand(2, 1, 16, 128, dtype=torch.float16, gen=g).transpose(1, 2)
    _, k, v, lens = case(2, 16, 4, 1, 900, 128, torch.float16, seed=6)
    out = poisoned(torch.empty(2, 16, 1, 128, dtype=torch.float16, device=DEV))
    ikport.attention(q, k, v, kv_lens=lens, out=out)
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("variant", ["split-mma", "split-vector", "split-unfused", "naive"])
def test_paged_matches_reference(page_size, dtype, variant):
    q, k, v, lens = case(3, 16, 4, 1, 1100, 128, dtype, seed=page_size)
    g = torch.Generator().manual_seed(page_size)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, page_size, generator=g)
    out = poisoned(q)
    ikport.paged_attention(q, kp, vp, bt, lens, out=out, options=DecodeOptions(variant=variant))
    check(out, reference.attention(q, k, v, kv_lens=lens), dtype)


def test_cuda_graph_replay_is_bit_identical_to_eager():
    q, k, v, lens = case(4, 32, 8, 1, 4096, 128, torch.float16, seed=8)
    out = torch.empty_like(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out)  # compile and plan outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ikport.attention(q, k, v, kv_lens=lens, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    for new_lens in ([4096, 1, 2000, 3333], [17, 4096, 0, 1024]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = ikport.attention(q, k, v, kv_lens=lens)
        assert torch.equal(out, eager)
        check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_matrix_shim_tile_product(dtype, b_transposed):
    """The mma shim (ldmatrix + mma.sync here) computes A @ B exactly as fp32 would."""
    from ikport import manifest
    from ikport.dispatch import backend_for
    from ikport.kernels import MmaTileParams, get_kernel

    M, N, K = 48, 64, 80
    g = torch.Generator(device=DEV).manual_seed(9)
    a = rand(M, K, dtype=dtype, gen=g)
    b = rand(N, K, dtype=dtype, gen=g) if b_transposed else rand(K, N, dtype=dtype, gen=g)
    c = torch.full((M, N), float("nan"), device=DEV)
    be = backend_for(a.device)
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    kern = get_kernel(manifest.spec("mma_tile", "tile", dtype=name, b_transposed=b_transposed), be, 0)
    warp = be.device_info(0).warp_size
    kern.launch((N // 16, M // 16, 1), (warp, 1, 1), 0,
                MmaTileParams(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K),
                torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    torch.testing.assert_close(c, reference.mma_tile(a, b, b_transposed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stages,unroll", [(2, 4), (3, 4), (4, 2)])
@pytest.mark.parametrize("shape", [(3, 8, 4, 1, 4097, 128), (2, 4, 2, 1, 300, 96), (1, 32, 8, 1, 9000, 64),
                                   (2, 8, 2, 3, 2049, 256)], ids=lambda s: "B{}-Hq{}-Hkv{}-T{}-L{}-D{}".format(*s))
def test_async_copy_pipeline_matches_reference(shape, stages, unroll):
    """The cp.async ring variant (STAGES >= 2), contiguous and paged."""
    q, k, v, lens = case(*shape, torch.float16, seed=stages * 10 + unroll)
    opts = DecodeOptions(stages=stages, unroll=unroll)
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out, causal=True, options=opts)
    check(out, reference.attention(q, k, v, kv_lens=lens, causal=True), torch.float16)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(1))
    out = poisoned(q)
    ikport.paged_attention(q, kp, vp, bt, lens, out=out, causal=True, options=opts)
    check(out, reference.attention(q, k, v, kv_lens=lens, causal=True), torch.float16)


@pytest.mark.parametrize("splits", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cluster_merge_matches_reference(splits, dtype):
    """Split-K groups merged in a block cluster (sm_90+; elsewhere the dispatcher keeps the global
    merge and this checks that): portable cluster sizes and a non-portable one (16 asked: 14
    splits of 80 rows), sequences so short that whole splits are empty (kv_len 130, 1 and 0),
    several query tokens (causal), GQA 3, paged."""
    g = torch.Generator(device=DEV).manual_seed(splits)
    q1, k, v, _ = case(2, 12, 4, 1, 1100, 128, dtype, seed=splits)
    q3 = rand(2, 12, 3, 128, dtype=dtype, gen=g)
    opts = DecodeOptions(num_splits=splits)
    for lens in ([1100, 130], [1, 0]):
        lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        for q in (q1, q3):
            ref = reference.attention(q, k, v, kv_lens=lens, causal=True)
            out = poisoned(q)
            ikport.attention(q, k, v, kv_lens=lens, out=out, causal=True, options=opts)
            check(out, ref, dtype)
            if q is q1 and splits <= 8:  # 8 groups of <= 8 splits: clusters fit on any sm_90 part
                assert plan_of(q, k, None, opts).clustered == (torch.cuda.get_device_capability() >= (9, 0))
            kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(2))
            out = poisoned(q)
            ikport.paged_attention(q, kp, vp, bt, lens, out=out, causal=True, options=opts)
            check(out, ref, dtype)


def test_non_portable_cluster_of_sixteen_splits_launches():
    """One group in 16 splits: a 16-block cluster (past the portable 8, allowed on the kernel
    before the residency query) fits any sm_90 part once, so it must launch clustered there."""
    q, k, v, lens = case(1, 4, 1, 1, 4000, 128, torch.float16, seed=16)
    opts = DecodeOptions(num_splits=16)
    out = poisoned(q)
    ikport.attention(q, k, v, kv_lens=lens, out=out, options=opts)
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)
    plan = plan_of(q, k, None, opts)
    assert plan.num_splits == 16
    assert plan.clustered == (torch.cuda.get_device_capability() >= (9, 0))


def test_misaligned_pointer_is_caught_after_a_valid_call():
    q, k, v, lens = case(2, 8, 2, 1, 64, 128, torch.float16, seed=11)
    ikport.attention(q, k, v, kv_lens=lens)
    flat = torch.empty(k.numel() + 1, dtype=k.dtype, device=DEV)
    k_off = flat[1:].view_as(k)  # same shape and strides, pointer off by 2 bytes
    k_off.copy_(k)
    with pytest.raises(ValueError, match="16-byte aligned"):
        ikport.attention(q, k_off, v, kv_lens=lens)


def test_paged_table_check_with_the_debug_knob(monkeypatch):
    """By default a bad page id below kv_len is not checked on the GPU (no host sync); with
    IKPORT_CHECK_TABLES=1 every call checks and raises as the CPU does, and a CUDA graph capture
    skips the check (a sync is not allowed there) and still captures."""
    q, k, v, lens = case(2, 8, 2, 1, 64, 64, torch.float16, seed=11, lens="full")
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(0))
    bad = bt.clone()
    bad[1, 2] = kp.shape[0]  # one past the pool
    monkeypatch.setenv("IKPORT_CHECK_TABLES", "1")
    ikport.impl.attention.clear_plans()  # the knob is read when a layout is first seen
    with pytest.raises(ValueError, match=rf"block_table\[1, 2\] = {kp.shape[0]} is not a page id"):
        ikport.paged_attention(q, kp, vp, bad, lens)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = -1 is not a page id"):
        ikport.paged_attention(q, kp, vp, bad, lens)
    out = torch.empty_like(q)
    ikport.paged_attention(q, kp, vp, bt, lens, out=out)  # a valid table passes (and plans)
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ikport.paged_attention(q, kp, vp, bt, lens, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, reference.attention(q, k, v, kv_lens=lens), torch.float16)
