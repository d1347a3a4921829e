// The NaN-safe comparison helpers (tessera/testing/compare.hpp): each is fed NaN, +Inf, -Inf,
// a size mismatch, zeros and ordinary values, and must call anything non-finite an infinite
// error (or "not equal"), so that no equivalence check built on them can pass on garbage.
#include <tessera/testing/compare.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace tt = tessera::testing;

namespace {

constexpr double nan_d = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_d = std::numeric_limits<double>::infinity();
constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();
constexpr float inf_f = std::numeric_limits<float>::infinity();

bool is_pos_inf(double x) { return std::isinf(x) && x > 0; }

template <class T>
std::span<const T> sp(const std::vector<T>& v) {
  return std::span<const T>(v);
}

}  // namespace

TEST_CASE("compare: the trap it exists for: std::max drops a NaN") {
  // The reason for the header: this is what the old accumulators did.
  CHECK(std::max(0.0, nan_d) == 0.0);
  CHECK_FALSE(nan_d >= 0.0);
}

TEST_CASE("compare: finite_or_infinite keeps finite values and maps NaN and both infinities to +inf") {
  CHECK(tt::finite_or_infinite(0.0) == 0.0);
  CHECK(tt::finite_or_infinite(2.5) == 2.5);
  CHECK(tt::finite_or_infinite(-2.5) == -2.5);
  CHECK(is_pos_inf(tt::finite_or_infinite(nan_d)));
  CHECK(is_pos_inf(tt::finite_or_infinite(inf_d)));
  CHECK(is_pos_inf(tt::finite_or_infinite(-inf_d)));
  CHECK(is_pos_inf(tt::infinite_error));
}

TEST_CASE("compare: WorstError is the largest magnitude, and +inf for good after a non-finite error") {
  SUBCASE("empty is 0") { CHECK(tt::WorstError{}.value() == 0.0); }
  SUBCASE("ordinary values: the largest magnitude, whatever the sign or order") {
    tt::WorstError w;
    w.add(0.25);
    w.add(-3.0);
    w.add(1.0);
    w.add(0.0);
    CHECK(w.value() == 3.0);
  }
  SUBCASE("zeros only") {
    tt::WorstError w;
    w.add(0.0);
    w.add(-0.0);
    CHECK(w.value() == 0.0);
  }
  SUBCASE("a NaN first, then finite values: stays +inf") {
    tt::WorstError w;
    w.add(nan_d);
    CHECK(is_pos_inf(w.value()));
    w.add(5.0);
    w.add(0.0);
    CHECK(is_pos_inf(w.value()));
    CHECK_FALSE(w.value() < 1e300);
  }
  SUBCASE("a NaN after finite values: becomes +inf and stays") {
    tt::WorstError w;
    w.add(1e-3);
    w.add(nan_d);
    w.add(2.0);
    CHECK(is_pos_inf(w.value()));
  }
  SUBCASE("+Inf and -Inf are +inf") {
    tt::WorstError a, b;
    a.add(inf_d);
    b.add(-inf_d);
    b.add(1.0);
    CHECK(is_pos_inf(a.value()));
    CHECK(is_pos_inf(b.value()));
  }
  SUBCASE("a float NaN is caught too") {
    tt::WorstError w;
    w.add(nan_f);
    CHECK(is_pos_inf(w.value()));
  }
}

TEST_CASE("compare: rel_error is |a - b| / |b|, |a - b| when b is 0, +inf on a non-finite side") {
  CHECK(tt::rel_error(1.5, 1.0) == doctest::Approx(0.5).epsilon(1e-15));
  CHECK(tt::rel_error(-3.0, -4.0) == doctest::Approx(0.25).epsilon(1e-15));
  CHECK(tt::rel_error(2.0, 2.0) == 0.0);
  CHECK(tt::rel_error(0.5, 0.0) == 0.5);   // b == 0: absolute
  CHECK(tt::rel_error(-0.5, 0.0) == 0.5);
  CHECK(tt::rel_error(0.0, 0.0) == 0.0);
  CHECK(tt::rel_error(0.0, 2.0) == 1.0);
  for (double bad : {nan_d, inf_d, -inf_d}) {
    CAPTURE(bad);
    CHECK(is_pos_inf(tt::rel_error(bad, 1.0)));
    CHECK(is_pos_inf(tt::rel_error(1.0, bad)));
    CHECK(is_pos_inf(tt::rel_error(bad, bad)));  // NaN vs NaN and Inf vs Inf are not "equal"
    CHECK(is_pos_inf(tt::rel_error(0.0, bad)));
    CHECK(is_pos_inf(tt::rel_error(bad, 0.0)));
  }
}

