#pragma once
/// @file
/// PowerSGDHook: rank-r compression of every matrix gradient by one step of subspace (power)
/// iteration with error feedback and a warm-started Q (Vogels, Karimireddy and Jaggi,
/// "PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization",
/// NeurIPS 2019, Algorithms 1 and 2); 1-D gradients are all-reduced uncompressed.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <map>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/gemm.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"

namespace tessera {

/// Options of PowerSGDHook.
struct PowerSGDOptions {
  int rank = 4;                 ///< r, the rank of the approximation (>= 1)
  std::uint64_t seed = 0x5eed;  ///< seed of the initial Q (the same on every rank)
  /// Reductions of each bucket all-reduced uncompressed (fp32) before compression starts, as
  /// PyTorch's `start_powerSGD_iter` (its docs: about 10% of training; the early gradients
  /// change fast and low-rank estimates of them slow training down). No error feedback
  /// during them; Q is drawn and E starts at 0 at the first compressed reduction. >= 0.
  std::int64_t warmup_steps = 0;
};

/// PowerSGD with error feedback. Within a bucket, each parameter gradient of rank >= 2 is seen
/// as a matrix M of shape (n, m) = (shape[0], numel / shape[0]) and compressed when
/// r (n + m) < n m (with r' = min(r, n, m)); the others (biases, LayerNorm weights, small
/// matrices) are all-reduced uncompressed in one all-reduce. For the compressed ones, per step
/// (sums over the p ranks; tessera's gradients are pre-divided, see CommHook):
/// 1. M = G + E (E: this rank's error-feedback residual, 0 at first);
/// 2. P = M Q (n x r'), Q (m x r') warm-started from the last step (at first: N(0, 1) from
///    `seed`, the same on every rank); all-reduce P (sum), one all-reduce for the bucket;
/// 3. P^ = orthogonalize(P): Gram-Schmidt on its columns, as the paper (a column of norm below
///    1e-8 relative to nothing is set to zero rather than divided);
/// 4. Q = M^T P^ (m x r'); all-reduce Q (sum), one all-reduce for the bucket;
/// 5. the bucket receives P^ Q^T (the sum over ranks of P^ P^^T M_w); the residual becomes
///    E = M - P^ Q^T / p (this rank's share of the sum; the mean of what was applied), and the
///    warm start for the next step is Q / p.
/// So over any number of steps, (what was applied) + (sum over ranks of E) = the sum over steps
/// and ranks of G, to round-off. Bytes per rank per step: 2 (p - 1) / p * 4 r'(n + m) per
/// matrix instead of 2 (p - 1) / p * 4 n m.
template <std::floating_point T>
class PowerSGDHook final : public CommHook<T> {
 public:
  /// The state of one compressed matrix of one bucket.
  struct MatrixState {
    std::int64_t offset = 0;  ///< first element in the bucket
    std::int64_t n = 0;       ///< rows (shape[0])
    std::int64_t m = 0;       ///< columns (numel / n)
    std::int64_t r = 0;       ///< rank used, min(rank, n, m)
    std::vector<T> q;         ///< warm-started Q, (m, r) row-major
    std::vector<T> error;     ///< error-feedback residual E, (n, m) row-major
  };

  /// A hook of `options.rank`. Throws tessera::Error naming the rank when it is below 1.
  explicit PowerSGDHook(const PowerSGDOptions& options = {}) : options_(options) {
    TESSERA_EXPECTS(options.rank >= 1, "PowerSGDHook: rank ", options.rank, " must be at least 1");
    TESSERA_EXPECTS(options.warmup_steps >= 0, "PowerSGDHook: warmup_steps ", options.warmup_steps, " must be >= 0");
  }

