// Main of the CUDA device-layer GPU tests: exits 77 (Meson: SKIP) where CUDA sees no device,
// printing why; otherwise runs every test case against the CPU reference layers.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <iostream>

#include "tessera/cuda/device.hpp"

int main(int argc, char** argv) {
  if (tessera::cuda::device_count() == 0) {
    std::cout << "SKIP: no CUDA device (" << tessera::cuda::no_device_reason()
              << ") -- the device layers' tests need a GPU; scripts/gpu_check.sh runs them on one" << std::endl;
    return 77;
  }
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  return context.run();
}
