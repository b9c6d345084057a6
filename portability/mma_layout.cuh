// mma_layout.cuh -- which element of a 16x16x16 matrix-unit tile each lane holds, per instruction.
//
// Plain constexpr index math with no GPU dependency: the kernels' fragment loads use it, and a
// CPU test compiles this file as host C++ and checks it against AMD's matrix instruction
// calculator and the PTX ISA's mma.m16n8k16 tables (tests/test_mma_layout.py).
// Slot s of a lane is the s-th 16-bit element (A, B) or the s-th fp32 (C) that lane holds.
// A is [M=16][K=16], B is [K=16][N=16], C is [M=16][N=16].
#pragma once
#ifndef IK_HD
#define IK_HD inline  // host-only build (the layout test)
#endif

namespace ik {
namespace layout {

// NVIDIA: two mma.sync.m16n8k16 (row.col) side by side. A in 4 regs of 2 halves, B in 2+2, C 4+4.
struct NvM16n8k16x2 {
  static constexpr int kLanes = 32, kA = 8, kB = 8, kC = 8;
  static constexpr int kCRowSpan = 4;  // lanes sharing a row of C: an aligned group of 4 (see c_rows_in_spans)
  static constexpr IK_HD int a_row(int l, int s) { return l / 4 + 8 * ((s / 2) % 2); }
  static constexpr IK_HD int a_col(int l, int s) { return (l % 4) * 2 + 8 * (s / 4) + s % 2; }
  static constexpr IK_HD int b_row(int l, int s) { return (l % 4) * 2 + 8 * ((s / 2) % 2) + s % 2; }
  static constexpr IK_HD int b_col(int l, int s) { return 8 * (s / 4) + l / 4; }
  static constexpr IK_HD int c_row(int l, int s) { return l / 4 + 8 * ((s / 2) % 2); }
  static constexpr IK_HD int c_col(int l, int s) { return 8 * (s / 4) + (l % 4) * 2 + s % 2; }
};

// CDNA2/CDNA3 v_mfma_f32_16x16x16{f16,bf16_1k} (wave64): each lane holds 4 consecutive k.
struct AmdMfma16x16x16 {
  static constexpr int kLanes = 64, kA = 4, kB = 4, kC = 4;
  static constexpr int kCRowSpan = 16;
  static constexpr IK_HD int a_row(int l, int s) { return (void)s, l % 16; }
  static constexpr IK_HD int a_col(int l, int s) { return 4 * (l / 16) + s; }
  static constexpr IK_HD int b_row(int l, int s) { return 4 * (l / 16) + s; }
  static constexpr IK_HD int b_col(int l, int s) { return (void)s, l % 16; }
  static constexpr IK_HD int c_row(int l, int s) { return 4 * (l / 16) + s; }
  static constexpr IK_HD int c_col(int l, int s) { return (void)s, l % 16; }
};

// RDNA3 v_wmma_f32_16x16x16_{f16,bf16} (wave32): lanes 16-31 repeat the A/B inputs of lanes 0-15;
// the fp32 accumulator interleaves rows between the two half-waves.
struct AmdWmma16x16x16W32 {
  static constexpr int kLanes = 32, kA = 16, kB = 16, kC = 8;
  static constexpr int kCRowSpan = 16;
  static constexpr IK_HD int a_row(int l, int s) { return (void)s, l % 16; }
  static constexpr IK_HD int a_col(int l, int s) { return (void)l, s; }
  static constexpr IK_HD int b_row(int l, int s) { return (void)l, s; }
  static constexpr IK_HD int b_col(int l, int s) { return (void)s, l % 16; }
  static constexpr IK_HD int c_row(int l, int s) { return 2 * s + l / 16; }
  static constexpr IK_HD int c_col(int l, int s) { return (void)s, l % 16; }
};

// Register-built fragments rely on slots 2p, 2p+1 being k, k+1 of one row of A / column of B.
template <class L>
constexpr bool pairs_are_adjacent_k() {
  for (int l = 0; l < L::kLanes; ++l)
    for (int p = 0; p < L::kB / 2; ++p)
      if (L::b_row(l, 2 * p) % 2 != 0 || L::b_row(l, 2 * p + 1) != L::b_row(l, 2 * p) + 1 ||
          L::b_col(l, 2 * p + 1) != L::b_col(l, 2 * p))
        return false;
  for (int l = 0; l < L::kLanes; ++l)
    for (int p = 0; p < L::kA / 2; ++p)
      if (L::a_col(l, 2 * p) % 2 != 0 || L::a_col(l, 2 * p + 1) != L::a_col(l, 2 * p) + 1 ||
          L::a_row(l, 2 * p + 1) != L::a_row(l, 2 * p))
        return false;
  return true;
}
static_assert(pairs_are_adjacent_k<NvM16n8k16x2>(), "A/B slot pairs");
static_assert(pairs_are_adjacent_k<AmdMfma16x16x16>(), "A/B slot pairs");
static_assert(pairs_are_adjacent_k<AmdWmma16x16x16W32>(), "A/B slot pairs");

// Row reductions over C (ik::mma::row_reduce) rely on: the lanes l ^ m, m < kCRowSpan, hold the
// same rows in the same slots; slots of one lane share a row alike in every lane; and these
// lanes' same-row slots are the row's 16 entries (so no other lane holds any of them).
template <class L>
constexpr bool c_rows_in_spans() {
  for (int l = 0; l < L::kLanes; ++l)
    for (int s = 0; s < L::kC; ++s) {
      int same = 0;
      for (int s2 = 0; s2 < L::kC; ++s2) {
        if ((L::c_row(l, s2) == L::c_row(l, s)) != (L::c_row(0, s2) == L::c_row(0, s))) return false;
        same += L::c_row(l, s2) == L::c_row(l, s);
      }
      if (same * L::kCRowSpan != 16) return false;
      for (int m = 1; m < L::kCRowSpan; ++m)
        if (L::c_row(l ^ m, s) != L::c_row(l, s)) return false;
    }
  return true;
}
static_assert(c_rows_in_spans<NvM16n8k16x2>(), "C rows");
static_assert(c_rows_in_spans<AmdMfma16x16x16>(), "C rows");
static_assert(c_rows_in_spans<AmdWmma16x16x16W32>(), "C rows");

// A lane's C coordinates are its lane base (slot 0's) plus a lane-independent offset per slot,
// so a mask over C compares constants against two per-lane values (the prefill kernel's masks).
template <class L>
constexpr bool c_coordinates_separate() {
  for (int l = 0; l < L::kLanes; ++l)
    for (int s = 0; s < L::kC; ++s)
      if (L::c_row(l, s) != L::c_row(l, 0) + L::c_row(0, s) - L::c_row(0, 0) ||
          L::c_col(l, s) != L::c_col(l, 0) + L::c_col(0, s) - L::c_col(0, 0))
        return false;
  return true;
}
static_assert(c_coordinates_separate<NvM16n8k16x2>() && c_coordinates_separate<AmdMfma16x16x16>() &&
                  c_coordinates_separate<AmdWmma16x16x16W32>(),
              "C coordinates: lane base + slot offset");

// Whether a lane's C slots are its A slots, element for element (NVIDIA's m16n8k16: a product's
// accumulator is the next product's A operand in registers, as FlashAttention-2 keeps P).
template <class L>
constexpr bool c_matches_a() {
  if (L::kC != L::kA) return false;
  for (int l = 0; l < L::kLanes; ++l)
    for (int s = 0; s < L::kC; ++s)
      if (L::c_row(l, s) != L::a_row(l, s) || L::c_col(l, s) != L::a_col(l, s)) return false;
  return true;
}
static_assert(c_matches_a<NvM16n8k16x2>() && !c_matches_a<AmdMfma16x16x16>() && !c_matches_a<AmdWmma16x16x16W32>(),
              "C-as-A layouts");

}  // namespace layout
}  // namespace ik
