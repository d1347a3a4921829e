#pragma once
// A cluster written out in the planner's tests (numbers of an A100 node; a flat GEMM-efficiency
// curve, so times are easy to reason about): tests/plan/test_plan.cpp and test_plan_counts.cpp.
#include <nlohmann/json.hpp>

#include "tessera/plan/cluster.hpp"

namespace plan_test {

// The cluster file's JSON (for tests that change a key).
inline nlohmann::json flat_cluster_json(double efficiency = 0.5) {
  return {{"name", "test"},
          {"devices_per_node", 8},
          {"device_memory_gib", 80},
          {"peak_tflops", 312},
          {"memory_bandwidth_gbps", 2039},
          {"intra_node", {{"bandwidth_gbps", 300}, {"latency_us", 5}}},
          {"inter_node", {{"bandwidth_gbps", 200}, {"latency_us", 10}}},
          {"gemm_efficiency", {{1.0, efficiency}}}};
}

inline tessera::plan::Cluster flat_cluster(double efficiency = 0.5) {
  return tessera::plan::Cluster::from_json(flat_cluster_json(efficiency));
}

}  // namespace plan_test
