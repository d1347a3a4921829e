#pragma once
/// @file
/// GradBuckets: a data-parallel replica's gradients laid out in flat buckets, in reverse order
/// of use, and their reduction over the dp communicator, each bucket started (non-blocking) the
/// moment its last gradient is final during backward. PyTorch DDP's Reducer (Li et al.,
/// "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020) and
/// Megatron-LM's contiguous grad buffer with `overlap_grad_reduce`.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/memory_tracker.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/data/bucket_packing.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"  // issue 16: the bucket reduction hook

namespace tessera {

/// How GradBuckets reduces a bucket over the dp ranks.
enum class GradReduce {
  all_reduce,      ///< every rank gets the whole sum (plain data parallelism)
  reduce_scatter,  ///< rank r gets the sum of block r of the padded bucket (ZeRO-1 and 2, ZeroOptimizer)
};

/// Options of GradBuckets (DataParallelOptions carries the same fields).
struct GradBucketsOptions {
  /// Bytes of gradients per bucket (PyTorch DDP's `bucket_cap_mb` = 25 MiB). A bucket is closed
  /// once it holds at least this many bytes, so one larger parameter makes a bucket of its own;
  /// 0 puts every parameter in a bucket of its own (one all-reduce per parameter).
  std::size_t bucket_size = std::size_t{25} << 20;
  /// Bytes of the first bucket, the one holding the last layers' gradients, which are final
  /// first: small, so that its reduction starts early (DDP's 1 MiB first bucket).
  std::size_t first_bucket_size = std::size_t{1} << 20;
  /// Start each bucket's reduction from the grad-ready hooks while backward still runs; false:
  /// start every bucket when backward returns (for comparison).
  bool overlap_grad_reduce = true;
};

/// The gradient buckets of one replica, over the dp communicator `comm`.
///
/// Layout: the distinct parameters, in reverse order of `parameters()` (about the order in
/// which backward finishes them), are packed into buckets (see GradBucketsOptions). Each
/// bucket is one flat, zero-padded buffer of a multiple of comm.size() elements, and each
/// parameter's `grad` becomes a view into it (Megatron's `main_grad` buffer), so reducing a
/// bucket needs no copies. Handles to grad tensors taken before construction go stale.
/// Exceptions keep their own grad tensor: a parameter whose tensors another Parameter object
/// shares through Parameter::tied (tie_count() > 1) and one listed twice get a bucket of their
/// own whose buffer is that tensor (no copy) when its element count is a multiple of
/// comm.size(), else they are copied into their bucket when it is launched (and back after an
/// all-reduce); so is a parameter found in the first backward to have another, undeclared
/// sharer (its original grad tensor was written to).
///
/// Readiness: each parameter's grad-ready hook (Parameter::mark_grad_ready) counts marks. The
/// first backward learns how many marks each parameter gets per backward and reduces every
/// bucket when backward returns. From then on a bucket is launched as soon as every parameter
/// in it has got its learned number of marks, buckets strictly in index order (so every rank
/// issues the same collectives in the same order, whatever branches it took); a bucket
/// holding a parameter that got no mark so far, or a copied one, is launched when backward
/// returns. A parameter unused in a step contributes the zero (or accumulated) gradient it
/// holds (CASES C1). A mark on a parameter whose bucket has been launched in this backward
/// throws tessera::Error: the gradient changed while being reduced (a model whose use of a
/// parameter grows from step to step needs overlap_grad_reduce = false).
///
/// ZeRO-2 (set_shard_grads): each reduced block goes into a shard of its own, accumulated over
/// micro-batches and steps, and the buffers become communication buffers that
/// release_buffers() frees between backwards. The tied parameters' own grad tensors (and an
/// alias bucket's buffer, which is such a tensor) stay allocated.
///
/// Memory (MemoryTracker of the constructing thread): the distinct parameters' values as
/// parameters; the buffers as gradients (ZeRO-2: as communication buffers, the shards as
/// gradients).
///
/// Not copyable or movable: the hooks point at it (DataParallel holds it on the heap).
template <std::floating_point T>
class GradBuckets {
 public:
  /// Where one parameter's gradient lives.
  struct Slot {
    Parameter<T>* param = nullptr;  ///< the parameter, in the model
    std::size_t bucket = 0;         ///< index of its bucket
    std::int64_t offset = 0;        ///< first element in the bucket's buffer
    std::int64_t numel = 0;         ///< elements
    bool copy = false;              ///< grad kept in its own tensor, copied at launch
    int expected_marks = 0;         ///< marks per backward, learned (see the class comment)
    int marks = 0;                  ///< marks in the current backward
    Tensor<T> original;             ///< the grad tensor before construction, until checked
    Shape shape;                    ///< the value's shape (also while ZeRO-3 has freed it)
    bool pinned = false;            ///< ZeRO-3: keeps its own value tensor (a tied copy outside the list views it)
    std::vector<Parameter<T>*> aliases;  ///< other Parameter objects in the list viewing the same value
    std::vector<Parameter<T>*> outside;  ///< ZeRO-3: tied copies outside the list (set_tied_copies) pointed at its view
  };
  /// One flat bucket.
  struct Bucket {
    Tensor<T> buffer;                 ///< (padded) flat gradients
    std::int64_t numel = 0;           ///< elements in use (the rest is zero padding)
    std::vector<std::size_t> slots;   ///< its parameters, in bucket order
    std::size_t ready = 0;            ///< slots that got their expected marks in this backward
    bool early = false;               ///< may be launched from a hook
    bool alias = false;               ///< the buffer is the one (copied) parameter's own grad
    bool launched = false;            ///< reduction started in this backward / reduce()
    bool done = false;                ///< reduction complete
    bool accumulated = false;         ///< ZeRO-2: its block added into `shard` in this reduction
    Request request;                  ///< the non-blocking reduction
    Tensor<T> shard;                  ///< ZeRO-2 (shard_grads()): this rank's reduced block, accumulated
    Tensor<T> value_shard;            ///< ZeRO-3 (shard_params()): this rank's block of the flat values
    Tensor<T> gathered;               ///< ZeRO-3: the all-gathered flat values while gathered
    Request gather_request;           ///< ZeRO-3: the all-gather in flight into `gathered`
    bool gathering = false;           ///< ZeRO-3: gather_request not waited for yet
  };

