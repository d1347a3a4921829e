#pragma once
/// @file
/// Recompute: how much of a layer's forward state is kept for backward and how much is
/// recomputed -- none, selective (Korthikanti et al., "Reducing Activation Recomputation in
/// Large Transformer Models", 2022: recompute only attention's softmax core, keep the GEMM
/// outputs) or full (Chen et al. 2016: keep only the input, rerun the forward in backward) --
/// the selective scope the layers read, and the activation bytes each choice keeps for the GPT
/// block (Korthikanti et al.'s accounting carried to tessera's fp32 layers).

#include <cstdint>
#include <string>
#include <string_view>

#include "tessera/core/error.hpp"

namespace tessera::nn {

/// What a layer (or a pipeline stage) keeps between forward and backward.
enum class Recompute {
  none,       ///< keep every context (no extra compute)
  selective,  ///< drop the attention probabilities (B, heads, T, T) and recompute them in backward
  full,       ///< keep only the stage's input; rerun the whole forward before backward
};

/// "none", "selective" or "full".
inline const char* to_string(Recompute r) noexcept {
  switch (r) {
    case Recompute::none: return "none";
    case Recompute::selective: return "selective";
    case Recompute::full: return "full";
  }
  return "?";
}

/// The Recompute named `name` ("none", "selective", "full"). Throws tessera::Error naming the
/// value and the choices otherwise.
inline Recompute parse_recompute(std::string_view name) {
  if (name == "none") return Recompute::none;
  if (name == "selective") return Recompute::selective;
  if (name == "full") return Recompute::full;
  throw Error(tessera::detail::str("recompute: '", std::string(name), "' is not one of none, selective, full"));
}

/// While alive on a thread, the layers with a selective form (nn::CoreAttention) keep only
/// what they need to recompute their cheap, memory-heavy part in backward (Korthikanti et al.
/// 2022, sec. 5: the softmax of q k^T, which is O(heads T^2) per sequence). Results are
/// bitwise those of the stored form. Scopes nest; the previous state is restored on
/// destruction.
class SelectiveRecompute {
 public:
  /// Turns selective recomputation on (`on` = true) or off for the scope's lifetime.
  explicit SelectiveRecompute(bool on = true) noexcept : previous_(flag()) { flag() = on; }
  /// Restores the previous state.
  ~SelectiveRecompute() { flag() = previous_; }
  SelectiveRecompute(const SelectiveRecompute&) = delete;             ///< not copyable
  SelectiveRecompute& operator=(const SelectiveRecompute&) = delete;  ///< not copyable
  /// Whether a scope is on for this thread.
  static bool active() noexcept { return flag(); }

 private:
  static bool& flag() noexcept {
    thread_local bool on = false;
    return on;
  }
  bool previous_;
};

/// The activation bytes one GPT block (nn::Block: ln_1, attention, ln_2, MLP) keeps from its
/// forward to its backward for a micro-batch of b sequences of s tokens, width h, a heads, in
/// elements of `element_bytes` (4 for fp32), under `r` -- Korthikanti et al.'s per-layer
/// accounting (their eq. 1: s b h (34 + 5 a s / h) bytes in fp16 with dropout masks; with
/// selective recomputation 34 s b h) carried to tessera's layers, which keep fp32 tensors and
/// have no dropout inside the block:
///  - none: ln_1 and ln_2 keep x-hat (s b h each) and 1/sigma (s b each); the attention keeps
///    its input (s b h), q k v (3 s b h), the softmax probabilities (a s^2 b) and the core's
///    output (s b h); the MLP keeps its input (s b h), the GELU's input and gate (4 s b h
///    each) and the GELU's output (4 s b h): (20 s b h + 2 s b + a s^2 b) elements;
///  - selective: the same without the probabilities: (20 s b h + 2 s b);
///  - full: the block keeps nothing of its own (a full-recompute stage keeps only its input,
///    s b h, counted once per stage, not per block): 0.
/// Throws tessera::Error unless every size is positive.
inline std::int64_t block_activation_bytes(std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t a,
                                           Recompute r, std::int64_t element_bytes = 4) {
  TESSERA_EXPECTS(b > 0 && s > 0 && h > 0 && a > 0 && element_bytes > 0, "block_activation_bytes: sizes b=", b,
                  " s=", s, " h=", h, " a=", a, " element_bytes=", element_bytes, " must be positive");
  if (r == Recompute::full) return 0;
  const std::int64_t elements = 20 * s * b * h + 2 * s * b + (r == Recompute::none ? a * s * s * b : 0);
  return elements * element_bytes;
}

}  // namespace tessera::nn
