// The well-formed counterpart: split logits to the vocab-parallel loss.
#include "compose/compose_bodies.hpp"

int main() {
  tessera::Comm tp;
  auto loss = tessera::sequential_loss<compose_test::TinyDecoder>(
      tessera::VocabParallelCrossEntropy<float>(tp, 64, {.reduction = tessera::nn::Reduction::sum}));
  (void)loss;
}
