// The public C++ API's contracts, through conveyor/conveyor.h only:
//   - CPU results (float64) equal values stored from the NumPy reference (reference_values.h, written by
//     make_reference_values.py) for an LSTM, both GRUs and a relu RNN: outputs and every gradient;
//   - outputs that share memory with an input or with another output are refused with ArgumentError naming
//     both, before anything is written;
//   - shapes are checked against the window (a wrong one names the argument);
//   - sizes whose products pass 2^31 and 2^32 are counted and checked in 64 bits.
#include <conveyor/conveyor.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"
#include "reference_values.h"

namespace {

using namespace conveyor;
using Vec = std::vector<double>;
namespace rv = reference_values;

// value k = scale * sin(0.7 k + seed), as make_reference_values.py.
Vec formula(int64_t n, double seed, double scale) {
  Vec v(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) v[k] = scale * std::sin(0.7 * k + seed);
  return v;
}

TensorView view(Vec& v, std::initializer_list<int64_t> shape) {
  return TensorView::contiguous(v.data(), DType::float64, shape);
}

void check_values(const std::string& what, const Vec& got, const double* expected, size_t count) {
  bool ok = got.size() == count;
  size_t worst = 0;
  for (size_t i = 0; ok && i < count; ++i) {
    if (!conveyor_test::near(got[i], expected[i], 1e-12, 1e-10)) {
      ok = false;
      worst = i;
    }
  }
  CHECK_MSG(ok, what + ": differs from the reference at element " + std::to_string(worst));
}

struct Expected {
  const double *y, *h_T, *c_T, *dx, *dh0, *dc0, *dW, *dR, *dbW, *dbR;
};

void against_reference(const char* name, CellOptions options, const Expected& e) {
  const int64_t T = rv::T, B = rv::B, I = rv::I, H = rv::H;
  const int64_t G = gate_count(options), GH = G * H, cw = cache_width(options) * H;
  const bool lstm = options.cell == CellType::lstm;
  Vec x = formula(T * B * I, 1, 1), W = formula(GH * I, 2, 0.5), R = formula(GH * H, 3, 0.5);
  Vec bW = formula(GH, 4, 0.5), bR = formula(GH, 5, 0.5), h0 = formula(B * H, 6, 0.5), c0 = formula(B * H, 7, 0.5);
  Vec dy = formula(T * B * H, 8, 1), dh_T = formula(B * H, 9, 1), dc_T = formula(B * H, 10, 1);
  const double nan = std::nan("");
  Vec y(T * B * H, nan), h_T(B * H, nan), c_T(B * H, nan), cache(T * B * cw, nan);
  Vec dx(T * B * I, nan), dh0(B * H, nan), dc0(B * H, nan), dW(GH * I, nan), dR(GH * H, nan), dbW(GH, nan),
      dbR(GH, nan);

  ForwardArgs f;
  f.x = view(x, {T, B, I});
  f.W = view(W, {GH, I});
  f.R = view(R, {GH, H});
  f.bW = view(bW, {GH});
  f.bR = view(bR, {GH});
  f.h0 = view(h0, {B, H});
  if (lstm) f.c0 = view(c0, {B, H});
  f.y = view(y, {T, B, H});
  f.h_T = view(h_T, {B, H});
  if (lstm) f.c_T = view(c_T, {B, H});
  if (cw > 0) f.cache = view(cache, {T, B, cw});
  forward(options, f);

  BackwardArgs b = backward_args_for(f);
  b.dy = view(dy, {T, B, H});
  b.dh_T = view(dh_T, {B, H});
  if (lstm) b.dc_T = view(dc_T, {B, H});
  b.dx = view(dx, {T, B, I});
  b.dh0 = view(dh0, {B, H});
  if (lstm) b.dc0 = view(dc0, {B, H});
  b.dW = view(dW, {GH, I});
  b.dR = view(dR, {GH, H});
  b.dbW = view(dbW, {GH});
  b.dbR = view(dbR, {GH});
  backward(options, b);

  const std::string n(name);
  check_values(n + " y", y, e.y, y.size());
  check_values(n + " h_T", h_T, e.h_T, h_T.size());
  if (lstm) check_values(n + " c_T", c_T, e.c_T, c_T.size());
  check_values(n + " dx", dx, e.dx, dx.size());
  check_values(n + " dh0", dh0, e.dh0, dh0.size());
  if (lstm) check_values(n + " dc0", dc0, e.dc0, dc0.size());
  check_values(n + " dW", dW, e.dW, dW.size());
  check_values(n + " dR", dR, e.dR, dR.size());
  check_values(n + " dbW", dbW, e.dbW, dbW.size());
  check_values(n + " dbR", dbR, e.dbR, dbR.size());
}

template <typename Fn>
void expect_argument_error(const std::string& what, const std::string& prefix, Fn&& fn) {
  try {
    fn();
    CHECK_MSG(false, what + ": accepted");
  } catch (const ArgumentError& e) {
    CHECK_MSG(std::string(e.what()).rfind(prefix, 0) == 0, what + ": message '" + e.what() + "'");
  }
}

void aliasing_is_refused() {
  const int64_t T = 3, B = 2, I = 4, H = 4;
  CellOptions rnn;
  rnn.cell = CellType::rnn;
  Vec x = formula(T * B * I, 1, 1), W = formula(H * I, 2, 0.5), R = formula(H * H, 3, 0.5);
  Vec y(T * B * H), h_T(B * H);
  ForwardArgs f;
  f.x = view(x, {T, B, I});
  f.W = view(W, {H, I});
  f.R = view(R, {H, H});
  f.y = view(y, {T, B, H});
  f.h_T = view(h_T, {B, H});

  ForwardArgs into_x = f;
  into_x.y = view(x, {T, B, H});  // I == H: x has the shape y needs
  expect_argument_error("y written over x", "y: shares memory with the input x", [&] { forward(rnn, into_x); });
  ForwardArgs into_y = f;
  into_y.h_T = TensorView::contiguous(y.data() + (T - 1) * B * H, DType::float64, {B, H});
  expect_argument_error("h_T inside y", "h_T: shares memory with the output y", [&] { forward(rnn, into_y); });
  ForwardArgs into_W = f;
  into_W.h_T = TensorView::contiguous(W.data(), DType::float64, {B, H});
  expect_argument_error("h_T over W", "h_T: shares memory with the input W", [&] { forward(rnn, into_W); });
  forward(rnn, f);  // the distinct arrays are fine

  Vec cache_unused, dy = formula(T * B * H, 8, 1), dx(T * B * I), dW(H * I), dR(H * H);
  BackwardArgs b = backward_args_for(f);
  b.dy = view(dy, {T, B, H});
  b.dx = view(dx, {T, B, I});
  b.dW = view(dW, {H, I});
  b.dR = view(dR, {H, H});
  BackwardArgs over_dy = b;
  over_dy.dx = view(dy, {T, B, I});
  expect_argument_error("dx over dy", "dx: shares memory with the input dy", [&] { backward(rnn, over_dy); });
  BackwardArgs over_dW = b;
  over_dW.dR = TensorView::contiguous(dW.data(), DType::float64, {H, H});
  expect_argument_error("dR over dW", "dR: shares memory with the output dW", [&] { backward(rnn, over_dW); });
  backward(rnn, b);
  CHECK(std::isfinite(dx[0]) && std::isfinite(dR[H * H - 1]));
}

void shapes_are_checked() {
  CellOptions gru;
  gru.cell = CellType::gru;
  Vec x(2 * 1 * 3), W(9 * 3), R(9 * 3), y(2 * 1 * 3), wrong(5);
  ForwardArgs f;
  f.x = view(x, {2, 1, 3});
  f.W = view(W, {9, 3});
  f.R = view(R, {9, 3});
  f.y = view(y, {2, 1, 3});
  f.bW = view(wrong, {5});
  expect_argument_error("a bias of the wrong length", "bW: expected shape (9,)", [&] { forward(gru, f); });
}

// Sizes whose products pass 2^31 and 2^32 elements are counted and checked in 64 bits (views that are never
// read, so no memory is needed). The backends index with int64_t throughout (recurrence.cpp, cuda/).
void sizes_are_64_bit() {
  static double storage[1];
  auto huge = [](std::initializer_list<int64_t> shape) {
    return TensorView::contiguous(storage, DType::float64, shape);
  };
  const int64_t T = 1 << 16, B = 1 << 12, I = 3, H = 1 << 10;  // T*B*4H = 2^40
  CHECK(huge({T, B, 4 * H}).numel() == (int64_t(1) << 40));
  CHECK(huge({T, B, 4 * H}).is_contiguous());
  CellOptions lstm;
  ForwardArgs f;
  f.x = huge({T, B, I});
  f.W = huge({4 * H, I});
  f.R = huge({4 * H, H});
  const WindowSizes s = window_sizes(lstm, f.x, f.W, f.R);
  CHECK(s.steps == T && s.batch == B && s.hidden_size == H);
  check_forward_inputs(lstm, f);  // accepts the shapes without overflowing anywhere
}

}  // namespace

