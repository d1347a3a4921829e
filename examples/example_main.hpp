#pragma once
// The small examples' main: they take no arguments (--help or -h says what the example does,
// anything else is a usage error, exit code 2), and an error ends the example with one line on
// stderr and exit code 1 rather than std::terminate's abort (for instance a TESSERA_TIMEOUT
// or TESSERA_DEBUG_COLLECTIVES value that is not a setting).
#include <cstdio>
#include <cstring>
#include <exception>

namespace examples {

// Returns run()'s exit code, or 0 after --help, 2 for an argument, 1 for an exception.
inline int run_example(int argc, char** argv, const char* about, int (*run)()) {
  const char* name = argc > 0 && argv[0] != nullptr ? argv[0] : "example";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf("%s: %s\nIt takes no arguments. Environment: OPENBLAS_NUM_THREADS=1 (one BLAS thread per rank), "
                  "TESSERA_TIMEOUT (seconds a collective waits, default 60), TESSERA_DEBUG_COLLECTIVES=detail "
                  "(check every collective across ranks).\n", name, about);
      return 0;
    }
    std::fprintf(stderr, "%s: unexpected argument '%s': this example takes none (--help says what it does)\n", name,
                 argv[i]);
    return 2;
  }
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace examples
