// DevicePipeline: pipeline parallelism of DeviceGPT stages on one GPU (threads sharing it,
// ThreadDeviceComm on each rank's compute stream). Each layout trains as one DeviceGPT over 6
// clipped AdamW steps (fp32: losses within 1e-5 relative at every step, the first gradient norm,
// the whole parameters and both AdamW moments gathered from the stages within 1e-5 norm-wise;
// the replicated parameters of one stage and the two copies of the tied wte bitwise equal on
// every rank): GPipe and 1F1B at pp 2 and 4 (pp 4 cuts an embedding-only and a head-only stage),
// with embedding dropout (each micro-batch's mask in its own slot), every dp x tp x pp layout of 2,
// 4 and 8 ranks with pp > 1 (with and without sequence parallelism), interleaved 1F1B with 2
// model chunks per rank (pp 2 and 4, and dp 2 x pp 2 x tp 2), ZB-H1's split backward (pp 2 and
// 4, dp 2 x pp 2 x tp 2, bf16), ZeRO-2 at dp 2 x pp 2 (the tied wte's bucket reduced after the
// embedding group's sum), ZeRO-3 under the pipeline bitwise ZeRO-2 (with and without the gathers
// queued ahead; 6 layers, so that a stage drops and gathers again), bf16 at pp 2 within bf16
// round-off; the stage layouts' host-side checks are in test_cuda_host.cpp; and the refusals.
// Needs a GPU (gpu_main.cpp skips without one).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/device_pipeline.cuh"
#include "tessera/cuda/thread_device_comm.cuh"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/schedule/gpipe.hpp"
#include "tessera/schedule/interleaved_one_f_one_b.hpp"
#include "tessera/schedule/one_f_one_b.hpp"
#include "tessera/schedule/zero_bubble_h1.hpp"

#include "device_training_support.hpp"

using namespace tessera;
namespace tc = tessera::cuda;

// A suite of its own (first run on a GPU): scripts/gpu_check.sh runs it under its own timeout.
TEST_SUITE_BEGIN("device pipeline");

namespace {

// device_test's small GPT (pp 4 puts the embedding alone on stage 0 and the head on stage 3).
const GPTConfig& pp_cfg = device_test::small_cfg;
using device_test::drop_cfg;
using device_test::kRows;
using device_test::kSteps;
using device_test::kT;
const optim::AdamWOptions& opts = device_test::adamw_opts;
using device_test::clip_scale;
using device_test::Data;
using device_test::flatten;
using device_test::kClip;
using device_test::rel_diff;

Data make_data(std::int64_t vocab) { return device_test::make_data(vocab, 41, kSteps, kRows, kT, 5, 1); }

struct Run {
  std::vector<double> losses;
  double first_norm = 0;
  std::vector<float> params, moments, second_moments;  // the whole model's, flat in the CPU order
  int pp_rank = 0, tp_rank = 0;
  std::vector<float> replicated;  // this rank's copies of the parameters every tp rank of its stage holds
  std::vector<float> tied;        // this rank's wte (first stage) or its copy (last stage); empty elsewhere
  std::int64_t master_elements = 0, chunk_elements = 0;  // ZeRO-3: the fp32 weights its chunks keep, and their sizes
};

// The whole parameters and moments (a pipeline's download: every chunk's, broadcast over the
// stages), and this rank's replicated parameters and tied wte copy as its chunks hold them.
// `zero_ddp` (ZeRO runs, one per chunk): the moments' shards are gathered over dp first.
template <class C>
void fill_whole(tc::DeviceGPT<C>& m, tc::DevicePipeline<C>* pipe, Run& r, const GPTConfig& cfg,
                const std::vector<tc::DeviceDataParallel*>& zero_ddp = {}) {
  GPT<float> back(cfg, 99);
  ParameterList<float> ps = back.parameters();
  optim::AdamW<float> opt(ps, opts);
  if (pipe != nullptr && !zero_ddp.empty()) {
    pipe->download(ps);
    std::size_t i = 0;
    for (tc::DeviceGPT<C>* c : pipe->chunks()) {
      const Shape flat{c->numel()};
      auto mm = tc::DeviceTensor<float>::empty(flat, c->stream()), vv = tc::DeviceTensor<float>::empty(flat, c->stream());
      zero_ddp[i]->gather(c->exp_avg_view(), mm);
      zero_ddp[i]->gather(c->exp_avg_sq_view(), vv);
      c->download_optimizer(opt, mm, vv);
      ++i;
    }
    pipe->broadcast_stages(opt);
  } else if (pipe != nullptr) {
    pipe->download(ps);
    pipe->download_optimizer(opt);
  } else {
    m.download(ps);
    m.download_optimizer(opt);
  }
  r.params = flatten(ps);
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const Tensor<float> e = opt.exp_avg(i).contiguous(), v = opt.exp_avg_sq(i).contiguous();
    r.moments.insert(r.moments.end(), e.data(), e.data() + e.numel());
    r.second_moments.insert(r.second_moments.end(), v.data(), v.data() + v.numel());
  }
  std::vector<tc::DeviceGPT<C>*> chunks{&m};
  if (pipe != nullptr) chunks = pipe->chunks();
  for (tc::DeviceGPT<C>* c : chunks) {
    if (c->sharded_parameters()) continue;  // ZeRO-3: no whole buffer to read the copies from
    const Tensor<float> mine = tc::to_host(tc::DeviceView<const float>(c->master_view()), c->stream());
    for (const tc::FlatParameter& f : c->flat_parameters()) {
      if (!f.tp_layout.is_shard())
        r.replicated.insert(r.replicated.end(), mine.data() + f.offset, mine.data() + f.offset + f.shape.numel());
      if (f.name == "wte.weight" && c->has_embedding() != c->has_head())
        r.tied.assign(mine.data() + f.offset, mine.data() + f.offset + f.shape.numel());
    }
  }
}

