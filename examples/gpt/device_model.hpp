#pragma once
// --device cuda: the GPT on one CUDA device behind a plain C++ interface, so train_gpt's own
// translation unit is compiled by the C++ compiler and only device_model.cu by nvcc (where the
// build has the CUDA device layers; device_model_unavailable.cpp otherwise).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/batch_position.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/adamw.hpp"

namespace train_gpt {

// tessera::cuda::DeviceGPT<float or bf16>, type-erased. Token tensors are host tensors (B, T);
// each call copies them to the device.
class DeviceModel {
 public:
  virtual ~DeviceModel() = default;
  virtual void zero_grad() = 0;
  // Gradients of one micro-batch accumulated; dloss: the loss gradient per token; at: the
  // micro-batch's step and first global row (the dropout masks).
  virtual void forward_backward(const tessera::Tensor<std::int32_t>& x, const tessera::Tensor<std::int32_t>& y,
                                float dloss, const tessera::BatchPosition& at) = 0;
  virtual void evaluate(const tessera::Tensor<std::int32_t>& x, const tessera::Tensor<std::int32_t>& y) = 0;
  virtual double take_loss_sum() = 0;  // summed token losses since the last call
  virtual double grad_norm() = 0;
  // "" when every gradient is finite; else the first parameter whose gradient is not, as
  // "NAME (element K)" (blocks; for error messages).
  virtual std::string nonfinite_gradient() const = 0;
  virtual void step(const tessera::optim::AdamWOptions& options, double lr, float grad_scale) = 0;
  virtual void download(const tessera::ParameterList<float>& params) const = 0;
  virtual void upload_optimizer(const tessera::optim::AdamW<float>& opt) = 0;
  virtual void download_optimizer(tessera::optim::AdamW<float>& opt) const = 0;
  virtual std::size_t activation_bytes() const = 0;
  virtual std::size_t peak_device_bytes() const = 0;  // the caching allocator's peak
  virtual std::string device_name() const = 0;
  // The blocks' attention: the fused kernels (FlashAttention-2's algorithm) or the unfused
  // reference (DeviceGPT::set_fused_attention), on every model chunk.
  virtual void set_fused_attention(bool on) = 0;
  // Data parallelism with the other ranks of `dp` (threads of this process on the same GPU):
  // each forward_backward with sync on reduces its gradients in buckets of at most
  // `bucket_elements` while backward runs (tessera::cuda::DeviceDataParallel); with `zero` 1
  // (ZeRO-1) each rank keeps AdamW's moments of its 1/dp of the flat buffers, steps those
  // weights and gathers the others' (the model made with shards = dp); with `zero` 2 (ZeRO-2;
  // not under ZB-H1) it also keeps only its 1/dp of the reduced gradients: with `overlap` every backward
  // reduces each bucket onto the owners of its elements (DeviceGPT::shard_gradients), whatever
  // set_sync says; without it the buckets are held over the step and reduced once; with `zero`
  // 3 (ZeRO-3; a pipeline stage its own) each rank keeps only its 1/dp of the fp32 weights too,
  // and forward and backward gather each bucket's weights when they need them
  // (DeviceGPT::shard_parameters; the next block's gather queued ahead with `overlap` only).
  // Collective over dp. With `nccl` the ranks each drive a GPU of their own and reduce through
  // NCCL (the model made on device dp.rank()); otherwise they share this GPU (threads of one
  // process). Without `overlap` the buckets are reduced after backward (finish_gradients), not
  // during it (a pipeline stage's tied wte bucket is always reduced in finish_gradients, after
  // the embedding group's sum). ZeRO-2's costs: with overlap, each micro-batch's backward
  // reduces (m micro-batches: m times the bytes); without it (NCCL under tp or pp) every
  // bucket is held over the step, as much gradient memory as without ZeRO-2, plus the shard. Throws tessera::Error for `zero` outside 0..3 (train_gpt refuses 2 and 3 under ZB-H1).
  virtual void attach_data_parallel(tessera::Comm dp, std::int64_t bucket_elements, int zero, bool nccl,
                                    bool overlap = true) = 0;
  // Whether the next forward_backward reduces (the last micro-batch of a step; default on).
  virtual void set_sync(bool sync) = 0;
  // After a step's last forward_backward, before grad_norm and step: the reductions ordered
  // before them, and under a pipeline the tied wte's two gradients summed. Collective over dp
  // (and the first and last stage). Nothing without attach_data_parallel or attach_pipeline.
  virtual void finish_gradients() = 0;
  // Pipeline parallelism (the model made with pp > 1): `pp` the ranks of every stage with this
  // rank's dp and tp coordinates (pp rank = stage), `embedding` the first and last stage's
  // (nullopt on the other stages), the schedule ("gpipe", "1f1b", "zb-h1", or "interleaved" over
  // the model's chunks) over `microbatches`
  // micro-batches (tessera::cuda::DevicePipeline). Then forward_backward_pipeline runs a step,
  // evaluate goes down the pipeline, grad_norm sums the stages, download and download_optimizer
  // gather them (collective over pp). With `nccl` through NCCL (a GPU per rank).
  virtual void attach_pipeline(tessera::Comm pp, std::optional<tessera::Comm> embedding, const std::string& schedule,
                               int microbatches, bool nccl) = 0;
  // One step's forward and backward of the micro-batches xs[k], ys[k] (each (B, T), all the same
  // shape) at places at[k], in the schedule's order. Collective over pp (and tp).
  virtual void forward_backward_pipeline(const std::vector<tessera::Tensor<std::int32_t>>& xs,
                                         const std::vector<tessera::Tensor<std::int32_t>>& ys, float dloss,
                                         const std::vector<tessera::BatchPosition>& at) = 0;
};

// Whether this train_gpt was built with the CUDA device layers (nvcc found at configure time).
bool built_with_cuda();
// Whether it was built with NCCL too (dp ranks on GPUs of their own).
bool built_with_nccl();
// CUDA devices this process sees (0 without a device or a CUDA build; never throws).
int visible_gpus();
// Why this process sees no CUDA device (the runtime's words), or "" when it sees one.
std::string no_device_reason();

// A model on CUDA device `device` (made current on the calling thread) holding `params` (the
// CPU GPT's, in its order, made from `seed`), bf16 mixed precision or fp32, its flat buffers
// padded for `shards` ZeRO-1 shards. With `tp` (threads of this process sharing the device, a
// host communicator of their own): tensor-parallel over them, this rank holding its shard of
// every block (tessera::cuda::DeviceGPT); forward, backward, grad_norm, download and
// download_optimizer are then collective over tp; with `sequence_parallel` the rows are split
// over tp between the blocks' products; with `nccl_tp` the tp ranks each drive a GPU of their own
// (`device`) and their collectives go through NCCL. With `pp` > 1 the model is stage `pp_rank`
// of the GPT cut into pp stages by tessera::gpt_balanced_partition (the CPU pipeline's cut);
// with `virtual_stages` v > 1 it holds v model chunks, stages c x pp + pp_rank of pp x v (the
// interleaved schedule's loop placement); attach_pipeline joins the stages. Collective over tp. Throws tessera::Error naming the reason
// where there is no such device or no CUDA build.
std::unique_ptr<DeviceModel> make_device_model(const tessera::GPTConfig& config,
                                               const tessera::ParameterList<float>& params, std::uint64_t seed,
                                               bool bf16, int shards = 1, int device = 0,
                                               std::optional<tessera::Comm> tp = std::nullopt,
                                               bool sequence_parallel = false, bool nccl_tp = false, int pp = 1,
                                               int pp_rank = 0, int virtual_stages = 1);

}  // namespace train_gpt
