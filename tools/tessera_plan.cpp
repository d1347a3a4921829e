// tessera-plan: the planner on the command line (include/tessera/plan, docs/planner.md).
//
//   tessera-plan plan     --cluster plan/clusters/selene_a100.json <model> <layout>   one layout
//   tessera-plan rank     --cluster ... <model> --world 64 --batch 512               the search
//   tessera-plan timeline --cluster ... <model> <layout> --svg step.svg              the replay
//   tessera-plan validate plan/validation/published_rows.json                        published runs
//   tessera-plan calibrate --out plan/clusters/this_machine_threads.json            this machine
//   mpirun -np 2 tessera-plan calibrate --backend mpi --ranks 2 --out ...            (MPI links)
//
// <model>: --layers --hidden --heads [--kv-heads] [--ffn] --vocab --seq [--untied], or
// --model file.json with the same keys. <layout>: --dp --tp --pp [--v] --mbs --batch
// [--schedule] [--sp] [--p2p-scatter-gather] [--recompute] [--zero] [--overlap-dp].
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <thread>
#include <unistd.h>

#include "comm_benchmark.hpp"
#include "tessera/comm/launch.hpp"
#include "tessera/plan/calibration.hpp"
#include "tessera/plan/plan.hpp"
#include "tessera/plan/search.hpp"
#include "tessera/schedule/chrome_trace.hpp"
#include "tessera/schedule/svg.hpp"

namespace tp = tessera::plan;
using nlohmann::json;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// The model sizes without a default a prediction could use (ModelArgs::get refuses a model
// given by flags without them), and the keys a model file may hold.
constexpr const char* kSizeFlags[] = {"--layers", "--hidden", "--heads", "--vocab", "--seq"};
constexpr const char* kModelFileKeys[] = {"name", "layers", "hidden", "heads", "kv_heads", "ffn",
                                          "vocab", "seq", "tied", "tessera_block", "dropout"};

struct ModelArgs {
  std::string file;
  tp::ModelSpec spec{.name = "model"};
  bool untied = false, no_dropout = false, tessera_block = false;
  bool has_defaults = false;  // calibrate: the main job's model unless flags say otherwise
  std::vector<CLI::Option*> sizes{};  // --layers --hidden --heads --vocab --seq of every subcommand
  void add(CLI::App* app) {
    CLI::Option* from_file =
        app->add_option("--model", file, "model JSON: {name, layers, hidden, heads, kv_heads, ffn, vocab, seq, tied, "
                                         "tessera_block, dropout}; excludes the model flags below");
    // The file describes the whole model: a model flag beside it is refused (exit code 2)
    // rather than silently ignored.
    for (CLI::Option* o : {app->add_option("--layers", spec.layers, "transformer blocks (at most 4096)"),
                           app->add_option("--hidden", spec.hidden, "hidden size (at most 262144)"),
                           app->add_option("--heads", spec.heads, "attention heads"),
                           app->add_option("--kv-heads", spec.kv_heads, "key/value heads (0: = heads)"),
                           app->add_option("--ffn", spec.ffn, "MLP width (0: 4 x hidden; at most 1048576)"),
                           app->add_option("--vocab", spec.vocab, "vocabulary size (at most 16777216)"),
                           app->add_option("--seq", spec.seq, "sequence length (at most 16777216)"),
                           app->add_flag("--untied", untied, "LM head not tied to the embedding"),
                           app->add_flag("--no-dropout", no_dropout, "blocks without dropout (tessera's nn::Block, train_gpt)"),
                           app->add_flag("--tessera-block", tessera_block,
                                         "tessera's nn::Block (train_gpt): its contexts as nn::block_activation_bytes "
                                         "counts them, full recomputation per stage; implies --no-dropout")})
      from_file->excludes(o);
    for (const char* name : kSizeFlags) sizes.push_back(app->get_option(name));
  }
  tp::ModelSpec get() const {
    tp::ModelSpec m = spec;
    m.tied = !untied;
    m.dropout = !no_dropout && !tessera_block;
    m.tessera_block = tessera_block;
    if (file.empty() && !has_defaults) {  // the sizes have no defaults a prediction could use
      std::string missing;
      for (const char* name : kSizeFlags) {
        bool given = false;
        for (const CLI::Option* o : sizes) given = given || (o->get_name() == name && o->count() > 0);
        if (!given) missing += std::string(missing.empty() ? "" : ", ") + name;
      }
      if (!missing.empty())
        throw tessera::Error("tessera-plan: the model needs " + missing + " (or --model FILE)");
    }
    if (!file.empty()) try {
      std::ifstream in(file);
      if (!in) throw tessera::Error("tessera-plan: cannot open model file '" + file + "'");
      const json j = json::parse(in);
      if (!j.is_object())
        throw tessera::Error(tessera::detail::str("tessera-plan: model file '", file, "' must hold a JSON object {...}, got ",
                                                  j.type_name()));
      // A misspelt key ("kv_head") would leave its default in place: refused.
      for (const auto& [key, value] : j.items())
        if (std::ranges::find(kModelFileKeys, key) == std::ranges::end(kModelFileKeys)) {
          std::string known;
          for (const char* k : kModelFileKeys) known += std::string(known.empty() ? "" : ", ") + k;
          throw tessera::Error("tessera-plan: model file '" + file + "': unknown key '" + key + "' (" + known + ")");
        }
      // Sizes are whole numbers: 2.5 layers or 1e12 (beyond int) is refused, not truncated.
      auto whole = [&](const char* key, int fallback, bool required) {
        if (!required && !j.contains(key)) return fallback;
        const json& v = j.at(key);
        if (!v.is_number_integer() || v.get<long long>() < 0 || v.get<long long>() > 2147483647LL)
          throw tessera::Error(tessera::detail::str("tessera-plan: model file '", file, "': ", key,
                                                    " must be a whole number in [0, 2^31), got ", v.dump()));
        return v.get<int>();
      };
      // true/false keys and the name: a wrong type names the key ("tied": "yes").
      auto flag = [&](const char* key, bool fallback) {
        if (!j.contains(key)) return fallback;
        if (!j.at(key).is_boolean())
          throw tessera::Error(tessera::detail::str("tessera-plan: model file '", file, "': ", key,
                                                    " must be true or false, got ", j.at(key).dump()));
        return j.at(key).get<bool>();
      };
      if (j.contains("name") && !j.at("name").is_string())
        throw tessera::Error("tessera-plan: model file '" + file + "': name must be a string, got " + j.at("name").dump());
      m.name = j.value("name", file);
      m.layers = whole("layers", 0, true);
      m.hidden = whole("hidden", 0, true);
      m.heads = whole("heads", 0, true);
      m.kv_heads = whole("kv_heads", 0, false);
      m.ffn = whole("ffn", 0, false);
      m.vocab = whole("vocab", 0, true);
      m.seq = whole("seq", 0, true);
      m.tied = flag("tied", true);
      m.tessera_block = flag("tessera_block", false);
      m.dropout = flag("dropout", !m.tessera_block);
      if (m.tessera_block && m.dropout)
        throw tessera::Error("tessera-plan: model file '" + file + "': tessera_block has no dropout (tessera's nn::Block); "
                             "drop \"dropout\": true");
    } catch (const json::exception& e) {  // not JSON, a key missing or of the wrong type
      throw tessera::Error("tessera-plan: model file '" + file + "': " + e.what());
    } catch (const tessera::Error&) {
      throw;
    } catch (const std::exception& e) {  // e.g. a directory: the read fails
      throw tessera::Error("tessera-plan: cannot read model file '" + file + "': " + e.what());
    }
    m.validate();
    return m;
  }
};

