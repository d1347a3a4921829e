// A tiny tessera consumer: it only has to find the headers, compile as C++20 and link.
// Built by tests/build/consumers.sh through Meson, CMake and a plain Makefile.
#include <cstdio>
#include <string>

#include "tessera/tessera.hpp"

static_assert(__cplusplus >= 202002L, "tessera's build flags must select C++20");
static_assert(tessera::Communicator<tessera::Comm>, "tessera::Comm models tessera::Communicator");

int main() {
  // Two thread ranks all-reduce: proves the threads backend links (pthreads) in every consumer.
  auto sums = tessera::threads::run(2, [](tessera::Comm& c) { return c.all_reduce_value(c.rank() + 1); });
  if (sums[0] != 3 || sums[1] != 3) return 1;
  const tessera::Comm empty;
  if (empty.valid()) return 1;
  try {
    const int world = 6, dp = 4;
    TESSERA_EXPECTS(world % dp == 0, "consumer: world size ", world, " is not a multiple of dp ", dp);
  } catch (const tessera::Error& e) {
    if (std::string(e.what()).find("world size 6 is not a multiple of dp 4") == std::string::npos)
      return 1;
    std::puts("tessera consumer: ok");
    return 0;
  }
  return 1;
}
