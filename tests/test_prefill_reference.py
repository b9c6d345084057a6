"""The prefill reference (q_lens, attention_varlen, the log-sum-exp, paged chunked prefill)
against a float64 loop written from the definition, and the public API on the CPU (CPU)."""

import math

import pytest
import torch

import ikport
from ikport import reference


def loop_rows(q, k, v, causal, scale, q_len, kv_len):
    """One sequence, q [Hq, Tq, D], k/v [Hkv, L, D]: out [Hq, Tq, D] and lse [Hq, Tq] in float64,
    row by row from the definition: query i < q_len sees keys t < kv_len, and when causal
    t <= kv_len - q_len + i; a row that sees nothing (or i >= q_len) is zeros with lse -inf."""
    Hq, Tq, D = q.shape
    Hkv = k.shape[0]
    out = torch.zeros(Hq, Tq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((Hq, Tq), -math.inf, dtype=torch.float64)
    for h in range(Hq):
        hk = h // (Hq // Hkv)
        for i in range(q_len):
            last = kv_len - 1 if not causal else min(kv_len - 1, kv_len - q_len + i)
            if last < 0:
                continue
            s = [float(q[h, i].double() @ k[hk, t].double()) * scale for t in range(last + 1)]
            m = max(s)
            w = [math.exp(x - m) for x in s]
            tot = sum(w)
            lse[h, i] = m + math.log(tot)
            for t, wt in enumerate(w):
                out[h, i] += wt / tot * v[hk, t].double()
    return out, lse


def loop_attention(q, k, v, causal, scale, kv_lens=None, q_lens=None):
    B, Hq, Tq, D = q.shape
    L = k.shape[2]
    outs, lses = [], []
    for b in range(B):
        n = L if kv_lens is None else min(max(int(kv_lens[b]), 0), L)
        m = Tq if q_lens is None else min(max(int(q_lens[b]), 0), Tq)
        o, s = loop_rows(q[b], k[b], v[b], causal, scale, m, n)
        outs.append(o)
        lses.append(s)
    return torch.stack(outs), torch.stack(lses)


def rand(*shape, gen, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


# B, Hq, Hkv, Tq, L, D, kv_lens, q_lens: GQA ratios 1, 2, 3, 4, 8; odd lengths; q_len > kv_len
# (causal rows that see nothing); a sequence with no keys; one with no query tokens; lengths past
# the tensors (clamped)
CASES = [
    (2, 4, 4, 5, 7, 16, [7, 3], [5, 2]),
    (3, 6, 3, 9, 13, 8, [13, 4, 0], [9, 9, 3]),
    (2, 8, 2, 6, 6, 16, [6, 6], [0, 6]),
    (2, 8, 1, 11, 5, 8, [5, 9], [11, 4]),
    (1, 4, 2, 3, 17, 24, None, [2]),
    (2, 2, 1, 4, 4, 16, [99, -3], [99, -1]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-T{}-L{}-D{}".format(*c[:6]))
@pytest.mark.parametrize("causal", [False, True])
def test_reference_with_q_lens_matches_definition(case, causal):
    B, Hq, Hkv, Tq, L, D, kv, ql = case
    g = torch.Generator().manual_seed(B * 1000 + L * 10 + Tq)
    q, k, v = rand(B, Hq, Tq, D, gen=g), rand(B, Hkv, L, D, gen=g), rand(B, Hkv, L, D, gen=g)
    kv_lens = None if kv is None else i32(kv)
    q_lens = i32(ql)
    got, lse = reference.attention(q, k, v, causal=causal, scale=0.3, kv_lens=kv_lens, q_lens=q_lens,
                                   upcast=torch.float64, return_lse=True)
    want, want_lse = loop_attention(q, k, v, causal, 0.3, kv_lens, q_lens)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)  # -inf where a row sees nothing


def test_q_lens_of_tq_is_the_default_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    q, k, v = rand(3, 4, 5, 16, gen=g, dtype=torch.float32), rand(3, 2, 9, 16, gen=g, dtype=torch.float32), \
        rand(3, 2, 9, 16, gen=g, dtype=torch.float32)
    lens = i32([9, 2, 6])
    for causal in (False, True):
        a = reference.attention(q, k, v, causal=causal, kv_lens=lens)
        b = reference.attention(q, k, v, causal=causal, kv_lens=lens, q_lens=i32([5, 5, 5]))
        assert torch.equal(a, b)


def test_rows_that_see_nothing_are_zeros_even_with_nan_in_v():
    """Rows past q_len and causal rows before the first key are zeros, lse -inf, whatever v holds
    (padding rows of a ragged batch must not pick up NaN from 0 * NaN)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = rand(2, 2, 6, 8, gen=g, dtype=torch.float32), rand(2, 1, 4, 8, gen=g, dtype=torch.float32), \
        rand(2, 1, 4, 8, gen=g, dtype=torch.float32)
    v[1, :, 3] = float("nan")  # past kv_len of sequence 1
    out, lse = reference.attention(q, k, v, causal=True, kv_lens=i32([4, 3]), q_lens=i32([6, 2]),
                                   return_lse=True)
    assert torch.all(out[0, :, :2] == 0) and torch.isneginf(lse[0, :, :2]).all()  # 6 queries, 4 keys
    assert torch.isfinite(out[0, :, 2:]).all() and torch.isfinite(lse[0, :, 2:]).all()
    assert torch.all(out[1, :, 2:] == 0) and torch.isneginf(lse[1, :, 2:]).all()  # past q_len


@pytest.mark.parametrize("causal", [False, True])
def test_lse_is_torch_logsumexp_of_the_visible_scores(causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = rand(1, 4, 7, 16, gen=g), rand(1, 2, 10, 16, gen=g), rand(1, 2, 10, 16, gen=g)
    _, lse = reference.attention(q, k, v, causal=causal, scale=0.25, upcast=torch.float64, return_lse=True)
    s = torch.einsum("hid,htd->hit", q[0], k[0].repeat_interleave(2, 0)) * 0.25
    if causal:
        i, t = torch.arange(7).view(-1, 1), torch.arange(10).view(1, -1)
        s = s.masked_fill(t > 10 - 7 + i, -math.inf)
    torch.testing.assert_close(lse[0], torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def test_score_blocks_do_not_change_the_result(monkeypatch):
    """Long sequences are computed in blocks of sequences and query rows (SCORE_BLOCK): blocks of
    one row, of a few rows and the whole call agree."""
    g = torch.Generator().manual_seed(4)
    q, k, v = rand(3, 4, 13, 16, gen=g), rand(3, 2, 21, 16, gen=g), rand(3, 2, 21, 16, gen=g)
    args = dict(causal=True, kv_lens=i32([21, 9, 0]), q_lens=i32([13, 4, 13]), upcast=torch.float64,
                return_lse=True)
    whole = reference.attention(q, k, v, **args)
    for block in (1, 4 * 21 * 3, 4 * 21 * 13 * 2):  # one row, three rows, two sequences
        monkeypatch.setattr(reference, "SCORE_BLOCK", block)
        for a, b in zip(reference.attention(q, k, v, **args), whole):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- varlen ------------------------------------------------------------------------------------
def packed(lens, H, D, gen, dtype=torch.float64):
    """[total, H, D] tokens of sequences of `lens`, and its int32 offsets."""
    cu = i32([0, *torch.tensor(lens).cumsum(0).tolist()])
    return rand(sum(lens), H, D, gen=gen, dtype=dtype), cu


def loop_varlen(q, k, v, cu_q, cu_k, causal, scale):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        o, s = loop_rows(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1),
                         causal, scale, q1 - q0, k1 - k0)
        out[q0:q1] = o.transpose(0, 1)
        lse[:, q0:q1] = s
    return out, lse


VARLEN = [  # q lengths, k lengths, Hq, Hkv: empty sequences of q, of k, of both; q longer than k
    ([5, 1, 0, 7], [5, 1, 0, 7], 4, 2),
    ([3, 0, 6, 2], [9, 4, 6, 0], 6, 2),
    ([1], [13], 8, 1),
    ([9, 4], [3, 4], 3, 3),
]


@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"q{c[0]}-k{c[1]}-Hq{c[2]}-Hkv{c[3]}")
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_reference_matches_definition(case, causal):
    lq, lk, Hq, Hkv = case
    g = torch.Generator().manual_seed(sum(lq) * 7 + sum(lk))
    q, cu_q = packed(lq, Hq, 16, g)
    k, cu_k = packed(lk, Hkv, 16, g)
    v = rand(*k.shape, gen=g)
    got, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=0.3, return_lse=True,
                                          upcast=torch.float64)
    want, want_lse = loop_varlen(q, k, v, cu_q, cu_k, causal, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)
    assert lse.shape == (Hq, sum(lq))


def test_varlen_equals_padded_dense_with_q_lens():
    """The same batch as a padded dense call (q_lens, kv_lens) and packed: the same rows."""
    lq, lk = [4, 0, 7], [9, 3, 7]
    g = torch.Generator().manual_seed(5)
    q, cu_q = packed(lq, 4, 16, g, torch.float32)
    k, cu_k = packed(lk, 2, 16, g, torch.float32)
    v = rand(*k.shape, gen=g, dtype=torch.float32)
    out, lse = ikport.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, return_lse=True)
    qd = torch.zeros(3, 4, max(lq), 16)
    kd, vd = torch.zeros(3, 2, max(lk), 16), torch.zeros(3, 2, max(lk), 16)
    for b in range(3):
        qd[b, :, :lq[b]] = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)
        kd[b, :, :lk[b]] = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)
        vd[b, :, :lk[b]] = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1)
    dense, dense_lse = reference.attention(qd, kd, vd, causal=True, kv_lens=i32(lk), q_lens=i32(lq),
                                           return_lse=True)
    for b in range(3):
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]], dense[b, :, :lq[b]].transpose(0, 1))
        torch.testing.assert_close(lse[:, cu_q[b]:cu_q[b + 1]], dense_lse[b, :, :lq[b]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_varlen_returns_q_dtype_and_fp32_lse(dtype):
    g = torch.Generator().manual_seed(6)
    q, cu = packed([3, 5], 2, 16, g, dtype)
    out, lse = ikport.attention_varlen(q, q, q, cu, cu, 5, 5, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == (2, 8)
    assert isinstance(ikport.attention_varlen(q, q, q, cu, cu, 5, 5), torch.Tensor)


# ---- paged: chunked prefill --------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_paged_chunked_prefill_equals_dense(page_size):
    """A chunk of query tokens over a prefix already in the pages, the chunk's own K/V written
    there too: paged_attention(q_lens) equals the dense call and the definition."""
    g = torch.Generator().manual_seed(page_size)
    B, Hq, Hkv, chunk, D = 3, 4, 2, 6, 16
    prefix = [11, 0, 5]
    q_lens = i32([6, 6, 2])
    kv_lens = i32([p + int(n) for p, n in zip(prefix, q_lens)])
    L = int(kv_lens.max()) + 3
    q, k, v = rand(B, Hq, chunk, D, gen=g), rand(B, Hkv, L, D, gen=g), rand(B, Hkv, L, D, gen=g)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, page_size, generator=g)
    paged = ikport.paged_attention(q, kp, vp, bt, kv_lens, causal=True, q_lens=q_lens)
    dense = ikport.attention(q, k, v, causal=True, kv_lens=kv_lens, q_lens=q_lens)
    torch.testing.assert_close(paged, dense, rtol=1e-12, atol=1e-12)
    want, _ = loop_attention(q, k, v, True, 1 / math.sqrt(D), kv_lens, q_lens)
    torch.testing.assert_close(paged, want, rtol=1e-5, atol=1e-5)  # the CPU path computes in fp32
    ref, lse = reference.paged_attention(q, kp, vp, bt, kv_lens, causal=True, q_lens=q_lens, return_lse=True,
                                         upcast=torch.float64)
    torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-10)
    assert torch.isneginf(lse[2, :, 2:]).all()  # past q_len


# ---- the public API on the CPU -----------------------------------------------------------------
def test_public_attention_with_q_lens_and_out():
    g = torch.Generator().manual_seed(7)
    q, k, v = rand(2, 4, 200, 16, gen=g, dtype=torch.float32), rand(2, 2, 300, 16, gen=g, dtype=torch.float32), \
        rand(2, 2, 300, 16, gen=g, dtype=torch.float32)
    kv, ql = i32([300, 40]), i32([200, 50])
    out = torch.full_like(q, float("nan"))
    res = ikport.attention(q, k, v, causal=True, kv_lens=kv, q_lens=ql, out=out)
    assert res is out
    assert torch.equal(out, reference.attention(q, k, v, causal=True, kv_lens=kv, q_lens=ql))
    assert torch.all(out[1, :, 50:] == 0) and torch.all(out[1, :, :10] == 0)  # past q_len; 50 queries, 40 keys
    assert torch.isfinite(out).all()


def test_public_varlen_writes_into_out():
    g = torch.Generator().manual_seed(8)
    q, cu = packed([130, 0, 7], 4, 16, g, torch.float32)
    out = torch.full_like(q, float("nan"))
    res, lse = ikport.attention_varlen(q, q[:, :2], q[:, :2], cu, cu, 130, 130, causal=True, out=out,
                                       return_lse=True, scale=0.2)
    assert res is out and torch.isfinite(out).all()
    want, want_lse = reference.attention_varlen(q, q[:, :2], q[:, :2], cu, cu, causal=True, scale=0.2,
                                                return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_any_query_length_runs_on_the_cpu():
    q = torch.randn(1, 2, 300, 16)
    out = ikport.attention(q, q, q, causal=True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.2, None])
def test_the_kernels_positive_scale_gives_the_same_attention(scale):
    """The prefill kernel takes a positive scale (it folds it into its exp2's FMA over row maxima of
    the raw scores); the launch maps any finite scale onto one (impl.prefill.positive_scale)."""
    from ikport.impl.prefill import positive_scale

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    q2, scale_log2 = positive_scale(q, scale)
    assert scale_log2 > 0
    for causal in (False, True):
        want, want_lse = reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
        got, got_lse = reference.attention(q2, k, v, causal=causal, scale=scale_log2 / math.log2(math.e),
                                           return_lse=True)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_lse, want_lse)
