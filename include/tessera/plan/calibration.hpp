#pragma once
/// @file
/// Calibration: this machine's own constants for the planner -- the GEMM rate per shape
/// through tessera's GEMM, the rate of tessera's element-wise kernels, and the communicator's
/// latency and bandwidth per collective -- measured, fitted, and written as a cluster file
/// (plan/clusters/*.json) that Cluster::load reads. `tessera-plan calibrate` drives it
/// (docs/planner.md, "Calibration on this machine").

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/core/error.hpp"
#include "tessera/core/gemm.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/gelu.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/plan/cluster.hpp"
#include "tessera/plan/cost_model.hpp"
#include "tessera/plan/model_spec.hpp"
#include "tessera/plan/precision.hpp"

namespace tessera::plan {

/// One measured GEMM shape: a layer's forward GEMM (m, n, k) and its two backward GEMMs (the
/// input's and the weight's gradient, same flops), timed together as a training step runs them.
struct GemmSample {
  std::string name{};  ///< e.g. "QKV projection, mbs 4, tp 2"
  std::int64_t m = 0;  ///< rows of the forward output
  std::int64_t n = 0;  ///< columns of the forward output
  std::int64_t k = 0;  ///< inner dimension
  double seconds = 0;  ///< mean seconds of one of the three GEMMs
  /// Floating-point operations of one GEMM, 2 m n k.
  double flops() const { return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k); }
  /// FLOP/s reached, flops() / seconds.
  double rate() const { return flops() / seconds; }
};

/// One measured collective: `ranks` ranks each contributing `bytes` (all-reduce: the buffer;
/// all-gather and reduce-scatter: the whole gathered buffer; send/recv: the message).
struct CommSample {
  std::string collective{};  ///< "all_reduce", "all_gather", "reduce_scatter" or "send_recv"
  int ranks = 2;             ///< communicator size
  double bytes = 0;          ///< bytes as above
  double seconds = 0;        ///< median seconds of one call (send_recv: one one-way message)
};

/// A latency-bandwidth fit of one collective at one size, in the planner's terms: a ring
/// all-reduce takes 2 (n-1) latency + 2 (n-1)/n bytes / bandwidth, an all-gather or a
/// reduce-scatter (n-1) latency + (n-1)/n bytes / bandwidth, a message latency + bytes /
/// bandwidth.
struct LinkFit {
  std::string collective{};  ///< as CommSample
  int ranks = 2;             ///< communicator size
  double latency = 0;        ///< seconds per step (>= 0)
  double bandwidth = 0;      ///< bytes/s
};

/// The measurements of one calibration run and the cluster file made from them.
struct Calibration {
  std::string backend{};                 ///< "threads" or "mpi"
  int hardware_threads = 1;              ///< std::thread::hardware_concurrency()
  double cores = 1;                      ///< effective cores: ranks computing at once at a lone rank's speed (measure_cores)
  std::vector<std::pair<int, double>> cores_at_ranks{};  ///< (ranks, effective cores) per rank count measured, ascending
  std::vector<GemmSample> gemms{};       ///< GEMM shapes timed
  double elementwise_bandwidth = 0;      ///< bytes/s: the planner's byte count of element-wise work over its measured time
  double waiting_core_share = 0;         ///< share of a core a waiting rank uses (measured by the tool on the backend)
  double block_pass_overhead = 0;        ///< seconds per block forward + backward not listed by the model (measure_block_overhead)
  double block_token_overhead = 0;       ///< seconds per token per block forward + backward not listed (measure_block_overhead)
  std::vector<CommSample> comm{};        ///< collectives timed

  /// Seconds of `fn()` per call: runs it once to warm up, then in batches of calls lasting at
  /// least `min_seconds` each, and returns the median of `batches` batches' per-call times
  /// (the median resists another process taking the core for a moment).
  template <class Fn>
  static double time_per_call(Fn&& fn, double min_seconds = 0.01, int batches = 5) {
    using Clock = std::chrono::steady_clock;
    fn();
    std::vector<double> per_call;
    for (int b = 0; b < batches; ++b) {
      int calls = 0;
      const auto t0 = Clock::now();
      double elapsed = 0;
      do {
        fn();
        ++calls;
        elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
      } while (elapsed < min_seconds);
      per_call.push_back(elapsed / calls);
    }
    std::nth_element(per_call.begin(), per_call.begin() + batches / 2, per_call.end());
    return per_call[static_cast<std::size_t>(batches / 2)];
  }