template <class C>
Run single(const Data& d, const GPTConfig& cfg) {
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
    m.step(opts, opts.lr, clip_scale(norm));
    r.losses.push_back(m.take_loss_sum() / static_cast<double>(kRows * kT));
  }
  fill_whole<C>(m, nullptr, r, cfg);
  return r;
}

enum class Kind { gpipe, one_f_one_b, interleaved, zb_h1 };

// `v` model chunks per rank: interleaved 1F1B only.
schedule::Schedule make_schedule(Kind k, int pp, int m, int v = 1) {
  if (k == Kind::gpipe) return schedule::GPipe{m}.build(pp);
  if (k == Kind::interleaved) return schedule::InterleavedOneFOneB{m, v}.build(pp);
  if (k == Kind::zb_h1) return schedule::ZeroBubbleH1{m}.build(pp);
  return schedule::OneFOneB{m}.build(pp);
}

// dp x pp x tp ranks as threads on one GPU: world rank = (pp rank x dp + dp rank) x tp + tp rank;
// `m` micro-batches of each dp rank's kRows / dp rows per step; `v` model chunks per rank
// (interleaved: each chunk a DeviceGPT stage, each with its own dp reduction).
template <class C>
std::vector<Run> pipelined(const Data& d, int dp, int pp, int tp, int m, Kind kind, bool sp, const GPTConfig& cfg,
                           int v = 1, bool overlap = false, int zero = 0) {
  const bool zero2 = zero >= 2;  // ZeRO-2 or 3: the gradients sharded (3: the weights too)
  return threads::run(dp * pp * tp, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    const int tp_rank = world.rank() % tp, dp_rank = world.rank() / tp % dp, pp_rank = world.rank() / (tp * dp);
    Comm tp_host = world.split(pp_rank * dp + dp_rank, tp_rank);
    Comm pp_host = world.split(dp_rank * tp + tp_rank, pp_rank);
    Comm dp_host = world.split(pp_rank * tp + tp_rank, dp_rank);
    const bool end_stage = pp_rank == 0 || pp_rank == pp - 1;
    Comm emb_host = world.split(end_stage ? dp_rank * tp + tp_rank : dp * tp + world.rank(), pp_rank);
    std::optional<tc::ThreadDeviceComm> tp_comm, dp_comm, emb_comm;
    if (tp > 1) tp_comm.emplace(tp_host, compute);
    tc::ThreadDeviceComm pp_comm(pp_host, compute);
    if (end_stage && pp > 1) emb_comm.emplace(emb_host, compute);
    GPT<float> init(cfg, 5);
    const StagePartition part = gpt_balanced_partition(cfg, pp * v);
    const schedule::Schedule sched = make_schedule(kind, pp, m, v);
    std::vector<std::unique_ptr<tc::DeviceGPT<C>>> owned;
    std::vector<tc::DeviceGPT<C>*> chunks;
    for (int s : sched.stages_of(pp_rank)) {
      owned.push_back(std::make_unique<tc::DeviceGPT<C>>(cfg, init.parameters(), compute, 0, zero2 ? dp : 1,
                                                         tp_comm ? &*tp_comm : nullptr, sp, tc::device_stage(part, s)));
      chunks.push_back(owned.back().get());
      if (zero2) owned.back()->shard_optimizer(dp_rank, dp);
    }
    tc::DevicePipeline<C> pipe(chunks, pp_comm, emb_comm ? &*emb_comm : nullptr, part, sched);
    tc::DeviceGPT<C>& model = *chunks.front();
    std::vector<std::unique_ptr<tc::DeviceDataParallel>> ddp;
    if (dp > 1) {  // no backward hook: finish() reduces every bucket after the step's backward passes
      dp_comm.emplace(dp_host, comm_stream);
      for (tc::DeviceGPT<C>* c : chunks) {
        auto buckets = tc::device_grad_buckets(c->numel(), c->ready_offsets(), 4000);
        if (zero2) {  // ZeRO-2: the stage's tied wte bucket waits for the embedding group's sum
          c->shard_gradients(std::move(buckets));
          ddp.push_back(std::make_unique<tc::DeviceDataParallel>(*dp_comm, compute, *c->bucket_gradients()));
          // ZeRO-3: the stage's weights gathered bucket by bucket (queued ahead with overlap, as train_gpt does)
          if (zero == 3) c->shard_parameters(*ddp.back(), overlap);
        } else {
          ddp.push_back(std::make_unique<tc::DeviceDataParallel>(*dp_comm, compute, c->gradient_view(), std::move(buckets)));
        }
      }
      if (overlap) {  // each chunk's last backward of the step (ZeRO-2: every backward) reduces its buckets
        std::vector<tc::DeviceDataParallel*> raw;
        for (auto& x : ddp) raw.push_back(x.get());
        pipe.overlap_data_parallel(raw);
      }
    }
    const std::int64_t rows = kRows / dp / m;
    Run r;
    r.pp_rank = pp_rank;
    r.tp_rank = tp_rank;
    for (int s = 0; s < kSteps; ++s) {
      for (tc::DeviceGPT<C>* c : chunks) c->zero_grad();
      std::vector<tc::DeviceTensor<std::int32_t>> xs, ys;
      std::vector<tc::DeviceMicroBatch> micro;
      for (int k = 0; k < m; ++k) {
        const std::int64_t lo = (dp_rank * m + k) * rows;
        xs.push_back(tc::to_device<std::int32_t>(d.x[static_cast<std::size_t>(s)].slice(0, lo, lo + rows).contiguous(), compute));
        ys.push_back(tc::to_device<std::int32_t>(d.y[static_cast<std::size_t>(s)].slice(0, lo, lo + rows).contiguous(), compute));
      }
      for (int k = 0; k < m; ++k)
        micro.push_back({xs[static_cast<std::size_t>(k)], ys[static_cast<std::size_t>(k)],
                         BatchPosition{.step = static_cast<std::uint64_t>(s), .first_row = (dp_rank * m + k) * rows}});
      pipe.forward_backward(micro, 1.f / static_cast<float>(kRows * kT));
      double norm = 0;
      if (zero2) {  // the tied wte summed before its (deferred) reduction; the norm's squares summed over dp
        pipe.reduce_tied_embedding();
        for (auto& x : ddp) x->finish();
        norm = pipe.grad_norm([&](tc::DeviceView<float> sum) { ddp.front()->all_reduce(sum); });
      } else {
        for (auto& x : ddp) x->finish();
        pipe.reduce_tied_embedding();
        norm = pipe.grad_norm();
      }
      if (s == 0) r.first_norm = norm;
      double local = 0;
      for (std::size_t i = 0; i < chunks.size(); ++i) {
        tc::DeviceGPT<C>* c = chunks[i];
        c->step(opts, opts.lr, clip_scale(norm));
        if (zero == 2) {  // every rank updated its shard: gather them all (ZeRO-3 keeps the shard only)
          const Shape shard{c->shard_end() - c->shard_begin()};
          ddp[i]->gather(tc::DeviceView<const float>(c->master_view().data + c->shard_begin(), shard), c->master_view());
          c->refresh_compute_copy();
        }
        local += c->take_loss_sum();
      }
      // The last stage's tp ranks each hold their dp rank's loss: sum over the world, each once.
      r.losses.push_back(world.all_reduce_value(local, ReduceOp::sum) / tp / static_cast<double>(kRows * kT));
    }
    std::vector<tc::DeviceDataParallel*> zero_ddp;
    if (zero2)
      for (auto& x : ddp) zero_ddp.push_back(x.get());
    fill_whole<C>(model, &pipe, r, cfg, zero_ddp);
    if (zero == 3)
      for (tc::DeviceGPT<C>* c : chunks) {
        r.master_elements += c->master_shard().numel() + c->master_view().numel();
        r.chunk_elements += c->numel();
      }
    return r;
  });
}

