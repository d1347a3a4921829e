#pragma once
// Helpers of the checkpoint tests: temporary directories, a tiny GPT-2 and its tensor-parallel
// layouts, shards cut from full tensors by ParamLayout's rule (written here independently of
// the library's geometry), simulated ranks, and an element-wise training step whose result
// does not depend on the layout, so resumed training can be compared bitwise.

#include <doctest/doctest.h>
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "tessera/checkpoint/checkpoint.hpp"
#include "tessera/core/random.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/run_ranks.hpp"

namespace ckpt_test {

namespace fs = std::filesystem;
using tessera::Parameter;
using tessera::ParameterList;
using tessera::ParamLayout;
using tessera::Shape;
using tessera::Tensor;

// A fresh directory under the system's temporary directory, removed with everything in it.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string t = (fs::temp_directory_path() / "tessera-ckpt-XXXXXX").string();
    REQUIRE(::mkdtemp(t.data()) != nullptr);
    path = t;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& s) const { return path / s; }
};

// Writes a file of the safetensors layout from its parts: the header length field (the
// header's size unless given), the header text as is, and the data bytes.
inline void write_raw(const fs::path& p, const std::string& header, const std::vector<unsigned char>& data,
                      std::int64_t length_field = -1) {
  std::ofstream out(p, std::ios::binary);
  const std::uint64_t n = length_field < 0 ? header.size() : static_cast<std::uint64_t>(length_field);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

// The message of the tessera::Error that `fn` throws ("" if it throws none).
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// Overwrites byte `at` of file `p` with its complement.
inline void flip_byte(const fs::path& p, std::uint64_t at) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(~c);
  f.seekp(static_cast<std::streamoff>(at));
  f.write(&c, 1);
}

// The tiny GPT-2 of these tests: 12 heads so that tp 1, 2, 3 and 4 all divide them, a vocab
// of 24 that they divide as well.
inline tessera::GPTConfig tiny_config(std::int64_t n_layer = 2) {
  return {.vocab_size = 24, .n_positions = 8, .n_layer = n_layer, .n_head = 12, .d_model = 24};
}

// Megatron-LM's layouts of GPT-2: c_attn column-parallel with q, k, v as 3 blocks, the MLP's
// c_fc column-parallel, both c_proj row-parallel, wte vocab-parallel, the rest replicated.
inline ParamLayout tp_layout(const std::string& name) {
  auto ends = [&](const std::string& s) { return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0; };
  if (ends("attn.c_attn.weight")) return ParamLayout::shard(1, 3);
  if (ends("attn.c_attn.bias")) return ParamLayout::shard(0, 3);
  if (ends("attn.c_proj.weight") || ends("mlp.c_proj.weight")) return ParamLayout::shard(0);
  if (ends("mlp.c_fc.weight")) return ParamLayout::shard(1);
  if (ends("mlp.c_fc.bias") || name == "wte.weight") return ParamLayout::shard(0);
  return ParamLayout::replicate();
}

// Named full tensors in model order.
using FullModel = std::vector<std::pair<std::string, Tensor<double>>>;

// The full (serial) parameters of a tiny GPT from `seed`, perturbed so that LayerNorm weights
// and biases are not 1 and 0 (all values distinct).
inline FullModel full_gpt(std::uint64_t seed, std::int64_t n_layer = 2) {
  tessera::GPT<double> gpt(tiny_config(n_layer), seed);
  FullModel out;
  for (Parameter<double>& p : gpt.parameters()) {
    Tensor<double> t = p.value.clone();
    tessera::fill_normal(t, seed + 1, p.name, 0.5);
    out.emplace_back(p.name, t);
  }
  return out;
}

// Rank `r`'s shard of `full` under `layout` at tp size `n`, by ParamLayout's definition: dim
// `dim` is `blocks` equal parts, each split evenly; the shard holds its slice of each part.
template <class T>
Tensor<T> reference_shard_of(const Tensor<T>& full, ParamLayout layout, int r, int n) {
  if (!layout.is_shard()) return full.clone();
  const std::int64_t part = full.size(layout.dim) / layout.blocks, piece = part / n;
  std::vector<Tensor<T>> pieces;
  for (int b = 0; b < layout.blocks; ++b)
    pieces.push_back(full.slice(layout.dim, b * part + r * piece, b * part + (r + 1) * piece));
  return tessera::concat(pieces, layout.dim);
}

