#pragma once
/// @file
/// NonfiniteCheck: detects a NaN or an infinity in the loss or in any gradient before the
/// optimizer step, with one reduction that every rank agrees on, and either stops (a
/// tessera::Error naming the step and the first parameter whose gradient is not finite) or
/// skips the step and counts it, as the loss-scaling optimizers of mixed-precision training do
/// (Micikevicius et al., "Mixed Precision Training", ICLR 2018, sec. 3.2; apex's and
/// DeepSpeed's dynamic loss scalers skip a step whose gradients overflowed).
///
/// The check is fused with the gradient-norm reduction of clip_grad_norm.hpp: the global sum
/// of squares of the counted gradients is NaN or infinite exactly when one of them is, so the
/// one all-reduce that clipping needs also decides whether the step is taken. Pieces that this
/// rank does not count (another rank holds the same values) and the loss are checked locally
/// and folded into the same reduction, so a NaN that only one rank holds still reaches every
/// rank. Each gradient element this rank holds is read once.

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/optim/clip_grad_norm.hpp"

namespace tessera::optim {

/// What NonfiniteCheck::check does when the loss or a gradient is not finite.
enum class OnNonfinite {
  stop,  ///< throw tessera::Error on every rank, naming the step and the first parameter
  skip,  ///< return a verdict without the step (the caller does not step), and count it
};

/// The outcome of one NonfiniteCheck::check, the same on every rank of the gradients' comm.
struct NonfiniteVerdict {
  bool finite = true;      ///< the loss and every gradient element are finite: take the step
  double grad_norm = 0.0;  ///< the global L2 norm of the counted gradients (as optim::grad_norm); not finite when `finite` is false
};

/// Checks the loss and the gradients for NaN and infinity before an optimizer step.
///
///     optim::NonfiniteCheck<float> nonfinite(optim::OnNonfinite::skip);
///     const auto v = nonfinite.check(step, loss, model.gradients(), model.parameters());
///     if (v.finite) { optim::scale_by_norm(model.gradients(), 1.0, v.grad_norm); opt.step(); }
///
/// `grad_norm` of the verdict is the norm clipping needs, so clipping with scale_by_norm adds
/// no second reduction.
template <std::floating_point T>
class NonfiniteCheck {
 public:
  /// A check that stops (the default) or skips on a non-finite value. With skip,
  /// `max_consecutive_skips` > 0 bounds how many steps in a row may be skipped: a non-finite
  /// step after that many skipped ones throws as stop does (a run whose every step is
  /// non-finite has diverged and would never recover; fairseq stops at its minimum loss scale
  /// for the same reason); 0: no bound. Throws tessera::Error when it is negative.
  explicit NonfiniteCheck(OnNonfinite on = OnNonfinite::stop, std::int64_t max_consecutive_skips = 0)
      : on_(on), max_consecutive_(max_consecutive_skips) {
    TESSERA_EXPECTS(max_consecutive_skips >= 0, "NonfiniteCheck: max_consecutive_skips ", max_consecutive_skips,
                    " must be >= 0 (0: no bound)");
  }

  /// Checks `loss` (this rank's view of the step's loss) and the gradients `grads` after the
  /// backward pass of step `step`, before the optimizer step. Returns the verdict and the global
  /// gradient norm, the same on every rank. On a non-finite value with OnNonfinite::stop, throws
  /// tessera::Error on every rank with the same message: the step, the first parameter of
  /// `params` (in order, on the lowest rank that holds one) whose gradient holds a NaN or an
  /// infinity, the element and its value, and the loss; `params` only names what is found and
  /// may be empty (the message then names the piece's parameter, GradientPiece::name, as ZeRO-2
  /// and 3 shards do, or else gives the gradient piece's index). With OnNonfinite::skip,
  /// returns `finite = false` and adds one to skipped_steps(); the caller skips the optimizer
  /// step and zeroes the gradients as for any step.
  ///
  /// Collective over grads.comm: one all-reduce of a double (optim::grad_norm's), plus an
  /// all-reduce of one integer and a broadcast of 36 integers only when a value is not finite.
  /// Local without a comm.
  NonfiniteVerdict check(std::int64_t step, double loss, const Gradients<T>& grads,
                         const ParameterList<T>& params = {}) {
    // The fused reduction: the counted squares, plus one more counted element that is 0 when
    // this rank's loss and uncounted pieces are finite and NaN when not.
    bool local_bad = !std::isfinite(loss);
    T scratch{};
    for (const GradientPiece<T>& piece : grads.pieces)
      if (!local_bad && !piece.counted) local_bad = first_nonfinite_(piece.grad, &scratch) >= 0;
    Gradients<T> fused{grads.pieces, grads.comm};
    fused.pieces.push_back({Tensor<T>::full(Shape{1}, local_bad ? std::numeric_limits<T>::quiet_NaN() : T{0}), true});
    const double norm = grad_norm(fused);
    if (std::isfinite(norm)) {
      consecutive_ = 0;
      return {true, norm};
    }
    const std::string what = describe_(step, loss, grads, params);
    if (on_ == OnNonfinite::stop) throw Error(what);
    if (max_consecutive_ > 0 && consecutive_ >= max_consecutive_)
      throw Error(detail::str(what, "; the ", consecutive_, " step(s) before it were skipped too, the most in a row "
                              "allowed (max_consecutive_skips ", max_consecutive_, "): training has diverged"));
    ++skipped_;
    ++consecutive_;
    last_message_ = what;
    return {false, norm};
  }

