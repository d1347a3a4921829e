// A small user block for the compile-fail cases: its serial forward is not the point here,
// only its plan, given by the macro PLAN before including this file.
#pragma once
#include "tessera/nn/gelu.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/parallel/tensor/tensor_parallel.hpp"

namespace tp = tessera::tp;

struct UserBlock {
  tessera::nn::LayerNorm<float> ln{8};
  tessera::nn::Linear<float> up{8, 16};
  tessera::nn::GELU<float> act;
  tessera::nn::GELU<float> act2;
  tessera::nn::Linear<float> down{16, 8};
#ifdef PLAN
  static constexpr auto tp_plan = PLAN;
#endif
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const Input& x) { return {x, {}}; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy, const Context&) { return dy; }
  tessera::ParameterList<float> parameters() { return {}; }
};

// Wraps the block and runs a step, so that every part of the policy is instantiated.
inline void run_block(tessera::Comm& comm) {
  tessera::TensorParallel<UserBlock> block(UserBlock{}, comm);
  auto [y, ctx] = block.forward(tessera::with_layout<tessera::Replicate>(tessera::Tensor<float>(tessera::Shape{2, 8})));
  block.backward(y, ctx);
}