struct LayoutArgs {
  tp::Layout layout{};
  long long batch = 0;
  std::string schedule = "auto", recompute = "none";
  mutable bool noted_ = false;  // the note on a schedule at pp 1, printed once
  void add(CLI::App* app) {
    app->add_option("--dp", layout.dp, "data-parallel replicas")->check(CLI::Range(1, 1 << 30));
    app->add_option("--tp", layout.tp, "tensor-parallel size")->check(CLI::Range(1, 1 << 30));
    app->add_option("--pp", layout.pp, "pipeline ranks")->check(CLI::Range(1, 1 << 30));
    app->add_option("--v", layout.virtual_stages, "model chunks per pipeline rank (interleaved)")->check(CLI::Range(1, 1 << 30));
    app->add_option("--mbs", layout.microbatch_size, "micro-batch size")->check(CLI::Range(1, 1 << 30));
    // At most 2^17 sequences (published runs use up to a few thousand): the replayed schedule
    // holds every micro-batch, so its memory grows with the batch.
    app->add_option("--batch", batch, "global batch in sequences, at most 131072 (sets the micro-batch count m; pp x v x m at most "
                                        "1048576, the schedule units a prediction replays)")
        ->required()->check(CLI::Range(1LL, 1LL << 17));
    app->add_option("--schedule", schedule, "auto, 1f1b, interleaved, gpipe or zb-h1");
    app->add_flag("--sp", layout.sequence_parallel, "sequence parallelism");
    app->add_flag("--p2p-scatter-gather", layout.p2p_scatter_gather,
                  "pipeline hand-offs split over tp (Megatron-LM's scatter-gather; tessera sends them whole)");
    app->add_option("--recompute", recompute, "none, selective or full")
        ->check(CLI::IsMember({"none", "selective", "full"}));
    app->add_option("--zero", layout.zero_stage, "ZeRO stage 0-3")->check(CLI::Range(0, 3));
    app->add_option("--zero3-unit", layout.zero3_unit_layers,
                    "ZeRO-3: blocks gathered together (default 1; 0: a whole pipeline stage, as train_gpt runs)")
        ->check(CLI::Range(0, 1 << 20));
    app->add_flag("--overlap-dp", layout.overlap_grad_reduce, "overlap the dp reduction with the last backward");
  }
  tp::Layout get() const {
    tp::Layout l = layout;
    const long long per = 1LL * l.dp * l.microbatch_size;
    if (batch % per != 0)
      throw tessera::Error(tessera::detail::str("tessera-plan: the batch ", batch, " is not a multiple of dp x mbs = ",
                                                per));
    l.num_microbatches = static_cast<int>(batch / per);
    if (schedule == "auto") l.schedule = l.virtual_stages > 1 ? tp::PipelineSchedule::interleaved : tp::PipelineSchedule::one_f_one_b;
    else if (schedule == "1f1b") l.schedule = tp::PipelineSchedule::one_f_one_b;
    else if (schedule == "interleaved") l.schedule = tp::PipelineSchedule::interleaved;
    else if (schedule == "gpipe") l.schedule = tp::PipelineSchedule::gpipe;
    else if (schedule == "zb-h1") l.schedule = tp::PipelineSchedule::zero_bubble_h1;
    else throw tessera::Error("tessera-plan: --schedule must be auto, 1f1b, interleaved, gpipe or zb-h1, got '" + schedule + "'");
    l.recompute = parse_recompute(recompute);
    l.validate();  // contradicting flags (--v 2 with --schedule 1f1b, --sp at tp 1): a usage error
    if (l.pp == 1 && schedule != "auto" && schedule != "1f1b" && !noted_)
      std::fprintf(stderr, "tessera-plan: note: --schedule %s at pp 1: one stage has no pipeline to schedule; it plans "
                   "as 1F1B does\n", schedule.c_str());
    noted_ = true;
    return l;
  }
  static tp::Recompute parse_recompute(const std::string& s) {
    if (s == "none") return tp::Recompute::none;
    if (s == "selective") return tp::Recompute::selective;
    if (s == "full") return tp::Recompute::full;
    throw tessera::Error("tessera-plan: --recompute must be none, selective or full, got '" + s + "'");
  }
};

// A file given on the command line that cannot be read or is not what it should be: a usage
// error, exit 2 as in train_gpt and for model files (a failure while planning exits 1).
struct InputError : tessera::Error {
  using tessera::Error::Error;
};

// Cluster::load, its errors as InputError.
tp::Cluster load_cluster(const std::string& path) {
  try {
    return tp::Cluster::load(path);
  } catch (const tessera::Error& e) {
    throw InputError(e.what());
  }
}

void print_plan(const tp::Plan& p, const tp::Cluster& c) {
  std::printf("%s\n", p.to_string().c_str());
  std::printf("  model FLOP/s per device %.1f TFLOP/s (%.1f%% of peak); bubble ratio %.4f; %lld p2p sends of %.2f MB per pipeline\n",
              p.model_flops_per_device() / 1e12, 100 * p.model_flops_per_device() / c.peak_flops, p.time.bubble_ratio,
              p.time.p2p_messages, p.time.p2p_bytes / 1e6);
}

// ---- validate ---------------------------------------------------------------------------------

