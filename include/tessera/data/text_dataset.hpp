#pragma once
/// @file
/// TextDataset: a text file as byte-level tokens, split deterministically into train and
/// validation, sampled into (B, T) batches of which each data-parallel rank takes its own rows.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::data {

/// Byte-level tokenizer: token id = byte value (vocab 256), as GPT-2's byte fallback without
/// merges. Encoding never fails; decoding maps each id back to its byte.
struct ByteTokenizer {
  /// Number of distinct tokens.
  static constexpr std::int64_t vocab_size = 256;
  /// One token per byte of `text`.
  static std::vector<std::int32_t> encode(const std::string& text) {
    std::vector<std::int32_t> ids(text.size());
    std::transform(text.begin(), text.end(), ids.begin(),
                   [](char c) { return static_cast<std::int32_t>(static_cast<unsigned char>(c)); });
    return ids;
  }
  /// The bytes of `ids`. Throws Error naming the id if one is outside [0, 256).
  static std::string decode(const std::vector<std::int32_t>& ids) {
    std::string s;
    s.reserve(ids.size());
    for (std::int32_t id : ids) {
      TESSERA_EXPECTS(id >= 0 && id < 256, "ByteTokenizer: token id ", id, " is outside [0, 256)");
      s.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    }
    return s;
  }
};

/// Which part of the corpus.
enum class Split { train, val };

/// A batch: inputs (B, T) and next-token targets (B, T), int32.
struct Batch {
  Tensor<std::int32_t> inputs;   ///< (B, T) token ids
  Tensor<std::int32_t> targets;  ///< (B, T) the ids one position later
};

/// A tokenized corpus split into train (the first `1 - val_fraction` of the tokens) and
/// validation (the rest). Batches are drawn at positions that depend only on (seed, step,
/// split, row of the global batch), so every layout of ranks sees the same global batch and a
/// data-parallel rank reads only its own rows: rank r of dp takes rows [r B/dp, (r+1) B/dp).
class TextDataset {
 public:
  /// Reads and tokenizes `path`. Throws Error naming the file if it does not exist, is not a
  /// regular file (a directory, a FIFO), cannot be read to its end, or is too short for one
  /// sequence of `context + 1` tokens in each split. Any bytes are valid text.
  TextDataset(const std::string& path, std::int64_t context, double val_fraction = 0.1)
      : context_(context) {
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    TESSERA_EXPECTS(std::filesystem::exists(status), "TextDataset: \"", path, "\" does not exist");
    TESSERA_EXPECTS(std::filesystem::is_regular_file(status), "TextDataset: \"", path, "\" is not a regular file (",
                    std::filesystem::is_directory(status) ? "a directory" : "a device, FIFO or socket", ")");
    std::ifstream in(path, std::ios::binary);
    TESSERA_EXPECTS(in.good(), "TextDataset: cannot open \"", path, "\"");
    const std::uintmax_t bytes = std::filesystem::file_size(path, ec);
    TESSERA_EXPECTS(!ec, "TextDataset: cannot read the size of \"", path, "\": ", ec.message());
    std::string text(static_cast<std::size_t>(bytes), '\0');
    in.read(text.data(), static_cast<std::streamsize>(bytes));
    TESSERA_EXPECTS(static_cast<std::uintmax_t>(in.gcount()) == bytes, "TextDataset: read ", in.gcount(), " of the ",
                    bytes, " bytes of \"", path, "\" (the file changed or a read failed)");
    init(ByteTokenizer::encode(text), val_fraction, path);
  }
  /// A dataset over given tokens (for tests).
  TextDataset(std::vector<std::int32_t> tokens, std::int64_t context, double val_fraction = 0.1)
      : context_(context) {
    init(std::move(tokens), val_fraction, "<tokens>");
  }

  /// Tokens in the train / validation part.
  std::int64_t size(Split s) const { return static_cast<std::int64_t>(part(s).size()); }
  /// Sequence length of the batches.
  std::int64_t context() const noexcept { return context_; }

  /// Rows [row_begin, row_end) of the global batch of `global_batch` rows for `step`: the
  /// slice a data-parallel rank (or a micro-batch) reads. Throws Error on an empty or
  /// out-of-range row range.
  Batch batch(Split s, std::uint64_t seed, std::int64_t step, std::int64_t global_batch, std::int64_t row_begin,
              std::int64_t row_end) const {
    TESSERA_EXPECTS(0 <= row_begin && row_begin < row_end && row_end <= global_batch, "TextDataset: rows [",
                    row_begin, ", ", row_end, ") are not inside a global batch of ", global_batch);
    const auto& toks = part(s);
    const std::int64_t rows = row_end - row_begin, T = context_;
    Batch b{Tensor<std::int32_t>(Shape{rows, T}), Tensor<std::int32_t>(Shape{rows, T})};
    const std::uint64_t span = static_cast<std::uint64_t>(static_cast<std::int64_t>(toks.size()) - T - 1 + 1);
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::uint64_t key = static_cast<std::uint64_t>(step) * static_cast<std::uint64_t>(global_batch) +
                                static_cast<std::uint64_t>(row_begin + r);
      const std::uint64_t h = mix(seed ^ (s == Split::train ? 0x7472u : 0x76616cu), key);
      const auto start = static_cast<std::int64_t>(h % span);
      for (std::int64_t t = 0; t < T; ++t) {
        b.inputs.data()[r * T + t] = toks[static_cast<std::size_t>(start + t)];
        b.targets.data()[r * T + t] = toks[static_cast<std::size_t>(start + t + 1)];
      }
    }
    return b;
  }

 private:
  static std::uint64_t mix(std::uint64_t a, std::uint64_t b) {
    std::uint64_t z = a + 0x9E3779B97F4A7C15ull * (b + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  void init(std::vector<std::int32_t> tokens, double val_fraction, const std::string& what) {
    TESSERA_EXPECTS(context_ >= 1, "TextDataset: context must be >= 1, got ", context_);
    TESSERA_EXPECTS(val_fraction > 0 && val_fraction < 1, "TextDataset: val_fraction must be in (0, 1), got ",
                    val_fraction);
    const auto n = static_cast<std::int64_t>(tokens.size());
    const auto n_val = static_cast<std::int64_t>(static_cast<double>(n) * val_fraction);
    TESSERA_EXPECTS(n - n_val > context_ && n_val > context_, "TextDataset: ", what, " has ", n,
                    " tokens; each split needs more than context = ", context_, " (train ", n - n_val, ", val ",
                    n_val, ")");
    val_.assign(tokens.end() - n_val, tokens.end());
    tokens.resize(static_cast<std::size_t>(n - n_val));
    train_ = std::move(tokens);
  }
  const std::vector<std::int32_t>& part(Split s) const { return s == Split::train ? train_ : val_; }

  std::int64_t context_;
  std::vector<std::int32_t> train_, val_;
};

}  // namespace tessera::data
