#pragma once
/// @file
/// TopKHook: top-k sparsification with error feedback (Lin et al., "Deep Gradient Compression",
/// ICLR 2018): each rank sends only the k largest-magnitude entries of its accumulated gradient
/// as (index, value) pairs by all-gather and keeps the rest as a residual for the next step. An
/// optional dense warm-up (as PowerSGD's start_powerSGD_iter) all-reduces each bucket's first N
/// reductions; an optional momentum is DGC's momentum correction (the velocity, not the
/// gradient, is accumulated and sparsified); an optional sparsity warm-up is DGC's exponentially
/// rising sparsity over the first compressed reductions.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"

namespace tessera {

/// Top-k with error feedback, per bucket. For a bucket of n elements, k = max(1, ceil(f n))
/// (the same on every rank). Per step:
/// 1. M = G + E (E: this rank's residual, 0 at first);
/// 2. the k entries of largest |M| are selected (ties: the lower index; a strict order, so the
///    choice is deterministic);
/// 3. their indices (int32) and values are all-gathered (two all-gathers of k elements);
/// 4. the bucket becomes the scatter-add of every rank's pairs, ranks in order (identical
///    bitwise on every rank);
/// 5. E = M with the selected entries set to 0.
/// So (what was applied) + (sum over ranks of E) = the sum over steps and ranks of G, to
/// round-off. Bytes per rank: (p - 1) k (4 + sizeof(T)) instead of 2 (p - 1) / p n sizeof(T).
/// With `warmup_steps` = N > 0, each bucket's first N reductions are the plain fp32 all-reduce
/// (no residual); compression then starts with E = 0.
///
/// With `momentum` = m > 0 (DGC's momentum correction and momentum factor masking, section 3.2
/// and Algorithm 1 of Lin et al.): each rank keeps a velocity U per bucket, U = m U + G, and
/// step 1 takes M = E + U instead; after step 5 the selected entries of U are set to 0 as well.
/// The bucket then holds the sum of the ranks' sparse velocities, so the optimizer that applies
/// it must not add momentum of its own (plain SGD: p -= lr * bucket). Warm-up reductions
/// all-reduce U (no masking), which is momentum SGD on the summed gradient (when the bucket is
/// applied unscaled: clipping the reduced bucket, as train_gpt's --clip does, clips the summed
/// velocities, where DGC clips each rank's gradient before accumulating). At fraction 1 the
/// masking resets U every step, so the step is plain SGD (as DGC's algorithm).
///
/// With `sparsity_warmup_steps` = S > 0 (DGC's warm-up training, section 3.4 of Lin et al.:
/// sparsity 75%, 93.75%, 98.4375%, 99.6% over the warm-up, then the final value), the c-th
/// compressed reduction of a bucket (c = 0, 1, ...; counted after any dense warm-up) sends the
/// fraction d_c = max(fraction, 4^-(s + 1)) with s = floor(4 c / S) while c < S, and `fraction`
/// from c = S on: four stages, each sending a quarter of the one before, never less than
/// `fraction` (equal stages when S is a multiple of 4; with S < 4 some stages are skipped).
/// k is then max(1, ceil(d_c n)), the same on every rank (every rank counts the same
/// reductions, a non-finite one included).
template <std::floating_point T>
class TopKHook final : public CommHook<T> {
 public:
  /// A hook sending the fraction `fraction` of each bucket's entries, after `warmup_steps`
  /// plain all-reduces of each bucket, with DGC's momentum correction when `momentum` > 0 and
  /// DGC's sparsity warm-up over `sparsity_warmup_steps` compressed reductions when > 0.
  /// Throws tessera::Error naming the value unless 0 < fraction <= 1, warmup_steps >= 0,
  /// 0 <= momentum < 1 and sparsity_warmup_steps >= 0.
  explicit TopKHook(double fraction, std::int64_t warmup_steps = 0, double momentum = 0,
                    std::int64_t sparsity_warmup_steps = 0)
      : fraction_(fraction), warmup_(warmup_steps), momentum_(momentum), sparsity_warmup_(sparsity_warmup_steps) {
    TESSERA_EXPECTS(fraction > 0 && fraction <= 1, "TopKHook: fraction ", fraction, " must be in (0, 1]");
    TESSERA_EXPECTS(warmup_steps >= 0, "TopKHook: warmup_steps ", warmup_steps, " must be >= 0");
    TESSERA_EXPECTS(sparsity_warmup_steps >= 0, "TopKHook: sparsity_warmup_steps ", sparsity_warmup_steps,
                    " must be >= 0");
    TESSERA_EXPECTS(momentum >= 0 && static_cast<T>(momentum) < 1, "TopKHook: momentum ", momentum,
                    " must be in [0, 1) (in T: 0.999999999 rounds to 1 in float)");
  }

