#pragma once
/// @file
/// Umbrella header of the parallel policies: DataParallel, ZeroOptimizer, ParameterServer,
/// TensorParallel (ColumnParallel, RowParallel, vocab-parallel embedding and loss, sequence
/// parallelism), PipelineParallel, and Hybrid / HybridGPT over a Mesh. Needs neither MPI nor
/// CUDA. Checkpoints of a Hybrid model: tessera/checkpoint/hybrid_state.hpp.

#include "tessera/parallel/column_parallel.hpp"
#include "tessera/parallel/data_parallel.hpp"
#include "tessera/parallel/dp_replicas.hpp"
#include "tessera/parallel/dropout.hpp"
#include "tessera/parallel/grad_buckets.hpp"
#include "tessera/parallel/hybrid.hpp"
#include "tessera/parallel/hybrid_gpt.hpp"
#include "tessera/parallel/layouts.hpp"
#include "tessera/parallel/mappings.hpp"
#include "tessera/parallel/parameter_server.hpp"
#include "tessera/parallel/parameter_server_layout.hpp"
#include "tessera/parallel/pipeline_gpt.hpp"
#include "tessera/parallel/pipeline_loss.hpp"
#include "tessera/parallel/pipeline_parallel.hpp"
#include "tessera/parallel/pipeline_stage.hpp"
#include "tessera/parallel/row_parallel.hpp"
#include "tessera/parallel/sharding.hpp"
#include "tessera/parallel/stage_chain.hpp"
#include "tessera/parallel/stage_partition.hpp"
#include "tessera/parallel/static_stage_partition.hpp"
#include "tessera/parallel/tensor_parallel.hpp"
#include "tessera/parallel/tensor_parallel_gpt.hpp"
#include "tessera/parallel/tensor_parallel_gpt_stage.hpp"
#include "tessera/parallel/tensor_parallel_plan.hpp"
#include "tessera/parallel/tensor_parallel_shard.hpp"
#include "tessera/parallel/vocab_parallel_cross_entropy.hpp"
#include "tessera/parallel/vocab_parallel_embedding.hpp"
#include "tessera/parallel/zero_optimizer.hpp"
#include "tessera/tessera.hpp"
