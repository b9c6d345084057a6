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


@pytest.mark.parametrize("Tq", [checks.MAX_DECODE_QUERY_TOKENS + 1, 4097])
def test_any_query_length_passes_the_checks(Tq):
    """Past MAX_DECODE_QUERY_TOKENS the prefill kernel runs: no length is refused, causal with
    more query tokens than keys included (the rows that see no key give zeros)."""
    q, k, v = qkv(Tq=Tq, L=8)
    checks.attention(q, k, v, torch.full((2,), 3, dtype=torch.int32), gpu=True,
                     q_lens_=torch.tensor([Tq, 1], dtype=torch.int32))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: (torch.randn(2, 4, 64), *qkv()[1:]), ValueError, "must have 4 dims"),
    (lambda: ("q", *qkv()[1:]), TypeError, "torch.Tensor"),
    (lambda: (qkv()[0], qkv()[1].float(), qkv()[2]), TypeError, "share a dtype"),
    (lambda: qkv(dtype=torch.float32), TypeError, "not supported on"),
    (lambda: qkv(Hq=6, Hkv=4), ValueError, "multiple of KV heads"),
    (lambda: qkv(D=72), ValueError, "head_dim 72"),
    (lambda: qkv(D=272), ValueError, "head_dim 272"),
    (lambda: (qkv()[0], qkv()[1], qkv(L=9)[2]), ValueError, "same shape"),
    (lambda: (qkv()[0], qkv(D=32)[1], qkv(D=32)[2]), ValueError, "head_dim of q"),
    (lambda: (qkv()[0], torch.randn(2, 2, 64, 8, dtype=torch.float16).transpose(2, 3),
              torch.randn(2, 2, 64, 8, dtype=torch.float16).transpose(2, 3)), ValueError,
     "last dim must be contiguous"),
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
    with pytest.raises(ValueError, match="power of two"):
        ikport.paged_kv_from_dense(k, v, 3)  # (paged_attention's pages: test below)
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


def test_head_dim_zero_is_refused_on_every_device():
    q, k, v = qkv(D=0)
    with pytest.raises(ValueError, match="head_dim .* is 0"):
        ikport.attention(q, k, v)
    with pytest.raises(ValueError, match="head_dim .* is 0"):
        checks.attention(q, k, v, None, gpu=True)


@pytest.mark.parametrize("bad,exc,match", [
    ("x", TypeError, "scale must be a float .* got str"),
    (True, TypeError, "scale must be a float .* got bool"),
    (torch.tensor(0.5), TypeError, r"scale must be a float .* got Tensor \(pass float\(t\)"),
    (float("nan"), ValueError, "scale must be a finite number, got nan"),
    (float("inf"), ValueError, "scale must be a finite number, got inf"),
    (-float("inf"), ValueError, "scale must be a finite number, got -inf"),
])
def test_bad_scale_is_refused_on_every_call(bad, exc, match):
    """The scale is not part of a call's cached layout: it is checked even after a valid call of
    the same layout, for both entry points."""
    q, k, v = qkv(dtype=torch.float32)
    lens = torch.full((2,), 8, dtype=torch.int32)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 4)
    ikport.attention(q, k, v, kv_lens=lens)
    ikport.paged_attention(q, kp, vp, bt, lens)
    with pytest.raises(exc, match=match):
        ikport.attention(q, k, v, kv_lens=lens, scale=bad)
    with pytest.raises(exc, match=match):
        ikport.paged_attention(q, kp, vp, bt, lens, scale=bad)


def test_any_finite_scale_is_accepted():
    """Valid: None (1/sqrt(D)) or a finite real number of any sign, ints and numpy scalars too."""
    np = pytest.importorskip("numpy")
    q, k, v = qkv(dtype=torch.float64)
    ref = ikport.reference.attention
    for s in (0.3, 2, 0.0, -0.5, np.float32(0.25)):
        torch.testing.assert_close(ikport.attention(q, k, v, scale=s), ref(q, k, v, scale=float(s)))
    assert checks.scale(None) is None and checks.scale(2) == 2.0 and type(checks.scale(2)) is float


