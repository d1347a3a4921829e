// A tiny tessera consumer: it only has to find the headers, compile as C++20 and link.
// Built by tests/build/consumers.sh through Meson, CMake and a plain Makefile.
#include <cstdio>
#include <string>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"

static_assert(__cplusplus >= 202002L, "tessera's build flags must select C++20");
static_assert(tessera::Communicator<tessera::Comm>, "tessera::Comm models tessera::Communicator");

int main() {
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
