"""W4A16 on the CPU: the reference path, input checks, the custom op, launch configurations."""

import pytest
import torch

import ikport
from ikport import W4A16Options, checks, int4
from ikport.backends.base import DeviceInfo
from ikport.plan import w4a16 as W
from ikport.backends.target import ARCH_TABLE, Target


def weight(n=128, k=256, dtype=torch.float16, **kw):
    g = torch.Generator().manual_seed(n + k)
    return ikport.quantize_weight(torch.randn(n, k, generator=g).to(dtype), **kw)


def test_cpu_path_is_the_dequantized_product():
    wq = weight(group_size=64, symmetric=False)
    x = torch.randn(3, 256, dtype=torch.float16)
    ref = (x.float() @ wq.dequantize().T).half()
    assert torch.equal(ikport.w4a16_matmul(x, wq), ref)
    out = torch.empty(3, 128, dtype=torch.float16)
    assert ikport.w4a16_matmul(x, wq, out=out) is out and torch.equal(out, ref)
    # fp32 activations are fine on the CPU (the reference computes in fp32 anyway)
    assert ikport.w4a16_matmul(x.float(), wq).dtype == torch.float32


def test_quantized_product_is_close_to_the_float_one():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=g)
    x = torch.randn(4, 1024, generator=g)
    y = ikport.w4a16_matmul(x, ikport.quantize_weight(w.half()))
    rel = ((y - x @ w.T).norm() / (x @ w.T).norm()).item()
    assert 0.01 < rel < 0.15  # INT4 g128 quantization error, not an exact product


def test_checks_name_the_problem():
    wq = weight()
    with pytest.raises(TypeError, match="Int4Weight"):
        ikport.w4a16_matmul(torch.randn(2, 256), torch.randn(128, 256))
    with pytest.raises(ValueError, match="in_features 256"):
        ikport.w4a16_matmul(torch.randn(2, 255), wq)
    with pytest.raises(TypeError, match="not supported"):
        ikport.w4a16_matmul(torch.randn(2, 256).to(torch.int32), wq)
    with pytest.raises(ValueError, match="out must be"):
        ikport.w4a16_matmul(torch.randn(2, 256), wq, out=torch.empty(2, 127))
    with pytest.raises(ValueError, match="unknown variant"):
        ikport.W4A16Options(variant="turbo")
    with pytest.raises(TypeError, match="options must be an ikport.W4A16Options"):
        ikport.w4a16_matmul(torch.randn(2, 256, dtype=torch.float16), wq, options=ikport.DecodeOptions())
    # the GPU's own limits, checked without a GPU
    with pytest.raises(TypeError, match="scales are"):
        checks.w4a16(torch.randn(2, 256, dtype=torch.bfloat16), wq, None, gpu=True)
    with pytest.raises(TypeError, match="not supported"):
        checks.w4a16(torch.randn(2, 256), wq, None, gpu=True)


def test_custom_op_and_compile():
    wq = weight(symmetric=False)
    x = torch.randn(5, 256, dtype=torch.float16)
    torch.library.opcheck(
        torch.ops.ikport.w4a16_matmul.default,
        (x, wq.qweight, wq.scales, wq.zeros, wq.perm, wq.group_size, 256, 128, wq.layout, None))
    f = torch.compile(lambda t: ikport.w4a16_matmul(t, wq), fullgraph=True, backend="eager")
    assert torch.equal(f(x), ikport.w4a16_matmul(x, wq))


@pytest.mark.parametrize("shape", [(1, 4096, 4096), (1, 14336, 4096), (1, 4096, 14336), (16, 4096, 4096),
                                   (1, 16, 128), (3, 48, 256), (128, 4096, 4096)])
