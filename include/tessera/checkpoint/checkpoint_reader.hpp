#pragma once
/// @file
/// CheckpointReader: opens a sharded checkpoint directory (its index.json and rank files),
/// checks it, and copies any tensor into any layout (resharding on load).

#include <nlohmann/json.hpp>

#include <concepts>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/checkpoint/checkpoint_info.hpp"
#include "tessera/checkpoint/detail/assemble.hpp"
#include "tessera/checkpoint/detail/json_input.hpp"
#include "tessera/checkpoint/safetensors_dtype.hpp"
#include "tessera/checkpoint/safetensors_file.hpp"
#include "tessera/checkpoint/tensor_shard.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::checkpoint {

/// Whether a saved tensor belongs to the model or to the optimizer state.
enum class TensorKind {
  model,     ///< a parameter
  optimizer  ///< optimizer state
};

/// Throws tessera::Error naming the first field in which `saved` (a checkpoint's config)
/// and `expected` (the loading model's) differ, e.g. "checkpoint ckpt/step100 holds another
/// model configuration: n_layer is 2 in the checkpoint and 3 in this model". An empty or null
/// `expected` matches anything.
inline void check_config(const nlohmann::json& saved, const nlohmann::json& expected, std::string_view where) {
  if (expected.is_null() || (expected.is_object() && expected.empty())) return;
  TESSERA_EXPECTS(saved.is_object() && expected.is_object(), where, ": model configurations are not JSON objects (",
                  detail::brief(saved), " and ", detail::brief(expected), ")");
  std::set<std::string> keys;
  for (auto it = saved.begin(); it != saved.end(); ++it) keys.insert(it.key());
  for (auto it = expected.begin(); it != expected.end(); ++it) keys.insert(it.key());
  for (const std::string& k : keys) {
    const bool in_saved = saved.contains(k), in_expected = expected.contains(k);
    TESSERA_EXPECTS(in_saved && in_expected && saved[k] == expected[k], where,
                    " holds another model configuration: ", k, " is ", in_saved ? detail::brief(saved[k]) : "absent",
                    " in the checkpoint and ", in_expected ? detail::brief(expected[k]) : "absent", " in this model");
  }
}

/// A sharded checkpoint directory opened for reading (not collective; any process may open
/// one). The constructor reads and checks index.json; rank files are opened, checked and
/// memory-mapped when a tensor first needs them (their size and checkpoint id must match the
/// index, each tensor's CRC-32 its bytes).
///
/// `read_into` copies the elements a rank needs from whichever saved pieces hold them, for any
/// change of tp size, dp size (flat ZeRO-1 ranges) or pp split: a piece saved at tp = 2 and a
/// shard loaded at tp = 4 overlap partially, and for a fused weight (blocks = 3) each of q, k
/// and v is resharded separately (CASES C8).
///
/// Every error is a tessera::Error naming the directory and, where there is one, the tensor.
class CheckpointReader {
 public:
  /// Opens `dir`. Throws when it has no index.json (no complete save is there), the index is
  /// not valid JSON, is of another format or version, or lists a piece whose geometry does not
  /// fit its tensor's shape (naming the tensor).
  explicit CheckpointReader(std::filesystem::path dir) : dir_(std::move(dir)) {
    const std::filesystem::path index = dir_ / index_file_name;
    std::error_code ec;
    TESSERA_EXPECTS(std::filesystem::is_regular_file(index, ec), "checkpoint ", dir_, ": no ", index_file_name,
                    " (not a checkpoint, or a save that did not complete)");
    std::ifstream in(index, std::ios::binary);
    TESSERA_EXPECTS(in.good(), "checkpoint ", dir_, ": cannot open ", index_file_name);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string where = tessera::detail::str("checkpoint ", dir_, ": ", index_file_name);
    const auto j = detail::parse_json<nlohmann::ordered_json>(ss.str(), where);
    try {
      parse_index(j);
    } catch (const nlohmann::json::exception& e) {
      throw Error(tessera::detail::str(where, " is malformed: ", e.what()));
    }
  }
  CheckpointReader(const CheckpointReader&) = delete;             ///< holds open files
  CheckpointReader& operator=(const CheckpointReader&) = delete;  ///< holds open files
  CheckpointReader(CheckpointReader&&) = delete;                  ///< holds a mutex
  CheckpointReader& operator=(CheckpointReader&&) = delete;       ///< holds a mutex
  ~CheckpointReader() = default;                                  ///< closes the files

