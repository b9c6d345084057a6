"""ikport.int4 on the CPU: the fragment-order packing of every layout, quantization accuracy and
conventions, Int4Weight's meaning, moves and validation.

The per-element checks recompute each code's position from the packing rules themselves, with
the three layouts' (lane, slot) -> (k, n) maps written out here from portability/mma_layout.cuh,
not taken from ikport.int4.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ikport import int4
from ikport.int4 import Int4Weight, layout_for_device, pack_int4, quantize_weight, unpack_int4

# layout -> (kB, unique lanes, b_row(l, s), b_col(l, s)); mma_layout.cuh's B maps.
LAYOUTS = {
    "nv_m16n8k16": (8, 32, lambda lane, s: (lane % 4) * 2 + 8 * ((s // 2) % 2) + s % 2,
                    lambda lane, s: 8 * (s // 4) + lane // 4),
    "amd_mfma16": (4, 64, lambda lane, s: 4 * (lane // 16) + s, lambda lane, s: lane % 16),
    "amd_wmma16_w32": (16, 16, lambda lane, s: s, lambda lane, s: lane % 16),
}
SHAPES = [(16, 128), (48, 384), (32, 256), (64, 128)]


def _codes(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)


def _position(layout: str, n: int, k: int, N: int, K: int) -> tuple[int, int]:
    """(flat int32 index, nibble) of code (n, k) by the packing rules, found by searching the
    lane/slot that holds (k % 16, n % 16) of its tile."""
    kb, ul, b_row, b_col = LAYOUTS[layout]
    tpc = 32 // kb
    kc = 16 * tpc
    nt, kt = n // 16, k // 16
    c, t = kt // tpc, kt % tpc
    hits = [(u, s) for u in range(ul) for s in range(kb)
            if b_row(u, s) == k % 16 and b_col(u, s) == n % 16]
    assert len(hits) == 1, hits  # each tile element lives in exactly one unique lane and slot
    u, s = hits[0]
    p, h = divmod(s, 2)
    r = t * (kb // 2) + p
    w, j = divmod(r, 4)
    return ((nt * (K // kc) + c) * ul + u) * 4 + w, j + 4 * h


def test_layout_geometry():
    for name, (kb, ul, _, _) in LAYOUTS.items():
        info = int4.layout_info(name)
        assert (info.k_b, info.unique_lanes) == (kb, ul)
        assert info.tiles_per_chunk == 32 // kb and info.chunk_k == 16 * (32 // kb)
    assert [int4.layout_info(n).chunk_k for n in LAYOUTS] == [64, 128, 32]
    with pytest.raises(ValueError, match="unknown INT4 layout"):
        int4.layout_info("nv_m16n8k32")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip(layout, shape):
    n, k = shape
    codes = _codes(n, k, seed=n + k)
    packed = pack_int4(codes, layout)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (n, k // 8)
    assert torch.equal(unpack_int4(packed, layout, n, k), codes)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packing_formula_per_element(layout):
    N, K = 48, 384
    codes = _codes(N, K, seed=7)
    flat = pack_int4(codes, layout).flatten().tolist()
    g = torch.Generator().manual_seed(11)
    picks = [(int(a), int(b)) for a, b in zip(torch.randint(0, N, (64,), generator=g),
                                              torch.randint(0, K, (64,), generator=g))]
    picks += [(0, 0), (N - 1, K - 1), (15, 127), (16, 128)]
    for n, k in picks:
        idx, nib = _position(layout, n, k, N, K)
        assert (flat[idx] >> (4 * nib)) & 15 == int(codes[n, k]), (layout, n, k, idx, nib)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nibble_pairs_are_adjacent_rows(layout):
    """Nibbles j and j + 4 of a word are rows k, k + 1 (k even) of one column: one fp16 pair."""
    N, K = 16, 128
    rows = torch.arange(K).repeat(N, 1)  # code = k % 16 would alias; pack k and n separately
    k_of = pack_int4((rows % 16).to(torch.uint8), layout).flatten().tolist()
    n_of = pack_int4((torch.arange(N)[:, None].expand(N, K) % 16).to(torch.uint8), layout).flatten().tolist()
    for wk, wn in zip(k_of, n_of):
        for j in range(4):
            klo, khi = (wk >> 4 * j) & 15, (wk >> 4 * (j + 4)) & 15
            assert klo % 2 == 0 and khi == klo + 1
            assert (wn >> 4 * j) & 15 == (wn >> 4 * (j + 4)) & 15


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"K % 32 .*in_features K=48 is not a positive multiple of 32 "
                                         r"\(the nearest that work: 32 or 64\)"):
        pack_int4(_codes(16, 48), "nv_m16n8k16")
    with pytest.raises(ValueError, match="N % 16"):
        pack_int4(_codes(40, 128), "nv_m16n8k16")
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((16, 128), 16, dtype=torch.uint8), "nv_m16n8k16")
    with pytest.raises(TypeError, match="integer"):
        pack_int4(torch.zeros(16, 128), "nv_m16n8k16")
    with pytest.raises(ValueError, match="unknown INT4 layout"):
        pack_int4(_codes(16, 128), "sm_90")
    with pytest.raises(ValueError, match="shape"):
        unpack_int4(torch.zeros(16, 8, dtype=torch.int32), "nv_m16n8k16", 16, 128)
    with pytest.raises(TypeError, match="int32"):
        unpack_int4(torch.zeros(16, 16, dtype=torch.int64), "nv_m16n8k16", 16, 128)


# ---- quantization ------------------------------------------------------------------------------

def _rel_rms(w: torch.Tensor, q: Int4Weight) -> float:
    d = q.dequantize() - w.float()
    return float(d.norm() / w.float().norm())


@pytest.fixture(scope="module")
def normal_weight() -> torch.Tensor:
    return torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).half()


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_quantization_error_bounds(normal_weight, method):
    w = normal_weight
    sym128 = _rel_rms(w, quantize_weight(w, 128, method=method))
    asym128 = _rel_rms(w, quantize_weight(w, 128, symmetric=False, method=method))
    sym32 = _rel_rms(w, quantize_weight(w, 32, method=method))
    per_channel = _rel_rms(w, quantize_weight(w, None, method=method))
    assert 0.07 < sym128 < 0.15, sym128  # about 0.1: step 2 * absmax / 15 over 128 normals
    assert asym128 < sym128
    assert sym32 < sym128 < per_channel
    assert _rel_rms(w, quantize_weight(w, -1, method=method)) == pytest.approx(per_channel)


def test_quantize_conventions():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q = quantize_weight(w, 64, method="rtn")
    assert q.zeros is None and q.dtype == torch.bfloat16 and q.group_size == 64
    codes = q.codes().float()
    # symmetric: s = 2 absmax / 15 (rounded to bf16), q = clamp(round(w / s) + 8, 0, 15)
    wg = w.float().reshape(32, 4, 64)
    s = (wg.abs().amax(-1) * 2 / 15).to(torch.bfloat16)
    assert torch.equal(q.scales, s.T)
    expect = (torch.round(wg / s.float()[..., None]) + 8).clamp(0, 15).reshape(32, 256)
    assert torch.equal(codes, expect)
    # asymmetric: s = (max - min) / 15 over a range including 0, z = round(-min / s)
    qa = quantize_weight(w, 64, symmetric=False, method="rtn")
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    sa = ((hi - lo) / 15).to(torch.bfloat16)
    za = torch.round(-lo / sa.float()).clamp(0, 15)
    assert torch.equal(qa.scales, sa.T) and torch.equal(qa.zeros, za.T.to(torch.bfloat16))
    # float32 input keeps float16 scales; an all-zero group quantizes to exact zeros
    w32 = torch.zeros(16, 128)
    q32 = quantize_weight(w32)
    assert q32.dtype == torch.float16 and torch.all(q32.scales > 0)
    assert torch.equal(q32.dequantize(), w32)
    assert torch.equal(quantize_weight(w32, symmetric=False).dequantize(), w32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_formula(symmetric):
    w = torch.randn(48, 384, generator=torch.Generator().manual_seed(2)).half()
    q = quantize_weight(w, 128, symmetric=symmetric, layout="amd_mfma16")
    codes = q.codes().float()
    s = q.scales.float().repeat_interleave(128, 0).T
    z = 8.0 if q.zeros is None else q.zeros.float().repeat_interleave(128, 0).T
    assert torch.equal(q.dequantize(), (codes - z) * s)
    assert q.dequantize(torch.float16).dtype == torch.float16


def test_perm_is_undone_by_dequantize():
    n, k, g = 32, 256, 64
    codes = _codes(n, k, seed=3)
    scales = torch.rand(k // g, n, generator=torch.Generator().manual_seed(4)).half() + 0.01
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(5))
    w = Int4Weight.from_codes(codes, scales, None, g, perm=perm)
    assert w.perm is not None and w.perm.dtype == torch.int64
    sorted_w = (codes.float() - 8) * scales.float().repeat_interleave(g, 0).T
    x = torch.randn(3, k, dtype=torch.float64)
    # the kernel's product: x[:, perm] @ W_sorted^T; the reference: x @ dequantize()^T
    torch.testing.assert_close(x @ w.dequantize(torch.float64).T,
                               x[:, perm] @ sorted_w.double().T)
    # an identity permutation is dropped; a non-permutation is refused
    assert Int4Weight.from_codes(codes, scales, None, g, perm=torch.arange(k)).perm is None
    with pytest.raises(ValueError, match="permutation"):
        Int4Weight.from_codes(codes, scales, None, g, perm=torch.zeros(k, dtype=torch.int64))


def test_to_dtype_and_layout_repack():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(6)).half()
    q = quantize_weight(w, 64, symmetric=False)
    assert q.layout == "nv_m16n8k16"  # the CPU's layout
    b = q.to(dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.zeros.dtype == torch.bfloat16
    assert b.layout == q.layout and torch.equal(b.qweight, q.qweight)
    assert torch.equal(b.scales, q.scales.to(torch.bfloat16)) and torch.equal(b.zeros.half(), q.zeros)
    torch.testing.assert_close(b.dequantize(), q.dequantize(), rtol=2**-8, atol=0)
    with pytest.raises(TypeError, match="float16 or torch.bfloat16"):
        q.to(dtype=torch.float32)
    for layout in LAYOUTS:
        r = q.with_layout(layout)
        assert r.layout == layout and torch.equal(r.codes(), q.codes())
        assert torch.equal(r.dequantize(), q.dequantize())
        back = r.to("cpu")  # the CPU wants nv_m16n8k16: moving there repacks
        assert back.layout == "nv_m16n8k16" and torch.equal(back.qweight, q.qweight)
    assert q.with_layout("nv_m16n8k16") is q
    assert r.to(dtype=torch.float16).layout == "amd_wmma16_w32"  # no device: layout kept


def test_layout_for_device(monkeypatch):
    assert layout_for_device("cpu") == layout_for_device(None) == "nv_m16n8k16"
    assert layout_for_device(torch.device("meta")) == "nv_m16n8k16"
    with pytest.raises(ValueError, match="mps"):
        layout_for_device("mps")
    class Props:  # a device's properties as torch reports them
        major, minor, gcnArchName = 9, 0, ""

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert layout_for_device("cuda:0") == "nv_m16n8k16"  # sm_90
    Props.major = 7  # sm_70: not a target ikport builds for
    with pytest.raises(ValueError, match="sm_70"):
        layout_for_device("cuda:0")
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    for arch, want in (("gfx90a:sramecc+:xnack-", "amd_mfma16"), ("gfx942", "amd_mfma16"),
                       ("gfx1100", "amd_wmma16_w32")):
        Props.gcnArchName = arch
        assert layout_for_device("cuda:1") == want
        assert layout_for_device(1) == want
    Props.gcnArchName = "gfx1201"
    with pytest.raises(ValueError, match="gfx1201"):
        layout_for_device("cuda:0")


def test_validation_errors():
    w = torch.randn(32, 256).half()
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(w, 48)
    with pytest.raises(ValueError, match=r"w: .*K % 32 .*in_features K=200 .*nearest that work: 192 or 224"):
        quantize_weight(torch.randn(32, 200).half())
    with pytest.raises(ValueError, match="N % 16"):
        quantize_weight(torch.randn(40, 256).half())
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quantize_weight(torch.randn(32, 256).double())
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(32, 256, 1).half())
    with pytest.raises(ValueError, match="w must be a 2-D"):
        quantize_weight(torch.randn(256).half())
    with pytest.raises(TypeError, match="w must be a 2-D tensor .* got list"):
        quantize_weight([[0.0] * 256] * 32)
    for g in (0, 100, 256, 128.0):  # 256 != K: per-channel is K itself
        with pytest.raises(ValueError, match="group_size must be one of"):
            quantize_weight(torch.randn(32, 512).half(), g)

    q = quantize_weight(w, 64, symmetric=False)
    rep = dataclasses.replace
    with pytest.raises(ValueError, match="group_size"):
        rep(q, group_size=96)
    with pytest.raises(ValueError, match="scales must have shape"):
        rep(q, group_size=128)  # scales are [4, N], group 128 needs [2, N]
    with pytest.raises(ValueError, match="zeros must have shape"):
        rep(q, zeros=q.zeros[:2].contiguous())
    with pytest.raises(TypeError, match="zeros"):
        rep(q, zeros=q.zeros.to(torch.bfloat16))
    with pytest.raises(TypeError, match="scales must be a float16 or bfloat16"):
        rep(q, scales=q.scales.float(), zeros=None)
    with pytest.raises(TypeError, match="qweight must be an int32"):
        rep(q, qweight=q.qweight.to(torch.int64))
    with pytest.raises(ValueError, match="qweight must have shape"):
        rep(q, qweight=q.qweight[:16].contiguous())
    with pytest.raises(ValueError, match="K % 32"):
        rep(q, in_features=200)
    with pytest.raises(ValueError, match="unknown INT4 layout"):
        rep(q, layout="nv")
    with pytest.raises(TypeError, match="perm"):
        rep(q, perm=torch.arange(256, dtype=torch.int32))
    with pytest.raises(ValueError, match="perm must have shape"):
        rep(q, perm=torch.arange(128))
    with pytest.raises(ValueError, match="meta"):
        rep(q, scales=q.scales.to("meta"), zeros=None)
    with pytest.raises(ValueError, match="contiguous"):
        rep(q, scales=q.scales.T.contiguous().T)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.layout = "amd_mfma16"  # type: ignore[misc]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_quantize_refuses_weights_whose_scales_are_not_finite(symmetric, method):
    """A NaN or inf in w, or a float32 w beyond float16's range for the scales, would give a NaN
    group in silence: refused, naming w and the first group."""
    for bad in (float("nan"), float("inf"), 1e6):
        w = torch.randn(32, 256)
        w[3, 130] = bad
        with pytest.raises(ValueError, match=r"w: 1 group scale\(s\) are not finite in torch.float16 "
                                             r"\(first: row 3, input channels 128..255\)"):
            quantize_weight(w, 128, symmetric, method=method)
    ok = torch.randn(32, 256, dtype=torch.bfloat16)
    ok[0, 0] = 1e6  # bfloat16 scales hold it
    quantize_weight(ok, 128, symmetric, method=method)


def test_repr_and_nbytes():
    q = quantize_weight(torch.randn(32, 256).half(), 128, symmetric=False)
    assert q.nbytes == 32 * 256 // 2 + 2 * (2 * 32 * 2)  # codes + scales + zeros
    assert "group_size=128" in repr(q) and "layout='nv_m16n8k16'" in repr(q)
    assert q.device == torch.device("cpu") and not q.symmetric


# ---- quantizer methods (issue 30) --------------------------------------------------------------

def _group_err(w: torch.Tensor, q: Int4Weight, weighted: bool = False) -> torch.Tensor:
    """Squared error of each group, [N, K // G], of q against w (fp32); weighted: each element's
    by w^2 + mean(w^2) over its group, what the "mse" method minimizes."""
    n, k = w.shape
    g = q.group_size
    wg = w.float().reshape(n, k // g, g)
    e2 = (q.dequantize().reshape(n, k // g, g) - wg).square()
    if weighted:
        e2 = e2 * (wg.square() + wg.square().mean(-1, keepdim=True))
    return e2.sum(-1)


def _weights(kind: str, n: int = 64, k: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if kind == "outliers":  # heavy tails, a few large single weights, one loud input channel
        w = w * torch.distributions.StudentT(3.0).sample((n, k)).abs().clamp(max=20) ** 0.5
        idx = torch.randint(0, n * k, (n * k // 200,), generator=g)
        w.view(-1)[idx] *= 12.0
        w[:, 7] *= 8.0
    elif kind == "one-sided":  # groups far from symmetric about 0
        w = w.abs() + 0.01
        w[: n // 2] -= 0.05
    return w


@pytest.mark.parametrize("kind", ["normal", "outliers", "one-sided"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_mse_never_has_a_larger_weighted_error_than_rtn(kind, symmetric, group_size):
    """Per group, the error "mse" minimizes is never above round to nearest's (which is one of its
    candidates), and over the matrix the plain weight error is lower too."""
    torch.manual_seed(123)  # the StudentT sample
    w = _weights(kind).half()
    rtn = quantize_weight(w, group_size, symmetric, method="rtn")
    mse = quantize_weight(w, group_size, symmetric, method="mse")
    e_rtn, e_mse = _group_err(w, rtn, weighted=True), _group_err(w, mse, weighted=True)
    assert bool((e_mse <= e_rtn * (1 + 1e-6)).all()), float((e_mse - e_rtn).max())
    assert float(e_mse.sum()) < float(e_rtn.sum())
    if kind == "normal":  # the plain error is not what it minimizes: lower here, not everywhere
        assert float(_group_err(w, mse).sum()) < float(_group_err(w, rtn).sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mse_lowers_the_error_on_normal_weights(dtype):
    w = _weights("normal", 128, 1024).to(dtype)
    for symmetric in (True, False):
        r = _rel_rms(w, quantize_weight(w, 128, symmetric, method="rtn"))
        m = _rel_rms(w, quantize_weight(w, 128, symmetric, method="mse"))
        assert m < 0.99 * r, (symmetric, r, m)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_mse_codes_mean_what_the_reference_dequantizes(layout, symmetric, group_size):
    """Same format as round to nearest: integer zero points in 0..15 (or none), scales in the
    weight's dtype, and codes that are round(w / s) + z for the stored s and z, so the packed
    weight, its repacking and the reference product all agree bit for bit."""
    from ikport import reference

    w = _weights("outliers", 48, 384, seed=3).half()
    q = quantize_weight(w, group_size, symmetric, method="mse", layout=layout)
    g = 384 if group_size == -1 else group_size
    assert q.layout == layout and q.group_size == g and q.scales.dtype == torch.float16
    assert (q.zeros is None) == symmetric
    s = q.scales.float().repeat_interleave(g, 0).T
    z = 8.0 if symmetric else q.zeros.float().repeat_interleave(g, 0).T
    if not symmetric:
        assert torch.equal(q.zeros, q.zeros.round()) and bool(((q.zeros >= 0) & (q.zeros <= 15)).all())
    codes = q.codes()
    assert torch.equal(codes.float(), (torch.round(w.float() / s) + z).clamp(0, 15))
    assert torch.equal(q.dequantize(), (codes.float() - z) * s)
    again = Int4Weight.from_codes(codes, q.scales, q.zeros, group_size, layout=layout)
    assert torch.equal(again.qweight, q.qweight)
    for other in LAYOUTS:
        assert torch.equal(q.with_layout(other).dequantize(), q.dequantize())
    x = torch.randn(5, 384)
    assert torch.equal(reference.w4a16_matmul(x, q), x @ q.dequantize().T)


def test_mse_is_deterministic_and_handles_zero_groups():
    w = _weights("outliers", 32, 256, seed=5)
    w[:, 128:] = 0.0  # the second group of every row is all zeros
    for symmetric in (True, False):
        a = quantize_weight(w, 128, symmetric, method="mse")
        b = quantize_weight(w.clone(), 128, symmetric, method="mse")
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
        assert (a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros)
        assert torch.equal(a.dequantize()[:, 128:], w[:, 128:])


def test_method_argument():
    w = _weights("normal", 32, 256).half()
    default = quantize_weight(w)
    explicit = quantize_weight(w, method=int4.DEFAULT_METHOD)
    assert torch.equal(default.qweight, explicit.qweight) and torch.equal(default.scales, explicit.scales)
    assert int4.DEFAULT_METHOD == "mse" and set(int4.METHODS) == {"rtn", "mse"}
    for bad in ("MSE", "gptq", "", 1, True):
        with pytest.raises(ValueError, match=r"method must be one of \('rtn', 'mse'\)"):
            quantize_weight(w, method=bad)
