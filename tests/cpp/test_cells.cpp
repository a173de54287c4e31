// The float exp and tanh of csrc/cells/common.h (arithmetic-only, so that loops vectorise and the GPU runs
// the same code) against the C library in double: relative error within a few ulp over the whole range,
// the limits at +-inf and at the clamps, and NaN passed through. Also the sigmoid built on them.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "cells/common.h"
#include "check.h"

using conveyor::cells::cell_exp;
using conveyor::cells::cell_tanh;
using conveyor::cells::sigmoid;

namespace {

constexpr double kUlp = 1.0 / (1 << 23);  // float's epsilon: one ulp relative to the value

// Walks x over [lo, hi] in `steps` steps and returns the largest relative error of f against reference.
template <typename F, typename R>
double worst_relative_error(F f, R reference, double lo, double hi, int steps, double* where) {
  double worst = 0;
  for (int i = 0; i <= steps; ++i) {
    const float x = static_cast<float>(lo + (hi - lo) * i / steps);
    const double expected = reference(static_cast<double>(x));
    const double error = std::fabs(static_cast<double>(f(x)) - expected) / std::fabs(expected);
    if (!(error <= worst)) {
      worst = error;
      *where = x;
    }
  }
  return worst;
}

void check_error(const char* name, double worst, double where, double limit_ulps) {
  CHECK_MSG(worst <= limit_ulps * kUlp, std::string(name) + ": worst relative error " +
                                            std::to_string(worst / kUlp) + " ulp at x = " + std::to_string(where));
}

}  // namespace

int main() {
  double where = 0;
  const auto exp_ref = [](double x) { return std::exp(x); };
  const auto exp_f = [](float x) { return cell_exp(x); };
  check_error("exp", worst_relative_error(exp_f, exp_ref, -87.0, 88.0, 2000000, &where), where, 3);
  check_error("exp near 0", worst_relative_error(exp_f, exp_ref, -1e-3, 1e-3, 200000, &where), where, 2);

  const auto tanh_ref = [](double x) { return std::tanh(x); };
  const auto tanh_f = [](float x) { return cell_tanh(x); };
  check_error("tanh", worst_relative_error(tanh_f, tanh_ref, -9.0, 9.0, 2000000, &where), where, 4);
  check_error("tanh near 0", worst_relative_error(tanh_f, tanh_ref, -1e-3, 1e-3, 200001, &where), where, 2);
  check_error("tanh around the switch at 0.625",
              worst_relative_error(tanh_f, tanh_ref, 0.6, 0.65, 200000, &where), where, 4);

  const auto sigmoid_ref = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  const auto sigmoid_f = [](float x) { return sigmoid(x); };
  check_error("sigmoid", worst_relative_error(sigmoid_f, sigmoid_ref, -80.0, 30.0, 2000000, &where), where, 4);

  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(cell_exp(nan)));
  CHECK(std::isnan(cell_tanh(nan)));
  CHECK(std::isnan(sigmoid(nan)));
  CHECK(cell_tanh(inf) == 1.0f);
  CHECK(cell_tanh(-inf) == -1.0f);
  CHECK(cell_tanh(30.0f) == 1.0f);
  CHECK(cell_tanh(0.0f) == 0.0f);
  CHECK(sigmoid(inf) == 1.0f);
  CHECK(sigmoid(-inf) >= 0.0f && sigmoid(-inf) < 1e-37f);
  CHECK(sigmoid(0.0f) == 0.5f);
  // Beyond the clamps exp saturates at finite values rather than overflowing or flushing to 0.
  CHECK(std::isfinite(cell_exp(inf)) && cell_exp(inf) > 1e38f);
  CHECK(cell_exp(-inf) > 0.0f && cell_exp(-inf) < 1e-37f);
  CHECK(cell_exp(0.0f) == 1.0f);
  return conveyor_test::report();
}
