// Writes the seed corpus of the fuzz targets into fuzz/corpus/<target>/: small valid inputs
// of every form each parser accepts, and a few malformed ones. Run by hand when the formats
// change (scripts/fuzz.sh --seeds); the files are committed.
//   g++ -std=c++20 -Iinclude -Itests fuzz/make_seeds.cpp -lopenblas -pthread -o make_seeds
//   ./make_seeds fuzz/corpus

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz/fuzz_inputs.hpp"

using namespace fuzz_inputs;
namespace ck = tessera::checkpoint;

namespace {

void put(const fs::path& p, const std::string& s) {
  write_bytes(p, {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()});
}
std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
// 8-byte length, header, data.
std::string raw(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const std::uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds CORPUS_DIR\n");
    return 2;
  }
  const fs::path root = argv[1];
  for (const char* t : {"safetensors", "checkpoint_index", "token_file"}) fs::create_directories(root / t);

  // safetensors: tessera's writer (CRC-32 metadata) for each stored dtype, Hugging Face-like
  // F16 / BF16, an empty file of tensors, and malformed ones.
  {
    const fs::path d = root / "safetensors";
    ck::SafetensorsWriter w;
    w.set_metadata("format", "pt");
    w.add("wte.weight", Tensor<float>::full(Shape{3, 2}, 0.25f));
    w.add("h.0.ln_1.bias", Tensor<double>::full(Shape{2}, -1.0));
    w.add("steps", Tensor<std::int32_t>::full(Shape{1}, 7));
    w.add("ids", Tensor<std::int64_t>::full(Shape{2, 1, 1}, 3));
    w.write(d / "tessera_all_dtypes.safetensors");
    put(d / "hf_f16_bf16.safetensors",
        raw(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},)"
            R"("b":{"dtype":"BF16","shape":[1,1],"data_offsets":[4,6]}})",
            std::string("\x00\x3c\x00\xc0\x80\x3f", 6)));
    put(d / "no_tensors.safetensors", raw("{}", ""));
    put(d / "zero_extent.safetensors", raw(R"({"e":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]}})", ""));
    put(d / "bad_overlap.safetensors",
        raw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
            std::string(8, '\1')));
    std::string huge = raw("{}", "");
    const std::uint64_t n = std::uint64_t{1} << 60;
    std::memcpy(huge.data(), &n, 8);
    put(d / "bad_header_2p60.safetensors", huge);
    put(d / "bad_not_json.safetensors", raw("{\"a\":", "xxxx"));
    put(d / "bad_overflow.safetensors",
        raw(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", std::string(8, '\0')));
    const std::string whole = slurp(d / "tessera_all_dtypes.safetensors");
    put(d / "bad_truncated.safetensors", whole.substr(0, whole.size() - 3));
  }
  // checkpoint index: the fixture's own index, the same without optimizer state, and
  // malformed ones.
  {
    const fs::path d = root / "checkpoint_index";
    const CheckpointFixture fx;
    const std::string j = fx.index_json();
    put(d / "fixture_index.json", j);
    std::string no_opt = j;
    no_opt.replace(no_opt.find(R"("optimizer":{"step":3})"), 22, R"("optimizer":null)");
    put(d / "fixture_no_optimizer.json", no_opt);
    put(d / "bad_not_json.json", j.substr(0, j.size() / 2));
    std::string float_step = j;
    float_step.replace(float_step.find(R"("step":7)"), 8, R"("step":1e300)");
    put(d / "bad_float_step.json", float_step);
    std::string out_of_order = j;
    out_of_order.replace(out_of_order.find("[[0,3]]"), 7, "[[3,6],[0,3]]");
    put(d / "bad_ranges_order.json", out_of_order);
    put(d / "bad_array.json", "[]");
  }
  // token file: first byte picks the context (1 + byte % 32), the rest is the file.
  {
    const fs::path d = root / "token_file";
    put(d / "text_context8.bin", std::string(1, '\7') +
                                     "A pipeline stage waits for its micro-batch;\nthe last stage computes the loss and sends "
                                     "the gradient back.\nEvery rank agrees on the step, or none takes it.\n");
    std::string bin(1, '\1');
    for (int i = 0; i < 300; ++i) bin.push_back(static_cast<char>((i * 151) & 0xFF));
    put(d / "binary_context2.bin", bin);
    put(d / "too_short.bin", std::string(1, '\x1f') + "short");
    put(d / "empty.bin", "");
  }
  return 0;
}
