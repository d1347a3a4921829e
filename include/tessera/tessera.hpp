#pragma once
/// @file
/// Umbrella header: everything that needs neither MPI nor CUDA (the threads backend included).
/// For the MPI backend include "tessera/mpi.hpp"; for NCCL, "tessera/nccl.hpp".

#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"
#include "tessera/comm/communicator.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/testing/instrumented_comm.hpp"
#include "tessera/testing/run_ranks.hpp"
