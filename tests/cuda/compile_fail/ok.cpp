// The same call with device memory compiles (so the failing case fails for its reason alone).
#include "tessera/cuda/device_tensor.hpp"

namespace {
float first(tessera::cuda::DeviceView<const float> x) { return x.data ? 1.f : 0.f; }
}  // namespace

int main() {
  tessera::cuda::DeviceTensor<float> dev;
  return static_cast<int>(first(dev));
}