def test_grid_fills_the_gpu(shape):
    M, N, K = shape
    cfg = W.tiles(m=M, n=N, k=K, chunk_k=64, sm_count=132)
    chunks = K // 64
    assert cfg.num_splits * cfg.chunks_per_split >= chunks > (cfg.num_splits - 1) * cfg.chunks_per_split
    col_blocks = -(-N // (16 * cfg.n_tiles))
    row_blocks = -(-M // (16 * cfg.m_tiles))
    assert cfg.grid == (col_blocks, cfg.num_splits, row_blocks)
    assert cfg.warps == W.WARPS
    target = W.WARPS_PER_SM * 132
    warps = col_blocks * row_blocks * cfg.warps
    if cfg.num_splits > 1:  # split K across blocks only as far as the target needs
        assert warps * (cfg.num_splits - 1) < target
        assert cfg.chunks_per_split >= W.MIN_CHUNKS_PER_WARP * cfg.warps
    capped = chunks // (W.MIN_CHUNKS_PER_WARP * cfg.warps) <= cfg.num_splits
    assert warps * cfg.num_splits >= target or capped


def test_llama_shapes_on_an_h100():
    """The choices the H100 sweep found best or tied (docs/results/w4a16.md, v7): 8 warps, no
    split, at W1-W3 for M = 1..32; a narrow weight still splits K."""
    def pick(m, n, k):
        return W.tiles(m=m, n=n, k=k, chunk_k=64, sm_count=132)

    for m in (1, 16, 32):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):  # W1, W2, W3
            assert (pick(m, n, k).warps, pick(m, n, k).num_splits) == (8, 1), (m, n, k)
    assert pick(1, 1024, 4096).num_splits > 1


def test_ring_stages_stay_within_32_kb():
    """4 slots a lane, fewer where the weight ring (slots x column tiles x block lanes x 16 B) would
    pass 32 KB: CDNA's 8 waves of 64 get 2 (the kernel caps STAGES the same way)."""
    assert W.stages(256, 2) == 4  # NVIDIA, 8 warps
    assert W.stages(512, 2) == 2  # CDNA, 8 waves
    assert W.stages(128, 4) == 4
    pinned = W4A16Options(stages=8)
    assert W.stages(128, 2, pinned) == 8 and W.stages(256, 2, pinned) == 4


@pytest.mark.parametrize("M,m_tiles,row_blocks", [(1, 1, 1), (16, 1, 1), (17, 2, 1), (32, 2, 1),
                                                 (33, 2, 2), (64, 2, 2), (65, 2, 3), (2048, 2, 64)])
def test_row_tiles(M, m_tiles, row_blocks):
    cfg = W.tiles(m=M, n=4096, k=4096, chunk_k=64, sm_count=132)
    assert (cfg.m_tiles, cfg.grid[2]) == (m_tiles, row_blocks)


def test_no_split_variant_and_options():
    assert W.tiles(m=1, n=4096, k=4096, chunk_k=64, sm_count=132, num_splits=1).num_splits == 1
    cfg = W.tiles(m=1, n=4096, k=4096, chunk_k=64, sm_count=132, options=W4A16Options(num_splits=3))
    assert (cfg.num_splits, cfg.chunks_per_split) == (3, 22)  # 64 chunks of 64
    # more splits than chunks never launches empty splits
    cfg = W.tiles(m=1, n=16, k=128, chunk_k=128, sm_count=132)
    assert cfg.num_splits == 1 and cfg.chunks_per_split == 1


H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "sm_90", 132, 227 * 1024, 32, 50 << 20)
GFX942 = DeviceInfo("AMD Instinct MI300X", "gfx942", 304, 64 * 1024, 64, 256 << 20)


@pytest.mark.parametrize("M,variant,kernel", [(1, None, "mma"), (16, None, "mma"), (127, None, "mma"),
                                              (128, None, "dequant"), (1, "naive", "naive"),
                                              (1, "gemv", "gemv"), (2048, "mma", "mma")])
def test_plans_pick_the_kernel_by_m_and_variant(M, variant, kernel):
    problem = W.W4A16Problem("fp16", M, 4096, 4096, "nv_m16n8k16", 128)
    plan = W.plan(problem, H100, lambda spec: 0, W4A16Options(variant=variant))
    assert plan.kernel.kernel == kernel and plan.dense == (kernel == "dequant")


def test_plans_shrink_the_block_where_shared_memory_is_short():
    """CDNA's 64 KB of LDS: 8 waves' ring plus x slabs do not fit at 32 rows of x, fewer waves do;
    where not even one warp fits, the planner says how much was needed."""
    problem = W.W4A16Problem("fp16", 32, 4096, 4096, "amd_mfma16", 128)

    def ring(spec):  # the kernel's static weight ring: stages x column tiles x lanes x 16 bytes
        p = dict(spec.params)
        return p["stages"] * p["n_tiles"] * p["warps"] * 64 * 16

    plan = W.plan(problem, GFX942, ring, W4A16Options())
    assert plan.block[0] // 64 < W.WARPS and ring(plan.kernel) + plan.shared_bytes <= GFX942.max_smem_per_block
    with pytest.raises(ValueError, match="shared memory per block"):
        W.plan(problem, GFX942, lambda spec: 64 * 1024, W4A16Options())


