// A host Tensor handed to an operation that takes device memory: refused at compile time.
#include "tessera/core/tensor.hpp"
#include "tessera/cuda/device_tensor.hpp"

namespace {
float first(tessera::cuda::DeviceView<const float> x) { return x.data ? 1.f : 0.f; }
}  // namespace

int main() {
  tessera::Tensor<float> host(tessera::Shape{4});
  return static_cast<int>(first(host));
}
