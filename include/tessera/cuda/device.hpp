#pragma once
/// @file
/// Which CUDA devices this process sees, and the checks that refuse to run without one. Host
/// code (no nvcc needed).

#include <cuda_runtime_api.h>

#include <string>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"

namespace tessera::cuda {

/// Number of CUDA devices this process can use; 0 (never an exception) when the runtime
/// reports none or fails (no driver, a driver older than the runtime, CUDA_VISIBLE_DEVICES
/// empty). no_device_reason() says why it is 0.
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

/// Why device_count() is 0, e.g. "cudaGetDeviceCount: cudaErrorInsufficientDriver (CUDA
/// driver version is insufficient for CUDA runtime version)"; empty when a device exists.
inline std::string no_device_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return "cudaGetDeviceCount: " + error_text(e);
  }
  if (n == 0) return "cudaGetDeviceCount: 0 devices";
  return {};
}

/// Makes `device` the calling thread's current device. Throws CudaError naming the reason when
/// this process sees no device ("no CUDA device: ..."), tessera::Error when `device` is not in
/// [0, device_count()).
inline void set_device(int device) {
  const int n = device_count();
  if (n == 0) throw CudaError("no CUDA device: " + no_device_reason());
  TESSERA_EXPECTS(device >= 0 && device < n, "cuda device ", device, " is out of range: this process sees ",
                  n, " CUDA device(s)");
  detail::check(cudaSetDevice(device), "cudaSetDevice", "cuda::set_device(", device, ")");
}

/// The calling thread's current device. Throws CudaError when there is none.
inline int current_device() {
  int d = 0;
  detail::check(cudaGetDevice(&d), "cudaGetDevice", "cuda::current_device()");
  return d;
}

/// Free and total bytes of the current device's memory (cudaMemGetInfo). Throws CudaError.
struct MemoryInfo {
  std::size_t free_bytes = 0;   ///< free on the device now
  std::size_t total_bytes = 0;  ///< the device's memory
};

/// The current device's free and total memory. Throws CudaError where there is no device.
inline MemoryInfo memory_info() {
  MemoryInfo m;
  detail::check(cudaMemGetInfo(&m.free_bytes, &m.total_bytes), "cudaMemGetInfo", "cuda::memory_info()");
  return m;
}

}  // namespace tessera::cuda
