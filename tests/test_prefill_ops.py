"""Prefill through the custom ops (CPU): attention_varlen's op and q_lens on the attention ops,
torch.library.opcheck, torch.compile(fullgraph=True), torch.export, eager calls that never
dispatch the op, and the options' text through the op."""


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ikport
from ikport import reference


def i32(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def varlen_inputs(lens_q=(130, 0, 7, 1), lens_k=(130, 5, 7, 20), Hq=4, Hkv=2, D=32, dtype=torch.float32,
                  device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def mk(*s):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k, v = mk(sum(lens_q), Hq, D), mk(sum(lens_k), Hkv, D), mk(sum(lens_k), Hkv, D)
    cu_q = i32([0, *torch.tensor(lens_q).cumsum(0).tolist()], device)
    cu_k = i32([0, *torch.tensor(lens_k).cumsum(0).tolist()], device)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


def dense_inputs(B=2, Hq=4, Hkv=2, Tq=150, L=200, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return q, k, v, i32([L, 60][:B]), i32([Tq, 37][:B])


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class GraphRecorder:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self):
        return [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"]


# ---- the ops, eager ----------------------------------------------------------------------------
def test_varlen_op_equals_eager_and_returns_an_empty_lse_without_return_lse():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs()
    out, lse = torch.ops.ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, True, 0.3, True, None)
    eager, eager_lse = ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, scale=0.3, return_lse=True)
    assert torch.equal(out, eager) and torch.equal(lse, eager_lse) and lse.shape == (4, q.shape[0])
    out, lse = torch.ops.ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, False, None, False, None)
    assert torch.equal(out, ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk))
    assert lse.shape == (0,) and lse.dtype == torch.float32


def test_attention_ops_take_q_lens_last_with_a_default():
    q, k, v, kv, ql = dense_inputs()
    eager = ikport.attention(q, k, v, causal=True, kv_lens=kv, q_lens=ql)
    assert torch.equal(torch.ops.ikport.attention(q, k, v, kv, True, None, None, ql), eager)
    assert torch.equal(torch.ops.ikport.attention(q, k, v, kv, True, None, None),  # positional, as before
                       ikport.attention(q, k, v, causal=True, kv_lens=kv))
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16)
    assert torch.equal(torch.ops.ikport.paged_attention(q, kp, vp, bt, kv, True, None, None, q_lens=ql),
                       ikport.paged_attention(q, kp, vp, bt, kv, causal=True, q_lens=ql))


def test_eager_calls_do_not_dispatch_the_custom_ops():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs()
    qd, kd, vd, kv, ql = dense_inputs()
    with OpRecorder() as rec:
        ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True)
        ikport.attention(qd, kd, vd, kv_lens=kv, q_lens=ql)
    assert rec.names and not any("ikport" in n for n in rec.names)


# ---- opcheck -----------------------------------------------------------------------------------
def varlen_samples():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v, cu_q, cu_k, mq, mk = varlen_inputs(dtype=dtype)
        yield (q, k, v, cu_q, cu_k, mq, mk, True, None, True, None)
        yield (q, k, v, cu_q, cu_k, mq, mk, False, 0.25, False, None)
    qkv = torch.randn(30, 4 + 2 + 2, 32)  # q, k, v as slices of one packed projection
    cu = i32([0, 10, 30])
    yield (qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], cu, cu, 20, 20, True, None, True, None)
    q, k, v, cu_q, cu_k, _, _ = varlen_inputs(lens_q=(0, 0), lens_k=(3, 0))  # no query tokens at all
    yield (q, k, v, cu_q, cu_k, 0, 3, True, None, True, None)


@pytest.mark.parametrize("args", list(varlen_samples()), ids=lambda a: f"{a[0].dtype}-{tuple(a[0].shape)}-lse{a[9]}")
def test_opcheck_attention_varlen_cpu(args):
    torch.library.opcheck(torch.ops.ikport.attention_varlen.default, args)


def test_opcheck_attention_ops_with_q_lens_cpu():
    q, k, v, kv, ql = dense_inputs(dtype=torch.float16)
    torch.library.opcheck(torch.ops.ikport.attention.default, (q, k, v, kv, True, None, None, ql))
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.ikport.paged_attention.default, (q, kp, vp, bt, kv, True, 0.2, None, ql))


# ---- torch.compile / export --------------------------------------------------------------------
def _model(q, k, v, cu_q, cu_k, qd, kd, vd, kv, ql, out):
    a, lse = ikport.attention_varlen(q * 2.0, k, v, cu_q, cu_k, 130, 130, causal=True, return_lse=True)
    b = ikport.attention(qd, kd, vd, causal=True, kv_lens=kv, q_lens=ql, out=out)
    c = ikport.attention_varlen(q, k, v, cu_q, cu_k, 130, 130)
    return a + 1.0, lse, b, c


