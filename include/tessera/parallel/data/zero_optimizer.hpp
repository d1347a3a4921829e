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
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/memory_tracker.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/grad_buckets.hpp"

namespace tessera {

/// What ZeRO shards over the dp ranks (Rajbhandari et al., SC 2020, sec. 5): the stages of
/// DeepSpeed's `zero_optimization.stage` and train_gpt's `--zero`.
enum class ZeroStage : int {
  none = 0,        ///< nothing: plain data parallelism, every rank holds everything
  optimizer = 1,   ///< ZeRO-1, P_os: the optimizer state
  gradients = 2,   ///< ZeRO-2, P_os+g: the optimizer state and the reduced gradients
  parameters = 3,  ///< ZeRO-3, P_os+g+p: the parameters too (PyTorch FSDP's FULL_SHARD)
};

/// The ZeroStage of the number `stage` (0, 1, 2 or 3, as `--zero` takes it). Throws
/// tessera::Error naming the number otherwise.
inline ZeroStage zero_stage(int stage) {
  TESSERA_EXPECTS(stage >= 0 && stage <= 3, "ZeRO stage ", stage, " is not one of 0, 1, 2, 3");
  return static_cast<ZeroStage>(stage);
}

/// One contiguous run of this dp rank's block of a gradient bucket that the inner optimizer of
/// a ZeroOptimizer sees as one parameter: flat elements [begin, end) of bucket `bucket`, all of
/// parameter group `group`: one parameter's part of this rank's block (the padding has none).
struct ZeroShardPiece {
  std::size_t bucket = 0;   ///< the bucket (counting every bucket of every bucket set, in order)
  std::int64_t begin = 0;   ///< first flat element of the bucket
  std::int64_t end = 0;     ///< one past the last
  std::size_t group = 0;    ///< the parameter group
};

/// An optimizer `Opt` (optim::SGD, optim::AdamW, or any type built from a ParameterList and
/// options, with step()) whose state is sharded over the dp ranks of a DataParallel.
///
/// Layout: each gradient bucket of the DataParallel (a flat buffer padded to a multiple of dp)
/// is split into dp equal contiguous blocks; rank r owns block r of every bucket. Building a
/// ZeroOptimizer switches the DataParallel to reduce-scatter: backward leaves in block r the
/// sum over ranks of that block's gradients (still bucket by bucket, overlapped with backward);
/// `step()` runs `Opt` on this rank's blocks (one inner Parameter per parameter part in the
/// block, viewing the parameter's own values and the reduced gradient block, so Opt keeps
/// state for 1/dp of the elements), then all-gathers the updated blocks into every replica's
/// parameters. Element-wise optimizers
/// then give the same parameters as plain data parallelism with `Opt` (bitwise on the threads
/// backend). Parameter counts that dp does not divide are padded with zeros.
///
/// After backward, a parameter's own `grad` holds only this rank's local gradient (the reduced
/// sums live in the shards): clip gradients() (or clip_grad_norm here), not the parameters.
///
/// ZeRO-2 (ZeroStage::gradients, the constructors taking a stage): the buckets also keep only
/// this rank's reduced block of each bucket, accumulated over micro-batches and steps in a
/// shard of their own (GradBuckets::set_shard_grads); the full bucket buffers are then
/// communication buffers, freed after each syncing backward (DataParallel) or window
/// (DataParallelStage) and allocated again by the next. Every backward reduce-scatters (no_sync
/// has no effect), so manual accumulation keeps every micro-batch's gradient. Same parameters
/// as ZeRO-1 up to the order of the fp32 sums over micro-batches.
///
/// ZeRO-3 (ZeroStage::parameters): as ZeRO-2, and the parameter values live sharded too
/// (GradBuckets::set_shard_params): rank r keeps block r of each bucket's flat values, which
/// the inner optimizer updates in place; `step()` gathers nothing. The unit of gathering is one
/// bucket set: a DataParallel's model, or one pipeline stage of a Hybrid (DataParallelStage),
/// gathered before each forward and backward and freed after (FSDP2's `fully_shard` on that
/// module; wrap smaller modules in DataParallels of their own for smaller units). The bucket
/// sets given are units in forward order: with prefetch, a unit's gather starts while the one
/// before it (in backward: after it) computes. Between
/// uses the parameters' `value` tensors are empty: gather them with gather_full_parameters()
/// (checkpoints, evaluation outside the policy) and free them again with
/// release_full_parameters(). Destroying the optimizer gathers the values back into
/// tensors of the parameters' own (collective over dp). Same parameters as ZeRO-2 (bitwise on
/// the threads backend: the same updates on the same blocks).
///
/// Memory (MemoryTracker): the inner state as optimizer state (updated after each step); the
/// all-gather's full buffers, alive during step() only, as communication buffers. The inner
/// optimizer updates views of the parameters' own values, so no copy of them is kept.
///
/// Parameter groups (e.g. optim::weight_decay_groups: no weight decay on biases and norms):
/// each inner parameter (ZeroShardPiece) takes its parameter's group's options.
template <class Opt>
class ZeroOptimizer {
 public:
  /// Shards the optimizer of the replica `dp`: `opt_args` are Opt's arguments after the
  /// parameter list (e.g. optim::AdamWOptions), for every parameter. Switches dp's buckets to
  /// reduce-scatter (and back to all-reduce when destroyed). Local (no communication); every
  /// rank of dp builds one. Throws tessera::Error when dp already has a ZeroOptimizer (it
  /// would update every parameter twice), when a parameter value is not contiguous, and what
  /// Opt's constructor throws.
  template <class L, class... Args>
    requires std::constructible_from<Opt, ParameterList<typename DataParallel<L>::Scalar>, Args...>
  explicit ZeroOptimizer(DataParallel<L>& dp, Args&&... opt_args)
      : ZeroOptimizer(dp.buckets(), std::forward<Args>(opt_args)...) {}

