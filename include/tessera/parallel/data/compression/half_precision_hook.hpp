#pragma once
/// @file
/// HalfPrecisionHook: gradients cross the link as bf16 or fp16 (half the bytes of fp32) and are
/// accumulated in the gradient's own type (fp32) on the receiving side, as a reduce-scatter of
/// 16-bit blocks followed by an all-gather of the 16-bit reduced blocks. PyTorch DDP's
/// `bf16_compress_hook` / `fp16_compress_hook` send 16 bits the same way, but NCCL also sums in
/// 16 bits; here each sum is taken in fp32 from the 16-bit addends.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <cstring>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"
#include "tessera/parallel/data/compression/half_float.hpp"

namespace tessera {

/// bf16 / fp16 transport with accumulation in T. For a bucket of n elements over p ranks, with
/// blocks of B = n / p rounded up to an even count:
/// 1. every element is rounded to 16 bits (HalfFormat);
/// 2. reduce-scatter by point-to-point: rank j receives block j of every rank and sums the p
///    decoded addends in T, in rank order (deterministic);
/// 3. rank j rounds its summed block to 16 bits and the blocks are all-gathered; every rank
///    decodes the same 16-bit values, so replicas stay bitwise identical.
/// Bytes sent per rank: 2 (p - 1) B * 2 bytes, half of a ring all-reduce in fp32. The error of
/// the result is the rounding of each addend and of the sum to 16 bits (relative 2^-9 for bf16,
/// 2^-12 for fp16 per rounding); fp16 overflows to infinity beyond 65504 (no loss scaling here).
/// The 16-bit values travel packed two to an int32 (the communicator's element types).
template <std::floating_point T>
class HalfPrecisionHook final : public CommHook<T> {
 public:
  /// A hook sending `format`.
  explicit HalfPrecisionHook(HalfFormat format = HalfFormat::bf16) : format_(format) {}

  /// Replaces `bucket.grad` with the sum over ranks as described in the class comment.
  /// Collective over `comm`: one batched exchange of p - 1 sends and receives, one all-gather.
  void reduce(GradBucketView<T>& bucket, Comm& comm) override {
    const std::size_t p = static_cast<std::size_t>(comm.size()), me = static_cast<std::size_t>(comm.rank());
    const std::size_t n = bucket.grad.size();
    std::size_t block = (n + p - 1) / p;
    block += block % 2;             // 16-bit values per block (even: packed in int32)
    const std::size_t words = block / 2;  // int32 per block
    send_.assign(p * words, 0);
    auto* halves = reinterpret_cast<std::uint16_t*>(send_.data());
    for (std::size_t i = 0; i < n; ++i) halves[i] = encode_half(format_, static_cast<float>(bucket.grad[i]));
    recv_.assign(p * words, 0);
    std::vector<P2POp> ops;
    for (std::size_t j = 0; j < p; ++j) {
      if (j == me) continue;
      ops.push_back(P2POp::send(std::span<const std::int32_t>(send_.data() + j * words, words), static_cast<int>(j), tag));
      ops.push_back(P2POp::recv(std::span<std::int32_t>(recv_.data() + j * words, words), static_cast<int>(j), tag));
    }
    if (!ops.empty()) comm.batch_send_recv(ops);
    this->count_sent((p - 1) * words * sizeof(std::int32_t));
    // Block `me` of rank j: this rank's own block for j == me, else what j sent.
    std::vector<std::int32_t> mine(words);
    auto* out = reinterpret_cast<std::uint16_t*>(mine.data());
    for (std::size_t e = 0; e < block; ++e) {
      T sum = 0;
      for (std::size_t j = 0; j < p; ++j) {
        // Rank j's block `me`: this rank's own (send_) for j == me, else what j sent (recv_).
        const auto* src = reinterpret_cast<const std::uint16_t*>((j == me ? send_.data() : recv_.data()) + j * words);
        sum += static_cast<T>(decode_half(format_, src[e]));
      }
      out[e] = encode_half(format_, static_cast<float>(sum));
    }
    comm.all_gather(mine, recv_);
    this->count_all_gather(words, sizeof(std::int32_t), comm.size());
    const auto* all = reinterpret_cast<const std::uint16_t*>(recv_.data());
    for (std::size_t i = 0; i < n; ++i) bucket.grad[i] = static_cast<T>(decode_half(format_, all[i]));
  }

  /// Point-to-point form (a parameter server's push): each value rounded to 16 bits, packed
  /// sizeof(T) / 2 to an element of T (bit patterns, not numbers); the receiver decodes and
  /// sums in T. Half the bytes of sending T = float.
  bool point_to_point() const override { return true; }
  /// ceil(2 n / sizeof(T)).
  std::size_t encoded_size(std::size_t n) const override { return (2 * n + sizeof(T) - 1) / sizeof(T); }
  /// Rounds `values` to 16 bits into `out` (encoded_size(values.size()) elements; the unused
  /// tail is 0). Throws tessera::Error when out has another size.
  void encode(std::span<const T> values, std::span<T> out) override {
    TESSERA_EXPECTS(out.size() == encoded_size(values.size()), "HalfPrecisionHook::encode: ", values.size(),
                    " values need ", encoded_size(values.size()), " elements, got ", out.size());
    std::vector<std::uint16_t> halves(out.size() * sizeof(T) / 2, 0);
    for (std::size_t i = 0; i < values.size(); ++i) halves[i] = encode_half(format_, static_cast<float>(values[i]));
    std::memcpy(out.data(), halves.data(), out.size() * sizeof(T));
    this->count_sent(out.size() * sizeof(T));
  }
  /// The values encode rounded, into `values`. Throws tessera::Error when in has another size
  /// than encoded_size(values.size()).
  void decode(std::span<const T> in, std::span<T> values) const override {
    TESSERA_EXPECTS(in.size() == encoded_size(values.size()), "HalfPrecisionHook::decode: ", values.size(),
                    " values need ", encoded_size(values.size()), " elements, got ", in.size());
    std::vector<std::uint16_t> halves(in.size() * sizeof(T) / 2);
    std::memcpy(halves.data(), in.data(), in.size() * sizeof(T));
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<T>(decode_half(format_, halves[i]));
  }

  /// "bf16" or "fp16".
  std::string name() const override { return format_ == HalfFormat::bf16 ? "bf16" : "fp16"; }
  /// The transport format.
  HalfFormat format() const noexcept { return format_; }

 private:
  static constexpr int tag = 16016;  // the point-to-point tag of the exchange
  HalfFormat format_;
  std::vector<std::int32_t> send_, recv_;  // packed 16-bit blocks, p blocks each
};

}  // namespace tessera
