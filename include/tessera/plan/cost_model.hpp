#pragma once
/// @file
/// CostModel: the seconds and bytes of each piece of one training step for a model, a
/// cluster and a layout -- a block's forward and backward (GEMMs, memory-bound work, tensor-
/// parallel collectives), a stage's, a pipeline hand-off, the dp reduction and the optimizer.

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/plan/bucket_layout.hpp"
#include "tessera/plan/cluster.hpp"
#include "tessera/plan/layer_activations.hpp"
#include "tessera/plan/layout.hpp"
#include "tessera/plan/model_spec.hpp"
#include "tessera/plan/precision.hpp"

namespace tessera::plan {

/// Seconds of one piece of work on one device, split into computation, the tensor-parallel
/// collectives it waits for (Megatron-LM's tp all-reduces are not overlapped) and, under
/// ZeRO-3, the dp collectives inside it (the parameter all-gathers before a forward or a
/// backward, the gradient reduce-scatter in a backward; charged as not overlapped).
struct WorkTime {
  double compute = 0;  ///< GEMMs and memory-bound kernels, seconds
  double tp_comm = 0;  ///< tensor-parallel collectives, seconds
  double dp_comm = 0;  ///< ZeRO-3's dp collectives inside this work, seconds
  /// compute + tp_comm + dp_comm.
  double total() const { return compute + tp_comm + dp_comm; }
  /// Adds `o` piecewise.
  WorkTime& operator+=(const WorkTime& o) {
    compute += o.compute;
    tp_comm += o.tp_comm;
    dp_comm += o.dp_comm;
    return *this;
  }
  /// This less `o`, piecewise.
  WorkTime minus(const WorkTime& o) const { return {compute - o.compute, tp_comm - o.tp_comm, dp_comm - o.dp_comm}; }
  /// `k` times this piecewise.
  WorkTime times(double k) const { return {compute * k, tp_comm * k, dp_comm * k}; }
};

/// One matrix multiplication of a block's forward on one device: `batch` independent GEMMs
/// of `flops` each (batch > 1 for the attention core's per-head products).
struct Gemm {
  std::string name{};  ///< e.g. "QKV projection"
  double flops = 0;    ///< floating-point operations of one GEMM, 2 M N K
  double batch = 1;    ///< how many such GEMMs
};

/// The cost of every piece of a step of `model` on `cluster` under `layout`, per device.
///
/// Model (stated here, used everywhere): a GEMM of f flops runs at peak * efficiency(f) (the
/// cluster's curve; a backward GEMM has the shape, and so the efficiency, of its forward);
/// memory-bound work (LayerNorm, softmax, GeLU, dropout, residual adds) moves, per forward,
/// twice the bytes the block would keep for backward without recomputation (each such tensor
/// is written by one kernel and read by the next) and twice that per backward, at the
/// device's memory bandwidth -- for tessera's own block, twice the bytes of each element-wise
/// kernel's input instead (layer_memory_bytes); a tensor-parallel all-reduce
/// of S bytes over t devices is a ring: 2 (t-1)/t S / bandwidth + 2 (t-1) latency (sequence
/// parallelism's all-gather plus reduce-scatter move the same bytes). Full recomputation adds
/// one forward to each backward, selective the attention core (Korthikanti et al. 2022).
struct CostModel {
  ModelSpec model{};     ///< the transformer
  Cluster cluster{};     ///< the machine
  Layout layout{};       ///< how it is run
  Precision precision{};  ///< bytes per element

  /// Seconds of one GEMM of `flops` flops: flops / (peak * efficiency(flops)).
  double gemm_seconds(double flops) const {
    return flops / (cluster.peak_flops * cluster.gemm_efficiency.at(flops));
  }

  /// Ranks one node holds: min(world, devices_per_node).
  int ranks_per_node() const { return std::min(layout.world(), cluster.devices_per_node); }

  /// Seconds of memory-bound work moving `bytes`: bytes / memory_bandwidth.
  double memory_seconds(double bytes) const { return bytes / cluster.memory_bandwidth; }

