#pragma once
/// @file
/// GPipe: every micro-batch's forward, then every micro-batch's backward (Huang et al.,
/// "GPipe", NeurIPS 2019; torch.distributed.pipelining ScheduleGPipe).

#include <cstddef>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/detail/megatron_builder.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::schedule {

/// The GPipe schedule (Huang et al., NeurIPS 2019): each rank runs F for micro-batches
/// 0..m-1, then B for micro-batches 0..m-1 (the order of torch.distributed.pipelining's
/// ScheduleGPipe). Every rank holds all m micro-batches' activations at its peak; bubble ratio
/// (p-1)/m. Transfers are grouped as Megatron-LM groups its p2p calls (recv_forward, then F with
/// send_forward; recv_backward, then B with send_backward).
///
/// Options are set with designated initializers: `GPipe{.num_microbatches = 8}.build(4)`.
struct GPipe {
  int num_microbatches = 1;  ///< m, micro-batches per step (>= 1)

  /// The schedule for `pp_size` ranks. Throws Error if pp_size < 1 or num_microbatches < 1.
  Schedule build(int pp_size) const {
    TESSERA_EXPECTS(pp_size >= 1, "GPipe: pp_size must be >= 1, got ", pp_size);
    TESSERA_EXPECTS(num_microbatches >= 1, "GPipe: num_microbatches must be >= 1, got ", num_microbatches);
    std::vector<std::vector<detail::Step>> programs;
    for (int r = 0; r < pp_size; ++r)
      programs.push_back(detail::non_interleaved_program(pp_size, num_microbatches, r, num_microbatches));
    return detail::assemble("GPipe", pp_size, num_microbatches, 1, programs);
  }
};

}  // namespace tessera::schedule
