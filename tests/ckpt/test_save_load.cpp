// Saving and loading as collectives: atomic saves (a failed or killed save leaves the previous
// checkpoint loadable), every defect of a checkpoint an error naming the tensor, and a rank
// that fails making every rank fail, never hang (CASES C10).

#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <vector>

#include "ckpt_test_util.hpp"

using namespace ckpt_test;
using namespace tessera::checkpoint;
using tessera::MeshShape;

namespace {

const nlohmann::json& config() {
  static const nlohmann::json c = gpt2_config_json(tiny_config());
  return c;
}

// Saves the tiny GPT from `seed` at tp = `tp` (step `step`, optimizer state included unless
// `with_optimizer` is false) with `options` on every rank.
void save_tp(const fs::path& dir, std::uint64_t seed, int tp, std::int64_t step, bool with_optimizer = true,
             const std::function<SaveOptions(int rank)>& options = {}) {
  const FullModel full = full_gpt(seed);
  tessera::testing::run_ranks(tp, [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), MeshShape{.tp = tp});
    Rank r(full, w, false);
    const OptimizerState<double> st = r.state();
    save_checkpoint(dir, world, w, r.list, with_optimizer ? &st : nullptr,
                    CheckpointMeta{.config = config(), .step = step}, options ? options(world.rank()) : SaveOptions{});
  });
}

// Loads `dir` at tp = `tp` into the tiny GPT and returns its step; throws what loading throws.
std::int64_t load_step(const fs::path& dir, int tp = 1) {
  const FullModel decoy = full_gpt(1234);
  const auto steps = tessera::testing::run_ranks(tp, [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), MeshShape{.tp = tp});
    Rank r(decoy, w, false);
    OptimizerState<double> st = r.state();
    return load_checkpoint(dir, world, w, r.list, &st, config()).step;
  });
  return steps.at(0);
}

// Every rank's error message from loading `dir` at tp = `tp` ("" where a rank succeeded),
// with the check that no rank's parameters changed when any failed.
std::vector<std::string> load_errors(const fs::path& dir, int tp, const nlohmann::json& cfg = config(),
                                     bool with_optimizer = true) {
  const FullModel decoy = full_gpt(1234);
  return tessera::testing::run_ranks(tp, [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), MeshShape{.tp = tp});
    Rank r(decoy, w, false);
    OptimizerState<double> st = r.state();
    const std::string e = error_of([&] { load_checkpoint(dir, world, w, r.list, with_optimizer ? &st : nullptr, cfg); });
    if (!e.empty())
      for (const Parameter<double>& p : r.params)
        CHECK(same_bits(p.value, reference_shard_of(std::find_if(decoy.begin(), decoy.end(), [&](const auto& x) { return x.first == p.name; })->second,
                                          p.layout, w.coord.tp, tp)));
    return e;
  });
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

int count_entries(const fs::path& dir) {
  int n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++n;
  return n;
}

}  // namespace

TEST_CASE("load errors: a corrupted, truncated or missing rank file is an error naming the tensor on every rank") {
  TempDir d;
  const fs::path c = d / "c";
  save_tp(c, 1, 2, 10);
  const fs::path f1 = c / "model-rank00001.safetensors";
  const std::string last = [&] {
    SafetensorsFile f(f1);
    return f.tensors().back().name;
  }();
  SUBCASE("a flipped data byte") {
    flip_byte(f1, fs::file_size(f1) - 5);
    const auto errs = load_errors(c, 2);
    CHECK(contains(errs[1], "tensor '" + last + "'"));
    CHECK(contains(errs[1], "is corrupted"));
    CHECK(contains(errs[0], "failed on rank 1"));
    CHECK(contains(errs[0], "tensor '" + last + "'"));
  }
  SUBCASE("a truncated file") {
    fs::resize_file(f1, fs::file_size(f1) - 7);
    const auto errs = load_errors(c, 2);
    CHECK(contains(errs[1], "tensor '" + last + "' ends at byte"));
    CHECK(contains(errs[1], "truncated"));
    CHECK(contains(errs[0], "failed on rank 1"));
  }
  SUBCASE("a flipped header byte") {
    flip_byte(f1, 9);
    const auto errs = load_errors(c, 2);
    CHECK(contains(errs[1], "not valid JSON"));
    CHECK(contains(errs[1], "model-rank00001.safetensors"));
  }
  SUBCASE("a missing file") {
    fs::remove(f1);
    const auto errs = load_errors(c, 1);
    CHECK(contains(errs[0], "its file model-rank00001.safetensors is missing"));
    CHECK(contains(errs[0], "tensor '"));
  }
  SUBCASE("a file of another save") {
    save_tp(d / "other", 2, 2, 11);
    fs::copy_file(d / "other" / "model-rank00001.safetensors", f1, fs::copy_options::overwrite_existing);
    const auto errs = load_errors(c, 1);
    CHECK(contains(errs[0], "belongs to another save"));
  }
  SUBCASE("no index") {
    fs::remove(c / "index.json");
    CHECK(contains(load_errors(c, 1)[0], "no index.json (not a checkpoint, or a save that did not complete)"));
  }
}