  /// As above, on the buckets of a replica directly.
  template <std::floating_point T, class... Args>
    requires std::constructible_from<Opt, ParameterList<T>, Args...>
  explicit ZeroOptimizer(GradBuckets<T>& buckets, Args&&... opt_args)
      : ZeroOptimizer(std::vector<GradBuckets<T>*>{&buckets}, std::forward<Args>(opt_args)...) {}

  /// As above, over several bucket sets of one dp communicator (a Hybrid's stages, each
  /// replicated over dp with its own buckets): one flat list of their buckets, in order.
  template <std::floating_point T, class... Args>
    requires std::constructible_from<Opt, ParameterList<T>, Args...>
  explicit ZeroOptimizer(const std::vector<GradBuckets<T>*>& sets, Args&&... opt_args)
      : state_(std::make_unique<State<T>>(sets, nullptr, ZeroStage::optimizer)),
        opt_(static_cast<State<T>&>(*state_).shard_list(), std::forward<Args>(opt_args)...) {}

  /// Shards the optimizer with parameter groups: `groups` hold the replica's parameters, each
  /// in exactly one group, with the group's options (Opt must take a vector of
  /// optim::ParamGroup, as optim::AdamW and optim::SGD do). Local. Throws tessera::Error as
  /// above, and naming the parameter that is in no group or in two.
  template <std::floating_point T, class Options>
  ZeroOptimizer(GradBuckets<T>& buckets, const std::vector<optim::ParamGroup<T, Options>>& groups)
      : ZeroOptimizer(std::vector<GradBuckets<T>*>{&buckets}, groups) {}
  /// As above, over several bucket sets of one dp communicator.
  template <std::floating_point T, class Options>
  ZeroOptimizer(const std::vector<GradBuckets<T>*>& sets, const std::vector<optim::ParamGroup<T, Options>>& groups)
      : ZeroOptimizer(ZeroStage::optimizer, sets, groups) {}
  /// As above at ZeRO stage `stage` (optimizer: ZeRO-1; gradients: ZeRO-2; parameters:
  /// ZeRO-3, see the class comment). Throws tessera::Error for ZeroStage::none, and as above.
  template <std::floating_point T, class Options>
  ZeroOptimizer(ZeroStage stage, const std::vector<GradBuckets<T>*>& sets,
                const std::vector<optim::ParamGroup<T, Options>>& groups)
      : state_(make_grouped_state(checked(stage), sets, groups)),
        opt_(static_cast<State<T>&>(*state_).shard_groups(groups)) {}
  /// ZeRO stage `stage` on a DataParallel's buckets, with parameter groups.
  template <class L, std::floating_point T, class Options>
  ZeroOptimizer(ZeroStage stage, DataParallel<L>& dp, const std::vector<optim::ParamGroup<T, Options>>& groups)
      : ZeroOptimizer(stage, std::vector<GradBuckets<T>*>{&dp.buckets()}, groups) {}
  /// ZeRO stage `stage` on one replica's buckets, with parameter groups.
  template <std::floating_point T, class Options>
  ZeroOptimizer(ZeroStage stage, GradBuckets<T>& buckets, const std::vector<optim::ParamGroup<T, Options>>& groups)
      : ZeroOptimizer(stage, std::vector<GradBuckets<T>*>{&buckets}, groups) {}
  /// ZeRO stage `stage` on bucket sets with one set of options for every parameter.
  template <std::floating_point T, class... Args>
    requires std::constructible_from<Opt, ParameterList<T>, Args...>
  ZeroOptimizer(ZeroStage stage, const std::vector<GradBuckets<T>*>& sets, Args&&... opt_args)
      : state_(std::make_unique<State<T>>(sets, nullptr, checked(stage))),
        opt_(static_cast<State<T>&>(*state_).shard_list(), std::forward<Args>(opt_args)...) {}
  /// As above, on a DataParallel's buckets.
  template <class L, std::floating_point T, class Options>
  ZeroOptimizer(DataParallel<L>& dp, const std::vector<optim::ParamGroup<T, Options>>& groups)
      : ZeroOptimizer(dp.buckets(), groups) {}