struct RowResult {
  std::string id;
  tp::Plan plan;
  double published = 0;  // 0: none
  double spread_lo = 0, spread_hi = 0;
  int candidates = 0;
  bool fits = true;
};

// A row's cluster file, in `clusters`; when it cannot be opened, says which option sets the folder.
tp::Cluster load_row_cluster(const std::filesystem::path& clusters, const std::string& name) {
  const std::filesystem::path path = clusters / name;
  if (!std::filesystem::exists(path))
    throw InputError("tessera-plan validate: cannot open the cluster file '" + path.string() +
                     "' (a row's \"cluster\", read from --clusters DIR, default ../clusters beside the rows file: give "
                     "--clusters plan/clusters when the rows file was copied elsewhere)");
  return load_cluster(path.string());
}

// A row's keys and their types and ranges, checked before it is predicted, so that an error
// names the row and the key (a wrong type was nlohmann's "type must be number, but is string",
// a global_batch of 0 the Layout's micro-batch message, exit 1).
void check_row(const json& r, std::size_t index) {
  const std::string row = r.is_object() && r.contains("id") && r.at("id").is_string()
                              ? "row " + r.at("id").get<std::string>()
                              : tessera::detail::str("row ", index + 1);
  const auto bad = [&](const std::string& key, const std::string& want) {
    throw InputError(tessera::detail::str("tessera-plan validate: ", row, ": ", key, " must be ", want, ", got ",
                                          r.contains(key) ? r.at(key).dump() : std::string("nothing (the key is missing)")));
  };
  if (!r.is_object()) throw InputError("tessera-plan validate: " + row + " is not an object: " + r.dump());
  for (const char* key : {"id", "cluster"})
    if (!r.contains(key) || !r.at(key).is_string()) bad(key, "a string");
  for (const char* key : {"layers", "hidden", "heads", "seq", "vocab", "tp", "pp", "dp", "global_batch"})
    if (!r.contains(key) || !r.at(key).is_number_integer() || r.at(key).get<long long>() < 1 ||
        r.at(key).get<long long>() > (1LL << 30))
      bad(key, "an integer from 1 to 2^30");
  for (const char* key : {"mbs", "v", "gpus"})
    if (r.contains(key) && !r.at(key).is_null() &&
        (!r.at(key).is_number_integer() || r.at(key).get<long long>() < 1 || r.at(key).get<long long>() > (1LL << 30)))
      bad(key, "null or an integer from 1 to 2^30");
  for (const char* key : {"mbs", "v", "recompute", "iteration_s", "sp", "zero"})
    if (!r.contains(key)) bad(key, "given (null where unknown)");
  if (!r.at("recompute").is_null() &&
      !(r.at("recompute").is_string() && (r.at("recompute") == "none" || r.at("recompute") == "selective" ||
                                          r.at("recompute") == "full")))
    bad("recompute", "null, \"none\", \"selective\" or \"full\"");
  if (!r.at("iteration_s").is_null() && !r.at("iteration_s").is_number()) bad("iteration_s", "null or a number of seconds");
  if (!r.at("sp").is_boolean()) bad("sp", "true or false");
  if (!r.at("zero").is_number_integer() || r.at("zero").get<long long>() < 0 || r.at("zero").get<long long>() > 3)
    bad("zero", "an integer from 0 to 3");
}

// Predicts a published row; unknown mbs / v / recompute are chosen as the fastest candidate that fits
// (mbs in {1, 2, 4}, v in {1, 2, 3}, recompute in {selective, full}); the spread is over every
// candidate that can be built.
RowResult predict_row(const json& r, const std::filesystem::path& clusters) {
  tp::ModelSpec m{.name = r.at("id").get<std::string>(), .layers = r.at("layers"), .hidden = r.at("hidden"),
                  .heads = r.at("heads"), .kv_heads = 0, .ffn = 0, .vocab = r.at("vocab"), .seq = r.at("seq"),
                  .tied = true};
  const tp::Cluster c = load_row_cluster(clusters, r.at("cluster").get<std::string>());
  // A row that contradicts itself is refused, naming it, rather than predicted.
  if (r.contains("gpus") && !r.at("gpus").is_null()) {
    const long long gpus = r.at("gpus").get<long long>(),
                    product = r.at("tp").get<long long>() * r.at("pp").get<long long>() * r.at("dp").get<long long>();
    if (gpus != product)
      throw InputError(tessera::detail::str("tessera-plan validate: row ", m.name, ": gpus ", gpus, " is not tp x pp x dp = ",
                                            r.at("tp").get<long long>(), " x ", r.at("pp").get<long long>(), " x ",
                                            r.at("dp").get<long long>(), " = ", product));
  }
  if (!r.at("iteration_s").is_null() && !(r.at("iteration_s").get<double>() > 0))
    throw InputError(tessera::detail::str("tessera-plan validate: row ", m.name, ": iteration_s must be > 0 seconds (or null: "
                                          "no published time), got ", r.at("iteration_s").dump()));
  std::vector<int> mbss = r.at("mbs").is_null() ? std::vector<int>{1, 2, 4} : std::vector<int>{r.at("mbs").get<int>()};
  std::vector<int> vs = r.at("v").is_null() ? std::vector<int>{1, 2, 3} : std::vector<int>{r.at("v").get<int>()};
  std::vector<tp::Recompute> rcs = r.at("recompute").is_null()
                                       ? std::vector<tp::Recompute>{tp::Recompute::selective, tp::Recompute::full}
                                       : std::vector<tp::Recompute>{LayoutArgs::parse_recompute(r.at("recompute"))};
  RowResult out{.id = m.name, .plan = {}, .published = r.at("iteration_s").is_null() ? 0.0 : r.at("iteration_s").get<double>()};
  bool have = false;
  for (int mbs : mbss)
    for (int v : vs)
      for (tp::Recompute rc : rcs) {
        tp::Layout l{.dp = r.at("dp"), .tp = r.at("tp"), .pp = r.at("pp"), .virtual_stages = v, .microbatch_size = mbs};
        const long long per = 1LL * l.dp * mbs, B = r.at("global_batch");
        if (B % per != 0) continue;
        l.num_microbatches = static_cast<int>(B / per);
        if (v > 1 && (l.pp == 1 || l.num_microbatches % l.pp != 0 || m.layers % (l.pp * v) != 0)) continue;
        l.schedule = v > 1 ? tp::PipelineSchedule::interleaved : tp::PipelineSchedule::one_f_one_b;
        l.sequence_parallel = r.at("sp").get<bool>() && l.tp > 1;
        l.p2p_scatter_gather = true;  // Megatron-LM's default in the published runs
        l.recompute = rc;
        l.zero_stage = r.at("zero");
        tp::Plan p = tp::Plan::predict(m, c, l);
        const double t = p.time.total();
        out.spread_lo = out.candidates == 0 ? t : std::min(out.spread_lo, t);
        out.spread_hi = out.candidates == 0 ? t : std::max(out.spread_hi, t);
        ++out.candidates;
        const bool better = !have || (p.fits() && !out.plan.fits()) ||
                            (p.fits() == out.plan.fits() && t < out.plan.time.total());
        if (better) {
          out.plan = std::move(p);
          have = true;
        }
      }
  if (!have) throw tessera::Error("tessera-plan validate: row " + m.name + " has no layout that can be built");
  out.fits = out.plan.fits();
  return out;
}