  /// Times the three GEMMs of a linear layer of (k -> n) on m rows through tessera::gemm<float>
  /// as nn::Linear runs them: y = x W (NN), dx = dy W^T (NT), dW += x^T dy (TN). Returns the
  /// mean seconds of one of them. Throws Error if a size is < 1.
  static GemmSample measure_linear(std::string name, std::int64_t m, std::int64_t n, std::int64_t k,
                                   double min_seconds = 0.01) {
    TESSERA_EXPECTS(m >= 1 && n >= 1 && k >= 1, "Calibration: GEMM '", name, "' has sizes m=", m, " n=", n, " k=", k,
                    "; each must be >= 1");
    std::vector<float> x(static_cast<std::size_t>(m * k), 0.5f), w(static_cast<std::size_t>(k * n), 0.25f);
    std::vector<float> y(static_cast<std::size_t>(m * n)), dx(x.size()), dw(w.size());
    const double s = time_per_call(
        [&] {
          gemm<float>(Transpose::no, Transpose::no, m, n, k, 1.0f, x.data(), k, w.data(), n, 0.0f, y.data(), n);
          gemm<float>(Transpose::no, Transpose::yes, m, k, n, 1.0f, y.data(), n, w.data(), n, 0.0f, dx.data(), k);
          gemm<float>(Transpose::yes, Transpose::no, k, n, m, 1.0f, x.data(), k, y.data(), n, 1.0f, dw.data(), n);
        },
        min_seconds);
    return GemmSample{.name = std::move(name), .m = m, .n = n, .k = k, .seconds = s / 3};
  }

  /// The GEMM shapes one block and the LM head of `model` run for a micro-batch of `mbs`
  /// sequences at tensor-parallel size `tp` (CostModel::layer_gemms' list: the projections as
  /// linears of tokens = mbs * seq rows; the attention core's per-head products of seq x seq x
  /// head_dim), as (name, m, n, k). Throws Error if tp does not divide the heads.
  static std::vector<std::pair<std::string, std::array<std::int64_t, 3>>> layer_shapes(const ModelSpec& model,
                                                                                        int mbs, int tp) {
    TESSERA_EXPECTS(tp >= 1 && model.heads % tp == 0 && mbs >= 1, "Calibration: tp ", tp,
                    " must divide the heads ", model.heads, " and mbs ", mbs, " must be >= 1");
    const std::int64_t tokens = static_cast<std::int64_t>(mbs) * model.seq, h = model.hidden, t = tp;
    const std::int64_t kv = model.kv_dim(), f = model.ffn_size(), s = model.seq, dh = model.head_dim();
    const std::int64_t vocab_here = (model.vocab + t - 1) / t;
    return {{"QKV projection", {tokens, (h + 2 * kv) / t, h}},
            {"attention core", {s, s, dh}},
            {"output projection", {tokens, h, h / t}},
            {"MLP first linear", {tokens, f / t, h}},
            {"MLP second linear", {tokens, h, f / t}},
            {"LM head", {tokens, vocab_here, h}}};
  }

  /// Measures every shape of layer_shapes(model, mbs, tp) for each mbs and tp given.
  void measure_gemms(const ModelSpec& model, const std::vector<int>& mbss, const std::vector<int>& tps,
                     double min_seconds = 0.01) {
    for (int tp : tps)
      for (int mbs : mbss)
        for (const auto& [name, mnk] : layer_shapes(model, mbs, tp))
          gemms.push_back(measure_linear(tessera::detail::str(name, ", mbs ", mbs, ", tp ", tp), mnk[0], mnk[1], mnk[2],
                                         min_seconds));
  }

  /// Measures tessera's element-wise kernels (nn::GELU and nn::LayerNorm, forward and backward)
  /// on `rows` rows of `width` elements and sets elementwise_bandwidth to the bytes the
  /// planner charges for them over the measured time: CostModel charges an element-wise kernel
  /// whose input holds B bytes 2 B in forward and 4 B in backward (CostModel::layer_memory_bytes),
  /// so each kernel pair is charged 6 x 4 x rows x width bytes. Returns the bandwidth, bytes/s.
  double measure_elementwise(std::int64_t rows, std::int64_t width, double min_seconds = 0.01) {
    TESSERA_EXPECTS(rows >= 1 && width >= 1, "Calibration: element-wise shape ", rows, " x ", width,
                    " must be positive");
    Tensor<float> x = Tensor<float>::full(Shape{rows, width}, 0.3f);
    const nn::GELU<float> gelu;
    nn::LayerNorm<float> norm(width);
    const double t_gelu = time_per_call(
        [&] {
          auto r = gelu.forward(x);
          (void)gelu.backward(r.output, r.ctx);
        },
        min_seconds);
    const double t_norm = time_per_call(
        [&] {
          auto r = norm.forward(x);
          (void)norm.backward(r.output, r.ctx);
        },
        min_seconds);
    const double charged = 6.0 * 4.0 * static_cast<double>(rows * width);
    elementwise_bandwidth = 2 * charged / (t_gelu + t_norm);
    return elementwise_bandwidth;
  }

