// GPT-2 files: the consolidation of a sharded checkpoint into one plain file with Hugging Face
// names and full shapes (read back by a pure-Python reader), and the evaluation-mode loader
// of Hugging Face style GPT-2 safetensors files.

#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <bit>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "ckpt_test_util.hpp"

using namespace ckpt_test;
using namespace tessera::checkpoint;
using tessera::MeshShape;

namespace {

// IEEE binary16 bits of a float that binary16 represents exactly as a normal number (or 0).
std::uint16_t exact_half(float x) {
  const auto b = std::bit_cast<std::uint32_t>(x);
  if ((b & 0x7FFFFFFFU) == 0) return static_cast<std::uint16_t>(b >> 16);
  const std::uint32_t exp = ((b >> 23) & 0xFFU) - 127 + 15;
  REQUIRE((b & 0x1FFFU) == 0);
  REQUIRE(exp > 0);
  REQUIRE(exp < 31);
  return static_cast<std::uint16_t>(((b >> 16) & 0x8000U) | (exp << 10) | ((b >> 13) & 0x3FFU));
}

// The full model with every value rounded to a multiple of 1/64 (exact in F16).
FullModel quantized_gpt(std::uint64_t seed, std::int64_t n_layer = 2) {
  FullModel m = full_gpt(seed, n_layer);
  for (auto& [name, t] : m)
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = std::round(t.data()[i] * 64.0) / 64.0;
  return m;
}

// Writes tensors laid out as Hugging Face's files are: {"format": "pt"} metadata only (no
// CRCs), names with `prefix`, dtype F32 or F16, plus the causal-mask buffers h.N.attn.bias and
// a tied lm_head.weight when asked; `skip` leaves one tensor out.
void write_hf_like(const fs::path& p, const FullModel& m, const std::string& dtype, const std::string& prefix,
                   bool buffers, bool lm_head, const std::string& skip = "") {
  std::vector<std::tuple<std::string, std::vector<std::int64_t>, std::vector<float>>> ts;
  std::int64_t n_layer = 0;
  for (const auto& [name, t] : m) {
    if (name == skip) continue;
    std::vector<float> v(static_cast<std::size_t>(t.numel()));
    for (std::int64_t i = 0; i < t.numel(); ++i) v[static_cast<std::size_t>(i)] = static_cast<float>(t.data()[i]);
    ts.emplace_back(prefix + name, dims_of(t.shape()), v);
    if (name.rfind("h.", 0) == 0) n_layer = std::max<std::int64_t>(n_layer, std::stoll(name.substr(2)) + 1);
    if (name == "wte.weight" && lm_head) ts.emplace_back("lm_head.weight", dims_of(t.shape()), v);
  }
  if (buffers)
    for (std::int64_t l = 0; l < n_layer; ++l) {
      std::vector<float> mask(64);
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) mask[static_cast<std::size_t>(i * 8 + j)] = j <= i ? 1.0f : 0.0f;
      ts.emplace_back(prefix + "h." + std::to_string(l) + ".attn.bias", std::vector<std::int64_t>{1, 1, 8, 8}, mask);
    }
  nlohmann::ordered_json h;
  h["__metadata__"] = {{"format", "pt"}};
  std::vector<unsigned char> data;
  for (const auto& [name, shape, v] : ts) {
    const std::size_t begin = data.size();
    for (float x : v) {
      if (dtype == "F16") {
        const std::uint16_t b = exact_half(x);
        data.insert(data.end(), reinterpret_cast<const unsigned char*>(&b), reinterpret_cast<const unsigned char*>(&b) + 2);
      } else {
        data.insert(data.end(), reinterpret_cast<const unsigned char*>(&x), reinterpret_cast<const unsigned char*>(&x) + 4);
      }
    }
    h[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string text = h.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  write_raw(p, text, data);
}

// Parameters of the tiny GPT as tp rank `r` of `n` holds them (zeros), with their layouts.
struct ShardedModel {
  std::deque<Parameter<float>> ps;
  ParameterList<float> list;
  ShardedModel(const FullModel& m, int r, int n) {
    for (const auto& [name, t] : m) {
      const tessera::ParamLayout l = tp_layout(name);
      ps.emplace_back(name, Tensor<float>(reference_shard_of(t, l, r, n).shape()), l);
      list.push_back(ps.back());
    }
  }
};

const Tensor<double>& find(const FullModel& m, const std::string& name) {
  return std::find_if(m.begin(), m.end(), [&](const auto& e) { return e.first == name; })->second;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("load_gpt2_safetensors: a Hugging Face style F16 file with 'transformer.' names, mask buffers and a tied lm_head loads into GPT and into tp shards") {
  TempDir d;
  const FullModel m = quantized_gpt(5);
  write_hf_like(d / "model.safetensors", m, "F16", "transformer.", true, true);
  tessera::GPT<float> gpt(tiny_config(), 77);
  load_gpt2_safetensors(d / "model.safetensors", gpt.parameters());
  for (const Parameter<float>& p : gpt.parameters()) {
    CAPTURE(p.name);
    CHECK(same_bits(p.value, find(m, p.name).cast<float>()));
  }
  // The directory form finds model.safetensors; tp rank 1 of 2 gets its shards.
  ShardedModel s(m, 1, 2);
  load_gpt2_safetensors(d.path, s.list, 1, 2);
  for (const Parameter<float>& p : s.ps) {
    CAPTURE(p.name);
    CHECK(same_bits(p.value, reference_shard_of(find(m, p.name).cast<float>(), p.layout, 1, 2)));
  }
}

TEST_CASE("load_gpt2_safetensors: a missing tensor, a wrong shape, another depth or an untied lm_head is an error naming the tensor") {
  TempDir d;
  const FullModel m = quantized_gpt(6);
  tessera::GPT<float> gpt(tiny_config(), 1);
  write_hf_like(d / "a.safetensors", m, "F32", "", true, false, "ln_f.bias");
  CHECK(contains(error_of([&] { load_gpt2_safetensors(d / "a.safetensors", gpt.parameters()); }),
                 "tensor 'ln_f.bias' is not in the file"));
  tessera::GPTConfig longer = tiny_config();
  longer.n_positions = 16;
  tessera::GPT<float> gpt16(longer, 1);
  write_hf_like(d / "b.safetensors", m, "F32", "", false, false);
  CHECK(contains(error_of([&] { load_gpt2_safetensors(d / "b.safetensors", gpt16.parameters()); }),
                 "tensor 'wpe.weight' has shape (8, 24) in the file but (16, 24) in this model"));
  write_hf_like(d / "c.safetensors", quantized_gpt(6, 3), "F32", "transformer.", true, true);
  const std::string deeper = error_of([&] { load_gpt2_safetensors(d / "c.safetensors", gpt.parameters()); });
  CHECK(contains(deeper, "tensor 'h.2."));
  CHECK(contains(deeper, "is no parameter of this model"));
  CHECK(error_of([&] { load_gpt2_safetensors(d / "c.safetensors", gpt.parameters(), 0, 1, {.allow_unused = true}); }).empty());
  FullModel untied = m;
  write_hf_like(d / "e.safetensors", untied, "F32", "", false, true);
  SafetensorsFile probe(d / "e.safetensors");
  flip_byte(d / "e.safetensors", 8 + [&] {
    std::uint64_t n = 0;
    std::ifstream(d / "e.safetensors", std::ios::binary).read(reinterpret_cast<char*>(&n), 8);
    return n;
  }() + probe.at("lm_head.weight").begin + 1);
  CHECK(contains(error_of([&] { load_gpt2_safetensors(d / "e.safetensors", gpt.parameters()); }),
                 "tensor 'lm_head.weight' (24, 24) differs from 'wte.weight'"));
}

// Saves model `m` at tp 2 (2 thread ranks, no optimizer state) into `dir`, at step 3.
void save_at_tp2(const fs::path& dir, const FullModel& m) {
  tessera::testing::run_ranks(2, [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), MeshShape{.tp = 2});
    Rank r(m, w, false);
    save_checkpoint<double>(dir, world, w, r.list, nullptr,
                            CheckpointMeta{.config = gpt2_config_json(tiny_config()), .step = 3});
  });
}

TEST_CASE("consolidate_checkpoint: a (pp=2, tp=2) checkpoint becomes one GPT-2 file with full shapes that loads back bitwise") {
  TempDir d;
  const FullModel m = full_gpt(8);
  tessera::testing::run_ranks(4, [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), MeshShape{.pp = 2, .tp = 2});
    Rank r(m, w, false);
    const OptimizerState<double> st = r.state();
    save_checkpoint(d / "ckpt", world, w, r.list, &st, CheckpointMeta{.config = gpt2_config_json(tiny_config()), .step = 42});
  });
  const ConsolidateResult res = consolidate_checkpoint(d / "ckpt", d / "model.safetensors");
  CHECK(res.tensors == m.size());
  SafetensorsFile f(d / "model.safetensors");
  REQUIRE(f.tensors().size() == m.size());
  for (std::size_t i = 0; i < m.size(); ++i) {
    CAPTURE(m[i].first);
    CHECK(f.tensors()[i].name == m[i].first);  // the model's order
    CHECK(same_bits(f.read<double>(m[i].first), m[i].second));
  }
  CHECK(f.metadata().at("format") == "pt");
  CHECK(nlohmann::json::parse(f.metadata().at("tessera.config")) == gpt2_config_json(tiny_config()));
  // The evaluation loader reads it into a fresh GPT, whose logits equal the saved model's.
  tessera::GPT<double> original(tiny_config(), 1), loaded(tiny_config(), 2);
  for (Parameter<double>& p : original.parameters()) p.value.copy_from(find(m, p.name));
  load_gpt2_safetensors(d / "model.safetensors", loaded.parameters());
  const Tensor<std::int32_t> tokens = Tensor<std::int32_t>::from(Shape{2, 5}, {1, 5, 9, 23, 0, 7, 7, 2, 11, 3});
  CHECK(same_bits(loaded.forward(tokens).output, original.forward(tokens).output));
}

