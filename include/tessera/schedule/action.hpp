#pragma once
/// @file
/// Action: one step of a pipeline schedule on one pipeline rank -- a forward or backward
/// computation of one (stage, micro-batch), or one transfer of an activation or a gradient to or
/// from a neighbouring stage. The vocabulary is torch.distributed.pipelining's action IR
/// (F, B, SEND_F, RECV_F, SEND_B, RECV_B, and the zero-bubble split I, W) and Megatron-LM's
/// schedules.py (send_forward, recv_backward, ...).

#include <compare>
#include <cstdint>
#include <string>

#include "tessera/core/error.hpp"

namespace tessera::schedule {

/// What an Action does. Printed as torch.distributed.pipelining prints them: F, B, SEND_F,
/// RECV_F, SEND_B, RECV_B, I, W.
///
/// A (stage, micro-batch) runs its backward either fused (B: input and weight gradients in one
/// action) or split as in zero-bubble pipeline parallelism (Qi et al., "Zero Bubble Pipeline
/// Parallelism", ICLR 2024): I, the input gradient (the paper's "B", on the critical path:
/// the previous stage waits for it), then W, the weight gradient (no other stage needs it, so
/// a schedule can defer it into what would be bubble). torch.distributed.pipelining names the
/// two I (BACKWARD_INPUT) and W (BACKWARD_WEIGHT), and the fused one B (FULL_BACKWARD).
enum class ActionKind : std::uint8_t {
  forward,          ///< F: forward of one stage on one micro-batch
  backward,         ///< B: backward (input and weight gradients) of one stage on one micro-batch
  send_forward,     ///< SEND_F: send the stage's output activation to the next stage's rank
  recv_forward,     ///< RECV_F: receive the stage's input activation from the previous stage's rank
  send_backward,    ///< SEND_B: send the gradient of the stage's input to the previous stage's rank
  recv_backward,    ///< RECV_B: receive the gradient of the stage's output from the next stage's rank
  backward_input,   ///< I: the input-gradient half of a split backward (zero-bubble's B pass)
  backward_weight,  ///< W: the weight-gradient half of a split backward (zero-bubble's W pass)
};

/// Number of ActionKind values (for tables indexed by kind).
inline constexpr int num_action_kinds = 8;

/// "F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "I" or "W".
inline const char* kind_name(ActionKind k) noexcept {
  switch (k) {
    case ActionKind::forward: return "F";
    case ActionKind::backward: return "B";
    case ActionKind::send_forward: return "SEND_F";
    case ActionKind::recv_forward: return "RECV_F";
    case ActionKind::send_backward: return "SEND_B";
    case ActionKind::recv_backward: return "RECV_B";
    case ActionKind::backward_input: return "I";
    case ActionKind::backward_weight: return "W";
  }
  return "?";
}

/// One action of a pipeline rank.
///
/// `stage_index` is always a stage that lives on the rank executing the action: for F and B the
/// stage computed; for SEND_F / SEND_B the stage whose output (activation or input gradient) is
/// sent; for RECV_F / RECV_B the stage that consumes what is received. So SEND_F(mb, s) on
/// rank(s) matches RECV_F(mb, s + 1) on rank(s + 1), and SEND_B(mb, s) matches RECV_B(mb, s - 1)
/// (torch.distributed.pipelining's convention). With interleaving (v model chunks per rank, loop
/// placement as in Megatron-LM and torch) chunk c of rank r is stage c * pp_size + r.
///
/// Build them with the factories: `Action::forward(mb, stage)`,
/// `Action::send_forward(mb, stage, peer)`, ...
struct Action {
  ActionKind kind = ActionKind::forward;  ///< what the action does
  int microbatch = 0;                     ///< micro-batch index in [0, num_microbatches)
  int stage_index = 0;                    ///< global stage index in [0, pp_size * virtual_stages)
  int peer = -1;                          ///< the other rank of a transfer; -1 for F, B, I and W

  /// F: forward of `stage` on micro-batch `mb`.
  static constexpr Action forward(int mb, int stage) { return {ActionKind::forward, mb, stage, -1}; }
  /// B: backward of `stage` on micro-batch `mb`.
  static constexpr Action backward(int mb, int stage) { return {ActionKind::backward, mb, stage, -1}; }
  /// I: input gradient of `stage` on micro-batch `mb` (the first half of a split backward).
  static constexpr Action backward_input(int mb, int stage) {
    return {ActionKind::backward_input, mb, stage, -1};
  }
  /// W: weight gradient of `stage` on micro-batch `mb` (the second half of a split backward;
  /// after its I).
  static constexpr Action backward_weight(int mb, int stage) {
    return {ActionKind::backward_weight, mb, stage, -1};
  }
  /// SEND_F: send the output of F(mb, stage) to `peer`, the rank of stage + 1.
  static constexpr Action send_forward(int mb, int stage, int peer) {
    return {ActionKind::send_forward, mb, stage, peer};
  }
  /// RECV_F: receive the input of F(mb, stage) from `peer`, the rank of stage - 1.
  static constexpr Action recv_forward(int mb, int stage, int peer) {
    return {ActionKind::recv_forward, mb, stage, peer};
  }
  /// SEND_B: send the input gradient computed by B(mb, stage) (or I(mb, stage)) to `peer`, the
  /// rank of stage - 1.
  static constexpr Action send_backward(int mb, int stage, int peer) {
    return {ActionKind::send_backward, mb, stage, peer};
  }
  /// RECV_B: receive the output gradient needed by B(mb, stage) from `peer`, the rank of stage + 1.
  static constexpr Action recv_backward(int mb, int stage, int peer) {
    return {ActionKind::recv_backward, mb, stage, peer};
  }