  /// The cluster this calibration describes so far, for predictions inside calibrate: peak,
  /// curve, element-wise rate, no overheads (links and cores left at placeholders).
  Cluster kernel_cluster() const {
    Cluster c;
    c.name = "calibration";
    c.device_memory = 1;
    c.peak_flops = peak_flops();
    c.gemm_efficiency = gemm_efficiency();
    c.memory_bandwidth = elementwise_bandwidth;
    c.intra_node_bandwidth = c.inter_node_bandwidth = 1;
    return c;
  }

  /// CostModel's seconds for one forward + backward of tessera's block of `model` (fp32, no
  /// dropout) on `mbs` sequences from this calibration's GEMM and element-wise constants alone.
  /// Throws Error if no GEMM or element-wise rate was measured.
  double modelled_block_seconds(const ModelSpec& model, int mbs) const {
    TESSERA_EXPECTS(elementwise_bandwidth > 0, "Calibration: measure the element-wise rate before the block overhead");
    ModelSpec m = model;
    m.tessera_block = true;
    m.dropout = false;
    const CostModel cm{.model = m, .cluster = kernel_cluster(), .layout = Layout{.microbatch_size = mbs},
                       .precision = Precision::float32_adamw()};
    return cm.layer_forward().compute + cm.layer_backward().compute;
  }

  /// Fits the work a block does beyond CostModel's terms through two measurements: at `mbs_a`
  /// and `mbs_b` sequences (mbs_a < mbs_b) the measured forward + backward exceeds the model by
  /// `extra_a` and `extra_b` seconds; extra = pass + token x tokens, each part clamped to >= 0
  /// (returned as {pass seconds, seconds per token}). Throws Error unless 1 <= mbs_a < mbs_b
  /// and seq >= 1.
  static std::pair<double, double> fit_block_overhead(int seq, int mbs_a, double extra_a, int mbs_b, double extra_b) {
    TESSERA_EXPECTS(seq >= 1 && mbs_a >= 1 && mbs_a < mbs_b, "Calibration: block overhead needs 1 <= mbs ", mbs_a,
                    " < mbs ", mbs_b, " and seq ", seq, " >= 1");
    const double ta = static_cast<double>(seq) * mbs_a, tb = static_cast<double>(seq) * mbs_b;
    double per_token = std::max(0.0, (extra_b - extra_a) / (tb - ta));
    double pass = extra_a - per_token * ta;
    if (pass < 0) {  // a line through the origin: all of it per token, least squares
      pass = 0;
      per_token = std::max(0.0, (extra_a * ta + extra_b * tb) / (ta * ta + tb * tb));
    }
    return {pass, per_token};
  }

  /// Measures tessera's nn::Block forward + backward (BlockWork, one pass per call, the fastest
  /// of 7 batches of at least `min_seconds`) on `mbs_a` and `mbs_b` sequences, takes away
  /// modelled_block_seconds at each, and sets block_pass_overhead and block_token_overhead by
  /// fit_block_overhead: the residual adds, bias adds, reshapes, allocations and dispatch the
  /// planner's GEMM and element-wise terms leave out, measured on the job's own block. Needs
  /// the GEMMs and the element-wise rate measured first. Returns {pass, per token}.
  std::pair<double, double> measure_block_overhead(const ModelSpec& model, int mbs_a = 1, int mbs_b = 16,
                                                   double min_seconds = 0.05) {
    auto extra = [&](int mbs) {
      // The fastest of 7 batches: another program's load only ever slows a run, and a block
      // pass lasts long enough to be hit by it more often than a GEMM's batch is.
      BlockWork work(model, mbs, 1);
      (void)work.run();
      double best = 1e300;
      for (int b = 0; b < 7; ++b) {
        int calls = 0;
        double elapsed = 0;
        while (elapsed < min_seconds) {
          elapsed += work.run();
          ++calls;
        }
        best = std::min(best, elapsed / calls);
      }
      return best - modelled_block_seconds(model, mbs);
    };
    const double ea = extra(mbs_a), eb = extra(mbs_b);
    std::tie(block_pass_overhead, block_token_overhead) = fit_block_overhead(model.seq, mbs_a, ea, mbs_b, eb);
    return {block_pass_overhead, block_token_overhead};
  }

