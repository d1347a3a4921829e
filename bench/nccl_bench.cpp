// nccl_bench: all_reduce through tessera's NCCL backend on one GPU, printed as nccl-tests
// prints it (size, count, type, redop, time, algbw, busbw, #wrong).
//
//   nccl_bench [-b 4K] [-e 256M] [-f 2] [-n 20] [-w 5] [-d 0] [-t float]
//
// Two timings per size, measured side by side in one run:
//   back to back  n iall_reduce calls issued, then every request waited (as nccl-tests times:
//                 GPU throughput, host overhead hidden behind the queue);
//   blocking      n all_reduce calls, each issue + wait (what a training step that waits on
//                 every call sees: adds tessera's event record and polling per call).
// algbw = bytes / time and busbw = algbw * 2(n-1)/n (nccl-tests, doc/PERFORMANCE.md), which is 0
// at one rank: there NCCL's in-place all_reduce moves no data, so the times are the per-call
// overhead of NCCL plus tessera. Beside them, the same buffer through raw ncclAllReduce calls
// (a communicator of its own, no tessera in between), back to back and blocking, and tessera's
// time over raw NCCL's per size; the summary line gives the largest ratio above 1 MiB (issue
// 13's target: <= 1.02). The last line times a device-to-device cudaMemcpyAsync of the
// largest size as the memory-bandwidth scale of this GPU.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "tessera/nccl.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// Parses "4K", "256M", "1G", "4096" into bytes.
std::size_t parse_bytes(const std::string& s) {
  std::size_t pos = 0;
  const double v = std::stod(s, &pos);
  double mult = 1;
  if (pos < s.size()) {
    switch (s[pos]) {
      case 'K': case 'k': mult = 1024.0; break;
      case 'M': case 'm': mult = 1024.0 * 1024.0; break;
      case 'G': case 'g': mult = 1024.0 * 1024.0 * 1024.0; break;
      default: throw CLI::ValidationError("size", "unknown unit in '" + s + "' (use K, M or G)");
    }
  }
  return static_cast<std::size_t>(v * mult);
}

struct Timing {
  double us = 0;     // microseconds per call
  double algbw = 0;  // GB/s
  double busbw = 0;  // GB/s
};

Timing timing(double seconds, int iters, std::size_t bytes, int ranks) {
  Timing t;
  t.us = seconds * 1e6 / iters;
  t.algbw = static_cast<double>(bytes) / (seconds / iters) / 1e9;
  t.busbw = t.algbw * 2.0 * (ranks - 1) / ranks;
  return t;
}

// Seconds of `iters` raw ncclAllReduce calls in place on `data` (no tessera in between):
// back to back (all enqueued, then one stream synchronize) and blocking (each followed by a
// stream synchronize), on the raw communicator's own stream.
template <tessera::CommScalar T>
std::pair<double, double> raw_nccl_seconds(ncclComm_t raw, cudaStream_t stream, T* data, std::size_t count,
                                           int iters, int warmup) {
  using tessera::nccl::detail::check_cuda;
  const ncclDataType_t type = tessera::nccl::to_nccl(tessera::dtype_of<T>);
  auto call = [&] {
    const ncclResult_t r = ncclAllReduce(data, data, count, type, ncclSum, raw, stream);
    if (r != ncclSuccess) throw tessera::Error(std::string("nccl_bench: raw ncclAllReduce: ") + ncclGetErrorString(r));
  };
  for (int i = 0; i < warmup; ++i) call();
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", "raw NCCL");
  auto t0 = Clock::now();
  for (int i = 0; i < iters; ++i) call();
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", "raw NCCL");
  const double back_to_back = std::chrono::duration<double>(Clock::now() - t0).count();
  t0 = Clock::now();
  for (int i = 0; i < iters; ++i) {
    call();
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", "raw NCCL");
  }
  return {back_to_back, std::chrono::duration<double>(Clock::now() - t0).count()};
}

