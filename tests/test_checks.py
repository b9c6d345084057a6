"""Every bad input raises a clear error before anything launches (CPU)."""

import pytest
import torch

import ikport
from ikport import checks


def qkv(B=2, Hq=4, Hkv=2, Tq=1, L=8, D=64, dtype=torch.float16):
    return (torch.randn(B, Hq, Tq, D, dtype=dtype), torch.randn(B, Hkv, L, D, dtype=dtype),
            torch.randn(B, Hkv, L, D, dtype=dtype))


def test_valid_inputs_pass_gpu_checks():
    q, k, v = qkv()
    checks.attention(q, k, v, torch.zeros(2, dtype=torch.int32), gpu=True)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: (torch.randn(2, 4, 64), *qkv()[1:]), ValueError, "must have 4 dims"),
    (lambda: ("q", *qkv()[1:]), TypeError, "torch.Tensor"),
    (lambda: (qkv()[0], qkv()[1].float(), qkv()[2]), TypeError, "share a dtype"),
    (lambda: qkv(dtype=torch.float32), TypeError, "not supported on"),
    (lambda: qkv(Hq=6, Hkv=4), ValueError, "multiple of KV heads"),
    (lambda: qkv(D=72), ValueError, "head_dim 72"),
    (lambda: qkv(D=272), ValueError, "head_dim 272"),
    (lambda: qkv(Tq=129), NotImplementedError, "prefill"),
    (lambda: (qkv()[0], qkv()[1], qkv(L=9)[2]), ValueError, "same shape"),
    (lambda: (qkv()[0], qkv(D=32)[1], qkv(D=32)[2]), ValueError, "head_dim of q"),
    (lambda: (qkv()[0], torch.randn(2, 2, 64, 8, dtype=torch.float16).transpose(2, 3),
              torch.randn(2, 2, 64, 8, dtype=torch.float16).transpose(2, 3)), ValueError, "last dim must be contiguous"),
    (lambda: (qkv()[0], torch.randn(2, 2, 8, 68, dtype=torch.float16)[..., :64],
              torch.randn(2, 2, 8, 68, dtype=torch.float16)[..., :64]), ValueError, "multiples of 8"),
])
def test_bad_inputs_raise_on_gpu_path(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        checks.attention(q, k, v, None, gpu=True)


def test_misaligned_pointer_raises():
    q, k, v = qkv()
    base = torch.randn(2 * 2 * 8 * 64 + 1, dtype=torch.float16)
    k_off = base[1:].view(2, 2, 8, 64)
    with pytest.raises(ValueError, match="16-byte aligned"):
        checks.attention(q, k_off, k_off, None, gpu=True)


def test_kv_lens_checks():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="int32"):
        ikport.attention(q, k, v, kv_lens=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="entries for a batch"):
        ikport.attention(q, k, v, kv_lens=torch.zeros(3, dtype=torch.int32))


def test_batch_mismatch():
    q, _, _ = qkv(B=3)
    _, k, v = qkv(B=2)
    with pytest.raises(ValueError, match="batch"):
        ikport.attention(q, k, v)


def test_paged_checks():
    q, k, v = qkv()
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 4)
    lens = torch.full((2,), 8, dtype=torch.int32)
    with pytest.raises(TypeError, match="block_table must be int32"):
        ikport.paged_attention(q, kp, vp, bt.long(), lens)
    with pytest.raises(ValueError, match="needs kv_lens"):
        ikport.paged_attention(q, kp, vp, bt, None)
    kp3, vp3, bt3 = ikport.paged_kv_from_dense(k, v, 3)
    with pytest.raises(ValueError, match="power of two"):
        ikport.paged_attention(q, kp3, vp3, bt3, lens)
    with pytest.raises(ValueError, match="rows for a batch"):
        ikport.paged_attention(q, kp, vp, bt[:1], lens)


def test_out_checks():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="out must match q"):
        ikport.attention(q, k, v, out=torch.empty(1, 4, 1, 64, dtype=torch.float16))


def test_unknown_device_type_is_refused():
    from ikport import dispatch

    with pytest.raises(ValueError, match="not on 'meta'"):
        dispatch.backend_name_for(torch.device("meta"))


def test_checks_still_run_after_a_valid_call_with_the_same_layout():
    """The validated-layout cache keys on shapes/strides/dtypes: anything else is re-checked."""
    q, k, v = qkv(dtype=torch.float32)
    ikport.attention(q, k, v, kv_lens=torch.full((2,), 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        ikport.attention(q, k, v, kv_lens=torch.full((2,), 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="share a dtype"):
        ikport.attention(q, k.half(), v)
