// DeviceDataParallel: dp 2 and 3 DeviceGPTs as threads sharing one GPU (ThreadDeviceComm on a
// communication stream, buckets reduced while backward runs) train as one DeviceGPT on the
// whole batch: losses within 1e-5 relative at every step, parameters within 1e-5 (norm-wise)
// after 6 AdamW steps with clipping; with 2 micro-batches per rank (accumulation, the first
// without reduction) too; and ZeRO-1 (AdamW's moments sharded over dp, the weights' shards
// gathered) equal to plain dp bitwise; and ZeRO-2 (the gradients in per-bucket buffers, each
// reduced onto the owners of its elements: each rank keeps its shard's) equal to ZeRO-1's
// gradient shard bitwise without accumulation, training as the single run with and without it;
// and ZeRO-3 (the fp32 weights sharded too, each bucket's gathered when needed) bitwise ZeRO-2.
// Needs a GPU (gpu_main.cpp skips without one).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <span>
#include <vector>

#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/thread_device_comm.cuh"
#include "tessera/models/gpt.hpp"
#include "tessera/testing/compare.hpp"

using namespace tessera;
namespace tc = tessera::cuda;

namespace {

const GPTConfig dp_cfg{.vocab_size = 67, .n_positions = 16, .n_layer = 2, .n_head = 4, .d_model = 32};
constexpr std::int64_t kRows = 12, kT = 13;  // global batch: 12 rows (dp 2, 3 and accumulation divide it)
constexpr int kSteps = 6;
const optim::AdamWOptions dp_opts{3e-3, 0.9, 0.95, 1e-8, 0.1};

Tensor<std::int32_t> rows_of(const Tensor<std::int32_t>& t, std::int64_t lo, std::int64_t hi) {
  Tensor<std::int32_t> out(Shape{hi - lo, kT});
  for (std::int64_t i = lo; i < hi; ++i)
    for (std::int64_t j = 0; j < kT; ++j) out(i - lo, j) = t(i, j);
  return out;
}

struct Data {
  std::vector<Tensor<std::int32_t>> x, y;
};

Data make_data() {
  std::mt19937 rng(21);
  Data d;
  for (int s = 0; s < kSteps; ++s) {
    Tensor<std::int32_t> x(Shape{kRows, kT}), y(Shape{kRows, kT});
    for (std::int64_t i = 0; i < kRows; ++i)
      for (std::int64_t t = 0; t < kT; ++t) {
        const auto cur = static_cast<std::int32_t>(rng() % dp_cfg.vocab_size);
        x(i, t) = cur;
        y(i, t) = static_cast<std::int32_t>((cur * 5 + 1) % dp_cfg.vocab_size);
      }
    d.x.push_back(x);
    d.y.push_back(y);
  }
  return d;
}

float clip_scale(double norm) { return norm > 1.0 ? static_cast<float>(1.0 / (norm + 1e-6)) : 1.f; }

// Per-step mean losses and the final parameters, as a flat host vector in the CPU order.
struct Run {
  std::vector<double> losses;
  std::vector<float> params;
  std::size_t buckets = 0;  // DeviceDataParallel's (dp runs)
  std::int64_t moment_elements = 0;  // AdamW's first moment on this rank (ZeRO-1 and 2 runs)
  std::vector<float> first_grad_shard;  // this rank's shard of the reduced gradients of step 0
  std::int64_t grad_elements = -1;      // the whole-model gradient buffer (0 under ZeRO-2)
  std::int64_t peak_held = 0, peak_live = 0;  // ZeRO-2's bucket buffers (DeviceBucketGradients)
  std::int64_t master_elements = -1, master_shard_elements = -1;  // the fp32 weights kept (ZeRO-3: the shard)
  std::int64_t gathered_after_backward = -1, gathered_after_step = -1;  // ZeRO-3's gathered weights, step 0
};

std::vector<float> flat_params(tc::DeviceGPT<float>& m) {
  GPT<float> back(dp_cfg, 99);
  m.download(back.parameters());
  std::vector<float> out;
  for (Parameter<float>& p : back.parameters()) {
    const Tensor<float> v = p.value.contiguous();
    out.insert(out.end(), v.data(), v.data() + v.numel());
  }
  return out;
}

Run single(const Data& d) {
  tc::set_device(0);
  const tc::Stream stream;
  GPT<float> init(dp_cfg, 5);
  tc::DeviceGPT<float> m(dp_cfg, init.parameters(), stream);
  Run r;
  for (int s = 0; s < kSteps; ++s) {
    m.zero_grad();
    auto x = tc::to_device<std::int32_t>(d.x[static_cast<std::size_t>(s)], stream);
    auto y = tc::to_device<std::int32_t>(d.y[static_cast<std::size_t>(s)], stream);
    m.forward_backward(x, y, 1.f / static_cast<float>(kRows * kT));
    m.step(dp_opts, dp_opts.lr, clip_scale(m.grad_norm()));
    r.losses.push_back(m.take_loss_sum() / static_cast<double>(kRows * kT));
  }
  r.params = flat_params(m);
  return r;
}

// dp ranks as threads on one GPU, each with `micro` micro-batches per step; with `zero` 1 AdamW's
// moments sharded over dp (DeviceGPT::shard_optimizer) and the weights' shards gathered after
// each step; with `zero` 2 the gradients too (DeviceGPT::shard_gradients, DeviceDataParallel's
// ZeRO-2 constructor; the norm: each shard's squares summed over dp); with `zero` 3 the weights
// too (DeviceGPT::shard_parameters: each bucket's gathered when a product needs it).
std::vector<Run> data_parallel(const Data& d, int dp, int micro, std::int64_t* reductions_per_step, int zero = 0) {
  return threads::run(dp, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    tc::ThreadDeviceComm comm(world.split(0, world.rank()), comm_stream);
    GPT<float> init(dp_cfg, 5);
    tc::DeviceGPT<float> m(dp_cfg, init.parameters(), compute, 0, zero > 0 ? dp : 1);
    if (zero > 0) m.shard_optimizer(world.rank(), dp);
    const auto buckets = tc::device_grad_buckets(m.numel(), m.ready_offsets(), 6000);  // several buckets
    std::optional<tc::DeviceDataParallel> ddp;
    if (zero >= 2) {
      m.shard_gradients(buckets);
      ddp.emplace(comm, compute, *m.bucket_gradients());
      if (zero == 3) m.shard_parameters(*ddp);
    } else {
      ddp.emplace(comm, compute, m.gradient_view(), buckets);
    }
    m.set_backward_hook([&](std::int64_t offset) { ddp->gradients_final_from(offset); });
    const std::int64_t per_rank = kRows / dp, per_micro = per_rank / micro;
    Run r;
    for (int s = 0; s < kSteps; ++s) {
      m.zero_grad();
      for (int k = 0; k < micro; ++k) {
        const std::int64_t lo = world.rank() * per_rank + k * per_micro;
        auto x = tc::to_device<std::int32_t>(rows_of(d.x[static_cast<std::size_t>(s)], lo, lo + per_micro), compute);
        auto y = tc::to_device<std::int32_t>(rows_of(d.y[static_cast<std::size_t>(s)], lo, lo + per_micro), compute);
        ddp->set_sync(k == micro - 1);
        m.forward_backward(x, y, 1.f / static_cast<float>(kRows * kT));
      }
      ddp->finish();
      if (s == 0) {
        const Tensor<float> g = tc::to_host(tc::DeviceView<const float>(m.gradient_shard()), compute);
        r.first_grad_shard.assign(g.data(), g.data() + g.numel());
        if (zero == 3) r.gathered_after_backward = m.gathered_weight_elements();
      }
      double norm = 0;
      if (zero >= 2) {  // each rank's shard's part, summed over dp
        const tc::DeviceView<float> sum = m.grad_sum_of_squares();
        ddp->all_reduce(sum);
        norm = m.reduce_grad_norm(sum);
      } else {
        norm = m.grad_norm();
      }
      m.step(dp_opts, dp_opts.lr, clip_scale(norm));
      if (zero == 3 && s == 0) r.gathered_after_step = m.gathered_weight_elements();
      if (zero == 1 || zero == 2) {  // (ZeRO-3 keeps the shard only: the next forward gathers)
        const Shape shard{m.shard_end() - m.shard_begin()};
        ddp->gather(tc::DeviceView<const float>(m.master_view().data + m.shard_begin(), shard), m.master_view());
        m.refresh_compute_copy();
        r.moment_elements = m.exp_avg_view().numel();
      }
      const double local = m.take_loss_sum();
      r.losses.push_back(world.all_reduce_value(local, ReduceOp::sum) / static_cast<double>(kRows * kT));
    }
    if (world.rank() == 0 && reductions_per_step) *reductions_per_step = ddp->reductions() / kSteps;
    r.params = flat_params(m);
    r.buckets = ddp->buckets().size();
    r.grad_elements = m.gradients().numel();
    if (zero >= 2) {
      r.peak_held = m.bucket_gradients()->peak_held_elements();
      r.peak_live = m.bucket_gradients()->peak_elements();
    }
    r.master_elements = m.master_view().numel();
    r.master_shard_elements = m.master_shard().numel();
    return r;
  });
}

