#pragma once
/// @file
/// DeviceDecoderLayer: the Llama example's decoder layer (llama::DecoderLayer) on a GPU, whole or
/// one tensor-parallel rank's shard of it, forward and backward, built from tessera's device building blocks (cuBLASLt products through
/// cuda::BlasLt, the causal attention of cuda/ops/attention.cuh) and the example's own kernels
/// (llama_kernels.cuh: RMSNorm, the rotary embedding with GQA's expansion, SwiGLU). Storage C
/// (float, or bf16 with fp32 gradients); the parameters and gradients are flat buffers in
/// flat_layer_layout's order, owned by the caller (a model holds every layer's end to end).
/// Pipeline stages are the model's business, not this layer's. CUDA code: compile with nvcc.
///
/// Forward, N = B T rows of d (x kept, not copied: it must live until backward):
///   h1 = rmsnorm(x) w_in; qkv = h1 W_qkv; e = rope_expand(qkv); a = attention(e);
///   x1 = x + a W_o; h2 = rmsnorm(x1) w_post; gu = h2 W_gu; s = swiglu(gu); y = x1 + s W_down.
/// Backward: the same in reverse; each weight gradient accumulated (+=) in fp32.

#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>

#include "llama/device/flat_layer_layout.hpp"
#include "llama/device/llama_kernels.cuh"
#include "tessera/core/error.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/ops/attention.cuh"
#include "tessera/cuda/ops/flash_attention.cuh"
#include "tessera/cuda/ops/convert.cuh"
#include "tessera/cuda/ops/residual_add.cuh"
#include "tessera/cuda/stream.hpp"

namespace llama::device {

/// What the decoder layers of one model share: the buffers a layer needs only within its own
/// forward or backward (not kept between them) and the RoPE table, made once for layers of
/// `config`'s sizes at (B, T) (so their memory does not grow with the layer count).
template <class C>
struct DecoderScratch {
  /// The buffers for layers of `config` at batch B x T, on `stream`, as one of `tp`
  /// tensor-parallel ranks (its H / tp heads, G / tp KV heads and F / tp columns). With
  /// `fused_attention` the layers built on it run tessera's fused attention kernels
  /// (ops/flash_attention.cuh: one log-sum-exp per row and head kept, not the probabilities);
  /// otherwise the unfused reference (ops/attention.cuh).
  DecoderScratch(const LlamaConfig& config, std::int64_t B, std::int64_t T, const tc::Stream& stream, int tp = 1,
                 bool fused_attention = false) {
    const LlamaConfig c = validated(config);
    (void)flat_layer_layout(c, tp);  // tp divides the heads, the KV heads and F (throws naming them)
    const std::int64_t N = B * T, d = c.d_model, H = c.n_head / tp, hd = c.head_dim(), F = c.ffn_hidden / tp;
    const std::int64_t gqa = (H + 2 * c.n_kv_head / tp) * hd, mha = 3 * H * hd;
    const auto make = [&](tessera::Shape s) { return tc::DeviceTensor<C>::empty(s, stream); };
    qkv = make({B, T, gqa});
    fused = fused_attention;
    if (fused) {
      flash_d = tc::DeviceTensor<float>::empty({B, H, T}, stream);
    } else {
      e = make({B, T, mha});
      heads = make({N * H * hd});
      dprobs = make({B, H, T, T});
      dqkvp = make({mha * N});
    }
    ds = make({B, T, F});
    dgu = make({B, T, 2 * F});
    dh = make({B, T, d});
    dx1 = make({B, T, d});
    da = make({B, T, H * hd});
    de = make({B, T, mha});
    dqkv = make({B, T, gqa});
    partial = tc::DeviceTensor<float>::empty({rms_norm_partial_size(N, d)}, stream);
    table = make_rope_table(stream, T, hd, c.rope_theta);
    seq = T;
    rope_theta = c.rope_theta;
    tp_size = tp;
    if (tp > 1) {
      sum = tc::DeviceTensor<float>::empty({N, d}, stream);
      zero_bias = tc::DeviceTensor<C>::zeros({d}, stream);
    }
  }
  /// The projection, the expanded heads (forward only), and the head outputs (forward's, then
  /// backward's scratch for the output gradient split by heads).
  tc::DeviceTensor<C> qkv, e, heads;
  tc::DeviceTensor<C> ds, dgu, dh, dx1, da, dprobs, dqkvp, de, dqkv;  ///< backward's intermediates
  tc::DeviceTensor<float> partial;                                     ///< RMSNorm's weight-gradient partial sums
  RopeTable table;                                                     ///< cos and sin of T positions
  std::int64_t seq = 0;                                                ///< T, the table's positions
  double rope_theta = 0;                                               ///< the table's base
  int tp_size = 1;                                                     ///< tensor-parallel ranks
  tc::DeviceTensor<float> sum;    ///< tp > 1: (N, d) fp32 partial products, summed over tp in place
  tc::DeviceTensor<C> zero_bias;  ///< tp > 1: (d) zeros (residual_add's bias: the layer has none)
  bool fused = false;             ///< the layers run the fused attention kernels
  tc::DeviceTensor<float> flash_d;  ///< fused: the attention backward's dy . y per row and head
};

/// One Llama decoder layer on the device for batches of (B, T) (see the file comment).
template <class C>
class DeviceDecoderLayer {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, tc::bf16>, "DeviceDecoderLayer: storage is float or bf16");

