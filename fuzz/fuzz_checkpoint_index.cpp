// libFuzzer target: a checkpoint's index.json (CheckpointReader), read against two valid rank files:
// every tensor it names is read whole and resharded.
// Built and run by scripts/fuzz.sh; the seed corpus is fuzz/corpus/checkpoint_index/. An input is accepted
// or refused with a tessera::Error naming the file (tests/fuzz/fuzz_inputs.hpp); anything else
// stops the fuzzer.

#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_inputs.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const fuzz_inputs::CheckpointFixture fixture;
  fuzz_inputs::feed_checkpoint_index({data, size}, fixture);
  return 0;
}
