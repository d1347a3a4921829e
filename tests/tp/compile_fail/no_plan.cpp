// Misuse: a block without a tensor-parallel plan.
#include "block.hpp"

int main() {
  tessera::Comm comm;
  run_block(comm);
}