 public:
  /// A layer of `config`'s sizes for inputs (B, T, d), the activations it keeps from forward to
  /// backward allocated on `stream`, the rest in `scratch` (shared by a model's layers; made
  /// here when null); `blas` runs its products. With `tp` (a DeviceComm of the tensor-parallel
  /// ranks whose collectives run on `stream`; every rank builds its layer alike), this rank's
  /// shard (flat_layer_layout(config, tp size)): Megatron-LM's attention and MLP, the
  /// row-parallel products' fp32 partial sums all-reduced before the residual is added, the
  /// column-parallel products' input gradients all-reduced before the norms' backward (one
  /// all-reduce each, forward and backward, per sub-layer). Throws tessera::Error as
  /// llama::validated for a bad config, naming B and T unless both are positive, and naming the
  /// numbers when tp does not divide the heads, the KV heads or F.
  DeviceDecoderLayer(const LlamaConfig& config, std::int64_t B, std::int64_t T, const tc::Stream& stream,
                     tc::BlasLt& blas, std::shared_ptr<DecoderScratch<C>> scratch = nullptr,
                     tc::DeviceComm* tp = nullptr)
      : c_(validated(config)), tp_(tp != nullptr && tp->size() > 1 ? tp : nullptr),
        tp_size_(tp_ ? tp_->size() : 1), layout_(flat_layer_layout(config, tp_size_)), B_(B), T_(T), stream_(stream),
        blas_(blas),
        rope_{.seq = T, .heads = config.n_head / tp_size_, .kv_heads = config.n_kv_head / tp_size_,
              .head_dim = config.head_dim()} {
    TESSERA_EXPECTS(B > 0 && T > 0, "DeviceDecoderLayer: batch ", B, " x sequence ", T, " must be positive");
    TESSERA_EXPECTS(tp_ == nullptr || tp_->stream().get() == stream.get(),
                    "DeviceDecoderLayer: the tensor-parallel DeviceComm must run its collectives on the layer's "
                    "stream (its partial sums are in the layer's scratch, ordered by that stream)");
    sc_ = scratch ? std::move(scratch) : std::make_shared<DecoderScratch<C>>(config, B, T, stream, tp_size_);
    TESSERA_EXPECTS(sc_->tp_size == tp_size_, "DeviceDecoderLayer: the shared scratch was made for tp ", sc_->tp_size,
                    ", this layer is one of ", tp_size_);
    TESSERA_EXPECTS(sc_->qkv.shape() == tessera::Shape({B, T, rope_.gqa_cols()}) &&
                        sc_->ds.shape() == tessera::Shape({B, T, c_.ffn_hidden / tp_size_}) && sc_->seq == T &&
                        sc_->rope_theta == c_.rope_theta,
                    "DeviceDecoderLayer: the shared scratch was made for a batch of shape ", sc_->qkv.shape(),
                    " and rope_theta ", sc_->rope_theta, ", not for batch ", B, " x ", T, " of this config (rope_theta ",
                    c_.rope_theta, ")");
    const std::int64_t N = B * T, d = c_.d_model, H = rope_.heads, hd = c_.head_dim(), F = c_.ffn_hidden / tp_size_;
    const auto make = [&](tessera::Shape s) { return tc::DeviceTensor<C>::empty(s, stream); };
    h1_ = make({B, T, d});
    if (sc_->fused) {  // the expanded q|k|v as they are, and a log-sum-exp per row and head
      TESSERA_EXPECTS(hd <= tc::ops::flash_max_head_dim, "DeviceDecoderLayer: fused attention takes a head_dim of at "
                      "most ", tc::ops::flash_max_head_dim, ", not ", hd);
      qkvp_ = make({B, T, rope_.mha_cols()});
      lse_ = tc::DeviceTensor<float>::empty({B, H, T}, stream);
    } else {
      qkvp_ = make({rope_.mha_cols() * N});
      probs_ = make({B, H, T, T});
    }
    a_ = make({B, T, H * hd});
    x1_ = make({B, T, d});
    h2_ = make({B, T, d});
    gu_ = make({B, T, 2 * F});
    s_ = make({B, T, F});
    rstd1_ = tc::DeviceTensor<float>::empty({N}, stream);
    rstd2_ = tc::DeviceTensor<float>::empty({N}, stream);
  }

