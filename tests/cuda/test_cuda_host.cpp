// Host-side checks of the CUDA device layer (tessera/cuda): everything that runs without a GPU.
// The caching allocator over host memory, the row-major to column-major GEMM mapping against a
// direct product, the element arithmetic of the kernels against the CPU reference layers, and
// the errors where no device exists. Built with the C++ compiler (no nvcc).
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tessera/core/parameter.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/caching_allocator.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/flash_attention_math.hpp"
#include "tessera/cuda/flat_gpt_layout.hpp"
#include "tessera/cuda/gemm_layout.hpp"
#include "tessera/cuda/phase_timer.hpp"
#include "tessera/cuda/reduce_op_math.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/core/batch_position.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/parallel/tensor/sharding.hpp"
#include "tessera/nn/core_attention.hpp"
#include "tessera/nn/gelu.hpp"
#include "tessera/parallel/tensor/dropout.hpp"
#include "tessera/parallel/data/compression/half_float.hpp"
#include "tessera/optim/adamw.hpp"

using namespace tessera;
namespace tc = tessera::cuda;

namespace {

// Host memory standing in for cudaMalloc, with a capacity so that "out of memory" can happen.
struct HostRaw {
  std::size_t capacity = std::size_t{1} << 40;
  std::size_t used = 0;
  std::int64_t* mallocs = nullptr;  // counts raw allocations (shared with the test)
  std::vector<std::pair<void*, std::size_t>>* blocks = nullptr;
  void* allocate(std::size_t bytes) {
    if (used + bytes > capacity) return nullptr;
    used += bytes;
    if (mallocs) ++*mallocs;
    void* p = std::aligned_alloc(256, bytes);
    if (blocks) blocks->push_back({p, bytes});
    return p;
  }
  void deallocate(void* p) noexcept {
    for (auto& [q, n] : *blocks)
      if (q == p) {
        used -= n;
        n = 0;
      }
    std::free(p);
  }
  std::string describe() const { return "host test memory: " + std::to_string(used) + " of " + std::to_string(capacity); }
};

cudaStream_t fake_stream(int i) { return reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(0x1000 * i)); }

}  // namespace

TEST_CASE("phase totals: each mark's span runs to the next mark or the step's end, summed per phase over steps") {
  tc::PhaseTotals t;
  // Step 1: a [0, 1), b [1, 3.5), a [3.5, 4), c [4, 10).
  t.add_step({{"a", 0.0}, {"b", 1.0}, {"a", 3.5}, {"c", 4.0}}, 10.0);
  // Step 2 (times from its own first mark): b [2, 5), a [5, 6).
  t.add_step({{"b", 2.0}, {"a", 5.0}}, 6.0);
  REQUIRE(t.totals().size() == 3);
  CHECK(t.totals()[0].first == "a");  // the order of first use
  CHECK(t.totals()[0].second == doctest::Approx(1.0 + 0.5 + 1.0));
  CHECK(t.totals()[1].first == "b");
  CHECK(t.totals()[1].second == doctest::Approx(2.5 + 3.0));
  CHECK(t.totals()[2].first == "c");
  CHECK(t.totals()[2].second == doctest::Approx(6.0));
  CHECK(t.total_ms() == doctest::Approx(10.0 + 4.0));
  CHECK(t.steps() == 2);
  t.clear();
  CHECK(t.totals().empty());
  CHECK(t.steps() == 0);
  // A timer that is off marks nothing and needs no device.
  tc::PhaseTimer timer;
  CHECK_FALSE(timer.enabled());
  CHECK(timer.totals().steps() == 0);
}

TEST_CASE("caching allocator: sizes round to 512 B below 1 MiB and to 2 MiB above") {
  using A = tc::CachingAllocator<HostRaw>;
  CHECK(A::round_size(0) == 512);
  CHECK(A::round_size(1) == 512);
  CHECK(A::round_size(512) == 512);
  CHECK(A::round_size(513) == 1024);
  CHECK(A::round_size((1 << 20) - 1) == (1 << 20));
  CHECK(A::round_size(1 << 20) == (std::size_t{2} << 20));
  CHECK(A::round_size((std::size_t{2} << 20) + 1) == (std::size_t{4} << 20));
}

TEST_CASE("caching allocator: a repeated step allocates raw memory only in its first iteration") {
  std::int64_t mallocs = 0;
  std::vector<std::pair<void*, std::size_t>> blocks;
  tc::CachingAllocator<HostRaw> alloc(HostRaw{std::size_t{1} << 40, 0, &mallocs, &blocks});
  const std::vector<std::size_t> sizes = {1000, 4096, 3 << 20, 100, 4096, 777777};
  std::size_t peak_expected = 0;
  for (std::size_t s : sizes) peak_expected += tc::CachingAllocator<HostRaw>::round_size(s);
  std::int64_t after_first = 0;
  for (int step = 0; step < 10; ++step) {
    std::vector<void*> live;
    for (std::size_t s : sizes) live.push_back(alloc.allocate(s, fake_stream(1)));
    for (std::size_t i = 0; i < live.size(); ++i) {
      CHECK(live[i] != nullptr);
      std::memset(live[i], 0xab, sizes[i]);  // the whole request is usable
    }
    for (void* p : live) alloc.deallocate(p, 0, fake_stream(1));
    if (step == 0) after_first = mallocs;
  }
  const tc::AllocatorStats st = alloc.stats();
  CHECK(mallocs == static_cast<std::int64_t>(sizes.size()));
  CHECK(after_first == mallocs);
  CHECK(st.raw_allocations == mallocs);
  CHECK(st.requests == 10 * static_cast<std::int64_t>(sizes.size()));
  CHECK(st.cache_hits == 9 * static_cast<std::int64_t>(sizes.size()));
  CHECK(st.allocated_bytes == 0);
  CHECK(st.peak_allocated_bytes == peak_expected);
  CHECK(st.reserved_bytes == peak_expected);
  alloc.empty_cache();
  CHECK(alloc.stats().reserved_bytes == 0);
  CHECK(alloc.stats().raw_frees == mallocs);
}

TEST_CASE("caching allocator: a block freed on one stream is not handed to another") {
  std::int64_t mallocs = 0;
  std::vector<std::pair<void*, std::size_t>> blocks;
  tc::CachingAllocator<HostRaw> alloc(HostRaw{std::size_t{1} << 40, 0, &mallocs, &blocks});
  void* a = alloc.allocate(2048, fake_stream(1));
  alloc.deallocate(a, 2048, fake_stream(1));
  void* b = alloc.allocate(2048, fake_stream(2));
  CHECK(b != a);
  CHECK(mallocs == 2);
  void* c = alloc.allocate(2048, fake_stream(1));
  CHECK(c == a);
  // A cached block serves a request of at least half its size, not a much smaller one.
  alloc.deallocate(c, 2048, fake_stream(1));
  void* d = alloc.allocate(512, fake_stream(1));
  CHECK(d != a);
  void* e = alloc.allocate(1500, fake_stream(1));
  CHECK(e == a);
  alloc.deallocate(b, 0, fake_stream(2));
  alloc.deallocate(d, 0, fake_stream(1));
  alloc.deallocate(e, 0, fake_stream(1));
}

