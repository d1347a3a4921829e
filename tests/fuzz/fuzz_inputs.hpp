#pragma once
// The three parsers that read files a user hands tessera, each behind one function that takes
// arbitrary bytes: the safetensors reader, the checkpoint index (index.json, with valid rank
// files beside it), and the token-file reader (TextDataset). The libFuzzer targets in fuzz/
// and the regression tests in this folder call the same functions.
//
// Contract checked by every function: the bytes are accepted, or rejected with a
// tessera::Error whose message names the file. Anything else (another exception, a crash, a
// read past a buffer, an allocation beyond what the file holds) escapes and fails the test or
// stops the fuzzer. What an accepted input yields is checked too (`require`).

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "tessera/checkpoint/checkpoint_reader.hpp"
#include "tessera/checkpoint/safetensors_file.hpp"
#include "tessera/checkpoint/safetensors_writer.hpp"
#include "tessera/core/error.hpp"
#include "tessera/data/text_dataset.hpp"

namespace fuzz_inputs {

namespace fs = std::filesystem;
using tessera::Error;
using tessera::Shape;
using tessera::Tensor;

/// Stops the process with `what` when an accepted input broke an invariant: libFuzzer records
/// the input as a crash, a test run fails.
inline void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_inputs: invariant broken: %s\n", what);
    std::abort();
  }
}

/// What a feed function did with its input.
enum class Outcome { accepted, rejected };

