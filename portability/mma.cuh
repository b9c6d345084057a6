// mma.cuh -- one warp/wave computes C(16x16, fp32) += A(16x16) * B(16x16), A and B fp16 or bf16.
//
//   ik::mma::FragA<T> a; ik::mma::FragB<T> b; ik::mma::FragC c;
//   ik::mma::zero(c);
//   ik::mma::load_a(a, smem_A, lda);    // A[m][k] row-major in shared memory
//   ik::mma::load_a_rows(a, smem_A, lda, rows);  // ... only its first `rows` rows in memory
//   ik::mma::load_b(b, smem_B, ldb);    // B[k][n] row-major          (e.g. V in P*V)
//   ik::mma::load_bt(b, smem_Bt, ldbt); // B given as Bt[n][k] row-major (e.g. K in Q*K^T)
//   ik::mma::mma(c, a, b);
//   slot s of this lane holds C[ik::mma::c_row(s)][ik::mma::c_col(s)], s < ik::mma::kCSlots.
//   ik::mma::row_reduce(v, op);          // v[s] <- op over row c_row(s) of a C-shaped tile
//   ik::mma::c_to_a(a, c, scratch);      // C (e.g. softmax weights P) as the A of a next product
//
// NVIDIA: ldmatrix + 2x mma.sync.m16n8k16 (row addresses must be 16-byte aligned: ld % 8 == 0).
// CDNA: v_mfma_f32_16x16x16 (wave64). RDNA3: v_wmma_f32_16x16x16 (wave32).
#pragma once
#include "mma_layout.cuh"

