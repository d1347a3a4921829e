#pragma once
/// @file
/// ParameterServerLayout: how a parameter server shards a model's parameters over its servers
/// (contiguous key ranges of the flattened parameter vector, as ps-lite's key-range
/// partition), and the collective check that every rank passes the same parameter list.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"

namespace tessera {

/// The part of one parameter that one server holds: elements [param_offset, param_offset +
/// length) of the parameter's row-major flattening, stored at [shard_offset, shard_offset +
/// length) of the server's shard.
struct ParameterServerPiece {
  std::size_t param = 0;          ///< index of the parameter in the list given to the layout
  std::string name;               ///< the parameter's full name, e.g. "h.0.mlp.c_fc.bias"
  std::int64_t param_offset = 0;  ///< first element inside the parameter (flat, row-major)
  std::int64_t shard_offset = 0;  ///< first element inside the server's shard
  std::int64_t length = 0;        ///< number of elements (> 0)
};

/// The key space of a parameter server and its split over `num_servers` servers.
///
/// Keys are the elements of the concatenation, in list order, of every parameter flattened in
/// row-major order: key k of parameter i is element k - offset(i) of it; `num_keys()` is the
/// total element count N. Server s holds the contiguous key range [N s / S, N (s + 1) / S)
/// (integer division), so shard sizes differ by at most one element and a parameter may
/// straddle two servers (it then has a piece on each). This is ps-lite's uniform key-range
/// partition (Li et al., "Scaling Distributed Machine Learning with the Parameter Server",
/// OSDI 2014).
class ParameterServerLayout {
 public:
  /// The layout of `params` over `num_servers` servers. Throws tessera::Error unless
  /// num_servers >= 1.
  template <std::floating_point T>
  ParameterServerLayout(const ParameterList<T>& params, int num_servers) : num_servers_(num_servers) {
    TESSERA_EXPECTS(num_servers >= 1, "ParameterServerLayout: num_servers must be >= 1, got ", num_servers);
    offsets_.reserve(params.size() + 1);
    offsets_.push_back(0);
    for (const Parameter<T>& p : params) {
      names_.push_back(p.name);
      shapes_.push_back(p.value.shape());
      offsets_.push_back(offsets_.back() + p.value.numel());
    }
    pieces_.resize(static_cast<std::size_t>(num_servers));
    for (int s = 0; s < num_servers; ++s) {
      const std::int64_t lo = key_begin(s), hi = key_end(s);
      for (std::size_t i = 0; i < names_.size(); ++i) {
        const std::int64_t a = std::max(lo, offsets_[i]), b = std::min(hi, offsets_[i + 1]);
        if (a < b) pieces_[static_cast<std::size_t>(s)].push_back({i, names_[i], a - offsets_[i], a - lo, b - a});
      }
    }
  }

  /// Number of servers S.
  int num_servers() const noexcept { return num_servers_; }
  /// Number of parameters.
  std::size_t num_params() const noexcept { return names_.size(); }
  /// Total number of keys N (elements over all parameters).
  std::int64_t num_keys() const noexcept { return offsets_.back(); }
  /// First key of parameter i (unchecked).
  std::int64_t offset(std::size_t i) const noexcept { return offsets_[i]; }
  /// Name of parameter i (unchecked).
  const std::string& name(std::size_t i) const noexcept { return names_[i]; }
  /// Shape of parameter i (unchecked).
  const Shape& shape(std::size_t i) const noexcept { return shapes_[i]; }
  /// First key held by server s: N s / S.
  std::int64_t key_begin(int s) const noexcept { return num_keys() * s / num_servers_; }
  /// One past the last key held by server s: N (s + 1) / S.
  std::int64_t key_end(int s) const noexcept { return num_keys() * (s + 1) / num_servers_; }
  /// Number of keys (shard elements) held by server s.
  std::int64_t shard_size(int s) const noexcept { return key_end(s) - key_begin(s); }
  /// The pieces server s holds, in key order. Throws tessera::Error for a bad s.
  const std::vector<ParameterServerPiece>& pieces(int s) const {
    TESSERA_EXPECTS(s >= 0 && s < num_servers_, "ParameterServerLayout: server ", s, " is out of range [0, ",
                    num_servers_, ")");
    return pieces_[static_cast<std::size_t>(s)];
  }

