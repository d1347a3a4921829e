// train_gpt's --device cuda where the build has no CUDA device layers (nvcc was not found when
// Meson configured): a clear refusal instead of a link error.
#include "gpt/device_model.hpp"

#include "tessera/core/error.hpp"

namespace train_gpt {

bool built_with_cuda() { return false; }
bool built_with_nccl() { return false; }
int visible_gpus() { return 0; }
std::string no_device_reason() { return "this build has no CUDA device layers"; }

std::unique_ptr<DeviceModel> make_device_model(const tessera::GPTConfig&, const tessera::ParameterList<float>&,
                                               std::uint64_t, bool, int, int, std::optional<tessera::Comm>,
                                               bool, bool, int, int, int) {
  throw tessera::Error(
      "train_gpt: --device cuda: this build has no CUDA device layers (nvcc or cuBLASLt was not found when Meson "
      "configured); install the CUDA toolkit and configure with -Dcuda=enabled");
}

}  // namespace train_gpt