  /// Replaces `bucket.grad` with the PowerSGD estimate of the sum over ranks (class comment).
  /// Collective over `comm`: up to three all-reduces per bucket (uncompressed part, P, Q).
  /// Throws tessera::Error when the bucket's tensor list differs from the one first seen.
  void reduce(GradBucketView<T>& bucket, Comm& comm) override {
    // Warm-up (options.warmup_steps): this bucket's first reductions are plain all-reduces.
    if (std::int64_t& done = reductions_[bucket.index]; done < options_.warmup_steps) {
      ++done;
      comm.all_reduce(bucket.grad, ReduceOp::sum);
      this->count_all_reduce(bucket.grad.size(), sizeof(T), comm.size());
      return;
    }
    std::vector<MatrixState>& mats = layout(bucket);
    const T inv_p = T{1} / static_cast<T>(comm.size());
    // The uncompressed tensors, in one all-reduce.
    flat_.clear();
    for (const auto& [off, len] : plain_[bucket.index]) flat_.insert(flat_.end(), bucket.grad.begin() + off, bucket.grad.begin() + off + len);
    if (!flat_.empty()) {
      comm.all_reduce(flat_, ReduceOp::sum);
      this->count_all_reduce(flat_.size(), sizeof(T), comm.size());
      std::size_t k = 0;
      for (const auto& [off, len] : plain_[bucket.index])
        for (std::int64_t i = 0; i < len; ++i) bucket.grad[static_cast<std::size_t>(off + i)] = flat_[k++];
    }
    if (mats.empty()) return;
    // 1-2. M = G + E (in place in the bucket), P = M Q.
    std::size_t p_total = 0, q_total = 0;
    for (const MatrixState& s : mats) {
      p_total += static_cast<std::size_t>(s.n * s.r);
      q_total += static_cast<std::size_t>(s.m * s.r);
    }
    pbuf_.resize(p_total);
    qbuf_.resize(q_total);
    std::size_t po = 0;
    for (MatrixState& s : mats) {
      T* M = bucket.grad.data() + s.offset;
      for (std::int64_t i = 0; i < s.n * s.m; ++i) M[i] += s.error[static_cast<std::size_t>(i)];
      gemm(Transpose::no, Transpose::no, s.n, s.r, s.m, T{1}, M, s.m, s.q.data(), s.r, T{0}, pbuf_.data() + po, s.r);
      po += static_cast<std::size_t>(s.n * s.r);
    }
    comm.all_reduce(pbuf_, ReduceOp::sum);
    this->count_all_reduce(pbuf_.size(), sizeof(T), comm.size());
    // 3-4. P^ = orthogonalize(P), Q = M^T P^.
    po = 0;
    std::size_t qo = 0;
    for (MatrixState& s : mats) {
      T* P = pbuf_.data() + po;
      orthogonalize(P, s.n, s.r);
      gemm(Transpose::yes, Transpose::no, s.m, s.r, s.n, T{1}, bucket.grad.data() + s.offset, s.m, P, s.r, T{0},
           qbuf_.data() + qo, s.r);
      po += static_cast<std::size_t>(s.n * s.r);
      qo += static_cast<std::size_t>(s.m * s.r);
    }
    comm.all_reduce(qbuf_, ReduceOp::sum);
    this->count_all_reduce(qbuf_.size(), sizeof(T), comm.size());
    // 5. grad = P^ Q^T; E = M - P^ Q^T / p; warm start Q / p.
    po = 0;
    qo = 0;
    for (MatrixState& s : mats) {
      const T* P = pbuf_.data() + po;
      const T* Q = qbuf_.data() + qo;
      T* M = bucket.grad.data() + s.offset;
      // E = M - P^ Q^T / p, then M = P^ Q^T (two GEMMs of inner dimension r).
      std::copy(M, M + s.n * s.m, s.error.begin());
      gemm(Transpose::no, Transpose::yes, s.n, s.m, s.r, -inv_p, P, s.r, Q, s.r, T{1}, s.error.data(), s.m);
      gemm(Transpose::no, Transpose::yes, s.n, s.m, s.r, T{1}, P, s.r, Q, s.r, T{0}, M, s.m);
      for (std::int64_t k = 0; k < s.m * s.r; ++k) s.q[static_cast<std::size_t>(k)] = Q[k] * inv_p;
      po += static_cast<std::size_t>(s.n * s.r);
      qo += static_cast<std::size_t>(s.m * s.r);
    }
  }

