#pragma once
/// @file
/// A Llama-style decoder written as a *user's* model: tessera ships GPT-2, not Llama, so every
/// layer here is built on the public Layer contract (tessera/core/layer.hpp) and tessera's
/// nn::Linear and nn::Embedding, and made tensor-parallel by a `tp_plan` and two
/// TensorParallelShard specializations, nothing else. Parts (Touvron et al. 2023, "LLaMA"):
/// RMSNorm, rotary position embeddings (RoPE), grouped-query attention (GQA), a SwiGLU MLP and
/// an untied LM head, with Hugging Face Llama parameter names.
///
/// ```cpp
/// llama::LlamaConfig config{.vocab_size = 256, .n_layer = 4, .n_head = 8, .n_kv_head = 4,
///                           .d_model = 256, .ffn_hidden = 688};
/// llama::Llama<float> model(config, /*seed=*/1);              // the serial model (llama_model.hpp)
/// auto layer = llama::decoder_layer<float>(config, 2, 1);     // layer 2 alone, same values
/// tessera::TensorParallel<llama::DecoderLayer<float>> tp_layer(std::move(layer), mesh.tp());
/// ```
///
/// Under tensor parallelism (Megatron-LM, Shoeybi et al. 2019, sec. 3) a rank holds whole
/// heads: its q heads and the KV heads they read (so tp must divide n_kv_head), and its columns
/// of gate_proj and of up_proj. The fused projections are MultiLinear: k separate nn::Linear on
/// one input whose outputs are concatenated, each sharded by its own columns, so a rank's
/// output is [its q heads | its k heads | its v heads] (and [its gate | its up]).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/gemm.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/parallel/tensor/tensor_parallel_plan.hpp"
#include "tessera/parallel/tensor/tensor_parallel_shard.hpp"

namespace llama {

using tessera::ForwardResult;
using tessera::NoGrad;
using tessera::Parameter;
using tessera::ParameterList;
using tessera::Shape;
using tessera::Tensor;
namespace nn = tessera::nn;
namespace tp = tessera::tp;

// ---- configuration ---------------------------------------------------------------------------

/// Sizes of a Llama model (Hugging Face LlamaConfig names in the comments).
struct LlamaConfig {
  std::int64_t vocab_size = 32000;  ///< tokens in the vocabulary
  std::int64_t n_layer = 32;        ///< decoder layers (`num_hidden_layers`)
  std::int64_t n_head = 32;         ///< query heads (`num_attention_heads`)
  std::int64_t n_kv_head = 32;      ///< key/value heads (`num_key_value_heads`); n_head for plain MHA
  std::int64_t d_model = 4096;      ///< width (`hidden_size`)
  std::int64_t ffn_hidden = 11008;  ///< SwiGLU hidden width (`intermediate_size`)
  double rope_theta = 10000.0;      ///< RoPE base
  double norm_eps = 1e-6;           ///< RMSNorm epsilon (`rms_norm_eps`)

  /// Width of one head: d_model / n_head.
  std::int64_t head_dim() const noexcept { return n_head > 0 ? d_model / n_head : 0; }
};

/// `c` itself, after checking it. Throws tessera::Error naming the values when a size is not
/// positive, n_kv_head does not divide n_head, n_head does not divide d_model, or the head
/// width is odd (RoPE rotates pairs of columns).
inline LlamaConfig validated(const LlamaConfig& c) {
  TESSERA_EXPECTS(c.vocab_size > 0 && c.n_layer > 0 && c.n_head > 0 && c.n_kv_head > 0 && c.d_model > 0 &&
                      c.ffn_hidden > 0,
                  "LlamaConfig: sizes must be positive: vocab_size=", c.vocab_size, " n_layer=", c.n_layer,
                  " n_head=", c.n_head, " n_kv_head=", c.n_kv_head, " d_model=", c.d_model,
                  " ffn_hidden=", c.ffn_hidden);
  TESSERA_EXPECTS(c.n_head % c.n_kv_head == 0, "LlamaConfig: n_kv_head ", c.n_kv_head, " does not divide n_head ",
                  c.n_head, " (each KV head serves n_head / n_kv_head query heads)");
  TESSERA_EXPECTS(c.d_model % c.n_head == 0, "LlamaConfig: n_head ", c.n_head, " does not divide d_model ",
                  c.d_model);
  TESSERA_EXPECTS(c.head_dim() % 2 == 0, "LlamaConfig: head_dim ", c.head_dim(), " (d_model ", c.d_model,
                  " / n_head ", c.n_head, ") must be even for rotary embeddings");
  TESSERA_EXPECTS(c.rope_theta > 0 && c.norm_eps > 0, "LlamaConfig: rope_theta ", c.rope_theta, " and norm_eps ",
                  c.norm_eps, " must be positive");
  return c;
}

/// The root LayerInit of a model from `seed`: weights normal(0, 0.02) (Hugging Face
/// `initializer_range`), RMSNorm weights 1. Every value is a function of (seed, parameter
/// name), so any subset of layers built from it holds the same values as the whole model.
inline nn::LayerInit model_init(std::uint64_t seed) { return {.prefix = "", .seed = seed, .std = 0.02}; }

// ---- RMSNorm ---------------------------------------------------------------------------------

/// y = x / sqrt(mean(x^2) + eps) * weight over the last dim (Zhang and Sennrich 2019, "Root
/// Mean Square Layer Normalization"): LayerNorm without the mean and the bias. Parameter
/// "<prefix>.weight" [dim], init 1.
///
/// x: (..., dim) -> y: (..., dim).
template <std::floating_point T>
class RMSNorm {
 public:
  using Input = Tensor<T>;  ///< x: (..., dim)
  /// What backward needs: the normalized input and the reciprocal RMS of each row.
  struct Context {
    Tensor<T> xhat;  ///< (..., dim): x * rstd
    Tensor<T> rstd;  ///< (rows): 1 / sqrt(mean(x^2) + eps)
  };

