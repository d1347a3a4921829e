#pragma once
/// @file
/// StagePartition: which consecutive layers of a model each pipeline stage holds -- from explicit
/// cut points, from a list of layers per stage (checked: every layer in exactly one stage), or
/// balanced by a per-layer cost such as the parameter count.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"

namespace tessera {

/// A cut of a model given as a sequence of `num_layers()` layers into `num_stages()` pipeline
/// stages: stage s holds the consecutive layers [begin(s), end(s)), every stage at least one,
/// every layer in exactly one stage (the invariant every constructor checks). A pipeline with
/// p ranks and v model chunks per rank needs p * v stages; with loop placement stage s runs on
/// rank s % p (schedule::Schedule).
///
/// Built with one of the factories:
/// - `from_cuts(n, {3, 5})`: stages [0, 3), [3, 5), [5, n) (the first layer of every stage
///   but the first; GPipe's and torch.distributed.pipelining's split points);
/// - `from_stages(n, {{0, 1, 2}, {3, 4}})`: the layers of each stage, validated with an error
///   that names every layer missing or doubled;
/// - `even(n, s)`: layer counts differ by at most one, the larger stages first (7 over 2:
///   4 + 3; 30 over 4: 8 + 8 + 7 + 7);
/// - `balanced(costs, s)`: the smallest possible largest stage cost (e.g. costs = parameter
///   counts, or measured times), and among those cuts the most even one.
///
/// Layer names (optional) are used in messages and in to_string(): "layer 3 (h.2)".
class StagePartition {
 public:
  /// One stage holding one layer.
  StagePartition() : bounds_{0, 1} {}

  /// Stages cut before each layer index in `cuts` (strictly increasing, each in
  /// [1, num_layers - 1]): cuts {3, 5} over 7 layers give [0, 3), [3, 5), [5, 7).
  /// Throws Error naming the offending cut, or if num_layers < 1 or `names` has another size.
  static StagePartition from_cuts(int num_layers, const std::vector<int>& cuts,
                                  std::vector<std::string> names = {}) {
    check_layers("from_cuts", num_layers, names);
    std::vector<int> b{0};
    for (std::size_t i = 0; i < cuts.size(); ++i) {
      TESSERA_EXPECTS(cuts[i] >= 1 && cuts[i] <= num_layers - 1, "StagePartition::from_cuts: cut point ", cuts[i],
                      " (entry ", i, ") is outside [1, ", num_layers - 1, "] for ", num_layers,
                      " layers; every stage must hold at least one layer");
      TESSERA_EXPECTS(cuts[i] > b.back(), "StagePartition::from_cuts: cut points must increase strictly, but entry ",
                      i, " is ", cuts[i], " after ", b.back());
      b.push_back(cuts[i]);
    }
    b.push_back(num_layers);
    return StagePartition(std::move(b), std::move(names));
  }

  /// Stages given by their layer indices: stage s holds `stages[s]`. Every layer in
  /// [0, num_layers) must be in exactly one stage, each stage must hold consecutive layers in
  /// increasing order, and the stages must follow the layer order. Throws Error naming every
  /// layer that is in no stage or in several ("layer 4 (h.3) is in no stage; layer 2 (h.1) is
  /// in stages 0 and 1"), an index outside [0, num_layers), an empty stage, or a stage that is
  /// not a consecutive run following the previous one.
  static StagePartition from_stages(int num_layers, const std::vector<std::vector<int>>& stages,
                                    std::vector<std::string> names = {}) {
    check_layers("from_stages", num_layers, names);
    TESSERA_EXPECTS(!stages.empty(), "StagePartition::from_stages: no stages given");
    std::vector<std::vector<int>> holders(static_cast<std::size_t>(num_layers));
    for (std::size_t s = 0; s < stages.size(); ++s) {
      TESSERA_EXPECTS(!stages[s].empty(), "StagePartition::from_stages: stage ", s, " holds no layer");
      for (int l : stages[s]) {
        TESSERA_EXPECTS(l >= 0 && l < num_layers, "StagePartition::from_stages: stage ", s, " names layer ", l,
                        ", outside [0, ", num_layers, ")");
        holders[static_cast<std::size_t>(l)].push_back(static_cast<int>(s));
      }
    }
    std::string problems;
    for (int l = 0; l < num_layers; ++l) {
      const std::vector<int>& h = holders[static_cast<std::size_t>(l)];
      if (h.size() == 1) continue;
      if (!problems.empty()) problems += "; ";
      problems += describe_layer(l, names);
      if (h.empty()) {
        problems += " is in no stage";
      } else {
        problems += " is in stages ";
        for (std::size_t i = 0; i < h.size(); ++i)
          problems += tessera::detail::str(i == 0 ? "" : (i + 1 == h.size() ? " and " : ", "), h[i]);
      }
    }
    TESSERA_EXPECTS(problems.empty(), "StagePartition::from_stages: every layer must be in exactly one stage: ",
                    problems);
    std::vector<int> b{0};
    for (std::size_t s = 0; s < stages.size(); ++s) {
      const std::vector<int>& st = stages[s];
      for (std::size_t i = 0; i < st.size(); ++i)
        TESSERA_EXPECTS(st[i] == b.back() + static_cast<int>(i), "StagePartition::from_stages: stage ", s,
                        " must hold consecutive layers in order, starting at layer ", b.back(),
                        " (stages follow the layer order), but its entry ", i, " is layer ", st[i]);
      b.push_back(b.back() + static_cast<int>(st.size()));
    }
    return StagePartition(std::move(b), std::move(names));
  }