  /// Steps skipped so far (OnNonfinite::skip). Local; the same on every rank of the comm.
  std::int64_t skipped_steps() const noexcept { return skipped_; }
  /// Steps skipped in a row up to the last check (0 after a finite one). Local.
  std::int64_t consecutive_skips() const noexcept { return consecutive_; }
  /// The message of the last skipped step ("" before the first): what stop would have thrown.
  const std::string& last_message() const noexcept { return last_message_; }
  /// What this check does on a non-finite value.
  OnNonfinite on_nonfinite() const noexcept { return on_; }

 private:
  // Slots of the broadcast record: the loss's bits, what was found (0 nothing, 1 the loss
  // only, 2 a gradient), the element, the piece, the value's bits, the name's length, the name.
  static constexpr std::size_t name_words_ = 30, record_ = 6 + name_words_;

  // The first non-finite value, agreed by every rank: the lowest rank with a gradient finding
  // (else the lowest with a non-finite loss) broadcasts what it found. Collective.
  std::string describe_(std::int64_t step, double loss, const Gradients<T>& grads,
                        const ParameterList<T>& params) const {
    std::vector<std::int64_t> rec(record_, 0);
    rec[0] = std::bit_cast<std::int64_t>(loss);
    T value{};
    std::string name;
    for (const Parameter<T>& p : params) {
      const std::int64_t e = first_nonfinite_(p.grad, &value);
      if (e >= 0) {
        rec[1] = 2, rec[2] = e, rec[3] = -1, name = p.name;
        break;
      }
    }
    for (std::size_t i = 0; rec[1] == 0 && i < grads.pieces.size(); ++i) {
      const GradientPiece<T>& piece = grads.pieces[i];
      const std::int64_t e = first_nonfinite_(piece.grad, &value);
      if (e < 0) continue;
      rec[1] = 2;
      if (piece.name.empty()) {
        rec[2] = e, rec[3] = static_cast<std::int64_t>(i);
      } else {  // a run of a named parameter (a ZeRO shard): its name and the element there
        rec[2] = piece.first_element + e, rec[3] = -1, name = piece.name;
      }
    }
    if (rec[1] == 0 && !std::isfinite(loss)) rec[1] = 1;
    rec[4] = std::bit_cast<std::int64_t>(static_cast<double>(value));
    name.resize(std::min(name.size(), name_words_ * 8));
    rec[5] = static_cast<std::int64_t>(name.size());
    for (std::size_t c = 0; c < name.size(); ++c)
      rec[6 + c / 8] |= static_cast<std::int64_t>(static_cast<unsigned char>(name[c])) << (8 * (c % 8));

    int from = 0, n = 1;
    std::string comm_name = "this rank";
    if (grads.comm.valid() && grads.comm.size() > 1) {
      Comm comm = grads.comm;
      n = comm.size();
      comm_name = comm.name();
      const std::int64_t key = rec[1] == 2 ? comm.rank() : rec[1] == 1 ? n + comm.rank() : 2 * n;
      const std::int64_t first = comm.all_reduce_value(key, ReduceOp::min);
      from = static_cast<int>(first % n);
      if (first >= 2 * n) from = 0;
      comm.broadcast(std::span<std::int64_t>(rec), from);
    }
    double seen_loss = std::bit_cast<double>(rec[0]);
    if (std::isnan(seen_loss)) seen_loss = std::numeric_limits<double>::quiet_NaN();  // "nan", not "-nan"
    // "rank R of <comm>" over a communicator; alone (serial, dp 1 without tp): "this rank".
    const std::string where = n > 1 ? tessera::detail::str("rank ", from, " of ", comm_name) : comm_name;
    std::string found;
    if (rec[1] == 2) {
      std::string pname;
      for (std::int64_t c = 0; c < rec[5]; ++c)
        pname += static_cast<char>((rec[6 + static_cast<std::size_t>(c) / 8] >> (8 * (c % 8))) & 0xff);
      const double v = std::bit_cast<double>(rec[4]);
      found = tessera::detail::str(
          "the gradient of ", rec[3] < 0 ? "'" + pname + "'" : tessera::detail::str("gradient piece ", rec[3]),
          " holds ", nonfinite_name_(v), " at element ", rec[2], " (the first found, on ", where, "); the loss is ",
          seen_loss);
    } else if (rec[1] == 1) {
      found = tessera::detail::str("the loss is ", seen_loss, " on ", where, " and every gradient element is finite");
    } else {
      found = "the gradients' sum of squares overflowed (every element is finite)";
    }
    return tessera::detail::str("non-finite values at step ", step, ": ", found, "; the optimizer step ",
                                on_ == OnNonfinite::stop ? "was not taken" : "is skipped");
  }

  // Index (row-major) of the first element of `t` that is NaN or infinite (its value in
  // *value), or -1.
  static std::int64_t first_nonfinite_(const Tensor<T>& t, T* value) {
    std::int64_t i = 0, found = -1;
    tessera::detail::for_each_element(
        "nonfinite_check",
        [&](const T& x) {
          if (found < 0 && !std::isfinite(x)) {
            found = i;
            *value = x;
          }
          ++i;
        },
        t);
    return found;
  }
  static const char* nonfinite_name_(double x) { return std::isnan(x) ? "NaN" : x > 0 ? "+inf" : "-inf"; }

  OnNonfinite on_;
  std::int64_t skipped_ = 0;
  std::int64_t max_consecutive_ = 0;  // 0: no bound
  std::int64_t consecutive_ = 0;
  std::string last_message_;
};

}  // namespace tessera::optim