  /// Per bucket b: "bucket<b>.reductions" (the warm-up count) and, per compressed matrix i,
  /// "bucket<b>.m<i>.q" (the warm start) and "bucket<b>.m<i>.error" (the residual). Local.
  DpRankState<T> state() const override {
    DpRankState<T> out;
    for (const auto& [b, done] : reductions_) out.counters["bucket" + std::to_string(b) + ".reductions"] = done;
    for (const auto& [b, mats] : mats_)
      for (std::size_t i = 0; i < mats.size(); ++i) {
        const std::string key = "bucket" + std::to_string(b) + ".m" + std::to_string(i);
        out.tensors[key + ".q"] = mats[i].q;
        out.tensors[key + ".error"] = mats[i].error;
      }
    return out;
  }
  /// Restores a state() (see there); a bucket's matrices take their Q and residual at its first
  /// reduction here, which throws tessera::Error when a saved tensor's size differs or a saved
  /// matrix is missing from the bucket (naming them). Throws for names it does not know. Local.
  void load_state(const DpRankState<T>& state) override {
    TESSERA_EXPECTS(mats_.empty() && reductions_.empty(), "PowerSGDHook: load_state after the first reduction");
    for (const auto& [k, v] : state.counters) {
      const auto b = dp_state_bucket(k, ".reductions");
      TESSERA_EXPECTS(b && v >= 0, "PowerSGDHook: unknown state counter '", k, "' = ", v);
      reductions_[*b] = v;
    }
    for (const auto& [k, v] : state.tensors) {
      const std::size_t dot = k.rfind('.');
      TESSERA_EXPECTS(dot != std::string::npos && (k.substr(dot) == ".q" || k.substr(dot) == ".error") &&
                          dp_state_bucket(k.substr(0, k.find('.', 6)), ""),
                      "PowerSGDHook: unknown state tensor '", k, "'");
      pending_[k] = v;
    }
  }

  /// "powersgd:R", with ",warmup=N" when warmup_steps > 0 (make_comm_hook's syntax).
  std::string name() const override {
    return "powersgd:" + std::to_string(options_.rank) +
           (options_.warmup_steps > 0 ? ",warmup=" + std::to_string(options_.warmup_steps) : std::string());
  }
  /// The options.
  const PowerSGDOptions& options() const noexcept { return options_; }
  /// options().warmup_steps: reductions of each bucket that are plain all-reduces first.
  std::int64_t warmup_steps() const noexcept override { return options_.warmup_steps; }
  /// The compressed matrices of bucket `index` with their Q and residual (empty before the
  /// bucket's first reduction, or when nothing in it is compressed).
  const std::vector<MatrixState>& matrices(std::size_t index) const {
    static const std::vector<MatrixState> none;
    auto it = mats_.find(index);
    return it == mats_.end() ? none : it->second;
  }

  /// Whether a gradient of `shape` is compressed at `rank`: rank >= 2 and, as the matrix
  /// (n, m) = (shape[0], numel / shape[0]) with r = min(rank, n, m), r (n + m) < n m (else
  /// it is all-reduced uncompressed). Local.
  static bool compresses(const Shape& shape, std::int64_t rank) {
    const std::int64_t numel = shape.numel();
    if (shape.rank() < 2 || numel == 0) return false;
    const std::int64_t n = shape[0], m = numel / n, r = std::min<std::int64_t>({rank, n, m});
    return r * (n + m) < n * m;
  }

  /// Gram-Schmidt on the `r` columns of the row-major (n, r) matrix `a`, in place, as the
  /// paper: each column has the projections on the earlier ones removed, then is divided by its
  /// norm (a column of norm <= 1e-8 is divided by 1e-8 instead, as PyTorch's hook adds an
  /// epsilon, so a zero gradient gives a zero column rather than NaN). Local.
  static void orthogonalize(T* a, std::int64_t n, std::int64_t r) {
    for (std::int64_t c = 0; c < r; ++c) {
      for (std::int64_t k = 0; k < c; ++k) {
        T dot = 0;
        for (std::int64_t i = 0; i < n; ++i) dot += a[i * r + c] * a[i * r + k];
        for (std::int64_t i = 0; i < n; ++i) a[i * r + c] -= dot * a[i * r + k];
      }
      T norm = 0;
      for (std::int64_t i = 0; i < n; ++i) norm += a[i * r + c] * a[i * r + c];
      norm = std::max<T>(std::sqrt(norm), static_cast<T>(1e-8));
      for (std::int64_t i = 0; i < n; ++i) a[i * r + c] /= norm;
    }
  }

