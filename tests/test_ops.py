"""The custom ops (ikport/ops.py): registration, torch.library.opcheck, torch.compile with
fullgraph=True, torch.export, and that eager calls never pay for the custom-op dispatch.

CPU tests run in CI (the CPU path is the reference); the GPU tests (marked gpu) add opcheck on
CUDA tensors, inductor, CUDA graphs through torch.compile(mode="reduce-overhead") and capture of
the op with torch.cuda.graph.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ikport
from ikport import ops

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)")


def inputs(B=2, Hq=8, Hkv=4, Tq=2, L=24, D=32, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def mk(*s):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k, v = mk(B, Hq, Tq, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D)
    lens = torch.tensor([L, 5, 1, 17][:B], dtype=torch.int32, device=device)
    return q, k, v, lens


def paged_inputs(page_size=4, **kw):
    q, k, v, lens = inputs(**kw)
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, page_size, generator=torch.Generator().manual_seed(1))
    return q, kp, vp, bt, lens


class OpRecorder(TorchDispatchMode):
    """Every operator dispatched below Python while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# ---- registration ------------------------------------------------------------------------------
def test_schemas():
    assert str(torch.ops.ikport.attention.default._schema) == (
        "ikport::attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lens, bool causal, float? scale, "
        "str? options, Tensor? q_lens=None) -> Tensor")
    assert str(torch.ops.ikport.paged_attention.default._schema) == (
        "ikport::paged_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, "
        "Tensor kv_lens, bool causal, float? scale, str? options, Tensor? q_lens=None) -> Tensor")
    assert str(torch.ops.ikport.attention_varlen.default._schema) == (
        "ikport::attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float? scale, bool return_lse, str? options) "
        "-> (Tensor, Tensor)")
    assert ops.attention is torch.ops.ikport.attention.default


