// Misuse: the layer does not say what its forward takes.
#include "tessera/nn/activation_checkpoint.hpp"

struct NoInput {
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const tessera::Tensor<float>& x) { return {x, {}}; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy, const Context&) { return dy; }
  tessera::ParameterList<float> parameters() { return {}; }
};

int main() {
  tessera::nn::ActivationCheckpoint<NoInput> c{NoInput{}};
  (void)c;
}