  /// Replaces `bucket.grad` with the sum of every rank's top-k entries (class comment).
  /// Collective over `comm`: two all-gathers. Throws tessera::Error for a bucket of 2^31 or more
  /// elements (int32 indices). A gradient holding a NaN or Inf leaves this rank's state (E, U)
  /// as it was and sends its non-finite entries in place of the top k, so every rank's result
  /// holds them where they were and the caller's non-finite check (optim::NonfiniteCheck) sees
  /// the step on every rank, names the parameter, and stops or skips it.
  void reduce(GradBucketView<T>& bucket, Comm& comm) override {
    const std::size_t n = bucket.grad.size();
    if (n == 0) return;
    TESSERA_EXPECTS(n <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()), "TopKHook: bucket ",
                    bucket.index, " has ", n, " elements; int32 indices reach 2^31 - 1");
    if (!std::all_of(bucket.grad.begin(), bucket.grad.end(), [](T g) { return std::isfinite(g); })) {
      send_nonfinite(bucket, comm);
      return;
    }
    // DGC's momentum correction: the velocity U = m U + G is what is accumulated (and, in the
    // warm-up, all-reduced).
    std::vector<T>* u = nullptr;
    if (momentum_ > 0) {
      u = &velocity_[bucket.index];
      TESSERA_EXPECTS(u->empty() || u->size() == n, "TopKHook: the velocity of bucket ", bucket.index, " has ",
                      u->size(), " elements, the bucket ", n);
      if (u->size() != n) u->assign(n, T{0});
      const T m = static_cast<T>(momentum_);
      for (std::size_t i = 0; i < n; ++i) bucket.grad[i] = (*u)[i] = m * (*u)[i] + bucket.grad[i];
    }
    if (warmup_reduce(bucket, comm)) return;  // this bucket's first reductions: plain all-reduces
    const std::size_t k = k_of(n, compressed_[bucket.index]++);
    std::vector<T>& e = error_[bucket.index];
    TESSERA_EXPECTS(!loaded_ || e.empty() || e.size() == n, "TopKHook: the loaded residual of bucket ", bucket.index,
                    " has ", e.size(), " elements, the bucket ", n);
    if (e.size() != n) e.assign(n, T{0});
    for (std::size_t i = 0; i < n; ++i) e[i] += bucket.grad[i];  // e holds M now
    // The k-th largest |M| (a selection over a contiguous copy), then the indices above it and,
    // to make up k, those equal to it from the lowest: the strict order of the class comment.
    abs_.resize(n);
    for (std::size_t i = 0; i < n; ++i) abs_[i] = std::abs(e[i]);
    std::nth_element(abs_.begin(), abs_.begin() + static_cast<std::ptrdiff_t>(n - k), abs_.end());
    const T threshold = abs_[n - k];
    std::vector<std::int32_t> idx;
    idx.reserve(k);
    std::size_t above = 0;
    for (std::size_t i = 0; i < n; ++i) above += std::abs(e[i]) > threshold;
    std::size_t ties = k - above;
    for (std::size_t i = 0; i < n; ++i) {
      const T a = std::abs(e[i]);
      if (a > threshold) {
        idx.push_back(static_cast<std::int32_t>(i));
      } else if (a == threshold && ties > 0) {
        --ties;
        idx.push_back(static_cast<std::int32_t>(i));
      }
    }
    TESSERA_EXPECTS(idx.size() == k, "TopKHook: bucket ", bucket.index, " selected ", idx.size(), " of k = ", k,
                    " entries: its gradient plus residual holds a NaN");
    std::vector<T> val(k);
    for (std::size_t j = 0; j < k; ++j) {
      val[j] = e[static_cast<std::size_t>(idx[j])];
      e[static_cast<std::size_t>(idx[j])] = T{0};
      if (u != nullptr) (*u)[static_cast<std::size_t>(idx[j])] = T{0};  // momentum factor masking
    }
    exchange(bucket, comm, std::move(idx), val);
  }

