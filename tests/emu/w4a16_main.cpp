// w4a16_main.cpp -- kernels_src/w4a16.cuh (and mma_tile.cuh, the matrix shim's tile product) run on the CPU by the block emulator, as a shared
// library the test loads with ctypes (tests/test_w4a16_emulation.py). One build per target class
// and kernel configuration (-D EMU_*); AMD's matrix builtins come from matrix_emu.hpp.
#include "block_emu.hpp"
#include "w4a16.cuh"
#include "mma_tile.cuh"

#if !defined(EMU_T) || !defined(EMU_MT) || !defined(EMU_NT) || !defined(EMU_WARPS) || !defined(EMU_GT) || \
    !defined(EMU_STAGES) || !defined(EMU_GEMV_WARPS)
#error "define EMU_T, EMU_MT, EMU_NT, EMU_WARPS, EMU_GT, EMU_STAGES and EMU_GEMV_WARPS"
#endif

namespace {
W4A16Params params;
void mma_body() { w4a16_mma<EMU_T, EMU_MT, EMU_NT, EMU_WARPS, EMU_GT, EMU_STAGES>(params); }
template <bool MAGIC>
void gemv_body() { w4a16_gemv<EMU_T, MAGIC, EMU_GEMV_WARPS>(params); }
void naive_body() { w4a16_naive<EMU_T>(params); }
void dequant_body() { w4a16_dequant<EMU_T>(params); }
#if defined(EMU_BM)  // the tiled kernel's configuration (optional: builds for the other kernels omit it)
void tiled_body() { w4a16_tiled<EMU_T, EMU_BM, EMU_BN, EMU_WARPS_M, EMU_WARPS_N, EMU_TILED_STAGES>(params); }
#else
void tiled_body() { emu::fail("this build has no tiled kernel (define EMU_BM ...)"); }
#endif
MmaTileParams tile_params;
template <bool BT>
void tile_body() { mma_tile<EMU_T, BT>(tile_params); }
}  // namespace

extern "C" {
// kernel: 0 mma, 1 gemv (magic-number unpacking), 2 gemv-scalar, 3 naive, 4 dequant, 5 tiled; the grid and
// block the library's planner gives it (ikport/w4a16.py).
const char* emu_w4a16(const W4A16Params* p, int kernel, int gx, int gy, int gz, int threads, unsigned long long seed) {
  params = *p;
  void (*const bodies[])() = {mma_body, gemv_body<true>, gemv_body<false>, naive_body, dequant_body, tiled_body};
  if (kernel < 0 || kernel > 5) return "unknown kernel";
  return emu::run_grid(bodies[kernel], {unsigned(gx), unsigned(gy), unsigned(gz)}, threads, 1, seed);
}
// The matrix shim's tile product (kernels_src/mma_tile.cuh): grid (n / 16, m / 16), one wave.
const char* emu_mma_tile(const MmaTileParams* p, int b_transposed, unsigned long long seed) {
  tile_params = *p;
  return emu::run_grid(b_transposed ? tile_body<true> : tile_body<false>,
                       {unsigned(p->n / 16), unsigned(p->m / 16), 1}, IK_WARP_SIZE, 1, seed);
}
}