void check_equal(const std::vector<Run>& runs, const Run& ref, double tol) {
  CHECK(ref.losses.back() < ref.losses.front());  // it trained
  CHECK(ref.first_norm > kClip);                  // the steps clipped
  for (std::size_t r = 0; r < runs.size(); ++r) {
    CAPTURE(r);
    for (int s = 0; s < kSteps; ++s) {
      const double got = runs[r].losses[static_cast<std::size_t>(s)], want = ref.losses[static_cast<std::size_t>(s)];
      INFO("step " << s << ": pipelined " << got << ", single " << want);
      CHECK(std::abs(got - want) <= tol * std::abs(want));
    }
    INFO("gradient norm at step 0: pipelined " << runs[r].first_norm << ", single " << ref.first_norm);
    CHECK(std::abs(runs[r].first_norm - ref.first_norm) <= tol * ref.first_norm);
    CHECK(rel_diff(runs[r].params, ref.params) < tol);
    CHECK(rel_diff(runs[r].moments, ref.moments) < tol);
    CHECK(rel_diff(runs[r].second_moments, ref.second_moments) < 10 * tol);
    CHECK(runs[r].params == runs[0].params);  // every rank gathered the same whole model
    for (std::size_t q = 0; q < r; ++q) {
      // One stage's replicated parameters never drift apart, nor do the tied wte's two copies.
      if (runs[q].pp_rank == runs[r].pp_rank) CHECK(runs[q].replicated == runs[r].replicated);
      if (runs[q].tp_rank == runs[r].tp_rank && !runs[q].tied.empty() && !runs[r].tied.empty())
        CHECK(runs[q].tied == runs[r].tied);
    }
  }
}

}  // namespace

