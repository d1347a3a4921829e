#pragma once
/// @file
/// DistributedOptimizer: an optimizer over a data-parallel model, replicated on every dp rank
/// or sharded over dp (ZeRO-1), chosen by one flag as Megatron-LM's
/// `--use-distributed-optimizer` chooses it. It lives outside the policies: it takes the
/// parameters and gradient buckets that a DataParallel or a Hybrid exposes.

#include <chrono>
#include <concepts>
#include <optional>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/memory_tracker.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/parallel/data/grad_buckets.hpp"
#include "tessera/parallel/data/zero_optimizer.hpp"

namespace tessera {

/// What DistributedOptimizer needs of a model: its parameters and its dp gradient buckets
/// (DataParallel and Hybrid have both).
template <class M>
concept DataParallelModel = requires(M& m) {
  m.parameters();
  m.buckets();
};

/// `Opt` (optim::AdamW, optim::SGD, ...) over a data-parallel model's parameters, with
/// parameter groups: without `zero1` a plain Opt on every dp rank (each steps every parameter,
/// from the reduced gradients every replica holds); with `zero1` a ZeroOptimizer<Opt> over the
/// model's buckets (each dp rank steps its 1/dp of every bucket, then the parameters are
/// all-gathered). Both give the same parameters (bitwise on the threads backend).
///
/// ```cpp
/// DistributedOptimizer<optim::AdamW<float>> opt(model, optim::weight_decay_groups(model.parameters(), adamw), zero1);
/// ... forward_backward, optim::clip_grad_norm(model.gradients(), 1.0) ...
/// opt.set_lr(schedule(step));
/// opt.step();
/// ```
///
/// Build it after the model and before its first backward, and let it die before the model.
template <class Opt>
class DistributedOptimizer {
 public:
  using Options = typename Opt::Options;  ///< the options of one group

  /// Opt over `model`'s parameters with `groups` (every parameter in exactly one group),
  /// sharded over dp when `zero1`. Local. Throws tessera::Error when a parameter is in no group
  /// or two (naming it), when the model's buckets already have a ZeroOptimizer, and what Opt
  /// throws.
  template <DataParallelModel M, std::floating_point T>
  DistributedOptimizer(M& model, const std::vector<optim::ParamGroup<T, Options>>& groups, bool zero1)
      : DistributedOptimizer(model, groups, zero1 ? ZeroStage::optimizer : ZeroStage::none) {}
  /// Opt over `model`'s parameters with `groups` at ZeRO stage `stage`: none (replicated),
  /// optimizer (ZeRO-1), gradients (ZeRO-2: the reduced gradients sharded too) or parameters
  /// (ZeRO-3: the parameter values too, gathered per unit around each forward and backward;
  /// see ZeroOptimizer). Local. Throws as above.
  template <DataParallelModel M, std::floating_point T>
  DistributedOptimizer(M& model, const std::vector<optim::ParamGroup<T, Options>>& groups, ZeroStage stage) {
    if (stage != ZeroStage::none) {
      zero_.emplace(stage, bucket_sets<T>(model), groups);
    } else {
      (void)optim::group_of_each(model.parameters(), groups, "DistributedOptimizer");
      opt_.emplace(groups);
      state_mem_.set(opt_->state_bytes());
    }
  }
  /// Opt over all of `model`'s parameters with one set of options at ZeRO stage `stage`.
  template <DataParallelModel M>
  DistributedOptimizer(M& model, const Options& options, ZeroStage stage)
      : DistributedOptimizer(model, optim::single_group(model.parameters(), options), stage) {}
  /// Opt over all of `model`'s parameters with one set of options, sharded over dp when
  /// `zero1`. Local. Throws as above.
  template <DataParallelModel M>
  DistributedOptimizer(M& model, const Options& options, bool zero1)
      : DistributedOptimizer(model, optim::single_group(model.parameters(), options), zero1) {}

  DistributedOptimizer(const DistributedOptimizer&) = delete;             ///< not copyable
  DistributedOptimizer& operator=(const DistributedOptimizer&) = delete;  ///< not copyable

  /// One step on the model's reduced gradients. Collective over dp with zero1 (the parameter
  /// all-gather), else local. Throws what Opt and the communicator throw.
  void step() {
    const auto t0 = std::chrono::steady_clock::now();
    if (zero_) {
      zero_->step();
    } else {
      opt_->step();
      state_mem_.set(opt_->state_bytes());
    }
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  /// Sets every group's learning rate for the next steps. Local.
  void set_lr(double lr) {
    if (zero_)
      zero_->set_lr(lr);
    else
      opt_->set_lr(lr);
  }
  /// The learning rate (of group 0).
  double lr() const { return zero_ ? zero_->lr() : opt_->lr(); }
  /// ZeRO-3: all-gathers the full parameter values into the parameters (to save or load a
  /// checkpoint, or evaluate outside the policy) until release_full_parameters(); nothing at
  /// other stages. Collective over dp.
  void gather_full_parameters() {
    if (zero_) zero_->gather_full_parameters();
  }
  /// ZeRO-3: frees what gather_full_parameters() gathered; `store`: first keeps this rank's
  /// block of the (changed, e.g. loaded) values in its shards. Nothing at other stages. Local.
  void release_full_parameters(bool store) {
    if (zero_) zero_->release_full_parameters(store);
  }
  /// Whether the state is sharded over dp (ZeRO-1, 2 or 3).
  bool zero1() const noexcept { return zero_.has_value(); }
  /// The ZeRO stage.
  ZeroStage stage() const noexcept { return zero_ ? zero_->stage() : ZeroStage::none; }
  /// Seconds of the last step (ZeRO-1's all-gather included).
  double seconds() const noexcept { return seconds_; }
  /// Bytes of optimizer state on this rank.
  std::size_t state_bytes() const { return zero_ ? zero_->state_bytes() : opt_->state_bytes(); }
  /// The replicated optimizer. Throws tessera::Error with zero1.
  Opt& replicated() {
    TESSERA_EXPECTS(opt_.has_value(), "DistributedOptimizer::replicated: the optimizer is sharded (zero1); use sharded()");
    return *opt_;
  }
  /// The ZeRO-1 optimizer. Throws tessera::Error without zero1.
  ZeroOptimizer<Opt>& sharded() {
    TESSERA_EXPECTS(zero_.has_value(), "DistributedOptimizer::sharded: the optimizer is not sharded (zero1 is off)");
    return *zero_;
  }

 private:
  // The model's bucket sets: one (a DataParallel's) or a vector (a Hybrid's, one per stage).
  template <std::floating_point T, class M>
  static std::vector<GradBuckets<T>*> bucket_sets(M& model) {
    if constexpr (requires { model.buckets().size(); })
      return model.buckets();
    else
      return {&model.buckets()};
  }
  MemoryTracker::Entry state_mem_{MemoryCategory::optimizer_state};
  std::optional<Opt> opt_;
  std::optional<ZeroOptimizer<Opt>> zero_;
  double seconds_ = 0;
};

}  // namespace tessera
