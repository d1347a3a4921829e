#pragma once
/// @file
/// DeviceGPT<C>: GPT-2 (the model of models/gpt.hpp) trained on one CUDA device, in fp32
/// (C = float, TF32 off: the reference) or bf16 mixed precision (C = bf16: bf16 weights and
/// activations; fp32 master weights, gradients, AdamW moments, LayerNorm statistics, softmax and
/// loss). Parameters live in one flat fp32 buffer in the CPU GPT's parameter order, so the CPU
/// model is the checkpoint format: upload() takes its values, download() writes them back, and
/// the same goes for AdamW's moments. Every product is a cuBLASLt GEMM (bias and GELU fused as
/// epilogues); the other operations are tessera/cuda/ops kernels, each checked against its CPU
/// layer. Embedding dropout (embd_pdrop) draws the CPU Dropout's masks (keyed by the step and the
/// global batch row), so a device run with dropout equals the CPU run.
///
/// Tensor parallelism (Shoeybi et al. 2019, Megatron-LM): given a DeviceComm over the tp ranks
/// (on the compute stream), each rank holds its shard of every block (gpt_tensor_parallel_layout:
/// c_attn and c_fc column-parallel, its n_head / tp heads; attn.c_proj and mlp.c_proj
/// row-parallel), and the block's two f/g pairs become one all-reduce each way: the row-parallel
/// products' partial sums (fp32) forward, the column-parallel inputs' gradients backward. The
/// token embedding, tied to the head, is split by vocabulary rows as the CPU's
/// VocabParallelEmbedding (each rank looks up its own tokens, zero rows for the others', and one
/// all-reduce sums them), its logits are this rank's vocabulary columns, and the loss is
/// vocab-parallel (ops::vocab_parallel_cross_entropy: two all-reduces, of one and two floats per token);
/// the LayerNorms and the position embedding are replicated. With sequence parallelism
/// (Korthikanti et al. 2022) each tp rank keeps the residual stream, the LayerNorms, dropout and
/// their statistics for its 1/tp of the rows only: an all-gather before each column-parallel
/// product and a reduce-scatter after each row-parallel one replace the all-reduces, and the
/// LayerNorms' weight gradients (partial over the rows) are all-reduced over tp.
///
/// Pipeline parallelism: given a DeviceStage (pipeline layers [first, end) as StagePartition
/// cuts them: 0 the embedding, 1..n_layer the blocks, n_layer + 1 the head), the model holds that
/// stage's parameters only (flat_gpt_stage_layout: a last stage without the embedding holds its
/// own copy of the tied wte, whose gradient the caller sums with the first stage's,
/// tied_embedding_gradient()); stage_forward and stage_backward run one micro-batch from and to
/// fp32 boundary activations, each micro-batch in flight in its own activation slot
/// (set_slots); DevicePipeline walks a schedule over them. CUDA code: compile with nvcc.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "tessera/core/batch_position.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device_bucket_gradients.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/flat_gpt_layout.hpp"
#include "tessera/cuda/ops/adamw.cuh"
#include "tessera/cuda/ops/attention.cuh"
#include "tessera/cuda/ops/bias_grad.cuh"
#include "tessera/cuda/ops/convert.cuh"
#include "tessera/cuda/ops/cross_entropy.cuh"
#include "tessera/cuda/ops/dropout.cuh"
#include "tessera/cuda/ops/embedding.cuh"
#include "tessera/cuda/ops/flash_attention.cuh"
#include "tessera/cuda/ops/gemm_epilogue.cuh"
#include "tessera/cuda/ops/global_norm.cuh"
#include "tessera/cuda/ops/layer_norm.cuh"
#include "tessera/cuda/ops/residual_add.cuh"
#include "tessera/cuda/ops/vocab_parallel_cross_entropy.cuh"
#include "tessera/cuda/phase_timer.hpp"
#include "tessera/cuda/stream.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/adamw.hpp"

namespace tessera::cuda {

/// GPT-2 on one device; see the file comment. `C` is the compute type (float or bf16).
template <class C>
class DeviceGPT {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, bf16>, "DeviceGPT<C>: C is float or cuda::bf16");

 public:
  /// The compute (storage) type of weights and activations.
  using Compute = C;

  /// A model of `config` on the current device, its parameters uploaded from `params` (the CPU
  /// GPT's parameters(), in its order), work on `stream`; `seed` is the CPU model's (it keys the
  /// dropout masks). Throws tessera::Error naming the parameter when a name or shape is not the
  /// GPT's; CudaError where there is no device. `shards` (>= 1): the flat buffers are padded
  /// to a multiple of shards x flat_alignment elements, so shard_optimizer(r, shards) can split
  /// them evenly (ZeRO-1 over that many dp ranks). `tp` (not owned; nullptr: tp 1): the tensor-
  /// parallel group, its stream() this model's `stream`; this rank keeps its shard of `params`
  /// (still the whole model's), and every forward and backward is collective over it; with
  /// `sequence_parallel` (tp > 1) the rows (B x T of a micro-batch, which tp must divide) are
  /// split over tp between the blocks' products (file comment). `stage`: the pipeline layers
  /// this model holds (default: all; flat_gpt_stage_layout). Throws tessera::Error naming the
  /// numbers when tp does not divide n_head, runs on another stream, or the stage is not a range
  /// of the n_layer + 2 pipeline layers.
  DeviceGPT(const GPTConfig& config, const ParameterList<float>& params, const Stream& stream, std::uint64_t seed = 0,
            int shards = 1, DeviceComm* tp = nullptr, bool sequence_parallel = false, DeviceStage stage = {})
      : config_(validated(config)),
        stage_(stage),
        stream_(stream),
        blas_(stream),
        drop_(config_.embd_pdrop, nn::LayerInit{.prefix = "", .seed = seed}.child("drop")),
        tp_(tp) {
    TESSERA_EXPECTS(shards >= 1, "DeviceGPT: shards must be >= 1, got ", shards);
    if (tp_ != nullptr) {
      TESSERA_EXPECTS(tp_->stream().get() == stream.get(), "DeviceGPT: the tp communicator must run on the model's "
                      "compute stream (its all-reduces sit between the products of forward and backward)");
      tp_size_ = tp_->size();
      tp_rank_ = tp_->rank();
      TESSERA_EXPECTS(config_.n_head % tp_size_ == 0, "DeviceGPT: tp ", tp_size_, " does not divide n_head ",
                      config_.n_head);
    }
    sp_ = sequence_parallel && tp_size_ > 1;
    layout(params);
    for (Parameter<float>& p : params) gpt_names_.push_back(p.name);
    const std::int64_t pad = flat_alignment * shards;
    numel_ = (numel_ + pad - 1) / pad * pad;
    const Shape flat{numel_};
    master_ = DeviceTensor<float>::empty(flat, stream_);
    grad_ = DeviceTensor<float>::zeros(flat, stream_);
    m_ = DeviceTensor<float>::zeros(flat, stream_);
    v_ = DeviceTensor<float>::zeros(flat, stream_);
    if constexpr (std::is_same_v<C, bf16>) low_ = DeviceTensor<bf16>::empty(flat, stream_);
    std::vector<ops::FlatSegment> segments;
    for (const FlatParameter& p : flat_) segments.push_back({p.offset, p.shape.numel(), p.decay ? 0 : 1});
    chunks_ = ops::adamw_chunks(stream_, segments);
    if (tp_size_ > 1 || copy_ != npos) {  // the norm's weights: 1 for this rank's shards, 1 / tp for
      // replicated parameters; the last stage's copy of the tied wte left out (the first stage counts it)
      std::vector<ops::FlatSegment> owned;
      for (std::size_t i = 0; i < flat_.size(); ++i)
        if (i != copy_) owned.push_back({flat_[i].offset, flat_[i].shape.numel(), flat_[i].tp_layout.is_shard() ? 0 : 1});
      norm_chunks_ = ops::adamw_chunks(stream_, owned);
    }
    norm_out_ = DeviceTensor<float>::empty(Shape{1}, stream_);
    norm_ws_ = DeviceTensor<float>::empty(Shape{ops::norm_blocks}, stream_);
    upload(params);
  }

  /// The sizes.
  const GPTConfig& config() const noexcept { return config_; }
  /// The stream every call's device work is ordered on.
  const Stream& stream() const noexcept { return stream_; }
  /// Where each parameter lives, in the CPU model's order.
  const std::vector<FlatParameter>& flat_parameters() const noexcept { return flat_; }
  /// Elements of the flat buffers: the parameters and the alignment gaps between them.
  std::int64_t numel() const noexcept { return numel_; }
  /// Number of parameters (elements) this rank holds (the whole model's at tp 1: the N of 6N
  /// FLOPs per token).
  std::int64_t parameter_count() const noexcept {
    std::int64_t n = 0;
    for (const FlatParameter& p : flat_) n += p.shape.numel();
    return n;
  }

