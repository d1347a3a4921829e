// Malformed checkpoint indexes (index.json) and rank-file metadata: each is a tessera::Error
// naming the checkpoint, index.json or the rank file, and the field, never another exception,
// undefined behaviour (a float cast to an integer), an allocation of what the index claims,
// or a loop over a claimed extent.

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <regex>
#include <string>
#include <vector>

#include "fuzz/fuzz_inputs.hpp"
#include "tessera/checkpoint/checkpoint.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace fuzz_inputs;
namespace ck = tessera::checkpoint;

namespace {

std::span<const std::uint8_t> as_bytes(const std::string& s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

// The message of the tessera::Error that opening the fixture with `index` as its index.json
// and reading every tensor throws ("" when all of it loads); any other exception escapes.
std::string index_error(const CheckpointFixture& fx, const std::string& index) {
  write_bytes(fx.dir.path / "index.json", as_bytes(index));
  try {
    const ck::CheckpointReader r(fx.dir.path);
    for (auto kind : {ck::TensorKind::model, ck::TensorKind::optimizer})
      for (const std::string& name : r.tensor_names(kind)) (void)r.read_full<double>(name);
  } catch (const tessera::Error& e) {
    const std::string m = e.what();
    CHECK_MESSAGE(m.find(fx.dir.path.string()) != std::string::npos, "the error does not name the checkpoint: ", m);
    return m;
  }
  return "";
}

// `s` with the first match of `re` replaced by `by` (the test fails if nothing matches).
std::string edit(const std::string& s, const std::string& re, const std::string& by) {
  const std::string out = std::regex_replace(s, std::regex(re), by, std::regex_constants::format_first_only);
  REQUIRE_MESSAGE(out != s, "the edit ", re, " matched nothing");
  return out;
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("checkpoint input: the fixture's index loads every tensor with its written values, whole and resharded") {
  const CheckpointFixture fx;
  REQUIRE(index_error(fx, fx.index_json()) == "");
  const ck::CheckpointReader r(fx.dir.path);
  CHECK(r.info().step == 7);
  CHECK(r.info().optimizer_step == 3);
  CHECK(r.info().layout.tp == 2);
  const auto w = r.read_full<double>("w");
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) CHECK(w.data()[i * 6 + j] == CheckpointFixture::w_at(i, j));
  const auto m = r.read_full<double>("b.exp_avg");
  for (int j = 0; j < 6; ++j) CHECK(m.data()[j] == -j);
  // tp = 3 shards of w's columns: rank 1 holds columns [2, 4), from both saved pieces.
  tessera::Tensor<double> part = tessera::Tensor<double>::empty(tessera::Shape{4, 2});
  r.read_into(ck::TensorShard<double>{"w", part, tessera::ParamLayout::shard(1), std::nullopt}, 1, 3);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) CHECK(part.data()[i * 2 + j] == CheckpointFixture::w_at(i, 2 + j));
  CHECK(feed_checkpoint_index(as_bytes(fx.index_json()), fx) == Outcome::accepted);
}

TEST_CASE("checkpoint input: the fixture's index has the fields and layout save_checkpoint writes") {
  // The fuzzer mutates the fixture's index: it must be the real format. Save the same tensors
  // through save_checkpoint at tp = 2 and compare the two indexes field by field (ids, sizes
  // and pieces' rank-specific details aside).
  const CheckpointFixture fx;
  ScratchDir d;
  tessera::testing::run_ranks(2, [&](tessera::Comm& world) {
    const int tp = world.rank();
    tessera::Parameter<double> w("w", tessera::Tensor<double>::full(tessera::Shape{4, 3}, 1.0),
                                 tessera::ParamLayout::shard(1));
    tessera::Parameter<double> b("b", tessera::Tensor<double>::full(tessera::Shape{6}, 1.0));
    const tessera::ParameterList<double> list{&w, &b};
    ck::save_checkpoint(d.path / "c", world, ck::Placement::tensor_parallel(tp, 2), list, static_cast<const ck::OptimizerState<double>*>(nullptr),
                        ck::CheckpointMeta{.config = {{"n_layer", 1}}, .step = 7});
  });
  std::ifstream in(d.path / "c" / "index.json");
  const auto saved = nlohmann::json::parse(in);
  const auto fixture = nlohmann::json::parse(fx.index_json());
  for (const char* key : {"format", "version", "step", "config", "extra", "layout"}) {
    CAPTURE(key);
    CHECK(saved.at(key) == fixture.at(key));
  }
  // The fixture stores w as F32 beside b's F64 (a save stores one T): the rest must agree.
  auto without_dtype = [](nlohmann::json t) {
    t.erase("dtype");
    return t;
  };
  CHECK(saved.at("tensors").at("w").at("dtype") == "F64");
  CHECK(without_dtype(saved.at("tensors").at("w")) == without_dtype(fixture.at("tensors").at("w")));
  CHECK(saved.at("tensors").at("b") == fixture.at("tensors").at("b"));
  CHECK(saved.at("files").size() == 2);
}

TEST_CASE("checkpoint input: an index that is not JSON, nests too deep or is of another format is refused") {
  const CheckpointFixture fx;
  CHECK(has(index_error(fx, "{\"format\": "), "index.json is not valid JSON"));
  CHECK(has(index_error(fx, std::string(100000, '[')), "index.json nests deeper than 128 levels"));
  CHECK(has(index_error(fx, "[]"), "is not a tessera checkpoint index (format absent)"));
  CHECK(has(index_error(fx, edit(fx.index_json(), R"("format":"tessera-checkpoint")", R"("format":7)")),
            "is not a tessera checkpoint index (format 7)"));
  CHECK(has(index_error(fx, edit(fx.index_json(), R"("version":1)", R"("version":2)")),
            "has format version 2; this build reads version 1"));
  ScratchDir empty;
  try {
    ck::CheckpointReader r(empty.path);
    FAIL("an empty directory opened as a checkpoint");
  } catch (const tessera::Error& e) {
    CHECK(has(e.what(), "no index.json (not a checkpoint, or a save that did not complete)"));
  }
}

TEST_CASE("checkpoint input: numbers of the wrong JSON type or out of range name the field (no float-to-int cast)") {
  const CheckpointFixture fx;
  const std::string j = fx.index_json();
  CHECK(has(index_error(fx, edit(j, R"("version":1)", R"("version":1e300)")), "index.json version is 1e+300, not an integer"));
  CHECK(has(index_error(fx, edit(j, R"("version":1)", R"("version":"1")")), "index.json version is \"1\", not an integer"));
  CHECK(has(index_error(fx, edit(j, R"("step":7)", R"("step":-1e300)")), "index.json step is -1e+300, not an integer"));
  CHECK(has(index_error(fx, edit(j, R"("step":7)", R"("step":18446744073709551615)")),
            "step is 18446744073709551615, not an integer in [0, 9223372036854775807]"));
  CHECK(has(index_error(fx, edit(j, R"("step":7)", R"("step":-1)")), "index.json step is -1, not an integer in [0, "));
  CHECK(has(index_error(fx, edit(j, R"("optimizer":\{"step":3\})", R"("optimizer":{"step":-3})")),
            "optimizer step is -3, not an integer in [0, "));
  CHECK(has(index_error(fx, edit(j, R"("dp":1)", R"("dp":0)")), "layout dp is 0, not an integer in [1, 2147483647]"));
  CHECK(has(index_error(fx, edit(j, R"("tp":2)", R"("tp":4294967298)")), "layout tp is 4294967298, not an integer"));
  CHECK(has(index_error(fx, edit(j, R"("optimizer":\{"step":3\})", R"("optimizer":{"step":[3]})")),
            "optimizer step is [3], not an integer"));
  CHECK(has(index_error(fx, edit(j, R"("bytes":\d+)", R"("bytes":-5)")),
            "file 'model-rank00000.safetensors' bytes is -5, not an integer in [0, 18446744073709551615]"));
  CHECK(has(index_error(fx, edit(j, R"("id":"fuzz-fixture-0001")", R"("id":null)")), "index.json id is null, not a string"));
  CHECK(has(index_error(fx, edit(j, R"("layout":\{"dp":1,)", R"("layout":{)")), "index.json layout has no \"dp\""));
  CHECK(has(index_error(fx, edit(j, R"("files":\{)", R"("files":[{)")), "not valid JSON"));
  CHECK(has(index_error(fx, edit(j, R"("tensors":\{"w":)", R"("tensors":{"w":7,"w2":)")),
            "tensor 'w' is 7, not a JSON object"));
  CHECK(has(index_error(fx, edit(j, R"("kind":"model")", R"("kind":true)")), "tensor 'w' kind is true, not a string"));
  CHECK(has(index_error(fx, edit(j, R"("dtype":"F32")", R"("dtype":"Q4")")), "tensor 'w' has unknown dtype \"Q4\""));
  CHECK(has(index_error(fx, edit(j, R"("pieces":\[)", R"("pieces":{"x":[)")), "not valid JSON"));
  CHECK(has(index_error(fx, edit(j, R"("pp":0)", R"("pp":0.5)")), "tensor 'w' piece pp is 0.5, not an integer"));
}

TEST_CASE("checkpoint input: a shape whose byte size overflows, or larger than its files, is refused before allocating") {
  const CheckpointFixture fx;
  const std::string j = fx.index_json();
  // The element count fits int64, the F64 byte size does not.
  std::string e = index_error(fx, edit(j, R"("shape":\[6\],"pieces")", R"("shape":[2305843009213693952],"pieces")"));
  CHECK(has(e, "tensor 'b' has shape (2305843009213693952) of F64, whose byte size overflows"));
  CHECK(has(index_error(fx, edit(j, R"("shape":\[4,6\])", R"("shape":[-4,6])")), "tensor 'w' extent is -4, not an integer"));
  // 2^40 elements, consistent in the index (shape and geometry), in files of a few hundred
  // bytes: an error, not a 8 TiB allocation.
  std::string big = j;
  big = std::regex_replace(big, std::regex(R"(\[6\])"), "[1099511627776]");
  big = edit(big, R"("flat":\[4,6\])", R"("flat":[4,1099511627776])");
  const auto t0 = std::chrono::steady_clock::now();
  e = index_error(fx, big);
  CHECK(has(e, "tensor 'b' of shape (1099511627776) needs 8796093022208 bytes but the files of its 1 pieces hold"));
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
  // A zero extent beside a huge one (index and geometries agree): nothing to read, and no
  // loop over 2^62 rows (ShardGeometry::runs stops at once).
  std::string zero = j;
  zero = std::regex_replace(zero, std::regex(R"(shape":\[4,6\])"), "shape\":[4611686018427387904,0]");
  zero = std::regex_replace(zero, std::regex(R"(\[\[0,3\]\])"), "[]");
  zero = std::regex_replace(zero, std::regex(R"(\[\[3,6\]\])"), "[]");
  const auto t1 = std::chrono::steady_clock::now();
  e = index_error(fx, zero);
  CHECK(e == "");  // an empty tensor loads: no piece overlaps it, so its files are not consulted
  CHECK(ck::CheckpointReader(fx.dir.path).read_full<double>("w").numel() == 0);
  CHECK(std::chrono::steady_clock::now() - t1 < std::chrono::seconds(2));
}

TEST_CASE("checkpoint input: piece geometries out of range, out of order or overflowing name the tensor") {
  const CheckpointFixture fx;
  const std::string j = fx.index_json();
  auto geometry_error = [&](const std::string& re, const std::string& by) { return index_error(fx, edit(j, re, by)); };
  CHECK(has(geometry_error(R"("ranges":\[\[0,3\]\])", R"("ranges":[[0,7]])"),
            "tensor 'w': shard description {\"global_shape\":[4,6],\"ranges\":[[0,7]],\"shard_dim\":1} has a range [0, 7) "
            "outside the global extent 6 or not after the previous one"));
  CHECK(has(geometry_error(R"("ranges":\[\[0,3\]\])", R"("ranges":[[3,6],[0,3]])"), "or not after the previous one"));
  CHECK(has(geometry_error(R"("ranges":\[\[0,3\]\])", R"("ranges":[[0,3],[2,4]])"), "or not after the previous one"));
  CHECK(has(geometry_error(R"("ranges":\[\[0,3\]\])", R"("ranges":[[0,3.5]])"), "range is 3.5, not an integer"));
  CHECK(has(geometry_error(R"("ranges":\[\[0,3\]\])", R"("ranges":[[0]])"), "has a \"range\" that is not a pair"));
  CHECK(has(geometry_error(R"("shard_dim":1)", R"("shard_dim":2)"), "shard_dim is 2, not an integer in [-1, 1]"));
  CHECK(has(geometry_error(R"("shard_dim":1)", R"("shard_dim":-2147483649)"), "shard_dim is -2147483649, not an integer"));
  CHECK(has(geometry_error(R"("flat":\[0,4\])", R"("flat":[0,7])"), "has a flat range outside the local tensor"));
  CHECK(has(geometry_error(R"("flat":\[0,4\])", R"("flat":[3,1])"), "has a flat range outside the local tensor"));
  CHECK(has(geometry_error(R"("ranges":\[\[0,3\]\]\})", R"("ranges":[[0,3]],"local_extent":9223372036854775807})"),
            "has a local tensor of more elements than an int64 counts"));
  CHECK(has(geometry_error(R"("geometry":\{"global_shape":\[4,6\])", R"("geometry":{"global_shape":[4,6,1,1,1])"),
            "has rank 5 above 4"));
  CHECK(has(geometry_error(R"("geometry":\{"global_shape":\[4,6\])", R"("geometry":{"global_shape":[4,7])"),
            "tensor 'w' has shape (4, 6) but a piece in model-rank00000.safetensors describes (4, 7)"));
}

TEST_CASE("checkpoint input: a file name that leaves the checkpoint directory is refused") {
  const CheckpointFixture fx;
  const std::string j = fx.index_json();
  for (const std::string bad : {"../model-rank00000.safetensors", "/etc/passwd", "..", "sub/x.safetensors"}) {
    CAPTURE(bad);
    std::string k = std::regex_replace(j, std::regex("model-rank00000\\.safetensors"), bad);
    CHECK(has(index_error(fx, k), "file '" + bad + "' is not a plain file name in the checkpoint directory"));
  }
  CHECK(has(index_error(fx, edit(j, R"("file":"model-rank00001.safetensors")", R"("file":"other.safetensors")")),
            "tensor 'w' is in file other.safetensors, which the index does not list"));
}

TEST_CASE("checkpoint input: bad tessera.shards metadata in a rank file names the file and the defect") {
  const CheckpointFixture fx;
  auto rewrite = [&](const std::string& shards) {
    ck::SafetensorsWriter w;
    w.set_metadata("tessera.checkpoint_id", CheckpointFixture::id);
    w.set_metadata("tessera.shards", shards);
    w.add("w", tessera::Tensor<float>::full(tessera::Shape{4, 3}, 1.0f));
    w.add("b.exp_avg", tessera::Tensor<double>::full(tessera::Shape{2}, 1.0));
    const std::uint64_t bytes = w.write(fx.dir.path / "model-rank00001.safetensors");
    return edit(fx.index_json(), "\"bytes\":" + std::to_string(fx.bytes1), "\"bytes\":" + std::to_string(bytes));
  };
  CHECK(has(index_error(fx, rewrite("{not json")), "its file model-rank00001.safetensors: metadata tessera.shards is not valid JSON"));
  CHECK(has(index_error(fx, rewrite("[1,2]")), "its file model-rank00001.safetensors: metadata tessera.shards is [1,2], not a JSON object"));
  CHECK(has(index_error(fx, rewrite(R"({"w":{"global_shape":"x"}})")),
            "its file model-rank00001.safetensors: tensor 'w': shard description"));
  CHECK(has(index_error(fx, rewrite(std::string(500, '['))), "metadata tessera.shards nests deeper than 128 levels"));
  // A rank file from another save.
  {
    ck::SafetensorsWriter w;
    w.set_metadata("tessera.checkpoint_id", "another-save");
    w.add("w", tessera::Tensor<float>::full(tessera::Shape{4, 3}, 1.0f));
    const std::uint64_t bytes = w.write(fx.dir.path / "model-rank00001.safetensors");
    CHECK(has(index_error(fx, edit(fx.index_json(), "\"bytes\":" + std::to_string(fx.bytes1), "\"bytes\":" + std::to_string(bytes))),
              "its file model-rank00001.safetensors belongs to another save (checkpoint id another-save"));
  }
}

TEST_CASE("checkpoint input: a rank file whose CRC-32 metadata was renamed is refused, not loaded unchecked") {
  // One edited header byte (tessera.crc32 -> tessera.crc34, the file size unchanged) used to
  // turn the CRC check off, so corrupted values loaded (a new user's finding).
  const CheckpointFixture fx;
  const fs::path file = fx.dir.path / "model-rank00001.safetensors";
  std::ifstream in(file, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  const std::size_t at = bytes.find("tessera.crc32");
  REQUIRE(at != std::string::npos);
  bytes[at + 12] = '4';
  write_bytes(file, as_bytes(bytes));
  CHECK(has(index_error(fx, fx.index_json()), "has no CRC-32 in the file's metadata (tessera.crc32)"));
}

TEST_CASE("checkpoint input: a Hugging Face weight map with a non-string or escaping file name is refused by name") {
  ScratchDir d;
  auto map_error = [&](const std::string& index) {
    write_bytes(d.path / "model.safetensors.index.json",
                {reinterpret_cast<const std::uint8_t*>(index.data()), index.size()});
    try {
      tessera::checkpoint::load_gpt2_safetensors(d.path, tessera::ParameterList<float>{});
    } catch (const tessera::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(has(map_error(R"({"weight_map":{"wte.weight":5}})"),
            "model.safetensors.index.json\": the file of tensor 'wte.weight' is 5, not a string"));
  CHECK(has(map_error(R"({"weight_map":{"wte.weight":"../model.safetensors"}})"),
            "the file of tensor 'wte.weight' is \"../model.safetensors\", not a file name beside the index"));
  CHECK(has(map_error(R"({"weight_map":[]})"), "has no weight_map object"));
  CHECK(has(map_error(std::string(1000, '[')), "model.safetensors.index.json\" nests deeper than 128 levels"));
}
