#pragma once
/// @file
/// Request: the handle a non-blocking communication call returns.

#include <memory>

namespace tessera {

/// Backend side of a Request. Backends derive from it.
class RequestImpl {
 public:
  virtual ~RequestImpl() = default;
  /// Blocks until the operation completes; throws what the operation threw (TimeoutError,
  /// AbortedError, MismatchError, CommError).
  virtual void wait() = 0;
  /// True once the operation has completed (then wait() returns at once). Never blocks; throws
  /// if the operation failed.
  virtual bool test() = 0;
};

/// Handle of a non-blocking operation (iall_reduce, iall_gather, ireduce_scatter, isend, irecv,
/// batch_isend_irecv). The buffers handed to the call must stay alive and untouched until
/// wait() returns or test() returns true. A default-constructed Request is already complete.
/// Destroying a Request does not wait; the operation still runs in issue order, but its
/// buffers must outlive it, so always wait().
class Request {
 public:
  Request() = default;
  /// Wraps a backend's request (nullptr: already complete).
  explicit Request(std::shared_ptr<RequestImpl> impl) : impl_(std::move(impl)) {}
  /// Blocks until complete. Throws the operation's error (see RequestImpl::wait). Idempotent.
  void wait() {
    if (impl_) {
      auto impl = std::move(impl_);
      impl->wait();
    }
  }
  /// Non-blocking completion check; throws the operation's error if it failed.
  bool test() {
    if (!impl_) return true;
    if (impl_->test()) {
      wait();
      return true;
    }
    return false;
  }

 private:
  std::shared_ptr<RequestImpl> impl_;
};

}  // namespace tessera
