// The regularisers' kernels (contract: regularisers.cuh): DropConnect's R * M and dR, zoneout of an h_t formed
// after the step's kernel, and layer normalisation's row kernels. The elementwise kernels stride over their
// elements; each row kernel runs one block of kRowThreads threads per row, its threads striding over the row's
// units, and sums over the row with block_sum (a fixed tree: deterministic). The formulas are the CPU backend's
// (csrc/cpu/recurrence.cpp: weight_mask, zone_out, layer_norm_row, layer_norm_backward_row,
// lstm_layer_norm_output_row, lstm_layer_norm_backward_row), in Compute<S>.
#include "regularisers.cuh"

#include <cmath>

#include "cells/dropout.h"
#include "cells/lstm.h"
#include "layer_norm.cuh"

namespace conveyor::cuda {

constexpr int kRowThreads = 128;

inline unsigned elementwise_blocks(int64_t count) {
  return count / 256 + 1 < 4096 ? unsigned(count / 256 + 1) : 4096u;
}

// ---------------------------------------------------------------------------------------------------------
// DropConnect

template <typename S>
__global__ void dropped_weights_kernel(int64_t rows, int64_t cols, double p, uint64_t seed, uint64_t mask_stream,
                                       const S* R, S* out) {
  using C = Compute<S>;
  const int64_t count = rows * cols;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols, k = e % cols;
    out[e] = convert<S>(convert<C>(R[e]) * cells::dropout_mask_value<C>(p, seed, mask_stream, r, k, 0));
  }
}

template <typename S>
__global__ void dropped_weight_grads_kernel(int64_t rows, int64_t cols, double p, uint64_t seed,
                                            uint64_t mask_stream, const Compute<S>* grads, bool accumulate, S* dR) {
  using C = Compute<S>;
  const int64_t count = rows * cols;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols, k = e % cols;
    const C grad = cells::dropout_mask_value<C>(p, seed, mask_stream, r, k, 0) * grads[e];
    dR[e] = convert<S>(accumulate ? convert<C>(dR[e]) + grad : grad);
  }
}

template <typename S>
void dropped_weights(const CellOptions& options, int64_t rows, int64_t cols, const S* R, S* out,
                     cudaStream_t stream) {
  const NvtxRange range("conveyor::dropped_weights");
  launch("dropped_weights_kernel", dropped_weights_kernel<S>, elementwise_blocks(rows * cols), 256, 0, stream, rows,
         cols, options.weight_dropout, options.dropout_seed, options.weight_dropout_stream, R, out);
}

template <typename S>
void dropped_weight_grads(const CellOptions& options, int64_t rows, int64_t cols, const Compute<S>* grads,
                          bool accumulate, S* dR, cudaStream_t stream) {
  const NvtxRange range("conveyor::dropped_weight_grads");
  launch("dropped_weight_grads_kernel", dropped_weight_grads_kernel<S>, elementwise_blocks(rows * cols), 256, 0,
         stream, rows, cols, options.weight_dropout, options.dropout_seed, options.weight_dropout_stream, grads,
         accumulate, dR);
}

// ---------------------------------------------------------------------------------------------------------
// Zoneout, and the input of a product under recurrent dropout

template <typename S>
__global__ void masked_hidden_kernel(int64_t count, const Compute<S>* mask, const S* h, Compute<S>* out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    out[e] = convert<Compute<S>>(h[e]) * mask[e];
  }
}

template <typename S>
__global__ void hidden_zoneout_kernel(ForwardStep<S> p, const Compute<S>* h_tilde) {
  const int64_t units = p.output_size, count = p.batch * units;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    p.h[e] = convert<S>(hidden_after_zoneout(p, e / units, e % units, h_tilde[e]));
  }
}

template <typename S>
void masked_hidden(int64_t count, const Compute<S>* mask, const S* h, Compute<S>* out, cudaStream_t stream) {
  launch("masked_hidden_kernel", masked_hidden_kernel<S>, elementwise_blocks(count), 256, 0, stream, count, mask, h,
         out);
}

template <typename S>
void hidden_zoneout(const ForwardStep<S>& p, const Compute<S>* h_tilde, cudaStream_t stream) {
  launch("hidden_zoneout_kernel", hidden_zoneout_kernel<S>, elementwise_blocks(p.batch * p.output_size), 256, 0,
         stream, p, h_tilde);
}

// ---------------------------------------------------------------------------------------------------------
// Layer normalisation

