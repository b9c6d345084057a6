"""The prefill planner (ikport/plan/prefill.py): pure functions, checked without a GPU."""

from __future__ import annotations

import pytest

from ikport import manifest
from ikport.backends.base import DeviceInfo
from ikport.backends.target import ALL_TARGETS, Target
from ikport.plan import launch_of
from ikport.plan import prefill as P

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "sm_90", 132, 227 * 1024, 32, 50 << 20)
MI300X = DeviceInfo("AMD Instinct MI300X", "gfx942", 304, 64 * 1024, 64, 256 << 20)
P1 = P.PrefillProblem("fp16", 4, 32, 8, 128, 4096, 4096)


@pytest.mark.parametrize("arch", ALL_TARGETS)
@pytest.mark.parametrize("head_dim", range(16, 257, 16))
def test_default_tiles_fit_every_target(arch, head_dim):
    facts = Target(arch).facts
    t = P.tiles(head_dim, facts)
    assert t.tile_m % (16 * t.warps) == 0 and t.tile_n % 16 == 0
    smem = P.smem_bytes(head_dim=head_dim, tile_m=t.tile_m, tile_n=t.tile_n, warps=t.warps, stages=t.stages,
                        pad=t.pad, c_is_a=facts.c_is_a)
    assert smem <= facts.max_smem_per_block
    P.kernel_spec("bf16", head_dim, t, paged=True)  # the manifest admits it


