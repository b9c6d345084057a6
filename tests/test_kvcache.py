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
    with pytest.raises(ValueError, match="query tokens"):
        cache.attend(torch.zeros(2, 4, 200, 64, dtype=torch.float16))
    from ikport.impl.attention import int8_attention

    with pytest.raises(TypeError, match="int8"):  # codes of another dtype
        int8_attention(torch.zeros(2, 4, 1, 64, dtype=torch.float16), cache.k.half(), cache.v, cache.k_scale,
                       cache.v_scale, None, cache.lens)
