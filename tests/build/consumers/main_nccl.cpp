// A tiny consumer of tessera's NCCL backend: the flags of tessera-nccl (CUDA runtime, NCCL, the
// define) compile and link a program that calls NCCL. Built, not run: running needs the CUDA
// libraries on the loader's path (and nothing here needs a GPU).
#include <nccl.h>

#include "tessera/comm/communicator.hpp"

#ifndef TESSERA_HAVE_NCCL
#error "tessera-nccl must define TESSERA_HAVE_NCCL"
#endif

int main() {
  int version = 0;
  return ncclGetVersion(&version) == ncclSuccess && version > 0 ? 0 : 1;
}
