// A model described once (SequentialModelDescription) runs serially, tensor-parallel, pipelined
// and as Hybrid at every (dp, pp, tp) layout of 1, 2, 4 and 8 thread ranks through the generic
// policies only, equal to its serial run: the composition of DESIGN.md section 7.

#include <doctest/doctest.h>

#include "compose/compose_bodies.hpp"
#include <cmath>

#include "tessera/models/gpt.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace compose_test;

namespace {
const Reference& reference() {
  static const Reference r = serial_reference(TinyDecoder{}, Setup{});
  return r;
}

template <class Layout = tessera::Replicate, class D = TinyDecoder>
void check_world(int world, const D& d = D{}, const Reference& ref = reference(), double norm_tol = 1e-5) {
  const Setup s;
  for (const Variant& v : variants_for(world, d.num_blocks() + 2)) {
    CAPTURE(v.describe());
    const std::vector<Outcome> out =
        tessera::testing::run_ranks(world, [&](tessera::Comm& w) { return run_variant<Layout>(w, d, s, v, ref); });
    for (const Outcome& o : out) {
      CAPTURE(o.worst_param_name);
      CHECK(o.worst_loss < 1e-5);
      CHECK(o.worst_norm < norm_tol);
      // Norm-wise per tensor. The worst is the attention's bias (measured 1.8e-4 at tp 4): its
      // key part has an exact gradient of zero (softmax ignores a shift common to all keys), so
      // it receives only round-off, which AdamW's normalization turns into full-size steps.
      CHECK(o.worst_param < 5e-4);
      CHECK(o.params_checked > 0);
      CHECK(o.copies_equal);
    }
  }
}
}  // namespace

TEST_CASE("SequentialModel: the serial model of a description trains (the loss falls over 20 steps)") {
  const Reference& ref = reference();
  REQUIRE(ref.losses.size() == 20);
  CHECK(ref.losses.back() < ref.losses.front() - 0.1);
}

TEST_CASE("Hybrid of a SequentialModelDescription: every layout of 1 and 2 ranks equals the serial run over 20 steps") {
  check_world(1);
  check_world(2);
}
TEST_CASE("Hybrid of a SequentialModelDescription: every layout of 4 ranks equals the serial run over 20 steps") {
  check_world(4);
}
TEST_CASE("Hybrid of a SequentialModelDescription: every layout of 8 ranks equals the serial run over 20 steps") {
  check_world(8);
}

TEST_CASE("Hybrid with sequence parallelism (activations split along T inside and between stages): every layout of 2 "
          "and 4 ranks equals the serial run over 20 steps") {
  check_world<tessera::Shard<1>>(2);
  check_world<tessera::Shard<1>>(4);
}

TEST_CASE("The GPT's description through the generic Hybrid, with and without sequence parallelism: every layout of 4 "
          "and 8 ranks equals the serial GPT over 20 steps") {
  // vocab 50: not divisible by tp 4 or 8 (the padded vocabulary); 8 heads (tp up to 8).
  const tessera::GPTDescription<float> gpt(
      tessera::GPTConfig{.vocab_size = 50, .n_positions = 8, .n_layer = 6, .n_head = 8, .d_model = 16}, 7);
  const Reference ref = serial_reference(gpt, Setup{});
  // The gradient norm within 1e-4, as tests/hybrid checks the GPT (measured up to 1.5e-5 at tp 4:
  // the 50 x 16 table's gradient sums over all positions in another order).
  check_world<tessera::Replicate>(4, gpt, ref, 1e-4);
  check_world<tessera::Shard<1>>(4, gpt, ref, 1e-4);
  check_world<tessera::Shard<1>>(8, gpt, ref, 1e-4);
}

TEST_CASE("The GPT with embedding dropout (embd_pdrop 0.2; masks keyed by the step and the global row): every layout "
          "of 2, 4 and 8 ranks, with and without sequence parallelism, micro-batches and accumulation, equals the "
          "serial GPT with the same masks over 20 steps") {
  const tessera::GPTConfig cfg{.vocab_size = 50, .n_positions = 8, .n_layer = 6, .n_head = 8, .d_model = 16,
                               .embd_pdrop = 0.2};
  const tessera::GPTDescription<float> gpt(cfg, 7);
  const Reference ref = serial_reference(gpt, Setup{});
  // The dropout is on: the serial losses differ from the model without it.
  tessera::GPTConfig plain = cfg;
  plain.embd_pdrop = 0;
  const Reference no_drop = serial_reference(tessera::GPTDescription<float>(plain, 7), Setup{});
  CHECK(std::abs(ref.losses[0] - no_drop.losses[0]) > 1e-3);
  CHECK(ref.losses.back() < ref.losses.front() - 0.1);  // and it trains
  check_world<tessera::Replicate>(2, gpt, ref, 1e-4);
  check_world<tessera::Replicate>(4, gpt, ref, 1e-4);
  check_world<tessera::Shard<1>>(4, gpt, ref, 1e-4);
  check_world<tessera::Replicate>(8, gpt, ref, 1e-4);
}
