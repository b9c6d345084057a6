"""Prefill attention on the GPU against the fp32 reference (nox -s test-cuda / test-hip).

Every case: fresh random inputs (torch.randn, never zeros), the output poisoned: pre-filled with
NaN and passed as `out=`, or (the default allocation path) allocated by the call over memory just
filled with NaN, so an element the kernel fails to write fails the test. The oracle is
ikport.reference on fp32 copies of the same inputs.

Tolerance (tests/prefill_tolerance.py): max abs error over all elements at most
    fp16: 2 x SDPA's error + 1e-3
    bf16: 2 x SDPA's error + 8e-3
where SDPA's error is that of torch's F.scaled_dot_product_attention in the same dtype on the
same inputs (explicit bottom-right mask) against the same fp32 reference, over the rows that see
a key. Rows that see no key (past q_len, kv_len 0, causal rows before the first key) must be
exact zeros. The log-sum-exp (return_lse): -inf exactly where a row sees no key, elsewhere within
SLACK[dtype] (absolute) + 1e-4 (relative) of the reference's (both computed in fp32 from the
same fp16/bf16 inputs).

Sizes: lengths 1, 17, 129, 1000 and 4097 (the 4097-long, 32-head cases a few times only), chunked
queries (Tq < L), ragged q_lens / kv_lens, varlen with empty sequences, GQA 1, 2, 3, 4, 8, head
dims 64..256, strided inputs, paged chunked prefill (page sizes 1, 16, 64), CUDA graphs,
torch.compile. A few minutes on an H100.
"""

import pytest
import torch

import ikport
from ikport import reference
from prefill_tolerance import SLACK, dense_masks, sdpa_error, sdpa_error_varlen, tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)"),
]
DEV = "cuda"
FP16, BF16 = torch.float16, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
LSE_RTOL = 1e-4


# ---- inputs ------------------------------------------------------------------------------------
def rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEV)


def qkv(B, Hq, Hkv, Tq, L, D, dtype, seed, strided=False):
    """q [B, Hq, Tq, D], k/v [B, Hkv, L, D]; `strided`: each a [B, T, H, D] tensor (the layout a
    projection writes) viewed as [B, H, T, D] with .transpose(1, 2)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    if strided:
        return (rand(B, Tq, Hq, D, dtype=dtype, gen=g).transpose(1, 2),
                rand(B, L, Hkv, D, dtype=dtype, gen=g).transpose(1, 2),
                rand(B, L, Hkv, D, dtype=dtype, gen=g).transpose(1, 2))
    return (rand(B, Hq, Tq, D, dtype=dtype, gen=g), rand(B, Hkv, L, D, dtype=dtype, gen=g),
            rand(B, Hkv, L, D, dtype=dtype, gen=g))


def poison_allocator(shape, dtype):
    """Leave NaN in the block torch's caching allocator hands out next for a tensor of `shape`:
    it reuses a just-freed block of the same size on the same stream, so the output a call
    allocates starts as NaN rather than as whatever an earlier test left there."""
    torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def attention(q, k, v, causal, kv_lens=None, q_lens=None, poison="out"):
    """ikport.attention into a NaN-filled out= ("out") or into its own allocation ("alloc")."""
    if poison == "out":
        out = poisoned(q.shape, q.dtype)
        assert ikport.attention(q, k, v, causal=causal, kv_lens=kv_lens, q_lens=q_lens, out=out) is out
        return out
    poison_allocator(q.shape, q.dtype)
    return ikport.attention(q, k, v, causal=causal, kv_lens=kv_lens, q_lens=q_lens)


# ---- verdicts ----------------------------------------------------------------------------------
def check(out, ref, sdpa_err, dtype, empty, what=""):
    """`out` against the fp32 `ref`: finite, zeros where `empty` (bool over out's leading dims
    but the heads: [B, Tq] for [B, Hq, Tq, D], [total_q] for varlen), and within tolerance."""
    tol = tolerance(sdpa_err, dtype)
    assert torch.isfinite(out).all(), f"{what}: NaN/inf in the output (unwritten elements or bad math)"
    rows = out.transpose(1, 2)[empty] if out.dim() == 4 else out[empty]
    assert not rows.any(), f"{what}: rows that see no key must be zeros"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e} (2 x SDPA's {sdpa_err:.3e} + slack)"


def verify(out, q, k, v, causal, kv_lens=None, q_lens=None, what=""):
    """A dense or paged call's output (k, v: the dense cache) against the reference."""
    B, _, Tq, _ = q.shape
    ref = reference.attention(q.float(), k.float(), v.float(), causal=causal, kv_lens=kv_lens, q_lens=q_lens)
    masks = dense_masks(B, Tq, k.shape[2], q_lens, kv_lens, causal, DEV)
    check(out, ref, sdpa_error(q, k, v, ref, masks), q.dtype, ~masks.any(-1), what)


