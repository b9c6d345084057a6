// wave_emu.hpp -- a host stand-in for ik::vendor, so that portability/warp.cuh runs unchanged on
// the CPU with 32 or 64 lanes (tests/test_wave_emulation.py).
//
// Each lane is one std::thread. A shuffle is two barrier phases over one shared array: every lane
// writes its value, all wait, every lane reads its source lane's slot, all wait again (so nobody
// overwrites a slot another lane has not read yet). ballot works the same way on an array of
// predicates. The vendor semantics emulated are the ones CUDA and HIP document alike:
//   shfl_xor(v, m, width): lane l reads lane l ^ m, or keeps its own v if that lane lies in a later
//                          width-group (CUDA __shfl_xor_sync, HIP __shfl_xor);
//   shfl(v, src, width):   lane l reads lane src of its own width-group; a src outside [0, width)
//                          aborts here (the shim's contract; CUDA and HIP differ there);
//   ballot(p):             bit i set iff lane i's p, in the vendor's lane_mask_t.
// Include this, then "warp.cuh". Needs IK_WARP_SIZE and EMU_LANE_MASK_T (the type the vendor
// header declares: the test reads it from vendor_cuda.cuh / vendor_hip.cuh).
#pragma once
#include <math.h>

#include <barrier>
#include <cstdio>
#include <cstdlib>

#if !defined(IK_WARP_SIZE) || !defined(EMU_LANE_MASK_T)
#error "define IK_WARP_SIZE (32|64) and EMU_LANE_MASK_T (the vendor's ballot type)"
#endif

#define IK_DEVICE inline

struct EmuDim3 {
  unsigned int x = 0, y = 0, z = 0;
};
// Set by each lane thread before it runs shim code (warp_id() reads threadIdx.x).
inline thread_local EmuDim3 threadIdx;

namespace emu {

struct Wave {
  std::barrier<> bar{IK_WARP_SIZE};
  float f[IK_WARP_SIZE];
  int i[IK_WARP_SIZE];
  bool p[IK_WARP_SIZE];
};
inline Wave wave;
inline thread_local int lane = -1;  // this thread's lane, set when the thread starts

inline float* slots(float) { return wave.f; }
inline int* slots(int) { return wave.i; }

// Every lane publishes v; the caller gets lane `src`'s value.
template <class T>
T exchange(T v, int src) {
  slots(v)[lane] = v;
  wave.bar.arrive_and_wait();
  T r = slots(v)[src];
  wave.bar.arrive_and_wait();
  return r;
}

inline int xor_source(int mask, int width) {
  int src = lane ^ mask;
  return src >= ((lane + width) & ~(width - 1)) ? lane : src;
}
inline int group_source(int src, int width) {
  if (src < 0 || src >= width) {
    std::fprintf(stderr, "wave_emu: shfl source lane %d outside its %d-lane group\n", src, width);
    std::abort();
  }
  return (lane & ~(width - 1)) + src;
}

}  // namespace emu

namespace ik {
namespace vendor {

using lane_mask_t = EMU_LANE_MASK_T;

IK_DEVICE int lane_id() { return emu::lane; }
IK_DEVICE float shfl_xor(float v, int mask, int width) { return emu::exchange(v, emu::xor_source(mask, width)); }
IK_DEVICE int shfl_xor(int v, int mask, int width) { return emu::exchange(v, emu::xor_source(mask, width)); }
IK_DEVICE float shfl(float v, int src, int width) { return emu::exchange(v, emu::group_source(src, width)); }
IK_DEVICE int shfl(int v, int src, int width) { return emu::exchange(v, emu::group_source(src, width)); }
IK_DEVICE lane_mask_t ballot(bool p) {
  emu::wave.p[emu::lane] = p;
  emu::wave.bar.arrive_and_wait();
  lane_mask_t m = 0;
  for (int i = 0; i < IK_WARP_SIZE; ++i) m |= static_cast<lane_mask_t>(emu::wave.p[i]) << i;
  emu::wave.bar.arrive_and_wait();
  return m;
}
IK_DEVICE void warp_sync() { emu::wave.bar.arrive_and_wait(); }
IK_DEVICE void block_sync() { emu::wave.bar.arrive_and_wait(); }  // the emulated block is one wave
IK_DEVICE bool block_any(bool p) { return ballot(p) != 0; }
IK_DEVICE float exp2_fast(float x) { return exp2f(x); }

}  // namespace vendor
}  // namespace ik
