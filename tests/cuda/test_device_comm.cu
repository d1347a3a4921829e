// ThreadDeviceComm (the threads backend over device memory) against the threads backend's host
// collectives on the same values: bitwise equal for all_reduce (sum, avg, max, min),
// reduce_scatter, all_gather, broadcast and rings of send/recv and send_recv, at 1, 2, 3, 4 and 8 ranks
// sharing one GPU; counts that differ between ranks throw on every rank. Needs a GPU
// (gpu_main.cpp skips without one).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/stream.hpp"
#include "tessera/cuda/thread_device_comm.cuh"

using namespace tessera;
namespace tc = tessera::cuda;

namespace {

// Values whose sums depend on the order (magnitudes 1e-3 .. 1e3), a different draw per rank.
Tensor<float> values(std::int64_t n, int rank, unsigned salt) {
  std::mt19937 rng(1234u + 77u * static_cast<unsigned>(rank) + salt);
  std::uniform_real_distribution<float> mant(-1.f, 1.f);
  std::uniform_int_distribution<int> exp10(-3, 3);
  Tensor<float> t(Shape{n});
  for (std::int64_t i = 0; i < n; ++i) t.data()[i] = mant(rng) * std::pow(10.f, static_cast<float>(exp10(rng)));
  return t;
}

bool bitwise_equal(const Tensor<float>& a, const Tensor<float>& b) {
  return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(float)) == 0;
}

std::vector<float> as_vector(const Tensor<float>& t) { return {t.data(), t.data() + t.numel()}; }

}  // namespace

TEST_CASE("ThreadDeviceComm: every collective equals the threads backend's host collective bitwise, 1 to 8 ranks on one GPU") {
  for (int n : {1, 2, 3, 4, 8}) {
    CAPTURE(n);
    const auto failures = threads::run(n, [n](Comm& world) {
      tc::set_device(0);
      const tc::Stream stream;
      tc::ThreadDeviceComm dc(world, stream);
      std::vector<std::string> bad;
      const std::int64_t count = 1000 + 17;  // not a multiple of any rank count here
      const int r = world.rank();
      for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max, ReduceOp::min}) {
        const Tensor<float> x = values(count, r, static_cast<unsigned>(op));
        std::vector<float> expect = as_vector(x);
        world.all_reduce(expect, op);
        tc::DeviceTensor<float> d = tc::to_device<float>(x, stream);
        dc.all_reduce(d, op);
        if (!bitwise_equal(tc::to_host(d, stream), Tensor<float>::from(Shape{count}, expect)))
          bad.push_back("all_reduce " + std::string(name_of(op)));
      }
      {  // reduce_scatter: blocks of m per rank.
        const std::int64_t m = 123;
        const Tensor<float> x = values(m * n, r, 11);
        std::vector<float> expect(static_cast<std::size_t>(m));
        world.reduce_scatter(as_vector(x), expect);
        tc::DeviceTensor<float> d = tc::to_device<float>(x, stream);
        auto out = tc::DeviceTensor<float>::empty(Shape{m}, stream);
        dc.reduce_scatter(d, out, ReduceOp::sum);
        if (!bitwise_equal(tc::to_host(out, stream), Tensor<float>::from(Shape{m}, expect))) bad.push_back("reduce_scatter");
      }
      {  // all_gather
        const std::int64_t m = 77;
        const Tensor<float> x = values(m, r, 12);
        std::vector<float> expect(static_cast<std::size_t>(m * n));
        world.all_gather(as_vector(x), expect);
        tc::DeviceTensor<float> d = tc::to_device<float>(x, stream);
        auto out = tc::DeviceTensor<float>::empty(Shape{m * n}, stream);
        dc.all_gather(d, out);
        if (!bitwise_equal(tc::to_host(out, stream), Tensor<float>::from(Shape{m * n}, expect))) bad.push_back("all_gather");
      }
      {  // broadcast from the last rank
        const Tensor<float> x = values(300, r, 13);
        std::vector<float> expect = as_vector(x);
        world.broadcast(expect, n - 1);
        tc::DeviceTensor<float> d = tc::to_device<float>(x, stream);
        dc.broadcast(d, n - 1);
        if (!bitwise_equal(tc::to_host(d, stream), Tensor<float>::from(Shape{300}, expect))) bad.push_back("broadcast");
      }
      if (n > 1) {  // a ring: each rank sends to the next, twice, and receives from the previous
        const Tensor<float> a = values(500, r, 14), b = values(500, r, 15);
        tc::DeviceTensor<float> da = tc::to_device<float>(a, stream), db = tc::to_device<float>(b, stream);
        dc.send(da, (r + 1) % n);
        dc.send(db, (r + 1) % n);
        auto ra = tc::DeviceTensor<float>::empty(Shape{500}, stream), rb = tc::DeviceTensor<float>::empty(Shape{500}, stream);
        dc.recv(ra, (r + n - 1) % n);
        dc.recv(rb, (r + n - 1) % n);
        if (!bitwise_equal(tc::to_host(ra, stream), values(500, (r + n - 1) % n, 14)) ||
            !bitwise_equal(tc::to_host(rb, stream), values(500, (r + n - 1) % n, 15)))
          bad.push_back("send/recv ring");
        // The other way round as one exchange (the form that does not deadlock under NCCL).
        dc.send_recv(da, (r + n - 1) % n, ra, (r + 1) % n);
        if (!bitwise_equal(tc::to_host(ra, stream), values(500, (r + 1) % n, 14))) bad.push_back("send_recv ring");
      }
      stream.synchronize();
      return bad;
    });
    for (std::size_t r = 0; r < failures.size(); ++r) {
      CAPTURE(r);
      for (const std::string& f : failures[r]) FAIL_CHECK("rank ", r, ": ", f, " differs from the host collective");
    }
  }
}

TEST_CASE("ThreadDeviceComm: counts that differ between ranks throw on every rank, naming both counts") {
  const auto messages = threads::run(3, [](Comm& world) {
    tc::set_device(0);
    const tc::Stream stream;
    tc::ThreadDeviceComm dc(world, stream);
    auto d = tc::DeviceTensor<float>::zeros(Shape{world.rank() == 2 ? 9 : 8}, stream);
    try {
      dc.all_reduce(d, ReduceOp::sum);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  });
  for (const std::string& m : messages) CHECK(m.find("rank 0 gave 8 and rank 2 gave 9 elements") != std::string::npos);
}
