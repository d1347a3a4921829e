// train_gpt's --device cuda model: tessera::cuda::DeviceGPT behind DeviceModel (compiled by nvcc).
#include "gpt/device_model.hpp"

#include <cuda_runtime_api.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/cuda/caching_allocator.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/device_pipeline.cuh"
#include "tessera/cuda/thread_device_comm.cuh"
#include "tessera/schedule/gpipe.hpp"
#include "tessera/schedule/interleaved_one_f_one_b.hpp"
#include "tessera/schedule/one_f_one_b.hpp"
#include "tessera/schedule/zero_bubble_h1.hpp"
#if defined(TESSERA_HAVE_NCCL)
#include "tessera/comm/nccl/nccl_communicator.hpp"
#include "tessera/cuda/nccl/nccl_device_comm.hpp"
#endif

namespace train_gpt {
namespace {

// One rank's model: one DeviceGPT, or under a pipeline its stages (one, or v model chunks under
// interleaving: stages c x pp + pp_rank, loop placement).
template <class C>
class CudaModel final : public DeviceModel {
 public:
  CudaModel(const tessera::GPTConfig& config, const tessera::ParameterList<float>& params, std::uint64_t seed,
            int shards, std::optional<tessera::Comm> tp, bool sequence_parallel, bool nccl_tp, int pp, int pp_rank,
            int virtual_stages)
      : stream_(),
        tp_comm_(tp ? make_tp_comm(std::move(*tp), stream_, nccl_tp, "nccl:tp") : nullptr),
        partition_(tessera::gpt_balanced_partition(config, pp * virtual_stages)) {
    for (int c = 0; c < virtual_stages; ++c)
      chunks_.push_back(std::make_unique<tessera::cuda::DeviceGPT<C>>(
          config, params, stream_, seed, shards, tp_comm_.get(), sequence_parallel,
          tessera::cuda::device_stage(partition_, c * pp + pp_rank)));
  }
  void zero_grad() override {
    for (auto& c : chunks_) c->zero_grad();
  }
  void forward_backward(const tessera::Tensor<std::int32_t>& x, const tessera::Tensor<std::int32_t>& y,
                        float dloss, const tessera::BatchPosition& at) override {
    auto xd = tessera::cuda::to_device<std::int32_t>(x, stream_), yd = tessera::cuda::to_device<std::int32_t>(y, stream_);
    model().forward_backward(xd, yd, dloss, at);
  }
  void evaluate(const tessera::Tensor<std::int32_t>& x, const tessera::Tensor<std::int32_t>& y) override {
    auto xd = tessera::cuda::to_device<std::int32_t>(x, stream_), yd = tessera::cuda::to_device<std::int32_t>(y, stream_);
    if (!pipe_) return model().evaluate(xd, yd);
    const tessera::cuda::DeviceMicroBatch mb{xd, yd, {}};
    pipe_->evaluate(std::span<const tessera::cuda::DeviceMicroBatch>(&mb, 1));
  }
  double take_loss_sum() override {
    double sum = 0;
    for (auto& c : chunks_) sum += c->take_loss_sum();
    return sum;
  }
  double grad_norm() override {
    if (!ddp_.empty() && ddp_.front()->sharded_gradients()) {  // ZeRO-2: each rank's shard's part, summed over dp
      tessera::cuda::DeviceDataParallel& dp = *ddp_.front();
      if (pipe_) return pipe_->grad_norm([&dp](tessera::cuda::DeviceView<float> sum) { dp.all_reduce(sum); });
      const tessera::cuda::DeviceView<float> sum = model().grad_sum_of_squares();
      dp.all_reduce(sum);
      return model().reduce_grad_norm(sum);
    }
    return pipe_ ? pipe_->grad_norm() : model().grad_norm();
  }
  std::string nonfinite_gradient() const override {
    for (const auto& c : chunks_)
      if (const auto bad = c->first_nonfinite_gradient()) return bad->first + " (element " + std::to_string(bad->second) + ")";
    return std::string();
  }
  void step(const tessera::optim::AdamWOptions& options, double lr, float grad_scale) override {
    for (std::size_t i = 0; i < chunks_.size(); ++i) {
      tessera::cuda::DeviceGPT<C>& m = *chunks_[i];
      m.step(options, lr, grad_scale);
      if (m.sharded() && !m.sharded_parameters()) {  // ZeRO-1/2: every rank updated its shard; gather them all
        const tessera::Shape shard{m.shard_end() - m.shard_begin()};
        ddp_[i]->gather(tessera::cuda::DeviceView<const float>(m.master_view().data + m.shard_begin(), shard),
                        m.master_view());
        m.refresh_compute_copy();
      }
    }
  }
  void download(const tessera::ParameterList<float>& params) const override {
    for (const auto& c : chunks_) c->download(params);
    if (pipe_) pipe_->broadcast_stages(params);  // every stage's parameters on every rank
  }
  void upload_optimizer(const tessera::optim::AdamW<float>& opt) override {
    for (auto& c : chunks_) c->upload_optimizer(opt);
  }
  void download_optimizer(tessera::optim::AdamW<float>& opt) const override {
    for (std::size_t i = 0; i < chunks_.size(); ++i) {
      const tessera::cuda::DeviceGPT<C>& m = *chunks_[i];
      if (!m.sharded()) {
        m.download_optimizer(opt);
        continue;
      }
      // ZeRO-1: the moments' shards gathered into whole buffers first (collective).
      const tessera::Shape flat{m.numel()};
      auto mm = tessera::cuda::DeviceTensor<float>::empty(flat, stream_), vv = tessera::cuda::DeviceTensor<float>::empty(flat, stream_);
      ddp_[i]->gather(m.exp_avg_view(), mm);
      ddp_[i]->gather(m.exp_avg_sq_view(), vv);
      m.download_optimizer(opt, mm, vv);
    }
    if (pipe_) pipe_->broadcast_stages(opt);
  }
  std::size_t activation_bytes() const override {
    std::size_t n = 0;
    for (const auto& c : chunks_) n += c->activation_bytes();
    return n;
  }
  std::size_t peak_device_bytes() const override {
    return tessera::cuda::default_allocator().stats().peak_allocated_bytes;
  }
  void set_fused_attention(bool on) override {
    for (auto& c : chunks_) c->set_fused_attention(on);
  }
  std::string device_name() const override {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, tessera::cuda::current_device()) != cudaSuccess) return "CUDA device";
    return p.name;
  }
  void attach_data_parallel(tessera::Comm dp, std::int64_t bucket_elements, int zero, bool nccl,
                            bool overlap) override {
    TESSERA_EXPECTS(zero >= 0 && zero <= 3, "train_gpt: ZeRO stage ", zero, " on the device; 0 to 3");
    if (zero >= 1)
      for (auto& c : chunks_) c->shard_optimizer(dp.rank(), dp.size());
    comm_stream_.emplace();
    if (nccl) {
#if defined(TESSERA_HAVE_NCCL)
      // One GPU per rank: an NCCL communicator over the same ranks (bootstrapped through dp).
      comm_ = std::make_unique<tessera::cuda::NcclDeviceComm>(
          tessera::nccl::make_communicator(dp, tessera::cuda::current_device(), {.name = "nccl:dp"}), *comm_stream_);
#else
      throw tessera::Error("train_gpt: this build has no NCCL: dp ranks cannot drive GPUs of their own");
#endif
    } else {
      comm_ = std::make_unique<tessera::cuda::ThreadDeviceComm>(std::move(dp), *comm_stream_);
    }
    // One reduction per model chunk, over the same communicator, in chunk order on every rank.
    for (auto& c : chunks_) {
      auto buckets = tessera::cuda::device_grad_buckets(c->numel(), c->ready_offsets(), bucket_elements);
      if (zero >= 2) {  // ZeRO-2: per-bucket gradient buffers, each reduced onto its elements' owners
        c->shard_gradients(std::move(buckets));
        // (A stage's tied wte bucket is held for finish_gradients, after the embedding group's sum.)
        ddp_.push_back(std::make_unique<tessera::cuda::DeviceDataParallel>(*comm_, stream_, *c->bucket_gradients()));
        // ZeRO-3: the weights gathered bucket by bucket; queued ahead only where no NCCL collective
        // of tp or the pipeline runs on the compute stream meanwhile (`overlap` says so).
        if (zero == 3) c->shard_parameters(*ddp_.back(), overlap);
      } else {
        ddp_.push_back(
            std::make_unique<tessera::cuda::DeviceDataParallel>(*comm_, stream_, c->gradient_view(), std::move(buckets)));
      }
    }
    if (overlap && pipe_ && !pipe_->splits_backward()) {  // each chunk's last backward of a step reduces
      std::vector<tessera::cuda::DeviceDataParallel*> ddp;
      for (auto& d : ddp_) ddp.push_back(d.get());
      pipe_->overlap_data_parallel(std::move(ddp));
    } else if (overlap && !pipe_ && chunks_.size() == 1) {
      model().set_backward_hook([this](std::int64_t offset) { ddp_.front()->gradients_final_from(offset); });
    }
  }
  void set_sync(bool sync) override {
    for (auto& d : ddp_) d->set_sync(sync);
  }
  void finish_gradients() override {
    if (!ddp_.empty() && ddp_.front()->sharded_gradients()) {  // ZeRO-2: the tied wte's sum before its reduction
      if (pipe_) pipe_->reduce_tied_embedding();
      for (auto& d : ddp_) d->finish();
      return;
    }
    for (auto& d : ddp_) d->finish();
    if (pipe_) pipe_->reduce_tied_embedding();
  }
  void attach_pipeline(tessera::Comm pp, std::optional<tessera::Comm> embedding, const std::string& schedule,
                       int microbatches, bool nccl) override {
    pp_comm_ = make_tp_comm(std::move(pp), stream_, nccl, "nccl:pp");
    if (embedding) emb_comm_ = make_tp_comm(std::move(*embedding), stream_, nccl, "nccl:embedding");
    const int p = pp_comm_->size(), v = static_cast<int>(chunks_.size());
    tessera::schedule::Schedule s = schedule == "gpipe"         ? tessera::schedule::GPipe{microbatches}.build(p)
                                    : schedule == "interleaved" ? tessera::schedule::InterleavedOneFOneB{microbatches, v}.build(p)
                                    : schedule == "zb-h1"       ? tessera::schedule::ZeroBubbleH1{microbatches}.build(p)
                                                                : tessera::schedule::OneFOneB{microbatches}.build(p);
    std::vector<tessera::cuda::DeviceGPT<C>*> chunks;
    for (auto& c : chunks_) chunks.push_back(c.get());
    pipe_ = std::make_unique<tessera::cuda::DevicePipeline<C>>(std::move(chunks), *pp_comm_, emb_comm_.get(), partition_,
                                                               std::move(s));
  }
  void forward_backward_pipeline(const std::vector<tessera::Tensor<std::int32_t>>& xs,
                                 const std::vector<tessera::Tensor<std::int32_t>>& ys, float dloss,
                                 const std::vector<tessera::BatchPosition>& at) override {
    TESSERA_EXPECTS(pipe_ != nullptr, "train_gpt: forward_backward_pipeline before attach_pipeline");
    std::vector<tessera::cuda::DeviceTensor<std::int32_t>> xd, yd;
    std::vector<tessera::cuda::DeviceMicroBatch> micro;
    for (std::size_t k = 0; k < xs.size(); ++k) {
      xd.push_back(tessera::cuda::to_device<std::int32_t>(xs[k], stream_));
      yd.push_back(tessera::cuda::to_device<std::int32_t>(ys[k], stream_));
    }
    for (std::size_t k = 0; k < xs.size(); ++k) micro.push_back({xd[k], yd[k], at[k]});
    pipe_->forward_backward(micro, dloss);
  }

