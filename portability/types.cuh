// types.cuh -- fp16/bf16 storage types and conversions, in one vocabulary for both vendors.
#pragma once

namespace ik {

using half_t = vendor::half_t;
using bf16_t = vendor::bf16_t;

template <class A, class B>
struct is_same { static constexpr bool value = false; };
template <class A>
struct is_same<A, A> { static constexpr bool value = true; };

// Compile-time iteration: f(ik::Const<I>{}) for I = B .. E - 1, each I a constant expression in
// f (decltype(i)::value). For indices computed by constexpr functions from the loop index: after a
// plain unrolled loop NVVM left such indices runtime values and the arrays they index in local
// memory (the prefill kernel's softmax state: 66 stores and 76 loads a tile on sm_90).
template <int V>
struct Const { static constexpr int value = V; };
template <int B, int E, class F>
IK_DEVICE void static_for(F&& f) {
  if constexpr (B < E) {
    f(Const<B>{});
    static_for<B + 1, E>(f);
  }
}

IK_DEVICE float bf16_bits_to_float(unsigned int bits16) { return __uint_as_float(bits16 << 16); }
// Round to nearest even; NaN stays a (quiet) NaN. (The vendor's: one instruction on NVIDIA, where
// the integer rounding cost ~6 instructions an element of the prefill kernel's P.)
IK_DEVICE unsigned short float_to_bf16_bits(float f) { return vendor::float_to_bf16_bits(f); }

// A signed byte to float without a conversion instruction (NVIDIA runs I2F at 16 a clock an SM,
// the logic op and add that replace it at 64 and 128; an INT8 cache converts every element it
// reads): b + 128 (offset binary) OR-ed into the mantissa of 2^23, then 2^23 + 128 subtracted,
// exactly. (NVVM already does this for small unsigned integers, KIVI's nibbles: not for signed.)
IK_DEVICE float int8_to_float(unsigned int b) {  // the low byte of b, two's complement
  return __uint_as_float((b & 0xffu) ^ 0x4b000080u) - 8388736.0f;
}

// Element traits: ik::dtype<T>::to_float / from_float / unpack2 (two packed elements -> float2).
template <class T>
struct dtype;

template <>
struct dtype<half_t> {
  static IK_DEVICE float to_float(half_t h) { return vendor::half_to_float(h); }
  static IK_DEVICE half_t from_float(float f) { return vendor::float_to_half(f); }
  static IK_DEVICE float2 unpack2(unsigned int u) { return vendor::half2_bits_to_float2(u); }
  static IK_DEVICE unsigned short bits(half_t h) { return vendor::half_bits(h); }
  static IK_DEVICE unsigned short bits_from_float(float f) { return vendor::half_bits(from_float(f)); }
  // 1024.0: OR-ing a 4-bit code q into its low mantissa bits gives exactly 1024 + q.
  static constexpr unsigned int kInt4Base = 0x6400u;
  // fp16's 10 mantissa bits hold a code at bits 4-7 too: 1024 + 16q exactly, which one FMA by
  // 1/16 (0x2c00) against -(64 + z) = 960 (0x6380) - (1024 + z) turns into q - z: no shift.
  static constexpr bool kInt4HighNibbles = true;
  static constexpr unsigned int kInt4Sixteenth = 0x2c00u, kInt4HighShift = 0x6380u;
  static IK_DEVICE unsigned int fma2(unsigned int a, unsigned int b, unsigned int c) { return vendor::half2_fma(a, b, c); }
  static IK_DEVICE unsigned int mul2(unsigned int a, unsigned int b) { return vendor::half2_mul(a, b); }
  static IK_DEVICE unsigned int sub2(unsigned int a, unsigned int z) { return vendor::half2_sub(a, z); }
  static IK_DEVICE unsigned int sub_mul2(unsigned int a, unsigned int z, unsigned int s) {
    return vendor::half2_sub_mul(a, z, s);
  }
};

template <>
struct dtype<bf16_t> {
  static IK_DEVICE float to_float(bf16_t h) { return bf16_bits_to_float(vendor::bf16_bits(h)); }
  static IK_DEVICE bf16_t from_float(float f) { return vendor::bf16_from_bits(float_to_bf16_bits(f)); }
  static IK_DEVICE float2 unpack2(unsigned int u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
  static IK_DEVICE unsigned short bits(bf16_t h) { return vendor::bf16_bits(h); }
  static IK_DEVICE unsigned short bits_from_float(float f) { return float_to_bf16_bits(f); }
  // 128.0 (7 mantissa bits): OR-ing a 4-bit code q into it gives exactly 128 + q.
  static constexpr unsigned int kInt4Base = 0x4300u;
  static constexpr bool kInt4HighNibbles = false;  // bit 7 is the exponent's: every pair shifts
  static IK_DEVICE unsigned int sub2(unsigned int a, unsigned int z) { return vendor::bf162_sub(a, z); }
  static IK_DEVICE unsigned int sub_mul2(unsigned int a, unsigned int z, unsigned int s) {
    return vendor::bf162_sub_mul(a, z, s);
  }
};

// INT4 -> fp16/bf16 without integer-to-float conversions ("magic number" unpacking): nibbles j
// and j+4 of `word` become the low and high element of one packed pair, exactly q - z (small
// integers, for kernels that scale later). z2 holds the zero point as base + z in both halves.
// fp16, j odd: the codes masked in place (bits 4-7 of each half) and one FMA, so a word's four
// pairs take one shift (by 8, for j 2 and 3) where each pair took one; the shifts and masks run
// on the integer pipe, which bounded the W4A16 loop (docs/results/w4a16.md).
template <class T>
IK_DEVICE unsigned int int4_pair_unscaled(unsigned int word, int j, unsigned int z2) {
  constexpr unsigned int kBase2 = dtype<T>::kInt4Base * 0x10001u;
  if constexpr (dtype<T>::kInt4HighNibbles) {
    const unsigned int w = word >> (8 * (j / 2));
    if (j % 2 == 0) return dtype<T>::sub2((w & 0x000f000fu) | kBase2, z2);
    return dtype<T>::fma2((w & 0x00f000f0u) | kBase2, dtype<T>::kInt4Sixteenth * 0x10001u,
                          dtype<T>::sub2(dtype<T>::kInt4HighShift * 0x10001u, z2));
  } else {
    return dtype<T>::sub2(((word >> (4 * j)) & 0x000f000fu) | kBase2, z2);
  }
}

// The same scaled: (q - z) * s, rounded once (q - z is exact). s2: the scale in both halves.
template <class T>
IK_DEVICE unsigned int int4_pair(unsigned int word, int j, unsigned int z2, unsigned int s2) {
  constexpr unsigned int kBase2 = dtype<T>::kInt4Base * 0x10001u;
  if constexpr (dtype<T>::kInt4HighNibbles) {
    if (j % 2 == 1) return dtype<T>::mul2(int4_pair_unscaled<T>(word, j, z2), s2);
    return dtype<T>::sub_mul2(((word >> (8 * (j / 2))) & 0x000f000fu) | kBase2, z2, s2);
  } else {
    return dtype<T>::sub_mul2(((word >> (4 * j)) & 0x000f000fu) | kBase2, z2, s2);
  }
}

// Eight 16-bit elements held in one 16-byte vector <-> eight floats.
template <class T>
IK_DEVICE void unpack8(const uint4& v, float out[8]) {
  float2 a = dtype<T>::unpack2(v.x), b = dtype<T>::unpack2(v.y);
  float2 c = dtype<T>::unpack2(v.z), d = dtype<T>::unpack2(v.w);
  out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
  out[4] = c.x; out[5] = c.y; out[6] = d.x; out[7] = d.y;
}
template <class T>
IK_DEVICE uint4 pack8(const float in[8]) {
  unsigned int w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = static_cast<unsigned int>(dtype<T>::bits_from_float(in[2 * i])) |
           (static_cast<unsigned int>(dtype<T>::bits_from_float(in[2 * i + 1])) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace ik