namespace ik {
namespace mma {

#if defined(IK_MMA_NV_M16N8K16)
using Layout = layout::NvM16n8k16x2;
#elif defined(IK_MMA_AMD_MFMA_16X16X16)
using Layout = layout::AmdMfma16x16x16;
#elif defined(IK_MMA_AMD_WMMA_W32)
using Layout = layout::AmdWmma16x16x16W32;
#elif defined(IK_MMA_EMULATED_NV)  // the CPU block emulator only (tests/emu): NVIDIA's layout,
using Layout = layout::NvM16n8k16x2;  // fragments element by element, products by matrix_emu.hpp
#endif

#if defined(IK_MMA_NV_M16N8K16) || defined(IK_MMA_AMD_MFMA_16X16X16) || defined(IK_MMA_AMD_WMMA_W32) || \
    defined(IK_MMA_EMULATED_NV)
#define IK_HAS_MMA 1
static_assert(Layout::kLanes == IK_WARP_SIZE, "matrix fragment layout assumes another warp size");

inline constexpr int kCSlots = Layout::kC;
IK_DEVICE int c_row(int s) { return Layout::c_row(lane_id(), s); }
IK_DEVICE int c_col(int s) { return Layout::c_col(lane_id(), s); }
// c_row(s) == c_row(0) + c_row_offset(s), likewise for columns (layout::c_coordinates_separate).
constexpr int c_row_offset(int s) { return Layout::c_row(0, s) - Layout::c_row(0, 0); }
constexpr int c_col_offset(int s) { return Layout::c_col(0, s) - Layout::c_col(0, 0); }
// A and B slots, for kernels that build fragments in registers (e.g. B from packed INT4 weights,
// A straight from global memory): slots 2p and 2p+1 always hold k and k+1 of one row of A / one
// column of B, so one 32-bit word fills a pair (set_a_pair, set_b_pair).
inline constexpr int kASlots = Layout::kA;
inline constexpr int kBSlots = Layout::kB;
IK_DEVICE int b_row(int s) { return Layout::b_row(lane_id(), s); }
IK_DEVICE int b_col(int s) { return Layout::b_col(lane_id(), s); }

struct FragC {
  float x[Layout::kC];
};
IK_DEVICE void zero(FragC& c) {
#pragma unroll
  for (int i = 0; i < Layout::kC; ++i) c.x[i] = 0.f;
}

// Each slot of a C-shaped tile (values in C's slot order) gets `op` over its row's 16 entries:
// the lane's slots of that row, then the kCRowSpan lanes holding the rest (mma_layout.cuh).
template <int S>
constexpr int row_lead_slot() {  // the first slot holding the same row as slot S (lane-independent)
  int s = 0;
  while (Layout::c_row(0, s) != Layout::c_row(0, S)) ++s;
  return s;
}
template <class Op, int S = 0>
IK_DEVICE void fold_row_slots(float (&v)[Layout::kC], Op op) {
  if constexpr (S < Layout::kC) {
    constexpr int lead = row_lead_slot<S>();
    if constexpr (lead != S) v[lead] = op(v[lead], v[S]);
    fold_row_slots<Op, S + 1>(v, op);
  }
}
template <class Op, int S = 0>
IK_DEVICE void spread_row_slots(float (&v)[Layout::kC], Op op) {
  if constexpr (S < Layout::kC) {
    constexpr int lead = row_lead_slot<S>();
    if constexpr (lead == S) {
#pragma unroll
      for (int m = 1; m < Layout::kCRowSpan; m *= 2) v[S] = op(v[S], shfl_xor(v[S], m));
    } else {
      v[S] = v[lead];
    }
    spread_row_slots<Op, S + 1>(v, op);
  }
}
// The distinct rows of a C tile in one lane, numbered in slot order (lane-independent, as
// row_lead_slot): state kept per row rather than per slot (a softmax's running max and sum)
// needs kCRows values, not kCSlots (NVIDIA: 2 rows in 8 slots; CDNA and RDNA3: a row a slot).
constexpr int c_row_lead(int s) {  // the first slot of slot s's row
  int t = 0;
  while (Layout::c_row(0, t) != Layout::c_row(0, s)) ++t;
  return t;
}
constexpr int c_row_index(int s) {  // slot s's row, 0 .. kCRows - 1
  int n = 0;
  for (int t = 0; t < c_row_lead(s); ++t) n += c_row_lead(t) == t;
  return n;
}
constexpr int c_row_count() {
  int n = 0;
  for (int t = 0; t < Layout::kC; ++t) n += c_row_lead(t) == t;
  return n;
}
inline constexpr int kCRows = c_row_count();
constexpr int c_lead_of_row(int r) {  // the first slot of row r
  int t = 0;
  while (c_row_lead(t) != t || c_row_index(t) != r) ++t;
  return t;
}

template <class Op>
IK_DEVICE void row_reduce(float (&v)[Layout::kC], Op op) {
  fold_row_slots(v, op);
  spread_row_slots(v, op);  // leads are reduced before the slots after them copy them
}

template <class T>
IK_DEVICE unsigned short bits_at(const T* p) {
  return *reinterpret_cast<const unsigned short*>(p);
}

#if defined(IK_MMA_NV_M16N8K16)
template <class T>
struct FragA { unsigned int r[4]; };
template <class T>
struct FragB { unsigned int r[4]; };

IK_DEVICE unsigned int smem_addr(const void* p) {
  return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}
IK_DEVICE void ldmatrix_x4(unsigned int (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
IK_DEVICE void ldmatrix_x4_trans(unsigned int (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
// Lane l gives the address of row l%8 of 8x8 matrix l/8; the matrices are ordered to land in the
// register order mma.sync expects (see mma_layout.cuh).
template <class T>
IK_DEVICE void load_a(FragA<T>& a, const T* s, int ld) {
  int l = lane_id();
  ldmatrix_x4(a.r, s + (l % 8 + 8 * ((l / 8) % 2)) * ld + 8 * (l / 16));
}
// The same for a tile whose rows from `rows` on are not in memory (a slab of fewer than 16 rows):
// their lanes read row 0 instead, so those rows of the product are garbage the caller drops.
template <class T>
IK_DEVICE void load_a_rows(FragA<T>& a, const T* s, int ld, int rows) {
  int l = lane_id();
  int r = l % 8 + 8 * ((l / 8) % 2);
  ldmatrix_x4(a.r, s + (r < rows ? r : 0) * ld + 8 * (l / 16));
}
template <class T>
IK_DEVICE void load_b(FragB<T>& b, const T* s, int ld) {
  int l = lane_id();
  ldmatrix_x4_trans(b.r, s + (l % 8 + 8 * ((l / 8) % 2)) * ld + 8 * (l / 16));
}
template <class T>
IK_DEVICE void load_bt(FragB<T>& b, const T* s, int ld) {
  int l = lane_id();
  ldmatrix_x4(b.r, s + (l % 8 + 8 * (l / 16)) * ld + 8 * ((l / 8) % 2));
}
template <class T>
IK_DEVICE void set_a_pair(FragA<T>& a, int p, unsigned int bits) { a.r[p] = bits; }
template <class T>
IK_DEVICE void set_b_pair(FragB<T>& b, int p, unsigned int bits) { b.r[p] = bits; }
template <class T>
IK_DEVICE void mma_m16n8k16(float (&c)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
  if constexpr (is_same<T, bf16_t>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
template <class T>
IK_DEVICE void mma(FragC& c, const FragA<T>& a, const FragB<T>& b) {
  float* lo = c.x;
  float* hi = c.x + 4;
  mma_m16n8k16<T>(*reinterpret_cast<float(*)[4]>(lo), a.r, b.r[0], b.r[1]);
  mma_m16n8k16<T>(*reinterpret_cast<float(*)[4]>(hi), a.r, b.r[2], b.r[3]);
}

#else  // AMD (and the emulator's NVIDIA layout): fragments filled element by element from the layout's index math.
typedef _Float16 ik_f16x4 __attribute__((ext_vector_type(4)));
typedef short ik_i16x4 __attribute__((ext_vector_type(4)));
typedef _Float16 ik_f16x16 __attribute__((ext_vector_type(16)));
typedef short ik_i16x16 __attribute__((ext_vector_type(16)));
typedef float ik_f32x4 __attribute__((ext_vector_type(4)));
typedef float ik_f32x8 __attribute__((ext_vector_type(8)));

template <class T>
struct FragA { unsigned short x[Layout::kA]; };
template <class T>
struct FragB { unsigned short x[Layout::kB]; };

template <class T>
IK_DEVICE void load_a(FragA<T>& a, const T* s, int ld) {
  int l = lane_id();
#pragma unroll
  for (int i = 0; i < Layout::kA; ++i) a.x[i] = bits_at(s + Layout::a_row(l, i) * ld + Layout::a_col(l, i));
}
template <class T>
IK_DEVICE void load_a_rows(FragA<T>& a, const T* s, int ld, int rows) {
  int l = lane_id();
#pragma unroll
  for (int i = 0; i < Layout::kA; ++i) {
    int r = Layout::a_row(l, i);
    a.x[i] = bits_at(s + (r < rows ? r : 0) * ld + Layout::a_col(l, i));
  }
}
template <class T>
IK_DEVICE void load_b(FragB<T>& b, const T* s, int ld) {
  int l = lane_id();
#pragma unroll
  for (int i = 0; i < Layout::kB; ++i) b.x[i] = bits_at(s + Layout::b_row(l, i) * ld + Layout::b_col(l, i));
}
template <class T>
IK_DEVICE void load_bt(FragB<T>& b, const T* s, int ld) {
  int l = lane_id();
#pragma unroll
  for (int i = 0; i < Layout::kB; ++i) b.x[i] = bits_at(s + Layout::b_col(l, i) * ld + Layout::b_row(l, i));
}

template <class T>
IK_DEVICE void set_a_pair(FragA<T>& a, int p, unsigned int bits) {
  a.x[2 * p] = static_cast<unsigned short>(bits & 0xffffu);
  a.x[2 * p + 1] = static_cast<unsigned short>(bits >> 16);
}
template <class T>
IK_DEVICE void set_b_pair(FragB<T>& b, int p, unsigned int bits) {
  b.x[2 * p] = static_cast<unsigned short>(bits & 0xffffu);
  b.x[2 * p + 1] = static_cast<unsigned short>(bits >> 16);
}

#if defined(IK_MMA_AMD_MFMA_16X16X16)
template <class T>
IK_DEVICE void mma(FragC& c, const FragA<T>& a, const FragB<T>& b) {
  ik_f32x4 acc = {c.x[0], c.x[1], c.x[2], c.x[3]};
  if constexpr (is_same<T, bf16_t>::value) {
    ik_i16x4 va, vb;
#pragma unroll
    for (int i = 0; i < 4; ++i) { va[i] = static_cast<short>(a.x[i]); vb[i] = static_cast<short>(b.x[i]); }
    acc = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(va, vb, acc, 0, 0, 0);
  } else {
    ik_f16x4 va, vb;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      va[i] = __builtin_bit_cast(_Float16, a.x[i]);
      vb[i] = __builtin_bit_cast(_Float16, b.x[i]);
    }
    acc = __builtin_amdgcn_mfma_f32_16x16x16f16(va, vb, acc, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) c.x[i] = acc[i];
}
#elif defined(IK_MMA_EMULATED_NV)
template <class T>
IK_DEVICE void mma(FragC& c, const FragA<T>& a, const FragB<T>& b) {
  emu_layout_mma<Layout, is_same<T, bf16_t>::value>(c.x, a.x, b.x);
}
#else  // IK_MMA_AMD_WMMA_W32
template <class T>
IK_DEVICE void mma(FragC& c, const FragA<T>& a, const FragB<T>& b) {
  ik_f32x8 acc;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = c.x[i];
  if constexpr (is_same<T, bf16_t>::value) {
    ik_i16x16 va, vb;
#pragma unroll
    for (int i = 0; i < 16; ++i) { va[i] = static_cast<short>(a.x[i]); vb[i] = static_cast<short>(b.x[i]); }
    acc = __builtin_amdgcn_wmma_f32_16x16x16_bf16_w32(va, vb, acc);
  } else {
    ik_f16x16 va, vb;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      va[i] = __builtin_bit_cast(_Float16, a.x[i]);
      vb[i] = __builtin_bit_cast(_Float16, b.x[i]);
    }
    acc = __builtin_amdgcn_wmma_f32_16x16x16_f16_w32(va, vb, acc);
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) c.x[i] = acc[i];
}
#endif
#endif  // vendor

// A C tile (fp32) as the A operand of a next product, rounded to T: softmax weights P in P*V.
// Where the layouts agree (NVIDIA) it stays in registers; elsewhere it goes through `scratch`,
// kCToAScratch elements of this warp's own in shared memory (16 rows of kCToALd).
inline constexpr bool kCIsA = layout::c_matches_a<Layout>();
inline constexpr int kCToALd = 24;  // 48-byte rows: 16-byte aligned, off each other's banks
inline constexpr int kCToAScratch = kCIsA ? 0 : 16 * kCToALd;
template <class T>
IK_DEVICE void c_to_a(FragA<T>& a, const FragC& c, T* scratch) {
  if constexpr (kCIsA) {
    (void)scratch;
#pragma unroll
    for (int p = 0; p < kASlots / 2; ++p)
      set_a_pair(a, p, dtype<T>::bits_from_float(c.x[2 * p]) | (static_cast<unsigned int>(dtype<T>::bits_from_float(c.x[2 * p + 1])) << 16));
  } else {
    warp_sync();  // the warp's last load_a of the scratch is done
#pragma unroll
    for (int s = 0; s < kCSlots; ++s) scratch[c_row(s) * kCToALd + c_col(s)] = dtype<T>::from_float(c.x[s]);
    warp_sync();
    load_a(a, scratch, kCToALd);
  }
}
#endif  // IK_HAS_MMA

}  // namespace mma
}  // namespace ik
