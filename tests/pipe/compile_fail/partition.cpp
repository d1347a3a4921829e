// A model given as a type list, cut into stages by the macro SPEC (set by meson.build). The
// control (no SPEC) compiles; each misuse must fail with one error naming the culprits.
#include "tessera/parallel/pipeline/static_stage_partition.hpp"

struct Twice {
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const tessera::Tensor<float>& x) { return {x, {}}; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy, Context&) { return dy; }
  tessera::ParameterList<float> parameters() { return {}; }
};

using Model = tessera::LayerList<Twice, Twice, Twice, Twice, Twice, Twice, Twice>;  // 7 layers
#ifndef SPEC
#define SPEC tessera::StageLayers<0, 1, 2, 3>, tessera::StageLayers<4, 5, 6>
#endif
using Cut = tessera::StaticStagePartition<Model, SPEC>;

int main() { return Cut::num_stages == 0; }
