#pragma once
/// @file
/// DevicePipeline<C>: pipeline parallelism of DeviceGPT stages on device memory (issue "GPU
/// execution, part 2"). Each pipeline rank holds one stage (a DeviceGPT built with the
/// DeviceStage of its StagePartition entry, the CPU pipeline's cut) and walks its actions of a
/// checked tessera::schedule (GPipe or 1F1B, the CPU executor's schedules as data): F and B run
/// stage_forward / stage_backward in activation slots, and each tick's transfers (SEND_F,
/// RECV_F, SEND_B, RECV_B) of fp32 boundary activations go out as one DeviceComm::batch_send_recv (an
/// NCCL group; eager sends on ThreadDeviceComm), as the tick semantics of schedule.hpp say. The
/// tied wte's two copies (the first stage's embedding, the last stage's LM head) have their
/// gradients summed over the embedding group (Megatron-LM's), and the gradient norm is summed
/// over the stages with the copy counted once. CUDA code: compile with nvcc.
///
/// Not yet: interleaved schedules (v > 1 model chunks per rank) and zero-bubble's split
/// backward (I and W actions) are refused by the constructor, naming the schedule.

#include <algorithm>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "tessera/core/batch_position.hpp"
#include "tessera/core/error.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/schedule/checker.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::cuda {

/// One micro-batch of a pipeline step on the device: tokens and targets (B, T) int32. Every
/// stage reads the shape of `tokens` (the micro-batch's B and T); the first stage its data, the
/// last the targets' (other stages may pass views without data). `at`: its place in the batch
/// (dropout masks).
struct DeviceMicroBatch {
  DeviceView<const std::int32_t> tokens;   ///< (B, T)
  DeviceView<const std::int32_t> targets;  ///< (B, T)
  BatchPosition at{};                      ///< step and first row
};

/// The pipeline layers of stage `stage` of `partition` (StagePartition over the GPT's
/// gpt_pipeline_num_layers) as a DeviceStage.
inline DeviceStage device_stage(const StagePartition& partition, int stage) {
  return DeviceStage{partition.begin(stage), partition.end(stage)};
}

