#pragma once
/// @file
/// Cluster: the machine the planner plans for -- devices per node, memory, peak FLOP/s,
/// bandwidths and latencies, and a GEMM-efficiency curve -- read from a JSON file
/// (plan/clusters/*.json).

#include <exception>
#include <fstream>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/core/error.hpp"
#include "tessera/plan/gemm_efficiency.hpp"

namespace tessera::plan {

/// A homogeneous cluster of nodes with `devices_per_node` accelerators each. Bandwidths are
/// bytes per second in one direction; `inter_node_bandwidth` is a whole node's (all its
/// network links together), so a device's share when every device of the node talks across
/// nodes at once is inter_node_bandwidth / devices_per_node.
struct Cluster {
  std::string name{};                ///< e.g. "A: NVIDIA Selene (DGX A100 80 GB)"
  std::string source{};              ///< where the numbers come from
  int devices_per_node = 1;          ///< accelerators per node
  double device_memory = 0;          ///< bytes of memory per device
  double peak_flops = 0;             ///< dense 16-bit FLOP/s per device
  double memory_bandwidth = 0;       ///< device memory bandwidth, bytes/s
  double intra_node_bandwidth = 0;   ///< per device, one direction, inside a node, bytes/s
  double intra_node_latency = 0;     ///< seconds per message step inside a node
  double inter_node_bandwidth = 0;   ///< per node, one direction, all network links, bytes/s
  double inter_node_latency = 0;     ///< seconds per message step between nodes
  GemmEfficiency gemm_efficiency{};  ///< fraction of peak per GEMM size
  /// Cores a node's devices share, for CPU ranks (threads or processes on one machine), as an
  /// effective count (tessera-plan calibrate measures it: how many ranks compute at once at a
  /// lone rank's speed, which another program's load lowers); 0: each device computes on its
  /// own (accelerators). With more ranks than cores on a node, the step takes at least the
  /// node's total work over cores_per_node (TimeEstimate::contention).
  double cores_per_node = 0;
  /// The share of a core a CPU rank uses while it waits for a message: 0 when it blocks (the
  /// threads backend), near 1 when it polls (Open MPI's default); tessera-plan calibrate
  /// measures it. Used with cores_per_node: a waiting rank's share counts as work.
  double waiting_core_share = 0;
  /// Effective cores measured with a given number of ranks computing at once, as (ranks, cores),
  /// ranks ascending (tessera-plan calibrate: 2, 4 and 8 threads, or the mpirun size). With more
  /// ranks than cores the ranks share the cores by time slices, and their working sets share
  /// the caches, so the count can fall as ranks grow. Empty: cores_per_node at every count.
  std::vector<std::pair<int, double>> cores_at_ranks{};
  /// Work of tessera's nn::Block that the GEMM and element-wise terms do not list (residual and
  /// bias adds, the heads' reshapes, allocation of fresh tensors, per-call dispatch), as
  /// calibrate measures it: a real block's forward + backward at two micro-batch sizes less
  /// CostModel's prediction from the same constants, fitted through both as a fixed part per
  /// pass (seconds per forward + backward of one block on one micro-batch) ...
  double block_pass_overhead = 0;
  /// ... and a part per token (seconds per token per block forward + backward). 0 on
  /// accelerators and for models other than tessera's block (ModelSpec::tessera_block).
  double block_token_overhead = 0;

  /// Effective cores when `ranks` ranks of a node compute at once: cores_at_ranks' entry for
  /// that count, linear between the two counts around it, the nearest count's outside them;
  /// cores_per_node when cores_at_ranks is empty.
  double cores_for(int ranks) const {
    if (cores_at_ranks.empty()) return cores_per_node;
    if (ranks <= cores_at_ranks.front().first) return cores_at_ranks.front().second;
    if (ranks >= cores_at_ranks.back().first) return cores_at_ranks.back().second;
    std::size_t i = 1;
    while (cores_at_ranks[i].first < ranks) ++i;
    const auto& [r0, c0] = cores_at_ranks[i - 1];
    const auto& [r1, c1] = cores_at_ranks[i];
    return c0 + (c1 - c0) * (ranks - r0) / static_cast<double>(r1 - r0);
  }

  /// A device's bandwidth toward devices of other nodes when all devices of its node send at
  /// once: inter_node_bandwidth / devices_per_node, bytes/s.
  double inter_node_bandwidth_per_device() const { return inter_node_bandwidth / devices_per_node; }

