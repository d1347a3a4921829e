#pragma once
/// @file
/// launch: runs a program body on every rank of the backend chosen at run time (a command
/// line's `--backend threads|mpi`), so that a program switches backends without an #ifdef of
/// its own. The MPI choice is available where the build has the MPI backend
/// (TESSERA_HAVE_MPI, set by the `tessera-mpi` dependency).

#include <concepts>
#include <string_view>
#include <utility>

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/core/error.hpp"
#if TESSERA_HAVE_MPI
#include "tessera/mpi.hpp"
#endif

namespace tessera {

/// Whether this build has the MPI backend.
#if TESSERA_HAVE_MPI
inline constexpr bool have_mpi_backend = true;
#else
inline constexpr bool have_mpi_backend = false;
#endif

/// Runs `fn(world)` on `world_size` ranks: as threads of this process for backend "threads"
/// (threads::run), or on the processes of the MPI job for "mpi" (mpi::run; mpirun must have
/// started exactly `world_size` processes). Returns the program's exit code (0). Throws
/// tessera::Error naming the numbers when mpirun started another number of processes (on every
/// rank), naming the backend when it is neither or MPI is not built in; what fn throws
/// otherwise (threads: the first rank's exception; MPI: the job aborts naming the rank).
template <class Fn>
  requires std::invocable<Fn&, Comm&>
int launch(std::string_view backend, int world_size, int& argc, char**& argv, Fn&& fn) {
  if (backend == "mpi") {
#if TESSERA_HAVE_MPI
    return mpi::run(argc, argv, [&](Comm& world) {
      TESSERA_EXPECTS(world.size() == world_size, "launch: mpirun started ", world.size(), " processes but the layout needs ",
                      world_size);
      fn(world);
    });
#else
    (void)argc;
    (void)argv;
    throw Error("launch: this build has no MPI backend (configure with -Dmpi=enabled)");
#endif
  }
  TESSERA_EXPECTS(backend == "threads", "launch: unknown backend \"", backend, "\" (threads or mpi)");
  threads::run(world_size, [&](Comm& world) { fn(world); });
  return 0;
}

}  // namespace tessera