template <tessera::CommScalar T>
int run(tessera::Comm& gpu, ncclComm_t raw, cudaStream_t raw_stream, std::size_t min_bytes, std::size_t max_bytes,
        double factor, int iters, int warmup) {
  const char* type = tessera::name_of(tessera::dtype_of<T>).data();
  std::printf("#%75s%27s%35s\n", "back to back", "blocking", "raw NCCL: b2b, blocking");
  std::printf("# %12s %12s %8s %6s %9s %8s %8s %9s %8s %8s %7s %9s %9s %7s %7s\n", "size", "count", "type", "redop",
              "time", "algbw", "busbw", "time", "algbw", "busbw", "#wrong", "time", "time", "ratio", "ratio");
  std::printf("# %12s %12s %8s %6s %9s %8s %8s %9s %8s %8s %7s %9s %9s %7s %7s\n", "(B)", "(elements)", "", "",
              "(us)", "(GB/s)", "(GB/s)", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(us)", "b2b", "block");
  double busbw_sum = 0;
  int rows = 0, wrong_total = 0;
  double worst_b2b = 0, worst_blocking = 0;  // tessera / raw above 1 MiB
  for (std::size_t bytes = min_bytes; bytes <= max_bytes;
       bytes = std::max(bytes + sizeof(T), static_cast<std::size_t>(static_cast<double>(bytes) * factor))) {
    const std::size_t count = bytes / sizeof(T);
    std::vector<T> host(count);
    for (std::size_t i = 0; i < count; ++i) host[i] = static_cast<T>(i % 251);
    tessera::nccl::DeviceBuffer<T> buf(host);
    for (int i = 0; i < warmup; ++i) gpu.all_reduce(buf.span());

    std::vector<tessera::Request> requests;
    requests.reserve(static_cast<std::size_t>(iters));
    auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) requests.push_back(gpu.iall_reduce(buf.span()));
    for (auto& r : requests) r.wait();
    const double async_s = std::chrono::duration<double>(Clock::now() - t0).count();

    t0 = Clock::now();
    for (int i = 0; i < iters; ++i) gpu.all_reduce(buf.span());
    const double blocking_s = std::chrono::duration<double>(Clock::now() - t0).count();

    // At one rank a sum over ranks is the identity, however many times it runs.
    const std::vector<T> after = buf.to_host();
    int wrong = 0;
    for (std::size_t i = 0; i < count; ++i) wrong += after[i] != host[i] ? 1 : 0;
    wrong_total += wrong;

    const Timing a = timing(async_s, iters, count * sizeof(T), gpu.size());
    const Timing b = timing(blocking_s, iters, count * sizeof(T), gpu.size());
    // The same buffer through raw NCCL, right after (nccl-tests' own call, no tessera).
    const auto [raw_b2b_s, raw_blocking_s] = raw_nccl_seconds(raw, raw_stream, buf.data(), count, iters, warmup);
    const double ratio_b2b = async_s / raw_b2b_s, ratio_blocking = blocking_s / raw_blocking_s;
    if (count * sizeof(T) > (std::size_t{1} << 20)) {
      worst_b2b = std::max(worst_b2b, ratio_b2b);
      worst_blocking = std::max(worst_blocking, ratio_blocking);
    }
    std::printf("  %12zu %12zu %8s %6s %9.2f %8.2f %8.2f %9.2f %8.2f %8.2f %7d %9.2f %9.2f %7.3f %7.3f\n",
                count * sizeof(T), count, type, "sum", a.us, a.algbw, a.busbw, b.us, b.algbw, b.busbw, wrong,
                raw_b2b_s * 1e6 / iters, raw_blocking_s * 1e6 / iters, ratio_b2b, ratio_blocking);
    std::fflush(stdout);
    busbw_sum += a.busbw;
    ++rows;
  }
  std::printf("# Out of bounds values : %d %s\n", wrong_total, wrong_total == 0 ? "OK" : "FAILED");
  std::printf("# Avg bus bandwidth    : %g (back to back; 0 by definition at 1 rank)\n",
              rows > 0 ? busbw_sum / rows : 0.0);
  if (worst_b2b > 0)
    std::printf("# tessera / raw NCCL above 1 MiB: at most %.3f back to back, %.3f blocking (issue 13's target: "
                "<= 1.02)\n", worst_b2b, worst_blocking);
  return wrong_total == 0 ? 0 : 1;
}