  /// One optimizer step on this rank's shards, then (ZeRO-1 and 2) an all-gather of the
  /// updated parameters. Collective over dp (one all_gather per bucket) at ZeRO-1 and 2; local
  /// at ZeRO-3 (the shards are the parameters). Throws what Opt and the communicator throw.
  void step() {
    state_->load_shards();
    opt_.step();
    state_mem_.set(opt_.state_bytes());
    state_->gather_parameters();
  }
  /// The ZeRO stage (optimizer, gradients or parameters).
  ZeroStage stage() const noexcept { return state_->stage(); }
  /// ZeRO-3: all-gathers every parameter's full value into the parameters (e.g. to save or
  /// load a checkpoint, or to evaluate outside the policy), until release_full_parameters().
  /// Nothing at ZeRO-1 and 2. Collective over dp.
  void gather_full_parameters() { state_->gather_full(); }
  /// ZeRO-3: frees the values gathered by gather_full_parameters(); with `store`, first copies
  /// this rank's block of them into its shards (after loading a checkpoint into them). Local.
  void release_full_parameters(bool store) { state_->release_full(store); }
  /// Sets every gradient to zero (the replica's buckets). Local.
  void zero_grad() { state_->zero_grad(); }

  /// The reduced gradients as clipping sees them (optim::clip_grad_norm): this rank's shards,
  /// each counted, summed over dp. Local. Throws tessera::Error when T is not the parameters'
  /// element type.
  template <std::floating_point T>
  optim::Gradients<T> gradients() const {
    auto* st = dynamic_cast<State<T>*>(state_.get());
    TESSERA_EXPECTS(st != nullptr, "ZeroOptimizer::gradients: the parameters are not of the element type asked for");
    optim::Gradients<T> g{{}, st->comm};
    for (std::size_t i = 0; i < st->shards.size(); ++i)
      g.pieces.push_back({st->shards[i].grad, true, st->owner[i].first, st->owner[i].second});
    return g;
  }

  /// Clips the reduced gradients (this rank's shards) to global L2 norm `max_norm` with
  /// optim::clip_grad_norm and returns the norm before clipping, the same on every rank.
  /// Collective over dp (one all-reduce). Throws tessera::Error for a negative max_norm.
  double clip_grad_norm(double max_norm) { return state_->clip_grad_norm(max_norm); }

  /// The runs of this rank's blocks that the inner optimizer updates, in its parameter order
  /// (inner parameter i is piece i): what a checkpoint of the inner state maps back onto
  /// named parameters.
  const std::vector<ZeroShardPiece>& shard_pieces() const noexcept { return state_->pieces(); }

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
    virtual const std::vector<ZeroShardPiece>& pieces() const = 0;
    virtual ZeroStage stage() const = 0;
    virtual void gather_full() = 0;
    virtual void release_full(bool store) = 0;
  };

