// Checks the public C++ API (conveyor/conveyor.h) on the CPU in float64, through that header only.
//
// For each cell (LSTM; GRU with reset_after true and false; RNN with tanh and relu), at small sizes:
//   - every gradient backward() returns (dx, dh0, dc0, dW, dR, dbW, dbR) against central finite differences
//     of L = sum(y * dy) + sum(h_T * dh_T) (+ sum(c_T * dc_T) for the LSTM), where L is recomputed by
//     forward() in inference mode (no cache);
//   - every output is poisoned with NaN before each call, so an element the call forgets to write shows up;
//   - forward with h0 / c0 absent equals forward from zero states; h_T equals y[T-1]; dh_T / dc_T absent
//     equal zeros; accumulate = true adds the fresh gradient to what the parameter gradients held.
// Then: an LSTM with a projection, and with every regulariser at once (layer norm, zoneout, DropConnect), the
// same finite-difference checks of every gradient including dW_hr and the layer-norm gains'; bad arguments
// throw ArgumentError / DTypeError naming the argument; the backend queries; the thread pool size
// (set_num_threads(0) throws; one and two threads give bitwise identical results).
#include <conveyor/conveyor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"

namespace {

using namespace conveyor;
using Vec = std::vector<double>;

const double kNaN = std::numeric_limits<double>::quiet_NaN();

TensorView view(Vec& v, std::initializer_list<int64_t> shape) {
  return TensorView::contiguous(v.data(), DType::float64, shape);
}
TensorView view(const Vec& v, std::initializer_list<int64_t> shape) {
  return view(const_cast<Vec&>(v), shape);
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6e", v);
  return buf;
}

bool all_finite(const Vec& v) {
  for (double e : v) {
    if (!std::isfinite(e)) return false;
  }
  return true;
}

bool bitwise_equal(const Vec& a, const Vec& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

// ---------------------------------------------------------------------------------------------------------
// One problem: a cell, the sizes of one window, its inputs and the loss weights dy, dh_T, dc_T.

struct Problem {
  std::string name;
  CellOptions options;
  int64_t T = 0, B = 0, I = 0, H = 0, G = 0, C = 0;  // C: cache_width
  Vec x, W, R, bW, bR, h0, c0;                       // forward's inputs
  Vec dy, dh_T, dc_T;                                // the loss weights
  std::vector<int64_t> lengths;                      // [B], or empty: every row runs all T steps

  bool lstm() const { return options.cell == CellType::lstm; }
};

Problem make_problem(const std::string& name, CellOptions options, uint32_t seed, int64_t T = 3, int64_t B = 2,
                     int64_t I = 3, int64_t H = 4) {
  Problem p;
  p.name = name;
  p.options = options;
  p.T = T, p.B = B, p.I = I, p.H = H;
  p.G = gate_count(options);
  p.C = cache_width(options);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  auto fill = [&](Vec& v, size_t n, double scale) {
    v.resize(n);
    for (double& e : v) e = scale * uniform(rng);
  };
  const size_t GH = static_cast<size_t>(p.G * H);
  fill(p.x, static_cast<size_t>(T * B * I), 1.0);
  fill(p.W, GH * static_cast<size_t>(I), 0.6);
  fill(p.R, GH * static_cast<size_t>(H), 0.6);
  fill(p.bW, GH, 0.3);
  fill(p.bR, GH, 0.3);
  fill(p.h0, static_cast<size_t>(B * H), 0.8);
  if (p.lstm()) fill(p.c0, static_cast<size_t>(B * H), 0.8);
  fill(p.dy, static_cast<size_t>(T * B * H), 1.0);
  fill(p.dh_T, static_cast<size_t>(B * H), 1.0);
  if (p.lstm()) fill(p.dc_T, static_cast<size_t>(B * H), 1.0);
  return p;
}

struct ForwardOut {
  Vec y, h_T, c_T, cache;
};

// Runs forward() with every output poisoned with NaN. with_cache = false is inference mode (cache absent).
ForwardOut run_forward(const Problem& p, bool with_cache, bool with_h0 = true, bool with_c0 = true) {
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, GH = p.G * p.H;
  ForwardOut out;
  out.y.assign(static_cast<size_t>(T * B * H), kNaN);
  out.h_T.assign(static_cast<size_t>(B * H), kNaN);
  if (p.lstm()) out.c_T.assign(static_cast<size_t>(B * H), kNaN);
  if (with_cache) out.cache.assign(static_cast<size_t>(T * B * p.C * H), kNaN);

  ForwardArgs a;
  a.x = view(p.x, {T, B, I});
  a.W = view(p.W, {GH, I});
  a.R = view(p.R, {GH, H});
  a.bW = view(p.bW, {GH});
  a.bR = view(p.bR, {GH});
  if (with_h0) a.h0 = view(p.h0, {B, H});
  if (p.lstm() && with_c0) a.c0 = view(p.c0, {B, H});
  a.y = view(out.y, {T, B, H});
  a.h_T = view(out.h_T, {B, H});
  if (p.lstm()) a.c_T = view(out.c_T, {B, H});
  if (with_cache && p.C > 0) a.cache = view(out.cache, {T, B, p.C * H});
  if (!p.lengths.empty()) a.lengths = TensorView::contiguous(const_cast<int64_t*>(p.lengths.data()), DType::int64, {B});
  forward(p.options, a);
  return out;
}

struct Grads {
  Vec dx, dh0, dc0, dW, dR, dbW, dbR;
};

// Runs backward() after `f` (a forward with cache). Outputs are poisoned with NaN, except the parameter
// gradients when `prefill` is given: then they start from *prefill and `accumulate` is passed through.
Grads run_backward(const Problem& p, const ForwardOut& f, bool with_dh_T = true, bool with_dc_T = true,
                   bool accumulate = false, const Grads* prefill = nullptr) {
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, GH = p.G * p.H;
  Grads g;
  g.dx.assign(static_cast<size_t>(T * B * I), kNaN);
  g.dh0.assign(static_cast<size_t>(B * H), kNaN);
  if (p.lstm()) g.dc0.assign(static_cast<size_t>(B * H), kNaN);
  if (prefill) {
    g.dW = prefill->dW, g.dR = prefill->dR, g.dbW = prefill->dbW, g.dbR = prefill->dbR;
  } else {
    g.dW.assign(static_cast<size_t>(GH * I), kNaN);
    g.dR.assign(static_cast<size_t>(GH * H), kNaN);
    g.dbW.assign(static_cast<size_t>(GH), kNaN);
    g.dbR.assign(static_cast<size_t>(GH), kNaN);
  }

  BackwardArgs a;
  a.x = view(p.x, {T, B, I});
  a.W = view(p.W, {GH, I});
  a.R = view(p.R, {GH, H});
  a.h0 = view(p.h0, {B, H});
  if (p.lstm()) a.c0 = view(p.c0, {B, H});
  a.y = view(f.y, {T, B, H});
  if (p.C > 0) a.cache = view(f.cache, {T, B, p.C * H});
  a.dy = view(p.dy, {T, B, H});
  if (with_dh_T) a.dh_T = view(p.dh_T, {B, H});
  if (p.lstm() && with_dc_T) a.dc_T = view(p.dc_T, {B, H});
  a.dx = view(g.dx, {T, B, I});
  a.dh0 = view(g.dh0, {B, H});
  if (p.lstm()) a.dc0 = view(g.dc0, {B, H});
  a.dW = view(g.dW, {GH, I});
  a.dR = view(g.dR, {GH, H});
  a.dbW = view(g.dbW, {GH});
  a.dbR = view(g.dbR, {GH});
  a.accumulate = accumulate;
  if (!p.lengths.empty()) a.lengths = TensorView::contiguous(const_cast<int64_t*>(p.lengths.data()), DType::int64, {B});
  backward(p.options, a);
  return g;
}

// L = sum(y * dy) + sum(h_T * dh_T) (+ sum(c_T * dc_T)), by an inference-mode forward.
double loss(const Problem& p) {
  const ForwardOut f = run_forward(p, false);
  double L = 0;
  for (size_t i = 0; i < f.y.size(); ++i) L += f.y[i] * p.dy[i];
  for (size_t i = 0; i < f.h_T.size(); ++i) L += f.h_T[i] * p.dh_T[i];
  for (size_t i = 0; i < f.c_T.size(); ++i) L += f.c_T[i] * p.dc_T[i];
  return L;
}

// Compares one analytic gradient with central differences of the loss, element by element.
void check_gradient(const Problem& p, Vec Problem::*input, const Vec& analytic, const char* name) {
  const double eps = 1e-6, atol = 1e-7, rtol = 1e-5;
  Problem q = p;
  Vec& v = q.*input;
  int bad = 0;
  double worst = 0;
  std::string first;
  if (analytic.size() != v.size()) {
    CHECK_MSG(false, p.name + ": " + name + " has " + std::to_string(analytic.size()) + " elements, expected " +
                         std::to_string(v.size()));
    return;
  }
  for (size_t i = 0; i < v.size(); ++i) {
    const double saved = v[i];
    v[i] = saved + eps;
    const double plus = loss(q);
    v[i] = saved - eps;
    const double minus = loss(q);
    v[i] = saved;
    const double numeric = (plus - minus) / (2 * eps);
    const double err = std::fabs(analytic[i] - numeric);
    if (!(err <= worst)) worst = err;  // keeps a NaN
    if (!conveyor_test::near(analytic[i], numeric, atol, rtol)) {
      if (bad++ == 0) {
        first = "[" + std::to_string(i) + "] analytic " + num(analytic[i]) + " vs numeric " + num(numeric);
      }
    }
  }
  CHECK_MSG(bad == 0, p.name + ": " + name + " vs finite differences: " + std::to_string(bad) + " of " +
                          std::to_string(v.size()) + " elements off (largest error " + num(worst) +
                          "); first: " + first);
}

void check_cell(const Problem& p) {
  // Forward, training mode: every output written, h_T == y[T-1].
  const ForwardOut f = run_forward(p, true);
  CHECK_MSG(all_finite(f.y) && all_finite(f.h_T) && all_finite(f.c_T), p.name + ": forward left NaN in y/h_T/c_T");
  CHECK_MSG(all_finite(f.cache), p.name + ": forward left NaN in the cache");
  const size_t BH = static_cast<size_t>(p.B * p.H);
  CHECK_MSG(bitwise_equal(f.h_T, Vec(f.y.end() - static_cast<std::ptrdiff_t>(BH), f.y.end())),
            p.name + ": h_T differs from y[T-1]");

  // Inference mode gives the same outputs as training mode.
  const ForwardOut inference = run_forward(p, false);
  CHECK_MSG(bitwise_equal(inference.y, f.y) && bitwise_equal(inference.h_T, f.h_T) &&
                bitwise_equal(inference.c_T, f.c_T),
            p.name + ": forward without cache differs from forward with cache");

  // Absent h0 / c0 are zeros.
  {
    Problem zero = p;
    std::fill(zero.h0.begin(), zero.h0.end(), 0.0);
    std::fill(zero.c0.begin(), zero.c0.end(), 0.0);
    const ForwardOut from_zero = run_forward(zero, true);
    const ForwardOut absent = run_forward(p, true, false, false);
    CHECK_MSG(bitwise_equal(absent.y, from_zero.y) && bitwise_equal(absent.h_T, from_zero.h_T) &&
                  bitwise_equal(absent.c_T, from_zero.c_T),
              p.name + ": forward with h0/c0 absent differs from forward with zero h0/c0");
    if (p.lstm()) {
      // Only h0 absent (c0 given), and only c0 absent (h0 given).
      Problem zero_h = p, zero_c = p;
      std::fill(zero_h.h0.begin(), zero_h.h0.end(), 0.0);
      std::fill(zero_c.c0.begin(), zero_c.c0.end(), 0.0);
      CHECK_MSG(bitwise_equal(run_forward(p, false, false, true).y, run_forward(zero_h, false).y),
                p.name + ": forward with h0 absent (c0 given) differs from zero h0");
      CHECK_MSG(bitwise_equal(run_forward(p, false, true, false).y, run_forward(zero_c, false).y),
                p.name + ": forward with c0 absent (h0 given) differs from zero c0");
    }
  }

  // Backward: every gradient written and equal to finite differences.
  const Grads g = run_backward(p, f);
  CHECK_MSG(all_finite(g.dx) && all_finite(g.dh0) && all_finite(g.dc0) && all_finite(g.dW) && all_finite(g.dR) &&
                all_finite(g.dbW) && all_finite(g.dbR),
            p.name + ": backward left NaN in a gradient");
  check_gradient(p, &Problem::x, g.dx, "dx");
  check_gradient(p, &Problem::h0, g.dh0, "dh0");
  if (p.lstm()) check_gradient(p, &Problem::c0, g.dc0, "dc0");
  check_gradient(p, &Problem::W, g.dW, "dW");
  check_gradient(p, &Problem::R, g.dR, "dR");
  check_gradient(p, &Problem::bW, g.dbW, "dbW");
  check_gradient(p, &Problem::bR, g.dbR, "dbR");

  // dh_T / dc_T absent are zeros.
  {
    Problem zero = p;
    std::fill(zero.dh_T.begin(), zero.dh_T.end(), 0.0);
    std::fill(zero.dc_T.begin(), zero.dc_T.end(), 0.0);
    const Grads from_zero = run_backward(zero, f);
    const Grads absent = run_backward(p, f, false, false);
    const bool same = bitwise_equal(absent.dx, from_zero.dx) && bitwise_equal(absent.dh0, from_zero.dh0) &&
                      bitwise_equal(absent.dc0, from_zero.dc0) && bitwise_equal(absent.dW, from_zero.dW) &&
                      bitwise_equal(absent.dR, from_zero.dR) && bitwise_equal(absent.dbW, from_zero.dbW) &&
                      bitwise_equal(absent.dbR, from_zero.dbR);
    CHECK_MSG(same, p.name + ": backward with dh_T/dc_T absent differs from zero dh_T/dc_T");
  }

  // accumulate = true: parameter gradients = prefill + fresh gradient; other gradients written as usual.
  {
    Grads prefill;
    std::mt19937 rng(77);
    std::uniform_real_distribution<double> uniform(-2.0, 2.0);
    auto random_like = [&](const Vec& v) {
      Vec r(v.size());
      for (double& e : r) e = uniform(rng);
      return r;
    };
    prefill.dW = random_like(g.dW), prefill.dR = random_like(g.dR);
    prefill.dbW = random_like(g.dbW), prefill.dbR = random_like(g.dbR);
    const Grads acc = run_backward(p, f, true, true, true, &prefill);
    auto sum_matches = [](const Vec& got, const Vec& pre, const Vec& fresh) {
      if (got.size() != fresh.size()) return false;
      for (size_t i = 0; i < got.size(); ++i) {
        if (!conveyor_test::near(got[i], pre[i] + fresh[i], 1e-13, 1e-13)) return false;
      }
      return true;
    };
    CHECK_MSG(sum_matches(acc.dW, prefill.dW, g.dW), p.name + ": accumulate: dW != prefill + fresh dW");
    CHECK_MSG(sum_matches(acc.dR, prefill.dR, g.dR), p.name + ": accumulate: dR != prefill + fresh dR");
    CHECK_MSG(sum_matches(acc.dbW, prefill.dbW, g.dbW), p.name + ": accumulate: dbW != prefill + fresh dbW");
    CHECK_MSG(sum_matches(acc.dbR, prefill.dbR, g.dbR), p.name + ": accumulate: dbR != prefill + fresh dbR");
    CHECK_MSG(bitwise_equal(acc.dx, g.dx) && bitwise_equal(acc.dh0, g.dh0) && bitwise_equal(acc.dc0, g.dc0),
              p.name + ": accumulate changed dx/dh0/dc0");
  }
}

std::vector<Problem> all_cells(uint32_t seed, int64_t T, int64_t B, int64_t I, int64_t H) {
  CellOptions lstm, gru_after, gru_before, rnn_tanh, rnn_relu;
  lstm.cell = CellType::lstm;
  gru_after.cell = CellType::gru;
  gru_after.reset_after = true;
  gru_before.cell = CellType::gru;
  gru_before.reset_after = false;
  rnn_tanh.cell = CellType::rnn;
  rnn_tanh.activation = Activation::tanh;
  rnn_relu.cell = CellType::rnn;
  rnn_relu.activation = Activation::relu;
  return {make_problem("lstm", lstm, seed + 1, T, B, I, H),
          make_problem("gru(reset_after=true)", gru_after, seed + 2, T, B, I, H),
          make_problem("gru(reset_after=false)", gru_before, seed + 3, T, B, I, H),
          make_problem("rnn(tanh)", rnn_tanh, seed + 4, T, B, I, H),
          make_problem("rnn(relu)", rnn_relu, seed + 5, T, B, I, H)};
}

// ---------------------------------------------------------------------------------------------------------
// Bad arguments

void check_errors() {
  Problem p = all_cells(500, 3, 2, 3, 4)[0];  // LSTM
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, GH = p.G * p.H;
  Vec y(static_cast<size_t>(T * B * H)), h_T(static_cast<size_t>(B * H)), c_T(static_cast<size_t>(B * H));
  ForwardArgs good;
  good.x = view(p.x, {T, B, I});
  good.W = view(p.W, {GH, I});
  good.R = view(p.R, {GH, H});
  good.bW = view(p.bW, {GH});
  good.bR = view(p.bR, {GH});
  good.h0 = view(p.h0, {B, H});
  good.c0 = view(p.c0, {B, H});
  good.y = view(y, {T, B, H});
  good.h_T = view(h_T, {B, H});
  good.c_T = view(c_T, {B, H});
  const CellOptions lstm = p.options;
  CellOptions gru;
  gru.cell = CellType::gru;

  forward(lstm, good);  // the unmodified arguments are accepted
  CHECK(all_finite(y));

  {
    ForwardArgs a = good;
    a.x = view(p.x, {T * B, I});
    CHECK_THROWS(forward(lstm, a), ArgumentError, "x:");
  }
  {
    Vec big(static_cast<size_t>(GH * (I + 1)));
    ForwardArgs a = good;
    a.W = view(big, {GH, I + 1});
    CHECK_THROWS(forward(lstm, a), ArgumentError, "W:");
    a.W = view(big, {GH - 1, I});
    CHECK_THROWS(forward(lstm, a), ArgumentError, "W:");
  }
  {
    std::vector<float> h0f(static_cast<size_t>(B * H), 0.0f);
    ForwardArgs a = good;
    a.h0 = TensorView::contiguous(h0f.data(), DType::float32, {B, H});
    CHECK_THROWS(forward(lstm, a), DTypeError, "h0:");
  }
  {
    // W's strides set as for its transpose: the right shape, but not C-contiguous.
    ForwardArgs a = good;
    a.W.strides[0] = 1;
    a.W.strides[1] = GH;
    CHECK_THROWS(forward(lstm, a), ArgumentError, "contiguous");
    CHECK_THROWS(forward(lstm, a), ArgumentError, "W:");
    // An output with a gap between rows.
    ForwardArgs b = good;
    b.h_T.strides[0] = H + 1;
    CHECK_THROWS(forward(lstm, b), ArgumentError, "contiguous");
  }
  {
    // A GRU with the LSTM's c0: G = 3 needs W/R of 3H rows.
    Problem q = all_cells(600, 3, 2, 3, 4)[1];
    Vec c0(static_cast<size_t>(B * H), 0.0), yq(static_cast<size_t>(T * B * H));
    ForwardArgs a;
    a.x = view(q.x, {T, B, I});
    a.W = view(q.W, {3 * H, I});
    a.R = view(q.R, {3 * H, H});
    a.y = view(yq, {T, B, H});
    forward(gru, a);  // accepted without c0
    a.c0 = view(c0, {B, H});
    CHECK_THROWS(forward(gru, a), ArgumentError, "c0:");
  }
  {
    // Every view on a CUDA device: refused when no CUDA backend is built. Any build refuses one view on a
    // device other than x's.
    if (!cuda_built()) {
      ForwardArgs a = good;
      for (TensorView* v : {&a.x, &a.W, &a.R, &a.bW, &a.bR, &a.h0, &a.c0, &a.y, &a.h_T, &a.c_T}) {
        v->device = Device{DeviceKind::cuda, 0};
      }
      CHECK_THROWS(forward(lstm, a), ArgumentError, "cuda:0");
    }
    ForwardArgs b = good;
    b.h0.device = Device{DeviceKind::cuda, 0};
    CHECK_THROWS(forward(lstm, b), ArgumentError, "h0:");
  }
  {
    // Missing required arguments.
    ForwardArgs a = good;
    a.y = TensorView{};
    CHECK_THROWS(forward(lstm, a), ArgumentError, "y:");
    ForwardArgs b = good;
    b.x = TensorView{};
    CHECK_THROWS(forward(lstm, b), ArgumentError, "x:");
  }
  {
    // Backward: the LSTM needs the cache; a gradient of the wrong shape is named.
    const ForwardOut f = run_forward(p, true);
    Vec dW(static_cast<size_t>(GH * I));
    BackwardArgs a;
    a.x = view(p.x, {T, B, I});
    a.W = view(p.W, {GH, I});
    a.R = view(p.R, {GH, H});
    a.h0 = view(p.h0, {B, H});
    a.c0 = view(p.c0, {B, H});
    a.y = view(f.y, {T, B, H});
    a.dy = view(p.dy, {T, B, H});
    a.dW = view(dW, {GH, I});
    BackwardArgs no_cache = a;
    CHECK_THROWS(backward(lstm, no_cache), ArgumentError, "cache:");
    a.cache = view(f.cache, {T, B, p.C * H});
    backward(lstm, a);  // accepted
    CHECK(all_finite(dW));
    BackwardArgs bad_dW = a;
    bad_dW.dW = view(dW, {GH, I - 1});
    CHECK_THROWS(backward(lstm, bad_dW), ArgumentError, "dW:");
    BackwardArgs bad_dy = a;
    std::vector<float> dyf(p.dy.size());
    bad_dy.dy = TensorView::contiguous(dyf.data(), DType::float32, {T, B, H});
    CHECK_THROWS(backward(lstm, bad_dy), DTypeError, "dy:");
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backends and threads

void check_backends() {
  CHECK(cuda_device_count() >= 0);
  if (!cuda_built()) {
    CHECK(!cuda_available());
    CHECK(cuda_device_count() == 0);
  }
  CHECK(std::string(version()).find('.') != std::string::npos);
}

void check_threads() {
  const int original = num_threads();
  CHECK(original >= 1);
  CHECK_THROWS(set_num_threads(0), ArgumentError, "");
  CHECK_THROWS(set_num_threads(-3), ArgumentError, "");
  CHECK(num_threads() == original);  // a refused size leaves the pool as it was

  // Sizes large enough that the products and the per-row cell math are split over the workers.
  for (const Problem& p : all_cells(900, 5, 48, 64, 96)) {
    set_num_threads(1);
    CHECK(num_threads() == 1);
    const ForwardOut f1 = run_forward(p, true);
    const Grads g1 = run_backward(p, f1);
    set_num_threads(2);
    CHECK(num_threads() == 2);
    const ForwardOut f2 = run_forward(p, true);
    const Grads g2 = run_backward(p, f2);
    CHECK_MSG(bitwise_equal(f1.y, f2.y) && bitwise_equal(f1.h_T, f2.h_T) && bitwise_equal(f1.c_T, f2.c_T) &&
                  bitwise_equal(f1.cache, f2.cache),
              p.name + ": forward with 1 and 2 threads differ");
    CHECK_MSG(bitwise_equal(g1.dx, g2.dx) && bitwise_equal(g1.dh0, g2.dh0) && bitwise_equal(g1.dc0, g2.dc0) &&
                  bitwise_equal(g1.dW, g2.dW) && bitwise_equal(g1.dR, g2.dR) && bitwise_equal(g1.dbW, g2.dbW) &&
                  bitwise_equal(g1.dbR, g2.dbR),
              p.name + ": backward with 1 and 2 threads differ");
  }
  set_num_threads(original);
}

// Row b's first `steps` steps of v [steps or more, batch, width] (a [batch, width] state: steps = 1).
Vec row_steps(const Vec& v, int64_t batch, int64_t width, int64_t b, int64_t steps) {
  Vec out;
  for (int64_t t = 0; t < steps; ++t) {
    const auto first = v.begin() + static_cast<std::ptrdiff_t>((t * batch + b) * width);
    out.insert(out.end(), first, first + static_cast<std::ptrdiff_t>(width));
  }
  return out;
}

// Row b of `p`, alone (B = 1) on its first `steps` steps.
Problem row_of(const Problem& p, int64_t b, int64_t steps) {
  Problem r = p;
  r.T = steps;
  r.B = 1;
  r.lengths.clear();
  r.x = row_steps(p.x, p.B, p.I, b, steps);
  r.dy = row_steps(p.dy, p.B, p.H, b, steps);
  r.h0 = row_steps(p.h0, p.B, p.H, b, 1);
  r.dh_T = row_steps(p.dh_T, p.B, p.H, b, 1);
  if (p.lstm()) {
    r.c0 = row_steps(p.c0, p.B, p.H, b, 1);
    r.dc_T = row_steps(p.dc_T, p.B, p.H, b, 1);
  }
  return r;
}

bool close(const Vec& a, const Vec& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!(std::fabs(a[i] - b[i]) <= 1e-12 + 1e-10 * std::fabs(b[i]))) return false;
  }
  return true;
}

// lengths: each row's outputs, final states and gradients are those of the row run alone on its own steps,
// y and dx are 0 past them (and dy there, NaN, is never read); the parameter gradients sum over the rows.
void check_lengths(Problem p) {
  const int64_t T = p.T, B = p.B, H = p.H, I = p.I;
  p.lengths = {2, T, 1};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = p.lengths[b]; t < T; ++t) {
      for (int64_t j = 0; j < H; ++j) p.dy[(t * B + b) * H + j] = kNaN;
    }
  }
  const ForwardOut f = run_forward(p, true);
  const Grads g = run_backward(p, f);
  Vec dW(g.dW.size(), 0.0), dR(g.dR.size(), 0.0);
  bool rows_match = true, zero_past = true;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = p.lengths[b];
    const Problem r = row_of(p, b, n);
    const ForwardOut rf = run_forward(r, true);
    const Grads rg = run_backward(r, rf);
    rows_match = rows_match && close(row_steps(f.y, B, H, b, n), rf.y) && close(row_steps(g.dx, B, I, b, n), rg.dx) &&
                 close(row_steps(f.h_T, B, H, b, 1), rf.h_T) && close(row_steps(g.dh0, B, H, b, 1), rg.dh0);
    if (p.lstm()) {
      rows_match = rows_match && close(row_steps(f.c_T, B, H, b, 1), rf.c_T) &&
                   close(row_steps(g.dc0, B, H, b, 1), rg.dc0);
    }
    for (int64_t t = n; t < T; ++t) {
      for (int64_t j = 0; j < H; ++j) zero_past = zero_past && f.y[(t * B + b) * H + j] == 0.0;
      for (int64_t j = 0; j < I; ++j) zero_past = zero_past && g.dx[(t * B + b) * I + j] == 0.0;
    }
    for (size_t k = 0; k < dW.size(); ++k) dW[k] += rg.dW[k];
    for (size_t k = 0; k < dR.size(); ++k) dR[k] += rg.dR[k];
  }
  CHECK_MSG(rows_match, p.name + ": lengths: a row differs from the row run alone");
  CHECK_MSG(zero_past, p.name + ": lengths: y or dx nonzero past a row's length");
  CHECK_MSG(close(g.dW, dW) && close(g.dR, dR), p.name + ": lengths: dW or dR is not the sum over the rows");

  const int64_t GH = p.G * H;
  Vec y(static_cast<size_t>(T * B * H));
  ForwardArgs a;
  a.x = view(p.x, {T, B, I});
  a.W = view(p.W, {GH, I});
  a.R = view(p.R, {GH, H});
  a.y = view(y, {T, B, H});
  std::vector<int64_t> bad = {1, T + 1, 2};
  a.lengths = TensorView::contiguous(bad.data(), DType::int64, {B});
  CHECK_THROWS(forward(p.options, a), ArgumentError,
               "lengths: expected every length in [1, T] = [1, " + std::to_string(T) + "], got lengths[1] = " +
                   std::to_string(T + 1));
  Vec as_float = {1.0, 2.0, 1.0};
  a.lengths = view(as_float, {B});
  CHECK_THROWS(forward(p.options, a), DTypeError, "lengths: expected dtype int32 or int64, got float64");
  std::vector<int32_t> short_lengths = {1, 2};
  a.lengths = TensorView::contiguous(short_lengths.data(), DType::int32, {2});
  CHECK_THROWS(forward(p.options, a), ArgumentError, "lengths: expected shape (3,) [B], got (2,)");
}

