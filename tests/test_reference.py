"""The reference against a float64 loop written from the definition (CPU)."""

import math

import pytest
import torch

import ikport
from ikport import reference


def loop_attention(q, k, v, causal, scale, kv_lens):
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    for b in range(B):
        n = L if kv_lens is None else int(kv_lens[b])
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for t in range(Tq):
                last = n - 1 - (Tq - 1 - t if causal else 0)
                if last < 0:
                    continue
                s = [float(q[b, h, t].double() @ k[b, hk, j].double()) * scale for j in range(last + 1)]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                tot = sum(w)
                for j, wj in enumerate(w):
                    out[b, h, t] += wj / tot * v[b, hk, j].double()
    return out


@pytest.mark.parametrize("B,Hq,Hkv,Tq,L,D", [(2, 4, 2, 1, 9, 16), (3, 6, 2, 3, 7, 32), (1, 8, 1, 2, 1, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_definition(B, Hq, Hkv, Tq, L, D, causal):
    g = torch.Generator().manual_seed(B * 100 + L)
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    lens = torch.randint(0, L + 1, (B,), generator=g, dtype=torch.int32)
    lens[0] = L
    scale = 0.3
    got = reference.attention(q, k, v, causal=causal, scale=scale, kv_lens=lens, upcast=torch.float64)
    want = loop_attention(q, k, v, causal, scale, lens)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_zero_length_sequence_gives_zeros():
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(2, 2, 5, 16)
    out = ikport.attention(q, k, k, kv_lens=torch.tensor([0, 5], dtype=torch.int32))
    assert torch.all(out[0] == 0)
    assert torch.all(torch.isfinite(out[1])) and out[1].abs().sum() > 0


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_paged_reference_equals_dense(page_size):
    g = torch.Generator().manual_seed(page_size)
    q = torch.randn(3, 4, 1, 32, generator=g)
    k = torch.randn(3, 2, 37, 32, generator=g)
    v = torch.randn(3, 2, 37, 32, generator=g)
    lens = torch.tensor([37, 5, 20], dtype=torch.int32)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, page_size, generator=g)
    assert bt.dtype == torch.int32 and bt.shape == (3, -(-37 // page_size))
    if bt.numel() > 2:
        assert not torch.equal(bt.flatten(), torch.sort(bt.flatten()).values)  # shuffled
    dense = ikport.attention(q, k, v, kv_lens=lens)
    paged = ikport.paged_attention(q, kp, vp, bt, lens)
    torch.testing.assert_close(paged, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reference.gather_pages(kp, bt, 37), k)


def test_cpu_path_writes_into_out():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 4, 16)
    out = torch.full_like(q, float("nan"))
    res = ikport.attention(q, k, k, out=out)
    assert res is out and torch.isfinite(out).all()
