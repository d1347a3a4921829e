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
///
/// Data parallelism over the chunks either reduces after the step (DeviceDataParallel::finish)
/// or, with overlap_data_parallel, during each chunk's last backward of the step (under ZeRO-2,
/// during every backward: DeviceDataParallel's ZeRO-2 mode).

#include <algorithm>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/batch_position.hpp"
#include "tessera/core/error.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/residual_add.cuh"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/schedule/checker.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/step_walker.hpp"

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

/// Runs this rank's actions of one step of the checked schedule `sched` over its model chunks
/// (`chunks[c]` is stage sched.stages_of(pp.rank())[c]; all on one stream), the pipeline group
/// `pp` on that stream: F and B (or a split backward's I and W) in the chunks' activation slots,
/// each tick's transfers of fp32 boundary activations as one DeviceComm::batch_send_recv, a
/// hand-off between two stages of this rank on the device (schedule::walk_step, tested on the
/// host over every schedule). `Stage` is any model chunk with DeviceGPT's stage interface:
/// stream(), boundary_shape(B, T), slots(), stage_forward, stage_backward, stage_backward_input,
/// stage_backward_weight (DeviceGPT; the Llama example's DeviceLlama). `dloss`: the loss's
/// gradient per token. `before_backward` (optional): called with (chunk, micro-batch) before
/// each full backward pass (B), e.g. to say which one ends the step's gradients. Collective over
/// the pipeline group (and the chunks' tp). Throws tessera::Error naming the counts when the
/// micro-batches are not the schedule's number or differ in shape.
template <class Stage>
void run_pipeline_step(const std::vector<Stage*>& chunks, DeviceComm& pp, const schedule::Schedule& sched,
                       std::span<const DeviceMicroBatch> micro, float dloss,
                       const std::function<void(int, int)>* before_backward = nullptr) {
  TESSERA_EXPECTS(!chunks.empty(), "pipeline step: no model chunk given");
  TESSERA_EXPECTS(static_cast<int>(micro.size()) == sched.num_microbatches, "pipeline step: ", micro.size(),
                  " micro-batches given, ", sched.description(), " runs ", sched.num_microbatches);
  for (const DeviceMicroBatch& m : micro) {  // the activation slots hold one shape
    TESSERA_EXPECTS(m.tokens.shape.rank() == 2, "pipeline step: tokens of shape ", m.tokens.shape, ", not (B, T)");
    TESSERA_EXPECTS(m.tokens.shape == micro[0].tokens.shape, "pipeline step: micro-batches of shapes ",
                    micro[0].tokens.shape, " and ", m.tokens.shape, "; every micro-batch of a step has the same");
  }
  Stage& lead = *chunks.front();
  const Stream& st = lead.stream();
  const std::int64_t B = micro[0].tokens.size(0), T = micro[0].tokens.size(1);
  const Shape edge = lead.boundary_shape(B, T);
  struct Executor {
    const std::vector<Stage*>& chunks;
    DeviceComm& pp;
    const schedule::Schedule& sched;
    std::span<const DeviceMicroBatch> micro;
    float dloss;
    std::int64_t B, T;
    Shape edge;
    const Stream& st;
    const std::function<void(int, int)>* before_backward;
    DeviceTensor<float> make(const schedule::Action&) { return DeviceTensor<float>::empty(edge, st); }
    Stage& chunk(const schedule::Action& a) { return *chunks[static_cast<std::size_t>(sched.chunk_of(a.stage_index))]; }
    void forward(const schedule::Action& a, int slot, const DeviceTensor<float>* input, DeviceTensor<float>* output) {
      const DeviceMicroBatch& m = micro[static_cast<std::size_t>(a.microbatch)];
      chunk(a).stage_forward(slot, B, T, m.tokens, input ? DeviceView<const float>(*input) : DeviceView<const float>{},
                             m.targets, &dloss, output ? output->view() : DeviceView<float>{}, m.at);
    }
    void backward(const schedule::Action& a, int slot, const DeviceTensor<float>* grad_output,
                  DeviceTensor<float>* grad_input) {
      const DeviceMicroBatch& m = micro[static_cast<std::size_t>(a.microbatch)];
      const DeviceView<const float> dy = grad_output ? DeviceView<const float>(*grad_output) : DeviceView<const float>{};
      const DeviceView<float> dx = grad_input ? grad_input->view() : DeviceView<float>{};
      if (a.kind == schedule::ActionKind::backward_input) {
        chunk(a).stage_backward_input(slot, m.tokens, dy, dx);
      } else {
        if (before_backward != nullptr) (*before_backward)(sched.chunk_of(a.stage_index), a.microbatch);
        chunk(a).stage_backward(slot, m.tokens, dy, dx);
      }
    }
    void backward_weight(const schedule::Action& a, int slot) { chunk(a).stage_backward_weight(slot); }
    void exchange(std::vector<schedule::WalkTransfer<DeviceTensor<float>>>& group) {
      std::vector<DeviceP2P> ops;
      for (const auto& t : group)
        ops.push_back(t.is_send ? DeviceP2P::send(*t.buffer, t.peer) : DeviceP2P::recv(*t.buffer, t.peer));
      pp.batch_send_recv(ops);
    }
    int slots(int c) const { return chunks[static_cast<std::size_t>(c)]->slots(); }
  } ex{chunks, pp, sched, micro, dloss, B, T, edge, st, before_backward};
  schedule::walk_step<DeviceTensor<float>>(sched, pp.rank(), ex);
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
    const std::vector<int> most = schedule::slots_needed(sched_, r);
    for (std::size_t c = 0; c < chunks_.size(); ++c) {
      chunks_[c]->set_slots(most[c]);
      chunks_[c]->set_split_backward(schedule::splits_backward(sched_, r, static_cast<int>(c)));
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
    if (ddp_.empty()) return run_pipeline_step(chunks_, pp_, sched_, micro, dloss);
    // Overlapped data parallelism: only each chunk's last backward of the step reduces.
    const std::function<void(int, int)> sync = [this](int c, int microbatch) {
      ddp_[static_cast<std::size_t>(c)]->set_sync(microbatch == last_[static_cast<std::size_t>(c)]);
    };
    run_pipeline_step(chunks_, pp_, sched_, micro, dloss, &sync);
  }

  /// Whether any of this rank's chunks runs a split backward (zero-bubble I and W passes).
  bool splits_backward() const {
    for (std::size_t c = 0; c < chunks_.size(); ++c)
      if (schedule::splits_backward(sched_, pp_.rank(), static_cast<int>(c))) return true;
    return false;
  }
  /// Data parallelism overlapped with the step's backward passes (as DDP's buckets, Li et al.
  /// 2020, and Megatron-LM's overlap_grad_reduce under a pipeline): `ddp[c]` (a
  /// DeviceDataParallel over chunk c's gradient_view, its buckets in the chunk's ready_offsets)
  /// reduces the chunk's buckets as the chunk's last backward of the step
  /// (schedule::last_backward_microbatch) finishes them, while the rest of the step runs; the
  /// earlier micro-batches only accumulate (under ZeRO-2, whose reduction ignores set_sync,
  /// every backward reduces its buckets but the tied wte's). Sets each chunk's backward hook. Call each ddp's
  /// finish() after forward_backward, as without overlap. Threads sharing a device only: with
  /// NCCL the pipeline's transfers and the reductions would run on two communicators at once
  /// (NCCL's user guide: they may deadlock). Throws tessera::Error naming the counts when ddp
  /// is not one per chunk, or when a chunk splits its backward (ZB-H1: its weight gradients
  /// finish in the W passes).
  void overlap_data_parallel(std::vector<DeviceDataParallel*> ddp) {
    TESSERA_EXPECTS(ddp.size() == chunks_.size(), "DevicePipeline::overlap_data_parallel: ", ddp.size(),
                    " data-parallel reductions for ", chunks_.size(), " model chunks");
    TESSERA_EXPECTS(!splits_backward(), "DevicePipeline::overlap_data_parallel: ", sched_.description(),
                    " splits backward (its weight gradients finish in the W passes); reduce after the step");
    last_ = schedule::last_backward_microbatch(sched_, pp_.rank());
    for (std::size_t c = 0; c < chunks_.size(); ++c) {
      TESSERA_EXPECTS(ddp[c] != nullptr, "DevicePipeline::overlap_data_parallel: chunk ", c, " has a null reduction");
      DeviceDataParallel* d = ddp[c];
      chunks_[c]->set_backward_hook([d](std::int64_t offset) { d->gradients_final_from(offset); });
    }
    ddp_ = std::move(ddp);
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
  /// step. Call after the step's backward passes and before the gradient norm; after the dp
  /// reduction or before it (it is linear), except under ZeRO-2 (DeviceGPT::shard_gradients):
  /// before its finish(), which reduces the tied wte's held bucket. Collective over the embedding
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
  /// `over_dp` (ZeRO-2, DeviceGPT::shard_gradients: each dp rank holds its shard's gradients):
  /// sums the chunks' squared norm (one float on the device) over dp in place before the tp and
  /// pipeline sums, e.g. DeviceDataParallel::all_reduce (collective over dp then).
  double grad_norm(const std::function<void(DeviceView<float>)>& over_dp = {}) {
    DeviceGPT<C>& lead = stage();
    if (chunks_.size() == 1 && !over_dp) return lead.grad_norm(&pp_);
    const DeviceView<float> sum = lead.grad_sum_of_squares();
    for (std::size_t c = 1; c < chunks_.size(); ++c) ops::add_into(lead.stream(), chunks_[c]->grad_sum_of_squares(), sum);
    if (over_dp) over_dp(sum);
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
  void share(const Tensor<float>& t, int root) {
    if (pp_.size() == 1) return;
    DeviceTensor<float> d = to_device<float>(t.contiguous(), stage().stream());
    pp_.broadcast(d, root);
    t.copy_from(to_host(d, stage().stream()));
  }

  std::vector<DeviceGPT<C>*> chunks_;
  std::vector<DeviceDataParallel*> ddp_;  // overlap_data_parallel's, one per chunk (empty: none)
  std::vector<int> last_;                 // each chunk's last backward micro-batch of a step
  DeviceComm& pp_;
  DeviceComm* embedding_;
  StagePartition partition_;
  schedule::Schedule sched_;
};

}  // namespace tessera::cuda
