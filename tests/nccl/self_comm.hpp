#pragma once
// SelfBackend: a host communicator of exactly one rank, the bootstrap for single-GPU NCCL
// tests (the threads backend's tessera::threads::run(1, fn) does the same job once it exists).

#include <cstring>
#include <memory>
#include <string>

#include "tessera/comm/communicator.hpp"

namespace tessera::testing_nccl {

/// A CommBackend of one rank over host memory: every collective is the identity (or a copy).
class SelfBackend final : public CommBackend {
 public:
  explicit SelfBackend(std::string name = "self:world") : name_(std::move(name)) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return name_; }
  void set_name(std::string name) override { name_ = std::move(name); }
  std::chrono::milliseconds timeout() const override { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) override { timeout_ = t; }
  Request all_reduce(void*, std::size_t, DType, ReduceOp, bool) override { return {}; }
  Request all_gather(const void* in, void* out, std::size_t count, DType t, bool) override {
    if (count > 0) std::memcpy(out, in, count * size_of(t));
    return {};
  }
  Request reduce_scatter(const void* in, void* out, std::size_t count, DType t, ReduceOp,
                         bool) override {
    if (count > 0) std::memcpy(out, in, count * size_of(t));
    return {};
  }
  void broadcast(void*, std::size_t, DType, int) override {}
  Request send(const void*, std::size_t, DType, int, int, bool) override {
    throw Error("SelfBackend: a rank cannot send to itself");
  }
  Request recv(void*, std::size_t, DType, int, int, bool) override {
    throw Error("SelfBackend: a rank cannot receive from itself");
  }
  Request batch_p2p(std::span<const P2POp>) override { return {}; }
  void barrier() override {}
  std::shared_ptr<CommBackend> split(int, int) override {
    return std::make_shared<SelfBackend>(name_ + "/split");
  }

 private:
  std::string name_;
  std::chrono::milliseconds timeout_ = default_timeout();
};

/// A Comm of one rank over host memory.
inline Comm self_comm() { return Comm(std::make_shared<SelfBackend>()); }

}  // namespace tessera::testing_nccl
