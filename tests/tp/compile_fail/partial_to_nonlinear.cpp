// Misuse: the pending partial sum of a row-parallel layer goes into GELU without a reduction.
#define PLAN \
  tp::plan(tp::column(&UserBlock::up), tp::elementwise(&UserBlock::act), tp::row(&UserBlock::down), \
           tp::elementwise(&UserBlock::act2))
#include "block.hpp"

int main() {
  tessera::Comm comm;
  run_block(comm);
}
