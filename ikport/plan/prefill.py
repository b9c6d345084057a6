"""The prefill-attention planner: problem shape, the device's facts and frozen options in; a launch
plan out (the kernel of kernels_src/attention/prefill.cuh, grid, block, shared memory).

Pure functions: no tensors, no driver calls. The call path (ikport/impl/prefill.py) asks `plan`;
warmup asks `default_kernels`; the portability report asks `launch_of`. Tile choices and their
measurements: docs/results/prefill.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..backends.base import DeviceInfo
from ..backends.target import ArchFacts, Target
from ..manifest import KernelSpec, spec
from .decode import C_TO_A_LD, INT8_SCALE_BYTES, KIVI_PAIR_BYTES, LOADERS, kivi_group, loader_name
from .launch import Launch
from .options import Options

# Journey variants (PrefillOptions.variant):
#   naive   v0: attention_decode's naive kernel, one block per query row and head, scalar math
#   fa2     the matrix-unit kernel; its journey steps are the other options (stages 1: no
#           pipelining, pad False: bank conflicts, longest_first False: tiles in order)
VARIANTS = ("naive", "fa2")


@dataclass(frozen=True)
class PrefillOptions(Options):
    """Tuning and journey knobs for benchmarks and A/B runs; the default plans need none.

    variant: one of VARIANTS. `tile_m` (query rows per block), `tile_n` (K/V rows per step),
    `warps` (per block), `stages` (K/V ring slots; 1: copy, wait, compute) pin the tiles; `pad`
    (padded shared-memory rows) and `longest_first` (causal: the query tiles with the most keys
    start first) pin those choices. The manifest checks the values at plan time.
    """

    variant: str = "fa2"
    tile_m: int | None = None
    tile_n: int | None = None
    warps: int | None = None
    stages: int | None = None
    pad: bool | None = None
    longest_first: bool | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"PrefillOptions: unknown variant {self.variant!r}; choose from {VARIANTS}")
        for f in ("tile_m", "tile_n", "warps", "stages"):
            value = getattr(self, f)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"PrefillOptions: {f} must be a positive int (or None), got {value!r}")
        for f in ("pad", "longest_first"):
            value = getattr(self, f)
            if value is not None and type(value) is not bool:
                raise ValueError(f"PrefillOptions: {f} must be True, False or None, got {value!r}")


DEFAULT_OPTIONS = PrefillOptions()


@dataclass(frozen=True)
class PrefillProblem:
    """One prefill call's shape: `q_capacity` is Tq (or max_seqlen_q), `kv_capacity` L, max_seqlen_k
    or max_pages * page_size."""

    dtype: str  # "fp16" | "bf16"
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    q_capacity: int
    kv_capacity: int
    page_size: int = 0  # 0: a contiguous (or packed) cache
    kv_format: str = "dense"  # the cache format: the kernel's KV loader (ikport.kvquant.KV_FORMATS)
    kivi_group: int = 0  # kivi4: K's group of G rows

    @property
    def paged(self) -> bool:
        return self.page_size > 0

    @property
    def loader(self) -> str:
        """The manifest's `loader` value for this cache format."""
        return loader_name(self.kv_format, self.kivi_group)

    @property
    def page_size_log2(self) -> int:
        return self.page_size.bit_length() - 1 if self.paged else 0


@dataclass(frozen=True)
class Tiles:
    tile_m: int
    tile_n: int
    warps: int
    stages: int
    pad: bool


@dataclass(frozen=True)
class PrefillPlan:
    kernel: KernelSpec
    grid: tuple[int, int, int]  # (Hq, B, query tiles)
    block: tuple[int, int, int]
    shared_bytes: int
    tiles: Tiles
    longest_first: bool


def kv_slot_bytes(loader: str, head_dim: int, tile_n: int, pad: bool) -> int:
    """One slot of attn_prefill's K/V ring (prefill::KVTiles::kSlotBytes): dense, a K and a V tile of
    fp16/bf16 rows (head_dim, + 8 padded); int8, per tensor the tile's codes and an fp32 scale a
    row; kivi4, the codes (head_dim / 2 bytes a row) of both, V's pair a row and K's pairs of the
    tile's group (head_dim of them)."""
    if loader == "dense":
        return 2 * tile_n * (head_dim + (8 if pad else 0)) * 2
    if loader == "int8":
        return 2 * (tile_n * head_dim + tile_n * INT8_SCALE_BYTES)
    if kivi_group(loader):
        codes = tile_n * head_dim // 2
        return 2 * codes + tile_n * KIVI_PAIR_BYTES + head_dim * KIVI_PAIR_BYTES
    raise ValueError(f"unknown KV loader {loader!r}; choose from {LOADERS}")