  /// The layout of the parameter and gradient buffers forward and backward take.
  const FlatLayerLayout& layout() const noexcept { return layout_; }

  /// y (B, T, d) from x (B, T, d) with the weights at `w` (layout() elements of C). Keeps the
  /// activations (and a view of x: x must live, unchanged, until backward, and y must not alias
  /// it). Throws tessera::Error naming the shapes.
  void forward(tc::DeviceView<const C> x, const C* w, tc::DeviceView<C> y) {
    check_io(x, y, "forward");
    const std::int64_t N = B_ * T_, d = c_.d_model, H = rope_.heads, hd = c_.head_dim(), F = c_.ffn_hidden / tp_size_;
    x_ = x;
    rms_norm_forward<C>(stream_, x, tv(w, LayerTensor::input_norm), h1_, rstd1_, norm_eps());
    DecoderScratch<C>& sc = *sc_;
    gemm({.m = N, .n = rope_.gqa_cols(), .k = d}, h1_.data(), at(w, LayerTensor::qkv), sc.qkv.data(), 0.f);
    if (sc.fused) {
      rope_expand<C>(stream_, sc.qkv, sc.table, rope_, qkvp_);
      tc::ops::flash_attention_forward<C>(stream_, qkvp_, H, a_, lse_);
    } else {
      rope_expand<C>(stream_, sc.qkv, sc.table, rope_, sc.e);
      tc::ops::attention_forward<C>(stream_, blas_, sc.e, H, qkvp_, probs_, sc.heads, a_);
    }
    row_parallel({.m = N, .n = d, .k = H * hd}, a_.data(), at(w, LayerTensor::o_proj), x, x1_);  // x1 = x + a W_o
    rms_norm_forward<C>(stream_, x1_, tv(w, LayerTensor::post_norm), h2_, rstd2_, norm_eps());
    gemm({.m = N, .n = 2 * F, .k = d}, h2_.data(), at(w, LayerTensor::gate_up), gu_.data(), 0.f);
    swiglu_forward<C>(stream_, gu_, s_);
    row_parallel({.m = N, .n = d, .k = F}, s_.data(), at(w, LayerTensor::down_proj), x1_, y);  // y = x1 + s W_down
  }

