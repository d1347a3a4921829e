// libFuzzer target: the safetensors reader (SafetensorsFile): the input is the whole file.
// Built and run by scripts/fuzz.sh; the seed corpus is fuzz/corpus/safetensors/. An input is accepted
// or refused with a tessera::Error naming the file (tests/fuzz/fuzz_inputs.hpp); anything else
// stops the fuzzer.

#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_inputs.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const fuzz_inputs::ScratchDir dir;
  fuzz_inputs::feed_safetensors({data, size}, dir.path);
  return 0;
}