@pytest.mark.parametrize("M,block_m,splits", [(17, 32, 4), (32, 32, 4), (50, 64, 4), (128, 128, 4), (2048, 128, 1)])
def test_tiled_plans_pick_the_block_by_m(M, block_m, splits):
    """Llama's W1 (K = N = 4096) on an H100: 32 column blocks of 128, split K (at most 4 ways)
    while the blocks leave SMs idle; the default choice by M stays the skinny kernel / dequant-gemm."""
    problem = W.W4A16Problem("fp16", M, 4096, 4096, "nv_m16n8k16", 128)
    plan = W.plan(problem, H100, lambda spec: 0, W4A16Options(variant="tiled"))
    params = dict(plan.kernel.params)
    assert (plan.kernel.kernel, params["block_m"], params["block_n"], params["stages"]) == ("tiled", block_m, 128, 4)
    assert plan.grid == (32, splits, -(-M // block_m)) and plan.num_splits == splits
    assert plan.block[0] == params["warps_m"] * params["warps_n"] * 32 <= 256
    assert plan.shared_bytes == W.tiled_smem(block_m, 128, 4, 64) <= H100.max_smem_per_block
    assert plan.chunks_per_split * splits >= 64 and plan.counters == (32 * plan.grid[2] if splits > 1 else 0)
    default = W.plan(problem, H100, lambda spec: 0, W4A16Options())
    assert default.kernel.kernel == ("dequant" if M >= W.DENSE_MIN_M else "mma")


def test_tiled_plans_fit_the_lds_and_check_options():
    """CDNA's 64 KB of LDS and 128-k chunks: a 128-row block's ring does not fit even 2 deep, a
    64-row one does; a pinned block that cannot fit, and a block size not offered, are named."""
    problem = W.W4A16Problem("bf16", 256, 4096, 4096, "amd_mfma16", 128)
    plan = W.plan(problem, GFX942, lambda spec: 0, W4A16Options(variant="tiled"))
    params = dict(plan.kernel.params)
    assert (params["block_m"], params["stages"]) == (64, 2) and plan.block[0] == 8 * 64
    assert plan.shared_bytes == W.tiled_smem(64, 128, 2, 128) <= 64 * 1024
    with pytest.raises(ValueError, match="2-stage ring"):
        W.plan(problem, GFX942, lambda spec: 0, W4A16Options(variant="tiled", block_m=128, block_n=256))
    with pytest.raises(ValueError, match="block_m"):
        W4A16Options(variant="tiled", block_m=48)
    with pytest.raises(ValueError, match="block_n"):
        W4A16Options(variant="tiled", block_n=32)
    # a K tail (K = 4096 + 96: 66 chunks of 64) and pinned splits: stages of one chunk, no empty split
    t = W.tiled_tiles(m=64, n=4096, k=4192, chunk_k=64, sm_count=132, max_smem=227 * 1024,
                      options=W4A16Options(num_splits=4))
    assert (t.num_splits, t.chunks_per_split) == (4, 17)
    t = W.tiled_tiles(m=64, n=4096, k=4192, chunk_k=32, sm_count=132, max_smem=64 * 1024,
                      options=W4A16Options(num_splits=4))  # RDNA3: stages of two 32-k chunks
    assert t.chunks_per_split % 2 == 0 and t.num_splits * t.chunks_per_split >= 4192 // 32


def test_variants_are_listed():
    assert {"naive", "mma", "dequant-gemm"} <= set(W.VARIANTS)
    assert int4.layout_for_device("cpu") in int4.LAYOUTS


def test_gradient_flows_to_x_not_to_the_weights():
    wq = weight(group_size=64, symmetric=False)
    x = torch.randn(3, 256, dtype=torch.float32, requires_grad=True)
    y = ikport.w4a16_matmul(x, wq)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ wq.dequantize(), atol=1e-5)
    with pytest.raises(ValueError, match="requires grad"):
        ikport.w4a16_matmul(x, wq, out=torch.empty(3, 128))
    with torch.no_grad():
        assert not ikport.w4a16_matmul(x, wq).requires_grad


def test_zero_points_must_be_integers_in_range():
    codes = torch.randint(0, 16, (16, 128), dtype=torch.uint8)
    scales = torch.rand(1, 16).half()
    for bad in (torch.full((1, 16), 7.5), torch.full((1, 16), -1.0), torch.full((1, 16), 16.0)):
        with pytest.raises(ValueError, match="0..15"):
            int4.Int4Weight.from_codes(codes, scales, bad, None)
    assert int4.Int4Weight.from_codes(codes, scales, torch.full((1, 16), 3.0), None).zeros is not None


@pytest.mark.parametrize("arch", sorted(ARCH_TABLE))
def test_every_target_has_an_int4_layout_and_its_matrix_shim(arch):
    """One table (backends/target.py) gives each target its INT4 layout and the -D that selects
    the matching matrix shim, so the packer and the kernels cannot disagree."""
    facts = ARCH_TABLE[arch]
    assert facts.matrix_layout in int4.LAYOUTS
    assert int4.layout_info(facts.matrix_layout).lanes == facts.warp_size
    defines = Target(arch).defines()
    amd_shims = {k for k in defines if k.startswith("IK_MMA_AMD_")}
    if facts.vendor == "hip":
        assert amd_shims == {"IK_MMA_AMD_MFMA_16X16X16" if facts.matrix_unit == "mfma" else "IK_MMA_AMD_WMMA_W32"}
    else:
        assert not amd_shims
