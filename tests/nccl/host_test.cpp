// Checks of the NCCL backend that need no GPU: type and op mapping, error texts and codes,
// argument checks that run before any CUDA call, and the bootstrap's error exchange.
#include "tessera/nccl.hpp"

#include <doctest/doctest.h>

#include <string>
#include <type_traits>
#include <vector>

#include "self_comm.hpp"

namespace nccl = tessera::nccl;
using tessera::Comm;
using tessera::CommError;
using tessera::DType;
using tessera::ReduceOp;

static_assert(tessera::Communicator<Comm>, "Comm must model Communicator with the NCCL backend included.");
static_assert(std::is_base_of_v<tessera::CommBackend, nccl::NcclCommunicator>,
              "NcclCommunicator must implement CommBackend.");
static_assert(!std::is_abstract_v<nccl::NcclCommunicator>,
              "NcclCommunicator must implement every CommBackend method.");
static_assert(!std::is_copy_constructible_v<nccl::DeviceBuffer<float>> &&
                  std::is_nothrow_move_constructible_v<nccl::DeviceBuffer<float>>,
              "DeviceBuffer must be move-only.");

TEST_SUITE("nccl-host") {

TEST_CASE("to_nccl: f32, f64, i32, i64 map to ncclFloat32, ncclFloat64, ncclInt32, ncclInt64") {
  CHECK(nccl::to_nccl(DType::f32) == ncclFloat32);
  CHECK(nccl::to_nccl(DType::f64) == ncclFloat64);
  CHECK(nccl::to_nccl(DType::i32) == ncclInt32);
  CHECK(nccl::to_nccl(DType::i64) == ncclInt64);
}

TEST_CASE("to_nccl: sum, avg, max, min map to ncclSum, ncclAvg, ncclMax, ncclMin") {
  CHECK(nccl::to_nccl(ReduceOp::sum) == ncclSum);
  CHECK(nccl::to_nccl(ReduceOp::avg) == ncclAvg);
  CHECK(nccl::to_nccl(ReduceOp::max) == ncclMax);
  CHECK(nccl::to_nccl(ReduceOp::min) == ncclMin);
}

TEST_CASE("device_count: never throws; it is 0 exactly when no_device_reason() says why") {
  int n = -1;
  CHECK_NOTHROW(n = nccl::device_count());
  CHECK(n >= 0);
  const std::string reason = nccl::no_device_reason();
  CHECK((n == 0) == !reason.empty());
  if (n == 0) CHECK(reason.find("cudaGetDeviceCount") != std::string::npos);
  CHECK(nccl::available() == (n > 0));
}

TEST_CASE("check_cuda / check_nccl: throw CommError keeping the code and naming call and context") {
  try {
    nccl::detail::check_cuda(cudaErrorInvalidValue, "cudaMemcpy", "all_reduce on ", "x");
    FAIL("check_cuda did not throw");
  } catch (const CommError& e) {
    CHECK(e.code() == static_cast<int>(cudaErrorInvalidValue));
    const std::string what = e.what();
    CHECK(what.find("all_reduce on x: cudaMemcpy failed: cudaErrorInvalidValue") != std::string::npos);
  }
  try {
    nccl::detail::check_nccl(ncclInvalidArgument, "ncclAllReduce", "all_reduce on ", "y");
    FAIL("check_nccl did not throw");
  } catch (const CommError& e) {
    CHECK(e.code() == static_cast<int>(ncclInvalidArgument));
    const std::string what = e.what();
    CHECK(what.find("all_reduce on y: ncclAllReduce failed: ncclInvalidArgument: ") != std::string::npos);
    CHECK(what.find(ncclGetErrorString(ncclInvalidArgument)) != std::string::npos);
  }
  // Success and "still in progress" (non-blocking communicators) are not errors.
  CHECK_NOTHROW(nccl::detail::check_nccl(ncclSuccess, "ncclAllReduce", "z"));
  CHECK_NOTHROW(nccl::detail::check_nccl(ncclInProgress, "ncclAllReduce", "z"));
  CHECK_NOTHROW(nccl::detail::check_cuda(cudaSuccess, "cudaMemcpy", "z"));
}

TEST_CASE("set_device: an index past device_count() throws Error naming the index and the count") {
  const int n = nccl::device_count();
  try {
    nccl::set_device(n);
    FAIL("set_device did not throw");
  } catch (const tessera::Error& e) {
    const std::string what = e.what();
    CHECK(what.find(tessera::detail::str("cuda device ", n, " is out of range")) != std::string::npos);
    CHECK(what.find(tessera::detail::str("sees ", n, " CUDA device(s)")) != std::string::npos);
  }
  CHECK_THROWS_AS(nccl::set_device(-1), tessera::Error);
}

TEST_CASE("make_communicator: a bad device index throws CommError naming the rank and device, "
          "before NCCL starts") {
  Comm world = tessera::testing_nccl::self_comm();
  const int bad = nccl::device_count() + 3;
  try {
    static_cast<void>(nccl::make_communicator(world, bad));
    FAIL("make_communicator did not throw");
  } catch (const CommError& e) {
    const std::string what = e.what();
    CHECK(what.find("make_communicator nccl:world over self:world (rank 0 of 1)") != std::string::npos);
    CHECK(what.find(tessera::detail::str("rank 0: cuda device ", bad, " is out of range")) !=
          std::string::npos);
  }
}

TEST_CASE("make_communicator(id, rank, size, ...): a rank outside [0, size) throws Error") {
  const ncclUniqueId id{};
  CHECK_THROWS_WITH_AS(static_cast<void>(nccl::make_communicator(id, 2, 2, 0)),
                       doctest::Contains("rank 2 is not in [0, 2)"), tessera::Error);
  CHECK_THROWS_AS(static_cast<void>(nccl::make_communicator(id, 0, 0, 0)), tessera::Error);
}

TEST_CASE("nccl_backend: a Comm of another backend throws Error naming it") {
  const Comm world = tessera::testing_nccl::self_comm();
  CHECK_THROWS_WITH_AS(static_cast<void>(nccl::nccl_backend(world)),
                       doctest::Contains("self:world is not an NCCL communicator"), tessera::Error);
  CHECK_THROWS_AS(static_cast<void>(nccl::stream_of(Comm{})), tessera::Error);
}

TEST_CASE("DeviceBuffer: an empty buffer allocates and copies nothing") {
  nccl::DeviceBuffer<double> empty(std::size_t{0});
  CHECK(empty.data() == nullptr);
  CHECK(empty.empty());
  CHECK(empty.span().empty());
  CHECK(empty.to_host().empty());
}

TEST_CASE("DeviceBuffer: copy_from / copy_to with a host span of another size throw Error naming both sizes") {
  nccl::DeviceBuffer<float> empty;
  std::vector<float> three(3);
  CHECK_THROWS_WITH_AS(empty.copy_from(three), doctest::Contains("host has 3 elements, the buffer 0"),
                       tessera::Error);
  CHECK_THROWS_WITH_AS(empty.copy_to(three), doctest::Contains("host has 3 elements, the buffer 0"),
                       tessera::Error);
}

TEST_CASE("DeviceBuffer: a host round trip is exact where a device exists; else cudaMalloc throws CommError") {
  const std::vector<std::int64_t> host{1, -2, (std::int64_t{1} << 40) + 3};
  if (nccl::device_count() == 0) {
    CHECK_THROWS_WITH_AS(nccl::DeviceBuffer<std::int64_t>{host}, doctest::Contains("cudaMalloc failed"),
                         CommError);
  } else {
    nccl::DeviceBuffer buf(host);
    CHECK(buf.size() == 3);
    CHECK(buf.to_host() == host);
    nccl::DeviceBuffer<std::int64_t> moved(std::move(buf));
    CHECK(buf.empty());
    CHECK(moved.to_host() == host);
  }
}

}  // TEST_SUITE