def test_paged_kv_from_dense_checks_its_page_size_as_paged_attention_does():
    _, k, v = qkv()
    for ps in (0, 3, 512, -4):
        with pytest.raises(ValueError, match=f"page_size {ps} is not supported: use a power of two"):
            ikport.paged_kv_from_dense(k, v, ps)
    for ps in (2.0, True, "4"):
        with pytest.raises(TypeError, match="page_size must be an int"):
            ikport.paged_kv_from_dense(k, v, ps)
    with pytest.raises(ValueError, match="k must have 4 dims"):
        ikport.paged_kv_from_dense(k[0], v[0], 4)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ikport.paged_kv_from_dense(k, v[:, :, :4], 4)
    # paged_attention's own pages go through the same rule
    q = qkv()[0]
    pages = torch.randn(4, 2, 3, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="k_pages/v_pages page size 3 is not supported"):
        ikport.paged_attention(q, pages, pages, torch.zeros(2, 2, dtype=torch.int32),
                               torch.full((2,), 6, dtype=torch.int32))


def test_empty_page_pool_is_refused():
    q = qkv()[0]
    pages = torch.randn(0, 2, 4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="hold no pages"):
        ikport.paged_attention(q, pages, pages, torch.zeros(2, 1, dtype=torch.int32),
                               torch.zeros(2, dtype=torch.int32))


def paged_case():
    """Two sequences over a pool of 6 pages of 4 rows; sequence 1 reads only its first page."""
    q, k, v = qkv(B=2, L=12, dtype=torch.float32)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 4, generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([12, 3], dtype=torch.int32)
    return q, kp, vp, bt, lens


@pytest.mark.parametrize("bad_id", [6, 1000, -1, -7])
def test_block_table_ids_past_the_pool_or_negative_are_refused_on_the_cpu(bad_id):
    q, kp, vp, bt, lens = paged_case()
    ikport.paged_attention(q, kp, vp, bt, lens)  # the layout is valid and cached...
    table = bt.clone()
    table[0, 2] = bad_id  # ...the data is not: sequence 0 reads its page 2
    with pytest.raises(ValueError, match=rf"block_table\[0, 2\] = {bad_id} is not a page id: "
                                         r"k_pages/v_pages hold 6 pages \(ids 0..5\), and sequence 0 "
                                         r"reads its page 2 \(kv_lens\[0\] = 12, page size 4\)"):
        ikport.paged_attention(q, kp, vp, table, lens)


def test_block_table_entries_past_kv_len_may_hold_anything():
    """As the paged_attention docstring says: sequence 1 (kv_len 3) reads only page 0, and a
    kv_len of 0 reads none; what sits in the rest of its row changes nothing."""
    q, kp, vp, bt, lens = paged_case()
    want = ikport.paged_attention(q, kp, vp, bt, lens)
    table = bt.clone()
    table[1, 1:] = torch.tensor([-1, 1 << 30], dtype=torch.int32)
    torch.testing.assert_close(ikport.paged_attention(q, kp, vp, table, lens), want, rtol=0, atol=0)
    table[1, 0] = -1
    out = ikport.paged_attention(q, kp, vp, table, torch.tensor([12, 0], dtype=torch.int32))
    assert not out[1].any()
    # kv_len beyond the table is clamped to it: every entry is read then
    table = bt.clone()
    table[1, 2] = 6
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = 6"):
        ikport.paged_attention(q, kp, vp, table, torch.tensor([12, 99], dtype=torch.int32))


def test_gpu_table_check_only_with_the_knob_and_never_while_capturing(monkeypatch):
    """On the GPU the contract stands (no host synchronization, tables unchecked) unless
    IKPORT_CHECK_TABLES=1; a CUDA graph capture skips it (a synchronization is not allowed there).
    Run here with CPU tensors standing for GPU ones (gpu=True)."""
    from ikport import knobs

    _, kp, _, bt, lens = paged_case()
    table = bt.clone()
    table[0, 1] = -1
    monkeypatch.delenv("IKPORT_CHECK_TABLES", raising=False)
    assert not knobs.check_tables()
    checks.block_table_ids(table, lens, kp, gpu=True)  # unchecked: no error, no sync
    monkeypatch.setenv("IKPORT_CHECK_TABLES", "1")
    assert knobs.check_tables()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = -1 is not a page id"):
        checks.block_table_ids(table, lens, kp, gpu=True)
    checks.block_table_ids(bt, lens, kp, gpu=True)  # a valid table passes
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    checks.block_table_ids(table, lens, kp, gpu=True)
    monkeypatch.setenv("IKPORT_CHECK_TABLES", "0")
    assert not knobs.check_tables()
