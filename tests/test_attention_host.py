"""The decode host path on the CPU: a prepared call (_DecodeCall) fills the parameter struct with
the layout's strides once and each call's pointers, scale and causal flag, then launches the split
kernel and, without arrival counters, the separate merge; the CUDA backend's bound launcher hands
the driver the struct's address. Launchers, the stream and the driver call are faked."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

import ikport
from ikport.impl import attention as A
from ikport.kernels import DecodeParams
from ikport.manifest import spec
from ikport.plan import decode as P


class FakeKernel:
    """Stands in for a loaded Kernel: bind() returns a launcher that records copies of its params."""

    def __init__(self, log: list) -> None:
        self.log = log

    def bind(self, grid, block, shared_bytes):
        def launcher(params, stream):
            self.log.append((self, tuple(grid), tuple(block), shared_bytes,
                             DecodeParams.from_buffer_copy(params), stream))
        return launcher


def fake_prepared(log, q, *, splits: int, fused: bool, capacity: int, page_size_log2: int = 0,
                  clustered: bool = False):
    """A plan as the planner finishes one (scratch, counters, the merge launch's shape), with
    fake kernels loaded."""
    B, Hq, Tq, D = q.shape
    problem = P.DecodeProblem("fp16", B, Hq, 2, Tq, D, capacity, (1 << page_size_log2) if page_size_log2 else 0)
    combine = spec("attention_decode", "combine", dtype="fp16", head_dim=D) if splits > 1 and not clustered else None
    plan = P._finish(problem, spec("attention_decode", "naive", dtype="fp16", head_dim=D), (splits, 2, 3), 256,
                     32768, P.Split(splits, -(-capacity // splits)), fused, clustered, combine)
    prepared = object.__new__(A._Prepared)
    prepared.plan, prepared.backend, prepared.device = plan, None, 0
    prepared.main, prepared.combine = FakeKernel(log), FakeKernel(log) if combine else None
    return prepared


@pytest.fixture
def host(monkeypatch):
    monkeypatch.setattr(A, "raw_stream", lambda device: 1234)
    monkeypatch.setattr(A, "capturing", lambda: False)
    monkeypatch.setattr(A, "split_scratch", lambda backend, device, stream, n, in_capture: (0x10000, None))
    counters = {"ptr": 0x20000, "asked": []}

    def split_counters(backend, device, stream, n, in_capture):
        assert in_capture is False
        counters["asked"].append(n)
        return counters["ptr"]

    monkeypatch.setattr(A, "split_counters", split_counters)
    return counters


def tensors(B=3, Hq=8, Hkv=2, Tq=2, L=40, D=64):
    q = torch.randn(B, Hq, Tq, D, dtype=torch.float16)
    big = torch.randn(B, Hkv, L + 8, D, dtype=torch.float16)
    k = big[:, :, :L]  # a slice of a larger cache: strides differ from a contiguous [B, Hkv, L, D]
    v = torch.randn(B, Hkv, L, D, dtype=torch.float16)
    lens = torch.tensor([L, 7, 0], dtype=torch.int32)
    return q, k, v, lens


def test_prepared_call_fills_layout_once_and_pointers_per_call(host):
    log: list = []
    q, k, v, lens = tensors()
    plan = fake_prepared(log, q, splits=4, fused=True, capacity=k.shape[2])
    call = A._DecodeCall(plan, q, k, v, None, None)
    out = call(q, k, v, None, lens, True, 0.125, None)
    assert out.shape == q.shape and out.dtype == q.dtype
    (kern, grid, block, smem, p, stream), = log
    assert (kern, grid, block, smem, stream) == (plan.main, (4, 2, 3), (256, 1, 1), 32768, 1234)
    assert (p.q, p.k, p.v, p.out, p.kv_lens) == (q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                                 out.data_ptr(), lens.data_ptr())
    assert p.block_table is None
    assert (p.q_sb, p.q_sh, p.q_st) == q.stride()[:3]
    assert (p.k_sb, p.k_sh, p.k_st) == k.stride()[:3] != v.stride()[:3]
    assert (p.v_sb, p.v_sh, p.v_st) == v.stride()[:3]
    assert (p.o_sb, p.o_sh, p.o_st) == out.stride()[:3]
    assert (p.batch, p.num_q_heads, p.num_kv_heads, p.q_len) == (3, 8, 2, 2)
    assert (p.kv_capacity, p.num_splits, p.rows_per_split) == (40, 4, 10)
    assert p.causal == 1 and math.isclose(p.scale_log2, 0.125 * math.log2(math.e), rel_tol=1e-6)
    rows = 3 * 8 * 2 * 4
    assert (p.part_out, p.part_lse, p.split_counters) == (0x10000, 0x10000 + rows * 64 * 4, 0x20000)
    assert host["asked"] == [2 * 2 * 3]  # arrived and written per (sequence, KV head, row tile)

    # A second call with other tensors of the same layout: new pointers, the template untouched.
    q2, k2, v2, lens2 = tensors()
    out2 = torch.empty_like(q2)
    call(q2, k2, v2, None, None, False, 0.5, out2)
    p2 = log[-1][4]
    assert (p2.q, p2.k, p2.out, p2.kv_lens, p2.causal) == (q2.data_ptr(), k2.data_ptr(), out2.data_ptr(), None, 0)
    assert call.template.q is None and call.template.scale_log2 == 0.0


def test_without_counters_the_merge_kernel_runs_after(host):
    host["ptr"] = 0  # e.g. while a CUDA graph is captured
    log: list = []
    q, k, v, lens = tensors()
    plan = fake_prepared(log, q, splits=3, fused=True, capacity=k.shape[2])
    A._DecodeCall(plan, q, k, v, None, None)(q, k, v, None, lens, False, 1.0, None)
    assert [entry[0] for entry in log] == [plan.main, plan.combine]
    _, grid, block, smem, p, _ = log[1]
    assert grid == (3 * 8 * 2, 1, 1) and block == (64, 1, 1) and smem == 0  # a block per row
    assert p.split_counters is None and p.part_out == 0x10000


def test_one_split_takes_no_scratch(host, monkeypatch):
    monkeypatch.setattr(A, "split_scratch", lambda *a: pytest.fail("no scratch without split-K"))
    log: list = []
    q, k, v, lens = tensors(Tq=1)
    plan = fake_prepared(log, q, splits=1, fused=True, capacity=k.shape[2])
    A._DecodeCall(plan, q, k, v, None, None)(q, k, v, None, lens, True, 1.0, None)
    (_, _, _, _, p, _), = log
    assert p.part_out is None and p.split_counters is None and p.causal == 0  # one token: no mask


def test_cluster_merge_takes_no_scratch_counters_or_merge_launch(host, monkeypatch):
    monkeypatch.setattr(A, "split_scratch", lambda *a, **kw: pytest.fail("the cluster merges in shared memory"))
    monkeypatch.setattr(A, "split_counters", lambda *a, **kw: pytest.fail("no counters in a cluster"))
    log: list = []
    q, k, v, lens = tensors()
    plan = fake_prepared(log, q, splits=4, fused=False, capacity=k.shape[2], clustered=True)
    A._DecodeCall(plan, q, k, v, None, None)(q, k, v, None, lens, True, 1.0, None)
    (kern, grid, _, _, p, _), = log  # one launch
    assert kern is plan.main and grid == (4, 2, 3) and p.num_splits == 4
    assert p.part_out is None and p.split_counters is None


def test_paged_layout_passes_the_block_table():
    log: list = []
    q = torch.randn(2, 4, 1, 32, dtype=torch.bfloat16)
    pages = torch.randn(10, 2, 16, 32, dtype=torch.bfloat16)
    table = torch.arange(6, dtype=torch.int32).view(2, 3)
    plan = fake_prepared(log, q, splits=1, fused=False, capacity=48, page_size_log2=4)
    call = A._DecodeCall(plan, q, pages, pages, table, None)
    assert call.template.bt_sb == 3 and call.template.page_size_log2 == 4
    assert call.template.k_sb == pages.stride(0)


def test_clear_plans_forgets_prepared_calls():
    A._checked[("sentinel",)] = None
    A._prepared[("sentinel",)] = None
    A.clear_plans()
    assert not A._checked and not A._prepared


def test_cuda_bound_launcher_passes_the_struct_by_address(monkeypatch):
    """CudaBackend.bind_launch hands cuLaunchKernel the fixed grid, block and shared memory, the
    stream, and a one-entry argument array pointing at the very struct of the call."""
    pytest.importorskip("cuda.bindings")  # what CudaBackend() needs
    from ikport.backends import cuda
    seen = []

    def fake_launch(fn, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
        struct_address = ctypes.cast(args, ctypes.POINTER(ctypes.c_void_p))[0]
        seen.append((fn, (gx, gy, gz), (bx, by, bz), smem, stream, extra,
                     bytes(DecodeParams.from_address(struct_address))))
        return 0

    monkeypatch.setattr(cuda, "_launch_kernel", lambda: fake_launch)
    backend = cuda.CudaBackend()
    launch = backend.bind_launch(0xABC, (4, 8, 2), (256, 1, 1), 32768)
    p = DecodeParams(q=0x1000, batch=8, num_splits=4, scale_log2=0.5)
    launch(p, 77)
    assert seen == [(0xABC, (4, 8, 2), (256, 1, 1), 32768, 77, None, bytes(p))]


def test_cuda_launch_failure_names_the_launch(monkeypatch):
    """A driver error from either launcher raises with the error's name and the launch shape."""
    pytest.importorskip("cuda.bindings")  # what CudaBackend() needs
    from ikport.backends import cuda
    invalid_value = int(cuda.CudaBackend()._driver.CUresult.CUDA_ERROR_INVALID_VALUE)
    monkeypatch.setattr(cuda, "_launch_kernel", lambda: lambda *args: invalid_value)
    backend = cuda.CudaBackend()
    # no driver on CPU machines: the error string comes from a stand-in
    monkeypatch.setattr(backend._driver, "cuGetErrorString", lambda err: (0, b"invalid argument"))
    p = DecodeParams(batch=1)
    for launch in (backend.bind_launch(0xABC, (4, 8, 2), (256, 1, 1), 32768),
                   lambda params, stream: backend.launch(0xABC, (4, 8, 2), (256, 1, 1), 32768, params, stream)):
        with pytest.raises(RuntimeError, match=r"cuLaunchKernel grid=\(4, 8, 2\) block=\(256, 1, 1\) "
                                               r"smem=32768 failed: CUDA_ERROR_INVALID_VALUE"):
            launch(p, 77)


def test_paged_gpu_call_checks_the_table_only_with_the_knob(monkeypatch):
    """paged_attention's GPU branch (a prepared call, faked here) launches without reading the
    block table by default; with IKPORT_CHECK_TABLES=1 (read when the layout is first seen) a bad
    id raises before the launch."""
    launched = []

    class FakeCall:
        def __init__(self) -> None:
            self.check_tables = ikport.knobs.check_tables()  # as _DecodeCall reads it

        def __call__(self, *args):
            launched.append(args)
            return "launched"

    def remember(sig, *args):
        call = A._checked[sig] = FakeCall()
        return call

    monkeypatch.setattr(A, "_remember", remember)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    A.clear_plans()
    q = torch.randn(2, 4, 1, 32, dtype=torch.float16)
    pages = torch.randn(4, 2, 16, 32, dtype=torch.float16)
    table = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)  # sequence 1 reads both pages
    lens = torch.tensor([32, 20], dtype=torch.int32)
    try:
        monkeypatch.delenv("IKPORT_CHECK_TABLES", raising=False)
        assert A.paged_attention(q, pages, pages, table, lens) == "launched"
        monkeypatch.setenv("IKPORT_CHECK_TABLES", "1")
        A.clear_plans()
        with pytest.raises(ValueError, match=r"block_table\[1, 1\] = -1 is not a page id"):
            A.paged_attention(q, pages, pages, table, lens)
        assert len(launched) == 1
        short = torch.tensor([32, 16], dtype=torch.int32)  # sequence 1 reads page 0 only
        assert A.paged_attention(q, pages, pages, table, short) == "launched"
    finally:
        A.clear_plans()


