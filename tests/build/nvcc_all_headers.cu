// Every public header of tessera compiled by nvcc in one translation unit: the library is
// header-only and a user's CUDA program includes it under nvcc (whose front end has crashed on
// C++20 forms that g++ and clang++ accept: inherited constructors with a defaulted source
// location, a requires-parameter naming a decltype of declval). The kernels' headers (.cuh) are
// included too, so each one's templates are at least parsed.
#include "tessera/tessera.hpp"
#include "tessera/parallel.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/caching_allocator.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/phase_timer.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_pipeline.cuh"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/flash_attention_math.hpp"
#include "tessera/cuda/flat_gpt_layout.hpp"
#include "tessera/cuda/ops/adamw.cuh"
#include "tessera/cuda/ops/attention.cuh"
#include "tessera/cuda/ops/bias_grad.cuh"
#include "tessera/cuda/ops/cross_entropy.cuh"
#include "tessera/cuda/ops/dropout.cuh"
#include "tessera/cuda/ops/embedding.cuh"
#include "tessera/cuda/ops/flash_attention.cuh"
#include "tessera/cuda/ops/gelu.cuh"
#include "tessera/cuda/ops/gemm_epilogue.cuh"
#include "tessera/cuda/ops/global_norm.cuh"
#include "tessera/cuda/ops/layer_norm.cuh"
#include "tessera/cuda/ops/residual_add.cuh"
#include "tessera/cuda/ops/vocab_parallel_cross_entropy.cuh"
#include "tessera/cuda/stream.hpp"
#include "tessera/cuda/thread_device_comm.cuh"

// Instantiate the device model in both precisions, so its templates are compiled, not only parsed.
template class tessera::cuda::DeviceGPT<float>;
template class tessera::cuda::DeviceGPT<tessera::cuda::bf16>;