  /// Copies the CPU model's parameter values to the device (master weights and, for bf16, the
  /// compute copy); under tp, this rank's shard of each; of a pipeline stage, its parameters
  /// (`params` is still the whole model's). Throws tessera::Error naming a parameter whose name
  /// or shape differs.
  void upload(const ParameterList<float>& params) {
    Tensor<float> flat(Shape{numel_});  // zeros: the alignment gaps stay 0
    gather(params, flat, [](Parameter<float>& p) -> const Tensor<float>& { return p.value; });
    if (zero3_ != nullptr) {  // ZeRO-3: this rank's shard only
      drop_units();  // first: a gather still queued reads the shard that is replaced here
      master_shard_ = to_device<float>(flat.slice(0, shard_lo_, shard_hi()).contiguous(), stream_);
      return;
    }
    master_ = to_device<float>(flat, stream_);
    refresh_low();
  }
  /// Copies the device's master weights into the CPU model's parameters (e.g. to save a
  /// checkpoint or to sample on the host); under tp the whole parameters, every rank's shards
  /// gathered (collective over tp). A pipeline stage writes its own parameters only (the others
  /// are left as they are: DevicePipeline::broadcast_stages gathers the stages). Under
  /// shard_parameters (ZeRO-3) the dp ranks' shards are gathered first, one reduction bucket at
  /// a time (collective over dp too): the device holds one bucket's fp32 weights (times tp)
  /// beyond the shard while it runs, not the whole model's. Throws as upload().
  void download(const ParameterList<float>& params) const {
    if (zero3_ != nullptr) {  // ZeRO-3: bucket by bucket, every dp rank's piece gathered, then every tp rank's
      Tensor<float> flat(Shape{tp_size_ * numel_});  // as gathered_on_host lays it out
      const std::vector<DeviceGradBucket>& buckets = zero2_->buckets();
      for (std::size_t k = 0; k < buckets.size(); ++k) {
        const std::int64_t lo = buckets[k].lo, len = buckets[k].hi - buckets[k].lo;
        auto part = DeviceTensor<float>::empty(Shape{len}, stream_);
        zero3_->gather_bucket(k, master_shard_, part);
        Tensor<float> got;
        if (tp_size_ == 1) {
          got = to_host(part, stream_);
        } else {
          auto all = DeviceTensor<float>::empty(Shape{tp_size_ * len}, stream_);
          tp_->all_gather(part, all);
          got = to_host(all, stream_);
        }
        for (std::int64_t r = 0; r < tp_size_; ++r)
          std::copy_n(got.data() + r * len, len, flat.data() + r * numel_ + lo);
      }
      scatter(params, flat, [](Parameter<float>& p) -> Tensor<float>& { return p.value; });
      return;
    }
    scatter(params, gathered_on_host(master_), [](Parameter<float>& p) -> Tensor<float>& { return p.value; });
  }
  /// Copies AdamW's moments and step count from a CPU optimizer over the same parameters (a
  /// resumed checkpoint's state) to the device.
  void upload_optimizer(const optim::AdamW<float>& opt) {
    Tensor<float> m(Shape{numel_}), v(Shape{numel_});
    copy_moments_to_flat(opt, m, v);
    // Under shard_optimizer only this rank's shard of the moments is kept.
    m_ = to_device<float>(m.slice(0, shard_lo_, shard_hi()).contiguous(), stream_);
    v_ = to_device<float>(v.slice(0, shard_lo_, shard_hi()).contiguous(), stream_);
    steps_ = opt.steps();
  }
  /// Writes the device's AdamW moments and step count into a CPU optimizer over the CPU
  /// model's parameters (for a checkpoint); its parameters may be in any order (groups), each is
  /// found by name. Throws tessera::Error naming a parameter the model does not have.
  void download_optimizer(optim::AdamW<float>& opt) const {
    TESSERA_EXPECTS(!sharded(), "DeviceGPT::download_optimizer: the moments are sharded (shard_optimizer); gather them "
                    "and call download_optimizer(opt, m, v)");
    download_optimizer(opt, m_, v_);
  }
  /// As download_optimizer(opt), from full flat moments `m` and `v` (numel() elements each on the
  /// device, e.g. every dp rank's shard gathered); collective over tp (every tp rank's moments
  /// gathered). Throws tessera::Error naming the sizes.
  void download_optimizer(optim::AdamW<float>& opt, DeviceView<const float> m_full, DeviceView<const float> v_full) const {
    TESSERA_EXPECTS(m_full.numel() == numel_ && v_full.numel() == numel_, "DeviceGPT::download_optimizer: moments of ",
                    m_full.numel(), " and ", v_full.numel(), " elements, the model's flat buffers hold ", numel_);
    const Tensor<float> m = gathered_on_host(m_full), v = gathered_on_host(v_full);
    std::size_t i = 0;
    for (Parameter<float>& p : opt.parameters()) {
      if (const FlatParameter* f = find(p.name, p.value.shape())) {
        opt.exp_avg(i).copy_from(whole(m, *f));
        opt.exp_avg_sq(i).copy_from(whole(v, *f));
      }
      ++i;
    }
    opt.set_steps(steps_);
  }

  /// Sets every gradient to zero (under shard_gradients, this rank's shard of them, and drops the
  /// bucket buffers of a backward never reduced).
  void zero_grad() {
    if (zero2_)
      zero2_->zero_shard();
    else
      grad_.fill_zero(stream_);
  }

  /// Forward and backward of one micro-batch: tokens and targets (B, T) int32 on the device
  /// (ids already checked in [0, vocab)), gradients accumulated (+=) with the loss's gradient
  /// per token `dloss` (1 / tokens of the whole step for a mean); `at` is the micro-batch's
  /// place (the step and its first row in the global batch: the dropout masks). The summed loss
  /// is added to a device accumulator that take_loss_sum() reads. Throws tessera::Error naming
  /// the shapes when T exceeds n_positions or the shapes differ.
  void forward_backward(DeviceView<const std::int32_t> tokens, DeviceView<const std::int32_t> targets, float dloss,
                        const BatchPosition& at = {}) {
    forward(tokens, targets, &dloss, at);
    backward(tokens);
  }

  /// The summed loss of a forward without backward (evaluation): tokens and targets as above.
  /// Adds into the same accumulator (take_loss_sum()).
  void evaluate(DeviceView<const std::int32_t> tokens, DeviceView<const std::int32_t> targets) {
    forward(tokens, targets, nullptr, BatchPosition{.training = false});
  }

  /// The loss summed over every token since the last call (blocks until the stream is done),
  /// and resets the accumulator.
  double take_loss_sum() {
    if (loss_sum_.numel() == 0) return 0;
    const double s = to_host(loss_sum_, stream_)(0);
    loss_sum_.fill_zero(stream_);
    return s;
  }

  /// The global L2 norm of the gradients (blocks until computed); under tp the whole model's
  /// (each shard once, each replicated parameter once), the same on every tp rank: collective
  /// over tp. `stages` (a pipeline: the group of every stage's rank with this tp rank) sums
  /// the stages' parts too (the tied wte counted once), collective over it.
  /// Throws tessera::Error under shard_gradients (each rank holds its shard's gradients: sum
  /// grad_sum_of_squares() over dp, e.g. DeviceDataParallel::all_reduce, then reduce_grad_norm).
  double grad_norm(DeviceComm* stages = nullptr) {
    TESSERA_EXPECTS(!zero2_, "DeviceGPT::grad_norm: the gradients are sharded over dp (shard_gradients): sum "
                    "grad_sum_of_squares() over dp (DeviceDataParallel::all_reduce), then call reduce_grad_norm");
    return reduce_grad_norm(grad_sum_of_squares(), stages);
  }
  /// The square root of `sum` (one float on the device: squared-norm parts, e.g. several model
  /// chunks' grad_sum_of_squares added) summed over tp and `stages` in place (blocks until
  /// computed). Collective over tp and `stages`.
  double reduce_grad_norm(DeviceView<float> sum, DeviceComm* stages = nullptr) {
    TESSERA_EXPECTS(sum.numel() == 1, "DeviceGPT::reduce_grad_norm: a sum of ", sum.numel(), " elements, expected 1");
    if (tp_size_ > 1) tp_->all_reduce(sum, ReduceOp::sum);
    if (stages != nullptr && stages->size() > 1) stages->all_reduce(sum, ReduceOp::sum);
    return std::sqrt(static_cast<double>(to_host(DeviceView<const float>(sum), stream_)(0)));
  }
  /// This rank's part of the squared gradient norm into a one-element device buffer, on the
  /// stream (no communication): its shards, replicated parameters weighted 1 / tp, a last
  /// stage's copy of the tied wte left out. The sum over tp and the stages is the squared norm.
  /// Under shard_gradients, of this rank's shard of the reduced gradients (the sum over dp too).
  DeviceView<float> grad_sum_of_squares() {
    phase("grad norm");
    if (zero2_) {
      if (tp_size_ > 1 || copy_ != npos)
        ops::weighted_sum_of_squares(stream_, zero2_->shard(), shard_norm_chunks_, 1.f,
                                     1.f / static_cast<float>(tp_size_), norm_out_, norm_ws_);
      else
        ops::global_sum_of_squares(stream_, zero2_->shard(), norm_out_, norm_ws_);
      return norm_out_.view();
    }
    if (tp_size_ > 1 || copy_ != npos)
      ops::weighted_sum_of_squares(stream_, grad_, norm_chunks_, 1.f, 1.f / static_cast<float>(tp_size_), norm_out_,
                                   norm_ws_);
    else
      ops::global_sum_of_squares(stream_, grad_, norm_out_, norm_ws_);
    return norm_out_.view();
  }

  /// The first parameter (in flat_parameters() order) whose gradient holds a NaN or an infinity,
  /// and that element's index in it (in this rank's shard under tp); nullopt when every gradient
  /// is finite. Copies the gradients to the host (blocks until the stream is done): for the
  /// error that names it when a step's norm is not finite.
  std::optional<std::pair<std::string, std::int64_t>> first_nonfinite_gradient() const {
    // Under shard_gradients this rank's shard only: the elements [shard_lo_, shard_hi()).
    const std::int64_t lo = zero2_ ? shard_lo_ : 0, hi = zero2_ ? shard_hi() : numel_;
    const Tensor<float> host = zero2_ ? to_host(DeviceView<const float>(zero2_->shard()), stream_) : to_host(grad_, stream_);
    for (const FlatParameter& f : flat_)
      for (std::int64_t i = std::max<std::int64_t>(0, lo - f.offset); i < f.shape.numel() && f.offset + i < hi; ++i)
        if (!std::isfinite(host.data()[f.offset + i - lo])) return std::pair{f.name, i};
    return std::nullopt;
  }

  /// One AdamW step of every parameter in one launch, with `options` (lr as given; weight decay
  /// on the rank >= 2 group only) and the gradients scaled by `grad_scale` (a clipping factor).
  /// Under shard_optimizer, only this rank's shard of the master weights is updated (and of the
  /// bf16 copy): gather the shards (every rank's master_shard() into master_view()) and call
  /// refresh_compute_copy() before the next forward; under shard_parameters (ZeRO-3) only the
  /// shard exists, and the next forward gathers the weights anew.
  void step(const optim::AdamWOptions& options, double lr, float grad_scale = 1.f) {
    ++steps_;
    phase("adamw");
    ops::AdamWGroupScalars s{};
    s.group[0] = math::adamw_scalars(lr, options.beta1, options.beta2, options.eps, options.weight_decay, steps_);
    s.group[1] = math::adamw_scalars(lr, options.beta1, options.beta2, options.eps, 0.0, steps_);
    const Shape shard{shard_hi() - shard_lo_};
    const DeviceView<const float> grad = gradient_shard();
    if (zero3_ != nullptr) {  // ZeRO-3: the fp32 shard; the next forward gathers (and converts) anew
      drop_units();  // first: a gather still queued reads the shard that AdamW writes
      ops::adamw_step<float>(stream_, master_shard_, grad, m_, v_, chunks_, s, grad_scale);
      return;
    }
    const DeviceView<float> param(master_.data() + shard_lo_, shard);
    if constexpr (std::is_same_v<C, bf16>)
      ops::adamw_step<bf16>(stream_, param, grad, m_, v_, chunks_, s, grad_scale,
                            DeviceView<bf16>(low_.data() + shard_lo_, shard));
    else
      ops::adamw_step<float>(stream_, param, grad, m_, v_, chunks_, s, grad_scale);
  }