TEST_CASE("DevicePipeline GPipe and 1F1B at pp 2 and 4 (an embedding-only and a head-only stage at pp 4) train as one DeviceGPT, fp32 within 1e-5") {
  const Data d = make_data(pp_cfg.vocab_size);
  const Run ref = single<float>(d, pp_cfg);
  for (Kind kind : {Kind::gpipe, Kind::one_f_one_b})
    for (int pp : {2, 4}) {
      CAPTURE(pp);
      CAPTURE(static_cast<int>(kind));
      const std::vector<Run> runs = pipelined<float>(d, 1, pp, 1, 4, kind, false, pp_cfg);
      check_equal(runs, ref, 1e-5);
      CHECK(!runs.front().tied.empty());  // the first and last stage each hold a copy
      CHECK(runs.front().tied == runs.back().tied);
    }
}

TEST_CASE("DevicePipeline with embedding dropout: each micro-batch in flight keeps its own mask, fp32 within 1e-5") {
  const Data d = make_data(drop_cfg.vocab_size);
  const Run ref = single<float>(d, drop_cfg);
  CHECK(ref.losses != single<float>(d, pp_cfg).losses);  // the dropout is on
  check_equal(pipelined<float>(d, 1, 2, 1, 4, Kind::gpipe, false, drop_cfg), ref, 1e-5);
  check_equal(pipelined<float>(d, 1, 4, 1, 4, Kind::one_f_one_b, false, drop_cfg), ref, 1e-5);
}

