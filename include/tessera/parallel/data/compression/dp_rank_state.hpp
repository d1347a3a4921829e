#pragma once
/// @file
/// DpRankState: the state a dp rank keeps for itself in compressed or infrequently
/// synchronized data parallelism (a compressor's error-feedback residual and warm start, a
/// warm-up count, DiLoCo's anchor and outer momentum), as named flat tensors and counters, so
/// that a checkpoint can hold it per rank and a resume at the same layout continues bitwise.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace tessera {

/// Named flat tensors and integer counters of one dp rank (CommHook::state, LocalSGD::state).
/// Names are the owner's ("bucket3.m0.error", "anchor"); `with_prefix` / `take_prefix` nest
/// one owner's state in another's.
template <std::floating_point T>
struct DpRankState {
  std::map<std::string, std::vector<T>> tensors;      ///< name -> values (flat)
  std::map<std::string, std::int64_t> counters;       ///< name -> count

  /// True when it holds nothing.
  bool empty() const noexcept { return tensors.empty() && counters.empty(); }
  /// Adds every entry of `other` under `prefix` + its name. Local.
  void add(const std::string& prefix, const DpRankState& other) {
    for (const auto& [k, v] : other.tensors) tensors[prefix + k] = v;
    for (const auto& [k, v] : other.counters) counters[prefix + k] = v;
  }
  /// The entries whose names start with `prefix`, with the prefix removed. Local.
  DpRankState take_prefix(const std::string& prefix) const {
    DpRankState out;
    for (const auto& [k, v] : tensors)
      if (k.rfind(prefix, 0) == 0) out.tensors[k.substr(prefix.size())] = v;
    for (const auto& [k, v] : counters)
      if (k.rfind(prefix, 0) == 0) out.counters[k.substr(prefix.size())] = v;
    return out;
  }
};

/// The bucket number b of a hook's state name "bucket<b><suffix>" (b one or more decimal
/// digits; e.g. ("bucket3.error", ".error") -> 3), or nothing when `name` is not of that form.
/// The hooks' load_state reads their names with it. Local.
inline std::optional<std::size_t> dp_state_bucket(const std::string& name, const std::string& suffix) {
  const std::size_t head = 6, tail = suffix.size();
  if (name.rfind("bucket", 0) != 0 || name.size() <= head + tail || name.compare(name.size() - tail, tail, suffix) != 0 ||
      name.substr(head, name.size() - head - tail).find_first_not_of("0123456789") != std::string::npos)
    return std::nullopt;
  return static_cast<std::size_t>(std::stoull(name.substr(head, name.size() - head - tail)));
}

}  // namespace tessera
