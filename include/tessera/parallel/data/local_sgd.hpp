#pragma once
/// @file
/// LocalSGD: data parallelism with infrequent synchronization. Each dp replica takes H inner
/// optimizer steps on its own data; then the replicas all-reduce the pseudo-gradient (how far
/// each moved since the last synchronization) and an outer optimizer, SGD with Nesterov
/// momentum, applies its mean to the common starting point. DiLoCo (Douillard et al.,
/// "DiLoCo: Distributed Low-Communication Training of Language Models", 2023); with outer SGD
/// at learning rate 1 and no momentum it is local SGD / periodic parameter averaging (Stich,
/// "Local SGD Converges Fast and Communicates Little", ICLR 2019).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <memory>
#include <cstddef>
#include <cstdint>
#include <span>
#include <unordered_set>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"
#include "tessera/parallel/data/compression/dp_rank_state.hpp"
#include "tessera/parallel/data/dp_replicas.hpp"

namespace tessera {

/// Options of LocalSGD (DiLoCo's defaults: H = 500 there for large models; outer lr 0.7,
/// Nesterov momentum 0.9).
struct LocalSGDOptions {
  int sync_every = 10;          ///< H: inner steps between synchronizations (>= 1)
  double outer_lr = 0.7;        ///< outer learning rate (1 with no momentum: parameter averaging)
  double outer_momentum = 0.9;  ///< outer momentum mu (0: none)
  bool nesterov = true;         ///< Nesterov momentum (PyTorch SGD's form), else heavy ball
};

/// The L2 norm of each dp replica's own gradient, for gradient clipping under LocalSGD: the
/// replicas' gradients differ between synchronizations and DiLoCo's inner optimizer is local,
/// so each replica clips by its own gradient's norm, as a run of that replica alone would
/// (a norm counting one replica's pieces, as synchronous data parallelism may, scales every
/// replica by that one's norm). `grads`: this rank's pieces, `counted` as for replica 0 (over
/// the ranks of one replica, e.g. its tp x pp group, each of its gradient elements counted
/// once), and `grads.comm` the ranks of every replica together (the world; empty: this rank
/// alone holds its replica). `replica`: this rank's replica (its dp rank) in [0, replicas).
/// Returns this replica's norm. Collective over grads.comm: one all-reduce of `replicas`
/// doubles (slot r summed over the ranks of replica r). Throws tessera::Error naming them
/// for a replica outside [0, replicas).
template <std::floating_point T>
double replica_grad_norm(const optim::Gradients<T>& grads, int replica, int replicas) {
  TESSERA_EXPECTS(replicas >= 1 && replica >= 0 && replica < replicas, "replica_grad_norm: replica ", replica,
                  " is not in [0, ", replicas, ")");
  std::vector<double> s(static_cast<std::size_t>(replicas), 0.0);
  s[static_cast<std::size_t>(replica)] = optim::local_grad_norm_squared(grads);
  if (grads.comm.valid() && grads.comm.size() > 1) {
    Comm comm = grads.comm;  // a handle
    comm.all_reduce(std::span<double>(s), ReduceOp::sum);
  }
  return std::sqrt(s[static_cast<std::size_t>(replica)]);
}

/// Infrequently synchronized data parallelism over the dp communicator. Each rank holds a whole
/// replica and its own inner optimizer, built on the same parameters, which it steps on local
/// gradients (no gradient reduction: the model is not wrapped in DataParallel). After each
/// inner step the caller calls `step()`; every `sync_every`-th call synchronizes:
/// 1. Delta = mean over ranks of (anchor - params), anchor being the parameters after the
///    last synchronization (one all-reduce of every parameter, flat, summed in rank order on
///    the threads backend, then multiplied by 1 / p);
/// 2. outer SGD: b = Delta on the first synchronization, else b = mu b + Delta;
///    u = Delta + mu b (Nesterov) or b; anchor -= outer_lr u;
/// 3. every replica's parameters become the anchor (so replicas are bitwise identical).
/// With sync_every = 1, outer_lr = 1 and outer_momentum = 0 this is synchronous data
/// parallelism to round-off (the inner optimizer's update is linear in the gradient for SGD
/// with momentum: the mean of the replicas' steps is the step on the mean gradient).
/// With a CommHook (set_comm_hook), step 1's all-reduce is the hook's reduction of the
/// pseudo-gradients as one bucket (index 0, every distinct parameter a tensor of it): a
/// compressor then compresses the replicas' *updates* (with H = 1, outer lr 1 and no momentum:
/// each rank's inner optimizer step on its local gradient, e.g. AdamW's, compressed with the
/// hook's error feedback and averaged; so the update direction is compressed, as Deep Gradient
/// Compression's momentum correction compresses the accumulated velocity instead of the
/// gradient, Lin et al. 2018, section 3.2).
/// Bytes per synchronization: one all-reduce of the parameters, so H times fewer than
/// DataParallel's per-step all-reduce of the gradients. The inner optimizer's state (Adam
/// moments, momentum) stays local to each replica, as in DiLoCo.
template <std::floating_point T>
class LocalSGD {
 public:
  /// Local SGD over `dp` for `params` (the replica's parameters; they must outlive this).
  /// Collective over `dp`: checks that every rank has the same parameter list, broadcasts rank
  /// 0's values and takes them as the anchor. Throws tessera::Error on every rank for lists
  /// that differ, and for sync_every < 1, or a negative or non-finite outer lr or momentum
  /// (naming it).
  LocalSGD(ParameterList<T> params, Comm dp, const LocalSGDOptions& options = {})
      : params_(std::move(params)), comm_(std::move(dp)), options_(options) {
    TESSERA_EXPECTS(comm_.valid(), "LocalSGD: the dp communicator handle is empty");
    TESSERA_EXPECTS(options.sync_every >= 1, "LocalSGD: sync_every ", options.sync_every, " must be at least 1");
    TESSERA_EXPECTS(options.outer_lr >= 0 && options.outer_lr < 1e30, "LocalSGD: outer_lr ", options.outer_lr,
                    " must be a finite number >= 0");
    TESSERA_EXPECTS(options.outer_momentum >= 0 && options.outer_momentum < 1, "LocalSGD: outer_momentum ",
                    options.outer_momentum, " must be in [0, 1)");
    expect_same_parameters(comm_, params_, "LocalSGD");
    broadcast_parameters(comm_, params_, 0);
    // A tensor listed twice (a tied embedding) is synchronized once.
    std::unordered_set<const T*> seen;
    std::int64_t n = 0;
    for (Parameter<T>& p : params_)
      if (p.value.numel() > 0 && seen.insert(p.value.data()).second) {
        distinct_.push_back(&p);
        n += p.value.numel();
      }
    anchor_.resize(static_cast<std::size_t>(n));
    gather(anchor_);
    std::int64_t offset = 0;
    for (const Parameter<T>* p : distinct_) {
      tensors_.push_back(GradBucketTensor{.offset = offset, .shape = p->value.shape()});
      offset += p->value.numel();
    }
  }