def test_compile_fullgraph_one_node_per_call():
    q, k, v, cu_q, cu_k, _, _ = varlen_inputs()
    qd, kd, vd, kv, ql = dense_inputs()
    rec = GraphRecorder()
    out = torch.full_like(qd, float("nan"))
    got = torch.compile(_model, fullgraph=True, backend=rec)(q, k, v, cu_q, cu_k, qd, kd, vd, kv, ql, out)
    assert len(rec.graphs) == 1
    t = rec.targets()
    assert t.count("ikport.attention_varlen.default") == 2 and t.count("ikport.attention.default") == 1
    want = _model(q, k, v, cu_q, cu_k, qd, kd, vd, kv, ql, torch.empty_like(qd))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(out, want[2])  # out= is filled by a copy after the op


def test_compile_varlen_out_and_dynamic_shapes():
    def f(q, k, v, cu_q, cu_k, out):
        return ikport.attention_varlen(q, k, v, cu_q, cu_k, 130, 130, causal=True, out=out, scale=0.2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for lens_q, lens_k in (((130, 0, 7, 1), (130, 5, 7, 20)), ((3, 9), (100, 9)), ((1,), (1,))):
        q, k, v, cu_q, cu_k, _, _ = varlen_inputs(lens_q, lens_k)
        out = torch.full_like(q, float("nan"))
        got = compiled(q, k, v, cu_q, cu_k, out)
        want = ikport.attention_varlen(q, k, v, cu_q, cu_k, 130, 130, causal=True, scale=0.2)
        assert torch.equal(got, want) and torch.equal(out, want)


def test_compile_reports_bad_varlen_inputs_while_tracing():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs()
    f = torch.compile(lambda q, k, v, cq, ck: ikport.attention_varlen(q, k, v, cq, ck, mq, mk), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(Exception, match="cu_seqlens_q must be int32"):
        f(q, k, v, cu_q.long(), cu_k)
    with pytest.raises(Exception, match="must share a dtype"):
        f(q.double(), k, v, cu_q, cu_k)


def test_export_holds_the_varlen_op():
    class M(torch.nn.Module):
        def forward(self, q, k, v, cu_q, cu_k):
            return ikport.attention_varlen(q, k, v, cu_q, cu_k, 130, 130, causal=True, return_lse=True)

    q, k, v, cu_q, cu_k, _, _ = varlen_inputs()
    ep = torch.export.export(M(), (q, k, v, cu_q, cu_k))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("ikport.attention_varlen.default") == 1
    for a, b in zip(ep.module()(q, k, v, cu_q, cu_k), M()(q, k, v, cu_q, cu_k)):
        assert torch.equal(a, b)


# ---- options through the op ----------------------------------------------------------------
def test_prefill_options_travel_as_text_through_the_ops(monkeypatch):
    """A PrefillOptions reaches the eager path intact from a traced call: as is for varlen, after
    "prefill:" on the attention ops (which also take a DecodeOptions). The eager path is spied on."""
    from ikport.impl import attention as impl

    seen = []
    real_varlen, real_attention = impl.attention_varlen, impl.attention

    def spy_varlen(*args):
        seen.append(args[11])
        return real_varlen(*args)

    def spy_attention(q, k, v, causal, scale, kv_lens, out, options, q_lens=None):
        seen.append(options)
        return real_attention(q, k, v, causal, scale, kv_lens, out, options, q_lens=q_lens)

    monkeypatch.setattr(impl, "attention_varlen", spy_varlen)
    monkeypatch.setattr(impl, "attention", spy_attention)
    opts = ikport.PrefillOptions(tile_m=64, pad=False)
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs()
    qd, kd, vd, kv, ql = dense_inputs()
    f = torch.compile(lambda: (ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, options=opts),
                               ikport.attention(qd, kd, vd, q_lens=ql, options=opts),
                               ikport.attention(qd, kd, vd, options=ikport.DecodeOptions(variant="split1"))),
                      fullgraph=True, backend="aot_eager")
    a, b, c = f()
    assert seen == [opts, opts, ikport.DecodeOptions(variant="split1")]
    assert torch.equal(a, real_varlen(q, k, v, cu_q, cu_k, mq, mk))
    assert torch.equal(b, real_attention(qd, kd, vd, q_lens=ql))
    with pytest.raises(Exception, match="options must be an ikport.DecodeOptions or None, got str"):
        torch.compile(lambda: ikport.attention(qd, kd, vd, options="fa2"), fullgraph=True, backend="aot_eager")()
    with pytest.raises(Exception, match="options must be an ikport.PrefillOptions or None"):
        torch.compile(lambda: ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk,
                                                      options=ikport.DecodeOptions()),
                      fullgraph=True, backend="aot_eager")()


def test_reference_is_the_cpu_path():
    q, k, v, cu_q, cu_k, mq, mk = varlen_inputs(dtype=torch.bfloat16)
    out, lse = ikport.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