/// A fresh directory under $TMPDIR (or /tmp), removed with its contents.
struct ScratchDir {
  fs::path path;
  ScratchDir() {
    std::string t = (fs::temp_directory_path() / "tessera-fuzz-XXXXXX").string();
    require(::mkdtemp(t.data()) != nullptr, "mkdtemp failed");
    path = t;
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

/// Writes `bytes` to `path`, replacing it.
inline void write_bytes(const fs::path& path, std::span<const std::uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  require(out.good(), "cannot write a scratch file");
}

/// Checks that a rejection names the file: the contract of every parser here.
inline Outcome rejected(const Error& e, const fs::path& file) {
  const std::string msg = e.what();
  require(msg.find(file.filename().string()) != std::string::npos, "an error does not name the file");
  return Outcome::rejected;
}

// ---- safetensors ---------------------------------------------------------------------------

/// Opens `bytes` as a safetensors file and reads every tensor whole (into double or int64,
/// by its dtype), its CRC-32 checked where the file records one. An accepted tensor must hold
/// exactly the bytes its shape and dtype need, inside the file.
inline Outcome feed_safetensors(std::span<const std::uint8_t> bytes, const fs::path& scratch) {
  const fs::path p = scratch / "input.safetensors";
  write_bytes(p, bytes);
  try {
    const tessera::checkpoint::SafetensorsFile f(p);
    // The file is memory-mapped, where AddressSanitizer sees no bounds: check them here. An
    // accepted file's tensors tile its data section exactly (8-byte length, header, data).
    std::uint64_t header = 0;
    std::memcpy(&header, bytes.data(), 8);
    std::uint64_t at = 0;
    for (const auto& t : f.tensors()) {
      require(t.begin == at && t.end >= t.begin, "accepted tensors do not tile the data section");
      require(static_cast<std::uint64_t>(t.numel()) * tessera::checkpoint::size_of(t.dtype) == f.bytes(t).size(),
              "a tensor's bytes do not match its shape");
      at = t.end;
    }
    require(8 + header + at == f.file_size(), "accepted tensors do not end at the end of the file");
    for (const auto& t : f.tensors()) {
      if (t.shape.size() > static_cast<std::size_t>(tessera::max_rank)) continue;  // read() refuses these
      if (tessera::checkpoint::is_floating(t.dtype)) {
        const Tensor<double> v = f.read<double>(t.name);
        require(v.numel() == t.numel(), "read() returned another element count");
      } else {
        const Tensor<std::int64_t> v = f.read<std::int64_t>(t.name);
        require(v.numel() == t.numel(), "read() returned another element count");
      }
    }
  } catch (const Error& e) {
    return rejected(e, p);
  }
  return Outcome::accepted;
}

// ---- checkpoint index ----------------------------------------------------------------------

/// The checkpoint the index input describes: two rank files of a tp = 2 save, written once
/// with a fixed checkpoint id, so a fuzzed index.json meets real files.
///   "w" (4, 6) F32, sharded on dim 1 (rank 0 columns [0, 3), rank 1 [3, 6)): w[i][j] = 10 i + j
///   "b" (6) F64, replicated, in rank 0's file: b[j] = j / 2
///   "b.exp_avg" (6) F64, optimizer state as ZeRO-1 flat pieces [0, 4) and [4, 6): -j
/// `index_json()` is the index a save of these would write (fuzz/corpus/checkpoint_index/
/// holds it as the seed).
struct CheckpointFixture {
  ScratchDir dir;
  std::uint64_t bytes0 = 0, bytes1 = 0;

  static constexpr const char* id = "fuzz-fixture-0001";
  static double w_at(int i, int j) { return 10.0 * i + j; }

  CheckpointFixture() {
    namespace ck = tessera::checkpoint;
    auto w_cols = [](int lo, int hi) {
      Tensor<float> t = Tensor<float>::empty(Shape{4, hi - lo});
      for (int i = 0; i < 4; ++i)
        for (int j = lo; j < hi; ++j) t.data()[i * (hi - lo) + (j - lo)] = static_cast<float>(w_at(i, j));
      return t;
    };
    auto ramp = [](int lo, int hi, double scale) {
      Tensor<double> t = Tensor<double>::empty(Shape{hi - lo});
      for (int j = lo; j < hi; ++j) t.data()[j - lo] = scale * j;
      return t;
    };
    {
      ck::SafetensorsWriter w;
      w.set_metadata("tessera.checkpoint_id", id);
      w.set_metadata("tessera.shards",
                     R"({"w":{"global_shape":[4,6],"shard_dim":1,"ranges":[[0,3]]},)"
                     R"("b":{"global_shape":[6],"shard_dim":-1,"ranges":[]},)"
                     R"("b.exp_avg":{"global_shape":[6],"shard_dim":-1,"ranges":[],"flat":[0,4]}})");
      w.add("w", w_cols(0, 3));
      w.add("b", ramp(0, 6, 0.5));
      w.add("b.exp_avg", ramp(0, 4, -1.0));
      bytes0 = w.write(dir.path / "model-rank00000.safetensors");
    }
    {
      ck::SafetensorsWriter w;
      w.set_metadata("tessera.checkpoint_id", id);
      w.set_metadata("tessera.shards",
                     R"({"w":{"global_shape":[4,6],"shard_dim":1,"ranges":[[3,6]]},)"
                     R"("b.exp_avg":{"global_shape":[6],"shard_dim":-1,"ranges":[],"flat":[4,6]}})");
      w.add("w", w_cols(3, 6));
      w.add("b.exp_avg", ramp(4, 6, -1.0));
      bytes1 = w.write(dir.path / "model-rank00001.safetensors");
    }
  }

  /// The index.json of this checkpoint, as save_checkpoint lays it out.
  std::string index_json() const {
    return std::string(R"({"format":"tessera-checkpoint","version":1,"id":")") + id +
           R"(","step":7,"config":{"n_layer":1},"extra":{},"layout":{"dp":1,"pp":1,"tp":2},)"
           R"("optimizer":{"step":3},"files":{"model-rank00000.safetensors":{"bytes":)" +
           std::to_string(bytes0) + R"(},"model-rank00001.safetensors":{"bytes":)" + std::to_string(bytes1) +
           R"(}},"tensors":{"w":{"kind":"model","dtype":"F32","shape":[4,6],"pieces":[)"
           R"({"file":"model-rank00000.safetensors","rank":0,"pp":0,"geometry":{"global_shape":[4,6],"shard_dim":1,"ranges":[[0,3]]}},)"
           R"({"file":"model-rank00001.safetensors","rank":1,"pp":0,"geometry":{"global_shape":[4,6],"shard_dim":1,"ranges":[[3,6]]}}]},)"
           R"("b":{"kind":"model","dtype":"F64","shape":[6],"pieces":[)"
           R"({"file":"model-rank00000.safetensors","rank":0,"pp":0,"geometry":{"global_shape":[6],"shard_dim":-1,"ranges":[]}}]},)"
           R"("b.exp_avg":{"kind":"optimizer","dtype":"F64","shape":[6],"pieces":[)"
           R"({"file":"model-rank00000.safetensors","rank":0,"pp":0,"geometry":{"global_shape":[6],"shard_dim":-1,"ranges":[],"flat":[0,4]}},)"
           R"({"file":"model-rank00001.safetensors","rank":1,"pp":0,"geometry":{"global_shape":[6],"shard_dim":-1,"ranges":[],"flat":[4,6]}}]}}})";
  }
};

/// Writes `bytes` as the fixture's index.json, opens the checkpoint and reads every tensor
/// whole and, for rank-2 tensors, as both column shards of tp = 2 (resharding through the
/// plan). Whatever an accepted index says, a value read must be one the files hold.
inline Outcome feed_checkpoint_index(std::span<const std::uint8_t> bytes, const CheckpointFixture& fx) {
  namespace ck = tessera::checkpoint;
  const fs::path index = fx.dir.path / "index.json";
  write_bytes(index, bytes);
  try {
    const ck::CheckpointReader r(fx.dir.path);
    for (ck::TensorKind kind : {ck::TensorKind::model, ck::TensorKind::optimizer}) {
      for (const std::string& name : r.tensor_names(kind)) {
        const Tensor<double> full = r.read_full<double>(name);
        for (std::int64_t i = 0; i < full.numel(); ++i) {
          const double v = full.data()[i];
          require(v == v && v > -100.0 && v < 100.0, "read_full returned a value no file holds");
        }
        const auto shape = r.global_shape(name);
        if (shape.size() == 2 && shape[1] % 2 == 0 && shape[1] > 0) {
          for (int tp = 0; tp < 2; ++tp) {
            Tensor<double> part = Tensor<double>::empty(Shape{shape[0], shape[1] / 2});
            r.read_into(ck::TensorShard<double>{name, part, tessera::ParamLayout::shard(1), std::nullopt}, tp, 2);
            for (std::int64_t i = 0; i < part.numel(); ++i)
              require(part.data()[i] == full.data()[(i / part.shape()[1]) * shape[1] + tp * part.shape()[1] +
                                                     i % part.shape()[1]],
                      "a tp shard differs from the whole tensor");
          }
        }
      }
    }
  } catch (const Error& e) {
    const std::string msg = e.what();
    require(msg.find(fx.dir.path.filename().string()) != std::string::npos, "an error does not name the checkpoint");
    return Outcome::rejected;
  }
  return Outcome::accepted;
}

// ---- token file ----------------------------------------------------------------------------

/// The first byte of `bytes` picks the context (1 + byte % 32) and the rest is the token file.
/// An accepted file gives batches whose rows are runs of the file's bytes, targets one
/// position after the inputs.
inline Outcome feed_token_file(std::span<const std::uint8_t> bytes, const fs::path& scratch) {
  const fs::path p = scratch / "tokens.txt";
  const std::int64_t context = bytes.empty() ? 1 : 1 + bytes[0] % 32;
  const auto text = bytes.empty() ? bytes : bytes.subspan(1);
  write_bytes(p, text);
  try {
    const tessera::data::TextDataset ds(p.string(), context);
    require(ds.size(tessera::data::Split::train) + ds.size(tessera::data::Split::val) ==
                static_cast<std::int64_t>(text.size()),
            "the splits do not add up to the file's bytes");
    for (auto split : {tessera::data::Split::train, tessera::data::Split::val}) {
      const auto b = ds.batch(split, 1234, 5, 3, 0, 3);
      const std::int64_t base = split == tessera::data::Split::train ? 0 : ds.size(tessera::data::Split::train);
      const std::int64_t n = ds.size(split);
      for (std::int64_t r = 0; r < 3; ++r) {
        const std::int32_t* in = b.inputs.data() + r * context;
        const std::int32_t* tg = b.targets.data() + r * context;
        // Find the row in its split's bytes (it must be there) and check the targets.
        bool found = false;
        for (std::int64_t s = 0; s + context < n && !found; ++s) {
          bool same = true;
          for (std::int64_t t = 0; t < context && same; ++t)
            same = in[t] == text[static_cast<std::size_t>(base + s + t)] &&
                   tg[t] == text[static_cast<std::size_t>(base + s + t + 1)];
          found = same;
        }
        require(found, "a batch row is not a run of the file's bytes");
      }
    }
  } catch (const Error& e) {
    return rejected(e, p);
  }
  return Outcome::accepted;
}

}  // namespace fuzz_inputs
