#pragma once
/// @file
/// Parameter (a named trainable tensor with its gradient and its layout on the tp axis), its
/// layout annotation ParamLayout, and ParameterList, what every layer's `parameters()` returns.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera {

/// How a parameter is stored over the ranks of the tp axis: the same full tensor on every rank
/// (`replicate`), or a slice of the full tensor along `dim` (`shard`). Checkpointing and
/// gradient reduction read it. Names follow DTensor placements (Replicate, Shard(dim)).
struct ParamLayout {
  /// Replicated or sharded.
  enum class Kind { replicate, shard };
  Kind kind = Kind::replicate;  ///< replicated or sharded
  int dim = 0;                  ///< shard: the dim of the full tensor that is split
  /// shard: dim `dim` of the full tensor is `blocks` equal consecutive parts, each split evenly
  /// over the ranks; a shard holds its piece of every part, in order. 3 for a fused c_attn
  /// [d, 3d] (q, k, v), so that each rank holds its own heads' q, k and v columns (Megatron's
  /// `stride`). 1 for a plain contiguous split.
  int blocks = 1;
  /// shard with blocks = 1: the full tensor's extent along `dim` when the shards are padded past
  /// it, e.g. the vocabulary of a VocabParallelEmbedding that tp does not divide (each rank
  /// holds ceil(extent / tp) rows; the rows at or past `extent` are padding, not part of the
  /// tensor, and checkpoints neither save nor load them). 0: local extent x tp, no padding.
  std::int64_t extent = 0;

  /// The same full tensor on every tp rank.
  static constexpr ParamLayout replicate() noexcept { return {}; }
  /// A slice along `dim`, of each of `blocks` parts.
  static constexpr ParamLayout shard(int dim, int blocks = 1) noexcept {
    return {Kind::shard, dim, blocks, 0};
  }
  /// A slice along `dim` of a full tensor of `extent` entries along it, padded to a multiple
  /// of the tp size (see `extent`).
  static constexpr ParamLayout padded_shard(int dim, std::int64_t extent) noexcept {
    return {Kind::shard, dim, 1, extent};
  }
  /// Whether this is a shard.
  constexpr bool is_shard() const noexcept { return kind == Kind::shard; }

  /// Equal kind, dim and blocks (dim and blocks ignored for replicate).
  friend constexpr bool operator==(const ParamLayout& a, const ParamLayout& b) noexcept {
    return a.kind == b.kind &&
           (a.kind == Kind::replicate || (a.dim == b.dim && a.blocks == b.blocks && a.extent == b.extent));
  }
  /// Prints "Replicate", "Shard(1)" or "Shard(1, blocks=3)".
  friend std::ostream& operator<<(std::ostream& os, const ParamLayout& l) {
    if (!l.is_shard()) return os << "Replicate";
    os << "Shard(" << l.dim;
    if (l.blocks != 1) os << ", blocks=" << l.blocks;
    if (l.extent != 0) os << ", extent=" << l.extent;
    return os << ')';
  }
};

namespace detail {
/// What a Parameter shares with the Parameter objects tied to it (Parameter::tied): the
/// grad-ready hook that a policy installs.
struct ParameterTie {
  std::function<void()> on_grad_ready;  ///< called by Parameter::mark_grad_ready; may be empty
};
}  // namespace detail

/// A trainable tensor: its Hugging Face style name (e.g. "h.0.attn.c_attn.weight"), its value,
/// its gradient (same shape; backward accumulates into it) and its layout on the tp axis.
///
/// Move-only, so that a layer is never silently duplicated with shared weights; the tensors
/// inside are handles, so a Parameter built from another's `value` and `grad` shares them. A
/// layer that shares another layer's parameter (a tied LM head shares the token embedding)
/// builds its own with `Parameter::tied(other)`, which also shares the grad-ready hook, so that
/// policies see the tie (tie_count()).
///
/// Grad-ready hook (part of the Layer contract, see layer.hpp): a layer calls
/// `mark_grad_ready()` on each of its parameters at the end of its backward, once it has added
/// that call's contribution into `grad`. A policy (DataParallel) installs the hook to start
/// reducing a gradient bucket while backward is still running on earlier layers
/// (PyTorch DDP's autograd hooks, Li et al. VLDB 2020; Megatron-LM's `overlap_grad_reduce`).
template <std::floating_point T>
struct Parameter {
  std::string name;               ///< full name, e.g. "h.3.mlp.c_fc.bias"
  Tensor<T> value;                ///< the values
  Tensor<T> grad;                 ///< dL/d(value), same shape; accumulated by backward
  ParamLayout layout{};           ///< replicated or sharded on the tp axis

  /// A parameter with a zero gradient of `value`'s shape.
  Parameter(std::string name_, Tensor<T> value_, ParamLayout layout_ = {})
      : name(std::move(name_)), value(std::move(value_)), grad(value.shape()), layout(layout_) {}
  /// A parameter with the given gradient tensor. Throws tessera::Error naming both shapes when
  /// `grad_` has another shape than `value_`.
  Parameter(std::string name_, Tensor<T> value_, Tensor<T> grad_, ParamLayout layout_)
      : name(std::move(name_)), value(std::move(value_)), grad(std::move(grad_)), layout(layout_) {
    expect_same_shape("Parameter: value and grad", value, grad);
  }
  /// A Parameter tied to `other`: the same name, value and grad tensors, layout and grad-ready
  /// hook (a tied LM head and its token embedding; Press and Wolf 2017). Both layers' backward
  /// calls then mark the one parameter ready, and tie_count() of either is 2.
  static Parameter tied(const Parameter& other) {
    Parameter p(other.name, other.value, other.grad, other.layout);
    p.tie_ = other.tie_;
    return p;
  }
  Parameter(const Parameter&) = delete;             ///< move-only (see the class comment)
  Parameter& operator=(const Parameter&) = delete;  ///< move-only
  Parameter(Parameter&&) noexcept = default;        ///< moves the handles; tensors are not copied
  Parameter& operator=(Parameter&&) noexcept = default;  ///< moves the handles
  ~Parameter() = default;                           ///< releases the handles