// The sum of every thread's `value` over the block, returned to every thread; `scratch` is the block's shared
// [kRowThreads]. Every thread of the block calls it.
template <typename C>
__device__ C block_sum(C value, C* scratch) {
  const int tid = threadIdx.x;
  scratch[tid] = value;
  __syncthreads();
  for (int half = kRowThreads / 2; half > 0; half /= 2) {
    if (tid < half) scratch[tid] += scratch[tid + half];
    __syncthreads();
  }
  const C total = scratch[0];
  __syncthreads();  // every thread has read it before scratch is written again
  return total;
}

// The mean of the n values load(i) of the block's row and 1 / sqrt(their biased variance + 1e-5), in two passes.
template <typename C, typename Load>
__device__ RowStatistics<C> row_statistics(int64_t n, const Load& load, C* scratch) {
  C sum = C(0);
  for (int64_t i = threadIdx.x; i < n; i += kRowThreads) sum += load(i);
  const C mean = block_sum(sum, scratch) / C(n);
  C squares = C(0);
  for (int64_t i = threadIdx.x; i < n; i += kRowThreads) {
    const C d = load(i) - mean;
    squares += d * d;
  }
  return statistics_from_moments(mean, block_sum(squares, scratch), C(n));
}

template <typename S>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_kernel(int64_t n, const S* gamma, Compute<S>* v, int64_t ld, S* raw, int64_t raw_ld) {
  using C = Compute<S>;
  CONVEYOR_SHARED(C, scratch, [kRowThreads]);
  const int64_t row = blockIdx.x;
  C* values = v + row * ld;
  const RowStatistics<C> s = row_statistics<C>(n, [values](int64_t i) { return values[i]; }, scratch);
  for (int64_t i = threadIdx.x; i < n; i += kRowThreads) {
    const C value = values[i];
    if (raw != nullptr) raw[row * raw_ld + i] = convert<S>(value);
    values[i] = convert<C>(gamma[i]) * ((value - s.mean) * s.rstd);
  }
}

template <typename S>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_backward_kernel(int64_t n, const S* raw, int64_t raw_ld, const S* gamma, const Compute<S>* d_first,
                               int64_t first_ld, int64_t split, const Compute<S>* d_second, int64_t second_ld,
                               Compute<S>* dv, Compute<S>* d_gamma) {
  using C = Compute<S>;
  CONVEYOR_SHARED(C, scratch, [kRowThreads]);
  const int64_t row = blockIdx.x;
  const S* v = raw + row * raw_ld;
  auto d_out = [&](int64_t i) {
    return i < split ? d_first[row * first_ld + i] : d_second[row * second_ld + (i - split)];
  };
  const RowStatistics<C> s = row_statistics<C>(n, [v](int64_t i) { return convert<C>(v[i]); }, scratch);
  C sum_d = C(0), sum_dv = C(0);
  for (int64_t i = threadIdx.x; i < n; i += kRowThreads) {
    const C d_hat = d_out(i) * convert<C>(gamma[i]);
    sum_d += d_hat;
    sum_dv += d_hat * ((convert<C>(v[i]) - s.mean) * s.rstd);
  }
  const C mean_d = block_sum(sum_d, scratch) / C(n);
  const C mean_dv = block_sum(sum_dv, scratch) / C(n);
  for (int64_t i = threadIdx.x; i < n; i += kRowThreads) {
    const C v_hat = (convert<C>(v[i]) - s.mean) * s.rstd;
    if (d_gamma != nullptr) d_gamma[row * n + i] = d_out(i) * v_hat;
    dv[row * n + i] = layer_norm_input_grad(d_out(i), convert<C>(gamma[i]), v_hat, s.rstd, mean_d, mean_dv);
  }
}

// o * act(LN(c_t; gamma_c, beta_c)) of a forward step's row: into cell_output (with a projection), else h_t.
template <typename S, bool kRelu>
__global__ void __launch_bounds__(kRowThreads)
    lstm_norm_output_kernel(ForwardStep<S> p, const S* gamma_c, const S* beta_c) {
  using C = Compute<S>;
  CONVEYOR_SHARED(C, scratch, [kRowThreads]);
  const int64_t b = blockIdx.x, H = p.hidden;
  const C* c = p.norm_inputs + b * 2 * H + H;
  const RowStatistics<C> s = row_statistics<C>(H, [c](int64_t j) { return c[j]; }, scratch);
  for (int64_t j = threadIdx.x; j < H; j += kRowThreads) lstm_norm_output_unit<S, kRelu>(p, b, j, s, gamma_c, beta_c);
}