  /// Exchanges the pseudo-gradients through `hook` from the next synchronization on (nullptr:
  /// the plain all-reduce again). The hook sees one bucket, index 0, holding every distinct
  /// parameter's pseudo-gradient flat in parameter order (tensor shapes as the parameters').
  /// Local; every rank must install the same kind of hook.
  void set_comm_hook(std::shared_ptr<CommHook<T>> hook) { hook_ = std::move(hook); }
  /// The hook of set_comm_hook (nullptr: none).
  const std::shared_ptr<CommHook<T>>& comm_hook() const noexcept { return hook_; }

  /// Counts one inner step; every sync_every-th call synchronizes (see the class comment) and
  /// returns true. Collective over dp when it synchronizes (every rank calls step() after each
  /// of its inner steps, so all reach the synchronization together).
  bool step() {
    if (++inner_steps_ % options_.sync_every != 0) return false;
    sync();
    return true;
  }

  /// Synchronizes now (the class comment's steps 1-3). Collective over dp: one all-reduce of
  /// every parameter's element count, or the hook's collectives (set_comm_hook).
  void sync() {
    const std::size_t n = anchor_.size();
    delta_.resize(n);
    gather(delta_);
    for (std::size_t i = 0; i < n; ++i) delta_[i] = anchor_[i] - delta_[i];  // this replica's pseudo-gradient
    if (hook_) {
      GradBucketView<T> view{.index = 0, .grad = std::span<T>(delta_), .tensors = tensors_};
      hook_->reduce(view, comm_);
    } else if (comm_.size() > 1) {
      comm_.all_reduce(delta_, ReduceOp::sum);
    }
    const T inv_p = static_cast<T>(1.0 / static_cast<double>(comm_.size()));
    const T lr = static_cast<T>(options_.outer_lr), mu = static_cast<T>(options_.outer_momentum);
    const bool first = momentum_.empty();
    if (options_.outer_momentum > 0 && first) momentum_.assign(n, T{0});
    for (std::size_t i = 0; i < n; ++i) {
      const T d = delta_[i] * inv_p;
      T u = d;
      if (options_.outer_momentum > 0) {
        T& b = momentum_[i];
        b = first ? d : mu * b + d;
        u = options_.nesterov ? d + mu * b : b;
      }
      anchor_[i] -= lr * u;
    }
    scatter(anchor_);
    ++syncs_;
  }

