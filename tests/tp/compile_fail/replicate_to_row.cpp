// Misuse: the block's replicated input goes straight into a row-parallel layer.
#define PLAN tp::plan(tp::row(&UserBlock::up), tp::column(&UserBlock::down))
#include "block.hpp"

int main() {
  tessera::Comm comm;
  run_block(comm);
}
