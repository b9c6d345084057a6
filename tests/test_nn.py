"""ikport.nn on the CPU: W4A16Linear construction, forward (CPU reference path), state dicts across
layouts, device-move repacking, and quantize_model."""

from __future__ import annotations

import io
import logging
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from ikport.int4 import quantize_weight
from ikport.nn import W4A16Linear, quantize_model


def _linear(k: int, n: int, bias: bool = True, seed: int = 0, dtype=torch.float16) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def _round_trip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_matches_dequantized_reference(dtype):
    lin = _linear(256, 48, dtype=dtype)
    layer = W4A16Linear.from_linear(lin, group_size=64)
    x = torch.randn(2, 3, 256, dtype=dtype)
    y = layer(x)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    w = layer.weight_int4.dequantize()
    ref = x.float() @ w.T + lin.bias.float()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="in_features=256"):
        layer(torch.randn(3, 128, dtype=dtype))


def test_from_linear_fields():
    lin = _linear(256, 32, dtype=torch.float32)
    layer = W4A16Linear.from_linear(lin, group_size=None, symmetric=False)
    assert (layer.in_features, layer.out_features, layer.group_size) == (256, 32, 256)
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.float16
    assert layer.zeros is not None and layer.perm is None and layer.layout == "nv_m16n8k16"
    assert not layer.bias.requires_grad
    w = layer.weight_int4
    assert w is layer.weight_int4  # cached while the buffers stay the same objects
    assert w.qweight is layer.qweight
    r = repr(layer)
    assert "group_size=256" in r and "layout='nv_m16n8k16'" in r and "symmetric=False" in r
    assert set(dict(layer.named_buffers())) == {"qweight", "scales", "zeros"}


def test_weight_int4_follows_every_way_a_buffer_changes():
    """The cache forward reads: a new buffer object (attribute, or straight into _buffers as
    accelerate's loaders do), a dropped zeros or a new group size each give a new Int4Weight."""
    layer = W4A16Linear.from_linear(_linear(256, 32), group_size=64, symmetric=False)
    w = layer.weight_int4
    layer.scales = layer.scales.clone()
    assert layer.weight_int4 is not w and layer.weight_int4.scales is layer.scales
    w = layer.weight_int4
    layer._buffers["qweight"] = layer.qweight.clone()
    assert layer.weight_int4 is not w and layer.weight_int4.qweight is layer.qweight
    w = layer.weight_int4
    layer.zeros = None
    assert layer.weight_int4 is not w and layer.weight_int4.zeros is None
    w = layer.weight_int4
    layer.group_size, layer.scales = 128, layer.scales[::2].clone()
    assert layer.weight_int4.group_size == 128 and layer.weight_int4 is layer.weight_int4


def test_forward_bias_and_leading_dims():
    """Bias added after the product (in place, or promoted where it was recast by hand), any
    leading dims, 1-D x."""
    lin = _linear(256, 32)
    layer = W4A16Linear.from_linear(lin, group_size=64)
    w = layer.weight_int4.dequantize()
    x = torch.randn(2, 3, 256, dtype=torch.float16)
    ref = ((x.float() @ w.T).half() + lin.bias.half())
    assert torch.equal(layer(x), ref)
    assert torch.equal(layer(x[0, 0]), ref[0, 0])
    layer.bias.data = layer.bias.data.float()
    y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, (x.float() @ w.T).half() + layer.bias)