def verify_varlen(out, lse, q, k, v, cu_q, cu_k, causal, what=""):
    ref, ref_lse = reference.attention_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, causal=causal,
                                              return_lse=True)
    empty = torch.isneginf(ref_lse[0])  # rows that see no key (alike in every head)
    check(out, ref, sdpa_error_varlen(q, k, v, cu_q, cu_k, ref, causal), q.dtype, empty, what)
    if lse is None:
        return
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0]), (lse.dtype, lse.shape)
    assert torch.isneginf(lse[:, empty]).all(), f"{what}: lse of rows that see no key must be -inf"
    torch.testing.assert_close(lse[:, ~empty], ref_lse[:, ~empty], atol=SLACK[q.dtype], rtol=LSE_RTOL)


def packed(lens, H, D, dtype, gen):
    """[total, H, D] tokens of sequences of `lens` and their int32 offsets [B + 1]."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return rand(cu[-1], H, D, dtype=dtype, gen=gen), i32(cu)


def varlen(q, k, v, cu_q, cu_k, causal, lse=True, poison="out"):
    mq = max(int(x) for x in (cu_q[1:] - cu_q[:-1]).tolist())
    mk = max(int(x) for x in (cu_k[1:] - cu_k[:-1]).tolist())
    if poison == "out":
        out = poisoned(q.shape, q.dtype)
        res = ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, out=out, return_lse=lse)
    else:
        poison_allocator(q.shape, q.dtype)
        res = ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, return_lse=lse)
    out_, lse_ = res if lse else (res, None)
    if poison == "out":
        assert out_ is out
    return out_, lse_


# ---- dense: lengths ----------------------------------------------------------------------------
@DTYPES
@CAUSAL
@pytest.mark.parametrize("n", [1, 17, 129, 1000])
def test_self_attention_lengths(n, causal, dtype):
    """Tq = L = n (1 and 17 run the decode kernels: the API takes any length)."""
    q, k, v = qkv(2, 8, 2, n, n, 128, dtype, seed=n)
    verify(attention(q, k, v, causal), q, k, v, causal, what=f"n={n}")


@pytest.mark.parametrize("causal,dtype", [(True, FP16), (False, BF16)], ids=["causal-fp16", "full-bf16"])
def test_4097_tokens_32_heads(causal, dtype):
    q, k, v = qkv(1, 32, 8, 4097, 4097, 128, dtype, seed=4097)
    verify(attention(q, k, v, causal), q, k, v, causal)


@CAUSAL
@pytest.mark.parametrize("Tq,L", [(17, 129), (129, 1000), (512, 1000), (1000, 4097)], ids=lambda x: str(x))
def test_chunked_queries_over_a_longer_cache(Tq, L, causal):
    """Tq < L: the last Tq tokens of each sequence attend to the whole cache (causal: bottom-right)."""
    dtype = BF16 if L == 1000 else FP16
    B, Hq, Hkv = (1, 32, 8) if L == 4097 else (2, 8, 2)
    q, k, v = qkv(B, Hq, Hkv, Tq, L, 128, dtype, seed=Tq + L)
    verify(attention(q, k, v, causal), q, k, v, causal)


@DTYPES
def test_more_queries_than_keys(dtype):
    """Tq > L, causal: the first Tq - L rows see no key and are zeros; the others see a prefix."""
    q, k, v = qkv(2, 8, 2, 300, 129, 128, dtype, seed=300)
    verify(attention(q, k, v, True), q, k, v, True)
    verify(attention(q, k, v, False), q, k, v, False)


# ---- dense: ragged batches ---------------------------------------------------------------------
# kv_len of each sequence, q_len of each: full, decode-like, equal, q_len > kv_len (causal rows that
# see nothing), kv_len 0, q_len 0
RAGGED_KV = [1000, 600, 517, 33, 0, 700]
RAGGED_Q = [1000, 1, 517, 200, 300, 0]


@DTYPES
@CAUSAL
def test_ragged_batch(causal, dtype):
    q, k, v = qkv(6, 8, 2, 1000, 1000, 128, dtype, seed=6)
    kv, ql = i32(RAGGED_KV), i32(RAGGED_Q)
    verify(attention(q, k, v, causal, kv, ql), q, k, v, causal, kv, ql)


@DTYPES
def test_ragged_batch_default_allocation(dtype):
    """The output the call allocates itself: rows past q_len are written (zeros), not left."""
    q, k, v = qkv(6, 8, 2, 1000, 1000, 128, dtype, seed=7)
    kv, ql = i32(RAGGED_KV), i32(RAGGED_Q)
    out = attention(q, k, v, True, kv, ql, poison="alloc")
    assert out.shape == q.shape and out.is_contiguous()
    verify(out, q, k, v, True, kv, ql)


def test_q_lens_at_decode_lengths():
    """q_lens is part of the API at any Tq, also where the decode kernels run (Tq <= 128)."""
    q, k, v = qkv(3, 8, 2, 17, 129, 128, FP16, seed=17)
    kv, ql = i32([129, 2, 50]), i32([17, 3, 0])
    verify(attention(q, k, v, True, kv, ql), q, k, v, True, kv, ql)


def test_lengths_past_the_tensors_are_clamped():
    q, k, v = qkv(2, 8, 2, 300, 400, 128, FP16, seed=8)
    kv, ql = i32([5000, -3]), i32([5000, -2])
    out = attention(q, k, v, True, kv, ql)
    verify(out, q, k, v, True, i32([400, 0]), i32([300, 0]))


# ---- dense: heads, head dims, strides ----------------------------------------------------------
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (8, 4), (9, 3), (8, 2), (16, 2)], ids=lambda x: str(x))
def test_gqa_ratios(Hq, Hkv):
    """Query heads per KV head 1, 2, 3 (9/3, as SmolLM2), 4, 8."""
    q, k, v = qkv(2, Hq, Hkv, 600, 600, 128, FP16, seed=Hq * 10 + Hkv)
    kv = i32([600, 451])
    verify(attention(q, k, v, True, kv), q, k, v, True, kv)


@DTYPES
@pytest.mark.parametrize("D", [64, 80, 96, 128, 192, 256])
def test_head_dims(D, dtype):
    q, k, v = qkv(2, 8, 2, 333, 333, D, dtype, seed=D)
    ql = i32([333, 150])
    verify(attention(q, k, v, True, q_lens=ql), q, k, v, True, q_lens=ql)


@CAUSAL
def test_strided_inputs(causal):
    """q, k, v as [B, T, H, D] tensors viewed as [B, H, T, D] (.transpose(1, 2)), and k/v as a
    slice of a longer preallocated cache."""
    q, k, v = qkv(2, 8, 2, 700, 700, 128, BF16, seed=9, strided=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    kv, ql = i32([700, 333]), i32([700, 300])
    verify(attention(q, k, v, causal, kv, ql), q, k, v, causal, kv, ql)
    g = torch.Generator(device=DEV).manual_seed(10)
    cache_k, cache_v = rand(3, 2, 1024, 128, dtype=BF16, gen=g), rand(3, 2, 1024, 128, dtype=BF16, gen=g)
    k, v = cache_k[1:3, :, :700], cache_v[1:3, :, :700]
    verify(attention(q, k, v, causal, kv, ql), q, k, v, causal, kv, ql)


@pytest.mark.parametrize("scale", [0.3, -0.2, 0.0], ids=["positive", "negative", "zero"])
def test_explicit_scales(scale):
    """The kernel folds a positive scale into its exp2's FMA; a negative or zero scale reaches it
    through a negated or zeroed copy of q (impl.prefill.positive_scale): the same attention."""
    q, k, v = qkv(2, 4, 2, 300, 300, 64, FP16, seed=11)
    out = poisoned(q.shape, q.dtype)
    ikport.attention(q, k, v, causal=True, scale=scale, out=out)
    ref = reference.attention(q.float(), k.float(), v.float(), causal=True, scale=scale)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() <= 4e-3


# ---- varlen ------------------------------------------------------------------------------------
VARLEN = {  # query lengths, key lengths
    "self": ([1000, 17, 0, 129, 1], [1000, 17, 0, 129, 1]),
    "chunked": ([129, 17, 0, 5, 512], [1000, 17, 300, 0, 512]),  # an empty q, an empty k
    "q-longer": ([300, 64], [129, 64]),  # causal rows before the first key
}


@DTYPES
@CAUSAL
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen(name, causal, dtype):
    lq, lk = VARLEN[name]
    g = torch.Generator(device=DEV).manual_seed(len(name))
    q, cu_q = packed(lq, 8, 128, dtype, g)
    k, cu_k = packed(lk, 2, 128, dtype, g)
    v = rand(*k.shape, dtype=dtype, gen=g)
    out, lse = varlen(q, k, v, cu_q, cu_k, causal)
    verify_varlen(out, lse, q, k, v, cu_q, cu_k, causal, name)


def test_varlen_default_allocation_without_lse():
    lq, lk = VARLEN["chunked"]
    g = torch.Generator(device=DEV).manual_seed(11)
    q, cu_q = packed(lq, 8, 128, FP16, g)
    k, cu_k = packed(lk, 2, 128, FP16, g)
    v = rand(*k.shape, dtype=FP16, gen=g)
    out, _ = varlen(q, k, v, cu_q, cu_k, True, lse=False, poison="alloc")
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    verify_varlen(out, None, q, k, v, cu_q, cu_k, True)


def test_varlen_4097_tokens_32_heads():
    g = torch.Generator(device=DEV).manual_seed(12)
    q, cu_q = packed([4097, 0, 300], 32, 128, BF16, g)
    k, cu_k = packed([4097, 0, 1000], 8, 128, BF16, g)
    v = rand(*k.shape, dtype=BF16, gen=g)
    out, lse = varlen(q, k, v, cu_q, cu_k, True)
    verify_varlen(out, lse, q, k, v, cu_q, cu_k, True)


@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (8, 1, 256), (4, 4, 80), (16, 4, 192), (8, 2, 96)],
                         ids=lambda x: str(x))
def test_varlen_heads_and_head_dims(Hq, Hkv, D):
    g = torch.Generator(device=DEV).manual_seed(Hq + D)
    q, cu_q = packed([333, 1, 129], Hq, D, FP16, g)
    k, cu_k = packed([333, 40, 129], Hkv, D, FP16, g)
    v = rand(*k.shape, dtype=FP16, gen=g)
    out, lse = varlen(q, k, v, cu_q, cu_k, True)
    verify_varlen(out, lse, q, k, v, cu_q, cu_k, True)


def test_varlen_slices_of_a_packed_qkv_projection():
    """q, k, v as column slices of one [total, Hq + 2 Hkv, D] projection: strided token rows."""
    g = torch.Generator(device=DEV).manual_seed(13)
    lens = [700, 33, 0, 129]
    proj, cu = packed(lens, 8 + 2 + 2, 128, BF16, g)
    q, k, v = proj[:, :8], proj[:, 8:10], proj[:, 10:]
    assert not q.is_contiguous()
    out, lse = varlen(q, k, v, cu, cu, True)
    verify_varlen(out, lse, q, k, v, cu, cu, True)


# ---- paged: chunked prefill --------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_chunked_prefill(page_size, dtype):
    """A chunk of 512 query tokens per sequence after a prefix already in the pages, the chunk's
    own K/V written there too (kv_len = prefix + q_len); sequence 1 has no prefix, sequence 2 a
    shorter last chunk (q_lens)."""
    prefix, q_len = [1000, 0, 333], [512, 512, 100]
    kv_lens = [p + n for p, n in zip(prefix, q_len)]
    q, k, v = qkv(3, 16, 4, 512, max(kv_lens), 128, dtype, seed=page_size)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, page_size, generator=torch.Generator().manual_seed(page_size))
    kv, ql = i32(kv_lens), i32(q_len)
    out = poisoned(q.shape, dtype)
    assert ikport.paged_attention(q, kp, vp, bt, kv, causal=True, q_lens=ql, out=out) is out
    verify(out, q, k, v, True, kv, ql, what=f"page size {page_size}")


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_cache_past_kv_len_never_leaks(paged):
    """K/V rows at or past kv_len hold NaN and inf, and the block table past each sequence's last
    page holds garbage ids (-1, huge): none of it may reach the output."""
    q, k, v = qkv(3, 8, 2, 300, 1024, 128, FP16, seed=14)
    kv, ql = i32([700, 300, 1024]), i32([300, 300, 150])
    k_clean, v_clean = k.clone(), v.clone()
    past = torch.arange(1024, device=DEV).view(1, 1, -1, 1) >= kv.view(-1, 1, 1, 1).long()
    k, v = k.masked_fill(past, float("nan")), v.masked_fill(past, float("inf"))
    out = poisoned(q.shape, FP16)
    if paged:
        kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(2))
        page = torch.arange(bt.shape[1], device=DEV).view(1, -1)
        unused = page * 16 >= kv.view(-1, 1).long()
        garbage = torch.where(page % 2 == 0, -1, 2**31 - 1).to(torch.int32).expand_as(bt)
        ikport.paged_attention(q, kp, vp, torch.where(unused, garbage, bt), kv, causal=True, q_lens=ql, out=out)
    else:
        ikport.attention(q, k, v, causal=True, kv_lens=kv, q_lens=ql, out=out)
    verify(out, q, k_clean, v_clean, True, kv, ql)


# ---- CUDA graphs, torch.compile, the op ---------------------------------------------------------
def capture(fn):
    fn()  # compile the kernel and plan outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def test_cuda_graph_capture_and_replay():
    """A captured prefill call replays with new kv_lens / q_lens, bit-identical to eager calls."""
    q, k, v = qkv(3, 8, 2, 700, 1000, 128, FP16, seed=15)
    kv, ql = i32([1000, 700, 1]), i32([700, 300, 1])
    out = torch.empty_like(q)
    graph = capture(lambda: ikport.attention(q, k, v, causal=True, kv_lens=kv, q_lens=ql, out=out))
    for new_kv, new_q in (([1000, 5, 700], [700, 5, 700]), ([17, 1000, 0], [700, 1, 0])):
        kv.copy_(i32(new_kv))
        ql.copy_(i32(new_q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ikport.attention(q, k, v, causal=True, kv_lens=kv, q_lens=ql)), new_kv
        verify(out, q, k, v, True, kv, ql)


def test_cuda_graph_varlen():
    """A captured varlen call replays with new offsets (same totals, within max_seqlen)."""
    g = torch.Generator(device=DEV).manual_seed(16)
    q, cu = packed([600, 100, 300], 8, 128, BF16, g)
    k, v = rand(1000, 2, 128, dtype=BF16, gen=g), rand(1000, 2, 128, dtype=BF16, gen=g)
    out = torch.empty_like(q)
    box = {}

    def call():
        box["lse"] = ikport.attention_varlen(q, k, v, cu, cu, 1000, 1000, causal=True, out=out, return_lse=True)[1]

    graph = capture(call)
    for offsets in ([0, 100, 100, 1000], [0, 1000, 1000, 1000]):
        cu.copy_(i32(offsets))
        out.fill_(float("nan"))
        box["lse"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager, eager_lse = ikport.attention_varlen(q, k, v, cu, cu, 1000, 1000, causal=True, return_lse=True)
        assert torch.equal(out, eager) and torch.equal(box["lse"], eager_lse), offsets
        verify_varlen(out, box["lse"], q, k, v, cu, cu, True)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) (inductor) of functions calling ikport.attention with
    Tq > 128 and ikport.attention_varlen: the same result as eager calls."""
    q, k, v = qkv(2, 8, 2, 300, 300, 128, FP16, seed=17)
    kv, ql = i32([300, 200]), i32([300, 150])

    def f(q, k, v, n, m):
        return ikport.attention(q, k, v, causal=True, kv_lens=n, q_lens=m)

    got = torch.compile(f, fullgraph=True)(q, k, v, kv, ql)
    torch.cuda.synchronize()
    assert torch.equal(got, f(q, k, v, kv, ql))
    verify(got, q, k, v, True, kv, ql)
    g = torch.Generator(device=DEV).manual_seed(18)
    qv, cu = packed([200, 0, 129], 8, 128, FP16, g)
    kv_ = rand(329, 2, 128, dtype=FP16, gen=g)

    def h(q, k, cu):
        return ikport.attention_varlen(q, k, k, cu, cu, 200, 200, causal=True, return_lse=True)

    out, lse = torch.compile(h, fullgraph=True)(qv, kv_, cu)
    torch.cuda.synchronize()
    eager, eager_lse = h(qv, kv_, cu)
    assert torch.equal(out, eager) and torch.equal(lse, eager_lse)


