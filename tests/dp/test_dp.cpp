// DataParallel, GradBuckets and ZeroOptimizer on the threads backend: the shared bodies of
// dp_bodies.hpp at world sizes 1-4, asserted on the main thread after the join, plus the
// grad-ready hooks of the nn layers.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dp_bodies.hpp"
#include "tessera/tessera.hpp"
#include "tessera/testing/compare.hpp"

using namespace tessera;
using namespace dp_bodies;
using testing::run_ranks;

namespace {

constexpr double tol = 1e-5;  // fp32 round-off over 5 steps, relative

// The three bucket layouts of the tests: one parameter per bucket, small buckets (several
// parameters each, a smaller first one), one bucket of everything.
struct BucketLayout {
  const char* name;
  std::size_t bucket_size, first_bucket_size;
};
constexpr BucketLayout layouts[] = {{"per-parameter", 0, 0},
                              {"small", 1024, 256},
                              {"everything", std::size_t(-1), std::size_t(-1)}};

DataParallelOptions options(const BucketLayout& l, bool overlap) {
  return {.bucket_size = l.bucket_size, .first_bucket_size = l.first_bucket_size, .overlap_grad_reduce = overlap};
}

// The worst relative error of the gradients of `a` against those of `b`, parameter by
// parameter; +infinity on a NaN or infinity (tessera::testing::WorstError).
double grad_rel_error(const ParameterList<float>& a, const ParameterList<float>& b) {
  testing::WorstError worst;
  if (a.size() != b.size()) return testing::infinite_error;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const Tensor<float> x = a[i].grad.contiguous(), y = b[i].grad.contiguous();
    worst.add(testing::max_rel_error(std::span<const float>(x.data(), static_cast<std::size_t>(x.numel())),
                                     std::span<const float>(y.data(), static_cast<std::size_t>(y.numel()))));
  }
  return worst.value();
}

// A non-blocking request as ProbeComm hands it out: forwards to the backend's request and
// remembers completion, so the test can ask whether it completed without disturbing its owner.
class ProbeRequest final : public RequestImpl {
 public:
  explicit ProbeRequest(Request inner) : inner_(std::move(inner)) {}
  void wait() override {
    inner_.wait();
    done_ = true;
  }
  bool test() override {
    if (!done_) done_ = inner_.test();
    return done_;
  }

 private:
  Request inner_;
  bool done_ = false;
};