  /// A new layer over rows of `dim` elements. Throws tessera::Error unless dim is positive.
  explicit RMSNorm(std::int64_t dim, const nn::LayerInit& init = {}, T eps = T(1e-6))
      : weight_(init.join("weight"), Tensor<T>::full(checked_shape(dim), T{1})), eps_(eps) {}

  /// Normalizes each row. Throws tessera::Error naming both shapes when x's last dim is not dim.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    const std::int64_t d = dim();
    TESSERA_EXPECTS(x.rank() >= 1 && x.size(-1) == d, "RMSNorm ", weight_.name, ": input of shape ", x.shape(),
                    " does not match weight of shape ", weight_.value.shape());
    const Tensor<T> xc = x.contiguous();
    const std::int64_t m = xc.shape().rows();
    Tensor<T> y = Tensor<T>::empty(x.shape()), xhat = Tensor<T>::empty(x.shape());
    Tensor<T> rstd = Tensor<T>::empty(Shape{m});
    const T* w = weight_.value.data();
    for (std::int64_t r = 0; r < m; ++r) {
      const T* xr = xc.data() + r * d;
      T ms = 0;
      for (std::int64_t j = 0; j < d; ++j) ms += xr[j] * xr[j];
      const T rs = T{1} / std::sqrt(ms / static_cast<T>(d) + eps_);
      rstd.data()[r] = rs;
      T* hr = xhat.data() + r * d;
      T* yr = y.data() + r * d;
      for (std::int64_t j = 0; j < d; ++j) {
        hr[j] = xr[j] * rs;
        yr[j] = hr[j] * w[j];
      }
    }
    return {std::move(y), Context{std::move(xhat), std::move(rstd)}};
  }

  /// dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * weight; adds sum(dy * xhat) into
  /// the weight's grad, then marks it ready. Throws tessera::Error naming both shapes when dy
  /// does not have the output's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    TESSERA_EXPECTS(dy.shape() == ctx.xhat.shape(), "RMSNorm ", weight_.name, ": output gradient of shape ",
                    dy.shape(), " does not match the output shape ", ctx.xhat.shape());
    const Tensor<T> g = dy.contiguous();
    const std::int64_t d = dim(), m = g.shape().rows();
    Tensor<T> dx = Tensor<T>::empty(g.shape());
    const T* w = weight_.value.data();
    T* dw = weight_.grad.data();
    for (std::int64_t r = 0; r < m; ++r) {
      const T* gr = g.data() + r * d;
      const T* hr = ctx.xhat.data() + r * d;
      T mean_gh = 0;
      for (std::int64_t j = 0; j < d; ++j) {
        mean_gh += gr[j] * w[j] * hr[j];
        dw[j] += gr[j] * hr[j];
      }
      mean_gh /= static_cast<T>(d);
      const T rs = ctx.rstd.data()[r];
      T* dxr = dx.data() + r * d;
      for (std::int64_t j = 0; j < d; ++j) dxr[j] = rs * (gr[j] * w[j] - hr[j] * mean_gh);
    }
    weight_.mark_grad_ready();
    return dx;
  }

  /// The weight.
  ParameterList<T> parameters() { return {&weight_}; }
  /// The weight [dim].
  Parameter<T>& weight() noexcept { return weight_; }
  /// The normalized width.
  std::int64_t dim() const noexcept { return weight_.value.shape()[0]; }
  /// The epsilon added to the mean square.
  T eps() const noexcept { return eps_; }

 private:
  static Shape checked_shape(std::int64_t d) {
    TESSERA_EXPECTS(d > 0, "RMSNorm: dim ", d, " must be positive");
    return Shape{d};
  }

  Parameter<T> weight_;
  T eps_;
};

// ---- MultiLinear -----------------------------------------------------------------------------

/// One projection of a MultiLinear: its name and output width, and the unit a tensor-parallel
/// shard must keep whole (a head of `unit` columns), named in error messages.
struct LinearSpec {
  std::string name;                           ///< e.g. "q_proj": parameter "<prefix>.q_proj.weight"
  std::int64_t out_features = 0;              ///< output columns
  std::int64_t unit = 1;                      ///< columns that stay together on one tp rank (head_dim)
  std::string unit_name = "output features";  ///< what a unit is, for messages ("KV heads")
};

/// k bias-free nn::Linear on the same input, outputs concatenated along the last dim:
/// y = [x W_0 | x W_1 | ...], e.g. Llama's q_proj | k_proj | v_proj or gate_proj | up_proj, each
/// weight keeping its own Hugging Face name "<prefix>.<name>.weight" [in, out_i].
///
/// Its tensor-parallel shard (TensorParallelShard<MultiLinear>::column) holds this rank's
/// columns of *each* linear, so its output is [rank's part of y_0 | rank's part of y_1 | ...]:
/// whole heads of q, k and v, or the matching columns of gate and up.
///
/// x: (..., in) -> y: (..., sum_i out_i).
template <std::floating_point T>
class MultiLinear {
 public:
  using Input = Tensor<T>;  ///< x: (..., in)
  /// What backward needs: each linear's context (handles to the same input).
  struct Context {
    std::vector<typename nn::Linear<T>::Context> parts;  ///< one per linear
  };

