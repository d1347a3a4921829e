#pragma once
/// @file
/// Implementation details of the MPI backend: the mapping of tessera's element types and
/// reductions onto MPI's built-in ones, descriptions of calls for error messages, the
/// outstanding-operation record that a Request polls, and the split of counts that do not
/// fit in an `int`. Nothing outside include/tessera/comm/mpi/ uses these.

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

namespace tessera::mpi::detail {

/// The MPI datatype of a DType (MPI_FLOAT, MPI_DOUBLE, MPI_INT32_T, MPI_INT64_T).
inline MPI_Datatype mpi_type(DType t) noexcept {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
  }
  return MPI_DATATYPE_NULL;
}

/// The built-in MPI reduction of a ReduceOp. `avg` reduces with MPI_SUM; the caller divides by
/// the communicator size afterwards. Built-in ops only: a user-defined MPI_Op makes Open MPI
/// take its slow path for non-commutative operations.
inline MPI_Op mpi_op(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::sum: return MPI_SUM;
    case ReduceOp::avg: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  return MPI_OP_NULL;
}

/// MPI's error class and text for an error code, e.g. "MPI_ERR_TRUNCATE: message truncated".
inline std::string error_text(int code) {
  int cls = code;
  MPI_Error_class(code, &cls);
  char buf[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return tessera::detail::str("MPI error class ", cls, " (", std::string(buf, static_cast<std::size_t>(len)), ")");
}

/// The MPI error class of a code (what CommError::code() holds).
inline int error_class(int code) noexcept {
  int cls = code;
  MPI_Error_class(code, &cls);
  return cls;
}

/// What a call is, for signatures (debug mode) and error messages.
enum class CallKind : std::int64_t {
  all_reduce,
  all_gather,
  reduce_scatter,
  broadcast,
  barrier,
  split,
  send,
  recv,
  batch_p2p,
};

/// One call as it appears in messages: kind, element type, count and, where they apply, op,
/// root, peer and tag. `count` is the per-rank count (all_gather: elements each rank sends;
/// reduce_scatter: elements each rank receives).
struct CallInfo {
  CallKind kind = CallKind::barrier;
  DType dtype = DType::f32;
  std::size_t count = 0;
  ReduceOp op = ReduceOp::sum;
  int root = -1;
  int peer = -1;
  int tag = -1;
  bool async = false;  ///< the non-blocking form (iall_reduce, isend, ...)
};

/// Text of a call as the user wrote it, e.g. "all_reduce(float32, count=10, sum)",
/// "broadcast(int64, count=3, root=1)", "isend(float32, count=5, peer=1, tag=0)".
inline std::string describe(const CallInfo& c) {
  using tessera::detail::str;
  const char* i = c.async ? "i" : "";
  switch (c.kind) {
    case CallKind::all_reduce:
      return str(i, "all_reduce(", name_of(c.dtype), ", count=", c.count, ", ", name_of(c.op), ")");
    case CallKind::all_gather:
      return str(i, "all_gather(", name_of(c.dtype), ", count=", c.count, ")");
    case CallKind::reduce_scatter:
      return str(i, "reduce_scatter(", name_of(c.dtype), ", count=", c.count, ", ", name_of(c.op), ")");
    case CallKind::broadcast:
      return str("broadcast(", name_of(c.dtype), ", count=", c.count, ", root=", c.root, ")");
    case CallKind::barrier: return "barrier()";
    case CallKind::split: return "split()";
    case CallKind::send:
      return str(i, "send(", name_of(c.dtype), ", count=", c.count, ", peer=", c.peer, ", tag=", c.tag, ")");
    case CallKind::recv:
      return str(i, "recv(", name_of(c.dtype), ", count=", c.count, ", peer=", c.peer, ", tag=", c.tag, ")");
    case CallKind::batch_p2p: return str("batch_isend_irecv(", c.count, " ops)");
  }
  return "?";
}

/// Number of int64 words in a collective's signature (debug mode).
inline constexpr int signature_words = 6;

/// The signature exchanged before each collective in debug mode: kind, dtype, count, op,
/// root (op and root are -1 where they do not apply), and whether the call is non-blocking
/// (kept for the message only: blocking and non-blocking forms match each other here).
inline std::vector<std::int64_t> signature(const CallInfo& c) {
  const bool has_op = c.kind == CallKind::all_reduce || c.kind == CallKind::reduce_scatter;
  const bool has_type = c.kind != CallKind::barrier && c.kind != CallKind::split;
  return {static_cast<std::int64_t>(c.kind),
          has_type ? static_cast<std::int64_t>(c.dtype) : -1,
          has_type ? static_cast<std::int64_t>(c.count) : -1,
          has_op ? static_cast<std::int64_t>(c.op) : -1,
          c.kind == CallKind::broadcast ? static_cast<std::int64_t>(c.root) : -1,
          c.async ? 1 : 0};
}

/// Inverse of signature(), for the message naming another rank's call.
inline CallInfo from_signature(const std::int64_t* w) {
  CallInfo c;
  c.kind = static_cast<CallKind>(w[0]);
  if (w[1] >= 0) c.dtype = static_cast<DType>(w[1]);
  if (w[2] >= 0) c.count = static_cast<std::size_t>(w[2]);
  if (w[3] >= 0) c.op = static_cast<ReduceOp>(w[3]);
  c.root = static_cast<int>(w[4]);
  c.async = w[5] != 0;
  return c;
}

/// True when two signatures denote matching calls (everything but the non-blocking flag).
inline bool signatures_match(const std::int64_t* a, const std::int64_t* b) {
  return std::equal(a, a + signature_words - 1, b);
}

/// One MPI request of a point-to-point operation, kept so that errors and timeouts can name
/// the peer and tag, and so that a receive's count can be checked.
struct P2PEntry {
  bool is_recv = false;      ///< receive (else send)
  int peer = -1;             ///< rank in the communicator
  int tag = 0;               ///< message tag
  int count = 0;             ///< elements expected in this piece
  DType dtype = DType::f32;  ///< element type
};

/// An operation in flight: its MPI requests plus what to do once they complete (divide for
/// avg, check receive counts). A Request owns one; a communicator keeps those whose Request
/// was dropped or timed out until MPI completes them.
struct PendingOp {
  CallInfo call;                           ///< what the user called (for messages)
  std::vector<MPI_Request> requests;       ///< one per piece (several when a count was split)
  std::vector<MPI_Status> statuses;        ///< filled by MPI_Testall
  std::vector<P2PEntry> p2p;               ///< parallel to `requests` for send/recv/batch ops
  void* avg_data = nullptr;                ///< buffer to divide by avg_divisor once complete
  std::size_t avg_count = 0;               ///< elements in avg_data
  int avg_divisor = 1;                     ///< communicator size for ReduceOp::avg
  std::unique_ptr<std::byte[]> scratch;    ///< staged copy of an input that overlaps the output
  bool done = false;                       ///< completed and finished (avg applied)
  bool signature_exchange = false;         ///< the debug-mode exchange of call signatures
};

/// Divides `n` elements of type `t` at `p` by `d` (integers: truncating division).
inline void divide(void* p, std::size_t n, DType t, int d) {
  auto run = [&](auto* x) {
    using T = std::remove_pointer_t<decltype(x)>;
    const T div = static_cast<T>(d);
    for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(x[i] / div);
  };
  switch (t) {
    case DType::f32: run(static_cast<float*>(p)); break;
    case DType::f64: run(static_cast<double*>(p)); break;
    case DType::i32: run(static_cast<std::int32_t*>(p)); break;
    case DType::i64: run(static_cast<std::int64_t*>(p)); break;
  }
}

/// Calls `fn(offset, piece)` for consecutive pieces of at most `max_piece` elements covering
/// [0, count); once with (0, 0) when count is 0, so that every rank still issues one call.
template <class Fn>
void for_each_piece(std::size_t count, std::size_t max_piece, Fn&& fn) {
  if (count == 0) {
    fn(std::size_t{0}, 0);
    return;
  }
  for (std::size_t off = 0; off < count; off += max_piece)
    fn(off, static_cast<int>(std::min(max_piece, count - off)));
}

/// Seconds as text with millisecond resolution, e.g. "0.503 s".
inline std::string seconds_text(std::chrono::duration<double> d) {
  const long long ms = std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
  return tessera::detail::str(ms / 1000, ".", (ms % 1000) / 100, (ms % 100) / 10, ms % 10, " s");
}

}  // namespace tessera::mpi::detail