  /// Lays out the buckets of `params` over `comm` and installs the grad-ready hooks; current
  /// gradient values are kept (copied into the buckets). Throws tessera::Error when a parameter
  /// already has a hook (another DataParallel wraps it). Local: no communication.
  GradBuckets(const ParameterList<T>& params, Comm comm, const GradBucketsOptions& options = {})
      : comm_(std::move(comm)), options_(options), world_(comm_.size()), rank_(comm_.rank()) {
    const std::vector<std::pair<Parameter<T>*, bool>> list = distinct(params);
    const std::vector<std::vector<Parameter<T>*>> aliases = aliases_of(params);
    for (const auto& [p, copy] : list)
      TESSERA_EXPECTS(!p->has_grad_ready_hook(), "DataParallel on ", comm_.name(), ": parameter \"", p->name,
                      "\" already has a grad-ready hook: it belongs to another DataParallel (wrap a model once)");
    // The packing (pack_buckets, shared with the planner's BucketLayout): reverse order of
    // parameters(), since the last layers' gradients are final first; a tied parameter with a
    // contiguous gradient and no padding needed is a bucket of its own whose buffer is that
    // gradient tensor (nothing copied).
    std::vector<std::int64_t> sizes;
    std::vector<bool> own;
    for (const auto& [p, copy] : list) {
      expect_same_shape("GradBuckets: value and grad", p->value, p->grad);
      sizes.push_back(p->value.numel());
      own.push_back(copy && p->grad.is_contiguous());
    }
    for (const PackedBucket& packed : pack_buckets(sizes, own, world_, options_.bucket_size,
                                                   options_.first_bucket_size, sizeof(T))) {
      Bucket b;
      b.alias = packed.alias;
      b.numel = packed.numel;
      for (std::size_t j = 0; j < packed.params.size(); ++j) {
        const std::size_t k = packed.params[j];
        Parameter<T>& p = *list[k].first;
        Slot s;
        s.param = &p;
        s.numel = sizes[k];
        s.shape = p.value.shape();
        s.aliases = aliases[k];
        s.copy = list[k].second;
        s.bucket = buckets_.size();
        s.offset = packed.offsets[j];
        b.slots.push_back(slots_.size());
        slots_.push_back(std::move(s));
      }
      b.buffer = packed.alias ? list[packed.params.front()].first->grad.reshape(Shape{packed.numel})
                              : Tensor<T>(Shape{packed.padded});
      buckets_.push_back(std::move(b));
    }
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (!s.copy) {
        Tensor<T> view = view_of(s);
        view.copy_from(s.param->grad);
        s.original = s.param->grad;
        s.original.zero();  // from now on, a write here means an undeclared sharer
        s.param->grad = std::move(view);
      }
      s.param->set_grad_ready_hook([this, i] { on_grad_ready(i); });
    }
    account_params();
    account();
  }
  GradBuckets(const GradBuckets&) = delete;             ///< not copyable: the hooks point here
  GradBuckets& operator=(const GradBuckets&) = delete;  ///< not copyable
  /// Removes the hooks; waits for reductions still in flight (after a failed backward).
  ~GradBuckets() {
    abort_backward();
    release_values();  // ZeRO-3: waits for a prefetch still in flight
    for (Slot& s : slots_)
      if (s.param) s.param->set_grad_ready_hook({});
  }

  /// Starts a backward pass: resets the marks. `sync`: reduce at its end (false inside
  /// no_sync: gradients only accumulate). Throws tessera::Error if a backward is already open.
  ///
  /// Under ZeRO-2 (shard_grads()) every backward syncs, whatever `sync` says: its gradient is
  /// reduce-scattered into this rank's shards, where micro-batches accumulate (DeepSpeed's
  /// ZeRO-2 reduces every micro-batch), so no rank keeps a full gradient between them.
  void begin_backward(bool sync) {
    TESSERA_EXPECTS(!in_backward_, "DataParallel on ", comm_.name(),
                    ": backward started while another backward of the same replica is still running");
    ensure_buffers();
    for (Slot& s : slots_) s.marks = 0;
    reset_launches();
    sync_ = sync || shard_grads_;
    early_launches_ = 0;
    in_backward_ = true;
  }

  /// Ends a backward pass: learns the marks (the first time: also checks for undeclared
  /// sharers), then, when syncing, launches every bucket not launched yet, in order, and waits
  /// for all. Collective over the dp communicator when syncing (one all-reduce or
  /// reduce-scatter per bucket, in bucket order). Throws what the communicator throws.
  void end_backward() {
    TESSERA_EXPECTS(in_backward_, "GradBuckets::end_backward without begin_backward");
    if (!learned_) check_originals();
    for (Slot& s : slots_) s.expected_marks = learned_ ? std::max(s.expected_marks, s.marks) : s.marks;
    learned_ = true;
    for (Bucket& b : buckets_) {
      b.early = true;
      for (std::size_t i : b.slots) b.early = b.early && !slots_[i].copy && slots_[i].expected_marks > 0;
    }
    if (sync_) {
      while (next_ < buckets_.size()) launch(next_++);
      finish();
    }
    in_backward_ = false;
  }

