// ThreadDeviceComm (the threads backend over device memory) against the threads backend's host
// collectives on the same values: bitwise equal for all_reduce (sum, avg, max, min),
// reduce_scatter, reduce_scatter_v (against the all-reduce's elements of each rank's piece),
// all_gather_v (unequal and empty pieces, in and out of place), all_gather, broadcast and rings of send/recv and send_recv, at 1, 2, 3, 4 and 8 ranks
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
      {  // reduce_scatter_v: unequal pieces, rank 1's (and 4's) empty; each rank's piece reduced onto
         // it alone, bitwise the host all_reduce's elements there; out of place, then in place.
        std::vector<std::int64_t> counts;
        std::int64_t total = 0, off = 0;
        for (int q = 0; q < n; ++q) {
          counts.push_back(q % 3 == 1 ? 0 : 50 + 13 * q);
          if (q < r) off += counts.back();
          total += counts.back();
        }
        const std::int64_t mine = counts[static_cast<std::size_t>(r)];
        const Tensor<float> x = values(total, r, 16);
        std::vector<float> sum = as_vector(x);
        world.all_reduce(sum, ReduceOp::sum);
        const Tensor<float> expect =
            Tensor<float>::from(Shape{mine}, std::vector<float>(sum.begin() + off, sum.begin() + off + mine));
        tc::DeviceTensor<float> d = tc::to_device<float>(x, stream);
        auto out = tc::DeviceTensor<float>::empty(Shape{mine}, stream);
        dc.reduce_scatter_v(d, counts, out, ReduceOp::sum);
        if (!bitwise_equal(tc::to_host(out, stream), expect)) bad.push_back("reduce_scatter_v");
        dc.reduce_scatter_v(d, counts, tc::DeviceView<float>(d.data() + off, Shape{mine}), ReduceOp::sum);
        const Tensor<float> back = tc::to_host(d, stream);
        const Tensor<float> piece =
            Tensor<float>::from(Shape{mine}, std::vector<float>(back.data() + off, back.data() + off + mine));
        if (!bitwise_equal(piece, expect)) bad.push_back("reduce_scatter_v in place");
        for (std::int64_t i = 0; i < total; ++i)  // the other pieces of this rank's input are untouched
          if ((i < off || i >= off + mine) && back.data()[i] != x.data()[i]) {
            bad.push_back("reduce_scatter_v wrote outside this rank's piece");
            break;
          }
      }
      {  // all_gather_v: the same unequal pieces gathered back, each rank's values in its place;
         // out of place, then in place (each rank's piece already in its output).
        std::vector<std::int64_t> counts;
        std::int64_t total = 0, off = 0;
        for (int q = 0; q < n; ++q) {
          counts.push_back(q % 3 == 1 ? 0 : 40 + 7 * q);
          if (q < r) off += counts.back();
          total += counts.back();
        }
        std::vector<float> expect;
        for (int q = 0; q < n; ++q) {
          const Tensor<float> v = values(counts[static_cast<std::size_t>(q)], q, 17);
          expect.insert(expect.end(), v.data(), v.data() + v.numel());
        }
        const Tensor<float> want = Tensor<float>::from(Shape{total}, expect);
        const Tensor<float> mine = values(counts[static_cast<std::size_t>(r)], r, 17);
        tc::DeviceTensor<float> d = tc::to_device<float>(mine, stream);
        auto out = tc::DeviceTensor<float>::zeros(Shape{total}, stream);
        dc.all_gather_v(d, counts, out);
        if (!bitwise_equal(tc::to_host(out, stream), want)) bad.push_back("all_gather_v");
        auto inplace = tc::DeviceTensor<float>::zeros(Shape{total}, stream);
        if (mine.numel() > 0)
          tc::detail::check(cudaMemcpyAsync(inplace.data() + off, d.data(), d.bytes(), cudaMemcpyDeviceToDevice, stream.get()),
                            "cudaMemcpyAsync", "test");
        dc.all_gather_v(tc::DeviceView<const float>(inplace.data() + off, Shape{mine.numel()}), counts, inplace);
        if (!bitwise_equal(tc::to_host(inplace, stream), want)) bad.push_back("all_gather_v in place");
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

TEST_CASE("ThreadDeviceComm::reduce_scatter_v and all_gather_v: counts that differ between ranks, or a piece not its rank's count, throw on every rank") {
  const auto messages = threads::run(3, [](Comm& world) {
    tc::set_device(0);
    const tc::Stream stream;
    tc::ThreadDeviceComm dc(world, stream);
    std::vector<std::string> got;
    auto d = tc::DeviceTensor<float>::zeros(Shape{12}, stream);
    auto out = tc::DeviceTensor<float>::zeros(Shape{4}, stream);
    // Rank 2 cuts the 12 elements 4 + 3 + 5, the others 4 + 4 + 4.
    const std::vector<std::int64_t> even{4, 4, 4}, odd{4, 3, 5};
    auto out2 = tc::DeviceTensor<float>::zeros(Shape{5}, stream);
    try {
      dc.reduce_scatter_v(d, world.rank() == 2 ? odd : even, world.rank() == 2 ? out2 : out, ReduceOp::sum);
      got.push_back("no error");
    } catch (const Error& e) {
      got.push_back(e.what());
    }
    // Equal counts, but rank 1's output holds 5 elements, not its 4.
    try {
      dc.reduce_scatter_v(d, even, world.rank() == 1 ? out2 : out, ReduceOp::sum);
      got.push_back("no error");
    } catch (const Error& e) {
      got.push_back(e.what());
    }
    // all_gather_v alike: differing counts, then rank 1's input of 5 elements, not its 4.
    try {
      dc.all_gather_v(world.rank() == 2 ? out2 : out, world.rank() == 2 ? odd : even, d);
      got.push_back("no error");
    } catch (const Error& e) {
      got.push_back(e.what());
    }
    try {
      dc.all_gather_v(world.rank() == 1 ? out2 : out, even, d);
      got.push_back("no error");
    } catch (const Error& e) {
      got.push_back(e.what());
    }
    return got;
  });
  for (const std::vector<std::string>& m : messages) {
    REQUIRE(m.size() == 4);
    CHECK(m[0].find("the counts differ") != std::string::npos);
    CHECK(m[1].find("rank 1's count is 4 and its output has 5 elements") != std::string::npos);
    CHECK(m[2].find("the counts differ") != std::string::npos);
    CHECK(m[3].find("rank 1's count is 4 and its input has 5 elements") != std::string::npos);
  }
}