// The flat buffers' length of dp_cfg's DeviceGPT built with `shards` (padded to a multiple of
// shards x flat_alignment).
std::int64_t padded_numel(int shards) {
  GPT<float> probe(dp_cfg, 5);
  const auto layout = tc::flat_gpt_layout(dp_cfg, probe.parameters());
  const std::int64_t pad = tc::flat_alignment * shards;
  return (layout.back().offset + layout.back().shape.numel() + pad - 1) / pad * pad;
}

// Norm-wise relative difference (testing::norm_rel_error: +infinity on a NaN, which fails every
// comparison below).
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  return testing::norm_rel_error(std::span<const float>(a), std::span<const float>(b));
}

}  // namespace

TEST_CASE("DeviceDataParallel: dp 2 and 3 on one GPU (threads) train as one DeviceGPT on the whole batch, with and without accumulation") {
  const Data d = make_data();
  const Run ref = single(d);
  CHECK(ref.losses.back() < ref.losses.front());
  for (int dp : {2, 3})
    for (int micro : {1, 2}) {
      CAPTURE(dp);
      CAPTURE(micro);
      std::int64_t reductions = 0;
      const std::vector<Run> runs = data_parallel(d, dp, micro, &reductions);
      for (std::size_t r = 0; r < runs.size(); ++r) {
        CAPTURE(r);
        for (int s = 0; s < kSteps; ++s) {
          const double got = runs[r].losses[static_cast<std::size_t>(s)], want = ref.losses[static_cast<std::size_t>(s)];
          INFO("step " << s << ": dp " << got << ", single " << want);
          CHECK(std::abs(got - want) <= 1e-5 * std::abs(want));
        }
        CHECK(rel_diff(runs[r].params, ref.params) < 1e-5);
        CHECK(runs[r].params == runs[0].params);  // every replica holds the same weights
        CHECK(runs[r].buckets >= 2);              // the reduction overlapped backward in pieces
      }
      // One all-reduce per bucket per step, whatever the micro-batches: the first only accumulates.
      GPT<float> probe(dp_cfg, 5);
      const auto layout = tc::flat_gpt_layout(dp_cfg, probe.parameters());
      const std::int64_t numel = layout.back().offset + tc::flat_alignment;
      CHECK(reductions == static_cast<std::int64_t>(
                              tc::device_grad_buckets(numel, tc::gpt_ready_offsets(layout, dp_cfg.n_layer), 6000).size()));
    }
}

