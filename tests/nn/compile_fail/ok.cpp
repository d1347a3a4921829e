// Control: a complete user layer compiles when wrapped.
#include "tessera/nn/activation_checkpoint.hpp"

struct Scale {
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const Input& x) { return {x, {}}; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy, const Context&) { return dy; }
  tessera::ParameterList<float> parameters() { return {}; }
};

int main() {
  tessera::nn::ActivationCheckpoint<Scale> c{Scale{}};
  (void)c;
}