  /// The GEMMs of one block's forward on one device for one micro-batch (tp splits the
  /// projections' output or input width and the heads). Their flops add up to
  /// 24 b s h^2 (1 + s / (6 h)) / tp when ffn = 4h and kv_heads = heads (Narayanan et al. 2021).
  std::vector<Gemm> layer_gemms() const {
    const double s = model.seq, b = layout.microbatch_size, h = model.hidden, t = layout.tp;
    const double kv = static_cast<double>(model.kv_dim()), f = static_cast<double>(model.ffn_size());
    const double tokens = s * b, dh = model.head_dim(), heads_here = model.heads / t;
    return {{"QKV projection", 2 * tokens * h * (h + 2 * kv) / t, 1},
            {"attention scores Q K^T", 2 * s * s * dh, b * heads_here},
            {"attention over V", 2 * s * s * dh, b * heads_here},
            {"output projection", 2 * tokens * h * h / t, 1},
            {"MLP first linear", 2 * tokens * h * f / t, 1},
            {"MLP second linear", 2 * tokens * f * h / t, 1}};
  }

  /// Seconds of a ring all-reduce of `bytes` over `n` devices at `bandwidth` bytes/s with
  /// `latency` seconds per step: 2 (n-1)/n bytes / bandwidth + 2 (n-1) latency; 0 when n = 1.
  static double all_reduce_seconds(double bytes, int n, double bandwidth, double latency) {
    if (n <= 1) return 0.0;
    return 2.0 * (n - 1) / n * bytes / bandwidth + 2.0 * (n - 1) * latency;
  }

  /// Tensor-parallel all-reduces in one block's forward: Megatron-LM's g after the attention
  /// and after the MLP. With sequence parallelism each is a reduce-scatter plus an all-gather
  /// moving the same bytes. (tessera's TensorParallel<nn::Block> issues these; tests/plan
  /// counts them on an instrumented run.)
  static constexpr int tp_all_reduces_forward = 2;
  /// Tensor-parallel all-reduces in one block's backward: f's backward before the attention and
  /// before the MLP (a recomputed forward adds tp_all_reduces_forward more).
  static constexpr int tp_all_reduces_backward = 2;

  /// Elements of one tensor-parallel all-reduce: one micro-batch's activations, b s h.
  double tp_all_reduce_elements() const {
    return static_cast<double>(model.seq) * layout.microbatch_size * model.hidden;
  }

  /// Seconds of one tensor-parallel all-reduce of tp_all_reduce_elements() activations, inside
  /// a node when tp fits in one, else across nodes.
  double tp_all_reduce_seconds() const { return tp_all_reduce_seconds(precision.activation_bytes * tp_all_reduce_elements()); }

  /// Seconds of one tensor-parallel all-reduce of `bytes` (inside a node when tp fits in one).
  double tp_all_reduce_seconds(double bytes) const {
    const bool inside = layout.tp <= cluster.devices_per_node;
    return all_reduce_seconds(bytes, layout.tp, inside ? cluster.intra_node_bandwidth : cluster.inter_node_bandwidth_per_device(),
                              inside ? cluster.intra_node_latency : cluster.inter_node_latency);
  }

  /// The vocabulary-parallel cross-entropy's all-reduces per micro-batch (tessera's
  /// VocabParallelCrossEntropy, Megatron-LM's): the row maximum and the target's logit (b s
  /// activations each) and the sums of exponentials (b s doubles): 3 of b s elements.
  static constexpr int tp_cross_entropy_all_reduces = 3;