  /// This rank's state for a checkpoint: "params" (this replica's distinct parameters, flat:
  /// they differ between replicas between synchronizations), "anchor", "momentum" (empty
  /// before the first synchronization or without momentum; a state without it means empty), the counters "inner_steps" and
  /// "syncs", and the hook's state under "hook.". Local.
  DpRankState<T> state() const {
    DpRankState<T> out;
    std::vector<T> mine(anchor_.size());
    gather(mine);
    out.tensors["params"] = std::move(mine);
    out.tensors["anchor"] = anchor_;
    out.tensors["momentum"] = momentum_;
    out.counters["inner_steps"] = inner_steps_;
    out.counters["syncs"] = syncs_;
    if (hook_) out.add("hook.", hook_->state());
    return out;
  }
  /// Restores a state() saved by a LocalSGD over the same parameters and options: this
  /// replica's parameters, the anchor, the outer momentum, the counters and the hook's state
  /// (install the hook first). Then the run continues bitwise as the saved one (with the inner
  /// optimizer's state restored too). Throws tessera::Error when a tensor is missing or has
  /// another size (naming it and both sizes). Local.
  void load_state(const DpRankState<T>& state) {
    const auto tensor = [&](const char* name) -> const std::vector<T>& {
      auto it = state.tensors.find(name);
      TESSERA_EXPECTS(it != state.tensors.end(), "LocalSGD: the state has no '", name, "'");
      return it->second;
    };
    const std::vector<T>& mine = tensor("params");
    const std::vector<T>& anchor = tensor("anchor");
    static const std::vector<T> none;
    const std::vector<T>& momentum = state.tensors.count("momentum") ? tensor("momentum") : none;  // may be absent
    for (const auto& [name, v] : {std::pair<const char*, const std::vector<T>*>{"params", &mine}, {"anchor", &anchor}})
      TESSERA_EXPECTS(v->size() == anchor_.size(), "LocalSGD: state '", name, "' has ", v->size(),
                      " elements, the parameters ", anchor_.size());
    TESSERA_EXPECTS(momentum.empty() || momentum.size() == anchor_.size(), "LocalSGD: state 'momentum' has ",
                    momentum.size(), " elements, the parameters ", anchor_.size());
    TESSERA_EXPECTS(state.counters.count("inner_steps") && state.counters.count("syncs"),
                    "LocalSGD: the state lacks the counters inner_steps and syncs");
    if (hook_) hook_->load_state(state.take_prefix("hook."));
    scatter(mine);
    anchor_ = anchor;
    momentum_ = momentum;
    inner_steps_ = state.counters.at("inner_steps");
    syncs_ = state.counters.at("syncs");
  }
  /// Starts afresh from the parameters as they are now (after loading a checkpoint without this
  /// rank's state): they become the anchor, the outer momentum is cleared and the inner-step
  /// count set to `inner_steps` (the next synchronization comes at its next multiple of H).
  /// Collective over dp: broadcasts dp rank 0's values first, so the replicas start equal.
  void restart(std::int64_t inner_steps) {
    broadcast_parameters(comm_, params_, 0);
    gather(anchor_);
    momentum_.clear();
    inner_steps_ = inner_steps;
  }

  /// Inner steps counted so far.
  std::int64_t inner_steps() const noexcept { return inner_steps_; }
  /// Synchronizations so far.
  std::int64_t syncs() const noexcept { return syncs_; }
  /// The anchor: every distinct parameter's elements after the last synchronization, flat, in
  /// parameter order.
  std::span<const T> anchor() const noexcept { return anchor_; }
  /// The mean pseudo-gradient of the last synchronization (flat, as anchor()).
  std::vector<T> last_pseudo_gradient() const {
    std::vector<T> d(delta_);
    const T inv_p = static_cast<T>(1.0 / static_cast<double>(comm_.size()));
    for (T& x : d) x *= inv_p;
    return d;
  }
  /// The options.
  const LocalSGDOptions& options() const noexcept { return options_; }
  /// The dp communicator.
  Comm& comm() noexcept { return comm_; }

 private:
  // Copies every parameter's values into `out` (flat) / back from `in`.
  void gather(std::vector<T>& out) const {
    std::size_t k = 0;
    for (const Parameter<T>* p : distinct_) {
      const Tensor<T> v = p->value.contiguous();
      const std::span<const T> s = v.span();
      std::copy(s.begin(), s.end(), out.begin() + static_cast<std::ptrdiff_t>(k));
      k += s.size();
    }
  }
  void scatter(const std::vector<T>& in) {
    std::size_t k = 0;
    for (Parameter<T>* p : distinct_) {
      const std::int64_t m = p->value.numel();
      p->value.copy_from(Tensor<T>::from(p->value.shape(), std::span<const T>(in.data() + k, static_cast<std::size_t>(m))));
      k += static_cast<std::size_t>(m);
    }
  }

  ParameterList<T> params_;
  std::vector<Parameter<T>*> distinct_;  // params_ with each tensor once
  std::vector<GradBucketTensor> tensors_;  // distinct_ as one bucket's tensors (the hook's view)
  std::shared_ptr<CommHook<T>> hook_;
  Comm comm_;
  LocalSGDOptions options_;
  std::vector<T> anchor_, delta_, momentum_;
  std::int64_t inner_steps_ = 0;
  std::int64_t syncs_ = 0;
};

}  // namespace tessera
