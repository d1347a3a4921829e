#pragma once
/// @file
/// Umbrella header of the parallel policies: DataParallel, ZeroOptimizer, DistributedOptimizer, ParameterServer,
/// TensorParallel (ColumnParallel, RowParallel, vocab-parallel embedding and loss, sequence
/// parallelism), PipelineParallel, and Hybrid / HybridGPT over a Mesh. Needs neither MPI nor
/// CUDA. Checkpoints of a Hybrid model: tessera/checkpoint/hybrid_state.hpp.

#include "tessera/parallel/tensor/column_parallel.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/parallel/data/dp_replicas.hpp"
#include "tessera/parallel/tensor/dropout.hpp"
#include "tessera/parallel/data/grad_buckets.hpp"
#include "tessera/parallel/hybrid/data_parallel_stage.hpp"
#include "tessera/parallel/hybrid/hybrid.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/tensor/mappings.hpp"
#include "tessera/parallel/ps/parameter_server.hpp"
#include "tessera/parallel/ps/parameter_server_layout.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/parallel/pipeline/pipeline_loss.hpp"
#include "tessera/parallel/pipeline/pipeline_parallel.hpp"
#include "tessera/parallel/pipeline/pipeline_stage.hpp"
#include "tessera/parallel/tensor/row_parallel.hpp"
#include "tessera/parallel/hybrid/sequential_model.hpp"
#include "tessera/parallel/tensor/sharding.hpp"
#include "tessera/parallel/pipeline/stage_chain.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/parallel/pipeline/static_stage_partition.hpp"
#include "tessera/parallel/tensor/tensor_parallel.hpp"
#include "tessera/parallel/tensor/tensor_parallel_layer.hpp"
#include "tessera/parallel/tensor/tensor_parallel_plan.hpp"
#include "tessera/parallel/tensor/tensor_parallel_shard.hpp"
#include "tessera/parallel/tensor/vocab_parallel_cross_entropy.hpp"
#include "tessera/parallel/tensor/vocab_parallel_embedding.hpp"
#include "tessera/parallel/data/zero_optimizer.hpp"
#include "tessera/tessera.hpp"