def test_importing_twice_registers_once():
    code = ("import importlib, torch, ikport, ikport.ops as o; "
            "importlib.reload(o); importlib.reload(ikport); import ikport.ops; "
            "q = torch.randn(1, 2, 1, 16); "
            "print(torch.ops.ikport.attention(q, q, q, None, False, None, None).shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 2, 1, 16])" in done.stdout


def test_eager_calls_do_not_dispatch_the_custom_op():
    q, k, v, lens = inputs()
    with OpRecorder() as rec:
        ikport.attention(q, k, v, kv_lens=lens)
    assert rec.names and not any("ikport" in n for n in rec.names)
    with OpRecorder() as rec:
        torch.ops.ikport.attention(q, k, v, lens, False, None, None)
    assert any("ikport.attention" in n for n in rec.names)


def test_op_equals_eager_and_returns_a_new_tensor():
    q, k, v, lens = inputs()
    eager = ikport.attention(q, k, v, kv_lens=lens, causal=True, scale=0.3)
    got = torch.ops.ikport.attention(q, k, v, lens, True, 0.3, None)
    assert torch.equal(got, eager) and got.is_contiguous()
    q, kp, vp, bt, lens = paged_inputs()
    assert torch.equal(torch.ops.ikport.paged_attention(q, kp, vp, bt, lens, False, None, None),
                       ikport.paged_attention(q, kp, vp, bt, lens))


# ---- opcheck -----------------------------------------------------------------------------------
def attention_samples(device="cpu", dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    for dtype in dtypes:
        q, k, v, lens = inputs(dtype=dtype, device=device)
        yield (q, k, v, lens, False, None, None)
        yield (q, k, v, None, True, 0.25, None)
    q, k, v, lens = inputs(B=3, Hq=4, Hkv=4, Tq=1, L=40, D=64, dtype=dtypes[-1], device=device)
    yield (q, k[:, :, :33], v[:, :, :33], lens, False, None, None)  # strided k/v (a cache slice)
    qt = torch.randn(3, 1, 4, 64, device=device).to(dtypes[-1]).transpose(1, 2)  # q from [B, T, H, D]
    yield (qt, k, v, lens, True, None, None)


def paged_samples(device="cpu", dtypes=(torch.float32, torch.float16)):
    for dtype in dtypes:
        for ps in (1, 4, 16):
            q, kp, vp, bt, lens = paged_inputs(page_size=ps, dtype=dtype, device=device)
            yield (q, kp, vp, bt, lens, ps == 4, None, None)


@pytest.mark.parametrize("args", list(attention_samples()), ids=lambda a: f"{a[0].dtype}-{tuple(a[1].shape)}")
def test_opcheck_attention_cpu(args):
    torch.library.opcheck(torch.ops.ikport.attention.default, args)


@pytest.mark.parametrize("args", list(paged_samples()), ids=lambda a: f"{a[0].dtype}-ps{a[1].shape[2]}")
def test_opcheck_paged_attention_cpu(args):
    torch.library.opcheck(torch.ops.ikport.paged_attention.default, args)


# ---- torch.compile / export --------------------------------------------------------------------
class GraphRecorder:
    """A torch.compile backend that keeps each graph and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self):
        return [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"]


def _model(q, k, v, lens, kp, vp, bt, out):
    x = ikport.attention(q * 2.0, k, v, kv_lens=lens, causal=True)
    y = ikport.paged_attention(q, kp, vp, bt, lens, scale=0.2, out=out)
    return x + 1.0, y


def test_compile_fullgraph_one_node_per_call():
    q, k, v, lens = inputs()
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 4, generator=torch.Generator().manual_seed(0))
    rec = GraphRecorder()
    compiled = torch.compile(_model, fullgraph=True, backend=rec)
    out = torch.empty_like(q)
    x, y = compiled(q, k, v, lens, kp, vp, bt, out)
    assert len(rec.graphs) == 1
    t = rec.targets()
    assert t.count("ikport.attention.default") == 1 and t.count("ikport.paged_attention.default") == 1
    ex, ey = _model(q, k, v, lens, kp, vp, bt, torch.empty_like(q))
    assert torch.equal(x, ex) and torch.equal(y, ey)
    assert torch.equal(out, ey)  # out= is filled by a copy after the op


def test_compile_aot_eager_dynamic_shapes():
    compiled = torch.compile(
        lambda q, k, v, n: ikport.attention(q, k, v, kv_lens=n, causal=True, scale=0.2),
        fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in [(2, 8, 2, 10, 32), (3, 8, 1, 17, 32), (1, 8, 3, 40, 32)]:
        B, Hq, Tq, L, D = shape
        q, k, v, lens = inputs(B=B, Hq=Hq, Tq=Tq, L=L, D=D)
        assert torch.equal(compiled(q, k, v, lens),
                           ikport.attention(q, k, v, kv_lens=lens, causal=True, scale=0.2))


def test_compile_scale_passed_as_an_argument():
    """torch.compile may trace a float argument as a symbolic float: the traced path checks only
    its type, the op's eager run the number it gets (a NaN still raises, naming scale)."""
    q, k, v, lens = inputs()
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 4)
    compiled = torch.compile(lambda q, s: (ikport.attention(q, k, v, kv_lens=lens, scale=s),
                                           ikport.paged_attention(q, kp, vp, bt, lens, scale=s)),
                             fullgraph=True, backend="aot_eager")
    for s in (0.2, 0.7, 3):
        x, y = compiled(q, s)
        assert torch.equal(x, ikport.attention(q, k, v, kv_lens=lens, scale=s))
        assert torch.equal(y, ikport.paged_attention(q, kp, vp, bt, lens, scale=s))
    with pytest.raises(ValueError, match="scale must be a finite number, got nan"):
        compiled(q, float("nan"))
    with pytest.raises(Exception, match="scale must be a float .* got str"):  # wrapped by dynamo
        compiled(q, "x")


def test_compile_out_argument_is_copied_into():
    q, k, v, lens = inputs()

    def f(q, k, v, n, out):
        return ikport.attention(q, k, v, kv_lens=n, out=out)

    out = torch.full_like(q, float("nan"))
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, lens, out)
    assert torch.equal(out, ikport.attention(q, k, v, kv_lens=lens))
    assert torch.equal(got, out)


