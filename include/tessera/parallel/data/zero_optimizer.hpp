#pragma once
/// @file
/// ZeroOptimizer: ZeRO stage 1, the optimizer state sharded over the dp ranks (Rajbhandari et
/// al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", SC 2020; the
/// layout of Megatron-LM's DistributedOptimizer).

#include <algorithm>
#include <concepts>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/grad_buckets.hpp"

namespace tessera {

/// An optimizer `Opt` (optim::SGD, optim::AdamW, or any type built from a ParameterList and
/// options, with step()) whose state is sharded over the dp ranks of a DataParallel.
///
/// Layout: each gradient bucket of the DataParallel (a flat buffer padded to a multiple of dp)
/// is split into dp equal contiguous blocks; rank r owns block r of every bucket. Building a
/// ZeroOptimizer switches the DataParallel to reduce-scatter: backward leaves in block r the
/// sum over ranks of that block's gradients (still bucket by bucket, overlapped with backward);
/// `step()` copies this rank's block of the parameter values into a flat shard, runs `Opt` on
/// the shards (one Parameter per bucket, so Opt keeps state for 1/dp of the elements), and
/// all-gathers the updated shards into every replica's parameters. Element-wise optimizers
/// then give the same parameters as plain data parallelism with `Opt` (bitwise on the threads
/// backend). Parameter counts that dp does not divide are padded with zeros.
///
/// After backward, a parameter's own `grad` holds only this rank's local gradient (the reduced
/// sums live in the shards): clip with clip_grad_norm here, not on the parameters.
/// Every parameter gets `Opt`'s single set of options.
template <class Opt>
class ZeroOptimizer {
 public:
  /// Shards the optimizer of the replica `dp`: `opt_args` are Opt's arguments after the
  /// parameter list (e.g. optim::AdamWOptions). Switches dp's buckets to reduce-scatter (and
  /// back to all-reduce when destroyed). Local (no communication); every rank of dp builds one.
  /// Throws tessera::Error when dp already has a ZeroOptimizer (it would update every
  /// parameter twice), when a parameter value is not contiguous, and what Opt's constructor
  /// throws.
  template <class L, class... Args>
  explicit ZeroOptimizer(DataParallel<L>& dp, Args&&... opt_args)
      : ZeroOptimizer(dp.buckets(), std::forward<Args>(opt_args)...) {}

  /// As above, on the buckets of a replica directly.
  template <std::floating_point T, class... Args>
  explicit ZeroOptimizer(GradBuckets<T>& buckets, Args&&... opt_args)
      : state_(std::make_unique<State<T>>(buckets)),
        opt_(static_cast<State<T>&>(*state_).shard_list(), std::forward<Args>(opt_args)...) {}

  /// One optimizer step on this rank's shards, then an all-gather of the updated parameters.
  /// Collective over dp (one all_gather per bucket). Throws what Opt and the communicator throw.
  void step() {
    state_->load_shards();
    opt_.step();
    state_->gather_parameters();
  }
  /// Sets every gradient to zero (the replica's buckets). Local.
  void zero_grad() { state_->zero_grad(); }

  /// Clips the reduced gradients (this rank's shards) to global L2 norm `max_norm` and returns
  /// the norm before clipping, the same on every rank. Collective over dp (one all-reduce).
  /// Throws tessera::Error for a negative max_norm.
  double clip_grad_norm(double max_norm) { return state_->clip_grad_norm(max_norm); }

  /// Bytes of optimizer state on this rank (Opt's state_bytes() on the shards): about 1/dp of
  /// what Opt holds for the whole model.
  std::size_t state_bytes() const { return opt_.state_bytes(); }
  /// The learning rate.
  double lr() const { return opt_.lr(); }
  /// Sets the learning rate for the next steps.
  void set_lr(double lr) { opt_.set_lr(lr); }
  /// The inner optimizer (over this rank's shards).
  Opt& inner() noexcept { return opt_; }

 private:
  struct StateBase {
    virtual ~StateBase() = default;
    virtual void load_shards() = 0;
    virtual void gather_parameters() = 0;
    virtual void zero_grad() = 0;
    virtual double clip_grad_norm(double max_norm) = 0;
  };