TEST_CASE("compare: max_abs_error is the largest |a_i - b_i|, +inf on a non-finite element or a size mismatch") {
  const std::vector<float> a{1.0f, -2.0f, 3.0f, 0.0f};
  const std::vector<float> b{1.0f, -2.5f, 3.25f, 0.0f};
  CHECK(tt::max_abs_error(sp(a), sp(b)) == 0.5);
  CHECK(tt::max_abs_error(sp(b), sp(a)) == 0.5);
  CHECK(tt::max_abs_error(sp(a), sp(a)) == 0.0);
  const std::vector<float> zeros(4, 0.0f);
  CHECK(tt::max_abs_error(sp(zeros), sp(zeros)) == 0.0);
  CHECK(tt::max_abs_error(sp(a), sp(zeros)) == 3.0);
  const std::vector<float> empty;
  CHECK(tt::max_abs_error(sp(empty), sp(empty)) == 0.0);
  // Mixed element types: float against double.
  const std::vector<double> bd{1.0, -2.0, 3.0, 0.125};
  CHECK(tt::max_abs_error(sp(a), sp(bd)) == 0.125);

  SUBCASE("size mismatch") {
    const std::vector<float> shorter{1.0f, -2.0f, 3.0f};
    CHECK(is_pos_inf(tt::max_abs_error(sp(a), sp(shorter))));
    CHECK(is_pos_inf(tt::max_abs_error(sp(shorter), sp(a))));
    CHECK(is_pos_inf(tt::max_abs_error(sp(empty), sp(a))));
  }
  SUBCASE("a non-finite element anywhere, on either side") {
    for (float bad : {nan_f, inf_f, -inf_f}) {
      for (std::size_t at = 0; at < a.size(); ++at) {
        CAPTURE(bad);
        CAPTURE(at);
        std::vector<float> x = a;
        x[at] = bad;
        CHECK(is_pos_inf(tt::max_abs_error(sp(x), sp(a))));
        CHECK(is_pos_inf(tt::max_abs_error(sp(a), sp(x))));
        CHECK(is_pos_inf(tt::max_abs_error(sp(x), sp(x))));  // identical garbage is still garbage
      }
    }
  }
  SUBCASE("all NaN") {
    const std::vector<float> nans(4, nan_f);
    CHECK(is_pos_inf(tt::max_abs_error(sp(nans), sp(a))));
    CHECK(is_pos_inf(tt::max_abs_error(sp(nans), sp(nans))));
  }
}

