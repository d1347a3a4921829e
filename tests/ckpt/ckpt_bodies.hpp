#pragma once
// Checkpoint test bodies that take the world communicator, so the same code runs on thread
// ranks (test_bodies.cpp) and on processes under mpirun (mpi_ckpt_test.cpp). Every rank
// checks its own results against a serial computation it repeats locally.

#include <doctest/doctest.h>

#include <string>

#include "ckpt_test_util.hpp"
#include "tessera/checkpoint/detail/collective.hpp"

namespace ckpt_bodies {

using namespace ckpt_test;
using namespace tessera::checkpoint;
using tessera::Comm;
using tessera::MeshShape;

// A temporary directory shared by the ranks of `world`: rank 0 creates it and removes it on
// destruction, after every rank is done. Collective (construction and destruction).
class SharedDir {
 public:
  explicit SharedDir(Comm& world) : world_(world) {
    std::string mine;
    if (world.rank() == 0) {
      std::string t = (fs::temp_directory_path() / "tessera-ckpt-XXXXXX").string();
      REQUIRE(::mkdtemp(t.data()) != nullptr);
      mine = t;
    }
    path = tessera::checkpoint::detail::all_gather_strings(world, mine).at(0);
  }
  SharedDir(const SharedDir&) = delete;
  SharedDir& operator=(const SharedDir&) = delete;
  ~SharedDir() {
    try {
      world_.barrier();
    } catch (...) {  // a rank failed: remove the directory anyway
    }
    if (world_.rank() == 0) {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  }
  fs::path path;

 private:
  Comm& world_;
};

inline const nlohmann::json& config() {
  static const nlohmann::json c = gpt2_config_json(tiny_config());
  return c;
}

// Trains `steps` steps at layout `shape` (ZeRO-1 if `zero`) on `comm` from `full`, then saves.
inline void train_and_save(Comm& comm, const FullModel& full, MeshShape shape, bool zero, int steps, const fs::path& dir) {
  const Placement w = placement(comm.rank(), shape);
  Rank r(full, w, zero);
  Comm dp = dp_comm_of(comm, w);
  for (int s = 0; s < steps; ++s) r.step(dp);
  const OptimizerState<double> st = r.state();
  save_checkpoint(dir, comm, w, r.list, &st, CheckpointMeta{.config = config(), .step = steps});
}

// Loads `dir` at layout `shape` on `comm` into ranks built from other values, trains `steps`
// more steps, and checks every parameter this rank holds against the serial run's slice.
inline void load_train_check(Comm& comm, MeshShape shape, bool zero, int steps, const fs::path& dir, const Serial& serial) {
  const Placement w = placement(comm.rank(), shape);
  Rank r(full_gpt(4321), w, zero);
  Comm dp = dp_comm_of(comm, w);
  OptimizerState<double> st = r.state();
  load_checkpoint(dir, comm, w, r.list, &st, config());
  r.opt->set_steps(st.step);
  for (int s = 0; s < steps; ++s) r.step(dp);
  for (const Parameter<double>& p : r.params) {
    CAPTURE(p.name);
    const Parameter<double>& ref = *std::find_if(serial.rank.params.begin(), serial.rank.params.end(),
                                                 [&](const Parameter<double>& q) { return q.name == p.name; });
    CHECK(same_bits(p.value, reference_shard_of(ref.value, p.layout, w.coord.tp, w.shape.tp)));
  }
}

// Save at tp = n, load at dp = n with ZeRO-1; a 1-rank save loaded by all n ranks at tp = n;
// the n-rank save loaded by each rank alone (n -> 1). Resumed training equals the serial run.
inline void reshard_body(Comm& world) {
  const int n = world.size();
  SharedDir dir(world);
  const FullModel full = full_gpt(17);
  Serial serial(full);
  serial.run(5);
  train_and_save(world, full, MeshShape{.tp = n}, false, 2, dir.path / "a");
  load_train_check(world, MeshShape{.dp = n}, true, 3, dir.path / "a", serial);
  Comm alone = world.split(world.rank(), 0);
  if (world.rank() == 0) train_and_save(alone, full, MeshShape{}, false, 2, dir.path / "b");
  world.barrier();
  load_train_check(world, MeshShape{.tp = n}, false, 3, dir.path / "b", serial);
  load_train_check(alone, MeshShape{}, false, 3, dir.path / "a", serial);
  world.barrier();
}

// The last rank fails while writing: every rank throws, the previous checkpoint stays; then a
// corrupted file of the last rank makes every rank's load fail, the reading rank naming the
// tensor.
inline void failure_body(Comm& world) {
  const int n = world.size();
  SharedDir dir(world);
  const FullModel full = full_gpt(23);
  const fs::path c = dir.path / "c";
  train_and_save(world, full, MeshShape{.tp = n}, false, 1, c);
  {
    const Placement w = placement(world.rank(), MeshShape{.tp = n});
    Rank r(full, w, false);
    SaveOptions o;
    if (world.rank() == n - 1) o.on_file_written = [](const fs::path&) { throw tessera::Error("disk full on the last rank"); };
    const std::string e = error_of([&] {
      save_checkpoint<double>(c, world, w, r.list, nullptr, CheckpointMeta{.config = config(), .step = 9}, o);
    });
    CHECK(e.find("disk full on the last rank") != std::string::npos);
    if (world.rank() != n - 1) CHECK(e.find(tessera::detail::str("failed on rank ", n - 1)) != std::string::npos);
  }
  world.barrier();
  CHECK(CheckpointReader(c).info().step == 1);
  const std::string last_file = model_file_name(n - 1);
  std::string last_tensor;
  if (world.rank() == 0) {
    SafetensorsFile f(c / last_file);
    last_tensor = f.tensors().back().name;
  }
  if (world.rank() == 0) flip_byte(c / last_file, fs::file_size(c / last_file) - 5);
  last_tensor = tessera::checkpoint::detail::all_gather_strings(world, last_tensor).at(0);
  world.barrier();
  const Placement w = placement(world.rank(), MeshShape{.tp = n});
  Rank r(full_gpt(1), w, false);
  const std::string e = error_of([&] { load_checkpoint<double>(c, world, w, r.list, nullptr, config()); });
  CHECK(e.find("tensor '" + last_tensor + "'") != std::string::npos);
  if (world.rank() == n - 1) CHECK(e.find("is corrupted") != std::string::npos);
  world.barrier();
}

}  // namespace ckpt_bodies
