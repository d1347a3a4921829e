// Control: a complete user layer compiles when wrapped in DataParallel.
#include "tessera/parallel/data/data_parallel.hpp"

struct Scale {
  using Input = tessera::Tensor<float>;
  struct Context {};
  tessera::ForwardResult<tessera::Tensor<float>, Context> forward(const Input& x) { return {x, {}}; }
  tessera::Tensor<float> backward(const tessera::Tensor<float>& dy, const Context&) { return dy; }
  tessera::ParameterList<float> parameters() { return {}; }
};

void wrap(tessera::Comm world) {
  tessera::DataParallel<Scale> dp(Scale{}, world);
  (void)dp;
}

int main() {}
