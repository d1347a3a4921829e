// Hybrid on the threads backend: every (dp, pp, tp) layout of 1, 2, 4 and 8 ranks trains the
// reference GPT for 20 steps and matches the single-rank run (losses 1e-5 relative, gradient
// norms, final parameters within fp32 round-off), with each schedule, accumulation and ZeRO-1;
// plus the error paths: a mesh that does not match the world, more stages than layers, virtual
// stages without the interleaved schedule, tp not dividing the heads, a partition of another
// number of layers, options out of range,
// ranks that disagree on the micro-batch count, a batch smaller than the micro-batch count, a
// negative max_norm, sampling tokens of the wrong shape and the wrong optimizer accessor -- each
// an error of every rank itself (never another rank's AbortedError) naming the numbers.
#include <doctest/doctest.h>

#include "hybrid_bodies.hpp"
#include "rank_errors.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"

using namespace tessera;
using namespace hybrid_test;

namespace {
const Setup& setup() {
  static const Setup s;
  return s;
}
const Reference& reference() {
  static const Reference r = serial_reference(setup());
  return r;
}

void check_world(int world) {
  for (const Variant& v : variants_for(world)) {
    CAPTURE(v.describe());
    const auto outcomes = threads::run(world, [&](Comm& w) { return run_variant(w, setup(), v, reference()); });
    for (std::size_t r = 0; r < outcomes.size(); ++r) {
      CAPTURE(r);
      const Outcome& o = outcomes[r];
      MESSAGE(v.describe() << " rank " << r << ": loss " << o.worst_loss << " norm " << o.worst_norm << " param "
                           << o.worst_param << " (" << o.worst_param_name << ")");
      CHECK(o.worst_loss < 1e-5);
      CHECK(o.worst_norm < 1e-4);
      CHECK(o.worst_param < 2e-4);  // measured up to 6e-5 (tp = 8), on biases that start at 0
      CHECK(o.copies_equal);
    }
  }
}
}  // namespace

TEST_CASE("Hybrid: the reference GPT at every layout of 1 and 2 ranks equals the single-rank run") {
  check_world(1);
  check_world(2);
}
TEST_CASE("Hybrid: every layout of 4 ranks equals the single-rank run") { check_world(4); }
TEST_CASE("Hybrid: every layout of 8 ranks equals the single-rank run") { check_world(8); }

namespace {
// A rank left waiting by a rank that did not fail fails in seconds, not after 60.
const threads::RunOptions quick{.timeout = std::chrono::seconds(10)};

// Every rank of `world` builds HybridGPT over `shape` with `options` (and the config of
// setup() with `n_layer`, and `partition` if given); returns what each rank threw.
std::vector<RankError> construction_errors(int world, MeshShape shape, HybridOptions options, int n_layer = 6,
                                           std::optional<StagePartition> partition = std::nullopt) {
  GPTConfig config = setup().config;
  config.n_layer = n_layer;
  return threads::run(
      world,
      [&](Comm& w) {
        return rank_error([&] {
          Mesh mesh(w, shape);
          HybridGPT<float> model(mesh, config, setup().seed, options, partition);
        });
      },
      quick);
}

// Every rank of `world` builds a working HybridGPT over `shape` with `options` (for rank r:
// options_of(r)) and runs `fn(model, world)`; returns what each rank threw.
template <class Options, class F>
std::vector<RankError> use_errors(int world, MeshShape shape, Options options_of, F fn) {
  return threads::run(
      world,
      [&](Comm& w) {
        Mesh mesh(w, shape);
        HybridGPT<float> model(mesh, setup().config, setup().seed, options_of(w.rank()));
        return rank_error([&] { fn(model, w); });
      },
      quick);
}
}  // namespace

TEST_CASE("Hybrid errors: a mesh that does not match the world fails on every rank, naming the sizes") {
  check_own_errors(construction_errors(4, MeshShape{.dp = 2, .pp = 2, .tp = 2}, {}),
                   {"Mesh: world size 4 is not dp(2) x pp(2) x tp(2) = 8"});
  check_own_errors(construction_errors(7, MeshShape{.dp = 2, .pp = 1, .tp = 3}, {}),
                   {"Mesh: world size 7 is not dp(2) x pp(1) x tp(3) = 6"});
}

TEST_CASE("Hybrid errors: more stages than pipeline layers, virtual stages without the interleaved schedule, tp "
          "not dividing the heads and a partition of another number of layers fail on every rank, naming the numbers") {
  check_own_errors(construction_errors(2, MeshShape{.pp = 2},
                                       {.schedule = PipelineScheduleKind::interleaved_one_f_one_b, .virtual_stages = 5}),
                   {"pp(2) x virtual_stages(5) = 10 stages, but a GPT with n_layer=6 has only 8 pipeline layers"});
  check_own_errors(construction_errors(4, MeshShape{.pp = 4}, {.num_microbatches = 4}, /*n_layer=*/1),
                   {"pp(4) x virtual_stages(1) = 4 stages, but a GPT with n_layer=1 has only 3 pipeline layers"});
  check_own_errors(
      construction_errors(2, MeshShape{.pp = 2}, {.schedule = PipelineScheduleKind::one_f_one_b, .virtual_stages = 2}),
      {"virtual_stages = 2 needs the interleaved 1F1B schedule"});
  check_own_errors(construction_errors(3, MeshShape{.tp = 3}, {}), {"n_head 8 is not divisible by the tp size 3"});
  check_own_errors(construction_errors(2, MeshShape{.pp = 2}, {}, 6, StagePartition::even(7, 2)),
                   {"the partition cuts 7 layers, but a GPT with n_layer=6 has 8 pipeline layers"});
}

