// DeviceGPT tensor parallelism: the vocab-parallel pieces against their single-device ops (the
// loss and its gradient columns, the embedding's lookups and gradient rows, at 1-3 ranks with the
// vocabulary padded); tp 2 and 4 DeviceGPTs as threads sharing one GPU (ThreadDeviceComm on each
// rank's compute stream) train as one DeviceGPT: fp32 losses within 1e-5 relative at every step,
// the gradient norm within 1e-5 at the first, and the whole parameters and AdamW moments (every
// rank's shards gathered by download) within 1e-5 norm-wise after 6 AdamW steps with clipping;
// dp 2 x tp 2 (DeviceDataParallel on a communication stream beside the tp all-reduces) the same;
// sequence parallelism at tp 2 and 4 and dp 2 x tp 2, with embedding dropout (the masks of this
// rank's rows), the same; bf16 mixed precision at tp 2 (with and without sequence parallelism)
// within bf16 round-off of the single-rank bf16 run; and the sweep of every dp x tp layout of 2, 4
// and 8 ranks (with and without sequence parallelism) against the single-rank run. Needs a GPU
// (gpu_main.cpp skips without one).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <vector>

#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/ops/cross_entropy.cuh"
#include "tessera/cuda/ops/embedding.cuh"
#include "tessera/cuda/ops/vocab_parallel_cross_entropy.cuh"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/thread_device_comm.cuh"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/adamw.hpp"

#include "device_training_support.hpp"

using namespace tessera;
namespace tc = tessera::cuda;

// A suite of its own, so that scripts/gpu_check.sh can run these (new, first run on a GPU) after
// the rest, each group under its own timeout.
TEST_SUITE_BEGIN("device tensor parallel");

namespace {

// device_test's small GPT (4 heads of 8: tp 2 and 4 divide them) and its dropout form.
const GPTConfig& tp_cfg = device_test::small_cfg;
using device_test::drop_cfg;
using device_test::kRows;
using device_test::kSteps;
using device_test::kT;
const optim::AdamWOptions& tp_opts = device_test::adamw_opts;

using device_test::clip_scale;
using device_test::Data;
using device_test::flatten;
using device_test::kClip;
using device_test::rel_diff;

Data make_data(std::int64_t vocab = tp_cfg.vocab_size) { return device_test::make_data(vocab, 33, kSteps, kRows, kT, 7, 3); }

Tensor<std::int32_t> rows_of(const Tensor<std::int32_t>& t, std::int64_t lo, std::int64_t hi) {
  return t.slice(0, lo, hi).contiguous();
}


struct Run {
  std::vector<double> losses;
  double first_norm = 0;
  std::vector<float> params, moments, second_moments;  // the whole model's, flat in the CPU order
  std::vector<float> replicated;  // this rank's own copies of the parameters every tp rank holds (its flat buffer)
};

// The whole parameters and first moments (download and download_optimizer: collective over tp).
template <class C>
void fill_whole(tc::DeviceGPT<C>& m, Run& r, const GPTConfig& cfg) {
  GPT<float> back(cfg, 99);
  ParameterList<float> ps = back.parameters();
  m.download(ps);
  r.params = flatten(ps);
  optim::AdamW<float> opt(ps, tp_opts);  // one group, the model's order
  m.download_optimizer(opt);
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const Tensor<float> e = opt.exp_avg(i).contiguous(), v = opt.exp_avg_sq(i).contiguous();
    r.moments.insert(r.moments.end(), e.data(), e.data() + e.numel());
    r.second_moments.insert(r.second_moments.end(), v.data(), v.data() + v.numel());
  }
  // download reads rank 0's copy of a replicated parameter: every rank's must be the same.
  const Tensor<float> mine = tc::to_host(tc::DeviceView<const float>(m.master_view()), m.stream());
  for (const tc::FlatParameter& f : m.flat_parameters())
    if (!f.tp_layout.is_shard())
      r.replicated.insert(r.replicated.end(), mine.data() + f.offset, mine.data() + f.offset + f.shape.numel());
}