  /// New linears of the given specs, each initialized from "<prefix>.<name>.weight". Throws
  /// tessera::Error when there is none or a size is not positive.
  MultiLinear(std::int64_t in_features, std::vector<LinearSpec> specs, const nn::LayerInit& init = {})
      : specs_(std::move(specs)) {
    TESSERA_EXPECTS(!specs_.empty(), "MultiLinear ", init.prefix, ": no linear given");
    for (const LinearSpec& s : specs_)
      TESSERA_EXPECTS(s.unit > 0 && s.out_features % s.unit == 0, "MultiLinear ", init.join(s.name), ": ",
                      s.out_features, " output features are not whole units of ", s.unit);
    linears_.reserve(specs_.size());
    for (const LinearSpec& s : specs_) linears_.emplace_back(in_features, s.out_features, init.child(s.name), false);
  }
  /// Around existing linears (e.g. shards), one per spec; each spec's out_features must be its
  /// linear's. Throws tessera::Error naming the numbers otherwise.
  MultiLinear(std::vector<LinearSpec> specs, std::vector<nn::Linear<T>> linears)
      : specs_(std::move(specs)), linears_(std::move(linears)) {
    TESSERA_EXPECTS(!specs_.empty() && specs_.size() == linears_.size(), "MultiLinear: ", specs_.size(),
                    " specs for ", linears_.size(), " linears");
    for (std::size_t i = 0; i < specs_.size(); ++i)
      TESSERA_EXPECTS(linears_[i].out_features() == specs_[i].out_features &&
                          linears_[i].in_features() == linears_[0].in_features(),
                      "MultiLinear: linear ", linears_[i].weight().name, " of shape ",
                      linears_[i].weight().value.shape(), " does not match spec ", specs_[i].name, " (",
                      specs_[i].out_features, " outputs) or the input width ", linears_[0].in_features());
  }

  /// y = [x W_0 | x W_1 | ...]. Throws tessera::Error naming both shapes when x's last dim is
  /// not `in`.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    Context ctx;
    std::vector<Tensor<T>> ys;
    for (const nn::Linear<T>& l : linears_) {
      auto [y, c] = l.forward(x);  // (..., out_i)
      ys.push_back(std::move(y));
      ctx.parts.push_back(std::move(c));
    }
    return {ys.size() == 1 ? std::move(ys[0]) : tessera::concat(ys, -1), std::move(ctx)};
  }

  /// dx = sum_i dy_i W_i^T, dy_i the columns of linear i; accumulates each weight's gradient.
  /// Throws tessera::Error naming both shapes when dy does not have the output's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    TESSERA_EXPECTS(dy.rank() >= 1 && dy.size(-1) == out_features() && ctx.parts.size() == linears_.size(),
                    "MultiLinear ", linears_[0].weight().name, ": output gradient of shape ", dy.shape(),
                    " does not have ", out_features(), " columns");
    Tensor<T> dx;
    std::int64_t at = 0;
    for (std::size_t i = 0; i < linears_.size(); ++i) {
      const std::int64_t n = linears_[i].out_features();
      Tensor<T> d = linears_[i].backward(dy.slice(-1, at, at + n), ctx.parts[i]);
      if (i == 0) dx = std::move(d);
      else dx.add_(d);
      at += n;
    }
    return dx;
  }

  /// Each linear's weight, in spec order.
  ParameterList<T> parameters() {
    ParameterList<T> ps;
    for (nn::Linear<T>& l : linears_) ps.append(l.parameters());
    return ps;
  }
  /// The linears, in spec order.
  std::vector<nn::Linear<T>>& linears() noexcept { return linears_; }
  /// The specs, in order.
  const std::vector<LinearSpec>& specs() const noexcept { return specs_; }
  /// Total output columns.
  std::int64_t out_features() const noexcept {
    std::int64_t n = 0;
    for (const nn::Linear<T>& l : linears_) n += l.out_features();
    return n;
  }

 private:
  std::vector<LinearSpec> specs_;
  std::vector<nn::Linear<T>> linears_;
};

// ---- rotary attention core ---------------------------------------------------------------------

/// Causal grouped-query attention with rotary position embeddings, without parameters: for
/// each batch row and query head h, with KV head g = h / (n_head / n_kv_head),
/// y[:, h] = softmax(mask(rope(q_h) rope(k_g)^T / sqrt(head_dim))) v_g, position t attending to
/// 0..t. RoPE (Su et al. 2021, "RoFormer"), rotate-half convention of Hugging Face Llama: at
/// position t, columns i and i + head_dim/2 of a head are rotated by the angle
/// t * theta^(-2i / head_dim). GQA: Ainslie et al. 2023; n_kv_head == n_head is multi-head
/// attention, n_kv_head == 1 multi-query attention (Shazeer 2019).
///
/// qkv: (B, T, (n_head + 2 n_kv_head) head_dim), laid out [q heads | k heads | v heads], head j
/// of each at columns [j head_dim, (j + 1) head_dim) -> y: (B, T, n_head head_dim).
///
/// Under tensor parallelism a rank runs it on n_head / tp query heads and the n_kv_head / tp
/// KV heads they read (TensorParallelShard<RotaryAttentionCore>::heads). GEMMs through CBLAS.
template <std::floating_point T>
class RotaryAttentionCore {
 public:
  using Input = Tensor<T>;  ///< qkv: (B, T, (n_head + 2 n_kv_head) head_dim)
  /// What backward needs: the rotated q and k, v, and the attention probabilities.
  struct Context {
    Tensor<T> q;      ///< (B, T, n_head hd), rotated
    Tensor<T> k;      ///< (B, T, n_kv_head hd), rotated
    Tensor<T> v;      ///< (B, T, n_kv_head hd)
    Tensor<T> probs;  ///< (B, n_head, T, T): softmax rows, 0 above the diagonal
  };

