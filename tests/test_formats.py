"""ikport.formats on the CPU: GPTQ (v1 and v2 zero points, act-order g_idx) and AutoAWQ GEMM
checkpoints -> Int4Weight.

Each checkpoint is built here by a small packer written from the format's documented bit layout
(AutoGPTQ's QuantLinear.pack, GPTQModel's v2 -> v1 qzeros conversion, AutoAWQ's
WQLinear_GEMM.from_linear), never by inverting ikport's converter; the result must dequantize to
w = (q - z) * s computed directly from the codes.
"""

from __future__ import annotations

import pytest
import torch

from ikport import formats

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble j of word i holds column 8i + AWQ_ORDER[j]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_qweight(codes_nk: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> qweight int32 [K // 8, N]: row i holds input channels 8i + j at bits 4j."""
    q = codes_nk.T.to(torch.int64)  # [K, N]
    k, n = q.shape
    words = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(k // 8):
        for j in range(8):
            words[i] |= q[8 * i + j] << (4 * j)
    return _to_int32(words)


def pack_along_n(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[R, N] ints 0..15 -> [R, N // 8] words: nibble j of word c holds column 8c + order[j]."""
    r, n = values.shape
    v = values.to(torch.int64)
    words = torch.zeros(r, n // 8, dtype=torch.int64)
    for c in range(n // 8):
        for j in range(8):
            words[:, c] |= v[:, 8 * c + order[j]] << (4 * j)
    return words


def gptq_qzeros_v1(z: torch.Tensor) -> torch.Tensor:
    """Zero points [G, N] -> v1 qzeros: the v2 words (z itself) minus 0x11111111 per word, as
    GPTQModel writes v1 (a z of 0 borrows from the next nibble)."""
    return _to_int32(pack_along_n(z, list(range(8))) - 0x11111111)


def gptq_qzeros_v2(z: torch.Tensor) -> torch.Tensor:
    return _to_int32(pack_along_n(z, list(range(8))))


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    return _to_int32(pack_along_n(values, AWQ_ORDER))


def _case(n: int, k: int, g: int, seed: int, zero_low: int = 1):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(zero_low, 16, (k // g, n), generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).half()
    return codes, zeros, scales


def _direct(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
            group_of_k: torch.Tensor) -> torch.Tensor:
    """w[n, k] = (q[n, k] - z[group(k), n]) * s[group(k), n], float32."""
    return (codes.float() - zeros[group_of_k].T.float()) * scales[group_of_k].T.float()


@pytest.mark.parametrize("layout", ["nv_m16n8k16", "amd_mfma16", "amd_wmma16_w32"])
def test_gptq_v1_round_trip(layout):
    n, k, g = 48, 384, 128
    codes, zeros, scales = _case(n, k, g, seed=1)
    w = formats.from_gptq(gptq_qweight(codes), gptq_qzeros_v1(zeros), scales, layout=layout)
    assert w.layout == layout and w.group_size == g and w.perm is None and w.zeros is not None
    assert torch.equal(w.codes(), codes)
    groups = torch.arange(k) // g
    assert torch.equal(w.dequantize(), _direct(codes, zeros, scales, groups))


def test_gptq_v1_zero_point_zero_wraps():
    """z = 0 is stored as -1: nibble 15 plus a borrow from the next nibble; both undone."""
    n, k, g = 16, 128, 32
    codes, zeros, scales = _case(n, k, g, seed=2, zero_low=0)
    zeros[:, ::3] = 0  # plenty of z = 0, including neighbours of other zero points
    zeros[0, :8] = torch.tensor([0, 0, 15, 0, 1, 0, 15, 0])
    qz = gptq_qzeros_v1(zeros)
    assert ((qz[0, 0].item() & 0xF) == 0xF)  # the stored nibble really wrapped
    w = formats.from_gptq(gptq_qweight(codes), qz, scales)
    assert torch.equal(w.zeros, zeros.half())
    assert torch.equal(w.dequantize(), _direct(codes, zeros, scales, torch.arange(k) // g))


def test_gptq_symmetric_and_v2():
    n, k, g = 32, 256, 64
    codes, _, scales = _case(n, k, g, seed=3)
    eights = torch.full((k // g, n), 8)
    w = formats.from_gptq(gptq_qweight(codes), gptq_qzeros_v1(eights), scales)
    assert w.zeros is None  # all zero points 8: the symmetric path
    assert torch.equal(w.dequantize(), (codes.float() - 8) * scales.float().repeat_interleave(g, 0).T)
    _, zeros, _ = _case(n, k, g, seed=4, zero_low=0)
    v2 = formats.from_gptq(gptq_qweight(codes), gptq_qzeros_v2(zeros), scales,
                           checkpoint_format="gptq_v2")
    assert torch.equal(v2.dequantize(), _direct(codes, zeros, scales, torch.arange(k) // g))
    # per-channel (one group) and bfloat16 scales
    pc = formats.from_gptq(gptq_qweight(codes), gptq_qzeros_v1(eights[:1]), scales[:1].bfloat16())
    assert pc.group_size == k and pc.dtype == torch.bfloat16


def test_gptq_act_order():
    n, k, g = 32, 256, 64
    codes, zeros, scales = _case(n, k, g, seed=5)
    gen = torch.Generator().manual_seed(6)
    g_idx = (torch.randperm(k, generator=gen) // g).to(torch.int32)  # desc_act: non-monotonic
    w = formats.from_gptq(gptq_qweight(codes), gptq_qzeros_v1(zeros), scales, g_idx)
    assert w.perm is not None
    assert torch.equal(g_idx[w.perm].long(), torch.arange(k) // g)  # sorted groups
    ref = _direct(codes, zeros, scales, g_idx.long())
    assert torch.equal(w.dequantize(), ref)
    x = torch.randn(4, k, dtype=torch.float64)
    sorted_w = (w.codes().float() - w.zeros.float().repeat_interleave(g, 0).T) \
        * w.scales.float().repeat_interleave(g, 0).T
    # what the kernel computes with the permutation equals the checkpoint's product
    torch.testing.assert_close(x[:, w.perm] @ sorted_w.double().T, x @ ref.double().T)
    # a sequential g_idx is no permutation
    seq = formats.from_gptq(gptq_qweight(codes), gptq_qzeros_v1(zeros), scales,
                            (torch.arange(k) // g).to(torch.int32))
    assert seq.perm is None


def test_gptq_errors():
    n, k, g = 32, 256, 64
    codes, zeros, scales = _case(n, k, g, seed=7)
    qw, qz = gptq_qweight(codes), gptq_qzeros_v1(zeros)
    with pytest.raises(ValueError, match="bits=4"):
        formats.from_gptq(qw, qz, scales, bits=8)
    with pytest.raises(ValueError, match="checkpoint_format"):
        formats.from_gptq(qw, qz, scales, checkpoint_format="gptq_v3")
    with pytest.raises(TypeError, match="qweight must be int32"):
        formats.from_gptq(qw.long(), qz, scales)
    with pytest.raises(ValueError, match="qzeros must have shape"):
        formats.from_gptq(qw, qz[:, :2], scales)
    with pytest.raises(ValueError, match="scales must have shape"):
        formats.from_gptq(qw, qz, scales[:2])
    with pytest.raises(ValueError, match="K % 32 .*K=40"):
        formats.from_gptq(qw[:5], qz[:1], scales[:1])  # K = 40
    c384, z2, s2 = _case(n, 384, 192, seed=11)  # K = 384 in 2 groups of 192: not a group size
    with pytest.raises(ValueError, match="group_size"):
        formats.from_gptq(gptq_qweight(c384), gptq_qzeros_v1(z2), s2)
    bad = (torch.arange(k) // g).to(torch.int32)
    bad[0] = 1  # group 1 now holds g + 1 channels
    with pytest.raises(ValueError, match="exactly group_size=64"):
        formats.from_gptq(qw, qz, scales, bad)
    with pytest.raises(ValueError, match=r"g_idx values"):
        formats.from_gptq(qw, qz, scales, torch.full((k,), 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"g_idx must have shape"):
        formats.from_gptq(qw, qz, scales, torch.zeros(k - 1, dtype=torch.int32))


@pytest.mark.parametrize("layout", ["nv_m16n8k16", "amd_mfma16"])
def test_awq_round_trip(layout):
    n, k, g = 48, 256, 128
    codes, zeros, scales = _case(n, k, g, seed=8, zero_low=0)
    qweight = awq_pack(codes.T)  # [K, N // 8], packed along N
    w = formats.from_awq(qweight, awq_pack(zeros), scales, layout=layout)
    assert w.layout == layout and w.perm is None
    assert torch.equal(w.codes(), codes)
    assert torch.equal(w.dequantize(), _direct(codes, zeros, scales, torch.arange(k) // g))


def test_awq_interleave_is_not_sequential():
    """A checkpoint packed without the AWQ interleave must not read back as the same weight."""
    n, k, g = 16, 128, 128
    codes, zeros, scales = _case(n, k, g, seed=9, zero_low=0)
    plain = _to_int32(pack_along_n(codes.T, list(range(8))))
    w = formats.from_awq(plain, awq_pack(zeros), scales)
    assert not torch.equal(w.codes(), codes)
    assert formats.AWQ_ORDER == tuple(AWQ_ORDER)


def test_awq_errors():
    n, k, g = 32, 256, 128
    codes, zeros, scales = _case(n, k, g, seed=10, zero_low=0)
    qw, qz = awq_pack(codes.T), awq_pack(zeros)
    with pytest.raises(ValueError, match="qzeros must have shape"):
        formats.from_awq(qw, qz[:, :1], scales)
    with pytest.raises(ValueError, match="scales must have shape"):
        formats.from_awq(qw, qz, scales[:, :16])
    with pytest.raises(TypeError, match="scales must be float16"):
        formats.from_awq(qw, qz, scales.to(torch.int32))
    with pytest.raises(ValueError, match="N % 16"):
        formats.from_awq(qw[:, :1], qz[:, :1], scales[:, :8])  # N = 8
    with pytest.raises(ValueError, match="groups fit no group size"):
        formats.from_awq(qw, torch.cat([qz, qz, qz]), torch.cat([scales, scales, scales]))