  /// Abandons a backward that threw: waits for the reductions already started (their errors
  /// are dropped; the caller is already failing), so no buffer is in use when it returns.
  void abort_backward() noexcept {
    for (Bucket& b : buckets_) {
      if (b.launched && !b.done) {
        try {
          b.request.wait();
        } catch (...) {  // the backward's own exception is the one that propagates
        }
        b.done = true;
      }
    }
    in_backward_ = false;
  }

  /// Reduces every bucket now, with what the gradients hold (zero on a rank that ran no
  /// backward in this step: a rank out of data joins with zero contribution). Collective over
  /// the dp communicator, matching the reductions other ranks run at the end of a syncing
  /// backward. Throws tessera::Error inside a backward, or what the communicator throws.
  void reduce() {
    TESSERA_EXPECTS(!in_backward_, "DataParallel on ", comm_.name(), ": reduce_grads called inside backward");
    ensure_buffers();
    reset_launches();
    while (next_ < buckets_.size()) launch(next_++);
    finish();
  }

  /// Sets every gradient to zero (one fill per bucket). Local.
  void zero_grad() {
    for (Bucket& b : buckets_) {
      b.buffer.zero();
      b.shard.zero();
    }
    for (Slot& s : slots_)
      if (s.copy && !buckets_[s.bucket].alias) s.param->grad.zero();
  }

  /// ZeRO-2 (Rajbhandari et al., SC 2020, P_os+g) on or off. On: each bucket's reduce-scatter
  /// (mode() must be reduce_scatter) is added, as soon as it completes, into a shard of
  /// shard_size(b) elements that this rank keeps (grad_shard(b)), and the bucket's buffer is
  /// zeroed for the next micro-batch; every backward syncs (see begin_backward), and
  /// release_buffers() may then free the buffers until the next backward. Off: the shards are
  /// dropped. The current gradients are dropped either way (call it before training or
  /// between steps). Throws tessera::Error inside a backward, or when turning it on under
  /// all-reduce. Local; every rank must choose the same.
  void set_shard_grads(bool on) {
    TESSERA_EXPECTS(!in_backward_, "GradBuckets::set_shard_grads inside backward");
    TESSERA_EXPECTS(!on || mode_ == GradReduce::reduce_scatter, "GradBuckets::set_shard_grads(true) on ", comm_.name(),
                    ": ZeRO-2 needs the reduce-scatter mode (a ZeroOptimizer sets it)");
    ensure_buffers();
    shard_grads_ = on;
    for (std::size_t bi = 0; bi < buckets_.size(); ++bi)
      buckets_[bi].shard = on ? Tensor<T>(Shape{shard_size(bi)}) : Tensor<T>();
    zero_grad();
    account();
  }
  /// Whether ZeRO-2 is on (set_shard_grads).
  bool shard_grads() const noexcept { return shard_grads_; }

  /// ZeRO-2: frees the bucket buffers, and with them every parameter's `grad` (which becomes
  /// an empty tensor) except tied ones that keep their own tensor, until the next backward or
  /// reduce() allocates them again (zeroed). After it no rank holds a full gradient; only the
  /// shards remain. Does nothing without ZeRO-2. Throws tessera::Error inside a backward. Local.
  void release_buffers() {
    TESSERA_EXPECTS(!in_backward_, "GradBuckets::release_buffers inside backward");
    if (!shard_grads_ || released_) return;
    for (Bucket& b : buckets_)
      if (!b.alias) b.buffer = Tensor<T>();
    for (Slot& s : slots_)
      if (!s.copy) s.param->grad = Tensor<T>();
    released_ = true;
    account();
  }
  /// Whether the buffers are released (release_buffers) now.
  bool released() const noexcept { return released_; }

  /// ZeRO-3 (Rajbhandari et al., SC 2020, P_os+g+p; PyTorch FSDP's FULL_SHARD) on or off.
  ///
  /// On (needs shard_grads()): each bucket's parameter values, in the flat padded layout of
  /// its gradients, are kept as this rank's block only (value_shard(b), shard_size(b)
  /// elements), copied from the current values; then every parameter's `value` (and that of
  /// each Parameter object listed with it: a tied LM head listed with its embedding) is freed
  /// (an empty tensor) until gather_values() points it at a gathered buffer. The buckets are
  /// then one unit of gathering (FSDP2's `fully_shard` on one module): a DataParallel or a
  /// DataParallelStage gathers its unit before each forward and backward and frees it after.
  /// A tied parameter with a Parameter::tied copy that is neither in the list nor registered
  /// with set_tied_copies (DataParallel and DataParallelStage register the GPT's LM-head copy)
  /// is *pinned*: it keeps its own full value tensor, which gathering writes into (gathered
  /// once per use, its gradient reduced once, its memory not saved). Local; every rank must
  /// choose the same.
  ///
  /// Off: gathers the values back into tensors of the parameters' own and drops the shards.
  /// Collective over the dp communicator (one all-gather per bucket).
  ///
  /// Throws tessera::Error inside a backward and when turning on without ZeRO-2.
  void set_shard_params(bool on) {
    TESSERA_EXPECTS(!in_backward_, "GradBuckets::set_shard_params inside backward");
    if (on == shard_params_) return;
    if (on) {
      TESSERA_EXPECTS(shard_grads_, "GradBuckets::set_shard_params(true) on ", comm_.name(),
                      ": ZeRO-3 needs ZeRO-2's gradient shards (set_shard_grads(true)) first");
      // A tied parameter with a copy outside the list (the GPT lists its embedding, not the
      // LM head's tied copy) keeps its own value tensor: the copy outside still views it.
      for (Slot& s : slots_) s.pinned = pinned(s);
      for (std::size_t bi = 0; bi < buckets_.size(); ++bi) {
        Bucket& b = buckets_[bi];
        const std::int64_t n = shard_size(bi), lo = rank_ * n, hi = lo + n;
        b.value_shard = Tensor<T>(Shape{n});
        b.value_shard.zero();
        for (std::size_t i : b.slots) {
          const Slot& s = slots_[i];
          const std::int64_t off = b.alias ? 0 : s.offset;
          const std::int64_t a = std::max(lo, off), e = std::min(hi, off + s.numel);
          if (a >= e) continue;
          const Tensor<T> v = s.param->value.contiguous();
          std::copy_n(v.data() + (a - off), e - a, b.value_shard.data() + (a - lo));
        }
      }
      shard_params_ = true;
      gathered_ = true;  // the parameters' own tensors: released below
      release_values();
    } else {
      gather_values(true, false);
      for (Slot& s : slots_) {
        if (s.pinned) continue;
        Tensor<T> own = s.param->value.contiguous().clone();
        s.param->value = own;
        for (Parameter<T>* a : s.aliases) a->value = own;
        for (Parameter<T>* a : s.outside) a->value = own;
      }
      for (Bucket& b : buckets_) {
        b.gathered = Tensor<T>();
        b.value_shard = Tensor<T>();
      }
      gathered_ = false;
      shard_params_ = false;
      set_gathered(0);
      account_params();
    }
  }
  /// Whether ZeRO-3 is on (set_shard_params).
  bool shard_params() const noexcept { return shard_params_; }
  /// ZeRO-3: this rank's block of bucket `b`'s flat parameter values (what the optimizer
  /// updates); an empty tensor without ZeRO-3.
  Tensor<T> value_shard(std::size_t b) const { return buckets_.at(b).value_shard; }