  /// Elements the tensor-parallel collectives of one micro-batch's F and B of `stage` move on one
  /// device (the all-reduces' buffers; with sequence parallelism each all-reduce is a
  /// reduce-scatter plus an all-gather of the same tensor): per block tp_all_reduces_forward +
  /// tp_all_reduces_backward (+ forward's again under full recomputation) of b s h; on the first
  /// stage the vocab-parallel embedding's b s h (twice under full recomputation: the stage's
  /// forward is rerun from its input tokens); on the last the head's input gradient (b s h)
  /// and the cross-entropy's tp_cross_entropy_all_reduces of b s. tests/plan checks it against
  /// the collectives of an instrumented HybridGPT step.
  double tp_elements_per_microbatch(int stage) const {
    if (layout.tp <= 1) return 0.0;
    const double bsh = tp_all_reduce_elements(), bs = static_cast<double>(model.seq) * layout.microbatch_size;
    const int per_block = tp_all_reduces_forward + tp_all_reduces_backward +
                          (layout.recompute == Recompute::full ? tp_all_reduces_forward : 0);
    double e = per_block * bsh * stage_layers(stage);
    if (stage == 0) e += bsh * (layout.recompute == Recompute::full ? 2 : 1);  // recomputed with the stage
    if (stage == layout.num_stages() - 1) e += bsh + tp_cross_entropy_all_reduces * bs;
    return e;
  }

  /// One element-wise kernel of a block's forward and the elements it runs over on one device
  /// for one micro-batch.
  struct ElementwisePass {
    std::string name{};   ///< e.g. "GELU"
    double elements = 0;  ///< elements of its input
  };

  /// The element-wise kernels of tessera's nn::Block between its GEMMs, per forward on one
  /// device for one micro-batch: ln_1 and ln_2 (s b h each; / tp with sequence parallelism),
  /// the causal softmax over the attention scores (a s^2 b / tp) and the GELU (s b ffn / tp).
  /// (The two residual adds are left out: they read two tensors and write one with no
  /// arithmetic to speak of; on this machine they took 1% of a block's time.) Empty for other
  /// blocks, whose memory-bound work is charged from their kept tensors (layer_memory_bytes).
  std::vector<ElementwisePass> layer_elementwise_passes() const {
    if (!model.tessera_block) return {};
    const double s = model.seq, b = layout.microbatch_size, h = model.hidden, t = layout.tp;
    const double outside = layout.sequence_parallel ? 1.0 / t : 1.0;
    return {{"ln_1", s * b * h * outside},
            {"attention softmax", model.heads * s * s * b / t},
            {"ln_2", s * b * h * outside},
            {"GELU", s * b * static_cast<double>(model.ffn_size()) / t}};
  }

  /// Bytes of memory-bound work charged to one block's forward for one micro-batch (its
  /// backward is charged twice this). tessera's block: 2 x the bytes of each element-wise
  /// kernel's input (layer_elementwise_passes), the unit in which Calibration measures the
  /// element-wise rate (a GELU or LayerNorm forward + backward over E elements of B bytes is
  /// charged 6 E B), so the calibrated bandwidth reproduces these kernels' time. Other blocks
  /// (Korthikanti et al.'s, with dropout): twice the bytes LayerActivations lists without
  /// recomputation (each kept tensor written by one kernel and read by the next).
  double layer_memory_bytes() const {
    if (model.tessera_block) {
      double elements = 0;
      for (const ElementwisePass& p : layer_elementwise_passes()) elements += p.elements;
      return 2 * precision.activation_bytes * elements;
    }
    Layout keep_all = layout;
    keep_all.recompute = Recompute::none;
    return 2 * LayerActivations::of(model, keep_all, precision).bytes();
  }

  /// One block's forward for one micro-batch: its GEMMs, its memory-bound work
  /// (layer_memory_bytes), and two tp all-reduces (Megatron-LM's g after attention and after
  /// the MLP).
  WorkTime layer_forward() const {
    WorkTime w;
    for (const Gemm& g : layer_gemms()) w.compute += g.batch * gemm_seconds(g.flops);
    w.compute += memory_seconds(layer_memory_bytes());
    w.compute += block_overhead_seconds() / 3;  // the backward (twice the forward) gets the other 2/3
    w.tp_comm = tp_all_reduces_forward * tp_all_reduce_seconds();
    return w;
  }

  /// tessera's block only: the measured work the GEMM and element-wise terms do not list, per
  /// forward + backward of one block on one micro-batch of b s tokens on one device
  /// (Cluster::block_pass_overhead + block_token_overhead x b s x block_token_overhead_share());
  /// 0 for other blocks.
  double block_overhead_seconds() const {
    if (!model.tessera_block) return 0.0;
    return cluster.block_pass_overhead + cluster.block_token_overhead * static_cast<double>(model.seq) *
                                             layout.microbatch_size * block_token_overhead_share();
  }

