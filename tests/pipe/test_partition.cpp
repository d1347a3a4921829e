// Cutting a model into stages: StagePartition (cuts, per-stage lists with the names of missing
// and doubled layers, even and balanced splits), StaticStagePartition (checked at compile time)
// with StageChain stages run through PipelineParallel against the serial chain, LayerStage's
// shape inference, and the GPT's pipeline layers.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "tessera/nn/gelu.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/pipeline/pipeline_parallel.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/parallel/pipeline/static_stage_partition.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;

namespace {
std::vector<int> sizes(const StagePartition& p) {
  std::vector<int> out;
  for (int s = 0; s < p.num_stages(); ++s) out.push_back(p.size(s));
  return out;
}
std::string error_of(auto&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}
}  // namespace

TEST_CASE("StagePartition: 7 layers over 2 stages are 4 + 3 and 30 over 4 are 8 + 8 + 7 + 7, every layer once") {
  CHECK(sizes(StagePartition::even(7, 2)) == std::vector<int>{4, 3});
  CHECK(sizes(StagePartition::even(30, 4)) == std::vector<int>{8, 8, 7, 7});
  CHECK(sizes(StagePartition::balanced(std::vector<double>(7, 1.0), 2)) == std::vector<int>{4, 3});
  CHECK(sizes(StagePartition::balanced(std::vector<double>(30, 1.0), 4)) == std::vector<int>{8, 8, 7, 7});
  for (int n = 1; n <= 40; ++n)
    for (int s = 1; s <= std::min(n, 12); ++s) {
      CAPTURE(n);
      CAPTURE(s);
      for (const StagePartition& p : {StagePartition::even(n, s), StagePartition::balanced(std::vector<double>(
                                                                         static_cast<std::size_t>(n), 2.5), s)}) {
        REQUIRE(p.num_stages() == s);
        std::vector<int> seen(static_cast<std::size_t>(n), 0);
        for (int st = 0; st < s; ++st) {
          CHECK(p.size(st) >= n / s);
          CHECK(p.size(st) <= n / s + 1);
          for (int l : p.layers(st)) {
            ++seen[static_cast<std::size_t>(l)];
            CHECK(p.stage_of(l) == st);
          }
        }
        CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
      }
    }
}

TEST_CASE("StagePartition::balanced: the largest stage cost is the smallest possible (checked against brute force)") {
  // Costs from a fixed formula; brute force over every cut of 9 layers into 3 stages.
  std::vector<double> costs;
  for (int i = 0; i < 9; ++i) costs.push_back(1.0 + ((i * 37) % 11));
  double best = 1e300;
  for (int a = 1; a < 9; ++a)
    for (int b = a + 1; b < 9; ++b) {
      const double c0 = std::accumulate(costs.begin(), costs.begin() + a, 0.0);
      const double c1 = std::accumulate(costs.begin() + a, costs.begin() + b, 0.0);
      const double c2 = std::accumulate(costs.begin() + b, costs.end(), 0.0);
      best = std::min(best, std::max({c0, c1, c2}));
    }
  const StagePartition p = StagePartition::balanced(costs, 3);
  const std::vector<double> sc = p.stage_costs(costs);
  CHECK(*std::max_element(sc.begin(), sc.end()) == best);
  // A heavy layer gets a stage of its own.
  CHECK(sizes(StagePartition::balanced({1, 1, 10, 1, 1, 1}, 3)) == std::vector<int>{2, 1, 3});
  // GPT-2 small by parameter count: the embedding and the head (vocab 50257, 38.6M each)
  // outweigh six blocks (7.1M each) and get a stage each.
  const GPTConfig gpt2{};
  const StagePartition g = StagePartition::balanced(gpt_pipeline_layer_costs(gpt2), 4, gpt_pipeline_layer_names(gpt2));
  CHECK(g.to_string() == "stage 0: layer 0 (embedding)\n"
                         "stage 1: layers 1-6 (h.0 .. h.5)\n"
                         "stage 2: layers 7-12 (h.6 .. h.11)\n"
                         "stage 3: layer 13 (head)\n");
}