// The inverse of shard_of: the full tensor from the n shards in tp order.
template <class T>
Tensor<T> unshard(const std::vector<Tensor<T>>& shards, ParamLayout layout) {
  if (!layout.is_shard()) return shards.at(0).clone();
  const int n = static_cast<int>(shards.size());
  const std::int64_t piece = shards[0].size(layout.dim) / layout.blocks;
  std::vector<Tensor<T>> parts;
  for (int b = 0; b < layout.blocks; ++b)
    for (int r = 0; r < n; ++r) parts.push_back(shards[static_cast<std::size_t>(r)].slice(layout.dim, b * piece, (b + 1) * piece));
  return tessera::concat(parts, layout.dim);
}

// Same shape and the same bits, all finite (two NaN tensors are not the same: a resumed run
// that went NaN must not pass; tessera::testing::bitwise_equal_finite).
template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  if (a.shape() != b.shape()) return false;
  const Tensor<T> ac = a.contiguous(), bc = b.contiguous();
  return tessera::testing::bitwise_equal_finite(std::span<const T>(ac.span()), std::span<const T>(bc.span()));
}

// Which parameters pp stage `s` of `pp` holds: stage 0 the embeddings, the blocks split evenly
// in order, the last stage ln_f and (tied to the head) a copy of wte.
inline bool on_stage(const std::string& name, int s, int pp, std::int64_t n_layer) {
  if (pp == 1) return true;
  if (name == "wte.weight") return s == 0 || s == pp - 1;
  if (name == "wpe.weight") return s == 0;
  if (name.rfind("ln_f.", 0) == 0) return s == pp - 1;
  const std::int64_t layer = std::stoll(name.substr(2, name.find('.', 2) - 2));
  return layer * pp / n_layer == s;
}

// One simulated rank: its parameters (cut from full tensors by layout and placement), an
// AdamW over them (over its flat range of them under ZeRO-1), and the global index of every
// local element (for the element-wise gradient).
struct Rank {
  tessera::checkpoint::Placement where;
  bool zero = false;
  std::deque<Parameter<double>> params;
  std::deque<Parameter<double>> pieces;  // ZeRO-1: views of this dp rank's flat range
  std::vector<Tensor<double>> global_index;
  ParameterList<double> list;
  tessera::checkpoint::FlatLayout flat;
  std::vector<tessera::checkpoint::TensorShard<double>> piece_desc;
  std::unique_ptr<tessera::optim::AdamW<double>> opt;

  Rank(const FullModel& full, tessera::checkpoint::Placement w, bool zero_, std::int64_t n_layer = 2)
      : where(w), zero(zero_) {
    for (const auto& [name, t] : full) {
      if (!on_stage(name, w.coord.pp, w.shape.pp, n_layer)) continue;
      const ParamLayout l = tp_layout(name);
      params.emplace_back(name, reference_shard_of(t, l, w.coord.tp, w.shape.tp), l);
      Tensor<double> idx = Tensor<double>::empty(t.shape());
      for (std::int64_t i = 0; i < idx.numel(); ++i) idx.data()[i] = static_cast<double>(i);
      global_index.push_back(reference_shard_of(idx, l, w.coord.tp, w.shape.tp));
      list.push_back(params.back());
    }
    const tessera::optim::AdamWOptions o{.lr = 0.01, .weight_decay = 0.1};
    if (!zero) {
      opt = std::make_unique<tessera::optim::AdamW<double>>(list, o);
      return;
    }
    flat = tessera::checkpoint::FlatLayout::contiguous(list, w.shape.dp);
    const auto [a, b] = flat.shard_range(w.coord.dp, w.shape.dp);
    ParameterList<double> pl;
    for (const auto& s : flat.segments(a, b)) {
      Parameter<double>& p = params[s.param];
      const Tensor<double> v = p.value.reshape(Shape{p.value.numel()}).slice(0, s.param_begin, s.param_end);
      const Tensor<double> g = p.grad.reshape(Shape{p.value.numel()}).slice(0, s.param_begin, s.param_end);
      pieces.emplace_back(p.name, v, g, p.layout);
      pl.push_back(pieces.back());
      piece_desc.push_back({p.name, v, p.layout, tessera::checkpoint::FlatRange{p.value.shape(), s.param_begin, s.param_end}});
    }
    opt = std::make_unique<tessera::optim::AdamW<double>>(pl, o);
  }

