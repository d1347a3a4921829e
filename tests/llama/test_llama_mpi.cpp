// The Llama-style model through Hybrid on real processes (mpirun -np 2 and 4, see
// tests/llama/meson.build): every (dp, pp, tp) layout of the MPI world trains 20 steps and
// matches the single-rank run computed in each process. Each rank checks its own results; the
// doctest main (tests/mpi/mpi_test_main.cpp) sums the failures of all ranks.
#include <doctest/doctest.h>

#include "compose/compose_bodies.hpp"
#include "llama/llama_model.hpp"
#include "tessera/mpi.hpp"

using namespace compose_test;

TEST_CASE("Llama through Hybrid under MPI: every layout of the world equals the single-rank run") {
  tessera::Comm world = tessera::mpi::world();
  const llama::LlamaDescription<float> d(
      llama::LlamaConfig{.vocab_size = 64, .n_layer = 6, .n_head = 16, .n_kv_head = 8, .d_model = 32, .ffn_hidden = 48},
      21);
  const Setup s;
  const Reference ref = serial_reference(d, s);
  for (const Variant& v : variants_for(world.size(), d.num_blocks() + 2)) {
    CAPTURE(v.describe());
    const Outcome o = run_variant(world, d, s, v, ref);
    CHECK(o.worst_loss < 1e-5);
    CHECK(o.worst_norm < 1e-5);
    CHECK(o.worst_param < 2e-4);
    CHECK(o.params_checked > 0);
    CHECK(o.copies_equal);
  }
}
