#pragma once
/// @file
/// OneFOneB: the 1F1B (PipeDream-Flush) schedule of Megatron-LM's
/// forward_backward_pipelining_without_interleaving (Narayanan et al., "Memory-Efficient
/// Pipeline-Parallel DNN Training", ICML 2021).

#include <algorithm>
#include <cstddef>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/detail/megatron_builder.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::schedule {

/// The 1F1B schedule exactly as Megatron-LM runs it without interleaving: rank r first runs
/// num_warmup = min(pp_size - r - 1, m) forwards, then m - num_warmup steady pairs (one F, then
/// one B), then num_warmup cool-down backwards. Rank r therefore holds at most
/// min(pp_size - r, m) micro-batches' activations (GPipe: m); the bubble ratio is (p-1)/m, as
/// for GPipe.
///
/// Fewer micro-batches than ranks (m < pp_size) is allowed: the warm-up is capped at m, so
/// every rank runs all its forwards, then all its backwards (torch's Schedule1F1B rejects it;
/// Megatron-LM accepts it). The pipeline is then mostly bubble.
///
/// Transfers are grouped as Megatron-LM's p2p calls with batch_p2p_comm: recv_forward;
/// F + send_forward; F + send_forward_recv_backward; B + send_backward_recv_forward;
/// recv_backward; B + send_backward -- each one Tick.
///
/// Options are set with designated initializers: `OneFOneB{.num_microbatches = 8}.build(4)`.
struct OneFOneB {
  int num_microbatches = 1;  ///< m, micro-batches per step (>= 1)

  /// Megatron-LM's num_warmup_microbatches for `rank`: min(pp_size - rank - 1, num_microbatches).
  static int num_warmup_microbatches(int pp_size, int rank, int num_microbatches) {
    return std::min(pp_size - rank - 1, num_microbatches);
  }

  /// The schedule for `pp_size` ranks. Throws Error if pp_size < 1 or num_microbatches < 1.
  Schedule build(int pp_size) const {
    TESSERA_EXPECTS(pp_size >= 1, "OneFOneB: pp_size must be >= 1, got ", pp_size);
    TESSERA_EXPECTS(num_microbatches >= 1, "OneFOneB: num_microbatches must be >= 1, got ", num_microbatches);
    std::vector<std::vector<detail::Step>> programs;
    for (int r = 0; r < pp_size; ++r)
      programs.push_back(detail::non_interleaved_program(pp_size, num_microbatches, r,
                                                         num_warmup_microbatches(pp_size, r, num_microbatches)));
    return detail::assemble("1F1B", pp_size, num_microbatches, 1, programs);
  }
};

}  // namespace tessera::schedule