/// Pipeline parallelism over DeviceGPT stages; see the file comment.
template <class C>
class DevicePipeline {
 public:
  /// This rank's `stage` (built with device_stage(partition, pp.rank())), the pipeline group
  /// `pp` (every stage's rank with this rank's dp and tp coordinates; pp rank = stage index; on
  /// the stage's stream), `embedding` (the first and last stage's ranks, in that order, on the
  /// same stream; nullptr at pp 1 and on the other stages), the cut `partition` and the
  /// schedule to run (checked here). Sets the stage's activation slots to the most micro-batches
  /// the schedule keeps in flight on this rank. Throws tessera::Error naming the numbers when the
  /// schedule is for another pp size, interleaved, or has split backward passes; the stage is
  /// not the partition's entry for this rank; or the embedding group is missing or not 2 ranks.
  DevicePipeline(DeviceGPT<C>& stage, DeviceComm& pp, DeviceComm* embedding, StagePartition partition,
                 schedule::Schedule sched)
      : stage_(stage), pp_(pp), embedding_(embedding), partition_(std::move(partition)), sched_(std::move(sched)) {
    const int p = pp_.size(), r = pp_.rank();
    TESSERA_EXPECTS(sched_.pp_size == p, "DevicePipeline: schedule ", sched_.description(), " is for ", sched_.pp_size,
                    " pipeline ranks, the pipeline group has ", p);
    TESSERA_EXPECTS(sched_.virtual_stages == 1, "DevicePipeline: ", sched_.description(), " has ", sched_.virtual_stages,
                    " model chunks per rank; the device pipeline runs one stage per rank (GPipe, 1F1B) for now");
    TESSERA_EXPECTS(partition_.num_stages() == p, "DevicePipeline: the partition has ", partition_.num_stages(),
                    " stages, the pipeline group ", p, " ranks");
    TESSERA_EXPECTS(partition_.num_layers() == stage_.config().n_layer + 2, "DevicePipeline: the partition cuts ",
                    partition_.num_layers(), " layers, a GPT of ", stage_.config().n_layer, " blocks has ",
                    stage_.config().n_layer + 2, " pipeline layers");
    const DeviceStage mine = device_stage(partition_, r), held = stage_.stage();
    TESSERA_EXPECTS(mine.first == held.first && mine.end == held.end, "DevicePipeline: pipeline rank ", r,
                    " holds pipeline layers [", held.first, ", ", held.end, "), the partition gives it [", mine.first,
                    ", ", mine.end, ")");
    TESSERA_EXPECTS(pp_.stream().get() == stage_.stream().get(), "DevicePipeline: the pipeline group must run on the "
                    "stage's compute stream");
    (void)schedule::check(sched_);
    int in_flight = 0, most = 1;
    for (const schedule::Action& a : sched_.compute_order(r)) {
      TESSERA_EXPECTS(a.kind == schedule::ActionKind::forward || a.kind == schedule::ActionKind::backward,
                      "DevicePipeline: ", sched_.description(), " splits backward into I and W passes (zero bubble); "
                      "the device pipeline runs fused backward passes (GPipe, 1F1B) for now");
      in_flight += a.kind == schedule::ActionKind::forward ? 1 : -1;
      most = std::max(most, in_flight);
    }
    stage_.set_slots(most);
    const bool ends = p > 1 && (r == 0 || r == p - 1);
    if (ends) {
      TESSERA_EXPECTS(embedding_ != nullptr && embedding_->size() == 2 && embedding_->rank() == (r == 0 ? 0 : 1),
                      "DevicePipeline: pipeline rank ", r, " of ", p, " needs the embedding group (the first and the "
                      "last stage's ranks, 2 ranks, in that order)");
      TESSERA_EXPECTS(embedding_->stream().get() == stage_.stream().get(), "DevicePipeline: the embedding group must run "
                      "on the stage's compute stream");
    }
    if (!ends) embedding_ = nullptr;
  }

  /// Pipeline ranks (the pp size).
  int size() const noexcept { return pp_.size(); }
  /// This rank's stage index.
  int rank() const noexcept { return pp_.rank(); }
  /// The schedule walked.
  const schedule::Schedule& schedule() const noexcept { return sched_; }
  /// This rank's stage.
  DeviceGPT<C>& stage() noexcept { return stage_; }

