// Malformed safetensors files: each is a tessera::Error naming the file and the defect, never
// a crash, an allocation of what the header claims, or a read past the mapping. Regression
// tests of issue 17's list (2^60-byte header, overlapping and out-of-order offsets, byte
// sizes that overflow, truncation, non-JSON headers, wrong JSON types) and of what fuzzing
// found.

#include <doctest/doctest.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "fuzz/fuzz_inputs.hpp"

using namespace fuzz_inputs;
using tessera::checkpoint::SafetensorsFile;

namespace {

// A file of the safetensors layout: the 8-byte length field (`length` unless -1: the header's
// size), the header text as is, then `data`.
std::vector<std::uint8_t> raw(const std::string& header, const std::vector<std::uint8_t>& data,
                              std::optional<std::uint64_t> length = std::nullopt) {
  std::vector<std::uint8_t> out(8 + header.size() + data.size());
  const std::uint64_t n = length.value_or(header.size());
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

std::vector<std::uint8_t> floats(std::initializer_list<float> v) {
  std::vector<std::uint8_t> out(v.size() * 4);
  std::memcpy(out.data(), v.begin(), out.size());
  return out;
}

// The message of the tessera::Error that opening `bytes` throws ("" when it opens); any other
// exception escapes and fails the test.
std::string open_error(const std::vector<std::uint8_t>& bytes) {
  ScratchDir d;
  const fs::path p = d.path / "input.safetensors";
  write_bytes(p, bytes);
  try {
    SafetensorsFile f(p);
  } catch (const tessera::Error& e) {
    const std::string m = e.what();
    CHECK_MESSAGE(m.find(p.string()) != std::string::npos, "the error does not name the file: ", m);
    return m;
  }
  return "";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

const std::string a_f32x2 = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

}  // namespace

TEST_CASE("safetensors input: the control file opens and reads its values (the tests below start from it)") {
  ScratchDir d;
  CHECK(feed_safetensors(raw("{" + a_f32x2 + "}", floats({1.5f, -2.0f})), d.path) == Outcome::accepted);
  write_bytes(d.path / "x.safetensors", raw("{" + a_f32x2 + "}", floats({1.5f, -2.0f})));
  const SafetensorsFile f(d.path / "x.safetensors");
  const auto v = f.read<float>("a");
  CHECK(v.data()[0] == 1.5f);
  CHECK(v.data()[1] == -2.0f);
}

TEST_CASE("safetensors input: a header length of 2^60 or 2^64 - 1 bytes is refused before any allocation") {
  for (std::uint64_t n : {std::uint64_t{1} << 60, ~std::uint64_t{0}, std::uint64_t{1} << 63}) {
    CAPTURE(n);
    const auto t0 = std::chrono::steady_clock::now();
    const std::string e = open_error(raw("{" + a_f32x2 + "}", floats({1, 2}), n));
    CHECK(has(e, "header length " + std::to_string(n) + " exceeds the "));
    CHECK(has(e, "the file is truncated or not safetensors"));
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(1));
  }
}

TEST_CASE("safetensors input: overlapping offsets are refused naming both tensors; out-of-order keys are fine") {
  const auto data = floats({1, 2, 3, 4});
  CHECK(has(open_error(raw(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                           data)),
            "tensors 'a' (bytes [0, 12)) and 'b' (bytes [8, 16)) overlap"));
  // The same bytes claimed twice (b inside a).
  CHECK(has(open_error(raw(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                           R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                           data)),
            "overlap"));
  // data_offsets whose end precedes their begin.
  CHECK(has(open_error(raw(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", data)),
            "tensor 'a': data_offsets [16, 0] end before they begin"));
  // Keys in another order than the data: valid (the format does not order them), and read right.
  ScratchDir d;
  write_bytes(d.path / "x.safetensors", raw(R"({"z":{"dtype":"F32","shape":[1],"data_offsets":[12,16]},)"
                                            R"("a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})",
                                            data));
  const SafetensorsFile f(d.path / "x.safetensors");
  CHECK(f.read<float>("z").data()[0] == 4.0f);
  CHECK(f.read<float>("a").data()[2] == 3.0f);
}

TEST_CASE("safetensors input: a shape whose element count or byte size overflows is refused") {
  const auto data = floats({1, 2});
  // 2^62 x 4 elements: the element count overflows int64.
  CHECK(has(open_error(raw(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", data)),
            "tensor 'a': shape [4611686018427387904,4] overflows"));
  // 2^61 F64 elements: the count fits, its byte size (2^64) does not.
  CHECK(has(open_error(raw(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", data)),
            "tensor 'a': byte size overflows"));
  // 2^32 x 2^32: overflows through the product of two moderate extents.
  CHECK(has(open_error(raw(R"({"a":{"dtype":"I32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", data)),
            "overflows"));
  // An extent above int64 (a JSON unsigned integer).
  CHECK(has(open_error(raw(R"({"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", data)),
            "has an extent that is not a non-negative integer"));
  // A zero extent beside a huge one holds no bytes: valid, and read as an empty tensor.
  ScratchDir d;
  CHECK(feed_safetensors(raw(R"({"e":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]},)" + a_f32x2 +
                                 "}",
                             data),
                         d.path) == Outcome::accepted);
}

TEST_CASE("safetensors input: every truncation of a valid file is an error naming the file") {
  const auto whole = raw(R"({"__metadata__":{"format":"pt"},)" + a_f32x2 +
                             R"(,"b":{"dtype":"BF16","shape":[2,1],"data_offsets":[8,12]}})",
                         {0, 0, 0x80, 0x3f, 0, 0, 0, 0x40, 0x80, 0x3f, 0, 0x40});
  {
    ScratchDir d;
    REQUIRE(feed_safetensors(whole, d.path) == Outcome::accepted);
  }
  int refused = 0;
  for (std::size_t n = 0; n < whole.size(); ++n) {
    CAPTURE(n);
    const std::string e = open_error(std::vector<std::uint8_t>(whole.begin(), whole.begin() + static_cast<long>(n)));
    CHECK(!e.empty());
    refused += !e.empty();
  }
  CHECK(refused == static_cast<int>(whole.size()));
  // Cut inside the data: the message names the tensor that runs past the end.
  CHECK(has(open_error(std::vector<std::uint8_t>(whole.begin(), whole.end() - 1)),
            "tensor 'b' ends at byte 12 of the data but the file holds 11 bytes of data: the file is truncated"));
}

TEST_CASE("safetensors input: headers that are not JSON, or JSON of another shape, are refused") {
  const auto data = floats({1, 2});
  CHECK(has(open_error(raw(std::string("\x00\xff\xfe{", 4), data)), "-byte header is not valid JSON"));
  CHECK(has(open_error(raw("", data)), "the 0-byte header is not valid JSON"));
  CHECK(has(open_error(raw("[1,2]", data)), "the header is not a JSON object"));
  CHECK(has(open_error(raw(R"("text")", data)), "the header is not a JSON object"));
  CHECK(has(open_error(raw("{" + a_f32x2 + "} trailing", data)), "is not valid JSON"));
  // A million '[': refused while parsing, before anything recurses over it.
  CHECK(has(open_error(raw(R"({"a":{"dtype":"F32","shape":)" + std::string(1000000, '[') , data)),
            "nests deeper than 128 levels"));
  CHECK(has(open_error(raw(R"({"__metadata__":{"x":")" + std::string("\xc3\x28", 2) + R"("},)" + a_f32x2 + "}", data)),
            "is not valid JSON"));
}

TEST_CASE("safetensors input: wrong JSON types in an entry name the tensor and the field") {
  const auto data = floats({1, 2});
  auto entry = [&](const std::string& body) { return open_error(raw(R"({"a":)" + body + "}", data)); };
  CHECK(has(entry("[1]"), "tensor 'a': its entry is not a JSON object"));
  CHECK(has(entry(R"({"dtype":5,"shape":[2],"data_offsets":[0,8]})"), "tensor 'a': no \"dtype\" string"));
  CHECK(has(entry(R"({"dtype":"F32","shape":"2","data_offsets":[0,8]})"), "tensor 'a': no \"shape\" array"));
  CHECK(has(entry(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})"), "has an extent that is not"));
  CHECK(has(entry(R"({"dtype":"F32","shape":[1e300],"data_offsets":[0,8]})"), "has an extent that is not"));
  CHECK(has(entry(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"), "has an extent that is not"));
  CHECK(has(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,"8"]})"), "\"data_offsets\" is not [begin, end]"));
  CHECK(has(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8.5]})"), "\"data_offsets\" is not [begin, end]"));
  CHECK(has(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8,16]})"), "\"data_offsets\" is not [begin, end]"));
  CHECK(has(entry(R"({"dtype":"F32","shape":[2],"data_offsets":[-8,8]})"), "\"data_offsets\" is not [begin, end]"));
  CHECK(has(open_error(raw(R"({"__metadata__":[1],)" + a_f32x2 + "}", data)), "__metadata__ is not a JSON object"));
  // tessera's CRC metadata: not JSON, nested too deep, naming a missing tensor, not hex.
  auto crc = [&](const std::string& value) {
    return open_error(raw(R"({"__metadata__":{"tessera.crc32":)" + value + "}," + a_f32x2 + "}", data));
  };
  CHECK(has(crc(R"("{nope")"), "metadata 'tessera.crc32' is not valid JSON"));
  CHECK(has(crc("\"" + std::string(200, '[') + "\""), "metadata 'tessera.crc32' nests deeper than 128 levels"));
  CHECK(has(crc(R"("{\"zz\":\"00000000\"}")"), "names tensor 'zz', which the file does not hold"));
  CHECK(has(crc(R"("{\"a\":[1]}")"), "CRC-32 of tensor 'a' is not 8 hex digits: [1]"));
  CHECK(has(crc(R"("{\"a\":\"1ffffffff\"}")"), "CRC-32 of tensor 'a' is not 8 hex digits"));
}

TEST_CASE("safetensors input: a long value in an error is cut, so the message stays one readable line") {
  const std::string e = open_error(raw(R"({"a":{"dtype":")" + std::string(100000, 'Q') + R"(","shape":[2],"data_offsets":[0,8]}})",
                                       floats({1, 2})));
  CHECK(has(e, "tensor 'a': dtype \"QQQQ"));
  CHECK(has(e, "QQQ... is not one of"));
  CHECK(e.size() < 400);
}

TEST_CASE("safetensors input: a directory or a FIFO is refused as not a regular file, without blocking") {
  ScratchDir d;
  auto error_at = [](const fs::path& p) {
    try {
      SafetensorsFile f(p);
    } catch (const tessera::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(has(error_at(d.path), "is not a regular file (a directory)"));
  const fs::path fifo = d.path / "pipe.safetensors";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK(has(error_at(fifo), "pipe.safetensors\" is not a regular file (a device, FIFO or socket)"));
  CHECK(has(error_at(d.path / "absent.safetensors"), "cannot open"));
}
