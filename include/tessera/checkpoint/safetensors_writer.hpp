#pragma once
/// @file
/// SafetensorsWriter: writes tensors into one safetensors file, atomically, with a CRC-32 of
/// every tensor in the metadata.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/checkpoint/atomic_file.hpp"
#include "tessera/checkpoint/crc32.hpp"
#include "tessera/checkpoint/safetensors_dtype.hpp"
#include "tessera/checkpoint/safetensors_file.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::checkpoint {

/// Collects tensors and metadata, then `write`s them as one safetensors file: 8-byte
/// little-endian header length, the JSON header padded with spaces to a multiple of 8 bytes,
/// then the tensors' bytes in the order they were added. Python's `safetensors` and Hugging
/// Face's loaders read the result. `__metadata__` holds the caller's strings plus
/// `crc32_metadata_key` (every tensor's CRC-32), which SafetensorsFile checks on read.
///
/// Tensors are kept as handles (no copy of contiguous tensors) or produced on demand at write
/// time (`add_deferred`), so a file far larger than memory's spare room can be written one
/// tensor at a time.
class SafetensorsWriter {
 public:
  /// Receives a tensor's bytes, in pieces, in order.
  using ByteSink = std::function<void(std::span<const std::byte>)>;

  /// Sets the metadata string `key` (any key but tessera's `crc32_metadata_key`). Hugging
  /// Face's loaders expect {"format": "pt"}. Throws tessera::Error for the reserved key.
  void set_metadata(std::string key, std::string value) {
    TESSERA_EXPECTS(key != crc32_metadata_key, "SafetensorsWriter: metadata key '", key, "' is reserved");
    metadata_[std::move(key)] = std::move(value);
  }

  /// Adds `t` under `name` (stored as F32, F64, I32 or I64 after T). The tensor is read when
  /// `write` runs. Throws tessera::Error for a duplicate or empty name or "__metadata__".
  template <TensorScalar T>
  void add(std::string name, const Tensor<T>& t) {
    const Tensor<T> c = t.contiguous();
    std::vector<std::int64_t> shape(static_cast<std::size_t>(c.rank()));
    for (int d = 0; d < c.rank(); ++d) shape[static_cast<std::size_t>(d)] = c.size(d);
    add_entry(std::move(name), safetensors_dtype_of<T>, std::move(shape), [c](const ByteSink& sink) {
      sink(std::as_bytes(std::span<const T>(c.data(), static_cast<std::size_t>(c.numel()))));
    });
  }

  /// Adds a tensor of `shape` under `name` whose values `make()` returns when `write` reaches
  /// it (then it is released). Throws tessera::Error as `add`; `write` throws naming the
  /// tensor when `make()` returns another shape.
  template <TensorScalar T>
  void add_deferred(std::string name, const Shape& shape, std::function<Tensor<T>()> make) {
    std::vector<std::int64_t> dims(static_cast<std::size_t>(shape.rank()));
    for (int d = 0; d < shape.rank(); ++d) dims[static_cast<std::size_t>(d)] = shape[d];
    add_entry(name, safetensors_dtype_of<T>, std::move(dims),
              [name, shape, make = std::move(make)](const ByteSink& sink) {
                const Tensor<T> t = make().contiguous();
                TESSERA_EXPECTS(t.shape() == shape, "SafetensorsWriter: tensor '", name, "' was declared ", shape,
                                " but produced ", t.shape());
                sink(std::as_bytes(std::span<const T>(t.data(), static_cast<std::size_t>(t.numel()))));
              });
  }

  /// Number of tensors added.
  std::size_t size() const noexcept { return entries_.size(); }

  /// Writes the file at `path` atomically (AtomicFile: temporary file, fsync, rename, fsync of
  /// the directory) and returns its size in bytes. Throws tessera::Error naming the file on an
  /// I/O failure, or whatever a deferred tensor's producer throws; the previous file at `path`
  /// is then untouched.
  std::uint64_t write(const std::filesystem::path& path) const {
    std::vector<std::uint32_t> crcs(entries_.size(), 0);
    const std::string placeholder = header(crcs);
    AtomicFile f(path);
    const std::uint64_t n = placeholder.size();
    f.write(std::as_bytes(std::span<const std::uint64_t>(&n, 1)));
    f.write(std::as_bytes(std::span<const char>(placeholder.data(), placeholder.size())));
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = entries_[i];
      std::uint64_t written = 0;
      std::uint32_t crc = 0;
      e.produce([&](std::span<const std::byte> b) {
        f.write(b);
        crc = crc32(b, crc);
        written += b.size();
      });
      TESSERA_EXPECTS(written == e.bytes, "SafetensorsWriter: tensor '", e.name, "' produced ", written,
                      " bytes, expected ", e.bytes);
      crcs[i] = crc;
    }
    const std::string final_header = header(crcs);
    TESSERA_EXPECTS(final_header.size() == placeholder.size(), "SafetensorsWriter: header size changed");
    f.write_at(std::as_bytes(std::span<const char>(final_header.data(), final_header.size())), 8);
    f.commit();
    return f.size();
  }

 private:
  struct Entry {
    std::string name;
    SafetensorsDType dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t begin = 0, bytes = 0;
    std::function<void(const ByteSink&)> produce;
  };

  void add_entry(std::string name, SafetensorsDType dtype, std::vector<std::int64_t> shape,
                 std::function<void(const ByteSink&)> produce) {
    TESSERA_EXPECTS(!name.empty() && name != "__metadata__", "SafetensorsWriter: invalid tensor name '", name, "'");
    TESSERA_EXPECTS(names_.insert(name).second, "SafetensorsWriter: tensor '", name, "' added twice");
    std::uint64_t numel = 1;
    for (std::int64_t d : shape) numel *= static_cast<std::uint64_t>(d);
    Entry e{std::move(name), dtype, std::move(shape), data_size_, numel * size_of(dtype), std::move(produce)};
    data_size_ += e.bytes;
    entries_.push_back(std::move(e));
  }

  std::string header(const std::vector<std::uint32_t>& crcs) const {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata_) meta[k] = v;
    nlohmann::ordered_json crc_map = nlohmann::ordered_json::object();
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      char buf[16];
      std::snprintf(buf, sizeof buf, "%08x", crcs[i]);  // fixed width: the header keeps its size
      crc_map[entries_[i].name] = buf;
    }
    meta[std::string(crc32_metadata_key)] = crc_map.dump();
    h["__metadata__"] = std::move(meta);
    for (const Entry& e : entries_)
      h[e.name] = {{"dtype", std::string(name_of(e.dtype))}, {"shape", e.shape}, {"data_offsets", {e.begin, e.begin + e.bytes}}};
    std::string s = h.dump();
    s.append((8 - s.size() % 8) % 8, ' ');
    return s;
  }

  std::map<std::string, std::string> metadata_;
  std::vector<Entry> entries_;
  std::set<std::string> names_;
  std::uint64_t data_size_ = 0;
};

}  // namespace tessera::checkpoint