  /// The share of a whole block's per-token overhead that one tensor-parallel rank does (1 at
  /// tp 1). calibrate measures it on a whole block; the overhead (bias and residual adds, the
  /// heads' reshapes, fresh tensors) is charged in proportion to the widths of the per-token
  /// tensors it touches: 6 h replicated on every rank (the two LayerNorm outputs, the attention
  /// and MLP outputs after their all-reduce, the two residual sums; divided by tp too with
  /// sequence parallelism) and h + 2 kv + h + 2 ffn split by tp (the QKV projection's output,
  /// the attention output, the MLP's hidden before and after the GELU). E.g. h 192, ffn 768:
  /// 2/3 at tp 2.
  double block_token_overhead_share() const {
    const double h = model.hidden, kv = static_cast<double>(model.kv_dim()), f = static_cast<double>(model.ffn_size());
    const double t = layout.tp, replicated = 6 * h, split = 2 * h + 2 * kv + 2 * f;
    const double replicated_here = layout.sequence_parallel ? replicated / t : replicated;
    return (replicated_here + split / t) / (replicated + split);
  }

  /// The attention core alone (scores, softmax, dropout, product with V): what selective
  /// recomputation reruns.
  WorkTime attention_core_forward() const {
    WorkTime w;
    for (const Gemm& g : layer_gemms())
      if (g.name.rfind("attention", 0) == 0) w.compute += g.batch * gemm_seconds(g.flops);
    const double s = model.seq, b = layout.microbatch_size, a = model.heads, t = layout.tp;
    const double mask = model.dropout && !model.tessera_block ? 1.0 : 0.0;
    w.compute += memory_seconds((2 * precision.activation_bytes + mask) * a * s * s * b / t);
    return w;
  }

  /// One block's backward for one micro-batch: twice the forward's GEMMs and memory-bound
  /// work, tp_all_reduces_backward tp all-reduces, plus the recomputation the layout asks for.
  WorkTime layer_backward() const {
    const WorkTime fwd = layer_forward();
    WorkTime w{2 * fwd.compute, tp_all_reduces_backward * tp_all_reduce_seconds()};
    if (layout.recompute == Recompute::full) w += fwd;
    if (layout.recompute == Recompute::selective) w += attention_core_forward();
    return w;
  }

  /// The weight-gradient half of one block's backward (zero-bubble's W pass, Qi et al. 2024):
  /// dW = x^T dy for the QKV, output and two MLP linears, one GEMM of each one's forward shape;
  /// no collective and no recomputation (they belong to the input-gradient half).
  WorkTime layer_backward_weight() const {
    WorkTime w;
    for (const Gemm& g : layer_gemms())
      if (g.name.rfind("attention", 0) != 0) w.compute += g.batch * gemm_seconds(g.flops);
    return w;
  }

  /// The input-gradient half of one block's backward (zero-bubble's I pass, what the previous
  /// stage waits for): layer_backward() less layer_backward_weight() -- the linears' dx GEMMs,
  /// the attention core's backward, the memory-bound work, the tp all-reduces and any
  /// recomputation. I + W = B exactly.
  WorkTime layer_backward_input() const { return layer_backward().minus(layer_backward_weight()); }

  /// The blocks held by `stage` (of layout.num_stages()): an even share; when the stages do
  /// not divide the blocks, the extra blocks go to the inner stages first, then to the first
  /// and the last (which also hold the embedding and the head). Throws Error if a stage would
  /// hold no block.
  int stage_layers(int stage) const {
    const int S = layout.num_stages(), L = model.layers;
    TESSERA_EXPECTS(L >= S, "CostModel: ", L, " layers cannot fill ", S, " pipeline stages (pp ", layout.pp,
                    " x virtual_stages ", layout.virtual_stages, ")");
    TESSERA_EXPECTS(stage >= 0 && stage < S, "CostModel: stage ", stage, " is outside [0, ", S, ")");
    const int base = L / S, extra = L % S;
    // Preference order for the extra blocks: 1, 2, ..., S-2, then 0, then S-1.
    int rank_in_order = 0;
    if (S <= 2) rank_in_order = stage;
    else if (stage == 0) rank_in_order = S - 2;
    else if (stage == S - 1) rank_in_order = S - 1;
    else rank_in_order = stage - 1;
    return base + (rank_in_order < extra ? 1 : 0);
  }

