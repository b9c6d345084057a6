"""W4A16 kernels on the GPU against the fp32 reference (nox -s test-cuda / test-hip).

Every case: fresh random weights and activations (never zeros), the output pre-filled with NaN
(poisoned) and passed as `out=`, so an element the kernel fails to write fails the test.
Reference: x (fp32) @ W^T with W dequantized in fp32. The matrix-unit kernel sums exact (q - z) * x
in fp32 and applies each group's scale in fp32; the GEMV, tiled and dequant paths round each
dequantized weight to x's dtype once. The error bound is relative to the output's scale: max abs error <=
TOL * max |reference|, TOL fp16 2e-3, bf16 1.6e-2 (a few units in the last place of each format).
"""

import pytest
import torch

import ikport
from ikport import int4, reference
from ikport.impl.w4a16 import plan_of
from ikport.plan import w4a16 as W

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)"),
]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float16, torch.bfloat16]
DEV = "cuda"


def make_weight(n, k, dtype, gen, *, group_size=128, symmetric=True):
    w = torch.randn(n, k, generator=gen, device=DEV, dtype=torch.float32).to(dtype)
    return ikport.quantize_weight(w, group_size=group_size, symmetric=symmetric)


def run(x, weight, variant=None, options=None):
    out = torch.full((*x.shape[:-1], weight.out_features), float("nan"), dtype=x.dtype, device=DEV)
    options = options or (None if variant is None else ikport.W4A16Options(variant=variant))
    res = ikport.w4a16_matmul(x, weight, out=out, options=options)
    assert res is out
    return out


def check(out, x, weight):
    ref = reference.w4a16_matmul(x.float(), weight)
    assert torch.isfinite(out).all(), "kernel left NaN (unwritten or bad math)"
    err = (out.float() - ref).abs().max().item()
    bound = TOL[x.dtype] * ref.abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


SHAPES = [  # M, N, K
    (1, 16, 128), (1, 48, 384), (1, 272, 1024), (3, 128, 128), (7, 400, 640), (16, 256, 512),
    (17, 144, 256), (33, 96, 1024), (64, 128, 384), (100, 80, 256), (1, 4096, 4096),
    (5, 1024, 14336),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_default_matches_reference(shape, dtype):
    M, N, K = shape
    g = torch.Generator(device=DEV).manual_seed(M * 7 + N + K)
    wq = make_weight(N, K, dtype, g)
    x = torch.randn(M, K, generator=g, device=DEV, dtype=torch.float32).to(dtype)
    check(run(x, wq), x, wq)


@pytest.mark.parametrize("variant", W.VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 48, 384), (3, 272, 256), (17, 128, 1024)],
                         ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_every_variant_matches_reference(shape, dtype, variant):
    M, N, K = shape
    g = torch.Generator(device=DEV).manual_seed(M + N + K)
    wq = make_weight(N, K, dtype, g)
    x = torch.randn(M, K, generator=g, device=DEV, dtype=torch.float32).to(dtype)
    check(run(x, wq, variant), x, wq)


@pytest.mark.parametrize("variant", ["naive", "gemv-scalar", "gemv", "mma"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, None], ids=["g32", "g64", "g128", "perchannel"])
def test_group_sizes_and_zero_points(group_size, symmetric, variant):
    g = torch.Generator(device=DEV).manual_seed(11)
    for dtype in DTYPES:
        wq = make_weight(160, 640, dtype, g, group_size=group_size, symmetric=symmetric)
        assert (wq.zeros is None) == symmetric
        x = torch.randn(5, 640, generator=g, device=DEV, dtype=torch.float32).to(dtype)
        check(run(x, wq, variant), x, wq)


def poisoned_rows(x):
    """x as a view into rows of a wider NaN-filled buffer: a kernel that reads past K gives NaN."""
    M, K = x.shape
    buf = torch.full((M, int4.packed_k(K) + 64), float("nan"), dtype=x.dtype, device=DEV)
    buf[:, :K] = x
    return buf[:, :K]


