#pragma once
/// @file
/// Which CUDA devices this process sees, without throwing where it sees none. Part of the
/// NCCL backend: include it only where CUDA and NCCL are installed.

#include <cuda_runtime.h>

#include <string>

#include "tessera/comm/nccl/nccl_error.hpp"
#include "tessera/core/error.hpp"

namespace tessera::nccl {

/// Number of CUDA devices this process can use; 0 (never an exception) when the CUDA runtime
/// reports none or fails (no driver, driver too old for the runtime, CUDA_VISIBLE_DEVICES
/// empty). no_device_reason() says why it is 0.
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

/// Why device_count() is 0, e.g. "cudaGetDeviceCount: cudaErrorInsufficientDriver (CUDA driver
/// version is insufficient for CUDA runtime version)"; the empty string when a device exists.
/// Used in the message of tests that skip. Never throws except std::bad_alloc.
inline std::string no_device_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return "cudaGetDeviceCount: " + cuda_error_text(e);
  if (n == 0) return "cudaGetDeviceCount: 0 devices";
  return {};
}

/// True when this process can make an NCCL communicator: CUDA reports at least one device
/// (NCCL itself is linked wherever this header compiles). Never throws.
inline bool available() noexcept { return device_count() > 0; }

/// Makes `device` the calling thread's current CUDA device. Throws Error if `device` is not in
/// [0, device_count()), CommError (code() = the cudaError_t) if cudaSetDevice fails.
inline void set_device(int device) {
  const int n = device_count();
  TESSERA_EXPECTS(device >= 0 && device < n, "cuda device ", device,
                  " is out of range: this process sees ", n, " CUDA device(s)",
                  n == 0 ? " (" + no_device_reason() + ")" : std::string());
  detail::check_cuda(cudaSetDevice(device), "cudaSetDevice", "set_device(", device, ")");
}

}  // namespace tessera::nccl
