// The tensor-parallel bodies of tp_bodies.hpp on real processes: the MPI world is the tp axis
// (mpirun -np 1..4, see tests/tp/meson.build), and at 4 processes also the tp axis of a
// dp = 2 x tp = 2 mesh. Each rank checks its own results; the doctest main
// (tests/mpi/mpi_test_main.cpp) sums the failures of all ranks.
#include <doctest/doctest.h>

#include <cstdint>

#include "tessera/mesh/mesh.hpp"
#include "tessera/mpi.hpp"
#include "tp/tp_bodies.hpp"

using namespace tessera;

namespace {

template <class Layer, class L, class Make>
void check_plan(Comm& tp, Make make) {
  const tp_bodies::Equivalence r = tp_bodies::plan_equivalence_body<Layer, L>(tp, make);
  CHECK(r.output < 1e-5);
  CHECK(r.input_grad < 1e-5);
  INFO("worst parameter gradient: ", r.params.worst);
  CHECK(r.params.max_rel < 1e-5);
  CHECK(r.params.replicated_equal);
}

template <class L>
void check_gpt(Comm& tp, int steps) {
  const tp_bodies::GPTReport r = tp_bodies::gpt_body<L>(tp, steps);
  CHECK(r.logits < 1e-5);
  CHECK(r.loss < 1e-5);
  INFO("worst gradient: ", r.grads.worst, "; worst parameter after training: ", r.train_worst);
  CHECK(r.grads.max_rel < 1e-5);
  CHECK(r.grads.replicated_equal);
  CHECK(r.train_loss < 1e-5);
  CHECK(r.train_params < 1e-5);
  CHECK(r.replicated_equal);
}

}  // namespace

TEST_CASE("mpi tp: the conjugate operators, ColumnParallel / RowParallel and the vocab-parallel embedding equal their serial definitions") {
  Comm tp = mpi::world();
  // MPI may sum in another order than rank order (recursive doubling at 4 ranks): round-off.
  CHECK(tp_bodies::mappings_body(tp) < 1e-13);
  CHECK(tp_bodies::column_row_body<double>(tp) < 1e-12);
  CHECK(tp_bodies::column_row_body<float>(tp) < 1e-5);
  CHECK(tp_bodies::vocab_embedding_body<Replicate>(tp) < 1e-13);
  CHECK(tp_bodies::vocab_embedding_body<Shard<1>>(tp) < 1e-13);
}

TEST_CASE("mpi tp: vocab-parallel cross-entropy with label smoothing 0.1 over vocab 8 equals the loop reference to 1e-12 (C11)") {
  Comm tp = mpi::world();
  const Tensor<double> logits = tp_test::random_tensor<double>(Shape{6, 8}, 41, "logits", 2.0);
  const Tensor<std::int32_t> targets = Tensor<std::int32_t>::from(Shape{6}, {3, 0, 7, 4, 5, 1});
  const auto [ref_loss, ref_grad] = tp_test::smoothed_reference(logits, targets, 0.1);
  const tp_bodies::LossResult r = tp_bodies::vocab_cross_entropy_body(tp, 8, 6, 0.1, logits, targets);
  CHECK(std::abs(r.loss - ref_loss) < 1e-12);
  CHECK(tp_test::rel_err(r.grad, ref_grad) < 1e-12);
}

TEST_CASE("mpi tp: attention, MLP, GPT block and a user block by their plans equal the serial layers, with and without sequence parallelism") {
  Comm tp = mpi::world();
  check_plan<nn::SelfAttention<float>, Replicate>(tp, tp_bodies::make_attention);
  check_plan<nn::MLP<float>, Replicate>(tp, tp_bodies::make_mlp);
  check_plan<nn::Block<float>, Replicate>(tp, tp_bodies::make_block);
  check_plan<nn::Block<float>, Shard<1>>(tp, tp_bodies::make_block);
  check_plan<tp_bodies::FeedForward<float>, Replicate>(tp, tp_bodies::make_feed_forward);
  check_plan<tp_bodies::FeedForward<float>, Shard<1>>(tp, tp_bodies::make_feed_forward);
}

TEST_CASE("mpi tp: a GPT block step issues 4 all-reduces of B x T x d, or 4 reduce-scatters + 4 all-gathers + 1 of the LayerNorms' gradients") {
  Comm tp = mpi::world();
  const std::size_t btd = tp_bodies::kB * tp_bodies::kT * tp_bodies::kD;
  const tp_bodies::Counts plain = tp_bodies::plan_counts_body<nn::Block<float>, Replicate>(tp, tp_bodies::make_block);
  CHECK(plain.all_reduce == 4);
  CHECK(plain.all_reduce_elems == 4 * btd);
  CHECK(plain.reduce_scatter + plain.all_gather + plain.other == 0);
  const tp_bodies::Counts seq = tp_bodies::plan_counts_body<nn::Block<float>, Shard<1>>(tp, tp_bodies::make_block);
  CHECK(seq.reduce_scatter == 4);
  CHECK(seq.reduce_scatter_elems == 4 * btd);
  CHECK(seq.all_gather == 4);
  CHECK(seq.all_gather_elems * static_cast<std::size_t>(tp.size()) == 4 * btd);
  CHECK(seq.all_reduce == 1);
  CHECK(seq.all_reduce_elems == 4 * static_cast<std::size_t>(tp_bodies::kD));
}

TEST_CASE("mpi tp: TensorParallelGPT equals GPT over 20 AdamW steps, replicated parameters bitwise equal on every rank after each step") {
  Comm tp = mpi::world();
  auto [init_err, layouts] = tp_bodies::gpt_init_body(tp);
  CHECK(init_err == 0.0);
  CHECK(layouts);
  check_gpt<Replicate>(tp, 20);
  check_gpt<Shard<1>>(tp, 20);
}

TEST_CASE("mpi tp: on the tp axis of a dp = 2 x tp = 2 mesh, each replica's TensorParallelGPT equals GPT") {
  Comm world = mpi::world();
  if (world.size() != 4) return;
  Mesh mesh(world, MeshShape{.dp = 2, .tp = 2});
  check_gpt<Replicate>(mesh.tp(), 5);
  check_gpt<Shard<1>>(mesh.tp(), 5);
}
