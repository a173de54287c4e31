// Layer normalisation's per-unit math (CellOptions::layer_norm; docs/math.md, "Regularisers"), shared by the row
// kernels of regularisers.cu, where one block holds a whole row, and the persistent kernels of persistent.cu, where
// each block holds a few units of every row and the row's statistics and sums are combined across blocks. Device
// code for both builds. The formulas are the CPU backend's (csrc/cpu/recurrence.cpp), in Compute<S>.
#pragma once

#include <cmath>
#include <cstdint>

#include "cells/lstm.h"
#include "device.cuh"
#include "step.cuh"

namespace conveyor::cuda {

constexpr double kLayerNormEpsilon = 1e-5;

template <typename C>
struct RowStatistics {
  C mean, rstd;  // rstd = 1 / sqrt(biased variance + 1e-5)
};

template <typename C>
__host__ __device__ inline RowStatistics<C> statistics_from_moments(C mean, C squared_deviations, C count) {
  return {mean, C(1) / std::sqrt(squared_deviations / count + C(kLayerNormEpsilon))};
}

// LN's backward at one element: the gradient of its input v, from d_out (the gradient of LN(v; gamma, .)), the
// element's gain, its normalised value v_hat, and the row's means of d_out * gamma and of d_out * gamma * v_hat.
template <typename C>
__host__ __device__ inline C layer_norm_input_grad(C d_out, C gamma, C v_hat, C rstd, C mean_d, C mean_dv) {
  return rstd * (d_out * gamma - mean_d - v_hat * mean_dv);
}

// The layer-normalised LSTM's output at unit j of row b of a forward step, o * act(LN(c_t; gamma_c, beta_c)), from
// p.norm_inputs and the statistics of the row's c_t: into p.cell_output with a projection, else into h_t after
// zoneout.
template <typename S, bool kRelu>
__device__ inline void lstm_norm_output_unit(const ForwardStep<S>& p, int64_t b, int64_t j,
                                             RowStatistics<Compute<S>> s, const S* gamma_c, const S* beta_c) {
  using C = Compute<S>;
  const int64_t H = p.hidden;
  const C o = p.norm_inputs[b * 2 * H + j], c = p.norm_inputs[b * 2 * H + H + j];
  const C m = cells::lstm_output(kRelu, o, convert<C>(gamma_c[j]) * ((c - s.mean) * s.rstd) + convert<C>(beta_c[j]));
  if (p.cell_output != nullptr) {
    p.cell_output[b * H + j] = m;
  } else {
    p.h[b * H + j] = convert<S>(hidden_after_zoneout(p, b, j, m));
  }
}

// Unit j of a cached row (`saved`, the step's cache row) in the layer-normalised LSTM's backward: c_t's normalised
// value, act(LN(c_t)), and d_ln, the gradient reaching LN(c_t) from d_output (the gradient reaching o * act(.)).
template <typename C>
struct LstmNormUnit {
  C c_hat, act, d_ln;
};

template <typename S, bool kRelu>
__device__ inline LstmNormUnit<Compute<S>> lstm_norm_unit(const S* saved, int64_t H, int64_t j,
                                                          RowStatistics<Compute<S>> s, const S* gamma_c,
                                                          const S* beta_c, Compute<S> d_output) {
  using C = Compute<S>;
  LstmNormUnit<C> u;
  u.c_hat = (convert<C>(saved[4 * H + j]) - s.mean) * s.rstd;
  u.act = cells::activate(kRelu, convert<C>(gamma_c[j]) * u.c_hat + convert<C>(beta_c[j]));
  u.d_ln = d_output * convert<C>(saved[3 * H + j]) * cells::activation_grad_from_output(kRelu, u.act);
  return u;
}

// The layer-normalised LSTM's cell backward at unit j of row b of a backward step, given the row's statistics of
// c_t and its means of d_ln * gamma_c and of d_ln * gamma_c * c_hat: LN(c_t)'s backward to dc_output, the gradient
// reaching c_t through the output, then the cell's (cells::lstm_backward_from_output) as the LSTM epilogue runs it:
// p.dax and p.dc (=); d_gamma_c, d_beta_c (=) the row's parts of the gains' gradients [B, H], when not null.
template <typename S, bool kRelu>
__device__ inline void lstm_norm_cell_backward(const BackwardStep<S>& p, int64_t b, int64_t j,
                                               RowStatistics<Compute<S>> s, Compute<S> mean_d, Compute<S> mean_dv,
                                               Compute<S> d_output, const S* gamma_c, const S* beta_c,
                                               Compute<S>* d_gamma_c, Compute<S>* d_beta_c) {
  using C = Compute<S>;
  const int64_t H = p.hidden, unit = b * H + j;
  const S* saved = p.cache + b * p.cache_stride;
  const LstmNormUnit<C> u = lstm_norm_unit<S, kRelu>(saved, H, j, s, gamma_c, beta_c, d_output);
  if (d_beta_c != nullptr) d_beta_c[unit] = u.d_ln;
  if (d_gamma_c != nullptr) d_gamma_c[unit] = u.d_ln * u.c_hat;
  const C dc_output = layer_norm_input_grad(u.d_ln, convert<C>(gamma_c[j]), u.c_hat, s.rstd, mean_d, mean_dv);
  cells::LstmOptions<C> opt = p.lstm;
  opt.relu = kRelu;
  const cells::LstmBlocks blocks = cells::lstm_blocks(opt.coupled);
  const LstmBackwardInputs<C> in = lstm_backward_inputs(p, b, j);
  const auto d = cells::lstm_backward_from_output(opt, convert<C>(saved[j]), convert<C>(saved[H + j]),
                                                  convert<C>(saved[2 * H + j]), convert<C>(saved[3 * H + j]),
                                                  convert<C>(saved[4 * H + j]), in.c_prev, d_output * u.act,
                                                  dc_output, in.dc, in.peephole);
  C* dax = p.dax + b * p.gate_stride;
  if (!opt.coupled) dax[j] = d.da_i;
  dax[blocks.f * H + j] = d.da_f;
  dax[blocks.g * H + j] = d.da_g;
  dax[blocks.o * H + j] = d.da_o;
  p.dc[unit] = p.zoneout.c > 0 ? d.dc_prev + in.dc_kept : d.dc_prev;
}

}  // namespace conveyor::cuda
