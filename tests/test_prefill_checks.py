"""Bad prefill inputs (q_lens, attention_varlen's layout and offsets) raise a clear error naming
the argument, before anything launches (CPU; gpu=True applies the GPU's rules to CPU tensors)."""

import pytest
import torch

import ikport
from ikport import checks


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def qkv(B=2, Hq=4, Hkv=2, Tq=5, L=8, D=64, dtype=torch.float16):
    return (torch.randn(B, Hq, Tq, D, dtype=dtype), torch.randn(B, Hkv, L, D, dtype=dtype),
            torch.randn(B, Hkv, L, D, dtype=dtype))


# ---- q_lens ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,exc,match", [
    (torch.zeros(2, dtype=torch.int64), TypeError, "q_lens must be int32, got torch.int64"),
    (torch.zeros(3, dtype=torch.int32), ValueError, "q_lens has 3 entries for a batch of 2"),
    (torch.zeros(2, 1, dtype=torch.int32), ValueError, "q_lens must have 1 dims"),
    ([5, 5], TypeError, "q_lens must be a torch.Tensor"),
    (torch.zeros(4, dtype=torch.int32)[::2], ValueError, "q_lens must be contiguous"),
    (torch.zeros(2, dtype=torch.int32, device="meta"), ValueError, "q_lens is on meta but q is on cpu"),
])
def test_bad_q_lens_is_named(bad, exc, match):
    q, k, v = qkv(dtype=torch.float32)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 4)
    lens = i32([8, 8])
    with pytest.raises(exc, match=match):
        ikport.attention(q, k, v, q_lens=bad)
    with pytest.raises(exc, match=match):
        ikport.paged_attention(q, kp, vp, bt, lens, q_lens=bad)
    with pytest.raises(exc, match=match):
        checks.attention(q.half(), k.half(), v.half(), None, gpu=True, q_lens_=bad)


def test_q_lens_is_rechecked_after_a_valid_call_of_the_same_layout():
    q, k, v = qkv(dtype=torch.float32)
    ikport.attention(q, k, v, q_lens=i32([5, 2]))
    with pytest.raises(TypeError, match="q_lens must be int32"):
        ikport.attention(q, k, v, q_lens=torch.tensor([5, 2]))


def test_q_lens_values_are_clamped_not_refused():
    """As kv_lens: read on the device, clamped to [0, Tq] (no host synchronization)."""
    q, k, v = qkv(dtype=torch.float32)
    clamped = ikport.attention(q, k, v, causal=True, q_lens=i32([99, -3]))
    assert torch.equal(clamped, ikport.attention(q, k, v, causal=True, q_lens=i32([5, 0])))
    assert not clamped[1].any()


# ---- attention_varlen: layout ------------------------------------------------------------------
def varlen_args(lens_q=(3, 0, 5), lens_k=(4, 2, 5), Hq=4, Hkv=2, D=64, dtype=torch.float16):
    cu_q = i32([0, *torch.tensor(lens_q).cumsum(0).tolist()])
    cu_k = i32([0, *torch.tensor(lens_k).cumsum(0).tolist()])
    return dict(q=torch.randn(sum(lens_q), Hq, D, dtype=dtype), k=torch.randn(sum(lens_k), Hkv, D, dtype=dtype),
                v=torch.randn(sum(lens_k), Hkv, D, dtype=dtype), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), out=None, return_lse=False)


def changed(**change):
    def make():
        d = varlen_args()
        for key, f in change.items():
            d[key] = f(d) if callable(f) else f
        return d
    return make


def call_checks(d, gpu):
    checks.varlen(d["q"], d["k"], d["v"], d["cu_seqlens_q"], d["cu_seqlens_k"], d["max_seqlen_q"],
                  d["max_seqlen_k"], d["out"], d["return_lse"], gpu=gpu)