// A CommBackend that forwards to another and keeps every non-blocking request it returns, in
// issue order, so a test can watch, from inside backward, which reductions have completed.
// Used from its rank's thread only.
class ProbeComm final : public CommBackend {
 public:
  explicit ProbeComm(std::shared_ptr<CommBackend> inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string name() const override { return inner_->name(); }
  void set_name(std::string n) override { inner_->set_name(std::move(n)); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  void set_timeout(std::chrono::milliseconds t) override { inner_->set_timeout(t); }
  Request all_reduce(void* d, std::size_t n, DType t, ReduceOp op, bool async) override {
    return keep(inner_->all_reduce(d, n, t, op, async), async);
  }
  Request all_gather(const void* in, void* out, std::size_t n, DType t, bool async) override {
    return keep(inner_->all_gather(in, out, n, t, async), async);
  }
  Request reduce_scatter(const void* in, void* out, std::size_t n, DType t, ReduceOp op, bool async) override {
    return keep(inner_->reduce_scatter(in, out, n, t, op, async), async);
  }
  void broadcast(void* d, std::size_t n, DType t, int root) override { inner_->broadcast(d, n, t, root); }
  Request send(const void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    return keep(inner_->send(d, n, t, peer, tag, async), async);
  }
  Request recv(void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    return keep(inner_->recv(d, n, t, peer, tag, async), async);
  }
  Request batch_p2p(std::span<const P2POp> ops) override { return keep(inner_->batch_p2p(ops), true); }
  void barrier() override { inner_->barrier(); }
  std::shared_ptr<CommBackend> split(int color, int key) override { return inner_->split(color, key); }

  // The non-blocking requests so far, in issue order.
  std::vector<std::shared_ptr<ProbeRequest>>& requests() { return requests_; }

 private:
  Request keep(Request r, bool async) {
    if (!async) return r;
    requests_.push_back(std::make_shared<ProbeRequest>(std::move(r)));
    return Request(requests_.back());
  }
  std::shared_ptr<CommBackend> inner_;
  std::vector<std::shared_ptr<ProbeRequest>> requests_;
};

std::int64_t tiny_gpt_numel() {
  GPT<float> g(tiny_gpt(), 0);
  return g.parameters().numel();
}

}  // namespace

static_assert(Layer<DataParallel<GPT<float>>>, "DataParallel of a Layer is a Layer");
static_assert(Layer<DataParallel<Branchy>>, "DataParallel wraps user-defined layers");
static_assert(Layer<nn::ActivationCheckpoint<DataParallel<Stack>>>, "DataParallel nests in other policies");
static_assert(Layer<DataParallel<nn::ActivationCheckpoint<Stack>>>, "DataParallel wraps other policies");

TEST_CASE("nn layers mark each parameter ready once per backward, after its gradient is accumulated") {
  GPT<float> gpt(tiny_gpt(), 1);
  ParameterList<float> ps = gpt.parameters();
  std::vector<int> marks(ps.size(), 0);
  std::vector<double> grad_sum_at_mark(ps.size(), 0);
  for (std::size_t i = 0; i < ps.size(); ++i)
    ps[i].set_grad_ready_hook([&, i] {
      ++marks[i];
      double s = 0;
      const Tensor<float> g = ps[i].grad.contiguous();
      for (std::int64_t j = 0; j < g.numel(); ++j) s += std::abs(g.data()[j]);
      grad_sum_at_mark[i] = s;
    });
  // The LM head is tied to wte: it shares wte's tensors and hook.
  CHECK(ps.at("wte.weight").tie_count() == 2);
  CHECK(ps.at("wpe.weight").tie_count() == 1);
  nn::CrossEntropy<float> ce;
  const TokenBatch b = token_batch(0, 0, 0, 2);
  auto [logits, ctx] = gpt.forward(b.tokens);
  auto [loss, lctx] = ce.forward(logits, b.targets);
  gpt.backward(ce.backward(1.0f, lctx), ctx);
  for (std::size_t i = 0; i < ps.size(); ++i) {
    CAPTURE(ps[i].name);
    // wte: once by the LM head, once by the embedding (the last mark sees the whole gradient).
    CHECK(marks[i] == (ps[i].name == "wte.weight" ? 2 : 1));
    double s = 0;
    const Tensor<float> g = ps[i].grad.contiguous();
    for (std::int64_t j = 0; j < g.numel(); ++j) s += std::abs(g.data()[j]);
    CHECK(s > 0);
    CHECK(grad_sum_at_mark[i] == s);  // nothing was added after the last mark
  }
}

TEST_CASE("DataParallel: 5 steps at world sizes 1-4 equal 5 serial steps on the global batch, for every bucket "
          "layout, overlap on and off, accumulation k = 1 and 3; replicas bitwise identical after every step") {
  for (int world = 1; world <= 4; ++world)
    for (const BucketLayout& l : layouts)
      for (bool overlap : {true, false})
        for (int k : {1, 3}) {
          CAPTURE(world);
          CAPTURE(l.name);
          CAPTURE(overlap);
          CAPTURE(k);
          const EquivConfig cfg{.dp = options(l, overlap), .accumulation = k};
          const auto res = run_ranks(world, [&](Comm& c) { return equivalence_body(c, cfg); });
          for (const EquivResult& r : res) {
            CHECK(r.max_loss_rel < tol);
            CHECK(r.max_param_rel < tol);
            CHECK(r.identical_after_wrap);
            CHECK(r.identical_every_step);
            // Tied to the LM head: keeps its own grad tensor, which is its bucket's buffer where
            // dp divides its 13 x 8 elements (else it is copied into its bucket).
            CHECK(r.copied_wte);
            CHECK(r.alias_wte == (104 % world == 0));
            CHECK(r.params == res.front().params);
            if (!overlap) CHECK(r.early_launches == 0);
            // Every bucket but the one holding the tied wte can start during backward.
            if (overlap) CHECK(r.early_launches == r.num_buckets - 1);
          }
        }
}

TEST_CASE("DataParallel: unequal per-rank batch sizes weight by count (not 1/world) and equal the serial run") {
  for (int world = 2; world <= 4; ++world)
    for (int k : {1, 3}) {
      CAPTURE(world);
      CAPTURE(k);
      const EquivConfig cfg{.dp = options(layouts[1], true), .accumulation = k, .unequal = true};
      const auto res = run_ranks(world, [&](Comm& c) { return equivalence_body(c, cfg); });
      for (const EquivResult& r : res) {
        CHECK(r.max_loss_rel < tol);
        CHECK(r.max_param_rel < tol);
        CHECK(r.identical_every_step);
      }
    }
}

TEST_CASE("DataParallel: replicas initialized from different seeds are bitwise identical right after wrapping "
          "and after every step") {
  for (int world : {2, 3}) {
    const auto res = run_ranks(world, [&](Comm& c) { return equivalence_body(c, {.steps = 3}); });
    for (const EquivResult& r : res) {
      CHECK(r.identical_after_wrap);
      CHECK(r.identical_every_step);
    }
  }
}

TEST_CASE("C9: one bucket, small buckets and one all-reduce per parameter give bitwise equal parameters on "
          "threads, overlapped or not") {
  for (int world : {2, 3, 4}) {
    CAPTURE(world);
    std::vector<std::vector<float>> finals;
    for (const BucketLayout& l : layouts)
      for (bool overlap : {true, false}) {
        const EquivConfig cfg{.dp = options(l, overlap), .accumulation = 2, .unequal = true};
        finals.push_back(run_ranks(world, [&](Comm& c) { return equivalence_body(c, cfg); }).front().params);
      }
    for (const auto& f : finals) CHECK(f == finals.front());
  }
}

TEST_CASE("ZeroOptimizer: after 5 steps the parameters equal plain DataParallel's bitwise (SGD and AdamW, "
          "world sizes 1-4, parameter count not divisible by dp), with 1/dp of the optimizer state per rank") {
  REQUIRE(tiny_gpt_numel() % 3 != 0);  // world 3 pads
  for (int world = 1; world <= 4; ++world)
    for (bool adamw : {false, true})
      for (const BucketLayout& l : layouts) {
        CAPTURE(world);
        CAPTURE(adamw);
        CAPTURE(l.name);
        const EquivConfig plain{.dp = options(l, true), .accumulation = 2, .unequal = true, .adamw = adamw};
        EquivConfig zero = plain;
        zero.zero = true;
        const auto p = run_ranks(world, [&](Comm& c) { return equivalence_body(c, plain); });
        const auto z = run_ranks(world, [&](Comm& c) { return equivalence_body(c, zero); });
        for (int r = 0; r < world; ++r) {
          const EquivResult& zr = z[static_cast<std::size_t>(r)];
          CHECK(zr.params == p.front().params);
          CHECK(zr.identical_every_step);
          CHECK(zr.max_loss_rel < tol);
          // AdamW divides by sqrt(v): an element whose gradient is a sum of cancelling terms has
          // a large relative round-off, which AdamW turns into an update difference of up to lr.
          // Its parameters are compared with the serial run's at a looser bound; SGD's at tol.
          CHECK(zr.max_param_rel < (adamw ? 1e-3 : tol));
          // Plain: the state of every element (2 moments, or 1 momentum buffer), fp32.
          const std::size_t per_elem = (adamw ? 2 : 1) * sizeof(float);
          CHECK(p[static_cast<std::size_t>(r)].state_bytes == static_cast<std::size_t>(tiny_gpt_numel()) * per_elem);
          // ZeRO-1: the elements of its block of each bucket that are not padding, at most
          // ceil(bucket / dp) per bucket.
          CHECK(zr.state_bytes * static_cast<std::size_t>(world) <=
                p[0].state_bytes + zr.num_buckets * static_cast<std::size_t>(world) * per_elem);
        }
        // ... so the ranks' states add up to the plain optimizer's, element for element.
        std::size_t total = 0;
        for (const EquivResult& zr : z) total += zr.state_bytes;
        CHECK(total == p[0].state_bytes);
      }
}

TEST_CASE("C4: accumulating micro-batches of 3 and 7 valid tokens gives the mean over all 10 tokens, not the "
          "mean of the two micro-batch means") {
  for (int world : {1, 2, 3}) {
    CAPTURE(world);
    const auto res = run_ranks(world, [](Comm& c) { return c4_body(c); });
    for (const C4Result& r : res) {
      CHECK(r.tokens[0] == 3);
      CHECK(r.tokens[1] == 7);
      CHECK(r.dp_vs_global_mean < tol);
      CHECK(r.mean_of_means_vs_global > 0.05);  // the wrong answer is far off: the test can fail
    }
  }
}

TEST_CASE("C1: ranks taking different branches complete the step; an unused parameter contributes zero and every "
          "gradient equals the single-process gradient over both batches") {
  for (int world : {2, 3, 4})
    for (bool alternate : {false, true}) {
      CAPTURE(world);
      CAPTURE(alternate);
      const auto res = run_ranks(world, [&](Comm& c) { return c1_body(c, 4, alternate); });
      for (const C1Result& r : res) {
        CHECK(r.unused_branch_grad_was_zero_locally);
        CHECK(r.first_grad_rel < tol);
        CHECK(r.final_param_rel < tol);
        CHECK(r.identical_every_step);
      }
      for (const BucketLayout& l : layouts) {
        CAPTURE(l.name);
        const auto o = run_ranks(world, [&](Comm& c) { return c1_overlap_body(c, 5, alternate, options(l, true)); });
        for (const C1Result& r : o) {
          CHECK(r.first_grad_rel < tol);
          CHECK(r.final_param_rel < tol);
          CHECK(r.identical_every_step);
        }
      }
    }
}

TEST_CASE("C2: replicas whose parameter lists differ fail construction on every rank, naming the first differing "
          "parameter and both versions") {
  const threads::RunOptions quick{.timeout = std::chrono::seconds(5)};  // a hang would fail fast
  for (int world : {2, 3}) {
    CAPTURE(world);
    const auto missing = run_ranks(world, [](Comm& c) { return c2_body(c, 0); }, quick);
    for (const std::string& m : missing) {
      CAPTURE(m);
      CHECK(m.find("parameter lists differ") != std::string::npos);
      CHECK(m.find("has no parameter 3") != std::string::npos);
      CHECK(m.find("\"l1.bias\" (3) float32 Replicate") != std::string::npos);
      CHECK(m == missing.front());
    }
    const auto shape = run_ranks(world, [](Comm& c) { return c2_body(c, 1); }, quick);
    for (const std::string& m : shape) {
      CAPTURE(m);
      CHECK(m.find("parameter 0 is \"l0.weight\" (4, 8) float32 Replicate on rank 0 but \"l0.weight\" (4, 6) float32 "
                   "Replicate on rank " + std::to_string(world - 1)) != std::string::npos);
      CHECK(m == shape.front());
    }
  }
  // Equal lists pass.
  const auto ok = run_ranks(1, [](Comm& c) { return c2_body(c, 0); });
  CHECK(ok.front().empty());
}

TEST_CASE("C10: a validation loss from per-rank sums is the same value on every rank, so every rank takes the same "
          "branch") {
  for (int world : {2, 3, 4}) {
    const auto res = run_ranks(world, [](Comm& c) { return c10_body(c, 0.3); });
    for (const C10Result& r : res) {
      CHECK(r.mean == res.front().mean);
      CHECK(r.save == res.front().save);
      CHECK(r.mean == doctest::Approx(r.serial).epsilon(1e-12));
    }
  }
}

TEST_CASE("DataParallel: ranks whose data runs out early join with zero contribution, or all run the agreed step "
          "count; both equal the serial run and nobody hangs") {
  for (int world : {2, 3, 4}) {
    CAPTURE(world);
    const auto joined = run_ranks(world, [](Comm& c) { return uneven_body(c, true); });
    for (const UnevenResult& r : joined) {
      CHECK(r.steps_run == 3);
      CHECK(r.param_rel < tol);
      CHECK(r.identical);
    }
    const auto agreed = run_ranks(world, [](Comm& c) { return uneven_body(c, false); });
    for (const UnevenResult& r : agreed) {
      CHECK(r.steps_run == (world >= 3 ? 1 : 2));
      CHECK(r.param_rel < tol);
      CHECK(r.identical);
    }
  }
}

TEST_CASE("DataParallel: a step issues one all-reduce per bucket after the last micro-batch only (no_sync before), "
          "and buckets start during backward only when overlapped") {
  for (int world : {1, 2, 3}) {
    CAPTURE(world);
    // Per parameter: 4 layers x (weight, bias) = 8 buckets.
    const auto per = run_ranks(world, [](Comm& c) { return count_body(c, options(layouts[0], true), 3, false); });
    for (const CountResult& r : per) {
      CHECK(r.buckets == 8);
      CHECK(r.distinct_params == 8);
      // 1 all-reduce for loss_scale, then nothing until the last micro-batch.
      CHECK(r.all_reduce_after_micro == std::vector<std::size_t>{1, 1, world == 1 ? 1u : 9u});
      // Layers 3, 2, 1 finished before layer 0's backward: their 6 buckets had started.
      CHECK(r.launched_when_first_layer_starts == 6);
      CHECK(r.early_launches == 8);
    }
    const auto off = run_ranks(world, [](Comm& c) { return count_body(c, options(layouts[0], false), 1, false); });
    for (const CountResult& r : off) {
      CHECK(r.launched_when_first_layer_starts == 0);
      CHECK(r.early_launches == 0);
    }
    const auto one = run_ranks(world, [](Comm& c) { return count_body(c, options(layouts[2], true), 2, false); });
    for (const CountResult& r : one) {
      CHECK(r.buckets == 1);
      CHECK(r.all_reduce_after_micro == std::vector<std::size_t>{1, world == 1 ? 1u : 2u});
    }
    const auto zero = run_ranks(world, [](Comm& c) { return count_body(c, options(layouts[0], true), 1, true); });
    for (const CountResult& r : zero) {
      CHECK(r.all_reduce_after_micro == std::vector<std::size_t>{1});  // loss_scale only
      CHECK(r.reduce_scatter == (world == 1 ? 0u : 8u));
      CHECK(r.all_gather == (world == 1 ? 0u : 8u));
    }
  }
}

// Overlap, observed: layer 0's backward (the last to run) is made slow, and while it runs the
// buckets started by layers 3, 2 and 1 must complete their reduction -- seen through test()
// on their requests, not through any wait() -- and hold the global gradient of the serial
// model on the whole batch. A DataParallel that started its buckets only when backward
// returns, or a backend that progressed only inside wait(), fails here. World size 1 has no
// reduction to overlap.
TEST_CASE("DataParallel: while a slow layer 0 runs its backward, the buckets of layers 3-1 complete their reduction "
          "and hold the global gradient, before backward returns") {
  struct Seen {
    std::size_t launched = 0;   // buckets started when layer 0's backward began
    std::size_t completed = 0;  // of those, complete (in issue order) while layer 0 still ran
    double grad_rel = testing::infinite_error;  // their gradients against the serial ones
    bool observed = false;      // layer 0's hook ran in the overlapped step
  };
  for (int world : {2, 3, 4, 7}) {
    CAPTURE(world);
    const auto res = run_ranks(world, [](Comm& c) {
      auto probe = std::make_shared<ProbeComm>(c.backend_ptr());
      DataParallel dp(Stack({6, 6, 6, 6, 6}, 21), Comm(probe), {.bucket_size = 0, .first_bucket_size = 0});
      // The serial model's gradient of step 1's global batch (2 rows per rank, mean loss).
      Stack serial({6, 6, 6, 6, 6}, 21);
      for (int r = 0; r < c.size(); ++r) {
        auto [y, ctx] = serial.forward(stack_input(1, r, 2, 6));
        auto [loss, dy] = square_loss(y, 1.0 / (2.0 * c.size()));
        serial.backward(dy, ctx);
      }
      Seen seen;
      bool overlapped_step = false;
      dp.module().before_layer_backward = [&](std::size_t i) {
        if (i != 0 || !overlapped_step) return;
        seen.observed = true;
        seen.launched = probe->requests().size();
        // Layer 0 is slow: it computes, in chunks, until the started reductions complete (or
        // 10 s pass), polling them between chunks.
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        double acc = 0;
        for (;;) {
          for (int k = 1; k <= 20000; ++k) acc += std::sqrt(static_cast<double>(k) + acc * 1e-12);
          seen.completed = 0;
          while (seen.completed < seen.launched && probe->requests()[seen.completed]->test()) ++seen.completed;
          if (seen.completed == seen.launched || std::chrono::steady_clock::now() > deadline) break;
        }
        REQUIRE(std::isfinite(acc));
        if (seen.launched == 0 || seen.completed < seen.launched) return;  // their buffers are still in use
        // Layers 3, 2 and 1 have run their backward; their gradients are now the reduced sums.
        ParameterList<float> mine, ref;
        for (const char* name : {"l1.weight", "l1.bias", "l2.weight", "l2.bias", "l3.weight", "l3.bias"}) {
          mine.push_back(dp.parameters().at(name));
          ref.push_back(serial.parameters().at(name));
        }
        seen.grad_rel = grad_rel_error(mine, ref);
      };
      for (int step = 0; step < 2; ++step) {  // step 0 learns the marks; step 1 overlaps
        overlapped_step = step == 1;
        const double scale = dp.loss_scale(2);
        auto [y, ctx] = dp.forward(stack_input(step, c.rank(), 2, 6));
        auto [loss, dy] = square_loss(y, scale);
        probe->requests().clear();  // from here on: the bucket reductions of this backward
        dp.backward(dy, ctx);
        if (step == 0) dp.zero_grad();
      }
      return seen;
    });
    for (const Seen& s : res) {
      CHECK(s.observed);
      // Per parameter, one bucket each: l3.bias, l3.weight, ..., l1.weight started before layer 0.
      CHECK(s.launched == 6);
      CHECK(s.completed == s.launched);
      CHECK(s.grad_rel < tol);
    }
  }
}

TEST_CASE("DataParallel: a parameter marked ready more often than in the first backward, after its bucket started, "
          "is an error naming it; without overlap the same model trains correctly") {
  DataParallelOptions o{.bucket_size = 0, .first_bucket_size = 0, .overlap_grad_reduce = true};
  const auto bad = run_ranks(1, [&](Comm& c) { return reuse_body(c, {1, 2}, o); });
  CHECK(bad.front().error.find("\"lin.") != std::string::npos);
  CHECK(bad.front().error.find("marked ready 2 times") != std::string::npos);
  CHECK(bad.front().error.find("overlap_grad_reduce = false") != std::string::npos);
  // Uses that do not grow beyond the first step's are fine with overlap.
  const auto fine = run_ranks(2, [&](Comm& c) { return reuse_body(c, {2, 1, 2, 2}, o); });
  for (const ReuseResult& r : fine) {
    CHECK(r.error.empty());
    CHECK(r.param_rel < tol);
  }
  o.overlap_grad_reduce = false;
  const auto off = run_ranks(2, [&](Comm& c) { return reuse_body(c, {1, 2, 3}, o); });
  for (const ReuseResult& r : off) {
    CHECK(r.error.empty());
    CHECK(r.param_rel < tol);
  }
}

TEST_CASE("DataParallel: a tie made without Parameter::tied is found in the first backward and its gradient kept "
          "whole") {
  for (int world : {1, 2, 3}) {
    const auto res = run_ranks(world, [](Comm& c) { return undeclared_tie_body(c, 4); });
    for (const TieResult& r : res) {
      CHECK(r.copied);
      CHECK(r.param_rel < tol);
      CHECK(r.identical);
    }
  }
}

TEST_CASE("DataParallel: a moved replica keeps its hooks and buckets and still trains like the serial model") {
  const auto res = run_ranks(2, [](Comm& c) {
    std::vector<DataParallel<Stack>> v;
    v.push_back(DataParallel(Stack({4, 5, 3}, 11 + static_cast<std::uint64_t>(c.rank())), c,
                             {.bucket_size = 0, .first_bucket_size = 0}));
    v.reserve(4);  // moves it again
    DataParallel<Stack>& dp = v.front();
    Stack serial({4, 5, 3}, 11);
    testing::WorstError rel;
    for (int step = 0; step < 3; ++step) {
      const double scale = dp.loss_scale(2);
      auto [y, ctx] = dp.forward(stack_input(step, c.rank(), 2));
      auto [loss, dy] = square_loss(y, scale);
      dp.backward(dy, ctx);
      for (int r = 0; r < 2; ++r) {
        auto [sy, sctx] = serial.forward(stack_input(step, r, 2));
        auto [sl, sdy] = square_loss(sy, 0.25);
        serial.backward(sdy, sctx);
      }
      rel.add(grad_rel_error(dp.parameters(), serial.parameters()));
      dp.zero_grad();
      serial.parameters().zero_grad();
    }
    return std::pair<double, std::size_t>(rel.value(), dp.buckets().early_launches());
  });
  for (const auto& [rel, early] : res) {
    CHECK(rel < tol);
    CHECK(early == 4);  // the hooks reach the moved buckets
  }
}

TEST_CASE("DataParallel: loss_scale is 1 / the global count and rejects a step without samples on every rank") {
  const auto res = run_ranks(3, [](Comm& c) {
    DataParallel dp(Stack({2, 2}, 1), c);
    const double s = dp.loss_scale(c.rank() + 1);  // 1 + 2 + 3
    std::string err;
    try {
      (void)dp.loss_scale(0);
    } catch (const Error& e) {
      err = e.what();
    }
    return std::pair<double, std::string>(s, err);
  });
  for (const auto& [s, err] : res) {
    CHECK(s == 1.0 / 6.0);
    CHECK(err.find("global count") != std::string::npos);
  }
}

TEST_CASE("DataParallel: wrapping parameters that another DataParallel already wraps is an error naming one") {
  const auto res = run_ranks(2, [](Comm& c) {
    DataParallel inner(Stack({3, 2}, 1), c);
    std::string err;
    try {
      DataParallel outer(std::move(inner), c);
    } catch (const Error& e) {
      err = e.what();
    }
    return err;
  });
  for (const std::string& e : res) {
    CHECK(e.find("\"l0.weight\" already has a grad-ready hook") != std::string::npos);
  }
}