  /// The directory.
  const std::filesystem::path& dir() const noexcept { return dir_; }
  /// What the index records.
  const CheckpointInfo& info() const noexcept { return info_; }
  /// Throws tessera::Error naming the first differing field unless the saved model
  /// configuration equals `expected` (see check_config).
  void check_config(const nlohmann::json& expected) const {
    checkpoint::check_config(info_.config, expected, tessera::detail::str("checkpoint ", dir_));
  }
  /// Names of the saved tensors of `kind`, in the order of the saving model's parameters.
  std::vector<std::string> tensor_names(TensorKind kind) const {
    std::vector<std::string> out;
    for (const Entry& e : entries_)
      if (e.kind == kind) out.push_back(e.name);
    return out;
  }
  /// Whether tensor `name` was saved.
  bool contains(std::string_view name) const { return by_name_.count(std::string(name)) != 0; }
  /// The global shape of saved tensor `name`. Throws tessera::Error naming it when absent.
  std::vector<std::int64_t> global_shape(std::string_view name) const { return entry(name).shape; }
  /// The stored dtype of saved tensor `name`. Throws tessera::Error naming it when absent.
  SafetensorsDType dtype(std::string_view name) const { return entry(name).dtype; }

  /// Copies into `shard.value` the elements that a rank at tp coordinate `tp_rank` of
  /// `tp_size` holds of tensor `shard.name` (see TensorShard), converting to T. Throws
  /// tessera::Error naming the tensor when it was not saved, its global shape differs from the
  /// one the shard implies (both shapes named), or a file it needs is missing, truncated,
  /// corrupted or from another save; `shard.value` is then unchanged.
  template <std::floating_point T>
  void read_into(const TensorShard<T>& shard, int tp_rank, int tp_size) const {
    const detail::LoadPlan p = plan(shard, tp_rank, tp_size);
    detail::execute(p, shard.value);
  }

  /// The whole global tensor `name` (rank at most 4), converted to T. Throws as read_into.
  template <std::floating_point T>
  Tensor<T> read_full(std::string_view name) const {
    const Entry& e = entry(name);
    TESSERA_EXPECTS(e.shape.size() <= static_cast<std::size_t>(max_rank), "checkpoint ", dir_, ": tensor '", name,
                    "' has rank ", e.shape.size(), " above ", max_rank);
    check_files_hold(e);
    Index dims{};
    for (std::size_t d = 0; d < e.shape.size(); ++d) dims[d] = e.shape[d];
    Tensor<T> out = Tensor<T>::empty(Shape::from(dims, static_cast<int>(e.shape.size())));
    read_into(TensorShard<T>{std::string(name), out, ParamLayout::replicate(), std::nullopt}, 0, 1);
    return out;
  }

  /// Throws tessera::Error naming the file and the tensor when a file of the checkpoint holds a
  /// tensor that the index does not list (an index edited, or mixed from two saves), which a
  /// reader of the index alone, as consolidate_checkpoint, would leave out without a word. Opens
  /// every file of the index (and checks each as read_into does: size, checkpoint id). Not
  /// collective.
  void check_index_lists_every_tensor() const {
    for (const auto& [name, bytes] : file_bytes_) {
      const OpenFile& of = file(name, "");
      for (const TensorInfo& t : of.file->tensors())
        TESSERA_EXPECTS(contains(t.name), "checkpoint ", dir_, ": ", name, " holds tensor '", t.name, "', which ",
                        index_file_name, " does not list (an edited index, or one from another save)");
    }
  }