  tessera::checkpoint::OptimizerState<double> state() const { return tessera::checkpoint::adamw_state(*opt, piece_desc); }

  // One training step: the gradient of each element is a function of its global index, its
  // value and the step only; under ZeRO-1 each dp rank updates its range, then the dp ranks
  // all-gather the flat vector.
  void step(tessera::Comm& dp_comm) {
    const auto t = static_cast<double>(opt->steps());
    for (std::size_t i = 0; i < params.size(); ++i) {
      const Parameter<double>& p = params[i];
      for (std::int64_t e = 0; e < p.value.numel(); ++e) {
        const double g = global_index[i].data()[e];
        p.grad.data()[e] = std::sin(0.37 * g + 0.11 * static_cast<double>(tessera::stream_id(p.name) % 5) + t) +
                            0.5 * p.value.data()[e];
      }
    }
    opt->step();
    if (!zero) return;
    const auto [a, b] = flat.shard_range(where.coord.dp, where.shape.dp);
    std::vector<double> mine(static_cast<std::size_t>(b - a), 0.0), all(static_cast<std::size_t>(flat.padded_numel));
    for (const auto& s : flat.segments(a, b))
      std::memcpy(mine.data() + (s.flat_begin - a), params[s.param].value.data() + s.param_begin,
                  static_cast<std::size_t>(s.param_end - s.param_begin) * sizeof(double));
    dp_comm.all_gather(mine, all);
    for (std::size_t i = 0; i < params.size(); ++i)
      std::memcpy(params[i].value.data(), all.data() + flat.params[i].offset,
                  static_cast<std::size_t>(params[i].value.numel()) * sizeof(double));
  }
};

// The serial reference: all full tensors, one AdamW, `steps` steps.
struct Serial {
  Rank rank;
  explicit Serial(const FullModel& full, std::int64_t n_layer = 2)
      : rank(full, tessera::checkpoint::Placement{}, false, n_layer) {}
  void run(int steps) {
    tessera::Comm none;
    for (int s = 0; s < steps; ++s) rank.step(none);
  }
};

// What a rank reports back: its placement and copies of its parameter shards.
struct Report {
  tessera::checkpoint::Placement where;
  std::map<std::string, Tensor<double>> params;
};

inline Report report(const Rank& r) {
  Report out{r.where, {}};
  for (const Parameter<double>& p : r.params) out.params[p.name] = p.value.clone();
  return out;
}

// The full tensors reassembled from the reports of dp rank 0 of every stage and tp rank.
inline std::map<std::string, Tensor<double>> reassemble(const std::vector<Report>& reports) {
  std::map<std::string, std::vector<std::pair<int, Tensor<double>>>> by_name;
  for (const Report& r : reports)
    if (r.where.coord.dp == 0)
      for (const auto& [name, t] : r.params) by_name[name].emplace_back(r.where.coord.tp + 1000 * r.where.coord.pp, t);
  std::map<std::string, Tensor<double>> out;
  for (auto& [name, v] : by_name) {
    std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    const int tp = reports.front().where.shape.tp;
    std::vector<Tensor<double>> shards;
    for (int i = 0; i < tp; ++i) shards.push_back(v[static_cast<std::size_t>(i)].second);  // lowest stage holding it
    out[name] = unshard(shards, tp_layout(name));
  }
  return out;
}

// The placement of world rank `rank` on `shape` (the Mesh's order: tp fastest, pp slowest).
inline tessera::checkpoint::Placement placement(int rank, tessera::MeshShape shape) {
  return {shape, tessera::MeshCoord{.dp = (rank / shape.tp) % shape.dp, .pp = rank / (shape.tp * shape.dp), .tp = rank % shape.tp}};
}

// The communicator of the ranks that differ only in dp.
inline tessera::Comm dp_comm_of(tessera::Comm& world, const tessera::checkpoint::Placement& w) {
  return world.split(w.coord.pp * w.shape.tp + w.coord.tp, w.coord.dp);
}

}  // namespace ckpt_test