TEST_CASE("consolidate_checkpoint: the F32 file with 'transformer.' names reads with a pure-Python reader (numpy), and the CLI writes the same") {
  TempDir d;
  const FullModel m = full_gpt(9);
  save_at_tp2(d / "ckpt", m);
  const fs::path out = d / "gpt2.safetensors";
  consolidate_checkpoint(d / "ckpt", out, {.dtype = SafetensorsDType::f32, .name_prefix = "transformer."});
  if (const char* tool = std::getenv("TESSERA_CONSOLIDATE_TOOL")) {
    const std::string cmd = tessera::detail::str("'", tool, "' '", (d / "ckpt").string(), "' '", (d / "cli.safetensors").string(),
                                                 "' --dtype F32 --prefix transformer. > /dev/null");
    REQUIRE(std::system(cmd.c_str()) == 0);
    SafetensorsFile a(out), b(d / "cli.safetensors");
    REQUIRE(a.tensors().size() == b.tensors().size());
    for (const TensorInfo& t : a.tensors()) CHECK(same_bits(a.read<float>(t.name), b.read<float>(t.name)));
  } else {
    MESSAGE("TESSERA_CONSOLIDATE_TOOL is not set: the CLI is not checked");
  }
  // Expected names, dtypes, shapes and values for the Python reader.
  nlohmann::ordered_json expect;
  expect["config"] = gpt2_config_json(tiny_config());
  expect["order"] = nlohmann::json::array();
  for (const auto& [name, t] : m) {
    const Tensor<float> f = t.cast<float>();
    expect["order"].push_back("transformer." + name);
    expect["tensors"]["transformer." + name] = {{"dtype", "F32"},
                                                {"shape", dims_of(t.shape())},
                                                {"values", std::vector<float>(f.data(), f.data() + f.numel())}};
  }
  std::ofstream(d / "expect.json") << expect.dump();
  if (!fs::exists("/usr/bin/python3")) {
    MESSAGE("/usr/bin/python3 is missing: the Python reader check is skipped");
    return;
  }
  const std::string cmd = tessera::detail::str("/usr/bin/python3 '", CKPT_TEST_DIR, "/read_safetensors.py' '", out.string(),
                                               "' '", (d / "expect.json").string(), "'");
  const int status = std::system(cmd.c_str());
  REQUIRE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 77) {
    MESSAGE("numpy is not installed for /usr/bin/python3: the Python reader check is skipped");
    return;
  }
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("consolidate_checkpoint: an index that leaves out a tensor of its files, or a GPT-2 configuration that disagrees with the tensors, is refused (they were consolidated as they came)") {
  TempDir d;
  const FullModel m = full_gpt(10);
  save_at_tp2(d / "ckpt", m);
  // edited(EDIT): a copy of the checkpoint whose index.json EDIT changed.
  int copies = 0;
  const auto edited = [&](const auto& edit) {
    const fs::path c = d / ("copy" + std::to_string(copies++));
    fs::copy(d / "ckpt", c, fs::copy_options::recursive);
    nlohmann::ordered_json j = nlohmann::ordered_json::parse(std::ifstream(c / "index.json"));
    edit(j);
    std::ofstream(c / "index.json") << j.dump();
    return c;
  };
  const fs::path out = d / "out.safetensors";
  CHECK_NOTHROW(consolidate_checkpoint(d / "ckpt", out));
  const fs::path missing = edited([](auto& j) { j["tensors"].erase("wte.weight"); });
  CHECK(contains(error_of([&] { consolidate_checkpoint(missing, out); }),
                 "holds tensor 'wte.weight', which index.json does not list"));
  const fs::path negative = edited([](auto& j) { j["config"]["n_embd"] = -1; });
  CHECK(contains(error_of([&] { consolidate_checkpoint(negative, out); }), "n_embd is -1, not a positive integer"));
  const fs::path wider = edited([](auto& j) { j["config"]["n_embd"] = j["config"]["n_embd"].template get<int>() * 2; });
  CHECK(contains(error_of([&] { consolidate_checkpoint(wider, out); }), "disagrees with tensor 'wte.weight'"));
  const fs::path deeper = edited([](auto& j) { j["config"]["n_layer"] = j["config"]["n_layer"].template get<int>() + 1; });
  CHECK(contains(error_of([&] { consolidate_checkpoint(deeper, out); }), "disagrees with the saved blocks h.0 to h."));
  // The output written before is still the good checkpoint's (the refusals come before writing).
  CHECK(SafetensorsFile(out).tensors().size() == m.size());
}
