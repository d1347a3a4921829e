// The Llama example's decoder layer made tensor-parallel by its plan
// (tessera::TensorParallel<llama::DecoderLayer<float>>) on the threads backend, one thread per tp
// rank, against the serial layer: the output, the input gradient and every parameter gradient
// (each rank's gradient against its slice of the serial one); and tp not dividing the KV heads
// as an error naming the numbers on every rank.

#include <doctest/doctest.h>

#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include "llama/llama_model.hpp"
#include "tessera/core/random.hpp"
#include "tessera/parallel/tensor/tensor_parallel.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/run_ranks.hpp"

namespace {

using namespace tessera;
using testing::norm_rel_error;
using testing::WorstError;

Tensor<float> random_tensor(const Shape& shape, std::uint64_t seed) {
  Tensor<float> t = Tensor<float>::empty(shape);
  fill_normal(t, seed, "x", 1.0);
  return t;
}

double rel(const Tensor<float>& a, const Tensor<float>& b) {
  if (a.shape() != b.shape()) return testing::infinite_error;
  return norm_rel_error<float, float>(a.contiguous().span(), b.contiguous().span());
}

// What one rank saw, compared on that rank against the serial layer (every rank builds it).
struct Report {
  double output = 0;      // the (gathered) output against the serial output
  double input_grad = 0;  // the (gathered) input gradient against the serial one
  double params = 0;      // worst parameter gradient against its slice of the serial gradient
  std::string worst;      // the name of the worst
  std::size_t count = 0, serial_count = 0;  // parameters on the rank, in the serial layer
  std::vector<std::string> layouts;          // "name: layout" of every parameter
};

template <class L>
Tensor<float> local_of(Comm& tp, const Tensor<float>& full) {
  if constexpr (std::same_as<L, Shard<1>>) return detail::tp::split_dim(full, 1, 1, tp.rank(), tp.size());
  else return full;
}
template <class L>
Tensor<float> full_of(Comm& tp, const Tensor<float>& local) {
  if constexpr (std::same_as<L, Shard<1>>) return detail::tp::all_gather_dim(tp, local, 1);
  else return local;
}

// TensorParallel<DecoderLayer, L> against the serial DecoderLayer of the same init; weights
// randomized by name (std 0.3) so that attention is far from uniform.
template <class L>
Report decoder_layer_body(Comm& tp, const llama::LlamaConfig& c, std::int64_t B, std::int64_t T) {
  auto make = [&] {
    llama::DecoderLayer<float> layer = llama::decoder_layer<float>(c, 3, 5);
    for (Parameter<float>& p : layer.parameters()) fill_normal(p.value, 21, p.name, 0.3);
    return layer;
  };
  llama::DecoderLayer<float> serial = make();
  const Tensor<float> x = random_tensor(Shape{B, T, c.d_model}, 1), dy = random_tensor(Shape{B, T, c.d_model}, 2);
  auto [ys, cs] = serial.forward(x);
  const Tensor<float> dxs = serial.backward(dy, cs);

  TensorParallel<llama::DecoderLayer<float>, L> par(make(), tp);
  auto [y, ctx] = par.forward(with_layout<L>(local_of<L>(tp, x)));
  const auto dx = par.backward(with_layout<L>(local_of<L>(tp, dy)), ctx);

  Report r;
  r.output = rel(full_of<L>(tp, y.value), ys);
  r.input_grad = rel(full_of<L>(tp, dx.value), dxs);
  const ParameterList<float> serial_params = serial.parameters();
  WorstError worst;
  for (Parameter<float>& p : par.parameters()) {
    const Tensor<float> slice = shard_of(serial_params.at(p.name).grad, p.layout, tp.rank(), tp.size());
    const double e = rel(p.grad, slice);
    if (!(e <= worst.value())) r.worst = p.name;
    worst.add(e);
    std::ostringstream os;
    os << p.name << ": " << p.layout;
    r.layouts.push_back(os.str());
    ++r.count;
  }
  r.params = worst.value();
  r.serial_count = serial_params.size();
  return r;
}

template <class L>
void check_decoder_layer(const llama::LlamaConfig& c, std::int64_t T, std::initializer_list<int> sizes) {
  for (int tp : sizes) {
    CAPTURE(tp);
    const auto reports = testing::run_ranks(tp, [&](Comm& comm) { return decoder_layer_body<L>(comm, c, 2, T); });
    REQUIRE(reports.size() == static_cast<std::size_t>(tp));
    for (const Report& r : reports) {
      CHECK(r.output < 1e-5);
      CHECK(r.input_grad < 1e-5);
      INFO("worst parameter gradient: ", r.worst);
      CHECK(r.params < 1e-5);
      CHECK(r.count == r.serial_count);
      // Each projection a plain Shard(1) of its own weight, o_proj and down_proj by rows.
      const std::vector<std::string> want{
          "model.layers.3.input_layernorm.weight: Replicate",   "model.layers.3.self_attn.q_proj.weight: Shard(1)",
          "model.layers.3.self_attn.k_proj.weight: Shard(1)",   "model.layers.3.self_attn.v_proj.weight: Shard(1)",
          "model.layers.3.self_attn.o_proj.weight: Shard(0)",   "model.layers.3.post_attention_layernorm.weight: Replicate",
          "model.layers.3.mlp.gate_proj.weight: Shard(1)",      "model.layers.3.mlp.up_proj.weight: Shard(1)",
          "model.layers.3.mlp.down_proj.weight: Shard(0)"};
      CHECK(r.layouts == want);
    }
  }
}

// 8 query heads on 4 KV heads of width 4 (d = 32), F = 24, T = 5: divisible by tp 1, 2, 4.
const llama::LlamaConfig kConfig{.vocab_size = 16, .n_layer = 4, .n_head = 8, .n_kv_head = 4, .d_model = 32,
                                 .ffn_hidden = 24, .rope_theta = 10000.0, .norm_eps = 1e-5};

}  // namespace