# K tails (K % 128 != 0): SmolLM2-135M's q/k/v/gate/up (K = 576: N 576, 192, 1536), and small
# ones where the last chunk is partial on NVIDIA (KC = 64) too: 96, 160, 32.
K_TAIL_SHAPES = [(1, 576, 576), (16, 192, 576), (3, 1536, 576), (1, 48, 96), (5, 32, 160), (2, 16, 32)]


@pytest.mark.parametrize("variant", W.VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", K_TAIL_SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_k_tails_every_variant(shape, dtype, variant):
    M, N, K = shape
    g = torch.Generator(device=DEV).manual_seed(M + N + K)
    for group_size, symmetric in ((128, False), (64, True), (32, False), (None, True)):
        wq = make_weight(N, K, dtype, g, group_size=group_size, symmetric=symmetric)
        assert wq.qweight.shape == (N, int4.packed_k(K) // 8)
        x = poisoned_rows(torch.randn(M, K, generator=g, device=DEV, dtype=torch.float32).to(dtype))
        check(run(x, wq, variant), x, wq)


@pytest.mark.parametrize("M", [1, 4, 200])  # 200: the dense path (dequantize, then torch's GEMM)
def test_k_tail_split_k_and_dense(M):
    """K = 4096 + 96: split K across blocks ends in a partial chunk; M = 200 dequantizes [N, K]."""
    g = torch.Generator(device=DEV).manual_seed(M)
    K = 4096 + 96
    wq = make_weight(64, K, torch.float16, g, group_size=128, symmetric=False)
    x = poisoned_rows(torch.randn(M, K, generator=g, device=DEV, dtype=torch.float32).to(torch.float16))
    if M < W.DENSE_MIN_M:
        assert plan_of(x, wq).num_splits > 1
    first = run(x, wq)
    check(first, x, wq)
    assert torch.equal(run(x, wq), first)  # deterministic, counters reset


def test_k_tail_quantized_model_on_gpu():
    """quantize_model quantizes K = 576 Linears now; the GPU forward matches the reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(576, 192), torch.nn.Linear(192, 576)).half()
    from ikport.nn import W4A16Linear, quantize_model

    quantize_model(model, group_size=128, exclude=())
    assert all(isinstance(m, W4A16Linear) for m in model)
    x = torch.randn(3, 576, dtype=torch.float16)
    ref = model(x)  # the CPU reference
    out = model.to(DEV)(x.to(DEV))
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-2, atol=2e-2)


def test_split_k_is_deterministic_and_counters_reset():
    g = torch.Generator(device=DEV).manual_seed(3)
    wq = make_weight(1024, 4096, torch.float16, g)  # narrow: split K across blocks
    x = torch.randn(1, 4096, generator=g, device=DEV, dtype=torch.float16)
    assert plan_of(x, wq).num_splits > 1
    first = run(x, wq)
    for _ in range(5):  # a counter left non-zero would make a later call skip or double its merge
        assert torch.equal(run(x, wq), first)
    check(first, x, wq)


@pytest.mark.parametrize("pinned", [{}, {"warps": 4}, {"warps": 8}, {"warps": 4, "num_splits": 3}],
                         ids=["default", "warps4", "warps8", "warps4-split3"])
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (128, True), (None, False)],
                         ids=["g32-asym", "g128-sym", "perchannel-asym"])
def test_split_k_row_blocks_and_block_sizes(pinned, group_size, symmetric):
    """Split-K with zero points and several row blocks (the counter index), and both block sizes
    (the 4-warp kernel is the H100 default only for wide N, e.g. W2)."""
    g = torch.Generator(device=DEV).manual_seed(29)
    wq = make_weight(256, 4096, torch.float16, g, group_size=group_size, symmetric=symmetric)
    x = torch.randn(64, 4096, generator=g, device=DEV, dtype=torch.float32).half()
    options = ikport.W4A16Options(**pinned)
    plan = plan_of(x, wq, options)
    assert plan.grid[2] == 2  # two row blocks
    if not pinned:
        assert plan.num_splits > 1
    first = run(x, wq, options=options)
    check(first, x, wq)
    assert torch.equal(run(x, wq, options=options), first)  # counters reset, deterministic merge


# The tiled kernel (variant "tiled"): every block the planner picks by M (32, 64, 128 rows), M
# not a multiple of it, N = 16 x odd, K tails, Llama's W1 shape at M = 32 (split-K).
TILED_SHAPES = [(17, 144, 256), (32, 4096, 4096), (50, 400, 640), (130, 272, 1056), (256, 1040, 576),
                (1000, 2048, 1024)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", TILED_SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_tiled_matches_reference(shape, dtype):
    M, N, K = shape
    g = torch.Generator(device=DEV).manual_seed(M + N + K)
    options = ikport.W4A16Options(variant="tiled")
    for group_size, symmetric in ((128, True), (32, False), (None, False)):
        wq = make_weight(N, K, dtype, g, group_size=group_size, symmetric=symmetric)
        x = poisoned_rows(torch.randn(M, K, generator=g, device=DEV, dtype=torch.float32).to(dtype))
        assert plan_of(x, wq, options).kernel.kernel == "tiled"
        check(run(x, wq, options=options), x, wq)


@pytest.mark.parametrize("block_m", W.TILED_BLOCK_M)
@pytest.mark.parametrize("block_n", W.TILED_BLOCK_N)
@pytest.mark.parametrize("num_splits", [None, 3], ids=["auto", "split3"])
def test_tiled_blocks_and_split_k(block_m, block_n, num_splits):
    """Every block shape the options allow, split K across blocks with the last block's merge
    (deterministic, counters reset), asymmetric groups of 64, a K tail."""
    g = torch.Generator(device=DEV).manual_seed(block_m + block_n)
    wq = make_weight(400, 2080, torch.float16, g, group_size=64, symmetric=False)
    x = poisoned_rows(torch.randn(100, 2080, generator=g, device=DEV, dtype=torch.float32).half())
    options = ikport.W4A16Options(variant="tiled", block_m=block_m, block_n=block_n, num_splits=num_splits)
    plan = plan_of(x, wq, options)
    assert dict(plan.kernel.params)["block_m"] == block_m and plan.grid[2] == -(-100 // block_m)
    if num_splits:
        assert plan.num_splits == 3
    first = run(x, wq, options=options)
    check(first, x, wq)
    assert torch.equal(run(x, wq, options=options), first)


def test_graph_captured_on_a_stream_with_counters():
    """Eager calls on a stream first (it gets split-K counters), then a capture on that stream:
    the graph must not share them (it zeroes its own inside the graph)."""
    g = torch.Generator(device=DEV).manual_seed(31)
    wq = make_weight(1024, 4096, torch.float16, g)  # narrow: split K (counters, scratch)
    x = torch.randn(1, 4096, generator=g, device=DEV, dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = ikport.w4a16_matmul(x, wq)  # allocates this stream's counters
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            static_out = ikport.w4a16_matmul(x, wq)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        graph.replay()
        ikport.w4a16_matmul(x, wq)  # eager calls between replays, on the default stream
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


def test_leading_dims_and_strided_rows():
    g = torch.Generator(device=DEV).manual_seed(5)
    wq = make_weight(256, 512, torch.bfloat16, g)
    x = torch.randn(2, 3, 512, generator=g, device=DEV, dtype=torch.float32).to(torch.bfloat16)
    out = ikport.w4a16_matmul(x, wq)
    assert out.shape == (2, 3, 256)
    check(out.view(6, 256), x.view(6, 512), wq)
    big = torch.randn(4, 640, generator=g, device=DEV, dtype=torch.float32).to(torch.bfloat16)
    xs = big[:, 64:576]  # row stride 640: a slice of a larger buffer, no copy
    check(ikport.w4a16_matmul(xs, wq), xs, wq)


def test_act_order_permutation():
    g = torch.Generator(device=DEV).manual_seed(9)
    N, K, G = 128, 512, 128
    codes = torch.randint(0, 16, (N, K), generator=g, device=DEV, dtype=torch.int32).to(torch.uint8)
    scales = (torch.rand(K // G, N, generator=g, device=DEV) * 0.02 + 0.005).half()
    perm = torch.randperm(K, generator=g, device=DEV)
    wq = int4.Int4Weight.from_codes(codes, scales, None, G, perm=perm)
    x = torch.randn(3, K, generator=g, device=DEV, dtype=torch.float16)
    check(run(x, wq), x, wq)  # dequantize() undoes perm: the reference sees the original order


def test_cuda_graph_replay_matches_eager():
    g = torch.Generator(device=DEV).manual_seed(13)
    wq = make_weight(1024, 4096, torch.float16, g)  # narrow: split K (counters, scratch)
    x = torch.randn(2, 4096, generator=g, device=DEV, dtype=torch.float16)
    static_x = x.clone()
    ikport.w4a16_matmul(static_x, wq)  # compile and plan outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ikport.w4a16_matmul(static_x, wq)
    torch.cuda.current_stream().wait_stream(s)
    for i in range(3):
        static_x.copy_(torch.randn(2, 4096, generator=g, device=DEV, dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, ikport.w4a16_matmul(static_x, wq)), f"replay {i}"


def test_prepared_call_takes_each_calls_pointers():
    """Calls of one layout share a prepared launch: each must read its own x, weight and out
    (split-K, one split, dense; x in place, strided and copied; out= given or not)."""
    g = torch.Generator(device=DEV).manual_seed(37)
    weights = [make_weight(1024, 4096, torch.float16, g) for _ in range(2)]  # narrow: split K at M=1
    for M in (1, 16, 160):  # split-K, one split, dense
        buf = torch.randn(M * 4096 + 64, generator=g, device=DEV, dtype=torch.float32).half()
        outs = [torch.full((M, 1024), float("nan"), dtype=torch.float16, device=DEV) for _ in range(2)]
        for i in range(4):
            x = buf[8 * i:8 * i + M * 4096].view(M, 4096)  # 16-byte steps: one layout, new pointers
            wq = weights[i % 2]
            if i < 2:
                check(ikport.w4a16_matmul(x, wq), x, wq)
            else:
                out = outs[i % 2]
                assert ikport.w4a16_matmul(x, wq, out=out) is out
                check(out, x, wq)
    wq = weights[0]
    for _ in range(2):
        x3 = torch.randn(2, 3, 4096, generator=g, device=DEV, dtype=torch.float16)  # leading dims, in place
        check(ikport.w4a16_matmul(x3, wq).view(6, 1024), x3.view(6, 4096), wq)
        xt = torch.randn(3, 2, 4096, generator=g, device=DEV, dtype=torch.float16).transpose(0, 1)  # copied rows
        check(ikport.w4a16_matmul(xt, wq).reshape(6, 1024), xt.reshape(6, 4096), wq)


@pytest.mark.parametrize("M", [1, 16, 160], ids=["split-k", "one-split", "dense"])
def test_cuda_graph_of_leading_dims_and_out_matches_eager(M):
    """A call with [2, M/2, K] x and out= given, prepared by an eager call, then captured and
    replayed with new x values: each replay matches the eager call of the same layout."""
    g = torch.Generator(device=DEV).manual_seed(41 + M)
    wq = make_weight(1024, 4096, torch.float16, g)
    shape = (2, max(M // 2, 1), 4096) if M > 1 else (1, 1, 4096)
    static_x = torch.randn(shape, generator=g, device=DEV, dtype=torch.float16)
    static_out = torch.empty((*shape[:-1], 1024), device=DEV, dtype=torch.float16)
    ikport.w4a16_matmul(static_x, wq, out=torch.empty_like(static_out))  # compile and prepare outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ikport.w4a16_matmul(static_x, wq, out=static_out)
    torch.cuda.current_stream().wait_stream(s)
    for i in range(3):
        static_x.copy_(torch.randn(shape, generator=g, device=DEV, dtype=torch.float16))
        graph.replay()
        eager = ikport.w4a16_matmul(static_x, wq, out=torch.empty_like(static_out))
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager), f"replay {i}"
    check(static_out.view(-1, 1024), static_x.view(-1, 4096), wq)


def test_torch_compile_fullgraph():
    g = torch.Generator(device=DEV).manual_seed(17)
    wq = make_weight(256, 512, torch.float16, g)
    x = torch.randn(4, 512, generator=g, device=DEV, dtype=torch.float16)
    f = torch.compile(lambda t: ikport.w4a16_matmul(t, wq) * 2, fullgraph=True)
    assert torch.equal(f(x), ikport.w4a16_matmul(x, wq) * 2)


def test_nn_module_on_gpu():
    from ikport import nn as iknn

    lin = torch.nn.Linear(512, 384, bias=True).to(DEV, torch.float16)
    q = iknn.W4A16Linear.from_linear(lin, group_size=128)
    x = torch.randn(2, 5, 512, device=DEV, dtype=torch.float16)
    y = q(x)
    ref = x.float() @ q.weight_int4.dequantize().T + lin.bias.float()
    assert (y.float() - ref).abs().max().item() <= 2e-3 * ref.abs().max().item() + 1e-3


def test_bad_inputs_raise_before_launch():
    g = torch.Generator(device=DEV).manual_seed(19)
    wq = make_weight(128, 256, torch.float16, g)
    x = torch.randn(2, 256, generator=g, device=DEV, dtype=torch.float16)
    with pytest.raises(TypeError, match="scales are"):
        ikport.w4a16_matmul(x.bfloat16(), wq)
    with pytest.raises(ValueError, match="in_features"):
        ikport.w4a16_matmul(x[:, :128], wq)
    with pytest.raises(ValueError, match="16 bytes|aligned"):
        ikport.w4a16_matmul(torch.randn(2, 257, device=DEV, dtype=torch.float16)[:, 1:], wq)
    with pytest.raises(ValueError, match="on cpu|cpu"):
        ikport.w4a16_matmul(x.cpu(), wq)
    other = "amd_mfma16" if wq.layout != "amd_mfma16" else "nv_m16n8k16"
    with pytest.raises(ValueError, match="packed as"):
        ikport.w4a16_matmul(x, wq.with_layout(other))
    with pytest.raises(TypeError, match="options must be an ikport.W4A16Options"):
        ikport.w4a16_matmul(x, wq, options="fast")
    ikport.w4a16_matmul(x, wq)  # now cached as a checked signature: alignment is still checked
    flat = torch.empty(wq.scales.numel() + 1, dtype=wq.scales.dtype, device=DEV)
    shifted = flat[1:].view(wq.scales.shape)  # contiguous, 2 bytes off
    shifted.copy_(wq.scales)
    bad = int4.Int4Weight(wq.qweight, shifted, None, wq.group_size, wq.in_features,
                          wq.out_features, wq.layout)
    with pytest.raises(ValueError, match="weight.scales"):
        ikport.w4a16_matmul(x, bad)


def test_checked_signature_cache_does_not_skip_alignment():
    g = torch.Generator(device=DEV).manual_seed(23)
    wq = make_weight(128, 256, torch.float16, g)
    buf = torch.randn(2 * 256 + 8, generator=g, device=DEV, dtype=torch.float32).half()
    x = buf[:512].view(2, 256)
    check(ikport.w4a16_matmul(x, wq), x, wq)
    x_off = buf[8:520].view(2, 256)  # same shape and strides, 16 bytes off: still aligned
    check(ikport.w4a16_matmul(x_off, wq), x_off, wq)
    x_bad = buf[1:513].view(2, 256)  # same signature, 2 bytes off
    with pytest.raises(ValueError, match="aligned"):
        ikport.w4a16_matmul(x_bad, wq)
