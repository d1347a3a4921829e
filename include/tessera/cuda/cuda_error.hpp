#pragma once
/// @file
/// CudaError and the checks that turn a failed CUDA runtime or cuBLAS(Lt) call into one: the
/// message names the call, its sizes and the runtime's own text. Host code: compiles with any
/// C++20 compiler given the CUDA toolkit's headers (no nvcc needed).

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <utility>

#include "tessera/core/error.hpp"

namespace tessera::cuda {

/// A CUDA runtime, cuBLASLt or cuDNN call failed. `code()` is the library's status (a
/// cudaError_t, cublasStatus_t or cudnnStatus_t); the message names the call and its sizes.
class CudaError : public Error {
 public:
  /// `code`: the library's status value.
  explicit CudaError(const std::string& message, int code = 0,
                     SourceLocation loc = SourceLocation::current())
      : Error(message, loc), code_(code) {}
  /// The library's status value.
  int code() const noexcept { return code_; }

 private:
  int code_;
};

/// Device memory ran out: the message names the bytes asked for and what the caching
/// allocator and the device hold (allocated, cached, free, total).
class OutOfDeviceMemory : public CudaError {
 public:
  /// As CudaError's constructor (code cudaErrorMemoryAllocation).
  explicit OutOfDeviceMemory(const std::string& message,
                             SourceLocation loc = SourceLocation::current())
      : CudaError(message, static_cast<int>(cudaErrorMemoryAllocation), loc) {}
};

/// Text of a CUDA runtime status, e.g. "cudaErrorInvalidValue (invalid argument)". Needs no
/// device; never throws.
inline std::string error_text(cudaError_t e) {
  return tessera::detail::str(cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

/// Text of a cuBLAS status, e.g. "CUBLAS_STATUS_NOT_SUPPORTED (the functionality requested is
/// not supported)". Never throws.
inline std::string error_text(cublasStatus_t s) {
  return tessera::detail::str(cublasLtGetStatusName(s), " (", cublasLtGetStatusString(s), ")");
}

namespace detail {
using tessera::detail::str;

/// Throws CudaError when `e` is not cudaSuccess: "<context...>: <call> failed: <text>".
/// Clears the runtime's sticky last error for non-sticky failures, so the next call is clean.
template <class... Context>
void check(cudaError_t e, const char* call, Context&&... context) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();
  throw CudaError(str(std::forward<Context>(context)..., ": ", call, " failed: ", error_text(e)),
                  static_cast<int>(e));
}

/// Throws CudaError when `s` is not CUBLAS_STATUS_SUCCESS: "<context...>: <call> failed: <text>".
template <class... Context>
void check(cublasStatus_t s, const char* call, Context&&... context) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw CudaError(str(std::forward<Context>(context)..., ": ", call, " failed: ", error_text(s)),
                  static_cast<int>(s));
}

/// Checks the launch of the kernel named `kernel` (cudaGetLastError right after `<<<...>>>`).
template <class... Context>
void check_launch(const char* kernel, Context&&... context) {
  check(cudaGetLastError(), kernel, std::forward<Context>(context)...);
}
}  // namespace detail

}  // namespace tessera::cuda