  /// `num_stages` stages whose layer counts differ by at most one, the first
  /// num_layers % num_stages stages holding one more (7 over 2: 4 + 3; 30 over 4:
  /// 8 + 8 + 7 + 7). Throws Error unless 1 <= num_stages <= num_layers.
  static StagePartition even(int num_layers, int num_stages, std::vector<std::string> names = {}) {
    check_layers("even", num_layers, names);
    check_stages("even", num_layers, num_stages);
    std::vector<int> b{0};
    for (int s = 0; s < num_stages; ++s) b.push_back(b.back() + num_layers / num_stages + (s < num_layers % num_stages));
    return StagePartition(std::move(b), std::move(names));
  }

  /// `num_stages` stages of consecutive layers balanced by `costs` (one per layer, >= 0, e.g.
  /// parameter counts): the largest stage cost is as small as possible (the bottleneck of a
  /// pipeline), and among the cuts that reach it, the sum of squared stage costs is smallest
  /// (the most even), ties going to the cut with larger earlier stages. Equal costs give
  /// even(). Exact dynamic programming, O(num_stages * num_layers^2). Throws Error unless
  /// 1 <= num_stages <= costs.size() and every cost is finite and >= 0.
  static StagePartition balanced(const std::vector<double>& costs, int num_stages,
                                 std::vector<std::string> names = {}) {
    const int n = static_cast<int>(costs.size());
    check_layers("balanced", n, names);
    check_stages("balanced", n, num_stages);
    for (std::size_t i = 0; i < costs.size(); ++i)
      TESSERA_EXPECTS(std::isfinite(costs[i]) && costs[i] >= 0, "StagePartition::balanced: the cost of ",
                      describe_layer(static_cast<int>(i), names), " is ", costs[i], "; costs must be finite and >= 0");
    std::vector<double> prefix(static_cast<std::size_t>(n) + 1, 0.0);
    for (int i = 0; i < n; ++i) prefix[static_cast<std::size_t>(i) + 1] = prefix[static_cast<std::size_t>(i)] + costs[static_cast<std::size_t>(i)];
    auto cost = [&](int a, int b) { return prefix[static_cast<std::size_t>(b)] - prefix[static_cast<std::size_t>(a)]; };
    const double inf = std::numeric_limits<double>::infinity();
    const std::size_t N = static_cast<std::size_t>(n) + 1;
    // Pass 1: bottleneck[k][i] = smallest largest cost of splitting layers [i, n) into k stages.
    // Pass 2: among splits whose stages all cost at most the optimum, the smallest sum of
    // squares. Both go from the back so that ties can prefer larger earlier stages.
    auto table = [&](auto&& combine, auto&& admissible) {
      std::vector<std::vector<double>> best(static_cast<std::size_t>(num_stages) + 1, std::vector<double>(N, inf));
      std::vector<std::vector<int>> cut(static_cast<std::size_t>(num_stages) + 1, std::vector<int>(N, -1));
      best[0][static_cast<std::size_t>(n)] = 0.0;
      for (int k = 1; k <= num_stages; ++k)
        for (int i = n - k; i >= 0; --i) {
          double b = inf;
          int arg = -1;
          // Largest first stage first, so that a tie keeps the larger earlier stage.
          for (int j = n - k + 1; j > i; --j) {
            const double rest = best[static_cast<std::size_t>(k) - 1][static_cast<std::size_t>(j)];
            if (rest == inf || !admissible(cost(i, j))) continue;
            const double v = combine(cost(i, j), rest);
            if (v < b) {
              b = v;
              arg = j;
            }
          }
          best[static_cast<std::size_t>(k)][static_cast<std::size_t>(i)] = b;
          cut[static_cast<std::size_t>(k)][static_cast<std::size_t>(i)] = arg;
        }
      return std::pair{std::move(best), std::move(cut)};
    };
    const auto [bottleneck, unused] =
        table([](double c, double rest) { return std::max(c, rest); }, [](double) { return true; });
    (void)unused;
    const double limit = bottleneck[static_cast<std::size_t>(num_stages)][0];
    const double slack = limit * 1e-12;
    const auto [sumsq, cut] = table([](double c, double rest) { return c * c + rest; },
                                    [&](double c) { return c <= limit + slack; });
    (void)sumsq;
    std::vector<int> b{0};
    for (int k = num_stages; k >= 1; --k) b.push_back(cut[static_cast<std::size_t>(k)][static_cast<std::size_t>(b.back())]);
    return StagePartition(std::move(b), std::move(names));
  }

