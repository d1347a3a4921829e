#pragma once
/// @file
/// Umbrella header of tessera's MPI backend (Boost.MPI over Open MPI): the core communicator
/// interface plus MpiCommunicator, Environment, world() and run(). Include it in programs that
/// run under mpirun; it is the only part of tessera that needs <mpi.h> and Boost.MPI.

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/mpi/environment.hpp"
#include "tessera/comm/mpi/mpi_communicator.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"
#include "tessera/tessera.hpp"