TEST_CASE("load errors: another configuration names the field; a wrong shape or a missing tensor names the tensor") {
  TempDir d;
  const fs::path c = d / "c";
  save_tp(c, 1, 1, 5, /*with_optimizer=*/false);
  nlohmann::json other = config();
  other["n_layer"] = 3;
  CHECK(contains(load_errors(c, 1, other)[0], "holds another model configuration: n_layer is 2 in the checkpoint and 3 in this model"));
  CHECK(contains(load_errors(c, 1)[0], "holds no optimizer state"));
  auto load_one = [&](Parameter<double>& p) {
    return error_of([&] {
      tessera::testing::run_ranks(1, [&](tessera::Comm& world) {
        load_checkpoint<double>(c, world, Placement{}, ParameterList<double>{&p}, nullptr, nlohmann::json::object());
      });
    });
  };
  Parameter<double> narrow("h.0.mlp.c_fc.weight", Tensor<double>(Shape{24, 48}), tessera::ParamLayout::shard(1));
  CHECK(contains(load_one(narrow), "tensor 'h.0.mlp.c_fc.weight' has global shape (24, 96) in the checkpoint but (24, 48) in this model"));
  Parameter<double> extra("h.9.ln_1.weight", Tensor<double>(Shape{24}));
  CHECK(contains(load_one(extra), "tensor 'h.9.ln_1.weight' is not in the checkpoint"));
  Parameter<double> fine("ln_f.bias", Tensor<double>(Shape{24}));
  CHECK(load_one(fine).empty());
  const FullModel saved = full_gpt(1);
  CHECK(same_bits(fine.value, std::find_if(saved.begin(), saved.end(), [](const auto& x) { return x.first == "ln_f.bias"; })->second));
}

TEST_CASE("atomic save: a save that fails on one rank after files were written leaves the previous checkpoint, on every rank") {
  TempDir d;
  const fs::path c = d / "c";
  save_tp(c, 1, 3, 100);
  const auto errs = tessera::testing::run_ranks(3, [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), MeshShape{.tp = 3});
    Rank r(full_gpt(2), w, false);
    const OptimizerState<double> st = r.state();
    SaveOptions o;
    if (world.rank() == 2)
      o.on_file_written = [](const fs::path&) { throw tessera::Error("disk full on rank 2"); };
    return error_of([&] { save_checkpoint(c, world, w, r.list, &st, CheckpointMeta{.config = config(), .step = 200}, o); });
  });
  CHECK(contains(errs[2], "disk full on rank 2"));
  CHECK(contains(errs[0], "failed on rank 2"));
  CHECK(contains(errs[0], "disk full on rank 2"));
  CHECK(contains(errs[1], "disk full on rank 2"));
  CHECK(load_step(c, 3) == 100);
  CHECK(count_entries(d.path) == 1);  // the staging directory is gone
  save_tp(fs::path(c.string() + "/"), 2, 3, 300);  // a trailing slash names the same directory
  CHECK(load_step(c, 2) == 300);
}

TEST_CASE("atomic save: a process killed during a save leaves the previous checkpoint loadable; the next save cleans up") {
  TempDir d;
  const fs::path c = d / "c";
  save_tp(c, 1, 2, 100);
  // Kill the saving process (SIGKILL, no cleanup) after its first rank file, then after the
  // index was written but before the directory was swapped into place.
  for (const std::string& kill_after : {std::string("model-rank"), std::string("index.json")}) {
    CAPTURE(kill_after);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      try {
        save_tp(c, 2, 2, 200, true, [&](int) {
          return SaveOptions{.on_file_written = [&](const fs::path& p) {
            if (p.filename().string().rfind(kill_after, 0) == 0) ::raise(SIGKILL);
          }};
        });
      } catch (...) {
      }
      ::_exit(0);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGKILL);
    CHECK(count_entries(d.path) == 2);  // the checkpoint and the dead save's staging directory
    CHECK(load_step(c, 1) == 100);
    CHECK(load_step(c, 4) == 100);
  }
  save_tp(c, 3, 2, 300);
  CHECK(load_step(c, 2) == 300);
  CHECK(count_entries(d.path) == 1);
}