template <typename S, bool kRelu>
__global__ void __launch_bounds__(kRowThreads)
    lstm_norm_outputs_from_cache_kernel(int64_t hidden, const S* cache, int64_t cache_stride, const S* gamma_c,
                                        const S* beta_c, Compute<S>* out) {
  using C = Compute<S>;
  CONVEYOR_SHARED(C, scratch, [kRowThreads]);
  const int64_t row = blockIdx.x, H = hidden;
  const S* o = cache + row * cache_stride + 3 * H;
  const S* c = o + H;
  const RowStatistics<C> s = row_statistics<C>(H, [c](int64_t j) { return convert<C>(c[j]); }, scratch);
  for (int64_t j = threadIdx.x; j < H; j += kRowThreads) {
    const C c_hat = (convert<C>(c[j]) - s.mean) * s.rstd;
    out[row * H + j] =
        cells::lstm_output(kRelu, convert<C>(o[j]), convert<C>(gamma_c[j]) * c_hat + convert<C>(beta_c[j]));
  }
}

// One row of a layer-normalised LSTM's backward step: the gradient reaching LN(c_t), d_ln = d_output * o *
// act'(.), then LN's backward to dc_output, the gradient reaching c_t through the output, and the cell's backward
// from it (cells::lstm_backward_from_output) as the LSTM epilogue runs it.
template <typename S, bool kRelu>
__global__ void __launch_bounds__(kRowThreads)
    lstm_norm_backward_kernel(BackwardStep<S> p, const Compute<S>* d_output, const S* gamma_c, const S* beta_c,
                              Compute<S>* d_gamma_c, Compute<S>* d_beta_c) {
  using C = Compute<S>;
  CONVEYOR_SHARED(C, scratch, [kRowThreads]);
  const int64_t b = blockIdx.x, H = p.hidden;
  const S* saved = p.cache + b * p.cache_stride;
  auto c_at = [saved, H](int64_t j) { return convert<C>(saved[4 * H + j]); };
  const RowStatistics<C> s = row_statistics<C>(H, c_at, scratch);
  C sum_d = C(0), sum_dv = C(0);
  for (int64_t j = threadIdx.x; j < H; j += kRowThreads) {
    const LstmNormUnit<C> u = lstm_norm_unit<S, kRelu>(saved, H, j, s, gamma_c, beta_c, d_output[b * H + j]);
    const C d_hat = u.d_ln * convert<C>(gamma_c[j]);
    sum_d += d_hat;
    sum_dv += d_hat * u.c_hat;
  }
  const C mean_d = block_sum(sum_d, scratch) / C(H);
  const C mean_dv = block_sum(sum_dv, scratch) / C(H);
  for (int64_t j = threadIdx.x; j < H; j += kRowThreads) {
    lstm_norm_cell_backward<S, kRelu>(p, b, j, s, mean_d, mean_dv, d_output[b * H + j], gamma_c, beta_c, d_gamma_c,
                                      d_beta_c);
  }
}

// The statistics of each row's n values (of leading dimension ld): out [rows][2] (=) each row's mean and rstd.
template <typename S>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_statistics_kernel(int64_t n, const S* v, int64_t ld, Compute<S>* out) {
  using C = Compute<S>;
  CONVEYOR_SHARED(C, scratch, [kRowThreads]);
  const int64_t row = blockIdx.x;
  const S* values = v + row * ld;
  const RowStatistics<C> s = row_statistics<C>(n, [values](int64_t i) { return convert<C>(values[i]); }, scratch);
  if (threadIdx.x == 0) {
    out[2 * row] = s.mean;
    out[2 * row + 1] = s.rstd;
  }
}

template <typename S>
void layer_norm(int64_t rows, int64_t n, const S* gamma, Compute<S>* v, int64_t ld, S* raw, int64_t raw_ld,
                cudaStream_t stream) {
  if (rows == 0) return;
  const NvtxRange range("conveyor::layer_norm");
  launch("layer_norm_kernel", layer_norm_kernel<S>, unsigned(rows), kRowThreads, 0, stream, n, gamma, v, ld, raw,
         raw_ld);
}

template <typename S>
void layer_norm_backward(int64_t rows, int64_t n, const S* raw, int64_t raw_ld, const S* gamma,
                         const Compute<S>* d_first, int64_t first_ld, int64_t split, const Compute<S>* d_second,
                         int64_t second_ld, Compute<S>* dv, Compute<S>* d_gamma, cudaStream_t stream) {
  if (rows == 0) return;
  const NvtxRange range("conveyor::layer_norm_backward");
  launch("layer_norm_backward_kernel", layer_norm_backward_kernel<S>, unsigned(rows), kRowThreads, 0, stream, n, raw,
         raw_ld, gamma, d_first, first_ld, split, d_second, second_ld, dv, d_gamma);
}

