// PipelineParallel on thread ranks: equivalence with the serial GPT for pp 2..4, m 1..8 and
// every schedule; peak in-flight counts; CASES.md C5 (accumulation) and C6 (batched ticks);
// tied weights; errors; the recorded timeline, its Chrome trace and its picture; the activation
// memory each rank measures against the analytic count and Korthikanti et al.'s formula.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <memory>
#include <chrono>
#include <string>
#include <tuple>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "pipe_bodies.hpp"
#include "tessera/core/allocation_counter.hpp"
#include "tessera/core/memory_tracker.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;
namespace pb = pipe_bodies;

namespace {
bool interleaved_valid(int p, int m) { return m >= p && (m % p == 0 || m % p >= p); }
}  // namespace

TEST_CASE("PipelineParallel: 5 steps of GPipe and 1F1B for pp 2, 3, 4 and m 1..8 equal 5 serial steps on the whole batch") {
  for (int pp : {2, 3, 4})
    for (auto kind : {PipelineScheduleKind::gpipe, PipelineScheduleKind::one_f_one_b})
      for (int m = 1; m <= 8; ++m) {
        const auto reports = testing::run_ranks(pp, [&](Comm& comm) { return pb::gpt_equivalence_body(comm, kind, m); });
        for (const pb::EquivReport& r : reports) pb::check_equivalence(r);
      }
}

TEST_CASE("PipelineParallel: 5 steps of interleaved 1F1B (v = 2) for pp 2, 3, 4 equal 5 serial steps, wherever m is valid") {
  int runs = 0;
  for (int pp : {2, 3, 4})
    for (int m = 1; m <= 8; ++m) {
      if (!interleaved_valid(pp, m)) continue;
      ++runs;
      const auto reports = testing::run_ranks(pp, [&](Comm& comm) {
        return pb::gpt_equivalence_body(comm, PipelineScheduleKind::interleaved_one_f_one_b, m, 2);
      });
      for (const pb::EquivReport& r : reports) pb::check_equivalence(r, 2);
    }
  CHECK(runs == 8);  // pp 2: m 2, 4, 6, 8; pp 3: m 3, 6; pp 4: m 4, 8
}

TEST_CASE("PipelineParallel: one rank holding all stages (pp = 1) equals serial, with one stage and with two chunks") {
  for (int m : {1, 3, 8}) {
    const auto one = testing::run_ranks(1, [&](Comm& c) { return pb::gpt_equivalence_body(c, PipelineScheduleKind::one_f_one_b, m); });
    pb::check_equivalence(one[0]);
    const auto two = testing::run_ranks(1, [&](Comm& c) {
      return pb::gpt_equivalence_body(c, PipelineScheduleKind::interleaved_one_f_one_b, m, 2);
    });
    pb::check_equivalence(two[0], 2);  // stage 0 and its tied copy on stage 1 are on the same rank
  }
}

TEST_CASE("PipelineParallel: C5, 2 stages x 2 micro-batches x 2 accumulation steps give the gradients of 1 stage x 4 micro-batches") {
  const auto reports = testing::run_ranks(2, [](Comm& comm) { return pb::c5_body(comm); });
  for (const pb::C5Report& r : reports) pb::check_c5(r);
}

TEST_CASE("PipelineParallel: a batch smaller than m, mismatched targets, wrong chunks and a deadlocking hand-built schedule are rejected on every rank") {
  const auto reports = testing::run_ranks(2, [](Comm& comm) { return pb::errors_body(comm); });
  for (const pb::ErrorReport& r : reports) pb::check_errors(r);
}

