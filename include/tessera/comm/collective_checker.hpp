#pragma once
/// @file
/// CollectiveChecker: a debug mode that finds ranks whose collectives are paired wrongly even
/// when the calls have the same signature. Ranks that issue a different number of calls of
/// one shape (a data-dependent loop through a tensor-parallel layer) are paired silently by
/// every backend and compute wrong values; the checker fingerprints each collective with the
/// communicator's sequence number, the call's signature and its call site (the line that
/// called Comm), compares the fingerprints of all ranks before the call runs, and reports the
/// first divergence on every rank, naming both call sites. PyTorch's
/// TORCH_DISTRIBUTED_DEBUG=DETAIL (ProcessGroupWrapper) does the same with an extra
/// collective per call.
///
/// On: `check_collectives(comm)`, or TESSERA_DEBUG_COLLECTIVES=detail in the environment
/// (threads::run and mpi::run then wrap the world; every communicator split from it is
/// checked too). Off, a collective costs one relaxed load of a flag more than it did before
/// (measured in bench/harden: docs/reliability.md).

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

namespace tessera {

/// A CommBackend that checks, before each collective, that every rank issues the same call
/// from the same call site: an all_gather of a fingerprint (sequence number, kind, element
/// type, count, op or root, a hash of the call site) on the wrapped communicator. A
/// divergence throws MismatchError on every rank with the same message: the collective's
/// sequence number, and the first rank that differs from rank 0 with both calls and both call
/// sites. Point-to-point calls pass through unchecked. Costs one all_gather (and a rendezvous)
/// per collective: for debugging, not for production runs.
class CollectiveChecker final : public CommBackend {
 public:
  /// Wraps `inner`; from now on Comm records call sites in this process.
  explicit CollectiveChecker(std::shared_ptr<CommBackend> inner) : inner_(std::move(inner)) {
    TESSERA_EXPECTS(inner_ != nullptr, "CollectiveChecker: the wrapped communicator handle is empty");
    detail::call_sites_wanted.store(true, std::memory_order_relaxed);
  }