  /// The plan of read_into: checks everything (presence, shapes, the files and CRCs of the
  /// pieces it overlaps, full coverage) without writing. Used by load_checkpoint to find every
  /// error on every rank before any parameter changes.
  template <std::floating_point T>
  detail::LoadPlan plan(const TensorShard<T>& shard, int tp_rank, int tp_size) const {
    const std::string where = tessera::detail::str("checkpoint ", dir_);
    const Entry& e = entry(shard.name);
    detail::LoadPlan p;
    p.name = shard.name;
    p.where = where;
    try {
      p.target = geometry_of(shard, tp_rank, tp_size);
    } catch (const Error& err) {
      throw Error(tessera::detail::str(where, ": ", err.what()));
    }
    TESSERA_EXPECTS(p.target.global_shape == e.shape, where, ": tensor '", shard.name, "' has global shape ",
                    shape_str(e.shape), " in the checkpoint but ", shape_str(p.target.global_shape),
                    " in this model (local ", shard.value.shape(), ", layout ", shard.layout, ", tp ", tp_rank, "/",
                    tp_size, ")");
    TESSERA_EXPECTS(is_floating(e.dtype), where, ": tensor '", shard.name, "' holds ", name_of(e.dtype),
                    ", which does not load into floating-point values");
    const std::vector<Run> want = p.target.runs();
    for (const Piece& piece : e.pieces) {
      if (!overlaps(want, piece.geometry.runs())) continue;
      const OpenFile& of = file(piece.file, shard.name);
      const SafetensorsFile& f = *of.file;
      const TensorInfo* info = f.find(shard.name);
      TESSERA_EXPECTS(info != nullptr, where, ": tensor '", shard.name, "' is listed in ", piece.file,
                      " by the index but the file does not hold it");
      TESSERA_EXPECTS(info->dtype == e.dtype, where, ": tensor '", shard.name, "' in ", piece.file, " is ",
                      name_of(info->dtype), ", the index says ", name_of(e.dtype));
      const std::vector<std::int64_t> held =
          piece.geometry.flat ? std::vector<std::int64_t>{piece.geometry.numel()} : piece.geometry.local_shape();
      TESSERA_EXPECTS(info->shape == held, where, ": tensor '", shard.name, "' in ", piece.file, " has shape ",
                      shape_str(info->shape), " but its piece holds ", shape_str(held));
      const auto& geoms = of.geometry;
      const auto g = geoms.find(shard.name);
      TESSERA_EXPECTS(g != geoms.end() && g->second == piece.geometry, where, ": tensor '", shard.name, "' in ",
                      piece.file, " describes ", g == geoms.end() ? std::string("no piece") : g->second.to_json().dump(),
                      " but the index describes ", piece.geometry.to_json().dump());
      // tessera writes a CRC-32 for every tensor: one missing means the header was edited (its
      // check would be skipped, and corrupted values would load).
      TESSERA_EXPECTS(f.has_crc32(*info), where, ": tensor '", shard.name, "' in ", piece.file,
                      " has no CRC-32 in the file's metadata (", crc32_metadata_key, "), which tessera writes for "
                      "every tensor: the header was edited");
      try {
        f.verify(*info);
      } catch (const Error& err) {
        throw Error(tessera::detail::str(where, ": ", err.what()));
      }
      p.sources.push_back({&f, info, piece.geometry});
    }
    detail::check_coverage(p);
    return p;
  }

 private:
  struct Piece {
    std::string file;
    int pp = 0;
    ShardGeometry geometry;
  };
  struct OpenFile {
    std::unique_ptr<SafetensorsFile> file;
    std::map<std::string, ShardGeometry> geometry;  // from the file's tessera.shards metadata
  };
  struct Entry {
    std::string name;
    TensorKind kind = TensorKind::model;
    SafetensorsDType dtype = SafetensorsDType::f32;
    std::vector<std::int64_t> shape;
    std::vector<Piece> pieces;
  };

  static bool overlaps(const std::vector<Run>& a, std::vector<Run> b) {
    std::sort(b.begin(), b.end(), [](const Run& x, const Run& y) { return x.global < y.global; });
    for (const Run& r : a) {
      auto it = std::partition_point(b.begin(), b.end(), [&](const Run& s) { return s.global + s.length <= r.global; });
      if (it != b.end() && it->global < r.global + r.length && r.length > 0 && it->length > 0) return true;
    }
    return false;
  }

  const Entry& entry(std::string_view name) const {
    const auto it = by_name_.find(std::string(name));
    TESSERA_EXPECTS(it != by_name_.end(), "checkpoint ", dir_, ": tensor '", name, "' is not in the checkpoint (",
                    entries_.size(), " tensors saved)");
    return entries_[it->second];
  }