  /// Tells the installed grad-ready hook, if any, that the calling layer has finished adding
  /// its contribution of this backward call into `grad`. Layers call it at the end of
  /// backward; a parameter used k times in one backward is marked k times. Does nothing when no
  /// hook is installed. Throws what the hook throws (DataParallel: tessera::Error when the
  /// gradient changes after its bucket's reduction has started).
  void mark_grad_ready() const {
    if (tie_ && tie_->on_grad_ready) tie_->on_grad_ready();
  }
  /// Installs `hook` as what mark_grad_ready calls (an empty function removes it), for this
  /// parameter and every Parameter tied to it. DataParallel installs one per parameter.
  void set_grad_ready_hook(std::function<void()> hook) {
    if (!tie_) tie_ = std::make_shared<detail::ParameterTie>();
    tie_->on_grad_ready = std::move(hook);
  }
  /// Whether a grad-ready hook is installed (e.g. by a DataParallel wrapping the parameter).
  bool has_grad_ready_hook() const noexcept { return tie_ && static_cast<bool>(tie_->on_grad_ready); }
  /// Number of Parameter objects that share this one's tensors and hook through tied(): 1 for
  /// an untied parameter (0 for a moved-from one).
  long tie_count() const noexcept { return tie_ ? tie_.use_count() : 0; }

 private:
  std::shared_ptr<detail::ParameterTie> tie_ = std::make_shared<detail::ParameterTie>();
};

/// The parameters of a layer, in a fixed order (the Hugging Face order for the reference GPT):
/// a list of non-owning references. Iterating yields `Parameter<T>&`.
///
/// The references stay valid while the layer lives and is not moved.
template <std::floating_point T>
class ParameterList {
 public:
  /// Iterator yielding `Parameter<T>&`.
  class iterator {
   public:
    using iterator_category = std::forward_iterator_tag;  ///< a forward iterator
    using value_type = Parameter<T>;                      ///< what it points to
    using difference_type = std::ptrdiff_t;               ///< distance type
    using pointer = Parameter<T>*;                        ///< pointer to the parameter
    using reference = Parameter<T>&;                      ///< what `*it` yields
    /// A singular iterator.
    iterator() = default;
    /// At the given position of the list's storage.
    explicit iterator(typename std::vector<Parameter<T>*>::const_iterator it) : it_(it) {}
    /// The parameter.
    Parameter<T>& operator*() const { return **it_; }
    /// Member access to the parameter.
    Parameter<T>* operator->() const { return *it_; }
    /// Advances by one.
    iterator& operator++() {
      ++it_;
      return *this;
    }
    /// Advances by one, returning the old position.
    iterator operator++(int) {
      iterator t = *this;
      ++it_;
      return t;
    }
    /// Same position.
    friend bool operator==(const iterator&, const iterator&) = default;

   private:
    typename std::vector<Parameter<T>*>::const_iterator it_{};
  };

  /// An empty list.
  ParameterList() = default;
  /// The given parameters, in order.
  ParameterList(std::initializer_list<Parameter<T>*> params) : params_(params) {}

  /// Appends one parameter.
  void push_back(Parameter<T>& p) { params_.push_back(&p); }
  /// Appends all of `other`'s parameters.
  void append(const ParameterList& other) {
    params_.insert(params_.end(), other.params_.begin(), other.params_.end());
  }
  /// Number of parameters.
  std::size_t size() const noexcept { return params_.size(); }
  /// Whether there are none.
  bool empty() const noexcept { return params_.empty(); }
  /// The i-th parameter; unchecked.
  Parameter<T>& operator[](std::size_t i) const noexcept { return *params_[i]; }
  /// First parameter.
  iterator begin() const { return iterator(params_.begin()); }
  /// Past the last parameter.
  iterator end() const { return iterator(params_.end()); }
  /// The parameter named `name`, or null.
  Parameter<T>* find(std::string_view name) const noexcept {
    for (Parameter<T>* p : params_)
      if (p->name == name) return p;
    return nullptr;
  }
  /// The parameter named `name`. Throws tessera::Error naming it when there is none.
  Parameter<T>& at(std::string_view name) const {
    Parameter<T>* p = find(name);
    TESSERA_EXPECTS(p != nullptr, "ParameterList: no parameter named \"", name, "\" among ", size());
    return *p;
  }
  /// Total number of elements over all parameters.
  std::int64_t numel() const noexcept {
    std::int64_t n = 0;
    for (const Parameter<T>* p : params_) n += p->value.numel();
    return n;
  }
  /// Sets every gradient to zero.
  void zero_grad() const {
    for (Parameter<T>* p : params_) p->grad.zero();
  }

 private:
  std::vector<Parameter<T>*> params_;
};

}  // namespace tessera