  /// Throws Error naming the field when a number is not positive or the curve is invalid.
  void validate() const {
    TESSERA_EXPECTS(devices_per_node >= 1, "Cluster '", name, "': devices_per_node must be >= 1, got ",
                    devices_per_node);
    const std::pair<const char*, double> positive[] = {
        {"device_memory", device_memory},         {"peak_flops", peak_flops},
        {"memory_bandwidth", memory_bandwidth},   {"intra_node_bandwidth", intra_node_bandwidth},
        {"inter_node_bandwidth", inter_node_bandwidth}};
    for (const auto& [field, value] : positive)
      TESSERA_EXPECTS(value > 0, "Cluster '", name, "': ", field, " must be > 0, got ", value);
    TESSERA_EXPECTS(cores_per_node >= 0, "Cluster '", name, "': cores_per_node must be >= 0 (0: one per device), got ",
                    cores_per_node);
    for (std::size_t i = 0; i < cores_at_ranks.size(); ++i)
      TESSERA_EXPECTS(cores_at_ranks[i].first >= 1 && cores_at_ranks[i].second > 0 &&
                          (i == 0 || cores_at_ranks[i].first > cores_at_ranks[i - 1].first),
                      "Cluster '", name, "': cores_per_node_at_ranks entry ", i, " is (", cores_at_ranks[i].first, ", ",
                      cores_at_ranks[i].second, "); ranks must be >= 1 and ascending, cores > 0");
    TESSERA_EXPECTS(block_pass_overhead >= 0 && block_token_overhead >= 0, "Cluster '", name,
                    "': block_overhead must be >= 0, got ", block_pass_overhead, " s per pass and ",
                    block_token_overhead, " s per token");
    TESSERA_EXPECTS(waiting_core_share >= 0 && waiting_core_share <= 1, "Cluster '", name,
                    "': waiting_core_share must lie in [0, 1], got ", waiting_core_share);
    TESSERA_EXPECTS(intra_node_latency >= 0 && inter_node_latency >= 0, "Cluster '", name,
                    "': latencies must be >= 0, got ", intra_node_latency, " and ", inter_node_latency);
    gemm_efficiency.validate();
  }