template <typename S>
void layer_norm_statistics(int64_t rows, int64_t n, const S* v, int64_t ld, Compute<S>* out, cudaStream_t stream) {
  if (rows == 0) return;
  launch("layer_norm_statistics_kernel", layer_norm_statistics_kernel<S>, unsigned(rows), kRowThreads, 0, stream, n,
         v, ld, out);
}

template <typename S, bool kRelu>
void lstm_norm_output(const ForwardStep<S>& p, const S* gamma_c, const S* beta_c, cudaStream_t stream) {
  launch("lstm_norm_output_kernel", lstm_norm_output_kernel<S, kRelu>, unsigned(p.batch), kRowThreads, 0, stream, p,
         gamma_c, beta_c);
}

template <typename S, bool kRelu>
void lstm_norm_outputs_from_cache(int64_t rows, int64_t hidden, const S* cache, int64_t cache_stride,
                                  const S* gamma_c, const S* beta_c, Compute<S>* out, cudaStream_t stream) {
  if (rows == 0) return;
  launch("lstm_norm_outputs_from_cache_kernel", lstm_norm_outputs_from_cache_kernel<S, kRelu>, unsigned(rows),
         kRowThreads, 0, stream, hidden, cache, cache_stride, gamma_c, beta_c, out);
}

template <typename S, bool kRelu>
void lstm_norm_backward(const BackwardStep<S>& p, const Compute<S>* d_output, const S* gamma_c, const S* beta_c,
                        Compute<S>* d_gamma_c, Compute<S>* d_beta_c, cudaStream_t stream) {
  launch("lstm_norm_backward_kernel", lstm_norm_backward_kernel<S, kRelu>, unsigned(p.batch), kRowThreads, 0, stream,
         p, d_output, gamma_c, beta_c, d_gamma_c, d_beta_c);
}

#define CONVEYOR_INSTANTIATE_REGULARISERS_RELU(S, RELU)                                                          \
  template void lstm_norm_output<S, RELU>(const ForwardStep<S>&, const S*, const S*, cudaStream_t);              \
  template void lstm_norm_outputs_from_cache<S, RELU>(int64_t, int64_t, const S*, int64_t, const S*, const S*,   \
                                                      Compute<S>*, cudaStream_t);                                \
  template void lstm_norm_backward<S, RELU>(const BackwardStep<S>&, const Compute<S>*, const S*, const S*,       \
                                            Compute<S>*, Compute<S>*, cudaStream_t);

#define CONVEYOR_INSTANTIATE_REGULARISERS(S)                                                                     \
  template void dropped_weights<S>(const CellOptions&, int64_t, int64_t, const S*, S*, cudaStream_t);           \
  template void dropped_weight_grads<S>(const CellOptions&, int64_t, int64_t, const Compute<S>*, bool, S*,      \
                                        cudaStream_t);                                                           \
  template void masked_hidden<S>(int64_t, const Compute<S>*, const S*, Compute<S>*, cudaStream_t);               \
  template void hidden_zoneout<S>(const ForwardStep<S>&, const Compute<S>*, cudaStream_t);                       \
  template void layer_norm<S>(int64_t, int64_t, const S*, Compute<S>*, int64_t, S*, int64_t, cudaStream_t);      \
  template void layer_norm_backward<S>(int64_t, int64_t, const S*, int64_t, const S*, const Compute<S>*, int64_t, \
                                       int64_t, const Compute<S>*, int64_t, Compute<S>*, Compute<S>*,            \
                                       cudaStream_t);                                                            \
  template void layer_norm_statistics<S>(int64_t, int64_t, const S*, int64_t, Compute<S>*, cudaStream_t);        \
  CONVEYOR_INSTANTIATE_REGULARISERS_RELU(S, false)                                                               \
  CONVEYOR_INSTANTIATE_REGULARISERS_RELU(S, true)

CONVEYOR_INSTANTIATE_REGULARISERS(float)
CONVEYOR_INSTANTIATE_REGULARISERS(double)
CONVEYOR_INSTANTIATE_REGULARISERS(__half)
CONVEYOR_INSTANTIATE_REGULARISERS(bfloat16)

}  // namespace conveyor::cuda
