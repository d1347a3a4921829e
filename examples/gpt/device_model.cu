// train_gpt's --device cuda model: tessera::cuda::DeviceGPT behind DeviceModel (compiled by nvcc).
#include "gpt/device_model.hpp"

#include <cuda_runtime_api.h>

#include <memory>
#include <optional>

#include "tessera/cuda/caching_allocator.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/thread_device_comm.cuh"
#if defined(TESSERA_HAVE_NCCL)
#include "tessera/comm/nccl/nccl_communicator.hpp"
#include "tessera/cuda/nccl/nccl_device_comm.hpp"
#endif

namespace train_gpt {
namespace {

template <class C>
class CudaModel final : public DeviceModel {
 public:
  CudaModel(const tessera::GPTConfig& config, const tessera::ParameterList<float>& params, std::uint64_t seed,
            int shards, std::optional<tessera::Comm> tp, bool sequence_parallel, bool nccl_tp)
      : stream_(),
        tp_comm_(tp ? make_tp_comm(std::move(*tp), stream_, nccl_tp) : nullptr),
        model_(config, params, stream_, seed, shards, tp_comm_.get(), sequence_parallel) {}
  void zero_grad() override { model_.zero_grad(); }
  void forward_backward(const tessera::Tensor<std::int32_t>& x, const tessera::Tensor<std::int32_t>& y,
                        float dloss, const tessera::BatchPosition& at) override {
    auto xd = tessera::cuda::to_device<std::int32_t>(x, stream_), yd = tessera::cuda::to_device<std::int32_t>(y, stream_);
    model_.forward_backward(xd, yd, dloss, at);
  }
  void evaluate(const tessera::Tensor<std::int32_t>& x, const tessera::Tensor<std::int32_t>& y) override {
    auto xd = tessera::cuda::to_device<std::int32_t>(x, stream_), yd = tessera::cuda::to_device<std::int32_t>(y, stream_);
    model_.evaluate(xd, yd);
  }
  double take_loss_sum() override { return model_.take_loss_sum(); }
  double grad_norm() override { return model_.grad_norm(); }
  std::string nonfinite_gradient() const override {
    const auto bad = model_.first_nonfinite_gradient();
    return bad ? bad->first + " (element " + std::to_string(bad->second) + ")" : std::string();
  }
  void step(const tessera::optim::AdamWOptions& options, double lr, float grad_scale) override {
    model_.step(options, lr, grad_scale);
    if (model_.sharded()) {  // ZeRO-1: every rank updated its shard; gather them all
      const tessera::Shape shard{model_.shard_end() - model_.shard_begin()};
      ddp_->gather(tessera::cuda::DeviceView<const float>(model_.master_view().data + model_.shard_begin(), shard),
                   model_.master_view());
      model_.refresh_compute_copy();
    }
  }
  void download(const tessera::ParameterList<float>& params) const override { model_.download(params); }
  void upload_optimizer(const tessera::optim::AdamW<float>& opt) override { model_.upload_optimizer(opt); }
  void download_optimizer(tessera::optim::AdamW<float>& opt) const override {
    if (!model_.sharded()) return model_.download_optimizer(opt);
    // ZeRO-1: the moments' shards gathered into whole buffers first (collective).
    const tessera::Shape flat{model_.numel()};
    auto m = tessera::cuda::DeviceTensor<float>::empty(flat, stream_), v = tessera::cuda::DeviceTensor<float>::empty(flat, stream_);
    ddp_->gather(model_.exp_avg_view(), m);
    ddp_->gather(model_.exp_avg_sq_view(), v);
    model_.download_optimizer(opt, m, v);
  }
  std::size_t activation_bytes() const override { return model_.activation_bytes(); }
  std::size_t peak_device_bytes() const override {
    return tessera::cuda::default_allocator().stats().peak_allocated_bytes;
  }
  std::string device_name() const override {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, tessera::cuda::current_device()) != cudaSuccess) return "CUDA device";
    return p.name;
  }
  void attach_data_parallel(tessera::Comm dp, std::int64_t bucket_elements, bool shard_optimizer,
                            bool nccl, bool overlap) override {
    if (shard_optimizer) model_.shard_optimizer(dp.rank(), dp.size());
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
    ddp_ = std::make_unique<tessera::cuda::DeviceDataParallel>(
        *comm_, stream_, model_.gradient_view(),
        tessera::cuda::device_grad_buckets(model_.numel(), model_.ready_offsets(), bucket_elements));
    if (overlap) model_.set_backward_hook([this](std::int64_t offset) { ddp_->gradients_final_from(offset); });
  }
  void set_sync(bool sync) override {
    if (ddp_) ddp_->set_sync(sync);
  }
  void finish_gradients() override {
    if (ddp_) ddp_->finish();
  }

 private:
  // The tp group's collectives on the compute stream: NCCL when each rank has a GPU of its own
  // (bootstrapped through `host`), else threads sharing this GPU.
  static std::unique_ptr<tessera::cuda::DeviceComm> make_tp_comm(tessera::Comm host, const tessera::cuda::Stream& stream,
                                                                 bool nccl) {
    if (nccl) {
#if defined(TESSERA_HAVE_NCCL)
      return std::make_unique<tessera::cuda::NcclDeviceComm>(
          tessera::nccl::make_communicator(host, tessera::cuda::current_device(), {.name = "nccl:tp"}), stream);
#else
      throw tessera::Error("train_gpt: this build has no NCCL: tp ranks cannot drive GPUs of their own");
#endif
    }
    return std::make_unique<tessera::cuda::ThreadDeviceComm>(std::move(host), stream);
  }
  tessera::cuda::Stream stream_;
  // Tensor parallelism: the tp group's collectives on the compute stream (before the model, which uses it).
  std::unique_ptr<tessera::cuda::DeviceComm> tp_comm_;
  tessera::cuda::DeviceGPT<C> model_;
  // Data parallelism (attach_data_parallel): destroyed before the model, the reduction first.
  std::optional<tessera::cuda::Stream> comm_stream_;
  std::unique_ptr<tessera::cuda::DeviceComm> comm_;
  std::unique_ptr<tessera::cuda::DeviceDataParallel> ddp_;
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
                                               bool sequence_parallel, bool nccl_tp) {
  tessera::cuda::set_device(device);
  if (bf16)
    return std::make_unique<CudaModel<tessera::cuda::bf16>>(config, params, seed, shards, std::move(tp), sequence_parallel,
                                                            nccl_tp);
  return std::make_unique<CudaModel<float>>(config, params, seed, shards, std::move(tp), sequence_parallel, nccl_tp);
}

}  // namespace train_gpt
