// The safetensors reader and writer: round trips, conversions, and every defect of a file
// reported with the tensor and the numbers.

#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include "ckpt_test_util.hpp"
#include "tessera/checkpoint/crc32.hpp"
#include "tessera/checkpoint/safetensors_file.hpp"
#include "tessera/checkpoint/safetensors_writer.hpp"

using namespace ckpt_test;
using tessera::checkpoint::SafetensorsDType;
using tessera::checkpoint::SafetensorsFile;
using tessera::checkpoint::SafetensorsWriter;

namespace {
std::vector<unsigned char> bytes_of(std::initializer_list<float> v) {
  std::vector<unsigned char> out(v.size() * 4);
  std::memcpy(out.data(), v.begin(), out.size());
  return out;
}
}  // namespace

TEST_CASE("crc32: equals zlib's check value of \"123456789\" and continues across pieces") {
  const std::string s = "123456789";
  const auto all = std::as_bytes(std::span<const char>(s.data(), s.size()));
  CHECK(tessera::checkpoint::crc32(all) == 0xCBF43926U);
  CHECK(tessera::checkpoint::crc32(all.subspan(4), tessera::checkpoint::crc32(all.first(4))) == 0xCBF43926U);
  CHECK(tessera::checkpoint::crc32({}) == 0U);
}

TEST_CASE("safetensors: F32, F64, I32 and I64 tensors round-trip bitwise with metadata, 8-byte aligned header") {
  TempDir d;
  const Tensor<float> a4 = Tensor<float>::from(Shape{2, 4}, {1.5f, -2.0f, 3.25f, 9.0f, 0.0f, -0.0f, 1e-30f, 9.0f});
  const Tensor<float> a = a4.slice(1, 0, 3);  // strided: written contiguously
  REQUIRE(!a.is_contiguous());
  const Tensor<double> b = Tensor<double>::from(Shape{4}, {1.0 / 3.0, -1e300, 2.0, 5e-324});
  const Tensor<std::int32_t> c = Tensor<std::int32_t>::from(Shape{3}, {-7, 0, 2147483647});
  const Tensor<std::int64_t> e = Tensor<std::int64_t>::from(Shape{}, {-(std::int64_t{1} << 62)});
  const Tensor<float> empty(Shape{0, 5});
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.add("a", a);
  w.add("b", b);
  w.add("c", c);
  w.add("e", e);
  w.add("empty", empty);
  const std::uint64_t size = w.write(d / "t.safetensors");
  CHECK(size == fs::file_size(d / "t.safetensors"));
  SafetensorsFile f(d / "t.safetensors");
  std::uint64_t n = 0;
  std::ifstream(d / "t.safetensors", std::ios::binary).read(reinterpret_cast<char*>(&n), 8);
  CHECK(n % 8 == 0);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.tensors().size() == 5);
  CHECK(same_bits(f.read<float>("a"), a));
  CHECK(same_bits(f.read<double>("b"), b));
  const Tensor<std::int32_t> c2 = f.read<std::int32_t>("c");
  CHECK(same_bits(c2, c));
  CHECK(f.read<std::int64_t>("e").data()[0] == e.data()[0]);
  CHECK(f.read<float>("empty").shape() == Shape{0, 5});
  CHECK(f.at("b").dtype == SafetensorsDType::f64);
  CHECK(f.at("a").shape == std::vector<std::int64_t>{2, 3});
  // Converting reads: F64 into float, F32 into double.
  CHECK(f.read<float>("b").data()[0] == static_cast<float>(1.0 / 3.0));
  CHECK(f.read<double>("a").data()[2] == 3.25);
  CHECK(error_of([&] { (void)f.read<float>("c"); }).find("tensor 'c'") != std::string::npos);
  CHECK(error_of([&] { (void)f.read<float>("nope"); }).find("tensor 'nope' is not in") != std::string::npos);
}

TEST_CASE("safetensors: F16 and BF16 (as in Hugging Face files) read as their float values") {
  TempDir d;
  // F16: 1.0 = 0x3C00, -2.5 = 0xC100, 65504 = 0x7BFF, smallest subnormal 2^-24 = 0x0001, inf = 0x7C00.
  // BF16: 1.0 = 0x3F80, -3.0 = 0xC040.
  const std::vector<std::uint16_t> h{0x3C00, 0xC100, 0x7BFF, 0x0001, 0x7C00}, bf{0x3F80, 0xC040};
  std::vector<unsigned char> data(14);
  std::memcpy(data.data(), h.data(), 10);
  std::memcpy(data.data() + 10, bf.data(), 4);
  write_raw(d / "h.safetensors",
            R"({"h":{"dtype":"F16","shape":[5],"data_offsets":[0,10]},"bf":{"dtype":"BF16","shape":[2],"data_offsets":[10,14]}})",
            data);
  SafetensorsFile f(d / "h.safetensors");
  const Tensor<float> x = f.read<float>("h");
  CHECK(x(0) == 1.0f);
  CHECK(x(1) == -2.5f);
  CHECK(x(2) == 65504.0f);
  CHECK(x(3) == std::ldexp(1.0f, -24));
  CHECK(std::isinf(x(4)));
  const Tensor<double> y = f.read<double>("bf");
  CHECK(y(0) == 1.0);
  CHECK(y(1) == -3.0);
}