int validate_rows(const std::string& rows_path, const json& doc, const std::string& clusters_dir, double max_mean,
                  double max_max) {
  const std::filesystem::path clusters =
      clusters_dir.empty() ? std::filesystem::path(rows_path).parent_path() / ".." / "clusters" : std::filesystem::path(clusters_dir);
  std::printf("Rows: %s\nSource: %s\n\n", rows_path.c_str(), doc.value("source", std::string("?")).c_str());
  std::printf("%-4s %-10s %-10s %-8s %-19s %s\n", "row", "predicted", "published", "error", "spread (unknowns)", "chosen layout / breakdown");
  double sum = 0, worst = 0;
  int n = 0;
  if (!doc.is_object() || !doc.contains("rows") || !doc.at("rows").is_array() || doc.at("rows").empty())
    throw InputError("tessera-plan validate: '" + rows_path + "' has no rows (\"rows\": [...] is missing or empty; "
                     "plan/validation/published_rows.json shows the format)");
  for (std::size_t i = 0; i < doc.at("rows").size(); ++i) check_row(doc.at("rows")[i], i);  // all before any output row
  for (const json& r : doc.at("rows")) {
    const RowResult x = predict_row(r, clusters);
    const double t = x.plan.time.total();
    std::string err = "-";
    if (x.published > 0) {
      const double e = std::abs(t - x.published) / x.published;
      char b[32];
      std::snprintf(b, sizeof b, "%+.1f%%", 100 * (t - x.published) / x.published);
      err = b;
      if (x.id.rfind("C", 0) == 0) {
        sum += e;
        worst = std::max(worst, e);
        ++n;
      }
    }
    char pub[32] = "-";
    if (x.published > 0) std::snprintf(pub, sizeof pub, "%.2f s", x.published);
    char spread[64];
    std::snprintf(spread, sizeof spread, "%.2f-%.2f s (%d)", x.spread_lo, x.spread_hi, x.candidates);
    char pred[32];
    std::snprintf(pred, sizeof pred, "%.2f s", t);
    std::printf("%-4s %-10s %-10s %-8s %-19s %s%s\n", x.id.c_str(), pred, pub,
                err.c_str(), spread, x.plan.layout.to_string().c_str(), x.fits ? "" : "  [predicted not to fit]");
    std::printf("     time   %s\n     memory %s\n", x.plan.time.to_string().c_str(), x.plan.memory.to_string().c_str());
  }
  if (n == 0)  // no figure to report: "mean 0.00%" would read as a perfect calibration
    throw InputError("tessera-plan validate: '" + rows_path + "' has no calibration row (id C...) with a published "
                     "iteration_s; the error is measured on those");
  const double mean = sum / n;
  std::printf("\nCalibration rows C1-C6: mean |error| %.2f%%, max |error| %.2f%% (targets: mean <= 5%%, max <= 10%%)\n",
              100 * mean, 100 * worst);
  if (doc.contains("bloom_sweep")) {
    const json& s = doc.at("bloom_sweep");
    const tp::Cluster c = load_row_cluster(clusters, s.at("cluster").get<std::string>());
    const tp::ModelSpec m{.name = "BLOOM sweep 181B", .layers = s.at("layers"), .hidden = s.at("hidden"), .heads = s.at("heads"),
                          .kv_heads = 0, .ffn = 0, .vocab = s.at("vocab"), .seq = s.at("seq"), .tied = true};
    std::printf("\nBLOOM layout sweep (%s), ranked by predicted step time:\n", c.name.c_str());
    std::vector<tp::Plan> plans;
    for (const json& l : s.at("layouts")) {
      tp::Layout x{.dp = l.at("dp"), .tp = l.at("tp"), .pp = l.at("pp"), .microbatch_size = l.at("mbs")};
      x.num_microbatches = static_cast<int>(l.at("global_batch").get<long long>() / (1LL * x.dp * x.microbatch_size));
      x.recompute = LayoutArgs::parse_recompute(s.at("recompute"));
      x.zero_stage = s.at("zero");
      x.p2p_scatter_gather = true;  // as the rows above (Megatron-DeepSpeed, Megatron-LM's p2p code)
      plans.push_back(tp::Plan::predict(m, c, x));
    }
    std::stable_sort(plans.begin(), plans.end(), [](const tp::Plan& a, const tp::Plan& b) { return a.time.total() < b.time.total(); });
    for (const tp::Plan& p : plans)
      std::printf("  %-48s %8.2f s  %6.1f GiB%s\n", p.layout.to_string().c_str(), p.time.total(), p.memory.total() / kGiB,
                  p.fits() ? "" : "  OOM (does not fit 80 GiB)");
  }
  // A limit below 0 was not given (the flags' ranges refuse negative values).
  if ((max_mean >= 0 && mean > max_mean) || (max_max >= 0 && worst > max_max)) {
    const auto limit = [](double x) { return x >= 0 ? tessera::detail::str(100 * x, "%") : std::string("none"); };
    std::printf("FAILED: the calibration error (mean %.2f%%, max %.2f%%) is above the limits given (mean %s, max %s)\n",
                100 * mean, 100 * worst, limit(max_mean).c_str(), limit(max_max).c_str());
    return 2;
  }
  return 0;
}