  static ZeroStage checked(ZeroStage stage) {
    TESSERA_EXPECTS(stage == ZeroStage::optimizer || stage == ZeroStage::gradients || stage == ZeroStage::parameters,
                    "ZeroOptimizer: ZeRO stage ", static_cast<int>(stage),
                    " is not 1 (optimizer state), 2 (gradients too) or 3 (parameters too)");
    return stage;
  }

  template <std::floating_point T, class Options>
  static std::unique_ptr<StateBase> make_grouped_state(ZeroStage stage, const std::vector<GradBuckets<T>*>& sets,
                                                       const std::vector<optim::ParamGroup<T, Options>>& groups) {
    TESSERA_EXPECTS(!groups.empty(), "ZeroOptimizer: no parameter group");
    ParameterList<T> all;
    for (GradBuckets<T>* b : sets)
      for (const auto& slot : b->slots()) all.push_back(*slot.param);
    const std::vector<std::size_t> group = optim::group_of_each(all, groups, "ZeroOptimizer");
    std::map<const Parameter<T>*, std::size_t> of;
    for (std::size_t i = 0; i < all.size(); ++i) of[&all[i]] = group[i];
    return std::make_unique<State<T>>(sets, &of, stage);
  }

  // The shards of one element type: per piece (a parameter's part of this rank's block of a
  // bucket) a Parameter viewing its values and its reduced gradients.
  template <std::floating_point T>
  struct State final : StateBase {
    using Slot = typename GradBuckets<T>::Slot;
    struct Ref {
      GradBuckets<T>* set;  // the bucket's set
      std::size_t index;    // its index there
    };