template <class C>
Run single(const Data& d, const GPTConfig& cfg = tp_cfg) {
  tc::set_device(0);
  const tc::Stream stream;
  GPT<float> init(cfg, 5);
  tc::DeviceGPT<C> m(cfg, init.parameters(), stream);
  Run r;
  for (int s = 0; s < kSteps; ++s) {
    m.zero_grad();
    auto x = tc::to_device<std::int32_t>(d.x[static_cast<std::size_t>(s)], stream);
    auto y = tc::to_device<std::int32_t>(d.y[static_cast<std::size_t>(s)], stream);
    m.forward_backward(x, y, 1.f / static_cast<float>(kRows * kT), BatchPosition{.step = static_cast<std::uint64_t>(s)});
    const double norm = m.grad_norm();
    if (s == 0) r.first_norm = norm;
    m.step(tp_opts, tp_opts.lr, clip_scale(norm));
    r.losses.push_back(m.take_loss_sum() / static_cast<double>(kRows * kT));
  }
  fill_whole(m, r, cfg);
  return r;
}

// dp x tp ranks as threads on one GPU: world rank = dp rank x tp + tp rank; the tp group's
// ThreadDeviceComm on the compute stream, the dp group's on a communication stream; `sp`:
// sequence parallelism; `micro` micro-batches per step (gradients accumulated, reduced over dp
// with the last).
template <class C>
std::vector<Run> parallel(const Data& d, int dp, int tp, bool sp = false, const GPTConfig& cfg = tp_cfg, int micro = 1) {
  return threads::run(dp * tp, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    const int dp_rank = world.rank() / tp, tp_rank = world.rank() % tp;
    tc::ThreadDeviceComm tp_comm(world.split(dp_rank, tp_rank), compute);
    GPT<float> init(cfg, 5);
    tc::DeviceGPT<C> m(cfg, init.parameters(), compute, 0, 1, &tp_comm, sp);
    CHECK(m.tp_size() == tp);
    CHECK(m.tp_rank() == tp_rank);
    CHECK(m.sequence_parallel() == sp);
    std::optional<tc::ThreadDeviceComm> dp_comm;
    std::optional<tc::DeviceDataParallel> ddp;
    if (dp > 1) {
      dp_comm.emplace(world.split(tp_rank, dp_rank), comm_stream);
      ddp.emplace(*dp_comm, compute, m.gradient_view(), tc::device_grad_buckets(m.numel(), m.ready_offsets(), 4000));
      m.set_backward_hook([&](std::int64_t offset) { ddp->gradients_final_from(offset); });
    }
    const std::int64_t rows = kRows / dp / micro;
    Run r;
    for (int s = 0; s < kSteps; ++s) {
      m.zero_grad();
      for (int k = 0; k < micro; ++k) {
        const std::int64_t lo = (dp_rank * micro + k) * rows;
        auto x = tc::to_device<std::int32_t>(rows_of(d.x[static_cast<std::size_t>(s)], lo, lo + rows), compute);
        auto y = tc::to_device<std::int32_t>(rows_of(d.y[static_cast<std::size_t>(s)], lo, lo + rows), compute);
        if (ddp) ddp->set_sync(k == micro - 1);
        m.forward_backward(x, y, 1.f / static_cast<float>(kRows * kT),
                           BatchPosition{.step = static_cast<std::uint64_t>(s), .first_row = lo});
      }
      if (ddp) ddp->finish();
      const double norm = m.grad_norm();
      if (s == 0) r.first_norm = norm;
      m.step(tp_opts, tp_opts.lr, clip_scale(norm));
      // Every tp rank holds the loss of its dp rank's rows: sum over the world, count each once.
      const double local = m.take_loss_sum();
      r.losses.push_back(world.all_reduce_value(local, ReduceOp::sum) / tp / static_cast<double>(kRows * kT));
    }
    fill_whole(m, r, cfg);
    return r;
  });
}

void check_equal(const std::vector<Run>& runs, const Run& ref, double tol) {
  CHECK(ref.losses.back() < ref.losses.front());  // it trained
  for (std::size_t r = 0; r < runs.size(); ++r) {
    CAPTURE(r);
    for (int s = 0; s < kSteps; ++s) {
      const double got = runs[r].losses[static_cast<std::size_t>(s)], want = ref.losses[static_cast<std::size_t>(s)];
      INFO("step " << s << ": parallel " << got << ", single " << want);
      CHECK(std::abs(got - want) <= tol * std::abs(want));
    }
    INFO("gradient norm at step 0: parallel " << runs[r].first_norm << ", single " << ref.first_norm);
    CHECK(std::abs(runs[r].first_norm - ref.first_norm) <= tol * ref.first_norm);
    CHECK(rel_diff(runs[r].params, ref.params) < tol);
    CHECK(rel_diff(runs[r].moments, ref.moments) < tol);
    CHECK(rel_diff(runs[r].second_moments, ref.second_moments) < 10 * tol);  // squares: twice the relative error, and more
    CHECK(runs[r].params == runs[0].params);  // every rank gathered the same whole model
    CHECK(runs[r].replicated == runs[0].replicated);  // the replicated parameters never drift apart, bitwise
  }
  CHECK(ref.first_norm > kClip);  // the steps clipped
}

}  // namespace

