// Misuse, without a plan: a replicated activation handed to RowParallel::forward directly.
#include "tessera/nn/linear.hpp"
#include "tessera/parallel/tensor/row_parallel.hpp"

int main() {
  tessera::Comm comm;
  tessera::nn::Linear<float> full(8, 8);
  tessera::RowParallel<tessera::nn::Linear<float>> row(full, comm);
  row.forward(tessera::with_layout<tessera::Replicate>(tessera::Tensor<float>(tessera::Shape{2, 8})));
}