TEST_CASE("atomic save: a directory that is not a checkpoint is never replaced") {
  TempDir d;
  fs::create_directory(d / "c");
  std::ofstream(d / "c" / "notes.txt") << "keep me";
  const auto errs = tessera::testing::run_ranks(2, [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), MeshShape{.tp = 2});
    Rank r(full_gpt(1), w, false);
    return error_of([&] { save_checkpoint<double>(d / "c", world, w, r.list, nullptr, CheckpointMeta{.config = config()}); });
  });
  CHECK(contains(errs[0], "refusing to replace"));
  CHECK(contains(errs[1], "failed on rank 0"));
  CHECK(fs::exists(d / "c" / "notes.txt"));
  CHECK(count_entries(d.path) == 1);
}

TEST_CASE("C10: a save with one failing rank makes every rank throw; ranks that disagree on the step fail; none hangs") {
  TempDir d;
  SUBCASE("a shard that does not fit its layout on rank 2 of 3") {
    const auto errs = tessera::testing::run_ranks(3, [&](tessera::Comm& world) {
      Parameter<double> p("w", Tensor<double>(Shape{4, world.rank() == 2 ? 4 : 3}), tessera::ParamLayout::shard(1, 3));
      return error_of([&] {
        save_checkpoint<double>(d / "c", world, placement(world.rank(), MeshShape{.tp = 3}), ParameterList<double>{&p},
                                nullptr, CheckpointMeta{});
      });
    });
    CHECK(contains(errs[2], "tensor 'w': its local extent 4 in dim 1 is not a multiple of blocks=3"));
    for (int r : {0, 1}) CHECK(contains(errs[static_cast<std::size_t>(r)], "failed on rank 2"));
  }
  SUBCASE("different steps") {
    const auto errs = tessera::testing::run_ranks(2, [&](tessera::Comm& world) {
      Parameter<double> p("b", Tensor<double>(Shape{3}));
      return error_of([&] {
        save_checkpoint<double>(d / "c", world, placement(world.rank(), MeshShape{.dp = 2}), ParameterList<double>{&p},
                                nullptr, CheckpointMeta{.step = world.rank() == 0 ? 7 : 8});
      });
    });
    CHECK(contains(errs[0], "rank 1 saves step 8 but rank 0 saves 7"));
    CHECK(contains(errs[1], "failed on rank 0"));
    CHECK(!fs::exists(d / "c"));
  }
  SUBCASE("overlapping layouts (two ranks claim the same tp coordinate)") {
    const auto errs = tessera::testing::run_ranks(2, [&](tessera::Comm& world) {
      Parameter<double> p("w", Tensor<double>(Shape{2, 2}), tessera::ParamLayout::shard(0));
      const Placement w{MeshShape{.tp = 2}, tessera::MeshCoord{.tp = 0}};
      return error_of([&] {
        save_checkpoint<double>(d / "c", world, w, ParameterList<double>{&p}, nullptr, CheckpointMeta{});
      });
    });
    CHECK(contains(errs[0], "tensor 'w': elements [0, 4) are saved by both rank 0 and rank 1"));
  }
  SUBCASE("only rank 0 enters the save: it throws instead of waiting") {
    // Rank 1 has returned, so rank 0's first collective of the save can never complete: it
    // must say so at once, not wait out the timeout (10 s) and report a timeout.
    const auto timeout = std::chrono::seconds(10);
    const auto t0 = std::chrono::steady_clock::now();
    const std::string e = error_of([&] {
      tessera::testing::run_ranks(
          2,
          [&](tessera::Comm& world) {
            if (world.rank() != 0) return;
            Parameter<double> p("b", Tensor<double>(Shape{3}));
            save_checkpoint<double>(d / "c", world, placement(0, MeshShape{.dp = 2}), ParameterList<double>{&p}, nullptr,
                                    CheckpointMeta{});
          },
          tessera::threads::RunOptions{.timeout = timeout});
    });
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CAPTURE(e);
    CHECK(elapsed < 2.5);  // a quarter of the timeout; measured well under 0.1 s
    CHECK(contains(e, "(rank 0 of 2) can never complete"));
    CHECK(contains(e, "ranks that never arrived: rank 1 (world rank 1) had returned from its function"));
    CHECK(!fs::exists(d / "c"));
  }
  SUBCASE("the decision to save taken from an all-reduced value: every rank saves") {
    tessera::testing::run_ranks(2, [&](tessera::Comm& world) {
      const double local_loss = world.rank() == 0 ? 1.0 : 3.0;  // each rank knows only its own
      const double loss = world.all_reduce_value(local_loss, tessera::ReduceOp::avg);
      Parameter<double> p("b", Tensor<double>::full(Shape{3}, loss));
      if (loss < 2.5)
        save_checkpoint<double>(d / "c", world, placement(world.rank(), MeshShape{.dp = 2}), ParameterList<double>{&p},
                                nullptr, CheckpointMeta{.step = 1});
    });
    CHECK(CheckpointReader(d / "c").read_full<double>("b")(2) == 2.0);
  }
}
