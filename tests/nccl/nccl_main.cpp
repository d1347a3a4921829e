// Main of the NCCL test program. Two runs of it are registered with Meson:
//   nccl_test --host-only   checks that need no GPU (error mapping, argument checks); always run.
//   nccl_test               collectives on the GPU; exits 77 (Meson: SKIP) where CUDA sees no
//                           device, printing why.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstring>
#include <iostream>
#include <vector>

#include "tessera/comm/nccl/device.hpp"

int main(int argc, char** argv) {
  bool host_only = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host-only") == 0) {
      host_only = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  doctest::Context context;
  context.applyCommandLine(static_cast<int>(args.size()), args.data());
  if (host_only) {
    context.addFilter("test-suite", "nccl-host");
  } else {
    if (tessera::nccl::device_count() == 0) {
      std::cout << "SKIP: no CUDA device (" << tessera::nccl::no_device_reason()
                << ") -- NCCL tests need a GPU" << std::endl;
      return 77;
    }
    context.addFilter("test-suite", "nccl-gpu");
  }
  return context.run();
}