TEST_CASE("TensorParallel<llama::DecoderLayer>: GQA heads split over tp 1, 2, 4 give the serial output and gradients within 1e-5") {
  check_decoder_layer<Replicate>(kConfig, 5, {1, 2, 4});
}

TEST_CASE("TensorParallel<llama::DecoderLayer>: odd tp 3 and 7 (6 on 3 heads, F = 18; 14 on 7 heads, F = 21) equal the serial layer") {
  llama::LlamaConfig c = kConfig;
  c.n_head = 6;
  c.n_kv_head = 3;
  c.d_model = 24;
  c.ffn_hidden = 18;
  check_decoder_layer<Replicate>(c, 5, {3});
  c.n_head = 14;
  c.n_kv_head = 7;
  c.d_model = 28;  // head_dim 2
  c.ffn_hidden = 21;
  check_decoder_layer<Replicate>(c, 5, {7});
}

TEST_CASE("SequenceParallel<llama::DecoderLayer>: T = 8 split over tp 1, 2, 4 equals the serial layer within 1e-5") {
  check_decoder_layer<Shard<1>>(kConfig, 8, {1, 2, 4});
}

TEST_CASE("TensorParallel<llama::DecoderLayer>: tp not dividing n_kv_head is an error naming the numbers on every rank") {
  llama::LlamaConfig c = kConfig;
  c.n_kv_head = 2;  // 8 query heads on 2 KV heads of width 4: k_proj has 8 columns, tp 4 divides them
  const auto messages = testing::run_ranks(4, [&](Comm& tp) -> std::string {
    try {
      TensorParallel<llama::DecoderLayer<float>> par(llama::decoder_layer<float>(c, 0, 1), tp);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  });
  REQUIRE(messages.size() == 4);
  for (const std::string& m : messages) {
    CAPTURE(m);
    CHECK(m.find("model.layers.0.self_attn.k_proj.weight: 2 KV heads") != std::string::npos);
    CHECK(m.find("not divisible by tp 4") != std::string::npos);
  }
  // The attention core alone, without the projections before it, names all three numbers.
  const auto core = testing::run_ranks(4, [&](Comm& tp) -> std::string {
    llama::RotaryAttentionCore<float> full(8, 2, 4);
    try {
      TensorParallelShard<llama::RotaryAttentionCore<float>>::heads(full, tp.rank(), tp.size());
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  });
  for (const std::string& m : core) CHECK(m.find("n_head 8 and n_kv_head 2 must both be divisible by tp 4") != std::string::npos);
}