  /// Attention over `n_head` query heads sharing `n_kv_head` KV heads of width `head_dim`.
  /// Throws tessera::Error naming the numbers unless all are positive, n_kv_head divides
  /// n_head and head_dim is even.
  RotaryAttentionCore(std::int64_t n_head, std::int64_t n_kv_head, std::int64_t head_dim, double rope_theta = 10000.0)
      : n_head_(n_head), n_kv_head_(n_kv_head), head_dim_(head_dim), theta_(rope_theta) {
    TESSERA_EXPECTS(n_head > 0 && n_kv_head > 0 && head_dim > 0 && n_head % n_kv_head == 0 && head_dim % 2 == 0 &&
                        rope_theta > 0,
                    "RotaryAttentionCore: n_head ", n_head, " must be a positive multiple of n_kv_head ", n_kv_head,
                    ", head_dim ", head_dim, " positive and even, rope_theta ", rope_theta, " positive");
  }

  /// Causal attention of every query head. Throws tessera::Error naming the shape when qkv is
  /// not (B, T, (n_head + 2 n_kv_head) head_dim).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& qkv) const {
    TESSERA_EXPECTS(qkv.rank() == 3 && qkv.size(2) == (n_head_ + 2 * n_kv_head_) * head_dim_,
                    "RotaryAttentionCore: input of shape ", qkv.shape(), " is not (B, T, (n_head ", n_head_,
                    " + 2 n_kv_head ", n_kv_head_, ") x head_dim ", head_dim_, ")");
    using tessera::Transpose;
    const std::int64_t B = qkv.size(0), Tn = qkv.size(1), hd = head_dim_, cq = n_head_ * hd, ck = n_kv_head_ * hd;
    Tensor<T> q = qkv.slice(2, 0, cq).clone();                // (B, T, cq)
    Tensor<T> k = qkv.slice(2, cq, cq + ck).clone();          // (B, T, ck)
    Tensor<T> v = qkv.slice(2, cq + ck, cq + 2 * ck).clone();  // (B, T, ck)
    const Rotation rot = rotation(Tn);
    rotate(q, rot, 1);
    rotate(k, rot, 1);
    const T scale = T{1} / std::sqrt(static_cast<T>(hd));
    const std::int64_t group = n_head_ / n_kv_head_;
    Tensor<T> y = Tensor<T>::empty(Shape{B, Tn, cq});
    Tensor<T> probs = Tensor<T>::empty(Shape{B, n_head_, Tn, Tn});
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < n_head_; ++h) {
        const std::int64_t g = h / group;
        const T* qh = q.data() + b * Tn * cq + h * hd;
        const T* kg = k.data() + b * Tn * ck + g * hd;
        const T* vg = v.data() + b * Tn * ck + g * hd;
        T* p = probs.data() + (b * n_head_ + h) * Tn * Tn;
        // (T, T) scores = q k^T / sqrt(hd), then a causal softmax per row.
        tessera::gemm<T>(Transpose::no, Transpose::yes, Tn, Tn, hd, scale, qh, cq, kg, ck, T{0}, p, Tn);
        for (std::int64_t i = 0; i < Tn; ++i) {
          T* row = p + i * Tn;
          const T mx = *std::max_element(row, row + i + 1);
          T sum = 0;
          for (std::int64_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - mx));
          for (std::int64_t j = 0; j <= i; ++j) row[j] /= sum;
          std::fill(row + i + 1, row + Tn, T{0});
        }
        // (T, hd) head output = probs v_g.
        tessera::gemm<T>(Transpose::no, Transpose::no, Tn, hd, Tn, T{1}, p, Tn, vg, ck, T{0}, y.data() + b * Tn * cq + h * hd,
                         cq);
      }
    return {std::move(y), Context{std::move(q), std::move(k), std::move(v), std::move(probs)}};
  }

  /// dq, dk, dv from dy: (B, T, n_head hd) -> dqkv: (B, T, (n_head + 2 n_kv_head) hd); a KV
  /// head's gradient sums those of the query heads of its group. Throws tessera::Error naming
  /// both shapes when dy does not have the output's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) const {
    const std::int64_t B = ctx.q.size(0), Tn = ctx.q.size(1), hd = head_dim_, cq = n_head_ * hd, ck = n_kv_head_ * hd;
    TESSERA_EXPECTS(dy.shape() == ctx.q.shape(), "RotaryAttentionCore: output gradient of shape ", dy.shape(),
                    " does not match the output shape ", ctx.q.shape());
    using tessera::Transpose;
    const T scale = T{1} / std::sqrt(static_cast<T>(hd));
    const std::int64_t group = n_head_ / n_kv_head_;
    const Tensor<T> go = dy.contiguous();
    Tensor<T> dq = Tensor<T>::empty(ctx.q.shape());
    Tensor<T> dk(ctx.k.shape()), dv(ctx.v.shape());  // zero: the heads of a group add into them
    Tensor<T> ds = Tensor<T>::empty(Shape{Tn, Tn});    // scratch, reused by every head
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < n_head_; ++h) {
        const std::int64_t g = h / group;
        const T* qh = ctx.q.data() + b * Tn * cq + h * hd;
        const T* kg = ctx.k.data() + b * Tn * ck + g * hd;
        const T* vg = ctx.v.data() + b * Tn * ck + g * hd;
        const T* p = ctx.probs.data() + (b * n_head_ + h) * Tn * Tn;
        const T* gh = go.data() + b * Tn * cq + h * hd;
        // dprobs = dy v^T (T, T); dv_g += probs^T dy (T, hd).
        tessera::gemm<T>(Transpose::no, Transpose::yes, Tn, Tn, hd, T{1}, gh, cq, vg, ck, T{0}, ds.data(), Tn);
        tessera::gemm<T>(Transpose::yes, Transpose::no, Tn, hd, Tn, T{1}, p, Tn, gh, cq, T{1},
                         dv.data() + b * Tn * ck + g * hd, ck);
        // Softmax backward, in place: dscores = probs * (dprobs - <dprobs, probs>) / sqrt(hd).
        for (std::int64_t i = 0; i < Tn; ++i) {
          const T* pr = p + i * Tn;
          T* dr = ds.data() + i * Tn;
          T dot = 0;
          for (std::int64_t j = 0; j <= i; ++j) dot += dr[j] * pr[j];
          for (std::int64_t j = 0; j <= i; ++j) dr[j] = pr[j] * (dr[j] - dot) * scale;
          std::fill(dr + i + 1, dr + Tn, T{0});
        }
        // dq_h = dscores k_g; dk_g += dscores^T q_h (T, hd), both for the rotated q and k.
        tessera::gemm<T>(Transpose::no, Transpose::no, Tn, hd, Tn, T{1}, ds.data(), Tn, kg, ck, T{0},
                         dq.data() + b * Tn * cq + h * hd, cq);
        tessera::gemm<T>(Transpose::yes, Transpose::no, Tn, hd, Tn, T{1}, ds.data(), Tn, qh, cq, T{1},
                         dk.data() + b * Tn * ck + g * hd, ck);
      }
    // The rotation is orthogonal: its backward is the rotation by the opposite angle.
    const Rotation rot = rotation(Tn);
    rotate(dq, rot, -1);
    rotate(dk, rot, -1);
    return tessera::concat(std::vector<Tensor<T>>{dq, dk, dv}, -1);
  }

  /// None.
  ParameterList<T> parameters() noexcept { return {}; }
  /// Query heads this instance computes.
  std::int64_t n_head() const noexcept { return n_head_; }
  /// KV heads this instance reads.
  std::int64_t n_kv_head() const noexcept { return n_kv_head_; }
  /// Width of a head.
  std::int64_t head_dim() const noexcept { return head_dim_; }
  /// The RoPE base.
  double rope_theta() const noexcept { return theta_; }

 private:
  /// cos and sin of the angle of position t and frequency i, at [t * hd/2 + i].
  struct Rotation {
    std::vector<T> cos, sin;
  };
  Rotation rotation(std::int64_t Tn) const {
    const std::int64_t half = head_dim_ / 2;
    Rotation r{std::vector<T>(static_cast<std::size_t>(Tn * half)), std::vector<T>(static_cast<std::size_t>(Tn * half))};
    for (std::int64_t i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta_, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim_));
      for (std::int64_t t = 0; t < Tn; ++t) {
        const double angle = static_cast<double>(t) * inv_freq;
        r.cos[static_cast<std::size_t>(t * half + i)] = static_cast<T>(std::cos(angle));
        r.sin[static_cast<std::size_t>(t * half + i)] = static_cast<T>(std::sin(angle));
      }
    }
    return r;
  }
  /// Rotates, in place, every head of contiguous x: (B, T, heads hd) by +angle (sign 1) or
  /// -angle (sign -1): (a, b) -> (a cos - b sin, b cos + a sin), a = column i, b = i + hd/2.
  void rotate(Tensor<T>& x, const Rotation& r, int sign) const {
    const std::int64_t B = x.size(0), Tn = x.size(1), C = x.size(2), half = head_dim_ / 2;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < Tn; ++t)
        for (std::int64_t h = 0; h < C / head_dim_; ++h) {
          T* a = x.data() + (b * Tn + t) * C + h * head_dim_;
          for (std::int64_t i = 0; i < half; ++i) {
            const T c = r.cos[static_cast<std::size_t>(t * half + i)];
            const T s = static_cast<T>(sign) * r.sin[static_cast<std::size_t>(t * half + i)];
            const T lo = a[i], hi = a[i + half];
            a[i] = lo * c - hi * s;
            a[i + half] = hi * c + lo * s;
          }
        }
  }

  std::int64_t n_head_, n_kv_head_, head_dim_;
  double theta_;
};

