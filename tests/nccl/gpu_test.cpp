// Collectives of the NCCL backend on real GPUs. World size 1 on device 0 always; the
// multi-rank cases run one thread per GPU where 2 or more devices exist. main() skips this
// suite (exit 77) where CUDA sees no device.
#include "tessera/nccl.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "self_comm.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/nccl/nccl_device_comm.hpp"
#include "tessera/cuda/stream.hpp"

namespace nccl = tessera::nccl;
using tessera::Comm;
using tessera::CommError;
using tessera::ReduceOp;
using tessera::Request;
using namespace std::chrono_literals;

namespace {

// The NCCL communicator of one rank on device 0, bootstrapped over a host Comm of one rank.
Comm one_gpu() {
  Comm bootstrap = tessera::testing_nccl::self_comm();
  return nccl::make_communicator(bootstrap, 0);
}

// Values that a wrong element type would corrupt: int64 beyond 32 bits, doubles that are not
// floats, negative numbers.
template <class T>
std::vector<T> pattern(std::size_t n, int seed) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto k = static_cast<std::int64_t>(i) * 7 + seed * 1000 - 50;
    if constexpr (std::is_same_v<T, std::int64_t>) {
      v[i] = (std::int64_t{1} << 40) * (k % 3 - 1) + k;
    } else if constexpr (std::is_same_v<T, double>) {
      v[i] = static_cast<double>(k) + 1e-12 * static_cast<double>(i);
    } else {
      v[i] = static_cast<T>(k);
    }
  }
  return v;
}

// Runs fn(rank, n) on n threads, one per GPU (device = rank); rethrows the first failure.
void run_on_gpus(int n, const std::function<void(int, int)>& fn) {
  std::vector<std::thread> threads;
  std::mutex mutex;
  std::exception_ptr first;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r, n);
      } catch (...) {
        const std::lock_guard lock(mutex);
        if (!first) first = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

// Holds a stream: a host function that returns when `open` is set or after 2 s, whichever
// is first. It must end by itself: ncclCommAbort may wait for the device to drain.
struct Gate {
  std::atomic<bool> open{false};
  static void CUDART_CB hold(void* p) {
    auto* gate = static_cast<Gate*>(p);
    const auto end = std::chrono::steady_clock::now() + 2s;
    while (!gate->open.load() && std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(1ms);
  }
};

}  // namespace

TEST_SUITE("nccl-gpu") {

TEST_CASE("make_communicator over a bootstrap of 1 rank: rank 0 of 1 on device 0, named nccl:world") {
  Comm gpu = one_gpu();
  CHECK(gpu.rank() == 0);
  CHECK(gpu.size() == 1);
  CHECK(gpu.name() == "nccl:world");
  CHECK(nccl::nccl_backend(gpu).device() == 0);
  CHECK(nccl::stream_of(gpu) != nullptr);
  int current = -1;
  REQUIRE(cudaGetDevice(&current) == cudaSuccess);
  CHECK(current == 0);
}

TEST_CASE_TEMPLATE("all_reduce at 1 rank: sum, avg, max and min leave the data unchanged", T, float,
                   double, std::int32_t, std::int64_t) {
  Comm gpu = one_gpu();
  const auto host = pattern<T>(1000, 1);
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max, ReduceOp::min}) {
    const std::string op_name(name_of(op));
    CAPTURE(op_name);
    nccl::DeviceBuffer<T> buf(host);
    gpu.all_reduce(buf.span(), op);
    CHECK(buf.to_host() == host);
    Request r = gpu.iall_reduce(buf.span(), op);
    r.wait();
    CHECK(buf.to_host() == host);
  }
}

TEST_CASE_TEMPLATE("all_gather at 1 rank copies in to out exactly", T, float, double, std::int32_t,
                   std::int64_t) {
  Comm gpu = one_gpu();
  const auto host = pattern<T>(4097, 2);
  nccl::DeviceBuffer<T> in(host);
  nccl::DeviceBuffer<T> out(std::vector<T>(host.size(), T{9}));
  gpu.all_gather(in.span(), out.span());
  CHECK(out.to_host() == host);
  nccl::DeviceBuffer<T> too_big(host.size() + 1);
  CHECK_THROWS_AS(gpu.all_gather(in.span(), too_big.span()), tessera::Error);
}