TEST_CASE("Hybrid errors: num_microbatches, accumulation_steps or virtual_stages below 1 fail on every rank, naming "
          "the numbers") {
  check_own_errors(construction_errors(2, MeshShape{.pp = 2}, {.num_microbatches = 0}),
                   {"Hybrid: num_microbatches 0 must be >= 1"});
  check_own_errors(construction_errors(2, MeshShape{.dp = 2}, {.accumulation_steps = 0}),
                   {"Hybrid: accumulation_steps 0 must be >= 1"});
  // HybridGPT cuts the layers into pp x virtual_stages stages before Hybrid checks its options,
  // so virtual_stages 0 is reported as 0 stages.
  check_own_errors(construction_errors(3, MeshShape{.pp = 3}, {.virtual_stages = 0}),
                   {"cannot cut 8 layers into 0 stages"});
}

TEST_CASE("Hybrid errors: ranks of a pipeline given different micro-batch counts, or a batch smaller than the "
          "micro-batch count, fail on every rank, naming the numbers") {
  const Setup& s = setup();
  const auto batch = batch_of(s, 0);  // 16 rows
  const Tensor<std::int32_t>& x = batch.first;
  const Tensor<std::int32_t>& y = batch.second;
  // Pipelines of 2 and 3 stages, the last rank cutting its batch into 4 micro-batches, the others 2.
  for (int pp : {2, 3}) {
    CAPTURE(pp);
    check_own_errors(use_errors(
                         pp, MeshShape{.pp = pp},
                         [pp](int r) { return HybridOptions{.num_microbatches = r == pp - 1 ? 4 : 2}; },
                         [&](HybridGPT<float>& model, Comm&) { model.forward_backward(x, y); }),
                     {"different numbers of micro-batches, from 2 to 4"});
  }
  // 3 rows for 4 micro-batches, at dp 2 x pp 2 (each dp rank its own 3 rows).
  const Tensor<std::int32_t> x3 = x.slice(0, 0, 3).contiguous(), y3 = y.slice(0, 0, 3).contiguous();
  check_own_errors(use_errors(
                       4, MeshShape{.dp = 2, .pp = 2}, [](int) { return HybridOptions{.num_microbatches = 4}; },
                       [&](HybridGPT<float>& model, Comm&) { model.forward_backward(x3, y3); }),
                   {"a batch of 3 samples cannot be split into 4 micro-batches"});
}

TEST_CASE("Hybrid errors: a negative max_norm, sampling tokens that are not (1, T) and the optimizer accessor of the "
          "other mode, parameter groups that miss a parameter and a second ZeRO-1 optimizer fail on every rank, naming "
          "the values") {
  const Setup& s = setup();
  const auto batch = batch_of(s, 0);
  const Tensor<std::int32_t>& x = batch.first;
  const Tensor<std::int32_t>& y = batch.second;
  const MeshShape shape{.dp = 2, .tp = 2};
  check_own_errors(use_errors(
                       4, shape, [](int) { return HybridOptions{.num_microbatches = 2}; },
                       [&](HybridGPT<float>& model, Comm&) {
                         const std::int64_t rows = s.batch / 2, r0 = model.mesh().coord().dp * rows;
                         model.zero_grad();
                         model.forward_backward(x.slice(0, r0, r0 + rows).contiguous(), y.slice(0, r0, r0 + rows).contiguous());
                         optim::clip_grad_norm(model.gradients(), -0.5);
                       }),
                   {"clip_grad_norm: max_norm -0.5 is negative"});
  const Tensor<std::int32_t> two_rows = x.slice(0, 0, 2).contiguous();  // (2, 8)
  check_own_errors(use_errors(
                       4, shape, [](int) { return HybridOptions{}; },
                       [&](HybridGPT<float>& model, Comm&) { model.next_token_logits(two_rows); }),
                   {"tokens of shape (2, 8) are not (1, T)"});
  check_own_errors(use_errors(
                       4, shape, [](int) { return HybridOptions{}; },
                       [&](HybridGPT<float>& model, Comm&) {
                         DistributedOptimizer<optim::AdamW<float>> opt(model, setup().adamw(), /*zero1=*/true);
                         opt.replicated();
                       }),
                   {"the optimizer is sharded (zero1); use sharded()"});
  check_own_errors(use_errors(
                       4, shape, [](int) { return HybridOptions{}; },
                       [&](HybridGPT<float>& model, Comm&) {
                         DistributedOptimizer<optim::AdamW<float>> opt(model, setup().adamw(), /*zero1=*/false);
                         opt.sharded();
                       }),
                   {"the optimizer is not sharded (zero1 is off)"});
  // A parameter in no group, and two ZeRO-1 optimizers over one model, are refused naming it.
  check_own_errors(use_errors(
                       4, shape, [](int) { return HybridOptions{}; },
                       [&](HybridGPT<float>& model, Comm&) {
                         auto groups = setup().groups(model.parameters());
                         groups.pop_back();  // drop the no-decay group: the biases are in none
                         DistributedOptimizer<optim::AdamW<float>> opt(model, groups, /*zero1=*/true);
                       }),
                   {"is in none of the 1 parameter groups"});
  check_own_errors(use_errors(
                       4, shape, [](int) { return HybridOptions{}; },
                       [&](HybridGPT<float>& model, Comm&) {
                         DistributedOptimizer<optim::AdamW<float>> first(model, setup().adamw(), /*zero1=*/true);
                         DistributedOptimizer<optim::AdamW<float>> second(model, setup().adamw(), /*zero1=*/true);
                       }),
                   {"already have a ZeroOptimizer; a second one would update every parameter twice"});
}
