#pragma once
/// @file
/// Counter-based random numbers for parameter initialization: the value of element i of a
/// parameter is a pure function of (seed, parameter name, global index i), so a tensor-parallel
/// shard generates exactly its slice of the serial model's values without generating the rest,
/// and the result does not depend on the order or the number of ranks that generate it.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>
#include <string_view>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera {

namespace detail {
/// splitmix64 finalizer (Steele, Lea, Flood, "Fast splittable pseudorandom number generators",
/// OOPSLA 2014): a bijective 64-bit mix with full avalanche.
constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
}  // namespace detail

/// A 64-bit id of a random stream named `name` (FNV-1a), e.g. of a parameter's name
/// "h.0.attn.c_attn.weight". Stable across platforms and runs.
constexpr std::uint64_t stream_id(std::string_view name) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (char c : name) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

/// The key of stream `stream` under `seed`, the first half of random_bits (hoisted out of
/// loops over counters).
constexpr std::uint64_t stream_key(std::uint64_t seed, std::uint64_t stream) noexcept {
  return detail::splitmix64(detail::splitmix64(seed) ^ stream);
}

/// 64 random bits at position `counter` of stream `stream` under `seed` (counter-based, as in
/// Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011, here with splitmix64
/// as the mixing function).
constexpr std::uint64_t random_bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter) noexcept {
  return detail::splitmix64(stream_key(seed, stream) ^ counter);
}

/// Two independent standard normal samples, elements 2k and 2k+1 of a stream with key `key`
/// (see stream_key), by the Box-Muller transform of the uniforms at counters 2k and 2k+1.
inline std::pair<double, double> normal_pair(std::uint64_t key, std::uint64_t k) noexcept {
  constexpr double two_pow_m53 = 1.0 / 9007199254740992.0;
  // u1 in (0, 1] so that log(u1) is finite; u2 in [0, 1).
  const double u1 = static_cast<double>((detail::splitmix64(key ^ (2 * k)) >> 11) + 1) * two_pow_m53;
  const double u2 = static_cast<double>(detail::splitmix64(key ^ (2 * k + 1)) >> 11) * two_pow_m53;
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double a = 2.0 * std::numbers::pi * u2;
  return {r * std::cos(a), r * std::sin(a)};
}

/// The standard normal sample at position `index` of stream `stream` under `seed`: the first
/// (even index) or second (odd index) value of normal_pair(key, index / 2).
inline double normal_at(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) noexcept {
  const auto [z0, z1] = normal_pair(stream_key(seed, stream), index / 2);
  return index % 2 == 0 ? z0 : z1;
}

/// Fills `t` with normal(0, std) samples of the stream named `name`, where `t` is the block at
/// `offset` of a (virtual) tensor of `global_shape`: element j of `t` gets the sample at the
/// row-major index of `offset + j` in `global_shape`. A shard filled this way equals the slice
/// of the full tensor filled with the same seed and name, bitwise.
///
/// Throws tessera::Error when `t` has another rank than `global_shape` or the block does not
/// fit inside it.
template <class T>
  requires std::floating_point<T>
void fill_normal(const Tensor<T>& t, std::uint64_t seed, std::string_view name, double std,
                 const Shape& global_shape, const Index& offset) {
  TESSERA_EXPECTS(t.rank() == global_shape.rank(), "fill_normal(", name, "): block of shape ", t.shape(),
                  " has another rank than the global shape ", global_shape);
  for (int d = 0; d < t.rank(); ++d)
    TESSERA_EXPECTS(offset[static_cast<std::size_t>(d)] >= 0 &&
                        offset[static_cast<std::size_t>(d)] + t.size(d) <= global_shape[d],
                    "fill_normal(", name, "): block of shape ", t.shape(), " at offset ",
                    offset[static_cast<std::size_t>(d)], " in dim ", d, " does not fit in ", global_shape);
  const std::uint64_t key = stream_key(seed, stream_id(name));
  const Index gs = detail::contiguous_strides(global_shape);
  const Index e = detail::padded(t.shape().dims(), t.rank(), 1);
  const Index ts = detail::padded(t.strides(), t.rank(), 0);
  const Index go = detail::padded(offset, t.rank(), 0);
  const Index gst = detail::padded(gs, t.rank(), 0);
  std::uint64_t pair_index = ~std::uint64_t{0};
  std::pair<double, double> pair{};
  for (std::int64_t a = 0; a < e[0]; ++a)
    for (std::int64_t b = 0; b < e[1]; ++b)
      for (std::int64_t c = 0; c < e[2]; ++c)
        for (std::int64_t x = 0; x < e[3]; ++x) {
          const auto g = static_cast<std::uint64_t>((go[0] + a) * gst[0] + (go[1] + b) * gst[1] +
                                                    (go[2] + c) * gst[2] + (go[3] + x) * gst[3]);
          if (g / 2 != pair_index) {  // consecutive elements share one Box-Muller pair
            pair_index = g / 2;
            pair = normal_pair(key, pair_index);
          }
          t.data()[a * ts[0] + b * ts[1] + c * ts[2] + x * ts[3]] =
              static_cast<T>(std * (g % 2 == 0 ? pair.first : pair.second));
        }
}

/// Fills the whole tensor `t` with normal(0, std) samples of the stream named `name`.
template <class T>
  requires std::floating_point<T>
void fill_normal(const Tensor<T>& t, std::uint64_t seed, std::string_view name, double std) {
  fill_normal(t, seed, name, std, t.shape(), Index{});
}

}  // namespace tessera