// Device-to-device copy of `bytes` on `stream`: the memory-bandwidth scale of the GPU.
void memcpy_reference(std::size_t bytes, cudaStream_t stream, int iters) {
  using tessera::nccl::detail::check_cuda;
  tessera::nccl::DeviceBuffer<float> a(bytes / sizeof(float)), b(bytes / sizeof(float));
  auto copy = [&] {
    check_cuda(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, stream),
               "cudaMemcpyAsync", "memcpy reference");
  };
  copy();
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", "memcpy reference");
  const auto t0 = Clock::now();
  for (int i = 0; i < iters; ++i) copy();
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", "memcpy reference");
  const double s = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
  std::printf("# reference: cudaMemcpyAsync device to device of %zu B: %.2f us, %.1f GB/s copied "
              "(%.1f GB/s read + written)\n",
              bytes, s * 1e6, static_cast<double>(bytes) / s / 1e9, 2.0 * static_cast<double>(bytes) / s / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"all_reduce through tessera's NCCL backend on one GPU, nccl-tests style"};
  std::string min_s = "4K", max_s = "256M", type = "float";
  double factor = 2;
  int iters = 20, warmup = 5, device = 0;
  app.add_option("-b,--minbytes", min_s, "smallest message (K, M, G suffixes)");
  app.add_option("-e,--maxbytes", max_s, "largest message");
  app.add_option("-f,--stepfactor", factor, "size multiplier between rows")->check(CLI::Range(1.01, 1e6));
  app.add_option("-n,--iters", iters, "timed calls per size and timing")->check(CLI::PositiveNumber);
  app.add_option("-w,--warmup_iters", warmup, "untimed calls per size")->check(CLI::NonNegativeNumber);
  app.add_option("-d,--device", device, "CUDA device")->check(CLI::NonNegativeNumber);
  app.add_option("-t,--type", type, "element type")->check(CLI::IsMember({"float", "double", "int32", "int64"}));
  CLI11_PARSE(app, argc, argv);

  if (tessera::nccl::device_count() == 0) {
    std::printf("SKIP: no CUDA device (%s) -- nccl_bench needs a GPU\n", tessera::nccl::no_device_reason().c_str());
    return 77;
  }
  const std::size_t min_bytes = parse_bytes(min_s), max_bytes = parse_bytes(max_s);

  tessera::Comm gpu = tessera::nccl::make_communicator(device, {.name = "nccl:bench"});
  cudaDeviceProp prop{};
  tessera::nccl::detail::check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties", "nccl_bench");
  int nccl_version = 0, runtime = 0, driver = 0;
  static_cast<void>(ncclGetVersion(&nccl_version));
  static_cast<void>(cudaRuntimeGetVersion(&runtime));
  static_cast<void>(cudaDriverGetVersion(&driver));
  std::printf("# tessera nccl_bench: all_reduce in place, %d rank(s); device %d: %s\n", gpu.size(), device, prop.name);
  std::printf("# NCCL %d (header %d), CUDA runtime %d, driver %d; %d timed + %d warm-up calls per size\n",
              nccl_version, NCCL_VERSION_CODE, runtime, driver, iters, warmup);
  std::printf("#\n");

  // Raw NCCL on the same GPU, one rank, its own stream: the reference tessera's calls are
  // divided by.
  ncclComm_t raw = nullptr;
  if (const ncclResult_t r = ncclCommInitAll(&raw, 1, &device); r != ncclSuccess) {
    std::printf("nccl_bench: ncclCommInitAll for the raw reference failed: %s\n", ncclGetErrorString(r));
    return 1;
  }
  cudaStream_t raw_stream = nullptr;
  tessera::nccl::detail::check_cuda(cudaStreamCreateWithFlags(&raw_stream, cudaStreamNonBlocking), "cudaStreamCreate",
                                    "nccl_bench");
  int rc = 0;
  if (type == "float") rc = run<float>(gpu, raw, raw_stream, min_bytes, max_bytes, factor, iters, warmup);
  if (type == "double") rc = run<double>(gpu, raw, raw_stream, min_bytes, max_bytes, factor, iters, warmup);
  if (type == "int32") rc = run<std::int32_t>(gpu, raw, raw_stream, min_bytes, max_bytes, factor, iters, warmup);
  if (type == "int64") rc = run<std::int64_t>(gpu, raw, raw_stream, min_bytes, max_bytes, factor, iters, warmup);
  static_cast<void>(cudaStreamDestroy(raw_stream));
  static_cast<void>(ncclCommDestroy(raw));
  memcpy_reference(max_bytes, tessera::nccl::stream_of(gpu), iters);
  return rc;
}