  /// "bucket<b>.error": each bucket's residual E; with momentum, "bucket<b>.velocity" (U); with
  /// a warm-up, the counter "bucket<b>.reductions" (warm-up reductions done); with a sparsity
  /// warm-up, the counter "bucket<b>.compressed" (compressed reductions done). Local.
  DpRankState<T> state() const override {
    DpRankState<T> out;
    if (warmup_ > 0)
      for (const auto& [b, done] : reductions_) out.counters["bucket" + std::to_string(b) + ".reductions"] = done;
    if (sparsity_warmup_ > 0)
      for (const auto& [b, done] : compressed_) out.counters["bucket" + std::to_string(b) + ".compressed"] = done;
    for (const auto& [b, e] : error_) out.tensors["bucket" + std::to_string(b) + ".error"] = e;
    for (const auto& [b, u] : velocity_) out.tensors["bucket" + std::to_string(b) + ".velocity"] = u;
    return out;
  }
  /// Restores a state(): the residuals (a bucket's size is checked at its next reduction,
  /// which throws tessera::Error naming both sizes). Throws for names it does not know. Local.
  void load_state(const DpRankState<T>& state) override {
    for (const auto& [k, v] : state.counters) {
      const auto warm = dp_state_bucket(k, ".reductions"), comp = dp_state_bucket(k, ".compressed");
      TESSERA_EXPECTS((warm || comp) && v >= 0, "TopKHook: unknown state counter '", k, "' = ", v);
      (warm ? reductions_ : compressed_)[warm ? *warm : *comp] = v;
    }
    for (const auto& [k, v] : state.tensors) {
      if (const auto b = dp_state_bucket(k, ".error")) {
        error_[*b] = v;
        loaded_ = true;
      } else if (const auto b = dp_state_bucket(k, ".velocity"); b && momentum_ > 0) {
        velocity_[*b] = v;
      } else {
        TESSERA_EXPECTS(false, "TopKHook: unknown state tensor '", k, "'",
                        momentum_ > 0 ? "" : " (a velocity needs a hook with momentum)");
      }
    }
  }

  /// "topk:F", with ",warmup=N" when warmup_steps > 0, ",momentum=M" when momentum > 0 and
  /// ",sparsity_warmup=S" when sparsity_warmup_steps > 0 (make_comm_hook's syntax).
  std::string name() const override {
    return "topk:" + format(fraction_) + (warmup_ > 0 ? ",warmup=" + std::to_string(warmup_) : std::string()) +
           (momentum_ > 0 ? ",momentum=" + format(momentum_) : std::string()) +
           (sparsity_warmup_ > 0 ? ",sparsity_warmup=" + std::to_string(sparsity_warmup_) : std::string());
  }
  /// Compressed reductions of each bucket over which DGC's sparsity warm-up runs (0: none).
  std::int64_t sparsity_warmup_steps() const noexcept { return sparsity_warmup_; }
  /// The fraction sent by a bucket's compressed reduction number `c` (0-based, after the dense
  /// warm-up): max(fraction, 4^-(s + 1)) with s = floor(4 c / S) while c < S, else fraction.
  double fraction_at(std::int64_t c) const {
    if (c < 0 || c >= sparsity_warmup_) return fraction_;
    const std::int64_t stage = 4 * c / sparsity_warmup_;
    return std::max(fraction_, std::pow(0.25, static_cast<double>(stage + 1)));
  }
  /// DGC's momentum (0: none).
  double momentum() const noexcept { return momentum_; }
  /// This rank's velocity U of bucket `index` (empty without momentum or before its first reduction).
  std::span<const T> velocity(std::size_t index) const {
    auto it = velocity_.find(index);
    return it == velocity_.end() ? std::span<const T>() : std::span<const T>(it->second);
  }
  /// Reductions of each bucket that are plain all-reduces before compression starts.
  std::int64_t warmup_steps() const noexcept override { return warmup_; }
  /// The fraction sent.
  double fraction() const noexcept { return fraction_; }
  /// k for a bucket of `n` elements at its compressed reduction `c` (the default: after any
  /// sparsity warm-up): max(1, ceil(fraction_at(c) n)), at most n.
  std::size_t k_of(std::size_t n, std::int64_t c = std::numeric_limits<std::int64_t>::max()) const {
    const auto k = static_cast<std::size_t>(std::ceil(fraction_at(c) * static_cast<double>(n) - 1e-9));
    return std::clamp<std::size_t>(k, 1, n);
  }
  /// This rank's residual E of bucket `index` (empty before its first reduction).
  std::span<const T> residual(std::size_t index) const {
    auto it = error_.find(index);
    return it == error_.end() ? std::span<const T>() : std::span<const T>(it->second);
  }
  /// The indices this rank sent for bucket `index` in its last reduction, ascending.
  std::span<const std::int32_t> last_indices(std::size_t index) const {
    auto it = last_indices_.find(index);
    return it == last_indices_.end() ? std::span<const std::int32_t>() : std::span<const std::int32_t>(it->second);
  }

