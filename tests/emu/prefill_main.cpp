// prefill_main.cpp -- the attention_prefill family (kernels_src/attention/prefill.cuh) run on the CPU
// by the block emulator, as a shared library tests/test_prefill_emulation.py loads with ctypes.
// One build per configuration (-D EMU_*; EMU_LOADER: the KV loader's C++ name, from the manifest's
// cpp_names); the matrix products come from matrix_emu.hpp.
#include "block_emu.hpp"
#include "attention/prefill.cuh"

#if !defined(EMU_T) || !defined(EMU_HEAD_DIM) || !defined(EMU_TILE_M) || !defined(EMU_TILE_N) || \
    !defined(EMU_WARPS) || !defined(EMU_STAGES) || !defined(EMU_PAD) || !defined(EMU_LOADER)
#error "define EMU_T, EMU_HEAD_DIM, EMU_TILE_M, EMU_TILE_N, EMU_WARPS, EMU_STAGES, EMU_PAD and EMU_LOADER"
#endif

namespace {
PrefillParams params;
template <bool PAGED>
void body() {
  attn_prefill<EMU_T, EMU_HEAD_DIM, EMU_TILE_M, EMU_TILE_N, EMU_WARPS, EMU_STAGES, PAGED, EMU_PAD, EMU_LOADER>(params);
}
}  // namespace

extern "C" {
// grid (Hq, B, q_tiles), block EMU_WARPS waves, as ikport/plan/prefill.py launches it.
const char* emu_prefill(const PrefillParams* p, int paged, int q_tiles, unsigned long long seed) {
  params = *p;
  return emu::run_grid(paged ? body<true> : body<false>,
                       {unsigned(p->num_q_heads), unsigned(p->batch), unsigned(q_tiles)}, EMU_WARPS * IK_WARP_SIZE, 1,
                       seed);
}
int emu_smem_bytes() {
  return prefill::PrefillConfig<EMU_T, EMU_HEAD_DIM, EMU_TILE_M, EMU_TILE_N, EMU_WARPS, EMU_STAGES, EMU_PAD,
                                EMU_LOADER>::smem_bytes();
}
}
