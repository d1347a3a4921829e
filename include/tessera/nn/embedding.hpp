#pragma once
/// @file
/// Embedding: a lookup table from integer ids to rows of a weight matrix.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <string>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/layer_init.hpp"

namespace tessera::nn {

/// A lookup table: id i -> row i of the weight [num_embeddings, dim]. Parameter
/// "<prefix>.weight" (GPT-2: "wte.weight" for tokens, "wpe.weight" for positions).
///
/// ids: any shape of rank <= 3, int32 -> (ids..., dim). The ids have no gradient: backward
/// returns NoGrad and adds each row of dy into the gradient row of its id.
template <std::floating_point T>
class Embedding {
 public:
  using Input = Tensor<std::int32_t>;  ///< ids, rank <= 3
  /// What backward needs: the ids.
  struct Context {
    Tensor<std::int32_t> ids;  ///< the looked-up ids
  };

  /// A new table, normal(0, init.std) from the stream named "<prefix>.weight". Throws
  /// tessera::Error unless both sizes are positive.
  Embedding(std::int64_t num_embeddings, std::int64_t dim, const LayerInit& init = {})
      : weight_(init.join("weight"), Tensor<T>::empty(checked_shape(num_embeddings, dim))) {
    fill_normal(weight_.value, init.seed, weight_.name, init.std);
  }
  /// A table holding the given weight [num_embeddings, dim] (copied if strided). Throws
  /// tessera::Error naming its shape when it is not 2-D.
  Embedding(const std::string& prefix, Tensor<T> weight)
      : weight_(LayerInit{.prefix = prefix}.join("weight"), weight.contiguous()) {
    TESSERA_EXPECTS(weight.rank() == 2, "Embedding ", prefix, ": weight of shape ", weight.shape(),
                    " is not 2-D [num_embeddings, dim]");
  }

  /// The rows of the given ids: (ids..., dim). Throws tessera::Error naming the id, its
  /// position and the table size when an id is outside [0, num_embeddings), and when ids has
  /// rank 4.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<std::int32_t>& ids) const {
    TESSERA_EXPECTS(ids.rank() < max_rank, "Embedding ", weight_.name, ": ids of shape ", ids.shape(),
                    " have rank ", ids.rank(), "; at most ", max_rank - 1, " is supported");
    const Tensor<std::int32_t> ic = ids.contiguous();
    const std::int64_t n = ic.numel(), v = num_embeddings(), d = dim();
    Index dims = ids.shape().dims();
    dims[static_cast<std::size_t>(ids.rank())] = d;
    Tensor<T> y = Tensor<T>::empty(Shape::from(dims, ids.rank() + 1));  // (ids..., dim)
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t id = ic.data()[i];
      TESSERA_EXPECTS(id >= 0 && id < v, "Embedding ", weight_.name, ": id ", id, " at flat position ", i,
                      " is outside the table of size ", v, " (valid ids are 0..", v - 1, ")");
      std::copy_n(weight_.value.data() + id * d, d, y.data() + i * d);
    }
    return {std::move(y), Context{ic}};
  }

  /// Adds each row of dy into the gradient row of its id, then marks the weight ready
  /// (Parameter::mark_grad_ready). dy: (ids..., dim). Throws
  /// tessera::Error naming both shapes when dy does not have the output's shape.
  NoGrad backward(const Tensor<T>& dy, const Context& ctx) {
    const std::int64_t n = ctx.ids.numel(), d = dim();
    TESSERA_EXPECTS(dy.numel() == n * d && dy.size(-1) == d && dy.rank() == ctx.ids.rank() + 1,
                    "Embedding ", weight_.name, ": output gradient of shape ", dy.shape(),
                    " does not match ids of shape ", ctx.ids.shape(), " and dim ", d);
    const Tensor<T> g = dy.contiguous();
    T* dw = weight_.grad.data();
    for (std::int64_t i = 0; i < n; ++i) {
      T* row = dw + static_cast<std::int64_t>(ctx.ids.data()[i]) * d;
      const T* src = g.data() + i * d;
      for (std::int64_t j = 0; j < d; ++j) row[j] += src[j];
    }
    weight_.mark_grad_ready();
    return {};
  }

  /// The weight.
  ParameterList<T> parameters() { return {&weight_}; }
  /// The weight [num_embeddings, dim].
  Parameter<T>& weight() noexcept { return weight_; }
  /// Number of rows (the vocabulary or position-table size).
  std::int64_t num_embeddings() const noexcept { return weight_.value.shape()[0]; }
  /// Width of a row.
  std::int64_t dim() const noexcept { return weight_.value.shape()[1]; }

 private:
  static Shape checked_shape(std::int64_t n, std::int64_t d) {
    TESSERA_EXPECTS(n > 0 && d > 0, "Embedding: sizes num_embeddings=", n, " dim=", d, " must be positive");
    return Shape{n, d};
  }

  Parameter<T> weight_;
};

}  // namespace tessera::nn
