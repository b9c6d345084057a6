"""ikport.KVCache on the GPU (nox -s test-cuda / test-hip): attention over the INT8 and KIVI INT4
caches through their KV loaders against the oracle (the fp32 reference on the dequantized cache: the
quantization is in both, so the kernel's own error is fp16-level), contiguous and paged, the
vector and matrix-unit kernels, split-K, GQA; chunked prefill over a compressed prefix (the
prefill kernel with the KV loader, judged as tests/test_prefill_gpu.py judges prefill: against
SDPA's own error on the dequantized cache); append under CUDA-graph capture; the byte budget.

Outputs are poisoned (NaN, passed as out=), as in tests/test_attention_gpu.py."""

import pytest
import torch
from prefill_tolerance import dense_masks, sdpa_error, tolerance

import ikport
from ikport import DecodeOptions, PrefillOptions
from ikport.impl import prefill as prefill_impl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)"),
]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEV = "cuda"


def filled_cache(B, Hkv, L, D, dtype, *, kv_format="int8", page_size=0, seed=0, lens=None):
    """A cache with each sequence's rows appended in two steps (the second a single token)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cache = ikport.KVCache(B, Hkv, L, D, dtype=dtype, kv_format=kv_format, page_size=page_size, device=DEV)
    n = L - 1
    k = torch.randn(B, Hkv, n, D, generator=g, device=DEV).to(dtype)
    v = torch.randn(B, Hkv, n, D, generator=g, device=DEV).to(dtype)
    cache.append(k, v)
    cache.append(k[:, :, :1], v[:, :, :1])
    if lens is not None:  # shorter sequences: rows past them hold data the kernel must not read
        cache.lens.copy_(torch.tensor(lens, dtype=torch.int32, device=DEV))
    return cache


def check(cache, q, *, causal=False, options=None):
    out = torch.full_like(q, float("nan"))
    res = cache.attend(q, causal=causal, out=out, options=options)
    assert res is out and torch.isfinite(out).all(), "kernel left NaN (unwritten or bad math)"
    ref = cache.reference_attend(q, causal=causal)
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[q.dtype], f"max abs error {err:.3e} > {TOL[q.dtype]:.1e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [0, 16])
@pytest.mark.parametrize("variant", ["split", "split-vector", "split-mma", "split-unfused", "split1"])
def test_int8_cache_d1_shape_matches_the_oracle(dtype, page_size, variant):
    cache = filled_cache(8, 8, 1024, 128, dtype, page_size=page_size, seed=1,
                         lens=[1024, 1000, 1, 0, 517, 64, 999, 2])
    q = torch.randn(8, 32, 1, 128, device=DEV).to(dtype)
    check(cache, q, options=DecodeOptions(variant=variant))


@pytest.mark.parametrize("D,Hq,Hkv,Tq", [(64, 8, 1, 1), (96, 4, 2, 2), (256, 2, 2, 1), (128, 16, 2, 3)])
def test_int8_cache_odd_shapes(D, Hq, Hkv, Tq):
    cache = filled_cache(3, Hkv, 333, D, torch.float16, seed=D + Tq, lens=[333, 77, 200])
    q = torch.randn(3, Hq, Tq, D, device=DEV).half()
    check(cache, q, causal=Tq > 1)


def test_int8_cache_memory_budget():
    dense = ikport.KVCache(8, 8, 4096, 128, kv_format="dense", device=DEV)
    int8 = ikport.KVCache(8, 8, 4096, 128, kv_format="int8", device=DEV)
    assert int8.nbytes <= 0.52 * dense.nbytes


def test_append_and_attend_replay_in_a_cuda_graph():
    """Append (quantize on the device) then attend, captured once and replayed: no host
    synchronization in either, and the replay advances the lengths on the device."""
    cache = filled_cache(2, 2, 256, 128, torch.float16, seed=7, lens=[100, 50])
    k_new = torch.randn(2, 2, 1, 128, device=DEV).half()
    v_new = torch.randn_like(k_new)
    q = torch.randn(2, 8, 1, 128, device=DEV).half()
    out = torch.empty_like(q)
    cache.attend(q, out=out)  # plans and loads outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        cache.append(k_new, v_new)
        cache.attend(q, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    cache.lens.copy_(torch.tensor([100, 50], dtype=torch.int32, device=DEV))
    for step in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert cache.lens.tolist() == [101 + step, 51 + step]
        ref = cache.reference_attend(q)
        assert (out.float() - ref.float()).abs().max().item() <= TOL[torch.float16]


# ---- KIVI INT4 -------------------------------------------------------------------------------------
def kivi_cache(B, Hkv, L, D, dtype, *, G=128, page_size=0, seed=0, lens=None):
    """A KIVI cache: a prefill chunk, then single tokens (folding a group on the way), K with
    persistent per-channel outliers; `lens` then rewinds each sequence by a one-token rewrite at
    lens - 1 (through the rewrite path: a group folded already gives its rows back from codes)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cache = ikport.KVCache(B, Hkv, L, D, dtype=dtype, kv_format="kivi4", kivi_group=G, page_size=page_size,
                           device=DEV)
    # 4x outliers: larger ones put the oracle's rounding of K to the dtype above the tolerance, where
    # the vector kernel keeps K in fp32 (the accuracy study takes larger ones: test_kvcache.py)
    channel = 1 + 3 * (torch.rand(D, generator=g, device=DEV) < 0.1) + torch.rand(D, generator=g, device=DEV)

    def rows(n):
        k = torch.randn(B, Hkv, n, D, generator=g, device=DEV) * channel
        return k.to(dtype), torch.randn(B, Hkv, n, D, generator=g, device=DEV).to(dtype)

    first = max(L - G - 3, 1)
    cache.append(*rows(first))
    for _ in range(L - first):
        cache.append(*rows(1))
    if lens is not None:
        pos = torch.tensor([max(n - 1, 0) for n in lens], dtype=torch.int32, device=DEV)
        cache.append(*rows(1), positions=pos)
        cache.lens.copy_(torch.tensor(lens, dtype=torch.int32, device=DEV))
    return cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [0, 16])