TEST_CASE("compare: max_rel_error is max|a_i - b_i| / max|b_i|, +inf on a non-finite element or a size mismatch") {
  const std::vector<double> b{2.0, -4.0, 1.0};
  const std::vector<double> a{2.0, -3.0, 1.5};
  // max diff 1.0 (at index 1), max |b| 4.0.
  CHECK(tt::max_rel_error(sp(a), sp(b)) == 0.25);
  // The scale is the reference's (second argument): max |a| is 3.0.
  CHECK(tt::max_rel_error(sp(b), sp(a)) == doctest::Approx(1.0 / 3.0).epsilon(1e-15));
  CHECK(tt::max_rel_error(sp(b), sp(b)) == 0.0);
  const std::vector<double> zeros(3, 0.0);
  CHECK(tt::max_rel_error(sp(zeros), sp(zeros)) == 0.0);
  CHECK(tt::max_rel_error(sp(a), sp(zeros)) == 3.0);  // reference all zeros: absolute
  CHECK(tt::max_rel_error(sp(zeros), sp(b)) == 1.0);
  const std::vector<double> empty;
  CHECK(tt::max_rel_error(sp(empty), sp(empty)) == 0.0);
  const std::vector<float> af{2.0f, -3.0f, 1.5f};
  CHECK(tt::max_rel_error(sp(af), sp(b)) == 0.25);

  SUBCASE("size mismatch") {
    const std::vector<double> longer{2.0, -4.0, 1.0, 0.0};
    CHECK(is_pos_inf(tt::max_rel_error(sp(b), sp(longer))));
    CHECK(is_pos_inf(tt::max_rel_error(sp(longer), sp(b))));
  }
  SUBCASE("a non-finite element anywhere, on either side") {
    for (double bad : {nan_d, inf_d, -inf_d}) {
      for (std::size_t at = 0; at < b.size(); ++at) {
        CAPTURE(bad);
        CAPTURE(at);
        std::vector<double> x = b;
        x[at] = bad;
        CHECK(is_pos_inf(tt::max_rel_error(sp(x), sp(b))));
        CHECK(is_pos_inf(tt::max_rel_error(sp(b), sp(x))));
        CHECK(is_pos_inf(tt::max_rel_error(sp(x), sp(x))));
        CHECK(is_pos_inf(tt::max_rel_error(sp(x), sp(zeros))));
      }
    }
  }
}

TEST_CASE("compare: norm_rel_error is ||a - b|| / max(||a||, ||b||), +inf on a non-finite element or a size mismatch") {
  const std::vector<double> a{3.0, 4.0};  // ||a|| = 5
  const std::vector<double> b{3.0, 0.0};  // ||b|| = 3, ||a - b|| = 4
  CHECK(tt::norm_rel_error(sp(a), sp(b)) == doctest::Approx(0.8).epsilon(1e-15));
  CHECK(tt::norm_rel_error(sp(b), sp(a)) == doctest::Approx(0.8).epsilon(1e-15));  // symmetric
  CHECK(tt::norm_rel_error(sp(a), sp(a)) == 0.0);
  const std::vector<double> zeros(2, 0.0);
  CHECK(tt::norm_rel_error(sp(zeros), sp(zeros)) == 0.0);
  CHECK(tt::norm_rel_error(sp(a), sp(zeros)) == 1.0);
  const std::vector<double> neg{-3.0, -4.0};
  CHECK(tt::norm_rel_error(sp(a), sp(neg)) == doctest::Approx(2.0).epsilon(1e-15));
  const std::vector<double> empty;
  CHECK(tt::norm_rel_error(sp(empty), sp(empty)) == 0.0);
  const std::vector<float> af{3.0f, 4.0f};
  CHECK(tt::norm_rel_error(sp(af), sp(b)) == doctest::Approx(0.8).epsilon(1e-15));

  SUBCASE("size mismatch") {
    const std::vector<double> one{3.0};
    CHECK(is_pos_inf(tt::norm_rel_error(sp(a), sp(one))));
    CHECK(is_pos_inf(tt::norm_rel_error(sp(one), sp(a))));
  }
  SUBCASE("a non-finite element anywhere, on either side") {
    for (double bad : {nan_d, inf_d, -inf_d}) {
      for (std::size_t at = 0; at < a.size(); ++at) {
        CAPTURE(bad);
        CAPTURE(at);
        std::vector<double> x = a;
        x[at] = bad;
        CHECK(is_pos_inf(tt::norm_rel_error(sp(x), sp(a))));
        CHECK(is_pos_inf(tt::norm_rel_error(sp(a), sp(x))));
        CHECK(is_pos_inf(tt::norm_rel_error(sp(x), sp(x))));
      }
    }
  }
  SUBCASE("finite values whose squares overflow are still compared") {
    const std::vector<double> big{1e200, 1e200};
    const std::vector<double> big_neg{-1e200, -1e200};
    CHECK(tt::norm_rel_error(sp(big), sp(big)) == 0.0);
    CHECK(tt::norm_rel_error(sp(big), sp(big_neg)) == doctest::Approx(2.0).epsilon(1e-12));
    const std::vector<double> big2{1e200, 2e200};
    CHECK(tt::norm_rel_error(sp(big), sp(big2)) == doctest::Approx(1.0 / std::sqrt(5.0)).epsilon(1e-12));
  }
  SUBCASE("finite values whose squares underflow are not called equal") {
    const std::vector<double> tiny{1e-200, 1e-200};
    const std::vector<double> tiny2{1e-200, 2e-200};
    CHECK(tt::norm_rel_error(sp(tiny), sp(tiny)) == 0.0);
    CHECK(tt::norm_rel_error(sp(tiny), sp(tiny2)) == doctest::Approx(1.0 / std::sqrt(5.0)).epsilon(1e-12));
  }
}