  /// The input embedding's forward (first stage): writing b s h activations and, with tp, the
  /// vocab-parallel embedding's all-reduce.
  WorkTime embedding_forward() const {
    const double bytes = precision.activation_bytes * model.seq * layout.microbatch_size * model.hidden;
    return {memory_seconds(bytes), tp_all_reduce_seconds(), 0.0};
  }

  /// The LM head's forward on the last stage: the logits GEMM (2 b s h V / tp flops) and the
  /// cross-entropy's fp32 pass over the logits; with tp, the vocab-parallel cross-entropy's
  /// tp_cross_entropy_all_reduces small all-reduces.
  WorkTime head_forward() const {
    const double tokens = model.seq * layout.microbatch_size;
    const double flops = 2 * tokens * model.hidden * model.vocab / layout.tp;
    const double ce = 2 * tp_all_reduce_seconds(precision.activation_bytes * tokens) + tp_all_reduce_seconds(8.0 * tokens);
    return {gemm_seconds(flops) + memory_seconds(2 * 4.0 * tokens * model.vocab / layout.tp), ce, 0.0};
  }

  /// The LM head's backward: two GEMMs of the forward's shape and the gradient of the logits;
  /// with tp, the all-reduce of the head's input gradient (the column-parallel head's f).
  WorkTime head_backward() const {
    const double tokens = model.seq * layout.microbatch_size;
    const double flops = 2 * tokens * model.hidden * model.vocab / layout.tp;
    return {2 * gemm_seconds(flops) + memory_seconds(4.0 * tokens * model.vocab / layout.tp), tp_all_reduce_seconds(),
            0.0};
  }

  /// The LM head's weight-gradient GEMM alone (its W pass; nn::LMHead defers it under ZB-H1).
  WorkTime head_backward_weight() const {
    const double tokens = model.seq * layout.microbatch_size;
    return {gemm_seconds(2 * tokens * model.hidden * model.vocab / layout.tp), 0.0, 0.0};
  }

  /// One forward (F) of `stage` on one micro-batch: its blocks, plus the embedding on stage 0
  /// and the head on the last stage; under ZeRO-3 the all-gather of each of its units first.
  WorkTime stage_forward(int stage) const {
    WorkTime w = layer_forward().times(stage_layers(stage));
    if (stage == 0) w += embedding_forward();
    if (stage == layout.num_stages() - 1) w += head_forward();
    w.dp_comm += zero3_gather_seconds(stage);
    return w;
  }

  /// One backward (B) of `stage` on one micro-batch, with recomputation; under ZeRO-3 the
  /// all-gather of each of its units first and their gradients' reduce-scatter (tessera's
  /// ZeRO-2 and 3 reduce every micro-batch's backward into the shards).
  WorkTime stage_backward(int stage) const {
    WorkTime w = layer_backward().times(stage_layers(stage));
    if (stage == 0 && layout.recompute == Recompute::full) w += embedding_forward();  // rerun with the stage
    if (stage == layout.num_stages() - 1) w += head_backward();
    w.dp_comm += zero3_gather_seconds(stage) + zero3_reduce_scatter_seconds(stage);
    return w;
  }

  /// The input-gradient pass (I) of `stage` on one micro-batch: stage_backward() less
  /// stage_backward_weight().
  WorkTime stage_backward_input(int stage) const { return stage_backward(stage).minus(stage_backward_weight(stage)); }

  /// The weight-gradient pass (W) of `stage` on one micro-batch: its blocks' linears' dW GEMMs,
  /// and the LM head's on the last stage (the embedding's gradient is a scatter, kept in I).
  WorkTime stage_backward_weight(int stage) const {
    WorkTime w = layer_backward_weight().times(stage_layers(stage));
    if (stage == layout.num_stages() - 1) w += head_backward_weight();
    return w;
  }