TEST_CASE("ops::vocab_parallel_cross_entropy over 1-4 ranks equals softmax_cross_entropy: losses, gradient columns, padding, an ignored row, a rank with no real columns") {
  // (V, tp): 67 over 1, 2, 3 (padded); 5 over 4 (2 columns a rank: the last holds none).
  for (const auto& case_ : std::vector<std::pair<std::int64_t, int>>{{67, 1}, {67, 2}, {67, 3}, {5, 4}}) {
  const std::int64_t V = case_.first;
  const int tp = case_.second;
  CAPTURE(V);
  CAPTURE(tp);
  constexpr std::int64_t rows = 5;
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.f, 3.f);
  Tensor<float> logits(Shape{rows, V});
  for (std::int64_t i = 0; i < logits.numel(); ++i) logits.data()[i] = nd(rng);
  Tensor<std::int32_t> targets(Shape{rows});
  for (std::int64_t r = 0; r < rows; ++r) targets(r) = static_cast<std::int32_t>(rng() % V);
  targets(1) = static_cast<std::int32_t>(V - 1);  // the last real column
  targets(2) = -100;  // ignored: no loss, no gradient
  const float dloss = 0.25f;
  tc::set_device(0);
  const tc::Stream s;
  auto ref_logits = tc::to_device<float>(logits, s);
  auto tgt = tc::to_device<std::int32_t>(targets, s);
  auto ref_losses = tc::DeviceTensor<float>::empty(Shape{rows}, s);
  tc::ops::softmax_cross_entropy<float>(s, ref_logits, V, tgt, ref_losses, &dloss);
  const Tensor<float> want_loss = tc::to_host(ref_losses, s), want_grad = tc::to_host(ref_logits, s);
  CHECK(want_loss(2) == 0.f);
  {
    threads::run(tp, [&](Comm& world) {
      tc::set_device(0);
      const tc::Stream st;
      tc::ThreadDeviceComm comm(world.split(0, world.rank()), st);
      const std::int64_t width = (V + tp - 1) / tp, lo = world.rank() * width,
                         valid = std::clamp<std::int64_t>(V - lo, 0, width);
      Tensor<float> mine(Shape{rows, width});
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < width; ++j) mine(r, j) = j < valid ? logits(r, lo + j) : 7.f;  // padding: not counted
      auto dev = tc::to_device<float>(mine, st);
      auto t = tc::to_device<std::int32_t>(targets, st);
      auto losses = tc::DeviceTensor<float>::empty(Shape{rows}, st);
      auto stats = tc::DeviceTensor<float>::empty(Shape{3 * rows}, st);
      tc::ops::vocab_parallel_cross_entropy<float>(st, comm, dev, lo, valid, t, losses, stats, &dloss);
      const Tensor<float> got_loss = tc::to_host(losses, st), got_grad = tc::to_host(dev, st);
      for (std::int64_t r = 0; r < rows; ++r) {
        CHECK(std::abs(got_loss(r) - want_loss(r)) <= 1e-6f * std::max(1.f, std::abs(want_loss(r))));
        for (std::int64_t j = 0; j < width; ++j)
          CHECK(got_grad(r, j) == doctest::Approx(j < valid ? want_grad(r, lo + j) : 0.f).epsilon(1e-5));
      }
      return 0;
    });
  }
  }
}

