// Misuse: a head whose logits stay split over the vocabulary (tp_output = Shard<-1>) given a loss
// that takes whole logits (nn::CrossEntropy) through sequential_loss.
#include "compose/compose_bodies.hpp"

int main() {
  auto loss = tessera::sequential_loss<compose_test::TinyDecoder>(
      tessera::nn::CrossEntropy<float>({.reduction = tessera::nn::Reduction::sum}));
  (void)loss;
}
