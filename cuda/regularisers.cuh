// The regularisers' kernels (CellOptions: weight_dropout, zoneout, layer_norm; docs/math.md, "Regularisers"),
// which the windows of recurrence.cu call around their products and step kernels: DropConnect's R * M and its
// dR; zoneout of an h_t formed after the step's kernel; layer normalisation's row kernels, forward and backward.
// Zoneout of the states the step kernels form is in their epilogues (step.cuh). Declarations; regularisers.cu
// defines them and instantiates them for every storage type S (with the activation where the cell math runs).
//
// Every kernel computes in Compute<S>: layer normalisation's row statistics too (float32 beside 16-bit storage,
// double for double), over one row per block, summed in a fixed order (two runs agree bit for bit).
#pragma once

#include <cstdint>

#include "conveyor/conveyor.h"
#include "device.cuh"
#include "step.cuh"

namespace conveyor::cuda {

// ---------------------------------------------------------------------------------------------------------
// DropConnect (CellOptions::weight_dropout)

// out (=) R * M over [rows, cols], M[r, k] = cells::dropout_mask_value of (dropout_seed, weight_dropout_stream,
// r, k, 0): the product in Compute<S>, rounded to S, as the CPU backend forms it.
template <typename S>
void dropped_weights(const CellOptions& options, int64_t rows, int64_t cols, const S* R, S* out,
                     cudaStream_t stream);

// dR (=, or += when `accumulate`) M * grads, grads [rows, cols] the gradient of R * M.
template <typename S>
void dropped_weight_grads(const CellOptions& options, int64_t rows, int64_t cols, const Compute<S>* grads,
                          bool accumulate, S* dR, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// Zoneout, and the input of a product under recurrent dropout

// out (=) mask * h, for `count` elements.
template <typename S>
void masked_hidden(int64_t count, const Compute<S>* mask, const S* h, Compute<S>* out, cudaStream_t stream);

// A forward step's h_t (=) h_tilde [B, P] after zoneout (step.cuh, hidden_after_zoneout), for its rows.
template <typename S>
void hidden_zoneout(const ForwardStep<S>& p, const Compute<S>* h_tilde, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// Layer normalisation (CellOptions::layer_norm): LN(v; gamma, beta) = gamma * (v - mean) * rstd + beta over a
// row, rstd = 1 / sqrt(biased variance + 1e-5)

// v (=) LN(v; gamma, 0) in place, for `rows` rows of n (leading dimension ld); raw (=) v before it, rows of
// leading dimension raw_ld, when not null.
template <typename S>
void layer_norm(int64_t rows, int64_t n, const S* gamma, Compute<S>* v, int64_t ld, S* raw, int64_t raw_ld,
                cudaStream_t stream);

// Its backward from the raw v: dv (=) the gradient of v [rows, n] given d_out, the gradient of LN(v; gamma, 0),
// whose first `split` columns are d_first's (leading dimension first_ld) and the rest d_second's (second_ld);
// d_gamma (=) each row's part of gamma's gradient, d_out * v_hat [rows, n], when not null.
template <typename S>
void layer_norm_backward(int64_t rows, int64_t n, const S* raw, int64_t raw_ld, const S* gamma,
                         const Compute<S>* d_first, int64_t first_ld, int64_t split, const Compute<S>* d_second,
                         int64_t second_ld, Compute<S>* dv, Compute<S>* d_gamma, cudaStream_t stream);

// The statistics of each of `rows` rows of n values (leading dimension ld): out [rows][2] (=) the row's mean and
// rstd. The persistent backward takes them for every step at once, before its loop.
template <typename S>
void layer_norm_statistics(int64_t rows, int64_t n, const S* v, int64_t ld, Compute<S>* out, cudaStream_t stream);

// The layer-normalised LSTM's output of a forward step, o * act(LN(c_t; gamma_c, beta_c)), from p.norm_inputs:
// into p.cell_output with a projection, else into h_t, after zoneout.
template <typename S, bool kRelu>
void lstm_norm_output(const ForwardStep<S>& p, const S* gamma_c, const S* beta_c, cudaStream_t stream);

// The same output for `rows` rows of a cache (of row length cache_stride), from their o and c_t: out [rows, H] (=)
// (m_t, which dW_hr pairs with dh_total).
template <typename S, bool kRelu>
void lstm_norm_outputs_from_cache(int64_t rows, int64_t hidden, const S* cache, int64_t cache_stride,
                                  const S* gamma_c, const S* beta_c, Compute<S>* out, cudaStream_t stream);

// A backward step of the layer-normalised LSTM: the LSTM epilogue's work (step.cuh), with LN(c_t)'s backward
// between the output and c_t. From d_output [B, H], the gradient reaching o * act(LN(c_t)), and p's cache, c_{t-1}
// and dc (zoneout of c included): p.dax and p.dc (=); d_gamma_c, d_beta_c (=) the rows' parts of those gains'
// gradients [B, H], when not null.
template <typename S, bool kRelu>
void lstm_norm_backward(const BackwardStep<S>& p, const Compute<S>* d_output, const S* gamma_c, const S* beta_c,
                        Compute<S>* d_gamma_c, Compute<S>* d_beta_c, cudaStream_t stream);

}  // namespace conveyor::cuda
