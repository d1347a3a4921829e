#pragma once
/// @file
/// save_checkpoint: the collective save of a sharded checkpoint. Every rank writes its own
/// shards (safetensors, with each tensor's global shape and slice in the metadata) into a
/// staging directory; world rank 0 then writes index.json and swaps the staging directory into
/// place, so a save that fails or is killed at any point leaves the previous checkpoint whole.

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/checkpoint/atomic_file.hpp"
#include "tessera/checkpoint/checkpoint_info.hpp"
#include "tessera/checkpoint/detail/collective.hpp"
#include "tessera/checkpoint/optimizer_state.hpp"
#include "tessera/checkpoint/safetensors_writer.hpp"
#include "tessera/checkpoint/tensor_shard.hpp"
#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/mesh/mesh.hpp"

namespace tessera::checkpoint {

/// Options of save_checkpoint.
struct SaveOptions {
  /// Called on the writing rank after each of its files is durable in the staging directory
  /// (and on rank 0 after index.json), with the file's path: progress reporting. If it throws,
  /// the save fails on every rank and the previous checkpoint stays.
  std::function<void(const std::filesystem::path&)> on_file_written;
};

namespace detail {

/// The staging directory of a save of `dir`: "<dir>.tmp-<pid>-<n>" beside it.
inline std::filesystem::path staging_dir_for(const std::filesystem::path& dir) {
  return std::filesystem::path(dir.string() + ".tmp-" + unique_suffix());
}

/// Removes what interrupted saves of `dir` left beside it: staging directories "<dir>.tmp-*",
/// and "<dir>.old-*" once `dir` holds a complete checkpoint again.
inline void remove_stale_siblings(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path parent = dir.has_parent_path() ? dir.parent_path() : fs::path(".");
  const std::string base = dir.filename().string();
  const bool dir_valid = fs::exists(dir / index_file_name);
  std::vector<fs::path> stale;
  for (const fs::directory_entry& e : fs::directory_iterator(parent)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(base + ".tmp-", 0) == 0 || (dir_valid && n.rfind(base + ".old-", 0) == 0)) stale.push_back(e.path());
  }
  for (const fs::path& p : stale) fs::remove_all(p);
}

/// Moves the complete staging directory to `dir`, replacing a previous checkpoint there
/// atomically (renameat2 RENAME_EXCHANGE where the file system has it; else two renames, and
/// between them the previous checkpoint is at "<dir>.old-*"). Throws tessera::Error when `dir`
/// exists and is neither empty nor a checkpoint.
inline void publish(const std::filesystem::path& staging, const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path parent = dir.has_parent_path() ? dir.parent_path() : fs::path(".");
  if (fs::exists(dir)) {
    TESSERA_EXPECTS(fs::is_directory(dir) && (fs::is_empty(dir) || fs::exists(dir / index_file_name)),
                    "save_checkpoint: refusing to replace ", dir, ": it is not a checkpoint directory");
#ifdef RENAME_EXCHANGE
    if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
      fsync_directory(parent);
      fs::remove_all(staging);  // now holds the previous checkpoint
      return;
    }
    TESSERA_EXPECTS(errno == EINVAL || errno == ENOSYS || errno == ENOTSUP, "save_checkpoint: exchanging ", staging,
                    " with ", dir, " failed: ", errno_text(errno));
#endif
    const fs::path old(dir.string() + ".old-" + unique_suffix());
    TESSERA_EXPECTS(::rename(dir.c_str(), old.c_str()) == 0, "save_checkpoint: renaming ", dir, " to ", old,
                    " failed: ", errno_text(errno));
    TESSERA_EXPECTS(::rename(staging.c_str(), dir.c_str()) == 0, "save_checkpoint: renaming ", staging, " to ", dir,
                    " failed: ", errno_text(errno), " (the previous checkpoint is at ", old, ")");
    fsync_directory(parent);
    fs::remove_all(old);
    return;
  }
  TESSERA_EXPECTS(::rename(staging.c_str(), dir.c_str()) == 0, "save_checkpoint: renaming ", staging, " to ", dir,
                  " failed: ", errno_text(errno));
  fsync_directory(parent);
}