TEST_CASE("DeviceGPT ZeRO-1 on one GPU (threads): each rank keeps 1/dp of AdamW's moments, and the weights equal plain dp bitwise") {
  const Data d = make_data();
  for (int dp : {2, 3}) {
    CAPTURE(dp);
    const std::vector<Run> plain = data_parallel(d, dp, 1, nullptr);
    const std::vector<Run> zero = data_parallel(d, dp, 1, nullptr, 1);
    const std::int64_t numel = padded_numel(dp);
    for (std::size_t r = 0; r < zero.size(); ++r) {
      CAPTURE(r);
      CHECK(zero[r].params == plain[r].params);  // the same AdamW per element, the same sums
      CHECK(zero[r].losses == plain[r].losses);
      CHECK(zero[r].moment_elements == numel / dp);
    }
  }
}

TEST_CASE("DeviceGPT ZeRO-2 on one GPU (threads): each rank keeps 1/dp of the gradients, reduced bucket by bucket onto their owners; bitwise ZeRO-1's gradient shard, training as one DeviceGPT") {
  const Data d = make_data();
  const Run ref = single(d);
  GPT<float> probe(dp_cfg, 5);
  const auto layout = tc::flat_gpt_layout(dp_cfg, probe.parameters());
  for (int dp : {2, 3})
    for (int micro : {1, 2}) {
      CAPTURE(dp);
      CAPTURE(micro);
      const std::int64_t numel = padded_numel(dp);
      const auto buckets = tc::device_grad_buckets(numel, tc::gpt_ready_offsets(layout, dp_cfg.n_layer), 6000);
      REQUIRE(buckets.size() >= 3);
      // Held at once under the hooks: the tied wte's bucket (the last: written first by the head and
      // last by the embedding) and one other.
      std::int64_t largest_other = 0;
      for (std::size_t b = 0; b + 1 < buckets.size(); ++b) largest_other = std::max(largest_other, buckets[b].hi - buckets[b].lo);
      const std::int64_t held_bound = buckets.back().hi - buckets.back().lo + largest_other;
      std::int64_t reductions = 0;
      const std::vector<Run> zero2 = data_parallel(d, dp, micro, &reductions, 2);
      const std::vector<Run> zero1 = data_parallel(d, dp, micro, nullptr, 1);
      CHECK(reductions == micro * static_cast<std::int64_t>(buckets.size()));  // every backward reduces
      for (std::size_t r = 0; r < zero2.size(); ++r) {
        CAPTURE(r);
        for (int s = 0; s < kSteps; ++s) {
          const double got = zero2[r].losses[static_cast<std::size_t>(s)], want = ref.losses[static_cast<std::size_t>(s)];
          INFO("step " << s << ": ZeRO-2 " << got << ", single " << want);
          CHECK(std::abs(got - want) <= 1e-5 * std::abs(want));
        }
        CHECK(rel_diff(zero2[r].params, ref.params) < 1e-5);
        CHECK(zero2[r].params == zero2[0].params);  // the shards gathered: every replica the same weights
        REQUIRE(zero2[r].first_grad_shard.size() == static_cast<std::size_t>(numel / dp));
        if (micro == 1)  // the same sums in the same order: the reduction onto owners is the all-reduce's
          CHECK(zero2[r].first_grad_shard == zero1[r].first_grad_shard);
        else             // each micro-batch reduced on its own, then added: round-off only
          CHECK(rel_diff(zero2[r].first_grad_shard, zero1[r].first_grad_shard) < 1e-6);
        CHECK(zero2[r].moment_elements == numel / dp);
        CHECK(zero2[r].grad_elements == 0);  // no whole-model gradient buffer
        CHECK(zero2[r].peak_held > 0);
        CHECK(zero2[r].peak_held <= held_bound);
        CHECK(zero2[r].peak_held < numel);
        CHECK(zero2[r].peak_live >= zero2[r].peak_held);  // (how many await their reduction is the GPU's pace)
      }
    }
}