TEST_CASE("DevicePipeline layout sweep: every dp x tp x pp of 2, 4 and 8 ranks with pp > 1, with and without sequence parallelism, equals the single-rank run (fp32, 1e-5)") {
  const Data d = make_data(drop_cfg.vocab_size);
  const Run ref = single<float>(d, drop_cfg);
  int layouts = 0;
  for (int world : {2, 4, 8})
    for (int pp : {2, 4})
      for (int tp = 1; pp * tp <= world; tp *= 2) {
        const int dp = world / (pp * tp);
        if (dp * pp * tp != world || tp > 4) continue;
        for (bool sp : {false, true}) {
          if (sp && tp == 1) continue;
          // The most micro-batches (4, 2 or 1) that split the dp rank's rows, each micro-batch's
          // rows x 13 splitting over tp under sequence parallelism (13 is odd: the rows must).
          int m = 4;
          while (m > 1 && (kRows / dp % m != 0 || (sp && kRows / dp / m % tp != 0))) m /= 2;
          REQUIRE((kRows / dp % m == 0 && (!sp || kRows / dp / m % tp == 0)));
          CAPTURE(m);
          CAPTURE(dp);
          CAPTURE(pp);
          CAPTURE(tp);
          CAPTURE(sp);
          check_equal(pipelined<float>(d, dp, pp, tp, m, Kind::one_f_one_b, sp, drop_cfg), ref, 1e-5);
          ++layouts;
        }
      }
  // pp 2: dp 1; dp 2, tp 2 (+sp); dp 4, dp 2 x tp 2 (+sp), tp 4 (+sp); pp 4: dp 1; dp 2, tp 2 (+sp).
  CHECK(layouts == 1 + (1 + 2) + (1 + 2 + 2) + 1 + (1 + 2));
}

TEST_CASE("DevicePipeline bf16 at pp 2 (and pp 2 x tp 2): within bf16 round-off of the single-rank bf16 run") {
  const Data d = make_data(pp_cfg.vocab_size);
  const Run ref = single<tc::bf16>(d, pp_cfg);
  // The boundary activations go through fp32 unchanged (bf16 -> fp32 -> bf16 is exact); only the
  // tied wte's two gradients are summed in another order.
  check_equal(pipelined<tc::bf16>(d, 1, 2, 1, 4, Kind::one_f_one_b, false, pp_cfg), ref, 2e-2);
  check_equal(pipelined<tc::bf16>(d, 1, 2, 2, 2, Kind::one_f_one_b, true, pp_cfg), ref, 2e-2);
}