def test_compile_reports_bad_inputs_while_tracing():
    q, k, v, lens = inputs()
    f = torch.compile(lambda q, k, v, n: ikport.attention(q, k, v, kv_lens=n), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(Exception, match="must share a dtype"):
        f(q.double(), k, v, lens)
    with pytest.raises(Exception, match="kv_lens must be int32"):
        f(q, k, v, lens.long())


def test_paged_kv_from_dense_compiles_fullgraph():
    q, k, v, lens = inputs()
    f = torch.compile(lambda k, v: ikport.paged_kv_from_dense(k, v, 8, shuffle=False), fullgraph=True,
                      backend="aot_eager")
    for a, b in zip(f(k, v), ikport.paged_kv_from_dense(k, v, 8, shuffle=False)):
        assert torch.equal(a, b)


def test_export_holds_the_op():
    class M(torch.nn.Module):
        def forward(self, q, k, v, lens):
            return ikport.attention(q, k, v, kv_lens=lens, causal=True)

    q, k, v, lens = inputs()
    ep = torch.export.export(M(), (q, k, v, lens))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["ikport.attention.default"]
    assert torch.equal(ep.module()(q, k, v, lens), ikport.attention(q, k, v, kv_lens=lens, causal=True))


# ---- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("i", range(6))
def test_opcheck_attention_gpu(i):
    args = list(attention_samples("cuda", (torch.float16, torch.bfloat16)))[i]
    torch.library.opcheck(torch.ops.ikport.attention.default, args)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("i", range(3))
def test_opcheck_paged_attention_gpu(i):
    args = list(paged_samples("cuda", (torch.float16,)))[i]
    torch.library.opcheck(torch.ops.ikport.paged_attention.default, args)


@pytest.mark.gpu
@requires_gpu
def test_compile_inductor_fullgraph_gpu():
    q, k, v, lens = inputs(B=4, Hq=32, Hkv=8, Tq=1, L=4096, D=128, dtype=torch.float16, device="cuda")
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(q)
    eager = _model(q, k, v, lens, kp, vp, bt, torch.empty_like(q))
    compiled = torch.compile(_model, fullgraph=True)
    got = compiled(q, k, v, lens, kp, vp, bt, out)
    torch.cuda.synchronize()
    torch.testing.assert_close(got[0], eager[0], atol=2e-3, rtol=0)  # + 1.0 fused by inductor
    assert torch.equal(got[1], eager[1]) and torch.equal(out, eager[1])


@pytest.mark.gpu
@requires_gpu
def test_compile_reduce_overhead_cuda_graphs_gpu():
    """torch.compile(mode="reduce-overhead") records the op into CUDA graphs (cudagraph trees) and
    replays it with new lengths."""
    q, k, v, lens = inputs(B=4, Hq=32, Hkv=8, Tq=1, L=4096, D=128, dtype=torch.float16, device="cuda")

    def step(q, k, v, n):
        return ikport.attention(q, k, v, kv_lens=n) * 1.0

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for new in ([4096, 1, 2000, 3333], [17, 4096, 0, 1024], [5, 6, 7, 8], [4096, 4096, 4096, 4096]):
        n = torch.tensor(new, dtype=torch.int32, device="cuda")
        got = compiled(q, k, v, n).clone()
        torch.cuda.synchronize()
        assert torch.equal(got, ikport.attention(q, k, v, kv_lens=n)), new


@pytest.mark.gpu
@requires_gpu
def test_custom_op_inside_cuda_graph_capture_gpu():
    q, k, v, lens = inputs(B=4, Hq=32, Hkv=8, Tq=1, L=4096, D=128, dtype=torch.float16, device="cuda")
    torch.ops.ikport.attention(q, k, v, lens, False, None, None)  # compile and plan outside
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = torch.ops.ikport.attention(q, k, v, lens, False, None, None)
    torch.cuda.current_stream().wait_stream(stream)
    for new in ([4096, 1, 2000, 3333], [17, 4096, 0, 1024]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ikport.attention(q, k, v, kv_lens=lens)), new


@pytest.mark.gpu
@requires_gpu
def test_compiled_function_inside_cuda_graph_capture_gpu():
    q, k, v, lens = inputs(B=2, Hq=16, Hkv=2, Tq=3, L=1500, D=64, dtype=torch.bfloat16, device="cuda")
    kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16, generator=torch.Generator().manual_seed(0))
    f = torch.compile(lambda q, n: ikport.paged_attention(q, kp, vp, bt, n, causal=True),
                      fullgraph=True, backend="aot_eager")
    f(q, lens)  # trace, compile the kernel, plan
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = f(q, lens)
    torch.cuda.current_stream().wait_stream(stream)
    for new in ([1500, 3], [700, 1499]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ikport.paged_attention(q, kp, vp, bt, lens, causal=True)), new


def test_info_lists_every_registered_op(capsys):
    """`python -m ikport info` lists the ops from torch's registry, not from a list of its own:
    the four of ops.py, and one registered anywhere else under ikport::."""
    from ikport.__main__ import main

    lib = torch.library.Library("ikport", "FRAGMENT")
    lib.define("info_probe(Tensor x) -> Tensor")
    try:
        assert main(["info"]) == 0
    finally:
        lib._destroy()
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("torch ops: "))
    assert line == ("torch ops: torch.ops.ikport.attention, torch.ops.ikport.attention_varlen, "
                    "torch.ops.ikport.info_probe, torch.ops.ikport.paged_attention, torch.ops.ikport.w4a16_matmul")