TEST_CASE("DeviceGPT ZeRO-2 refusals: without ZeRO-1 first, twice, a split backward, buckets cutting a parameter, grad_norm, a stage's tied wte gradient before backward, deferring without ZeRO-2, a shard that is not the communicator's") {
  tc::set_device(0);
  const tc::Stream stream;
  GPT<float> init(dp_cfg, 5);
  {
    tc::DeviceGPT<float> m(dp_cfg, init.parameters(), stream, 0, 2);
    const auto buckets = tc::device_grad_buckets(m.numel(), m.ready_offsets(), 6000);
    CHECK_THROWS_WITH_AS(m.shard_gradients(buckets), doctest::Contains("shard the optimizer first"), Error);
    m.shard_optimizer(1, 2);
    // Buckets that cover the buffer but cut a parameter (wte, [0, 67 x 32)) in two.
    const std::vector<tc::DeviceGradBucket> cut{{100, m.numel()}, {0, 100}};
    CHECK_THROWS_WITH_AS(m.shard_gradients(cut),
                         doctest::Contains("wte.weight (flat elements [0, 2144)) is not inside one bucket"), Error);
    m.shard_gradients(buckets);
    CHECK(m.gradients().numel() == 0);
    CHECK(m.bucket_gradients() != nullptr);
    CHECK_THROWS_WITH_AS(m.shard_gradients(buckets), doctest::Contains("already sharded"), Error);
    CHECK_THROWS_WITH_AS(m.grad_norm(), doctest::Contains("sharded over dp"), Error);
    CHECK_THROWS_WITH_AS(m.set_split_backward(true), doctest::Contains("the gradients are sharded"), Error);
  }
  {
    tc::DeviceGPT<float> m(dp_cfg, init.parameters(), stream, 0, 2);
    m.shard_optimizer(0, 2);
    m.set_split_backward(true);
    CHECK_THROWS_WITH_AS(m.shard_gradients(tc::device_grad_buckets(m.numel(), m.ready_offsets(), 6000)),
                         doctest::Contains("backward is split"), Error);
  }
  {  // A pipeline stage holding the tied wte: its bucket is named for the reduction to hold over the
     // step, and its gradient is refused before a backward wrote it (or after it was reduced).
    tc::DeviceGPT<float> m(dp_cfg, init.parameters(), stream, 0, 2, nullptr, false, tc::DeviceStage{0, 2});
    m.shard_optimizer(0, 2);
    m.shard_gradients(tc::device_grad_buckets(m.numel(), m.ready_offsets(), 6000));
    REQUIRE(m.tied_embedding_offset().has_value());
    CHECK(m.bucket_gradients()->deferred_offset() == m.tied_embedding_offset());
    CHECK_THROWS_WITH_AS((void)m.tied_embedding_gradient(), doctest::Contains("the tied wte's bucket holds none"), Error);
  }
  threads::run(1, [&](Comm& world) {  // only ZeRO-2's reduction defers buckets
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    tc::ThreadDeviceComm comm(world, comm_stream);
    tc::DeviceGPT<float> m(dp_cfg, init.parameters(), compute);
    tc::DeviceDataParallel ddp(comm, compute, m.gradient_view(), tc::device_grad_buckets(m.numel(), m.ready_offsets(), 6000));
    CHECK_THROWS_WITH_AS(ddp.defer_bucket(0), doctest::Contains("only ZeRO-2's reduction defers buckets"), Error);
  });
  // A model sharded for 2 ranks under a communicator of 3: every rank refuses, naming the shard.
  const auto messages = threads::run(3, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    tc::ThreadDeviceComm comm(world, comm_stream);
    tc::DeviceGPT<float> m(dp_cfg, init.parameters(), compute, 0, 2);
    m.shard_optimizer(world.rank() % 2, 2);
    m.shard_gradients(tc::device_grad_buckets(m.numel(), m.ready_offsets(), 6000));
    try {
      tc::DeviceDataParallel ddp(comm, compute, *m.bucket_gradients());
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  });
  for (const std::string& m : messages) CHECK(m.find("(a model built with shards = 3)") != std::string::npos);
}