  /// dx (B, T, d) from dy (B, T, d) after forward, with the same weights `w`; every weight
  /// gradient added into `g` (layout() floats). `dx` must not alias the forward's x (read after
  /// dx is written). Throws tessera::Error naming the shapes.
  void backward(tc::DeviceView<const C> dy, const C* w, float* g, tc::DeviceView<C> dx) {
    check_io(dy, dx, "backward");
    TESSERA_EXPECTS(x_.data != nullptr, "DeviceDecoderLayer: backward before forward");
    const std::int64_t N = B_ * T_, d = c_.d_model, H = rope_.heads, hd = c_.head_dim(), F = c_.ffn_hidden / tp_size_;
    DecoderScratch<C>& sc = *sc_;
    // MLP: dW_down += s^T dy; ds = dy W_down^T; dgu = swiglu'(gu) ds.
    grad({.trans_a = true, .m = F, .n = d, .k = N}, s_.data(), dy.data, at(g, LayerTensor::down_proj));
    gemm({.trans_b = true, .m = N, .n = F, .k = d}, dy.data, at(w, LayerTensor::down_proj), sc.ds.data(), 0.f);
    swiglu_backward<C>(stream_, gu_, sc.ds, sc.dgu);
    // dW_gu += h2^T dgu; dh2 = dgu W_gu^T; dx1 = dy + rmsnorm'(dh2).
    grad({.trans_a = true, .m = d, .n = 2 * F, .k = N}, h2_.data(), sc.dgu.data(), at(g, LayerTensor::gate_up));
    column_input_grad({.trans_b = true, .m = N, .n = d, .k = 2 * F}, sc.dgu.data(), at(w, LayerTensor::gate_up));
    copy(dy, sc.dx1);
    rms_norm_backward<C>(stream_, sc.dh, x1_, tv(w, LayerTensor::post_norm), rstd2_, sc.dx1,
                         gv(g, LayerTensor::post_norm), sc.partial, /*accumulate=*/true);
    // Attention: dW_o += a^T dx1; da = dx1 W_o^T; through the attention and the rotary expansion.
    grad({.trans_a = true, .m = H * hd, .n = d, .k = N}, a_.data(), sc.dx1.data(), at(g, LayerTensor::o_proj));
    gemm({.trans_b = true, .m = N, .n = H * hd, .k = d}, sc.dx1.data(), at(w, LayerTensor::o_proj), sc.da.data(), 0.f);
    if (sc.fused)
      tc::ops::flash_attention_backward<C>(stream_, sc.da, qkvp_, a_, lse_, H, sc.flash_d, sc.de);
    else
      tc::ops::attention_backward<C>(stream_, blas_, sc.da, qkvp_, H, probs_, sc.heads, sc.dprobs, sc.dqkvp, sc.de);
    rope_reduce<C>(stream_, sc.de, sc.table, rope_, sc.dqkv);
    // dW_qkv += h1^T dqkv; dh1 = dqkv W_qkv^T; dx = dx1 + rmsnorm'(dh1).
    grad({.trans_a = true, .m = d, .n = rope_.gqa_cols(), .k = N}, h1_.data(), sc.dqkv.data(), at(g, LayerTensor::qkv));
    column_input_grad({.trans_b = true, .m = N, .n = d, .k = rope_.gqa_cols()}, sc.dqkv.data(), at(w, LayerTensor::qkv));
    copy(sc.dx1, dx);
    rms_norm_backward<C>(stream_, sc.dh, x_, tv(w, LayerTensor::input_norm), rstd1_, dx, gv(g, LayerTensor::input_norm),
                         sc.partial, /*accumulate=*/true);
  }

