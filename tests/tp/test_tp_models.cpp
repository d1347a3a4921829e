// Tensor-parallel models built by plans on the threads backend, one thread per tp rank: GPT-2's
// attention, MLP and block, a user-defined block, and the whole GPT against the serial model
// (outputs, every gradient, 20 AdamW steps); the collectives they issue, counted; sequence
// parallelism (CASES C7); initialization independent of tp.

#include <doctest/doctest.h>

#include <cstdint>

#include "tessera/testing/run_ranks.hpp"
#include "tp_bodies.hpp"

using namespace tessera;
using tp_bodies::kB;
using tp_bodies::kD;
using tp_bodies::kT;

namespace {

template <class Layer, class L, class Make>
void check_plan_equivalence(Make make, double tol = 1e-5) {
  for (int tp : {1, 2, 3, 4}) {
    INFO("tp = ", tp);
    const auto reports =
        testing::run_ranks(tp, [&](Comm& c) { return tp_bodies::plan_equivalence_body<Layer, L>(c, make); });
    for (const auto& r : reports) {
      CHECK(r.output < tol);
      CHECK(r.input_grad < tol);
      INFO("worst parameter gradient: ", r.params.worst);
      CHECK(r.params.max_rel < tol);
      CHECK(r.params.replicated_equal);
      CHECK(r.params.count > 0);
    }
  }
}

}  // namespace

TEST_CASE("TensorParallel<nn::SelfAttention>: heads split over tp 1-4 give the serial output and every gradient within 1e-5") {
  check_plan_equivalence<nn::SelfAttention<float>, Replicate>(tp_bodies::make_attention);
  check_plan_equivalence<nn::SelfAttention<float>, Shard<1>>(tp_bodies::make_attention);
}

TEST_CASE("TensorParallel<nn::MLP>: c_fc column, c_proj row over tp 1-4 give the serial output and every gradient within 1e-5") {
  check_plan_equivalence<nn::MLP<float>, Replicate>(tp_bodies::make_mlp);
  check_plan_equivalence<nn::MLP<float>, Shard<1>>(tp_bodies::make_mlp);
}

TEST_CASE("TensorParallel<nn::Block>: tp 1-4, with and without sequence parallelism, equal the serial block within 1e-5") {
  check_plan_equivalence<nn::Block<float>, Replicate>(tp_bodies::make_block);
  check_plan_equivalence<nn::Block<float>, Shard<1>>(tp_bodies::make_block);
}

TEST_CASE("a user-defined block made tensor-parallel by its plan equals its serial forward and backward at tp 1-4") {
  check_plan_equivalence<tp_bodies::FeedForward<float>, Replicate>(tp_bodies::make_feed_forward);
  check_plan_equivalence<tp_bodies::FeedForward<float>, Shard<1>>(tp_bodies::make_feed_forward);
}

TEST_CASE("a user-defined block: its dropout inside the tp region draws a mask per rank, its output stays equal on every rank") {
  for (int tp : {2, 3}) {
    for (const auto& [masks_differ, output_same] :
         testing::run_ranks(tp, [](Comm& c) { return tp_bodies::user_block_dropout_body(c); })) {
      CHECK(masks_differ);
      CHECK(output_same);
    }
  }
}

TEST_CASE("counts: an attention or MLP issues one all-reduce of (B, T, d) forward and one backward, nothing else") {
  const std::size_t btd = kB * kT * kD;
  for (int tp : {2, 4}) {
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) {
           return tp_bodies::plan_counts_body<nn::SelfAttention<float>, Replicate>(comm, tp_bodies::make_attention);
         })) {
      CHECK(c.all_reduce == 2);
      CHECK(c.all_reduce_elems == 2 * btd);
      CHECK(c.reduce_scatter + c.all_gather + c.other == 0);
    }
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) {
           return tp_bodies::plan_counts_body<nn::MLP<float>, Replicate>(comm, tp_bodies::make_mlp);
         })) {
      CHECK(c.all_reduce == 2);
      CHECK(c.all_reduce_elems == 2 * btd);
      CHECK(c.reduce_scatter + c.all_gather + c.other == 0);
    }
  }
}

TEST_CASE("counts: a GPT block step issues 4 all-reduces of B x T x d; with sequence parallelism the same bytes as 4 reduce-scatters + 4 all-gathers") {
  const std::size_t btd = kB * kT * kD;
  for (int tp : {2, 3, 4}) {
    INFO("tp = ", tp);
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) {
           return tp_bodies::plan_counts_body<nn::Block<float>, Replicate>(comm, tp_bodies::make_block);
         })) {
      CHECK(c.all_reduce == 4);
      CHECK(c.all_reduce_elems == 4 * btd);
      CHECK(c.reduce_scatter + c.all_gather + c.other == 0);
    }
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) {
           return tp_bodies::plan_counts_body<nn::Block<float>, Shard<1>>(comm, tp_bodies::make_block);
         })) {
      // A reduce-scatter's input and tp all-gathers' inputs together move what one all-reduce
      // of the same tensor moves (each all-reduce = reduce-scatter + all-gather).
      CHECK(c.reduce_scatter == 4);
      CHECK(c.reduce_scatter_elems == 4 * btd);
      CHECK(c.all_gather == 4);
      CHECK(c.all_gather_elems * static_cast<std::size_t>(tp) == 4 * btd);
      // ... plus one all-reduce of the LayerNorms' gradients (ln_1 and ln_2: 4 d values).
      CHECK(c.all_reduce == 1);
      CHECK(c.all_reduce_elems == 4 * kD);
      CHECK(c.other == 0);
    }
  }
}

