// read_pass_main.cpp -- kernels_src/read_pass.cuh run on the CPU by the block emulator (one build per
// wave size and EMU_UNROLL), for tests/test_read_pass_emulation.py.
#include "block_emu.hpp"
#include "read_pass.cuh"

namespace {
ReadPassParams params;
void body() { read_pass<EMU_UNROLL>(params); }
}  // namespace

extern "C" {
const char* emu_read_pass(const ReadPassParams* p, int blocks, int threads, unsigned long long seed) {
  params = *p;
  return emu::run_grid(body, {unsigned(blocks), 1, 1}, threads, 1, seed);
}
}
