#pragma once
/// @file
/// Element types that tessera moves between ranks.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace tessera {

/// Element type of a buffer handed to a communicator: fp32 and fp64 for data, int32 and int64
/// for control values (counts, step numbers, flags).
enum class DType { f32, f64, i32, i64 };

/// A C++ type that a communicator accepts: float, double, std::int32_t, std::int64_t.
template <class T>
concept CommScalar = std::same_as<T, float> || std::same_as<T, double> ||
                     std::same_as<T, std::int32_t> || std::same_as<T, std::int64_t>;

/// The DType of a CommScalar.
template <CommScalar T>
inline constexpr DType dtype_of = std::same_as<T, float>          ? DType::f32
                                  : std::same_as<T, double>       ? DType::f64
                                  : std::same_as<T, std::int32_t> ? DType::i32
                                                                  : DType::i64;

/// Size of one element in bytes.
constexpr std::size_t size_of(DType t) noexcept {
  return (t == DType::f32 || t == DType::i32) ? 4 : 8;
}

/// Short name ("float32", "float64", "int32", "int64"), as used in errors and checkpoints.
constexpr std::string_view name_of(DType t) noexcept {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
  }
  return "?";
}

/// Reduction applied by all_reduce and reduce_scatter. `avg` is the sum divided by the number
/// of ranks (NCCL's ncclAvg; MPI: sum then divide).
enum class ReduceOp { sum, avg, max, min };

/// Name of a ReduceOp ("sum", "avg", "max", "min").
constexpr std::string_view name_of(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::avg: return "avg";
    case ReduceOp::max: return "max";
    case ReduceOp::min: return "min";
  }
  return "?";
}

}  // namespace tessera
