// The doctest main of the MPI test programs: every rank runs the same test cases in the same
// order (they contain collectives). Each rank prints its own failures (mpirun --tag-output
// prefixes them with the rank); the pass/fail counts of all ranks are summed with MPI and only
// rank 0 prints the summary. The exit code is non-zero on every rank if any rank failed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <mpi.h>

#include <cstdint>
#include <cstdio>

#include "tessera/mpi.hpp"

namespace {

doctest::TestRunStats g_stats{};

/// doctest's console reporter without its end-of-run summary (rank 0 prints the job's).
struct MpiReporter : doctest::ConsoleReporter {
  using ConsoleReporter::ConsoleReporter;
  void test_run_end(const doctest::TestRunStats& stats) override { g_stats = stats; }
};

}  // namespace

REGISTER_REPORTER("mpi", 1, MpiReporter);

int main(int argc, char** argv) {
  tessera::mpi::Environment env(argc, argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  doctest::Context context;
  context.applyCommandLine(argc, argv);
  context.setOption("no-colors", true);
  context.setOption("reporters", "mpi");
  if (rank != 0) {
    context.setOption("no-intro", true);
    context.setOption("no-version", true);
  }
  const int rc = context.run();
  if (context.shouldExit()) return rc;  // --help, --list-test-cases, ...

  // cases run, cases failed, assertions, assertions failed, ranks that failed
  std::int64_t counts[5] = {g_stats.numTestCasesPassingFilters, g_stats.numTestCasesFailed, g_stats.numAsserts,
                            g_stats.numAssertsFailed, rc != 0 ? 1 : 0};
  std::int64_t total[5] = {};
  MPI_Allreduce(counts, total, 5, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("[doctest] MPI job of %d ranks: test cases: %lld run (per rank) | %lld failed (summed over ranks)\n",
                size, static_cast<long long>(g_stats.numTestCasesPassingFilters),
                static_cast<long long>(total[1]));
    std::printf("[doctest] assertions on all ranks: %lld | %lld passed | %lld failed | ranks failing: %lld\n",
                static_cast<long long>(total[2]), static_cast<long long>(total[2] - total[3]),
                static_cast<long long>(total[3]), static_cast<long long>(total[4]));
    std::printf("[doctest] Status: %s\n", total[4] == 0 ? "SUCCESS!" : "FAILURE!");
    std::fflush(stdout);
  }
  return total[4] == 0 ? 0 : 1;
}