int main() {
  CellOptions lstm, gru_after, gru_before, rnn_relu;
  lstm.cell = CellType::lstm;
  gru_after.cell = CellType::gru;
  gru_before.cell = CellType::gru;
  gru_before.reset_after = false;
  rnn_relu.cell = CellType::rnn;
  rnn_relu.activation = Activation::relu;
  against_reference("lstm", lstm, {rv::lstm_y, rv::lstm_h_T, rv::lstm_c_T, rv::lstm_dx, rv::lstm_dh0, rv::lstm_dc0,
                                   rv::lstm_dW, rv::lstm_dR, rv::lstm_dbW, rv::lstm_dbR});
  against_reference("gru reset_after", gru_after,
                    {rv::gru_reset_after_y, rv::gru_reset_after_h_T, nullptr, rv::gru_reset_after_dx,
                     rv::gru_reset_after_dh0, nullptr, rv::gru_reset_after_dW, rv::gru_reset_after_dR,
                     rv::gru_reset_after_dbW, rv::gru_reset_after_dbR});
  against_reference("gru reset_before", gru_before,
                    {rv::gru_reset_before_y, rv::gru_reset_before_h_T, nullptr, rv::gru_reset_before_dx,
                     rv::gru_reset_before_dh0, nullptr, rv::gru_reset_before_dW, rv::gru_reset_before_dR,
                     rv::gru_reset_before_dbW, rv::gru_reset_before_dbR});
  against_reference("rnn relu", rnn_relu,
                    {rv::rnn_relu_y, rv::rnn_relu_h_T, nullptr, rv::rnn_relu_dx, rv::rnn_relu_dh0, nullptr,
                     rv::rnn_relu_dW, rv::rnn_relu_dR, rv::rnn_relu_dbW, rv::rnn_relu_dbR});
  aliasing_is_refused();
  shapes_are_checked();
  sizes_are_64_bit();
  return conveyor_test::report();
}
