"""The read-pass kernel (kernels_src/read_pass.cuh, the benchmarks' read floor) on the CPU block
emulator with 32- and 64-lane waves: the XOR of the words its warps write equals the XOR of every
32-bit word of the buffer, for sizes that fill the unrolled loop, leave a tail, or give some
threads nothing (a vector read twice, or missed, would show)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from ikport.kernels import ReadPassParams

import emulation

pytestmark = pytest.mark.skipif(emulation.GXX is None, reason="no host C++ compiler (g++ or clang++)")
KERNEL = emulation.KERNELS / "read_pass.cuh"
BUILDS = {"w32-u4": (32, "unsigned int", 4), "w64-u1": (64, "unsigned long long", 1)}


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("read-pass-emu")
    builds = [([KERNEL], "read_pass_main.cpp", {"IK_WARP_SIZE": w, "EMU_LANE_MASK_T": m, "EMU_ASYNC_COPY": 0,
                                                 "EMU_CLUSTERS": 0, "EMU_UNROLL": u}, tmp / f"{n}.so", emulation.GXX)
              for n, (w, m, u) in BUILDS.items()]
    out = {}
    for name, path in zip(BUILDS, emulation.compile_libraries(builds)):
        lib = ctypes.CDLL(str(path))
        lib.emu_read_pass.restype = ctypes.c_char_p
        lib.emu_read_pass.argtypes = [ctypes.POINTER(ReadPassParams), ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong]
        out[name] = lib
    return out


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("n16,blocks,threads", [(4096, 2, 256), (1000, 3, 128), (37, 2, 64)])
def test_every_vector_is_read_once(libs, build, n16, blocks, threads):
    wave = BUILDS[build][0]
    buf = torch.randint(-2**31, 2**31 - 1, (n16 * 4,), dtype=torch.int64).to(torch.int32)
    sink = torch.full((blocks * threads // wave,), 0x5A5A5A5A, dtype=torch.int32)  # every word must be written
    p = ReadPassParams(buf.data_ptr(), sink.data_ptr(), n16)
    assert libs[build].emu_read_pass(ctypes.byref(p), blocks, threads, 7) is None
    want = 0
    for w in buf.tolist():
        want ^= w & 0xFFFFFFFF
    got = 0
    for w in sink.tolist():
        got ^= w & 0xFFFFFFFF
    assert got == want