int validate(const std::string& rows_path, const std::string& clusters_dir, double max_mean, double max_max) {
  std::ifstream in(rows_path);
  if (!in) throw InputError("tessera-plan validate: cannot open '" + rows_path + "'");
  try {
    return validate_rows(rows_path, json::parse(in), clusters_dir, max_mean, max_max);
  } catch (const json::parse_error& e) {  // not JSON, e.g. a Markdown table
    throw InputError("tessera-plan validate: '" + rows_path + "' is not JSON (" + e.what() +
                     "); validate reads a rows JSON file like plan/validation/published_rows.json");
  } catch (const json::exception& e) {  // a key missing or of the wrong type
    throw InputError("tessera-plan validate: '" + rows_path + "': " + e.what());
  } catch (const std::ios_base::failure& e) {  // e.g. a directory: the read fails
    throw InputError("tessera-plan validate: cannot read '" + rows_path + "': " + e.what());
  }
}

// ---- calibrate --------------------------------------------------------------------------------

struct CalibrateArgs {
  std::string backend = "threads", out, name;
  std::vector<int> ranks{2, 4, 8};
  std::vector<int> mbs{1, 2, 4, 8, 16, 32};
  std::vector<int> tps{1, 2};
  std::vector<double> comm_kib{16, 128, 1024, 8192};
  int devices_per_node = 8, link_ranks = 2;
  double min_seconds = 0.005;
};