TEST_CASE("StagePartition::from_stages: the error names every layer that is missing or doubled") {
  const std::vector<std::string> names{"embedding", "h.0", "h.1", "h.2", "h.3", "head"};
  CHECK(error_of([&] { StagePartition::from_stages(6, {{0, 1}, {1, 2}, {4}}, names); })
            .find("every layer must be in exactly one stage: layer 1 (h.0) is in stages 0 and 1; layer 3 (h.2) is in "
                  "no stage; layer 5 (head) is in no stage") != std::string::npos);
  CHECK(error_of([] { StagePartition::from_stages(4, {{0, 1}, {3, 2}}); })
            .find("stage 1 must hold consecutive layers in order, starting at layer 2") != std::string::npos);
  CHECK(error_of([] { StagePartition::from_stages(4, {{0, 1}, {2, 3, 4}}); })
            .find("stage 1 names layer 4, outside [0, 4)") != std::string::npos);
  CHECK(error_of([] { StagePartition::from_stages(4, {{0, 1, 2, 3}, {}}); }).find("stage 1 holds no layer") !=
        std::string::npos);
  CHECK(StagePartition::from_stages(5, {{0, 1, 2}, {3, 4}}) == StagePartition::from_cuts(5, {3}));
  CHECK(error_of([] { StagePartition::from_cuts(5, {3, 3}); }).find("must increase strictly, but entry 1 is 3 after 3") !=
        std::string::npos);
  CHECK(error_of([] { StagePartition::from_cuts(5, {5}); }).find("cut point 5 (entry 0) is outside [1, 4]") !=
        std::string::npos);
  CHECK(error_of([] { StagePartition::even(3, 4); }).find("cannot cut 3 layers into 4 stages") != std::string::npos);
}

// ---- a model given as a type list -------------------------------------------------------------------
namespace {
using Lin = nn::Linear<float>;
using Gelu = nn::GELU<float>;
using Model = LayerList<Lin, Gelu, Lin, Gelu, Lin, Gelu, Lin>;  // 7 layers
using TwoStages = StaticStagePartition<Model, StageLayers<0, 1, 2, 3>, StageLayers<4, 5, 6>>;
using FourStages = StaticStagePartition<Model, StageCuts<2, 4, 6>>;
static_assert(TwoStages::num_stages == 2 && TwoStages::num_layers == 7 && TwoStages::bounds[1] == 4);
static_assert(FourStages::num_stages == 4 && FourStages::bounds[3] == 6);
static_assert(std::same_as<TwoStages::stage_type<1>, StageChain<Lin, Gelu, Lin>>);
static_assert(Layer<TwoStages::stage_type<0>>);

constexpr std::int64_t width = 6;
// Layer i of the model, initialized from its index alone.
auto make_layer = [](auto index) {
  constexpr int i = decltype(index)::value;
  if constexpr (i % 2 == 1)
    return Gelu{};
  else
    return Lin(width, width, nn::LayerInit{.prefix = "l" + std::to_string(i), .seed = 3, .std = 0.5, .n_layer = 1});
};

// loss = 0.5 * sum (y - t)^2, over every element.
struct HalfSquares {
  struct Context {
    Tensor<float> diff;
  };
  ForwardResult<float, Context> forward(const Tensor<float>& y, const Tensor<float>& t) const {
    Tensor<float> d = y.clone();
    d.add_(t, -1.0f);
    double s = 0;
    for (std::int64_t i = 0; i < d.numel(); ++i) s += 0.5 * d.data()[i] * d.data()[i];
    return {static_cast<float>(s), Context{d}};
  }
  Tensor<float> backward(float dloss, const Context& c) const {
    Tensor<float> g = c.diff.clone();
    g.scale_(dloss);
    return g;
  }
  std::int64_t count_valid(const Tensor<float>& t) const { return t.numel(); }
};

Tensor<float> data(std::int64_t rows, int salt) {
  Tensor<float> x(Shape{rows, width});
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = std::sin(0.37f * static_cast<float>(i + salt));
  return x;
}
}  // namespace