  /// Throws tessera::Error, naming the parameter, the numbers and `what` (the caller, e.g.
  /// "ParameterServer::push"), unless `params` has this layout's number of parameters and each
  /// has this layout's element count.
  template <std::floating_point T>
  void check(const ParameterList<T>& params, std::string_view what) const {
    TESSERA_EXPECTS(params.size() == names_.size(), what, ": the list has ", params.size(),
                    " parameters but the parameter server was built with ", names_.size());
    for (std::size_t i = 0; i < names_.size(); ++i) {
      const Parameter<T>& p = params[i];
      TESSERA_EXPECTS(p.value.numel() == shapes_[i].numel() && p.grad.numel() == shapes_[i].numel(), what,
                      ": parameter ", i, " (\"", p.name, "\") has ", p.value.numel(), " values and ",
                      p.grad.numel(), " gradient elements, shape ", p.value.shape(),
                      ", but the parameter server was built with \"", names_[i], "\" of shape ", shapes_[i],
                      " (", shapes_[i].numel(), " elements)");
    }
  }

 private:
  int num_servers_;
  std::vector<std::string> names_;
  std::vector<Shape> shapes_;
  std::vector<std::int64_t> offsets_;
  std::vector<std::vector<ParameterServerPiece>> pieces_;
};

namespace detail {

/// FNV-1a of a name, as a signed 64-bit value that a communicator can move.
inline std::int64_t ps_name_hash(std::string_view s) noexcept {
  std::uint64_t h = 14695981039346656037ull;
  for (char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ull;
  }
  return static_cast<std::int64_t>(h);
}

/// Broadcasts rank `root`'s string. Collective over `comm`.
inline std::string ps_broadcast_string(Comm& comm, const std::string& s, int root) {
  std::int64_t n = static_cast<std::int64_t>(s.size());
  comm.broadcast(std::span<std::int64_t>(&n, 1), root);
  std::vector<std::int32_t> chars(static_cast<std::size_t>(n));
  if (comm.rank() == root)
    for (std::size_t i = 0; i < chars.size(); ++i) chars[i] = static_cast<unsigned char>(s[i]);
  comm.broadcast(chars, root);
  std::string out(chars.size(), '\0');
  for (std::size_t i = 0; i < chars.size(); ++i) out[i] = static_cast<char>(chars[i]);
  return out;
}

/// "(4, 16)" from a record [rank, d0, d1, d2, d3, hash].
inline std::string ps_shape_string(const std::int64_t* rec) {
  std::string s = "(";
  for (std::int64_t d = 0; d < rec[0]; ++d) s += detail::str(d ? ", " : "", rec[1 + d]);
  return s + ")";
}

/// Collective over `comm`: throws tessera::Error on every rank, naming the first parameter
/// that differs (index, both names, both shapes, both ranks), unless every rank passes a list
/// with the same number of parameters and the same names and shapes in the same order.
/// The same check as DataParallel's construction (CASES C2): never a hang.
template <std::floating_point T>
void ps_check_same_parameters(Comm& comm, const ParameterList<T>& params, std::string_view what) {
  const int n = comm.size();
  const std::int64_t count = static_cast<std::int64_t>(params.size());
  std::vector<std::int64_t> counts(static_cast<std::size_t>(n));
  comm.all_gather(std::span<const std::int64_t>(&count, 1), counts);
  for (int q = 1; q < n; ++q)
    TESSERA_EXPECTS(counts[static_cast<std::size_t>(q)] == counts[0], what, ": rank ", q, " passes ",
                    counts[static_cast<std::size_t>(q)], " parameters but rank 0 passes ", counts[0],
                    "; every rank must pass the same parameter list (names, shapes, order)");
  constexpr std::size_t w = 6;  // [rank, d0, d1, d2, d3, name hash]
  std::vector<std::int64_t> mine(w * params.size(), 0);
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Shape& s = params[i].value.shape();
    std::int64_t* r = mine.data() + w * i;
    r[0] = s.rank();
    for (int d = 0; d < s.rank(); ++d) r[1 + d] = s[d];
    r[5] = ps_name_hash(params[i].name);
  }
  std::vector<std::int64_t> all(mine.size() * static_cast<std::size_t>(n));
  comm.all_gather(mine, all);
  for (std::size_t i = 0; i < params.size(); ++i)
    for (int q = 1; q < n; ++q) {
      const std::int64_t* r0 = all.data() + w * i;
      const std::int64_t* rq = all.data() + mine.size() * static_cast<std::size_t>(q) + w * i;
      if (std::equal(r0, r0 + w, rq)) continue;
      // Every rank found the same (i, q): fetch both names and fail everywhere alike.
      const std::string n0 = ps_broadcast_string(comm, params[i].name, 0);
      const std::string nq = ps_broadcast_string(comm, params[i].name, q);
      throw Error(detail::str(what, ": parameter ", i, " is \"", n0, "\" of shape ", ps_shape_string(r0),
                              " on rank 0 but \"", nq, "\" of shape ", ps_shape_string(rq), " on rank ", q,
                              "; every rank must pass the same parameter list (names, shapes, order)"));
    }
}

}  // namespace detail

}  // namespace tessera