  /// ZeRO-1: this rank (of `shards`, the constructor's count) keeps AdamW's moments of the flat
  /// elements [numel() / shards x rank, numel() / shards x (rank + 1)) only and step() updates
  /// only those weights (Rajbhandari et al. 2020, P_os). The moments held so far are cut to the
  /// shard. Throws tessera::Error naming the numbers when numel() is not a multiple of `shards`
  /// (construct with that many shards) or the rank is out of range.
  void shard_optimizer(int rank, int shards) {
    TESSERA_EXPECTS(shards >= 1 && rank >= 0 && rank < shards && numel_ % shards == 0, "DeviceGPT::shard_optimizer: rank ",
                    rank, " of ", shards, " shards of ", numel_, " elements (construct the model with shards = ", shards,
                    ")");
    TESSERA_EXPECTS(shard_size_ < 0, "DeviceGPT::shard_optimizer: already sharded");
    const Tensor<float> m = to_host(m_, stream_), v = to_host(v_, stream_);
    shard_size_ = numel_ / shards;
    shard_lo_ = shard_size_ * rank;
    m_ = to_device<float>(m.slice(0, shard_lo_, shard_hi()).contiguous(), stream_);
    v_ = to_device<float>(v.slice(0, shard_lo_, shard_hi()).contiguous(), stream_);
    std::vector<ops::FlatSegment> segments;  // the parameters' parts inside the shard, from its start
    for (const FlatParameter& p : flat_) {
      const std::int64_t b = std::max(p.offset, shard_lo_), e = std::min(p.offset + p.shape.numel(), shard_hi());
      if (b < e) segments.push_back({b - shard_lo_, e - b, p.decay ? 0 : 1});
    }
    chunks_ = ops::adamw_chunks(stream_, segments);
  }
  /// ZeRO-2 (Rajbhandari et al. 2020, P_os+g), after shard_optimizer: the gradients no longer
  /// live in one flat buffer. Backward writes each of `buckets` (device_grad_buckets over
  /// ready_offsets(), the reduction's) into a buffer of its own, and this rank keeps the reduced
  /// gradients of its shard only (bucket_gradients(); DeviceDataParallel's ZeRO-2 constructor
  /// reduces each bucket onto the owners of its elements). zero_grad, step and
  /// grad_sum_of_squares then work on the shard; gradient_view() and gradients() are empty, and
  /// grad_norm() throws (the shards' squared norms are summed over dp by the caller). A pipeline
  /// stage holding a copy of the tied wte (tied_embedding_offset()) sums its gradient over the
  /// embedding group before its bucket is reduced: bucket_gradients() names that bucket
  /// (deferred_offset()) and DeviceDataParallel's ZeRO-2 constructor holds it over the step for
  /// its finish(), so DevicePipeline::reduce_tied_embedding runs before finish(). Throws tessera::Error, naming why, when the
  /// optimizer is not sharded, the gradients already are, backward is split
  /// (set_split_backward), a micro-batch awaits its backward, a parameter is not inside one
  /// bucket, or the buckets do not cover numel() once.
  void shard_gradients(std::vector<DeviceGradBucket> buckets) {
    TESSERA_EXPECTS(sharded(), "DeviceGPT::shard_gradients: shard the optimizer first (shard_optimizer): ZeRO-2 keeps "
                    "the gradients of the optimizer's shard");
    TESSERA_EXPECTS(!zero2_, "DeviceGPT::shard_gradients: already sharded");
    TESSERA_EXPECTS(!split_, "DeviceGPT::shard_gradients: backward is split (set_split_backward): its W passes write "
                    "weight gradients after the buckets' reduction points");
    for (const Slot& sl : slots_)
      TESSERA_EXPECTS(!sl.busy, "DeviceGPT::shard_gradients: a micro-batch awaits its backward");
    for (const FlatParameter& f : flat_) {  // g() hands out one pointer per parameter: whole inside a bucket
      bool inside = false;
      for (const DeviceGradBucket& b : buckets) inside = inside || (b.lo <= f.offset && f.offset + f.shape.numel() <= b.hi);
      TESSERA_EXPECTS(inside, "DeviceGPT::shard_gradients: parameter ", f.name, " (flat elements [", f.offset, ", ",
                      f.offset + f.shape.numel(), ")) is not inside one bucket; cut the buckets at ready_offsets()");
    }
    zero2_ = std::make_unique<DeviceBucketGradients>(stream_, std::move(buckets), numel_, shard_lo_, shard_hi(),
                                                     &ops::add_into);
    zero2_->set_deferred_offset(tied_embedding_offset());  // its bucket waits for the embedding group's sum
    grad_ = DeviceTensor<float>();  // no whole-model gradient buffer from here on
    if (tp_size_ > 1 || copy_ != npos) {  // the norm's weights inside the shard, from its start
      std::vector<ops::FlatSegment> owned;
      for (std::size_t i = 0; i < flat_.size(); ++i) {
        const FlatParameter& f = flat_[i];
        const std::int64_t b = std::max(f.offset, shard_lo_), e = std::min(f.offset + f.shape.numel(), shard_hi());
        if (b < e && i != copy_) owned.push_back({b - shard_lo_, e - b, f.tp_layout.is_shard() ? 0 : 1});
      }
      shard_norm_chunks_ = ops::adamw_chunks(stream_, owned);
    }
  }
  /// ZeRO-2's gradients (shard_gradients), for DeviceDataParallel; nullptr otherwise.
  DeviceBucketGradients* bucket_gradients() noexcept { return zero2_.get(); }
  /// This rank's shard of the reduced gradients, [shard_begin(), shard_end()) (read after the
  /// reduction's finish()): under shard_gradients the only ones it keeps, otherwise a view into
  /// the whole buffer (all of it unsharded).
  DeviceView<float> gradient_shard() const noexcept {
    if (zero2_) return zero2_->shard();
    return DeviceView<float>(grad_.data() + shard_lo_, Shape{shard_hi() - shard_lo_});
  }
  /// True after shard_optimizer.
  bool sharded() const noexcept { return shard_size_ >= 0 && shard_size_ != numel_; }
  /// This rank's shard of the flat buffers, [shard_begin(), shard_end()) (all of them unsharded).
  std::int64_t shard_begin() const noexcept { return shard_lo_; }
  /// One past the shard's last element.
  std::int64_t shard_end() const noexcept { return shard_hi(); }
  /// The fp32 master weights, flat (numel() elements), for gathering the shards (empty under
  /// shard_parameters: master_shard()).
  DeviceView<float> master_view() const noexcept { return master_.view(); }
  /// ZeRO-3 (Rajbhandari et al. 2020, P_os+g+p), after shard_gradients, with `dp` the ZeRO-2
  /// reduction of this model's buckets (not owned; it must outlive this model's use): this rank
  /// keeps the fp32 master weights of its shard only (no whole-model weights, fp32 or bf16).
  /// Forward and backward gather each bucket's weights when a product first needs them
  /// (DeviceDataParallel::gather_bucket: every rank's piece of the bucket, collective over dp,
  /// in the same order on every rank since the passes run alike; bf16: converted after the
  /// gather), keeping at most three buckets gathered (the block in use, the next one, whose
  /// gather forward and backward queue as a block starts or ends, and the head's ln_f and tied
  /// wte; the least recently used goes); the compute stream waits for a gather at the bucket's
  /// first use. step() updates the shard and drops them, and download() gathers the shards
  /// (collective over dp). A pipeline stage (or interleaved chunk) shards its own buffer over its
  /// own dp reduction alike: its gathers follow its schedule's passes, the same on every dp rank
  /// of the stage (the last stage's copy of the tied wte is one of its parameters; the embedding
  /// group's sum keeps the copies equal, as without ZeRO). The gathers share the
  /// communication stream with the bucket reductions, so a gather waits for those queued before
  /// it (backward queues the next block's gather before the finished block's reduction). Throws tessera::Error when the gradients are not sharded, `dp`
  /// reduces another model's buckets, it is called twice, or a micro-batch awaits its backward.
  /// (ZB-H1's split backward is refused under shard_gradients already.) With `prefetch` false
  /// no gather is queued ahead: each runs when a product first needs its bucket, the compute
  /// stream waiting for it at once, so no dp gather runs beside the compute stream's own
  /// collectives (needed where those go through NCCL: two NCCL communicators' kernels running
  /// at once can deadlock, as the dp reduction's overlap is turned off there too).
  void shard_parameters(DeviceDataParallel& dp, bool prefetch = true) {
    TESSERA_EXPECTS(zero2_ != nullptr, "DeviceGPT::shard_parameters: shard the gradients first (shard_gradients): "
                    "ZeRO-3 gathers the weights bucket by bucket");
    TESSERA_EXPECTS(zero3_ == nullptr, "DeviceGPT::shard_parameters: already sharded");
    TESSERA_EXPECTS(dp.bucket_gradients() == zero2_.get(), "DeviceGPT::shard_parameters: the reduction is not over this "
                    "model's buckets (DeviceDataParallel(comm, compute, *bucket_gradients()))");
    for (const Slot& sl : slots_)
      TESSERA_EXPECTS(!sl.busy, "DeviceGPT::shard_parameters: a micro-batch awaits its backward");
    master_shard_ = DeviceTensor<float>::empty(Shape{shard_hi() - shard_lo_}, stream_);
    detail::check(cudaMemcpyAsync(master_shard_.data(), master_.data() + shard_lo_, master_shard_.bytes(),
                                  cudaMemcpyDeviceToDevice, stream_.get()),
                  "cudaMemcpyAsync", "DeviceGPT::shard_parameters");
    master_ = DeviceTensor<float>();
    low_ = DeviceTensor<bf16>();
    const std::size_t n = zero2_->buckets().size();
    units_.assign(n, DeviceTensor<C>());
    gathered_f32_.assign(n, DeviceTensor<float>());
    pending_.assign(n, 0);
    unit_ready_.clear();
    for (std::size_t b = 0; b < n; ++b) unit_ready_.push_back(std::make_unique<Event>());
    zero3_ = &dp;
    zero3_prefetch_ = prefetch;
  }
  /// True after shard_parameters.
  bool sharded_parameters() const noexcept { return zero3_ != nullptr; }
  /// ZeRO-3: this rank's fp32 master weights, the flat elements [shard_begin(), shard_end())
  /// (empty otherwise).
  DeviceView<float> master_shard() const noexcept { return master_shard_.view(); }
  /// ZeRO-3: elements of the buckets' weights gathered or being gathered now (at most three
  /// buckets' worth; 0 after step()).
  std::int64_t gathered_weight_elements() const noexcept {
    std::int64_t n = 0;
    for (const DeviceTensor<C>& u : units_) n += u.numel();
    for (const DeviceTensor<float>& f : gathered_f32_) n += f.numel();
    return n;
  }
  /// AdamW's first and second moments of the shard (shard_end() - shard_begin() elements each).
  DeviceView<float> exp_avg_view() const noexcept { return m_.view(); }
  /// (See exp_avg_view.)
  DeviceView<float> exp_avg_sq_view() const noexcept { return v_.view(); }
  /// Rewrites the compute copy of the weights from the master weights on the stream (bf16: a
  /// conversion kernel; nothing for fp32), e.g. after the shards were gathered.
  void refresh_compute_copy() {
    if (zero3_ != nullptr) return;  // ZeRO-3: the next forward gathers and converts
    if constexpr (std::is_same_v<C, bf16>) ops::convert_from_f32<bf16>(stream_, master_, low_);
  }

  /// Where backward finishes the gradients, in the order it does: gradients at flat offsets
  /// >= ready_offsets()[k] are final (for the micro-batch) once the k-th point is passed --
  /// ln_f's first element after the head, then each block's first element from the last block
  /// down, then 0 after the embeddings (the tied wte also takes the head's gradient, so it is
  /// final only at the end). Descending, ending with 0; the input of device_grad_buckets.
  std::vector<std::int64_t> ready_offsets() const { return gpt_stage_ready_offsets(flat_); }
  /// Called on the host by every backward at each of ready_offsets(), in order, with the offset,
  /// after the work finishing those gradients is queued on the stream (so an event recorded by
  /// the hook follows it): DeviceDataParallel::gradients_final_from starts their reduction
  /// while backward goes on. Empty: none.
  void set_backward_hook(std::function<void(std::int64_t)> hook) {
    TESSERA_EXPECTS(!hook || !split_, "DeviceGPT::set_backward_hook: backward is split (set_split_backward): the weight "
                    "gradients are finished in stage_backward_weight, after the hook's points");
    hook_ = std::move(hook);
  }
  /// The flat gradients as a mutable view (numel() elements), for a data-parallel reduction
  /// (empty under shard_gradients).
  DeviceView<float> gradient_view() const noexcept { return grad_.view(); }