TEST_CASE("counts: a GPT training step issues 4 L + 2 all-reduces of B x T x d and 3 of B x T for the loss; sequence parallel: reduce-scatters + all-gathers") {
  const std::size_t btd = kB * kT * kD, bt = kB * kT, L = 2;
  const GPTConfig cfg = tp_bodies::tiny_gpt();
  for (int tp : {2, 4}) {
    INFO("tp = ", tp);
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) { return tp_bodies::gpt_counts_body<Replicate>(comm); })) {
      CHECK(c.all_reduce == 4 * L + 2 + 3);
      CHECK(c.all_reduce_elems == (4 * L + 2) * btd + 3 * bt);
      CHECK(c.reduce_scatter + c.all_gather + c.other == 0);
    }
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) { return tp_bodies::gpt_counts_body<Shard<1>>(comm); })) {
      CHECK(c.reduce_scatter == 4 * L + 2);
      CHECK(c.reduce_scatter_elems == (4 * L + 2) * btd);
      CHECK(c.all_gather == 4 * L + 2);
      CHECK(c.all_gather_elems * static_cast<std::size_t>(tp) == (4 * L + 2) * btd);
      // The loss's 3 and one of the replicated gradients: wpe, 2 LayerNorms per block, ln_f.
      CHECK(c.all_reduce == 3 + 1);
      CHECK(c.all_reduce_elems == 3 * bt + static_cast<std::size_t>(cfg.n_positions * kD + L * 4 * kD + 2 * kD));
      CHECK(c.other == 0);
    }
  }
}

TEST_CASE("TensorParallelGPT: built from the seed, every shard is the slice of GPT's init, bit for bit, at tp 1-4") {
  for (int tp : {1, 2, 3, 4}) {
    INFO("tp = ", tp);
    for (const auto& [err, layouts] : testing::run_ranks(tp, [](Comm& c) { return tp_bodies::gpt_init_body(c); })) {
      CHECK(err == 0.0);
      CHECK(layouts);
    }
  }
}

TEST_CASE("TensorParallelGPT: logits, loss and every gradient equal GPT within 1e-5, and 20 AdamW steps stay equal, at tp 1-4") {
  for (int tp : {1, 2, 3, 4}) {
    INFO("tp = ", tp);
    for (const auto& r : testing::run_ranks(tp, [](Comm& c) { return tp_bodies::gpt_body<Replicate>(c, 20); })) {
      CHECK(r.logits < 1e-5);
      CHECK(r.loss < 1e-5);
      INFO("worst gradient: ", r.grads.worst);
      CHECK(r.grads.max_rel < 1e-5);
      CHECK(r.grads.replicated_equal);
      CHECK(r.train_loss < 1e-5);
      INFO("worst parameter after training: ", r.train_worst);
      CHECK(r.train_params < 1e-5);
      CHECK(r.replicated_equal);
    }
  }
}

TEST_CASE("TensorParallelGPT with sequence parallelism: equal to GPT within 1e-5 over 20 AdamW steps, replicated parameters bitwise equal on every rank") {
  for (int tp : {1, 2, 3, 4}) {
    INFO("tp = ", tp);
    for (const auto& r : testing::run_ranks(tp, [](Comm& c) { return tp_bodies::gpt_body<Shard<1>>(c, 20); })) {
      CHECK(r.logits < 1e-5);
      CHECK(r.loss < 1e-5);
      INFO("worst gradient: ", r.grads.worst);
      CHECK(r.grads.max_rel < 1e-5);
      CHECK(r.grads.replicated_equal);
      CHECK(r.train_loss < 1e-5);
      INFO("worst parameter after training: ", r.train_worst);
      CHECK(r.train_params < 1e-5);
      CHECK(r.replicated_equal);
    }
  }
}

TEST_CASE("sequence parallelism, tp = 2, one step: LayerNorm gradients are summed over both ranks, bitwise equal on both, equal to tp = 1 (C7)") {
  for (const auto& r : testing::run_ranks(2, [](Comm& c) { return tp_bodies::gpt_body<Shard<1>>(c, 1); })) {
    CHECK(r.grads.replicated_equal);
    CHECK(r.replicated_equal);
    CHECK(r.grads.max_rel < 1e-5);
    CHECK(r.train_params < 1e-5);
  }
}
