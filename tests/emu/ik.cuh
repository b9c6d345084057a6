// ik.cuh stand-in for the block emulator (tests/test_decode_emulation.py): block_emu.hpp plays the
// vendor layer, then the real shims (portability/, on the include path after this directory).
#pragma once
#include "block_emu.hpp"
#include "types.cuh"
#include "warp.cuh"
#include "memory.cuh"