  // The shards of one element type: per bucket the gathered parameter buffer (padded, flat),
  // whose block `rank` is this rank's parameter shard, and the gradient shard (a view of the
  // bucket's block `rank`).
  template <std::floating_point T>
  struct State final : StateBase {
    explicit State(GradBuckets<T>& b) : buckets(&b), comm(b.comm()) {
      TESSERA_EXPECTS(b.mode() == GradReduce::all_reduce, "ZeroOptimizer: the gradient buckets over ", comm.name(),
                      " already have a ZeroOptimizer; a second one would update every parameter twice. Build one "
                      "ZeroOptimizer per DataParallel (with parameter groups for different options)");
      buckets->set_mode(GradReduce::reduce_scatter);
      const int r = comm.rank();
      for (std::size_t bi = 0; bi < buckets->buckets().size(); ++bi) {
        const auto& bucket = buckets->buckets()[bi];
        const std::int64_t n = buckets->shard_size(bi);
        Tensor<T> full(bucket.buffer.shape());
        for (std::size_t i : bucket.slots) {
          const auto& s = buckets->slots()[i];
          TESSERA_EXPECTS(s.param->value.is_contiguous(), "ZeroOptimizer: parameter \"", s.param->name,
                          "\" of shape ", s.param->value.shape(), " is not contiguous");
          full.slice(0, s.offset, s.offset + s.numel).copy_from(s.param->value.reshape(Shape{s.numel}));
        }
        params.push_back(full);
        shards.emplace_back(detail::str("zero.bucket", bi, ".shard", r), full.slice(0, r * n, (r + 1) * n),
                            buckets->grad_shard(bi), ParamLayout{});
      }
    }
    ParameterList<T> shard_list() {
      ParameterList<T> list;
      for (Parameter<T>& p : shards) list.push_back(p);
      return list;
    }
    // This rank's block of the current parameter values into its shard (the parameters may
    // have been changed outside, e.g. loaded): only the 1/dp that this rank updates.
    void load_shards() override {
      const std::int64_t r = comm.rank();
      for (std::size_t bi = 0; bi < params.size(); ++bi) {
        const std::int64_t n = buckets->shard_size(bi), lo = r * n, hi = lo + n;
        for (std::size_t i : buckets->buckets()[bi].slots) {
          const auto& s = buckets->slots()[i];
          const std::int64_t a = std::max(lo, s.offset), b = std::min(hi, s.offset + s.numel);
          if (a >= b) continue;
          std::copy(s.param->value.data() + (a - s.offset), s.param->value.data() + (b - s.offset),
                    params[bi].data() + a);
        }
      }
    }
    void gather_parameters() override {
      const std::size_t w = static_cast<std::size_t>(comm.size());
      std::vector<Request> requests(params.size());
      if (w > 1) {
        const std::size_t r = static_cast<std::size_t>(comm.rank());
        for (std::size_t bi = 0; bi < params.size(); ++bi) {
          const std::size_t n = static_cast<std::size_t>(buckets->shard_size(bi));
          T* full = params[bi].data();
          // In place: this rank's block of the output is the input.
          requests[bi] = comm.iall_gather(std::span<const T>(full + r * n, n), std::span<T>(full, n * w));
        }
      }
      std::exception_ptr error;
      for (std::size_t bi = 0; bi < params.size(); ++bi) {
        try {
          requests[bi].wait();
        } catch (...) {
          if (!error) error = std::current_exception();
        }
        if (error) continue;
        for (std::size_t i : buckets->buckets()[bi].slots) {
          const auto& s = buckets->slots()[i];
          std::copy_n(params[bi].data() + s.offset, s.numel, s.param->value.data());
        }
      }
      if (error) std::rethrow_exception(error);
    }
    // The buckets go back to all-reduce: with no sharded optimizer, every replica needs the
    // whole reduced gradient.
    ~State() override {
      try {
        buckets->set_mode(GradReduce::all_reduce);
      } catch (...) {  // destroyed inside a backward: the mode stays; nothing to report from here
      }
    }
    State(const State&) = delete;
    State& operator=(const State&) = delete;
    void zero_grad() override { buckets->zero_grad(); }
    double clip_grad_norm(double max_norm) override {
      TESSERA_EXPECTS(max_norm >= 0, "ZeroOptimizer::clip_grad_norm: max_norm ", max_norm, " is negative");
      double sq = 0;
      for (const Parameter<T>& p : shards)
        detail::for_each_element("clip_grad_norm", [&sq](const T& g) { sq += static_cast<double>(g) * g; }, p.grad);
      comm.iall_reduce(std::span<double>(&sq, 1), ReduceOp::sum).wait();
      const double norm = std::sqrt(sq);
      const double coef = max_norm / (norm + 1e-6);
      if (coef < 1)
        for (const Parameter<T>& p : shards) p.grad.scale_(static_cast<T>(coef));
      return norm;
    }

    GradBuckets<T>* buckets;
    Comm comm;
    std::vector<Tensor<T>> params;    // per bucket: gathered values, padded
    std::vector<Parameter<T>> shards;  // per bucket: this rank's value and grad blocks
  };

  std::unique_ptr<StateBase> state_;
  Opt opt_;
};

}  // namespace tessera