TEST_CASE_TEMPLATE("reduce_scatter at 1 rank: out equals in for sum and max", T, float, double,
                   std::int32_t, std::int64_t) {
  Comm gpu = one_gpu();
  const auto host = pattern<T>(333, 3);
  nccl::DeviceBuffer<T> in(host);
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
    nccl::DeviceBuffer<T> out(std::vector<T>(host.size(), T{0}));
    Request r = gpu.ireduce_scatter(in.span(), out.span(), op);
    r.wait();
    CHECK(out.to_host() == host);
  }
}

TEST_CASE("broadcast at 1 rank keeps root's data; root 1 is out of range and throws Error") {
  Comm gpu = one_gpu();
  const auto host = pattern<double>(100, 4);
  nccl::DeviceBuffer<double> buf(host);
  gpu.broadcast(buf.span(), 0);
  CHECK(buf.to_host() == host);
  CHECK_THROWS_WITH_AS(gpu.broadcast(buf.span(), 1), doctest::Contains("root 1 is out of range"),
                       tessera::Error);
}

TEST_CASE("iall_reduce: 8 requests in flight complete whatever the order of their waits") {
  Comm gpu = one_gpu();
  std::vector<nccl::DeviceBuffer<float>> bufs;
  std::vector<std::vector<float>> hosts;
  std::vector<Request> requests;
  for (int i = 0; i < 8; ++i) {
    hosts.push_back(pattern<float>(1 << 16, i));
    bufs.emplace_back(hosts.back());
  }
  for (auto& b : bufs) requests.push_back(gpu.iall_reduce(b.span()));
  for (int i = 7; i >= 0; --i) requests[static_cast<std::size_t>(i)].wait();
  for (int i = 0; i < 8; ++i) CHECK(bufs[static_cast<std::size_t>(i)].to_host() == hosts[static_cast<std::size_t>(i)]);
  // test() turns true without wait() once the GPU is done.
  Request r = gpu.iall_reduce(bufs[0].span());
  const auto end = std::chrono::steady_clock::now() + 10s;
  bool done = false;
  while (!(done = r.test()) && std::chrono::steady_clock::now() < end) std::this_thread::yield();
  CHECK(done);
}

TEST_CASE("barrier, a zero-length all_reduce and an empty batch_isend_irecv complete at 1 rank") {
  Comm gpu = one_gpu();
  CHECK_NOTHROW(gpu.barrier());
  std::vector<float> none;
  CHECK_NOTHROW(gpu.all_reduce(std::span<float>(none)));
  CHECK_NOTHROW(gpu.batch_send_recv({}));
}

TEST_CASE("split at 1 rank gives a working communicator named nccl:world/split(color=0)") {
  Comm gpu = one_gpu();
  Comm sub = gpu.split(0, 0);
  CHECK(sub.size() == 1);
  CHECK(sub.rank() == 0);
  CHECK(sub.name() == "nccl:world/split(color=0)");
  const auto host = pattern<std::int64_t>(10, 5);
  nccl::DeviceBuffer<std::int64_t> in(host), out(host.size());
  sub.all_gather(in.span(), out.span());
  CHECK(out.to_host() == host);
  CHECK_NOTHROW(gpu.barrier());  // the parent still works
}

TEST_CASE("a stalled stream: all_reduce throws TimeoutError naming the call, aborts the "
          "communicator, and later calls throw CommError") {
  Comm gpu = one_gpu();
  gpu.set_timeout(300ms);
  cudaStream_t stream = nccl::stream_of(gpu);
  nccl::DeviceBuffer<float> buf(std::vector<float>(16, 1.0f));
  Gate gate;
  REQUIRE(cudaLaunchHostFunc(stream, &Gate::hold, &gate) == cudaSuccess);
  const auto start = std::chrono::steady_clock::now();
  try {
    gpu.all_reduce(buf.span());
    FAIL("all_reduce did not time out");
  } catch (const tessera::TimeoutError& e) {
    const std::string what = e.what();
    CHECK(what.find("all_reduce on nccl:world (rank 0 of 1, cuda device 0) did not complete within 300 ms") !=
          std::string::npos);
  }
  gate.open = true;
  // Without the timeout, the all_reduce would have returned normally once the gate closed (2 s).
  CHECK(std::chrono::steady_clock::now() - start < 8s);
  CHECK(nccl::nccl_backend(gpu).aborted());
  CHECK_THROWS_WITH_AS(gpu.barrier(), doctest::Contains("aborted"), CommError);
  // The stream drains once the gate opens.
  const auto end = std::chrono::steady_clock::now() + 10s;
  while (cudaStreamQuery(stream) == cudaErrorNotReady && std::chrono::steady_clock::now() < end)
    std::this_thread::sleep_for(1ms);
  CHECK(cudaStreamQuery(stream) == cudaSuccess);
}

