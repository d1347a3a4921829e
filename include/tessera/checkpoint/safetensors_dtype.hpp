#pragma once
/// @file
/// SafetensorsDType: the element types tessera reads and writes in safetensors files, their
/// names in the file ("F32", ...), sizes, and conversion of stored elements to a Tensor's type.

#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#include "tessera/core/tensor.hpp"

namespace tessera::checkpoint {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; tessera's checkpoints support little-endian hosts only.");

/// Element type of a tensor in a safetensors file: "F16", "BF16", "F32", "F64", "I32", "I64"
/// (the names of the format, https://github.com/huggingface/safetensors). tessera writes F32,
/// F64, I32 and I64; it reads all six, converting F16 and BF16 (as in Hugging Face's GPT-2
/// files of other precisions) to the Tensor's type.
enum class SafetensorsDType {
  f16,   ///< "F16": IEEE binary16 (read only)
  bf16,  ///< "BF16": bfloat16 (read only)
  f32,   ///< "F32": float
  f64,   ///< "F64": double
  i32,   ///< "I32": std::int32_t
  i64    ///< "I64": std::int64_t
};

/// The name in the file: "F16", "BF16", "F32", "F64", "I32", "I64".
constexpr std::string_view name_of(SafetensorsDType t) noexcept {
  switch (t) {
    case SafetensorsDType::f16: return "F16";
    case SafetensorsDType::bf16: return "BF16";
    case SafetensorsDType::f32: return "F32";
    case SafetensorsDType::f64: return "F64";
    case SafetensorsDType::i32: return "I32";
    case SafetensorsDType::i64: return "I64";
  }
  return "?";
}

/// The dtype named `name` in a file, or nothing for a name tessera does not read.
constexpr std::optional<SafetensorsDType> parse_safetensors_dtype(std::string_view name) noexcept {
  for (SafetensorsDType t : {SafetensorsDType::f16, SafetensorsDType::bf16, SafetensorsDType::f32,
                             SafetensorsDType::f64, SafetensorsDType::i32, SafetensorsDType::i64})
    if (name_of(t) == name) return t;
  return std::nullopt;
}

/// Bytes per element.
constexpr std::size_t size_of(SafetensorsDType t) noexcept {
  switch (t) {
    case SafetensorsDType::f16:
    case SafetensorsDType::bf16: return 2;
    case SafetensorsDType::f32:
    case SafetensorsDType::i32: return 4;
    case SafetensorsDType::f64:
    case SafetensorsDType::i64: return 8;
  }
  return 0;
}

/// Whether elements of `t` are floating point.
constexpr bool is_floating(SafetensorsDType t) noexcept {
  return t != SafetensorsDType::i32 && t != SafetensorsDType::i64;
}

/// The dtype tessera writes for a Tensor<T>.
template <TensorScalar T>
inline constexpr SafetensorsDType safetensors_dtype_of = std::same_as<T, float>          ? SafetensorsDType::f32
                                                         : std::same_as<T, double>       ? SafetensorsDType::f64
                                                         : std::same_as<T, std::int32_t> ? SafetensorsDType::i32
                                                                                         : SafetensorsDType::i64;

namespace detail {
/// IEEE 754 binary16 bits to float (subnormals, infinities and NaN included).
inline float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000U) << 16;
  std::uint32_t exp = (h >> 10) & 0x1FU;
  std::uint32_t mant = h & 0x3FFU;
  std::uint32_t bits = 0;
  if (exp == 0x1FU) {
    bits = sign | 0x7F800000U | (mant << 13);  // inf or NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112U) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant != 0) {
    exp = 113;  // subnormal: normalize
    while ((mant & 0x400U) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FFU) << 13);
  } else {
    bits = sign;  // signed zero
  }
  return std::bit_cast<float>(bits);
}

/// bfloat16 bits to float (the upper half of a float's bits).
inline float bfloat16_to_float(std::uint16_t b) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

/// Converts `n` stored elements of type `t` at `src` (any alignment) to T at `dst`.
/// Same type: one memcpy; otherwise element by element (a C++ static_cast).
template <TensorScalar T>
void convert_elements(const std::byte* src, SafetensorsDType t, T* dst, std::size_t n) noexcept {
  if (t == safetensors_dtype_of<T>) {
    std::memcpy(dst, src, n * sizeof(T));
    return;
  }
  auto each = [&]<class S>(S) {
    for (std::size_t i = 0; i < n; ++i) {
      S s;
      std::memcpy(&s, src + i * sizeof(S), sizeof(S));
      if constexpr (std::same_as<S, std::uint16_t>) {
        dst[i] = static_cast<T>(t == SafetensorsDType::f16 ? half_to_float(s) : bfloat16_to_float(s));
      } else {
        dst[i] = static_cast<T>(s);
      }
    }
  };
  switch (t) {
    case SafetensorsDType::f16:
    case SafetensorsDType::bf16: each(std::uint16_t{}); break;
    case SafetensorsDType::f32: each(float{}); break;
    case SafetensorsDType::f64: each(double{}); break;
    case SafetensorsDType::i32: each(std::int32_t{}); break;
    case SafetensorsDType::i64: each(std::int64_t{}); break;
  }
}
}  // namespace detail

}  // namespace tessera::checkpoint
