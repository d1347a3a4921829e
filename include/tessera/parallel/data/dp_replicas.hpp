#pragma once
/// @file
/// What data-parallel replicas check and do when they start: that every rank holds the same
/// parameter list (expect_same_parameters, CASES C2), and that they start from rank 0's values
/// (broadcast_parameters, CASES C3). DataParallel's constructor calls both.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera {

namespace detail {

/// One parameter as the replica check sees it: its name and its printed shape, element type
/// and tp layout, e.g. {"h.0.mlp.c_fc.weight", "(8, 32) float32 Replicate"}.
struct ParamSignature {
  std::string name;  ///< the parameter's name
  std::string kind;  ///< "<shape> <dtype> <layout>"
  friend bool operator==(const ParamSignature&, const ParamSignature&) = default;
};

template <std::floating_point T>
std::vector<ParamSignature> param_signatures(const ParameterList<T>& params) {
  std::vector<ParamSignature> out;
  out.reserve(params.size());
  for (const Parameter<T>& p : params)
    out.push_back({p.name, str(p.value.shape(), ' ', name_of(dtype_of<T>), ' ', p.layout)});
  return out;
}

// Fields end with '\x1f', entries with '\x1e' (ASCII unit and record separators).
inline std::string encode_signatures(const std::vector<ParamSignature>& sigs) {
  std::string s;
  for (const ParamSignature& e : sigs) {
    s += e.name;
    s += '\x1f';
    s += e.kind;
    s += '\x1e';
  }
  return s;
}

inline std::vector<ParamSignature> decode_signatures(std::string_view s) {
  std::vector<ParamSignature> out;
  while (!s.empty()) {
    const std::size_t end = s.find('\x1e');
    if (end == std::string_view::npos) break;
    const std::string_view entry = s.substr(0, end);
    const std::size_t mid = entry.find('\x1f');
    out.push_back({std::string(entry.substr(0, mid)),
                   mid == std::string_view::npos ? std::string() : std::string(entry.substr(mid + 1))});
    s.remove_prefix(end + 1);
  }
  return out;
}

/// FNV-1a of the bytes: a 64-bit fingerprint of a signature string.
inline std::int64_t fingerprint(std::string_view s) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return static_cast<std::int64_t>(h);
}

/// "name" (shape) dtype layout
inline std::string describe(const ParamSignature& e) { return str('"', e.name, "\" ", e.kind); }

/// The message naming the first parameter in which `other` (rank `r`) differs from `ref`
/// (rank 0); empty when the lists are equal.
inline std::string first_difference(const std::vector<ParamSignature>& ref, const std::vector<ParamSignature>& other,
                                    int r) {
  const std::size_t n = std::max(ref.size(), other.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (i < ref.size() && i < other.size() && ref[i] == other[i]) continue;
    const std::string counts = str(" (rank 0 has ", ref.size(), " parameters, rank ", r, " has ", other.size(), ")");
    if (i >= other.size())
      return str("rank ", r, " has no parameter ", i, "; rank 0's is ", describe(ref[i]), counts);
    if (i >= ref.size())
      return str("rank 0 has no parameter ", i, "; rank ", r, "'s is ", describe(other[i]), counts);
    return str("parameter ", i, " is ", describe(ref[i]), " on rank 0 but ", describe(other[i]), " on rank ", r,
               counts);
  }
  return {};
}

}  // namespace detail

/// Checks that every rank of `comm` holds the same parameter list: the same names, shapes,
/// element types and tp layouts, in the same order. Where they differ, throws tessera::Error on
/// every rank, with the same message naming the first differing parameter and its two
/// versions, e.g. `DataParallel on threads:world: the replicas' parameter lists differ:
/// parameter 2 is "fc.weight" (8, 16) float32 Replicate on rank 0 but "fc.weight" (8, 12) float32
/// Replicate on rank 1 (...)`. `who` starts the message.
///
/// Every rank learns of a mismatch, so none is left waiting in a later collective (CASES C2):
/// the ranks first all-gather a fixed-size fingerprint of their lists (count, length, FNV-1a
/// hash), and only where the fingerprints differ all-gather the lists themselves.
///
/// Collective over `comm`: every rank calls it (two all_gathers of int64 when the lists
/// differ, one when they agree).
template <std::floating_point T>
void expect_same_parameters(Comm& comm, const ParameterList<T>& params, std::string_view who = "DataParallel") {
  const std::vector<detail::ParamSignature> mine = detail::param_signatures(params);
  const std::string enc = detail::encode_signatures(mine);
  const int n = comm.size();
  const std::int64_t head[3] = {static_cast<std::int64_t>(mine.size()), static_cast<std::int64_t>(enc.size()),
                                detail::fingerprint(enc)};
  std::vector<std::int64_t> heads(3 * static_cast<std::size_t>(n));
  comm.iall_gather(std::span<const std::int64_t>(head, 3), heads).wait();
  bool same = true;
  std::int64_t longest = 0;
  for (int r = 0; r < n; ++r) {
    const std::size_t at = 3 * static_cast<std::size_t>(r);
    same = same && std::equal(heads.begin(), heads.begin() + 3, heads.begin() + static_cast<std::ptrdiff_t>(at));
    longest = std::max(longest, heads[at + 1]);
  }
  if (same) return;

  // The lists differ somewhere: every rank takes this branch (the heads are the same
  // everywhere), exchanges the full lists padded to the longest, and builds the same message.
  const std::size_t words = (static_cast<std::size_t>(longest) + 7) / 8;
  std::vector<std::int64_t> packed(words, 0);
  if (!enc.empty()) std::memcpy(packed.data(), enc.data(), enc.size());
  std::vector<std::int64_t> all(words * static_cast<std::size_t>(n));
  comm.iall_gather(packed, all).wait();
  auto list_of = [&](int r) {
    const char* bytes = reinterpret_cast<const char*>(all.data() + words * static_cast<std::size_t>(r));
    return detail::decode_signatures(std::string_view(bytes, static_cast<std::size_t>(heads[3 * static_cast<std::size_t>(r) + 1])));
  };
  const std::vector<detail::ParamSignature> ref = list_of(0);
  for (int r = 1; r < n; ++r) {
    const std::string diff = detail::first_difference(ref, list_of(r), r);
    if (!diff.empty())
      throw Error(detail::str(who, " on ", comm.name(), ": the replicas' parameter lists differ: ", diff));
  }
  // Equal lists with different fingerprints cannot happen (same bytes, same hash); say so if
  // it ever does rather than continue with replicas that disagree.
  throw Error(detail::str(who, " on ", comm.name(), ": the replicas' parameter fingerprints differ although the lists "
                          "decode equal"));
}

/// Copies rank `root`'s parameter values to every rank of `comm`, so that replicas start
/// identical whatever their own initialization (CASES C3). A tensor listed twice (a tied
/// weight) is sent once. Throws tessera::Error if root is out of range.
///
/// Collective over `comm`: every rank calls it with the same parameter list (check it first
/// with expect_same_parameters) and root; one broadcast per distinct parameter.
template <std::floating_point T>
void broadcast_parameters(Comm& comm, const ParameterList<T>& params, int root = 0) {
  std::unordered_set<const void*> seen;
  for (const Parameter<T>& p : params) {
    if (p.value.numel() == 0 || !seen.insert(p.value.data()).second) continue;
    if (p.value.is_contiguous()) {
      comm.broadcast(p.value.span(), root);
    } else {
      Tensor<T> tmp = p.value.clone();
      comm.broadcast(tmp.span(), root);
      p.value.copy_from(tmp);
    }
  }
}

}  // namespace tessera