  /// Number of stages.
  int num_stages() const noexcept { return static_cast<int>(bounds_.size()) - 1; }
  /// Number of layers of the model.
  int num_layers() const noexcept { return bounds_.back(); }
  /// First layer of `stage`. Throws Error if stage is out of range.
  int begin(int stage) const { return bounds_[checked_stage(stage)]; }
  /// One past the last layer of `stage`. Throws Error if stage is out of range.
  int end(int stage) const { return bounds_[checked_stage(stage) + 1]; }
  /// Number of layers of `stage`. Throws Error if stage is out of range.
  int size(int stage) const { return end(stage) - begin(stage); }
  /// The layer indices of `stage`, ascending. Throws Error if stage is out of range.
  std::vector<int> layers(int stage) const {
    std::vector<int> out;
    for (int l = begin(stage); l < end(stage); ++l) out.push_back(l);
    return out;
  }
  /// The stage holding `layer`. Throws Error if layer is outside [0, num_layers()).
  int stage_of(int layer) const {
    TESSERA_EXPECTS(layer >= 0 && layer < num_layers(), "StagePartition: layer ", layer, " is outside [0, ",
                    num_layers(), ")");
    return static_cast<int>(std::upper_bound(bounds_.begin(), bounds_.end(), layer) - bounds_.begin()) - 1;
  }
  /// The stage boundaries: num_stages() + 1 entries, from 0 to num_layers().
  const std::vector<int>& bounds() const noexcept { return bounds_; }
  /// The layer names given at construction (empty if none were).
  const std::vector<std::string>& names() const noexcept { return names_; }
  /// "layer 3 (h.2)", or "layer 3" without names. Throws Error if layer is out of range.
  std::string layer_name(int layer) const {
    TESSERA_EXPECTS(layer >= 0 && layer < num_layers(), "StagePartition: layer ", layer, " is outside [0, ",
                    num_layers(), ")");
    return describe_layer(layer, names_);
  }
  /// The sum of `costs` over each stage's layers (costs.size() must be num_layers()).
  /// Throws Error otherwise.
  std::vector<double> stage_costs(const std::vector<double>& costs) const {
    TESSERA_EXPECTS(static_cast<int>(costs.size()) == num_layers(), "StagePartition::stage_costs: ", costs.size(),
                    " costs given for ", num_layers(), " layers");
    std::vector<double> out;
    for (int s = 0; s < num_stages(); ++s) {
      double c = 0;
      for (int l = begin(s); l < end(s); ++l) c += costs[static_cast<std::size_t>(l)];
      out.push_back(c);
    }
    return out;
  }

  /// One line per stage: "stage 0: layers 0-3 (embedding .. h.2)" or "stage 1: layer 4".
  std::string to_string() const {
    std::string out;
    for (int s = 0; s < num_stages(); ++s) {
      const int a = begin(s), b = end(s) - 1;
      out += tessera::detail::str("stage ", s, ": ", a == b ? tessera::detail::str("layer ", a)
                                                            : tessera::detail::str("layers ", a, "-", b));
      if (!names_.empty())
        out += a == b ? " (" + names_[static_cast<std::size_t>(a)] + ")"
                      : " (" + names_[static_cast<std::size_t>(a)] + " .. " + names_[static_cast<std::size_t>(b)] + ")";
      out += "\n";
    }
    return out;
  }

  /// Equal stage boundaries (names are not compared).
  friend bool operator==(const StagePartition& a, const StagePartition& b) { return a.bounds_ == b.bounds_; }

 private:
  StagePartition(std::vector<int> bounds, std::vector<std::string> names)
      : bounds_(std::move(bounds)), names_(std::move(names)) {}

  static void check_layers(const char* fn, int num_layers, const std::vector<std::string>& names) {
    TESSERA_EXPECTS(num_layers >= 1, "StagePartition::", fn, ": the model must have at least one layer, got ",
                    num_layers);
    TESSERA_EXPECTS(names.empty() || static_cast<int>(names.size()) == num_layers, "StagePartition::", fn, ": ",
                    names.size(), " layer names given for ", num_layers, " layers");
  }
  static void check_stages(const char* fn, int num_layers, int num_stages) {
    TESSERA_EXPECTS(num_stages >= 1 && num_stages <= num_layers, "StagePartition::", fn, ": cannot cut ", num_layers,
                    " layers into ", num_stages, " stages; every stage needs at least one layer");
  }
  static std::string describe_layer(int l, const std::vector<std::string>& names) {
    if (names.empty()) return tessera::detail::str("layer ", l);
    return tessera::detail::str("layer ", l, " (", names[static_cast<std::size_t>(l)], ")");
  }
  std::size_t checked_stage(int stage) const {
    TESSERA_EXPECTS(stage >= 0 && stage < num_stages(), "StagePartition: stage ", stage, " is outside [0, ",
                    num_stages(), ")");
    return static_cast<std::size_t>(stage);
  }

  std::vector<int> bounds_;
  std::vector<std::string> names_;
};

}  // namespace tessera