  /// The tensor-parallel group's size (1 without one) and this rank's place in it.
  int tp_size() const noexcept { return tp_size_; }
  /// (See tp_size.)
  int tp_rank() const noexcept { return tp_rank_; }
  /// Whether the rows are split over tp between the products (sequence parallelism, tp > 1).
  bool sequence_parallel() const noexcept { return sp_; }
  /// Optimizer steps taken (AdamW's t).
  std::int64_t steps() const noexcept { return steps_; }
  /// The gradients, flat, in flat_parameters() order (fp32), e.g. for tests (empty under
  /// shard_gradients: gradient_shard()).
  const DeviceTensor<float>& gradients() const noexcept { return grad_; }
  /// The cuBLASLt handle (its plans() count shows the products planned).
  BlasLt& blas() noexcept { return blas_; }
  /// Bytes of device memory the activations of the last micro-batch shape hold (every slot's).
  std::size_t activation_bytes() const noexcept { return act_bytes_; }

  /// The pipeline layers this model holds, [first, end) (end resolved: n_layer + 2 for all).
  DeviceStage stage() const noexcept { return {stage_.first, stage_end()}; }
  /// Whether this stage holds the embedding (takes tokens) and the head (computes the loss).
  bool has_embedding() const noexcept { return stage_.first == 0; }
  /// (See has_embedding.)
  bool has_head() const noexcept { return stage_end() == config_.n_layer + 2; }
  /// Activation slots: micro-batches whose forward is done and backward not yet (a pipeline
  /// keeps up to pp of them under 1F1B, every one under GPipe); 1 by default. Reallocates the
  /// activations at the next forward. Throws tessera::Error unless n >= 1.
  void set_slots(int n) {
    TESSERA_EXPECTS(n >= 1, "DeviceGPT::set_slots: ", n, " activation slots; at least 1");
    if (n != slots_count_) {
      for (const Slot& sl : slots_)
        TESSERA_EXPECTS(!sl.busy, "DeviceGPT::set_slots: a micro-batch awaits its backward");
      slots_count_ = n;
      B_ = T_ = -1;  // reallocate at the next forward
    }
  }
  /// Activation slots (set_slots).
  int slots() const noexcept { return slots_count_; }
  /// The attention of the blocks: fused (`true`: ops::flash_attention, FlashAttention-2's
  /// algorithm; each block keeps its q|k|v and one log-sum-exp per row and head, not the
  /// (B, H, T, T) probabilities) or the unfused reference (`false`, the default: batched
  /// cuBLASLt products and a softmax kernel, ops::attention). Both equal nn::CoreAttention
  /// within fp32 round-off. `path` picks the fused kernels (ops::FlashPath: by default, bf16 on
  /// tensor cores where ops::flash_mma_supported, else CUDA cores). Reallocates the activations
  /// at the next forward. Throws tessera::Error for a head_dim over ops::flash_max_head_dim.
  void set_fused_attention(bool on, ops::FlashPath path = ops::FlashPath::automatic) {
    flash_path_ = path;
    TESSERA_EXPECTS(!on || config_.d_model / config_.n_head <= ops::flash_max_head_dim,
                    "DeviceGPT::set_fused_attention: head_dim ", config_.d_model / config_.n_head, " exceeds the fused "
                    "kernels' ", ops::flash_max_head_dim);
    if (on != flash_) {
      for (const Slot& sl : slots_)
        TESSERA_EXPECTS(!sl.busy, "DeviceGPT::set_fused_attention: a micro-batch awaits its backward");
      flash_ = on;
      B_ = T_ = -1;
    }
  }
  /// (See set_fused_attention.)
  bool fused_attention() const noexcept { return flash_; }
  /// Per-phase timing of this model's stream (PhaseTimer; off until `phase_timer().enable(true)`):
  /// forward and backward mark their phases (embedding, layer norm, GEMMs with their epilogues,
  /// attention, LM head, cross-entropy, bias gradients; grad_sum_of_squares "grad norm", step()
  /// "adamw"); the caller ends each step with `phase_timer().end_step(stream())` (a host
  /// synchronization). Collectives on the stream count in the phase around them.
  PhaseTimer& phase_timer() noexcept { return phases_; }
  /// Whether backward may be split into stage_backward_input and stage_backward_weight
  /// (zero-bubble schedules, Qi et al. 2024): each slot then also keeps, per block, the output
  /// gradients the four weight-gradient products need (reallocated at the next forward). Throws
  /// tessera::Error when a backward hook is set or the gradients are sharded (a split backward
  /// finishes the weights later), or, for a change, while a micro-batch awaits its backward.
  void set_split_backward(bool on) {
    TESSERA_EXPECTS(!on || !hook_, "DeviceGPT::set_split_backward: a backward hook is set; a split backward finishes "
                    "the weight gradients in stage_backward_weight, after the hook's points");
    TESSERA_EXPECTS(!on || !zero2_, "DeviceGPT::set_split_backward: the gradients are sharded (shard_gradients); a "
                    "split backward writes weight gradients after the buckets' reduction points");
    if (on != split_) {
      for (const Slot& sl : slots_)
        TESSERA_EXPECTS(!sl.busy, "DeviceGPT::set_split_backward: a micro-batch awaits its backward");
      split_ = on;
      B_ = T_ = -1;
    }
  }
  /// The shape of a boundary activation (and its gradient) of a (B, T) micro-batch between
  /// stages: (rows, d_model) fp32, rows = B x T, or B x T / tp under sequence parallelism (each
  /// tp rank sends its own rows, as Megatron-LM's scatter-gather split).
  Shape boundary_shape(std::int64_t B, std::int64_t T) const {
    return Shape{sp_ ? B * T / tp_size_ : B * T, config_.d_model};
  }
  /// Forward of one (B, T) micro-batch through this stage into activation slot `slot`: from
  /// `tokens` (B, T) int32 on the first stage, otherwise from `input` (boundary_shape, fp32,
  /// the previous stage's output); on the last stage the loss against `targets` (B, T), with
  /// `dloss` per token as forward_backward (nullptr: evaluation, no gradient), added to
  /// take_loss_sum()'s accumulator; otherwise the output into `output` (boundary_shape,
  /// fp32). `at` as forward_backward. Collective over tp. Throws tessera::Error naming the
  /// shapes when a view does not match or the slot is out of range.
  void stage_forward(int slot, std::int64_t B, std::int64_t T, DeviceView<const std::int32_t> tokens,
                     DeviceView<const float> input, DeviceView<const std::int32_t> targets, const float* dloss,
                     DeviceView<float> output, const BatchPosition& at = {}) {
    forward_impl(slot, B, T, tokens, input, targets, dloss, output, at);
  }
  /// Backward of the micro-batch in `slot` (its stage_forward had a dloss): on the last stage
  /// from its loss, otherwise from `grad_output` (boundary_shape, fp32, the next stage's input
  /// gradient); gradients accumulated (+=); on the first stage through the embeddings (`tokens`
  /// (B, T), the forward's), otherwise the input's gradient into `grad_input` (boundary_shape,
  /// fp32). Frees the slot for the next forward. Collective over tp. Throws tessera::Error naming
  /// the shapes when a view does not match.
  void stage_backward(int slot, DeviceView<const std::int32_t> tokens, DeviceView<const float> grad_output,
                      DeviceView<float> grad_input) {
    backward_impl(slot, tokens, grad_output, grad_input, false);
  }
  /// Zero-bubble's I pass (set_split_backward(true)): stage_backward without the weight-
  /// gradient products (each block's four and the head's), whose output gradients the slot
  /// keeps; the biases, LayerNorms and embeddings take their gradients here. The slot stays
  /// held until stage_backward_weight. Collective over tp. Throws as stage_backward, and when
  /// backward is not split.
  void stage_backward_input(int slot, DeviceView<const std::int32_t> tokens, DeviceView<const float> grad_output,
                            DeviceView<float> grad_input) {
    TESSERA_EXPECTS(split_, "DeviceGPT::stage_backward_input: backward is not split (set_split_backward(true))");
    backward_impl(slot, tokens, grad_output, grad_input, true);
  }
  /// Zero-bubble's W pass: the weight-gradient products deferred by stage_backward_input of
  /// `slot` (gradients accumulated, +=); frees the slot. No communication. Throws tessera::Error
  /// when the slot holds no deferred pass.
  void stage_backward_weight(int slot) {
    TESSERA_EXPECTS(slot >= 0 && slot < static_cast<int>(slots_.size()) && slots_[static_cast<std::size_t>(slot)].deferred,
                    "DeviceGPT::stage_backward_weight: activation slot ", slot, " holds no deferred weight pass");
    Slot& S = slots_[static_cast<std::size_t>(slot)];
    const std::int64_t D = config_.d_model, N = B_ * T_, Dl = D / tp_size_;
    for (std::size_t l = blocks_.size(); l-- > 0;) {
      const LayerActs& a = S.acts[l];
      const DeferredGrads& d = S.wgrad[l];
      const BlockParams& p = blocks_[l];
      gemm_grad({.trans_a = true, .m = 4 * Dl, .n = D, .k = N}, a.h.data(), d.fcproj.data(), g(p.fcproj_w));
      gemm_grad({.trans_a = true, .m = D, .n = 4 * Dl, .k = N}, a.ln2.data(), d.fc.data(), g(p.fc_w));
      gemm_grad({.trans_a = true, .m = Dl, .n = D, .k = N}, a.atty.data(), d.proj.data(), g(p.proj_w));
      gemm_grad({.trans_a = true, .m = D, .n = 3 * Dl, .k = N}, a.ln1.data(), d.qkv.data(), g(p.qkv_w));
    }
    if (has_head())
      gemm_grad({.trans_a = true, .m = vocab_rows_, .n = D, .k = N}, S.logits.data(), S.lnf.data(), g(head_));
    S.deferred = false;
    S.busy = false;
  }
  /// The gradient of this stage's tied wte (the embedding's on the first stage, the LM head's
  /// copy on a last stage without the embedding), for the caller to sum over the embedding group
  /// (the first and last stage of a pipeline) before the step; empty on other stages and on a
  /// stage holding both (pp 1: one wte takes both gradients).
  /// Under shard_gradients it lives in its bucket's buffer, held over the step by the reduction
  /// until its finish(): throws tessera::Error when the bucket holds no gradient (reduced
  /// already: call this before the reduction's finish()).
  DeviceView<float> tied_embedding_gradient() const {
    if (has_embedding() == has_head()) return {};
    const std::size_t i = has_embedding() ? 0 : copy_;
    TESSERA_EXPECTS(!zero2_ || zero2_->holds(zero2_->bucket_of(flat_[i].offset)), "DeviceGPT::tied_embedding_gradient: "
                    "the gradients are sharded (shard_gradients) and the tied wte's bucket holds none: it was reduced "
                    "already, or no backward ran; sum it (DevicePipeline::reduce_tied_embedding) before the "
                    "reduction's finish()");
    return gv(i);
  }
  /// The first flat element of the tied wte whose gradient tied_embedding_gradient() gives;
  /// nullopt where that is empty.
  std::optional<std::int64_t> tied_embedding_offset() const noexcept {
    if (has_embedding() == has_head()) return std::nullopt;
    return flat_[has_embedding() ? 0 : copy_].offset;
  }

