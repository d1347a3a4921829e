// A tiny consumer of tessera's MPI backend: the flags of tessera-mpi (Boost.MPI, MPI, the
// defines) compile and link a program that calls Boost.MPI. It does not start MPI, so it runs
// without a launcher.
#include <boost/mpi/environment.hpp>

#include "tessera/comm/communicator.hpp"

#ifndef TESSERA_HAVE_MPI
#error "tessera-mpi must define TESSERA_HAVE_MPI"
#endif

int main() { return boost::mpi::environment::initialized() ? 1 : 0; }