  /// ZeRO-3: all-gathers every bucket's values into a flat buffer per bucket (a communication
  /// buffer: MemoryTracker::comm_buffers, and gathered_bytes()) and points each parameter's
  /// `value` at its part. `prefetch`: every bucket's all-gather is started (non-blocking)
  /// before the first is waited for, so the later ones run while the earlier are unpacked;
  /// false: each is waited for before the next starts (for comparison). `backward_order`:
  /// buckets in bucket order (the order backward finishes them), else in reverse (the order
  /// forward uses them). Nothing without ZeRO-3 or when already gathered. Collective over the
  /// dp communicator (one all-gather per bucket). Throws what the communicator throws (the
  /// buffers are then freed again).
  void gather_values(bool prefetch, bool backward_order) {
    if (!shard_params_ || gathered_) return;
    if (in_flight_)
      ++prefetched_uses_;  // started by start_gather while the previous unit computed
    else
      issue_gathers(prefetch, backward_order);
    finish_gathers(backward_order);
  }
  /// ZeRO-3: starts every bucket's all-gather (non-blocking) without waiting: the prefetch of
  /// this unit while another computes; the next gather_values() (or release_values()) waits
  /// for them. Nothing without ZeRO-3, when gathered, or when already started. Collective over
  /// the dp communicator (one all-gather per bucket; every rank must start it at the same point
  /// of its sequence of collectives, as the policies do: after the same unit's gather).
  void start_gather(bool backward_order) {
    if (!shard_params_ || gathered_ || in_flight_) return;
    issue_gathers(true, backward_order);
  }
  /// ZeRO-3: links this unit to the units that run after it in forward order (`next`) and in
  /// backward order (`previous`) on this rank, for prefetch_neighbour (null: none). A
  /// ZeroOptimizer over several bucket sets links them in the order given. Local.
  void set_neighbours(GradBuckets* next, GradBuckets* previous) noexcept {
    next_unit_ = next;
    previous_unit_ = previous;
  }
  /// ZeRO-3, with prefetch(): starts the gather of the unit that runs next (forward: `next`;
  /// `backward`: `previous`, see set_neighbours), so that it travels while this unit computes.
  /// Call after this unit's gather_values. Collective over dp as start_gather.
  void prefetch_neighbour(bool backward) {
    GradBuckets* u = backward ? previous_unit_ : next_unit_;
    if (prefetch_ && shard_params_ && u != nullptr) u->start_gather(backward);
  }
  /// ZeRO-3: how many gather_values() found their gathers already started by a prefetch.
  std::size_t prefetched_uses() const noexcept { return prefetched_uses_; }
  /// ZeRO-3: whether the policies gather with prefetch (the argument they pass to
  /// gather_values; true unless set_prefetch(false)).
  bool prefetch() const noexcept { return prefetch_; }
  /// ZeRO-3: sets prefetch() (false: each bucket's all-gather waited for before the next
  /// starts, for comparison). Local; every rank must choose the same.
  void set_prefetch(bool on) noexcept { prefetch_ = on; }
  /// ZeRO-3: frees the gathered buffers; every parameter's `value` becomes an empty tensor.
  /// A prefetch still in flight is waited for and freed. Nothing without ZeRO-3 or when not
  /// gathered. Local.
  void release_values() {
    if (shard_params_ && in_flight_) {  // a prefetch never used: wait for it, then free it
      for (Bucket& b : buckets_) {
        try {
          wait_gather(b);
        } catch (...) {  // nothing uses these values
        }
      }
      in_flight_ = false;
      gather_error_ = nullptr;
      gathered_ = true;
    }
    if (!shard_params_ || !gathered_) return;
    for (Slot& s : slots_) {
      if (s.pinned) continue;
      s.param->value = Tensor<T>();
      for (Parameter<T>* a : s.aliases) a->value = Tensor<T>();
      for (Parameter<T>* a : s.outside) a->value = Tensor<T>();
    }
    for (Bucket& b : buckets_) b.gathered = Tensor<T>();
    gathered_ = false;
    set_gathered(0);
    account_params();
  }
  /// ZeRO-3: whether the values are gathered now (between gather_values and release_values).
  bool values_gathered() const noexcept { return shard_params_ && gathered_; }
  /// ZeRO-3: copies this rank's block of the parameters' current values (gathered, then
  /// changed, e.g. by a checkpoint load) into the value shards. Throws tessera::Error when the
  /// values are not gathered. Local.
  void store_values() {
    if (!shard_params_) return;
    TESSERA_EXPECTS(gathered_, "GradBuckets::store_values on ", comm_.name(), ": the values are not gathered");
    for (Slot& s : slots_)  // a pinned value may have been changed in its own tensor
      if (s.pinned) {
        const Bucket& b = buckets_[s.bucket];
        const std::int64_t off = b.alias ? 0 : s.offset;
        b.gathered.slice(0, off, off + s.numel).reshape(s.shape).copy_from(s.param->value);
      }
    for (std::size_t bi = 0; bi < buckets_.size(); ++bi) {
      const std::int64_t n = shard_size(bi);
      std::copy_n(buckets_[bi].gathered.data() + rank_ * n, n, buckets_[bi].value_shard.data());
    }
  }
  /// ZeRO-3: bytes of gathered parameter buffers alive now, and the most alive at once since
  /// construction (also counted in MemoryTracker::comm_buffers).
  std::size_t gathered_bytes() const noexcept { return static_cast<std::size_t>(gathered_mem_.bytes()); }
  /// ZeRO-3: the most gathered bytes alive at once (see gathered_bytes).
  std::size_t peak_gathered_bytes() const noexcept { return peak_gathered_; }
  /// ZeRO-3: bytes of gathered parameter buffers alive now on the calling rank (thread), over
  /// every GradBuckets (unit) it built: with per-layer units, what the units gathered at once
  /// hold (the current unit and a prefetched one). Local.
  static std::size_t rank_gathered_bytes() noexcept { return rank_gathered().live; }
  /// ZeRO-3: the most rank_gathered_bytes() alive at once since the rank's first unit was built
  /// or reset_rank_peak_gathered_bytes(). Local.
  static std::size_t rank_peak_gathered_bytes() noexcept { return rank_gathered().peak; }
  /// ZeRO-3: sets rank_peak_gathered_bytes() to the live figure (e.g. after setup). Local.
  static void reset_rank_peak_gathered_bytes() noexcept { rank_gathered().peak = rank_gathered().live; }
  /// ZeRO-3: the elements all-gathered over dp so far, counting each bucket's whole gathered
  /// buffer (shard_size x dp) once per gather (none at dp 1): for traffic counts.
  std::int64_t gathered_elements() const noexcept { return gathered_elements_; }

