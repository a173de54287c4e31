// The LSTM cell of docs/math.md for one (batch row, hidden unit): forward and backward, with every LSTM option.
//
// Pre-activations arrive already summed (a = W x_t + bW + R h_{t-1} + bR). The options:
//   peephole      i and f see c_{t-1}, o sees the new c_t, through diagonal weights p_i, p_f, p_o
//   coupled       i = 1 - f (CIFG): a_i is not used, and its gradient is zero
//   forget_bias   added to f's pre-activation
//   cell_clip     > 0: c_t clamped to [-cell_clip, cell_clip]; the gradient stops where it was clipped
#pragma once

#include "common.h"

namespace conveyor::cells {

template <typename T>
struct LstmOptions {
  bool relu = false;
  bool coupled = false;
  bool peephole = false;
  T forget_bias = T(0);
  T cell_clip = T(0);
};

// p_i, p_f, p_o of one hidden unit (zeros without peephole).
template <typename T>
struct Peephole {
  T i, f, o;
};

template <typename T>
struct LstmGates {
  T i, f, g, o;  // after their activations
  T c;           // the new cell state c_t (after the clip)
  T h;           // the new hidden state h_t
};

// o * act(c_t): the LSTM's output h_t, or with a projection what W_hr projects (backward recomputes it from
// the o and c_t it saved).
template <typename T>
CONVEYOR_HOST_DEVICE T lstm_output(bool relu, T o, T c) {
  return o * activate(relu, c);
}

template <typename T>
CONVEYOR_HOST_DEVICE LstmGates<T> lstm_forward(const LstmOptions<T>& opt, T a_i, T a_f, T a_g, T a_o, T c_prev,
                                               Peephole<T> p) {
  LstmGates<T> s;
  const T peep_f = opt.peephole ? p.f * c_prev : T(0);
  s.f = sigmoid(a_f + peep_f + opt.forget_bias);
  s.i = opt.coupled ? T(1) - s.f : sigmoid(a_i + (opt.peephole ? p.i * c_prev : T(0)));
  s.g = activate(opt.relu, a_g);
  T c = s.f * c_prev + s.i * s.g;
  if (opt.cell_clip > T(0)) {
    // Written so that NaN passes through.
    c = c > opt.cell_clip ? opt.cell_clip : c;
    c = c < -opt.cell_clip ? -opt.cell_clip : c;
  }
  s.c = c;
  s.o = sigmoid(a_o + (opt.peephole ? p.o * c : T(0)));
  s.h = lstm_output(opt.relu, s.o, c);
  return s;
}

// The plain LSTM: no peephole, no coupling, no forget bias, no clip.
template <typename T>
CONVEYOR_HOST_DEVICE LstmGates<T> lstm_forward(bool relu, T a_i, T a_f, T a_g, T a_o, T c_prev) {
  LstmOptions<T> opt;
  opt.relu = relu;
  return lstm_forward(opt, a_i, a_f, a_g, a_o, c_prev, Peephole<T>{T(0), T(0), T(0)});
}

template <typename T>
struct LstmGrads {
  T da_i, da_f, da_g, da_o;  // gradients of the pre-activations (da_i = 0 with coupled gates)
  T dc_prev;                 // gradient flowing into c_{t-1}
};

// The backward given what the output h_t = o * act(.) sends back: d_o, the gradient reaching o, and dc_output,
// the one reaching c_t through act (layer normalisation of c_t puts its own backward in between); dc: the
// gradient reaching c_t from step t+1. i, f, g, o, c as lstm_forward returned them.
template <typename T>
CONVEYOR_HOST_DEVICE LstmGrads<T> lstm_backward_from_output(const LstmOptions<T>& opt, T i, T f, T g, T o, T c,
                                                            T c_prev, T d_o, T dc_output, T dc, Peephole<T> p) {
  LstmGrads<T> d;
  d.da_o = d_o * sigmoid_grad_from_output(o);
  T dc_total = dc + dc_output + (opt.peephole ? d.da_o * p.o : T(0));
  if (opt.cell_clip > T(0) && (c >= opt.cell_clip || c <= -opt.cell_clip)) dc_total = T(0);
  if (opt.coupled) {
    d.da_i = T(0);
    d.da_f = dc_total * (c_prev - g) * sigmoid_grad_from_output(f);
  } else {
    d.da_i = dc_total * g * sigmoid_grad_from_output(i);
    d.da_f = dc_total * c_prev * sigmoid_grad_from_output(f);
  }
  d.da_g = dc_total * i * activation_grad_from_output(opt.relu, g);
  d.dc_prev = dc_total * f + (opt.peephole ? d.da_i * p.i + d.da_f * p.f : T(0));
  return d;
}

// dh: total gradient reaching h_t (from y_t and from step t+1); dc: gradient reaching c_t from step t+1.
// i, f, g, o, c as lstm_forward returned them.
template <typename T>
CONVEYOR_HOST_DEVICE LstmGrads<T> lstm_backward(const LstmOptions<T>& opt, T i, T f, T g, T o, T c, T c_prev, T dh,
                                                T dc, Peephole<T> p) {
  const T act_c = activate(opt.relu, c);
  return lstm_backward_from_output(opt, i, f, g, o, c, c_prev, dh * act_c,
                                   dh * o * activation_grad_from_output(opt.relu, act_c), dc, p);
}

template <typename T>
CONVEYOR_HOST_DEVICE LstmGrads<T> lstm_backward(bool relu, T i, T f, T g, T o, T c, T c_prev, T dh, T dc) {
  LstmOptions<T> opt;
  opt.relu = relu;
  return lstm_backward(opt, i, f, g, o, c, c_prev, dh, dc, Peephole<T>{T(0), T(0), T(0)});
}

// The gate blocks' offsets (in units of H) in W, R, the biases and the pre-activation gradients.
struct LstmBlocks {
  int i, f, g, o;  // i is -1 with coupled gates
};

CONVEYOR_HOST_DEVICE LstmBlocks lstm_blocks(bool coupled) {
  return coupled ? LstmBlocks{-1, 0, 1, 2} : LstmBlocks{0, 1, 2, 3};
}

}  // namespace conveyor::cells