// ---- SwiGLU --------------------------------------------------------------------------------------

/// y = silu(gate) * up for x = [gate | up] split in halves along the last dim (Shazeer 2020,
/// "GLU Variants Improve Transformer"), silu(a) = a sigmoid(a); no parameters. It splits its
/// own input, so under tensor parallelism it runs unchanged on a rank's [gate shard | up
/// shard] (a tp::elementwise step).
///
/// x: (..., 2F) -> y: (..., F).
template <std::floating_point T>
class SwiGLU {
 public:
  using Input = Tensor<T>;  ///< x: (..., 2F) = [gate | up]
  /// What backward needs: the input.
  struct Context {
    Tensor<T> x;  ///< (..., 2F), contiguous
  };

  /// silu(gate) * up. Throws tessera::Error naming the shape when the last dim is not even.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    TESSERA_EXPECTS(x.rank() >= 1 && x.size(-1) > 0 && x.size(-1) % 2 == 0, "SwiGLU: input of shape ", x.shape(),
                    " is not (..., 2F) = [gate | up]");
    const Tensor<T> xc = x.contiguous();
    const std::int64_t f = x.size(-1) / 2, m = xc.shape().rows();
    Tensor<T> y = Tensor<T>::empty(x.shape().with(-1, f));
    for (std::int64_t r = 0; r < m; ++r) {
      const T* gate = xc.data() + r * 2 * f;
      const T* up = gate + f;
      T* yr = y.data() + r * f;
      for (std::int64_t j = 0; j < f; ++j) yr[j] = gate[j] * sigmoid(gate[j]) * up[j];
    }
    return {std::move(y), Context{xc}};
  }

  /// d gate = dy * up * sigmoid(gate) (1 + gate (1 - sigmoid(gate))), d up = dy * silu(gate).
  /// Throws tessera::Error naming both shapes when dy is not (..., F).
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) const {
    const std::int64_t f = ctx.x.size(-1) / 2, m = ctx.x.shape().rows();
    TESSERA_EXPECTS(dy.shape() == ctx.x.shape().with(-1, f), "SwiGLU: output gradient of shape ", dy.shape(),
                    " does not match the output shape ", ctx.x.shape().with(-1, f));
    const Tensor<T> g = dy.contiguous();
    Tensor<T> dx = Tensor<T>::empty(ctx.x.shape());
    for (std::int64_t r = 0; r < m; ++r) {
      const T* gate = ctx.x.data() + r * 2 * f;
      const T* up = gate + f;
      const T* gr = g.data() + r * f;
      T* dgate = dx.data() + r * 2 * f;
      T* dup = dgate + f;
      for (std::int64_t j = 0; j < f; ++j) {
        const T s = sigmoid(gate[j]);
        dgate[j] = gr[j] * up[j] * s * (T{1} + gate[j] * (T{1} - s));
        dup[j] = gr[j] * gate[j] * s;
      }
    }
    return dx;
  }

  /// None.
  ParameterList<T> parameters() noexcept { return {}; }

 private:
  static T sigmoid(T a) { return T{1} / (T{1} + std::exp(-a)); }
};

