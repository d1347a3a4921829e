#pragma once
/// @file
/// Umbrella header: everything that needs neither MPI nor CUDA (the threads backend included).
/// For the MPI backend include "tessera/mpi.hpp"; for NCCL, "tessera/nccl.hpp".

#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"
#include "tessera/comm/communicator.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/nn/activation_checkpoint.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/optim/warmup_cosine.hpp"
#include "tessera/schedule/all.hpp"
#include "tessera/testing/instrumented_comm.hpp"
#include "tessera/testing/run_ranks.hpp"
