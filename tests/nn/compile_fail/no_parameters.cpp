// Misuse: the layer does not expose its parameters.
#include "tessera/nn/activation_checkpoint.hpp"

struct NoParameters {
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const Input& x) { return {x, {}}; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy, const Context&) { return dy; }
};

int main() {
  tessera::nn::ActivationCheckpoint<NoParameters> c{NoParameters{}};
  (void)c;
}
