"""ikport.KVCache on the CPU: storage and byte costs, append (quantizing for int8) against a plain
loop, paged and contiguous caches equal, attend against the oracle (the reference on the
dequantized cache), and the INT8 format itself."""

from __future__ import annotations

import pytest
import torch

import ikport
from ikport import kvquant, reference

DTYPES = [torch.float16, torch.bfloat16]


def filled(kv_format: str, page_size: int = 0, *, B=3, Hkv=2, L=40, D=64, dtype=torch.float16, steps=(7, 1, 5),
           seed=0, block_table=None, num_pages=None):
    """A cache after a few appends of random K/V (sequence lengths staggered by `positions`), and
    the appended rows as a dense [B, Hkv, L, D] tensor pair (zeros elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    cache = ikport.KVCache(B, Hkv, L, D, dtype=dtype, kv_format=kv_format, page_size=page_size,
                           block_table=block_table, num_pages=num_pages)
    k_all = torch.zeros(B, Hkv, L, D, dtype=dtype)
    v_all = torch.zeros_like(k_all)
    pos = torch.tensor([0, 3, 1][:B], dtype=torch.int32)
    cache.append(torch.zeros(B, Hkv, 0, D, dtype=dtype), torch.zeros(B, Hkv, 0, D, dtype=dtype), pos)
    for n in steps:
        k = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
        for b, p in enumerate(cache.lens.tolist()):
            k_all[b, :, p:p + n], v_all[b, :, p:p + n] = k[b], v[b]
        cache.append(k, v)
    return cache, k_all, v_all


def test_quantize_int8_is_symmetric_per_row_and_round_trips_within_half_a_step():
    x = torch.randn(4, 3, 5, 128) * torch.logspace(-4, 4, 5).view(1, 1, 5, 1)
    x[0, 0, 0] = 0  # an all-zero row: scale 0, codes 0
    codes, scales = kvquant.quantize_int8(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == x.shape[:3]
    assert codes.abs().max() <= 127 and (codes.abs().amax(-1)[scales > 0] == 127).all()
    assert scales[0, 0, 0] == 0 and (codes[0, 0, 0] == 0).all()
    back = kvquant.dequantize_int8(codes, scales, torch.float32)
    assert ((back - x).abs() <= scales.unsqueeze(-1) / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("D", [64, 128])
def test_bytes_per_token_and_nbytes(D):
    dense = ikport.KVCache(8, 8, 4096, D, kv_format="dense")
    int8 = ikport.KVCache(8, 8, 4096, D, kv_format="int8")
    assert dense.bytes_per_token == 2 * 8 * D * 2 and int8.bytes_per_token == 2 * 8 * (D + 4)
    assert dense.nbytes == 8 * 4096 * dense.bytes_per_token and int8.nbytes == 8 * 4096 * int8.bytes_per_token
    if D == 128:  # D1: 134 MB -> 69 MB, within the 0.52x budget
        assert dense.nbytes == 134_217_728 and int8.nbytes / dense.nbytes == pytest.approx(0.5156, abs=1e-4)
    paged = ikport.KVCache(8, 8, 4096, D, kv_format="int8", page_size=16)
    assert paged.nbytes == int8.nbytes and paged.k.shape == (8 * 256, 8, 16, D)


@pytest.mark.parametrize("kv_format", ["dense", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_writes_each_sequences_rows_and_advances_lens(kv_format, dtype):
    cache, k_all, v_all = filled(kv_format, dtype=dtype)
    assert cache.lens.tolist() == [13, 16, 14] and cache.lens.dtype == torch.int32
    k, v = cache.dequantized()
    if kv_format == "dense":
        assert torch.equal(k, k_all) and torch.equal(v, v_all)
    else:  # each row within half a quantization step of what was appended
        for got, want, s in ((k, k_all, cache.k_scale), (v, v_all, cache.v_scale)):
            err = (got.float() - want.float()).abs()
            assert (err <= s.unsqueeze(-1) / 2 + want.float().abs() * 2**-7 + 1e-6).all()
        assert (cache.k_scale[0, :, 13:] == 0).all()  # rows never written stay zero


@pytest.mark.parametrize("kv_format", ["dense", "int8"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_and_contiguous_caches_hold_the_same_rows(kv_format, page_size):
    flat, _, _ = filled(kv_format, seed=3)
    per_seq = -(-40 // page_size)
    table = torch.randperm(3 * per_seq, generator=torch.Generator().manual_seed(1)).to(torch.int32).view(3, per_seq)
    paged, _, _ = filled(kv_format, page_size, seed=3, block_table=table)
    assert torch.equal(paged.lens, flat.lens)
    for got, want in zip(paged.dequantized(), flat.dequantized()):
        assert torch.equal(reference.gather_pages(got, paged.block_table, paged.capacity)[:, :, :40], want)
    q = torch.randn(3, 4, 1, 64).half()
    assert torch.equal(paged.attend(q), flat.attend(q))


@pytest.mark.parametrize("kv_format", ["dense", "int8"])
@pytest.mark.parametrize("page_size", [0, 8])
@pytest.mark.parametrize("causal,Tq", [(False, 1), (True, 3)])
def test_attend_matches_the_oracle(kv_format, page_size, causal, Tq):
    cache, k_all, v_all = filled(kv_format, page_size, dtype=torch.bfloat16, seed=5)
    q = torch.randn(3, 4, Tq, 64).to(torch.bfloat16)
    out = cache.attend(q, causal=causal, scale=0.1)
    assert torch.equal(out, cache.reference_attend(q, causal=causal, scale=0.1))
    exact = reference.attention(q, k_all, v_all, causal=causal, scale=0.1, kv_lens=cache.lens)
    err = (out.float() - exact.float()).abs().max().item()
    assert err <= (1.6e-2 if kv_format == "dense" else 5e-2), err  # int8: the quantization's own error
    o = torch.empty_like(q)
    assert cache.attend(q, causal=causal, scale=0.1, out=o) is o and torch.equal(o, out)


def test_the_cache_checks_its_arguments():
    with pytest.raises(ValueError, match="kv_format"):
        ikport.KVCache(1, 1, 8, 64, kv_format="int4")
    with pytest.raises(ValueError, match="page_size"):
        ikport.KVCache(1, 1, 8, 64, page_size=12)
    with pytest.raises(ValueError, match="head_dim"):
        ikport.KVCache(1, 1, 8, 72)
    cache = ikport.KVCache(2, 2, 8, 64, kv_format="int8")
    with pytest.raises(ValueError, match="k_new"):
        cache.append(torch.zeros(2, 1, 1, 64), torch.zeros(2, 1, 1, 64))
    from ikport.impl.attention import int8_attention as attend8

    buf = torch.zeros(2 * 4 * 64 + 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="q: data pointer"):  # q read in 16-byte vectors: aligned
        attend8(buf[1:].view(2, 4, 1, 64), cache.k, cache.v, cache.k_scale, cache.v_scale, None, cache.lens)
    with pytest.raises(ValueError, match="kv_lens must be contiguous"):
        attend8(torch.zeros(2, 4, 1, 64, dtype=torch.float16), cache.k, cache.v, cache.k_scale, cache.v_scale, None,
                torch.zeros(4, dtype=torch.int32)[::2])
    for bad in (torch.zeros(2), torch.zeros(3, dtype=torch.int32), [0, 1]):  # float, wrong size, not a tensor
        with pytest.raises(ValueError, match="positions"):
            cache.append(torch.zeros(2, 2, 1, 64), torch.zeros(2, 2, 1, 64), positions=bad)
    with pytest.raises(ValueError, match="query tokens"):  # DecodeOptions pin decode: at most 128 tokens
        cache.attend(torch.zeros(2, 4, 200, 64, dtype=torch.float16), options=ikport.DecodeOptions())
    with pytest.raises(TypeError, match="options"):
        cache.attend(torch.zeros(2, 4, 1, 64, dtype=torch.float16), options=ikport.W4A16Options())
    from ikport.impl.attention import int8_attention

    with pytest.raises(TypeError, match="int8"):  # codes of another dtype
        int8_attention(torch.zeros(2, 4, 1, 64, dtype=torch.float16), cache.k.half(), cache.v, cache.k_scale,
                       cache.v_scale, None, cache.lens)


# ---- KIVI INT4 -------------------------------------------------------------------------------------
def outlier_kv(B, Hkv, n, D, *, dtype=torch.float16, seed=0, outlier=16.0):
    """K with persistent per-channel outliers and offsets (as KIVI finds in real keys), V plain;
    never zeros."""
    g = torch.Generator().manual_seed(seed)
    channel = 1 + (outlier - 1) * (torch.rand(D, generator=g) < 0.1) + torch.rand(D, generator=g)
    k = torch.randn(B, Hkv, n, D, generator=g) * channel + 2 * torch.randn(D, generator=g)
    return k.to(dtype), torch.randn(B, Hkv, n, D, generator=g).to(dtype)


def test_kivi_quantizers_round_trip_within_half_a_step_and_reach_the_extremes():
    x = torch.randn(2, 3, 256, 64) * torch.logspace(-3, 3, 64)
    x[0, 0, :128, 5] = 7.0  # a constant channel in one group: scale 0, exact
    for dtype in DTYPES:
        xd = x.to(dtype)
        codes, pairs = kvquant.quantize_int4_channels(xd, 128)
        assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 256, 32) and pairs.shape == (2, 3, 2, 64, 2)
        assert pairs.dtype == dtype and pairs[0, 0, 0, 5, 0] == 0 and pairs[0, 0, 0, 5, 1] == 7
        scale = pairs[..., 0].float()
        assert (scale * 15 >= xd.float().view(2, 3, 2, 128, 64).amax(-2) - pairs[..., 1].float()).all()  # rounded up
        back = kvquant.dequantize_kivi_k(codes, pairs, 128, torch.float32)
        step = scale.repeat_interleave(128, dim=-2)
        assert ((back - xd.float()).abs() <= step / 2 * (1 + 1e-3) + 1e-30).all()
        codes, pairs = kvquant.quantize_int4_tokens(xd)
        back = kvquant.dequantize_int4(codes, pairs, torch.float32)
        assert ((back - xd.float()).abs() <= pairs[..., :1].float() / 2 * (1 + 1e-3)).all()
    assert kvquant.unpack_int4(torch.tensor([0x21, 0xF0], dtype=torch.uint8)).tolist() == [1, 2, 0, 15]
    with pytest.raises(ValueError, match="whole groups"):
        kvquant.quantize_int4_channels(torch.zeros(1, 100, 64), 32)


@pytest.mark.parametrize("G", [32, 128])
def test_kivi_bytes_match_the_allocation_and_the_d1_budget(G):
    dense = ikport.KVCache(8, 8, 4096, 128, kv_format="dense")
    kivi = ikport.KVCache(8, 8, 4096, 128, kv_format="kivi4", kivi_group=G)
    per_head = 64 + 64 + 4 + 128 * 4 / G  # K, V codes; V's pair; K's pairs over G tokens
    assert kivi.bytes_per_token == 8 * per_head
    assert kivi.nbytes == 8 * 4096 * kivi.bytes_per_token + 8 * 8 * G * 128 * 2  # + the residual
    if G == 128:  # D1: 37,748,736 bytes, 0.281x fp16 (the budget: 0.30x)
        assert kivi.nbytes == 37_748_736 and kivi.nbytes <= 0.30 * dense.nbytes
    paged = ikport.KVCache(8, 8, 4096, 128, kv_format="kivi4", kivi_group=G, page_size=16)
    assert paged.nbytes == kivi.nbytes and paged.k.shape == (8 * 256, 8, 16, 64)
    assert paged.k_scale.shape == (8, 8, 4096 // G, 128, 2) and paged.v_scale.shape == (8 * 256, 8, 16, 2)


@pytest.mark.parametrize("page_size", [0, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kivi_append_one_token_at_a_time_equals_one_chunk_and_holds_the_rows(page_size, dtype):
    """Ragged starting positions, a chunk that completes several groups and leaves a residual;
    token by token the same groups fold from the residual: the same codes, pairs and residual."""
    B, H, L, D, G = 3, 2, 256, 64, 32
    table = None
    if page_size:
        per_seq = L // page_size
        table = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(2)).to(torch.int32).view(B, -1)
    pos = torch.tensor([0, 5, 40], dtype=torch.int32)
    caches = []
    for _ in range(2):
        c = ikport.KVCache(B, H, L, D, dtype=dtype, kv_format="kivi4", kivi_group=G, page_size=page_size,
                           block_table=table)
        c.append(torch.zeros(B, H, 0, D, dtype=dtype), torch.zeros(B, H, 0, D, dtype=dtype), pos)
        caches.append(c)
    k, v = outlier_kv(B, H, 100, D, dtype=dtype)
    caches[0].append(k, v)
    for i in range(100):
        caches[1].append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert caches[0].lens.tolist() == caches[1].lens.tolist() == [100, 105, 140]
    (k0, v0), (k1, v1) = (reference.kivi_kv(c.k, c.v, c.k_scale, c.v_scale, c.k_resid, c.lens, G, dtype, c.block_table)
                          for c in caches)
    for b, p in enumerate(pos.tolist()):
        n = p + 100
        assert torch.equal(k0[b, :, :n], k1[b, :, :n]) and torch.equal(v0[b, :, :n], v1[b, :, :n])
        # the residual (rows n // G * G .. n - 1) exact; quantized rows within their step
        q = n // G * G
        assert torch.equal(k0[b, :, q:n], k[b, :, q - p:])
        err = (k0[b, :, p:q].float() - k[b, :, :q - p].float()).abs()
        step = caches[0].k_scale[b, :, :, :, 0].float().repeat_interleave(G, dim=1)[:, p:q]
        assert (err <= step / 2 * 1.01 + k.float().abs().amax() * 2**-7).all()
    assert torch.equal(caches[0].attend(torch.ones(B, 4, 1, D, dtype=dtype)),
                       caches[1].attend(torch.ones(B, 4, 1, D, dtype=dtype)))


def test_kivi_rewrite_inside_a_folded_group_keeps_its_earlier_rows():
    """positions below the length (a rollback): the group's earlier rows come back from its codes,
    the later ones are replaced, the length follows the positions."""
    B, H, L, D, G = 2, 1, 128, 32, 32
    cache = ikport.KVCache(B, H, L, D, kv_format="kivi4", kivi_group=G)
    k, v = outlier_kv(B, H, 70, D, seed=4)
    cache.append(k, v)
    before, _ = cache.dequantized()
    k2, v2 = outlier_kv(B, H, 1, D, seed=5)
    cache.append(k2, v2, positions=torch.tensor([40, 69], dtype=torch.int32))
    after, _ = cache.dequantized()
    assert cache.lens.tolist() == [41, 70]
    assert torch.equal(after[0, :, :32], before[0, :, :32])  # group 0 untouched
    assert torch.equal(after[0, :, 32:40], before[0, :, 32:40])  # group 1's rows from its codes (exact again)
    assert torch.equal(after[0, :, 40], k2[0, :, 0])  # the new row, in the residual
    assert torch.equal(after[1, :, :69], before[1, :, :69]) and torch.equal(after[1, :, 69], k2[1, :, 0])


@pytest.mark.parametrize("page_size", [0, 16])
@pytest.mark.parametrize("causal,Tq", [(False, 1), (True, 3)])
def test_kivi_attend_matches_the_oracle_and_beats_per_token_int4_keys(page_size, causal, Tq):
    """The CPU path is the oracle itself; against exact attention KIVI's error stays small with
    16x per-channel key outliers, where per-token INT4 keys (one scale for every channel of a
    token, the outliers' range) lose far more: the seed's finding, on synthetic keys."""
    B, H, L, D = 2, 2, 300, 64
    cache = ikport.KVCache(B, H, L, D, dtype=torch.float16, kv_format="kivi4", page_size=page_size)
    k, v = outlier_kv(B, H, 290, D, seed=7)
    cache.append(k[:, :, :200], v[:, :, :200])
    for i in range(200, 290):
        cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    q = torch.randn(B, 8, Tq, D, generator=torch.Generator().manual_seed(8)).half()
    out = cache.attend(q, causal=causal, scale=0.1)
    assert torch.equal(out, cache.reference_attend(q, causal=causal, scale=0.1))
    exact = reference.attention(q, k, v, causal=causal, scale=0.1)
    kt = kvquant.dequantize_int4(*kvquant.quantize_int4_tokens(k), torch.float16)
    vq = kvquant.dequantize_int4(*kvquant.quantize_int4_tokens(v), torch.float16)
    per_token = reference.attention(q, kt, vq, causal=causal, scale=0.1)
    err_kivi = (out.float() - exact.float()).abs().mean().item()
    err_token = (per_token.float() - exact.float()).abs().mean().item()
    assert err_kivi < 0.6 * err_token, (err_kivi, err_token)


def test_kivi_checks_name_the_argument():
    with pytest.raises(ValueError, match="kivi_group"):
        ikport.KVCache(1, 1, 64, 64, kv_format="kivi4", kivi_group=48)
    with pytest.raises(ValueError, match="kivi_group"):
        ikport.KVCache(1, 1, 64, 64, kv_format="int8", kivi_group=32)
    cache = ikport.KVCache(2, 2, 64, 64, kv_format="kivi4", kivi_group=32)
    from ikport.impl.attention import kivi_attention

    q = torch.zeros(2, 4, 1, 64, dtype=torch.float16)
    args = [cache.k, cache.v, cache.k_scale, cache.v_scale, cache.k_resid, 32, None, cache.lens]
    with pytest.raises(TypeError, match="uint8"):
        kivi_attention(q, cache.k.to(torch.int8), *args[1:])
    with pytest.raises(ValueError, match="k_scale"):
        kivi_attention(q, *args[:2], cache.k_scale.float(), *args[3:])
    with pytest.raises(ValueError, match="k_resid"):
        kivi_attention(q, *args[:4], cache.k_resid[:, :, :16], *args[5:])
    with pytest.raises(ValueError, match="kivi_group"):
        kivi_attention(q, *args[:5], 16, *args[6:])
    with pytest.raises(ValueError, match="head_dim"):
        kivi_attention(torch.zeros(2, 4, 1, 32, dtype=torch.float16), *args)


# ---- chunked prefill over a compressed prefix ------------------------------------------------------
@pytest.mark.parametrize("kv_format", ["int8", "kivi4"])
@pytest.mark.parametrize("page_size", [0, 16])
def test_chunked_prefill_over_a_compressed_prefix_matches_the_oracle(kv_format, page_size):
    """A server's chunked prefill: the chunk's own K/V appended first, then its 150 queries (past
    decode's 128: the prefill kernel on a GPU, the reference on the CPU) attend causally, aligned
    bottom-right, to the prefix (ragged: 90 and 41 tokens) and to themselves; PrefillOptions
    route a shorter chunk the same way."""
    B, H, D, chunk = 2, 2, 64, 150
    fmt = dict(kivi_group=32) if kv_format == "kivi4" else {}
    cache = ikport.KVCache(B, H, 256, D, dtype=torch.bfloat16, kv_format=kv_format, page_size=page_size, **fmt)
    k, v = outlier_kv(B, H, 90 + chunk, D, dtype=torch.bfloat16, seed=9)
    cache.append(k[:, :, :90], v[:, :, :90])
    cache.append(k[:, :, :1], v[:, :, :1], positions=torch.tensor([89, 40], dtype=torch.int32))  # ragged
    cache.append(k[:, :, 90:], v[:, :, 90:])
    assert cache.lens.tolist() == [90 + chunk, 41 + chunk]
    q = torch.randn(B, 8, chunk, D, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    out = cache.attend(q, causal=True)
    assert torch.equal(out, cache.reference_attend(q, causal=True))
    if kv_format == "int8":
        ref = reference.int8_attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale,
                                       block_table=cache.block_table, causal=True, kv_lens=cache.lens)
    else:
        ref = reference.kivi_attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale, cache.k_resid, 32,
                                       block_table=cache.block_table, causal=True, kv_lens=cache.lens)
    assert torch.equal(out, ref)
    short = q[:, :, -20:]
    assert torch.equal(cache.attend(short, causal=True, options=ikport.PrefillOptions()),
                       cache.reference_attend(short, causal=True))