TEST_CASE("2+ GPUs: all_reduce, all_gather, reduce_scatter, broadcast, a batched ring shift and "
          "split equal their serial results") {
  const int n = std::min(nccl::device_count(), 4);
  if (n < 2) {
    MESSAGE("skipped: this machine has ", nccl::device_count(), " GPU(s); the multi-rank cases need 2");
    return;
  }
  const ncclUniqueId id = nccl::make_unique_id();
  constexpr std::size_t count = 1000;
  std::vector<std::vector<float>> inputs;
  for (int r = 0; r < n; ++r) inputs.push_back(pattern<float>(count, r));
  std::vector<float> serial_sum(count, 0.0f), serial_max(count, -1e30f);
  for (const auto& in : inputs)
    for (std::size_t i = 0; i < count; ++i) {
      serial_sum[i] += in[i];
      serial_max[i] = std::max(serial_max[i], in[i]);
    }
  run_on_gpus(n, [&](int rank, int size) {
    Comm gpu = nccl::make_communicator(id, rank, size, rank);
    const auto ru = static_cast<std::size_t>(rank);
    nccl::DeviceBuffer<float> sum(inputs[ru]), max(inputs[ru]);
    gpu.all_reduce(sum.span(), ReduceOp::sum);
    gpu.all_reduce(max.span(), ReduceOp::max);
    CHECK(sum.to_host() == serial_sum);
    CHECK(max.to_host() == serial_max);

    nccl::DeviceBuffer<float> in(inputs[ru]), gathered(count * static_cast<std::size_t>(size));
    gpu.all_gather(in.span(), gathered.span());
    std::vector<float> expect_gather;
    for (const auto& v : inputs) expect_gather.insert(expect_gather.end(), v.begin(), v.end());
    CHECK(gathered.to_host() == expect_gather);

    nccl::DeviceBuffer<float> block(count);
    gpu.reduce_scatter(gathered.span(), block.span(), ReduceOp::sum);  // every rank gives all blocks
    std::vector<float> expect_block(count);
    for (std::size_t i = 0; i < count; ++i) expect_block[i] = static_cast<float>(size) * inputs[ru][i];
    CHECK(block.to_host() == expect_block);

    nccl::DeviceBuffer<std::int64_t> b(pattern<std::int64_t>(count, rank));
    gpu.broadcast(b.span(), size - 1);
    CHECK(b.to_host() == pattern<std::int64_t>(count, size - 1));

    // Ring shift of 16 MiB per rank: send to rank + 1, receive from rank - 1, in one group.
    const std::size_t big = std::size_t{1} << 22;
    nccl::DeviceBuffer<float> out(pattern<float>(big, rank)), got(big);
    const int next = (rank + 1) % size, prev = (rank + size - 1) % size;
    const std::vector<tessera::P2POp> ops{
        tessera::P2POp::send(std::span<const float>(out.span()), next),
        tessera::P2POp::recv(got.span(), prev)};
    gpu.batch_send_recv(ops);
    CHECK(got.to_host() == pattern<float>(big, prev));

    // Even and odd ranks split; each half all_reduces its ranks' values.
    Comm half = gpu.split(rank % 2, rank);
    std::vector<std::int32_t> one{rank};
    nccl::DeviceBuffer<std::int32_t> v(one);
    half.all_reduce(v.span(), ReduceOp::sum);
    std::int32_t expect = 0;
    for (int r = rank % 2; r < size; r += 2) expect += r;
    CHECK(v.to_host()[0] == expect);
    gpu.barrier();
  });
}