    // `group_of`: each parameter's group (null: one group, one piece per bucket). ZeRO-2 and
    // 3: the buckets keep only this rank's shards of the reduced gradients; ZeRO-3: of the
    // parameter values too.
    State(const std::vector<GradBuckets<T>*>& bucket_sets, const std::map<const Parameter<T>*, std::size_t>* group_of,
          ZeroStage stage)
        : sets(bucket_sets), shard_grads(stage >= ZeroStage::gradients), shard_params(stage == ZeroStage::parameters) {
      TESSERA_EXPECTS(!sets.empty(), "ZeroOptimizer: no gradient buckets");
      comm = sets.front()->comm();
      for (GradBuckets<T>* b : sets) {
        TESSERA_EXPECTS(b->mode() == GradReduce::all_reduce, "ZeroOptimizer: the gradient buckets over ",
                        b->comm().name(), " already have a ZeroOptimizer; a second one would update every parameter "
                        "twice. Build one ZeroOptimizer per DataParallel (with parameter groups for different options)");
        TESSERA_EXPECTS(b->comm().size() == comm.size() && b->comm().rank() == comm.rank(), "ZeroOptimizer: bucket sets "
                        "over communicators of different sizes or ranks (", comm.name(), ", ", b->comm().name(), ")");
        for (std::size_t i = 0; i < b->buckets().size(); ++i) refs.push_back({b, i});
      }
      const int r = comm.rank();
      // One piece per parameter part inside this rank's block of a bucket: the inner optimizer
      // updates a view of the parameter's own values (no copy), from a view of the reduced
      // gradient block. The padding has no piece.
      std::vector<ZeroShardPiece> runs;
      std::vector<const Slot*> run_slot;
      for (std::size_t bi = 0; bi < refs.size(); ++bi) {
        const auto& bucket = this->bucket(bi);
        const std::int64_t n = shard_size(bi), lo = r * n, hi = lo + n;
        std::vector<std::size_t> order(bucket.slots.begin(), bucket.slots.end());
        std::sort(order.begin(), order.end(),
                  [&](std::size_t x, std::size_t y) { return slot(bi, x).offset < slot(bi, y).offset; });
        for (std::size_t i : order) {
          const Slot& s = slot(bi, i);
          TESSERA_EXPECTS(s.param->value.is_contiguous(), "ZeroOptimizer: parameter \"", s.param->name,
                          "\" of shape ", s.param->value.shape(), " is not contiguous");
          const std::int64_t a = std::max(lo, s.offset), e = std::min(hi, s.offset + s.numel);
          if (a >= e) continue;
          runs.push_back(ZeroShardPiece{bi, a, e, group_of ? group_of->at(s.param) : 0});
          run_slot.push_back(&s);
        }
      }
      for (GradBuckets<T>* b : sets) {
        b->set_mode(GradReduce::reduce_scatter);
        if (shard_grads) b->set_shard_grads(true);
        if (shard_params) b->set_shard_params(true);
        b->release_buffers();  // ZeRO-2 and 3: no full gradient until a backward allocates it (nothing otherwise)
      }
      // ZeRO-3: the sets are units in forward order (a Hybrid's stages on this rank); each
      // prefetches its neighbour's gather.
      if (shard_params)
        for (std::size_t i = 0; i < sets.size(); ++i)
          sets[i]->set_neighbours(i + 1 < sets.size() ? sets[i + 1] : nullptr, i > 0 ? sets[i - 1] : nullptr);
      // Pieces in group order (the inner optimizer's parameter order), in bucket order inside.
      std::size_t num_groups = 0;
      for (const ZeroShardPiece& p : runs) num_groups = std::max(num_groups, p.group + 1);
      for (std::size_t g = 0; g < num_groups; ++g)
        for (std::size_t k = 0; k < runs.size(); ++k) {
          const ZeroShardPiece& p = runs[k];
          if (p.group != g) continue;
          piece_list.push_back(p);
          const Slot& s = *run_slot[k];
          const std::int64_t lo = r * shard_size(p.bucket);
          // ZeRO-3: the value is this rank's block of the flat values, not the parameter's own.
          Tensor<T> value = shard_params ? value_shard(p.bucket).slice(0, p.begin - lo, p.end - lo)
                                         : s.param->value.reshape(Shape{s.numel}).slice(0, p.begin - s.offset, p.end - s.offset);
          owner.emplace_back(s.param->name, p.begin - s.offset);
          shards.emplace_back(detail::str("zero.bucket", p.bucket, ".shard", r, "[", p.begin, ":", p.end, "]"),
                              std::move(value), grad_shard(p.bucket).slice(0, p.begin - lo, p.end - lo), ParamLayout{});
        }
    }
    const typename GradBuckets<T>::Bucket& bucket(std::size_t bi) const { return refs[bi].set->buckets()[refs[bi].index]; }
    std::int64_t shard_size(std::size_t bi) const { return refs[bi].set->shard_size(refs[bi].index); }
    Tensor<T> grad_shard(std::size_t bi) const { return refs[bi].set->grad_shard(refs[bi].index); }
    Tensor<T> value_shard(std::size_t bi) const { return refs[bi].set->value_shard(refs[bi].index); }
    const Slot& slot(std::size_t bi, std::size_t i) const { return refs[bi].set->slots()[i]; }