TEST_CASE("compare: bitwise_equal_finite wants the same bits and every value finite") {
  const std::vector<float> a{1.0f, -2.0f, 0.5f};
  std::vector<float> b = a;
  CHECK(tt::bitwise_equal_finite(sp(a), sp(b)));
  b[2] = std::nextafter(0.5f, 1.0f);  // one ulp off
  CHECK_FALSE(tt::bitwise_equal_finite(sp(a), sp(b)));
  const std::vector<float> empty;
  CHECK(tt::bitwise_equal_finite(sp(empty), sp(empty)));
  const std::vector<float> zeros(3, 0.0f);
  CHECK(tt::bitwise_equal_finite(sp(zeros), sp(zeros)));
  const std::vector<float> neg_zeros(3, -0.0f);
  CHECK_FALSE(tt::bitwise_equal_finite(sp(zeros), sp(neg_zeros)));  // bitwise: -0 is not +0
  const std::vector<std::int32_t> ia{1, 2, 3}, ib{1, 2, 4};
  CHECK(tt::bitwise_equal_finite(sp(ia), sp(ia)));
  CHECK_FALSE(tt::bitwise_equal_finite(sp(ia), sp(ib)));

  SUBCASE("size mismatch") {
    const std::vector<float> shorter{1.0f, -2.0f};
    CHECK_FALSE(tt::bitwise_equal_finite(sp(a), sp(shorter)));
    CHECK_FALSE(tt::bitwise_equal_finite(sp(shorter), sp(a)));
    CHECK_FALSE(tt::bitwise_equal_finite(sp(empty), sp(a)));
  }
  SUBCASE("identical NaN or infinite arrays are not equal") {
    for (float bad : {nan_f, inf_f, -inf_f}) {
      CAPTURE(bad);
      const std::vector<float> all_bad(3, bad);
      CHECK_FALSE(tt::bitwise_equal_finite(sp(all_bad), sp(all_bad)));
      std::vector<float> x = a;
      x[1] = bad;
      const std::vector<float> y = x;  // same bits, one non-finite element
      CHECK_FALSE(tt::bitwise_equal_finite(sp(x), sp(y)));
      CHECK_FALSE(tt::bitwise_equal_finite(sp(x), sp(a)));
      CHECK_FALSE(tt::bitwise_equal_finite(sp(a), sp(x)));
    }
  }
  SUBCASE("double") {
    const std::vector<double> d{1.0, nan_d};
    CHECK_FALSE(tt::bitwise_equal_finite(sp(d), sp(d)));
    const std::vector<double> e{1.0, 2.0};
    CHECK(tt::bitwise_equal_finite(sp(e), sp(e)));
  }
}

TEST_CASE("compare: all_finite is false for any NaN or infinity") {
  const std::vector<float> a{1.0f, -2.0f, 0.0f};
  CHECK(tt::all_finite(sp(a)));
  const std::vector<float> empty;
  CHECK(tt::all_finite(sp(empty)));
  CHECK(tt::all_finite(sp(std::vector<float>{std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                                            std::numeric_limits<float>::denorm_min()})));
  for (float bad : {nan_f, inf_f, -inf_f}) {
    for (std::size_t at = 0; at < a.size(); ++at) {
      CAPTURE(bad);
      CAPTURE(at);
      std::vector<float> x = a;
      x[at] = bad;
      CHECK_FALSE(tt::all_finite(sp(x)));
    }
  }
  const std::vector<double> d{0.0, inf_d};
  CHECK_FALSE(tt::all_finite(sp(d)));
  const std::vector<std::int64_t> ints{1, 2, 3};
  CHECK(tt::all_finite(sp(ints)));
}
