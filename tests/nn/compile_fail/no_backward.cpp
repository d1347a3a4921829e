// Misuse: backward takes only the output gradient, not the context from forward.
#include "tessera/nn/activation_checkpoint.hpp"

struct NoContextBackward {
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const Input& x) { return {x, {}}; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy) { return dy; }
  tessera::ParameterList<float> parameters() { return {}; }
};

int main() {
  tessera::nn::ActivationCheckpoint<NoContextBackward> c{NoContextBackward{}};
  (void)c;
}