  /// Forward and backward of one step's micro-batches (as many as the schedule's), in this
  /// rank's order of the schedule; gradients accumulated into the stage's (+=), `dloss` the
  /// loss's gradient per token (1 / the step's tokens for a mean). Collective over the pipeline
  /// group (and tp). Throws tessera::Error naming the counts when the micro-batches are not the
  /// schedule's number.
  void forward_backward(std::span<const DeviceMicroBatch> micro, float dloss) {
    TESSERA_EXPECTS(static_cast<int>(micro.size()) == sched_.num_microbatches, "DevicePipeline: ", micro.size(),
                    " micro-batches given, ", sched_.description(), " runs ", sched_.num_microbatches);
    for (const DeviceMicroBatch& m : micro)  // the activation slots hold one shape
      TESSERA_EXPECTS(m.tokens.shape == micro[0].tokens.shape, "DevicePipeline: micro-batches of shapes ",
                      micro[0].tokens.shape, " and ", m.tokens.shape, "; every micro-batch of a step has the same");
    const int r = pp_.rank();
    const bool first = stage_.has_embedding(), last = stage_.has_head();
    const Stream& st = stage_.stream();
    std::map<int, DeviceTensor<float>> in_f, out_f, in_b, out_b;  // per micro-batch, while in flight
    std::map<int, int> slot_of;
    std::vector<bool> busy(static_cast<std::size_t>(stage_.slots()), false);
    auto edge = [&](int mb) {
      const DeviceMicroBatch& m = micro[static_cast<std::size_t>(mb)];
      TESSERA_EXPECTS(m.tokens.shape.rank() == 2, "DevicePipeline: micro-batch ", mb, " has tokens of shape ",
                      m.tokens.shape, ", not (B, T)");
      return stage_.boundary_shape(m.tokens.size(0), m.tokens.size(1));
    };
    for (const schedule::Tick& tick : sched_.ticks[static_cast<std::size_t>(r)]) {
      std::vector<DeviceP2P> transfers;
      std::vector<int> sent_f, sent_b;
      for (const schedule::Action& a : tick) {
        const int mb = a.microbatch;
        const DeviceMicroBatch& m = micro[static_cast<std::size_t>(mb)];
        switch (a.kind) {
          case schedule::ActionKind::forward: {
            const auto free = std::find(busy.begin(), busy.end(), false);
            TESSERA_EXPECTS(free != busy.end(), "DevicePipeline: no free activation slot for micro-batch ", mb);
            *free = true;
            const int slot = static_cast<int>(free - busy.begin());
            slot_of[mb] = slot;
            if (!last) out_f[mb] = DeviceTensor<float>::empty(edge(mb), st);
            stage_.stage_forward(slot, m.tokens.size(0), m.tokens.size(1), m.tokens,
                                 first ? DeviceView<const float>{} : DeviceView<const float>(received(in_f, mb, "F")),
                                 m.targets, &dloss, last ? DeviceView<float>{} : out_f[mb].view(), m.at);
            in_f.erase(mb);
            break;
          }
          case schedule::ActionKind::backward: {
            if (!first) out_b[mb] = DeviceTensor<float>::empty(edge(mb), st);
            const int slot = slot_of.at(mb);
            stage_.stage_backward(slot, m.tokens,
                                  last ? DeviceView<const float>{} : DeviceView<const float>(received(in_b, mb, "B")),
                                  first ? DeviceView<float>{} : out_b[mb].view());
            busy[static_cast<std::size_t>(slot)] = false;
            in_b.erase(mb);
            break;
          }
          case schedule::ActionKind::send_forward:
            transfers.push_back(DeviceP2P::send(out_f.at(mb), a.peer));
            sent_f.push_back(mb);
            break;
          case schedule::ActionKind::recv_forward:
            in_f[mb] = DeviceTensor<float>::empty(edge(mb), st);
            transfers.push_back(DeviceP2P::recv(in_f[mb], a.peer));
            break;
          case schedule::ActionKind::send_backward:
            transfers.push_back(DeviceP2P::send(out_b.at(mb), a.peer));
            sent_b.push_back(mb);
            break;
          case schedule::ActionKind::recv_backward:
            in_b[mb] = DeviceTensor<float>::empty(edge(mb), st);
            transfers.push_back(DeviceP2P::recv(in_b[mb], a.peer));
            break;
          default:
            throw Error(tessera::detail::str("DevicePipeline: action ", schedule::kind_name(a.kind),
                                             " is not run on the device"));
        }
      }
      if (!transfers.empty()) pp_.batch_send_recv(transfers);
      // Sent buffers go back to the stream-ordered pool: later work on the stream (which waits for
      // the transfer) may reuse them.
      for (int mb : sent_f) out_f.erase(mb);
      for (int mb : sent_b) out_b.erase(mb);
    }
  }

