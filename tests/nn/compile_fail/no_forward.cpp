// Misuse: forward exists but does not accept the declared Input type.
#include "tessera/nn/activation_checkpoint.hpp"

struct WrongForwardArgument {
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const tessera::Tensor<double>& x) {
    return {tessera::Tensor<float>(x.shape()), {}};
  }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy, const Context&) { return dy; }
  tessera::ParameterList<float> parameters() { return {}; }
};

int main() {
  tessera::nn::ActivationCheckpoint<WrongForwardArgument> c{WrongForwardArgument{}};
  (void)c;
}