TEST_CASE("caching allocator: out of memory releases the cache, retries, then names the sizes") {
  std::int64_t mallocs = 0;
  std::vector<std::pair<void*, std::size_t>> blocks;
  tc::CachingAllocator<HostRaw> alloc(HostRaw{8192, 0, &mallocs, &blocks});
  void* a = alloc.allocate(4096, fake_stream(1));
  void* b = alloc.allocate(4096, fake_stream(1));
  alloc.deallocate(b, 4096, fake_stream(1));
  // 8192 bytes: the cached 4096 block is too small, the raw memory has no room, so the cache is
  // released and the request retried; with 4096 bytes live that still does not fit.
  void* c = nullptr;
  try {
    c = alloc.allocate(8192, fake_stream(1));
    FAIL("no OutOfDeviceMemory");
  } catch (const tc::OutOfDeviceMemory& e) {
    const std::string m = e.what();
    CHECK(m.find("allocating 8192 bytes") != std::string::npos);
    CHECK(m.find("4096 bytes in live tensors") != std::string::npos);
    CHECK(m.find("host test memory: 4096 of 8192") != std::string::npos);
  }
  CHECK(c == nullptr);
  CHECK(alloc.stats().reserved_bytes == 4096);  // the cache was released before the retry
  // A request that fits once the cache is released succeeds.
  void* d = alloc.allocate(4096, fake_stream(2));
  CHECK(d != nullptr);
  alloc.deallocate(a, 0, fake_stream(1));
  alloc.deallocate(d, 0, fake_stream(2));
}

TEST_CASE("DeviceTensor over a memory resource: sizes, reshape, and the block returns on the last copy") {
  std::int64_t mallocs = 0;
  std::vector<std::pair<void*, std::size_t>> blocks;
  tc::CachingAllocator<HostRaw> alloc(HostRaw{std::size_t{1} << 30, 0, &mallocs, &blocks});
  {
    auto t = tc::DeviceTensor<float>::empty(Shape{3, 5, 7}, fake_stream(1), alloc);
    CHECK(t.numel() == 105);
    CHECK(t.bytes() == 420);
    CHECK(t.data() != nullptr);
    CHECK(alloc.stats().allocated_bytes == 512);
    auto u = t.reshape(Shape{15, 7});
    CHECK(u.data() == t.data());
    CHECK(u.size(0) == 15);
    CHECK_THROWS_WITH_AS(t.reshape(Shape{4, 26}), doctest::Contains("has 104 elements"), Error);
    tc::DeviceView<const float> v = u;
    CHECK(v.data == t.data());
    CHECK(v.numel() == 105);
    auto b = tc::DeviceTensor<tc::bf16>::empty(Shape{1000}, fake_stream(1), alloc);
    CHECK(b.bytes() == 2000);
  }
  CHECK(alloc.stats().allocated_bytes == 0);
  CHECK(alloc.stats().reserved_bytes == 512 + 2048);
  auto e = tc::DeviceTensor<float>::empty(Shape{0}, fake_stream(1), alloc);
  CHECK(e.data() == nullptr);
  CHECK(alloc.stats().requests == 2);
}

namespace {
// cuBLAS's column-major semantics, written out: C' (m x n, ld ldc) = op(A') op(B'), A' stored
// column-major with leading dimension lda, batch strides as given.
void column_major_product(const tc::ColumnMajorGemm& g, const float* A, const float* B, float* C) {
  for (std::int64_t p = 0; p < g.batch; ++p)
    for (std::int64_t j = 0; j < g.n; ++j)
      for (std::int64_t i = 0; i < g.m; ++i) {
        float acc = 0;
        for (std::int64_t l = 0; l < g.k; ++l) {
          const float a = g.trans_a ? A[p * g.stride_a + i * g.lda + l] : A[p * g.stride_a + l * g.lda + i];
          const float b = g.trans_b ? B[p * g.stride_b + l * g.ldb + j] : B[p * g.stride_b + j * g.ldb + l];
          acc += a * b;
        }
        C[p * g.stride_c + j * g.ldc + i] = acc;
      }
}
}  // namespace

TEST_CASE("GEMM layout: the column-major problem computes the row-major product (every transpose, padded, batched)") {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1, 1);
  int cases = 0;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (std::int64_t batch : {1, 3})
        for (std::int64_t pad : {0, 3}) {
          const std::int64_t m = 5, n = 7, k = 4;
          tc::GemmShape s;
          s.trans_a = ta;
          s.trans_b = tb;
          s.m = m;
          s.n = n;
          s.k = k;
          s.batch = batch;
          const std::int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;
          const std::int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
          s.lda = pad ? a_cols + pad : 0;
          s.ldb = pad ? b_cols + pad : 0;
          s.ldc = pad ? n + pad : 0;
          const std::int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = n + pad;
          std::vector<float> A(static_cast<std::size_t>(batch * a_rows * lda)), B(static_cast<std::size_t>(batch * b_rows * ldb));
          for (float& x : A) x = u(rng);
          for (float& x : B) x = u(rng);
          std::vector<float> C(static_cast<std::size_t>(batch * m * ldc), 0.f), R = C;
          const tc::ColumnMajorGemm g = tc::to_column_major(s);
          CHECK(g.m == n);
          CHECK(g.n == m);
          // cuBLAS gets A' = B and B' = A.
          column_major_product(g, B.data(), A.data(), C.data());
          for (std::int64_t p = 0; p < batch; ++p)
            for (std::int64_t i = 0; i < m; ++i)
              for (std::int64_t j = 0; j < n; ++j) {
                float acc = 0;
                for (std::int64_t l = 0; l < k; ++l) {
                  const float a = ta ? A[p * a_rows * lda + l * lda + i] : A[p * a_rows * lda + i * lda + l];
                  const float b = tb ? B[p * b_rows * ldb + j * ldb + l] : B[p * b_rows * ldb + l * ldb + j];
                  acc += a * b;
                }
                R[p * m * ldc + i * ldc + j] = acc;
              }
          CHECK(C == R);
          ++cases;
        }
  CHECK(cases == 16);
}

TEST_CASE("GEMM layout: bad sizes are refused, naming the numbers") {
  tc::GemmShape s;
  s.m = 4;
  s.n = 6;
  s.k = 8;
  s.lda = 7;
  CHECK_THROWS_WITH_AS(tc::to_column_major(s), doctest::Contains("lda 7 is shorter than A's row of 8"), Error);
  s.lda = 0;
  s.ldc = 5;
  CHECK_THROWS_WITH_AS(tc::to_column_major(s), doctest::Contains("ldc 5 is shorter than C's row of 6"), Error);
  s.ldc = 0;
  s.m = -1;
  CHECK_THROWS_WITH_AS(tc::to_column_major(s), doctest::Contains("bad sizes m -1"), Error);
}

TEST_CASE("element math: GELU forward and backward equal nn::GELU") {
  nn::GELU<float> gelu;
  Tensor<float> x(Shape{1001});
  for (int i = 0; i < 1001; ++i) x(i) = -8.f + 16.f * static_cast<float>(i) / 1000.f;
  auto [y, ctx] = gelu.forward(x);
  Tensor<float> dy(Shape{1001});
  for (int i = 0; i < 1001; ++i) dy(i) = 0.5f + 0.001f * static_cast<float>(i);
  Tensor<float> dx = gelu.backward(dy, ctx);
  int exact = 0;
  for (int i = 0; i < 1001; ++i) {
    CHECK(tc::math::gelu(x(i)) == doctest::Approx(y(i)).epsilon(1e-6));
    CHECK(tc::math::gelu_backward(x(i), dy(i)) == doctest::Approx(dx(i)).epsilon(1e-6));
    exact += tc::math::gelu(x(i)) == y(i);
  }
  CHECK(exact == 1001);  // the same expression in the same order: bitwise on the host
}

