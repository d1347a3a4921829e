// The planner's collectives against instrumented runs of tessera's own policies on the GPT's
// block (nn::Block): the tensor-parallel all-reduces CostModel charges per block are what
// TensorParallel<nn::Block> sends, and the gradient elements its dp reduction moves (the
// block's parameters, ModelSpec::layer_parameters) are what DataParallel<nn::Block> reduces.
#include <doctest/doctest.h>

#include <cstddef>

#include "../tp/tp_bodies.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/plan/cost_model.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;

TEST_CASE("CostModel: the tp all-reduces it charges per block are the ones TensorParallel<nn::Block> issues, with and without SP") {
  using tp_bodies::kB;
  using tp_bodies::kD;
  using tp_bodies::kT;
  const plan::ModelSpec m{.name = "tiny", .layers = 1, .hidden = static_cast<int>(kD), .heads = 2, .kv_heads = 0,
                          .ffn = 0, .vocab = 16, .seq = static_cast<int>(kT), .tied = true};
  const plan::CostModel cm{.model = m, .layout = plan::Layout{.microbatch_size = static_cast<int>(kB)}};
  const int per_block = plan::CostModel::tp_all_reduces_forward + plan::CostModel::tp_all_reduces_backward;
  const double elements = per_block * cm.tp_all_reduce_elements();
  for (int tp : {2, 3, 4}) {
    CAPTURE(tp);
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) {
           return tp_bodies::plan_counts_body<nn::Block<float>, Replicate>(comm, tp_bodies::make_block);
         })) {
      CHECK(static_cast<int>(c.all_reduce) == per_block);
      CHECK(static_cast<double>(c.all_reduce_elems) == elements);
    }
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) {
           return tp_bodies::plan_counts_body<nn::Block<float>, Shard<1>>(comm, tp_bodies::make_block);
         })) {
      // Sequence parallelism: each all-reduce becomes a reduce-scatter (whole input counted)
      // plus an all-gather (its shard counted) of the same tensor.
      CHECK(static_cast<int>(c.reduce_scatter) == per_block);
      CHECK(static_cast<double>(c.reduce_scatter_elems) == elements);
      CHECK(static_cast<int>(c.all_gather) == per_block);
      CHECK(static_cast<double>(c.all_gather_elems * static_cast<std::size_t>(tp)) == elements);
    }
  }
}

TEST_CASE("CostModel: the dp reduction moves the block's parameters, ModelSpec::layer_parameters(), as DataParallel<nn::Block> does") {
  using tp_bodies::kB;
  using tp_bodies::kD;
  using tp_bodies::kHeads;
  using tp_bodies::kT;
  const plan::ModelSpec m{.name = "tiny", .layers = 1, .hidden = static_cast<int>(kD), .heads = static_cast<int>(kHeads),
                          .kv_heads = 0, .ffn = 0, .vocab = 16, .seq = static_cast<int>(kT), .tied = true};
  for (int dp : {2, 3}) {
    CAPTURE(dp);
    const auto counts = testing::run_ranks(dp, [](Comm& world) {
      auto counters = std::make_shared<testing::CommCounters>();
      DataParallel<nn::Block<float>> par(tp_bodies::make_block(), testing::instrument(world, counters),
                                         DataParallelOptions{.bucket_size = 4096, .first_bucket_size = 1024,
                                                             .overlap_grad_reduce = false});
      const Tensor<float> x = tp_test::random_tensor<float>(Shape{kB, kT, kD}, 1);
      counters->reset();
      auto [y, c] = par.forward(x);
      par.backward(y, c);
      return std::pair{counters->elements(testing::CallKind::all_reduce), counters->calls(testing::CallKind::all_reduce)};
    });
    for (const auto& [elements, calls] : counts) {
      CHECK(static_cast<double>(elements) == m.layer_parameters());
      CHECK(calls > 1);  // several buckets, the same elements in all
    }
  }
}