  /// The wrapped backend.
  const std::shared_ptr<CommBackend>& inner() const noexcept { return inner_; }
  /// Collectives checked so far on this handle (the next one's sequence number).
  std::uint64_t sequence() const noexcept { return seq_; }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string name() const override { return inner_->name(); }
  void set_name(std::string n) override { inner_->set_name(std::move(n)); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  void set_timeout(std::chrono::milliseconds t) override { inner_->set_timeout(t); }

  Request all_reduce(void* d, std::size_t n, DType t, ReduceOp op, bool async) override {
    check_(Kind::all_reduce, t, n, static_cast<std::int64_t>(op));
    return inner_->all_reduce(d, n, t, op, async);
  }
  Request all_gather(const void* in, void* out, std::size_t n, DType t, bool async) override {
    check_(Kind::all_gather, t, n, 0);
    return inner_->all_gather(in, out, n, t, async);
  }
  Request reduce_scatter(const void* in, void* out, std::size_t n, DType t, ReduceOp op, bool async) override {
    check_(Kind::reduce_scatter, t, n, static_cast<std::int64_t>(op));
    return inner_->reduce_scatter(in, out, n, t, op, async);
  }
  void broadcast(void* d, std::size_t n, DType t, int root) override {
    check_(Kind::broadcast, t, n, root);
    inner_->broadcast(d, n, t, root);
  }
  Request send(const void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    return inner_->send(d, n, t, peer, tag, async);
  }
  Request recv(void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    return inner_->recv(d, n, t, peer, tag, async);
  }
  Request batch_p2p(std::span<const P2POp> ops) override { return inner_->batch_p2p(ops); }
  void barrier() override {
    check_(Kind::barrier, DType::i32, 0, 0);
    inner_->barrier();
  }
  std::shared_ptr<CommBackend> split(int color, int key) override {
    check_(Kind::split, DType::i32, 0, 0);
    return std::make_shared<CollectiveChecker>(inner_->split(color, key));
  }

 private:
  enum class Kind : std::int64_t { all_reduce = 1, all_gather, reduce_scatter, broadcast, barrier, split };
  static constexpr std::size_t fields_ = 6;      // seq, kind, dtype, count, op/root, site hash
  static constexpr std::size_t site_words_ = 24;  // a call site's text, 192 bytes

  static const char* kind_name_(std::int64_t k) {
    switch (static_cast<Kind>(k)) {
      case Kind::all_reduce: return "all_reduce";
      case Kind::all_gather: return "all_gather";
      case Kind::reduce_scatter: return "reduce_scatter";
      case Kind::broadcast: return "broadcast";
      case Kind::barrier: return "barrier";
      case Kind::split: return "split";
    }
    return "?";
  }
  // "all_reduce(float32, count=64, sum)" from a fingerprint.
  static std::string describe_(const std::int64_t* f) {
    const auto k = static_cast<Kind>(f[1]);
    if (k == Kind::barrier || k == Kind::split) return tessera::detail::str(kind_name_(f[1]), "()");
    std::string s = tessera::detail::str(kind_name_(f[1]), "(", name_of(static_cast<DType>(f[2])), ", count=", f[3]);
    if (k == Kind::all_reduce || k == Kind::reduce_scatter) s += tessera::detail::str(", ", name_of(static_cast<ReduceOp>(f[4])));
    if (k == Kind::broadcast) s += tessera::detail::str(", root=", f[4]);
    return s + ")";
  }
  // "parallel/tensor/row_parallel.hpp:88 (forward)", or "an unknown call site" when the call
  // did not come through Comm (a backend's own call, or a wrapper Comm does not see through).
  static std::string site_text_(const SourceLocation& loc) {
    if (loc.line == 0) return "an unknown call site";
    return tessera::detail::str(tessera::detail::where(loc), " (", loc.function, ")");
  }
  static std::int64_t hash_(std::string_view s) {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return static_cast<std::int64_t>(h >> 1);
  }

  // The fingerprint exchange: every rank's (seq, kind, dtype, count, op/root, site) through an
  // all_gather on the wrapped communicator, compared with rank 0's. Collective.
  void check_(Kind kind, DType t, std::size_t count, std::int64_t op_or_root) {
    const SourceLocation loc = detail::pending_call_site;
    detail::pending_call_site = SourceLocation{};
    const std::string site = site_text_(loc);
    const std::int64_t seq = static_cast<std::int64_t>(seq_++);
    const int n = inner_->size();
    if (n == 1) return;
    const std::int64_t mine[fields_] = {seq, static_cast<std::int64_t>(kind), static_cast<std::int64_t>(t),
                                        static_cast<std::int64_t>(count), op_or_root, hash_(site)};
    std::vector<std::int64_t> all(fields_ * static_cast<std::size_t>(n));
    inner_->all_gather(mine, all.data(), fields_, DType::i64, false).wait();
    int q = 1;
    // (A split's color and key may differ and are not in the fingerprint.)
    while (q < n && std::memcmp(all.data(), all.data() + fields_ * static_cast<std::size_t>(q), sizeof mine) == 0) ++q;
    if (q == n) return;
    // The call sites' text, to name both in the report (every rank takes this branch).
    std::vector<std::int64_t> text(site_words_, 0), texts(site_words_ * static_cast<std::size_t>(n));
    std::memcpy(text.data(), site.data(), std::min(site.size(), site_words_ * 8 - 1));
    inner_->all_gather(text.data(), texts.data(), site_words_, DType::i64, false).wait();
    auto site_of = [&](int r) {
      const char* p = reinterpret_cast<const char*>(texts.data() + site_words_ * static_cast<std::size_t>(r));
      return std::string(p, strnlen(p, site_words_ * 8));
    };
    const std::int64_t* f0 = all.data();
    const std::int64_t* fq = all.data() + fields_ * static_cast<std::size_t>(q);
    throw MismatchError(tessera::detail::str(
        "collective mismatch on ", inner_->name(), " at its collective #", f0[0] + 1, ": rank 0 called ", describe_(f0),
        " at ", site_of(0), " but rank ", q, " called ", describe_(fq), " at ", site_of(q),
        " (the ranks issued different sequences of collectives; found by CollectiveChecker)"));
  }

  std::shared_ptr<CommBackend> inner_;
  std::uint64_t seq_ = 0;
};

/// `comm` with every collective checked by a CollectiveChecker (see there): a mismatch of the
/// sequence of collectives, their signatures or their call sites throws MismatchError on every
/// rank. Local (the checks are collective).
inline Comm check_collectives(const Comm& comm) {
  return Comm(std::make_shared<CollectiveChecker>(comm.backend_ptr()));
}

/// Whether TESSERA_DEBUG_COLLECTIVES=detail asks for the CollectiveChecker on the world.
/// Throws Error for a value that is not a setting (collective_debug_from_environment).
inline bool collective_checks_from_environment() {
  return collective_debug_from_environment() == CollectiveDebug::detail;
}

}  // namespace tessera