TEST_CASE("DevicePipeline interleaved 1F1B: pp 2 x 2 chunks (one layer per stage), pp 1 x 2 chunks (hand-offs on the rank), pp 4 x 2 chunks, and with dp 2 and tp 2 (SP), fp32 within 1e-5") {
  // pp 2 x v 2 over pp_cfg's 4 pipeline layers: rank 0 holds the embedding and h.1, rank 1 h.0
  // and the head. pp 4 x v 2 needs 8: 6 blocks.
  const GPTConfig six{.vocab_size = 67, .n_positions = 16, .n_layer = 6, .n_head = 4, .d_model = 32, .embd_pdrop = 0.1};
  const Data d = make_data(pp_cfg.vocab_size);
  const Run ref = single<float>(d, pp_cfg);
  std::vector<Run> runs = pipelined<float>(d, 1, 2, 1, 4, Kind::interleaved, false, pp_cfg, 2);
  check_equal(runs, ref, 1e-5);
  CHECK(!runs[0].tied.empty());
  CHECK(runs[0].tied == runs[1].tied);
  check_equal(pipelined<float>(d, 2, 2, 2, 2, Kind::interleaved, true, pp_cfg, 2), ref, 1e-5);
  // pp 1 with 2 chunks: every hand-off stays on the rank, and the two wte copies are summed there.
  check_equal(pipelined<float>(d, 1, 1, 1, 4, Kind::interleaved, false, pp_cfg, 2), ref, 1e-5);
  const Run ref6 = single<float>(d, six);
  check_equal(pipelined<float>(d, 1, 4, 1, 4, Kind::interleaved, false, six, 2), ref6, 1e-5);
}

TEST_CASE("DevicePipeline ZB-H1 (split backward: I passes, deferred W passes) at pp 2 and 4, with dropout, and dp 2 x pp 2 x tp 2 with SP, fp32 within 1e-5") {
  const Data d = make_data(drop_cfg.vocab_size);
  const Run ref = single<float>(d, drop_cfg);
  for (int pp : {2, 4}) {
    CAPTURE(pp);
    check_equal(pipelined<float>(d, 1, pp, 1, 4, Kind::zb_h1, false, drop_cfg), ref, 1e-5);
  }
  check_equal(pipelined<float>(d, 2, 2, 2, 2, Kind::zb_h1, true, drop_cfg), ref, 1e-5);
  // bf16: the deferred products read the same bf16 operands the fused backward reads.
  const Run ref16 = single<tc::bf16>(d, pp_cfg);
  check_equal(pipelined<tc::bf16>(d, 1, 2, 1, 4, Kind::zb_h1, false, pp_cfg), ref16, 2e-2);
}

TEST_CASE("DevicePipeline with the dp reduction overlapped with the step's backward passes (each chunk's last backward reduces its buckets): dp 2 x pp 2 under 1F1B, GPipe and interleaved 1F1B, and dp 2 x pp 2 x tp 2 with SP, bitwise the run that reduces after the step; ZB-H1 refused") {
  const Data d = make_data(pp_cfg.vocab_size);
  const Run ref = single<float>(d, pp_cfg);
  struct Case {
    Kind kind;
    int tp, m, v;
    bool sp;
  };
  for (const Case c : {Case{Kind::one_f_one_b, 1, 2, 1, false}, Case{Kind::gpipe, 1, 2, 1, false},
                       Case{Kind::interleaved, 1, 2, 2, false}, Case{Kind::one_f_one_b, 2, 2, 1, true}}) {
    CAPTURE(static_cast<int>(c.kind));
    CAPTURE(c.tp);
    const std::vector<Run> after = pipelined<float>(d, 2, 2, c.tp, c.m, c.kind, c.sp, pp_cfg, c.v);
    const std::vector<Run> overlapped = pipelined<float>(d, 2, 2, c.tp, c.m, c.kind, c.sp, pp_cfg, c.v, true);
    check_equal(overlapped, ref, 1e-5);
    REQUIRE(after.size() == overlapped.size());
    for (std::size_t r = 0; r < after.size(); ++r) {
      CAPTURE(r);
      CHECK(overlapped[r].params == after[r].params);  // the same sums, in the same order
      CHECK(overlapped[r].losses == after[r].losses);
    }
  }
  threads::run(2, [&](Comm& world) {  // a split backward finishes its weight gradients in the W passes
    tc::set_device(0);
    const tc::Stream compute;
    tc::ThreadDeviceComm pp_comm(world.split(0, world.rank()), compute);
    tc::ThreadDeviceComm emb(world.split(0, world.rank()), compute);
    GPT<float> init(pp_cfg, 5);
    const StagePartition part = gpt_balanced_partition(pp_cfg, 2);
    tc::DeviceGPT<float> m(pp_cfg, init.parameters(), compute, 0, 1, nullptr, false, tc::device_stage(part, world.rank()));
    tc::DevicePipeline<float> pipe(m, pp_comm, &emb, part, schedule::ZeroBubbleH1{4}.build(2));
    CHECK(pipe.splits_backward());
    CHECK_THROWS_WITH_AS(pipe.overlap_data_parallel({nullptr}), doctest::Contains("splits backward"), Error);
    CHECK_THROWS_WITH_AS(pipe.overlap_data_parallel({}), doctest::Contains("0 data-parallel reductions for 1 model chunks"),
                         Error);
  });
}

