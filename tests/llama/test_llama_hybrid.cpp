// The Llama-style model of examples/llama -- a user's model, described once -- trained through
// the same Hybrid as the GPT: every (dp, pp, tp) layout of 1, 2, 4 and 8 thread ranks equals its
// serial run over 20 AdamW steps (the composition bodies of tests/compose).

#include <doctest/doctest.h>

#include "compose/compose_bodies.hpp"
#include "llama/llama_model.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace compose_test;

namespace {
// GQA: 16 query heads on 8 KV heads (tp up to 8 divides both), head width 2 (RoPE pairs).
llama::LlamaDescription<float> tiny_llama() {
  return llama::LlamaDescription<float>(
      llama::LlamaConfig{.vocab_size = 64, .n_layer = 6, .n_head = 16, .n_kv_head = 8, .d_model = 32, .ffn_hidden = 48},
      21);
}

const Reference& reference() {
  static const Reference r = serial_reference(tiny_llama(), Setup{});
  return r;
}

void check_world(int world) {
  const auto d = tiny_llama();
  const Setup s;
  const Reference& ref = reference();
  for (const Variant& v : variants_for(world, d.num_blocks() + 2)) {
    CAPTURE(v.describe());
    const std::vector<Outcome> out =
        tessera::testing::run_ranks(world, [&](tessera::Comm& w) { return run_variant(w, d, s, v, ref); });
    for (const Outcome& o : out) {
      CAPTURE(o.worst_param_name);
      CHECK(o.worst_loss < 1e-5);
      CHECK(o.worst_norm < 1e-5);
      CHECK(o.worst_param < 2e-4);
      CHECK(o.params_checked > 0);
      CHECK(o.copies_equal);
    }
  }
}
}  // namespace

TEST_CASE("Llama through Hybrid: the serial model of the description trains (the loss falls over 20 steps)") {
  const Reference& ref = reference();
  REQUIRE(ref.losses.size() == 20);
  CHECK(ref.losses.back() < ref.losses.front() - 0.1);
}
TEST_CASE("Llama through Hybrid: every layout of 1 and 2 ranks equals the serial run over 20 steps") {
  check_world(1);
  check_world(2);
}
TEST_CASE("Llama through Hybrid: every layout of 4 ranks equals the serial run over 20 steps") { check_world(4); }
TEST_CASE("Llama through Hybrid: every layout of 8 ranks equals the serial run over 20 steps") { check_world(8); }

TEST_CASE("Llama through Hybrid: tp not dividing the KV heads is an error naming the numbers on every rank") {
  llama::LlamaConfig c{.vocab_size = 64, .n_layer = 2, .n_head = 8, .n_kv_head = 2, .d_model = 16, .ffn_hidden = 32};
  const llama::LlamaDescription<float> d(c, 1);
  const auto msgs = tessera::testing::run_ranks(4, [&](tessera::Comm& w) {
    return own_error([&] {
      tessera::Mesh mesh(w, tessera::MeshShape{.tp = 4});
      Variant v;
      v.shape = tessera::MeshShape{.tp = 4};
      auto model = make_hybrid(mesh, d, v, Setup{});
    });
  });
  for (const std::string& m : msgs) {
    CAPTURE(m);
    CHECK(m.find("n_head 8 and n_kv_head 2 must both be divisible by tp 4") != std::string::npos);
  }
}