TEST_CASE("2+ GPUs: a rank that skips an all_reduce makes the others throw TimeoutError, not hang") {
  const int n = std::min(nccl::device_count(), 2);
  if (n < 2) {
    MESSAGE("skipped: this machine has ", nccl::device_count(), " GPU(s); the case needs 2");
    return;
  }
  const ncclUniqueId id = nccl::make_unique_id();
  std::atomic<bool> timed_out{false};
  run_on_gpus(n, [&](int rank, int size) {
    Comm gpu = nccl::make_communicator(id, rank, size, rank, {.timeout = 500ms});
    if (rank != 0) return;  // rank 1 never calls
    nccl::DeviceBuffer<float> buf(std::vector<float>(8, 1.0f));
    try {
      gpu.all_reduce(buf.span());
    } catch (const tessera::TimeoutError&) {
      timed_out = true;
    }
  });
  CHECK(timed_out.load());
}

}  // TEST_SUITE

TEST_SUITE("nccl-gpu") {

// NcclDeviceComm (tessera/cuda/nccl/nccl_device_comm.hpp) at world 1: each call is ordered after the
// rank's stream and before its later work, without the host waiting: the results equal the
// input (a sum over one rank) once the rank's stream is synchronized.
TEST_CASE("NcclDeviceComm: stream-ordered collectives at world 1 return the input on the rank's stream") {
  namespace tc = tessera::cuda;
  Comm comm = one_gpu();
  const tc::Stream stream;
  tc::NcclDeviceComm dc(comm, stream);
  tessera::Tensor<float> x(tessera::Shape{1000});
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = 0.25f * static_cast<float>(i) - 100.f;
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max, ReduceOp::min}) {
    tc::DeviceTensor<float> d = tc::to_device<float>(x, stream);
    dc.all_reduce(d, op);
    const tessera::Tensor<float> back = tc::to_host(d, stream);
    CHECK(std::equal(back.data(), back.data() + back.numel(), x.data()));
  }
  tc::DeviceTensor<float> d = tc::to_device<float>(x, stream);
  auto out = tc::DeviceTensor<float>::empty(tessera::Shape{1000}, stream);
  dc.all_gather(d, out);
  tessera::Tensor<float> back = tc::to_host(out, stream);
  CHECK(std::equal(back.data(), back.data() + back.numel(), x.data()));
  out.fill_zero(stream);
  dc.reduce_scatter(d, out, ReduceOp::sum);
  back = tc::to_host(out, stream);
  CHECK(std::equal(back.data(), back.data() + back.numel(), x.data()));
  // reduce_scatter_v at world 1: the one piece is the whole input (out of place, then in place);
  // counts that are not one per rank, or do not sum to the input, are refused.
  out.fill_zero(stream);
  const std::vector<std::int64_t> counts{1000};
  dc.reduce_scatter_v(d, counts, out, ReduceOp::sum);
  back = tc::to_host(out, stream);
  CHECK(std::equal(back.data(), back.data() + back.numel(), x.data()));
  dc.reduce_scatter_v(d, counts, d, ReduceOp::sum);
  back = tc::to_host(d, stream);
  CHECK(std::equal(back.data(), back.data() + back.numel(), x.data()));
  const std::vector<std::int64_t> two{500, 500}, short_counts{999};
  CHECK_THROWS_WITH_AS(dc.reduce_scatter_v(d, two, out, ReduceOp::sum), doctest::Contains("2 counts for 1 ranks"),
                       tessera::Error);
  CHECK_THROWS_WITH_AS(dc.reduce_scatter_v(d, short_counts, out, ReduceOp::sum),
                       doctest::Contains("summing to 999, an input of 1000 elements"), tessera::Error);
  // all_gather_v at world 1: the one piece is the whole output; a wrong input length is refused.
  auto gathered = tc::DeviceTensor<float>::zeros(tessera::Shape{1000}, stream);
  dc.all_gather_v(d, counts, gathered);
  back = tc::to_host(gathered, stream);
  CHECK(std::equal(back.data(), back.data() + back.numel(), x.data()));
  CHECK_THROWS_WITH_AS(dc.all_gather_v(d, short_counts, gathered), doctest::Contains("summing to 999"), tessera::Error);
  dc.broadcast(d, 0);
  dc.wait_all();
  // Not an NCCL communicator: refused by name.
  CHECK_THROWS_WITH_AS(tc::NcclDeviceComm(tessera::testing_nccl::self_comm(), stream),
                       doctest::Contains("is not an NCCL communicator"), tessera::Error);
}

}  // TEST_SUITE
