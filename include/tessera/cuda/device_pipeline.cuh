#pragma once
/// @file
/// DevicePipeline<C>: pipeline parallelism of DeviceGPT stages on device memory (issue "GPU
/// execution, part 2"). Each pipeline rank holds its model chunks (one stage each: a DeviceGPT
/// built with the DeviceStage of its StagePartition entry, the CPU pipeline's cut; v chunks
/// under interleaving, placed as the schedule says) and walks its actions of a checked
/// tessera::schedule (GPipe, 1F1B, interleaved 1F1B, ZB-H1: the CPU executor's schedules as data): F and
/// B run stage_forward / stage_backward in each chunk's activation slots, and each tick's
/// transfers (SEND_F, RECV_F, SEND_B, RECV_B) of fp32 boundary activations go out as one
/// DeviceComm::batch_send_recv (an NCCL group; eager sends on ThreadDeviceComm), as the tick
/// semantics of schedule.hpp say. The tied wte's two copies (the first stage's embedding, the last
/// stage's LM head) have their gradients summed over the embedding group (Megatron-LM's), and the
/// gradient norm is summed over the chunks and the stages with the copy counted once. CUDA code:
/// compile with nvcc.
///
/// Zero-bubble schedules (ZB-H1, Qi et al. 2024) run their split backward: I passes
/// (DeviceGPT::stage_backward_input: the input gradient, sent at once) and W passes
/// (stage_backward_weight: the deferred weight-gradient products, filling the bubble).

