#pragma once
/// @file
/// AllocationCounter: the bytes of tensor storage allocated while the counter was a thread's
/// current one and not yet freed, wherever and whenever the storage is freed. The pipeline
/// executor gives each micro-batch's forward one, so that it knows how many bytes the
/// micro-batch's saved tensors (its contexts, what backward needs) still hold at any moment,
/// and feeds that to the MemoryTracker's `activations` category.

#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

namespace tessera {

/// Live bytes of the tensor storage allocated under it (see AllocationCounter::Scope). A
/// storage counted here stays counted until it is freed, on any thread (the count is atomic),
/// also after the scope has ended: views, copies of the handle and contexts keep it alive.
/// Tensor's allocation calls add() and its deleter remove() (holding the counter alive through
/// shared_from_this()); nothing else needs to. A counter is owned by a std::shared_ptr.
class AllocationCounter : public std::enable_shared_from_this<AllocationCounter> {
 public:
  /// While alive, tensor storage allocated on this thread is counted in `counter` (which may be
  /// null: nothing is counted), which the scope keeps alive. Scopes nest; the previous counter
  /// is restored on destruction.
  class Scope {
   public:
    /// Makes `counter` this thread's current counter.
    explicit Scope(std::shared_ptr<AllocationCounter> counter) noexcept
        : counter_(std::move(counter)), previous_(slot()) {
      slot() = counter_.get();
    }
    /// Restores the previous counter.
    ~Scope() { slot() = previous_; }
    Scope(const Scope&) = delete;             ///< not copyable
    Scope& operator=(const Scope&) = delete;  ///< not copyable

   private:
    std::shared_ptr<AllocationCounter> counter_;
    AllocationCounter* previous_;
  };

  /// This thread's current counter (null outside every Scope).
  static AllocationCounter* current() noexcept { return slot(); }

  /// Live bytes counted now.
  std::int64_t bytes() const noexcept { return bytes_.load(std::memory_order_relaxed); }
  /// Counts `n` more bytes (an allocation).
  void add(std::int64_t n) noexcept { bytes_.fetch_add(n, std::memory_order_relaxed); }
  /// Counts `n` bytes fewer (a free).
  void remove(std::int64_t n) noexcept { bytes_.fetch_sub(n, std::memory_order_relaxed); }

 private:
  // A plain pointer: trivially destructible, so valid during thread exit too.
  static AllocationCounter*& slot() noexcept {
    thread_local AllocationCounter* current = nullptr;
    return current;
  }
  std::atomic<std::int64_t> bytes_{0};
};

}  // namespace tessera