@pytest.mark.parametrize("variant", ["split", "split-vector", "split-mma", "split-unfused", "split1"])
def test_kivi_cache_d1_shape_matches_the_oracle(dtype, page_size, variant):
    cache = kivi_cache(8, 8, 1024, 128, dtype, page_size=page_size, seed=1,
                       lens=[1024, 1000, 1, 0, 517, 128, 999, 2])
    q = torch.randn(8, 32, 1, 128, device=DEV).to(dtype)
    check(cache, q, options=DecodeOptions(variant=variant))


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("D,Hq,Hkv,Tq", [(64, 8, 1, 1), (96, 4, 2, 2), (256, 2, 2, 1), (128, 16, 2, 3)])
def test_kivi_cache_odd_shapes_and_groups(G, D, Hq, Hkv, Tq):
    cache = kivi_cache(3, Hkv, 333, D, torch.float16, G=G, seed=D + Tq, lens=[333, 77, 200])
    q = torch.randn(3, Hq, Tq, D, device=DEV).half()
    check(cache, q, causal=Tq > 1)


def test_kivi_cache_memory_budget():
    dense = ikport.KVCache(8, 8, 4096, 128, kv_format="dense", device=DEV)
    kivi = ikport.KVCache(8, 8, 4096, 128, kv_format="kivi4", device=DEV)
    assert kivi.nbytes <= 0.30 * dense.nbytes
    assert torch.cuda.memory_allocated() >= dense.nbytes + kivi.nbytes  # nbytes is what was allocated