  /// Bytes of one pipeline hand-off (an activation or its gradient) on one device: b s h
  /// elements, split over tp under sequence parallelism (the activations between stages are
  /// split along the sequence) or Layout::p2p_scatter_gather (Megatron-LM's scatter-gather of
  /// p2p tensors); otherwise every tp rank sends the whole tensor, as tessera's Hybrid does
  /// (tests/plan plan_counts).
  double p2p_bytes() const {
    const int split = layout.sequence_parallel || layout.p2p_scatter_gather ? layout.tp : 1;
    return precision.activation_bytes * model.seq * layout.microbatch_size * model.hidden / split;
  }

  /// The node of the device holding (pp index, dp index 0, tp index 0): rank order tp, dp, pp.
  int node_of_pp_rank(int pp_rank) const { return pp_rank * layout.dp * layout.tp / cluster.devices_per_node; }

  /// Seconds of one hand-off between pipeline ranks `from` and `to`: latency plus bytes over
  /// NVLink inside a node, or over the device's share of the node's network otherwise (every
  /// device of the node sends at once).
  double p2p_seconds(int from, int to) const {
    const bool inside = node_of_pp_rank(from) == node_of_pp_rank(to);
    return inside ? cluster.intra_node_latency + p2p_bytes() / cluster.intra_node_bandwidth
                  : cluster.inter_node_latency + p2p_bytes() / cluster.inter_node_bandwidth_per_device();
  }

  /// Parameters held by one device of pipeline rank `pp_rank`, before ZeRO sharding: the
  /// parameter lists of all its model chunks (zero3_units: the blocks split over tp as
  /// TensorParallel<nn::Block> splits them, LayerNorms and row-parallel biases whole; the token
  /// embedding / tp and the position embedding whole on stage 0; the final LayerNorm, and an
  /// untied head / tp or at pp > 1 the last stage's copy of a tied embedding, on the last).
  /// Exactly the elements a ZeRO-1 Hybrid rank reduce-scatters over dp, less padding (tests/plan
  /// plan_counts); at tp 1 the stages' ModelSpec::layer_parameters and embeddings.
  double rank_parameters(int pp_rank) const {
    double p = 0;
    for (int c = 0; c < layout.virtual_stages; ++c)
      for (const auto& unit : zero3_units(c * layout.pp + pp_rank))
        for (const BucketLayout::Param& q : unit) p += static_cast<double>(q.numel);
    return p;
  }

  /// The distinct parameters of one block on one device, in nn::Block's parameters() order
  /// (ln_1, the QKV and output projections, ln_2, the MLP's two linears: weight then bias),
  /// split over tp as TensorParallel<nn::Block> splits them (column-parallel weights and biases
  /// / tp; row-parallel weights / tp, their biases and the LayerNorms whole). At tp 1 they add
  /// up to ModelSpec::layer_parameters().
  std::vector<BucketLayout::Param> layer_parameter_list() const {
    const std::int64_t h = model.hidden, t = layout.tp, qkv = h + 2 * model.kv_dim(), f = model.ffn_size();
    return {{h, false},         {h, false},         {h * qkv / t, false}, {qkv / t, false}, {h / t * h, false},
            {h, false},         {h, false},         {h, false},           {h * f / t, false}, {f / t, false},
            {f / t * h, false}, {h, false}};
  }