  /// True for F, B, I and W.
  constexpr bool is_compute() const {
    return kind == ActionKind::forward || kind == ActionKind::backward || kind == ActionKind::backward_input ||
           kind == ActionKind::backward_weight;
  }
  /// True for B and I: the actions that produce the gradient of the stage's input (what SEND_B
  /// carries and the previous stage's backward waits for).
  constexpr bool produces_input_grad() const {
    return kind == ActionKind::backward || kind == ActionKind::backward_input;
  }
  /// True for SEND_F and SEND_B.
  constexpr bool is_send() const { return kind == ActionKind::send_forward || kind == ActionKind::send_backward; }
  /// True for RECV_F and RECV_B.
  constexpr bool is_recv() const { return kind == ActionKind::recv_forward || kind == ActionKind::recv_backward; }
  /// True for the four transfers.
  constexpr bool is_transfer() const { return !is_compute(); }
  /// True for the actions that move data toward the last stage (F, SEND_F, RECV_F).
  constexpr bool is_forward_direction() const {
    return kind == ActionKind::forward || kind == ActionKind::send_forward || kind == ActionKind::recv_forward;
  }

  /// The stage on the other side of a transfer: stage + 1 for SEND_F and RECV_B, stage - 1 for
  /// RECV_F and SEND_B. Throws Error for F, B, I and W.
  int peer_stage() const {
    switch (kind) {
      case ActionKind::send_forward:
      case ActionKind::recv_backward: return stage_index + 1;
      case ActionKind::recv_forward:
      case ActionKind::send_backward: return stage_index - 1;
      default: break;
    }
    throw Error(tessera::detail::str("Action::peer_stage: ", kind_name(kind), " is not a transfer"));
  }

  /// The action the peer must post to complete this transfer, with `own_rank` (the rank holding
  /// this action) as its peer: SEND_F(mb, s) <-> RECV_F(mb, s + 1), SEND_B(mb, s) <->
  /// RECV_B(mb, s - 1). Throws Error for F, B, I and W.
  Action counterpart(int own_rank) const {
    const int s = peer_stage();
    switch (kind) {
      case ActionKind::send_forward: return recv_forward(microbatch, s, own_rank);
      case ActionKind::recv_forward: return send_forward(microbatch, s, own_rank);
      case ActionKind::send_backward: return recv_backward(microbatch, s, own_rank);
      default: return send_backward(microbatch, s, own_rank);  // recv_backward
    }
  }

  /// A message tag (>= 0) that a transfer and its counterpart share and no other transfer of
  /// the same schedule has: (boundary * num_microbatches + microbatch) * 2 + direction, where
  /// boundary b is the link between stages b and b + 1 and direction is 0 for activations, 1
  /// for gradients. For tagged backends (MPI, threads); NCCL matches by order instead (the
  /// checker verifies that order). Throws Error for F, B, I and W or if num_microbatches < 1.
  int transfer_tag(int num_microbatches) const {
    TESSERA_EXPECTS(num_microbatches >= 1, "Action::transfer_tag: num_microbatches must be >= 1, got ",
                    num_microbatches);
    const int s = peer_stage();
    const int boundary = s < stage_index ? s : stage_index;
    return (boundary * num_microbatches + microbatch) * 2 + (is_forward_direction() ? 0 : 1);
  }

  /// Equal when every field is equal.
  friend constexpr bool operator==(const Action&, const Action&) = default;
  /// Lexicographic order on (kind, microbatch, stage_index, peer), for sorting and maps.
  friend constexpr auto operator<=>(const Action&, const Action&) = default;
};

/// The long form used in error messages: "F(mb=3, stage=1)",
/// "SEND_F(mb=2, stage=0, to rank 1)", "RECV_B(mb=0, stage=1, from rank 2)".
inline std::string to_string(const Action& a) {
  std::string s = tessera::detail::str(kind_name(a.kind), "(mb=", a.microbatch, ", stage=", a.stage_index);
  if (a.is_send()) s += tessera::detail::str(", to rank ", a.peer);
  if (a.is_recv()) s += tessera::detail::str(", from rank ", a.peer);
  return s + ")";
}

/// The short form used in traces and pictures: kind followed by the micro-batch, e.g. "F3",
/// "B3", "I3", "W3", "SEND_F3".
inline std::string short_name(const Action& a) { return tessera::detail::str(kind_name(a.kind), a.microbatch); }

}  // namespace tessera::schedule