def test_opcheck_varlen_gpu():
    g = torch.Generator(device=DEV).manual_seed(19)
    q, cu_q = packed([200, 0, 17], 8, 64, BF16, g)
    k, cu_k = packed([300, 5, 17], 2, 64, BF16, g)
    v = rand(*k.shape, dtype=BF16, gen=g)
    torch.library.opcheck(torch.ops.ikport.attention_varlen.default,
                          (q, k, v, cu_q, cu_k, 200, 300, True, None, True, None))


# ---- errors before launch ----------------------------------------------------------------------
def test_bad_inputs_raise_before_launch(monkeypatch):
    g = torch.Generator(device=DEV).manual_seed(20)
    q, cu = packed([300, 29], 8, 128, FP16, g)
    k = rand(329, 2, 128, dtype=FP16, gen=g)
    with pytest.raises(ValueError, match="cu_seqlens_q is on cpu"):
        ikport.attention_varlen(q, k, k, cu.cpu(), cu, 300, 300)
    with pytest.raises(TypeError, match="cu_seqlens_k must be int32"):
        ikport.attention_varlen(q, k, k, cu, cu.long(), 300, 300)
    qd, kd, vd = qkv(2, 8, 2, 300, 300, 128, FP16, seed=20)
    with pytest.raises(TypeError, match="q_lens must be int32"):
        ikport.attention(qd, kd, vd, q_lens=torch.tensor([3, 3], device=DEV))
    with pytest.raises(ValueError, match="q_lens is on cpu"):
        ikport.attention(qd, kd, vd, q_lens=torch.tensor([3, 3], dtype=torch.int32))
    bad = i32([0, 200, 100])  # decreasing (and not ending at the total)
    monkeypatch.setenv("IKPORT_CHECK_TABLES", "1")
    ikport.impl.attention.clear_plans()  # the knob may be read when a layout is first seen
    with pytest.raises(ValueError, match="the offsets must not decrease"):
        ikport.attention_varlen(q, k, k, bad, cu, 300, 300)
    torch.cuda.synchronize()  # nothing was launched with bad arguments; the context is healthy
    out, lse = varlen(q, k, k, cu, cu, True)
    verify_varlen(out, lse, q, k, k, cu, cu, True)
