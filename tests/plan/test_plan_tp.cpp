// The planner's tensor-parallel collectives per block against an instrumented run of tessera's
// own TensorParallel<nn::Block> (the block of the GPT): the count and the elements CostModel
// charges for one block's forward and backward are what the policy sends.
#include <doctest/doctest.h>

#include <cstddef>

#include "../tp/tp_bodies.hpp"
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