TEST_CASE("StaticStagePartition: a 7-layer type list cut into 2 and 4 stages trains like the serial chain for 3 steps") {
  // Serial: the whole chain, mean of the loss over all elements, SGD.
  using Whole = StaticStagePartition<Model, StageCuts<>>;
  static_assert(Whole::num_stages == 1);
  auto serial = Whole::make_stage<float>(0, make_layer);
  optim::SGD<float> sopt(serial->parameters(), {.lr = 0.05});
  const HalfSquares loss_fn;
  std::vector<double> serial_losses;
  for (int step = 0; step < 3; ++step) {
    sopt.zero_grad();
    auto [y, ctx] = serial->forward(data(10, step));
    auto [l, lc] = loss_fn.forward(y, data(10, 100 + step));
    const float n = static_cast<float>(10 * width);
    serial->backward(loss_fn.backward(1.0f / n, lc), ctx);
    sopt.step();
    serial_losses.push_back(l / n);
  }
  auto run = [&](auto partition, int pp, PipelineScheduleKind kind) {
    using P = decltype(partition);
    return testing::run_ranks(pp, [&](Comm& comm) {
      PipelineParallel<float, Tensor<float>, Tensor<float>> pipe(
          comm, [](int s) { return P::template make_stage<float>(s, make_layer); }, HalfSquares{},
          {.schedule = kind, .virtual_stages = P::num_stages / pp});
      optim::SGD<float> opt(pipe.parameters(), {.lr = 0.05});
      std::vector<double> losses;
      for (int step = 0; step < 3; ++step) {
        pipe.zero_grad();
        losses.push_back(pipe.step(data(10, step), data(10, 100 + step), 4));
        opt.step();
      }
      testing::WorstError err;  // a NaN is +inf, not dropped
      for (Parameter<float>& p : pipe.parameters()) {
        const Parameter<float>& q = serial->parameters().at(p.name);
        err.add(testing::max_abs_error(std::span<const float>(p.value.span()), std::span<const float>(q.value.span())));
      }
      return std::pair{losses, err.value()};
    });
  };
  for (const auto& [losses, err] : run(TwoStages{}, 2, PipelineScheduleKind::one_f_one_b)) {
    CHECK(err < 1e-5);
    for (int i = 0; i < 3; ++i) CHECK(losses[static_cast<std::size_t>(i)] == doctest::Approx(serial_losses[static_cast<std::size_t>(i)]).epsilon(1e-5));
  }
  // 4 stages on 2 ranks, two chunks each (interleaved).
  for (const auto& [losses, err] : run(FourStages{}, 2, PipelineScheduleKind::interleaved_one_f_one_b)) {
    CHECK(err < 1e-5);
    CHECK(losses.back() == doctest::Approx(serial_losses.back()).epsilon(1e-5));
  }
  CHECK(TwoStages::partition() == StagePartition::from_cuts(7, {4}));
  CHECK(error_of([] { TwoStages::make_stage<float>(2, make_layer); }).find("stage 2 is outside [0, 2)") != std::string::npos);
}

TEST_CASE("LayerStage: output shapes come from one forward on zeros, once per input shape; misplaced stages say so") {
  struct Widen {  // (n, 2) -> (n, 3), counting its forwards
    using Input = Tensor<float>;
    struct Context {};
    int* calls;
    ForwardResult<Tensor<float>, Context> forward(const Tensor<float>& x) {
      ++*calls;
      return {Tensor<float>(Shape{x.size(0), 3}), {}};
    }
    Tensor<float> backward(const Tensor<float>& dy, Context&) { return Tensor<float>(Shape{dy.size(0), 2}); }
    ParameterList<float> parameters() { return {}; }
  };
  int calls = 0;
  auto stage = make_pipeline_stage<float, Tensor<std::int32_t>>(Widen{&calls}, "widen");
  CHECK(stage->output_shape(Shape{4, 2}) == Shape{4, 3});
  CHECK(stage->output_shape(Shape{4, 2}) == Shape{4, 3});
  CHECK(stage->output_shape(Shape{5, 2}) == Shape{5, 3});
  CHECK(calls == 2);
  CHECK(error_of([&] { stage->forward_first(Tensor<std::int32_t>(Shape{1, 2})); })
            .find("PipelineStage 'widen' cannot be the first stage") != std::string::npos);
}

TEST_CASE("make_gpt_pipeline_stage: stages cut anywhere hold exactly GPT's parameters, with the same initial values") {
  const GPTConfig cfg{.vocab_size = 40, .n_positions = 8, .n_layer = 4, .n_head = 2, .d_model = 16};
  GPT<float> gpt(cfg, 11);
  const int n = gpt_pipeline_num_layers(cfg);
  CHECK(n == 6);
  CHECK(gpt_pipeline_layer_names(cfg) == std::vector<std::string>{"embedding", "h.0", "h.1", "h.2", "h.3", "head"});
  for (int stages = 1; stages <= n; ++stages) {
    const StagePartition cut = StagePartition::even(n, stages);
    std::size_t count = 0;
    for (int s = 0; s < stages; ++s) {
      auto st = make_gpt_pipeline_stage<float>(cfg, 11, cut, s);
      for (Parameter<float>& p : st->parameters()) {
        const Parameter<float>& q = gpt.parameters().at(p.name);
        CHECK(testing::bitwise_equal_finite(std::span<const float>(p.value.span()), std::span<const float>(q.value.span())));
        ++count;
      }
      // The tied weight: on the first stage (without the head) and as a copy on the last.
      const std::size_t tied = st->tied_parameters().size();
      CHECK(tied == (stages > 1 && (s == 0 || s == stages - 1) ? 1u : 0u));
      if (stages > 1 && s == stages - 1) --count;
    }
    CHECK(count == gpt.parameters().size());
  }
  CHECK(error_of([&] { make_gpt_pipeline_stage<float>(cfg, 11, StagePartition::even(5, 2), 0); })
            .find("the partition cuts 5 layers, but a GPT with n_layer=4 has 6 pipeline layers") != std::string::npos);
}