namespace {
// Forwards to another backend, counting batched groups, the operations in them, and single
// point-to-point calls.
struct P2PCounts {
  std::atomic<int> batches{0}, batch_ops{0}, singles{0};
};
class CountingBackend final : public CommBackend {
 public:
  CountingBackend(std::shared_ptr<CommBackend> inner, std::shared_ptr<P2PCounts> counts)
      : inner_(std::move(inner)), counts_(std::move(counts)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string name() const override { return inner_->name(); }
  void set_name(std::string n) override { inner_->set_name(std::move(n)); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  void set_timeout(std::chrono::milliseconds t) override { inner_->set_timeout(t); }
  Request all_reduce(void* d, std::size_t n, DType t, ReduceOp op, bool async) override {
    return inner_->all_reduce(d, n, t, op, async);
  }
  Request all_gather(const void* in, void* out, std::size_t n, DType t, bool async) override {
    return inner_->all_gather(in, out, n, t, async);
  }
  Request reduce_scatter(const void* in, void* out, std::size_t n, DType t, ReduceOp op, bool async) override {
    return inner_->reduce_scatter(in, out, n, t, op, async);
  }
  void broadcast(void* d, std::size_t n, DType t, int root) override { inner_->broadcast(d, n, t, root); }
  Request send(const void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    ++counts_->singles;
    return inner_->send(d, n, t, peer, tag, async);
  }
  Request recv(void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    ++counts_->singles;
    return inner_->recv(d, n, t, peer, tag, async);
  }
  Request batch_p2p(std::span<const P2POp> ops) override {
    ++counts_->batches;
    counts_->batch_ops += static_cast<int>(ops.size());
    return inner_->batch_p2p(ops);
  }
  void barrier() override { inner_->barrier(); }
  std::shared_ptr<CommBackend> split(int color, int key) override {
    return std::make_shared<CountingBackend>(inner_->split(color, key), counts_);
  }

 private:
  std::shared_ptr<CommBackend> inner_;
  std::shared_ptr<P2PCounts> counts_;
};
}  // namespace

TEST_CASE("PipelineParallel: C6, every tick's transfers go out as one batched group; no other point-to-point call is made") {
  for (auto kind : {PipelineScheduleKind::gpipe, PipelineScheduleKind::one_f_one_b,
                    PipelineScheduleKind::interleaved_one_f_one_b}) {
    const int v = kind == PipelineScheduleKind::interleaved_one_f_one_b ? 2 : 1;
    const auto counts = testing::run_ranks(3, [&](Comm& world) {
      auto c = std::make_shared<P2PCounts>();
      Comm comm(std::make_shared<CountingBackend>(world.backend_ptr(), c));
      pb::GPTPipe pipe = pb::make_gpt_pipe(comm, {.schedule = kind, .virtual_stages = v});
      pipe.zero_grad();
      pipe.step(pb::tokens(8), pb::targets(8), 6);
      const schedule::Schedule s =
          v == 1 ? (kind == PipelineScheduleKind::gpipe ? schedule::GPipe{.num_microbatches = 6}.build(3)
                                                        : schedule::OneFOneB{.num_microbatches = 6}.build(3))
                 : schedule::InterleavedOneFOneB{.num_microbatches = 6, .virtual_stages = 2}.build(3);
      int ticks = 0, transfers = 0;
      for (const schedule::Tick& t : s.ticks[static_cast<std::size_t>(world.rank())]) {
        const auto n = std::count_if(t.begin(), t.end(), [](const schedule::Action& a) { return a.is_transfer(); });
        ticks += n > 0;
        transfers += static_cast<int>(n);
      }
      return std::vector<int>{c->batches.load(), c->batch_ops.load(), c->singles.load(), ticks, transfers};
    });
    for (const auto& c : counts) {
      CAPTURE(static_cast<int>(kind));
      CHECK(c[0] == c[3]);  // one batched group per tick that has transfers
      CHECK(c[1] == c[4]);  // holding exactly that tick's transfers
      CHECK(c[2] == 0);     // and nothing sent or received outside a group
      CHECK(c[3] > 0);
    }
  }
}

TEST_CASE("PipelineParallel: the timeline holds every F and B of every rank in schedule order, as Chrome trace JSON and SVG") {
  const auto outs = testing::run_ranks(4, [](Comm& comm) {
    pb::GPTPipe pipe = pb::make_gpt_pipe(comm, {.schedule = PipelineScheduleKind::one_f_one_b});
    pipe.zero_grad();
    pipe.step(pb::tokens(8), pb::targets(8), 8);
    return pipe.timeline();
  });
  const schedule::Schedule s = schedule::OneFOneB{.num_microbatches = 8}.build(4);
  for (const schedule::Timeline& t : outs) {
    CHECK(t.num_ranks == 4);
    CHECK(t.title == "1F1B (p=4, m=8)");
    for (int r = 0; r < 4; ++r) {
      std::vector<schedule::Action> computes;
      for (const schedule::TimelineEvent& e : t.of_rank(r)) {
        CHECK(e.end >= e.start);
        if (e.action.is_compute()) computes.push_back(e.action);
      }
      CHECK(computes == s.compute_order(r));
    }
    // Transfers are recorded too: one event per SEND/RECV action of the schedule.
    std::size_t transfers = 0, want = 0;
    for (const schedule::TimelineEvent& e : t.events) transfers += e.action.is_transfer();
    for (const auto& rank : s.ticks)
      for (const schedule::Tick& tick : rank)
        for (const schedule::Action& a : tick) want += a.is_transfer();
    CHECK(transfers == want);
  }
  const schedule::Timeline& t = outs[0];
  const schedule::BubbleStats b = schedule::bubble_stats(t);
  CHECK(b.busy.size() == 4);
  for (double f : b.bubble_fraction) CHECK((f > 0.0 && f < 1.0));
  const std::string report = schedule::to_string(b);
  CHECK(report.find("rank 3: ") != std::string::npos);
  CHECK(report.find("bubble ratio") != std::string::npos);
  const nlohmann::json doc = nlohmann::json::parse(schedule::chrome_trace(t).dump());
  int x = 0;
  for (const auto& e : doc.at("traceEvents")) x += e.at("ph") == "X";
  CHECK(static_cast<std::size_t>(x) == t.events.size());
  const std::string svg = schedule::to_svg(t);
  std::size_t boxes = 0;
  for (std::size_t i = svg.find("<rect class=\"F\""); i != std::string::npos; i = svg.find("<rect class=\"F\"", i + 1)) ++boxes;
  CHECK(boxes == 4 * 8);
}

TEST_CASE("PipelineParallel: shapes are exchanged only when m or the input shape changes; odd batch sizes get tensor_split sizes") {
  const auto outs = testing::run_ranks(2, [](Comm& comm) {
    pb::GPTPipe pipe = pb::make_gpt_pipe(comm, {.schedule = PipelineScheduleKind::gpipe});
    std::vector<int> exchanged;
    std::vector<std::vector<std::int64_t>> sizes;
    for (auto [n, m] : {std::pair{8, 4}, {8, 4}, {7, 4}, {7, 3}, {7, 3}}) {
      pipe.zero_grad();
      pipe.step(pb::tokens(n), pb::targets(n), m);
      exchanged.push_back(pipe.last_step().shapes_exchanged);
      sizes.push_back(pipe.last_step().microbatch_sizes);
    }
    return std::pair{exchanged, sizes};
  });
  for (const auto& [exchanged, sizes] : outs) {
    CHECK(exchanged == std::vector<int>{1, 0, 1, 1, 0});
    CHECK(sizes[2] == std::vector<std::int64_t>{2, 2, 2, 1});
    CHECK(sizes[3] == std::vector<std::int64_t>{3, 2, 2});
  }
}

TEST_CASE("PipelineParallel: sum normalization returns the summed loss and unscaled gradients; clip_grad_norm clips the global norm on every rank") {
  const auto outs = testing::run_ranks(2, [](Comm& comm) {
    const auto cfg = pb::tiny_config();
    const StagePartition cut = StagePartition::even(gpt_pipeline_num_layers(cfg), 2);
    pb::GPTPipe mean = pb::make_gpt_pipe(comm, {});
    pb::GPTPipe sum(
        comm, [&](int s) { return make_gpt_pipeline_stage<float>(cfg, pb::seed, cut, s); },
        nn::CrossEntropy<float>({.ignore_index = -100, .reduction = nn::Reduction::sum}),
        {.loss_normalization = LossNormalization::sum});
    mean.zero_grad();
    sum.zero_grad();
    const double lm = mean.step(pb::tokens(8), pb::targets(8), 4);
    const double ls = sum.step(pb::tokens(8), pb::targets(8), 4);
    const std::int64_t n = mean.last_step().num_valid;
    const double nm = mean.grad_norm(), ns = sum.grad_norm();
    const double before = mean.clip_grad_norm(0.5 * nm);
    const double after = mean.grad_norm();
    return std::vector<double>{lm, ls, static_cast<double>(n), nm, ns, before, after};
  });
  for (const auto& v : outs) {
    CHECK(v[2] == 8 * 8 - 8 * 8 / 5);  // every 5th of the 64 targets is ignored
    CHECK(v[1] == doctest::Approx(v[0] * v[2]).epsilon(1e-6));
    CHECK(v[4] == doctest::Approx(v[3] * v[2]).epsilon(1e-5));
    CHECK(v[5] == v[3]);
    CHECK(v[6] == doctest::Approx(0.5 * v[3]).epsilon(1e-5));
  }
  CHECK(outs[0] == outs[1]);  // every rank returns the same loss and norms
}

TEST_CASE("PipelineParallel: a hand-written V-shaped schedule (stages 0 and 3 on rank 0) runs with its own placement and ties wte locally") {
  using schedule::Action;
  const schedule::Schedule v{
      .name = "V",
      .pp_size = 2,
      .num_microbatches = 1,
      .virtual_stages = 2,
      .ticks = {{{Action::forward(0, 0), Action::send_forward(0, 0, 1)},
                 {Action::recv_forward(0, 3, 1)},
                 {Action::forward(0, 3), Action::backward(0, 3), Action::send_backward(0, 3, 1)},
                 {Action::recv_backward(0, 0, 1)},
                 {Action::backward(0, 0)}},
                {{Action::recv_forward(0, 1, 0)},
                 {Action::forward(0, 1), Action::forward(0, 2), Action::send_forward(0, 2, 0)},
                 {Action::recv_backward(0, 2, 0)},
                 {Action::backward(0, 2), Action::backward(0, 1), Action::send_backward(0, 1, 0)}}},
      .stage_ranks = {0, 1, 1, 0}};
  const pb::SerialRun& ref = pb::serial_reference();
  const auto outs = testing::run_ranks(2, [&](Comm& comm) {
    pb::GPTPipe pipe = pb::make_gpt_pipe(comm, {.schedule = PipelineScheduleKind::interleaved_one_f_one_b,
                                                .virtual_stages = 2,
                                                .stage_ranks = {0, 1, 1, 0}});
    pipe.zero_grad();
    const double loss = pipe.step(pb::tokens(8), pb::targets(8), v);
    testing::WorstError err;  // a NaN is +inf, not dropped
    for (Parameter<float>& p : pipe.parameters()) err.add(pb::rel_err(p.grad.data(), ref.first_grads.at(p.name)));
    bool tied_equal = true;
    if (comm.rank() == 0) {
      const Parameter<float>& a = pipe.stage(0).tied_parameters()[0];
      const Parameter<float>& b = pipe.stage(3).tied_parameters()[0];
      tied_equal = testing::bitwise_equal_finite(pb::values_of(a.grad), pb::values_of(b.grad)) &&
                   testing::bitwise_equal_finite(pb::values_of(a.value), pb::values_of(b.value));
    }
    return std::tuple{loss, err.value(), tied_equal, pipe.stage_indices(), pipe.last_step().peak_in_flight};
  });
  for (int r = 0; r < 2; ++r) {
    const auto& [loss, err, tied_equal, stages, peak] = outs[static_cast<std::size_t>(r)];
    CHECK(loss == doctest::Approx(ref.losses[0]).epsilon(1e-6));
    CHECK(err < 1e-5);
    CHECK(tied_equal);
    CHECK(stages == (r == 0 ? std::vector<int>{0, 3} : std::vector<int>{1, 2}));
    CHECK(peak == 2);
  }
}

// ---- ZB-H1: split backward ---------------------------------------------------------------------------

TEST_CASE("ZB-H1: the GPT at pp 2 and 4, m 4 and 8 equals the serial model and 1F1B bitwise (losses and parameters)") {
  for (int pp : {2, 4})
    for (int m : {4, 8}) {
      CAPTURE(pp);
      CAPTURE(m);
      const auto reports = testing::run_ranks(pp, [&](Comm& comm) {
        return pb::gpt_equivalence_body(comm, PipelineScheduleKind::zero_bubble_h1, m);
      });
      for (const pb::EquivReport& r : reports) pb::check_equivalence(r);  // serial, peak min(p, m), tied bitwise
      const auto zb = testing::run_ranks(pp, [&](Comm& comm) { return pb::zb_vs_1f1b_body(comm, m); });
      for (const pb::ZbReport& r : zb) {
        CHECK(r.losses_bitwise);
        CHECK(r.params_bitwise);
        CHECK(r.i_events == pp * m);
        CHECK(r.w_events == pp * m);
        CHECK(r.b_events == 0);
      }
    }
}

namespace {
// The gradients of every parameter of `ps`, copied.
std::vector<std::vector<float>> grads_of(const ParameterList<float>& ps) {
  std::vector<std::vector<float>> out;
  for (const Parameter<float>& p : ps) {
    const auto v = pb::values_of(p.grad);
    out.emplace_back(v.begin(), v.end());
  }
  return out;
}
// A (shape) tensor of normal(0, 1) values from the stream `seed`.
Tensor<float> randn(const Shape& shape, std::uint64_t seed) {
  Tensor<float> t = Tensor<float>::empty(shape);
  fill_normal(t, seed, "test", 1.0);
  return t;
}
}  // namespace

TEST_CASE("Linear and LMHead: backward_input + backward_weight, and backward under DeferWeightGrads, equal the fused backward bitwise") {
  nn::Linear<float> lin(6, 5, {.prefix = "l", .seed = 3, .std = 0.5});
  const Tensor<float> x = randn(Shape{2, 3, 6}, 11), dy = randn(Shape{2, 3, 5}, 12);
  auto [y, ctx] = lin.forward(x);
  lin.parameters().zero_grad();
  const Tensor<float> dx_fused = lin.backward(dy, ctx);
  const auto fused = grads_of(lin.parameters());
  lin.parameters().zero_grad();
  const Tensor<float> dx_split = lin.backward_input(dy, ctx);
  for (const Parameter<float>& p : lin.parameters())  // the I pass leaves the weights' gradients alone
    CHECK(std::ranges::all_of(pb::values_of(p.grad), [](float g) { return g == 0.0f; }));
  lin.backward_weight(dy, ctx);
  CHECK(testing::bitwise_equal_finite(dx_fused, dx_split));
  CHECK(grads_of(lin.parameters()) == fused);
  // Deferred through the queue: same dx now, same gradients after run().
  lin.parameters().zero_grad();
  nn::WeightGradQueue q;
  Tensor<float> dx_deferred;
  {
    const nn::DeferWeightGrads scope(q);
    dx_deferred = lin.backward(dy, ctx);
  }
  CHECK(nn::WeightGradQueue::active() == nullptr);
  CHECK(q.size() == 1);
  CHECK(q.held_bytes() == static_cast<std::int64_t>(sizeof(float)) * (x.numel() + dy.numel()));
  CHECK(std::ranges::all_of(pb::values_of(lin.weight().grad), [](float g) { return g == 0.0f; }));
  q.run();
  CHECK(q.empty());
  CHECK(testing::bitwise_equal_finite(dx_fused, dx_deferred));
  CHECK(grads_of(lin.parameters()) == fused);
  CHECK_THROWS_AS(lin.backward_input(Tensor<float>(Shape{2, 3, 4}), ctx), Error);

  nn::Embedding<float> emb(7, 6, {.prefix = "", .seed = 5, .std = 0.5});
  nn::LMHead<float> head(emb.weight());
  auto [logits, hctx] = head.forward(x);
  const Tensor<float> dl = randn(logits.shape(), 13);
  head.parameters().zero_grad();
  const Tensor<float> hdx = head.backward(dl, hctx);
  const auto hfused = grads_of(head.parameters());
  head.parameters().zero_grad();
  nn::WeightGradQueue hq;
  Tensor<float> hdx2;
  {
    const nn::DeferWeightGrads scope(hq);
    hdx2 = head.backward(dl, hctx);
  }
  CHECK(hq.size() == 1);
  hq.run();
  CHECK(testing::bitwise_equal_finite(hdx, hdx2));
  CHECK(grads_of(head.parameters()) == hfused);
}

TEST_CASE("A GPT stage's backward_input defers its Linears' and the LM head's weight gradients to backward_weight; LayerNorm and the embedding fall back to I") {
  const GPTConfig cfg = pb::tiny_config();
  const StagePartition cut = StagePartition::even(gpt_pipeline_num_layers(cfg), 2, gpt_pipeline_layer_names(cfg));
  for (int s : {0, 1}) {
    CAPTURE(s);
    auto fused = make_gpt_pipeline_stage<float>(cfg, pb::seed, cut, s);
    auto split = make_gpt_pipeline_stage<float>(cfg, pb::seed, cut, s);
    const Tensor<float> act = randn(Shape{2, pb::seq_len, cfg.d_model}, 21);
    StageOutput<float> a = s == 0 ? fused->forward_first(pb::tokens(2)) : fused->forward(act);
    StageOutput<float> b = s == 0 ? split->forward_first(pb::tokens(2)) : split->forward(act);
    const Tensor<float> dy = randn(a.output.shape(), 22);
    const Tensor<float> dx_a = fused->backward(dy, a.ctx);
    nn::WeightGradQueue q;
    const Tensor<float> dx_b = split->backward_input(dy, b.ctx, q);
    if (s == 1) CHECK(testing::bitwise_equal_finite(dx_a, dx_b));
    // 4 Linears per block (c_attn, c_proj, c_fc, c_proj), 3 blocks per stage, + the LM head on the last.
    CHECK(q.size() == static_cast<std::size_t>(4 * 3 + (s == 1 ? 1 : 0)));
    ParameterList<float> pa = fused->parameters(), pb_ = split->parameters();
    for (std::size_t i = 0; i < pa.size(); ++i) {
      CAPTURE(pa[i].name);
      const bool deferred = pa[i].name.find(".c_") != std::string::npos || (s == 1 && pa[i].name == "wte.weight");
      const bool zero = std::ranges::all_of(pb::values_of(pb_[i].grad), [](float g) { return g == 0.0f; });
      CHECK(zero == deferred);  // LayerNorms and embeddings computed theirs in I (fused fallback)
    }
    split->backward_weight(q);
    CHECK(q.empty());
    for (std::size_t i = 0; i < pa.size(); ++i) {
      CAPTURE(pa[i].name);
      CHECK(testing::bitwise_equal_finite(pb::values_of(pa[i].grad), pb::values_of(pb_[i].grad)));
    }
  }
}

// ---- activation recomputation -----------------------------------------------------------------------

TEST_CASE("Recomputation: selective and full give the GPT's losses and parameters bitwise under GPipe, 1F1B, interleaved 1F1B and ZB-H1") {
  struct Case {
    PipelineScheduleKind kind;
    int pp, m, v;
  };
  for (const Case c : {Case{PipelineScheduleKind::gpipe, 2, 4, 1}, Case{PipelineScheduleKind::one_f_one_b, 4, 8, 1},
                       Case{PipelineScheduleKind::interleaved_one_f_one_b, 2, 4, 2},
                       Case{PipelineScheduleKind::zero_bubble_h1, 2, 4, 1}, Case{PipelineScheduleKind::zero_bubble_h1, 4, 8, 1}})
    for (nn::Recompute rc : {nn::Recompute::selective, nn::Recompute::full}) {
      CAPTURE(static_cast<int>(c.kind));
      CAPTURE(c.pp);
      CAPTURE(nn::to_string(rc));
      const auto reports =
          testing::run_ranks(c.pp, [&](Comm& comm) { return pb::recompute_body(comm, c.kind, c.m, c.v, rc); });
      for (const pb::RecomputeReport& r : reports) {
        CHECK(r.losses_bitwise);
        CHECK(r.params_bitwise);
        CHECK(r.recomputed == r.expected_recomputed);  // full: one rerun forward per (stage, micro-batch)
        CHECK((rc == nn::Recompute::full) == (r.recompute_seconds > 0));
      }
    }
  CHECK(nn::parse_recompute("selective") == nn::Recompute::selective);
  CHECK_THROWS_WITH_AS(nn::parse_recompute("some"), doctest::Contains("'some' is not one of none, selective, full"), Error);
  // A per-stage list of the wrong length is refused on every rank, naming both counts.
  const auto errors = testing::run_ranks(2, [&](Comm& comm) {
    return pb::error_of([&] {
      pb::make_gpt_pipe(comm, {.schedule = PipelineScheduleKind::one_f_one_b, .stage_recompute = {nn::Recompute::full}});
    });
  });
  for (const std::string& e : errors) CHECK(e.find("stage_recompute has 1 entries, expected one per stage") != std::string::npos);
}

TEST_CASE("Recomputation: the activation bytes a 2-block stage keeps per micro-batch are within 10% of Korthikanti et al.'s count for our fp32 layers, and none > selective > full") {
  // A stage of two blocks (layers 1 and 2 of 6), b = 4, s = 32, h = 64, a = 4 heads.
  const GPTConfig cfg{.vocab_size = 40, .n_positions = 32, .n_layer = 4, .n_head = 4, .d_model = 64};
  const StagePartition cut = StagePartition::from_cuts(6, {1, 3});
  auto stage = make_gpt_pipeline_stage<float>(cfg, pb::seed, cut, 1);
  const std::int64_t b = 4, s = 32, h = 64, a = 4;
  const Tensor<float> x0 = randn(Shape{b, s, h}, 31);
  // What the executor keeps from F to B for one micro-batch: the stage's contexts (none,
  // selective) or only its input (full); the output goes to the next stage either way.
  auto kept = [&](nn::Recompute rc) {
    stage->forward(x0.clone());  // warm-up: any lazily built state exists before measuring
    // The tensor storage allocated from here on and still alive at the end (an
    // AllocationCounter, not the heap's statistics: those read 0 under AddressSanitizer).
    const auto counter = std::make_shared<AllocationCounter>();
    StageContext ctx;
    {
      const AllocationCounter::Scope scope(counter);
      Tensor<float> x = x0.clone();
      const nn::SelectiveRecompute selective(rc == nn::Recompute::selective);
      StageOutput<float> out = stage->forward(x);
      ctx = rc == nn::Recompute::full ? StageContext::hold(x) : std::move(out.ctx);
    }
    return counter->bytes();
  };
  const std::int64_t none = kept(nn::Recompute::none), selective = kept(nn::Recompute::selective),
                     full = kept(nn::Recompute::full);
  const std::int64_t f_none = 2 * nn::block_activation_bytes(b, s, h, a, nn::Recompute::none);
  const std::int64_t f_selective = 2 * nn::block_activation_bytes(b, s, h, a, nn::Recompute::selective);
  const std::int64_t f_full = b * s * h * 4;  // the stage input
  MESSAGE("kept per micro-batch (bytes): none ", none, " (formula ", f_none, "), selective ", selective, " (", f_selective,
          "), full ", full, " (", f_full, ")");
  CHECK(std::abs(double(none - f_none)) <= 0.1 * double(f_none));
  CHECK(std::abs(double(selective - f_selective)) <= 0.1 * double(f_selective));
  CHECK(std::abs(double(full - f_full)) <= 0.1 * double(f_full));
  CHECK(none > selective);
  CHECK(selective > full);
  // The probabilities are what selective drops: 2 blocks x a s^2 b floats.
  CHECK(std::abs(double(none - selective) - 2.0 * a * s * s * b * 4) <= 0.1 * (2.0 * a * s * s * b * 4));
}

TEST_CASE("Hybrid runs ZB-H1 with recomputation: dp 2 x pp 2 and tp 2 x pp 2 (sequence parallel) equal 1F1B without it bitwise") {
  for (const MeshShape shape : {MeshShape{.dp = 2, .pp = 2, .tp = 1}, MeshShape{.dp = 1, .pp = 2, .tp = 2}}) {
    CAPTURE(shape.dp);
    CAPTURE(shape.tp);
    const bool sp = shape.tp > 1;
    const auto same = testing::run_ranks(4, [&](Comm& w) {
      Mesh mesh(w, shape);
      auto run = [&](PipelineScheduleKind kind, nn::Recompute rc) {
        HybridGPT<float> model(mesh, pb::tiny_config(), pb::seed,
                               {.schedule = kind, .num_microbatches = 4, .recompute = rc}, std::nullopt,
                               {.sequence_parallel = sp});
        const int row = mesh.coord().dp;
        const double loss = model.forward_backward(pb::tokens(8, row), pb::targets(8, row));
        // What ran: the schedule's description and one rerun forward per micro-batch under full.
        const PipelineStepStats& st = model.pipeline().last_step();
        std::vector<float> out{static_cast<float>(loss), st.schedule.starts_with("ZB-H1") ? 1.0f : 0.0f,
                               static_cast<float>(st.recomputed_forwards)};
        for (const Parameter<float>& p : model.parameters()) {
          const auto g = pb::values_of(p.grad);
          out.insert(out.end(), g.begin(), g.end());
        }
        return out;
      };
      std::vector<float> a = run(PipelineScheduleKind::one_f_one_b, nn::Recompute::none);
      std::vector<float> b = run(PipelineScheduleKind::zero_bubble_h1, nn::Recompute::full);
      std::vector<float> c = run(PipelineScheduleKind::zero_bubble_h1, nn::Recompute::selective);
      const bool ran = a[1] == 0 && a[2] == 0 && b[1] == 1 && b[2] == 4 && c[1] == 1 && c[2] == 0;
      a[1] = b[1] = c[1] = a[2] = b[2] = c[2] = 0;  // compare the loss and the gradients
      return ran && testing::bitwise_equal_finite(std::span<const float>(a), std::span<const float>(b)) &&
             testing::bitwise_equal_finite(std::span<const float>(a), std::span<const float>(c)) && a.size() > 3;
    });
    for (bool s : same) CHECK(s);
  }
}

namespace {
// The activation-accounting runs: a GPT of 4 blocks (h 64, a 4, vocab 40, s 32), a batch of 16
// sequences in 4 micro-batches of b = 4, cut at pp 2 into [embedding, blocks 1-2] and
// [blocks 3-4, ln_f, LM head]. Each rank reports, for the second of two steps: the executor's
// peak activation bytes, the MemoryTracker's activations peak and live figure after the step,
// its pp and tp coordinates and its peak number of micro-batches in flight.
struct ActivationRun {
  std::int64_t peak = 0, tracker_peak = 0, tracker_live = 0;
  int pp_rank = 0, tp_rank = 0, in_flight = 0;
};
constexpr std::int64_t act_b = 4, act_s = 32, act_h = 64, act_a = 4, act_v = 40, act_m = 4;
std::vector<ActivationRun> activation_runs(MeshShape shape, PipelineScheduleKind kind, nn::Recompute rc, bool sp) {
  const GPTConfig cfg{.vocab_size = act_v, .n_positions = act_s, .n_layer = 4, .n_head = act_a, .d_model = act_h};
  return testing::run_ranks(shape.world_size(), [&](Comm& w) {
    Mesh mesh(w, shape);
    HybridGPT<float> model(mesh, cfg, pb::seed, {.schedule = kind, .num_microbatches = act_m, .recompute = rc},
                           StagePartition::from_cuts(6, shape.pp == 2 ? std::vector<int>{3} : std::vector<int>{}),
                           {.sequence_parallel = sp});
    Tensor<std::int32_t> x(Shape{act_b * act_m, act_s}), y(Shape{act_b * act_m, act_s});
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      x.data()[i] = static_cast<std::int32_t>((i * 7 + 3) % act_v);
      y.data()[i] = static_cast<std::int32_t>((i * 11 + 5) % act_v);
    }
    model.forward_backward(x, y);  // lazily built state exists before measuring
    MemoryTracker& t = MemoryTracker::this_rank();
    t.reset_peaks();
    model.forward_backward(x, y);
    const PipelineStepStats& st = model.pipeline().last_step();
    return ActivationRun{.peak = st.peak_activation_bytes,
                         .tracker_peak = static_cast<std::int64_t>(t.peak(MemoryCategory::activations)),
                         .tracker_live = static_cast<std::int64_t>(t.live(MemoryCategory::activations)),
                         .pp_rank = mesh.coord().pp,
                         .tp_rank = mesh.coord().tp,
                         .in_flight = st.peak_in_flight};
  });
}
}  // namespace

TEST_CASE("Activation memory: each rank's measured peak is blocks x layers on its stage x micro-batches in flight (pp 1 and 2; 1F1B and GPipe; recompute none, selective, full) within 10%, and the MemoryTracker reports it") {
  const std::int64_t b = act_b, s = act_s, h = act_h, a = act_a, V = act_v, f = 4;  // f: bytes per fp32
  const std::int64_t sbh = s * b * h, sb = s * b;
  // Besides the blocks, the last stage keeps ln_f's x-hat and 1/sigma, the LM head's input and
  // the cross-entropy's probabilities; the first keeps only token ids (views of the batch).
  const std::int64_t head = f * (2 * sbh + sb), probs = f * s * b * V;
  std::map<std::tuple<int, bool, nn::Recompute>, std::vector<ActivationRun>> all;
  for (const int pp : {1, 2})
    for (const PipelineScheduleKind kind : {PipelineScheduleKind::one_f_one_b, PipelineScheduleKind::gpipe})
      for (const nn::Recompute rc : {nn::Recompute::none, nn::Recompute::selective, nn::Recompute::full}) {
        const bool gpipe = kind == PipelineScheduleKind::gpipe;
        if (pp == 1 && gpipe) continue;  // the same order as 1F1B at pp 1
        CAPTURE(pp);
        CAPTURE(gpipe);
        const std::string mode = nn::to_string(rc);
        CAPTURE(mode);
        const auto runs = activation_runs(MeshShape{.pp = pp}, kind, rc, false);
        all[{pp, gpipe, rc}] = runs;
        for (const ActivationRun& r : runs) {
          const int stage = r.pp_rank;
          const bool last = stage == pp - 1;
          const std::int64_t layers = 4 / pp;
          // 1F1B: a stage keeps at most pp - stage micro-batches (PipeDream-Flush); GPipe all m.
          const std::int64_t in_flight = gpipe ? act_m : std::min<std::int64_t>(pp - stage, act_m);
          const std::int64_t input = stage > 0 ? f * sbh : 0;  // a received input (stage 0's are token ids)
          std::int64_t expected = 0;
          if (rc == nn::Recompute::full)
            // The other micro-batches in flight keep their input (and the loss's probabilities);
            // the one in backward has its rerun forward's contexts, the loss's already released.
            expected = (in_flight - 1) * (input + (last ? probs : 0)) +
                       layers * nn::block_activation_bytes(b, s, h, a, nn::Recompute::none) + (last ? head : 0);
          else
            expected = in_flight * (layers * nn::block_activation_bytes(b, s, h, a, rc) + (last ? head + probs : 0));
          CAPTURE(stage);
          MESSAGE("pp ", pp, std::string(gpipe ? " GPipe " : " 1F1B "), std::string(nn::to_string(rc)), " stage ", stage,
                  ": measured peak ", r.peak, " B, analytic ", expected, " B (", r.in_flight, " in flight)");
          CHECK(r.in_flight == in_flight);
          CHECK(std::abs(double(r.peak - expected)) <= 0.1 * double(expected));
          CHECK(r.tracker_peak == r.peak);  // the tracker's activations category is fed the same figures
          CHECK(r.tracker_live == 0);       // every context released after the step
        }
      }
  // Recomputation lowers every rank's peak: selective always, full where more than one
  // micro-batch is in flight (with one, the rerun holds what none holds).
  for (const auto& entry : all) {  // (no structured binding: clang++ 14 cannot capture one in CHECK)
    const auto& key = entry.first;
    const std::vector<ActivationRun>& none = entry.second;
    if (std::get<2>(key) != nn::Recompute::none) continue;
    const auto& sel = all.at({std::get<0>(key), std::get<1>(key), nn::Recompute::selective});
    const auto& full = all.at({std::get<0>(key), std::get<1>(key), nn::Recompute::full});
    for (std::size_t i = 0; i < none.size(); ++i) {
      CHECK(sel[i].peak < none[i].peak);
      if (none[i].in_flight > 1) CHECK(full[i].peak < sel[i].peak);
    }
  }
  // ZB-H1 at pp 2: stage 0 holds what 1F1B's does (2 micro-batches' contexts); the last stage
  // runs a micro-batch's W after the next one's F, so it holds one micro-batch's contexts and
  // the inputs the previous one's deferred weight gradients need (nn::Linear's and
  // nn::LMHead's: per block c_attn, attn.c_proj and c_fc, s b h each, and the MLP's c_proj,
  // 4 s b h; the head's s b h), counted until its W.
  const auto zb = activation_runs(MeshShape{.pp = 2}, PipelineScheduleKind::zero_bubble_h1, nn::Recompute::none, false);
  const std::int64_t block = nn::block_activation_bytes(b, s, h, a, nn::Recompute::none);
  for (const ActivationRun& r : zb) {
    const std::int64_t expected = r.pp_rank == 0 ? 2 * 2 * block : 2 * block + head + probs + f * (2 * 7 * sbh + sbh);
    MESSAGE("pp 2 ZB-H1 none stage ", r.pp_rank, ": measured peak ", r.peak, " B, analytic ", expected, " B");
    CHECK(std::abs(double(r.peak - expected)) <= 0.1 * double(expected));
    CHECK(r.tracker_live == 0);
  }
}

namespace {
// Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
// sec. 4), the activations one transformer layer keeps, per tensor-parallel rank, as a list of
// tensors: elements of 2-byte (fp16) tensors and bytes of 1-byte dropout masks. Tensor
// parallelism (t) shards the attention and the MLP inside; sequence parallelism also shards the
// layer norms, the GEMM inputs and the dropouts along the sequence.
struct LayerTensors {
  double elements = 0;  // of fp16 (their) or fp32 (ours) tensors
  double mask_bytes = 0;
};
LayerTensors korthikanti(double s, double b, double h, double a, double t, bool sp, nn::Recompute rc) {
  const double sbh = s * b * h, as2b = a * s * s * b, r = sp ? t : 1.0;  // r: what SP divides
  LayerTensors k;
  if (rc == nn::Recompute::full) {
    k.elements = sbh / r;  // only the layer's input
    return k;
  }
  k.elements += 2 * sbh / r;                 // the two layer norms' inputs
  k.elements += sbh / r + 3 * sbh / t;       // QKV GEMM input; Q, K, V
  k.elements += sbh / t;                     // the output projection's input
  k.elements += 4 * sbh / t + 4 * sbh / t;  // GELU input, second GEMM input
  k.elements += sbh / r;                     // first GEMM input
  k.mask_bytes += 2 * sbh / r;               // the dropouts after attention and after the MLP
  if (rc == nn::Recompute::none) {
    k.elements += 2 * as2b / t;  // softmax output, and the dropout's output
    k.mask_bytes += as2b / t;    // the attention dropout's mask
  }
  return k;
}
// The same list carried to tessera's block (nn::Block, tensor-parallel with or without
// sequence parallelism) in fp32 bytes: no dropout inside the block (no masks, no dropout
// output); the layer norms keep x-hat (the input's size) and also 1/sigma (s b each); the GELU
// also keeps its gate 0.5 (1 + tanh u) (4 s b h / t); under sequence parallelism the QKV and
// first MLP GEMMs keep their all-gathered input (s b h each, where Megatron keeps the shard and
// gathers again in backward). Full recomputation keeps one input per stage, not per layer.
double tessera_layer_bytes(double s, double b, double h, double a, double t, bool sp, nn::Recompute rc) {
  const double sbh = s * b * h, as2b = a * s * s * b, r = sp ? t : 1.0;
  if (rc == nn::Recompute::full) return 4 * korthikanti(s, b, h, a, t, sp, rc).elements;
  double e = korthikanti(s, b, h, a, t, sp, rc).elements;
  if (rc == nn::Recompute::none) e -= as2b / t;  // the attention dropout's output
  e += 2 * s * b / r;                            // 1/sigma of the two layer norms
  e += 4 * sbh / t;                              // the GELU's gate
  if (sp) e += 2 * (sbh - sbh / t);              // gathered, not sharded, GEMM inputs
  return 4 * e;
}
}  // namespace

TEST_CASE("Activation memory: Korthikanti et al.'s per-layer formula (tp 2, with and without sequence parallelism; recompute none, selective, full), carried to fp32 and tessera's block, is within 10% of the bytes each rank measures") {
  const double s = act_s, b = act_b, h = act_h, a = act_a, V = act_v, t = 2;
  const double sbh = s * b * h;
  // The term lists reproduce the paper's closed forms (fp16 bytes): 34 s b h + 5 a s^2 b without
  // parallelism, s b h (10 + 24/t + 5 a s / (h t)) with tensor parallelism, s b h / t (34 + 5 a s
  // / h) with sequence parallelism too, 34 s b h / t selective with it, 2 s b h full.
  auto bytes16 = [](LayerTensors k) { return 2 * k.elements + k.mask_bytes; };
  CHECK(bytes16(korthikanti(s, b, h, a, 1, false, nn::Recompute::none)) == doctest::Approx(sbh * (34 + 5 * a * s / h)));
  CHECK(bytes16(korthikanti(s, b, h, a, t, false, nn::Recompute::none)) ==
        doctest::Approx(sbh * (10 + 24 / t + 5 * a * s / (h * t))));
  CHECK(bytes16(korthikanti(s, b, h, a, t, true, nn::Recompute::none)) == doctest::Approx(sbh / t * (34 + 5 * a * s / h)));
  CHECK(bytes16(korthikanti(s, b, h, a, t, true, nn::Recompute::selective)) == doctest::Approx(sbh / t * 34));
  CHECK(bytes16(korthikanti(s, b, h, a, 1, false, nn::Recompute::full)) == doctest::Approx(2 * sbh));
  // Without tensor parallelism the carried formula is nn::block_activation_bytes.
  CHECK(tessera_layer_bytes(s, b, h, a, 1, false, nn::Recompute::none) ==
        doctest::Approx(double(nn::block_activation_bytes(act_b, act_s, act_h, act_a, nn::Recompute::none))));
  CHECK(tessera_layer_bytes(s, b, h, a, 1, false, nn::Recompute::selective) ==
        doctest::Approx(double(nn::block_activation_bytes(act_b, act_s, act_h, act_a, nn::Recompute::selective))));

  // Measured at tp 2 x pp 2: stage 0 (the embedding and 2 blocks) keeps 2 micro-batches in
  // flight under 1F1B; per layer = its peak / (2 layers x 2). Full recomputation under GPipe on
  // the last stage: m - 1 micro-batches keep their input (and the loss's probabilities), the
  // one in backward its rerun forward's contexts (2 blocks, ln_f, the LM head's input).
  for (const bool sp : {false, true})
    for (const nn::Recompute rc : {nn::Recompute::none, nn::Recompute::selective, nn::Recompute::full}) {
      CAPTURE(sp);
      const std::string mode = nn::to_string(rc);
      CAPTURE(mode);
      const bool full = rc == nn::Recompute::full;
      const auto runs = activation_runs(MeshShape{.pp = 2, .tp = 2}, full ? PipelineScheduleKind::gpipe : PipelineScheduleKind::one_f_one_b,
                                        rc, sp);
      const double r = sp ? t : 1.0;
      for (const ActivationRun& run : runs) {
        if (run.pp_rank != (full ? 1 : 0)) continue;
        double measured = 0;
        if (!full) {
          measured = double(run.peak) / (2.0 * 2.0);
        } else {
          // The rerun's part, from the carried formula for none, taken off; what is left is
          // what m - 1 micro-batches keep. The probabilities: (s b V / t) fp32 each.
          const double rerun = 2 * tessera_layer_bytes(s, b, h, a, t, sp, nn::Recompute::none) +
                               4 * (sbh / r + s * b / r + sbh);  // ln_f x-hat, 1/sigma; the head's gathered input
          measured = (double(run.peak) - rerun) / double(act_m - 1) - 4 * s * b * V / t;
        }
        const double carried = tessera_layer_bytes(s, b, h, a, t, sp, rc);
        const double paper = 2 * bytes16(korthikanti(s, b, h, a, t, sp, rc));  // fp16 -> fp32, masks as fp32 too
        MESSAGE("tp 2", std::string(sp ? " + SP" : ""), " ", std::string(nn::to_string(rc)), " (tp rank ", run.tp_rank, "): measured ", measured,
                " B per layer", std::string(full ? " (per stage)" : ""), "; Korthikanti x2 (fp32) ", paper, "; carried to tessera's block ",
                carried, " (", 100.0 * (measured - carried) / carried, "%)");
        CHECK(std::abs(measured - carried) <= 0.1 * carried);
      }
    }
}
