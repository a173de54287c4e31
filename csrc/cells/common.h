// Per-element building blocks shared by every cell and every backend.
//
// Everything here is an inline function callable from host and device code, so that the CUDA kernels run
// exactly the formulas the CPU backend (and so the CPU tests) check. Values are computed in the type the
// backend accumulates in (float or double); storage types are converted before and after.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CONVEYOR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CONVEYOR_HOST_DEVICE inline
#endif

namespace conveyor::cells {

// a * b + c in one rounding where the hardware fuses it (every GPU; the CPU when built for a target with FMA),
// else in two. The polynomials below take it: one instruction a term in place of two dependent ones. The build
// turns off the compiler's own contraction (CMakeLists.txt) for the GEMMs' sake; a cell's math has one code path
// a unit, so fusing it here changes no result between paths.
CONVEYOR_HOST_DEVICE float multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp and tanh in float, from arithmetic alone (Cephes' expf and tanhf, single-precision minimax
// polynomials, within 2 ulp of the exact value over the whole range). The CPU compiler vectorises loops that
// call these, where the C library's expf/tanhf would be called one element at a time; the GPU runs the same
// arithmetic. NaN goes through as NaN; +-inf give the limits. double uses the C library.
CONVEYOR_HOST_DEVICE float cell_exp(float x) {
  // Clamp so that 2^n below stays a normal float; written so that NaN passes through the comparisons.
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // x = n ln2 + r with |r| <= ln2 / 2, ln2 split in two so that n * ln2_hi is exact. n is x / ln2 rounded
  // to the nearest integer by adding and removing 1.5 * 2^23 (no call to floor, which keeps the loops that
  // call this vectorisable). NaN takes n = 0 (converting NaN to an integer would be undefined) and passes
  // through r. Selected on the input, not on n: GCC split loops that selected on n into two paths, each with
  // its own copy of the callers' divisions.
  constexpr float kRound = 12582912.0f;
  const float n = ((x == x ? x : 0.0f) * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = multiply_add(1.9875691500e-4f, r, 1.3981999507e-3f);
  p = multiply_add(p, r, 8.3334519073e-3f);
  p = multiply_add(p, r, 4.1665795894e-2f);
  p = multiply_add(p, r, 1.6666665459e-1f);
  p = multiply_add(p, r, 5.0000001201e-1f);
  const float exp_r = multiply_add(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  return exp_r * two_to_n;
}

CONVEYOR_HOST_DEVICE float cell_tanh(float x) {
  const float z = x * x;
  // |x| < 0.625: an odd polynomial, accurate where 1 - 2/(e^2x + 1) would cancel.
  float q = multiply_add(-5.70498872745e-3f, z, 2.06390887954e-2f);
  q = multiply_add(q, z, -5.37397155531e-2f);
  q = multiply_add(q, z, 1.33314422036e-1f);
  q = multiply_add(q, z, -3.33332819422e-1f);
  const float small = multiply_add(q * z, x, x);
  const float magnitude = 1.0f - 2.0f / (cell_exp(2.0f * std::fabs(x)) + 1.0f);
  const float large = x < 0.0f ? -magnitude : magnitude;
  return std::fabs(x) < 0.625f ? small : large;
}

CONVEYOR_HOST_DEVICE double cell_exp(double x) { return std::exp(x); }
CONVEYOR_HOST_DEVICE double cell_tanh(double x) { return std::tanh(x); }

template <typename T>
CONVEYOR_HOST_DEVICE T sigmoid(T a) {
  // exp(-a) overflows to inf for very negative a, which still gives the right limit, 0.
  return T(1) / (T(1) + cell_exp(-a));
}

// The derivative of the sigmoid, from its output s = sigmoid(a).
template <typename T>
CONVEYOR_HOST_DEVICE T sigmoid_grad_from_output(T s) {
  return s * (T(1) - s);
}

// The cell activation act() of docs/math.md; `relu` selects relu, else tanh. A bool rather than the Activation
// enum keeps this header free of the public API, so that kernels can make it a template constant.
template <typename T>
CONVEYOR_HOST_DEVICE T activate(bool relu, T a) {
  // Written so that relu(NaN) is NaN, not 0: bad input must show in the output.
  return relu ? (a < T(0) ? T(0) : a) : cell_tanh(a);
}

// act'(a) from the output v = act(a): tanh' = 1 - v^2; relu' = 1 where a > 0, which is where v > 0
// (the derivative at 0 is taken as 0).
template <typename T>
CONVEYOR_HOST_DEVICE T activation_grad_from_output(bool relu, T v) {
  return relu ? (v > T(0) ? T(1) : T(0)) : T(1) - v * v;
}

}  // namespace conveyor::cells
