#pragma once
/// @file
/// SafetensorsFile: a validated, memory-mapped, read-only safetensors file (the format of
/// Hugging Face, https://github.com/huggingface/safetensors): an 8-byte little-endian header
/// length N, N bytes of JSON {"__metadata__": {string: string}, name: {"dtype", "shape",
/// "data_offsets": [begin, end]}, ...}, then the tensors' bytes (offsets relative to the data).

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/checkpoint/atomic_file.hpp"
#include "tessera/checkpoint/crc32.hpp"
#include "tessera/checkpoint/detail/json_input.hpp"
#include "tessera/checkpoint/safetensors_dtype.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::checkpoint {

/// The key in `__metadata__` under which tessera stores each tensor's CRC-32 (a JSON object
/// {name: "8 hex digits"}, as a string, since metadata values are strings).
inline constexpr std::string_view crc32_metadata_key = "tessera.crc32";

/// One tensor's entry in a safetensors header.
struct TensorInfo {
  std::string name;                 ///< its name, e.g. "h.0.attn.c_attn.weight"
  SafetensorsDType dtype{};         ///< stored element type
  std::vector<std::int64_t> shape;  ///< extents (any rank)
  std::uint64_t begin = 0;          ///< first byte, relative to the data section
  std::uint64_t end = 0;            ///< one past the last byte
  /// Product of the extents.
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
};