  /// ZeRO-3's units of `stage`, in forward order, each as its parameters in list order: the
  /// stage's layers as SequentialModel lists them (layer_parameters) -- on stage 0 the
  /// embedding (the token embedding, split over tp and, at one stage, tied with the head, and
  /// the position embedding), then the blocks, then on the last stage the head (the final
  /// LayerNorm, and an untied head or, at pp > 1, the last stage's copy of a tied embedding) --
  /// in runs of Layout::zero3_unit_layers layers (DataParallelStage), or one unit for the whole
  /// stage (0, or no more layers than that). Throws what stage_layers throws.
  std::vector<std::vector<BucketLayout::Param>> zero3_units(int stage) const {
    const std::int64_t h = model.hidden, t = layout.tp, v = model.vocab;
    std::vector<std::vector<BucketLayout::Param>> layers;
    // The token embedding counts as tied (a bucket of its own when dp divides it) only when the
    // head shares its stage's parameter list: at one stage. Across stages each holds its own
    // copy (Hybrid sums their gradients over the embedding group).
    const bool tied_here = model.tied && layout.num_stages() == 1;
    if (stage == 0) layers.push_back({{v * h / t, tied_here}, {static_cast<std::int64_t>(model.seq) * h, false}});
    for (int b = 0; b < stage_layers(stage); ++b) layers.push_back(layer_parameter_list());
    if (stage == layout.num_stages() - 1) {
      layers.push_back({{h, false}, {h, false}});
      if (!model.tied || layout.pp > 1) layers.back().push_back({v * h / t, false});
    }
    const int n = static_cast<int>(layers.size());
    const int per = layout.zero3_unit_layers == 0 || layout.zero3_unit_layers >= n ? n : layout.zero3_unit_layers;
    std::vector<std::vector<BucketLayout::Param>> units;
    for (int l = 0; l < n; ++l) {
      if (l % per == 0) units.emplace_back();
      units.back().insert(units.back().end(), layers[static_cast<std::size_t>(l)].begin(),
                          layers[static_cast<std::size_t>(l)].end());
    }
    return units;
  }

  /// The buckets of each of `stage`'s ZeRO-3 units over the dp ranks (BucketLayout: the packing
  /// GradBuckets does, gradient-sized elements, Layout::dp_bucket_bytes and
  /// dp_first_bucket_bytes).
  std::vector<BucketLayout> zero3_buckets(int stage) const {
    std::vector<BucketLayout> out;
    for (const auto& unit : zero3_units(stage))
      out.push_back(BucketLayout::of(unit, layout.dp, layout.dp_bucket_bytes, layout.dp_first_bucket_bytes,
                                     static_cast<std::size_t>(precision.gradient_bytes)));
    return out;
  }

  /// Seconds of a ring all-gather (or reduce-scatter) whose gathered buffer holds `bytes`, over
  /// `n` devices: (n-1)/n bytes / bandwidth + (n-1) latency; 0 when n = 1.
  static double all_gather_seconds(double bytes, int n, double bandwidth, double latency) {
    if (n <= 1) return 0.0;
    return (n - 1.0) / n * bytes / bandwidth + (n - 1.0) * latency;
  }

  /// ZeRO-3 (Layout::zero_stage 3, dp > 1): seconds of the parameter all-gathers before one
  /// forward or one backward of `stage` on one micro-batch -- one per bucket of each unit
  /// (zero3_buckets), of parameter_bytes per element; prefetch overlap is not credited. 0
  /// otherwise.
  double zero3_gather_seconds(int stage) const { return zero3_bucket_seconds(stage, precision.parameter_bytes); }

  /// ZeRO-3: seconds of the gradient reduce-scatters of one backward of `stage` (one per
  /// bucket of each unit, gradient_bytes per element). 0 otherwise.
  double zero3_reduce_scatter_seconds(int stage) const { return zero3_bucket_seconds(stage, precision.gradient_bytes); }

  /// ZeRO-3: seconds of one ring all-gather or reduce-scatter (the same cost in the ring model)
  /// per bucket of each of `stage`'s units, `element_bytes` per element. 0 otherwise.
  double zero3_bucket_seconds(int stage, double element_bytes) const {
    if (layout.zero_stage != 3 || layout.dp == 1) return 0.0;
    double s = 0;
    for (const BucketLayout& u : zero3_buckets(stage))
      for (std::int64_t e : u.padded) s += all_gather_seconds(e * element_bytes, layout.dp, dp_bandwidth(), dp_latency());
    return s;
  }