/// Whether this rank writes a tensor of `layout`: a tp-sharded tensor from every tp rank, a
/// replicated one from tp rank 0 only; a full (non-flat) tensor from dp rank 0 only, a flat
/// ZeRO-1 piece from every dp rank (each holds another range).
inline bool writes(const Placement& where, const ParamLayout& layout, bool flat) {
  return (flat || where.coord.dp == 0) && (layout.is_shard() || where.coord.tp == 0);
}

/// Writes one rank file of `shards` (if this rank writes any) and returns its description for
/// the index, or null.
template <std::floating_point T>
nlohmann::ordered_json write_rank_file(const std::filesystem::path& staging, const std::string& file_name,
                                       const char* kind, const std::vector<TensorShard<T>>& shards,
                                       const Placement& where, const std::string& id, int rank,
                                       const SaveOptions& options) {
  SafetensorsWriter w;
  nlohmann::ordered_json geoms = nlohmann::ordered_json::object();
  nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
  for (const TensorShard<T>& s : shards) {
    const ShardGeometry g = geometry_of(s, where.coord.tp, where.shape.tp);
    if (!writes(where, s.layout, s.flat.has_value())) continue;
    const Tensor<T> v = s.value.contiguous();
    if (s.flat) {
      w.add(s.name, v.reshape(Shape{v.numel()}));
    } else {
      w.add(s.name, v);
    }
    geoms[s.name] = g.to_json();
    tensors.push_back({{"name", s.name},
                       {"dtype", std::string(name_of(safetensors_dtype_of<T>))},
                       {"geometry", g.to_json()}});
  }
  if (w.size() == 0) return nullptr;
  w.set_metadata("format", "pt");
  w.set_metadata("tessera.checkpoint_id", id);
  w.set_metadata("tessera.rank", std::to_string(rank));
  w.set_metadata("tessera.placement",
                 nlohmann::json{{"dp", where.coord.dp}, {"pp", where.coord.pp}, {"tp", where.coord.tp},
                                {"dp_size", where.shape.dp}, {"pp_size", where.shape.pp}, {"tp_size", where.shape.tp}}
                     .dump());
  w.set_metadata("tessera.shards", geoms.dump());
  const std::filesystem::path path = staging / file_name;
  const std::uint64_t bytes = w.write(path);
  if (options.on_file_written) options.on_file_written(path);
  return {{"name", file_name}, {"kind", kind}, {"bytes", bytes}, {"tensors", std::move(tensors)}};
}