  /// One rank's unit of work for the effective-core measurement: `calls` forward + backward
  /// passes of an nn::Block<float> of `model`'s width and heads on `mbs` sequences of its
  /// length -- the job's own mix of GEMMs and element-wise kernels and its working set, which
  /// a GEMM loop alone does not show when ranks share cores and caches.
  struct BlockWork {
    nn::Block<float> block;  ///< the block, with its own parameters
    Tensor<float> x;         ///< its input, (mbs, seq, hidden)
    int calls = 2;           ///< passes per run()

    /// A block of `model` and an input of `mbs` sequences. Throws what nn::Block throws.
    BlockWork(const ModelSpec& model, int mbs = 4, int calls_ = 2)
        : block(model.hidden, model.heads), x(Tensor<float>::full(Shape{mbs, model.seq, model.hidden}, 0.0f)),
          calls(calls_) {
      for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = 0.01f * static_cast<float>(i % 101) - 0.5f;
    }
    /// Seconds of `calls` forward + backward passes.
    double run() {
      const auto t0 = std::chrono::steady_clock::now();
      for (int c = 0; c < calls; ++c) {
        auto r = block.forward(x);
        (void)block.backward(r.output, r.ctx);
      }
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  };

  /// Effective cores from a lone run and `ranks` simultaneous runs of the same work:
  /// ranks x alone / slowest, at most `ranks`.
  static double effective_cores(int ranks, double alone, double slowest) {
    return std::min<double>(ranks, ranks * alone / slowest);
  }