TEST_CASE("element math: AdamW updates equal optim::AdamW bitwise over 5 steps, two groups") {
  Parameter<float> w("w", Tensor<float>(Shape{64})), b("b", Tensor<float>(Shape{16}));
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int i = 0; i < 64; ++i) w.value(i) = u(rng);
  for (int i = 0; i < 16; ++i) b.value(i) = u(rng);
  std::vector<float> xw(w.value.data(), w.value.data() + 64), xb(b.value.data(), b.value.data() + 16);
  std::vector<float> mw(64), vw(64), mb(16), vb(16);
  optim::AdamWOptions decay{3e-3, 0.9, 0.95, 1e-8, 0.1}, no_decay = decay;
  no_decay.weight_decay = 0;
  optim::AdamW<float> opt(std::vector<optim::ParamGroup<float, optim::AdamWOptions>>{
      {ParameterList<float>{&w}, decay}, {ParameterList<float>{&b}, no_decay}});
  for (int t = 1; t <= 5; ++t) {
    for (int i = 0; i < 64; ++i) w.grad(i) = u(rng);
    for (int i = 0; i < 16; ++i) b.grad(i) = u(rng);
    const auto sw = tc::math::adamw_scalars(decay.lr, decay.beta1, decay.beta2, decay.eps, decay.weight_decay, t);
    const auto sb = tc::math::adamw_scalars(no_decay.lr, no_decay.beta1, no_decay.beta2, no_decay.eps, 0, t);
    for (int i = 0; i < 64; ++i) tc::math::adamw_update(xw[i], w.grad(i), mw[i], vw[i], sw);
    for (int i = 0; i < 16; ++i) tc::math::adamw_update(xb[i], b.grad(i), mb[i], vb[i], sb);
    opt.step();
  }
  for (int i = 0; i < 64; ++i) CHECK(xw[i] == w.value(i));
  for (int i = 0; i < 16; ++i) CHECK(xb[i] == b.value(i));
  CHECK(xw[0] != 0.f);
}

TEST_CASE("errors: CUDA and cuBLAS failures name the call, the context and the library's text") {
  try {
    tc::detail::check(cudaErrorInvalidValue, "cudaMemcpyAsync", "to_device of shape ", Shape{2, 3});
    FAIL("no throw");
  } catch (const tc::CudaError& e) {
    CHECK(e.code() == static_cast<int>(cudaErrorInvalidValue));
    CHECK(std::string(e.what()).find("to_device of shape (2, 3): cudaMemcpyAsync failed: cudaErrorInvalidValue") !=
          std::string::npos);
  }
  try {
    tc::detail::check(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmul", "cuda gemm m 3");
    FAIL("no throw");
  } catch (const tc::CudaError& e) {
    CHECK(std::string(e.what()).find("cuda gemm m 3: cublasLtMatmul failed: CUBLAS_STATUS_NOT_SUPPORTED") !=
          std::string::npos);
  }
  CHECK_NOTHROW(tc::detail::check(cudaSuccess, "cudaFree"));
}

TEST_CASE("no device: device work refuses with the runtime's reason, and nothing hangs") {
  const int n = tc::device_count();
  if (n > 0) {
    MESSAGE("a CUDA device is present (", n, "): checking the out-of-range path only");
    CHECK_THROWS_WITH_AS(tc::set_device(n), doctest::Contains("is out of range"), Error);
    return;
  }
  const std::string why = tc::no_device_reason();
  CHECK(!why.empty());
  CHECK_THROWS_WITH_AS(tc::Stream(), doctest::Contains("no CUDA device: cudaGetDeviceCount"), tc::CudaError);
  CHECK_THROWS_WITH_AS(tc::set_device(0), doctest::Contains("no CUDA device"), tc::CudaError);
}

TEST_CASE("flat GPT layout: the CPU GPT's parameters end to end, decay on matrices only; another model is refused by name") {
  const GPTConfig cfg{.vocab_size = 67, .n_positions = 16, .n_layer = 2, .n_head = 4, .d_model = 32};
  GPT<float> gpt(cfg, 1);
  ParameterList<float> ps = gpt.parameters();
  const std::vector<tc::FlatParameter> flat = tc::flat_gpt_layout(cfg, ps);
  REQUIRE(flat.size() == ps.size());
  std::int64_t off = 0, decayed = 0, total = 0;
  std::size_t i = 0;
  for (Parameter<float>& p : ps) {
    CHECK(flat[i].name == p.name);
    CHECK(flat[i].offset == off);
    CHECK(flat[i].offset % tc::flat_alignment == 0);
    CHECK(flat[i].decay == (p.value.rank() >= 2));
    off += (p.value.numel() + 127) / 128 * 128;
    total += p.value.numel();
    if (flat[i].decay) decayed += p.value.numel();
    ++i;
  }
  // 67*32 + 16*32 + 2 * (12 d^2 + 13 d) + 2d: every parameter once (the tied head adds none).
  CHECK(total == 67 * 32 + 16 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32);
  CHECK(decayed == 67 * 32 + 16 * 32 + 2 * 12 * 32 * 32);
  const GPTConfig wider{.vocab_size = 67, .n_positions = 16, .n_layer = 2, .n_head = 4, .d_model = 64};
  CHECK_THROWS_WITH_AS(tc::flat_gpt_layout(wider, ps),
                       doctest::Contains("parameter 0 is wte.weight of shape (67, 32), expected wte.weight of shape (67, 64)"),
                       Error);
  const GPTConfig deeper{.vocab_size = 67, .n_positions = 16, .n_layer = 3, .n_head = 4, .d_model = 32};
  CHECK_THROWS_WITH_AS(tc::flat_gpt_layout(deeper, ps), doctest::Contains("has 28 parameters, a GPT of 3 layers has 40"),
                       Error);
}

TEST_CASE("flat GPT layout under tp: each parameter's split and shard equal the CPU TensorParallel GPT's (HybridGPT at tp 2 and 4), and gpt_tp_whole inverts gpt_tp_shard") {
  const GPTConfig cfg{.vocab_size = 67, .n_positions = 16, .n_layer = 2, .n_head = 4, .d_model = 32};
  GPT<float> gpt(cfg, 3);
  ParameterList<float> full = gpt.parameters();
  for (int tp : {2, 4}) {
    CAPTURE(tp);
    const std::vector<tc::FlatParameter> flat = tc::flat_gpt_layout(cfg, full, tp);
    REQUIRE(flat.size() == full.size());
    std::int64_t off = 0, local = 0;
    for (const tc::FlatParameter& f : flat) {
      CHECK(f.offset == off);
      off += (f.shape.numel() + 127) / 128 * 128;
      local += f.shape.numel();
    }
    // Per block: c_attn and c_fc (weights and biases) and both c_proj weights split over tp, the
    // rest whole: 12 d^2 / tp + 7 d / tp + 6 d per block; wte's 67 rows padded to a multiple of
    // tp and split; wpe and ln_f whole.
    const std::int64_t vocab_rows = (67 + tp - 1) / tp;
    CHECK(flat[0].shape == Shape{vocab_rows, 32});
    CHECK(flat[0].tp_layout == ParamLayout::padded_shard(0, 67));
    CHECK(local == vocab_rows * 32 + 16 * 32 + 2 * (12 * 32 * 32 / tp + 7 * 32 / tp + 6 * 32) + 2 * 32);
    // gpt_tp_whole(every rank's flat buffer) is the whole model again: each shard in place, the
    // padding dropped.
    const std::int64_t stride = off;
    std::vector<float> ranks(static_cast<std::size_t>(stride * tp), -1.f);
    for (int r = 0; r < tp; ++r)
      for (std::size_t i = 0; i < flat.size(); ++i) {
        const Tensor<float> piece = tc::gpt_tp_shard(full[i].value, flat[i], r, tp).contiguous();
        REQUIRE(piece.shape() == flat[i].shape);
        std::copy_n(piece.data(), piece.numel(), ranks.data() + r * stride + flat[i].offset);
      }
    for (std::size_t i = 0; i < flat.size(); ++i) {
      const Tensor<float> back = tc::gpt_tp_whole(ranks.data(), stride, flat[i], tp);
      const Tensor<float> want = full[i].value.contiguous();
      CAPTURE(flat[i].name);
      CHECK(back.shape() == want.shape());
      CHECK(std::equal(want.data(), want.data() + want.numel(), back.data()));
    }
    const std::vector<std::vector<std::string>> seen = threads::run(tp, [&](Comm& world) {
      Mesh mesh(world, MeshShape{.dp = 1, .pp = 1, .tp = tp});
      HybridGPT<float> cpu(mesh, cfg, 3);
      std::vector<std::string> checked;
      for (Parameter<float>& p : cpu.parameters()) {
        const auto it = std::find_if(flat.begin(), flat.end(), [&](const tc::FlatParameter& f) { return f.name == p.name; });
        REQUIRE(it != flat.end());
        CHECK(tc::gpt_tensor_parallel_layout(p.name, cfg.vocab_size, tp) == p.layout);
        CHECK(it->tp_layout == p.layout);
        CHECK(it->shape == p.value.shape());
        const std::size_t i = static_cast<std::size_t>(it - flat.begin());
        Parameter<float>& whole = full[i];
        const Tensor<float> mine = tc::gpt_tp_shard(whole.value, *it, world.rank(), tp).contiguous();
        const Tensor<float> cpu_value = p.value.contiguous();
        CHECK(std::equal(mine.data(), mine.data() + mine.numel(), cpu_value.data()));
        checked.push_back(p.name);
      }
      return checked;
    });
    CHECK(seen[0].size() == full.size());  // every parameter compared
  }
  CHECK_THROWS_WITH_AS(tc::flat_gpt_layout(cfg, full, 3), doctest::Contains("tp 3 does not divide n_head 4"), Error);
}

TEST_CASE("element math: the device's dropout masks are the CPU Dropout's, element by element") {
  const Dropout<float> drop(0.3, nn::LayerInit{.prefix = "", .seed = 9}.child("drop"));
  const Tensor<float> x = Tensor<float>::full(Shape{3, 5, 8}, 1.f);
  const BatchPosition at{.step = 7, .first_row = 4};
  Tensor<float> y;
  {
    const BatchPositionScope scope(at);
    y = drop.forward(x).output;
  }
  const auto key = drop.mask_key(at);
  const float scale = static_cast<float>(1.0 / (1.0 - 0.3));
  int kept = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const bool keep = tc::math::dropout_keep(key, static_cast<std::uint64_t>(4 * 40 + i), drop.keep_threshold());
    CHECK(y.data()[i] == (keep ? scale : 0.f));
    kept += keep;
  }
  CHECK(kept > 60);  // about 70% of 120 kept: a mask, not all or nothing
  CHECK(kept < 110);
  // Another step draws another mask.
  CHECK(drop.mask_key(BatchPosition{.step = 8, .first_row = 4}) != key);
}

