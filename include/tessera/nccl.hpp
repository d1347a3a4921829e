#pragma once
/// @file
/// Umbrella header of the NCCL + CUDA backend: tessera::nccl::make_communicator,
/// NcclCommunicator, DeviceBuffer, device_count / available. Include it only where CUDA and
/// NCCL are installed (Meson: `dependency('tessera-nccl')`); tessera.hpp never includes it.
///
/// Typical use, one process (or thread) per GPU, bootstrapped over MPI or threads:
/// ```cpp
/// tessera::Comm world = /* threads or MPI world */;
/// tessera::Comm gpu = tessera::nccl::make_communicator(world, /*device=*/world.rank());
/// tessera::nccl::DeviceBuffer<float> grad(host_grad);   // copy to the device
/// gpu.all_reduce(grad.span(), tessera::ReduceOp::avg);  // device pointers, NCCL on the GPU
/// host_grad = grad.to_host();
/// ```

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/nccl/device.hpp"
#include "tessera/comm/nccl/device_buffer.hpp"
#include "tessera/comm/nccl/nccl_communicator.hpp"
#include "tessera/comm/nccl/nccl_error.hpp"