def smem_bytes(*, head_dim: int, tile_m: int, tile_n: int, warps: int, stages: int, pad: bool,
               c_is_a: bool, loader: str = "dense") -> int:
    """Dynamic shared memory of attn_prefill (PrefillConfig::smem_bytes): the K/V ring (`stages`
    slots of the loader's tiles as copied; a compressed format's one pair of dequantized tiles after
    them, the dense loader's page ids of two tiles), the query tile, and where C is not A's layout
    (AMD) each warp's scratch for P."""
    ld = head_dim + (8 if pad else 0)
    tiles = -(-2 * tile_n * 4 // 16) * 16 if loader == "dense" else 2 * tile_n * ld * 2  # dense: two tiles' page ids
    ring = stages * kv_slot_bytes(loader, head_dim, tile_n, pad) + tiles
    return ring + tile_m * ld * 2 + (0 if c_is_a else warps * 16 * C_TO_A_LD * 2)


# Tile candidates, best first, per matrix unit and head_dim bound: the first that fits the
# target's shared memory per block is the default. NVIDIA (async copies, 227 KB): at head_dim 128
# 128 query rows of 4 warps (two 16-row tiles a warp: each K/V fragment load feeds two products)
# and 64-key tiles, 32-key ones in a paged cache (its page ids cost registers: 64-key tiles
# spilled more); 64 rows and 32-key tiles at 64 and 256 (the fastest of six tilings at P1, P2
# and chunked prefill, docs/results/prefill.md, prefill-probe-h100.json). AMD (64 KB of LDS, copies
# through registers): 64 query rows and short K/V tiles; RDNA3's WMMA fragments hold 16 halves a
# lane, so its K/V tiles are shorter still at head_dim 128 (64-key ones spill on gfx1100). At
# head_dim 256 gfx1100 spills whatever the tiles (its 128 accumulator registers of O alone).
_CANDIDATES: dict[str, tuple[tuple[int, tuple[Tiles, ...]], ...]] = {
    "mma.sync": (
        (64, (Tiles(64, 32, 4, 2, True),)),
        (128, (Tiles(128, 64, 4, 2, True), Tiles(64, 32, 4, 2, True))),
        (256, (Tiles(64, 32, 4, 2, True), Tiles(32, 16, 2, 2, True))),
    ),
    "mfma": (
        (128, (Tiles(64, 32, 4, 2, True), Tiles(32, 16, 2, 2, True))),
        (256, (Tiles(32, 16, 2, 2, True), Tiles(16, 16, 1, 2, True))),
    ),
    "wmma": (
        (64, (Tiles(64, 32, 4, 2, True),)),
        (128, (Tiles(64, 16, 4, 2, True), Tiles(32, 16, 2, 2, True))),
        (256, (Tiles(32, 16, 2, 2, True), Tiles(16, 16, 1, 2, True))),
    ),
}
# Paged caches where their best tiles differ: matrix unit -> {head_dim bound of _CANDIDATES: tiles}.
_PAGED_CANDIDATES: dict[str, dict[int, tuple[Tiles, ...]]] = {
    "mma.sync": {128: (Tiles(128, 32, 4, 2, True), Tiles(64, 32, 4, 2, True))},
}


def tiles(head_dim: int, facts: ArchFacts, options: PrefillOptions = DEFAULT_OPTIONS, paged: bool = False,
          loader: str = "dense") -> Tiles:
    """The default tiles for `head_dim` (in a paged cache or not, of the loader's format) on a
    target of `facts`, with the options' pins applied. Compressed formats take the dense
    candidates (their ring is smaller: codes, not fp16 rows, plus one pair of dequantized tiles),
    KIVI's K/V tiles at most a group (kivi4_g<G>: tile_n <= G, a tile one group's rows)."""
    fits = None
    group = kivi_group(loader)
    for bound, candidates in _CANDIDATES[facts.matrix_unit]:
        if head_dim <= bound:
            if paged:
                candidates = _PAGED_CANDIDATES.get(facts.matrix_unit, {}).get(bound, candidates)
            if group:
                candidates = tuple(replace(t, tile_n=min(t.tile_n, group)) for t in candidates)
            for t in candidates:
                if smem_bytes(head_dim=head_dim, tile_m=t.tile_m, tile_n=t.tile_n, warps=t.warps, stages=t.stages,
                              pad=t.pad, c_is_a=facts.c_is_a, loader=loader) <= facts.max_smem_per_block:
                    fits = t
                    break
            break
    fits = fits or Tiles(16, 16, 1, 1, True)
    tile_m = options.tile_m or fits.tile_m
    return Tiles(tile_m=tile_m, tile_n=options.tile_n or fits.tile_n,
                 warps=options.warps or min(fits.warps, max(1, tile_m // 16)),
                 stages=options.stages or fits.stages, pad=fits.pad if options.pad is None else options.pad)


def kernel_spec(dtype: str, head_dim: int, t: Tiles, paged: bool, loader: str = "dense") -> KernelSpec:
    return spec("attention_prefill", "fa2", dtype=dtype, head_dim=head_dim, tile_m=t.tile_m, tile_n=t.tile_n,
                warps=t.warps, stages=t.stages, paged=paged, pad=t.pad, loader=loader)


def plan(problem: PrefillProblem, device: DeviceInfo, options: PrefillOptions = DEFAULT_OPTIONS) -> PrefillPlan:
    """The launch of `problem` on `device` (ValueError where the manifest or the device refuses)."""
    if options.variant != "fa2":
        raise ValueError(f"plan.prefill.plan: variant {options.variant!r} runs the decode family's kernel")
    facts = Target(device.arch).facts
    loader, group = problem.loader, problem.kivi_group
    if loader not in LOADERS:
        raise ValueError(f"plan.prefill.plan: no KV loader for kv_format {problem.kv_format!r} (G {group})")
    if group and problem.head_dim % 32:
        raise ValueError(f"KIVI prefill reads rows of head_dim / 2 code bytes in 16-byte chunks: head_dim "
                         f"{problem.head_dim} must be a multiple of 32")
    t = tiles(problem.head_dim, facts, options, problem.paged, loader)
    if t.tile_m % (16 * t.warps):
        raise ValueError(f"PrefillOptions: tile_m {t.tile_m} must be a multiple of 16 x warps ({t.warps})")
    if group and t.tile_n > group:
        raise ValueError(f"PrefillOptions: tile_n {t.tile_n} over a KIVI cache of groups of {group} rows: a K/V "
                         f"tile must lie in one group (tile_n <= {group})")
    kernel = kernel_spec(problem.dtype, problem.head_dim, t, problem.paged, loader)
    smem = smem_bytes(head_dim=problem.head_dim, tile_m=t.tile_m, tile_n=t.tile_n, warps=t.warps, stages=t.stages,
                      pad=t.pad, c_is_a=facts.c_is_a, loader=loader)
    if smem > device.max_smem_per_block:
        raise ValueError(f"prefill tiles {t} need {smem} bytes of shared memory; {device.name} gives a block "
                         f"{device.max_smem_per_block}")
    q_tiles = max(1, -(-problem.q_capacity // t.tile_m))
    return PrefillPlan(kernel=kernel, grid=(problem.q_heads, problem.batch, q_tiles),
                       block=(t.warps * device.warp_size, 1, 1), shared_bytes=smem, tiles=t,
                       longest_first=True if options.longest_first is None else options.longest_first)


DTYPES = ("fp16", "bf16")


def default_kernels(target: Target, head_dims: tuple[int, ...] = (64, 128, 256),
                    dtypes: tuple[str, ...] = DTYPES) -> list[KernelSpec]:
    """The kernels default plans may launch on `target` for these head dims, contiguous and paged."""
    return [kernel_spec(dtype, d, tiles(d, target.facts, paged=paged), paged)
            for dtype in dtypes for d in head_dims for paged in (False, True)]


def launch_of(s: KernelSpec, facts: ArchFacts) -> Launch | None:
    """Block size and dynamic shared memory a plan launches `s` with; None for another family."""
    if s.family != "attention_prefill":
        return None
    p = dict(s.params)
    smem = smem_bytes(head_dim=p["head_dim"], tile_m=p["tile_m"], tile_n=p["tile_n"], warps=p["warps"],
                      stages=p["stages"], pad=p["pad"], c_is_a=facts.c_is_a, loader=p["loader"])
    return Launch(p["warps"] * facts.warp_size, smem, True, True)
