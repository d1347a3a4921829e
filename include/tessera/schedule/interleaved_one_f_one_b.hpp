#pragma once
/// @file
/// InterleavedOneFOneB: the interleaved 1F1B schedule with virtual pipeline stages of
/// Megatron-LM's forward_backward_pipelining_with_interleaving (Narayanan et al., "Efficient
/// Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC 2021).

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/detail/megatron_builder.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::schedule {

/// One entry of the interleaved schedule's order: micro-batch `microbatch` on model chunk
/// `chunk` (Megatron-LM's schedule table entry).
struct ChunkStep {
  int microbatch = 0;  ///< micro-batch index
  int chunk = 0;       ///< model chunk index on the rank (stage = chunk * pp_size + rank)
  /// Equal when both fields are equal.
  friend bool operator==(const ChunkStep&, const ChunkStep&) = default;
};

/// Interleaved 1F1B (Narayanan et al., SC 2021) exactly as Megatron-LM runs it with
/// batch_p2p_comm: each rank holds `virtual_stages` model chunks (v), chunk c of rank r being
/// stage c * pp_size + r. Micro-batches go through the chunks in groups of
/// `microbatch_group_size` (Megatron's microbatch_group_size_per_vp_stage, default pp_size):
/// for p = 2, v = 2, group 2, m = 4 every rank runs its forwards on (micro-batch, chunk)
/// (0,0) (1,0) (0,1) (1,1) (2,0) (3,0) (2,1) (3,1) -- micro-batches "0 1 0 1 2 3 2 3".
/// Backwards follow the same table with the chunks reversed.
///
/// Rank r runs num_warmup = (p - r - 1) * 2 + (v - 1) * group forwards first (capped at
/// m * v), then steady F + B pairs, then the remaining backwards. Bubble ratio (p-1)/(v m) at
/// the price of v times the point-to-point traffic.
///
/// virtual_stages = 1 is allowed (Megatron's interleaved code path with one chunk: warm-up
/// 2 (p - r - 1), more activations in flight than OneFOneB for the same bubble).
///
/// Constraints (Megatron-LM's): pp_size <= group <= num_microbatches, and num_microbatches %
/// group must be 0 or >= pp_size; build() throws Error naming the numbers otherwise.
///
/// Options are set with designated initializers:
/// `InterleavedOneFOneB{.num_microbatches = 8, .virtual_stages = 2}.build(4)`.
struct InterleavedOneFOneB {
  int num_microbatches = 1;       ///< m, micro-batches per step (>= pp_size with the default group)
  int virtual_stages = 2;         ///< v, model chunks per rank (>= 1)
  int microbatch_group_size = 0;  ///< micro-batches per chunk before switching chunk; 0 = pp_size

  /// The group size used for `pp_size`: microbatch_group_size, or pp_size when it is 0.
  int group_size(int pp_size) const { return microbatch_group_size == 0 ? pp_size : microbatch_group_size; }

  /// Checks the options for `pp_size` ranks. Throws Error naming the numbers when pp_size < 1,
  /// num_microbatches < 1, virtual_stages < 1, the group is outside [pp_size, num_microbatches],
  /// or num_microbatches % group is neither 0 nor >= pp_size.
  void validate(int pp_size) const {
    TESSERA_EXPECTS(pp_size >= 1, "InterleavedOneFOneB: pp_size must be >= 1, got ", pp_size);
    TESSERA_EXPECTS(num_microbatches >= 1, "InterleavedOneFOneB: num_microbatches must be >= 1, got ",
                    num_microbatches);
    TESSERA_EXPECTS(virtual_stages >= 1, "InterleavedOneFOneB: virtual_stages must be >= 1, got ", virtual_stages);
    const int g = group_size(pp_size);
    TESSERA_EXPECTS(g >= pp_size && g <= num_microbatches, "InterleavedOneFOneB: the micro-batch group size ", g,
                    microbatch_group_size == 0 ? " (the default, pp_size)" : "",
                    " must lie in [pp_size, num_microbatches] = [", pp_size, ", ", num_microbatches, "]");
    const int rem = num_microbatches % g;
    TESSERA_EXPECTS(rem == 0 || rem >= pp_size, "InterleavedOneFOneB: num_microbatches % group = ", num_microbatches,
                    " % ", g, " = ", rem, " must be 0 or >= pp_size = ", pp_size,
                    "; a shorter last group leaves dependency bubbles");
  }

  /// Megatron-LM's schedule table: the order in which every rank runs its forwards, as
  /// (micro-batch, chunk); backward k runs the entry k with chunk v - 1 - chunk. Throws as
  /// validate().
  std::vector<ChunkStep> forward_order(int pp_size) const {
    validate(pp_size);
    const int g = group_size(pp_size);
    std::vector<ChunkStep> table;
    for (int first = 0; first < num_microbatches; first += g) {
      const int end = std::min(first + g, num_microbatches);
      for (int c = 0; c < virtual_stages; ++c)
        for (int mb = first; mb < end; ++mb) table.push_back({mb, c});
    }
    return table;
  }

  /// Megatron-LM's warm-up forwards for `rank`: (pp_size - rank - 1) * 2 + (v - 1) * group,
  /// capped at num_microbatches * v. Throws as validate().
  int num_warmup_microbatches(int pp_size, int rank) const {
    validate(pp_size);
    return std::min((pp_size - rank - 1) * 2 + (virtual_stages - 1) * group_size(pp_size),
                    num_microbatches * virtual_stages);
  }

  /// The schedule for `pp_size` ranks. Throws as validate().
  Schedule build(int pp_size) const {
    const std::vector<ChunkStep> table = forward_order(pp_size);
    const int p = pp_size, v = virtual_stages, total = num_microbatches * v;
    std::vector<std::vector<detail::Step>> programs;
    for (int r = 0; r < p; ++r) {
      const int raw_warmup = (p - r - 1) * 2 + (v - 1) * group_size(p);
      const bool all_warmup = raw_warmup >= total;
      const int warmup = std::min(raw_warmup, total);
      const int remaining = total - warmup;
      auto fwd = [&](int k) {
        const ChunkStep e = table[static_cast<std::size_t>(k)];
        return Action::forward(e.microbatch, e.chunk * p + r);
      };
      auto bwd = [&](int k) {
        const ChunkStep e = table[static_cast<std::size_t>(k)];
        return Action::backward(e.microbatch, (v - 1 - e.chunk) * p + r);
      };
      // Megatron's recv_tensor_from_previous_stage: does iteration k receive an activation
      // (forward) or a gradient (backward) for a later iteration? Rank 0 (forward) and rank
      // p - 1 (backward) lead the pipeline by p - 1 iterations and receive only what the other
      // end has produced, and nothing for the first / last chunk.
      auto recv_prev = [&](int k) {
        if (r != 0) return true;
        if (k < p - 1) return false;
        return table[static_cast<std::size_t>(k - (p - 1))].chunk != v - 1;
      };
      auto recv_next = [&](int k) {
        if (r != p - 1) return true;
        if (k < p - 1) return false;
        return v - 1 - table[static_cast<std::size_t>(k - (p - 1))].chunk != 0;
      };
      std::vector<detail::Step> prog;
      prog.push_back({.compute = {}, .recv_forward = r != 0, .recv_backward = false});
      for (int k = 0; k < warmup; ++k) {
        const bool rp = recv_prev(k) && k != total - 1;
        const bool rn = k == warmup - 1 && !all_warmup && r != p - 1;
        prog.push_back({.compute = {fwd(k)}, .recv_forward = rp, .recv_backward = rn});
      }
      for (int k = 0; k < remaining; ++k) {
        const int fk = k + warmup;
        const bool rp = recv_prev(fk) && k != remaining - 1;
        prog.push_back({.compute = {fwd(fk), bwd(k)}, .recv_forward = rp, .recv_backward = recv_next(k)});
      }
      if (all_warmup) prog.push_back({.compute = {}, .recv_forward = false, .recv_backward = r != p - 1});
      for (int k = remaining; k < total; ++k)
        prog.push_back({.compute = {bwd(k)}, .recv_forward = false, .recv_backward = recv_next(k) && k != total - 1});
      programs.push_back(std::move(prog));
    }
    return detail::assemble("Interleaved 1F1B", p, num_microbatches, v, programs);
  }
};

}  // namespace tessera::schedule