TEST_CASE("vocab-parallel embedding on the device: each rank's lookups summed equal the whole table's, and each rank's gradient rows equal the whole gradient's") {
  constexpr std::int64_t V = 67, C = 24, n = 40;
  std::mt19937 rng(8);
  std::normal_distribution<float> nd(0.f, 1.f);
  Tensor<float> table(Shape{V, C}), dy(Shape{n, C});
  for (std::int64_t i = 0; i < table.numel(); ++i) table.data()[i] = nd(rng);
  for (std::int64_t i = 0; i < dy.numel(); ++i) dy.data()[i] = nd(rng);
  Tensor<std::int32_t> ids(Shape{n});
  for (std::int64_t i = 0; i < n; ++i) ids(i) = static_cast<std::int32_t>(rng() % V);
  ids(0) = 66;
  ids(1) = 0;
  tc::set_device(0);
  const tc::Stream s;
  auto d_ids = tc::to_device<std::int32_t>(ids, s);
  auto out = tc::DeviceTensor<float>::empty(Shape{n, C}, s);
  tc::ops::embedding_forward<float>(s, d_ids, tc::to_device<float>(table, s), out);
  auto grad = tc::DeviceTensor<float>::zeros(Shape{V, C}, s);
  tc::ops::embedding_backward<float>(s, d_ids, tc::to_device<float>(dy, s), grad);
  const Tensor<float> want_out = tc::to_host(out, s), want_grad = tc::to_host(grad, s);
  for (int tp : {2, 3}) {
    CAPTURE(tp);
    threads::run(tp, [&](Comm& world) {
      tc::set_device(0);
      const tc::Stream st;
      tc::ThreadDeviceComm comm(world.split(0, world.rank()), st);
      const std::int64_t rows = (V + tp - 1) / tp, lo = world.rank() * rows, valid = std::clamp<std::int64_t>(V - lo, 0, rows);
      Tensor<float> mine(Shape{rows, C});  // zero padding rows
      if (valid > 0) mine.slice(0, 0, valid).copy_from(table.slice(0, lo, lo + valid));
      auto local = tc::DeviceTensor<std::int32_t>::empty(Shape{n}, st);
      tc::ops::vocab_local_ids(st, tc::to_device<std::int32_t>(ids, st), local, lo, valid, rows);
      auto x = tc::DeviceTensor<float>::empty(Shape{n, C}, st);
      tc::ops::embedding_forward<float>(st, local, tc::to_device<float>(mine, st), x);
      comm.all_reduce(x, ReduceOp::sum);
      auto g = tc::DeviceTensor<float>::zeros(Shape{rows, C}, st);
      tc::ops::embedding_backward<float>(st, local, tc::to_device<float>(dy, st), g);
      const Tensor<float> got = tc::to_host(x, st), got_grad = tc::to_host(g, st);
      CHECK(std::equal(want_out.data(), want_out.data() + want_out.numel(), got.data()));  // one rank holds each row: exact
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < C; ++c) CHECK(got_grad(r, c) == (r < valid ? want_grad(lo + r, c) : 0.f));
      return 0;
    });
  }
}

TEST_CASE("DeviceGPT tensor parallel: tp 2 and 4 on one GPU (threads) train as one DeviceGPT, fp32 within 1e-5") {
  const Data d = make_data();
  const Run ref = single<float>(d);
  for (int tp : {2, 4}) {
    CAPTURE(tp);
    check_equal(parallel<float>(d, 1, tp), ref, 1e-5);
  }
}

TEST_CASE("DeviceGPT dp 2 x tp 2 on one GPU: buckets reduced over dp beside the tp all-reduces, fp32 within 1e-5") {
  const Data d = make_data();
  check_equal(parallel<float>(d, 2, 2), single<float>(d), 1e-5);
}

TEST_CASE("DeviceGPT sequence parallel: tp 2 and 4, and dp 2 x tp 2, with embedding dropout, train as one DeviceGPT, fp32 within 1e-5") {
  const Data d = make_data();
  const Run ref = single<float>(d, drop_cfg);
  const Run no_dropout = single<float>(d);
  CHECK(ref.losses != no_dropout.losses);  // the dropout is on
  for (int tp : {2, 4}) {
    CAPTURE(tp);
    check_equal(parallel<float>(d, 1, tp, true, drop_cfg), ref, 1e-5);
  }
  check_equal(parallel<float>(d, 2, 2, true, drop_cfg), ref, 1e-5);
}

TEST_CASE("DeviceGPT sequence parallel with 2 micro-batches per step (accumulation): each micro-batch's LayerNorm gradients summed over tp once, fp32 within 1e-5") {
  const Data d = make_data();
  const Run ref = single<float>(d, drop_cfg);
  check_equal(parallel<float>(d, 1, 2, true, drop_cfg, 2), ref, 1e-5);
  check_equal(parallel<float>(d, 2, 2, true, drop_cfg, 2), ref, 1e-5);
  check_equal(parallel<float>(d, 1, 4, false, drop_cfg, 2), ref, 1e-5);
}

