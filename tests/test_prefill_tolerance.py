"""The prefill GPU suite's yardstick (tests/prefill_tolerance.py) on the CPU: the tolerance per
dtype, the visibility mask against the reference, and SDPA's error measured only where SDPA is
defined."""

import pytest
import torch

import prefill_tolerance as pt
from ikport import reference


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def test_tolerance_per_dtype():
    assert pt.tolerance(0.0, torch.float16) == pytest.approx(1e-3)
    assert pt.tolerance(0.0, torch.bfloat16) == pytest.approx(8e-3)
    assert pt.tolerance(2e-3, torch.float16) == pytest.approx(5e-3)
    assert pt.tolerance(1e-2, torch.bfloat16) == pytest.approx(2.8e-2)
    with pytest.raises(KeyError):
        pt.tolerance(0.0, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_masks_agree_with_the_reference(causal):
    """Rows the mask leaves empty are the rows the reference gives as zeros with lse -inf, and
    the reference equals a masked softmax with the mask."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Tq, L, D = 4, 2, 9, 7, 16
    q, k, v = (torch.randn(B, Hq, Tq, D, generator=g, dtype=torch.float64),
               torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64),
               torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64))
    ql, kl = i32([9, 3, 12, 5]), i32([7, 7, 2, -1])
    masks = pt.dense_masks(B, Tq, L, ql, kl, causal)
    out, lse = reference.attention(q, k, v, causal=causal, kv_lens=kl, q_lens=ql, upcast=torch.float64,
                                   return_lse=True)
    empty = ~masks.any(-1)
    assert torch.equal(torch.isneginf(lse[:, 0]), empty)
    assert not out.transpose(1, 2)[empty].any()
    s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~masks[:, None], float("-inf"))
    want = torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ v
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_visible_clamps_lengths():
    assert torch.equal(pt.visible(3, 4, 99, 99, False), pt.visible(3, 4, 3, 4, False))
    assert not pt.visible(3, 4, -1, 4, False).any() and not pt.visible(3, 4, 3, -5, True).any()
    assert pt.visible(5, 2, 5, 2, True).sum(-1).tolist() == [0, 0, 0, 1, 2]  # bottom-right


def test_sdpa_error_is_small_in_fp32_larger_in_bf16_and_ignores_empty_rows():
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, Tq, L, D = 2, 4, 2, 12, 10, 32
    q, k, v = torch.randn(B, Hq, Tq, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), \
        torch.randn(B, Hkv, L, D, generator=g)
    ql, kl = i32([12, 4]), i32([10, 3])  # causal: the first two rows of sequence 0 see nothing
    ref = reference.attention(q, k, v, causal=True, kv_lens=kl, q_lens=ql)
    masks = pt.dense_masks(B, Tq, L, ql, kl, True)
    assert (~masks.any(-1)).any()
    err32 = pt.sdpa_error(q, k, v, ref, masks)
    assert 0 <= err32 < 1e-5
    err16 = pt.sdpa_error(q.bfloat16(), k.bfloat16(), v.bfloat16(), ref, masks)
    assert 1e-4 < err16 < 0.1


def test_sdpa_error_varlen_is_the_dense_error_of_each_sequence():
    g = torch.Generator().manual_seed(2)
    lq, lk = [5, 0, 7, 3], [5, 4, 2, 0]
    q, k = torch.randn(sum(lq), 4, 16, generator=g), torch.randn(sum(lk), 2, 16, generator=g)
    v = torch.randn_like(k)
    cu_q = i32([0, 5, 5, 12, 15])
    cu_k = i32([0, 5, 9, 11, 11])
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    assert pt.sdpa_error_varlen(q, k, v, cu_q, cu_k, ref, causal=True) < 1e-5
    assert pt.sdpa_error_varlen(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q, cu_k, ref, causal=True) > 1e-4
    noisy = ref.clone()
    noisy[6] += 0.5  # sequence 2 (rows 5..11, 2 keys, causal): its first 5 rows see nothing, not counted
    assert pt.sdpa_error_varlen(q, k, v, cu_q, cu_k, noisy, causal=True) < 1e-5
    noisy[11] += 0.5  # its last row sees both keys: counted
    assert pt.sdpa_error_varlen(q, k, v, cu_q, cu_k, noisy, causal=True) == pytest.approx(0.5, abs=1e-4)