/// Prints a shape vector as "(2, 3)", the form of tessera's shape errors.
inline std::string shape_str(std::span<const std::int64_t> s) {
  std::string out = "(";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

/// A safetensors file opened read-only and memory-mapped, with its header validated: header
/// length within the file, valid JSON, known dtypes, shapes of non-negative extents, data
/// offsets that match shape x dtype size, tensors that tile the data section exactly (no
/// overlap, no hole, no missing or trailing byte). Move-only.
///
/// Tensors are read with `read<T>` (converted to T) or copied piecewise through `bytes`. When
/// the file carries tessera's CRC-32s (`crc32_metadata_key`), `verify` and `read` check them.
class SafetensorsFile {
 public:
  /// Opens and validates `path`. Throws tessera::Error naming the file, the tensor and the
  /// numbers for every defect listed in the class comment (e.g. "tensor 'wte.weight' ends at
  /// byte 1024 of the data but the file holds 1000 bytes of data: the file is truncated").
  explicit SafetensorsFile(std::filesystem::path path) : path_(std::move(path)) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    TESSERA_EXPECTS(fd >= 0, "safetensors: cannot open ", path_, ": ", detail::errno_text(errno));
    struct ::stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw Error(tessera::detail::str("safetensors: cannot stat ", path_, ": ", detail::errno_text(err)));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw Error(tessera::detail::str("safetensors: ", path_, " is not a regular file (",
                                       S_ISDIR(st.st_mode) ? "a directory" : "a device, FIFO or socket", ")"));
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);
      TESSERA_EXPECTS(p != MAP_FAILED, "safetensors: cannot map ", path_, " (", size_, " bytes): ",
                      detail::errno_text(err));
      base_ = static_cast<const std::byte*>(p);
    } else {
      ::close(fd);
    }
    try {
      parse_header();
    } catch (...) {
      unmap();
      throw;
    }
  }
  SafetensorsFile(const SafetensorsFile&) = delete;             ///< owns a mapping
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;  ///< owns a mapping
  /// Takes over the mapping.
  SafetensorsFile(SafetensorsFile&& o) noexcept
      : path_(std::move(o.path_)), base_(std::exchange(o.base_, nullptr)), size_(std::exchange(o.size_, 0)),
        data_offset_(o.data_offset_), metadata_(std::move(o.metadata_)), tensors_(std::move(o.tensors_)),
        by_name_(std::move(o.by_name_)), crc_(std::move(o.crc_)), verified_(std::move(o.verified_)) {}
  SafetensorsFile& operator=(SafetensorsFile&&) = delete;  ///< not needed
  /// Unmaps the file.
  ~SafetensorsFile() { unmap(); }

  /// The file's path.
  const std::filesystem::path& path() const noexcept { return path_; }
  /// The file's size in bytes.
  std::uint64_t file_size() const noexcept { return size_; }
  /// The `__metadata__` strings (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// The tensors, in the order of their data.
  const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
  /// The tensor named `name`, or null.
  const TensorInfo* find(std::string_view name) const {
    const auto it = by_name_.find(std::string(name));
    return it == by_name_.end() ? nullptr : &tensors_[it->second];
  }
  /// The tensor named `name`. Throws tessera::Error naming it and the file when absent.
  const TensorInfo& at(std::string_view name) const {
    const TensorInfo* t = find(name);
    TESSERA_EXPECTS(t != nullptr, "safetensors: tensor '", name, "' is not in ", path_, " (", tensors_.size(),
                    " tensors)");
    return *t;
  }
  /// The stored bytes of `t` (a tensor of this file), little-endian, any alignment.
  std::span<const std::byte> bytes(const TensorInfo& t) const noexcept {
    return {base_ + data_offset_ + t.begin, static_cast<std::size_t>(t.end - t.begin)};
  }
  /// Whether the file records a CRC-32 for `t`.
  bool has_crc32(const TensorInfo& t) const { return crc_.count(t.name) != 0; }
  /// Checks `t`'s bytes against the CRC-32 recorded in the metadata (once per tensor; a no-op
  /// for files without tessera's CRCs, such as Hugging Face's). Throws tessera::Error naming
  /// the tensor, the file and both checksums on a mismatch. Thread-safe.
  void verify(const TensorInfo& t) const {
    const auto it = crc_.find(t.name);
    if (it == crc_.end()) return;
    {
      std::lock_guard lk(verified_mu_);
      if (verified_.count(t.name)) return;
    }
    const std::uint32_t got = crc32(bytes(t));
    TESSERA_EXPECTS(got == it->second, "safetensors: tensor '", t.name, "' in ", path_,
                    " is corrupted: its bytes have CRC-32 ", hex(got), " but the file records ", hex(it->second));
    std::lock_guard lk(verified_mu_);
    verified_.insert(t.name);
  }

  /// The whole tensor `name` as a Tensor<T> (converted from the stored dtype; a float dtype
  /// into a float T, an integer dtype into an integer T), its CRC verified. Throws
  /// tessera::Error naming the tensor when it is absent, has rank above 4, or is of an integer
  /// dtype for a float T or vice versa.
  template <TensorScalar T>
  Tensor<T> read(std::string_view name) const {
    const TensorInfo& t = at(name);
    TESSERA_EXPECTS(t.shape.size() <= static_cast<std::size_t>(max_rank), "safetensors: tensor '", name, "' in ",
                    path_, " has rank ", t.shape.size(), " above ", max_rank);
    TESSERA_EXPECTS(is_floating(t.dtype) == std::floating_point<T>, "safetensors: tensor '", name, "' in ", path_,
                    " holds ", name_of(t.dtype), ", which does not convert to ", name_of(safetensors_dtype_of<T>));
    verify(t);
    Index dims{};
    for (std::size_t d = 0; d < t.shape.size(); ++d) dims[d] = t.shape[d];
    Tensor<T> out = Tensor<T>::empty(Shape::from(dims, static_cast<int>(t.shape.size())));
    if (out.numel() > 0)
      tessera::checkpoint::detail::convert_elements(bytes(t).data(), t.dtype, out.data(),
                                                    static_cast<std::size_t>(out.numel()));
    return out;
  }

  /// "0x1a2b3c4d".
  static std::string hex(std::uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
  }

 private:
  void unmap() noexcept {
    if (base_ != nullptr) ::munmap(const_cast<std::byte*>(base_), size_);
    base_ = nullptr;
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(tessera::detail::str("safetensors: ", path_, ": ", what));
  }

  void parse_header() {
    if (size_ < 8) fail(tessera::detail::str("the file has ", size_, " bytes, fewer than the 8-byte header length"));
    std::uint64_t n = 0;
    std::memcpy(&n, base_, 8);
    if (n > size_ - 8)
      fail(tessera::detail::str("header length ", n, " exceeds the ", size_ - 8,
                                " bytes after the length field: the file is truncated or not safetensors"));
    data_offset_ = 8 + n;
    const std::uint64_t data_size = size_ - data_offset_;
    const nlohmann::json h = detail::parse_json<nlohmann::json>(
        std::string_view(reinterpret_cast<const char*>(base_ + 8), static_cast<std::size_t>(n)),
        tessera::detail::str("safetensors: ", path_, ": the ", n, "-byte header"));
    if (!h.is_object()) fail("the header is not a JSON object");
    for (auto it = h.begin(); it != h.end(); ++it) {
      if (it.key() == "__metadata__") {
        if (!it->is_object()) fail("__metadata__ is not a JSON object");
        for (auto m = it->begin(); m != it->end(); ++m) {
          if (!m->is_string()) fail(tessera::detail::str("__metadata__ value of '", m.key(), "' is not a string"));
          metadata_[m.key()] = m->get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_entry(it.key(), *it));
    }
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t at = 0;
    const TensorInfo* prev = nullptr;
    for (const TensorInfo& t : tensors_) {
      if (t.begin < at)
        fail(tessera::detail::str("tensors '", prev->name, "' (bytes [", prev->begin, ", ", prev->end, ")) and '",
                                  t.name, "' (bytes [", t.begin, ", ", t.end, ")) overlap"));
      if (t.begin > at)
        fail(tessera::detail::str("bytes [", at, ", ", t.begin, ") of the data before tensor '", t.name,
                                  "' belong to no tensor"));
      if (t.end > data_size)
        fail(tessera::detail::str("tensor '", t.name, "' ends at byte ", t.end, " of the data but the file holds ",
                                  data_size, " bytes of data: the file is truncated"));
      at = t.end;
      prev = &t;
    }
    if (at != data_size)
      fail(tessera::detail::str(data_size - at, " bytes after the last tensor",
                                prev ? tessera::detail::str(" '", prev->name, "'") : std::string(),
                                " belong to no tensor (data section of ", data_size, " bytes, tensors end at ", at,
                                ")"));
    for (std::size_t i = 0; i < tensors_.size(); ++i) by_name_[tensors_[i].name] = i;
    if (const auto it = metadata_.find(std::string(crc32_metadata_key)); it != metadata_.end()) {
      const nlohmann::json crcs = detail::parse_json<nlohmann::json>(
          it->second, tessera::detail::str("safetensors: ", path_, ": metadata '", crc32_metadata_key, "'"));
      if (!crcs.is_object()) fail(tessera::detail::str("metadata '", crc32_metadata_key, "' is not a JSON object"));
      for (auto c = crcs.begin(); c != crcs.end(); ++c) {
        if (!by_name_.count(c.key()))
          fail(tessera::detail::str("metadata '", crc32_metadata_key, "' names tensor '", c.key(),
                                    "', which the file does not hold"));
        const std::string s = c->is_string() ? c->get<std::string>() : std::string();
        char* end = nullptr;
        const unsigned long v = std::strtoul(s.c_str(), &end, 16);
        if (s.empty() || end != s.c_str() + s.size() || v > 0xFFFFFFFFUL)
          fail(tessera::detail::str("CRC-32 of tensor '", c.key(), "' is not 8 hex digits: ", detail::brief(*c)));
        crc_[c.key()] = static_cast<std::uint32_t>(v);
      }
    }
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& e) const {
    auto bad = [&](const std::string& what) { fail(tessera::detail::str("tensor '", name, "': ", what)); };
    if (!e.is_object()) bad("its entry is not a JSON object");
    TensorInfo t;
    t.name = name;
    const auto dt = e.find("dtype");
    if (dt == e.end() || !dt->is_string()) bad("no \"dtype\" string");
    const auto parsed = parse_safetensors_dtype(dt->get<std::string>());
    if (!parsed) bad(tessera::detail::str("dtype ", detail::brief(*dt), " is not one of F16, BF16, F32, F64, I32, I64"));
    t.dtype = *parsed;
    const auto sh = e.find("shape");
    if (sh == e.end() || !sh->is_array()) bad("no \"shape\" array");
    constexpr auto max_extent = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    std::uint64_t numel = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned() || d.get<std::uint64_t>() > max_extent)
        bad(tessera::detail::str("shape ", detail::brief(*sh), " has an extent that is not a non-negative integer"));
      const std::uint64_t x = d.get<std::uint64_t>();
      if (x != 0 && numel > max_extent / x) bad(tessera::detail::str("shape ", detail::brief(*sh), " overflows"));
      numel *= x;
      t.shape.push_back(static_cast<std::int64_t>(x));
    }
    const auto off = e.find("data_offsets");
    if (off == e.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      bad("\"data_offsets\" is not [begin, end] of non-negative integers");
    t.begin = (*off)[0].get<std::uint64_t>();
    t.end = (*off)[1].get<std::uint64_t>();
    if (t.end < t.begin) bad(tessera::detail::str("data_offsets [", t.begin, ", ", t.end, "] end before they begin"));
    if (numel > max_extent / size_of(t.dtype)) bad("byte size overflows");
    const std::uint64_t want = numel * size_of(t.dtype);
    if (t.end - t.begin != want)
      bad(tessera::detail::str("shape ", shape_str(t.shape), " of ", name_of(t.dtype), " needs ", want,
                               " bytes but data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin));
    return t;
  }

  std::filesystem::path path_;
  const std::byte* base_ = nullptr;
  std::uint64_t size_ = 0;
  std::uint64_t data_offset_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> by_name_;
  std::map<std::string, std::uint32_t> crc_;
  mutable std::mutex verified_mu_;
  mutable std::set<std::string> verified_;
};

}  // namespace tessera::checkpoint