TEST_CASE("DeviceGPT layout sweep on one GPU: every dp x tp of 1, 2, 4 and 8 ranks, with and without sequence parallelism, equals the single-rank run (fp32, 1e-5)") {
  // 8 heads of 4, so that tp 8 divides them; 8 rows of 13: every dp divides the rows, and every
  // dp x tp here divides (8 / dp) x 13 rows by tp for sequence parallelism. A vocabulary of 64:
  // every tp divides it (the unpadded split; the other cases pad 67).
  const GPTConfig wide{.vocab_size = 64, .n_positions = 16, .n_layer = 2, .n_head = 8, .d_model = 32, .embd_pdrop = 0.1};
  const Data d = make_data(wide.vocab_size);
  const Run ref = single<float>(d, wide);
  int layouts = 0;
  for (int world : {2, 4, 8})
    for (int tp = 1; tp <= world; tp *= 2) {
      const int dp = world / tp;
      for (bool sp : {false, true}) {
        if (sp && tp == 1) continue;
        CAPTURE(dp);
        CAPTURE(tp);
        CAPTURE(sp);
        check_equal(parallel<float>(d, dp, tp, sp, wide), ref, 1e-5);
        ++layouts;
      }
    }
  CHECK(layouts == 3 + 2 * (1 + 2 + 3));  // dp-only at 2, 4, 8; tp > 1 with and without sp: 1 + 2 + 3
}

TEST_CASE("DeviceGPT tensor parallel bf16: tp 2, with and without sequence parallelism, within bf16 round-off of the single-rank bf16 run") {
  const Data d = make_data();
  const Run ref = single<tc::bf16>(d);
  // The sums of the row-parallel products are rounded to bf16 once, after the fp32 all-reduce,
  // as the single-rank GEMM's epilogue rounds once, but the products' order differs: a few bf16
  // ulps (2^-8 relative) per layer, not more.
  for (bool sp : {false, true}) {
    CAPTURE(sp);
    const std::vector<Run> runs = parallel<tc::bf16>(d, 1, 2, sp);
    check_equal(runs, ref, 2e-2);
    const Run f32 = single<float>(d);
    CHECK(runs[0].params != f32.params);  // it did run in bf16
  }
}

TEST_CASE("DeviceGPT tensor parallel: tp that does not divide n_head, a tp group on another stream, or sequence parallelism over rows tp does not divide, is refused") {
  threads::run(2, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, other;
    GPT<float> init(tp_cfg, 5);
    tc::ThreadDeviceComm wrong_stream(world.split(0, world.rank()), other);
    CHECK_THROWS_WITH_AS(tc::DeviceGPT<float>(tp_cfg, init.parameters(), compute, 0, 1, &wrong_stream),
                         doctest::Contains("must run on the model's compute stream"), Error);
    return 0;
  });
  threads::run(3, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute;
    GPT<float> init(tp_cfg, 5);
    tc::ThreadDeviceComm tp3(world.split(0, world.rank()), compute);
    CHECK_THROWS_WITH_AS(tc::DeviceGPT<float>(tp_cfg, init.parameters(), compute, 0, 1, &tp3),
                         doctest::Contains("tp 3 does not divide n_head 4"), Error);
    return 0;
  });
  threads::run(2, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute;
    GPT<float> init(tp_cfg, 5);
    tc::ThreadDeviceComm tp2(world.split(0, world.rank()), compute);
    tc::DeviceGPT<float> m(tp_cfg, init.parameters(), compute, 0, 1, &tp2, true);
    Tensor<std::int32_t> odd(Shape{1, 13});  // 13 rows over tp 2
    for (std::int64_t t = 0; t < 13; ++t) odd(0, t) = static_cast<std::int32_t>(t);
    auto x = tc::to_device<std::int32_t>(odd, compute);
    CHECK_THROWS_WITH_AS(m.forward_backward(x, x, 1.f), doctest::Contains("splits the 1 x 13 = 13 rows of a micro-batch over tp 2"),
                         Error);
    return 0;
  });
}

TEST_SUITE_END();
