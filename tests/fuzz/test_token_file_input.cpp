// The token-file reader (TextDataset): missing files, directories, FIFOs, empty and short
// files are a tessera::Error naming the file; any bytes at all are valid text, read one token
// per byte.

#include <doctest/doctest.h>
#include <sys/stat.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_inputs.hpp"

using namespace fuzz_inputs;
using tessera::data::Split;
using tessera::data::TextDataset;

namespace {
std::string dataset_error(const fs::path& p, std::int64_t context) {
  try {
    TextDataset ds(p.string(), context);
  } catch (const tessera::Error& e) {
    return e.what();
  }
  return "";
}
bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
}  // namespace

TEST_CASE("token file input: a missing file, a directory and a FIFO are refused by name, without blocking") {
  ScratchDir d;
  CHECK(has(dataset_error(d.path / "absent.txt", 4), "absent.txt\" does not exist"));
  CHECK(has(dataset_error(d.path, 4), "\" is not a regular file (a directory)"));
  const fs::path fifo = d.path / "pipe.txt";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK(has(dataset_error(fifo, 4), "pipe.txt\" is not a regular file (a device, FIFO or socket)"));
}

TEST_CASE("token file input: empty and short files name the file and the token counts") {
  ScratchDir d;
  const fs::path p = d.path / "short.txt";
  write_bytes(p, {});
  CHECK(has(dataset_error(p, 4), "short.txt has 0 tokens; each split needs more than context = 4 (train 0, val 0)"));
  const std::vector<std::uint8_t> fifty(50, 'a');
  write_bytes(p, fifty);
  CHECK(has(dataset_error(p, 5), "short.txt has 50 tokens; each split needs more than context = 5 (train 45, val 5)"));
  CHECK(dataset_error(p, 4) == "");  // val holds 5 > 4 tokens
  CHECK(has(dataset_error(p, 0), "context must be >= 1, got 0"));
}

TEST_CASE("token file input: every byte value, NUL and 0xFF included, is one token equal to the byte") {
  ScratchDir d;
  std::vector<std::uint8_t> bytes(2000);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::uint8_t>((i * 37 + i / 256) % 256);
  write_bytes(d.path / "all.bin", bytes);
  const TextDataset ds((d.path / "all.bin").string(), 8);
  CHECK(ds.size(Split::train) == 1800);
  CHECK(ds.size(Split::val) == 200);
  // Through the fuzz entry: every batch row is a run of the file's bytes (context 1 + 7).
  std::vector<std::uint8_t> input{7};
  input.insert(input.end(), bytes.begin(), bytes.end());
  CHECK(feed_token_file(input, d.path) == Outcome::accepted);
}