/// Rank 0's index from every rank's description: checks that all ranks saved the same step,
/// configuration and optimizer step, that every tensor has one dtype and global shape, keeps
/// each tensor's pieces from the lowest pp stage that holds it (a tied weight on two stages is
/// saved once), and checks that the pieces cover the tensor exactly once.
inline nlohmann::ordered_json build_index(const std::vector<std::string>& descriptions, const CheckpointMeta& meta,
                                          const std::string& id, const MeshShape& layout) {
  struct PieceRef {
    std::string file;
    int rank, pp;
    nlohmann::json geometry;
  };
  struct Record {
    std::string kind, dtype;
    std::vector<std::int64_t> shape;
    int first_rank = 0;
    std::vector<PieceRef> pieces;
  };
  std::vector<std::string> order;
  std::map<std::string, Record> tensors;
  nlohmann::ordered_json files = nlohmann::ordered_json::object();
  std::vector<nlohmann::json> ds;
  for (const std::string& s : descriptions) ds.push_back(nlohmann::json::parse(s));
  const nlohmann::json& d0 = ds.at(0);
  for (const nlohmann::json& d : ds) {
    const int r = d.at("rank").get<int>();
    for (const char* field : {"step", "config", "has_optimizer", "optimizer_step"})
      TESSERA_EXPECTS(d.at(field) == d0.at(field), "save_checkpoint: rank ", r, " saves ", field, " ",
                      d.at(field).dump(), " but rank 0 saves ", d0.at(field).dump(),
                      " (every rank must save the same step, configuration and optimizer)");
    for (const nlohmann::json& f : d.at("files")) {
      const std::string fname = f.at("name").get<std::string>();
      files[fname] = {{"bytes", f.at("bytes")}, {"rank", r}, {"dp", d.at("dp")}, {"pp", d.at("pp")},
                      {"tp", d.at("tp")}};
      for (const nlohmann::json& t : f.at("tensors")) {
        const std::string name = t.at("name").get<std::string>();
        const auto shape = t.at("geometry").at("global_shape").get<std::vector<std::int64_t>>();
        auto [it, fresh] = tensors.try_emplace(name);
        Record& e = it->second;
        if (fresh) {
          order.push_back(name);
          e = Record{f.at("kind").get<std::string>(), t.at("dtype").get<std::string>(), shape, r, {}};
        } else {
          TESSERA_EXPECTS(e.kind == f.at("kind").get<std::string>(), "save_checkpoint: tensor '", name,
                          "' is a ", e.kind, " tensor on rank ", e.first_rank, " and a ",
                          f.at("kind").get<std::string>(), " tensor on rank ", r);
          TESSERA_EXPECTS(e.dtype == t.at("dtype").get<std::string>(), "save_checkpoint: tensor '", name, "' is ",
                          e.dtype, " on rank ", e.first_rank, " and ", t.at("dtype").get<std::string>(), " on rank ", r);
          TESSERA_EXPECTS(e.shape == shape, "save_checkpoint: tensor '", name, "' has global shape ",
                          shape_str(e.shape), " on rank ", e.first_rank, " and ", shape_str(shape), " on rank ", r);
        }
        e.pieces.push_back({fname, r, d.at("pp").get<int>(), t.at("geometry")});
      }
    }
  }
  nlohmann::ordered_json out_tensors = nlohmann::ordered_json::object();
  for (const std::string& name : order) {
    Record& e = tensors.at(name);
    int min_pp = e.pieces.front().pp;
    for (const PieceRef& p : e.pieces) min_pp = std::min(min_pp, p.pp);
    std::erase_if(e.pieces, [&](const PieceRef& p) { return p.pp != min_pp; });
    struct Owned {
      Run run;
      int rank;
    };
    std::vector<Owned> runs;
    for (const PieceRef& p : e.pieces)
      for (const Run& r : ShardGeometry::from_json(p.geometry, name).runs()) runs.push_back({r, p.rank});
    std::sort(runs.begin(), runs.end(), [](const Owned& a, const Owned& b) { return a.run.global < b.run.global; });
    std::int64_t numel = 1;
    for (std::int64_t x : e.shape) numel *= x;
    std::int64_t at = 0;
    int at_rank = -1;
    for (const Owned& o : runs) {
      TESSERA_EXPECTS(o.run.global >= at, "save_checkpoint: tensor '", name, "': elements [", o.run.global, ", ",
                      std::min(at, o.run.global + o.run.length), ") are saved by both rank ", at_rank, " and rank ",
                      o.rank, " (their layouts overlap)");
      TESSERA_EXPECTS(o.run.global == at, "save_checkpoint: tensor '", name, "': elements [", at, ", ", o.run.global,
                      ") of its ", numel, " are saved by no rank");
      at = o.run.global + o.run.length;
      at_rank = o.rank;
    }
    TESSERA_EXPECTS(at == numel, "save_checkpoint: tensor '", name, "': elements [", at, ", ", numel, ") of its ",
                    numel, " are saved by no rank");
    nlohmann::ordered_json pieces = nlohmann::ordered_json::array();
    for (const PieceRef& p : e.pieces)
      pieces.push_back({{"file", p.file}, {"rank", p.rank}, {"pp", p.pp}, {"geometry", p.geometry}});
    out_tensors[name] = {{"kind", e.kind}, {"dtype", e.dtype}, {"shape", e.shape}, {"pieces", std::move(pieces)}};
  }
  nlohmann::ordered_json index = nlohmann::ordered_json::object();
  index["format"] = std::string(index_format);
  index["version"] = format_version;
  index["id"] = id;
  index["step"] = meta.step;
  index["config"] = nlohmann::ordered_json::parse(meta.config.dump());
  index["extra"] = nlohmann::ordered_json::parse(meta.extra.dump());
  index["layout"] = {{"dp", layout.dp}, {"pp", layout.pp}, {"tp", layout.tp}};
  index["optimizer"] = d0.at("has_optimizer").get<bool>()
                           ? nlohmann::ordered_json{{"step", d0.at("optimizer_step")}}
                           : nlohmann::ordered_json(nullptr);
  index["files"] = std::move(files);
  index["tensors"] = std::move(out_tensors);
  return index;
}