// The ZeRO-2 and ZeRO-3 pipeline layouts (dp 2): pp 4 cuts an embedding-only stage, two middle
// stages without the tied wte and a head-only one.
struct ZeroCase {
  Kind kind;
  int pp, tp, m, v;
  bool sp, overlap;
};
const ZeroCase kZeroCases[] = {{Kind::one_f_one_b, 2, 1, 2, 1, false, true}, {Kind::one_f_one_b, 2, 1, 2, 1, false, false},
                               {Kind::gpipe, 2, 1, 4, 1, false, true},       {Kind::interleaved, 2, 1, 2, 2, false, true},
                               {Kind::interleaved, 2, 1, 2, 2, false, false}, {Kind::one_f_one_b, 2, 2, 2, 1, true, true},
                               {Kind::one_f_one_b, 2, 2, 2, 1, true, false},  {Kind::one_f_one_b, 4, 1, 4, 1, false, true}};

TEST_CASE("DevicePipeline with ZeRO-2 (each rank keeps its shard of a stage's gradients; the tied wte's bucket reduced after the embedding group's sum): dp 2 x pp 2 under 1F1B, GPipe and interleaved 1F1B, dp 2 x pp 2 x tp 2 with SP (overlapped and after the step), and dp 2 x pp 4, fp32 within 1e-5") {
  const Data d = make_data(pp_cfg.vocab_size);
  const Run ref = single<float>(d, pp_cfg);
  for (const ZeroCase c : kZeroCases) {
    CAPTURE(static_cast<int>(c.kind));
    CAPTURE(c.pp);
    CAPTURE(c.tp);
    CAPTURE(c.overlap);
    check_equal(pipelined<float>(d, 2, c.pp, c.tp, c.m, c.kind, c.sp, pp_cfg, c.v, c.overlap, 2), ref, 1e-5);
  }
}

