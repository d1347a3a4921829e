// Misuse: backward returns something other than the input gradient (here the loss as a float).
#include "tessera/nn/activation_checkpoint.hpp"

struct ScalarBackward {
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const Input& x) { return {x, {}}; }
  float backward(const tessera::Tensor<float>&, const Context&) { return 0.0f; }
  tessera::ParameterList<float> parameters() { return {}; }
};

int main() {
  tessera::nn::ActivationCheckpoint<ScalarBackward> c{ScalarBackward{}};
  (void)c;
}