// ForwardArgs::packed: the same window with x, y, dy and dx packed as a PackedSequence's data (rows sorted
// longest first) gives the padded window's numbers, row for row.
void check_packed(Problem p) {
  const int64_t T = p.T, B = p.B, H = p.H, I = p.I, GH = p.G * H;
  p.lengths = {T, 2, 1};
  const ForwardOut f = run_forward(p, true);
  const Grads g = run_backward(p, f);
  auto pack = [&](const Vec& v, int64_t width) {
    Vec out;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t b = 0; b < B && p.lengths[b] > t; ++b) {
        const auto first = v.begin() + static_cast<std::ptrdiff_t>((t * B + b) * width);
        out.insert(out.end(), first, first + static_cast<std::ptrdiff_t>(width));
      }
    }
    return out;
  };
  const Vec x = pack(p.x, I), dy = pack(p.dy, H);
  const int64_t tokens = static_cast<int64_t>(x.size()) / I;
  Vec y(static_cast<size_t>(tokens * H), kNaN), h_T(static_cast<size_t>(B * H), kNaN);
  Vec cache(static_cast<size_t>(tokens * p.C * H), kNaN), c_T(p.lstm() ? static_cast<size_t>(B * H) : 0, kNaN);
  ForwardArgs a;
  a.x = view(x, {tokens, I});
  a.W = view(p.W, {GH, I});
  a.R = view(p.R, {GH, H});
  a.bW = view(p.bW, {GH});
  a.bR = view(p.bR, {GH});
  a.h0 = view(p.h0, {B, H});
  if (p.lstm()) a.c0 = view(p.c0, {B, H});
  a.lengths = TensorView::contiguous(p.lengths.data(), DType::int64, {B});
  a.packed = true;
  a.y = view(y, {tokens, H});
  a.h_T = view(h_T, {B, H});
  if (p.lstm()) a.c_T = view(c_T, {B, H});
  if (p.C > 0) a.cache = view(cache, {tokens, p.C * H});
  forward(p.options, a);
  BackwardArgs b = backward_args_for(a);
  Vec dx(static_cast<size_t>(tokens * I), kNaN), dW(static_cast<size_t>(GH * I), kNaN);
  b.dy = view(dy, {tokens, H});
  b.dh_T = view(p.dh_T, {B, H});
  if (p.lstm()) b.dc_T = view(p.dc_T, {B, H});
  b.dx = view(dx, {tokens, I});
  b.dW = view(dW, {GH, I});
  backward(p.options, b);
  CHECK_MSG(close(y, pack(f.y, H)) && close(h_T, f.h_T) && (!p.lstm() || close(c_T, f.c_T)),
            p.name + ": packed forward differs from the padded one");
  CHECK_MSG(close(dx, pack(g.dx, I)) && close(dW, g.dW), p.name + ": packed backward differs from the padded one");

  std::vector<int64_t> unsorted = {2, T, 1};
  a.lengths = TensorView::contiguous(unsorted.data(), DType::int64, {B});
  CHECK_THROWS(forward(p.options, a), ArgumentError,
               "lengths: packed arrays need lengths >= 1 in non-increasing order");
}

