// matrix_emu.hpp -- AMD's matrix-unit builtins (CDNA v_mfma_f32_16x16x16{f16,bf16_1k}, RDNA3
// v_wmma_f32_16x16x16_{f16,bf16}_w32) as wave-collective host functions for the block emulator
// (tests/test_w4a16_emulation.py), so portability/mma.cuh's AMD branch runs unchanged on the CPU.
//
// Each lane publishes its A and B slots; every lane then rebuilds the 16x16 A and B tiles from all
// lanes through the layout's index math (portability/mma_layout.cuh, itself checked against AMD's
// matrix instruction calculator tables by tests/test_mma_layout.py) and computes its own C slots
// in fp32, k in order. Host clang only (ext_vector_type, as the device code).
#pragma once
#include "mma_layout.cuh"

namespace emu {

template <class L, class In>
void matrix_product(const In& a, const In& b, float* c, float (*to_float)(unsigned short)) {
  constexpr int kLanes = L::kLanes;
  static_assert(kLanes == IK_WARP_SIZE, "matrix layout of another wave size");
  float* a_slots = wave_matrix_slots(matrix_a);
  float* b_slots = wave_matrix_slots(matrix_b);
  const int l = lane();
  for (int s = 0; s < L::kA; ++s) a_slots[l * L::kA + s] = to_float(static_cast<unsigned short>(a[s]));
  for (int s = 0; s < L::kB; ++s) b_slots[l * L::kB + s] = to_float(static_cast<unsigned short>(b[s]));
  arrive_and_wait(my_warp());
  float A[16][16], B[16][16];
  for (int i = 0; i < kLanes; ++i) {
    for (int s = 0; s < L::kA; ++s) A[L::a_row(i, s)][L::a_col(i, s)] = a_slots[i * L::kA + s];
    for (int s = 0; s < L::kB; ++s) B[L::b_row(i, s)][L::b_col(i, s)] = b_slots[i * L::kB + s];
  }
  arrive_and_wait(my_warp());
  for (int s = 0; s < L::kC; ++s) {
    const int r = L::c_row(l, s), col = L::c_col(l, s);
    float acc = c[s];
    for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][col];
    c[s] = acc;
  }
}
inline float f16_bits_to_float(unsigned short b) { return ik::vendor::half_bits_to_float(b); }
inline float bf16_bits_to_float(unsigned short b) { return ik::vendor::bf16_to_float(b); }

}  // namespace emu

typedef _Float16 emu_f16x4 __attribute__((ext_vector_type(4)));
typedef short emu_i16x4 __attribute__((ext_vector_type(4)));
typedef _Float16 emu_f16x16 __attribute__((ext_vector_type(16)));
typedef short emu_i16x16 __attribute__((ext_vector_type(16)));
typedef float emu_f32x4 __attribute__((ext_vector_type(4)));
typedef float emu_f32x8 __attribute__((ext_vector_type(8)));

// The 16-bit elements of a vector as raw bits (memcpy: clang's __builtin_bit_cast of an element
// `v[i]` of an ext_vector_type vector read element 0 for every i here, clang 19 at -O0 and -O1).
template <int N, class V>
inline void emu_bits(const V& v, unsigned short (&out)[N]) {
  static_assert(sizeof(V) == sizeof(out), "a vector of N 16-bit elements");
  memcpy(out, &v, sizeof(out));
}
template <class L, int NA, int NC, class V, class C>
inline C emu_mma(const V& a, const V& b, C c, float (*to_float)(unsigned short)) {
  unsigned short ab[NA], bb[NA];
  emu_bits<NA>(a, ab);
  emu_bits<NA>(b, bb);
  float acc[NC];
  for (int i = 0; i < NC; ++i) acc[i] = c[i];
  emu::matrix_product<L>(ab, bb, acc, to_float);
  for (int i = 0; i < NC; ++i) c[i] = acc[i];
  return c;
}
#if defined(IK_MMA_EMULATED_NV)
// NVIDIA's layout (mma.sync.m16n8k16 pairs) behind the shim's element-by-element fragments: the
// kernels' NVIDIA-only logic (C kept as A in registers, rows shared by 4 lanes) runs here; the
// PTX itself (ldmatrix, mma.sync) only on the GPU.
template <class L, bool BF16>
inline void emu_layout_mma(float (&c)[L::kC], const unsigned short (&a)[L::kA], const unsigned short (&b)[L::kB]) {
  emu::matrix_product<L>(a, b, c, BF16 ? emu::bf16_bits_to_float : emu::f16_bits_to_float);
}
#elif defined(IK_MMA_AMD_MFMA_16X16X16)
inline emu_f32x4 __builtin_amdgcn_mfma_f32_16x16x16f16(emu_f16x4 a, emu_f16x4 b, emu_f32x4 c, int, int, int) {
  return emu_mma<ik::layout::AmdMfma16x16x16, 4, 4>(a, b, c, emu::f16_bits_to_float);
}
inline emu_f32x4 __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(emu_i16x4 a, emu_i16x4 b, emu_f32x4 c, int, int, int) {
  return emu_mma<ik::layout::AmdMfma16x16x16, 4, 4>(a, b, c, emu::bf16_bits_to_float);
}
#else
inline emu_f32x8 __builtin_amdgcn_wmma_f32_16x16x16_f16_w32(emu_f16x16 a, emu_f16x16 b, emu_f32x8 c) {
  return emu_mma<ik::layout::AmdWmma16x16x16W32, 16, 8>(a, b, c, emu::f16_bits_to_float);
}
inline emu_f32x8 __builtin_amdgcn_wmma_f32_16x16x16_bf16_w32(emu_i16x16 a, emu_i16x16 b, emu_f32x8 c) {
  return emu_mma<ik::layout::AmdWmma16x16x16W32, 16, 8>(a, b, c, emu::bf16_bits_to_float);
}
#endif
