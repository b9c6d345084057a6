// kv_append_main.cpp -- the kv_append family (kernels_src/kv_append.cuh) run on the CPU by the block
// emulator, as a shared library tests/test_kv_append_emulation.py loads with ctypes. One build per
// configuration (-D EMU_T, EMU_HEAD_DIM, EMU_FORMAT: the format's C++ name from the manifest).
#include "block_emu.hpp"
#include "kv_append.cuh"

#if !defined(EMU_T) || !defined(EMU_HEAD_DIM) || !defined(EMU_FORMAT)
#error "define EMU_T, EMU_HEAD_DIM and EMU_FORMAT"
#endif

namespace {
KvAppendParams params;
template <bool PAGED>
void body() { kv_cache_append<EMU_T, EMU_HEAD_DIM, EMU_FORMAT, PAGED>(params); }
}  // namespace

extern "C" {
int emu_threads() { return kv_append::threads<EMU_HEAD_DIM>(); }
// grid (blocks), block emu_threads(), as ikport/impl/kvcache.py launches it.
const char* emu_kv_append(const KvAppendParams* p, int paged, int blocks, unsigned long long seed) {
  params = *p;
  return emu::run_grid(paged ? body<true> : body<false>, {unsigned(blocks), 1, 1}, kv_append::threads<EMU_HEAD_DIM>(),
                       1, seed);
}
}