def call_api(d):
    d = dict(d)
    args = [d.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    return ikport.attention_varlen(*args, **d)


INVALID_VARLEN = [
    ("q-rank", changed(q=lambda d: d["q"][None]), ValueError, "q must have 3 dims"),
    ("k-not-tensor", changed(k=[1, 2]), TypeError, "k must be a torch.Tensor"),
    ("dtype-mix", changed(v=lambda d: d["v"].float()), TypeError, "q, k, v must share a dtype"),
    ("int-dtype", changed(**{n: (lambda d, n=n: d[n].to(torch.int32)) for n in "qkv"}), TypeError,
     "dtype torch.int32 is not supported"),
    ("kv-shape", changed(v=lambda d: d["v"][:-1]), ValueError, "k and v must have the same shape"),
    ("head-dim", changed(k=lambda d: d["k"][..., :32], v=lambda d: d["v"][..., :32]), ValueError,
     r"head_dim of q \(64\) and k/v \(32\) differ"),
    ("heads", changed(q=lambda d: d["q"][:, :3]), ValueError,
     r"query heads \(3\) must be a multiple of KV heads \(2\)"),
    ("cu-q-int64", changed(cu_seqlens_q=lambda d: d["cu_seqlens_q"].long()), TypeError,
     "cu_seqlens_q must be int32, got torch.int64"),
    ("cu-k-2d", changed(cu_seqlens_k=lambda d: d["cu_seqlens_k"][None]), ValueError, "cu_seqlens_k must have 1 dims"),
    ("cu-q-short", changed(cu_seqlens_q=i32([0]), cu_seqlens_k=i32([0])), ValueError,
     r"cu_seqlens_q has 1 entries; it needs B \+ 1 >= 2"),
    ("cu-lengths", changed(cu_seqlens_k=lambda d: d["cu_seqlens_k"][:3]), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must have the same length \(B \+ 1\), got 4 and 3"),
    ("cu-strided", changed(cu_seqlens_q=lambda d: d["cu_seqlens_q"].repeat_interleave(2)[::2]), ValueError,
     "cu_seqlens_q must be contiguous"),
    ("cu-device", changed(cu_seqlens_k=lambda d: d["cu_seqlens_k"].to("meta")), ValueError,
     "cu_seqlens_k is on meta but q is on cpu"),
    ("max-q-float", changed(max_seqlen_q=5.0), TypeError, "max_seqlen_q must be an int, got float"),
    ("max-k-tensor", changed(max_seqlen_k=torch.tensor(5)), TypeError, "max_seqlen_k must be an int, got Tensor"),
    ("max-q-bool", changed(max_seqlen_q=True), TypeError, "max_seqlen_q must be an int, got bool"),
    ("max-k-negative", changed(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0, got -1"),
    ("max-q-zero", changed(max_seqlen_q=0), ValueError, "max_seqlen_q is 0 but q holds 8 tokens"),
    ("lse-not-bool", changed(return_lse=1), TypeError, "return_lse must be a bool, got int"),
    ("out-shape", changed(out=lambda d: torch.empty(8, 4, 32, dtype=torch.float16)), ValueError, "out must match q"),
    ("out-dtype", changed(out=lambda d: torch.empty(8, 4, 64)), ValueError, "out must match q"),
    ("out-strided", changed(out=lambda d: torch.empty(4, 8, 64, dtype=torch.float16).transpose(0, 1)), ValueError,
     "out must be contiguous"),
]


@pytest.mark.parametrize("name,make,exc,match", INVALID_VARLEN, ids=[c[0] for c in INVALID_VARLEN])
def test_bad_varlen_inputs_are_named(name, make, exc, match):
    with pytest.raises(exc, match=match):
        call_checks(make(), gpu=False)
    with pytest.raises(exc, match=match):
        call_api(make())


INVALID_VARLEN_GPU = [
    ("fp32", changed(**{n: (lambda d, n=n: d[n].float()) for n in "qkv"}), TypeError,
     "dtype torch.float32 is not supported on cpu"),  # (a CPU tensor standing for a GPU one)
    ("head-dim-72", changed(**{n: (lambda d, n=n: torch.randn(d[n].shape[0], d[n].shape[1], 72).half())
                               for n in "qkv"}), ValueError, "head_dim 72 is not supported on the GPU"),
    ("last-dim-strided", changed(k=lambda d: torch.randn(11, 2, 128).half()[..., ::2]), ValueError,
     "k: the last dim must be contiguous"),
    ("stride-not-8", changed(v=lambda d: torch.randn(11, 2, 68).half()[..., :64]), ValueError,
     "v: stride of dim 1 is 68 elements; .* multiples of 8"),
    ("misaligned", changed(q=lambda d: torch.randn(8 * 4 * 64 + 1).half()[1:].view(8, 4, 64)), ValueError,
     "q: data pointer is not 16-byte aligned"),
]


@pytest.mark.parametrize("name,make,exc,match", INVALID_VARLEN_GPU, ids=[c[0] for c in INVALID_VARLEN_GPU])
def test_gpu_rules_of_varlen(name, make, exc, match):
    call_checks(varlen_args(), gpu=True)  # the valid base passes
    with pytest.raises(exc, match=match):
        call_checks(make(), gpu=True)


def test_valid_varlen_edge_cases_pass():
    """A strided q (a slice of a packed QKV projection), empty sequences, max_seqlen larger than
    the longest, no tokens at all (max_seqlen 0)."""
    d = varlen_args(D=64)
    qkv_proj = torch.randn(8, 4 + 2 + 2, 64, dtype=torch.float16)
    d["q"] = qkv_proj[:, :4]
    d["max_seqlen_q"] = 1000
    call_checks(d, gpu=True)
    call_api(d)
    empty = varlen_args(lens_q=(0, 0), lens_k=(0, 0))
    call_checks(empty, gpu=True)
    out = call_api(empty)
    assert out.shape == (0, 4, 64)


# ---- attention_varlen: the offsets' values -----------------------------------------------------
@pytest.mark.parametrize("which,values,match", [
    ("q", [1, 3, 3, 8], r"cu_seqlens_q\[0\] = 1: the offsets must start at 0"),
    ("q", [0, 3, 2, 8], r"cu_seqlens_q\[2\] = 2 < cu_seqlens_q\[1\] = 3: the offsets must not decrease"),
    ("q", [0, 3, 3, 7], r"cu_seqlens_q\[-1\] = 7 but q holds 8 tokens: the last offset must be the total"),
    ("k", [0, 4, 7, 12], r"cu_seqlens_k\[-1\] = 12 but k holds 11 tokens"),
    ("k", [0, 0, 6, 11], r"sequence 1 has 6 tokens \(cu_seqlens_k\[2\] - cu_seqlens_k\[1\]\), more than "
                         r"max_seqlen_k = 5"),
    ("q", [0, 8, 8, 8], r"sequence 0 has 8 tokens \(cu_seqlens_q\[1\] - cu_seqlens_q\[0\]\), more than "
                        r"max_seqlen_q = 5"),
])
def test_bad_offsets_are_named_on_the_cpu(which, values, match):
    d = varlen_args()
    d[f"cu_seqlens_{which}"] = i32(values)
    with pytest.raises(ValueError, match=match):
        call_api(d)
    with pytest.raises(ValueError, match=match):
        checks.varlen_offsets(d["cu_seqlens_q"], d["cu_seqlens_k"], d["max_seqlen_q"], d["max_seqlen_k"], 8, 11)


def test_gpu_offsets_check_only_with_the_knob_and_never_while_capturing(monkeypatch):
    """As the block table's: on the GPU the offsets are read only with IKPORT_CHECK_TABLES=1, and
    not during a CUDA graph capture (CPU tensors standing for GPU ones, gpu=True)."""
    d = varlen_args()
    bad = i32([0, 3, 2, 8])
    args = (bad, d["cu_seqlens_k"], d["max_seqlen_q"], d["max_seqlen_k"], 8, 11)
    monkeypatch.delenv("IKPORT_CHECK_TABLES", raising=False)
    checks.varlen_offsets(*args, gpu=True)  # unchecked: no error, no sync
    monkeypatch.setenv("IKPORT_CHECK_TABLES", "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ValueError, match="the offsets must not decrease"):
        checks.varlen_offsets(*args, gpu=True)
    checks.varlen_offsets(d["cu_seqlens_q"], *args[1:], gpu=True)  # valid offsets pass
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    checks.varlen_offsets(*args, gpu=True)


def test_options_kinds_are_named():
    with pytest.raises(TypeError, match="options must be an ikport.DecodeOptions or None, got str"):
        checks.options("split", ikport.DecodeOptions)
    with pytest.raises(TypeError, match="options must be an ikport.DecodeOptions or ikport.W4A16Options or None"):
        checks.options(3, (ikport.DecodeOptions, ikport.W4A16Options))
    checks.options(ikport.W4A16Options(), (ikport.DecodeOptions, ikport.W4A16Options))