#include <algorithm>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/batch_position.hpp"
#include "tessera/core/error.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/residual_add.cuh"
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
  /// This rank's model chunks (`chunks[c]` is stage schedule.stages_of(pp.rank())[c], built
  /// with device_stage(partition, that stage); one chunk without interleaving; all on one
  /// stream; not owned), the pipeline group `pp` (every stage's rank with this rank's dp and tp
  /// coordinates; pp rank = the schedule's rank; on the chunks' stream), `embedding` (the ranks of
  /// the first and the last stage, in that order, on the same stream; nullptr where this rank
  /// holds neither, or both), the cut `partition` (pp x v stages) and the schedule to run
  /// (checked here: GPipe, 1F1B, interleaved 1F1B or ZB-H1). Sets each chunk's activation slots
  /// to the most micro-batches the schedule keeps in flight on that stage (to its W pass under a
  /// split backward, which it turns on: set_split_backward). Throws tessera::Error naming the
  /// numbers when the schedule is for another pp size or chunk count; a chunk is not the
  /// partition's entry for its stage, runs on another stream, or has a backward hook under a
  /// split backward; or the embedding group is missing or not 2 ranks.
  DevicePipeline(std::vector<DeviceGPT<C>*> chunks, DeviceComm& pp, DeviceComm* embedding, StagePartition partition,
                 schedule::Schedule sched)
      : chunks_(std::move(chunks)), pp_(pp), embedding_(embedding), partition_(std::move(partition)),
        sched_(std::move(sched)) {
    const int p = pp_.size(), r = pp_.rank();
    TESSERA_EXPECTS(!chunks_.empty(), "DevicePipeline: no model chunk given");
    for (DeviceGPT<C>* c : chunks_) TESSERA_EXPECTS(c != nullptr, "DevicePipeline: a null model chunk");
    DeviceGPT<C>& lead = *chunks_.front();
    TESSERA_EXPECTS(sched_.pp_size == p, "DevicePipeline: schedule ", sched_.description(), " is for ", sched_.pp_size,
                    " pipeline ranks, the pipeline group has ", p);
    TESSERA_EXPECTS(sched_.virtual_stages == static_cast<int>(chunks_.size()), "DevicePipeline: ",
                    sched_.description(), " has ", sched_.virtual_stages, " model chunks per rank, this rank gave ",
                    chunks_.size());
    TESSERA_EXPECTS(partition_.num_stages() == sched_.num_stages(), "DevicePipeline: the partition has ",
                    partition_.num_stages(), " stages, ", sched_.description(), " runs ", sched_.num_stages());
    TESSERA_EXPECTS(partition_.num_layers() == lead.config().n_layer + 2, "DevicePipeline: the partition cuts ",
                    partition_.num_layers(), " layers, a GPT of ", lead.config().n_layer, " blocks has ",
                    lead.config().n_layer + 2, " pipeline layers");
    (void)schedule::check(sched_);
    const std::vector<int> mine = sched_.stages_of(r);
    for (std::size_t c = 0; c < chunks_.size(); ++c) {
      const DeviceStage want = device_stage(partition_, mine[c]), held = chunks_[c]->stage();
      TESSERA_EXPECTS(want.first == held.first && want.end == held.end, "DevicePipeline: pipeline rank ", r,
                      " chunk ", c, " (stage ", mine[c], ") holds pipeline layers [", held.first, ", ", held.end,
                      "), the partition gives it [", want.first, ", ", want.end, ")");
      TESSERA_EXPECTS(chunks_[c]->stream().get() == lead.stream().get(), "DevicePipeline: chunk ", c,
                      " runs on another stream than chunk 0");
    }
    TESSERA_EXPECTS(pp_.stream().get() == lead.stream().get(), "DevicePipeline: the pipeline group must run on the "
                    "stages' compute stream");
    // Each chunk's slots: the most (stage, micro-batch) pairs between their F and their B (or
    // their W: a split backward's I keeps the activations for the deferred weight pass).
    std::vector<int> in_flight(chunks_.size(), 0), most(chunks_.size(), 1);
    std::vector<bool> split(chunks_.size(), false);
    for (const schedule::Action& a : sched_.compute_order(r)) {
      const auto c = static_cast<std::size_t>(sched_.chunk_of(a.stage_index));
      if (a.kind == schedule::ActionKind::forward) ++in_flight[c];
      if (a.kind == schedule::ActionKind::backward || a.kind == schedule::ActionKind::backward_weight) --in_flight[c];
      if (a.kind == schedule::ActionKind::backward_input) split[c] = true;
      most[c] = std::max(most[c], in_flight[c]);
    }
    for (std::size_t c = 0; c < chunks_.size(); ++c) {
      chunks_[c]->set_slots(most[c]);
      chunks_[c]->set_split_backward(split[c]);
    }
    const int last_rank = sched_.rank_of(sched_.num_stages() - 1);
    const bool ends = (r == 0) != (r == last_rank);  // holds one end of the tied wte, not both
    if (ends) {
      TESSERA_EXPECTS(embedding_ != nullptr && embedding_->size() == 2 && embedding_->rank() == (r == 0 ? 0 : 1),
                      "DevicePipeline: pipeline rank ", r, " of ", p, " needs the embedding group (the first and the "
                      "last stage's ranks, 2 ranks, in that order)");
      TESSERA_EXPECTS(embedding_->stream().get() == lead.stream().get(), "DevicePipeline: the embedding group must run "
                      "on the stages' compute stream");
    } else {
      embedding_ = nullptr;
    }
  }
  /// One stage per rank (GPipe, 1F1B): the constructor above with chunks {&stage}.
  DevicePipeline(DeviceGPT<C>& stage, DeviceComm& pp, DeviceComm* embedding, StagePartition partition,
                 schedule::Schedule sched)
      : DevicePipeline(std::vector<DeviceGPT<C>*>{&stage}, pp, embedding, std::move(partition), std::move(sched)) {}

  /// Pipeline ranks (the pp size).
  int size() const noexcept { return pp_.size(); }
  /// This rank's index in the pipeline group.
  int rank() const noexcept { return pp_.rank(); }
  /// The schedule walked.
  const schedule::Schedule& schedule() const noexcept { return sched_; }
  /// This rank's first model chunk (its only stage without interleaving).
  DeviceGPT<C>& stage() noexcept { return *chunks_.front(); }
  /// This rank's model chunks, in chunk order.
  const std::vector<DeviceGPT<C>*>& chunks() const noexcept { return chunks_; }

  /// Forward and backward of one step's micro-batches (as many as the schedule's, all of one
  /// shape), in this rank's order of the schedule; gradients accumulated into the chunks' (+=),
  /// `dloss` the loss's gradient per token (1 / the step's tokens for a mean). A hand-off
  /// between two stages of this rank (interleaving at pp 1) stays on the device. Collective over
  /// the pipeline group (and tp). Throws tessera::Error naming the counts when the micro-batches
  /// are not the schedule's number or differ in shape.
  void forward_backward(std::span<const DeviceMicroBatch> micro, float dloss) {
    TESSERA_EXPECTS(static_cast<int>(micro.size()) == sched_.num_microbatches, "DevicePipeline: ", micro.size(),
                    " micro-batches given, ", sched_.description(), " runs ", sched_.num_microbatches);
    for (const DeviceMicroBatch& m : micro) {  // the activation slots hold one shape
      TESSERA_EXPECTS(m.tokens.shape.rank() == 2, "DevicePipeline: tokens of shape ", m.tokens.shape, ", not (B, T)");
      TESSERA_EXPECTS(m.tokens.shape == micro[0].tokens.shape, "DevicePipeline: micro-batches of shapes ",
                      micro[0].tokens.shape, " and ", m.tokens.shape, "; every micro-batch of a step has the same");
    }
    const int r = pp_.rank(), stages = sched_.num_stages();
    const Stream& st = stage().stream();
    const std::int64_t B = micro[0].tokens.size(0), T = micro[0].tokens.size(1);
    const Shape edge = stage().boundary_shape(B, T);
    using Key = std::pair<int, int>;  // (stage, micro-batch)
    // Boundary buffers while in flight: a stage's output and its input's gradient (to send or to
    // hand to this rank's neighbouring stage), and what was received for a stage.
    std::map<Key, DeviceTensor<float>> in_f, out_f, in_b, out_b;
    std::map<Key, int> slot_of;
    std::vector<std::vector<bool>> busy;
    for (DeviceGPT<C>* c : chunks_) busy.emplace_back(static_cast<std::size_t>(c->slots()), false);
    for (const schedule::Tick& tick : sched_.ticks[static_cast<std::size_t>(r)]) {
      std::vector<DeviceP2P> transfers;
      std::vector<Key> sent_f, sent_b;
      for (const schedule::Action& a : tick) {
        const int mb = a.microbatch, s = a.stage_index;
        const Key key{s, mb};
        const DeviceMicroBatch& m = micro[static_cast<std::size_t>(mb)];
        const auto c = static_cast<std::size_t>(sched_.chunk_of(s));
        DeviceGPT<C>& model = *chunks_[c];
        switch (a.kind) {
          case schedule::ActionKind::forward: {
            const auto free = std::find(busy[c].begin(), busy[c].end(), false);
            TESSERA_EXPECTS(free != busy[c].end(), "DevicePipeline: no free activation slot for stage ", s,
                            ", micro-batch ", mb);
            *free = true;
            const int slot = static_cast<int>(free - busy[c].begin());
            slot_of[key] = slot;
            DeviceView<const float> input{};
            if (s > 0) {  // from the previous stage: received, or this rank's own
              const bool local = sched_.rank_of(s - 1) == r;
              input = local ? DeviceView<const float>(found(out_f, {s - 1, mb}, "F"))
                            : DeviceView<const float>(found(in_f, key, "F"));
            }
            if (s < stages - 1) out_f[key] = DeviceTensor<float>::empty(edge, st);
            model.stage_forward(slot, B, T, m.tokens, input, m.targets, &dloss,
                                s < stages - 1 ? out_f[key].view() : DeviceView<float>{}, m.at);
            in_f.erase(key);
            if (s > 0 && sched_.rank_of(s - 1) == r) out_f.erase({s - 1, mb});
            break;
          }
          case schedule::ActionKind::backward:
          case schedule::ActionKind::backward_input: {
            DeviceView<const float> grad_output{};
            if (s < stages - 1) {
              const bool local = sched_.rank_of(s + 1) == r;
              grad_output = local ? DeviceView<const float>(found(out_b, {s + 1, mb}, "B"))
                                  : DeviceView<const float>(found(in_b, key, "B"));
            }
            if (s > 0) out_b[key] = DeviceTensor<float>::empty(edge, st);
            const int slot = slot_of.at(key);
            const DeviceView<float> grad_input = s > 0 ? out_b[key].view() : DeviceView<float>{};
            if (a.kind == schedule::ActionKind::backward) {
              model.stage_backward(slot, m.tokens, grad_output, grad_input);
              busy[c][static_cast<std::size_t>(slot)] = false;
              slot_of.erase(key);
            } else {  // I: the slot stays held until this (stage, micro-batch)'s W
              model.stage_backward_input(slot, m.tokens, grad_output, grad_input);
            }
            in_b.erase(key);
            if (s < stages - 1 && sched_.rank_of(s + 1) == r) out_b.erase({s + 1, mb});
            break;
          }
          case schedule::ActionKind::backward_weight: {
            const int slot = slot_of.at(key);
            model.stage_backward_weight(slot);
            busy[c][static_cast<std::size_t>(slot)] = false;
            slot_of.erase(key);
            break;
          }
          case schedule::ActionKind::send_forward:
            transfers.push_back(DeviceP2P::send(found(out_f, key, "SEND_F"), a.peer));
            sent_f.push_back(key);
            break;
          case schedule::ActionKind::recv_forward:
            in_f[key] = DeviceTensor<float>::empty(edge, st);
            transfers.push_back(DeviceP2P::recv(in_f[key], a.peer));
            break;
          case schedule::ActionKind::send_backward:
            transfers.push_back(DeviceP2P::send(found(out_b, key, "SEND_B"), a.peer));
            sent_b.push_back(key);
            break;
          case schedule::ActionKind::recv_backward:
            in_b[key] = DeviceTensor<float>::empty(edge, st);
            transfers.push_back(DeviceP2P::recv(in_b[key], a.peer));
            break;
          default:
            throw Error(tessera::detail::str("DevicePipeline: action ", schedule::kind_name(a.kind),
                                             " is not run on the device"));
        }
      }
      if (!transfers.empty()) pp_.batch_send_recv(transfers);
      // Sent buffers go back to the stream-ordered pool: later work on the stream (which waits for
      // the transfer) may reuse them.
      for (const Key& k : sent_f) out_f.erase(k);
      for (const Key& k : sent_b) out_b.erase(k);
    }
  }

  /// Forward passes without gradients (evaluation) of `micro`, each micro-batch down the
  /// stages in order (receive from the previous stage's rank, forward, send to the next's; a
  /// hand-off between two stages of this rank stays on the device), the losses added to the last
  /// stage's take_loss_sum() accumulator. Collective over the pipeline group (and tp).
  void evaluate(std::span<const DeviceMicroBatch> micro) {
    const int r = pp_.rank(), stages = sched_.num_stages();
    const Stream& st = stage().stream();
    for (const DeviceMicroBatch& m : micro) {
      TESSERA_EXPECTS(m.tokens.shape.rank() == 2, "DevicePipeline: evaluation tokens of shape ", m.tokens.shape,
                      ", not (B, T)");
      const std::int64_t B = m.tokens.size(0), T = m.tokens.size(1);
      const Shape edge = stage().boundary_shape(B, T);
      BatchPosition at = m.at;
      at.training = false;
      DeviceTensor<float> carried;  // the output of this rank's previous stage, for its next
      for (int s : sched_.stages_of(r)) {
        DeviceTensor<float> in, out;
        if (s > 0) {
          if (sched_.rank_of(s - 1) == r) {
            in = carried;
          } else {
            in = DeviceTensor<float>::empty(edge, st);
            pp_.recv(in, sched_.rank_of(s - 1));
          }
        }
        if (s < stages - 1) out = DeviceTensor<float>::empty(edge, st);
        chunks_[static_cast<std::size_t>(sched_.chunk_of(s))]->stage_forward(0, B, T, m.tokens, in, m.targets, nullptr,
                                                                             out, at);
        if (s < stages - 1 && sched_.rank_of(s + 1) != r) pp_.send(out, sched_.rank_of(s + 1));
        carried = out;
      }
    }
  }

  /// Sums the tied wte's gradient over the embedding group (the first stage's embedding and the
  /// last stage's LM head copy): both then hold the whole model's wte gradient and take the same
  /// step. Call after the step's backward passes (and after the dp reduction, which is linear:
  /// the order does not matter) and before the gradient norm. Collective over the embedding
  /// group; on a rank holding both ends (interleaving at pp 1) the two are summed here.
  void reduce_tied_embedding() {
    DeviceGPT<C>& first = *chunks_.front();
    DeviceGPT<C>& last = *chunks_.back();
    const bool has_first = first.has_embedding(), has_last = last.has_head();
    if (has_first && has_last && &first != &last) {  // both copies on this rank: sum them in place
      const DeviceView<float> a = first.tied_embedding_gradient(), b = last.tied_embedding_gradient();
      ops::add_into(first.stream(), b, a);
      detail::check(cudaMemcpyAsync(b.data, a.data, static_cast<std::size_t>(a.numel()) * sizeof(float),
                                    cudaMemcpyDeviceToDevice, first.stream().get()),
                    "cudaMemcpyAsync", "DevicePipeline tied wte gradient of ", a.numel(), " elements");
      return;
    }
    if (embedding_ == nullptr) return;
    embedding_->all_reduce(has_first ? first.tied_embedding_gradient() : last.tied_embedding_gradient(), ReduceOp::sum);
  }
  /// The whole model's gradient norm (every stage's, tp's shards, the tied wte once), the same
  /// on every rank; call after reduce_tied_embedding. Collective over tp and the pipeline group.
  double grad_norm() {
    DeviceGPT<C>& lead = stage();
    if (chunks_.size() == 1) return lead.grad_norm(&pp_);
    const DeviceView<float> sum = lead.grad_sum_of_squares();
    for (std::size_t c = 1; c < chunks_.size(); ++c) ops::add_into(lead.stream(), chunks_[c]->grad_sum_of_squares(), sum);
    return lead.reduce_grad_norm(sum, &pp_);
  }

  /// Every parameter of the whole GPT into `params` on every pipeline rank: each chunk's
  /// download (collective over tp), then broadcast_stages. Collective over the pipeline group.
  void download(const ParameterList<float>& params) {
    for (DeviceGPT<C>* c : chunks_) c->download(params);
    broadcast_stages(params);
  }
  /// AdamW's moments and step count of every parameter into `opt` on every pipeline rank (the
  /// chunks' moments unsharded). Collective over the pipeline group.
  void download_optimizer(optim::AdamW<float>& opt) {
    for (DeviceGPT<C>* c : chunks_) c->download_optimizer(opt);
    broadcast_stages(opt);
  }
  /// Writes every parameter of `params` (the whole GPT's, each filled on the rank whose stage
  /// holds it, e.g. by the stage's download) on every pipeline rank: each broadcast from its
  /// stage's rank. Collective over the pipeline group.
  void broadcast_stages(const ParameterList<float>& params) {
    for (Parameter<float>& p : params) share(p.value, sched_.rank_of(owner(p.name)));
  }
  /// The same for AdamW's moments of every parameter (its parameters found by name).
  void broadcast_stages(optim::AdamW<float>& opt) {
    std::size_t i = 0;
    for (Parameter<float>& p : opt.parameters()) {
      const int o = sched_.rank_of(owner(p.name));
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
  // A boundary buffer of (stage, micro-batch) that must exist: a schedule that computes before
  // it receives, or sends before it computes, is refused.
  static const DeviceTensor<float>& found(const std::map<std::pair<int, int>, DeviceTensor<float>>& in,
                                          std::pair<int, int> key, const char* what) {
    const auto it = in.find(key);
    TESSERA_EXPECTS(it != in.end(), "DevicePipeline: ", what, " of stage ", key.first, ", micro-batch ", key.second,
                    " before its buffer was computed or received");
    return it->second;
  }
  void share(const Tensor<float>& t, int root) {
    if (pp_.size() == 1) return;
    DeviceTensor<float> d = to_device<float>(t.contiguous(), stage().stream());
    pp_.broadcast(d, root);
    t.copy_from(to_host(d, stage().stream()));
  }

  std::vector<DeviceGPT<C>*> chunks_;
  DeviceComm& pp_;
  DeviceComm* embedding_;
  StagePartition partition_;
  schedule::Schedule sched_;
};

}  // namespace tessera::cuda