 private:
  // The matrices of the bucket (made at its first reduction, with Q drawn from the seed and the
  // bucket index, so every rank draws the same), checked against the tensor list afterwards.
  std::vector<MatrixState>& layout(const GradBucketView<T>& bucket) {
    auto it = mats_.find(bucket.index);
    if (it != mats_.end()) {
      TESSERA_EXPECTS(seen_[bucket.index] == bucket.tensors.size(), "PowerSGDHook: bucket ", bucket.index, " has ",
                      bucket.tensors.size(), " tensors, ", seen_[bucket.index], " at its first reduction");
      return it->second;
    }
    std::vector<MatrixState> mats;
    std::vector<std::pair<std::int64_t, std::int64_t>> plain;
    std::mt19937_64 rng(options_.seed + 0x9e3779b97f4a7c15ull * (bucket.index + 1));
    std::normal_distribution<double> normal(0.0, 1.0);
    for (const GradBucketTensor& t : bucket.tensors) {
      const std::int64_t numel = t.shape.numel();
      if (numel == 0) continue;
      const std::int64_t n = t.shape.rank() >= 2 ? t.shape[0] : 1, m = numel / n;
      const std::int64_t r = std::min<std::int64_t>({options_.rank, n, m});
      if (!compresses(t.shape, options_.rank)) {
        plain.emplace_back(t.offset, numel);
        continue;
      }
      MatrixState s{.offset = t.offset, .n = n, .m = m, .r = r, .q = {}, .error = {}};
      s.q.resize(static_cast<std::size_t>(m * r));
      for (T& x : s.q) x = static_cast<T>(normal(rng));
      s.error.assign(static_cast<std::size_t>(n * m), T{0});
      mats.push_back(std::move(s));
    }
    // A loaded state (load_state): this bucket's Q and residuals.
    for (std::size_t i = 0; i < mats.size(); ++i) {
      const std::string key = "bucket" + std::to_string(bucket.index) + ".m" + std::to_string(i);
      for (auto [suffix, dst] : {std::pair{".q", &mats[i].q}, std::pair{".error", &mats[i].error}}) {
        auto it = pending_.find(key + suffix);
        if (it == pending_.end()) continue;
        TESSERA_EXPECTS(it->second.size() == dst->size(), "PowerSGDHook: state tensor '", it->first, "' has ",
                        it->second.size(), " elements, the bucket's matrix ", mats[i].n, " x ", mats[i].m, " needs ",
                        dst->size());
        *dst = std::move(it->second);
        pending_.erase(it);
      }
    }
    const std::string mine = "bucket" + std::to_string(bucket.index) + ".m";
    for (const auto& [k, v] : pending_)
      TESSERA_EXPECTS(k.rfind(mine, 0) != 0, "PowerSGDHook: state tensor '", k, "' has no matrix in bucket ",
                      bucket.index, " (", mats.size(), " compressed matrices)");
    seen_[bucket.index] = bucket.tensors.size();
    plain_[bucket.index] = std::move(plain);
    return mats_[bucket.index] = std::move(mats);
  }

  PowerSGDOptions options_;
  std::map<std::string, std::vector<T>> pending_;  // loaded Q and residuals not yet given to a bucket
  std::map<std::size_t, std::vector<MatrixState>> mats_;                                    // per bucket
  std::map<std::size_t, std::vector<std::pair<std::int64_t, std::int64_t>>> plain_;        // (offset, numel)
  std::map<std::size_t, std::size_t> seen_;                                                 // tensors per bucket
  std::map<std::size_t, std::int64_t> reductions_;  // warm-up reductions done, per bucket
  std::vector<T> flat_, pbuf_, qbuf_;
};

}  // namespace tessera