// MPI: the share of a core a waiting rank takes from the computing ranks at this world size
// (Calibration::waiting_share_from_slowdown). The first half of the ranks run `work` while the
// others either sleep (waking every millisecond to test for rank 0's "done"; no core taken) or
// wait in a barrier (Open MPI polls; oversubscribed, it yields the core between polls); the
// slowest worker's time of each, median of `repeats` alternating pairs. Collective; returns it
// on every rank, with the CPU-time share of measure_waiting_share in `cpu_share` for the record.
double measure_waiting_displacement(tessera::Comm& world, tp::Calibration::BlockWork& work, double cores, int repeats,
                                    double& cpu_share) {
  cpu_share = tessera_plan::measure_waiting_share(world, false);
  const int n = world.size(), working = std::max(1, n / 2);
  if (n < 2) return 0.0;
  const bool worker = world.rank() < working;
  std::vector<double> sleeping, waiting;
  for (int r = 0; r < repeats; ++r) {
    // Waiters asleep.
    world.barrier();
    double t = 0;
    std::vector<float> done(1, 0.0f);
    if (worker) {
      t = work.run();
      if (world.rank() == 0) {
        for (int k = 1; k < working; ++k) world.recv(done, k);
        for (int k = working; k < n; ++k) world.send(done, k);
      } else {
        world.send(done, 0);
      }
    } else {
      const tessera::P2POp op = tessera::P2POp::recv(std::span<float>(done), 0);
      tessera::Request req = world.batch_isend_irecv(std::span<const tessera::P2POp>(&op, 1));
      while (!req.test()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    sleeping.push_back(world.all_reduce_value(t, tessera::ReduceOp::max));
    // Waiters in a barrier.
    world.barrier();
    t = worker ? work.run() : 0.0;
    world.barrier();
    waiting.push_back(world.all_reduce_value(t, tessera::ReduceOp::max));
  }
  auto median = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + static_cast<long>(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  return tp::Calibration::waiting_share_from_slowdown(n, working, cores, median(sleeping), median(waiting));
}

// Measures this machine (GEMMs and element-wise kernels on rank 0 alone, then the collectives
// at each rank count) and writes the cluster file. Under MPI every process runs this; rank 0
// measures the kernels while the others wait, and writes.
int calibrate(const CalibrateArgs& c, const tp::ModelSpec& m, int& argc, char**& argv) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  tp::Calibration cal{.backend = c.backend, .hardware_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))};
  std::vector<double> sizes;
  for (double kib : c.comm_kib) sizes.push_back(kib * 1024);
  double waiting_cpu_share = -1;  // MPI: a waiting rank's CPU time over wall time (for the record)
  auto kernels = [&] {
    cal.measure_gemms(m, c.mbs, c.tps, c.min_seconds);
    cal.measure_elementwise(static_cast<std::int64_t>(m.seq) * 8, m.hidden, c.min_seconds);
    cal.measure_elementwise(static_cast<std::int64_t>(m.seq) * 8, 4LL * m.hidden, c.min_seconds);
    cal.measure_block_overhead(m, 1, 16, std::max(0.05, c.min_seconds));
  };
  if (c.backend == "threads") {
    kernels();
    cal.cores = cal.measure_cores(m, cal.hardware_threads);
    for (int n : c.ranks)
      if (n != cal.hardware_threads) cal.measure_cores(m, n);  // the cores when n ranks share them
    for (int n : c.ranks)
      tessera::threads::run(n, [&](tessera::Comm& world) {
        const double share = tessera_plan::measure_waiting_share(world, true);
        if (world.rank() == 0) cal.waiting_core_share = std::max(cal.waiting_core_share, share);
        auto samples = tessera_plan::measure_comm(world, sizes);
        if (world.rank() == 0) cal.comm.insert(cal.comm.end(), samples.begin(), samples.end());
      });
  } else {
    if (c.ranks.size() != 1)
      throw tessera::Error("tessera-plan calibrate: with --backend mpi give one --ranks, the mpirun -np count");
    tessera::launch(c.backend, c.ranks[0], argc, argv, [&](tessera::Comm& world) {
      // Rank 0 measures the kernels alone; the others sleep meanwhile (an MPI wait would poll
      // and take a core), waking every millisecond to test for rank 0's "done".
      std::vector<float> done(1, 0.0f);
      double alone = 0;
      tp::Calibration::BlockWork work(m);
      (void)work.run();
      if (world.rank() == 0) {
        kernels();
        std::vector<double> runs;  // the others sleep meanwhile
        for (int r = 0; r < 7; ++r) runs.push_back(work.run());
        std::nth_element(runs.begin(), runs.begin() + 3, runs.end());
        alone = runs[3];
        for (int r = 1; r < world.size(); ++r) world.send(done, r);
      } else {
        const tessera::P2POp op = tessera::P2POp::recv(std::span<float>(done), 0);
        tessera::Request req = world.batch_isend_irecv(std::span<const tessera::P2POp>(&op, 1));
        while (!req.test()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      // Effective cores across the processes (mpirun may bind each to one core): the same GEMM
      // work on every rank at once against rank 0's lone run.
      // Medians of 7 runs each (the load of other programs comes and goes).
      std::vector<double> together;
      for (int r = 0; r < 7; ++r) {
        world.barrier();
        together.push_back(world.all_reduce_value(work.run(), tessera::ReduceOp::max));
      }
      std::nth_element(together.begin(), together.begin() + 3, together.end());
      if (world.rank() == 0) {
        cal.cores = tp::Calibration::effective_cores(world.size(), alone, together[3]);
        cal.record_cores(world.size(), cal.cores);
      }
      // A waiting rank's cost to the others, measured at this world size: its CPU time alone
      // overstates it when Open MPI, oversubscribed, yields the core between polls.
      const double cores_here = world.all_reduce_value(world.rank() == 0 ? cal.cores : 0.0, tessera::ReduceOp::max);
      double cpu_share = 0;
      const double share = measure_waiting_displacement(world, work, cores_here, 5, cpu_share);
      if (world.rank() == 0) {
        cal.waiting_core_share = share;
        waiting_cpu_share = cpu_share;
      }
      auto samples = tessera_plan::measure_comm(world, sizes);
      if (world.rank() == 0) cal.comm.insert(cal.comm.end(), samples.begin(), samples.end());
    });
    if (cal.comm.empty()) return 0;  // not rank 0
  }
  const double ram_gib = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE)) / kGiB;
  const std::string name = c.name.empty() ? "this machine, " + c.backend + " backend" : c.name;
  const int link = std::find(c.ranks.begin(), c.ranks.end(), c.link_ranks) != c.ranks.end() ? c.link_ranks : c.ranks[0];
  json j = cal.to_cluster_json(name, c.devices_per_node, ram_gib / c.devices_per_node, link);
  if (waiting_cpu_share >= 0) j["calibration"]["waiting_cpu_share"] = waiting_cpu_share;
  std::printf("calibrated %s in %.1f s: %.2f effective cores of %d, a waiting rank uses %.2f of a core, peak %.1f GFLOP/s per rank, element-wise %.2f GB/s\n", name.c_str(),
              std::chrono::duration<double>(Clock::now() - t0).count(), cal.cores, cal.hardware_threads, cal.waiting_core_share, cal.peak_flops() / 1e9,
              cal.elementwise_bandwidth / 1e9);
  std::printf("  a block's forward + backward beyond the GEMM and element-wise terms: %.1f us per pass + %.2f ns per token"
              " (mbs 1: %+.1f%%, mbs 16: %+.1f%% of the modelled time)\n",
              cal.block_pass_overhead * 1e6, cal.block_token_overhead * 1e9,
              100 * (cal.block_pass_overhead + cal.block_token_overhead * m.seq) / cal.modelled_block_seconds(m, 1),
              100 * (cal.block_pass_overhead + cal.block_token_overhead * m.seq * 16) / cal.modelled_block_seconds(m, 16));
  if (waiting_cpu_share >= 0)
    std::printf("  a waiting rank's CPU time is %.2f of a core; what it takes from computing ranks: %.2f (used)\n",
                waiting_cpu_share, cal.waiting_core_share);
  std::printf("  effective cores with N ranks at once (a block's forward + backward each):");
  for (const auto& [r, k] : cal.cores_at_ranks) std::printf(" %d: %.2f", r, k);
  std::printf("\n");
  std::printf("  GEMM efficiency (GFLOP, fraction of peak):");
  for (const auto& [f, e] : cal.gemm_efficiency().points) std::printf(" (%.3g, %.2f)", f / 1e9, e);
  std::printf("\n");
  for (const json& f : j.at("calibration").at("fits"))
    std::printf("  %-15s %d ranks: latency %8.2f us, bandwidth %7.2f GB/s\n", f.at("collective").get<std::string>().c_str(),
                f.at("ranks").get<int>(), f.at("latency_us").get<double>(), f.at("bandwidth_gbps").get<double>());
  if (!c.out.empty()) {
    std::ofstream(c.out) << j.dump(2) << "\n";
    tp::Cluster::load(c.out);  // what the planner will read
    std::printf("wrote %s\n", c.out.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tessera-plan: predict, rank and validate parallel layouts (docs/planner.md)"};
  app.require_subcommand(1);
  std::string cluster_path;
  ModelArgs model;
  LayoutArgs layout;

  bool fp32 = false;  // Precision::float32_adamw() instead of mixed precision
  CLI::App* plan_cmd = app.add_subcommand("plan", "predict one layout: step time and memory by kind");
  plan_cmd->add_flag("--fp32", fp32, "fp32 activations, weights, gradients and AdamW moments (tessera on CPUs)");
  plan_cmd->add_option("--cluster", cluster_path, "cluster JSON (plan/clusters/*.json)")->required();
  model.add(plan_cmd);
  layout.add(plan_cmd);

  CLI::App* time_cmd = app.add_subcommand("timeline", "replay one layout's schedule and draw it");
  time_cmd->add_option("--cluster", cluster_path, "cluster JSON")->required();
  model.add(time_cmd);
  layout.add(time_cmd);
  std::string svg_path, trace_path;
  time_cmd->add_option("--svg", svg_path, "write the predicted timeline as SVG here");
  time_cmd->add_option("--trace", trace_path, "write it as a Chrome trace (JSON) here");

  CLI::App* rank_cmd = app.add_subcommand("rank", "search every layout of a world size and batch (exit 1 when none fits)");
  rank_cmd->add_option("--cluster", cluster_path, "cluster JSON")->required();
  model.add(rank_cmd);
  tp::SearchOptions sopts;
  int top = 10;
  bool show_rejected = false;
  double tolerance = 0.03;
  rank_cmd->add_flag("--fp32", fp32, "fp32 activations, weights, gradients and AdamW moments (tessera on CPUs)");
  rank_cmd->add_option("--world", sopts.world, "devices")->required()->check(CLI::Range(1, 1 << 20));
  rank_cmd->add_option("--batch", sopts.global_batch, "global batch in sequences")->required()->check(CLI::Range(1, 1 << 17));
  rank_cmd->add_option("--top", top, "how many ranked layouts to print")->check(CLI::Range(1, 1 << 30));
  rank_cmd->add_flag("--rejected", show_rejected, "print every rejected layout with its reason");
  rank_cmd->add_flag("--overlap-dp", sopts.overlap_grad_reduce, "overlap the dp reduction with the last backward");
  rank_cmd->add_option("--tolerance", tolerance,
                       "the choice: within this fraction of the fastest, the layout with the fewest optional mechanisms "
                       "and synchronizations (plan::choose; train_gpt --plan-tolerance; default 0.03)")
      ->check(CLI::Range(0.0, 1.0));
  rank_cmd->add_flag("--p2p-scatter-gather", sopts.p2p_scatter_gather,
                     "pipeline hand-offs split over tp (Megatron-LM's scatter-gather; tessera sends them whole)");

  CLI::App* val_cmd = app.add_subcommand("validate", "predict the published runs of a rows file and report the error");
  std::string rows_path, clusters_dir;
  double max_mean = -1, max_max = -1;  // -1: not given
  val_cmd->add_option("rows", rows_path, "rows JSON (plan/validation/published_rows.json)")->required();
  val_cmd->add_option("--clusters", clusters_dir, "folder of the cluster files (default: ../clusters beside the rows)");
  val_cmd->add_option("--max-mean-error", max_mean, "exit 2 when the C rows' mean |error| is above this fraction")
      ->check(CLI::Range(0.0, 1e9));
  val_cmd->add_option("--max-error", max_max, "exit 2 when a C row's |error| is above this fraction")
      ->check(CLI::Range(0.0, 1e9));

  CLI::App* cal_cmd = app.add_subcommand("calibrate", "measure this machine and write a cluster file");
  CalibrateArgs cal;
  ModelArgs cal_model;
  cal_model.spec = tp::ModelSpec{.name = "train_gpt main job", .layers = 6, .hidden = 192, .heads = 6, .kv_heads = 0,
                                 .ffn = 0, .vocab = 256, .seq = 128, .tied = true};
  cal_model.add(cal_cmd);
  cal_model.has_defaults = true;
  cal_cmd->add_option("--backend", cal.backend, "threads, or mpi (under mpirun)")->check(CLI::IsMember({"threads", "mpi"}));
  cal_cmd->add_option("--ranks", cal.ranks, "communicator sizes to time (threads: each; mpi: the -np count)")
      ->check(CLI::Range(2, 4096));
  cal_cmd->add_option("--mbs", cal.mbs, "micro-batch sizes whose GEMM shapes are timed")->check(CLI::Range(1, 1 << 16));
  cal_cmd->add_option("--tp", cal.tps, "tensor-parallel sizes whose GEMM shapes are timed (each dividing the heads)")
      ->check(CLI::Range(1, 1 << 16));
  // At most 256 MiB a message: every rank holds a few buffers of it (8 thread ranks: ~4 GiB).
  cal_cmd->add_option("--comm-kib", cal.comm_kib, "message sizes of the collectives, KiB (0.001 to 262144, i.e. 256 MiB)")
      ->check(CLI::Range(0.001, 262144.0));
  cal_cmd->add_option("--devices-per-node", cal.devices_per_node, "ranks a node may hold (the search's largest tp)")
      ->check(CLI::Range(1, 1 << 20));
  cal_cmd->add_option("--link-ranks", cal.link_ranks,
                      "the rank count whose all-reduce fit becomes the link (one of --ranks)")->check(CLI::Range(2, 4096));
  cal_cmd->add_option("--min-time", cal.min_seconds, "seconds per timed batch of a kernel (1e-6 to 3600)")
      ->check(CLI::Range(1e-6, 3600.0));
  cal_cmd->add_option("--name", cal.name, "the cluster's name");
  cal_cmd->add_option("--out", cal.out, "write the cluster file here");

  // CLI11 reports a missing subcommand or a missing --cluster before an unknown name: name the
  // unknown subcommand or flag first (one line, exit code 2).
  if (argc > 1 && argv[1][0] != '-') {
    CLI::App* sub = nullptr;
    for (CLI::App* c : {plan_cmd, time_cmd, rank_cmd, val_cmd, cal_cmd})
      if (c->get_name() == argv[1]) sub = c;
    if (sub == nullptr) {
      std::fprintf(stderr, "tessera-plan: unknown subcommand '%s' (plan, timeline, rank, validate or calibrate; --help "
                   "lists them)\n", argv[1]);
      return 2;
    }
    for (int i = 2; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg.size() < 2 || arg[0] != '-' || std::isdigit(static_cast<unsigned char>(arg[1])) || arg[1] == '.') continue;
      const std::string name = arg.substr(0, arg.find('='));
      if (name != "--help" && name != "-h" && sub->get_option_no_throw(name) == nullptr) {
        std::fprintf(stderr, "tessera-plan: %s has no flag %s (tessera-plan %s --help lists them)\n", argv[1],
                     name.c_str(), argv[1]);
        return 2;
      }
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help exits 0; a bad subcommand, flag or value is a usage error: one line on stderr and
    // exit code 2, as train_gpt's.
    if (e.get_exit_code() == 0) return app.exit(e);
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    std::fprintf(stderr, "tessera-plan: %s (--help lists the subcommands and flags)\n", what.c_str());
    return 2;
  }
  // The command line's values that CLI11's ranges cannot see: a usage error (exit code 2), as
  // train_gpt's. Errors of the files and of the prediction itself: exit code 1.
  const auto message = [](const std::exception& e) {
    std::string what = e.what();
    if (const std::size_t at = what.rfind(" ["); at != std::string::npos && what.back() == ']') what.erase(at);
    // One "tessera-plan: " prefix: "tessera-plan validate: x" becomes "validate: x".
    if (what.rfind("tessera-plan: ", 0) == 0) return what.substr(14);
    return what.rfind("tessera-plan ", 0) == 0 ? what.substr(13) : what;
  };
  if (*cal_cmd) {  // before minutes of measuring: what would make the file useless or unwritable
    try {
      // NaN passes CLI11's ranges.
      if (!(cal.min_seconds >= 1e-6 && cal.min_seconds <= 3600.0))
        throw tessera::Error(tessera::detail::str("calibrate: --min-time must be a number of seconds in [1e-6, 3600], got ",
                                                  cal.min_seconds));
      for (double kib : cal.comm_kib)
        if (!(kib >= 0.001 && kib <= 262144.0))
          throw tessera::Error(tessera::detail::str("calibrate: --comm-kib must be in [0.001, 262144] KiB, got ", kib));
      // The latency-bandwidth fit of each collective needs two message sizes (it failed after
      // the measuring before).
      if (std::set<double>(cal.comm_kib.begin(), cal.comm_kib.end()).size() < 2)
        throw tessera::Error(tessera::detail::str("calibrate: --comm-kib needs at least 2 different sizes (the "
                                                  "latency and bandwidth fit), got ", cal.comm_kib.size() == 1 ?
                                                  tessera::detail::str(cal.comm_kib[0]) : std::string("the same size")));
      const tp::ModelSpec m = cal_model.get();
      for (int t : cal.tps)
        if (m.heads % t != 0)
          throw tessera::Error(tessera::detail::str("calibrate: --tp ", t, " does not divide the heads ", m.heads));
      if (cal.backend == "threads" && std::find(cal.ranks.begin(), cal.ranks.end(), cal.link_ranks) == cal.ranks.end())
        throw tessera::Error(tessera::detail::str("calibrate: --link-ranks ", cal.link_ranks,
                                                  " is not one of the rank counts measured (--ranks)"));
      if (!cal.out.empty()) {  // writable, without leaving an empty file behind if the run fails
        std::error_code ec;
        const bool existed = std::filesystem::exists(cal.out, ec);
        const bool ok = static_cast<bool>(std::ofstream(cal.out, std::ios::app));
        if (ok && !existed) std::filesystem::remove(cal.out, ec);
        if (!ok) throw tessera::Error("calibrate: cannot write --out '" + cal.out + "'");
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "tessera-plan: %s\n", message(e).c_str());
      return 2;
    }
  }
  if (*rank_cmd) {
    try {
      (void)model.get();
      if (!(tolerance >= 0 && tolerance <= 1))  // NaN passes CLI11's range
        throw tessera::Error(tessera::detail::str("rank: --tolerance must be a fraction in [0, 1], got ", tolerance));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "tessera-plan: %s\n", message(e).c_str());
      return 2;
    }
  }
  if (*plan_cmd || *time_cmd) {
    try {
      const tp::ModelSpec m = model.get();
      const tp::Layout l = layout.get();
      // The same refusal as the search's (tessera-plan rank): the heads are split over tp.
      if (m.heads % l.tp != 0 || m.num_kv_heads() % l.tp != 0 || m.ffn_size() % l.tp != 0)
        throw tessera::Error(tessera::detail::str("tp ", l.tp, " does not divide the heads ", m.heads,
                                                  ", key/value heads ", m.num_kv_heads(), " and MLP width ", m.ffn_size()));
      if (const long long stages = static_cast<long long>(l.pp) * l.virtual_stages; stages > m.layers)
        throw tessera::Error(tessera::detail::str(m.layers, " layers cannot fill ", stages, " pipeline stages (pp ", l.pp,
                                                  " x virtual_stages ", l.virtual_stages, ")"));
      // The same refusal as the search's: the interleaved schedule runs the micro-batches in groups of pp.
      if (l.schedule == tp::PipelineSchedule::interleaved && l.num_microbatches % l.pp != 0)
        throw tessera::Error(tessera::detail::str("interleaving (--v ", l.virtual_stages, ") needs the micro-batch count ",
                                                  l.num_microbatches, " (--batch / (dp x mbs)) to be a multiple of --pp ",
                                                  l.pp));
      // Accepted, but not what was probably meant: a note.
      if (l.zero_stage > 0 && l.dp == 1)
        std::fprintf(stderr, "tessera-plan: note: --zero %d at dp 1: one replica has nothing to shard over (rank "
                     "skips such layouts)\n", l.zero_stage);
      if (l.zero_stage == 3 && l.zero3_unit_layers > 0 && l.zero3_unit_layers > m.layers / (l.pp * l.virtual_stages))
        std::fprintf(stderr, "tessera-plan: note: --zero3-unit %d is more than the %d layers of a pipeline stage; a "
                     "unit is at most a stage (as --zero3-unit 0)\n", l.zero3_unit_layers,
                     m.layers / (l.pp * l.virtual_stages));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "tessera-plan: %s\n", message(e).c_str());
      return 2;
    }
  }
  try {
    if (*val_cmd) return validate(rows_path, clusters_dir, max_mean, max_max);
    if (*cal_cmd) return calibrate(cal, cal_model.get(), argc, argv);
    const tp::Cluster cluster = load_cluster(cluster_path);
    const tp::ModelSpec m = model.get();
    const tp::Precision precision = fp32 ? tp::Precision::float32_adamw() : tp::Precision{};
    if (*rank_cmd) {
      // A large search (a 1T model at world 512: thousands of layouts, minutes) says how far it is,
      // on stderr, every 5 s.
      const auto started = std::chrono::steady_clock::now();
      auto last = started;
      sopts.on_predicted = [&](const tp::Layout& l, std::size_t n) {
        const auto now = std::chrono::steady_clock::now();
        if (now - last < std::chrono::seconds(5)) return;
        last = now;
        std::fprintf(stderr, "tessera-plan rank: %zu layouts predicted in %.0f s (now %s)\n", n,
                     std::chrono::duration<double>(now - started).count(), l.to_string().c_str());
      };
      const tp::SearchResult res = tp::search(m, cluster, sopts, precision);
      std::printf("%s on %s: %zu layouts fit, %zu rejected\n", m.name.c_str(), cluster.name.c_str(), res.ranked.size(),
                  res.rejected.size());
      for (std::size_t i = 0; i < res.ranked.size() && static_cast<int>(i) < top; ++i)
        std::printf("%2zu. %s\n", i + 1, res.ranked[i].to_string().c_str());
      if (show_rejected)
        for (const tp::Rejected& r : res.rejected)
          std::printf("rejected: %s: %s\n", r.layout.to_string().c_str(), r.reason.c_str());
      for (const auto& [k, n] : res.rejections_by_kind()) std::printf("  %4d rejected: %s\n", n, k.c_str());
      if (res.ranked.empty()) return 1;
      const tp::Choice c = tp::choose(res, tolerance);
      std::printf("choice at --tolerance %g: %zu. %s: %s\n", tolerance + 0.0, c.index + 1,
                  res.ranked[c.index].layout.to_string().c_str(), c.reason.c_str());
      return 0;
    }
    const tp::Plan p = tp::Plan::predict(m, cluster, layout.get(), precision);
    print_plan(p, cluster);
    if (*time_cmd) {
      if (!svg_path.empty()) {
        tessera::schedule::write_svg(p.time.timeline, svg_path, {.width = 1200, .row_height = 16, .title = "", .time_unit = "", .time_scale = 1.0, .show_bubble = true});
        std::printf("wrote %s\n", svg_path.c_str());
      }
      if (!trace_path.empty()) {
        tessera::schedule::write_chrome_trace(p.time.timeline, trace_path);
        std::printf("wrote %s\n", trace_path.c_str());
      }
    }
  } catch (const InputError& e) {
    std::fprintf(stderr, "tessera-plan: %s\n", message(e).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera-plan: %s\n", message(e).c_str());
    return 1;
  }
  return 0;
}
