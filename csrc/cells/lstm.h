// The LSTM cell of SPEC.md for one (batch row, hidden unit): forward and backward.
//
// Pre-activations arrive already summed (a = W x_t + bW + R h_{t-1} + bR), gate order i, f, g, o.
#pragma once

#include "common.h"

namespace conveyor::cells {

template <typename T>
struct LstmGates {
  T i, f, g, o;  // after their activations
  T c;           // the new cell state c_t
  T h;           // the new hidden state h_t
};

template <typename T>
CONVEYOR_HOST_DEVICE LstmGates<T> lstm_forward(bool relu, T a_i, T a_f, T a_g, T a_o, T c_prev) {
  LstmGates<T> s;
  s.i = sigmoid(a_i);
  s.f = sigmoid(a_f);
  s.g = activate(relu, a_g);
  s.o = sigmoid(a_o);
  s.c = s.f * c_prev + s.i * s.g;
  s.h = s.o * activate(relu, s.c);
  return s;
}

template <typename T>
struct LstmGrads {
  T da_i, da_f, da_g, da_o;  // gradients of the pre-activations
  T dc_prev;                 // gradient flowing into c_{t-1}
};

// dh: total gradient reaching h_t (from y_t and from step t+1); dc: gradient reaching c_t from step t+1.
template <typename T>
CONVEYOR_HOST_DEVICE LstmGrads<T> lstm_backward(bool relu, T i, T f, T g, T o, T c, T c_prev, T dh, T dc) {
  const T act_c = activate(relu, c);
  const T dc_total = dc + dh * o * activation_grad_from_output(relu, act_c);
  LstmGrads<T> d;
  d.da_o = dh * act_c * sigmoid_grad_from_output(o);
  d.da_i = dc_total * g * sigmoid_grad_from_output(i);
  d.da_f = dc_total * c_prev * sigmoid_grad_from_output(f);
  d.da_g = dc_total * i * activation_grad_from_output(relu, g);
  d.dc_prev = dc_total * f;
  return d;
}

}  // namespace conveyor::cells