  /// Measures the effective cores with `threads` threads of this process: a BlockWork of
  /// `model` run on one thread, then on `threads` threads at once (each its own block);
  /// effective_cores(threads, alone, the slowest thread's), the median of `repeats` such pairs
  /// (the load of other programs comes and goes). Another program's load, cores sharing a
  /// memory bus, or more threads than cores sharing the caches give fewer than `threads`.
  /// Returns it and records it in cores_at_ranks (sorted by ranks). (Under MPI the tool runs
  /// BlockWork across the processes.) Throws Error if threads or repeats is < 1.
  double measure_cores(const ModelSpec& model, int threads, int repeats = 5) {
    TESSERA_EXPECTS(threads >= 1 && repeats >= 1, "Calibration: measure_cores needs threads >= 1 and repeats >= 1, got ",
                    threads, " and ", repeats);
    std::vector<std::unique_ptr<BlockWork>> work;
    for (int t = 0; t < threads; ++t) work.push_back(std::make_unique<BlockWork>(model));
    for (auto& w : work) (void)w->run();  // warm up: first-touch of every buffer
    std::vector<double> estimates;
    for (int r = 0; r < repeats; ++r) {
      const double alone = work[0]->run();
      std::vector<double> each(static_cast<std::size_t>(threads));
      {
        std::vector<std::jthread> pool;
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] { each[static_cast<std::size_t>(t)] = work[static_cast<std::size_t>(t)]->run(); });
      }
      estimates.push_back(effective_cores(threads, alone, *std::max_element(each.begin(), each.end())));
    }
    std::nth_element(estimates.begin(), estimates.begin() + repeats / 2, estimates.end());
    const double c = estimates[static_cast<std::size_t>(repeats / 2)];
    record_cores(threads, c);
    return c;
  }

  /// The share of a core a waiting rank takes from the ranks computing beside it, from a
  /// slowdown: `working` of `ranks` ranks run the same work while the other ranks either sleep
  /// (taking no core: the work lasts `t_sleeping` seconds) or wait in a blocking collective
  /// (`t_waiting` seconds), on `cores` effective cores. In TimeEstimate's terms the node's work
  /// while they wait is the workers' plus share x (ranks - working) x t_waiting, done at
  /// `cores`: share = cores (t_waiting - t_sleeping) / ((ranks - working) t_waiting), clamped to
  /// [0, 1]. A rank that polls on a core nobody else wants costs nothing here (0), one that
  /// polls in the workers' time slices costs up to a core (1); Open MPI oversubscribed
  /// (mpi_yield_when_idle) yields its slices, in between. Throws Error unless 1 <= working <
  /// ranks and the times and cores are positive.
  static double waiting_share_from_slowdown(int ranks, int working, double cores, double t_sleeping,
                                            double t_waiting) {
    TESSERA_EXPECTS(working >= 1 && working < ranks && cores > 0 && t_sleeping > 0 && t_waiting > 0,
                    "Calibration: waiting share needs 1 <= working < ranks and positive cores and times, got working ",
                    working, " of ", ranks, " ranks, ", cores, " cores, ", t_sleeping, " s and ", t_waiting, " s");
    const double share = cores * (t_waiting - t_sleeping) / ((ranks - working) * t_waiting);
    return std::clamp(share, 0.0, 1.0);
  }

  /// Records `c` effective cores measured with `ranks` ranks at once in cores_at_ranks (kept
  /// sorted by ranks; a repeated count replaces its entry).
  void record_cores(int ranks, double c) {
    auto it = std::find_if(cores_at_ranks.begin(), cores_at_ranks.end(), [&](const auto& e) { return e.first >= ranks; });
    if (it != cores_at_ranks.end() && it->first == ranks) it->second = c;
    else cores_at_ranks.insert(it, {ranks, c});
  }

  /// cores_at_ranks as JSON [[ranks, cores], ...].
  nlohmann::json cores_at_ranks_json() const {
    nlohmann::json a = nlohmann::json::array();
    for (const auto& [r, c] : cores_at_ranks) a.push_back({r, c});
    return a;
  }

  /// The fastest GEMM rate measured, FLOP/s (the cluster's peak). Throws Error if none was.
  double peak_flops() const {
    TESSERA_EXPECTS(!gemms.empty(), "Calibration: no GEMM was measured");
    double peak = 0;
    for (const GemmSample& g : gemms) peak = std::max(peak, g.rate());
    return peak;
  }

  /// The GEMM-efficiency curve: the measured shapes sorted by flops, each point (flops, rate /
  /// peak_flops()); shapes within 5% of each other's flops are merged (mean flops and the rate
  /// of their summed flops over summed time). Throws Error if no GEMM was measured.
  GemmEfficiency gemm_efficiency() const {
    std::vector<GemmSample> sorted = gemms;
    std::sort(sorted.begin(), sorted.end(), [](const GemmSample& a, const GemmSample& b) { return a.flops() < b.flops(); });
    const double peak = peak_flops();
    GemmEfficiency curve;
    std::size_t i = 0;
    while (i < sorted.size()) {
      std::size_t j = i;
      double flops = 0, seconds = 0;
      while (j < sorted.size() && sorted[j].flops() <= 1.05 * sorted[i].flops()) {
        flops += sorted[j].flops();
        seconds += sorted[j].seconds;
        ++j;
      }
      curve.points.emplace_back(flops / static_cast<double>(j - i), std::min(1.0, flops / seconds / peak));
      i = j;
    }
    curve.validate();
    return curve;
  }

  /// Least-squares fit of seconds = a + b * bytes over the samples of `collective` at `ranks`
  /// ranks, minimizing the relative errors (each sample weighted by 1 / seconds^2, so small
  /// messages, where the latency shows, count as much as large ones), turned into the
  /// planner's latency and bandwidth (see LinkFit); a negative intercept is clamped to 0.
  /// Throws Error naming them when a collective is fitted at 1 rank, fewer than two sizes were
  /// measured or the slope is not positive.
  LinkFit fit(const std::string& collective, int ranks) const {
    TESSERA_EXPECTS(ranks >= 2 || collective == "send_recv", "Calibration: ", collective, " at ", ranks,
                    " rank moves nothing; fit it at 2 or more ranks");
    std::vector<const CommSample*> xs;
    for (const CommSample& c : comm)
      if (c.collective == collective && c.ranks == ranks) xs.push_back(&c);
    TESSERA_EXPECTS(xs.size() >= 2, "Calibration: ", collective, " at ", ranks, " ranks has ", xs.size(),
                    " measured sizes; the fit needs at least 2");
    double sw = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (const CommSample* c : xs) {
      const double w = 1.0 / (c->seconds * c->seconds);
      sw += w;
      sx += w * c->bytes;
      sy += w * c->seconds;
      sxx += w * c->bytes * c->bytes;
      sxy += w * c->bytes * c->seconds;
    }
    const double slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx);
    const double intercept = (sy - slope * sx) / sw;
    TESSERA_EXPECTS(slope > 0, "Calibration: ", collective, " at ", ranks, " ranks: time does not grow with size (slope ",
                    slope, " s/byte); measure larger messages");
    // Steps and the share of the bytes each rank moves, per the planner's formulas.
    const double r = ranks;
    double steps = 1, share = 1;
    if (collective == "all_reduce") {
      steps = 2 * (r - 1);
      share = 2 * (r - 1) / r;
    } else if (collective == "all_gather" || collective == "reduce_scatter") {
      steps = r - 1;
      share = (r - 1) / r;
    }
    return LinkFit{.collective = collective, .ranks = ranks, .latency = std::max(0.0, intercept) / steps,
                   .bandwidth = share / slope};
  }

  /// The cluster file: one node of `devices_per_node` ranks sharing `cores` cores
  /// (cores_per_node; waiting_core_share as measured), peak_flops() and gemm_efficiency(), elementwise_bandwidth as the memory
  /// bandwidth, the all-reduce fit at `link_ranks` ranks as the intra-node link (and, since
  /// there is one node, as the inter-node one too), `device_memory_gib` per rank; every sample
  /// and every fit is kept under "calibration". Throws what the fits throw.
  nlohmann::json to_cluster_json(const std::string& name, int devices_per_node, double device_memory_gib,
                                 int link_ranks) const {
    const LinkFit link = fit("all_reduce", link_ranks);
    nlohmann::json curve = nlohmann::json::array();
    for (const auto& [flops, fraction] : gemm_efficiency().points) curve.push_back({flops / 1e9, fraction});
    nlohmann::json samples = nlohmann::json::array();
    for (const GemmSample& g : gemms)
      samples.push_back({{"name", g.name}, {"m", g.m}, {"n", g.n}, {"k", g.k}, {"gflops", g.flops() / 1e9},
                         {"seconds", g.seconds}, {"gflop_per_s", g.rate() / 1e9}});
    nlohmann::json comm_samples = nlohmann::json::array(), fits = nlohmann::json::array();
    std::vector<std::pair<std::string, int>> kinds;
    for (const CommSample& c : comm) {
      comm_samples.push_back({{"collective", c.collective}, {"ranks", c.ranks}, {"bytes", c.bytes}, {"seconds", c.seconds}});
      if (std::find(kinds.begin(), kinds.end(), std::pair{c.collective, c.ranks}) == kinds.end())
        kinds.emplace_back(c.collective, c.ranks);
    }
    for (const auto& [collective, ranks] : kinds) {
      const LinkFit f = fit(collective, ranks);
      fits.push_back({{"collective", collective}, {"ranks", ranks}, {"latency_us", f.latency * 1e6},
                      {"bandwidth_gbps", f.bandwidth / 1e9}});
    }
    return {{"name", name},
            {"source", tessera::detail::str(
                           "Measured by tessera-plan calibrate on this machine (backend ", backend,
                           "): GEMM rates through tessera::gemm<float> (OpenBLAS, one thread per rank) at the main "
                           "job's layer shapes, peak = the fastest; cores_per_node = effective cores (",
                           hardware_threads, " hardware threads; the rate of a block's forward + backward on all "
                           "at once over one alone; cores_per_node_at_ranks: the same with 2, 4, 8 ranks at once); "
                           "memory_bandwidth = the planner's byte count of "
                           "tessera's GELU and LayerNorm forward+backward over their time; links = the all-reduce "
                           "fit at ",
                           link_ranks, " ranks. Depends on the load of the machine when measured.")},
            {"devices_per_node", devices_per_node},
            {"cores_per_node", cores},
            {"cores_per_node_at_ranks", cores_at_ranks_json()},
            {"waiting_core_share", waiting_core_share},
            {"block_overhead", {{"per_pass_us", block_pass_overhead * 1e6}, {"per_token_ns", block_token_overhead * 1e9}}},
            {"device_memory_gib", device_memory_gib},
            {"peak_tflops", peak_flops() / 1e12},
            {"memory_bandwidth_gbps", elementwise_bandwidth / 1e9},
            {"intra_node", {{"bandwidth_gbps", link.bandwidth / 1e9}, {"latency_us", link.latency * 1e6}}},
            {"inter_node", {{"bandwidth_gbps", link.bandwidth / 1e9}, {"latency_us", link.latency * 1e6}}},
            {"gemm_efficiency", curve},
            {"calibration", {{"backend", backend}, {"gemms", samples}, {"comm", comm_samples}, {"fits", fits}}}};
  }
};

}  // namespace tessera::plan