// ---- attention, MLP, decoder layer ---------------------------------------------------------------

/// Llama self-attention: qkv = [q_proj | k_proj | v_proj](x), then RoPE + causal GQA, then
/// o_proj. Parameters "<prefix>.q_proj.weight" [d, n_head hd], "<prefix>.k_proj.weight" and
/// "<prefix>.v_proj.weight" [d, n_kv_head hd], "<prefix>.o_proj.weight" [n_head hd, d]; no
/// biases. Tensor-parallel plan: the projections column-parallel (each by its own columns, so a
/// rank holds its q heads and their KV heads), the core on those heads, o_proj row-parallel.
///
/// x: (B, T, d) -> y: (B, T, d).
template <std::floating_point T>
class Attention {
 public:
  using Input = Tensor<T>;  ///< x: (B, T, d)
  /// What backward needs: the sub-layers' contexts.
  struct Context {
    typename MultiLinear<T>::Context qkv;          ///< the projections'
    typename RotaryAttentionCore<T>::Context core;  ///< the core's
    typename nn::Linear<T>::Context o_proj;        ///< o_proj's
  };

  /// A new layer of `config`'s sizes. Throws tessera::Error naming the values when the config
  /// is invalid (see validated).
  Attention(const LlamaConfig& config, const nn::LayerInit& init = {})
      : qkv_(validated(config).d_model, projections(config), init),
        core_(config.n_head, config.n_kv_head, config.head_dim(), config.rope_theta),
        o_proj_(config.n_head * config.head_dim(), config.d_model, init.child("o_proj"), false) {}

  /// y = o_proj(attention(rope(q), rope(k), v)).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    auto [qkv, c1] = qkv_.forward(x);  // (B, T, (nq + 2 nkv) hd)
    auto [a, c2] = core_.forward(qkv);  // (B, T, nq hd)
    auto [y, c3] = o_proj_.forward(a);  // (B, T, d)
    return {std::move(y), Context{std::move(c1), std::move(c2), std::move(c3)}};
  }
  /// dx from dy: (B, T, d); accumulates the four weight gradients.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    return qkv_.backward(core_.backward(o_proj_.backward(dy, ctx.o_proj), ctx.core), ctx.qkv);
  }
  /// q_proj, k_proj, v_proj, o_proj weights.
  ParameterList<T> parameters() {
    ParameterList<T> ps = qkv_.parameters();
    ps.append(o_proj_.parameters());
    return ps;
  }

  /// The q, k, v projections.
  MultiLinear<T>& qkv() noexcept { return qkv_; }
  /// RoPE + causal grouped-query attention.
  RotaryAttentionCore<T>& core() noexcept { return core_; }
  /// The output projection.
  nn::Linear<T>& o_proj() noexcept { return o_proj_; }

  /// Megatron-style attention: one all-reduce forward, one backward.
  static constexpr auto tp_plan =
      tp::plan(tp::column(&Attention::qkv), tp::heads(&Attention::core), tp::row(&Attention::o_proj));

 private:
  static std::vector<LinearSpec> projections(const LlamaConfig& c) {
    const std::int64_t hd = c.head_dim();
    return {{.name = "q_proj", .out_features = c.n_head * hd, .unit = hd, .unit_name = "query heads"},
            {.name = "k_proj", .out_features = c.n_kv_head * hd, .unit = hd, .unit_name = "KV heads"},
            {.name = "v_proj", .out_features = c.n_kv_head * hd, .unit = hd, .unit_name = "KV heads"}};
  }

  MultiLinear<T> qkv_;
  RotaryAttentionCore<T> core_;
  nn::Linear<T> o_proj_;
};

