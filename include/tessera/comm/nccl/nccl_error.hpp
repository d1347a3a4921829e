#pragma once
/// @file
/// Turning CUDA runtime and NCCL result codes into tessera::CommError. Part of the NCCL
/// backend: include it only where CUDA and NCCL are installed.

#include <cuda_runtime.h>
#include <nccl.h>

#include <string>
#include <utility>

#include "tessera/core/error.hpp"

namespace tessera::nccl {

/// Text of a CUDA runtime error: its name and description, e.g.
/// "cudaErrorInsufficientDriver (CUDA driver version is insufficient for CUDA runtime version)".
/// Needs no device; never throws.
inline std::string cuda_error_text(cudaError_t e) {
  return tessera::detail::str(cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

/// Text of an NCCL result code, e.g. "ncclInvalidArgument: invalid argument (run with
/// NCCL_DEBUG=WARN for details)". Needs no device; never throws.
inline std::string nccl_error_text(ncclResult_t r) {
  const char* name = "ncclResult?";
  switch (r) {
    case ncclSuccess: name = "ncclSuccess"; break;
    case ncclUnhandledCudaError: name = "ncclUnhandledCudaError"; break;
    case ncclSystemError: name = "ncclSystemError"; break;
    case ncclInternalError: name = "ncclInternalError"; break;
    case ncclInvalidArgument: name = "ncclInvalidArgument"; break;
    case ncclInvalidUsage: name = "ncclInvalidUsage"; break;
    case ncclRemoteError: name = "ncclRemoteError"; break;
    case ncclInProgress: name = "ncclInProgress"; break;
    case ncclNumResults: break;
  }
  return tessera::detail::str(name, ": ", ncclGetErrorString(r));
}

namespace detail {

using tessera::detail::str;

/// Throws CommError (code() = the cudaError_t) when `e` is not cudaSuccess. The message is
/// the concatenation of `context...` followed by ": <call> failed: <cuda_error_text>".
template <class... Context>
void check_cuda(cudaError_t e, const char* call, Context&&... context) {
  if (e == cudaSuccess) return;
  throw CommError(str(std::forward<Context>(context)..., ": ", call, " failed: ", cuda_error_text(e)),
                  static_cast<int>(e));
}

/// Throws CommError (code() = the ncclResult_t) when `r` is neither ncclSuccess nor
/// ncclInProgress (a non-blocking communicator's "still being enqueued"). The message is
/// the concatenation of `context...` followed by ": <call> failed: <nccl_error_text>" and,
/// where NCCL has one, its last error message.
template <class... Context>
void check_nccl(ncclResult_t r, const char* call, Context&&... context) {
  if (r == ncclSuccess || r == ncclInProgress) return;
  std::string last = ncclGetLastError(nullptr);
  throw CommError(str(std::forward<Context>(context)..., ": ", call, " failed: ", nccl_error_text(r),
                      last.empty() ? "" : "; NCCL says: ", last),
                  static_cast<int>(r));
}

}  // namespace detail
}  // namespace tessera::nccl
