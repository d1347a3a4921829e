// Misuse: DataParallel wraps a layer that does not expose its parameters (it would have no
// gradients to reduce).
#include "tessera/parallel/data/data_parallel.hpp"

struct NoParameters {
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const Input& x) { return {x, {}}; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy, const Context&) { return dy; }
};

// What a training program writes: wrap the model over the data-parallel communicator.
void wrap(tessera::Comm world) {
  tessera::DataParallel<NoParameters> dp(NoParameters{}, world);
  (void)dp;
}

int main() {}