@pytest.mark.parametrize("fmt", ["int8", "kivi4"])
def test_compressed_cache_layout_checked_once(monkeypatch, fmt):
    """A compressed cache's decode call whose layout was checked and prepared before (a fake
    prepared call here) launches without the full checks; a layout never seen, or a misaligned
    side tensor, goes through them again."""
    cache = ikport.KVCache(2, 2, 64, 64, kv_format=fmt)
    q = torch.randn(2, 4, 1, 64, dtype=torch.float16)
    args = (cache.k, cache.v, cache.k_scale, cache.v_scale) + ((cache.k_resid, 128) if fmt == "kivi4" else ())
    side = (cache.k_scale, cache.v_scale) + ((cache.k_resid,) if fmt == "kivi4" else ())
    fn = A.int8_attention if fmt == "int8" else A.kivi_attention
    fmt_key = ("int8",) if fmt == "int8" else ("kivi4", 128)
    launched = []

    class FakeCall:
        check_tables = False

        def __call__(self, *call_args):
            launched.append(call_args)
            return "launched"

    def refuse(*a, **kw):
        raise AssertionError("full checks ran")

    A.clear_plans()
    try:
        A._checked[A._signature((*fmt_key, None), q, cache.k, cache.v, *side, None, cache.lens, None)] = FakeCall()
        monkeypatch.setattr(A.checks, "int8_cache", refuse)
        monkeypatch.setattr(A.checks, "kivi_cache", refuse)
        assert fn(q, *args, None, cache.lens) == "launched" and len(launched) == 1
        with pytest.raises(AssertionError, match="full checks"):  # another layout: q of 2 tokens
            fn(torch.randn(2, 4, 2, 64, dtype=torch.float16), *args, None, cache.lens)
        buf = torch.zeros(cache.k_scale.numel() + 1, dtype=cache.k_scale.dtype)
        shifted = buf[1:].view(cache.k_scale.shape)  # the same layout, 4 bytes off alignment
        bad = (cache.k, cache.v, shifted) + args[3:]
        with pytest.raises(AssertionError, match="full checks"):
            fn(q, *bad, None, cache.lens)
    finally:
        A.clear_plans()
