#pragma once
/// @file
/// HybridGPT: the reference GPT-2 (nn::GPT) trained with Hybrid over a dp x pp x tp Mesh --
/// stages of TensorParallelGPTStage, the vocab-parallel loss, AdamW (optionally ZeRO-1) -- and
/// its sampling entry point, the full next-token logits on every rank.

#include <concepts>
#include <cstdint>
#include <optional>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/nn/gpt.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/hybrid.hpp"
#include "tessera/parallel/pipeline_gpt.hpp"
#include "tessera/parallel/stage_partition.hpp"
#include "tessera/parallel/tensor_parallel_gpt_stage.hpp"

namespace tessera {

/// The GPT's pipeline layers (embedding, blocks, head) cut into `num_stages` stages balanced
/// by parameter count (gpt_pipeline_layer_costs). Throws tessera::Error when there are more
/// stages than layers (n_layer + 2).
inline StagePartition gpt_balanced_partition(const nn::GPTConfig& config, int num_stages) {
  return StagePartition::balanced(gpt_pipeline_layer_costs(config), num_stages, gpt_pipeline_layer_names(config));
}

/// nn::GPT(config, seed) trained over `mesh` with Hybrid: pp * virtual_stages stages of
/// TensorParallelGPTStage cut by `partition` (default: gpt_balanced_partition), each
/// tensor-parallel over tp; VocabParallelGPTLoss; AdamW with `opt` (sharded over dp with
/// HybridOptions::zero1). Every parameter starts as the slice of nn::GPT's init, whatever the
/// layout, so every layout trains the single-rank model.
///
/// Inputs of forward_backward: tokens (b, T) int32 and targets (b, T) int32, this dp rank's
/// rows, b at least num_microbatches. Collective over the mesh's world. Throws tessera::Error
/// naming the values when tp does not divide n_head, the partition does not cut n_layer + 2
/// layers into pp * virtual_stages stages, or as Hybrid.
template <std::floating_point T>
class HybridGPT : public Hybrid<T> {
 public:
  /// Builds this rank's stages. Collective over the mesh's world.
  HybridGPT(Mesh& mesh, const nn::GPTConfig& config, std::uint64_t seed, const HybridOptions& options = {},
            const optim::AdamWOptions& opt = {}, std::optional<StagePartition> partition = std::nullopt)
      : HybridGPT(mesh, config, seed, options, opt,
                  partition ? *partition : gpt_balanced_partition(config, checked_stages(config, mesh, options)), 0) {}

  /// The logits of the next token after `tokens` (1, T), over the whole vocabulary (the tp
  /// shards gathered, padding dropped): vocab_size values, the same on every rank. Forward
  /// only. Collective over pp and tp (every rank of the world may call it together).
  std::vector<T> next_token_logits(const Tensor<std::int32_t>& tokens) {
    TESSERA_EXPECTS(tokens.rank() == 2 && tokens.size(0) == 1, "HybridGPT::next_token_logits: tokens of shape ",
                    tokens.shape(), " are not (1, T)");
    const Tensor<T> logits = this->forward_only(tokens);  // (1, T, V_pad / tp)
    const std::int64_t Tn = logits.size(1), w = logits.size(2);
    std::vector<T> mine(logits.data() + (Tn - 1) * w, logits.data() + Tn * w);
    std::vector<T> all(static_cast<std::size_t>(w * this->tp().size()));
    this->tp().all_gather(mine, all);
    all.resize(static_cast<std::size_t>(config_.vocab_size));
    return all;
  }
  /// The model's sizes.
  const nn::GPTConfig& config() const noexcept { return config_; }
  /// How the layers are cut into stages.
  const StagePartition& partition() const noexcept { return partition_; }

 private:
  HybridGPT(Mesh& mesh, const nn::GPTConfig& config, std::uint64_t seed, const HybridOptions& options,
            const optim::AdamWOptions& opt, StagePartition partition, int)
      : Hybrid<T>(
            mesh,
            [config, seed, partition](int s, Comm tp) {
              return make_tensor_parallel_gpt_stage<T>(config, seed, partition, s, std::move(tp));
            },
            [config](Comm tp) { return PipelineLoss<T>(VocabParallelGPTLoss<T>(config.vocab_size, std::move(tp))); },
            options, opt),
        config_(config),
        partition_(std::move(partition)) {}

  static int checked_stages(const nn::GPTConfig& config, Mesh& mesh, const HybridOptions& options) {
    const int stages = mesh.shape().pp * options.virtual_stages;
    TESSERA_EXPECTS(stages <= gpt_pipeline_num_layers(config), "HybridGPT: pp(", mesh.shape().pp, ") x virtual_stages(",
                    options.virtual_stages, ") = ", stages, " stages, but a GPT with n_layer=", config.n_layer,
                    " has only ", gpt_pipeline_num_layers(config), " pipeline layers (embedding, blocks, head)");
    return stages;
  }

  nn::GPTConfig config_;
  StagePartition partition_;
};

}  // namespace tessera