/// Llama MLP: y = down_proj(silu(gate_proj(x)) * up_proj(x)). Parameters
/// "<prefix>.gate_proj.weight" and "<prefix>.up_proj.weight" [d, F], "<prefix>.down_proj.weight"
/// [F, d]; no biases. Tensor-parallel plan: gate and up column-parallel, SwiGLU on the rank's
/// columns, down_proj row-parallel.
///
/// x: (..., d) -> y: (..., d).
template <std::floating_point T>
class MLP {
 public:
  using Input = Tensor<T>;  ///< x: (..., d)
  /// What backward needs: the sub-layers' contexts.
  struct Context {
    typename MultiLinear<T>::Context gate_up;  ///< the projections'
    typename SwiGLU<T>::Context act;           ///< SwiGLU's
    typename nn::Linear<T>::Context down_proj;  ///< down_proj's
  };

  /// A new layer of `config`'s sizes.
  MLP(const LlamaConfig& config, const nn::LayerInit& init = {})
      : gate_up_(config.d_model,
                 {{.name = "gate_proj", .out_features = config.ffn_hidden},
                  {.name = "up_proj", .out_features = config.ffn_hidden}},
                 init),
        down_proj_(config.ffn_hidden, config.d_model, init.child("down_proj"), false) {}

  /// y = down_proj(SwiGLU([gate | up](x))).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    auto [h, c1] = gate_up_.forward(x);   // (..., 2F)
    auto [a, c2] = act_.forward(h);       // (..., F)
    auto [y, c3] = down_proj_.forward(a);  // (..., d)
    return {std::move(y), Context{std::move(c1), std::move(c2), std::move(c3)}};
  }
  /// dx from dy: (..., d); accumulates the three weight gradients.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    return gate_up_.backward(act_.backward(down_proj_.backward(dy, ctx.down_proj), ctx.act), ctx.gate_up);
  }
  /// gate_proj, up_proj, down_proj weights.
  ParameterList<T> parameters() {
    ParameterList<T> ps = gate_up_.parameters();
    ps.append(down_proj_.parameters());
    return ps;
  }

  /// The gate and up projections.
  MultiLinear<T>& gate_up() noexcept { return gate_up_; }
  /// The activation.
  SwiGLU<T>& act() noexcept { return act_; }
  /// The projection back to d.
  nn::Linear<T>& down_proj() noexcept { return down_proj_; }

  /// Megatron-style MLP: one all-reduce forward, one backward.
  static constexpr auto tp_plan =
      tp::plan(tp::column(&MLP::gate_up), tp::elementwise(&MLP::act), tp::row(&MLP::down_proj));

 private:
  MultiLinear<T> gate_up_;
  SwiGLU<T> act_;
  nn::Linear<T> down_proj_;
};

/// Llama's pre-norm decoder layer: x1 = x + self_attn(input_layernorm(x));
/// y = x1 + mlp(post_attention_layernorm(x1)). Parameters, in forward order:
/// "<prefix>.input_layernorm.weight", "<prefix>.self_attn.{q,k,v,o}_proj.weight",
/// "<prefix>.post_attention_layernorm.weight", "<prefix>.mlp.{gate,up,down}_proj.weight".
/// Tensor-parallel plan: the norms replicated, attention and MLP by their own plans.
///
/// x: (B, T, d) -> y: (B, T, d).
template <std::floating_point T>
class DecoderLayer {
 public:
  using Input = Tensor<T>;  ///< x: (B, T, d)
  /// What backward needs: the sub-layers' contexts.
  struct Context {
    typename RMSNorm<T>::Context input_layernorm;           ///< the first norm's
    typename Attention<T>::Context self_attn;               ///< attention's
    typename RMSNorm<T>::Context post_attention_layernorm;  ///< the second norm's
    typename MLP<T>::Context mlp;                           ///< the MLP's
  };

  /// A new layer of `config`'s sizes named by `init` ("model.layers.3"). Throws tessera::Error
  /// naming the values when the config is invalid.
  DecoderLayer(const LlamaConfig& config, const nn::LayerInit& init = {})
      : input_layernorm_(validated(config).d_model, init.child("input_layernorm"), static_cast<T>(config.norm_eps)),
        self_attn_(config, init.child("self_attn")),
        post_attention_layernorm_(config.d_model, init.child("post_attention_layernorm"),
                                  static_cast<T>(config.norm_eps)),
        mlp_(config, init.child("mlp")) {}

