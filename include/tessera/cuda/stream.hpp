#pragma once
/// @file
/// Stream and Event: owning handles of a CUDA stream and event. Device work in tessera is
/// stream-ordered: each rank owns a compute stream; collectives run on a communication stream
/// that waits on events recorded on the compute stream (docs/gpu.md). Host code (no nvcc).

#include <cuda_runtime_api.h>

#include <utility>

#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device.hpp"

namespace tessera::cuda {

/// An owning, move-only CUDA stream of the current device, created non-blocking (it does not
/// synchronize with the legacy default stream). Throws CudaError where there is no device.
class Stream {
 public:
  /// Creates a stream on the current device (cudaStreamCreateWithFlags, non-blocking).
  Stream() {
    if (device_count() == 0) throw CudaError("cuda::Stream: no CUDA device: " + no_device_reason());
    detail::check(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
                  "cuda::Stream()");
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  /// Takes the other's stream; the other holds none afterwards.
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  /// Takes the other's stream, destroying this one's.
  Stream& operator=(Stream&& o) noexcept {
    if (this != &o) {
      reset();
      s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
  }
  /// Destroys the stream (after its queued work, as cudaStreamDestroy does).
  ~Stream() { reset(); }
  /// The raw handle, for cuBLASLt, NCCL and kernel launches.
  cudaStream_t get() const noexcept { return s_; }
  /// Blocks the calling thread until the stream's queued work is done. Throws CudaError with
  /// the first asynchronous error of that work (e.g. an illegal address in a kernel).
  void synchronize() const { detail::check(cudaStreamSynchronize(s_), "cudaStreamSynchronize", "cuda::Stream"); }

 private:
  void reset() noexcept {
    if (s_ != nullptr) (void)cudaStreamDestroy(s_);
    s_ = nullptr;
  }
  cudaStream_t s_ = nullptr;
};

/// An owning, move-only CUDA event without timing (cudaEventDisableTiming), for ordering one
/// stream after another: `e.record(a); e.wait_on(b);` makes b's later work wait for a's
/// earlier work. Throws CudaError where there is no device.
class Event {
 public:
  /// Creates the event on the current device.
  Event() {
    detail::check(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming), "cudaEventCreateWithFlags",
                  "cuda::Event()");
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  /// Takes the other's event.
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  /// Takes the other's event, destroying this one's.
  Event& operator=(Event&& o) noexcept {
    if (this != &o) {
      if (e_ != nullptr) (void)cudaEventDestroy(e_);
      e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
  }
  /// Destroys the event.
  ~Event() {
    if (e_ != nullptr) (void)cudaEventDestroy(e_);
  }
  /// Records the event at the current end of `s`'s queue.
  void record(const Stream& s) { detail::check(cudaEventRecord(e_, s.get()), "cudaEventRecord", "cuda::Event"); }
  /// Makes `s`'s later work wait until the work before the last record() is done (the host
  /// does not block).
  void wait_on(const Stream& s) const {
    detail::check(cudaStreamWaitEvent(s.get(), e_, 0), "cudaStreamWaitEvent", "cuda::Event");
  }
  /// Whether the work before the last record() is done (cudaEventQuery; never blocks). True for
  /// an event never recorded. Throws CudaError for an error other than "not ready".
  bool done() const {
    const cudaError_t e = cudaEventQuery(e_);
    if (e == cudaErrorNotReady) {
      (void)cudaGetLastError();  // "not ready" is no error: clear it, as PyTorch's CUDAEvent::query does
      return false;
    }
    detail::check(e, "cudaEventQuery", "cuda::Event");
    return true;
  }
  /// Blocks the host until the recorded work is done.
  void synchronize() const { detail::check(cudaEventSynchronize(e_), "cudaEventSynchronize", "cuda::Event"); }
  /// The raw handle.
  cudaEvent_t get() const noexcept { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

}  // namespace tessera::cuda