/// A checkpoint id unique across saves: time and random bits.
inline std::string new_checkpoint_id() {
  std::random_device rd;
  const auto t = std::chrono::system_clock::now().time_since_epoch().count();
  char buf[64];
  std::snprintf(buf, sizeof buf, "%016llx-%08x", static_cast<unsigned long long>(t), rd());
  return buf;
}

}  // namespace detail

/// Saves a sharded checkpoint of `params` (and `optimizer`'s state, unless null) into
/// directory `dir`, replacing the checkpoint there, if any, atomically.
///
/// Collective over `world`: every rank calls it, with its own parameters (this pp stage's,
/// as they are on this rank: tp shards with their layouts), its placement on the mesh, and the
/// same `meta` (CASES C10: decide to save from values every rank shares, e.g.
/// Comm::all_reduce_value). A rank that fails makes every rank throw (its own error, or
/// tessera::Error naming the failing rank and its message); no rank is left waiting.
///
/// What is written: for each world rank that holds something to save,
/// "model-rank%05d.safetensors" and "optim-rank%05d.safetensors" (see `detail::writes`: tp
/// shards from every tp rank, replicated tensors from tp rank 0; full tensors from dp rank 0,
/// ZeRO-1 flat pieces from every dp rank), each tensor's global shape and slice in the file's
/// metadata ("tessera.shards") and its CRC-32; then index.json (format, version, id, step,
/// config, extra, layout, optimizer step, and per tensor its kind, dtype, global shape and
/// pieces). A tensor held by several pp stages (a tied embedding) is saved from the lowest.
///
/// Atomic: files are written (temporary file, fsync, rename) into "<dir>.tmp-<pid>-<n>"; after
/// every rank succeeded, rank 0 writes the index, fsyncs and swaps the directory into place. A
/// directory without a complete index.json is no checkpoint, so a save killed at any point
/// leaves the previous one loadable; the next save removes what it left.
///
/// Throws tessera::Error (on every rank) when the placement does not match the world, a shard
/// does not fit its layout, ranks disagree on step, config or a tensor's shape or dtype,
/// layouts overlap or leave elements unsaved (naming the tensor and the ranks), `dir` exists
/// and is not a checkpoint directory, or a file cannot be written.
template <std::floating_point T>
void save_checkpoint(const std::filesystem::path& dir_given, Comm world, const Placement& where,
                     const ParameterList<T>& params, const OptimizerState<T>* optimizer, const CheckpointMeta& meta,
                     const SaveOptions& options = {}) {
  namespace fs = std::filesystem;
  const fs::path dir = dir_given.has_filename() ? dir_given : dir_given.parent_path();  // "ckpt/" -> "ckpt"
  const int rank = world.rank();
  const std::string what = tessera::detail::str("save_checkpoint(", dir.string(), ")");
  std::exception_ptr err;
  fs::path staging;
  std::string id;
  try {
    TESSERA_EXPECTS(where.shape.world_size() == world.size(), what, ": placement dp(", where.shape.dp, ") x pp(",
                    where.shape.pp, ") x tp(", where.shape.tp, ") does not match the world of ", world.size(),
                    " ranks");
    TESSERA_EXPECTS(where.coord.dp >= 0 && where.coord.dp < where.shape.dp && where.coord.pp >= 0 &&
                        where.coord.pp < where.shape.pp && where.coord.tp >= 0 && where.coord.tp < where.shape.tp,
                    what, ": coordinate (dp=", where.coord.dp, ", pp=", where.coord.pp, ", tp=", where.coord.tp,
                    ") of rank ", rank, " is outside the mesh");
    TESSERA_EXPECTS(!dir.filename().empty(), what, ": no directory name");
    if (rank == 0) {
      const fs::path parent = dir.has_parent_path() ? dir.parent_path() : fs::path(".");
      fs::create_directories(parent);
      detail::remove_stale_siblings(dir);
      staging = detail::staging_dir_for(dir);
      fs::create_directory(staging);
      id = detail::new_checkpoint_id();
    }
  } catch (...) {
    err = std::current_exception();
  }
  try {
    detail::agree(world, err, what, detail::Blame::shared);
  } catch (...) {
    if (rank == 0 && !staging.empty()) {
      std::error_code ec;
      fs::remove_all(staging, ec);
    }
    throw;
  }
  {
    const auto shared = detail::all_gather_strings(world, rank == 0 ? staging.string() + "\n" + id : std::string());
    const std::string& s = shared.at(0);
    staging = s.substr(0, s.find('\n'));
    id = s.substr(s.find('\n') + 1);
  }
  auto cleanup_on_rank0 = [&] {
    if (rank == 0) {
      std::error_code ec;
      fs::remove_all(staging, ec);
    }
  };

  nlohmann::ordered_json desc = {{"rank", rank},
                                 {"dp", where.coord.dp},
                                 {"pp", where.coord.pp},
                                 {"tp", where.coord.tp},
                                 {"step", meta.step},
                                 {"config", nlohmann::ordered_json::parse(meta.config.dump())},
                                 {"has_optimizer", optimizer != nullptr},
                                 {"optimizer_step", optimizer ? optimizer->step : 0},
                                 {"files", nlohmann::ordered_json::array()}};
  try {
    std::set<std::string> names;
    std::vector<TensorShard<T>> model;
    for (const Parameter<T>& p : params) {
      TESSERA_EXPECTS(names.insert(p.name).second, what, ": parameter '", p.name, "' appears twice on rank ", rank);
      model.push_back({p.name, p.value, p.layout, std::nullopt});
    }
    if (optimizer)
      for (const TensorShard<T>& s : optimizer->tensors)
        TESSERA_EXPECTS(names.insert(s.name).second, what, ": tensor '", s.name, "' appears twice on rank ", rank);
    const auto m = detail::write_rank_file(staging, model_file_name(rank), "model", model, where, id, rank, options);
    if (!m.is_null()) desc["files"].push_back(m);
    if (optimizer) {
      const auto o = detail::write_rank_file(staging, optim_file_name(rank), "optimizer", optimizer->tensors, where, id,
                                             rank, options);
      if (!o.is_null()) desc["files"].push_back(o);
    }
  } catch (...) {
    err = std::current_exception();
  }
  try {
    detail::agree(world, err, what, detail::Blame::shared);
  } catch (...) {
    cleanup_on_rank0();
    throw;
  }

  const std::vector<std::string> all = detail::all_gather_strings(world, desc.dump());
  if (rank == 0) {
    try {
      const nlohmann::ordered_json index = detail::build_index(all, meta, id, where.shape);
      AtomicFile f(staging / index_file_name);
      const std::string text = index.dump(1);
      f.write(std::as_bytes(std::span<const char>(text.data(), text.size())));
      f.commit();
      if (options.on_file_written) options.on_file_written(staging / index_file_name);
      detail::publish(staging, dir);
    } catch (...) {
      err = std::current_exception();
      cleanup_on_rank0();
    }
  }
  detail::agree(world, err, what, detail::Blame::shared);
}

/// save_checkpoint on `mesh`'s world with this rank's placement on it. Collective over the
/// mesh's world; see the main overload.
template <std::floating_point T>
void save_checkpoint(const std::filesystem::path& dir, Mesh& mesh, const ParameterList<T>& params,
                     const OptimizerState<T>* optimizer, const CheckpointMeta& meta, const SaveOptions& options = {}) {
  save_checkpoint(dir, mesh.world(), Placement::of(mesh), params, optimizer, meta, options);
}

}  // namespace tessera::checkpoint