 private:
  // In the warm-up (this bucket's first warmup_steps reductions): the plain all-reduce of
  // bucket.grad, counted; true when it ran.
  bool warmup_reduce(GradBucketView<T>& bucket, Comm& comm) {
    std::int64_t& done = reductions_[bucket.index];
    if (done >= warmup_) return false;
    ++done;
    comm.all_reduce(bucket.grad, ReduceOp::sum);
    this->count_all_reduce(bucket.grad.size(), sizeof(T), comm.size());
    return true;
  }
  // Every rank's k (index, value) pairs by two all-gathers; bucket.grad becomes their
  // scatter-add, ranks in order (bitwise the same on every rank).
  void exchange(GradBucketView<T>& bucket, Comm& comm, std::vector<std::int32_t> idx, const std::vector<T>& val) {
    const std::size_t k = idx.size(), p = static_cast<std::size_t>(comm.size());
    std::vector<std::int32_t> all_idx(p * k);
    std::vector<T> all_val(p * k);
    comm.all_gather(idx, all_idx);
    comm.all_gather(val, all_val);
    this->count_all_gather(k, sizeof(std::int32_t) + sizeof(T), comm.size());
    std::fill(bucket.grad.begin(), bucket.grad.end(), T{0});
    for (std::size_t j = 0; j < p * k; ++j) bucket.grad[static_cast<std::size_t>(all_idx[j])] += all_val[j];
    last_indices_[bucket.index] = std::move(idx);
  }
  // A gradient with NaN or Inf entries: the state is left as it was; in the warm-up the plain
  // all-reduce carries them, else this rank sends its first (up to) k non-finite entries, made up
  // to k with zeros at the lowest other indices, through the same two all-gathers.
  void send_nonfinite(GradBucketView<T>& bucket, Comm& comm) {
    if (warmup_reduce(bucket, comm)) return;
    const std::size_t n = bucket.grad.size(), k = k_of(n, compressed_[bucket.index]++);
    std::vector<std::int32_t> idx;
    idx.reserve(k);
    for (std::size_t i = 0; i < n && idx.size() < k; ++i)
      if (!std::isfinite(bucket.grad[i])) idx.push_back(static_cast<std::int32_t>(i));
    for (std::size_t i = 0; i < n && idx.size() < k; ++i)
      if (std::isfinite(bucket.grad[i])) idx.push_back(static_cast<std::int32_t>(i));
    std::sort(idx.begin(), idx.end());
    std::vector<T> val(k);
    for (std::size_t j = 0; j < k; ++j) {
      const T g = bucket.grad[static_cast<std::size_t>(idx[j])];
      val[j] = std::isfinite(g) ? T{0} : g;
    }
    exchange(bucket, comm, std::move(idx), val);
  }
  // A number's shortest round-trip form ("0.01", "1e-30"), as it will be used.
  static std::string format(double x) {
    char buf[32];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x);
    return ec == std::errc() ? std::string(buf, end) : std::to_string(x);
  }
  double fraction_;
  std::int64_t warmup_ = 0;
  double momentum_ = 0;
  std::map<std::size_t, std::vector<T>> velocity_;  // DGC's U per bucket (momentum > 0)
  std::map<std::size_t, std::int64_t> reductions_;  // warm-up reductions done, per bucket
  std::int64_t sparsity_warmup_ = 0;
  std::map<std::size_t, std::int64_t> compressed_;  // compressed reductions done, per bucket
  bool loaded_ = false;  // load_state gave residuals (their sizes are checked)
  std::vector<T> abs_;  // |M|, scratch of the selection
  std::map<std::size_t, std::vector<T>> error_;
  std::map<std::size_t, std::vector<std::int32_t>> last_indices_;
};

}  // namespace tessera
