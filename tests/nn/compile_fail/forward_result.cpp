// Misuse: forward returns only the output, so backward would have no per-call context.
#include "tessera/nn/activation_checkpoint.hpp"

struct OutputOnly {
  using Input = tessera::Tensor<float>;
  tessera::Tensor<float> forward(const Input& x) { return x; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy) { return dy; }
  tessera::ParameterList<float> parameters() { return {}; }
};

int main() {
  tessera::nn::ActivationCheckpoint<OutputOnly> c{OutputOnly{}};
  (void)c;
}