TEST_CASE("DeviceGPT ZeRO-3 on one GPU (threads): each rank keeps 1/dp of the fp32 weights, each bucket's gathered when a product needs it; bitwise ZeRO-2, with and without accumulation") {
  const Data d = make_data();
  GPT<float> probe(dp_cfg, 5);
  const auto layout = tc::flat_gpt_layout(dp_cfg, probe.parameters());
  for (int dp : {2, 3})
    for (int micro : {1, 2}) {
      CAPTURE(dp);
      CAPTURE(micro);
      const std::int64_t numel = padded_numel(dp);
      const std::vector<Run> zero3 = data_parallel(d, dp, micro, nullptr, 3);
      const std::vector<Run> zero2 = data_parallel(d, dp, micro, nullptr, 2);
      // At most three buckets' weights gathered at once (the block in use, the next, the head's pair).
      const auto buckets = tc::device_grad_buckets(numel, tc::gpt_ready_offsets(layout, dp_cfg.n_layer), 6000);
      std::vector<std::int64_t> sizes;
      for (const tc::DeviceGradBucket& b : buckets) sizes.push_back(b.hi - b.lo);
      std::sort(sizes.rbegin(), sizes.rend());
      REQUIRE(sizes.size() >= 4);
      const std::int64_t three = sizes[0] + sizes[1] + sizes[2];
      for (std::size_t r = 0; r < zero3.size(); ++r) {
        CAPTURE(r);
        CHECK(zero3[r].losses == zero2[r].losses);  // the same weights gathered, the same sums
        CHECK(zero3[r].params == zero2[r].params);
        CHECK(zero3[r].first_grad_shard == zero2[r].first_grad_shard);
        CHECK(zero3[r].master_elements == 0);  // no whole-model weights
        CHECK(zero3[r].gathered_after_backward > 0);
        CHECK(zero3[r].gathered_after_backward <= three);
        CHECK(zero3[r].gathered_after_backward < numel);
        CHECK(zero3[r].gathered_after_step == 0);  // the step changed the weights: none kept
        CHECK(zero3[r].master_shard_elements == numel / dp);
        CHECK(zero2[r].master_elements == numel);
      }
    }
}

