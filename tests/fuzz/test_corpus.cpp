// The fuzzers' seed corpus (fuzz/corpus/<target>/) and every input a fuzzer found crashing
// (fuzz/regressions/<target>/, kept after the fix) run through the same entry functions as
// the libFuzzer targets, in every build (under the sanitizers too): each must be accepted or
// refused with a tessera::Error naming the file, never crash.

#include <doctest/doctest.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz/fuzz_inputs.hpp"

using namespace fuzz_inputs;

namespace {

const fs::path fuzz_dir = FUZZ_DIR;

std::vector<std::uint8_t> read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The files of fuzz/<kind>/<target>/, sorted.
std::vector<fs::path> inputs(const std::string& kind, const std::string& target) {
  std::vector<fs::path> out;
  const fs::path d = fuzz_dir / kind / target;
  if (fs::is_directory(d))
    for (const auto& e : fs::directory_iterator(d))
      if (e.is_regular_file() && e.path().filename() != "README.md") out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

// Feeds every corpus and regression input of `target` to `feed`; returns {accepted, refused}.
template <class Feed>
std::pair<int, int> run_all(const std::string& target, Feed&& feed) {
  int accepted = 0, refused = 0;
  for (const char* kind : {"corpus", "regressions"}) {
    for (const fs::path& p : inputs(kind, target)) {
      CAPTURE(p.string());
      const auto bytes = read_all(p);
      (feed(bytes) == Outcome::accepted ? accepted : refused) += 1;
    }
  }
  return {accepted, refused};
}

}  // namespace

TEST_CASE("fuzz corpus: every safetensors seed and regression input is accepted or refused by name") {
  ScratchDir d;
  const auto [accepted, refused] = run_all("safetensors", [&](const auto& b) { return feed_safetensors(b, d.path); });
  MESSAGE("safetensors: ", accepted, " accepted, ", refused, " refused");
  CHECK(accepted >= 3);  // the seeds include valid files of every dtype
  CHECK(refused >= 3);   // and malformed ones
}

TEST_CASE("fuzz corpus: every checkpoint index seed and regression input is accepted or refused by name") {
  const CheckpointFixture fx;
  const auto [accepted, refused] = run_all("checkpoint_index", [&](const auto& b) { return feed_checkpoint_index(b, fx); });
  MESSAGE("checkpoint_index: ", accepted, " accepted, ", refused, " refused");
  CHECK(accepted >= 1);  // the fixture's own index
  CHECK(refused >= 3);
}

TEST_CASE("fuzz corpus: every token-file seed and regression input is accepted or refused by name") {
  ScratchDir d;
  const auto [accepted, refused] = run_all("token_file", [&](const auto& b) { return feed_token_file(b, d.path); });
  MESSAGE("token_file: ", accepted, " accepted, ", refused, " refused");
  CHECK(accepted >= 2);
  CHECK(refused >= 1);
}