  /// The layer's output.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    auto [h1, c1] = input_layernorm_.forward(x);
    auto [x1, c2] = self_attn_.forward(h1);
    x1.add_(x);  // x1 = x + attn(norm(x)); x1 is fresh, no context holds it
    auto [h2, c3] = post_attention_layernorm_.forward(x1);
    auto [y, c4] = mlp_.forward(h2);
    y.add_(x1);
    return {std::move(y), Context{std::move(c1), std::move(c2), std::move(c3), std::move(c4)}};
  }
  /// dx from dy: (B, T, d); accumulates every parameter gradient.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    Tensor<T> dx1 = post_attention_layernorm_.backward(mlp_.backward(dy, ctx.mlp), ctx.post_attention_layernorm);
    dx1.add_(dy);  // the residual path
    Tensor<T> dx = input_layernorm_.backward(self_attn_.backward(dx1, ctx.self_attn), ctx.input_layernorm);
    dx.add_(dx1);
    return dx;
  }
  /// Every parameter, in forward order (see the class comment).
  ParameterList<T> parameters() {
    ParameterList<T> ps = input_layernorm_.parameters();
    ps.append(self_attn_.parameters());
    ps.append(post_attention_layernorm_.parameters());
    ps.append(mlp_.parameters());
    return ps;
  }

  /// RMSNorm before attention.
  RMSNorm<T>& input_layernorm() noexcept { return input_layernorm_; }
  /// The attention sub-layer.
  Attention<T>& self_attn() noexcept { return self_attn_; }
  /// RMSNorm before the MLP.
  RMSNorm<T>& post_attention_layernorm() noexcept { return post_attention_layernorm_; }
  /// The MLP sub-layer.
  MLP<T>& mlp() noexcept { return mlp_; }

  /// Two residual branches: per forward two all-reduces of (B, T, d), per backward two more.
  static constexpr auto tp_plan =
      tp::plan(tp::residual(tp::replicate(&DecoderLayer::input_layernorm), tp::nested(&DecoderLayer::self_attn)),
               tp::residual(tp::replicate(&DecoderLayer::post_attention_layernorm), tp::nested(&DecoderLayer::mlp)));

 private:
  RMSNorm<T> input_layernorm_;
  Attention<T> self_attn_;
  RMSNorm<T> post_attention_layernorm_;
  MLP<T> mlp_;
};

/// Decoder layer `index` of a model built as Llama(config, seed): named
/// "model.layers.{index}", with the same values, so a pipeline stage can build only its layers.
template <std::floating_point T>
DecoderLayer<T> decoder_layer(const LlamaConfig& config, std::int64_t index, std::uint64_t seed) {
  return DecoderLayer<T>(config, model_init(seed).child("model.layers." + std::to_string(index)));
}

}  // namespace llama

namespace tessera {

/// llama::MultiLinear: each linear is sharded by its own output columns (a plain Shard(1) of
/// its own weight), so a rank's output is [its part of y_0 | its part of y_1 | ...].
template <std::floating_point T>
struct TensorParallelShard<llama::MultiLinear<T>> {
  /// This rank's columns of every linear. Throws tessera::Error naming the numbers when tp does
  /// not divide a linear's units ("k_proj: 2 KV heads ... not divisible by tp 4"), or when the
  /// plan asks for blocks (each linear is already its own block).
  static llama::MultiLinear<T> column(llama::MultiLinear<T>& full, int blocks, int rank, int size) {
    TESSERA_EXPECTS(blocks == 1, "MultiLinear: shards each linear by its own columns; use tp::column without "
                                 "blocks (got blocks = ", blocks, ")");
    std::vector<llama::LinearSpec> specs = full.specs();
    std::vector<nn::Linear<T>> shards;
    for (std::size_t i = 0; i < specs.size(); ++i) {
      llama::LinearSpec& s = specs[i];
      const std::int64_t units = s.out_features / s.unit;
      TESSERA_EXPECTS(units % size == 0, "MultiLinear ", full.linears()[i].weight().name, ": ", units, " ",
                      s.unit_name, " (", s.out_features, " output features, ", s.unit,
                      " per unit) are not divisible by tp ", size);
      shards.push_back(TensorParallelShard<nn::Linear<T>>::column(full.linears()[i], 1, rank, size));
      s.out_features /= size;
    }
    return llama::MultiLinear<T>(std::move(specs), std::move(shards));
  }
};

/// llama::RotaryAttentionCore: a rank computes n_head / tp query heads and the n_kv_head / tp
/// KV heads they read (the heads of its q, k and v columns from the column-parallel
/// MultiLinear).
template <std::floating_point T>
struct TensorParallelShard<llama::RotaryAttentionCore<T>> {
  /// The core over this rank's heads. Throws tessera::Error naming n_head, n_kv_head and tp
  /// unless tp divides both (with GQA, tp may not exceed the KV heads: a rank holds whole ones).
  static llama::RotaryAttentionCore<T> heads(const llama::RotaryAttentionCore<T>& full, int /*rank*/, int size) {
    TESSERA_EXPECTS(full.n_head() % size == 0 && full.n_kv_head() % size == 0, "RotaryAttentionCore: n_head ",
                    full.n_head(), " and n_kv_head ", full.n_kv_head(), " must both be divisible by tp ", size,
                    " (each rank holds whole query and KV heads)");
    return llama::RotaryAttentionCore<T>(full.n_head() / size, full.n_kv_head() / size, full.head_dim(),
                                         full.rope_theta());
  }
};

}  // namespace tessera