TEST_CASE("DeviceGPT ZeRO-3 refusals: without ZeRO-2 first, twice, another model's reduction; a pipeline stage is taken") {
  GPT<float> init(dp_cfg, 5);
  threads::run(2, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    tc::ThreadDeviceComm comm(world, comm_stream);
    tc::DeviceGPT<float> m(dp_cfg, init.parameters(), compute, 0, 2), other(dp_cfg, init.parameters(), compute, 0, 2);
    m.shard_optimizer(world.rank(), 2);
    other.shard_optimizer(world.rank(), 2);
    const auto buckets = tc::device_grad_buckets(m.numel(), m.ready_offsets(), 6000);
    m.shard_gradients(buckets);
    other.shard_gradients(buckets);
    tc::DeviceDataParallel ddp(comm, compute, *m.bucket_gradients()), other_ddp(comm, compute, *other.bucket_gradients());
    tc::DeviceGPT<float> plain(dp_cfg, init.parameters(), compute);
    CHECK_THROWS_WITH_AS(plain.shard_parameters(ddp), doctest::Contains("shard the gradients first"), Error);
    CHECK_THROWS_WITH_AS(m.shard_parameters(other_ddp), doctest::Contains("not over this model's buckets"), Error);
    m.shard_parameters(ddp);
    CHECK(m.sharded_parameters());
    CHECK_THROWS_WITH_AS(m.shard_parameters(ddp), doctest::Contains("already sharded"), Error);
    tc::DeviceGPT<float> stage(dp_cfg, init.parameters(), compute, 0, 2, nullptr, false, tc::DeviceStage{0, 2});
    stage.shard_optimizer(world.rank(), 2);
    stage.shard_gradients(tc::device_grad_buckets(stage.numel(), stage.ready_offsets(), 6000));
    tc::DeviceDataParallel stage_ddp(comm, compute, *stage.bucket_gradients());
    stage.shard_parameters(stage_ddp);  // a stage shards its own buffer (test_device_pipeline trains it)
    CHECK(stage.sharded_parameters());
    CHECK(stage.master_shard().numel() == stage.numel() / 2);
  });
}