@pytest.mark.parametrize("T", [1, 512])
def test_kivi_append_syncs_nothing_and_replays_in_a_cuda_graph(T):
    """A decode token and a prefill chunk: no host synchronization (torch's sync debug mode raises
    on one), then append + attend captured once and replayed, the lengths advancing on the device
    and folding groups as they fill."""
    cache = kivi_cache(2, 2, 4096, 128, torch.float16, seed=7, lens=[100, 50])
    k_new = torch.randn(2, 2, T, 128, device=DEV).half()
    v_new = torch.randn_like(k_new)
    q = torch.randn(2, 8, 1, 128, device=DEV).half()
    out = torch.empty_like(q)
    cache.attend(q, out=out)  # plans and loads outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache.append(k_new, v_new)
        cache.attend(q, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        cache.append(k_new, v_new)
        cache.attend(q, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    start = [100 + T, 50 + T]
    for step in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert cache.lens.tolist() == [start[0] + (step + 1) * T, start[1] + (step + 1) * T]
        ref = cache.reference_attend(q)
        assert (out.float() - ref.float()).abs().max().item() <= TOL[torch.float16]


# ---- the append kernel -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [0, 16])
@pytest.mark.parametrize("kv_format,G", [("dense", None), ("int8", None), ("kivi4", 32), ("kivi4", 128)])
def test_append_kernel_writes_what_the_torch_ops_write(kv_format, G, page_size, dtype):
    """KVCache.append's kernel (kernels_src/kv_append.cuh) against its torch ops (the CPU path) on the
    same device, from the same random contents: byte for byte over decode tokens and chunks from
    staggered lengths (KIVI groups completing inside a chunk, at its end, not at all); then a
    rewrite from given positions back inside quantized KIVI groups, whose earlier rows the kernel
    dequantizes (a fused multiply-add there may move a value by one rounding: compared dequantized)."""
    B, Hkv, D = 3, 2, 128
    steps = (1, (G or 16) + 5, 1, 7, (G or 16) - 2, 300)
    L = sum(steps) + 8
    g = torch.Generator(device=DEV).manual_seed(11)
    table = None
    if page_size:
        per_seq = -(-L // page_size)
        table = torch.randperm(B * per_seq, device=DEV, generator=g).to(torch.int32).view(B, per_seq)
    caches = [ikport.KVCache(B, Hkv, L, D, dtype=dtype, kv_format=kv_format, page_size=page_size, block_table=table,
                             kivi_group=G, device=DEV) for _ in range(2)]
    names = [n for n in ("k", "v", "k_scale", "v_scale", "k_resid") if getattr(caches[0], n) is not None]
    for n in names:  # the same random contents in both (never zeros)
        t = getattr(caches[0], n)
        fill = (torch.randn(t.shape, device=DEV, generator=g) * 100).to(t.dtype) if t.dtype.is_floating_point else \
            torch.randint(-128 if t.dtype == torch.int8 else 0, 128 if t.dtype == torch.int8 else 256, t.shape,
                          device=DEV, generator=g, dtype=t.dtype)
        for c in caches:
            getattr(c, n).copy_(fill)
    for c in caches:
        c.lens.copy_(torch.tensor([0, 3, 1], dtype=torch.int32, device=DEV))
    kernel, torch_ops = caches
    for i, n in enumerate(steps):
        k = (torch.randn(B, Hkv, n, D, device=DEV, generator=g) * 4).to(dtype)
        v = torch.randn(B, Hkv, n, D, device=DEV, generator=g).to(dtype)
        kernel.append(k, v)
        torch_ops._append_torch(k, v, None)
        for name in names + ["lens"]:
            a, b = getattr(kernel, name), getattr(torch_ops, name)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"step {i} (T {n}): {name} differs"
    back = (torch_ops.lens - torch.tensor([(G or 16) + 3, 2, 40], dtype=torch.int32, device=DEV)).clamp(min=0)
    k = torch.randn(B, Hkv, 3, D, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, Hkv, 3, D, device=DEV, generator=g).to(dtype)
    kernel.append(k, v, positions=back.clone())
    torch_ops._append_torch(k, v, back.clone())
    assert torch.equal(kernel.lens, torch_ops.lens)
    for a, b in zip(kernel.dequantized(), torch_ops.dequantized()):
        moved = a != b
        if kv_format != "kivi4":
            assert not moved.any()
            continue
        # at most one code step (of the widest group) and on few values
        step = 2 * b.float().abs().max().item() / 15
        assert (a.float() - b.float()).abs().max().item() <= step and moved.float().mean().item() < 1e-3


# ---- chunked prefill over a compressed prefix ------------------------------------------------------
def chunked_cache(kv_format, B, Hkv, prefix, chunk, D, dtype, *, G=128, page_size=0, seed=0):
    """A server's cache at a chunked prefill: each sequence's prefix (`prefix`, ragged: a long
    append, then a one-token rewrite at each length - 1, folding and reopening KIVI groups), then
    the chunk's own K/V appended to every sequence. K with persistent per-channel outliers."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    fmt = dict(kivi_group=G) if kv_format == "kivi4" else {}
    L = max(prefix) + chunk
    cache = ikport.KVCache(B, Hkv, L, D, dtype=dtype, kv_format=kv_format, page_size=page_size, device=DEV, **fmt)
    channel = 1 + 3 * (torch.rand(D, generator=g, device=DEV) < 0.1) + torch.rand(D, generator=g, device=DEV)

    def rows(n):
        k = torch.randn(B, Hkv, n, D, generator=g, device=DEV) * channel
        return k.to(dtype), torch.randn(B, Hkv, n, D, generator=g, device=DEV).to(dtype)

    cache.append(*rows(max(prefix)))
    cache.append(*rows(1), positions=torch.tensor([n - 1 for n in prefix], dtype=torch.int32, device=DEV))
    cache.append(*rows(chunk))
    return cache


def check_prefill(cache, q, *, causal=True, options=None):
    """The chunk through the prefill kernel with the cache's loader (its plan says so), poisoned
    output, against the fp32 reference on the dequantized cache within prefill's yardstick."""
    fmt = (cache.kv_format, cache.kivi_group) if cache.kv_format == "kivi4" else (cache.kv_format,)
    plan = prefill_impl.plan_of(q, cache.k, cache.block_table, options, fmt=fmt)
    loader = f"kivi4_g{cache.kivi_group}" if cache.kv_format == "kivi4" else cache.kv_format
    assert dict(plan.kernel.params)["loader"] == loader
    out = torch.full_like(q, float("nan"))
    res = cache.attend(q, causal=causal, out=out, options=options)
    assert res is out and torch.isfinite(out).all(), "kernel left NaN (unwritten or bad math)"
    ref = cache.reference_attend(q, causal=causal).float()
    k, v = cache.dequantized()
    if cache.paged:
        k, v = (ikport.reference.gather_pages(t, cache.block_table, cache.capacity) for t in (k, v))
    masks = dense_masks(q.shape[0], q.shape[2], k.shape[2], None, cache.lens.tolist(), causal, DEV)
    tol = tolerance(sdpa_error(q, k, v, ref, masks), q.dtype)
    err = (out.float() - ref).abs().max().item()
    assert err <= tol, f"max abs error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [0, 16])
@pytest.mark.parametrize("kv_format,G", [("int8", 0), ("kivi4", 32), ("kivi4", 128)])
def test_chunked_prefill_over_a_compressed_cache(kv_format, G, page_size, dtype):
    """Issue 29's shape, smaller: a 512-token chunk over ragged prefixes (4000, 1333, 77: no
    multiple of a tile or a group), 32 / 8 heads, head_dim 128, the planner's own tiles."""
    cache = chunked_cache(kv_format, 3, 8, [4000, 1333, 77], 512, 128, dtype, G=G or 128, page_size=page_size,
                          seed=G + page_size)
    q = torch.randn(3, 32, 512, 128, device=DEV).to(dtype)
    check_prefill(cache, q)


@pytest.mark.parametrize("kv_format,G", [("int8", 0), ("kivi4", 64)])
@pytest.mark.parametrize("D,Hq,Hkv,Tq,causal", [(64, 8, 2, 129, True), (256, 4, 4, 300, True),
                                                 (96, 6, 3, 200, False)])
def test_chunked_prefill_odd_shapes(kv_format, G, D, Hq, Hkv, Tq, causal):
    if kv_format == "kivi4" and D % 32:
        pytest.skip("KIVI prefill: head_dim a multiple of 32 (the planner refuses the rest)")
    cache = chunked_cache(kv_format, 2, Hkv, [500, 61], Tq, D, torch.float16, G=G or 128, seed=D + Tq)
    q = torch.randn(2, Hq, Tq, D, device=DEV).half()
    check_prefill(cache, q, causal=causal)


@pytest.mark.parametrize("kv_format,G", [("int8", 0), ("kivi4", 32)])
@pytest.mark.parametrize("tiles", [dict(tile_m=64, tile_n=16, warps=4, stages=1), dict(stages=3),
                                   dict(tile_m=32, tile_n=32, warps=2, stages=2)])
def test_chunked_prefill_pinned_tiles(kv_format, G, tiles):
    """PrefillOptions pin the tiles (a one-slot ring, a three-slot one) and route a chunk of any
    length to the prefill kernel."""
    cache = chunked_cache(kv_format, 2, 2, [700, 300], 100, 128, torch.bfloat16, G=G or 128, page_size=16, seed=3)
    q = torch.randn(2, 8, 100, 128, device=DEV).to(torch.bfloat16)
    check_prefill(cache, q, options=PrefillOptions(**tiles))


def test_kivi_prefill_refuses_head_dim_80_before_launching():
    cache = chunked_cache("kivi4", 1, 1, [40], 200, 80, torch.float16, G=32)
    with pytest.raises(ValueError, match="head_dim 80 must be a multiple of 32"):
        cache.attend(torch.randn(1, 2, 200, 80, device=DEV).half(), causal=True)
