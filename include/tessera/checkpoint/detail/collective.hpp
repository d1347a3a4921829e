#pragma once
/// @file
/// Collective agreement for checkpoint I/O (CASES C10): every rank learns whether any rank
/// failed, and all fail together with the first failure's message.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"

namespace tessera::checkpoint::detail {

/// The message of an exception pointer.
inline std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown exception";
  }
}

/// Every rank's string, in rank order. Collective over `comm`.
inline std::vector<std::string> all_gather_strings(Comm& comm, std::string_view s) {
  const auto n = static_cast<std::size_t>(comm.size());
  std::vector<std::int64_t> len{static_cast<std::int64_t>(s.size())}, lens(n);
  comm.all_gather(len, lens);
  std::int64_t longest = 0;
  for (std::int64_t l : lens) longest = std::max(longest, l);
  const auto words = static_cast<std::size_t>((longest + 7) / 8);
  std::vector<std::int64_t> mine(words, 0), all(words * n, 0);
  std::memcpy(mine.data(), s.data(), s.size());
  if (words > 0) comm.all_gather(mine, all);
  std::vector<std::string> out(n);
  for (std::size_t r = 0; r < n; ++r)
    out[r].assign(reinterpret_cast<const char*>(all.data() + r * words), static_cast<std::size_t>(lens[r]));
  return out;
}

/// Who a failed agreement's Error blames on a rank that failed itself.
enum class Blame {
  own,     ///< a failing rank rethrows its own exception (loads: each rank names its own file)
  shared,  ///< every rank, failing or not, throws the same Error naming the lowest failing rank (saves)
};

/// Collective over `comm`: every rank passes the error it hit (null if none). If any rank had
/// one, every rank throws. The ranks that did not fail throw tessera::Error "<what> failed on
/// rank R of <comm>: <R's message>" for the lowest failing rank R (", and on ranks S, T" added
/// when others failed too). A failing rank rethrows its own exception under Blame::own, and
/// throws that same shared Error under Blame::shared, so that every rank of a job (and a log
/// that keeps whichever rank's line came first) names the same rank and cause.
/// Returns normally on every rank otherwise.
inline void agree(Comm& comm, const std::exception_ptr& error, std::string_view what, Blame blame = Blame::own) {
  const auto n = static_cast<std::size_t>(comm.size());
  std::vector<std::int32_t> mine{error ? 1 : 0}, all(n);
  comm.all_gather(mine, all);
  int first = -1;
  std::string others;
  for (std::size_t r = 0; r < n; ++r) {
    if (all[r] == 0) continue;
    if (first < 0)
      first = static_cast<int>(r);
    else
      others += tessera::detail::str(others.empty() ? "" : ", ", r);
  }
  if (!others.empty())
    others = tessera::detail::str(", and on rank", others.find(',') == std::string::npos ? " " : "s ", others);
  if (first < 0) return;
  const std::vector<std::string> msgs = all_gather_strings(comm, error ? message_of(error) : std::string());
  if (error && blame == Blame::own) std::rethrow_exception(error);
  throw Error(tessera::detail::str(what, " failed on rank ", first, " of ", comm.name(), others, ": ",
                                   msgs[static_cast<std::size_t>(first)]));
}

}  // namespace tessera::checkpoint::detail