TEST_CASE("DevicePipeline with ZeRO-3 (each stage keeps its shard of its fp32 weights, gathered bucket by bucket as its schedule's passes need them): the same layouts as ZeRO-2's, and 6 layers at pp 2 (buckets dropped and gathered again; with and without the gathers queued ahead), bitwise ZeRO-2 of the same layout") {
  const Data d = make_data(pp_cfg.vocab_size);
  const Run ref = single<float>(d, pp_cfg);
  for (const ZeroCase c : kZeroCases) {
    CAPTURE(static_cast<int>(c.kind));
    CAPTURE(c.pp);
    CAPTURE(c.tp);
    CAPTURE(c.overlap);
    const std::vector<Run> zero3 = pipelined<float>(d, 2, c.pp, c.tp, c.m, c.kind, c.sp, pp_cfg, c.v, c.overlap, 3);
    const std::vector<Run> zero2 = pipelined<float>(d, 2, c.pp, c.tp, c.m, c.kind, c.sp, pp_cfg, c.v, c.overlap, 2);
    check_equal(zero3, ref, 1e-5);
    for (std::size_t r = 0; r < zero3.size(); ++r) {
      CAPTURE(r);
      CHECK(zero3[r].losses == zero2[r].losses);  // the same weights gathered, the same sums
      CHECK(zero3[r].params == zero2[r].params);
      CHECK(zero3[r].moments == zero2[r].moments);
      CHECK(zero3[r].second_moments == zero2[r].second_moments);
      CHECK(zero3[r].first_norm == zero2[r].first_norm);
      CHECK(zero3[r].master_elements * 2 == zero3[r].chunk_elements);  // its shards only (dp 2), no whole buffer
    }
  }
  // 6 layers at pp 2: a stage holds more buckets than stay gathered (3), so 1F1B's alternating
  // passes drop and gather again; with and without the gathers queued ahead.
  const GPTConfig six{.vocab_size = 67, .n_positions = 16, .n_layer = 6, .n_head = 4, .d_model = 32, .embd_pdrop = 0.1};
  const Run ref6 = single<float>(d, six);
  for (const bool overlap : {true, false}) {
    CAPTURE(overlap);
    const std::vector<Run> zero3 = pipelined<float>(d, 2, 2, 1, 4, Kind::one_f_one_b, false, six, 1, overlap, 3);
    const std::vector<Run> zero2 = pipelined<float>(d, 2, 2, 1, 4, Kind::one_f_one_b, false, six, 1, overlap, 2);
    check_equal(zero3, ref6, 1e-5);
    for (std::size_t r = 0; r < zero3.size(); ++r) {
      CAPTURE(r);
      CHECK(zero3[r].losses == zero2[r].losses);
      CHECK(zero3[r].params == zero2[r].params);
      CHECK(zero3[r].second_moments == zero2[r].second_moments);
    }
  }
}

TEST_CASE("DevicePipeline refuses a schedule for another chunk count, a zero-bubble schedule beside a backward hook, a partition entry that is not the stage, a missing embedding group, and whole-model calls on a stage") {
  threads::run(2, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute;
    tc::ThreadDeviceComm pp_comm(world.split(0, world.rank()), compute);
    tc::ThreadDeviceComm emb(world.split(0, world.rank()), compute);
    GPT<float> init(pp_cfg, 5);
    const StagePartition part = gpt_balanced_partition(pp_cfg, 2);
    tc::DeviceGPT<float> m(pp_cfg, init.parameters(), compute, 0, 1, nullptr, false, tc::device_stage(part, world.rank()));
    CHECK_THROWS_WITH_AS(tc::DevicePipeline<float>(m, pp_comm, &emb, part, schedule::InterleavedOneFOneB{4, 2}.build(2)),
                         doctest::Contains("has 2 model chunks per rank, this rank gave 1"), Error);
    m.set_backward_hook([](std::int64_t) {});
    CHECK_THROWS_WITH_AS(tc::DevicePipeline<float>(m, pp_comm, &emb, part, schedule::ZeroBubbleH1{4}.build(2)),
                         doctest::Contains("a backward hook is set"), Error);
    m.set_backward_hook({});
    CHECK_THROWS_WITH_AS(tc::DevicePipeline<float>(m, pp_comm, nullptr, part, schedule::OneFOneB{4}.build(2)),
                         doctest::Contains("needs the embedding group"), Error);
    const StagePartition other = StagePartition::from_cuts(4, {1});
    REQUIRE(other.begin(1) != part.begin(1));  // balanced: [embedding, h.0], [h.1, head]
    CHECK_THROWS_WITH_AS(tc::DevicePipeline<float>(m, pp_comm, &emb, other, schedule::OneFOneB{4}.build(2)),
                         doctest::Contains("the partition gives it"), Error);
    Tensor<std::int32_t> t(Shape{1, 5});
    auto x = tc::to_device<std::int32_t>(t, compute);
    CHECK_THROWS_WITH_AS(m.forward_backward(x, x, 1.f), doctest::Contains("use stage_forward"), Error);
    return 0;
  });
}

TEST_SUITE_END();