  /// The dp collectives one device issues per step under ZeRO-3, from the bucket layout:
  /// all-gathers (2 per bucket per micro-batch: before each forward and each backward) and
  /// reduce-scatters (1 per bucket per micro-batch), with the elements of their gathered /
  /// reduced buffers (padding included), summed over the rank's stages. All 0 at dp 1 or
  /// another ZeRO stage.
  struct Zero3Traffic {
    long long all_gathers = 0;          ///< all-gather calls per step
    double all_gather_elements = 0;     ///< elements of the gathered buffers, summed over calls
    long long reduce_scatters = 0;      ///< reduce-scatter calls per step
    double reduce_scatter_elements = 0; ///< elements of the reduced buffers, summed over calls
  };
  /// See Zero3Traffic; `pp_rank`'s stages (all of its model chunks).
  Zero3Traffic zero3_traffic(int pp_rank) const {
    Zero3Traffic t;
    if (layout.zero_stage != 3 || layout.dp == 1) return t;
    const long long m = layout.num_microbatches;
    for (int c = 0; c < layout.virtual_stages; ++c)
      for (const BucketLayout& u : zero3_buckets(c * layout.pp + pp_rank)) {
        t.all_gathers += 2 * m * static_cast<long long>(u.size());
        t.all_gather_elements += 2.0 * m * static_cast<double>(u.padded_elements());
        t.reduce_scatters += m * static_cast<long long>(u.size());
        t.reduce_scatter_elements += static_cast<double>(m) * static_cast<double>(u.padded_elements());
      }
    return t;
  }

  /// Latency of one step of a dp collective: inside a node when the dp x tp devices fit in one.
  double dp_latency() const {
    return layout.dp * layout.tp <= cluster.devices_per_node ? cluster.intra_node_latency : cluster.inter_node_latency;
  }

  /// Bandwidth of one device's dp reduction, bytes/s: NVLink when the dp group fits in a node,
  /// else the node's network shared by the min(tp, devices_per_node) dp groups of the node
  /// (a ring crosses each node boundary once per channel, so a group gets its node's share).
  double dp_bandwidth() const {
    if (layout.dp * layout.tp <= cluster.devices_per_node) return cluster.intra_node_bandwidth;
    const int groups = std::min(layout.tp, cluster.devices_per_node);
    return std::min(cluster.intra_node_bandwidth, cluster.inter_node_bandwidth / groups);
  }

  /// Seconds of the dp gradient reduction of pp rank `pp_rank`'s parameters after the
  /// pipeline flush: an all-reduce (ZeRO 0), a reduce-scatter plus an all-gather (ZeRO 1 and 2;
  /// the same bytes). 0 under ZeRO-3, whose reduce-scatters and all-gathers are charged inside
  /// each F and B (stage_forward, stage_backward), and when dp = 1.
  double dp_reduce_seconds(int pp_rank) const {
    if (layout.zero_stage == 3) return 0.0;
    const double bytes = rank_parameters(pp_rank) * precision.gradient_bytes;
    return all_reduce_seconds(bytes, layout.dp, dp_bandwidth(), dp_latency());
  }

  /// Seconds of summing the tied embedding's gradient between the first and the last pp rank
  /// (Megatron-LM's embedding group); 0 without a tie across ranks.
  double tied_embedding_seconds() const {
    if (!model.tied || layout.pp == 1) return 0.0;
    const double bytes = static_cast<double>(model.vocab) * model.hidden / layout.tp * precision.gradient_bytes;
    const bool inside = node_of_pp_rank(0) == node_of_pp_rank(layout.pp - 1);
    return all_reduce_seconds(bytes, 2, inside ? cluster.intra_node_bandwidth : cluster.inter_node_bandwidth_per_device(),
                              inside ? cluster.intra_node_latency : cluster.inter_node_latency);
  }

  /// Seconds of the optimizer step on pp rank `pp_rank`: precision.step_bytes() per parameter
  /// it updates (its parameters / dp under ZeRO 1-3) at the memory bandwidth.
  double optimizer_seconds(int pp_rank) const {
    const double params = rank_parameters(pp_rank) / (layout.zero_stage >= 1 ? layout.dp : 1);
    return memory_seconds(params * precision.step_bytes());
  }
};

}  // namespace tessera::plan
