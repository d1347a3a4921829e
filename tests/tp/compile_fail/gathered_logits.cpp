// Misuse: gathered (replicated) logits handed to the vocab-parallel cross-entropy.
#include "tessera/parallel/tensor/vocab_parallel_cross_entropy.hpp"

int main() {
  tessera::Comm comm;
  tessera::VocabParallelCrossEntropy<float> ce(comm, 8);
  const tessera::Activation<tessera::Tensor<float>, tessera::Replicate> logits{tessera::Tensor<float>(tessera::Shape{3, 8})};
  ce.forward(logits, tessera::Tensor<std::int32_t>(tessera::Shape{3}));
}
