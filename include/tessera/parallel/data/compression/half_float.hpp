#pragma once
/// @file
/// Conversions between float and the two 16-bit floating-point formats of gradient transport:
/// bfloat16 (8-bit exponent, 7-bit mantissa: float's range) and IEEE 754 binary16 (fp16:
/// 5-bit exponent, 10-bit mantissa), rounding to nearest, ties to even, as hardware converts.

#include <bit>
#include <cstdint>

namespace tessera {

/// A 16-bit transport format.
enum class HalfFormat {
  bf16,  ///< bfloat16: float's exponent range, 8 significant bits
  fp16,  ///< IEEE binary16: largest finite 65504, 11 significant bits
};

/// `x` rounded to bfloat16 (nearest, ties to even); NaN stays a (quiet) NaN.
inline std::uint16_t float_to_bf16(float x) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // NaN
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}

/// The float value of bfloat16 bits (exact).
inline float bf16_to_float(std::uint16_t h) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

/// `x` rounded to IEEE binary16 (nearest, ties to even); beyond 65504 (after rounding) it
/// becomes infinity, below the smallest subnormal (2^-24) zero; NaN stays NaN.
inline std::uint16_t float_to_fp16(float x) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  const int exp = static_cast<int>(a >> 23) - 127;
  if (exp >= -14) {  // normal in fp16
    std::uint32_t m = a & 0x7fffffu;
    std::uint32_t h = (static_cast<std::uint32_t>(exp + 15) << 10) | (m >> 13);
    const std::uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
    return static_cast<std::uint16_t>(sign | h);
  }
  if (exp < -25) return sign;  // below half the smallest subnormal
  // Subnormal: value = m' * 2^-24 with m' = full significand >> (-exp - 14 + 13).
  const std::uint32_t full = (a & 0x7fffffu) | 0x800000u;
  const int shift = -exp - 14 + 13;  // 14..24
  std::uint32_t h = full >> shift;
  const std::uint32_t rest = full & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

/// The float value of IEEE binary16 bits (exact).
inline float fp16_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
  if (exp == 0) {
    const float v = static_cast<float>(m) * 0x1p-24f;
    return sign ? -v : v;
  }
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (m << 13));
}

/// `x` rounded to `f`'s bits.
inline std::uint16_t encode_half(HalfFormat f, float x) noexcept {
  return f == HalfFormat::bf16 ? float_to_bf16(x) : float_to_fp16(x);
}
/// The float value of `f`'s bits `h`.
inline float decode_half(HalfFormat f, std::uint16_t h) noexcept {
  return f == HalfFormat::bf16 ? bf16_to_float(h) : fp16_to_float(h);
}

}  // namespace tessera