// An LSTM with peepholes and a projection (W_hr [P, H], LSTMP), and with `options`' regularisers (layer norm:
// the gains among the inputs; zoneout and DropConnect sampled from the seed, the same in every call): every
// gradient, dW_hr and the gains' included, against central differences of the loss; outputs poisoned; h and y
// of P units, c of H. Returns the forward's arguments and a backward's, for the refusals.
std::pair<ForwardArgs, BackwardArgs> check_lstm_gradients(const std::string& name, CellOptions options,
                                                           uint32_t seed) {
  static const int64_t T = 3, B = 2, I = 3, H = 4, P = 2, GH = 4 * H;
  const int64_t C = cache_width(options) * H;
  options.peephole = true;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  auto draw = [&](int64_t n, double scale) {
    Vec v(static_cast<size_t>(n));
    for (double& e : v) e = scale * uniform(rng);
    return v;
  };
  struct Inputs {
    Vec x, W, R, bW, bR, h0, c0, peephole, W_hr, gamma_x, gamma_h, gamma_c, beta_c;
  };
  static Inputs in;  // kept alive for the views returned
  in = {draw(T * B * I, 1.0), draw(GH * I, 0.6), draw(GH * P, 0.6), draw(GH, 0.3), draw(GH, 0.3),
        draw(B * P, 0.8), draw(B * H, 0.8), draw(3 * H, 0.5), draw(P * H, 0.7), draw(GH, 0.3), draw(GH, 0.3),
        draw(H, 0.3), draw(H, 0.3)};
  for (Vec* gain : {&in.gamma_x, &in.gamma_h, &in.gamma_c}) {
    for (double& e : *gain) e += 1.0;  // around their initial value 1
  }
  static Vec dy, dh_T, dc_T;
  dy = draw(T * B * P, 1.0), dh_T = draw(B * P, 1.0), dc_T = draw(B * H, 1.0);
  auto forward_args = [&](const Inputs& v, Vec& y, Vec& h_T, Vec& c_T, Vec* cache) {
    y.assign(static_cast<size_t>(T * B * P), kNaN);
    h_T.assign(static_cast<size_t>(B * P), kNaN);
    c_T.assign(static_cast<size_t>(B * H), kNaN);
    ForwardArgs a;
    a.x = view(v.x, {T, B, I});
    a.W = view(v.W, {GH, I});
    a.R = view(v.R, {GH, P});
    a.bW = view(v.bW, {GH});
    a.bR = view(v.bR, {GH});
    a.h0 = view(v.h0, {B, P});
    a.c0 = view(v.c0, {B, H});
    a.P = view(v.peephole, {3, H});
    a.W_hr = view(v.W_hr, {P, H});
    if (options.layer_norm) {
      a.gamma_x = view(v.gamma_x, {GH});
      a.gamma_h = view(v.gamma_h, {GH});
      a.gamma_c = view(v.gamma_c, {H});
      a.beta_c = view(v.beta_c, {H});
    }
    a.y = view(y, {T, B, P});
    a.h_T = view(h_T, {B, P});
    a.c_T = view(c_T, {B, H});
    if (cache != nullptr) {
      cache->assign(static_cast<size_t>(T * B * C), kNaN);
      a.cache = view(*cache, {T, B, C});
    }
    return a;
  };
  auto loss = [&](const Inputs& v) {
    Vec y, h_T, c_T;
    forward(options, forward_args(v, y, h_T, c_T, nullptr));
    double L = 0;
    for (size_t i = 0; i < y.size(); ++i) L += y[i] * dy[i];
    for (size_t i = 0; i < h_T.size(); ++i) L += h_T[i] * dh_T[i];
    for (size_t i = 0; i < c_T.size(); ++i) L += c_T[i] * dc_T[i];
    return L;
  };

  static Vec y, h_T, c_T, cache;
  const ForwardArgs f = forward_args(in, y, h_T, c_T, &cache);
  forward(options, f);
  CHECK_MSG(all_finite(y) && all_finite(h_T) && all_finite(c_T) && all_finite(cache),
            name + ": forward left NaN in an output");
  CHECK_MSG(bitwise_equal(h_T, Vec(y.end() - B * P, y.end())), name + ": h_T differs from y[T-1]");
  BackwardArgs b = backward_args_for(f);
  CHECK(b.W_hr.data == f.W_hr.data && b.gamma_x.data == f.gamma_x.data && b.beta_c.data == f.beta_c.data);
  static Vec dx, dh0, dc0, dW, dR, dbW, dbR, dP, dW_hr, dgamma_x, dgamma_h, dgamma_c, dbeta_c;
  dx.assign(static_cast<size_t>(T * B * I), kNaN), dh0.assign(static_cast<size_t>(B * P), kNaN);
  dc0.assign(static_cast<size_t>(B * H), kNaN), dW.assign(static_cast<size_t>(GH * I), kNaN);
  dR.assign(static_cast<size_t>(GH * P), kNaN), dbW.assign(static_cast<size_t>(GH), kNaN);
  dbR.assign(static_cast<size_t>(GH), kNaN), dP.assign(static_cast<size_t>(3 * H), kNaN);
  dW_hr.assign(static_cast<size_t>(P * H), kNaN), dgamma_x.assign(static_cast<size_t>(GH), kNaN);
  dgamma_h.assign(static_cast<size_t>(GH), kNaN), dgamma_c.assign(static_cast<size_t>(H), kNaN);
  dbeta_c.assign(static_cast<size_t>(H), kNaN);
  b.dy = view(dy, {T, B, P});
  b.dh_T = view(dh_T, {B, P});
  b.dc_T = view(dc_T, {B, H});
  b.dx = view(dx, {T, B, I});
  b.dh0 = view(dh0, {B, P});
  b.dc0 = view(dc0, {B, H});
  b.dW = view(dW, {GH, I});
  b.dR = view(dR, {GH, P});
  b.dbW = view(dbW, {GH});
  b.dbR = view(dbR, {GH});
  b.dP = view(dP, {3, H});
  b.dW_hr = view(dW_hr, {P, H});
  if (options.layer_norm) {
    b.dgamma_x = view(dgamma_x, {GH});
    b.dgamma_h = view(dgamma_h, {GH});
    b.dgamma_c = view(dgamma_c, {H});
    b.dbeta_c = view(dbeta_c, {H});
  }
  backward(options, b);

  const double eps = 1e-6;
  struct Gradient {
    const char* name;
    Vec Inputs::*input;
    const Vec* analytic;
  };
  std::vector<Gradient> grads = {{"dx", &Inputs::x, &dx},     {"dh0", &Inputs::h0, &dh0},
                                 {"dc0", &Inputs::c0, &dc0},   {"dW", &Inputs::W, &dW},
                                 {"dR", &Inputs::R, &dR},      {"dbW", &Inputs::bW, &dbW},
                                 {"dbR", &Inputs::bR, &dbR},   {"dP", &Inputs::peephole, &dP},
                                 {"dW_hr", &Inputs::W_hr, &dW_hr}};
  if (options.layer_norm) {
    grads.insert(grads.end(), {{"dgamma_x", &Inputs::gamma_x, &dgamma_x}, {"dgamma_h", &Inputs::gamma_h, &dgamma_h},
                               {"dgamma_c", &Inputs::gamma_c, &dgamma_c}, {"dbeta_c", &Inputs::beta_c, &dbeta_c}});
  }
  for (const auto& g : grads) {
    Inputs q = in;
    Vec& v = q.*g.input;
    int bad = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      const double saved = v[i];
      v[i] = saved + eps;
      const double plus = loss(q);
      v[i] = saved - eps;
      const double minus = loss(q);
      v[i] = saved;
      if (!conveyor_test::near((*g.analytic)[i], (plus - minus) / (2 * eps), 1e-7, 1e-5)) ++bad;
    }
    CHECK_MSG(bad == 0, name + ": " + g.name + " vs finite differences: " + std::to_string(bad) + " of " +
                            std::to_string(v.size()) + " elements off");
  }
  return {f, b};
}

