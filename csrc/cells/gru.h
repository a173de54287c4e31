// The GRU cell of docs/math.md for one (batch row, hidden unit): forward and backward, both variants.
//
// Gate order r, z, n. z near 1 keeps the old state: h_t = (1 - z) n + z h_{t-1}.
//   reset_after=true:  n = act(ax_n + r * (R_n h_{t-1} + bR_n))   one recurrent product per step
//   reset_after=false: n = act(ax_n + R_n (r * h_{t-1}) + bR_n)   the product waits for r
// where ax = W x_t + bW. The backends do the matrix products; these functions do the rest.
#pragma once

#include "common.h"

namespace conveyor::cells {

template <typename T>
CONVEYOR_HOST_DEVICE T gru_output(T z, T n, T h_prev) {
  return (T(1) - z) * n + z * h_prev;
}

// reset_after=true: ar_n = R_n h_{t-1} + bR_n.
template <typename T>
CONVEYOR_HOST_DEVICE T gru_candidate_reset_after(bool relu, T ax_n, T r, T ar_n) {
  return activate(relu, ax_n + r * ar_n);
}

// reset_after=false: ar_n = R_n (r * h_{t-1}) + bR_n.
template <typename T>
CONVEYOR_HOST_DEVICE T gru_candidate_reset_before(bool relu, T ax_n, T ar_n) {
  return activate(relu, ax_n + ar_n);
}

template <typename T>
struct GruGrads {
  T da_r, da_z;  // gradients of the r and z pre-activations (the same for the W and R paths)
  T dax_n;       // gradient of ax_n
  T dar_n;       // gradient of ar_n: the n pre-activation of the recurrent path
  T dh_prev;     // the part of dh_{t-1} that does not go through R: z * dh
};

// reset_after=true. dh: total gradient reaching h_t; ar_n as in the forward.
template <typename T>
CONVEYOR_HOST_DEVICE GruGrads<T> gru_backward_reset_after(bool relu, T r, T z, T n, T ar_n, T h_prev, T dh) {
  GruGrads<T> d;
  d.dax_n = dh * (T(1) - z) * activation_grad_from_output(relu, n);
  d.dar_n = d.dax_n * r;
  d.da_r = d.dax_n * ar_n * sigmoid_grad_from_output(r);
  d.da_z = dh * (h_prev - n) * sigmoid_grad_from_output(z);
  d.dh_prev = dh * z;
  return d;
}

// reset_after=false, first half: everything that does not need d(r * h_{t-1}), which is R_n^T dar_n and
// so waits for a matrix product. da_r is left for gru_reset_gate_grad_reset_before.
template <typename T>
CONVEYOR_HOST_DEVICE GruGrads<T> gru_backward_reset_before(bool relu, T z, T n, T h_prev, T dh) {
  GruGrads<T> d;
  d.dax_n = dh * (T(1) - z) * activation_grad_from_output(relu, n);
  d.dar_n = d.dax_n;
  d.da_r = T(0);
  d.da_z = dh * (h_prev - n) * sigmoid_grad_from_output(z);
  d.dh_prev = dh * z;
  return d;
}

// reset_after=false, second half: d_rh = (R_n^T dar_n) at this unit, the gradient of r * h_{t-1}.
template <typename T>
CONVEYOR_HOST_DEVICE T gru_reset_gate_grad_reset_before(T r, T h_prev, T d_rh) {
  return d_rh * h_prev * sigmoid_grad_from_output(r);
}

}  // namespace conveyor::cells
