"""The W4A16 host path on the CPU: a checked call layout maps to a prepared call (_W4A16Call) that
holds the plan, a parameter struct with the layout's strides and sizes, and the kernel's bound
launcher; a call fills in the pointers and launches. CPU tensors are routed to a fake GPU backend
here: the kernels, the stream, the scratch and the driver are faked (nothing runs)."""

from __future__ import annotations

import pytest
import torch

import ikport
from ikport.backends.base import DeviceInfo
from ikport.impl import w4a16 as A
from ikport.kernels import W4A16Params
from ikport.plan import w4a16 as P

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "sm_90", 132, 227 * 1024, 32, 50 << 20)


class FakeKernel:
    """Stands in for a loaded Kernel: bind() returns a launcher that records copies of its params."""

    static_shared = 0

    def __init__(self, spec, log: dict) -> None:
        self.spec, self.log = spec, log

    def bind(self, grid, block, shared_bytes):
        self.log["binds"].append((self.spec, tuple(grid), tuple(block), shared_bytes))

        def launcher(params, stream):
            self.log["launches"].append((self.spec, W4A16Params.from_buffer_copy(params), stream))
        return launcher


class FakeBackend:
    name = "fake"

    def device_info(self, device):
        return H100


@pytest.fixture
def gpu(monkeypatch):
    """CPU tensors run the GPU path on a fake device; returns the log of binds, launches and
    scratch requests."""
    log = {"binds": [], "launches": [], "counters": 0x20000, "capturing": False}
    backend = FakeBackend()
    monkeypatch.setattr(A.dispatch, "backend_for", lambda device: None if device.type == "meta" else backend)
    monkeypatch.setattr(A, "get_kernel", lambda spec, backend, dev: FakeKernel(spec, log))
    monkeypatch.setattr(A, "raw_stream", lambda device: 1234)
    monkeypatch.setattr(A, "capturing", lambda: log["capturing"])
    monkeypatch.setattr(A, "split_scratch", lambda backend, dev, stream, n, in_capture: (0x10000, None))
    monkeypatch.setattr(A, "split_counters",
                        lambda backend, dev, stream, n, in_capture: 0 if in_capture else log["counters"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    A.clear_plans()
    yield log
    A.clear_plans()


def weight(n=64, k=256, dtype=torch.float16, **kw):
    return ikport.quantize_weight(torch.randn(n, k) * 0.02, group_size=kw.pop("group_size", 64), method="rtn",
                                  **kw).to(dtype=dtype)


def test_same_layout_reuses_the_prepared_call_with_new_pointers(gpu):
    w = weight(symmetric=False)
    x1, x2 = torch.randn(3, 256, dtype=torch.float16), torch.randn(3, 256, dtype=torch.float16)
    out1 = ikport.w4a16_matmul(x1, w)
    out2 = torch.empty(3, 64, dtype=torch.float16)
    assert ikport.w4a16_matmul(x2, w, out=out2) is out2
    ikport.w4a16_matmul(x1, w)
    assert len(A._checked) == 2  # with and without out=: two layouts
    assert len(gpu["binds"]) == 2 and len(gpu["launches"]) == 3
    plan = A.plan_of(x1, w)
    (spec, grid, block, smem), _ = gpu["binds"]
    assert (spec, grid, block, smem) == (plan.kernel, plan.grid, plan.block, plan.shared_bytes)
    (_, p1, stream), (_, p2, _), (_, p3, _) = gpu["launches"]
    assert stream == 1234 and out1.shape == (3, 64) and out1.dtype == torch.float16
    assert (p1.x, p1.out, p2.x, p2.out, p3.x) == (x1.data_ptr(), out1.data_ptr(), x2.data_ptr(), out2.data_ptr(),
                                                  x1.data_ptr())
    assert (p1.qweight, p1.scales, p1.zeros) == (w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr())
    assert (p1.x_sm, p1.o_sm, p1.m, p1.n, p1.k, p1.packed_k) == (256, 64, 3, 64, 256, 256)
    assert (p1.group_log2, p1.num_splits, p1.chunks_per_split) == (6, plan.num_splits, plan.chunks_per_split)
    call = A._checked[A._signature(x1, w, None, None)]
    assert call.template.x is None and call.template.out is None  # pointers only in the per-call copies


def test_another_shape_dtype_weight_or_options_prepares_another_call(gpu):
    w = weight()
    x = torch.randn(1, 256, dtype=torch.float16)
    ikport.w4a16_matmul(x, w)
    ikport.w4a16_matmul(torch.randn(17, 256, dtype=torch.float16), w)  # M
    ikport.w4a16_matmul(x.bfloat16(), w.to(dtype=torch.bfloat16))  # dtype
    ikport.w4a16_matmul(x, weight(group_size=128))  # group size (same shapes)
    opts = ikport.W4A16Options(variant="gemv")
    ikport.w4a16_matmul(x, w, options=opts)
    ikport.w4a16_matmul(x, weight(), options=ikport.W4A16Options(variant="gemv"))  # equal options, other weight
    assert len(A._checked) == 5 and len(gpu["binds"]) == 5
    specs = [b[0] for b in gpu["binds"]]
    assert specs[0] == A.plan_of(x, w).kernel and specs[4] == A.plan_of(x, w, opts).kernel
    assert specs[2].params != specs[0].params  # bf16
    assert gpu["launches"][3][1].group_log2 == 7


def test_leading_dims_read_in_place_or_copied(gpu):
    w = weight()
    x = torch.randn(2, 3, 256, dtype=torch.float16)
    out = ikport.w4a16_matmul(x, w)
    assert out.shape == (2, 3, 64)
    p = gpu["launches"][-1][1]
    assert (p.x, p.x_sm, p.m, p.o_sm) == (x.data_ptr(), 256, 6, 64)  # a view of x: no copy
    strided = torch.randn(4, 2, 320, dtype=torch.float16)[:, :, :256]  # rows 320 apart
    ikport.w4a16_matmul(strided, w)
    p = gpu["launches"][-1][1]
    assert (p.x, p.x_sm) == (strided.data_ptr(), 320)
    t = torch.randn(3, 2, 256, dtype=torch.float16).transpose(0, 1)  # leading dims do not flatten
    out = ikport.w4a16_matmul(t, w)
    assert out.shape == (2, 3, 64)
    p = gpu["launches"][-1][1]
    assert p.x != t.data_ptr() and p.x_sm == 256 and p.m == 6  # the rows copied, contiguous


def test_act_order_reads_permuted_rows(gpu, monkeypatch):
    w = weight()
    perm = torch.randperm(256)
    w = ikport.Int4Weight(w.qweight, w.scales, None, w.group_size, 256, 64, w.layout, perm)
    x = torch.randn(2, 256, dtype=torch.float16)
    seen = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, d, i: seen.append((t, d, i)) or real(t, d, i))
    ikport.w4a16_matmul(x, w)
    ikport.w4a16_matmul(x, w)
    assert len(seen) == 2 and seen[0][1] == 1 and seen[0][2] is perm  # per call: x changes
    p = gpu["launches"][-1][1]
    assert p.x != x.data_ptr() and p.x_sm == 256


def test_split_k_scratch_and_counters_eager_and_captured(gpu):
    w = weight(n=32, k=4096, group_size=128)  # one column block: split K
    x = torch.randn(1, 4096, dtype=torch.float16)
    plan = A.plan_of(x, w)
    assert plan.num_splits > 1
    ikport.w4a16_matmul(x, w)
    p = gpu["launches"][-1][1]
    assert (p.partials, p.tile_counters, p.num_splits) == (0x10000, 0x20000, plan.num_splits)
    gpu["capturing"] = True  # a graph capture: no shared counters, zeroed ones made inside it
    ikport.w4a16_matmul(x, w)
    p = gpu["launches"][-1][1]
    assert p.partials == 0x10000 and p.tile_counters not in (None, 0x20000)


def test_dense_plan_dequantizes_then_multiplies(gpu, monkeypatch):
    w = weight()
    x = torch.randn(P.DENSE_MIN_M, 256, dtype=torch.float16)
    products = []
    monkeypatch.setattr(torch, "matmul", lambda a, b, out: products.append((a, b, out)))
    out = ikport.w4a16_matmul(x, w)
    (spec, grid, block, smem), = gpu["binds"]
    plan = A.plan_of(x, w)
    assert plan.dense and spec == plan.kernel and smem == 0
    (_, p, _), = gpu["launches"]
    assert p.x is None and (p.x_sm, p.o_sm, p.m, p.n, p.k, p.num_splits) == (0, 256, 0, 64, 256, 1)
    (a, b, o), = products
    assert a.data_ptr() == x.data_ptr() and b.shape == (256, 64) and b.T.data_ptr() == p.out and o is out


def test_no_rows_no_launch(gpu):
    out = ikport.w4a16_matmul(torch.randn(0, 256, dtype=torch.float16), weight())
    assert out.shape == (0, 64) and not gpu["launches"] and not gpu["binds"]


def test_misaligned_x_raises_on_a_prepared_layout(gpu):
    w = weight()
    buf = torch.randn(2 * 256 + 8, dtype=torch.float16)
    ikport.w4a16_matmul(buf[:512].view(2, 256), w)
    ikport.w4a16_matmul(buf[8:520].view(2, 256), w)  # same layout, 16 bytes on: fine
    with pytest.raises(ValueError, match="16-byte aligned"):
        ikport.w4a16_matmul(buf[1:513].view(2, 256), w)  # same layout, 2 bytes on
    assert len(gpu["launches"]) == 2 and len(A._checked) == 1


def test_linear_forward_reaches_the_prepared_call(gpu):
    lin = torch.nn.Linear(256, 64, bias=True).half()
    layer = ikport.nn.W4A16Linear.from_linear(lin, method="rtn")
    x = torch.randn(2, 5, 256, dtype=torch.float16)
    y = layer(x)
    layer(x)
    assert y.shape == (2, 5, 64) and len(gpu["binds"]) == 1 and len(gpu["launches"]) == 2
    p = gpu["launches"][0][1]
    assert (p.x, p.m, p.qweight) == (x.data_ptr(), 10, layer.qweight.data_ptr())


def test_clear_plans_forgets_prepared_calls():
    A._checked[("sentinel",)] = None
    A._plans[("sentinel",)] = None
    A.clear_plans()
    assert not A._checked and not A._plans
