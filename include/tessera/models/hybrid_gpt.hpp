#pragma once
/// @file
/// HybridGPT: GPT-2 trained with Hybrid over a dp x pp x tp Mesh -- nothing but Hybrid built
/// from the GPT's one description (sequential_stages of GPTDescription, the vocab-parallel
/// loss checked against the head's layout by sequential_loss) -- and its sampling entry point,
/// the full next-token logits on every rank.

#include <concepts>
#include <cstdint>
#include <optional>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/parallel/hybrid/hybrid.hpp"
#include "tessera/parallel/hybrid/sequential_model.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/parallel/tensor/vocab_parallel_cross_entropy.hpp"

namespace tessera {

/// How HybridGPT lays the GPT's layers over the tp axis.
struct HybridGPTOptions {
  /// Sequence parallelism (Korthikanti et al. 2022): activations (b, T / tp, d) inside and
  /// between the stages, LayerNorms on this rank's positions; T must be divisible by tp.
  bool sequence_parallel = false;
};

/// GPT(config, seed) trained over `mesh` with Hybrid: pp * virtual_stages SequentialStages of
/// GPTDescription cut by `partition` (default: gpt_balanced_partition), every layer
/// tensor-parallel over tp; VocabParallelCrossEntropy (sum) on the head's vocab-split logits.
/// The optimizer is outside (DistributedOptimizer over it). Every parameter starts as the
/// slice of GPT's init, whatever the layout, so every layout trains the single-rank model.
///
/// Inputs of forward_backward: tokens (b, T) int32 and targets (b, T) int32, this dp rank's
/// rows, b at least num_microbatches. Collective over the mesh's world. Throws tessera::Error
/// naming the values when tp does not divide n_head, the partition does not cut n_layer + 2
/// layers into pp * virtual_stages stages, or as Hybrid.
template <std::floating_point T>
class HybridGPT : public Hybrid<T> {
 public:
  /// Builds this rank's stages. Collective over the mesh's world.
  HybridGPT(Mesh& mesh, const GPTConfig& config, std::uint64_t seed, const HybridOptions& options = {},
            std::optional<StagePartition> partition = std::nullopt, const HybridGPTOptions& gpt_options = {})
      : HybridGPT(mesh, GPTDescription<T>(config, seed), options,
                  checked_partition(partition ? *partition
                                              : gpt_balanced_partition(config, checked_stages(config, mesh, options)),
                                    config, mesh, options),
                  gpt_options) {}

  /// The logits of the next token after `tokens` (1, T), over the whole vocabulary (the tp
  /// shards gathered, padding dropped): vocab_size values, the same on every rank. Forward
  /// only; under sequence parallelism T is padded at the end to a multiple of tp (T + padding
  /// must not exceed n_positions). Collective over pp and tp (every rank of the world may call
  /// it together).
  std::vector<T> next_token_logits(const Tensor<std::int32_t>& tokens) {
    TESSERA_EXPECTS(tokens.rank() == 2 && tokens.size(0) == 1, "HybridGPT::next_token_logits: tokens of shape ",
                    tokens.shape(), " are not (1, T)");
    const std::int64_t Tn = tokens.size(1), tp = this->tp().size();
    Tensor<std::int32_t> x = tokens;
    if (sequence_parallel_ && Tn % tp != 0) {
      // Split along T, the sequence must divide over tp: pad at the end. The causal mask keeps
      // the padding out of position Tn - 1, whose logits are the ones returned.
      x = Tensor<std::int32_t>(Shape{1, (Tn + tp - 1) / tp * tp});
      x.slice(1, 0, Tn).copy_from(tokens);
    }
    const Tensor<T> logits = this->forward_only(x);  // (1, T, V_pad / tp)
    const std::int64_t w = logits.size(2);
    std::vector<T> mine(logits.data() + (Tn - 1) * w, logits.data() + Tn * w);
    std::vector<T> all(static_cast<std::size_t>(w * this->tp().size()));
    this->tp().all_gather(mine, all);
    all.resize(static_cast<std::size_t>(config_.vocab_size));
    return all;
  }
  /// The model's sizes.
  const GPTConfig& config() const noexcept { return config_; }
  /// How the layers are cut into stages.
  const StagePartition& partition() const noexcept { return partition_; }

 private:
  using StageFactory = typename Hybrid<T>::StageFactory;

  HybridGPT(Mesh& mesh, const GPTDescription<T>& d, const HybridOptions& options, StagePartition partition,
            const HybridGPTOptions& gpt_options)
      : Hybrid<T>(
            mesh,
            gpt_options.sequence_parallel ? StageFactory(sequential_stages<Shard<1>>(d, partition))
                                          : StageFactory(sequential_stages<Replicate>(d, partition)),
            [v = d.config.vocab_size](Comm tp) {
              return sequential_loss<GPTDescription<T>>(
                  VocabParallelCrossEntropy<T>(std::move(tp), v, {.reduction = nn::Reduction::sum}));
            },
            options),
        config_(d.config),
        partition_(std::move(partition)),
        sequence_parallel_(gpt_options.sequence_parallel) {}

  static int checked_stages(const GPTConfig& config, Mesh& mesh, const HybridOptions& options) {
    const int stages = mesh.shape().pp * options.virtual_stages;
    TESSERA_EXPECTS(stages <= gpt_pipeline_num_layers(config), "HybridGPT: pp(", mesh.shape().pp, ") x virtual_stages(",
                    options.virtual_stages, ") = ", stages, " stages, but a GPT with n_layer=", config.n_layer,
                    " has only ", gpt_pipeline_num_layers(config), " pipeline layers (embedding, blocks, head)");
    return stages;
  }

  static StagePartition checked_partition(StagePartition p, const GPTConfig& config, Mesh& mesh,
                                          const HybridOptions& options) {
    const int stages = mesh.shape().pp * options.virtual_stages;
    TESSERA_EXPECTS(p.num_layers() == gpt_pipeline_num_layers(config), "HybridGPT: the partition cuts ", p.num_layers(),
                    " layers, but a GPT with n_layer=", config.n_layer, " has ", gpt_pipeline_num_layers(config),
                    " pipeline layers (embedding, blocks, head)");
    TESSERA_EXPECTS(p.num_stages() == stages, "HybridGPT: the partition has ", p.num_stages(), " stages, but pp(",
                    mesh.shape().pp, ") x virtual_stages(", options.virtual_stages, ") = ", stages);
    return p;
  }

  GPTConfig config_;
  StagePartition partition_;
  bool sequence_parallel_ = false;
};

}  // namespace tessera
