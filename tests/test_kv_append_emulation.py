"""The append kernel (kernels_src/kv_append.cuh) executed on the CPU by the block emulator
(tests/emu/block_emu.hpp) with 32- and 64-lane waves, against KVCache's torch ops (the CPU path),
byte for byte: codes, scales and pairs, KIVI's residual, the lengths.

Both caches start from the same random contents (never zeros), so a write to a wrong row or a missing
one shows; a run of appends of varying lengths from staggered positions completes KIVI groups at
different steps (several in one chunk, exactly at a chunk's end, none); paged caches go through a
shuffled block table; the last step rewrites from given positions (speculative decoding's
rollback), inside KIVI groups already quantized. The launch (grid, parameters) is the library's own
(ikport.impl.kvcache).
"""

from __future__ import annotations

import ctypes
import zlib

import pytest
import torch

import ikport
from ikport import manifest
from ikport.impl import kvcache as append_impl
from ikport.kernels import KvAppendParams

import emulation

pytestmark = pytest.mark.skipif(emulation.GXX is None, reason="no host C++ compiler (g++ or clang++)")
KERNEL = emulation.KERNELS / "kv_append.cuh"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
WAVES = {32: "unsigned int", 64: "unsigned long long"}
# name: (wave, dtype, head_dim, kv_format): spare lanes (head_dim 80 on 64 lanes: 40 pairs), a
# group block of 3 slices (head_dim 160: 80 pairs on 256 threads)
CONFIGS = {
    "w32-fp16-d128-dense": (32, "fp16", 128, "dense"),
    "w64-bf16-d80-int8": (64, "bf16", 80, "int8"),
    "w32-fp16-d64-int8": (32, "fp16", 64, "int8"),
    "w64-bf16-d64-kivi32": (64, "bf16", 64, "kivi4_g32"),
    "w32-fp16-d160-kivi64": (32, "fp16", 160, "kivi4_g64"),
    "w32-bf16-d128-kivi128": (32, "bf16", 128, "kivi4_g128"),
}


@pytest.fixture(scope="module")
def libs(request, tmp_path_factory):
    used = sorted(emulation.selected_params(request, "config"))
    tmp = tmp_path_factory.mktemp("kv-append-emu")
    builds = []
    for name in used:
        wave, dt, D, fmt = CONFIGS[name]
        defines = {"IK_WARP_SIZE": wave, "EMU_LANE_MASK_T": WAVES[wave], "EMU_ASYNC_COPY": 0, "EMU_CLUSTERS": 0,
                   "EMU_T": manifest.cpp_name("kv_append", "dtype", dt), "EMU_HEAD_DIM": D,
                   "EMU_FORMAT": manifest.cpp_name("kv_append", "kv_format", fmt)}
        builds.append(([KERNEL], "kv_append_main.cpp", defines, tmp / f"{name}.so", emulation.GXX))
    paths = dict(zip(used, emulation.compile_libraries(builds)))
    loaded = {}

    def get(name: str) -> ctypes.CDLL:
        if name not in loaded:
            lib = ctypes.CDLL(str(paths[name]))
            lib.emu_kv_append.restype = ctypes.c_char_p
            lib.emu_kv_append.argtypes = [ctypes.POINTER(KvAppendParams), ctypes.c_int, ctypes.c_int,
                                          ctypes.c_ulonglong]
            loaded[name] = lib
        return loaded[name]
    return get


def storage(cache: ikport.KVCache) -> dict[str, torch.Tensor]:
    names = ("k", "v", "k_scale", "v_scale", "k_resid", "lens")
    return {n: getattr(cache, n) for n in names if getattr(cache, n) is not None}


def poison(cache: ikport.KVCache, g: torch.Generator) -> None:
    """Random values in every storage tensor but the lengths: random bytes for codes, finite
    random numbers for the rest (the torch ops may quiet a NaN's bits that they copy)."""
    for name, t in storage(cache).items():
        if name == "lens":
            continue
        if t.dtype.is_floating_point:
            t.copy_(torch.randn(t.shape, generator=g) * 100)
        else:
            t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, generator=g, dtype=torch.uint8))


def emulated_append(lib, cache: ikport.KVCache, k, v, positions, wave: int, seed: int) -> None:
    pos = cache.lens if positions is None else positions.to(torch.int32)
    p = append_impl.params(cache, k, v, pos, positions is not None)
    blocks = append_impl.grid_blocks(cache, k.shape[2], wave)
    assert lib.emu_kv_append(ctypes.byref(p), int(cache.paged), blocks, seed) is None
    assert cache._append_counter.item() == 0  # reset by the last block


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_emulated_append_writes_what_the_torch_ops_write(libs, config, paged):
    wave, dt, D, fmt = CONFIGS[config]
    dtype = DTYPES[dt]
    kivi = fmt.startswith("kivi4")
    G = int(fmt.split("_g")[1]) if kivi else 16
    B, Hkv = (2, 2) if G == 128 else (3, 2)
    steps = (1, G + 5, 1, 7, G - 2, 2 * G - 1) if kivi else (1, 9, 1, 3)
    L = sum(steps) + 8
    page = 16 if paged else 0
    g = torch.Generator().manual_seed(zlib.crc32(config.encode()) + paged)
    table = emulation.shuffled_table(g, B, L, page)
    kw = dict(dtype=dtype, kv_format="kivi4" if kivi else fmt, page_size=page, block_table=table,
              kivi_group=G if kivi else None)
    want = ikport.KVCache(B, Hkv, L, D, **kw)
    got = ikport.KVCache(B, Hkv, L, D, **kw)
    poison(want, torch.Generator().manual_seed(1))
    poison(got, torch.Generator().manual_seed(1))
    start = torch.tensor([0, 3, 1][:B], dtype=torch.int32)
    want.lens.copy_(start)
    got.lens.copy_(start)
    lib = libs(config)
    for i, n in enumerate(steps):
        # K with per-channel outliers (what KIVI's per-channel groups are for)
        k = (torch.randn(B, Hkv, n, D, generator=g) * (1 + 20 * (torch.rand(D, generator=g) < 0.1))).to(dtype)
        v = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
        want._append_torch(k, v, None)
        emulated_append(lib, got, k, v, None, wave, seed=i)
        assert_same(got, want, f"step {i} (T {n})")
    # no new rows: nothing written, the lengths set to the positions
    zero = torch.zeros(B, Hkv, 0, D, dtype=dtype)
    to = want.lens - 1
    want._append_torch(zero, zero, to.clone())
    emulated_append(lib, got, zero, zero, to.clone(), wave, seed=98)
    assert_same(got, want, "T 0")
    # a rewrite from given positions: back into groups already quantized (KIVI), 3 new rows
    back = (want.lens - torch.tensor([G + 3, 2, G - 1][:B], dtype=torch.int32)).clamp(min=0)
    k = torch.randn(B, Hkv, 3, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, 3, D, generator=g).to(dtype)
    want._append_torch(k, v, back.clone())
    emulated_append(lib, got, k, v, back.clone(), wave, seed=99)
    assert_same(got, want, "rewrite")


def assert_same(got: ikport.KVCache, want: ikport.KVCache, when: str) -> None:
    for name, t in storage(want).items():
        assert torch.equal(getattr(got, name).view(torch.uint8), t.view(torch.uint8)), f"{when}: {name} differs"