  // Reads index.json's fields, each checked for its JSON type and range: every defect is a
  // tessera::Error naming index.json and the field (a tensor's by its name).
  void parse_index(const nlohmann::ordered_json& j) {
    using detail::integer;
    using detail::member;
    using Json = nlohmann::ordered_json;
    const std::string where = tessera::detail::str("checkpoint ", dir_, ": ", index_file_name);
    TESSERA_EXPECTS(j.is_object() && j.contains("format") && j["format"].is_string() &&
                        j["format"].get<std::string>() == index_format,
                    where,
                    " is not a tessera checkpoint index (format ",
                    j.is_object() && j.contains("format") ? detail::brief(j["format"]) : "absent", ")");
    info_.version = integer<int>(member(j, "version", where), where + " version");
    TESSERA_EXPECTS(info_.version == format_version, where, " has format version ", info_.version,
                    "; this build reads version ", format_version);
    info_.id = detail::string_of(member(j, "id", where), where + " id");
    info_.step = integer<std::int64_t>(member(j, "step", where), where + " step", 0);
    info_.config = member(j, "config", where);
    info_.extra = j.contains("extra") ? nlohmann::json(j["extra"]) : nlohmann::json::object();
    const Json& l = member(j, "layout", where);
    const std::string lw = where + " layout";
    info_.layout = MeshShape{.dp = integer<int>(member(l, "dp", lw), lw + " dp", 1),
                             .pp = integer<int>(member(l, "pp", lw), lw + " pp", 1),
                             .tp = integer<int>(member(l, "tp", lw), lw + " tp", 1)};
    if (j.contains("optimizer") && !j["optimizer"].is_null()) {
      info_.has_optimizer = true;
      // Not compared with "step": the library does not know how a caller counts its steps
      // (train_gpt checks optimizer.step <= step on --resume).
      info_.optimizer_step = integer<std::int64_t>(member(j["optimizer"], "step", where + " optimizer"),
                                                   where + " optimizer step", 0);
    }
    const Json& files = member(j, "files", where);
    TESSERA_EXPECTS(files.is_object(), where, ": \"files\" is ", detail::brief(files), ", not a JSON object");
    for (auto it = files.begin(); it != files.end(); ++it) {
      const std::string fw = tessera::detail::str(where, ": file '", it.key(), "'");
      TESSERA_EXPECTS(plain_file_name(it.key()), fw, " is not a plain file name in the checkpoint directory");
      file_bytes_[it.key()] = integer<std::uint64_t>(member(*it, "bytes", fw), fw + " bytes");
    }
    const Json& tensors = member(j, "tensors", where);
    TESSERA_EXPECTS(tensors.is_object(), where, ": \"tensors\" is ", detail::brief(tensors), ", not a JSON object");
    for (auto it = tensors.begin(); it != tensors.end(); ++it) {
      Entry e;
      e.name = it.key();
      const std::string tw = tessera::detail::str(where, ": tensor '", e.name, "'");
      const std::string kind = detail::string_of(member(*it, "kind", tw), tw + " kind");
      TESSERA_EXPECTS(kind == "model" || kind == "optimizer", tw, " has kind '", kind, "'");
      e.kind = kind == "model" ? TensorKind::model : TensorKind::optimizer;
      const auto dt = parse_safetensors_dtype(detail::string_of(member(*it, "dtype", tw), tw + " dtype"));
      TESSERA_EXPECTS(dt.has_value(), tw, " has unknown dtype ", detail::brief((*it)["dtype"]));
      e.dtype = *dt;
      const Json& shape = member(*it, "shape", tw);
      TESSERA_EXPECTS(shape.is_array(), tw, " has shape ", detail::brief(shape), ", not an array");
      for (const Json& d : shape) e.shape.push_back(integer<std::int64_t>(d, tw + " extent", 0));
      TESSERA_EXPECTS(detail::checked_numel(e.shape, static_cast<std::int64_t>(size_of(e.dtype))) >= 0, tw,
                      " has shape ", shape_str(e.shape), " of ", name_of(e.dtype), ", whose byte size overflows");
      const Json& pieces = member(*it, "pieces", tw);
      TESSERA_EXPECTS(pieces.is_array(), tw, " has pieces ", detail::brief(pieces), ", not an array");
      for (const Json& pj : pieces) {
        Piece p;
        p.file = detail::string_of(member(pj, "file", tw + " piece"), tw + " piece file");
        p.pp = pj.is_object() && pj.contains("pp") ? integer<int>(pj["pp"], tw + " piece pp", 0) : 0;
        TESSERA_EXPECTS(file_bytes_.count(p.file) != 0, tw, " is in file ", p.file, ", which the index does not list");
        try {
          p.geometry = ShardGeometry::from_json(nlohmann::json(member(pj, "geometry", tw + " piece")), e.name);
        } catch (const Error& err) {
          throw Error(tessera::detail::str(where, ": ", err.what()));
        }
        TESSERA_EXPECTS(p.geometry.global_shape == e.shape, tw, " has shape ", shape_str(e.shape), " but a piece in ",
                        p.file, " describes ", shape_str(p.geometry.global_shape));
        e.pieces.push_back(std::move(p));
      }
      by_name_[e.name] = entries_.size();
      entries_.push_back(std::move(e));
    }
  }