  /// Reads a cluster from JSON in the units people quote:
  /// {"name", "source", "devices_per_node", "device_memory_gib", "peak_tflops",
  ///  "memory_bandwidth_gbps", "intra_node": {"bandwidth_gbps", "latency_us"},
  ///  "inter_node": {"bandwidth_gbps", "latency_us"}, "gemm_efficiency": [[gflop, fraction], ...]},
  /// optionally "cores_per_node" and "waiting_core_share" (default 0) and
  /// "cores_per_node_at_ranks": [[ranks, cores], ...] and "block_overhead": {"per_pass_us",
  /// "per_token_ns"} (default 0), and "calibration" (calibrate's raw measurements, not read)
  /// (GB/s = 1e9 bytes/s; GiB = 2^30 bytes). Throws Error naming a missing, mistyped or unknown
  /// key, or a value out of range as the JSON writes it (e.g. "device_memory_gib must be > 0,
  /// got -80"), or what validate() throws.
  static Cluster from_json(const nlohmann::json& j) {
    TESSERA_EXPECTS(j.is_object(), "Cluster JSON: the top level must be an object {...}, got ", j.type_name());
    // The key as a path: "peak_tflops", "intra_node.bandwidth_gbps".
    auto path = [](const char* where, const char* key) {
      return where == nullptr ? std::string(key) : tessera::detail::str(where, ".", key);
    };
    auto only = [&](const nlohmann::json& obj, std::initializer_list<const char*> keys, const char* where) {
      for (const auto& [key, value] : obj.items()) {
        bool known = false;
        std::string list;
        for (const char* k : keys) {
          known = known || key == k;
          list += std::string(list.empty() ? "" : ", ") + k;
        }
        TESSERA_EXPECTS(known, "Cluster JSON: unknown key '", where == nullptr ? key : path(where, key.c_str()),
                        "' (", where == nullptr ? "the top level" : where, " holds ", list, ")");
      }
    };
    auto need = [&](const nlohmann::json& obj, const char* key, const char* where) -> const nlohmann::json& {
      TESSERA_EXPECTS(obj.is_object(), "Cluster JSON: ", where == nullptr ? "the top level" : where,
                      " must be an object {...}, got ", obj.dump());
      TESSERA_EXPECTS(obj.contains(key), "Cluster JSON: no key '", path(where, key), "'");
      return obj.at(key);
    };
    // A number as written; `low` is its bound: > low when `strict`, else >= low.
    auto number = [&](const nlohmann::json& obj, const char* key, const char* where, double low = 0,
                      bool strict = true) {
      const nlohmann::json& v = need(obj, key, where);
      TESSERA_EXPECTS(v.is_number(), "Cluster JSON: ", path(where, key), " must be a number, got ", v.dump());
      const double x = v.get<double>();
      TESSERA_EXPECTS(strict ? x > low : x >= low, "Cluster JSON: ", path(where, key), " must be ",
                      strict ? "> " : ">= ", low, ", got ", v.dump());
      return x;
    };
    {  // A misspelt key ("peak_tflop") would leave a required key missing or an optional one at its
       // default without a word: refused, naming it. "calibration": calibrate's raw measurements.
      std::initializer_list<const char*> keys = {"name", "source", "devices_per_node", "cores_per_node",
                                                 "cores_per_node_at_ranks", "waiting_core_share", "block_overhead",
                                                 "device_memory_gib", "peak_tflops", "memory_bandwidth_gbps",
                                                 "intra_node", "inter_node", "gemm_efficiency", "calibration"};
      only(j, keys, nullptr);
    }
    for (const char* key : {"name", "source"})
      TESSERA_EXPECTS(!j.contains(key) || j.at(key).is_string(), "Cluster JSON: ", key, " must be a string, got ",
                      j.at(key).dump());
    Cluster c;
    c.name = j.value("name", std::string{});
    c.source = j.value("source", std::string{});
    {
      const nlohmann::json& v = need(j, "devices_per_node", nullptr);
      TESSERA_EXPECTS(v.is_number_integer() && v.get<long long>() >= 1 && v.get<long long>() <= (1 << 20),
                      "Cluster JSON: devices_per_node must be a whole number in [1, 2^20], got ", v.dump());
      c.devices_per_node = v.get<int>();
    }
    if (j.contains("cores_per_node")) c.cores_per_node = number(j, "cores_per_node", nullptr, 0, false);
    if (j.contains("waiting_core_share")) {
      c.waiting_core_share = number(j, "waiting_core_share", nullptr, 0, false);
      TESSERA_EXPECTS(c.waiting_core_share <= 1, "Cluster JSON: waiting_core_share must be <= 1, got ",
                      j.at("waiting_core_share").dump());
    }
    if (j.contains("block_overhead")) {
      const nlohmann::json& b = j.at("block_overhead");
      c.block_pass_overhead = number(b, "per_pass_us", "block_overhead", 0, false) * 1e-6;
      c.block_token_overhead = number(b, "per_token_ns", "block_overhead", 0, false) * 1e-9;
      only(b, {"per_pass_us", "per_token_ns"}, "block_overhead");
    }
    if (j.contains("cores_per_node_at_ranks")) {
      const nlohmann::json& at = j.at("cores_per_node_at_ranks");
      TESSERA_EXPECTS(at.is_array(), "Cluster JSON: cores_per_node_at_ranks must be an array of [ranks, cores]");
      for (const nlohmann::json& p : at) {
        TESSERA_EXPECTS(p.is_array() && p.size() == 2 && p[0].is_number_integer() && p[1].is_number() &&
                            p[0].get<long long>() >= 1 && p[0].get<long long>() <= (1 << 20),
                        "Cluster JSON: each cores_per_node_at_ranks entry must be [ranks, cores] with ranks a whole "
                        "number in [1, 2^20], got ", p.dump());
        c.cores_at_ranks.emplace_back(p[0].get<int>(), p[1].get<double>());
      }
    }
    c.device_memory = number(j, "device_memory_gib", nullptr) * 1024.0 * 1024.0 * 1024.0;
    c.peak_flops = number(j, "peak_tflops", nullptr) * 1e12;
    c.memory_bandwidth = number(j, "memory_bandwidth_gbps", nullptr) * 1e9;
    const nlohmann::json& intra = need(j, "intra_node", nullptr);
    c.intra_node_bandwidth = number(intra, "bandwidth_gbps", "intra_node") * 1e9;
    c.intra_node_latency = number(intra, "latency_us", "intra_node", 0, false) * 1e-6;
    only(intra, {"bandwidth_gbps", "latency_us"}, "intra_node");
    const nlohmann::json& inter = need(j, "inter_node", nullptr);
    c.inter_node_bandwidth = number(inter, "bandwidth_gbps", "inter_node") * 1e9;
    c.inter_node_latency = number(inter, "latency_us", "inter_node", 0, false) * 1e-6;
    only(inter, {"bandwidth_gbps", "latency_us"}, "inter_node");
    const nlohmann::json& curve = need(j, "gemm_efficiency", nullptr);
    TESSERA_EXPECTS(curve.is_array(), "Cluster JSON: gemm_efficiency must be an array of [gflop, fraction]");
    for (const nlohmann::json& p : curve) {
      TESSERA_EXPECTS(p.is_array() && p.size() == 2 && p[0].is_number() && p[1].is_number(),
                      "Cluster JSON: each gemm_efficiency point must be [gflop, fraction], got ", p.dump());
      c.gemm_efficiency.points.emplace_back(p[0].get<double>() * 1e9, p[1].get<double>());
    }
    c.validate();
    return c;
  }

  /// Reads the JSON file at `path` (see from_json). Throws Error naming the path if it cannot
  /// be read or parsed.
  static Cluster load(const std::string& path) {
    std::ifstream in(path);
    TESSERA_EXPECTS(in.good(), "Cluster::load: cannot open '", path, "'");
    nlohmann::json j;
    try {
      in >> j;
    } catch (const nlohmann::json::exception& e) {
      throw Error(tessera::detail::str("Cluster::load: '", path, "' is not valid JSON: ", e.what()));
    } catch (const std::exception& e) {  // e.g. a directory: the read fails
      throw Error(tessera::detail::str("Cluster::load: cannot read '", path, "': ", e.what()));
    }
    try {
      return from_json(j);
    } catch (const Error& e) {
      throw Error(tessera::detail::str("Cluster::load: '", path, "': ", e.what()));
    } catch (const nlohmann::json::exception& e) {  // a key of the wrong type
      throw Error(tessera::detail::str("Cluster::load: '", path, "': ", e.what()));
    }
  }
};

}  // namespace tessera::plan
