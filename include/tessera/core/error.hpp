#pragma once
/// @file
/// Errors thrown by tessera, and the TESSERA_EXPECTS check macro.

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace tessera {

/// A source position (file, line, function), captured at the call site through default
/// arguments. Used instead of SourceLocation, which clang 14 cannot build with
/// libstdc++ 12.
struct SourceLocation {
  const char* file = "";      ///< file name as the compiler saw it
  unsigned line = 0;          ///< line number
  const char* function = "";  ///< enclosing function
  /// The caller's location.
  static constexpr SourceLocation current(const char* file = __builtin_FILE(),
                                          unsigned line = __builtin_LINE(),
                                          const char* function = __builtin_FUNCTION()) noexcept {
    return {file, line, function};
  }
};

namespace detail {
/// Concatenates the streamed form of every argument into one string.
template <class... Args>
std::string str(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

inline std::string where(const SourceLocation& loc) {
  std::string file = loc.file;
  if (auto pos = file.rfind("include/tessera/"); pos != std::string::npos) file = file.substr(pos + 8);
  return str(file, ":", loc.line);
}
}  // namespace detail

/// Base of every error tessera throws: a message that names the values involved, plus the
/// source location (file:line) where the check failed. Derived from std::runtime_error, so
/// `catch (const std::exception&)` catches it.
class Error : public std::runtime_error {
 public:
  /// Throws nothing itself; `loc` defaults to the caller's location.
  explicit Error(const std::string& message,
                 SourceLocation loc = SourceLocation::current())
      : std::runtime_error(message + " [" + detail::where(loc) + "]"), loc_(loc) {}
  /// Where the error was raised.
  const SourceLocation& location() const noexcept { return loc_; }

 private:
  SourceLocation loc_;
};

/// A failure inside a communication backend. `code()` keeps the backend's own error code
/// (MPI error class, ncclResult_t, or 0 for the threads backend).
class CommError : public Error {
 public:
  /// `code`: the backend's error code (0 where the backend has none).
  explicit CommError(const std::string& message, int code = 0,
                     SourceLocation loc = SourceLocation::current())
      : Error(message, loc), code_(code) {}
  /// The backend's error code.
  int code() const noexcept { return code_; }

 private:
  int code_;
};

/// A collective or point-to-point call waited past its timeout. The message names the call,
/// the communicator and the ranks that did not arrive (where the backend can know them).
class TimeoutError : public CommError {
 public:
  /// As CommError's constructor.
  explicit TimeoutError(const std::string& message, int code = 0,
                 SourceLocation loc = SourceLocation::current())
      : CommError(message, code, loc) {}
};

/// Another rank failed (threw) while this rank waited for it; thrown instead of hanging.
class AbortedError : public CommError {
 public:
  /// As CommError's constructor.
  explicit AbortedError(const std::string& message, int code = 0,
                 SourceLocation loc = SourceLocation::current())
      : CommError(message, code, loc) {}
};

/// Ranks called collectives that do not match (a different collective, type, count or root).
class MismatchError : public CommError {
 public:
  /// As CommError's constructor.
  explicit MismatchError(const std::string& message, int code = 0,
                 SourceLocation loc = SourceLocation::current())
      : CommError(message, code, loc) {}
};

}  // namespace tessera

/// Checks a precondition; on failure throws `tessera::Error` whose message is the streamed
/// concatenation of the remaining arguments, e.g.
/// `TESSERA_EXPECTS(n % p == 0, "Mesh: world size ", n, " is not ...")`.
#define TESSERA_EXPECTS(cond, ...)                                  \
  do {                                                              \
    if (!(cond)) throw ::tessera::Error(::tessera::detail::str(__VA_ARGS__)); \
  } while (0)
