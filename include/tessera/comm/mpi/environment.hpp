#pragma once
/// @file
/// Starting tessera under MPI: Environment (MPI_Init / MPI_Finalize), world() (the world
/// communicator as a tessera::Comm), run() (the one-line entry point of a program), and
/// helpers to wrap other Boost.MPI communicators.
///
/// Switching a program from threads to processes changes one line:
/// @code
///   tessera::threads::run(4, train);          // 4 ranks as threads
///   tessera::mpi::run(argc, argv, train);     // one rank per process: mpirun -np 4 ./prog
/// @endcode

#include <mpi.h>

#include <boost/mpi/communicator.hpp>
#include <boost/mpi/environment.hpp>

#include <cxxabi.h>

#include <concepts>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <typeinfo>
#include <utility>

#include "tessera/comm/collective_checker.hpp"
#include "tessera/comm/communicator.hpp"
#include "tessera/comm/mpi/mpi_communicator.hpp"
#include "tessera/core/error.hpp"

namespace tessera::mpi {

namespace detail {
/// The process's world communicator, made by the first world() call.
inline std::shared_ptr<MpiCommunicator>& world_slot() {
  static std::shared_ptr<MpiCommunicator> world;
  return world;
}

/// Demangled dynamic type of an exception, e.g. "tessera::TimeoutError".
inline std::string type_name(const std::exception& e) {
  int status = 0;
  char* s = abi::__cxa_demangle(typeid(e).name(), nullptr, nullptr, &status);
  std::string name = (status == 0 && s != nullptr) ? s : typeid(e).name();
  std::free(s);
  return name;
}

/// Prints why this rank failed and aborts every process of the job (MPI_Abort), so that the
/// ranks waiting for this one do not hang.
[[noreturn]] inline void abort_job(const std::string& what) noexcept {
  int rank = -1, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::fprintf(stderr, "tessera::mpi::run: rank %d of %d failed: %s\n", rank, size, what.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();  // MPI_Abort does not return; this only satisfies [[noreturn]]
}
}  // namespace detail

/// MPI for the life of the object: MPI_Init_thread with MPI_THREAD_SERIALIZED (several threads
/// may call tessera's MPI backend, one at a time) unless MPI is already initialized, and
/// MPI_Finalize at destruction if this object initialized it. Also makes the world
/// communicator (a duplicate of MPI_COMM_WORLD) at construction, so that world() is cheap and
/// not collective, and releases it before finalizing. If the object is destroyed by an
/// uncaught exception, the job is aborted (Boost.MPI's behaviour) instead of hanging.
/// Create one per process, in main(), before any other tessera::mpi call.
///
/// Before initializing Open MPI it selects the algorithm of libnbc's MPI_Iallreduce (the call
/// behind every all_reduce): Rabenseifner's reduce-scatter + all-gather
/// (OMPI_MCA_coll_libnbc_iallreduce_algorithm=3), unless that variable is already set. libnbc
/// otherwise runs an in-place all-reduce as a binomial reduce + broadcast, which moves the
/// whole buffer 2 log2(n) times; measured on 2 ranks at 64 MiB: 1.9x slower than
/// Rabenseifner's and 1.4x slower than the blocking MPI_Allreduce. Other MPIs ignore it.
class Environment {
 public:
  /// Initializes MPI with the program's arguments (MPI may remove its own from them).
  /// Collective over MPI_COMM_WORLD. Throws boost::mpi::exception if MPI cannot start.
  Environment(int& argc, char**& argv)
      : env_(argc, argv, boost::mpi::threading::serialized, true) {
    make_world();
  }
  /// Initializes MPI without arguments. Collective over MPI_COMM_WORLD.
  Environment() : Environment(no_argc(), no_argv()) {}
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;
  /// Releases the world communicator, then finalizes MPI (if this object initialized it).
  ~Environment() { detail::world_slot().reset(); }

