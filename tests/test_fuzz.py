"""Fuzz: random valid shapes, dtypes, strides and lengths per op against an independent float64
oracle, plus a list of invalid inputs that must raise a clear error before anything launches.

CPU part (CI): the CPU path is the PyTorch reference, so it mainly exercises the checks, the
layouts (random strides: slices of bigger buffers, transposed views, offsets), length clamping
and the out= path (a view into a poisoned bigger buffer: nothing outside it may change). Each
case also runs the GPU-only checks (`gpu=True`) on the same CPU tensors and compares their
verdict with the documented layout rule.

GPU part (marked gpu): a few hundred random valid combinations on the device against
ikport.reference, outputs poisoned and placed inside guard regions; invalid inputs on the GPU;
NaN/inf propagation as documented in docs/api.md.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import ikport
from ikport import checks, reference

CPU_CASES = 1100  # per op
GPU_CASES = 300  # per op
GUARD = -7.25  # exactly representable in every dtype: the poison of the guard regions
TOL = {  # (atol, rtol) against the float64 oracle; outputs are O(1)
    torch.float64: (2e-5, 2e-5), torch.float32: (2e-5, 2e-5),  # the reference computes in fp32
    torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2),
}
GPU_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # max abs error against the fp32 reference


# ---- an independent oracle ---------------------------------------------------------------------
def oracle(q, k, v, lens, causal, scale):
    """float64 attention, one (sequence, query token) at a time, straight from the definition:
    query token t of Tq sees keys [0, n) (n = kv_len clamped to [0, L]) and, when causal, only
    the first n - Tq + t + 1 of them; a row that sees no key is zero."""
    q64, k64, v64 = (x.detach().to("cpu", torch.float64) for x in (q, k, v))
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    for b in range(B):
        n = L if lens is None else min(max(int(lens[b]), 0), L)
        kk = k64[b].repeat_interleave(group, 0)
        vv = v64[b].repeat_interleave(group, 0)
        for t in range(Tq):
            seen = min(n, max(0, n - Tq + t + 1)) if causal else n
            if seen == 0:
                continue
            s = torch.einsum("hd,hjd->hj", q64[b, :, t], kk[:, :seen]) * scale
            out[b, :, t] = torch.einsum("hj,hjd->hd", torch.softmax(s, -1), vv[:, :seen])
    return out


def dense_from_pages(pages, table, capacity):
    """[B, Hkv, capacity, D] from pages and a block table (plain indexing, no ikport code)."""
    B, n = table.shape
    g = pages[table.long().reshape(-1)]  # [B * n, Hkv, ps, D]
    g = g.view(B, n, *pages.shape[1:]).permute(0, 2, 1, 3, 4)
    return g.reshape(B, pages.shape[1], n * pages.shape[2], pages.shape[3])[:, :, :capacity]


def gpu_layout_ok(t: torch.Tensor) -> bool:
    """The documented GPU rule: last dim contiguous, other strides multiples of 8 elements
    (where the dim has more than one entry), base address 16-byte aligned."""
    return (t.stride(-1) == 1
            and all(s % 8 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
            and t.data_ptr() % 16 == 0)


# ---- random layouts ----------------------------------------------------------------------------
def rand_layout(rng: random.Random, gen: torch.Generator, shape, dtype, device="cpu", gpu_valid=False):
    """A tensor of `shape` with random strides: a slice (with offsets) of a bigger buffer, or a
    transposed view of dims 1 and 2; on the CPU sometimes a non-contiguous last dim."""
    B, H, T, D = shape
    kind = rng.random()
    if kind < 0.3:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if kind < 0.5:  # [B, T, H, D] storage seen as [B, H, T, D] (a QKV projection's layout)
        base = torch.randn(B, T, H, D, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return base.transpose(1, 2)
    extra = [rng.randint(0, 2), rng.randint(0, 2), rng.randint(0, 5)]
    offs = [rng.randint(0, e) for e in extra]
    if gpu_valid:
        d_extra = 8 * rng.randint(0, 2)
        d_off = 8 * rng.randint(0, d_extra // 8) if d_extra else 0
        step = 1
    else:
        d_extra = rng.choice([0, 0, 1, 3, 8])
        d_off = rng.randint(0, d_extra)
        step = 2 if rng.random() < 0.1 else 1
    buf = torch.randn(B + extra[0], H + extra[1], T + extra[2], (D + d_extra) * step, generator=gen,
                      dtype=torch.float32).to(device=device, dtype=dtype)
    return buf[offs[0]:offs[0] + B, offs[1]:offs[1] + H, offs[2]:offs[2] + T,
               d_off * step:(d_off + D) * step:step]


def poisoned_out(rng: random.Random, shape, dtype, device="cpu"):
    """(out, buffer, (lo, hi)): a contiguous `shape` view at an offset (multiple of 8 elements)
    of a bigger buffer filled with GUARD."""
    n = math.prod(shape)
    pad_lo, pad_hi = 8 * rng.randint(0, 4), 8 * rng.randint(1, 4)
    buf = torch.full((pad_lo + n + pad_hi,), GUARD, dtype=dtype, device=device)
    out = buf[pad_lo:pad_lo + n].view(shape)
    out.fill_(float("nan"))
    return out, buf, (pad_lo, pad_lo + n)


def guards_intact(buf, span) -> bool:
    lo, hi = span
    return bool((buf[:lo] == GUARD).all() and (buf[hi:] == GUARD).all())


def rand_lens(rng: random.Random, B: int, cap: int):
    """int32 lengths, with 0, negatives and lengths past the cache mixed in (clamped)."""
    vals = []
    for _ in range(B):
        r = rng.random()
        vals.append(0 if r < 0.1 else rng.randint(cap + 1, cap + 50) if r < 0.2
                    else -rng.randint(1, 5) if r < 0.25 else rng.randint(1, cap))
    return torch.tensor(vals, dtype=torch.int32)


def rand_heads(rng: random.Random):
    ratio = rng.randint(1, 8)
    hkv = rng.randint(1, 3)
    return hkv * ratio, hkv


CPU_DTYPES = [torch.float32] * 5 + [torch.float64] + [torch.float16] * 2 + [torch.bfloat16] * 2


def expected_gpu_verdict(q, k, v, extra_ok=True):
    if q.dtype not in checks.GPU_DTYPES:
        return TypeError
    if not (extra_ok and all(gpu_layout_ok(t) for t in (q, k, v))):
        return ValueError
    return None


def assert_gpu_verdict(fn, expected):
    if expected is None:
        fn()
    else:
        with pytest.raises(expected):
            fn()


# ---- CPU fuzz ----------------------------------------------------------------------------------
def test_fuzz_attention_cpu():
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for case in range(CPU_CASES):
        B = rng.randint(1, 4)
        Hq, Hkv = rand_heads(rng)
        Tq, L, D = rng.randint(1, 4), rng.randint(1, 64), 16 * rng.randint(1, 8)
        dtype = rng.choice(CPU_DTYPES)
        causal = rng.random() < 0.5
        scale = None if rng.random() < 0.7 else rng.uniform(0.05, 0.5)
        q = rand_layout(rng, gen, (B, Hq, Tq, D), dtype)
        k = rand_layout(rng, gen, (B, Hkv, L, D), dtype)
        v = rand_layout(rng, gen, (B, Hkv, L, D), dtype)
        lens = None if rng.random() < 0.15 else rand_lens(rng, B, L)
        what = f"case {case}: B={B} Hq={Hq} Hkv={Hkv} Tq={Tq} L={L} D={D} {dtype} causal={causal} lens={lens}"
        if rng.random() < 0.5:
            out, buf, span = poisoned_out(rng, (B, Hq, Tq, D), dtype)
            got = ikport.attention(q, k, v, kv_lens=lens, causal=causal, scale=scale, out=out)
            assert got is out, what
            assert guards_intact(buf, span), f"wrote outside out: {what}"
        else:
            got = ikport.attention(q, k, v, kv_lens=lens, causal=causal, scale=scale)
        assert got.shape == (B, Hq, Tq, D) and got.dtype == dtype, what
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.double(), oracle(q, k, v, lens, causal, scale), atol=atol,
                                   rtol=rtol, msg=lambda m: f"{what}\n{m}")
        # The GPU-only limits, on the same tensors (no launch: a CPU tensor with gpu=True).
        assert_gpu_verdict(lambda: checks.attention(q, k, v, lens, gpu=True),
                           expected_gpu_verdict(q, k, v))


def test_fuzz_paged_attention_cpu():
    rng = random.Random(4321)
    gen = torch.Generator().manual_seed(4321)
    for case in range(CPU_CASES):
        B = rng.randint(1, 4)
        Hq, Hkv = rand_heads(rng)
        Tq, D = rng.randint(1, 4), 16 * rng.randint(1, 8)
        ps = rng.choice([1, 2, 4, 8, 16])
        max_pages = rng.randint(1, max(1, 64 // ps))
        cap = max_pages * ps
        num_pages = B * max_pages + rng.randint(0, 3)
        dtype = rng.choice(CPU_DTYPES)
        causal = rng.random() < 0.5
        scale = None if rng.random() < 0.7 else rng.uniform(0.05, 0.5)
        q = rand_layout(rng, gen, (B, Hq, Tq, D), dtype)
        kp = rand_layout(rng, gen, (num_pages, Hkv, ps, D), dtype)
        vp = rand_layout(rng, gen, (num_pages, Hkv, ps, D), dtype)
        table = torch.randperm(num_pages, generator=gen)[:B * max_pages].view(B, max_pages).to(torch.int32)
        if rng.random() < 0.3:  # a column slice of a wider table: row stride > max_pages
            wide = torch.zeros(B, max_pages + rng.randint(1, 3), dtype=torch.int32)
            wide[:, :max_pages] = table
            table = wide[:, :max_pages]
        lens = rand_lens(rng, B, cap)
        what = (f"case {case}: B={B} Hq={Hq} Hkv={Hkv} Tq={Tq} ps={ps} pages={max_pages} D={D} "
                f"{dtype} causal={causal} lens={lens}")
        if rng.random() < 0.5:
            out, buf, span = poisoned_out(rng, (B, Hq, Tq, D), dtype)
            got = ikport.paged_attention(q, kp, vp, table, lens, causal=causal, scale=scale, out=out)
            assert got is out and guards_intact(buf, span), what
        else:
            got = ikport.paged_attention(q, kp, vp, table, lens, causal=causal, scale=scale)
        want = oracle(q, dense_from_pages(kp, table, cap), dense_from_pages(vp, table, cap), lens,
                      causal, scale)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{what}\n{m}")
        assert_gpu_verdict(lambda: checks.paged(q, kp, vp, table, lens, gpu=True),
                           expected_gpu_verdict(q, kp, vp))


# ---- invalid inputs ----------------------------------------------------------------------------
def _base(dtype=torch.float32, device="cpu", B=2, Hq=8, Hkv=4, Tq=1, L=10, D=32):
    g = torch.Generator().manual_seed(0)

    def mk(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    return dict(q=mk(B, Hq, Tq, D), k=mk(B, Hkv, L, D), v=mk(B, Hkv, L, D),
                kv_lens=torch.tensor([L, 3][:B] + [1] * (B - 2), dtype=torch.int32, device=device))


def _call(d):
    d = dict(d)
    return ikport.attention(d.pop("q"), d.pop("k"), d.pop("v"), **d)


def _with(**change):
    def make():
        d = _base()
        for key, f in change.items():
            d[key] = f(d) if callable(f) else f
        return d
    return make


INVALID = [  # (id, inputs, exception, message fragment)
    ("q-not-a-tensor", _with(q=lambda d: d["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("q-3d", _with(q=lambda d: d["q"][0]), ValueError, "q must have 4 dims"),
    ("int-dtype", _with(**{n: (lambda d, n=n: d[n].to(torch.int32)) for n in "qkv"}), TypeError, "not supported"),
    ("dtype-mix", _with(k=lambda d: d["k"].half()), TypeError, "share a dtype"),
    ("device-mix", _with(k=lambda d: d["k"].to("meta")), ValueError, "one device"),
    ("kv-shape-mix", _with(v=lambda d: d["v"][:, :, :5]), ValueError, "same shape"),
    ("head-dim-mix", _with(q=lambda d: d["q"][..., :16]), ValueError, "head_dim"),
    ("heads-not-multiple", _with(q=lambda d: d["q"][:, :6], k=lambda d: d["k"][:, :4],
                                 v=lambda d: d["v"][:, :4]), ValueError, "multiple of KV heads"),
    ("heads-8-of-3", _with(k=lambda d: d["k"][:, :3], v=lambda d: d["v"][:, :3]), ValueError,
     "multiple of KV heads"),
    ("zero-kv-heads", _with(k=lambda d: d["k"][:, :0], v=lambda d: d["v"][:, :0]), ValueError, "KV heads"),
    ("no-query-tokens", _with(q=lambda d: d["q"][:, :, :0]), ValueError, "no query tokens"),
    ("batch-mix", _with(q=lambda d: d["q"][:1], kv_lens=lambda d: d["kv_lens"][:1]), ValueError, "batch"),
    ("lens-int64", _with(kv_lens=lambda d: d["kv_lens"].long()), TypeError, "kv_lens must be int32"),
    ("lens-2d", _with(kv_lens=lambda d: d["kv_lens"].view(1, 2)), ValueError, "kv_lens must have 1 dims"),
    ("lens-length", _with(kv_lens=lambda d: d["kv_lens"][:1]), ValueError, "entries for a batch"),
    ("lens-device", _with(kv_lens=lambda d: d["kv_lens"].to("meta")), ValueError, "kv_lens is on"),
    ("lens-list", _with(kv_lens=[10, 3]), TypeError, "kv_lens must be a torch.Tensor"),
    ("out-shape", _with(out=lambda d: torch.empty(2, 8, 2, 32)), ValueError, "out must match"),
    ("out-dtype", _with(out=lambda d: torch.empty(2, 8, 1, 32, dtype=torch.float64)), ValueError, "out must match"),
    ("out-strided", _with(out=lambda d: torch.empty(2, 8, 1, 64)[..., ::2]), ValueError, "out must be contiguous"),
    ("meta-device", _with(**{n: (lambda d, n=n: d[n].to("meta")) for n in ("q", "k", "v", "kv_lens")}),
     ValueError, "not on 'meta'"),
]


def _paged_base():
    d = _base(L=16)
    kp, vp, bt = ikport.paged_kv_from_dense(d["k"], d["v"], 4, generator=torch.Generator().manual_seed(0))
    return dict(q=d["q"], k_pages=kp, v_pages=vp, block_table=bt, kv_lens=d["kv_lens"])


def _paged_with(**change):
    def make():
        d = _paged_base()
        for key, f in change.items():
            d[key] = f(d) if callable(f) else f
        return d
    return make


def _call_paged(d):
    d = dict(d)
    args = [d.pop(n) for n in ("q", "k_pages", "v_pages", "block_table", "kv_lens")]
    return ikport.paged_attention(*args, **d)


INVALID_PAGED = [
    ("table-int64", _paged_with(block_table=lambda d: d["block_table"].long()), TypeError, "block_table must be int32"),
    ("table-1d", _paged_with(block_table=lambda d: d["block_table"][0]), ValueError, "block_table must have 2 dims"),
    ("table-rows", _paged_with(block_table=lambda d: d["block_table"][:1]), ValueError, "rows for a batch"),
    ("table-strided", _paged_with(block_table=lambda d: d["block_table"].repeat(1, 2)[:, ::2]), ValueError,
     "last dim must be contiguous"),
    ("table-device", _paged_with(block_table=lambda d: d["block_table"].to("meta")), ValueError, "block_table is on"),
    ("page-size-3", _paged_with(k_pages=lambda d: d["k_pages"][:, :, :3], v_pages=lambda d: d["v_pages"][:, :, :3]),
     ValueError, "page size 3"),
    ("no-lens", _paged_with(kv_lens=None), ValueError, "needs kv_lens"),
    ("pages-dtype-mix", _paged_with(v_pages=lambda d: d["v_pages"].double()), TypeError, "share a dtype"),
]

# The GPU's own limits, checked on CPU tensors with gpu=True (what a CUDA tensor gets).
INVALID_GPU_RULES = [
    ("fp32", dict(dtype=torch.float32), None, TypeError, "not supported on"),
    ("head-dim-72", dict(D=72), None, ValueError, "multiple of 16"),
    ("head-dim-272", dict(D=272), None, ValueError, "multiple of 16"),
    ("last-dim-strided", {}, lambda d: d.update(k=torch.randn(2, 4, 10, 64).half()[..., ::2]), ValueError,
     "k: the last dim must be contiguous"),
    ("stride-not-8", {}, lambda d: d.update(v=torch.randn(2, 4, 10, 36).half()[..., :32]), ValueError,
     "multiples of 8"),
    ("misaligned", {}, lambda d: d.update(q=torch.randn(2 * 8 * 32 + 1).half()[1:].view(2, 8, 1, 32)),
     ValueError, "q: data pointer is not 16-byte aligned"),
]


@pytest.mark.parametrize("name,make,exc,msg", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_attention_inputs_raise_before_launch(name, make, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(make())


@pytest.mark.parametrize("name,make,exc,msg", INVALID_PAGED, ids=[c[0] for c in INVALID_PAGED])
def test_invalid_paged_inputs_raise_before_launch(name, make, exc, msg):
    with pytest.raises(exc, match=msg):
        _call_paged(make())


@pytest.mark.parametrize("name,shape,edit,exc,msg", INVALID_GPU_RULES, ids=[c[0] for c in INVALID_GPU_RULES])
def test_gpu_limits_raise(name, shape, edit, exc, msg):
    d = _base(**{"dtype": torch.float16, "D": 32, **shape})
    if edit:
        edit(d)
    with pytest.raises(exc, match=msg):
        checks.attention(d["q"], d["k"], d["v"], d["kv_lens"], gpu=True)


def test_valid_call_after_invalid_ones_is_unaffected():
    """Failed calls leave no state behind (the validated-layout cache, plans)."""
    for _, make, exc, _ in INVALID:
        with pytest.raises(exc):
            _call(make())
    d = _base()
    got = _call(d)
    torch.testing.assert_close(got.double(), oracle(d["q"], d["k"], d["v"], d["kv_lens"], False, None),
                               atol=2e-5, rtol=2e-5)


# ---- documented results ------------------------------------------------------------------------
def test_zero_and_clamped_lengths_cpu():
    d = _base(L=12)
    lens = torch.tensor([0, 1000], dtype=torch.int32)
    out = ikport.attention(d["q"], d["k"], d["v"], kv_lens=lens)
    assert torch.all(out[0] == 0)
    torch.testing.assert_close(out[1], ikport.attention(d["q"], d["k"], d["v"])[1])
    neg = ikport.attention(d["q"], d["k"], d["v"], kv_lens=torch.tensor([-4, 12], dtype=torch.int32))
    assert torch.all(neg[0] == 0)


def _check_nan_propagation(q, k, v, lens, run, ref_fn, value):
    """Non-finite values in q, or in K/V at a key every row of sequence 0 sees (key 0): the rows
    that read them come out non-finite or all zero (docs/api.md: which one depends on the path;
    a key of +-inf is unspecified); every other row is exact; nothing crashes."""
    B, Hq, Tq, D = q.shape
    group = Hq // k.shape[1]
    clean = ref_fn(q, k, v, lens)
    group1 = [(0, h, t) for h in range(group, 2 * group) for t in range(Tq)]  # KV head 1 of seq 0
    for what, name, index, rows in [
        ("q-row", "q", (0, 1, Tq - 1, 3), [(0, 1, Tq - 1)]),
        ("k-visible", "k", (0, 1, 0, 5), group1),
        ("v-visible", "v", (0, 1, 0, 5), group1),
    ]:
        inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        inputs[name][index] = value
        out = run(inputs["q"], inputs["k"], inputs["v"], lens)
        hit = torch.zeros(B, Hq, Tq, dtype=torch.bool, device=out.device)
        for b, h, t in rows:
            hit[b, h, t] = True
            row = out[b, h, t]
            if not (what == "k-visible" and value == float("inf")):
                assert (not torch.isfinite(row).all()) or bool((row == 0).all()), (what, b, h, t, row)
        assert torch.isfinite(out[~hit]).all(), what
        torch.testing.assert_close(out[~hit].float(), clean[~hit].float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_inf_propagation_cpu(value, causal):
    d = _base(dtype=torch.float32, B=3, Tq=2, L=10)
    lens = torch.tensor([10, 4, 7], dtype=torch.int32)

    def run(q, k, v, n):
        return ikport.attention(q, k, v, kv_lens=n, causal=causal)

    _check_nan_propagation(d["q"], d["k"], d["v"], lens, run, run, value)


# ---- GPU ---------------------------------------------------------------------------------------
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)")
GPU_VARIANTS = [None, None, "split-unfused", "split1", "naive"]


def _opts(variant: str | None) -> ikport.DecodeOptions | None:
    return None if variant is None else ikport.DecodeOptions(variant=variant)


def _gpu_case(rng, gen, paged):
    dev = "cuda"
    B = rng.randint(1, 4)
    Hq, Hkv = rand_heads(rng)
    Tq = rng.randint(1, 4)
    D = rng.choice([64, 128])
    dtype = rng.choice([torch.float16, torch.bfloat16])
    L = rng.randint(1, 64) if rng.random() < 0.7 else rng.randint(200, 2500)  # long: split-K
    q = rand_layout(rng, gen, (B, Hq, Tq, D), dtype, dev, gpu_valid=True)
    if not paged:
        k = rand_layout(rng, gen, (B, Hkv, L, D), dtype, dev, gpu_valid=True)
        v = rand_layout(rng, gen, (B, Hkv, L, D), dtype, dev, gpu_valid=True)
        return dict(q=q, k=k, v=v, L=L, B=B, dtype=dtype)
    ps = rng.choice([1, 2, 4, 8, 16, 64])
    max_pages = -(-L // ps)
    num_pages = B * max_pages + rng.randint(0, 3)
    kp = rand_layout(rng, gen, (num_pages, Hkv, ps, D), dtype, dev, gpu_valid=True)
    vp = rand_layout(rng, gen, (num_pages, Hkv, ps, D), dtype, dev, gpu_valid=True)
    table = torch.randperm(num_pages, generator=gen)[:B * max_pages].view(B, max_pages)
    return dict(q=q, k_pages=kp, v_pages=vp, table=table.to(torch.int32).to(dev), L=max_pages * ps,
                B=B, dtype=dtype, ps=ps)


def _gpu_check(out, buf, span, ref, dtype, what):
    torch.cuda.synchronize()
    assert guards_intact(buf, span), f"wrote outside out: {what}"
    assert torch.isfinite(out).all(), f"unwritten or bad output: {what}"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= GPU_TOL[dtype], f"max abs error {err:.3e}: {what}"


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
def test_fuzz_gpu(paged, seed):
    rng = random.Random(100 + seed + 10 * paged)
    gen = torch.Generator().manual_seed(100 + seed)
    for case in range(GPU_CASES // 3):
        c = _gpu_case(rng, gen, paged)
        B, L, dtype = c["B"], c["L"], c["dtype"]
        causal = rng.random() < 0.5
        variant = rng.choice(GPU_VARIANTS)
        lens = rand_lens(rng, B, L).cuda()
        q = c["q"]
        out, buf, span = poisoned_out(rng, tuple(q.shape), dtype, "cuda")
        what = (f"seed {seed} case {case}: q {tuple(q.shape)} {dtype} L={L} variant={variant} "
                f"causal={causal} lens={lens.tolist()} paged={paged} ps={c.get('ps')}")
        if paged:
            ikport.paged_attention(q, c["k_pages"], c["v_pages"], c["table"], lens, causal=causal,
                                   out=out, options=_opts(variant))
            ref = reference.paged_attention(q, c["k_pages"], c["v_pages"], c["table"], lens, causal=causal)
        else:
            ikport.attention(q, c["k"], c["v"], kv_lens=lens, causal=causal, out=out, options=_opts(variant))
            ref = reference.attention(q, c["k"], c["v"], kv_lens=lens, causal=causal)
        _gpu_check(out, buf, span, ref, dtype, what)


def _gpu_base(**kw):
    return _base(**{"dtype": torch.float16, "device": "cuda", "D": 64, "L": 40, **kw})


def _gpu_invalid_cases():
    def edit(f):
        def make():
            d = _gpu_base()
            f(d)
            return d
        return make

    def set_(**kv):
        return edit(lambda d: d.update({k: (v(d) if callable(v) else v) for k, v in kv.items()}))

    return [
        ("fp32", set_(**{n: (lambda d, n=n: d[n].float()) for n in "qkv"}), TypeError, "not supported on cuda"),
        ("head-dim-72", lambda: _base(dtype=torch.float16, device="cuda", D=72), ValueError, "multiple of 16"),
        ("last-dim-strided", set_(k=lambda d: torch.randn(2, 4, 40, 128, device="cuda").half()[..., ::2]),
         ValueError, "last dim must be contiguous"),
        ("stride-not-8", set_(v=lambda d: torch.randn(2, 4, 40, 68, device="cuda").half()[..., :64]),
         ValueError, "multiples of 8"),
        ("misaligned", set_(k=lambda d: torch.randn(d["k"].numel() + 1, device="cuda").half()[1:].view_as(d["k"])),
         ValueError, "16-byte aligned"),
        ("device-mix", set_(k=lambda d: d["k"].cpu()), ValueError, "one device"),
        ("lens-on-cpu", set_(kv_lens=lambda d: d["kv_lens"].cpu()), ValueError, "kv_lens is on"),
        ("lens-int64", set_(kv_lens=lambda d: d["kv_lens"].long()), TypeError, "int32"),
        ("options-not-options", set_(options="split"), TypeError, "options must be an ikport.DecodeOptions"),
        ("out-on-cpu", set_(out=lambda d: torch.empty(2, 8, 1, 64, dtype=torch.float16)), ValueError,
         "out must match"),
    ]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", range(10))
def test_invalid_inputs_gpu(case):
    name, make, exc, msg = _gpu_invalid_cases()[case]
    with pytest.raises(exc, match=msg):
        _call(make())
    torch.cuda.synchronize()  # nothing was launched with bad arguments; the context is healthy
    d = _gpu_base()
    out = _call(d)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), name


@pytest.mark.gpu
@requires_gpu
def test_invalid_paged_inputs_gpu():
    d = _gpu_base(L=32)
    kp, vp, bt = ikport.paged_kv_from_dense(d["k"], d["v"], 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="block_table is on"):
        ikport.paged_attention(d["q"], kp, vp, bt.cpu(), d["kv_lens"])
    with pytest.raises(ValueError, match="page size"):
        ikport.paged_attention(d["q"], kp[:, :, :6], vp[:, :, :6], bt, d["kv_lens"])
    with pytest.raises(TypeError, match="block_table must be int32"):
        ikport.paged_attention(d["q"], kp, vp, bt.long(), d["kv_lens"])
    torch.cuda.synchronize()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", [None, "split-unfused", "naive"])
def test_nan_inf_propagation_gpu(value, causal, variant):
    d = _base(dtype=torch.float16, device="cuda", B=3, Tq=2, L=700, D=64)
    lens = torch.tensor([700, 4, 513], dtype=torch.int32, device="cuda")

    def run(q, k, v, n):
        return ikport.attention(q, k, v, kv_lens=n, causal=causal, options=_opts(variant))

    def ref(q, k, v, n):
        return reference.attention(q, k, v, kv_lens=n, causal=causal)

    _check_nan_propagation(d["q"], d["k"], d["v"], lens, run, ref, value)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("variant", [None, "split-unfused", "split1", "naive"])
def test_values_past_kv_len_are_never_read_gpu(variant):
    """NaN in K and V beyond each sequence's kv_len (inside the cache) changes nothing."""
    d = _base(dtype=torch.float16, device="cuda", B=3, Tq=1, L=700, D=128)
    lens = torch.tensor([5, 300, 699], dtype=torch.int32, device="cuda")
    clean = ikport.attention(d["q"], d["k"], d["v"], kv_lens=lens, options=_opts(variant))
    k, v = d["k"].clone(), d["v"].clone()
    for b, n in enumerate(lens.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    got = ikport.attention(d["q"], k, v, kv_lens=lens, options=_opts(variant))
    assert torch.equal(got, clean)