  /// Chooses all-reduce (the default) or reduce-scatter (ZeRO-1) for later reductions. Throws
  /// tessera::Error inside a backward. Local; every rank must choose the same.
  void set_mode(GradReduce mode) {
    TESSERA_EXPECTS(!in_backward_, "GradBuckets::set_mode inside backward");
    mode_ = mode;
  }
  /// The reduction in use.
  GradReduce mode() const noexcept { return mode_; }

  /// ZeRO-3: registers `copies`, Parameter::tied copies of listed parameters that the list
  /// leaves out (the GPT lists wte.weight, not its LM head's copy; SequentialModel::tied_copies),
  /// matched by name to a listed parameter with tie_count() > 1. Gathering then points their
  /// `value` at the gathered view too and releasing frees it, so the tie is not *pinned* (see
  /// set_shard_params): sharded like the rest, gathered once per use, its gradient (the shared
  /// grad tensor) reduced once. Replaces the copies registered before (call again after the
  /// model moved). Local. Throws tessera::Error inside a backward, for a copy that matches no
  /// listed tied parameter (naming it), and under ZeRO-3 when it would change which slots are
  /// pinned (register the copies before set_shard_params(true)).
  void set_tied_copies(const ParameterList<T>& copies) {
    TESSERA_EXPECTS(!in_backward_, "GradBuckets::set_tied_copies inside backward");
    std::vector<std::vector<Parameter<T>*>> outside(slots_.size());
    for (Parameter<T>& c : copies) {
      std::size_t found = slots_.size();
      for (std::size_t i = 0; i < slots_.size(); ++i)
        if (slots_[i].param != &c && slots_[i].param->name == c.name && slots_[i].param->tie_count() > 1) found = i;
      TESSERA_EXPECTS(found < slots_.size(), "GradBuckets::set_tied_copies on ", comm_.name(), ": \"", c.name,
                      "\" is not a tied parameter of the list (", slots_.size(), " parameters)");
      outside[found].push_back(&c);
    }
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      std::swap(s.outside, outside[i]);
      if (!shard_params_) continue;
      TESSERA_EXPECTS(pinned(s) == s.pinned, "GradBuckets::set_tied_copies on ", comm_.name(), ": \"", s.param->name,
                      "\" is already sharded with ", outside[i].size(), " copies outside the list, now ",
                      s.outside.size(), " (register them before set_shard_params(true))");
      if (!s.pinned)
        for (Parameter<T>* a : s.outside) a->value = s.param->value;
    }
  }

  /// Points the slots at `params`, the same parameter list after the model moved (DataParallel's
  /// move constructor). Throws tessera::Error when the list has another number of distinct
  /// parameters.
  void rebind(const ParameterList<T>& params) {
    const std::vector<std::pair<Parameter<T>*, bool>> list = distinct(params);
    TESSERA_EXPECTS(list.size() == slots_.size(), "GradBuckets::rebind: ", list.size(), " parameters, expected ",
                    slots_.size());
    const std::vector<std::vector<Parameter<T>*>> aliases = aliases_of(params);
    for (std::size_t k = 0; k < list.size(); ++k) {
      slots_[list.size() - 1 - k].param = list[k].first;
      slots_[list.size() - 1 - k].aliases = aliases[k];
    }
  }

  /// The buckets, in launch order.
  const std::vector<Bucket>& buckets() const noexcept { return buckets_; }
  /// The slots (one per distinct parameter, in reverse parameter order).
  const std::vector<Slot>& slots() const noexcept { return slots_; }
  /// Elements of each rank's block of bucket `b` under reduce-scatter (padded / world).
  std::int64_t shard_size(std::size_t b) const { return padded(buckets_.at(b)) / world_; }
  /// This rank's block of bucket `b`: after a reduce-scatter, the sum over ranks of that part of
  /// the gradients. A view of the bucket's buffer; under ZeRO-2 (shard_grads()) the shard that
  /// accumulates it over micro-batches and steps.
  Tensor<T> grad_shard(std::size_t b) const {
    if (shard_grads_) return buckets_.at(b).shard;
    const std::int64_t n = shard_size(b);
    return buckets_.at(b).buffer.slice(0, rank_ * n, (rank_ + 1) * n);
  }
  /// The dp communicator.
  Comm& comm() noexcept { return comm_; }
  /// The options.
  const GradBucketsOptions& options() const noexcept { return options_; }
  /// Buckets launched from grad-ready hooks (overlapped with backward) in the last backward.
  std::size_t early_launches() const noexcept { return early_launches_; }
  /// Buckets launched so far in the current (or last) backward or reduce().
  std::size_t launched() const noexcept { return next_; }
  /// Whether the first backward has run (marks learned, sharers checked).
  bool learned() const noexcept { return learned_; }

  /// Allocates the buffers that release_buffers freed (zeroed) and points the parameters'
  /// grads at them again; nothing when they are allocated. backward and reduce() call it; a
  /// policy whose backward does not (DataParallelStage) calls it before the model's backward.
  /// Local.
  void ensure_buffers() {
    if (!released_) return;
    for (Bucket& b : buckets_)
      if (!b.alias) b.buffer = Tensor<T>(Shape{padded(b)});
    for (Slot& s : slots_)
      if (!s.copy) s.param->grad = view_of(s);
    released_ = false;
    account();
  }

 private:
  // Elements of bucket b's buffer, padded to a multiple of world_ (also while released).
  std::int64_t padded(const Bucket& b) const {
    if (b.alias) return b.numel;
    const std::int64_t w = world_;
    return (b.numel + w - 1) / w * w;
  }

  // ZeRO-3: whether slot s keeps its own value tensor: a tied copy of it neither in the list
  // nor registered by set_tied_copies still views that tensor.
  static bool pinned(const Slot& s) {
    return s.param->tie_count() > 1 + static_cast<long>(s.aliases.size() + s.outside.size());
  }

  // The distinct parameters of `params` (a tensor listed twice counts once) with whether each
  // must be copied rather than viewed (tied, or listed twice). Empty parameters are skipped.
  static std::vector<std::pair<Parameter<T>*, bool>> distinct(const ParameterList<T>& params) {
    std::vector<std::pair<Parameter<T>*, bool>> out;
    std::unordered_map<const T*, std::size_t> first;
    for (Parameter<T>& p : params) {
      if (p.value.numel() == 0) continue;
      auto [it, fresh] = first.emplace(p.value.data(), out.size());
      if (!fresh) {
        out[it->second].second = true;
        continue;
      }
      out.emplace_back(&p, p.tie_count() > 1);
    }
    return out;
  }
  // For each distinct parameter of `params` (distinct's order), the other Parameter objects of
  // the list that view the same value (a tied LM head listed with its embedding).
  static std::vector<std::vector<Parameter<T>*>> aliases_of(const ParameterList<T>& params) {
    std::vector<std::vector<Parameter<T>*>> out;
    std::unordered_map<const T*, std::size_t> first;
    for (Parameter<T>& p : params) {
      if (p.value.numel() == 0) continue;
      auto [it, fresh] = first.emplace(p.value.data(), out.size());
      if (fresh)
        out.emplace_back();
      else
        out[it->second].push_back(&p);
    }
    return out;
  }

  // ZeRO-3: allocates every bucket's gathered buffer and starts its all-gather (waiting for
  // each before the next unless `prefetch`); errors are kept for finish_gathers.
  void issue_gathers(bool prefetch, bool backward_order) {
    const std::size_t nb = buckets_.size();
    std::size_t bytes = 0;
    in_flight_ = true;
    for (std::size_t k = 0; k < nb; ++k) {
      const std::size_t bi = backward_order ? k : nb - 1 - k;
      Bucket& b = buckets_[bi];
      const std::int64_t n = shard_size(bi);
      b.gathered = Tensor<T>(Shape{n * world_});
      bytes += static_cast<std::size_t>(n * world_) * sizeof(T);
      set_gathered(bytes);
      peak_gathered_ = std::max(peak_gathered_, bytes);
      T* full = b.gathered.data();
      std::copy_n(b.value_shard.data(), n, full + rank_ * n);
      if (world_ > 1 && !gather_error_) {
        try {
          b.gather_request = comm_.iall_gather(std::span<const T>(full + rank_ * n, static_cast<std::size_t>(n)),
                                               std::span<T>(full, static_cast<std::size_t>(n * world_)));
          b.gathering = true;
          gathered_elements_ += n * world_;
          if (!prefetch) wait_gather(b);
        } catch (...) {
          if (!gather_error_) gather_error_ = std::current_exception();
        }
      }
    }
  }
  // ZeRO-3: waits for the gathers issue_gathers started and points the values at them.
  void finish_gathers(bool backward_order) {
    const std::size_t nb = buckets_.size();
    for (std::size_t k = 0; k < nb; ++k) {
      Bucket& b = buckets_[backward_order ? k : nb - 1 - k];
      try {
        wait_gather(b);
      } catch (...) {
        if (!gather_error_) gather_error_ = std::current_exception();
      }
    }
    in_flight_ = false;
    gathered_ = true;
    if (gather_error_) {
      std::exception_ptr error = std::exchange(gather_error_, nullptr);
      release_values();
      std::rethrow_exception(error);
    }
    for (Slot& s : slots_) {
      const Bucket& b = buckets_[s.bucket];
      const std::int64_t off = b.alias ? 0 : s.offset;
      Tensor<T> view = b.gathered.slice(0, off, off + s.numel).reshape(s.shape);
      if (s.pinned) {  // into its own tensor, which the tied copy outside the list views
        s.param->value.copy_from(view);
        continue;
      }
      s.param->value = view;
      for (Parameter<T>* a : s.aliases) a->value = view;
      for (Parameter<T>* a : s.outside) a->value = view;
    }
  }

  // The calling rank's gathered bytes over all its units (per thread, as MemoryTracker).
  struct RankGathered {
    std::size_t live = 0, peak = 0;
  };
  static RankGathered& rank_gathered() noexcept {
    thread_local RankGathered g;
    return g;
  }
  // ZeRO-3: this unit's gathered bytes (the tracker, gathered_bytes(), the rank's figure).
  void set_gathered(std::size_t bytes) noexcept {
    RankGathered& g = rank_gathered();
    g.live = g.live + bytes - gathered_mem_.bytes();
    g.peak = std::max(g.peak, g.live);
    gathered_mem_.set(bytes);
  }

  // The parameters' figure: their values, or under ZeRO-3 the value shards (the gathered
  // buffers are communication buffers).
  void account_params() {
    std::size_t bytes = 0;
    if (shard_params_) {
      for (const Bucket& b : buckets_) bytes += static_cast<std::size_t>(b.value_shard.numel()) * sizeof(T);
      for (const Slot& s : slots_)
        if (s.pinned) bytes += static_cast<std::size_t>(s.numel) * sizeof(T);
    } else
      for (const Slot& s : slots_) bytes += static_cast<std::size_t>(s.numel) * sizeof(T);
    params_mem_.set(bytes);
  }
  // Waits for bucket b's all-gather, if in flight.
  static void wait_gather(Bucket& b) {
    if (!b.gathering) return;
    b.gathering = false;
    b.gather_request.wait();
  }

  // The tracker's figures: parameters (account_params), the buffers (gradients; under ZeRO-2
  // communication buffers) and the shards (ZeRO-2's gradients). Tied parameters' own grad
  // tensors count as gradients.
  void account() {
    std::size_t buffers = 0, shards = 0, own = 0;
    for (const Bucket& b : buckets_) {
      buffers += static_cast<std::size_t>(b.buffer.numel()) * sizeof(T);
      shards += static_cast<std::size_t>(b.shard.numel()) * sizeof(T);
    }
    for (const Slot& s : slots_)
      if (s.copy && !buckets_[s.bucket].alias) own += static_cast<std::size_t>(s.param->grad.numel()) * sizeof(T);
    grads_mem_.set(shards + own + (shard_grads_ ? 0 : buffers));
    buffers_mem_.set(shard_grads_ ? buffers : 0);
  }

  // ZeRO-2: adds this rank's reduced block of bucket bi into its shard and zeroes the buffer
  // for the next micro-batch (its parameters are final for this backward).
  void accumulate(std::size_t bi) {
    Bucket& b = buckets_[bi];
    if (!shard_grads_ || b.accumulated) return;
    const std::int64_t n = shard_size(bi);
    b.shard.add_(b.buffer.slice(0, rank_ * n, (rank_ + 1) * n));
    b.buffer.zero();
    b.accumulated = true;
  }

  Tensor<T> view_of(const Slot& s) const {
    return buckets_[s.bucket].buffer.slice(0, s.offset, s.offset + s.numel).reshape(s.shape);
  }

  void reset_launches() {
    for (Bucket& b : buckets_) {
      b.ready = 0;
      b.launched = false;
      b.done = false;
      b.accumulated = false;
    }
    next_ = 0;
    polled_ = 0;
  }

  // The hook of slot i (runs inside the layer's backward, on the caller's thread).
  void on_grad_ready(std::size_t i) {
    if (!in_backward_) return;  // a backward of the bare model, outside DataParallel
    Slot& s = slots_[i];
    ++s.marks;
    if (s.copy) return;
    Bucket& b = buckets_[s.bucket];
    TESSERA_EXPECTS(!b.launched, "DataParallel on ", comm_.name(), ": parameter \"", s.param->name,
                    "\" was marked ready ", s.marks, " times in this backward, more than the ", s.expected_marks,
                    " learned so far, after its bucket's reduction had started: its gradient changed while being "
                    "reduced. A model whose use of a parameter grows from step to step needs "
                    "overlap_grad_reduce = false");
    if (!sync_ || !options_.overlap_grad_reduce || !learned_) return;
    if (s.marks == s.expected_marks) ++b.ready;
    while (next_ < buckets_.size() && buckets_[next_].early && buckets_[next_].ready == buckets_[next_].slots.size()) {
      launch(next_++);
      ++early_launches_;
    }
    // Drive progress of what is in flight (MPI progresses non-blocking collectives in calls).
    while (polled_ < next_ && (buckets_[polled_].done || buckets_[polled_].request.test())) {
      buckets_[polled_].done = true;
      accumulate(polled_);
      ++polled_;
    }
  }

  // ---- issue 16: communication hook (parallel/data/compression) -------------------------------
 public:
  /// Installs `hook` to reduce every bucket from now on, in place of the all-reduce (or
  /// reduce-scatter: the hook leaves the whole reduced bucket, so this rank's block holds what a
  /// reduce-scatter would give); nullptr restores the built-in reduction. The hook runs blocking
  /// where the bucket's reduction would start (PyTorch DDP's register_comm_hook). Throws
  /// tessera::Error inside a backward. Local; every rank installs a hook of the same kind.
  void set_comm_hook(std::shared_ptr<CommHook<T>> hook) {
    TESSERA_EXPECTS(!in_backward_, "GradBuckets::set_comm_hook inside backward");
    comm_hook_ = std::move(hook);
  }
  /// The installed hook (nullptr: the built-in all-reduce / reduce-scatter).
  const std::shared_ptr<CommHook<T>>& comm_hook() const noexcept { return comm_hook_; }

 private:
  std::shared_ptr<CommHook<T>> comm_hook_;
  // Runs the hook on bucket `b` (index bi): its elements in use and its parameters' places.
  void reduce_with_hook(std::size_t bi, Bucket& b) {
    GradBucketView<T> view{.index = bi, .grad = std::span<T>(b.buffer.data(), static_cast<std::size_t>(b.numel)), .tensors = {}};
    for (std::size_t i : b.slots)
      view.tensors.push_back(GradBucketTensor{.offset = b.alias ? 0 : slots_[i].offset, .shape = slots_[i].shape});
    comm_hook_->reduce(view, comm_);
    b.request = Request();  // complete
  }
  // ---- end of issue 16 ----------------------------------------------------------------------------

  void launch(std::size_t bi) {
    Bucket& b = buckets_[bi];
    for (std::size_t i : b.slots) {
      if (!slots_[i].copy || b.alias) continue;
      view_of(slots_[i]).copy_from(slots_[i].param->grad);
      // ZeRO-2: what was copied goes to the shard; the next micro-batch starts from zero.
      if (shard_grads_) slots_[i].param->grad.zero();
    }
    b.launched = true;
    if (world_ == 1) {
      b.done = true;
      return;
    }
    if (comm_hook_) return reduce_with_hook(bi, b);  // issue 16: the communication hook
    T* data = b.buffer.data();
    if (mode_ == GradReduce::all_reduce) {
      b.request = comm_.iall_reduce(std::span<T>(data, static_cast<std::size_t>(b.numel)), ReduceOp::sum);
    } else {
      // In place: this rank's block of the bucket receives its reduced block.
      const std::size_t n = static_cast<std::size_t>(b.buffer.numel() / world_);
      b.request = comm_.ireduce_scatter(std::span<const T>(data, n * static_cast<std::size_t>(world_)),
                                        std::span<T>(data + n * static_cast<std::size_t>(rank_), n), ReduceOp::sum);
    }
  }

  // Waits for every launched bucket (all of them, even after a failure), then copies the
  // reduced gradients of copied parameters back (all-reduce only).
  void finish() {
    std::exception_ptr error;
    for (Bucket& b : buckets_) {
      if (!b.launched || b.done) continue;
      try {
        b.request.wait();
      } catch (...) {
        if (!error) error = std::current_exception();
      }
      b.done = true;
    }
    if (error) std::rethrow_exception(error);
    for (std::size_t bi = 0; bi < buckets_.size(); ++bi)
      if (buckets_[bi].launched) accumulate(bi);
    if (mode_ == GradReduce::all_reduce)
      for (Slot& s : slots_)
        if (s.copy && !buckets_[s.bucket].alias) s.param->grad.copy_from(view_of(s));
  }

  // After the first backward: a view slot whose original grad tensor was written has another,
  // undeclared sharer (a Parameter built from its tensors without Parameter::tied). It goes
  // back to its own tensor, holding both parts of its gradient, and is copied from now on.
  void check_originals() {
    for (Slot& s : slots_) {
      if (s.copy || s.original.numel() == 0) continue;
      bool written = false;
      detail::for_each_element("GradBuckets", [&written](const T& x) { written = written || x != T{0}; }, s.original);
      if (written) {
        Tensor<T> view = s.param->grad;
        s.original.add_(view);
        view.zero();
        s.param->grad = s.original;
        s.copy = true;
      }
      s.original = Tensor<T>();
    }
  }

  Comm comm_;
  GradBucketsOptions options_;
  int world_;
  int rank_;
  GradReduce mode_ = GradReduce::all_reduce;
  std::vector<Slot> slots_;
  std::vector<Bucket> buckets_;
  std::size_t next_ = 0;    // next bucket to launch
  std::size_t polled_ = 0;  // first bucket not known complete
  std::size_t early_launches_ = 0;
  bool in_backward_ = false;
  bool sync_ = true;
  bool learned_ = false;
  bool shard_grads_ = false;  // ZeRO-2
  bool released_ = false;     // the buffers are freed (release_buffers)
  bool shard_params_ = false; // ZeRO-3
  bool gathered_ = false;     // ZeRO-3: the values are gathered
  bool prefetch_ = true;      // ZeRO-3: gather with prefetch
  bool in_flight_ = false;    // ZeRO-3: gathers started (issue_gathers), not finished
  std::exception_ptr gather_error_;
  GradBuckets* next_unit_ = nullptr;      // ZeRO-3: the unit after this one in forward order
  GradBuckets* previous_unit_ = nullptr;  // and in backward order
  std::size_t prefetched_uses_ = 0;
  std::size_t peak_gathered_ = 0;
  std::int64_t gathered_elements_ = 0;  // ZeRO-3: see gathered_elements()
  MemoryTracker::Entry gathered_mem_{MemoryCategory::comm_buffers};
  MemoryTracker::Entry params_mem_{MemoryCategory::parameters};
  MemoryTracker::Entry grads_mem_{MemoryCategory::gradients};
  MemoryTracker::Entry buffers_mem_{MemoryCategory::comm_buffers};
};

}  // namespace tessera