def test_from_gptq_awq_int4():
    n, k, g = 32, 256, 128
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(k // g, n) * 0.01 + 0.001).half()
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qweight |= codes.T[j::8].long() << (4 * j)
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).int()
    qzeros = torch.full((k // g, n // 8), 0x77777777, dtype=torch.int32)  # v1: z = 7 + 1 = 8
    bias = torch.randn(n)
    layer = W4A16Linear.from_gptq(qweight, qzeros, scales, bias=bias)
    assert layer.zeros is None and layer.bias.dtype == torch.float16
    assert torch.equal(layer.weight_int4.codes(), codes)
    awq = W4A16Linear.from_awq(torch.zeros(k, n // 8, dtype=torch.int32),
                               torch.zeros(k // g, n // 8, dtype=torch.int32), scales,
                               layout="amd_mfma16")
    assert awq.layout == "amd_mfma16" and awq.bias is None and awq.zeros is not None
    w = quantize_weight(torch.randn(n, k).half())
    assert W4A16Linear.from_int4(w).weight_int4.qweight is w.qweight
    with pytest.raises(ValueError, match="bias"):
        W4A16Linear.from_int4(w, torch.zeros(n + 1))
    with pytest.raises(TypeError, match="Int4Weight"):
        W4A16Linear.from_int4(codes)  # type: ignore[arg-type]


@pytest.mark.parametrize("symmetric", [True, False])
def test_state_dict_round_trip(symmetric):
    layer = W4A16Linear.from_linear(_linear(256, 64), group_size=64, symmetric=symmetric)
    sd = _round_trip(layer.state_dict())
    assert sd["_extra_state"]["layout"] == "nv_m16n8k16" and sd["_extra_state"]["group_size"] == 64
    # an empty layer built with other defaults (group 128, symmetric) takes the checkpoint's shape
    fresh = W4A16Linear(256, 64, bias=True)
    fresh.load_state_dict(sd)
    assert fresh.group_size == 64 and (fresh.zeros is None) == symmetric
    for name in ("qweight", "scales", "zeros", "bias"):
        a, b = getattr(layer, name), getattr(fresh, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert torch.equal(fresh.weight_int4.dequantize(), layer.weight_int4.dequantize())


def test_state_dict_act_order_and_strictness():
    n, k, g = 32, 256, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qweight |= codes.T[j::8].long() << (4 * j)
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).int()
    g_idx = (torch.randperm(k) // g).int()
    scales = (torch.rand(k // g, n) * 0.01 + 0.001).half()
    layer = W4A16Linear.from_gptq(qweight, torch.full((k // g, n // 8), 0x77777777, dtype=torch.int32),
                                  scales, g_idx)
    assert layer.perm is not None
    fresh = W4A16Linear(k, n, group_size=g)
    fresh.load_state_dict(_round_trip(layer.state_dict()))
    assert torch.equal(fresh.perm, layer.perm)
    assert torch.equal(fresh.weight_int4.dequantize(), layer.weight_int4.dequantize())
    with pytest.raises(RuntimeError, match="in_features"):
        W4A16Linear(384, n, group_size=g).load_state_dict(layer.state_dict())


def test_state_dict_from_another_layout_repacks():
    base = W4A16Linear.from_linear(_linear(384, 48), group_size=128, symmetric=False)
    amd = W4A16Linear.from_int4(base.weight_int4.with_layout("amd_mfma16"), base.bias)
    assert amd.layout == "amd_mfma16" and not torch.equal(amd.qweight, base.qweight)
    sd = _round_trip(amd.state_dict())
    assert sd["_extra_state"]["layout"] == "amd_mfma16"
    cpu = W4A16Linear(384, 48, bias=True)  # a CPU module: nv_m16n8k16
    cpu.load_state_dict(sd)
    assert cpu.layout == "nv_m16n8k16"
    assert torch.equal(cpu.qweight, base.qweight)  # repacked, not copied bit for bit
    assert torch.equal(cpu.weight_int4.dequantize(), base.weight_int4.dequantize())


def test_device_move_repacks_and_dtype_casts():
    base = W4A16Linear.from_linear(_linear(256, 32), group_size=128)
    wmma = W4A16Linear.from_int4(base.weight_int4.with_layout("amd_wmma16_w32"), base.bias)
    out = wmma.to("cpu")  # the CPU wants nv_m16n8k16: repacked at move time
    assert out is wmma and wmma.layout == "nv_m16n8k16" and torch.equal(wmma.qweight, base.qweight)
    wmma.to(torch.bfloat16)
    assert wmma.scales.dtype == torch.bfloat16 and wmma.bias.dtype == torch.bfloat16
    assert wmma.qweight.dtype == torch.int32 and wmma.weight_int4.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        wmma.float()
    assert wmma.scales.dtype == torch.bfloat16 and wmma.bias.dtype == torch.bfloat16  # left valid
    wmma.half()
    assert wmma.weight_int4.dtype == torch.float16


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(256, 128)
        self.down = nn.Linear(128, 256, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_quantize_model(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        block=_Block(),
        odd=nn.Linear(256, 200),       # N % 16 != 0: kept, warned
        odd_k=nn.Linear(200, 256),     # K % 32 != 0: kept, warned
        lm_head=nn.Linear(256, 64),    # excluded by name
    )).half()
    ref_model = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear)}
    with caplog.at_level(logging.WARNING, logger="ikport"), pytest.warns(UserWarning) as seen:
        out = quantize_model(model, group_size=64)
    assert [str(w.message) for w in seen] == [(
        "quantize_model kept 2 nn.Linear layer(s) in floating point, their shape does not fit the "
        "INT4 layouts: odd: out_features 200 is not a multiple of 16; odd_k: in_features 200 is not "
        "a multiple of 32")]
    assert seen[0].filename == __file__  # points at the caller's line
    assert out is model
    assert isinstance(model.block.up, W4A16Linear) and isinstance(model.block.down, W4A16Linear)
    assert model.block.up.bias is not None and model.block.down.bias is None
    assert model.block.up.group_size == 64
    for name in ("odd", "odd_k", "lm_head"):
        assert type(getattr(model, name)) is nn.Linear
    warned = [r.getMessage() for r in caplog.records if r.name == "ikport"]
    assert len(warned) == 1 and "odd (200x256)" in warned[0] and "odd_k (256x200)" in warned[0]
    assert "lm_head" not in warned[0]
    w = model.block.up.weight_int4.dequantize()
    assert float((w - ref_model["block.up"].float()).norm() / ref_model["block.up"].float().norm()) < 0.15
    x = torch.randn(2, 256, dtype=torch.float16)
    h = torch.relu(x.float() @ model.block.up.weight_int4.dequantize().T + model.block.up.bias.float())
    h = h.half().float() @ model.block.down.weight_int4.dequantize().T
    torch.testing.assert_close(model.block(x).float(), h, rtol=2e-2, atol=2e-2)
    assert model(x).shape == (2, 64)


class _TailBlock(nn.Module):
    """SmolLM2-like widths scaled down: K = 96 and 160 are multiples of 32, not of 128."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(96, 160)
        self.up = nn.Linear(96, 32, bias=False)
        self.down = nn.Linear(160, 96)

    def forward(self, x):
        return self.down(self.q(x)) + self.up(x).sum(-1, keepdim=True)


@pytest.mark.parametrize("group_size,symmetric", [(128, True), (64, False), (32, True), (None, False)],
                         ids=["g128-per-channel-at-96", "g64-asym-ragged", "g32", "per-channel-asym"])
def test_quantize_model_k_tails(group_size, symmetric):
    """in_features 96 and 160 (not multiples of 128) are quantized now: padded storage, a shorter
    last group where G does not divide K, and the same outputs as the dequantized reference."""
    torch.manual_seed(1)
    model = _TailBlock().half()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is kept in floating point
        quantize_model(model, group_size=group_size, symmetric=symmetric, exclude=())
    for name, k in (("q", 96), ("up", 96), ("down", 160)):
        layer = getattr(model, name)
        assert isinstance(layer, W4A16Linear) and layer.in_features == k
        assert layer.qweight.shape == (layer.out_features, -(-k // 128) * 16)  # K rounded up to 128
        g = layer.group_size
        assert g == (k if group_size is None or group_size >= k else group_size)
        assert layer.scales.shape == (-(-k // g), layer.out_features)
    assert model.down.group_size == (160 if group_size is None else group_size)  # 128: 128 + 32
    x = torch.randn(3, 96, dtype=torch.float16)
    wq, wu, wd = (getattr(model, n).weight_int4.dequantize() for n in ("q", "up", "down"))
    h = (x.float() @ wq.T + model.q.bias.float()).half().float()
    ref = (h @ wd.T + model.down.bias.float()).half().float() + (x.float() @ wu.T).half().float().sum(-1, True)
    torch.testing.assert_close(model(x).float(), ref, rtol=2e-2, atol=2e-2)
    # the state dict round-trips (padded qweight, ragged scales)
    fresh = _TailBlock().half()
    quantize_model(fresh, group_size=group_size, symmetric=symmetric, exclude=())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_quantize_model_warning_names_the_first_few():
    """Many unsupported layers: the warning gives the count and the first five with the reason;
    the "ikport" logger names them all."""
    model = nn.Sequential(*[nn.Linear(100 + i, 24) for i in range(7)], nn.Linear(128, 16))
    with pytest.warns(UserWarning, match="kept 7 nn.Linear") as seen:
        quantize_model(model, exclude=())
    msg = str(seen[0].message)
    assert ("0: out_features 24 is not a multiple of 16 and in_features 100 is not a multiple of "
            "32") in msg
    assert "4: out_features 24" in msg and "5: " not in msg
    assert msg.endswith("; and 2 more (IKPORT_LOG=warning lists them all)")
    assert isinstance(model[7], W4A16Linear)


def test_quantize_model_patterns():
    def make():
        return nn.ModuleDict({"a": _Block(), "b": _Block(), "mha": nn.MultiheadAttention(128, 4)})

    m = quantize_model(make(), exclude=("*.down",))  # fnmatch on the qualified name
    assert isinstance(m.a.up, W4A16Linear) and isinstance(m.a.down, nn.Linear)
    assert type(m.mha.out_proj) is not W4A16Linear  # MultiheadAttention reads .weight itself
    m = quantize_model(make(), exclude="b.")  # a plain string: substring of the name
    assert isinstance(m.a.down, W4A16Linear) and type(m.b.up) is nn.Linear
    m = quantize_model(make(), exclude=())
    assert isinstance(m.b.down, W4A16Linear)
    single = quantize_model(nn.Linear(128, 16), exclude=())
    assert isinstance(single, W4A16Linear)
    # quantizing twice is a no-op for layers already converted
    again = quantize_model(m, exclude=())
    assert again.a.up is m.a.up


def test_constructor_validation():
    with pytest.raises(ValueError, match="W4A16Linear: .*K % 32 .*in_features K=100 .*nearest that work: 96 or 128"):
        W4A16Linear(100, 32)
    with pytest.raises(ValueError, match="group_size"):
        W4A16Linear(256, 32, group_size=48)
    with pytest.raises(TypeError, match="float16 or torch.bfloat16"):
        W4A16Linear(256, 32, dtype=torch.float32)
    for bad in (0, "x", 64.0, True, 512):  # (once: 0 divided by zero, "x" failed in int())
        with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\)"):
            W4A16Linear(256, 32, group_size=bad)
    layer = W4A16Linear(256, 32, bias=True, group_size=-1, symmetric=False, act_order=True,
                        dtype=torch.bfloat16)
    assert layer.group_size == 256 and layer.zeros is not None and layer.perm is not None
    assert layer.weight_int4.dtype == torch.bfloat16


def test_reachable_from_the_package():
    """`import ikport` is enough for the names the README uses."""
    import ikport

    assert ikport.nn.W4A16Linear is W4A16Linear
    assert callable(ikport.nn.quantize_model) and callable(ikport.formats.from_gptq)


def test_quantize_model_method():
    """method= reaches quantize_weight for every layer; a bad value raises before any swap."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(block=_Block(), lm_head=nn.Linear(256, 64))).half()
    weights = {"block.up": model.block.up.weight.detach().clone(),
               "block.down": model.block.down.weight.detach().clone()}
    with pytest.raises(ValueError, match=r"method must be one of \('rtn', 'mse'\)"):
        quantize_model(model, method="gptq")
    assert type(model.block.up) is nn.Linear  # untouched
    quantize_model(model, group_size=64, symmetric=False, method="mse")
    for name, w in weights.items():
        want = quantize_weight(w, 64, symmetric=False, method="mse")
        got = model.get_submodule(name).weight_int4
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
        assert torch.equal(got.zeros, want.zeros)
    rtn = W4A16Linear.from_linear(_linear(256, 32), group_size=128, method="rtn")
    assert torch.equal(rtn.weight_int4.qweight, quantize_weight(_linear(256, 32).weight, 128, method="rtn").qweight)
    single = quantize_model(_linear(256, 32), method="mse")
    assert torch.equal(single.weight_int4.scales, quantize_weight(_linear(256, 32).weight, method="mse").scales)
