#pragma once
// train_gpt's dp communication policy (issue 16): --compress reduces every stage's dp gradient
// buckets through a compressor (bf16, powersgd:R, topk:F; parallel/data/compression), and
// --sync-every H runs DiLoCo: the replicas step on their own gradients (LocalGradientHook) and
// meet every H steps (LocalSGD: all-reduce of the pseudo-gradient, outer SGD with Nesterov
// momentum). It also counts the bytes this rank sends over dp per step.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gpt/args.hpp"
#include "tessera/core/error.hpp"
#include "tessera/parallel/data/compression/local_gradient_hook.hpp"
#include "tessera/parallel/data/compression/make_comm_hook.hpp"
#include "tessera/parallel/data/local_sgd.hpp"
#include "tessera/parallel/hybrid/hybrid.hpp"

namespace train_gpt {

using namespace tessera;

class DpCommunication {
 public:
  // Installs the hooks on `model`'s dp buckets and, with --sync-every, the LocalSGD over
  // `dp` (collective over dp: LocalSGD broadcasts dp rank 0's values).
  DpCommunication(Hybrid<float>& model, Comm dp, const Args& a) : dp_size_(dp.size()) {
    for (GradBuckets<float>* set : model.buckets()) {
      std::int64_t n = 0;
      for (const auto& b : set->buckets()) n += b.numel;
      plain_elements_ += n;
    }
    if (a.sync_every > 0) {
      for (GradBuckets<float>* set : model.buckets()) {
        hooks_.push_back(std::make_shared<LocalGradientHook<float>>());
        set->set_comm_hook(hooks_.back());
      }
      local_.emplace(model.parameters(), dp, LocalSGDOptions{.sync_every = a.sync_every, .outer_lr = a.outer_lr,
                                                             .outer_momentum = a.outer_momentum, .nesterov = true});
      for (const Parameter<float>* p : distinct(model.parameters())) sync_elements_ += p->value.numel();
    } else if (!a.compress.empty()) {
      for (GradBuckets<float>* set : model.buckets()) {
        hooks_.push_back(make_comm_hook<float>(a.compress));
        set->set_comm_hook(hooks_.back());
      }
    }
  }

  // After every step (taken or skipped): counts it; with --sync-every, LocalSGD's count and
  // its synchronization every H steps. Collective over dp on a synchronization step.
  void after_step() {
    ++steps_;
    if (local_ && local_->step()) bytes_ += ring_all_reduce_bytes(sync_elements_);
  }

  // Bytes this rank sent over dp per step, on average over the steps since the last call
  // (ring-model volumes, as CommHook::bytes_sent; without a hook: the fp32 all-reduce of
  // every bucket once per step). 0 before any step.
  double take_bytes_per_step() {
    std::int64_t hooked = 0;
    for (const auto& h : hooks_) hooked += h->bytes_sent();
    std::int64_t b = bytes_ + (hooked - hooks_seen_);
    if (hooks_.empty()) b += steps_ * ring_all_reduce_bytes(plain_elements_);
    const double per_step = steps_ > 0 ? static_cast<double>(b) / static_cast<double>(steps_) : 0.0;
    hooks_seen_ = hooked;
    bytes_ = 0;
    steps_ = 0;
    return per_step;
  }
  // "fp32 all-reduce", the compressor's name, or "DiLoCo H=..".
  std::string describe(const Args& a) const {
    if (local_) return "DiLoCo: sync every " + std::to_string(a.sync_every) + " steps";
    return hooks_.empty() ? std::string("fp32 all-reduce") : "compression " + hooks_.front()->name();
  }

 private:
  std::int64_t ring_all_reduce_bytes(std::int64_t elements) const {
    return static_cast<std::int64_t>(2.0 * (dp_size_ - 1) / dp_size_ * static_cast<double>(elements) * sizeof(float));
  }
  static std::vector<const Parameter<float>*> distinct(const ParameterList<float>& params) {
    std::vector<const Parameter<float>*> out;
    std::vector<const float*> seen;
    for (const Parameter<float>& p : params) {
      if (p.value.numel() == 0 || std::find(seen.begin(), seen.end(), p.value.data()) != seen.end()) continue;
      seen.push_back(p.value.data());
      out.push_back(&p);
    }
    return out;
  }

  int dp_size_;
  std::vector<std::shared_ptr<CommHook<float>>> hooks_;
  std::optional<LocalSGD<float>> local_;
  std::int64_t plain_elements_ = 0, sync_elements_ = 0, bytes_ = 0, hooks_seen_ = 0, steps_ = 0;
};

}  // namespace train_gpt