 private:
  float norm_eps() const { return static_cast<float>(c_.norm_eps); }
  const C* at(const C* w, LayerTensor t) const { return w + layout_.at(t); }
  float* at(float* g, LayerTensor t) const { return g + layout_.at(t); }
  tc::DeviceView<const C> tv(const C* w, LayerTensor t) const {
    return {w + layout_.at(t), tessera::Shape{layout_.size(t)}};
  }
  tc::DeviceView<float> gv(float* g, LayerTensor t) const { return {g + layout_.at(t), tessera::Shape{layout_.size(t)}}; }
  // out = a b (+ beta out), C storage, fp32 arithmetic.
  void gemm(const tc::GemmShape& s, const C* a, const C* b, C* out, float beta) {
    blas_.gemm(stream_, s, a, b, out, 1.f, beta);
  }
  // out = residual + a W, the end of a row-parallel product: at tp 1 one GEMM with beta = 1 onto
  // a copy of the residual; under tp the fp32 partial products summed over tp first, the
  // residual added once (ops::residual_add, one rounding to C).
  template <class Residual, class Out>
  void row_parallel(const tc::GemmShape& s, const C* a, const C* w, const Residual& residual, const Out& out) {
    if (tp_ == nullptr) {
      copy(residual, out);
      const tc::DeviceView<C> o = out;
      gemm(s, a, w, o.data, 1.f);
      return;
    }
    DecoderScratch<C>& sc = *sc_;
    blas_.gemm(stream_, s, a, w, sc.sum.data(), 1.f, 0.f);
    tp_->all_reduce(sc.sum.view(), tessera::ReduceOp::sum);
    const tc::DeviceView<const C> r = residual;
    const tc::DeviceView<C> o = out;
    const tessera::Shape nd{s.m, s.n};
    tc::ops::residual_add<C>(stream_, tc::DeviceView<const C>(r.data, nd), sc.sum, sc.zero_bias,
                             tc::DeviceView<C>(o.data, nd));
  }
  // sc.dh (N, d) = the input gradient of a column-parallel product, summed over tp (in fp32,
  // then rounded to C once).
  void column_input_grad(const tc::GemmShape& s, const C* dy, const C* w) {
    DecoderScratch<C>& sc = *sc_;
    if (tp_ == nullptr) return gemm(s, dy, w, sc.dh.data(), 0.f);
    blas_.gemm(stream_, s, dy, w, sc.sum.data(), 1.f, 0.f);
    tp_->all_reduce(sc.sum.view(), tessera::ReduceOp::sum);
    tc::ops::convert_from_f32<C>(stream_, sc.sum, sc.dh);
  }
  // out (fp32) += a b: a weight gradient.
  void grad(const tc::GemmShape& s, const C* a, const C* b, float* out) { blas_.gemm(stream_, s, a, b, out, 1.f, 1.f); }
  template <class From>
  void copy(const From& from, const tc::DeviceTensor<C>& to) {
    const tc::DeviceView<const C> f = from;
    TESSERA_EXPECTS(f.numel() == to.numel(), "DeviceDecoderLayer: copy of ", f.shape, " into ", to.shape());
    tc::detail::check(cudaMemcpyAsync(to.data(), f.data, to.bytes(), cudaMemcpyDeviceToDevice, stream_.get()),
                      "cudaMemcpyAsync", "DeviceDecoderLayer copy of ", f.shape);
  }
  void copy(const tc::DeviceTensor<C>& from, tc::DeviceView<C> to) {
    TESSERA_EXPECTS(from.numel() == to.numel(), "DeviceDecoderLayer: copy of ", from.shape(), " into ", to.shape);
    tc::detail::check(cudaMemcpyAsync(to.data, from.data(), from.bytes(), cudaMemcpyDeviceToDevice, stream_.get()),
                      "cudaMemcpyAsync", "DeviceDecoderLayer copy of ", from.shape());
  }
  void check_io(const tc::DeviceView<const C>& in, const tc::DeviceView<C>& out, const char* what) const {
    const tessera::Shape want{B_, T_, c_.d_model};
    TESSERA_EXPECTS(in.shape == want && out.shape == want, "DeviceDecoderLayer::", what, ": input ", in.shape,
                    " and output ", out.shape, " must both be ", want);
  }
  LlamaConfig c_;
  tc::DeviceComm* tp_;  // null at tp 1
  int tp_size_;
  FlatLayerLayout layout_;
  std::int64_t B_, T_;
  const tc::Stream& stream_;
  tc::BlasLt& blas_;
  device_math::RopeShape rope_;
  std::shared_ptr<DecoderScratch<C>> sc_;  // shared with the model's other layers
  tc::DeviceView<const C> x_;              // the forward's input (the caller keeps it)
  tc::DeviceTensor<C> h1_, qkvp_, probs_, a_, x1_, h2_, gu_, s_;  // kept from forward to backward
  tc::DeviceTensor<float> rstd1_, rstd2_;
  tc::DeviceTensor<float> lse_;  // fused attention: each row's log-sum-exp per head
};

}  // namespace llama::device