  /// The thread support MPI provides (serialized or better when this object initialized MPI).
  static boost::mpi::threading::level thread_level() { return boost::mpi::environment::thread_level(); }

 private:
  static void make_world();
  /// Sets Open MPI's libnbc all-reduce algorithm (see the class comment) unless set already.
  static bool tune_open_mpi() { return setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "3", 0) == 0; }
  static int& no_argc() {
    static int argc = 0;
    return argc;
  }
  static char**& no_argv() {
    static char* args[] = {nullptr};
    static char** argv = args;
    return argv;
  }

  bool tuned_ = tune_open_mpi();  // before env_: MPI reads the variable when it starts
  boost::mpi::environment env_;
};

/// The world communicator (all processes of the job), named "mpi:world": a duplicate of
/// MPI_COMM_WORLD, so that tessera's messages never match the program's own MPI calls.
/// Every call returns a handle to the same communicator. Throws Error if MPI is not
/// initialized (create an Environment, or use run()). Collective the first time when MPI was
/// initialized by other code than Environment.
inline Comm world() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  TESSERA_EXPECTS(initialized && !finalized,
                  "tessera::mpi::world(): MPI is ", finalized ? "already finalized" : "not initialized",
                  "; create a tessera::mpi::Environment in main() or use tessera::mpi::run()");
  auto& w = detail::world_slot();
  if (!w)
    w = MpiCommunicator::create(boost::mpi::communicator(MPI_COMM_WORLD, boost::mpi::comm_duplicate),
                                "mpi:world");
  return Comm(w);
}

inline void Environment::make_world() { static_cast<void>(world()); }

/// Wraps the program's own Boost.MPI communicator as a tessera::Comm named `name`. The
/// communicator is duplicated (MPI_Comm_dup), so tessera's messages stay apart from the
/// program's. Collective over `comm`.
inline Comm make_comm(const boost::mpi::communicator& comm, std::string name) {
  return Comm(MpiCommunicator::create(boost::mpi::communicator(comm, boost::mpi::comm_duplicate),
                                      std::move(name)));
}

/// The MPI backend behind `comm`, for MPI-only settings (set_debug_collectives,
/// set_max_message_count, mpi_comm). Throws Error if `comm` is not an MPI communicator.
inline MpiCommunicator& backend(const Comm& comm) {
  CommBackend* inner = &comm.backend();
  if (auto* checker = dynamic_cast<CollectiveChecker*>(inner)) inner = checker->inner().get();
  auto* b = dynamic_cast<MpiCommunicator*>(inner);
  TESSERA_EXPECTS(b != nullptr, "tessera::mpi::backend: ", comm.name(), " is not an MPI communicator");
  return *b;
}

/// Runs `fn(world)` on every process of an MPI job: initializes MPI (Environment), calls fn
/// with the world communicator, finalizes MPI and returns 0, the program's exit code. If fn
/// throws on any rank, that rank prints "tessera::mpi::run: rank R of N failed: <type>: <what>"
/// to stderr and aborts the whole job with MPI_Abort (exit code 1), so the other ranks do not
/// hang; run() then never returns. fn's result, if any, is discarded.
/// The MPI counterpart of tessera::threads::run(n, fn): same fn, one line changes.
template <class Fn>
  requires std::invocable<Fn&, Comm&>
int run(int& argc, char**& argv, Fn&& fn) {
  try {
    static_cast<void>(collective_debug_from_environment());  // before MPI starts: a bad value ends every rank here
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera::mpi::run: %s\n", e.what());
    return 2;
  }
  Environment env(argc, argv);
  try {
    Comm w = world();
    if (collective_checks_from_environment()) w = check_collectives(w);  // TESSERA_DEBUG_COLLECTIVES=detail
    static_cast<void>(fn(w));
  } catch (const std::exception& e) {
    detail::abort_job(detail::type_name(e) + ": " + e.what());
  } catch (...) {
    detail::abort_job("an exception not derived from std::exception");
  }
  return 0;
}

}  // namespace tessera::mpi