 private:
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);
  int stage_end() const noexcept { return stage_.end < 0 ? static_cast<int>(config_.n_layer) + 2 : stage_.end; }
  // Offsets of one block's parameters (indices into flat_).
  struct BlockParams {
    std::size_t ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fcproj_w, fcproj_b;
  };
  struct LayerActs {
    // qkvp: the heads split out (3, B, H, T, hd), or under fused attention q|k|v as (B, T, 3 Dl);
    // probs (B, H, T, T) unfused, lse (B, H, T) fused.
    DeviceTensor<C> x_in, ln1, qkvp, probs, atty, x_mid, ln2, pre, h;
    DeviceTensor<float> mean1, rstd1, mean2, rstd2, lse;
  };
  // What one micro-batch in flight keeps from its forward for its backward: each local block's
  // activations (acts[0].x_in the stage's input, acts[blocks].x_in its output or ln_f's input),
  // and on the head stage ln_f's output and the logits (their gradient after the loss).
  // A block's output gradients kept for a deferred weight pass (split backward): of mlp.c_proj
  // (the residual gradient, every row), mlp.c_fc (before GELU), attn.c_proj, attn.c_attn.
  struct DeferredGrads {
    DeviceTensor<C> fcproj, fc, proj, qkv;
  };
  struct Slot {
    std::vector<LayerActs> acts;
    DeviceTensor<C> lnf, logits;
    ops::DropoutMask mask;  // the embedding dropout's (first stage)
    std::vector<DeferredGrads> wgrad;  // split backward: per block
    bool busy = false;
    bool deferred = false;  // its I pass ran, its W pass not yet
  };

  void layout(const ParameterList<float>& params) {
    flat_ = flat_gpt_stage_layout(config_, params, tp_size_, stage_);
    // The tied wte this stage uses: the embedding's (index 0), or on a last stage without it
    // the copy at the end; ln_f's two parameters before it.
    if (has_head()) {
      copy_ = has_embedding() ? npos : flat_.size() - 1;
      head_ = has_embedding() ? 0 : copy_;
      lnf_w_ = flat_.size() - (has_embedding() ? 2 : 3);
      lnf_b_ = lnf_w_ + 1;
    }
    const std::size_t wte = has_embedding() ? 0 : has_head() ? head_ : npos;
    vocab_rows_ = wte == npos ? 0 : flat_[wte].shape[0];  // this rank's rows of the (padded) vocabulary
    vocab_lo_ = tp_rank_ * vocab_rows_;
    vocab_valid_ = std::clamp<std::int64_t>(config_.vocab_size - vocab_lo_, 0, vocab_rows_);
    const FlatParameter& last = flat_.back();
    const std::int64_t off = last.offset + (last.shape.numel() + flat_alignment - 1) / flat_alignment * flat_alignment;
    numel_ = off;
    const std::size_t first = has_embedding() ? 2 : 0;  // the stage's first block parameter
    const int blocks = std::min<int>(stage_end(), static_cast<int>(config_.n_layer) + 1) - std::max(stage_.first, 1);
    for (int l = 0; l < blocks; ++l) {
      const std::size_t b = first + static_cast<std::size_t>(l) * 12;
      blocks_.push_back({b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8, b + 9, b + 10, b + 11});
    }
  }

  // Calls fn(parameter, its place) for every parameter of `params`, checked against the layout.
  // (`params` is the whole GPT's, in its order; a stage takes its own by name.)
  template <class Fn>
  void for_each_flat(const ParameterList<float>& params, Fn fn) const {
    TESSERA_EXPECTS(params.size() == gpt_names_.size(), "DeviceGPT: ", params.size(), " parameters given, the model has ",
                    gpt_names_.size());
    std::size_t i = 0;
    for (Parameter<float>& p : params) {
      TESSERA_EXPECTS(p.name == gpt_names_[i], "DeviceGPT: parameter ", i, " is ", p.name, ", the model's is ",
                      gpt_names_[i]);
      ++i;
      for (const FlatParameter& f : flat_)
        if (f.name == p.name) {
          TESSERA_EXPECTS(p.value.shape() == f.full, "DeviceGPT: parameter ", p.name, " of shape ", p.value.shape(),
                          " is not of shape ", f.full);
          fn(p, f);
        }
    }
  }
  template <class Get>
  void gather(const ParameterList<float>& params, Tensor<float>& flat, Get get) const {
    for_each_flat(params, [&](Parameter<float>& p, const FlatParameter& f) {
      flat_slice(flat, f).copy_from(local_of(get(p), f));
    });
  }
  template <class Get>
  void scatter(const ParameterList<float>& params, const Tensor<float>& flat, Get get) const {
    for_each_flat(params, [&](Parameter<float>& p, const FlatParameter& f) { get(p).copy_from(whole(flat, f)); });
  }
  void copy_moments_to_flat(const optim::AdamW<float>& opt, Tensor<float>& m, Tensor<float>& v) const {
    TESSERA_EXPECTS(opt.parameters().size() == gpt_names_.size(), "DeviceGPT: the optimizer has ",
                    opt.parameters().size(), " parameters, the model ", gpt_names_.size());
    m.fill(0.f);
    v.fill(0.f);
    std::size_t i = 0;
    for (Parameter<float>& p : opt.parameters()) {
      if (const FlatParameter* f = find(p.name, p.value.shape())) {
        flat_slice(m, *f).copy_from(local_of(opt.exp_avg(i), *f));
        flat_slice(v, *f).copy_from(local_of(opt.exp_avg_sq(i), *f));
      }
      ++i;
    }
  }
  // The parameter `name` of this stage; nullptr for a GPT parameter another stage holds.
  const FlatParameter* find(const std::string& name, const Shape& shape) const {
    for (const FlatParameter& f : flat_)
      if (f.name == name) {
        TESSERA_EXPECTS(f.full == shape, "DeviceGPT: optimizer parameter ", name, " has shape ", shape,
                        ", the model's ", f.full);
        return &f;
      }
    TESSERA_EXPECTS(std::find(gpt_names_.begin(), gpt_names_.end(), name) != gpt_names_.end(),
                    "DeviceGPT: the optimizer holds parameter ", name, ", which the model does not have");
    return nullptr;
  }
  static Tensor<float> flat_slice(const Tensor<float>& flat, const FlatParameter& f) {
    return flat.slice(0, f.offset, f.offset + f.shape.numel()).reshape(f.shape);
  }
  // This rank's part of the whole parameter `full` (itself at tp 1 or when replicated).
  Tensor<float> local_of(const Tensor<float>& full, const FlatParameter& f) const {
    return gpt_tp_shard(full, f, tp_rank_, tp_size_);
  }
  // A flat device buffer (numel() elements) on the host; under tp every tp rank's, in rank
  // order (tp x numel(): an all-gather over tp, collective).
  Tensor<float> gathered_on_host(DeviceView<const float> local) const {
    if (tp_size_ == 1) return to_host(local, stream_);
    auto all = DeviceTensor<float>::empty(Shape{tp_size_ * numel_}, stream_);
    tp_->all_gather(local, all);
    return to_host(all, stream_);
  }
  // The whole parameter f from gathered_on_host's buffer (gpt_tp_whole; at tp 1 its slice).
  Tensor<float> whole(const Tensor<float>& flat, const FlatParameter& f) const {
    if (tp_size_ == 1) return flat_slice(flat, f);
    return gpt_tp_whole(flat.data(), numel_, f, tp_size_);
  }

  void refresh_low() {
    if constexpr (std::is_same_v<C, bf16>) low_ = to_device<bf16>(to_host(master_, stream_), stream_);
  }

  // The compute-type weights of parameter i, and its fp32 gradient.
  C* w(std::size_t i) const {
    if (zero3_ != nullptr) return unit_weights(flat_[i].offset);
    if constexpr (std::is_same_v<C, bf16>)
      return low_.data() + flat_[i].offset;
    else
      return master_.data() + flat_[i].offset;
  }
  // ZeRO-3: at most this many buckets' weights gathered at once (the block in use, the next one
  // prefetched, and the head's second: ln_f's and the tied wte's).
  static constexpr std::size_t kGatheredBuckets = 3;
  // ZeRO-3: queues the gather of bucket b's weights (a collective over dp) unless they are
  // gathered or queued, without making the compute stream wait (unit_weights does, at the first
  // use); the least recently used bucket beyond kGatheredBuckets is dropped. Every rank calls it
  // at the same points of its passes.
  void prefetch_unit(std::size_t b) const {
    const auto at = std::find(lru_.begin(), lru_.end(), b);
    if (at != lru_.end()) {  // gathered or queued: now the most recently used
      lru_.erase(at);
      lru_.push_back(b);
      return;
    }
    while (lru_.size() >= kGatheredBuckets) drop_unit(lru_.front());
    const DeviceGradBucket& k = zero2_->buckets()[b];
    DeviceTensor<float> f = DeviceTensor<float>::empty(Shape{k.hi - k.lo}, stream_);
    zero3_->gather_bucket(b, master_shard_, f, unit_ready_[b].get());  // (throws before any state changes)
    gathered_f32_[b] = std::move(f);
    pending_[b] = 1;
    lru_.push_back(b);
  }
  // ZeRO-3: prefetch_unit of parameter i's bucket.
  void prefetch(std::size_t i) const {
    if (zero3_ != nullptr && zero3_prefetch_) prefetch_unit(zero2_->bucket_of(flat_[i].offset));
  }
  // ZeRO-3: flat element `offset`'s weight in its bucket's gathered weights: the gather queued
  // now if it is not, and the compute stream made to wait for it (and bf16 converted) at the
  // bucket's first use.
  C* unit_weights(std::int64_t offset) const {
    const std::size_t b = zero2_->bucket_of(offset);
    prefetch_unit(b);
    if (pending_[b]) {
      unit_ready_[b]->wait_on(stream_);
      if constexpr (std::is_same_v<C, float>) {
        units_[b] = std::move(gathered_f32_[b]);
      } else {
        units_[b] = DeviceTensor<C>::empty(gathered_f32_[b].shape(), stream_);
        ops::convert_from_f32<C>(stream_, gathered_f32_[b], units_[b]);
      }
      gathered_f32_[b] = DeviceTensor<float>();
      pending_[b] = 0;
    }
    return units_[b].data() + (offset - zero2_->buckets()[b].lo);
  }
  // ZeRO-3: drops bucket b's gathered weights, back to the compute stream's cache (only later work
  // on it reuses the memory; a gather still queued is waited for first, so none writes a block
  // handed out again).
  void drop_unit(std::size_t b) const {
    if (pending_[b]) unit_ready_[b]->wait_on(stream_);
    units_[b] = DeviceTensor<C>();
    gathered_f32_[b] = DeviceTensor<float>();
    pending_[b] = 0;
    lru_.erase(std::find(lru_.begin(), lru_.end(), b));
  }
  // ZeRO-3: forgets every gathered bucket (the weights changed).
  void drop_units() const {
    while (!lru_.empty()) drop_unit(lru_.front());
  }
  // Parameter i's gradient: in the flat buffer, or under ZeRO-2 in its bucket's buffer (taken at
  // the first write of the backward).
  float* g(std::size_t i) const { return zero2_ ? zero2_->at(flat_[i].offset) : grad_.data() + flat_[i].offset; }
  DeviceView<const C> wv(std::size_t i) const { return {w(i), flat_[i].shape}; }
  DeviceView<float> gv(std::size_t i) const { return {g(i), flat_[i].shape}; }

  void ensure_activations(std::int64_t B, std::int64_t T) {
    if (B == B_ && T == T_) return;
    for (const Slot& s : slots_)
      TESSERA_EXPECTS(!s.busy, "DeviceGPT: a micro-batch of ", B, " x ", T, " while one of ", B_, " x ", T_,
                      " awaits its backward (every micro-batch in flight has the same shape)");
    const std::int64_t D = config_.d_model, N = B * T;
    const std::int64_t H = config_.n_head / tp_size_, Dl = D / tp_size_;  // this rank's heads and their width
    TESSERA_EXPECTS(!sp_ || N % tp_size_ == 0, "DeviceGPT: sequence parallelism splits the ", B, " x ", T, " = ", N,
                    " rows of a micro-batch over tp ", tp_size_, ", which does not divide them");
    const std::int64_t Nl = sp_ ? N / tp_size_ : N;  // the rows of the residual stream on this rank
    B_ = B;
    T_ = T;
    slots_.clear();
    act_bytes_ = 0;
    auto make = [&](auto& t, const Shape& s) {
      using Tn = typename std::decay_t<decltype(t)>::Scalar;
      t = DeviceTensor<Tn>::empty(s, stream_);
      act_bytes_ += t.bytes();
    };
    const std::size_t blocks = blocks_.size();
    for (int k = 0; k < slots_count_; ++k) {
      Slot slot;
      for (std::size_t l = 0; l <= blocks; ++l) {
        LayerActs a;
        make(a.x_in, Shape{Nl, D});
        if (l < blocks) {
          make(a.ln1, Shape{N, D});
          make(a.qkvp, Shape{3 * N * Dl});
          if (flash_)
            make(a.lse, Shape{B, H, T});
          else
            make(a.probs, Shape{B, H, T, T});
          make(a.atty, Shape{N, Dl});
          make(a.x_mid, Shape{Nl, D});
          make(a.ln2, Shape{N, D});
          make(a.pre, Shape{N, 4 * Dl});
          make(a.h, Shape{N, 4 * Dl});
        }
        make(a.mean1, Shape{Nl});
        make(a.rstd1, Shape{Nl});
        make(a.mean2, Shape{Nl});
        make(a.rstd2, Shape{Nl});
        slot.acts.push_back(std::move(a));
      }
      if (has_head()) {
        make(slot.lnf, Shape{N, D});
        make(slot.logits, Shape{N, vocab_rows_});  // V at tp 1
      }
      if (split_)
        for (std::size_t l = 0; l < blocks; ++l) {
          DeferredGrads d;
          make(d.fcproj, Shape{N, D});
          make(d.fc, Shape{N, 4 * Dl});
          make(d.proj, Shape{N, D});
          make(d.qkv, Shape{B, T, 3 * Dl});
          slot.wgrad.push_back(std::move(d));
        }
      slots_.push_back(std::move(slot));
    }
    make(losses_, Shape{N});
    make(dres_, Shape{Nl, D});
    make(dln_, Shape{Nl, D});
    make(datt_, Shape{N, Dl});
    make(dqkv_, Shape{B, T, 3 * Dl});
    if (!flash_) make(qkv_, Shape{B, T, 3 * Dl});
    make(dpre_, Shape{N, 4 * Dl});
    if (flash_) {  // the other path's scratch freed (a switch after a forward)
      qkv_ = heads_ = dqkvp_ = dprobs_ = DeviceTensor<C>{};
      make(flash_d_, Shape{B, H, T});
    } else {
      flash_d_ = DeviceTensor<float>{};
      make(heads_, Shape{N * Dl});
      make(dqkvp_, Shape{3 * N * Dl});
      make(dprobs_, Shape{B, H, T, T});
    }
    if (tp_size_ > 1) {
      make(partial_, Shape{N, D});
      make(local_ids_, Shape{N});
      make(stats_, Shape{3 * N});
    }
    if (sp_) {
      make(dres_full_, Shape{N, D});
      make(ln_local_, Shape{Nl, D});
      make(local_f_, Shape{Nl, D});
      make(sp_grad_, Shape{2 * D});
    }
    const std::int64_t ws = std::max<std::int64_t>(2 * 4 * D * ops::layer_norm_chunks(N), 4 * D * ops::bias_grad_chunks(N));
    make(ws_, Shape{ws});
    Tensor<std::int32_t> pos(Shape{B, T});
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) pos(b, t) = static_cast<std::int32_t>(t);
    positions_ = to_device<std::int32_t>(pos, stream_);
    // This rank's rows of the residual stream: [tp_rank Nl, (tp_rank + 1) Nl) of the B x T.
    positions_local_ = sp_ ? to_device<std::int32_t>(pos.reshape(Shape{N}).slice(0, tp_rank_ * Nl, (tp_rank_ + 1) * Nl).contiguous(),
                                                     stream_)
                           : positions_;
    if (loss_sum_.numel() == 0) loss_sum_ = DeviceTensor<float>::zeros(Shape{1}, stream_);
  }

  void gemm(const GemmShape& s, const C* a, const C* b, C* out, float beta = 0.f, const EpilogueArgs& ep = {}) {
    ops::gemm_epilogue<C>(stream_, blas_, s, a, b, out, 1.f, beta, ep);
  }
  void gemm_grad(const GemmShape& s, const C* a, const C* b, float* out) { blas_.gemm(stream_, s, a, b, out, 1.f, 1.f); }
  // The end of a row-parallel product: out (N, D) = residual + (in (N, k) W (k, D) summed over
  // tp) + bias, the sum an all-reduce of the fp32 partial products (Megatron's g). At tp 1 one
  // GEMM with the residual as beta = 1 and the bias as epilogue.
  void row_parallel(const DeviceTensor<C>& in, std::int64_t k, std::size_t weight, std::size_t bias,
                    const DeviceTensor<C>& residual, const DeviceTensor<C>& out) {
    const std::int64_t N = B_ * T_, D = config_.d_model;
    if (tp_size_ == 1) {
      copy(residual, out);
      gemm({.m = N, .n = D, .k = k}, in.data(), w(weight), out.data(), 1.f, {Epilogue::bias, w(bias), nullptr});
      return;
    }
    blas_.gemm(stream_, GemmShape{.m = N, .n = D, .k = k}, static_cast<const C*>(in.data()), static_cast<const C*>(w(weight)),
               partial_.data(), 1.f, 0.f);
    if (sp_) {  // this rank's rows of the sum (Megatron's reduce-scatter)
      tp_->reduce_scatter(partial_, local_f_, ReduceOp::sum);
      ops::residual_add<C>(stream_, residual, local_f_, wv(bias), out);
      return;
    }
    tp_->all_reduce(partial_.view(), ReduceOp::sum);
    ops::residual_add<C>(stream_, residual, partial_, wv(bias), out);
  }
  // full (N, D) <- every tp rank's rows `local` (N / tp, D), in rank order (sequence
  // parallelism's all-gather; exact in either precision).
  void gather_rows(const DeviceTensor<C>& local, const DeviceTensor<C>& full) {
    if constexpr (std::is_same_v<C, float>) {
      tp_->all_gather(local, full);
    } else {
      ops::convert_to_f32<C>(stream_, local, local_f_);
      tp_->all_gather(local_f_, partial_);
      ops::convert_from_f32<C>(stream_, partial_, full);
    }
  }
  // LayerNorm backward of this rank's rows: dres (+)= dx; the weight and bias gradients added
  // to the model's, summed over tp first under sequence parallelism (each rank's are partial:
  // its rows only), through a zeroed scratch so that accumulation over micro-batches adds each
  // micro-batch's sum once.
  void ln_backward(const DeviceTensor<C>& x, std::size_t weight, std::size_t bias, const DeviceTensor<float>& mean,
                   const DeviceTensor<float>& rstd, bool accumulate) {
    if (!sp_) {
      ops::layer_norm_backward<C>(stream_, dln_, x, wv(weight), mean, rstd, dres_, gv(weight), gv(bias), ws_, accumulate);
      return;
    }
    const std::int64_t D = config_.d_model;
    sp_grad_.fill_zero(stream_);
    const DeviceView<float> dw(sp_grad_.data(), Shape{D}), db(sp_grad_.data() + D, Shape{D});
    ops::layer_norm_backward<C>(stream_, dln_, x, wv(weight), mean, rstd, dres_, dw, db, ws_, accumulate);
    tp_->all_reduce(sp_grad_.view(), ReduceOp::sum);
    ops::add_into(stream_, dw, gv(weight));
    ops::add_into(stream_, db, gv(bias));
  }
  // The input gradient of a column-parallel product into dln_ (N, D): the product `s` of dy and
  // the weight's shard, summed over tp (Megatron's f backward: an all-reduce, of fp32 partial
  // sums under bf16).
  void column_input_grad(const GemmShape& s, const C* dy, std::size_t weight) {
    if (sp_) {  // this rank's rows of the sum (the backward of sequence parallelism's all-gather)
      blas_.gemm(stream_, s, dy, static_cast<const C*>(w(weight)), partial_.data(), 1.f, 0.f);
      if constexpr (std::is_same_v<C, float>) {
        tp_->reduce_scatter(partial_, dln_, ReduceOp::sum);
      } else {
        tp_->reduce_scatter(partial_, local_f_, ReduceOp::sum);
        ops::convert_from_f32<C>(stream_, local_f_, dln_);
      }
      return;
    }
    if constexpr (std::is_same_v<C, float>) {
      gemm(s, dy, w(weight), dln_.data());
      if (tp_size_ > 1) tp_->all_reduce(dln_.view(), ReduceOp::sum);
    } else {
      if (tp_size_ == 1) return gemm(s, dy, w(weight), dln_.data());
      blas_.gemm(stream_, s, dy, static_cast<const C*>(w(weight)), partial_.data(), 1.f, 0.f);
      tp_->all_reduce(partial_.view(), ReduceOp::sum);
      ops::convert_from_f32<C>(stream_, partial_, dln_);
    }
  }
  // x (N, D) <- its sum over tp (the vocab-parallel embedding's lookups: one rank holds each
  // row, the others zeros, so the sum is exact in either precision).
  void sum_over_tp(const DeviceTensor<C>& x) {
    if constexpr (std::is_same_v<C, float>) {
      tp_->all_reduce(x.view(), ReduceOp::sum);
    } else {
      ops::convert_to_f32<C>(stream_, x, partial_);
      tp_->all_reduce(partial_.view(), ReduceOp::sum);
      ops::convert_from_f32<C>(stream_, partial_, x);
    }
  }
  // LayerNorm forward of this rank's rows into `full` (N, D): under sequence parallelism the
  // rows normalized here, then every rank's gathered; otherwise all of them here.
  void layer_norm_gathered(const DeviceTensor<C>& x, std::size_t weight, std::size_t bias, const DeviceTensor<C>& full,
                           const DeviceTensor<float>& mean, const DeviceTensor<float>& rstd) {
    if (!sp_) return ops::layer_norm_forward<C>(stream_, x, wv(weight), wv(bias), full, mean, rstd);
    ops::layer_norm_forward<C>(stream_, x, wv(weight), wv(bias), ln_local_, mean, rstd);
    gather_rows(ln_local_, full);
  }
  void copy(const DeviceTensor<C>& from, const DeviceTensor<C>& to) {
    detail::check(cudaMemcpyAsync(to.data(), from.data(), from.bytes(), cudaMemcpyDeviceToDevice, stream_.get()),
                  "cudaMemcpyAsync", "DeviceGPT residual copy of ", from.numel(), " elements");
  }

  // The whole model's forward (stage_forward's, slot 0).
  void forward(DeviceView<const std::int32_t> tokens, DeviceView<const std::int32_t> targets, const float* dloss,
               const BatchPosition& at) {
    TESSERA_EXPECTS(tokens.shape.rank() == 2 && targets.shape == tokens.shape, "DeviceGPT: tokens ", tokens.shape,
                    " and targets ", targets.shape, " must both be (B, T)");
    TESSERA_EXPECTS(has_embedding() && has_head(), "DeviceGPT: forward_backward and evaluate run the whole model; this "
                    "model is pipeline layers [", stage_.first, ", ", stage_end(), "): use stage_forward");
    if (slots_.size() > 0) slots_[0].busy = false;  // forward_backward's slot is reused every call
    forward_impl(0, tokens.size(0), tokens.size(1), tokens, {}, targets, dloss, {}, at);
  }
  void backward(DeviceView<const std::int32_t> tokens) { backward_impl(0, tokens, {}, {}, false); }

  void forward_impl(int slot_index, std::int64_t B, std::int64_t T, DeviceView<const std::int32_t> tokens,
                    DeviceView<const float> input, DeviceView<const std::int32_t> targets, const float* dloss,
                    DeviceView<float> output, const BatchPosition& at) {
    TESSERA_EXPECTS(B >= 1 && T >= 1, "DeviceGPT: a micro-batch of ", B, " x ", T, " tokens");
    TESSERA_EXPECTS(T <= config_.n_positions, "GPT: sequence length ", T, " exceeds the position table n_positions=",
                    config_.n_positions);
    TESSERA_EXPECTS(slot_index >= 0 && slot_index < slots_count_, "DeviceGPT: activation slot ", slot_index, " of ",
                    slots_count_, " (set_slots)");
    const Shape bt{B, T};
    if (has_embedding())
      TESSERA_EXPECTS(tokens.shape == bt, "DeviceGPT: tokens ", tokens.shape, ", expected (", B, ", ", T, ")");
    if (has_head() && (dloss != nullptr || targets.data != nullptr))
      TESSERA_EXPECTS(targets.shape == bt, "DeviceGPT: targets ", targets.shape, ", expected (", B, ", ", T, ")");
    ensure_activations(B, T);
    const Shape edge = boundary_shape(B, T);
    if (!has_embedding())
      TESSERA_EXPECTS(input.shape == edge, "DeviceGPT: stage input ", input.shape, ", expected ", edge);
    if (!has_head())
      TESSERA_EXPECTS(output.shape == edge, "DeviceGPT: stage output ", output.shape, ", expected ", edge);
    Slot& S = slots_[static_cast<std::size_t>(slot_index)];
    TESSERA_EXPECTS(!S.busy, "DeviceGPT: activation slot ", slot_index, " holds a micro-batch whose backward has not run");
    S.busy = dloss != nullptr;
    std::vector<LayerActs>& acts = S.acts;
    const std::int64_t D = config_.d_model, N = B * T, V = config_.vocab_size;
    const std::int64_t H = config_.n_head / tp_size_, Dl = D / tp_size_;  // this rank's heads and their width
    S.mask = ops::DropoutMask{};
    phase("embedding fwd");
    if (has_embedding()) {
      // Embedding: wte[tokens] + wpe[t]; under tp each rank looks up the tokens of its vocabulary
      // rows (zeros for the others') and the lookups are summed.
      // Under sequence parallelism the sum is reduce-scattered: this rank keeps its rows.
      if (sp_) {
        ops::vocab_local_ids(stream_, tokens, local_ids_, vocab_lo_, vocab_valid_, vocab_rows_);
        ops::embedding_forward<C>(stream_, local_ids_, wv(0), dres_full_, false);
        if constexpr (std::is_same_v<C, float>) {
          tp_->reduce_scatter(dres_full_, acts[0].x_in, ReduceOp::sum);
        } else {
          ops::convert_to_f32<C>(stream_, dres_full_, partial_);
          tp_->reduce_scatter(partial_, local_f_, ReduceOp::sum);
          ops::convert_from_f32<C>(stream_, local_f_, acts[0].x_in);
        }
      } else if (tp_size_ > 1) {
        ops::vocab_local_ids(stream_, tokens, local_ids_, vocab_lo_, vocab_valid_, vocab_rows_);
        ops::embedding_forward<C>(stream_, local_ids_, wv(0), acts[0].x_in, false);
        sum_over_tp(acts[0].x_in);
      } else {
        ops::embedding_forward<C>(stream_, tokens, wv(0), acts[0].x_in, false);
      }
      ops::embedding_forward<C>(stream_, positions_local_, wv(1), acts[0].x_in, true);
      // Embedding dropout with the CPU layer's masks (identity in evaluation or at p = 0).
      if (at.training && drop_.p() > 0) {
        // The mask's element index is global: this rank's rows start tp_rank x N / tp rows in.
        const std::int64_t first_local = sp_ ? tp_rank_ * (N / tp_size_) : 0;
        S.mask = ops::DropoutMask{drop_.mask_key(at), drop_.keep_threshold(), static_cast<float>(1.0 / (1.0 - drop_.p())),
                                  static_cast<std::uint64_t>((at.first_row * T + first_local) * D)};
        ops::dropout_apply<C>(stream_, acts[0].x_in, S.mask);
      }
    } else {
      from_boundary(input, acts[0].x_in);
    }
    if (!blocks_.empty()) prefetch(blocks_[0].ln1_w);  // ZeRO-3: the first block's weights' gather queued
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      LayerActs& a = acts[l];
      LayerActs& next = acts[l + 1];
      const BlockParams& p = blocks_[l];
      // ZeRO-3: the next block's (or the head's) gather queued while this block computes.
      if (l + 1 < blocks_.size())
        prefetch(blocks_[l + 1].ln1_w);
      else if (has_head())
        prefetch(lnf_w_);
      phase("layernorm fwd");
      layer_norm_gathered(a.x_in, p.ln1_w, p.ln1_b, a.ln1, a.mean1, a.rstd1);
      phase("gemm fwd");
      if (flash_) {  // q|k|v kept as they are; the fused kernel keeps each row's log-sum-exp
        gemm({.m = N, .n = 3 * Dl, .k = D}, a.ln1.data(), w(p.qkv_w), a.qkvp.data(), 0.f,
             {Epilogue::bias, w(p.qkv_b), nullptr});
        phase("attention fwd");
        ops::flash_attention_forward<C>(stream_, a.qkvp.reshape(Shape{B, T, 3 * Dl}), H,
                                        a.atty.reshape(Shape{B, T, Dl}), a.lse, flash_path_);
      } else {
        gemm({.m = N, .n = 3 * Dl, .k = D}, a.ln1.data(), w(p.qkv_w), qkv_.data(), 0.f,
             {Epilogue::bias, w(p.qkv_b), nullptr});
        phase("attention fwd");
        ops::attention_forward<C>(stream_, blas_, qkv_, H, a.qkvp, a.probs, heads_, a.atty.reshape(Shape{B, T, Dl}));
      }
      phase("gemm fwd");
      row_parallel(a.atty, Dl, p.proj_w, p.proj_b, a.x_in, a.x_mid);
      phase("layernorm fwd");
      layer_norm_gathered(a.x_mid, p.ln2_w, p.ln2_b, a.ln2, a.mean2, a.rstd2);
      phase("gemm fwd");
      gemm({.m = N, .n = 4 * Dl, .k = D}, a.ln2.data(), w(p.fc_w), a.h.data(), 0.f,
           {Epilogue::gelu_bias, w(p.fc_b), a.pre.data()});
      row_parallel(a.h, 4 * Dl, p.fcproj_w, p.fcproj_b, a.x_mid, next.x_in);
    }
    LayerActs& last = acts.back();
    if (!has_head()) {
      to_boundary(last.x_in, output);
      return;
    }
    phase("layernorm fwd");
    layer_norm_gathered(last.x_in, lnf_w_, lnf_b_, S.lnf, last.mean1, last.rstd1);
    phase("lm head fwd");
    // Logits = lnf wte^T (the tied head; under tp this rank's vocabulary columns), then the loss
    // and, with dloss, dlogits in place.
    gemm({.trans_b = true, .m = N, .n = vocab_rows_, .k = D}, S.lnf.data(), w(head_), S.logits.data());
    const DeviceView<const std::int32_t> flat_targets(targets.data, Shape{N});
    phase("cross-entropy");
    if (tp_size_ > 1)
      ops::vocab_parallel_cross_entropy<C>(stream_, *tp_, S.logits, vocab_lo_, vocab_valid_, flat_targets, losses_,
                                           stats_, dloss);
    else
      ops::softmax_cross_entropy<C>(stream_, S.logits, V, flat_targets, losses_, dloss);
    ops::bias_grad<float>(stream_, DeviceView<const float>(losses_.data(), Shape{N, 1}),
                          DeviceView<float>(loss_sum_.data(), Shape{1}), ws_);
  }

  // `input_only`: the I pass of a split backward (the weight-gradient products deferred).
  void backward_impl(int slot_index, DeviceView<const std::int32_t> tokens, DeviceView<const float> grad_output,
                     DeviceView<float> grad_input, bool input_only) {
    TESSERA_EXPECTS(slot_index >= 0 && slot_index < static_cast<int>(slots_.size()) &&
                        slots_[static_cast<std::size_t>(slot_index)].busy &&
                        !slots_[static_cast<std::size_t>(slot_index)].deferred,
                    "DeviceGPT: backward of activation slot ", slot_index, ", which holds no forward with a gradient");
    Slot& S = slots_[static_cast<std::size_t>(slot_index)];
    S.busy = input_only;  // an I pass holds the slot until its W pass
    S.deferred = input_only;
    std::vector<LayerActs>& acts = S.acts;
    const std::int64_t B = B_, T = T_, D = config_.d_model, N = B * T;
    const std::int64_t H = config_.n_head / tp_size_, Dl = D / tp_size_;  // this rank's heads and their width
    const Shape edge = boundary_shape(B, T);
    if (has_embedding())
      TESSERA_EXPECTS(tokens.shape == (Shape{B, T}), "DeviceGPT: backward tokens ", tokens.shape, ", expected (", B, ", ",
                      T, ")");
    if (!has_head())
      TESSERA_EXPECTS(grad_output.shape == edge, "DeviceGPT: stage output gradient ", grad_output.shape, ", expected ",
                      edge);
    if (!has_embedding())
      TESSERA_EXPECTS(grad_input.shape == edge, "DeviceGPT: stage input gradient ", grad_input.shape, ", expected ",
                      edge);
    LayerActs& last = acts.back();
    if (has_head()) {
      // Head: dlnf = dlogits wte (summed over tp); dwte += dlogits^T lnf; ln_f backward into the
      // residual gradient.
      phase("lm head bwd");
      column_input_grad({.m = N, .n = D, .k = vocab_rows_}, S.logits.data(), head_);
      if (!input_only)  // (an I pass leaves dwte to its W pass: dlogits and lnf stay in the slot)
        gemm_grad({.trans_a = true, .m = vocab_rows_, .n = D, .k = N}, S.logits.data(), S.lnf.data(), g(head_));
      phase("layernorm bwd");
      ln_backward(last.x_in, lnf_w_, lnf_b_, last.mean1, last.rstd1, false);
      if (!blocks_.empty()) prefetch(blocks_.back().ln1_w);  // ZeRO-3: queued before the head's reduction
      if (hook_) hook_(flat_[lnf_w_].offset);
    } else {
      from_boundary(grad_output, dres_);
    }
    // The residual stream's gradient over every row, for the row-parallel products' backward:
    // dres itself, or under sequence parallelism every rank's rows of it gathered.
    const DeviceTensor<C>& dres_all = sp_ ? dres_full_ : dres_;
    for (std::size_t l = blocks_.size(); l-- > 0;) {
      LayerActs& a = acts[l];
      const BlockParams& p = blocks_[l];
      // MLP: dpre = (dres Wfcproj^T) * gelu'(pre); weight and bias gradients.
      phase("gemm bwd");
      if (sp_) gather_rows(dres_, dres_full_);
      gemm({.trans_b = true, .m = N, .n = 4 * Dl, .k = D}, dres_all.data(), w(p.fcproj_w), dpre_.data(), 0.f,
           {Epilogue::dgelu, nullptr, a.pre.data()});
      if (input_only)
        copy(dres_all, S.wgrad[l].fcproj);
      else
        gemm_grad({.trans_a = true, .m = 4 * Dl, .n = D, .k = N}, a.h.data(), dres_all.data(), g(p.fcproj_w));
      phase("bias grads");
      ops::bias_grad<C>(stream_, dres_all, gv(p.fcproj_b), ws_);
      phase("gemm bwd");
      column_input_grad({.trans_b = true, .m = N, .n = D, .k = 4 * Dl}, dpre_.data(), p.fc_w);
      if (input_only)
        copy(dpre_, S.wgrad[l].fc);
      else
        gemm_grad({.trans_a = true, .m = D, .n = 4 * Dl, .k = N}, a.ln2.data(), dpre_.data(), g(p.fc_w));
      phase("bias grads");
      ops::bias_grad<C>(stream_, dpre_.reshape(Shape{N, 4 * Dl}), gv(p.fc_b), ws_);
      phase("layernorm bwd");
      ln_backward(a.x_mid, p.ln2_w, p.ln2_b, a.mean2, a.rstd2, true);
      // Attention: datt = dres Wproj^T; weight and bias gradients; core attention; c_attn.
      phase("gemm bwd");
      if (sp_) gather_rows(dres_, dres_full_);
      gemm({.trans_b = true, .m = N, .n = Dl, .k = D}, dres_all.data(), w(p.proj_w), datt_.data());
      if (input_only)
        copy(dres_all, S.wgrad[l].proj);
      else
        gemm_grad({.trans_a = true, .m = Dl, .n = D, .k = N}, a.atty.data(), dres_all.data(), g(p.proj_w));
      phase("bias grads");
      ops::bias_grad<C>(stream_, dres_all, gv(p.proj_b), ws_);
      phase("attention bwd");
      if (flash_)
        ops::flash_attention_backward<C>(stream_, datt_.reshape(Shape{B, T, Dl}), a.qkvp.reshape(Shape{B, T, 3 * Dl}),
                                         a.atty.reshape(Shape{B, T, Dl}), a.lse, H, flash_d_, dqkv_, flash_path_);
      else
        ops::attention_backward<C>(stream_, blas_, datt_.reshape(Shape{B, T, Dl}), a.qkvp, H, a.probs, heads_, dprobs_,
                                   dqkvp_, dqkv_);
      phase("gemm bwd");
      column_input_grad({.trans_b = true, .m = N, .n = D, .k = 3 * Dl}, dqkv_.data(), p.qkv_w);
      if (input_only)
        copy(dqkv_, S.wgrad[l].qkv);
      else
        gemm_grad({.trans_a = true, .m = D, .n = 3 * Dl, .k = N}, a.ln1.data(), dqkv_.data(), g(p.qkv_w));
      phase("bias grads");
      ops::bias_grad<C>(stream_, dqkv_.reshape(Shape{N, 3 * Dl}), gv(p.qkv_b), ws_);
      phase("layernorm bwd");
      ln_backward(a.x_in, p.ln1_w, p.ln1_b, a.mean1, a.rstd1, true);
      if (l > 0) prefetch(blocks_[l - 1].ln1_w);  // ZeRO-3: queued before this block's reduction
      if (hook_) hook_(flat_[p.ln1_w].offset);
    }
    if (!has_embedding()) {
      to_boundary(dres_, grad_input);
      return;
    }
    phase("embedding bwd");
    ops::dropout_apply<C>(stream_, dres_, S.mask);  // the same mask on the gradient
    // Under sequence parallelism every row's gradient is needed (this rank's vocabulary rows take
    // every position's tokens): gathered. Under tp, this rank's vocabulary rows only (the others'
    // tokens carry the id "not here"; computed again here: another micro-batch's forward may
    // have run since this one's).
    if (sp_) gather_rows(dres_, dres_full_);
    if (tp_size_ > 1) ops::vocab_local_ids(stream_, tokens, local_ids_, vocab_lo_, vocab_valid_, vocab_rows_);
    ops::embedding_backward<C>(stream_, tp_size_ > 1 ? DeviceView<const std::int32_t>(local_ids_) : tokens, dres_all, gv(0));
    ops::embedding_backward<C>(stream_, positions_, dres_all, gv(1));
    if (hook_) hook_(0);
  }
  // A boundary activation (fp32) into this stage's compute type, and back: exact both ways
  // (bf16 -> fp32 -> bf16 is the identity), so a pipeline changes no value.
  void from_boundary(DeviceView<const float> in, const DeviceTensor<C>& out) {
    if constexpr (std::is_same_v<C, float>)
      detail::check(cudaMemcpyAsync(out.data(), in.data, out.bytes(), cudaMemcpyDeviceToDevice, stream_.get()),
                    "cudaMemcpyAsync", "DeviceGPT stage boundary of ", out.numel(), " elements");
    else
      ops::convert_from_f32<C>(stream_, in, out);
  }
  void to_boundary(const DeviceTensor<C>& in, DeviceView<float> out) {
    if constexpr (std::is_same_v<C, float>)
      detail::check(cudaMemcpyAsync(out.data, in.data(), in.bytes(), cudaMemcpyDeviceToDevice, stream_.get()),
                    "cudaMemcpyAsync", "DeviceGPT stage boundary of ", in.numel(), " elements");
    else
      ops::convert_to_f32<C>(stream_, in, out);
  }

  GPTConfig config_;
  DeviceStage stage_;
  std::vector<std::string> gpt_names_;  // the whole GPT's parameter names, in its order
  std::size_t copy_ = npos, head_ = 0, lnf_w_ = 0, lnf_b_ = 0;  // the last stage's wte copy; the head's wte; ln_f
  const Stream& stream_;
  BlasLt blas_;
  std::vector<FlatParameter> flat_;
  std::vector<BlockParams> blocks_;
  std::int64_t numel_ = 0;
  std::int64_t shard_lo_ = 0, shard_size_ = -1;  // ZeRO-1's shard (shard_optimizer); -1: unsharded
  std::int64_t shard_hi() const noexcept { return shard_size_ < 0 ? numel_ : shard_lo_ + shard_size_; }
  DeviceTensor<float> master_, grad_, m_, v_;
  DeviceTensor<bf16> low_;
  ops::AdamWChunks chunks_;
  ops::AdamWChunks norm_chunks_;  // tp > 1: the gradient norm's weights (group 0 shards, 1 replicated)
  ops::AdamWChunks shard_norm_chunks_;  // ZeRO-2 at tp > 1: those weights inside this rank's shard
  std::unique_ptr<DeviceBucketGradients> zero2_;  // ZeRO-2 (shard_gradients): bucket buffers and the shard
  DeviceDataParallel* zero3_ = nullptr;          // ZeRO-3 (shard_parameters): the gathers' reduction
  bool zero3_prefetch_ = true;                   // ZeRO-3: the next block's gather queued ahead
  DeviceTensor<float> master_shard_;             // ZeRO-3: this rank's fp32 weights
  mutable std::vector<DeviceTensor<C>> units_;   // ZeRO-3: per bucket, its gathered weights (or none)
  mutable std::vector<DeviceTensor<float>> gathered_f32_;  // ZeRO-3: a queued gather's fp32 output, until first use
  mutable std::vector<char> pending_;            // ZeRO-3: per bucket, a gather queued and not yet waited for
  std::vector<std::unique_ptr<Event>> unit_ready_;  // ZeRO-3: per bucket, recorded after its gather
  mutable std::vector<std::size_t> lru_;         // ZeRO-3: the gathered or queued buckets, least recently used first
  DeviceTensor<float> norm_out_, norm_ws_, loss_sum_;
  std::int64_t steps_ = 0;
  std::int64_t B_ = -1, T_ = -1;
  std::vector<Slot> slots_;
  int slots_count_ = 1;
  DeviceTensor<C> dres_, dln_, datt_, dqkv_, dpre_, dprobs_, qkv_, heads_, dqkvp_;
  DeviceTensor<float> losses_, ws_;
  DeviceTensor<float> partial_;  // tp > 1: a row-parallel product's partial sums, or a column input gradient's
  DeviceTensor<float> stats_;    // tp > 1: the vocab-parallel loss's row maxima, sums and target logits
  DeviceTensor<std::int32_t> local_ids_;  // tp > 1: the tokens as this rank's vocabulary rows (vocab_local_ids)
  std::int64_t vocab_rows_ = 0, vocab_lo_ = 0, vocab_valid_ = 0;  // this rank's (padded) rows, first id, real rows
  DeviceTensor<std::int32_t> positions_, positions_local_;  // every row's position; this rank's rows' (sp)
  bool sp_ = false;                        // sequence parallelism (tp > 1)
  bool split_ = false;                     // backward may be split into I and W passes (set_split_backward)
  bool flash_ = false;                     // fused attention (set_fused_attention)
  ops::FlashPath flash_path_ = ops::FlashPath::automatic;  // its kernels
  DeviceTensor<float> flash_d_;            // fused attention's dy . y per row and head (backward scratch)
  DeviceTensor<C> dres_full_, ln_local_;   // sp: every row's residual gradient (gathered); a LayerNorm's rows here
  DeviceTensor<float> local_f_, sp_grad_;  // sp: this rank's rows in fp32; a LayerNorm's weight and bias gradients
  std::size_t act_bytes_ = 0;
  Dropout<float> drop_;
  std::function<void(std::int64_t)> hook_;
  PhaseTimer phases_;                      // phase_timer()
  void phase(const char* name) { phases_.mark(stream_, name); }
  DeviceComm* tp_ = nullptr;  // the tensor-parallel group (nullptr: tp 1)
  int tp_size_ = 1, tp_rank_ = 0;
};

}  // namespace tessera::cuda
