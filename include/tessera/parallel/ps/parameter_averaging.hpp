#pragma once
/// @file
/// ParameterAveraging: local SGD's synchronization through a ParameterServer, the survey's
/// form of data parallelism: every H local steps the workers send their parameters to the
/// servers, which average them and send the average back. Sent as the pseudo-gradient
/// (anchor - parameters) with a count of 1, so the server's sum-and-divide gives the mean
/// pseudo-gradient and its optimizer, SGD at learning rate 1 without momentum or decay,
/// turns the anchor into the mean of the workers' parameters (another outer optimizer on the
/// server, SGD with momentum, gives a DiLoCo-style outer step).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/ps/parameter_server.hpp"

namespace tessera {

/// A worker's side of periodic parameter averaging through `ps` (the servers run
/// `ps.serve(optim::SGD<T>(ps.shard_parameters(), {.lr = 1}))`, one global step per
/// synchronization). The worker trains its replica with its own optimizer and calls step()
/// after each local step; every sync_every-th call synchronizes:
/// grad = anchor - value for every parameter (the anchor: the values of the last
/// synchronization, at first the ones ParameterServer broadcast), `ps.step(params, 1)`,
/// anchor = the pulled values. Gradients are overwritten by the synchronization (zero them
/// before the next backward, as after any step). Equal, to round-off, to LocalSGD over the
/// workers with outer_lr 1 and no momentum.
template <std::floating_point T>
class ParameterAveraging {
 public:
  /// Averaging of `params` (this worker's replica, already passed to `ps`'s constructor) every
  /// `sync_every` local steps. Throws tessera::Error on a server rank or for sync_every < 1.
  /// Local.
  ParameterAveraging(ParameterServer<T>& ps, ParameterList<T> params, int sync_every)
      : ps_(&ps), params_(std::move(params)), sync_every_(sync_every) {
    TESSERA_EXPECTS(ps.is_worker(), "ParameterAveraging: world rank ", ps.comm().rank(),
                    " is a server; the servers run ps.serve(SGD at lr 1)");
    TESSERA_EXPECTS(sync_every >= 1, "ParameterAveraging: sync_every ", sync_every, " must be at least 1");
    for (const Parameter<T>& p : params_) anchor_.push_back(p.value.contiguous().clone());
  }

  /// Counts one local step; every sync_every-th call synchronizes and returns true. A push and
  /// pull of every parameter with each server when it synchronizes (the servers answer once
  /// every worker has pushed: all workers must synchronize the same number of times).
  bool step() {
    if (++local_steps_ % sync_every_ != 0) return false;
    sync();
    return true;
  }

  /// Synchronizes now (see the class comment).
  void sync() {
    std::size_t i = 0;
    for (Parameter<T>& p : params_) {
      p.grad.copy_from(anchor_[i]);
      p.grad.add_(p.value, T{-1});
      ++i;
    }
    ps_->step(params_, 1);
    i = 0;
    for (const Parameter<T>& p : params_) anchor_[i++].copy_from(p.value);
    ++syncs_;
  }

  /// Local steps counted so far.
  std::int64_t local_steps() const noexcept { return local_steps_; }
  /// Synchronizations so far.
  std::int64_t syncs() const noexcept { return syncs_; }

 private:
  ParameterServer<T>* ps_;
  ParameterList<T> params_;
  int sync_every_;
  std::vector<Tensor<T>> anchor_;
  std::int64_t local_steps_ = 0;
  std::int64_t syncs_ = 0;
};

}  // namespace tessera
