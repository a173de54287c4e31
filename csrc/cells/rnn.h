// The plain RNN cell of docs/math.md for one (batch row, hidden unit): h_t = act(a).
#pragma once

#include "common.h"

namespace conveyor::cells {

template <typename T>
CONVEYOR_HOST_DEVICE T rnn_forward(bool relu, T a) {
  return activate(relu, a);
}

// da from dh, the total gradient reaching h_t, and h_t itself.
template <typename T>
CONVEYOR_HOST_DEVICE T rnn_backward(bool relu, T h, T dh) {
  return dh * activation_grad_from_output(relu, h);
}

}  // namespace conveyor::cells