TEST_CASE("safetensors: every malformed file is an error naming the tensor and the numbers") {
  TempDir d;
  const fs::path p = d / "bad.safetensors";
  auto err = [&](const std::string& header, const std::vector<unsigned char>& data, std::int64_t len = -1) {
    write_raw(p, header, data, len);
    return error_of([&] { SafetensorsFile f(p); });
  };
  const auto eight = bytes_of({1.0f, 2.0f});
  // Shorter than the length field.
  {
    std::ofstream(p, std::ios::binary).write("abc", 3);
    CHECK(error_of([&] { SafetensorsFile f(p); }).find("3 bytes, fewer than the 8-byte header length") != std::string::npos);
  }
  CHECK(err(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight, 4000).find("header length 4000 exceeds") !=
        std::string::npos);
  CHECK(err(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", eight).find("not valid JSON") != std::string::npos);
  CHECK(err(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", eight).find("tensor 'a': dtype \"Q4\"") !=
        std::string::npos);
  CHECK(err(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight)
            .find("tensor 'a': shape (3) of F32 needs 12 bytes but data_offsets [0, 8] hold 8") != std::string::npos);
  CHECK(err(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight).find("tensor 'a': shape") !=
        std::string::npos);
  CHECK(err(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
            eight)
            .find("tensors 'a' (bytes [0, 8)) and 'b' (bytes [4, 8)) overlap") != std::string::npos);
  CHECK(err(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight).find("bytes [0, 4) of the data before tensor 'a'") !=
        std::string::npos);
  CHECK(err(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", eight)
            .find("tensor 'a' ends at byte 16 of the data but the file holds 8 bytes of data: the file is truncated") !=
        std::string::npos);
  CHECK(err(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight).find("4 bytes after the last tensor 'a'") !=
        std::string::npos);
  CHECK(err(R"({"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight)
            .find("__metadata__ value of 'k' is not a string") != std::string::npos);
  CHECK(err(R"({"a":{"dtype":"F32","shape":[2]}})", eight).find("tensor 'a': \"data_offsets\"") != std::string::npos);
}

TEST_CASE("safetensors: a flipped data byte of a tessera file is a CRC error naming the tensor; a truncated one names it") {
  TempDir d;
  SafetensorsWriter w;
  w.add("first", Tensor<float>::full(Shape{16}, 1.0f));
  w.add("second", Tensor<float>::full(Shape{4, 4}, 2.0f));
  const std::uint64_t size = w.write(d / "t.safetensors");
  flip_byte(d / "t.safetensors", size - 3);  // inside "second"
  SafetensorsFile f(d / "t.safetensors");
  CHECK(f.read<float>("first")(3) == 1.0f);
  const std::string e = error_of([&] { (void)f.read<float>("second"); });
  CHECK(e.find("tensor 'second'") != std::string::npos);
  CHECK(e.find("is corrupted: its bytes have CRC-32 0x") != std::string::npos);
  fs::resize_file(d / "t.safetensors", size - 10);
  CHECK(error_of([&] { SafetensorsFile g(d / "t.safetensors"); })
            .find("tensor 'second' ends at byte 128 of the data but the file holds 118 bytes") != std::string::npos);
}

TEST_CASE("safetensors: a failed write leaves the previous file and no temporary file") {
  TempDir d;
  SafetensorsWriter w1;
  w1.add("x", Tensor<float>::full(Shape{3}, 7.0f));
  w1.write(d / "m.safetensors");
  SafetensorsWriter w2;
  w2.add_deferred<float>("x", Shape{3}, [] { return Tensor<float>::full(Shape{3}, 8.0f); });
  w2.add_deferred<float>("y", Shape{3}, []() -> Tensor<float> { throw tessera::Error("disk on fire"); });
  CHECK(error_of([&] { w2.write(d / "m.safetensors"); }).find("disk on fire") != std::string::npos);
  CHECK(SafetensorsFile(d / "m.safetensors").read<float>("x")(0) == 7.0f);
  int files = 0;
  for (const auto& e : fs::directory_iterator(d.path)) files += e.is_regular_file() ? 1 : 0;
  CHECK(files == 1);
  SafetensorsWriter w3;
  w3.add_deferred<float>("x", Shape{3}, [] { return Tensor<float>::full(Shape{4}, 8.0f); });
  CHECK(error_of([&] { w3.write(d / "m.safetensors"); }).find("tensor 'x' was declared (3) but produced (4)") !=
        std::string::npos);
}