def test_p1_plan_on_the_h100():
    plan = P.plan(P1, H100)
    t = plan.tiles
    assert plan.grid == (32, 4, -(-4096 // t.tile_m))
    assert plan.block == (32 * t.warps, 1, 1)
    assert plan.longest_first
    assert plan.kernel.family == "attention_prefill" and dict(plan.kernel.params)["paged"] is False
    assert plan.shared_bytes == launch_of(plan.kernel, Target("sm_90").facts).dynamic_shared_bytes


def test_amd_plans_keep_to_64_kb_of_lds():
    plan = P.plan(P1, MI300X)
    assert plan.shared_bytes <= 64 * 1024
    assert plan.block[0] == 64 * plan.tiles.warps


def test_options_pin_the_tiles_and_journey_choices():
    opts = P.PrefillOptions(tile_m=64, tile_n=32, warps=2, stages=1, pad=False, longest_first=False)
    plan = P.plan(P1, H100, opts)
    assert plan.tiles == P.Tiles(64, 32, 2, 1, False)
    assert not plan.longest_first
    assert dict(plan.kernel.params)["pad"] is False
    # pinning tile_m alone keeps whole 16-row tiles per warp
    assert P.plan(P1, H100, P.PrefillOptions(tile_m=32)).tiles.warps <= 2


def test_paged_problem_names_the_paged_kernel():
    plan = P.plan(P.PrefillProblem("fp16", 4, 32, 8, 128, 512, 8704, 16), H100)
    assert dict(plan.kernel.params)["paged"] is True


@pytest.mark.parametrize("bad,match", [
    (dict(variant="flash"), "unknown variant"),
    (dict(tile_m=0), "tile_m must be a positive int"),
    (dict(stages=2.0), "stages must be a positive int"),
    (dict(pad=1), "pad must be True, False or None"),
])
def test_bad_options_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        P.PrefillOptions(**bad)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="multiple of 16 x warps"):
        P.plan(P1, H100, P.PrefillOptions(tile_m=32, warps=4))
    with pytest.raises(ValueError, match="shared memory"):
        P.plan(P1, MI300X, P.PrefillOptions(tile_m=128, tile_n=128, stages=4))
    with pytest.raises(ValueError, match="naive"):
        P.plan(P1, H100, P.PrefillOptions(variant="naive"))
    with pytest.raises(ValueError):  # the manifest's allowed values
        P.plan(P1, H100, P.PrefillOptions(tile_n=48))


def test_options_round_trip_through_text():
    opts = P.PrefillOptions(tile_m=64, pad=False)
    assert P.PrefillOptions.from_text(opts.as_text()) == opts


@pytest.mark.parametrize("arch", ALL_TARGETS)
def test_default_kernels_are_what_plans_launch(arch):
    target = Target(arch)
    kernels = P.default_kernels(target)
    assert kernels and all(k.family == "attention_prefill" for k in kernels)
    device = DeviceInfo("x", arch, 100, target.facts.max_smem_per_block, target.facts.warp_size, 1 << 20)
    for d in (64, 128):
        for page in (0, 16):
            plan = P.plan(P.PrefillProblem("fp16", 1, 8, 8, d, 1000, 1000, page), device)
            assert plan.kernel in kernels


def test_the_manifest_default_set_is_launchable_everywhere():
    """The manifest's instantiations compile on every target (test_compile); they must also fit
    every target's shared memory as the planner launches them."""
    for s in manifest.default_instantiations("attention_prefill"):
        for arch in ALL_TARGETS:
            facts = Target(arch).facts
            assert launch_of(s, facts).dynamic_shared_bytes <= facts.max_smem_per_block


# ---- compressed caches (loader int8 / kivi4_g<G>: prefill::KVTiles) --------------------------------
@pytest.mark.parametrize("arch", ALL_TARGETS)
@pytest.mark.parametrize("loader", ["int8", "kivi4_g32", "kivi4_g64", "kivi4_g128"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("paged", [False, True])
def test_compressed_tiles_fit_every_target_and_lie_in_a_kivi_group(arch, loader, head_dim, paged):
    facts = Target(arch).facts
    device = DeviceInfo("x", arch, 100, facts.max_smem_per_block, facts.warp_size, 1 << 20)
    kv_format, group = ("kivi4", int(loader.removeprefix("kivi4_g"))) if loader != "int8" else ("int8", 0)
    plan = P.plan(P.PrefillProblem("fp16", 4, 32, 8, head_dim, 512, 8704, 16 if paged else 0, kv_format, group),
                  device)
    params = dict(plan.kernel.params)
    assert params["loader"] == loader and params["paged"] is paged
    assert plan.shared_bytes <= facts.max_smem_per_block  # the staging counted: every AMD target's 64 KB
    assert plan.shared_bytes == launch_of(plan.kernel, facts).dynamic_shared_bytes
    assert not group or plan.tiles.tile_n <= group


def test_compressed_staging_is_counted():
    """The ring holds codes and words (and KIVI's K pairs), plus one pair of dequantized tiles; the
    dense ring is followed by two tiles' page ids (paged caches)."""
    kw = dict(head_dim=128, tile_m=64, tile_n=32, warps=4, stages=2, pad=True, c_is_a=True)
    dense = P.smem_bytes(**kw)
    q_tile = 64 * 136 * 2
    tiles = 2 * 32 * 136 * 2
    assert P.smem_bytes(**kw, loader="int8") == 2 * 2 * (32 * 128 + 32 * 4) + tiles + q_tile
    assert P.smem_bytes(**kw, loader="kivi4_g32") == 2 * (2 * 32 * 64 + 32 * 4 + 128 * 4) + tiles + q_tile
    assert dense == 2 * 2 * 32 * 136 * 2 + 2 * 32 * 4 + q_tile


def test_compressed_refusals_name_the_problem():
    kivi = P.PrefillProblem("fp16", 1, 8, 2, 128, 512, 1024, 0, "kivi4", 32)
    with pytest.raises(ValueError, match="tile_n 64 .*tile_n <= 32"):
        P.plan(kivi, H100, P.PrefillOptions(tile_n=64))
    with pytest.raises(ValueError, match="head_dim 80 must be a multiple of 32"):
        P.plan(P.PrefillProblem("fp16", 1, 8, 2, 80, 512, 1024, 0, "kivi4", 32), H100)
    with pytest.raises(ValueError, match="no KV loader"):
        P.plan(P.PrefillProblem("fp16", 1, 8, 2, 128, 512, 1024, 0, "kivi4", 48), H100)
