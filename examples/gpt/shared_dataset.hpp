#pragma once
// The training text, one copy per process: train_gpt's thread ranks share it. (Each rank's own
// copy held 4 bytes per byte of text: 17 MB per rank for the KJV, so 4096 thread ranks needed
// 70 GB and the kernel killed the process without a message.)
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "tessera/data/text_dataset.hpp"

namespace train_gpt {

// The dataset of `path` at `context`, read once per process while any rank holds it (the
// first caller reads it; a read error throws tessera::Error on every caller, as
// data::TextDataset's constructor does). Thread-safe; TextDataset's batches are const reads.
inline std::shared_ptr<const tessera::data::TextDataset> shared_dataset(const std::string& path, std::int64_t context) {
  static std::mutex mu;
  static std::weak_ptr<const tessera::data::TextDataset> cached;
  static std::pair<std::string, std::int64_t> key;
  std::lock_guard<std::mutex> lock(mu);
  if (auto held = cached.lock(); held && key == std::pair{path, context}) return held;
  auto made = std::make_shared<const tessera::data::TextDataset>(path, context);
  cached = made;
  key = {path, context};
  return made;
}

}  // namespace train_gpt