    template <class Options>
    std::vector<optim::ParamGroup<T, Options>> shard_groups(const std::vector<optim::ParamGroup<T, Options>>& groups) {
      std::vector<optim::ParamGroup<T, Options>> out;
      for (const auto& g : groups) out.push_back({{}, g.options});
      for (std::size_t i = 0; i < shards.size(); ++i) out[piece_list[i].group].params.push_back(shards[i]);
      std::erase_if(out, [](const auto& g) { return g.params.empty(); });
      return out;
    }
    const std::vector<ZeroShardPiece>& pieces() const override { return piece_list; }
    ZeroStage stage() const override {
      return shard_params ? ZeroStage::parameters : shard_grads ? ZeroStage::gradients : ZeroStage::optimizer;
    }
    void gather_full() override {
      for (GradBuckets<T>* b : sets) b->gather_values(true, false);
    }
    void release_full(bool store) override {
      for (GradBuckets<T>* b : sets) {
        if (store && b->values_gathered()) b->store_values();
        b->release_values();
      }
    }
    ParameterList<T> shard_list() {
      ParameterList<T> list;
      for (Parameter<T>& p : shards) list.push_back(p);
      return list;
    }
    // The inner parameters are views of the model's own values: nothing to load.
    void load_shards() override {}
    // Each bucket's blocks all-gathered into a temporary full buffer (a communication
    // buffer), then copied into the replica's parameters; at most two buckets in flight, so
    // the buffers hold two buckets, not the model.
    void gather_parameters() override {
      const std::size_t w = static_cast<std::size_t>(comm.size());
      if (w == 1) return;  // the inner optimizer updated the parameters themselves
      if (shard_params) return;  // ZeRO-3: the shards are the parameters; gathered before use
      const std::int64_t r = comm.rank();
      std::vector<std::vector<std::size_t>> pieces_of(refs.size());
      for (std::size_t k = 0; k < piece_list.size(); ++k) pieces_of[piece_list[k].bucket].push_back(k);
      std::vector<Tensor<T>> gathered(refs.size());
      std::vector<Request> requests(refs.size());
      MemoryTracker::Entry gathered_mem(MemoryCategory::comm_buffers);
      std::size_t bytes = 0;
      std::exception_ptr error;
      // Waits for bucket bi's gather, copies it into the parameters, frees its buffer.
      auto complete = [&](std::size_t bi) {
        try {
          requests[bi].wait();
        } catch (...) {
          if (!error) error = std::current_exception();
        }
        if (!error)
          for (std::size_t i : bucket(bi).slots) {
            const Slot& s = slot(bi, i);
            std::copy_n(gathered[bi].data() + s.offset, s.numel, s.param->value.data());
          }
        bytes -= static_cast<std::size_t>(gathered[bi].numel()) * sizeof(T);
        gathered[bi] = Tensor<T>();
        gathered_mem.set(bytes);
      };
      for (std::size_t bi = 0; bi < refs.size(); ++bi) {
        const std::size_t n = static_cast<std::size_t>(shard_size(bi));
        if (!error) {
          gathered[bi] = Tensor<T>(Shape{static_cast<std::int64_t>(n * w)});
          bytes += n * w * sizeof(T);
          gathered_mem.set(bytes);
          T* full = gathered[bi].data();
          for (std::size_t k : pieces_of[bi])  // this rank's updated block
            std::copy_n(shards[k].value.data(), piece_list[k].end - piece_list[k].begin, full + piece_list[k].begin);
          // In place: this rank's block of the output is the input.
          try {
            requests[bi] = comm.iall_gather(std::span<const T>(full + static_cast<std::size_t>(r) * n, n),
                                            std::span<T>(full, n * w));
          } catch (...) {
            if (!error) error = std::current_exception();
          }
        }
        if (bi > 0) complete(bi - 1);
      }
      complete(refs.size() - 1);
      if (error) std::rethrow_exception(error);
    }
    // The buckets go back to all-reduce: with no sharded optimizer, every replica needs the
    // whole reduced gradient. ZeRO-3: the values are gathered back into the parameters
    // (collective over dp; skipped while an exception unwinds, when the other ranks may not
    // take part).
    ~State() override {
      for (GradBuckets<T>* b : sets) {
        try {
          b->set_neighbours(nullptr, nullptr);
          if (shard_params && std::uncaught_exceptions() == 0) b->set_shard_params(false);
          if (shard_grads && !b->shard_params()) b->set_shard_grads(false);
          b->set_mode(GradReduce::all_reduce);
        } catch (...) {  // destroyed inside a backward: the mode stays; nothing to report from here
        }
      }
    }
    State(const State&) = delete;
    State& operator=(const State&) = delete;
    void zero_grad() override {
      for (GradBuckets<T>* b : sets) b->zero_grad();
    }
    double clip_grad_norm(double max_norm) override {
      optim::Gradients<T> g{{}, comm};
      for (const Parameter<T>& p : shards) g.pieces.push_back({p.grad, true});
      return optim::clip_grad_norm(g, max_norm);
    }

    std::vector<GradBuckets<T>*> sets;
    std::vector<Ref> refs;              // every bucket of every set, in order
    Comm comm;
    std::vector<Parameter<T>> shards;   // per piece: this rank's value and grad runs
    std::vector<std::pair<std::string, std::int64_t>> owner;  // per piece: its parameter's name, first element there
    std::vector<ZeroShardPiece> piece_list;
    bool shard_grads = false;   // ZeRO-2 and 3
    bool shard_params = false;  // ZeRO-3
  };

  std::unique_ptr<StateBase> state_;
  Opt opt_;
  MemoryTracker::Entry state_mem_{MemoryCategory::optimizer_state, opt_.state_bytes()};
};

}  // namespace tessera
