#pragma once
/// @file
/// LlamaDevicePipeline: pipeline parallelism of the Llama example's model on device memory, from
/// tessera's schedule walker (tessera::cuda::run_pipeline_step, the one DevicePipeline runs for
/// the GPT) over DeviceLlama stages. Each pipeline rank holds its model chunks (a DeviceLlama
/// built with the DeviceStage of its StagePartition entry over pipeline_num_layers: 0 the
/// embedding, 1..n_layer the decoder layers, n_layer + 1 the final norm and lm_head), each
/// chunk tensor-parallel when built with a tp DeviceComm. GPipe, 1F1B and interleaved 1F1B;
/// the zero-bubble schedules' split backward is not built for the Llama (refused). The lm_head
/// is untied, so no embedding group is needed. Data parallelism: DeviceDataParallel over each
/// chunk's gradients after the step (gradients_final_from(0), finish). CUDA code: compile with
/// nvcc.

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "llama/device/device_llama.cuh"
#include "llama/device/flat_layer_layout.hpp"
#include "tessera/core/error.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_pipeline.cuh"
#include "tessera/cuda/ops/residual_add.cuh"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/schedule/checker.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/step_walker.hpp"

namespace llama::device {

/// The DeviceStage of stage `stage` of `partition` (a StagePartition over pipeline_num_layers).
inline tc::DeviceStage llama_device_stage(const tessera::StagePartition& partition, int stage) {
  return tc::DeviceStage{partition.begin(stage), partition.end(stage)};
}

/// Pipeline parallelism over DeviceLlama stages; see the file comment.
template <class C>
class LlamaDevicePipeline {
 public:
  /// This rank's model chunks (`chunks[c]` is stage schedule.stages_of(pp.rank())[c], built with
  /// llama_device_stage(partition, that stage); one chunk without interleaving; all on one
  /// stream; not owned), the pipeline group `pp` (every stage's rank with this rank's dp and tp
  /// coordinates; pp rank = the schedule's rank; on the chunks' stream), the cut `partition`
  /// (pp x v stages of the model's pipeline_num_layers) and the schedule to run (checked here). Sets
  /// each chunk's activation slots to the most micro-batches the schedule keeps in flight on
  /// that stage. Throws tessera::Error naming the numbers when the schedule is for another pp
  /// size or chunk count, or splits backward (zero-bubble); the partition cuts another number of
  /// layers or stages; or a chunk is not the partition's entry for its stage or runs on another
  /// stream.
  LlamaDevicePipeline(std::vector<DeviceLlama<C>*> chunks, tc::DeviceComm& pp, tessera::StagePartition partition,
                      tessera::schedule::Schedule sched)
      : chunks_(std::move(chunks)), pp_(pp), partition_(std::move(partition)), sched_(std::move(sched)) {
    const int p = pp_.size(), r = pp_.rank();
    TESSERA_EXPECTS(!chunks_.empty(), "LlamaDevicePipeline: no model chunk given");
    for (DeviceLlama<C>* c : chunks_) TESSERA_EXPECTS(c != nullptr, "LlamaDevicePipeline: a null model chunk");
    TESSERA_EXPECTS(sched_.pp_size == p, "LlamaDevicePipeline: schedule ", sched_.description(), " is for ",
                    sched_.pp_size, " pipeline ranks, the pipeline group has ", p);
    TESSERA_EXPECTS(sched_.virtual_stages == static_cast<int>(chunks_.size()), "LlamaDevicePipeline: ",
                    sched_.description(), " has ", sched_.virtual_stages, " model chunks per rank, this rank gave ",
                    chunks_.size());
    TESSERA_EXPECTS(partition_.num_stages() == sched_.num_stages(), "LlamaDevicePipeline: the partition has ",
                    partition_.num_stages(), " stages, ", sched_.description(), " runs ", sched_.num_stages());
    const LlamaConfig& config = chunks_.front()->config();
    TESSERA_EXPECTS(partition_.num_layers() == pipeline_num_layers(config), "LlamaDevicePipeline: the partition cuts ",
                    partition_.num_layers(), " layers, a Llama of ", config.n_layer, " decoder layers has ",
                    pipeline_num_layers(config), " pipeline layers");
    (void)tessera::schedule::check(sched_);
    const std::vector<int> mine = sched_.stages_of(r);
    const tc::Stream& st = chunks_.front()->stream();
    for (std::size_t c = 0; c < chunks_.size(); ++c) {
      const tc::DeviceStage want = llama_device_stage(partition_, mine[c]), held = chunks_[c]->stage();
      TESSERA_EXPECTS(want.first == held.first && want.end == held.end, "LlamaDevicePipeline: pipeline rank ", r,
                      " chunk ", c, " (stage ", mine[c], ") holds pipeline layers [", held.first, ", ", held.end,
                      "), the partition gives it [", want.first, ", ", want.end, ")");
      TESSERA_EXPECTS(chunks_[c]->stream().get() == st.get(), "LlamaDevicePipeline: chunk ", c,
                      " runs on another stream than chunk 0");
      TESSERA_EXPECTS(!tessera::schedule::splits_backward(sched_, r, static_cast<int>(c)), "LlamaDevicePipeline: ",
                      sched_.description(), " splits backward (zero-bubble I and W passes), which is not built for "
                      "the Llama's stages; use GPipe, 1F1B or interleaved 1F1B");
    }
    TESSERA_EXPECTS(pp_.stream().get() == st.get(), "LlamaDevicePipeline: the pipeline group must run on the "
                    "stages' compute stream");
    const std::vector<int> most = tessera::schedule::slots_needed(sched_, r);
    for (std::size_t c = 0; c < chunks_.size(); ++c) chunks_[c]->set_slots(most[c]);
  }

  /// Forward and backward of one step's micro-batches (as many as the schedule's, all of one
  /// shape; tokens on the device, checked by the caller), gradients accumulated into the
  /// chunks' (+=), `dloss` the loss's gradient per token (1 / the step's tokens for a mean); the
  /// losses added to the last stage's take_loss_sum(). Collective over the pipeline group (and
  /// tp). Throws tessera::Error naming the counts when the micro-batches are not the schedule's
  /// number or differ in shape.
  void forward_backward(std::span<const tc::DeviceMicroBatch> micro, float dloss) {
    tc::run_pipeline_step(chunks_, pp_, sched_, micro, dloss);
  }

  /// The losses summed on this rank since the last call (the last stage's; 0 on the others),
  /// then zeroed.
  double take_loss_sum() {
    double s = 0;
    for (DeviceLlama<C>* c : chunks_) s += c->take_loss_sum();
    return s;
  }

  /// The whole model's gradient norm (every stage's part, tp's shards), the same on every rank.
  /// Collective over tp and the pipeline group.
  double grad_norm() {
    DeviceLlama<C>& lead = *chunks_.front();
    const tc::DeviceView<float> sum = lead.grad_sum_of_squares();
    for (std::size_t c = 1; c < chunks_.size(); ++c)
      tc::ops::add_into(lead.stream(), chunks_[c]->grad_sum_of_squares(), sum);
    return lead.reduce_grad_norm(sum, &pp_);
  }

  /// This rank's model chunks, in chunk order.
  const std::vector<DeviceLlama<C>*>& chunks() const noexcept { return chunks_; }
  /// The schedule walked.
  const tessera::schedule::Schedule& schedule() const noexcept { return sched_; }

 private:
  std::vector<DeviceLlama<C>*> chunks_;
  tc::DeviceComm& pp_;
  tessera::StagePartition partition_;
  tessera::schedule::Schedule sched_;
};

}  // namespace llama::device