  /// Forward passes without gradients (evaluation) of `micro`, one after the other down the
  /// pipeline (receive from the previous stage, forward, send to the next), the losses added to
  /// the last stage's take_loss_sum() accumulator. Collective over the pipeline group (and tp).
  void evaluate(std::span<const DeviceMicroBatch> micro) {
    const int r = pp_.rank();
    const bool first = stage_.has_embedding(), last = stage_.has_head();
    const Stream& st = stage_.stream();
    for (const DeviceMicroBatch& m : micro) {
      TESSERA_EXPECTS(m.tokens.shape.rank() == 2, "DevicePipeline: evaluation tokens of shape ", m.tokens.shape,
                      ", not (B, T)");
      const std::int64_t B = m.tokens.size(0), T = m.tokens.size(1);
      const Shape edge = stage_.boundary_shape(B, T);
      DeviceTensor<float> in, out;
      if (!first) {
        in = DeviceTensor<float>::empty(edge, st);
        pp_.recv(in, r - 1);
      }
      if (!last) out = DeviceTensor<float>::empty(edge, st);
      BatchPosition at = m.at;
      at.training = false;
      stage_.stage_forward(0, B, T, m.tokens, in, m.targets, nullptr, out, at);
      if (!last) pp_.send(out, r + 1);
    }
  }

  /// Sums the tied wte's gradient over the embedding group (the first stage's embedding and the
  /// last stage's LM head copy): both then hold the whole model's wte gradient and take the same
  /// step. Call after the step's backward passes (and after the dp reduction, which is linear:
  /// the order does not matter) and before the gradient norm. Collective over the embedding
  /// group (nothing on the other stages and at pp 1).
  void reduce_tied_embedding() {
    if (embedding_ != nullptr) embedding_->all_reduce(stage_.tied_embedding_gradient(), ReduceOp::sum);
  }
  /// The whole model's gradient norm (every stage's, tp's shards, the tied wte once), the same
  /// on every rank; call after reduce_tied_embedding. Collective over tp and the pipeline group.
  double grad_norm() { return stage_.grad_norm(&pp_); }

  /// Writes every parameter of `params` (the whole GPT's, each filled on the rank whose stage
  /// holds it, e.g. by the stage's download) on every pipeline rank: each broadcast from its
  /// stage. Collective over the pipeline group.
  void broadcast_stages(const ParameterList<float>& params) {
    for (Parameter<float>& p : params) share(p.value, owner(p.name));
  }
  /// The same for AdamW's moments of every parameter (its parameters found by name).
  void broadcast_stages(optim::AdamW<float>& opt) {
    std::size_t i = 0;
    for (Parameter<float>& p : opt.parameters()) {
      const int o = owner(p.name);
      share(opt.exp_avg(i), o);
      share(opt.exp_avg_sq(i), o);
      ++i;
    }
  }
  /// The stage holding the parameter `name` (wte and wpe: 0, block l's: the stage of layer
  /// l + 1, ln_f: the last). Throws tessera::Error for a name that is not the GPT's.
  int owner(const std::string& name) const {
    if (name.starts_with("wte.") || name.starts_with("wpe.")) return 0;
    if (name.starts_with("ln_f.")) return partition_.num_stages() - 1;
    if (name.starts_with("h.")) {
      const auto dot = name.find('.', 2);
      TESSERA_EXPECTS(dot != std::string::npos, "DevicePipeline: parameter name ", name, " is not the GPT's");
      return partition_.stage_of(std::stoi(name.substr(2, dot - 2)) + 1);
    }
    throw Error(tessera::detail::str("DevicePipeline: parameter ", name, " is not the GPT's"));
  }

 private:
  // A micro-batch's received buffer; a schedule that computes before it receives is refused.
  static const DeviceTensor<float>& received(const std::map<int, DeviceTensor<float>>& in, int mb, const char* what) {
    const auto it = in.find(mb);
    TESSERA_EXPECTS(it != in.end(), "DevicePipeline: ", what, " of micro-batch ", mb, " before its input was received");
    return it->second;
  }
  void share(const Tensor<float>& t, int root) {
    if (pp_.size() == 1) return;
    DeviceTensor<float> d = to_device<float>(t.contiguous(), stage_.stream());
    pp_.broadcast(d, root);
    t.copy_from(to_host(d, stage_.stream()));
  }

  DeviceGPT<C>& stage_;
  DeviceComm& pp_;
  DeviceComm* embedding_;
  StagePartition partition_;
  schedule::Schedule sched_;
};

}  // namespace tessera::cuda
