#pragma once
// "Fails on every rank" as a check that can fail: each rank catches its own exception and
// returns what it was, and the main thread requires every rank's own error. On the threads
// backend an AbortedError carries the first failing rank's message (and a TimeoutError
// follows a rank that returned), so one failing rank plus aborts would pass a substring match.

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "tessera/core/error.hpp"

namespace hybrid_test {

// What one rank threw.
struct RankError {
  bool thrown = false;   // it threw at all
  bool aborted = false;  // an AbortedError: another rank's failure reached this one
  bool timeout = false;  // a TimeoutError: a peer never arrived (or had returned)
  std::string message;
};

// Runs fn() and returns what it threw on this rank (thrown = false if nothing).
template <class F>
RankError rank_error(F&& fn) {
  try {
    fn();
  } catch (const tessera::AbortedError& e) {
    return {.thrown = true, .aborted = true, .message = e.what()};
  } catch (const tessera::TimeoutError& e) {
    return {.thrown = true, .timeout = true, .message = e.what()};
  } catch (const std::exception& e) {
    return {.thrown = true, .message = e.what()};
  }
  return {};
}

// Whether `s` contains `part`.
inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Checks that every rank threw its own error (neither AbortedError nor TimeoutError, and not
// the agreement "<what> failed on rank R" of another rank's error) holding each of `parts`.
inline void check_own_errors(const std::vector<RankError>& errors, const std::vector<std::string>& parts) {
  for (std::size_t r = 0; r < errors.size(); ++r) {
    CAPTURE(r);
    CAPTURE(errors[r].message);
    CHECK(errors[r].thrown);
    CHECK(!errors[r].aborted);
    CHECK(!errors[r].timeout);
    CHECK(!contains(errors[r].message, "failed on rank"));
    for (const std::string& p : parts) {
      CAPTURE(p);
      CHECK(contains(errors[r].message, p));
    }
  }
}

}  // namespace hybrid_test