 private:
  tessera::cuda::DeviceGPT<C>& model() { return *chunks_.front(); }
  // The tp group's collectives on the compute stream: NCCL when each rank has a GPU of its own
  // (bootstrapped through `host`), else threads sharing this GPU.
  static std::unique_ptr<tessera::cuda::DeviceComm> make_tp_comm(tessera::Comm host, const tessera::cuda::Stream& stream,
                                                                 bool nccl, const char* name) {
    if (nccl) {
#if defined(TESSERA_HAVE_NCCL)
      return std::make_unique<tessera::cuda::NcclDeviceComm>(
          tessera::nccl::make_communicator(host, tessera::cuda::current_device(), {.name = name}), stream);
#else
      throw tessera::Error(std::string("train_gpt: this build has no NCCL: ") + name + " ranks cannot drive GPUs of their own");
#endif
    }
    return std::make_unique<tessera::cuda::ThreadDeviceComm>(std::move(host), stream);
  }
  tessera::cuda::Stream stream_;
  // Tensor parallelism: the tp group's collectives on the compute stream (before the model, which uses it).
  std::unique_ptr<tessera::cuda::DeviceComm> tp_comm_;
  tessera::StagePartition partition_;  // the pipeline's cut (one stage at pp 1)
  std::vector<std::unique_ptr<tessera::cuda::DeviceGPT<C>>> chunks_;  // this rank's stages (the whole model at pp 1)
  // Pipeline parallelism (attach_pipeline): the stages' group, the embedding group, the executor.
  std::unique_ptr<tessera::cuda::DeviceComm> pp_comm_, emb_comm_;
  std::unique_ptr<tessera::cuda::DevicePipeline<C>> pipe_;
  // Data parallelism (attach_data_parallel): destroyed before the model, the reduction first.
  std::optional<tessera::cuda::Stream> comm_stream_;
  std::unique_ptr<tessera::cuda::DeviceComm> comm_;
  std::vector<std::unique_ptr<tessera::cuda::DeviceDataParallel>> ddp_;  // one per chunk
};

}  // namespace

bool built_with_cuda() { return true; }
bool built_with_nccl() {
#if defined(TESSERA_HAVE_NCCL)
  return true;
#else
  return false;
#endif
}
int visible_gpus() { return tessera::cuda::device_count(); }
std::string no_device_reason() { return visible_gpus() > 0 ? std::string() : tessera::cuda::no_device_reason(); }

std::unique_ptr<DeviceModel> make_device_model(const tessera::GPTConfig& config,
                                               const tessera::ParameterList<float>& params, std::uint64_t seed,
                                               bool bf16, int shards, int device, std::optional<tessera::Comm> tp,
                                               bool sequence_parallel, bool nccl_tp, int pp, int pp_rank,
                                               int virtual_stages) {
  tessera::cuda::set_device(device);
  if (bf16)
    return std::make_unique<CudaModel<tessera::cuda::bf16>>(config, params, seed, shards, std::move(tp), sequence_parallel,
                                                            nccl_tp, pp, pp_rank, virtual_stages);
  return std::make_unique<CudaModel<float>>(config, params, seed, shards, std::move(tp), sequence_parallel, nccl_tp, pp,
                                            pp_rank, virtual_stages);
}

}  // namespace train_gpt
