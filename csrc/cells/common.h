// Per-element building blocks shared by every cell and every backend.
//
// Everything here is an inline function callable from host and device code, so that the CUDA kernels run
// exactly the formulas the CPU backend (and so the CPU tests) check. Values are computed in the type the
// backend accumulates in (float or double); storage types are converted before and after.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define CONVEYOR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CONVEYOR_HOST_DEVICE inline
#endif

namespace conveyor::cells {

template <typename T>
CONVEYOR_HOST_DEVICE T sigmoid(T a) {
  // exp(-a) overflows to inf for very negative a, which still gives the right limit, 0.
  return T(1) / (T(1) + std::exp(-a));
}

// The derivative of the sigmoid, from its output s = sigmoid(a).
template <typename T>
CONVEYOR_HOST_DEVICE T sigmoid_grad_from_output(T s) {
  return s * (T(1) - s);
}

// The cell activation act() of SPEC.md; `relu` selects relu, else tanh. A bool rather than the Activation
// enum keeps this header free of the public API, so that kernels can make it a template constant.
template <typename T>
CONVEYOR_HOST_DEVICE T activate(bool relu, T a) {
  // Written so that relu(NaN) is NaN, not 0: bad input must show in the output.
  return relu ? (a < T(0) ? T(0) : a) : std::tanh(a);
}

// act'(a) from the output v = act(a): tanh' = 1 - v^2; relu' = 1 where a > 0, which is where v > 0
// (the derivative at 0 is taken as 0).
template <typename T>
CONVEYOR_HOST_DEVICE T activation_grad_from_output(bool relu, T v) {
  return relu ? (v > T(0) ? T(1) : T(0)) : T(1) - v * v;
}

}  // namespace conveyor::cells