TEST_CASE("device collectives' element arithmetic (math::reduce_ranks) equals the threads backend's reduce_range bitwise") {
  // The kernel of ThreadDeviceComm reduces element i as reduce_ranks over the ranks' values;
  // the host threads backend as reduce_range. Same order, same operations: equal bits for
  // every op, with values whose sum depends on the order, signed zeros and NaN.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> mant(-1.f, 1.f);
  std::uniform_int_distribution<int> e(-6, 6);
  for (int n : {1, 2, 3, 5, 8}) {
    CAPTURE(n);
    const std::size_t count = 4099;  // above reduce_range's chunk of 2048
    std::vector<std::vector<float>> ranks(static_cast<std::size_t>(n), std::vector<float>(count));
    for (auto& r : ranks)
      for (float& x : r) x = mant(rng) * std::ldexp(1.f, 4 * e(rng));
    ranks[0][1] = -0.f;
    ranks[static_cast<std::size_t>(n - 1)][2] = std::numeric_limits<float>::quiet_NaN();
    std::vector<const float*> src;
    for (const auto& r : ranks) src.push_back(r.data());
    for (tessera::ReduceOp op : {tessera::ReduceOp::sum, tessera::ReduceOp::avg, tessera::ReduceOp::max, tessera::ReduceOp::min}) {
      CAPTURE(static_cast<int>(op));
      std::vector<float> host(count), device(count);
      float* dst = host.data();
      tessera::threads::detail::reduce_range<float>(src.data(), n, 0, count, op, &dst, 1);
      for (std::size_t i = 0; i < count; ++i) {
        struct At {
          const std::vector<const float*>& s;
          std::size_t i;
          float operator[](int q) const { return s[static_cast<std::size_t>(q)][i]; }
        };
        device[i] = tessera::cuda::math::reduce_ranks(At{src, i}, n, op);
      }
      CHECK(std::memcmp(host.data(), device.data(), count * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("flat GPT stage layout: each pipeline stage holds the CPU HybridGPT stage's parameters (pp 2 and 4, tp 1 and 2), the last stage a copy of the tied wte; its ready offsets") {
  const GPTConfig cfg{.vocab_size = 67, .n_positions = 16, .n_layer = 2, .n_head = 4, .d_model = 32};
  GPT<float> gpt(cfg, 3);
  ParameterList<float> full = gpt.parameters();
  for (int pp : {2, 4})
    for (int tp : {1, 2}) {
      CAPTURE(pp);
      CAPTURE(tp);
      const StagePartition part = gpt_balanced_partition(cfg, pp);
      threads::run(pp * tp, [&](Comm& world) {
        Mesh mesh(world, MeshShape{.dp = 1, .pp = pp, .tp = tp});
        HybridGPT<float> cpu(mesh, cfg, 3);
        const int stage = mesh.pp().rank();
        const std::vector<tc::FlatParameter> flat =
            tc::flat_gpt_stage_layout(cfg, full, tp, tc::DeviceStage{part.begin(stage), part.end(stage)});
        std::vector<std::string> cpu_names, dev_names;
        std::vector<Shape> cpu_shapes, dev_shapes;
        for (Parameter<float>& p : cpu.parameters()) {
          cpu_names.push_back(p.name);
          cpu_shapes.push_back(p.value.shape());
        }
        std::int64_t off = 0;
        for (const tc::FlatParameter& f : flat) {
          dev_names.push_back(f.name);
          dev_shapes.push_back(f.shape);
          CHECK(f.offset == off);  // laid out again from 0
          off += (f.shape.numel() + 127) / 128 * 128;
        }
        CHECK(dev_names == cpu_names);
        CHECK(dev_shapes == cpu_shapes);
        const bool first = stage == 0, last = stage == pp - 1;
        CHECK((std::count(dev_names.begin(), dev_names.end(), "wte.weight") == (first || last ? 1 : 0)));
        if (last) CHECK(dev_names.back() == "wte.weight");  // the copy, after ln_f
        // Ready offsets: descending, ending at 0, ln_f's first when the stage holds the head.
        const std::vector<std::int64_t> ready = tc::gpt_stage_ready_offsets(flat);
        CHECK(ready.back() == 0);
        for (std::size_t i = 1; i < ready.size(); ++i) CHECK(ready[i] < ready[i - 1]);
        if (last) {
          const auto lnf = std::find_if(flat.begin(), flat.end(), [](const tc::FlatParameter& f) { return f.name == "ln_f.weight"; });
          REQUIRE(lnf != flat.end());
          CHECK(ready.front() == lnf->offset);
        }
        return 0;
      });
    }
  // The whole model as one stage is flat_gpt_layout, and its ready offsets gpt_ready_offsets'.
  const auto whole = tc::flat_gpt_stage_layout(cfg, full, 1, tc::DeviceStage{});
  const auto plain = tc::flat_gpt_layout(cfg, full, 1);
  REQUIRE(whole.size() == plain.size());
  for (std::size_t i = 0; i < whole.size(); ++i) CHECK((whole[i].name == plain[i].name && whole[i].offset == plain[i].offset));
  CHECK(tc::gpt_stage_ready_offsets(whole) == tc::gpt_ready_offsets(plain, cfg.n_layer));
  CHECK_THROWS_WITH_AS(tc::flat_gpt_stage_layout(cfg, full, 1, tc::DeviceStage{3, 3}),
                       doctest::Contains("pipeline layers [3, 3) of a GPT with 4"), Error);
  CHECK_THROWS_WITH_AS(tc::flat_gpt_stage_layout(cfg, full, 1, tc::DeviceStage{0, 5}),
                       doctest::Contains("pipeline layers [0, 5) of a GPT with 4"), Error);
}

TEST_CASE("device_grad_buckets: units joined in backward's order up to the cap; the GPT's ready offsets cover its flat buffer once") {
  namespace tc = tessera::cuda;
  const std::vector<std::int64_t> ready{900, 700, 400, 100, 0};
  auto b = tc::device_grad_buckets(1000, ready, 350);
  REQUIRE(b.size() == 4);  // [900, 1000) + [700, 900) = 300 <= 350; every later join would pass 350
  CHECK((b[0].lo == 700 && b[0].hi == 1000));
  CHECK((b[1].lo == 400 && b[1].hi == 700));
  CHECK((b[2].lo == 100 && b[2].hi == 400));
  CHECK((b[3].lo == 0 && b[3].hi == 100));
  b = tc::device_grad_buckets(1000, ready, 1000);
  REQUIRE(b.size() == 1);
  CHECK((b[0].lo == 0 && b[0].hi == 1000));
  b = tc::device_grad_buckets(1000, ready, 1);  // every unit alone
  CHECK(b.size() == ready.size());
  CHECK_THROWS_WITH_AS(tc::device_grad_buckets(1000, std::vector<std::int64_t>{900, 950, 0}, 10),
                       doctest::Contains("ready offset 1 is 950; each must lie below the one before (900"), tessera::Error);
  CHECK_THROWS_WITH_AS(tc::device_grad_buckets(1000, std::vector<std::int64_t>{900, 5}, 10),
                       doctest::Contains("must end at 0 (got 5 last)"), tessera::Error);
  CHECK_THROWS_WITH_AS(tc::device_grad_buckets(1000, ready, 0), doctest::Contains("at least 1 element, got 0"), tessera::Error);
  // The GPT: ln_f first, then the blocks from the last down, then the embeddings; the buckets
  // tile [0, numel) from the top, and each holds whole parameters.
  const tessera::GPTConfig cfg{.vocab_size = 67, .n_positions = 16, .n_layer = 3, .n_head = 4, .d_model = 32};
  tessera::GPT<float> gpt(cfg, 1);
  const auto layout = tc::flat_gpt_layout(cfg, gpt.parameters());
  const auto offsets = tc::gpt_ready_offsets(layout, cfg.n_layer);
  REQUIRE(offsets.size() == 5);
  CHECK(offsets[0] == layout[layout.size() - 2].offset);
  for (int l = 2; l >= 0; --l) CHECK(offsets[static_cast<std::size_t>(3 - l)] == layout[static_cast<std::size_t>(2 + 12 * l)].offset);
  CHECK(offsets.back() == 0);
  const std::int64_t numel = layout.back().offset + 128;  // ln_f.bias (32) rounded up to the alignment
  for (std::int64_t cap : {1LL, 5000LL, 1LL << 40}) {
    CAPTURE(cap);
    std::int64_t top = numel;
    for (const tc::DeviceGradBucket& k : tc::device_grad_buckets(numel, offsets, cap)) {
      CHECK(k.hi == top);
      bool starts_a_parameter = false;
      for (const tc::FlatParameter& f : layout) starts_a_parameter = starts_a_parameter || f.offset == k.lo;
      CHECK(starts_a_parameter);
      top = k.lo;
    }
    CHECK(top == 0);
  }
  CHECK_THROWS_WITH_AS(tc::gpt_ready_offsets(layout, 2), doctest::Contains("40 parameters, a GPT of 2 layers has 28"),
                       tessera::Error);
}

TEST_CASE("zero2_piece_counts: a bucket cut at the dp shards' borders, each piece its owner's, against an element-by-element count") {
  namespace tc = tessera::cuda;
  // 3 ranks x 150 elements: [250, 420) is [250, 300) on rank 1 and [300, 420) on rank 2.
  auto c = tc::zero2_piece_counts(tc::DeviceGradBucket{250, 420}, 150, 3);
  CHECK(c == std::vector<std::int64_t>{0, 50, 120});
  c = tc::zero2_piece_counts(tc::DeviceGradBucket{0, 450}, 150, 3);
  CHECK(c == std::vector<std::int64_t>{150, 150, 150});
  c = tc::zero2_piece_counts(tc::DeviceGradBucket{10, 20}, 150, 3);  // inside one shard
  CHECK(c == std::vector<std::int64_t>{10, 0, 0});
  c = tc::zero2_piece_counts(tc::DeviceGradBucket{149, 301}, 150, 3);  // one element each side of a whole shard
  CHECK(c == std::vector<std::int64_t>{1, 150, 1});
  for (int ranks : {1, 2, 3, 5, 8})
    for (std::int64_t shard : {1LL, 7LL, 64LL}) {
      const std::int64_t n = shard * ranks;
      for (std::int64_t lo = 0; lo < n; lo += 3)
        for (std::int64_t hi = lo + 1; hi <= n; hi += 5) {
          std::vector<std::int64_t> want(static_cast<std::size_t>(ranks), 0);
          for (std::int64_t i = lo; i < hi; ++i) ++want[static_cast<std::size_t>(i / shard)];
          if (tc::zero2_piece_counts(tc::DeviceGradBucket{lo, hi}, shard, ranks) != want) {
            FAIL_CHECK("ranks ", ranks, " shard ", shard, " bucket [", lo, ", ", hi, ")");
            return;
          }
        }
    }
  // Each rank's piece: where it starts (an empty one where it would) and its length; every
  // non-empty piece inside its owner's shard.
  for (int rank = 0; rank < 3; ++rank) {
    CAPTURE(rank);
    const tc::ZeroPiece p = tc::zero2_piece(tc::DeviceGradBucket{250, 420}, 150, 3, rank);
    CHECK(p.lo == (rank == 0 ? 250 : rank == 1 ? 250 : 300));
    CHECK(p.count == (rank == 0 ? 0 : rank == 1 ? 50 : 120));
    if (p.count > 0) CHECK((p.lo >= 150 * rank && p.lo + p.count <= 150 * (rank + 1)));
  }
  CHECK(tc::zero2_piece(tc::DeviceGradBucket{10, 20}, 150, 3, 2).lo == 20);  // past a bucket below its shard
  CHECK(tc::zero2_piece(tc::DeviceGradBucket{10, 20}, 150, 3, 2).count == 0);
  CHECK_THROWS_WITH_AS(tc::zero2_piece(tc::DeviceGradBucket{10, 20}, 150, 3, 3), doctest::Contains("rank 3 of 3"),
                       tessera::Error);
  CHECK_THROWS_WITH_AS(tc::zero2_piece_counts(tc::DeviceGradBucket{300, 460}, 150, 3),
                       doctest::Contains("bucket [300, 460) is not a non-empty range of the 3 x 150 = 450"), tessera::Error);
  CHECK_THROWS_WITH_AS(tc::zero2_piece_counts(tc::DeviceGradBucket{5, 5}, 150, 3), doctest::Contains("bucket [5, 5)"),
                       tessera::Error);
  CHECK_THROWS_WITH_AS(tc::zero2_piece_counts(tc::DeviceGradBucket{0, 5}, 0, 3),
                       doctest::Contains("shard 0 elements over 3 ranks"), tessera::Error);
}

namespace {

// The fused attention kernels' loops (ops/flash_attention.cuh) on the host, over one head's q, k,
// v, y, dy as contiguous (T, hd) rows (the kernels' shared-memory tiles have the same row
// stride): a thread's work per row, the tiles in the kernels' order (the forward and dQ over key
// tiles from 0 to the row's block's last row; dK and dV over query tiles from the key's block).
constexpr int kHD = 64;                                 // the kernels' compile-time bound for these head sizes
constexpr int kRows = tessera::cuda::math::flash_block_rows;  // query (key) rows per kernel block

struct FlashHead {
  int T, hd;
  std::vector<float> q, k, v, y, dy, lse, D, dq, dk, dv;
};

// Head h of batch row b of qkv (B, T, 3C) and dy (B, T, C) into f.q, f.k, f.v and f.dy as
// contiguous (T, hd) rows (f.T, f.hd set).
template <class Head>
void load_head(Head& f, const Tensor<float>& qkv, const Tensor<float>& dy, int b, int h, int C) {
  for (auto* part : {&f.q, &f.k, &f.v, &f.dy}) part->resize(static_cast<std::size_t>(f.T * f.hd));
  for (int t = 0; t < f.T; ++t)
    for (int e = 0; e < f.hd; ++e) {
      const std::size_t i = static_cast<std::size_t>(t * f.hd + e);
      const std::int64_t row = (static_cast<std::int64_t>(b) * f.T + t) * 3 * C + h * f.hd + e;
      f.q[i] = qkv.data()[row];
      f.k[i] = qkv.data()[row + C];
      f.v[i] = qkv.data()[row + 2 * C];
      f.dy[i] = dy.data()[(static_cast<std::int64_t>(b) * f.T + t) * C + h * f.hd + e];
    }
}

// Row t of the head's y and dq|dk|dv back into the (B, T, C) output and the (B, T, 3C) gradient:
// the layout load_head reads from.
template <class Head>
void store_head_row(const Head& f, Tensor<float>& y, Tensor<float>& dqkv, int b, int t, int h, int C) {
  for (int e = 0; e < f.hd; ++e) {
    const std::size_t i = static_cast<std::size_t>(t * f.hd + e);
    const std::int64_t row = (static_cast<std::int64_t>(b) * f.T + t) * 3 * C + h * f.hd + e;
    y.data()[(static_cast<std::int64_t>(b) * f.T + t) * C + h * f.hd + e] = f.y[i];
    dqkv.data()[row] = f.dq[i];
    dqkv.data()[row + C] = f.dk[i];
    dqkv.data()[row + 2 * C] = f.dv[i];
  }
}

void flash_host_forward(FlashHead& f, float scale) {
  f.y.assign(static_cast<std::size_t>(f.T * f.hd), 0.f);
  f.lse.assign(static_cast<std::size_t>(f.T), 0.f);
  std::vector<float> acc(static_cast<std::size_t>(f.hd));
  for (int t = 0; t < f.T; ++t) {
    float m = -INFINITY, l = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    const int last = std::min((t / kRows + 1) * kRows, f.T) - 1;  // the kernel block's last row
    for (int j0 = 0; j0 <= last; j0 += tc::math::flash_tile)
      tc::math::flash_forward_tile<kHD>(&f.q[static_cast<std::size_t>(t * f.hd)], &f.k[static_cast<std::size_t>(j0 * f.hd)],
                                   &f.v[static_cast<std::size_t>(j0 * f.hd)], f.hd,
                                   tc::math::flash_keys_seen(t, j0, f.T), f.hd, scale, m, l, acc.data());
    f.lse[static_cast<std::size_t>(t)] = tc::math::flash_forward_finish<kHD>(acc.data(), m, l, f.hd, &f.y[static_cast<std::size_t>(t * f.hd)]);
  }
}

void flash_host_backward(FlashHead& f, float scale) {
  const auto at = [&](int row) { return static_cast<std::size_t>(row * f.hd); };
  f.D.resize(static_cast<std::size_t>(f.T));
  for (int t = 0; t < f.T; ++t) f.D[static_cast<std::size_t>(t)] = tc::math::flash_row_dot(&f.dy[at(t)], &f.y[at(t)], f.hd);
  f.dq.assign(f.q.size(), 0.f);
  f.dk.assign(f.q.size(), 0.f);
  f.dv.assign(f.q.size(), 0.f);
  for (int j = 0; j < f.T; ++j)
    for (int i0 = j / kRows * kRows; i0 < f.T; i0 += tc::math::flash_tile) {
      int first = 0, end = 0;
      tc::math::flash_queries_seeing(j, i0, f.T, first, end);
      tc::math::flash_dkv_tile<kHD>(&f.k[at(j)], &f.v[at(j)], &f.q[at(i0 + first)], &f.dy[at(i0 + first)],
                               &f.lse[static_cast<std::size_t>(i0 + first)], &f.D[static_cast<std::size_t>(i0 + first)],
                               f.hd, end - first, f.hd, scale, &f.dk[at(j)], &f.dv[at(j)]);
    }
  for (int t = 0; t < f.T; ++t) {
    const int last = std::min((t / kRows + 1) * kRows, f.T) - 1;
    for (int j0 = 0; j0 <= last; j0 += tc::math::flash_tile)
      tc::math::flash_dq_tile<kHD>(&f.q[at(t)], &f.dy[at(t)], f.lse[static_cast<std::size_t>(t)], f.D[static_cast<std::size_t>(t)],
                              &f.k[at(j0)], &f.v[at(j0)], f.hd, tc::math::flash_keys_seen(t, j0, f.T), f.hd, scale,
                              &f.dq[at(t)]);
  }
}

double norm_rel(const Tensor<float>& a, const Tensor<float>& b) {
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double d = static_cast<double>(a.data()[i]) - b.data()[i];
    num += d * d;
    den += static_cast<double>(b.data()[i]) * b.data()[i];
  }
  const double r = std::sqrt(num / den);
  return r == r ? r : 1e30;  // NaN fails every bound
}

}  // namespace

TEST_CASE("fused attention math: the flash kernels' tiled online softmax and recomputed backward equal nn::CoreAttention (T not a multiple of the tiles, several heads)") {
  for (const std::array<int, 4>& size : {std::array<int, 4>{2, 37, 3, 8}, {1, 70, 2, 20}, {1, 129, 1, 64}, {2, 1, 2, 4}}) {
    const int B = size[0], T = size[1], H = size[2], hd = size[3];
    CAPTURE(T);
    CAPTURE(hd);
    const int C = H * hd;
    std::mt19937 rng(static_cast<unsigned>(T * 31 + hd));
    std::normal_distribution<float> nd(0.f, 1.f);
    Tensor<float> qkv(Shape{B, T, 3 * C}), dy(Shape{B, T, C});
    for (std::int64_t i = 0; i < qkv.numel(); ++i) qkv.data()[i] = nd(rng);
    for (std::int64_t i = 0; i < dy.numel(); ++i) dy.data()[i] = nd(rng);
    nn::CoreAttention<float> core(H);
    auto [y_ref, ctx] = core.forward(qkv);
    const Tensor<float> dqkv_ref = core.backward(dy, ctx);
    Tensor<float> y(Shape{B, T, C}), dqkv(Shape{B, T, 3 * C});
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        FlashHead f{T, hd, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
        load_head(f, qkv, dy, b, h, C);
        flash_host_forward(f, scale);
        flash_host_backward(f, scale);
        for (int t = 0; t < T; ++t) {
          // Each row's log-sum-exp against a direct computation (double).
          double mx = -1e300, sum = 0;
          for (int j = 0; j <= t; ++j) {
            double s2 = 0;
            for (int e = 0; e < hd; ++e) s2 += static_cast<double>(f.q[static_cast<std::size_t>(t * hd + e)]) * f.k[static_cast<std::size_t>(j * hd + e)];
            mx = std::max(mx, s2 * scale);
          }
          for (int j = 0; j <= t; ++j) {
            double s2 = 0;
            for (int e = 0; e < hd; ++e) s2 += static_cast<double>(f.q[static_cast<std::size_t>(t * hd + e)]) * f.k[static_cast<std::size_t>(j * hd + e)];
            sum += std::exp(s2 * scale - mx);
          }
          CHECK(std::abs(f.lse[static_cast<std::size_t>(t)] - (mx + std::log(sum))) < 1e-4 * (1 + std::abs(mx)));
          store_head_row(f, y, dqkv, b, t, h, C);
        }
      }
    CHECK(norm_rel(y, y_ref) < 1e-5);
    CHECK(norm_rel(dqkv, dqkv_ref) < 1e-5);
  }
  // The tile bounds: a row sees keys j <= t only, a key is seen by rows i >= j only.
  CHECK(tc::math::flash_keys_seen(5, 0, 100) == 6);
  CHECK(tc::math::flash_keys_seen(40, 32, 100) == 9);
  CHECK(tc::math::flash_keys_seen(99, 64, 100) == 32);
  CHECK(tc::math::flash_keys_seen(99, 96, 100) == 4);
  CHECK(tc::math::flash_keys_seen(10, 32, 100) == 0);
  int first = -1, end = -1;
  tc::math::flash_queries_seeing(40, 32, 100, first, end);
  CHECK((first == 8 && end == 32));
  tc::math::flash_queries_seeing(70, 32, 100, first, end);
  CHECK(first == end);  // no row of the tile attends to key 70
  tc::math::flash_queries_seeing(10, 96, 100, first, end);
  CHECK((first == 0 && end == 4));
}

namespace {

// The tensor-core attention kernels (ops/flash_attention_mma.cuh) emulated on the host, tile by
// tile as the kernels walk them, over one head's (T, hd) rows: q, k, v, dy as the kernels read
// them (bf16), each product summed in fp32, the softmax in the base-2 domain, P and dS rounded
// to bf16 before the products that take them, y rounded to bf16 as stored. The shared pieces
// (the tile, the causal test, the log-sum-exp, the tiles a block walks) are the kernels' own.
float round_bf16(float x) { return tessera::bf16_to_float(tessera::float_to_bf16(x)); }

struct MmaHead {
  int T, hd;
  std::vector<float> q, k, v, dy, y, lse, dq, dk, dv;
};

void mma_host_forward(MmaHead& f) {
  namespace m = tc::math;
  constexpr int tile = m::flash_mma_tile;
  const float scale_log2 = m::flash_log2e / std::sqrt(static_cast<float>(f.hd));
  const auto at = [&](int row, int e) { return static_cast<std::size_t>(row) * static_cast<std::size_t>(f.hd) + static_cast<std::size_t>(e); };
  f.y.assign(f.q.size(), 0.f);
  f.lse.assign(static_cast<std::size_t>(f.T), 0.f);
  for (int i0 = 0; i0 < f.T; i0 += tile)
    for (int t = i0; t < std::min(i0 + tile, f.T); ++t) {
      float mx = -INFINITY, l = 0.f;
      std::vector<float> o(static_cast<std::size_t>(f.hd), 0.f);
      for (int jt = 0; jt < m::flash_mma_key_tiles(i0); ++jt) {
        const int j0 = jt * tile;
        std::array<float, tile> s2{};
        float tmax = -INFINITY;
        for (int c = 0; c < tile; ++c) {
          const int j = j0 + c;
          float dot = 0.f;
          if (j < f.T)
            for (int e = 0; e < f.hd; ++e) dot += f.q[at(t, e)] * f.k[at(j, e)];
          s2[static_cast<std::size_t>(c)] = m::flash_mma_visible(t, j, f.T) ? dot * scale_log2 : -INFINITY;
          tmax = std::max(tmax, s2[static_cast<std::size_t>(c)]);
        }
        const float m_new = std::max(mx, tmax);
        const float alpha = std::exp2(mx - m_new);
        float sum = 0.f;
        for (float& e : o) e *= alpha;
        for (int c = 0; c < tile; ++c) {
          const float p = std::exp2(s2[static_cast<std::size_t>(c)] - m_new);
          sum += p;
          const float pb = round_bf16(p);
          if (j0 + c < f.T)
            for (int e = 0; e < f.hd; ++e) o[static_cast<std::size_t>(e)] += pb * f.v[at(j0 + c, e)];
        }
        l = l * alpha + sum;
        mx = m_new;
      }
      for (int e = 0; e < f.hd; ++e) f.y[at(t, e)] = round_bf16(o[static_cast<std::size_t>(e)] / l);
      f.lse[static_cast<std::size_t>(t)] = m::flash_mma_lse(mx, l);
    }
}

void mma_host_backward(MmaHead& f) {
  namespace m = tc::math;
  constexpr int tile = m::flash_mma_tile;
  const float scale = 1.f / std::sqrt(static_cast<float>(f.hd)), scale_log2 = m::flash_log2e * scale;
  const auto at = [&](int row, int e) { return static_cast<std::size_t>(row) * static_cast<std::size_t>(f.hd) + static_cast<std::size_t>(e); };
  std::vector<float> D(static_cast<std::size_t>(f.T));
  for (int t = 0; t < f.T; ++t) D[static_cast<std::size_t>(t)] = tc::math::flash_row_dot(&f.dy[at(t, 0)], &f.y[at(t, 0)], f.hd);
  // p and dS (both rounded to bf16) of query i against key j.
  const auto p_ds = [&](int i, int j, float& p, float& ds) {
    float s = 0.f, dp = 0.f;
    for (int e = 0; e < f.hd; ++e) s += f.q[at(i, e)] * f.k[at(j, e)], dp += f.dy[at(i, e)] * f.v[at(j, e)];
    const float pf = m::flash_mma_visible(i, j, f.T) ? std::exp2(s * scale_log2 - f.lse[static_cast<std::size_t>(i)] * m::flash_log2e) : 0.f;
    p = round_bf16(pf);
    ds = round_bf16(pf * (dp - D[static_cast<std::size_t>(i)]));
  };
  f.dq.assign(f.q.size(), 0.f);
  f.dk.assign(f.q.size(), 0.f);
  f.dv.assign(f.q.size(), 0.f);
  for (int j0 = 0; j0 < f.T; j0 += tile)  // backward_kv: a key tile over the query tiles at or after it
    for (int j = j0; j < std::min(j0 + tile, f.T); ++j) {
      std::vector<float> dk(static_cast<std::size_t>(f.hd), 0.f), dv(static_cast<std::size_t>(f.hd), 0.f);
      for (int i0 = j0; i0 < f.T; i0 += tile)
        for (int i = i0; i < std::min(i0 + tile, f.T); ++i) {
          float p = 0.f, ds = 0.f;
          p_ds(i, j, p, ds);
          for (int e = 0; e < f.hd; ++e) dv[static_cast<std::size_t>(e)] += p * f.dy[at(i, e)], dk[static_cast<std::size_t>(e)] += ds * f.q[at(i, e)];
        }
      for (int e = 0; e < f.hd; ++e) f.dv[at(j, e)] = dv[static_cast<std::size_t>(e)], f.dk[at(j, e)] = dk[static_cast<std::size_t>(e)] * scale;
    }
  for (int i0 = 0; i0 < f.T; i0 += tile)  // backward_q: a query tile over the key tiles at or before it
    for (int i = i0; i < std::min(i0 + tile, f.T); ++i) {
      std::vector<float> dq(static_cast<std::size_t>(f.hd), 0.f);
      for (int jt = 0; jt < m::flash_mma_key_tiles(i0); ++jt)
        for (int j = jt * tile; j < std::min((jt + 1) * tile, f.T); ++j) {
          float p = 0.f, ds = 0.f;
          p_ds(i, j, p, ds);
          for (int e = 0; e < f.hd; ++e) dq[static_cast<std::size_t>(e)] += ds * f.k[at(j, e)];
        }
      for (int e = 0; e < f.hd; ++e) f.dq[at(i, e)] = dq[static_cast<std::size_t>(e)] * scale;
    }
}

}  // namespace

TEST_CASE("tensor-core attention math: the mma kernels' tile walk (bf16 inputs, base-2 online softmax, P and dS in bf16) equals nn::CoreAttention of the same bf16 inputs within bf16 round-off; the log-sum-exp within fp32's") {
  namespace m = tc::math;
  CHECK(m::flash_mma_key_tiles(0) == 1);
  CHECK(m::flash_mma_key_tiles(64) == 2);
  CHECK(m::flash_mma_key_tiles(192) == 4);
  CHECK(m::flash_mma_visible(5, 5, 10));
  CHECK(!m::flash_mma_visible(5, 6, 10));
  CHECK(!m::flash_mma_visible(12, 11, 10));  // a padded row sees no key past T
  CHECK(std::abs(m::flash_mma_lse(3.f * m::flash_log2e, 2.f) - (3.f + std::log(2.f))) < 1e-6f);
  for (const std::array<int, 4>& size : {std::array<int, 4>{1, 1, 2, 16}, {2, 65, 2, 32}, {1, 150, 2, 64}, {1, 64, 1, 48},
                                         {1, 200, 1, 128}}) {
    const int B = size[0], T = size[1], H = size[2], hd = size[3], C = H * hd;
    CAPTURE(T);
    CAPTURE(hd);
    std::mt19937 rng(static_cast<unsigned>(T * 17 + hd));
    std::normal_distribution<float> nd(0.f, 1.f);
    Tensor<float> qkv(Shape{B, T, 3 * C}), dy(Shape{B, T, C});
    for (std::int64_t i = 0; i < qkv.numel(); ++i) qkv.data()[i] = round_bf16(2.f * nd(rng));  // scores of a few units
    for (std::int64_t i = 0; i < dy.numel(); ++i) dy.data()[i] = round_bf16(nd(rng));
    Tensor<float> y(Shape{B, T, C}), dqkv(Shape{B, T, 3 * C});
    double lse_err = 0;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        MmaHead f{T, hd, {}, {}, {}, {}, {}, {}, {}, {}, {}};
        load_head(f, qkv, dy, b, h, C);
        mma_host_forward(f);
        mma_host_backward(f);
        const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
        for (int t = 0; t < T; ++t) {
          double mx = -1e300, sum = 0;
          std::vector<double> s(static_cast<std::size_t>(t + 1));
          for (int j = 0; j <= t; ++j) {
            double d = 0;
            for (int e = 0; e < hd; ++e) d += static_cast<double>(f.q[static_cast<std::size_t>(t * hd + e)]) * f.k[static_cast<std::size_t>(j * hd + e)];
            s[static_cast<std::size_t>(j)] = d * scale;
            mx = std::max(mx, d * scale);
          }
          for (double v : s) sum += std::exp(v - mx);
          lse_err = std::max(lse_err, std::abs(f.lse[static_cast<std::size_t>(t)] - (mx + std::log(sum))) / (1 + std::abs(mx)));
          store_head_row(f, y, dqkv, b, t, h, C);
        }
      }
    nn::CoreAttention<float> core(H);
    auto [y_ref, ctx] = core.forward(qkv);
    const Tensor<float> dqkv_ref = core.backward(dy, ctx);
    CHECK(lse_err < 1e-5);
    CHECK(norm_rel(y, y_ref) < 1e-2);
    CHECK(norm_rel(dqkv, dqkv_ref) < 2e-2);
  }
}