void check_projection() {
  auto [f, b] = check_lstm_gradients("projection", CellOptions{}, 500);
  const int64_t T = 3, B = 2, H = 4, GH = 16;
  const CellOptions options = [] {
    CellOptions o;
    o.peephole = true;
    return o;
  }();
  // The refusals name W_hr (a GRU has no projection) and dW_hr (no projection to differentiate).
  CellOptions gru;
  gru.cell = CellType::gru;
  ForwardArgs wrong = f;
  wrong.P = TensorView{};
  wrong.c0 = wrong.c_T = wrong.cache = TensorView{};
  CHECK_THROWS(forward(gru, wrong), ArgumentError, "W_hr: a projection is an LSTM option, but the cell is gru");
  BackwardArgs no_projection = b;
  no_projection.W_hr = TensorView{};
  CHECK_THROWS(backward(options, no_projection), ArgumentError,
               "R: expected shape (8, 2) = (4*hidden_size, hidden_size) for a lstm (4 gate blocks), got (16, 2)");
  Vec R_square(static_cast<size_t>(GH * H), 0.1), y_wide(static_cast<size_t>(T * B * H)), dy_wide(y_wide);
  Vec h0_wide(static_cast<size_t>(B * H)), dR_square(R_square), dh0_wide(h0_wide);
  no_projection.R = view(R_square, {GH, H});
  no_projection.h0 = view(h0_wide, {B, H});
  no_projection.y = view(y_wide, {T, B, H});
  no_projection.dy = view(dy_wide, {T, B, H});
  no_projection.dh_T = TensorView{};
  no_projection.dh0 = view(dh0_wide, {B, H});
  no_projection.dR = view(dR_square, {GH, H});
  CHECK_THROWS(backward(options, no_projection), ArgumentError,
               "dW_hr: a projection gradient was asked for, but the window has no projection (W_hr)");
}