  // Whether `name` names a file directly inside the checkpoint directory (no separator, not
  // "." or ".."): an index cannot point the reader at another file.
  static bool plain_file_name(const std::string& name) {
    return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
           name.find('\0') == std::string::npos;
  }

  // Throws unless the files holding `e`'s pieces are, on disk, at least as large as the
  // tensor's bytes: a lying index must not make read_full allocate memory for a tensor that
  // no file holds.
  void check_files_hold(const Entry& e) const {
    std::set<std::string> names;
    for (const Piece& p : e.pieces) names.insert(p.file);
    std::uint64_t on_disk = 0;
    for (const std::string& n : names) {
      std::error_code ec;
      const std::uintmax_t b = std::filesystem::file_size(dir_ / n, ec);
      if (!ec) on_disk += b;
    }
    const auto need = static_cast<std::uint64_t>(detail::checked_numel(e.shape)) * size_of(e.dtype);
    TESSERA_EXPECTS(need <= on_disk, "checkpoint ", dir_, ": tensor '", e.name, "' of shape ", shape_str(e.shape),
                    " needs ", need, " bytes but the files of its ", e.pieces.size(), " pieces hold ", on_disk,
                    " bytes in all (truncated, missing, or a wrong index)");
  }

  const OpenFile& file(const std::string& name, std::string_view tensor) const {
    std::lock_guard lk(mu_);
    if (const auto it = files_.find(name); it != files_.end()) return it->second;
    const std::string where = tensor.empty() ? tessera::detail::str("checkpoint ", dir_)
                                             : tessera::detail::str("checkpoint ", dir_, ": tensor '", tensor, "'");
    const std::filesystem::path path = dir_ / name;
    TESSERA_EXPECTS(std::filesystem::exists(path), where, ": its file ", name, " is missing");
    std::unique_ptr<SafetensorsFile> f;
    try {
      f = std::make_unique<SafetensorsFile>(path);
    } catch (const Error& e) {
      throw Error(tessera::detail::str(where, ": ", e.what()));
    }
    const std::uint64_t want = file_bytes_.at(name);
    TESSERA_EXPECTS(f->file_size() == want, where, ": its file ", name, " has ", f->file_size(),
                    " bytes but the index records ", want, " (truncated or replaced)");
    const auto id = f->metadata().find("tessera.checkpoint_id");
    TESSERA_EXPECTS(id != f->metadata().end() && id->second == info_.id, where, ": its file ", name,
                    " belongs to another save (checkpoint id ",
                    id == f->metadata().end() ? std::string("absent") : id->second, ", the index has ", info_.id, ")");
    std::map<std::string, ShardGeometry> geoms;
    if (const auto it = f->metadata().find("tessera.shards"); it != f->metadata().end()) {
      const std::string mw = tessera::detail::str(where, ": its file ", name, ": metadata tessera.shards");
      const auto shards = detail::parse_json<nlohmann::json>(it->second, mw);
      TESSERA_EXPECTS(shards.is_object(), mw, " is ", detail::brief(shards), ", not a JSON object");
      for (auto g = shards.begin(); g != shards.end(); ++g) {
        try {
          geoms[g.key()] = ShardGeometry::from_json(*g, g.key());
        } catch (const Error& err) {
          throw Error(tessera::detail::str(where, ": its file ", name, ": ", err.what()));
        }
      }
    }
    return files_.emplace(name, OpenFile{std::move(f), std::move(geoms)}).first->second;
  }

  std::filesystem::path dir_;
  CheckpointInfo info_;
  std::vector<Entry> entries_;
  std::map<std::string, std::size_t> by_name_;
  std::map<std::string, std::uint64_t> file_bytes_;
  mutable std::mutex mu_;
  mutable std::map<std::string, OpenFile> files_;
};

}  // namespace tessera::checkpoint
