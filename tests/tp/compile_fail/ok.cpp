// Control: a well-formed plan (LayerNorm replicated, up column, GELU, down row, in a residual
// branch) compiles, and so do the typed layers used correctly.
#define PLAN \
  tp::plan(tp::residual(tp::replicate(&UserBlock::ln), tp::column(&UserBlock::up), tp::elementwise(&UserBlock::act), \
                        tp::row(&UserBlock::down)))
#include "block.hpp"
#include "tessera/parallel/tensor/vocab_parallel_cross_entropy.hpp"

int main() {
  tessera::Comm comm;
  run_block(comm);
  tessera::nn::Linear<float> full(8, 8);
  tessera::RowParallel<tessera::nn::Linear<float>> row(full, comm);
  row.forward(tessera::with_layout<tessera::Shard<-1>>(tessera::Tensor<float>()));
  tessera::VocabParallelCrossEntropy<float> ce(comm, 8);
  ce.forward(tessera::with_layout<tessera::Shard<-1>>(tessera::Tensor<float>()), tessera::Tensor<std::int32_t>());
}