// Layer norm, zoneout of h and c and DropConnect, all at once with a projection and peepholes; their
// refusals.
void check_regularisers() {
  CellOptions options;
  options.peephole = true;
  options.layer_norm = true;
  options.zoneout = 0.3;
  options.zoneout_cell = 0.4;
  options.weight_dropout = 0.3;
  options.dropout_seed = 77;
  options.zoneout_stream = 3;
  options.zoneout_cell_stream = 4;
  options.weight_dropout_stream = 2;
  auto [f, b] = check_lstm_gradients("regularisers", options, 600);
  CHECK(cache_width(options) == 5 + 1 + 2 * 4);
  CellOptions rnn;
  rnn.cell = CellType::rnn;
  rnn.zoneout = 0.1;
  CHECK_THROWS(forward(rnn, ForwardArgs{}), ArgumentError,
               "zoneout: an option of the LSTM and the GRU, but the cell is rnn");
  CellOptions gru;
  gru.cell = CellType::gru;
  gru.reset_after = false;
  gru.layer_norm = true;
  CHECK_THROWS(forward(gru, ForwardArgs{}), ArgumentError,
               "layer_norm: the GRU with reset_after = false has no layer-normalised form");
  ForwardArgs missing = f;
  missing.gamma_c = TensorView{};
  CHECK_THROWS(forward(options, missing), ArgumentError, "gamma_c: expected an array of shape (4,)");
  CellOptions plain = options;
  plain.layer_norm = false;
  CHECK_THROWS(forward(plain, f), ArgumentError, "gamma_x: a layer-norm gain given, but layer_norm is off");
  BackwardArgs gradient_without_gain = b;
  gradient_without_gain.gamma_c = TensorView{};
  CHECK_THROWS(backward(options, gradient_without_gain), ArgumentError, "gamma_c: expected an array of shape (4,)");
  options.weight_dropout = 1.0;
  CHECK_THROWS(forward(options, f), ArgumentError, "weight_dropout: expected a probability in [0, 1), got 1");
}

}  // namespace

int main() {
  try {
    for (const Problem& p : all_cells(100, 3, 2, 3, 4)) check_cell(p);
    // A second draw with T = 1 and B = 1 (the edges of the time loop and the few-row products).
    for (const Problem& p : all_cells(200, 1, 1, 3, 4)) check_cell(p);
    for (const Problem& p : all_cells(300, 4, 3, 3, 4)) check_lengths(p);
    for (const Problem& p : all_cells(400, 4, 3, 3, 4)) check_packed(p);
    check_projection();
    check_regularisers();
    check_errors();
    check_backends();
    check_threads();
  } catch (const std::exception& e) {
    CHECK_MSG(false, std::string("unexpected exception: ") + e.what());
  }
  return conveyor_test::report();
}
